//! Tests of the parallel-filesystem simulator (`cimg_benches::pfssim`): counting, added latency
//! and the shared rate limit, on a small tree mounted in a temporary directory.
//!
//! Mounting needs root and `/dev/fuse`. Without them these tests print a skip line, except in CI
//! (`CI=true`), where a missing capability fails the test.

use cimg_benches::pfssim::timing::TokenBucket;
use cimg_benches::pfssim::{Counters, SimConfig, Simulator, read_stats_file};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Whether FUSE mounts can be made here; in CI a missing capability is a failure.
fn can_mount(test: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    let fuse = Path::new("/dev/fuse").exists();
    if root && fuse {
        return true;
    }
    let why = if root { "no /dev/fuse" } else { "not root" };
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: cannot mount FUSE in CI ({why})");
    }
    eprintln!("SKIP {test}: cannot mount FUSE ({why})");
    false
}

/// A backing tree: `d/f0..f4` of 1000, 5000, 20000, 70000 and 100000 bytes, and a symlink.
fn tree(dir: &Path) -> Vec<(PathBuf, u64)> {
    let back = dir.join("back");
    std::fs::create_dir_all(back.join("d")).unwrap();
    let mut files = Vec::new();
    for (i, n) in [1000u64, 5000, 20000, 70000, 100000].iter().enumerate() {
        let rel = PathBuf::from(format!("d/f{i}"));
        let data: Vec<u8> = (0..*n).map(|k| (k * 7 + i as u64) as u8).collect();
        std::fs::write(back.join(&rel), data).unwrap();
        files.push((rel, *n));
    }
    std::os::unix::fs::symlink("d/f0", back.join("link")).unwrap();
    files
}

fn start(dir: &Path, cfg: SimConfig) -> (Simulator, PathBuf) {
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let sim = Simulator::start(
        &dir.join("back"),
        std::slice::from_ref(&mnt),
        cfg,
        Some(dir.join("stats.json")),
    )
    .expect("mount the simulator");
    (sim, mnt)
}

fn read_all(p: &Path) -> u64 {
    let mut v = Vec::new();
    std::fs::File::open(p).unwrap().read_to_end(&mut v).unwrap();
    v.len() as u64
}

