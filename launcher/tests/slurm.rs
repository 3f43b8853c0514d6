//! A real Slurm cluster on this machine (munged, slurmctld, four slurmd started with
//! `slurmd -N`), and `srun -N4 -n16 launch ...` across it: exactly four containers (one
//! mount namespace per node) of four ranks each, on the image's server (one here: the four
//! nodes are one machine), every rank sees the image, exit codes reach srun, and scancel of
//! a running step leaves no process and no mount behind.
//! The script `tests/slurm/cluster.sh` does the cluster work and tears it down.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::process::Command;

use common::*;

#[test]
fn srun_across_four_nodes_makes_one_container_per_node() {
    if !capable() {
        return;
    }
    let tools = [
        "munged",
        "slurmctld",
        "slurmd",
        "srun",
        "sinfo",
        "squeue",
        "scancel",
    ];
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !have(t)).collect();
    if !missing.is_empty() {
        assert!(
            !ci(),
            "the Slurm test needs {missing:?} (apt-get install slurm-wlm munge)"
        );
        eprintln!("skipping: needs {missing:?}");
        return;
    }
    let f = fixture();
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/slurm/cluster.sh");
    let o = Command::new("bash")
        .arg(script)
        .arg(LAUNCH)
        .arg(&f.image)
        .arg(work.path().join("cluster"))
        .env("CIMG_LINGER", "0")
        .current_dir(work.path())
        .output()
        .unwrap();
    let text = out(&o);
    assert!(
        o.status.success(),
        "cluster script failed:\n{text}\n{}",
        err(&o)
    );
    let checks: BTreeMap<&str, &str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("CHECK "))
        .filter_map(|l| l.split_once(' '))
        .collect();
    // The four nodes of this cluster are one machine: the image service runs one server
    // for the user there, not one per node as on a real cluster, and the namespaces holding
    // the image are the four containers (one per node) and that server's own.
    let expect = [
        ("idle_nodes", "4"),
        ("servers", "1"),
        ("mount_namespaces", "5"),
        ("step1_status", "0"),
        ("ranks", "16"),
        ("nodes", "4"),
        ("containers", "4"),
        ("node_container_pairs", "4"),
        ("max_ranks_per_container", "4"),
        ("exit_status", "3"),
        ("step3_up", "16"),
        ("after_scancel_processes", "0"),
        ("after_scancel_mounts", "0"),
        ("after_scancel_sleepers", "0"),
    ];
    for (k, v) in expect {
        assert_eq!(checks.get(k).copied(), Some(v), "{k}:\n{text}\n{}", err(&o));
    }
    // The cluster is gone: no live process started with its configuration (step daemons
    // can take some seconds to notice their slurmd is gone).
    let conf = format!(
        "SLURM_CONF={}",
        work.path().join("cluster/slurm.conf").display()
    );
    let left = || -> Vec<String> {
        fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| {
                let environ = fs::read(e.path().join("environ")).unwrap_or_default();
                let stat = fs::read_to_string(e.path().join("stat")).unwrap_or_default();
                let zombie = stat.rsplit(") ").next().is_some_and(|r| r.starts_with('Z'));
                !zombie && environ.split(|&c| c == 0).any(|v| v == conf.as_bytes())
            })
            .map(|e| {
                let cmd = fs::read(e.path().join("cmdline")).unwrap_or_default();
                format!(
                    "{:?}: {}",
                    e.file_name(),
                    String::from_utf8_lossy(&cmd).replace('\0', " ")
                )
            })
            .collect()
    };
    let t = std::time::Instant::now();
    let mut still = left();
    while !still.is_empty() && t.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        still = left();
    }
    assert!(
        still.is_empty(),
        "left of the cluster after 60 s: {still:?}"
    );
}
