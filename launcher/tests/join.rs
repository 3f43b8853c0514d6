//! End-to-end tests of joining: peers of one group share one container (one user and mount
//! namespace, one FUSE mount, one server), in any start and exit order, and nothing is left
//! behind by killed peers, a killed server, or a stale group.

mod common;

use std::fs;
use std::process::{Child, Output, Stdio};
use std::time::Duration;

use common::*;

/// A private copy of the test image (so counting its servers is unambiguous).
fn private_image(tag: &str) -> String {
    let f = fixture();
    let img = f.work.join(format!("{tag}-{}.cimg", std::process::id()));
    fs::copy(&f.image, &img).unwrap();
    img.display().to_string()
}

fn peer(args: &[&str], script: &str) -> Child {
    launch_cmd()
        .args(args)
        .args(["--", "sh", "-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Servers of `img`: processes mentioning it that are not any peer's launch or app.
fn servers(img: &str, peers: &[u32]) -> usize {
    processes_with(img)
        .iter()
        .filter_map(|l| l.split(':').next()?.parse::<u32>().ok())
        .filter(|p| !peers.contains(p))
        .filter(|p| {
            // A server is a `launch` process in its own session.
            fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    let f: Vec<String> = s
                        .rsplit(") ")
                        .next()?
                        .split(' ')
                        .map(str::to_string)
                        .collect();
                    Some(f.get(3)? == &p.to_string())
                })
                .unwrap_or(false)
        })
        .count()
}

fn finish(children: Vec<Child>) -> Vec<Output> {
    children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect()
}

/// A file in the host's /tmp (bound into containers) that peers wait for.
struct Release {
    path: String,
    _dir: tempfile::TempDir,
}

impl Release {
    fn new() -> Release {
        let dir = tempfile::tempdir_in("/tmp").unwrap();
        let path = dir.path().join("release").display().to_string();
        Release { path, _dir: dir }
    }
    /// Shell code that waits for the release.
    fn wait(&self) -> String {
        format!("while [ ! -e {} ]; do sleep 0.02; done", self.path)
    }
    /// How many container apps (shells) wait for it.
    fn waiting(&self) -> usize {
        processes_with(&self.path)
            .iter()
            .filter(|l| {
                l.split_once(": ")
                    .is_some_and(|(_, cmd)| cmd.starts_with("sh -c"))
            })
            .count()
    }
    fn go(&self) {
        fs::write(&self.path, "").unwrap();
    }
}

impl Drop for Release {
    /// A test that failed before its release leaves no waiting container behind.
    fn drop(&mut self) {
        for l in processes_with(&self.path) {
            if let Some(pid) = l.split(':').next().and_then(|p| p.parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// A tiny deterministic shuffle of start delays.
fn delays(n: usize, seed: u64) -> Vec<u64> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) % 40
        })
        .collect()
}

#[test]
fn one_two_and_eight_peers_in_random_order_share_one_container() {
    if !capable() {
        return;
    }
    for (n, seed) in [(1usize, 1u64), (2, 2), (8, 3)] {
        let img = private_image(&format!("group{n}"));
        let tag = format!("t{n}-{}", std::process::id());
        let ct = n.to_string();
        let release = Release::new();
        let mut children = Vec::new();
        for (rank, d) in delays(n, seed).into_iter().enumerate() {
            std::thread::sleep(Duration::from_millis(d));
            // Each rank reports its namespaces, reads the image, waits for the release, exits
            // with its own code.
            let script = format!(
                "readlink /proc/self/ns/mnt /proc/self/ns/user; cat /srv/work/marker; {}; exit {rank}",
                release.wait()
            );
            children.push(peer(&["--join-ct", &ct, "--join-tag", &tag, &img], &script));
        }
        let pids: Vec<u32> = children.iter().map(|c| c.id()).collect();
        wait_until("every rank inside", || release.waiting() >= n);
        assert_eq!(servers(&img, &pids), 1, "{n} peers: one server");
        assert_eq!(
            mounts_of(std::path::Path::new(&img)),
            1,
            "{n} peers: one mount namespace"
        );
        release.go();
        let outs = finish(children);
        let mut namespaces = std::collections::BTreeSet::new();
        for (rank, o) in outs.iter().enumerate() {
            assert_eq!(
                o.status.code(),
                Some(rank as i32),
                "rank {rank}: {}",
                err(o)
            );
            let s = out(o);
            let lines: Vec<&str> = s.lines().collect();
            assert_eq!(lines.get(2), Some(&"in the image"), "rank {rank}: {s}");
            namespaces.insert((lines[0].to_string(), lines[1].to_string()));
        }
        assert_eq!(namespaces.len(), 1, "{n} peers: {namespaces:?}");
        wait_until("the server to exit", || processes_with(&img).is_empty());
        assert_eq!(mounts_of(std::path::Path::new(&img)), 0);
        fs::remove_file(&img).unwrap();
    }
}

#[test]
fn the_creator_may_exit_first() {
    if !capable() {
        return;
    }
    let img = private_image("creator-first");
    let tag = format!("cf-{}", std::process::id());
    // The creator waits until both others are inside, then exits; they read the image
    // afterwards.
    let (a, b) = (Release::new(), Release::new());
    let first = peer(
        &["--join-ct", "3", "--join-tag", &tag, &img],
        &format!("readlink /proc/self/ns/mnt; {}", a.wait()),
    );
    std::thread::sleep(Duration::from_millis(100));
    let late: Vec<Child> = (0..2)
        .map(|_| {
            peer(
                &["--join-ct", "3", "--join-tag", &tag, &img],
                &format!(
                    "readlink /proc/self/ns/mnt; {}; cat /srv/work/marker",
                    b.wait()
                ),
            )
        })
        .collect();
    wait_until("both late peers inside", || {
        processes_with(&b.path).len() >= 2
    });
    a.go();
    let o = first.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", err(&o));
    let ns = out(&o);
    b.go();
    for o in finish(late) {
        assert!(o.status.success(), "{}", err(&o));
        assert_eq!(out(&o), format!("{ns}in the image\n"));
    }
    wait_until("the server to exit", || processes_with(&img).is_empty());
    fs::remove_file(&img).unwrap();
}

#[test]
fn sigkill_of_a_peer_leaves_the_others_and_then_nothing() {
    if !capable() {
        return;
    }
    let img = private_image("kill-peer");
    let tag = format!("kp-{}", std::process::id());
    let a = peer(
        &["--join-ct", "2", "--join-tag", &tag, &img],
        "sleep 0.8; cat /srv/work/marker",
    );
    std::thread::sleep(Duration::from_millis(100));
    let mut b = peer(
        &["--join-ct", "2", "--join-tag", &tag, &img],
        "echo $$; exec sleep 30",
    );
    let b_app: u32 = first_line(&mut b).trim().parse().unwrap();
    b.kill().unwrap();
    b.wait().unwrap();
    wait_until("the killed peer's app to go", || {
        !std::path::Path::new(&format!("/proc/{b_app}")).exists()
    });
    let o = a.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(out(&o), "in the image\n");
    wait_until("nothing left", || processes_with(&img).is_empty());
    assert_eq!(mounts_of(std::path::Path::new(&img)), 0);
    fs::remove_file(&img).unwrap();
}

#[test]
fn sigkill_of_the_server_ends_every_peer() {
    if !capable() {
        return;
    }
    let img = private_image("kill-server");
    let tag = format!("ks-{}", std::process::id());
    let children: Vec<Child> = (0..3)
        .map(|_| peer(&["--join-ct", "3", "--join-tag", &tag, &img], "sleep 30"))
        .collect();
    let pids: Vec<u32> = children.iter().map(|c| c.id()).collect();
    let mut server = 0;
    wait_until("the server", || {
        server = processes_with(&img)
            .iter()
            .filter_map(|l| l.split(':').next()?.parse::<u32>().ok())
            .find(|p| {
                !pids.contains(p) && servers(&img, &pids) == 1 && {
                    let s = fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
                    s.rsplit(") ")
                        .next()
                        .and_then(|r| r.split(' ').nth(3).map(|x| x == p.to_string()))
                        .unwrap_or(false)
                }
            })
            .unwrap_or(0);
        server != 0
    });
    // Let all three join before the kill.
    wait_until("three peers inside", || {
        mounts_of(std::path::Path::new(&img)) == 1 && processes_with("sleep 30").len() >= 3
    });
    std::thread::sleep(Duration::from_millis(200));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let killed = std::time::Instant::now();
    for o in finish(children) {
        assert_eq!(o.status.code(), Some(125), "{}", err(&o));
        assert!(err(&o).contains("FUSE server ended"), "{}", err(&o));
    }
    // The whole container went (the shells' `sleep 30` children too, which hold stdout).
    assert!(
        killed.elapsed() < Duration::from_secs(15),
        "{:?}",
        killed.elapsed()
    );
    wait_until("nothing left", || processes_with(&img).is_empty());
    fs::remove_file(&img).unwrap();
}

#[test]
fn a_stale_group_does_not_block_the_next() {
    if !capable() {
        return;
    }
    let img = private_image("stale");
    let tag = format!("st-{}", std::process::id());
    // A group whose only peer is killed before the others come...
    let mut a = peer(
        &["--join-ct", "2", "--join-tag", &tag, &img],
        "exec sleep 30",
    );
    std::thread::sleep(Duration::from_millis(300));
    a.kill().unwrap();
    a.wait().unwrap();
    // ...and one whose peers have all gone while a daemon keeps its container alive.
    let daemon = peer(
        &["--join-ct", "2", "--join-tag", &tag, &img],
        // The daemon lets go of stdout, so this launch returns at once while the daemon
        // (and so the old container, whose namespace id cannot be reused meanwhile) lives.
        "readlink /proc/self/ns/mnt; (sleep 3 >/dev/null 2>&1 &) ; exit 0",
    );
    let old_ns = out(&daemon.wait_with_output().unwrap());
    // That group is over with its last peer's command, daemon or not: its name is free
    // within a moment, not once the daemon ends (3 s).
    let name = format!("@cimg-join/0/{tag}");
    let t = std::time::Instant::now();
    while fs::read_to_string("/proc/net/unix")
        .unwrap()
        .lines()
        .any(|l| l.split_whitespace().nth(7) == Some(name.as_str()))
    {
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "the ended group's name is still bound"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The next group with the same tag makes its own container.
    let next: Vec<Child> = (0..2)
        .map(|_| {
            peer(
                &["--join-ct", "2", "--join-tag", &tag, &img],
                "readlink /proc/self/ns/mnt; sleep 0.3",
            )
        })
        .collect();
    let outs = finish(next);
    assert!(outs.iter().all(|o| o.status.success()), "{outs:?}");
    assert_eq!(out(&outs[0]), out(&outs[1]));
    assert_ne!(out(&outs[0]), old_ns);
    wait_until("nothing left", || processes_with(&img).is_empty());
    fs::remove_file(&img).unwrap();
}

#[test]
fn bad_counts_and_tags() {
    if !capable() {
        return;
    }
    let img = fixture().image.display().to_string();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut c = launch_cmd();
        for (k, v) in env {
            c.env(k, v);
        }
        c.args(args)
            .arg(&img)
            .args(["--", "true"])
            .output()
            .unwrap()
    };
    let o = run(&["--join-ct", "0", "--join-tag", "x"], &[]);
    assert_eq!(code(&o), 2, "{}", err(&o));
    let o = run(&["--join-ct", "many"], &[]);
    assert_eq!(code(&o), 2);
    let o = run(&["--join"], &[]);
    assert_eq!(code(&o), 2);
    assert!(err(&o).contains("--join-ct"), "{}", err(&o));
    let o = run(&["--join-ct", "2"], &[]);
    assert!(err(&o).contains("--join-tag"), "{}", err(&o));
    let o = run(
        &["--join-tag", "x".repeat(300).as_str(), "--join-ct", "2"],
        &[],
    );
    assert_eq!(code(&o), 2);
    let o = run(
        &[],
        &[
            ("SLURM_JOB_ID", "1"),
            ("SLURM_STEP_ID", "0"),
            ("SLURM_STEP_TASKS_PER_NODE", "four"),
        ],
    );
    assert_eq!(code(&o), 2);
    assert!(err(&o).contains("SLURM_STEP_TASKS_PER_NODE"), "{}", err(&o));
    let o = run(
        &[],
        &[
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "-1"),
            ("PMIX_NAMESPACE", "ns"),
        ],
    );
    assert_eq!(code(&o), 2);
    // --no-join under Slurm: alone, fine.
    let o = run(
        &["--no-join"],
        &[
            ("SLURM_JOB_ID", "1"),
            ("SLURM_STEP_ID", "0"),
            ("SLURM_STEP_TASKS_PER_NODE", "four"),
        ],
    );
    assert_eq!(code(&o), 0, "{}", err(&o));
    // Peers that disagree on the count or the image.
    let tag = format!("bad-{}", std::process::id());
    let first = peer(&["--join-ct", "2", "--join-tag", &tag, &img], "sleep 0.5");
    std::thread::sleep(Duration::from_millis(150));
    let o = run(&["--join-ct", "3", "--join-tag", &tag], &[]);
    assert_eq!(code(&o), 2, "{}", err(&o));
    assert!(err(&o).contains("3 peers"), "{}", err(&o));
    // A joiner's own mount options cannot apply: said on stderr.
    let o = run(&["--join-ct", "2", "--join-tag", &tag, "-t"], &[]);
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert!(err(&o).contains("--private-tmp ignored"), "{}", err(&o));
    assert!(first.wait_with_output().unwrap().status.success());
    // A directory image cannot be shared.
    let o = launch_cmd()
        .args(["--join-ct", "2", "--join-tag", "d"])
        .arg(&fixture().rootfs)
        .args(["--", "true"])
        .output()
        .unwrap();
    assert_eq!(code(&o), 2, "{}", err(&o));
}

