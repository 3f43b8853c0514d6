//! End-to-end tests of joining: peers of one group share one container (one user and mount
//! namespace, one FUSE mount, one server), in any start and exit order, and nothing is left
//! behind by killed peers, a killed server, or a stale group.

mod common;

use std::fs;
use std::process::{Child, Command, Output, Stdio};
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
    Command::new(LAUNCH)
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
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(b.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let b_app: u32 = line.trim().parse().unwrap();
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
        let mut c = Command::new(LAUNCH);
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
    let o = Command::new(LAUNCH)
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
            Command::new(LAUNCH)
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
    let o = Command::new(LAUNCH)
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
    let o = Command::new(LAUNCH)
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