/// Counters after the asynchronous releases of `opens` opens have arrived (or 2 s passed).
fn settle(sim: &Simulator, opens: u64) -> Counters {
    let t = Instant::now();
    loop {
        let c = sim.counters();
        if c.release >= opens || t.elapsed() > Duration::from_secs(2) {
            return c;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn counts_opens_reads_bytes_and_stats() {
    if !can_mount("counts_opens_reads_bytes_and_stats") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let files = tree(dir.path());
    let (sim, mnt) = start(dir.path(), SimConfig::default());
    let c0 = sim.counters();

    // Every file read to the end once: one open and one close each, exactly its bytes.
    let total: u64 = files.iter().map(|(_, n)| n).sum();
    for (rel, n) in &files {
        assert_eq!(read_all(&mnt.join(rel)), *n);
    }
    let c1 = settle(&sim, c0.release + files.len() as u64);
    let d = c1.since(&c0);
    assert_eq!(d.open, files.len() as u64, "{d:?}");
    assert_eq!(d.release, files.len() as u64, "{d:?}");
    assert_eq!(d.read_bytes, total, "{d:?}");
    assert!(d.read_calls >= files.len() as u64, "{d:?}");
    // Each file's first read starts at offset 0: sequential.
    assert!(d.read_sequential >= files.len() as u64, "{d:?}");
    assert!(d.read_sequential <= d.read_calls, "{d:?}");
    assert!(d.lookup >= files.len() as u64, "{d:?}");

    // Without FOPEN_KEEP_CACHE a second read of a file reaches the simulator again.
    let (rel, n) = &files[4];
    assert_eq!(read_all(&mnt.join(rel)), *n);
    let c2 = settle(&sim, c1.release + 1);
    let d = c2.since(&c1);
    assert_eq!((d.open, d.read_bytes), (1, *n), "{d:?}");

    // With zero TTLs every stat of the same path reaches the simulator, and reads nothing.
    let p = mnt.join(&files[0].0);
    for _ in 0..10 {
        std::fs::symlink_metadata(&p).unwrap();
    }
    let d = sim.counters().since(&c2);
    assert!(d.lookup + d.getattr >= 10, "{d:?}");
    assert_eq!((d.open, d.read_calls, d.read_bytes), (0, 0, 0), "{d:?}");

    // A symlink and a directory listing.
    assert_eq!(
        std::fs::read_link(mnt.join("link")).unwrap(),
        Path::new("d/f0")
    );
    let names = std::fs::read_dir(mnt.join("d")).unwrap().count();
    assert_eq!(names, files.len());
    let c3 = sim.counters();
    let d = c3.since(&c2);
    assert_eq!(d.readlink, 1, "{d:?}");
    assert_eq!(d.opendir, 1, "{d:?}");
    assert!(d.readdir >= 1, "{d:?}");
    assert_eq!(d.metadata_ops(), c3.metadata_ops() - c2.metadata_ops());

    // The stats file holds the counters.
    sim.write_stats().unwrap();
    let f = read_stats_file(&dir.path().join("stats.json")).unwrap();
    assert_eq!(f.counters.open, sim.counters().open);
    assert_eq!(f.counters.read_bytes, sim.counters().read_bytes);
    assert_eq!(f.metadata_ops, f.counters.metadata_ops());
    let last = sim.stop().unwrap();
    assert!(last.read_bytes >= total + n);
}

#[test]
fn adds_metadata_and_read_latency() {
    if !can_mount("adds_metadata_and_read_latency") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let files = tree(dir.path());
    let cfg = SimConfig {
        meta_latency: Duration::from_millis(20),
        read_latency: Duration::from_millis(30),
        read_bandwidth: 1e6,
        ..SimConfig::default()
    };
    let (sim, mnt) = start(dir.path(), cfg);

    // Metadata: each stat is at least one request; they are sequential.
    let p = mnt.join(&files[0].0);
    let t = Instant::now();
    for _ in 0..5 {
        std::fs::symlink_metadata(&p).unwrap();
    }
    assert!(
        t.elapsed() >= Duration::from_millis(100),
        "{:?}",
        t.elapsed()
    );

    // Reads: the slowest read request took at least 30 ms plus its bytes at 1 MB/s.
    let c0 = sim.counters();
    let (rel, n) = &files[4];
    let f = std::fs::File::open(mnt.join(rel)).unwrap();
    let t = Instant::now();
    let mut v = Vec::new();
    (&f).read_to_end(&mut v).unwrap();
    let took = t.elapsed();
    assert_eq!(v.len() as u64, *n);
    let d = sim.counters().since(&c0);
    assert!(d.read_calls >= 1);
    let floor = 0.030 + (d.read_bytes as f64 / d.read_calls as f64) / 1e6;
    assert!(took.as_secs_f64() >= floor, "{took:?} < {floor} s ({d:?})");
    drop(f);
    sim.stop().unwrap();
}

#[test]
fn shared_rate_limit_binds() {
    if !can_mount("shared_rate_limit_binds") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let files = tree(dir.path());
    let (rate, burst) = (200.0, 5u32);
    let cfg = SimConfig {
        mds_rate: Some(rate),
        mds_burst: burst,
        ..SimConfig::default()
    };
    let (sim, mnt) = start(dir.path(), cfg);
    // Let the bucket fill, then time 60 stats (each at least one metadata request).
    std::thread::sleep(Duration::from_millis(50));
    let p = mnt.join(&files[1].0);
    let c0 = sim.counters();
    let t = Instant::now();
    for _ in 0..60 {
        std::fs::symlink_metadata(&p).unwrap();
    }
    let took = t.elapsed().as_secs_f64();
    let ops = sim.counters().since(&c0).metadata_ops();
    assert!(ops >= 60, "{ops}");
    let floor = (ops as f64 - burst as f64) / rate;
    assert!(took >= floor, "{ops} ops took {took} s < {floor} s");
    // And not much slower than the limit (the mount adds little of its own).
    assert!(took < floor * 2.0 + 0.5, "{ops} ops took {took} s");
    sim.stop().unwrap();
}

#[test]
fn token_bucket_spaces_reservations() {
    let b = TokenBucket::new(100.0, 10);
    let t0 = Instant::now();
    let last = (0..50).map(|_| b.reserve()).last().unwrap();
    // 50 tokens, 10 in the bucket: the last is served 40 intervals (0.4 s) later.
    let lag = last.saturating_duration_since(t0).as_secs_f64();
    assert!((0.39..0.45).contains(&lag), "{lag}");
}

/// A workspace binary (`launch`) from the target directory this test runs from.
fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let p = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(p.is_file(), "{} not built", p.display());
    p
}

/// The cimg goal of the metadata-storm issue, on the simulator with zero TTLs (every path
/// walk and stat reaches it): a launch costs at most 5 metadata operations on the parallel
/// filesystem whatever the container does, here `/bin/true` and reading every file of the
/// image; a first launch on the image service (which starts the server) as a `--private`
/// one. Counted by the simulator, not timed.
#[test]
fn launch_costs_at_most_five_metadata_operations() {
    if !can_mount("launch_costs_at_most_five_metadata_operations") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rootfs = dir.path().join("rootfs");
    cimg_tests::host_programs_tree(&rootfs, &["true", "sh", "cat", "find"]);
    for d in ["dev", "proc", "sys", "tmp", "etc"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::fs::create_dir_all(dir.path().join("back")).unwrap();
    let image = dir.path().join("back/img.cimg");
    let opts = cimg_format::PackOptions {
        level: 3,
        ..Default::default()
    };
    cimg_format::writer::pack_dir(&rootfs, &image, &opts, &|_, _| {}).unwrap();
    let (sim, mnt) = start(dir.path(), SimConfig::default());
    let launch = workspace_binary("launch");
    let mut per_run = Vec::new();
    let private: &[&str] = &["--private"];
    for (mode, cmd) in [
        (&[][..], &["/bin/true"][..]),
        (
            &[][..],
            &[
                "/bin/sh",
                "-c",
                "find / -xdev -type f -exec cat {} + >/dev/null",
            ][..],
        ),
        (private, &["/bin/true"][..]),
    ] {
        let c0 = sim.counters();
        // Each launch a first one: its image server ends with its container (a warm
        // launch on a lingering server costs less; storm-bench --sequential counts that).
        let out = std::process::Command::new(&launch)
            .env("CIMG_LINGER", "0")
            .args(mode)
            .arg(mnt.join("img.cimg"))
            .arg("--")
            .args(cmd)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{mode:?} {cmd:?}: {out:?}");
        // The image file's close reaches the simulator after launch has exited.
        let d = settle(&sim, c0.release + 1).since(&c0);
        assert_eq!((d.open, d.release), (1, 1), "{mode:?} {cmd:?}: {d:?}");
        assert!(d.metadata_ops() <= 5, "{mode:?} {cmd:?}: {d:?}");
        assert!(d.read_calls >= 1, "{mode:?} {cmd:?}: {d:?}");
        per_run.push((d.metadata_ops(), d.read_bytes));
    }
    // Reading every file fetched more bytes, but not one more metadata operation.
    assert_eq!(per_run[0].0, per_run[1].0, "{per_run:?}");
    assert!(per_run[1].1 > per_run[0].1, "{per_run:?}");
    sim.stop().unwrap();
}
