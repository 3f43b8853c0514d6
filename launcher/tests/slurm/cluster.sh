#!/bin/bash
# A real Slurm cluster on this machine: munged, slurmctld and four slurmd (slurmd -N n1..n4,
# each on its own port), then srun of `launch` across it. Run by launcher/tests/slurm.rs.
#
#   cluster.sh LAUNCH IMAGE WORKDIR
#
# Prints "CHECK name value" lines for the test to assert on; exits non-zero if the cluster
# cannot be started. Tears everything down on exit.
set -u
LAUNCH=$1 IMAGE=$2 W=$3
# The ranks of step 1 wait for this file (the host's /tmp is bound into the containers).
RELEASE=$(mktemp -u /tmp/cimg-slurm-release.XXXXXX)
mkdir -p "$W"/{state,log,run}
export SLURM_CONF=$W/slurm.conf
CTLD_PORT=$((20000 + RANDOM % 20000))

# This cluster's step daemons: slurmstepd processes started with our SLURM_CONF.
stepds() {
    for p in $(pgrep -x slurmstepd); do
        { tr '\0' '\n' < "/proc/$p/environ"; } 2>/dev/null | grep -qx "SLURM_CONF=$SLURM_CONF" && echo "$p"
    done
}

cleanup() {
    rm -f "$RELEASE"
    # The daemons remove their pid files when told to stop, and slurmd may then wait for
    # its steps: read the pids first, ask, then make sure.
    pids="${MUNGED_PID:-}"
    for f in "$W"/run/*.pid; do [ -e "$f" ] && pids="$pids $(cat "$f")"; done
    for p in $pids; do kill "$p" 2>/dev/null; done
    sleep 0.5
    for p in $pids; do kill -9 "$p" 2>/dev/null; done
    # Step daemons outlive a killed slurmd; nothing of this cluster may stay.
    for p in $(stepds); do kill -9 "$p" 2>/dev/null; done
}
trap cleanup EXIT

# munge: a private key and socket, so a system munged (if any) is left alone.
dd if=/dev/urandom of="$W/munge.key" bs=1024 count=1 status=none
chmod 600 "$W/munge.key"
MSOCK=$W/run/munge.socket
munged --force --key-file="$W/munge.key" --socket="$MSOCK" --pid-file="$W/run/munged.pid" \
    --log-file="$W/log/munged.log" --seed-file="$W/run/munge.seed" || { echo "munged failed"; exit 2; }
MUNGED_PID=$(cat "$W/run/munged.pid")

cat > "$SLURM_CONF" <<CONF
ClusterName=cimgtest
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MSOCK
CredType=cred/munge
StateSaveLocation=$W/state
SlurmdSpoolDir=$W/spool-%n
SlurmctldPidFile=$W/run/slurmctld.pid
SlurmdPidFile=$W/run/slurmd-%n.pid
SlurmctldLogFile=$W/log/slurmctld.log
SlurmdLogFile=$W/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmdParameters=config_overrides
KillWait=2
InactiveLimit=0
NodeName=n[1-4] NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((CTLD_PORT + 1))-$((CTLD_PORT + 4)) CPUs=4 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=n[1-4] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF

slurmctld -f "$SLURM_CONF" -i || { echo "slurmctld failed"; cat "$W/log/slurmctld.log"; exit 2; }
for n in n1 n2 n3 n4; do
    slurmd -f "$SLURM_CONF" -N $n || { echo "slurmd $n failed"; cat "$W/log/slurmd-$n.log"; exit 2; }
done
for i in $(seq 100); do
    idle=$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)
    [ "$idle" -ge 4 ] && break
    sleep 0.2
done
echo "CHECK idle_nodes $idle"
[ "$idle" -ge 4 ] || { sinfo -N; tail -20 "$W"/log/*.log; exit 2; }

# Count what one step's containers hold while its ranks are alive: launch processes that
# lead their own session (FUSE servers) and mount namespaces holding the image.
census() {
    local servers=0 ns=""
    for p in /proc/[0-9]*; do
        pid=${p#/proc/}
        if grep -qs "fuse.cimg.*$IMAGE\|$IMAGE.*fuse.cimg" "$p/mountinfo"; then
            ns="$ns $(readlink "$p/ns/mnt")"
        fi
        if { tr '\0' ' ' < "$p/cmdline"; } 2>/dev/null | grep -q "^$LAUNCH .*$IMAGE"; then
            sid=$(awk '{print $6}' "$p/stat" 2>/dev/null)
            [ "$sid" = "$pid" ] && servers=$((servers + 1))
        fi
    done
    echo "CHECK servers $servers"
    echo "CHECK mount_namespaces $(echo $ns | tr ' ' '\n' | sort -u | grep -c .)"
}

# 1. 16 ranks on 4 nodes: each reports its node, mount namespace and the image's marker.
OUT=$W/step1.out
srun -N4 -n16 --ntasks-per-node=4 "$LAUNCH" "$IMAGE" -- \
    sh -c 'echo "RANK $SLURM_PROCID $SLURMD_NODENAME $(readlink /proc/self/ns/mnt) $(cat /srv/work/marker)"; while [ ! -e "$0" ]; do sleep 0.05; done' "$RELEASE" > "$OUT" 2> "$W/step1.err" &
SRUN=$!
for i in $(seq 300); do [ "$(grep -c ^RANK "$OUT")" -ge 16 ] && break; sleep 0.1; done
census
touch "$RELEASE"
wait $SRUN
echo "CHECK step1_status $?"
echo "CHECK ranks $(grep -c '^RANK.*in the image$' "$OUT")"
echo "CHECK nodes $(awk '/^RANK/{print $3}' "$OUT" | sort -u | wc -l)"
echo "CHECK containers $(awk '/^RANK/{print $4}' "$OUT" | sort -u | wc -l)"
echo "CHECK node_container_pairs $(awk '/^RANK/{print $3, $4}' "$OUT" | sort -u | wc -l)"
echo "CHECK max_ranks_per_container $(awk '/^RANK/{print $4}' "$OUT" | sort | uniq -c | awk '{print $1}' | sort -n | tail -1)"
sed 's/^/step1 stderr: /' "$W/step1.err" | head -5

# 2. Exit codes reach srun.
srun -N4 -n16 --ntasks-per-node=4 "$LAUNCH" "$IMAGE" -- sh -c 'exit 3' 2>/dev/null
echo "CHECK exit_status $?"

# 3. scancel of a running step leaves no process and no mount behind.
srun -N4 -n16 --ntasks-per-node=4 "$LAUNCH" "$IMAGE" -- sh -c 'echo up; exec sleep 300' > "$W/step3.out" 2>/dev/null &
for i in $(seq 300); do [ "$(grep -c up "$W/step3.out")" -ge 16 ] && break; sleep 0.1; done
echo "CHECK step3_up $(grep -c up "$W/step3.out")"
JOB=$(squeue -h -o %i | head -1)
scancel "$JOB"
for i in $(seq 150); do
    left=$(pgrep -f "^$LAUNCH .*$IMAGE" | wc -l)
    mounts=$(grep -ls "fuse.cimg.*$IMAGE" /proc/[0-9]*/mountinfo 2>/dev/null | wc -l)
    sleepers=$(pgrep -xfc 'sleep 300')
    [ "$left" = 0 ] && [ "$mounts" = 0 ] && [ "$sleepers" = 0 ] && break
    sleep 0.1
done
echo "CHECK after_scancel_processes $left"
echo "CHECK after_scancel_mounts $mounts"
echo "CHECK after_scancel_sleepers $sleepers"
# If a sleeper survived, say what it is (its parent, namespaces, signal state) for the log.
for p in $(pgrep -xf 'sleep 300'); do
    echo "DIAG sleeper $(ps -o pid=,ppid=,pgid=,sid=,stat=,etimes=,cmd= -p "$p")"
    echo "DIAG   parent $(ps -o pid=,stat=,cmd= -p "$(ps -o ppid= -p "$p" | tr -d ' ')")"
    echo "DIAG   mnt $(readlink "/proc/$p/ns/mnt") $(grep -E '^(SigBlk|SigIgn|SigCgt)' "/proc/$p/status" | tr '\n' ' ')"
done
exit 0