#[test]
fn slurm_environment_joins_automatically() {
    if !capable() {
        return;
    }
    let img = private_image("slurm-env");
    let job = std::process::id().to_string();
    let children: Vec<Child> = (0..3)
        .map(|node_rank| {
            launch_cmd()
                .env("SLURM_JOB_ID", &job)
                .env("SLURM_STEP_ID", "7")
                .env("SLURM_STEP_TASKS_PER_NODE", "3")
                .env("SLURM_NODEID", "0")
                .env("SLURM_LOCALID", node_rank.to_string())
                .args([
                    &img,
                    "--",
                    "sh",
                    "-c",
                    "readlink /proc/self/ns/mnt; sleep 0.4",
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs = finish(children);
    assert!(outs.iter().all(|o| o.status.success()), "{outs:?}");
    let ns: std::collections::BTreeSet<String> = outs.iter().map(out).collect();
    assert_eq!(ns.len(), 1, "{ns:?}");
    wait_until("nothing left", || processes_with(&img).is_empty());
    fs::remove_file(&img).unwrap();
}

#[test]
fn join_pid_enters_a_running_container() {
    if !capable() {
        return;
    }
    let img = private_image("join-pid");
    let mut a = peer(
        &[&img],
        "echo $$; readlink /proc/self/ns/mnt; exec sleep 30",
    );
    let mut r = std::io::BufReader::new(a.stdout.take().unwrap());
    let (mut pid, mut ns) = (String::new(), String::new());
    std::io::BufRead::read_line(&mut r, &mut pid).unwrap();
    std::io::BufRead::read_line(&mut r, &mut ns).unwrap();
    let o = launch_cmd()
        .args([
            "--join-pid",
            pid.trim(),
            &img,
            "--",
            "sh",
            "-c",
            "readlink /proc/self/ns/mnt; cat /srv/work/marker; exit 4",
        ])
        .output()
        .unwrap();
    assert_eq!(code(&o), 4, "{}", err(&o));
    assert_eq!(out(&o), format!("{ns}in the image\n"));
    // Not a container.
    let o = launch_cmd()
        .args([
            "--join-pid",
            &std::process::id().to_string(),
            &img,
            "--",
            "true",
        ])
        .output()
        .unwrap();
    assert_eq!(code(&o), 2);
    assert!(err(&o).contains("not in a cimg container"), "{}", err(&o));
    a.kill().unwrap();
    a.wait().unwrap();
    wait_until("nothing left", || processes_with(&img).is_empty());
    fs::remove_file(&img).unwrap();
}

/// Python: hold the abstract socket names given as arguments (listening on the first,
/// bound only on the others), say so, then wait to be killed.
const SQUAT: &str = r#"
import socket, sys, time
held = []
for i, name in enumerate(sys.argv[1:]):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind("\0" + name)
    if i == 0:
        s.listen(64)
    held.append(s)
print("held", flush=True)
time.sleep(120)
"#;

/// Under `-u`, the uid inside the container is not the caller's, but the peers of a group
/// still meet (the name is made from the host uid, before the user namespace) and share
/// one container.
#[test]
fn peers_join_under_the_uid_option() {
    if !capable() {
        return;
    }
    let img = private_image("uid-join");
    let tag = format!("uid-{}", std::process::id());
    let release = Release::new();
    let script = format!("readlink /proc/self/ns/mnt; id -u; {}", release.wait());
    let args = ["-u", "0", "--join-ct", "2", "--join-tag", &tag, &img];
    let children = vec![peer(&args, &script), peer(&args, &script)];
    wait_until("both peers inside", || release.waiting() == 2);
    release.go();
    let outs = finish(children);
    let lines: Vec<String> = outs.iter().map(ok).collect();
    assert_eq!(lines[0], lines[1], "peers in two containers");
    assert!(lines[0].ends_with("\n0\n"), "{}", lines[0]);
}

/// Inside a user namespace every other host user reads as the overflow uid (65534): a group
/// whose uid inside is 65534 must still tell another user apart, and never hand them a
/// process of the container. Another user (uid 1234) connects to the group's socket and
/// asks to join like a peer: the connection is dropped without an answer.
#[test]
fn another_user_is_never_let_into_a_group() {
    if !capable() {
        return;
    }
    let img = private_image("overflow-join");
    let tag = format!("ovf-{}", std::process::id());
    let release = Release::new();
    let victim = peer(
        &["-u", "65534", "--join-ct", "2", "--join-tag", &tag, &img],
        &release.wait(),
    );
    wait_until("the first peer inside", || release.waiting() == 1);
    const ASK: &str = r#"
import array, select, socket, sys
fds = array.array("i")
try:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect("\0" + sys.argv[1])
    s.sendall(b"J 2 " + sys.argv[2].encode() + b"\n")
    if not select.select([s], [], [], 3)[0]:
        print("no answer"); sys.exit(0)
    msg, anc, flags, addr = s.recvmsg(4096, socket.CMSG_SPACE(4 * fds.itemsize))
except (BrokenPipeError, ConnectionResetError):
    print("dropped"); sys.exit(0)
for level, kind, data in anc:
    fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
print("answer", msg[:1], "fds", len(fds))
"#;
    let o = python_as(1234, ASK, &[&format!("cimg-join/0/{tag}"), &img])
        .wait_with_output()
        .unwrap();
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        ["answer b'' fds 0\n", "dropped\n", "no answer\n"].contains(&&*said),
        "another user got: {said}"
    );
    // The group is unharmed.
    release.go();
    ok(&victim.wait_with_output().unwrap());
}

/// Another user holding the group's rendezvous names (they are predictable) does not stop a
/// job: the peers move to the next name and still share one container; when every name is
/// held, each runs in a container of its own, with a warning.
#[test]
fn squatted_rendezvous_names_do_not_stop_a_job() {
    if !capable() {
        return;
    }
    let img = private_image("squat-join");
    let tag = format!("squat-{}", std::process::id());
    let base = format!("cimg-join/0/{tag}");
    let names: Vec<String> = std::iter::once(base.clone())
        .chain((1..8).map(|k| format!("{base}#{k}")))
        .collect();
    for held in [2usize, 8] {
        let mut squatter = python_as(
            1234,
            SQUAT,
            &names[..held].iter().map(String::as_str).collect::<Vec<_>>(),
        );
        assert_eq!(first_line(&mut squatter), "held\n");
        let release = Release::new();
        let script = format!("readlink /proc/self/ns/mnt; {}", release.wait());
        let args = ["--join-ct", "2", "--join-tag", &tag, &img];
        let children = vec![peer(&args, &script), peer(&args, &script)];
        wait_until("both peers running", || release.waiting() == 2);
        release.go();
        let outs = finish(children);
        let _ = squatter.kill();
        let _ = squatter.wait();
        let ns: Vec<String> = outs.iter().map(ok).collect();
        if held < 8 {
            assert_eq!(ns[0], ns[1], "{held} names held: peers in two containers");
            assert!(outs.iter().all(|o| err(o).is_empty()), "{:?}", outs);
        } else {
            assert_ne!(ns[0], ns[1], "every name held, yet one container");
            for o in &outs {
                assert!(
                    err(o).contains("held by another user; running in a container of its own"),
                    "{}",
                    err(o)
                );
            }
        }
    }
}

/// A group on an image server that lingers: once its peers have ended, the group is over and
/// its name free, though the server lives on (the server must hold nothing of the launch
/// that started it, such as that launch's group listener).
#[test]
fn an_ended_group_frees_its_name_while_the_server_lingers() {
    if !capable() {
        return;
    }
    let img = private_image("linger-group");
    let tag = format!("lg-{}", std::process::id());
    let o = launch_cmd()
        .env("CIMG_LINGER", "60")
        .args(["--join-ct", "2", "--join-tag", &tag, &img, "--", "true"])
        .output()
        .unwrap();
    ok(&o);
    let name = format!("@cimg-join/0/{tag}");
    let bound = || {
        fs::read_to_string("/proc/net/unix")
            .unwrap()
            .lines()
            .any(|l| l.split_whitespace().nth(7) == Some(name.as_str()))
    };
    wait_until("the group's name to be free", || !bound());
    assert!(
        !processes_with(&img).is_empty(),
        "the server should still linger"
    );
    ok(&launch(&["--stop", &img]));
    wait_until("the server gone", || processes_with(&img).is_empty());
    fs::remove_file(&img).unwrap();
}
