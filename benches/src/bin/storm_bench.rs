//! storm-bench: the metadata storm of N nodes starting the same Python application at once from
//! a parallel filesystem, simulated by `pfs-sim` (`cimg_benches::pfssim`), for four images of
//! one root filesystem: the directory itself, a `.sqfs` (started with `ch-run`), a `.cimg` and a
//! `.cimg` packed with the start-up's hot list (both started with `launch --no-join`).
//!
//! Every simulated node has its own mount of the simulator (its own kernel caches); all mounts
//! share the simulator's counters and metadata-server rate limit. For each image and each N it
//! starts N containers at once, one per node mount, and reports the metadata operations, read
//! requests and bytes that reached the simulator per node, and the time until all N finished.
//! A second pass with a small metadata-server rate checks the model
//! `time ≈ max(time without the limit, N × ops per node / rate)`, which then extrapolates to
//! 1,000 and 10,000 nodes (with a bandwidth term for the bytes). See README.md.
//!
//! `launch` runs the containers of an image on the image's shared server (one per image file
//! per node: every node mount is a file of its own); every wave starts with `launch
//! --stop` of the images, so that each node's launch is a first launch. `--sequential N` measures
//! instead N launches of one image one after another from one node mount, on the shared
//! server and with `--private`: what reached the simulator in all, and launch by launch.

use anyhow::{Context, Result, bail};
use cimg_benches::pfssim::{Counters, read_stats_file};
use cimg_benches::service::{self, LINGER};
use cimg_benches::{command_line, human_bytes, require_program, run_quiet};
use clap::Parser;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::Serialize;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(
    name = "storm-bench",
    about = "N nodes start Python at once from a simulated parallel filesystem: directory vs sqfs vs cimg"
)]
struct Args {
    /// Root filesystem with python3 (copied into the simulator's backing directory).
    #[arg(long, default_value = "/var/tmp/launch-bench/rootfs")]
    rootfs: PathBuf,
    /// Work directory: backing directory `pfs/` (rootfs copy and images, kept between runs),
    /// mount points `mnt/`, the stats file.
    #[arg(long, default_value = "/var/tmp/storm-bench")]
    work_dir: PathBuf,
    /// Node counts, comma separated.
    #[arg(long, default_value = "1,4,16,64", value_delimiter = ',')]
    nodes: Vec<usize>,
    /// Images to start, comma separated: dir, sqfs, cimg, cimg-hot.
    #[arg(long, default_value = "dir,sqfs,cimg,cimg-hot", value_delimiter = ',')]
    contenders: Vec<String>,
    /// The Python statement every node runs (`python3 -c STMT`).
    #[arg(
        long,
        default_value = "import json, email, http.client, asyncio, decimal, unittest, xml.etree.ElementTree"
    )]
    python: String,
    /// Latency the simulator adds to each metadata operation (µs).
    #[arg(long, default_value_t = 0)]
    meta_latency_us: u64,
    /// Latency the simulator adds to each read (µs).
    #[arg(long, default_value_t = 0)]
    read_latency_us: u64,
    /// Kernel read-ahead of each node mount (KiB), like a PFS client's 1 MiB RPCs.
    #[arg(long, default_value_t = 1024)]
    read_ahead_kb: u32,
    /// Kernel entry and attribute TTL of the node mounts (ms; 0 = every lookup and stat
    /// reaches the simulator).
    #[arg(long, default_value_t = 0)]
    ttl_ms: u64,
    /// Metadata-server rate (ops/s) of the model-check pass, small enough to bind at small N
    /// (0 skips the pass).
    #[arg(long, default_value_t = 20000.0)]
    check_mds_rate: f64,
    /// Burst of the model-check pass's rate limit (tokens).
    #[arg(long, default_value_t = 100)]
    check_mds_burst: u32,
    /// Metadata-server rate of the extrapolation (ops/s).
    #[arg(long, default_value_t = 50000.0)]
    model_mds_rate: f64,
    /// Aggregate read bandwidth of the extrapolation (bytes/s, e.g. 100G).
    #[arg(long, default_value = "100G")]
    model_bandwidth: String,
    /// Node counts to extrapolate to.
    #[arg(long, default_value = "1000,10000", value_delimiter = ',')]
    extrapolate: Vec<u64>,
    /// Runs of every wave (the order of the images rotates between runs); the report shows
    /// the run with the median time.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Repack the images (and copy the rootfs again).
    #[arg(long)]
    repack: bool,
    /// Only the sequential case: N launches of one image, one after another, from one node
    /// mount (0: the storm waves instead).
    #[arg(long, default_value_t = 0)]
    sequential: usize,
    /// Images of the sequential case, comma separated: cimg, cimg-private, cimg-hot,
    /// cimg-hot-private, dir, sqfs.
    #[arg(long, default_value = "cimg,cimg-private", value_delimiter = ',')]
    sequential_contenders: Vec<String>,
    /// Entry and attribute TTLs (ms) of the node mount in the sequential case, one simulator
    /// each, comma separated (replaces --ttl-ms there).
    #[arg(long, default_value = "0,1000", value_delimiter = ',')]
    sequential_ttl_ms: Vec<u64>,
    /// Write the report to PREFIX.txt, PREFIX.json and PREFIX.svg.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Run nothing: redraw PREFIX.svg from the PREFIX.json of an earlier run (with --out PREFIX).
    #[arg(long, requires = "out")]
    replot: bool,
    /// launch binary (default: next to this one).
    #[arg(long)]
    launch: Option<PathBuf>,
    /// cimg binary (default: next to this one).
    #[arg(long)]
    cimg: Option<PathBuf>,
    /// pfs-sim binary (default: next to this one).
    #[arg(long)]
    pfs_sim: Option<PathBuf>,
    /// ch-run binary.
    #[arg(long, default_value = "ch-run")]
    ch_run: PathBuf,
    /// mksquashfs binary.
    #[arg(long, default_value = "mksquashfs")]
    mksquashfs: PathBuf,
}

/// Mount points under `dir` (from /proc/self/mounts), deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut v: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v
}

/// Lazily unmount whatever is still mounted under `dir`.
fn unmount_under(dir: &Path) {
    for m in mounts_under(dir) {
        let _ = Command::new("umount").arg("-l").arg(&m).status();
    }
}

/// A running `pfs-sim` child serving the backing directory at `nodes` mounts.
struct Sim {
    /// Wait before each wave: longer than the mounts' cache TTL.
    settle: Duration,
    child: Child,
    stats: PathBuf,
    mnt: PathBuf,
    command: String,
}

impl Sim {
    fn start(
        pfs_sim: &Path,
        work: &Path,
        nodes: usize,
        ttl: Duration,
        extra: &[String],
    ) -> Result<Sim> {
        let mnt = work.join("mnt");
        unmount_under(&mnt);
        let stats = work.join("stats.json");
        let _ = std::fs::remove_file(&stats);
        let mut c = Command::new(pfs_sim);
        c.arg(work.join("pfs"))
            .arg("--mount-base")
            .arg(&mnt)
            .arg("--nodes")
            .arg(nodes.to_string())
            .arg("--stats")
            .arg(&stats)
            .arg("--stats-interval-ms")
            .arg("0")
            .args(extra)
            .stdin(Stdio::null());
        let command = command_line(&c);
        let child = c.spawn().with_context(|| format!("run {command}"))?;
        let mut sim = Sim {
            settle: ttl + Duration::from_millis(100),
            child,
            stats,
            mnt,
            command,
        };
        let t = Instant::now();
        while read_stats_file(&sim.stats).is_err() {
            if let Some(s) = sim.child.try_wait()? {
                bail!("`{}` exited ({s}) before mounting", sim.command);
            }
            if t.elapsed() > Duration::from_secs(30) {
                bail!("`{}`: no stats file after 30 s", sim.command);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(sim)
    }

    /// The counters now: SIGUSR1, then wait for a stats file with a higher sequence number.
    fn counters(&mut self) -> Result<Counters> {
        let before = read_stats_file(&self.stats)
            .with_context(|| format!("read {}", self.stats.display()))?
            .seq;
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGUSR1).context("signal pfs-sim")?;
        let t = Instant::now();
        loop {
            if let Ok(f) = read_stats_file(&self.stats)
                && f.seq > before
            {
                return Ok(f.counters);
            }
            if t.elapsed() > Duration::from_secs(10) {
                bail!("{}: not rewritten after SIGUSR1", self.stats.display());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn node(&self, i: usize) -> PathBuf {
        self.mnt.join(format!("node{i}"))
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        unmount_under(&self.mnt);
    }
}

/// How a contender starts a container from a node mount.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
struct Contender {
    name: String,
    /// Program and arguments before the image.
    program: Vec<String>,
    /// The image, relative to the node mount.
    image: String,
}

impl Contender {
    fn command(&self, node: &Path, cmd: &[String], user: &OsString) -> Command {
        let mut c = Command::new(&self.program[0]);
        c.args(&self.program[1..])
            .arg(node.join(&self.image))
            .arg("--")
            .args(cmd)
            .env("USER", user)
            .env("CIMG_LINGER", LINGER)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    }
}

/// One wave: N containers started at once.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
struct Wave {
    contender: String,
    workload: String,
    nodes: usize,
    /// `None`: no metadata rate limit.
    mds_rate: Option<f64>,
    /// Seconds from the first spawn until the last container exited.
    wall_secs: f64,
    /// The fastest and slowest container (s).
    min_secs: f64,
    max_secs: f64,
    /// Everything that reached the simulator during the wave (all nodes).
    total: Counters,
}

impl Wave {
    fn per_node(&self, x: u64) -> f64 {
        x as f64 / self.nodes as f64
    }
    fn meta(&self) -> f64 {
        self.per_node(self.total.metadata_ops())
    }
    fn reads(&self) -> f64 {
        self.per_node(self.total.read_calls)
    }
    fn bytes(&self) -> f64 {
        self.per_node(self.total.read_bytes)
    }
}

/// `launch --stop` of every image on every node mount under `mnt`.
fn stop_images(launch: &Path, mnt: &Path) -> Result<()> {
    let mut images = Vec::new();
    for e in std::fs::read_dir(mnt).into_iter().flatten().flatten() {
        for i in ["img.cimg", "img-hot.cimg"] {
            images.push(e.path().join(i));
        }
    }
    let refs: Vec<&Path> = images.iter().map(PathBuf::as_path).collect();
    service::stop(launch, &refs)
}

/// Start `n` containers of `k` at once (node i on mount i) and wait for all; each a first
/// launch of the image on its node (the image servers are stopped first).
#[allow(clippy::too_many_arguments)]
fn wave(
    sim: &mut Sim,
    launch: &Path,
    k: &Contender,
    n: usize,
    cmd: &[String],
    workload: &str,
    mds_rate: Option<f64>,
    user: &OsString,
) -> Result<Wave> {
    stop_images(launch, &sim.mnt)?;
    // Let the kernel caches of earlier waves on these mounts expire.
    std::thread::sleep(sim.settle);
    let before = sim.counters()?;
    let t0 = Instant::now();
    let mut kids = Vec::with_capacity(n);
    for i in 0..n {
        let mut c = k.command(&sim.node(i), cmd, user);
        let line = command_line(&c);
        let child = c.spawn().with_context(|| format!("run {line}"))?;
        kids.push((child, line, None::<f64>));
    }
    let mut left = n;
    while left > 0 {
        for (child, line, done) in kids.iter_mut().filter(|k| k.2.is_none()) {
            if let Some(st) = child.try_wait()? {
                *done = Some(t0.elapsed().as_secs_f64());
                left -= 1;
                if !st.success() {
                    let mut err = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        let _ = std::io::Read::read_to_string(&mut e, &mut err);
                    }
                    bail!("`{line}` failed ({st}): {}", err.trim());
                }
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let wall = t0.elapsed().as_secs_f64();
    // Closes of the images arrive asynchronously after the containers exit.
    std::thread::sleep(Duration::from_millis(300));
    let total = sim.counters()?.since(&before);
    let times: Vec<f64> = kids.iter().filter_map(|k| k.2).collect();
    Ok(Wave {
        contender: k.name.clone(),
        workload: workload.into(),
        nodes: n,
        mds_rate,
        wall_secs: wall,
        min_secs: times.iter().copied().fold(f64::INFINITY, f64::min),
        max_secs: times.iter().copied().fold(0.0, f64::max),
        total,
    })
}

/// The sequential case: N launches of one image from one node mount, one after another.
#[derive(Debug, Clone, Serialize)]
struct Sequential {
    contender: String,
    ttl_ms: u64,
    launches: usize,
    /// Seconds for all N.
    wall_secs: f64,
    /// What reached the simulator during all N (from the first spawn until 300 ms after the
    /// last exit).
    total: Counters,
    /// Launch by launch (the last one's share includes the 300 ms after it).
    each: Vec<Counters>,
}

/// N launches of `k` from node 0, one after another, with no image server running at the
/// start; the servers are stopped at the end (outside the count).
fn sequential(
    sim: &mut Sim,
    launch: &Path,
    k: &Contender,
    n: usize,
    cmd: &[String],
    ttl_ms: u64,
    user: &OsString,
) -> Result<Sequential> {
    stop_images(launch, &sim.mnt)?;
    std::thread::sleep(sim.settle);
    let first = sim.counters()?;
    let mut last = first;
    let mut each = Vec::with_capacity(n);
    let t0 = Instant::now();
    for i in 0..n {
        let mut c = k.command(&sim.node(0), cmd, user);
        let line = command_line(&c);
        let o = c.output().with_context(|| format!("run {line}"))?;
        if !o.status.success() {
            bail!(
                "`{line}` failed ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        if i + 1 == n {
            // Closes of a private mount's image arrive asynchronously after it exits.
            std::thread::sleep(Duration::from_millis(300));
        }
        let now = sim.counters()?;
        each.push(now.since(&last));
        last = now;
    }
    let wall = t0.elapsed().as_secs_f64() - 0.3;
    stop_images(launch, &sim.mnt)?;
    Ok(Sequential {
        contender: k.name.clone(),
        ttl_ms,
        launches: n,
        wall_secs: wall,
        total: last.since(&first),
        each,
    })
}

/// `--sequential N`: the sequential case for every TTL and image, rotating the images'
/// order between runs; the report shows the run with the median total of metadata ops.
fn run_sequential(
    args: &Args,
    launch: &Path,
    pfs_sim: &Path,
    all: &[Contender],
    py: &[String],
    user: &OsString,
    mut commands: Vec<String>,
) -> Result<()> {
    let contenders: Vec<Contender> = args
        .sequential_contenders
        .iter()
        .map(|n| {
            all.iter()
                .find(|k| &k.name == n)
                .cloned()
                .with_context(|| format!("unknown contender {n}"))
        })
        .collect::<Result<_>>()?;
    let n = args.sequential;
    let mut runs: Vec<Sequential> = Vec::new();
    for &ttl in &args.sequential_ttl_ms {
        let extra: Vec<String> = vec![
            "--meta-latency-us".into(),
            args.meta_latency_us.to_string(),
            "--read-latency-us".into(),
            args.read_latency_us.to_string(),
            "--read-ahead-kb".into(),
            args.read_ahead_kb.to_string(),
            "--entry-ttl-ms".into(),
            ttl.to_string(),
            "--attr-ttl-ms".into(),
            ttl.to_string(),
        ];
        let mut sim = Sim::start(
            pfs_sim,
            &args.work_dir,
            1,
            Duration::from_millis(ttl),
            &extra,
        )?;
        commands.push(sim.command.clone());
        for k in &contenders {
            // Warm the backing files in the page cache (untimed, not reported).
            sequential(&mut sim, launch, k, 1, py, ttl, user)?;
        }
        for r in 0..args.runs.max(1) {
            for j in 0..contenders.len() {
                let k = &contenders[(r + j) % contenders.len()];
                let q = sequential(&mut sim, launch, k, n, py, ttl, user)?;
                eprintln!(
                    "storm-bench: run {r}: {:<16} TTL {ttl} ms, {n} sequential launches: {} metadata ops, {:.2} s",
                    k.name,
                    q.total.metadata_ops(),
                    q.wall_secs
                );
                runs.push(q);
            }
        }
        stop_images(launch, &sim.mnt)?;
    }
    for k in &contenders {
        commands.push(format!(
            "{n} x, one after another: {} MNT/node0/{} -- python3 -c {}",
            k.program.join(" "),
            k.image,
            cimg_benches::shell_quote(std::ffi::OsStr::new(&args.python))
        ));
    }
    commands.push(format!("CIMG_LINGER={LINGER} for every launch"));
    // The run with the median metadata ops of each (image, TTL).
    let mut shown: Vec<Sequential> = Vec::new();
    for &ttl in &args.sequential_ttl_ms {
        for k in &contenders {
            let mut v: Vec<&Sequential> = runs
                .iter()
                .filter(|q| q.contender == k.name && q.ttl_ms == ttl)
                .collect();
            v.sort_by_key(|q| q.total.metadata_ops());
            if let Some(q) = v.get((v.len().max(1) - 1) / 2) {
                shown.push((*q).clone());
            }
        }
    }
    let mut o = String::new();
    let _ = writeln!(
        o,
        "storm-bench --sequential: {n} launches of one image, one after another, from one node mount of the simulator; each runs python3 -c '{}'",
        args.python
    );
    let _ = writeln!(
        o,
        "simulator: no keep-cache, read-ahead {} KiB, metadata latency {} µs, read latency {} µs; no image server at the start of each series, the servers stopped after it; {} runs of each series (order rotating), the run with the median metadata ops shown; {} cores here",
        args.read_ahead_kb,
        args.meta_latency_us,
        args.read_latency_us,
        args.runs.max(1),
        cimg_benches::cores()
    );
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "{:<17} {:>6} {:>9} {:>7} {:>7} {:>7} {:>7} {:>7} {:>9} {:>7}  meta ops launch by launch",
        "image",
        "TTL ms",
        "meta ops",
        "lookup",
        "getattr",
        "open",
        "release",
        "reads",
        "MB read",
        "time s",
    );
    for q in &shown {
        let t = &q.total;
        let by: Vec<String> = q
            .each
            .iter()
            .map(|c| c.metadata_ops().to_string())
            .collect();
        let _ = writeln!(
            o,
            "{:<17} {:>6} {:>9} {:>7} {:>7} {:>7} {:>7} {:>7} {:>9.2} {:>7.2}  {}",
            q.contender,
            q.ttl_ms,
            t.metadata_ops(),
            t.lookup,
            t.getattr,
            t.open,
            t.release,
            t.read_calls,
            t.read_bytes as f64 / 1e6,
            q.wall_secs,
            by.join(" ")
        );
    }
    let _ = writeln!(o);
    let _ = writeln!(o, "Goals");
    for q in shown.iter().filter(|q| q.contender == "cimg") {
        let m = q.total.metadata_ops();
        let verdict = if m <= 5 {
            "PASS".to_string()
        } else {
            format!("FAIL (off by {:.0}%)", (m as f64 / 5.0 - 1.0) * 100.0)
        };
        let private = shown
            .iter()
            .find(|p| p.contender == "cimg-private" && p.ttl_ms == q.ttl_ms)
            .map(|p| format!(" (--private: {})", p.total.metadata_ops()))
            .unwrap_or_default();
        let _ = writeln!(
            o,
            "  cimg, TTL {} ms: metadata ops of {n} sequential launches <= 5: {m}{private}  {verdict}",
            q.ttl_ms
        );
    }
    let _ = writeln!(o);
    let _ = writeln!(o, "commands:");
    for c in &commands {
        let _ = writeln!(o, "  {c}");
    }
    print!("{o}");
    if let Some(prefix) = &args.out {
        let with = |ext: &str| {
            let mut p = prefix.clone().into_os_string();
            p.push(ext);
            PathBuf::from(p)
        };
        let quoted: Vec<String> = std::env::args_os()
            .map(|a| cimg_benches::shell_quote(&a))
            .collect();
        std::fs::write(with(".txt"), format!("$ {}\n\n{o}", quoted.join(" ")))
            .with_context(|| format!("write {}", with(".txt").display()))?;
        let j = serde_json::json!({
            "command": std::env::args().collect::<Vec<_>>(),
            "python": args.python,
            "launches": n,
            "contenders": contenders,
            "shown": shown,
            "all_runs": runs,
            "commands": commands,
        });
        std::fs::write(with(".json"), serde_json::to_vec_pretty(&j)?)
            .with_context(|| format!("write {}", with(".json").display()))?;
    }
    Ok(())
}

/// Copies the rootfs and packs the images into `work/pfs` unless a stamp says they are
/// current; returns the commands used and the bytes the start-up used (the hot list's files).
fn prepare(
    args: &Args,
    launch: &Path,
    cimg: &Path,
    mksquashfs: &Path,
    py: &[String],
) -> Result<(Vec<String>, u64, usize)> {
    let pfs = args.work_dir.join("pfs");
    std::fs::create_dir_all(&pfs).with_context(|| format!("create {}", pfs.display()))?;
    let rootfs = pfs.join("rootfs");
    let hot = args.work_dir.join("python.hot");
    let mut cp = Command::new("cp");
    cp.arg("-a").arg(&args.rootfs).arg(&rootfs);
    let mut pack = Command::new(cimg);
    pack.arg("pack")
        .arg(&rootfs)
        .arg(pfs.join("img.cimg"))
        .arg("-q");
    let mut sq = Command::new(mksquashfs);
    sq.arg(&rootfs).arg(pfs.join("img.sqfs")).args([
        "-comp",
        "zstd",
        "-noappend",
        "-quiet",
        "-no-progress",
    ]);
    let mut rec = Command::new(launch);
    rec.arg("--no-join")
        .arg("--record-hot")
        .arg(&hot)
        .arg(pfs.join("img.cimg"))
        .arg("--")
        .args(py);
    let mut pack_hot = Command::new(cimg);
    pack_hot
        .arg("pack")
        .arg(&rootfs)
        .arg(pfs.join("img-hot.cimg"))
        .arg("-q")
        .arg("--hot")
        .arg(&hot);
    let commands: Vec<String> = [&cp, &pack, &sq, &rec, &pack_hot]
        .iter()
        .map(|c| command_line(c))
        .collect();
    let stamp = args.work_dir.join("stamp");
    let want = commands.join("\n");
    let current = std::fs::read_to_string(&stamp).is_ok_and(|s| s == want);
    if args.repack || !current {
        let _ = std::fs::remove_file(&stamp);
        if rootfs.exists() {
            std::fs::remove_dir_all(&rootfs)
                .with_context(|| format!("remove {}", rootfs.display()))?;
        }
        eprintln!("storm-bench: copying {}", args.rootfs.display());
        run_quiet(&mut cp)?;
        eprintln!("storm-bench: packing img.cimg, img.sqfs");
        run_quiet(&mut pack)?;
        run_quiet(&mut sq)?;
        eprintln!("storm-bench: recording the hot list, packing img-hot.cimg");
        let _ = std::fs::remove_file(&hot);
        run_quiet(&mut rec)?;
        let t = Instant::now();
        while !hot.exists() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        run_quiet(&mut pack_hot)?;
        std::fs::write(&stamp, &want).with_context(|| format!("write {}", stamp.display()))?;
    }
    // "Used": the total size of the distinct regular files the start-up read.
    let list = std::fs::read_to_string(&hot).with_context(|| format!("read {}", hot.display()))?;
    let mut seen = std::collections::HashSet::new();
    let (mut used, mut files) = (0u64, 0usize);
    for l in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let p = rootfs.join(l.trim_start_matches('/'));
        if let Ok(m) = std::fs::symlink_metadata(&p)
            && m.is_file()
            && seen.insert(p)
        {
            used += m.len();
            files += 1;
        }
    }
    Ok((commands, used, files))
}

/// Draw the SVG of `waves`, with the model's curve.
fn write_plot(
    args: &Args,
    bw: f64,
    waves: &[Wave],
    contenders: &[Contender],
    path: &Path,
) -> Result<()> {
    let model_of = |k: &Contender, n: f64| -> Option<f64> {
        let f: Vec<&Wave> = waves
            .iter()
            .filter(|w| w.contender == k.name && w.workload == "python" && w.mds_rate.is_none())
            .collect();
        let one = f.iter().find(|w| w.nodes == 1).or(f.first())?;
        let big = f.iter().max_by_key(|w| w.nodes)?;
        Some(model(
            one.wall_secs,
            big.meta(),
            big.bytes(),
            n,
            args.model_mds_rate,
            bw,
        ))
    };
    let mut nodes: Vec<usize> = waves.iter().map(|w| w.nodes).collect();
    nodes.sort_unstable();
    nodes.dedup();
    plot::write_svg(
        waves,
        contenders,
        &nodes,
        &args.extrapolate,
        &model_of,
        path,
    )
}

/// `--replot`: redraw PREFIX.svg from PREFIX.json.
fn replot(args: &Args, bw: f64) -> Result<()> {
    let prefix = args.out.as_ref().context("--replot needs --out PREFIX")?;
    let with = |ext: &str| {
        let mut p = prefix.clone().into_os_string();
        p.push(ext);
        PathBuf::from(p)
    };
    let json = with(".json");
    let v: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&json).with_context(|| format!("read {}", json.display()))?,
    )
    .with_context(|| format!("parse {}", json.display()))?;
    let waves: Vec<Wave> = serde_json::from_value(v["waves"].clone())
        .with_context(|| format!("{}: waves", json.display()))?;
    let contenders: Vec<Contender> = serde_json::from_value(v["contenders"].clone())
        .with_context(|| format!("{}: contenders", json.display()))?;
    let rate = v["model_mds_rate"].as_f64().unwrap_or(args.model_mds_rate);
    let bw = v["model_bandwidth"].as_f64().unwrap_or(bw);
    let a = Args {
        model_mds_rate: rate,
        ..Args::parse_from(std::env::args_os())
    };
    write_plot(&a, bw, &waves, &contenders, &with(".svg"))
}

/// The 1-, 5- and 15-minute load averages (other work on a shared machine shows there).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// For each (image, workload, N, rate): the run with the median time.
fn medians(all: &[Wave]) -> Vec<Wave> {
    let mut out: Vec<Wave> = Vec::new();
    for w in all {
        let same = |x: &Wave| {
            x.contender == w.contender
                && x.workload == w.workload
                && x.nodes == w.nodes
                && x.mds_rate == w.mds_rate
        };
        if out.iter().any(same) {
            continue;
        }
        let mut runs: Vec<&Wave> = all.iter().filter(|x| same(x)).collect();
        runs.sort_by(|a, b| a.wall_secs.total_cmp(&b.wall_secs));
        out.push(runs[(runs.len() - 1) / 2].clone());
    }
    out
}

/// Model time for `n` nodes: max(per-node time, metadata ops / rate, bytes / bandwidth).
fn model(t_node: f64, meta_per_node: f64, bytes_per_node: f64, n: f64, rate: f64, bw: f64) -> f64 {
    t_node
        .max(n * meta_per_node / rate)
        .max(n * bytes_per_node / bw)
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !nix::unistd::geteuid().is_root() {
        bail!("storm-bench mounts the simulator and needs root");
    }
    let launch = cimg_benches::sibling_binary("launch", args.launch.as_deref())?;
    let cimg = cimg_benches::sibling_binary("cimg", args.cimg.as_deref())?;
    let pfs_sim = cimg_benches::sibling_binary("pfs-sim", args.pfs_sim.as_deref())?;
    let ch_run = require_program(&args.ch_run, "charliecloud")?;
    let mksquashfs = require_program(&args.mksquashfs, "squashfs-tools")?;
    if !args.rootfs.join("usr/bin/python3").exists() {
        bail!(
            "{} has no usr/bin/python3: make one with `debootstrap --variant=minbase --include=python3 bookworm {}`",
            args.rootfs.display(),
            args.rootfs.display()
        );
    }
    let bw = cimg_benches::parse_size(&args.model_bandwidth)
        .map_err(|e| anyhow::anyhow!("bad --model-bandwidth {}: {e}", args.model_bandwidth))?
        as f64;
    if args.replot {
        return replot(&args, bw);
    }
    let user: OsString = std::env::var_os("USER").unwrap_or_else(|| "root".into());
    let py = vec!["python3".to_string(), "-c".into(), args.python.clone()];
    let light = vec!["/bin/true".to_string()];
    let (mut commands, used, used_files) = prepare(&args, &launch, &cimg, &mksquashfs, &py)?;

    let s = |p: &Path| p.display().to_string();
    let all = [
        Contender {
            name: "dir".into(),
            program: vec![s(&launch)],
            image: "rootfs".into(),
        },
        Contender {
            name: "sqfs".into(),
            program: vec![s(&ch_run)],
            image: "img.sqfs".into(),
        },
        Contender {
            name: "cimg".into(),
            program: vec![s(&launch), "--no-join".into()],
            image: "img.cimg".into(),
        },
        Contender {
            name: "cimg-hot".into(),
            program: vec![s(&launch), "--no-join".into()],
            image: "img-hot.cimg".into(),
        },
        Contender {
            name: "cimg-private".into(),
            program: vec![s(&launch), "--no-join".into(), "--private".into()],
            image: "img.cimg".into(),
        },
        Contender {
            name: "cimg-hot-private".into(),
            program: vec![s(&launch), "--no-join".into(), "--private".into()],
            image: "img-hot.cimg".into(),
        },
    ];
    if args.sequential > 0 {
        return run_sequential(&args, &launch, &pfs_sim, &all, &py, &user, commands);
    }
    let contenders: Vec<Contender> = args
        .contenders
        .iter()
        .map(|n| {
            all.iter()
                .find(|k| &k.name == n)
                .cloned()
                .with_context(|| format!("unknown contender {n} (dir, sqfs, cimg, cimg-hot, cimg-private, cimg-hot-private)"))
        })
        .collect::<Result<_>>()?;
    let max_n = args.nodes.iter().copied().max().unwrap_or(1).max(1);
    let ttl = args.ttl_ms.to_string();
    let ttl_d = Duration::from_millis(args.ttl_ms);
    let base_args: Vec<String> = vec![
        "--meta-latency-us".into(),
        args.meta_latency_us.to_string(),
        "--read-latency-us".into(),
        args.read_latency_us.to_string(),
        "--read-ahead-kb".into(),
        args.read_ahead_kb.to_string(),
        "--entry-ttl-ms".into(),
        ttl.clone(),
        "--attr-ttl-ms".into(),
        ttl,
    ];

    // Pass 1: no rate limit: what reaches the metadata server, and the time without queueing.
    let load_before = loadavg();
    let mut waves: Vec<Wave> = Vec::new();
    let mut all_waves: Vec<Wave> = Vec::new();
    {
        let mut sim = Sim::start(&pfs_sim, &args.work_dir, max_n, ttl_d, &base_args)?;
        commands.push(sim.command.clone());
        for k in &contenders {
            commands.push(format!(
                "{} MNT/nodeI/{} -- python3 -c {}",
                k.program.join(" "),
                k.image,
                cimg_benches::shell_quote(std::ffi::OsStr::new(&args.python))
            ));
            // Warm the backing files in the page cache (untimed, not reported).
            wave(&mut sim, &launch, k, 1, &py, "warm-up", None, &user)?;
            let w = wave(&mut sim, &launch, k, 1, &light, "/bin/true", None, &user)?;
            eprintln!(
                "storm-bench: {:<8} /bin/true N=1: {:.0} metadata ops",
                k.name,
                w.meta()
            );
            waves.push(w);
        }
        for r in 0..args.runs.max(1) {
            for j in 0..contenders.len() {
                let k = &contenders[(r + j) % contenders.len()];
                for &n in &args.nodes {
                    let w = wave(&mut sim, &launch, k, n, &py, "python", None, &user)?;
                    eprintln!(
                        "storm-bench: run {r}: {:<8} python N={n}: {:.2} s, {:.1} metadata ops/node, {:.1} reads/node",
                        k.name,
                        w.wall_secs,
                        w.meta(),
                        w.reads()
                    );
                    all_waves.push(w);
                }
            }
        }
        stop_images(&launch, &sim.mnt)?;
    }
    // Pass 2: a small metadata-server rate that binds at small N, to check the model.
    let rate = (args.check_mds_rate > 0.0).then_some(args.check_mds_rate);
    if let Some(rate) = rate {
        let mut a = base_args.clone();
        a.extend([
            "--mds-rate".into(),
            rate.to_string(),
            "--mds-burst".into(),
            args.check_mds_burst.to_string(),
        ]);
        let mut sim = Sim::start(&pfs_sim, &args.work_dir, max_n, ttl_d, &a)?;
        commands.push(sim.command.clone());
        for r in 0..args.runs.max(1) {
            for j in 0..contenders.len() {
                let k = &contenders[(r + j) % contenders.len()];
                for &n in &args.nodes {
                    let w = wave(&mut sim, &launch, k, n, &py, "python", Some(rate), &user)?;
                    eprintln!(
                        "storm-bench: run {r}: {:<8} python N={n} at {rate} ops/s: {:.2} s",
                        k.name, w.wall_secs
                    );
                    all_waves.push(w);
                }
            }
        }
        stop_images(&launch, &sim.mnt)?;
    }
    waves.extend(medians(&all_waves));
    let load_after = loadavg();

    let mut report = report(&args, &contenders, &waves, used, used_files, bw, &commands);
    let _ = writeln!(
        report,
        "load average (1, 5, 15 min) before: {load_before}; after: {load_after}"
    );
    print!("{report}");
    if let Some(prefix) = &args.out {
        let with = |ext: &str| {
            let mut p = prefix.clone().into_os_string();
            p.push(ext);
            PathBuf::from(p)
        };
        let cmdline: Vec<String> = std::env::args().collect();
        let quoted: Vec<String> = std::env::args_os()
            .map(|a| cimg_benches::shell_quote(&a))
            .collect();
        let text = format!("$ {}\n\n{report}", quoted.join(" "));
        std::fs::write(with(".txt"), text)
            .with_context(|| format!("write {}", with(".txt").display()))?;
        let j = serde_json::json!({
            "command": cmdline,
            "rootfs": args.rootfs,
            "python": args.python,
            "used_bytes": used,
            "used_files": used_files,
            "model_mds_rate": args.model_mds_rate,
            "model_bandwidth": bw,
            "check_mds_rate": rate,
            "contenders": contenders,
            "waves": waves,
            "all_runs": all_waves,
            "commands": commands,
        });
        std::fs::write(with(".json"), serde_json::to_vec_pretty(&j)?)
            .with_context(|| format!("write {}", with(".json").display()))?;
        write_plot(&args, bw, &waves, &contenders, &with(".svg"))?;
    }
    Ok(())
}

fn report(
    args: &Args,
    contenders: &[Contender],
    waves: &[Wave],
    used: u64,
    used_files: usize,
    bw: f64,
    commands: &[String],
) -> String {
    let mut o = String::new();
    let tree = cimg_benches::read_tree(&args.rootfs, false);
    let _ = writeln!(
        o,
        "storm-bench: rootfs {} ({} files, {}); every node runs python3 -c '{}'",
        args.rootfs.display(),
        tree.files,
        human_bytes(tree.bytes),
        args.python
    );
    let _ = writeln!(
        o,
        "simulator: entry/attr TTL {} ms, no keep-cache, read-ahead {} KiB, metadata latency {} µs, read latency {} µs; {} cores here",
        args.ttl_ms,
        args.read_ahead_kb,
        args.meta_latency_us,
        args.read_latency_us,
        cimg_benches::cores()
    );
    let _ = writeln!(
        o,
        "start-up used {} distinct files, {} (the hot list's files)",
        used_files,
        human_bytes(used)
    );
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "Per node (averages over the N nodes of a wave); time = until all N containers finished (the run with the median time of {}); no metadata rate limit",
        args.runs.max(1)
    );
    let _ = writeln!(
        o,
        "{:<9} {:>5} {:>8} {:>10} {:>8} {:>8} {:>7} {:>7} {:>9} {:>7} {:>10} {:>6}",
        "image",
        "N",
        "time s",
        "meta ops",
        "lookup",
        "getattr",
        "open",
        "reads",
        "MB read",
        "KiB/rd",
        "seq reads",
        "MB/used"
    );
    let free = |k: &str, w: &str| -> Vec<&Wave> {
        waves
            .iter()
            .filter(|x| x.contender == k && x.workload == w && x.mds_rate.is_none())
            .collect()
    };
    for k in contenders {
        for w in free(&k.name, "python") {
            let t = &w.total;
            let _ = writeln!(
                o,
                "{:<9} {:>5} {:>8.2} {:>10.1} {:>8.1} {:>8.1} {:>7.1} {:>7.1} {:>9.2} {:>7.0} {:>9.0}% {:>6.2}",
                k.name,
                w.nodes,
                w.wall_secs,
                w.meta(),
                w.per_node(t.lookup),
                w.per_node(t.getattr),
                w.per_node(t.open),
                w.reads(),
                w.bytes() / 1e6,
                if t.read_calls > 0 {
                    t.read_bytes as f64 / t.read_calls as f64 / 1024.0
                } else {
                    0.0
                },
                if t.read_calls > 0 {
                    100.0 * t.read_sequential as f64 / t.read_calls as f64
                } else {
                    0.0
                },
                w.bytes() / used.max(1) as f64
            );
        }
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "Independence of the files touched: metadata ops per node, N=1, /bin/true vs python"
    );
    for k in contenders {
        let t = free(&k.name, "/bin/true");
        let p = free(&k.name, "python");
        if let (Some(t), Some(p)) = (t.first(), p.first()) {
            let _ = writeln!(
                o,
                "  {:<9} /bin/true {:>8.0}   python {:>8.0}",
                k.name,
                t.meta(),
                p.meta()
            );
        }
    }

    // Model check.
    let limited: Vec<&Wave> = waves.iter().filter(|w| w.mds_rate.is_some()).collect();
    if let Some(rate) = limited.first().and_then(|w| w.mds_rate) {
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "Model check at a metadata server of {rate} ops/s (burst {}): predicted = max(time without limit at N, N x ops/node / rate); upper = their sum",
            args.check_mds_burst
        );
        let _ = writeln!(
            o,
            "{:<9} {:>5} {:>10} {:>12} {:>10} {:>16}",
            "image", "N", "measured s", "predicted s", "upper s", "measured/pred."
        );
        for w in &limited {
            let Some(f) = waves.iter().find(|x| {
                x.contender == w.contender
                    && x.nodes == w.nodes
                    && x.workload == "python"
                    && x.mds_rate.is_none()
            }) else {
                continue;
            };
            let q = w.nodes as f64 * w.meta() / rate;
            let pred = f.wall_secs.max(q);
            let _ = writeln!(
                o,
                "{:<9} {:>5} {:>10.2} {:>12.2} {:>10.2} {:>16.2}",
                w.contender,
                w.nodes,
                w.wall_secs,
                pred,
                f.wall_secs + q,
                w.wall_secs / pred
            );
        }
    }

    // Extrapolation.
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "Extrapolation: time = max(one node's time (N=1), N x ops/node / {} ops/s, N x bytes/node / {}/s); ops and bytes per node from the largest measured N",
        args.model_mds_rate,
        human_bytes(bw as u64)
    );
    let _ = write!(o, "{:<9} {:>10} {:>9}", "image", "ops/node", "MB/node");
    for n in &args.extrapolate {
        let _ = write!(o, " {:>14} {:>10}", format!("MDS ops N={n}"), "time s");
    }
    let _ = writeln!(o);
    for k in contenders {
        let f = free(&k.name, "python");
        let (Some(one), Some(big)) = (
            f.iter().find(|w| w.nodes == 1).or(f.first()),
            f.iter().max_by_key(|w| w.nodes),
        ) else {
            continue;
        };
        let _ = write!(
            o,
            "{:<9} {:>10.1} {:>9.2}",
            k.name,
            big.meta(),
            big.bytes() / 1e6
        );
        for &n in &args.extrapolate {
            let t = model(
                one.wall_secs,
                big.meta(),
                big.bytes(),
                n as f64,
                args.model_mds_rate,
                bw,
            );
            let _ = write!(o, " {:>14.0} {:>10.2}", n as f64 * big.meta(), t);
        }
        let _ = writeln!(o);
    }

    // Goals.
    let _ = writeln!(o);
    let _ = writeln!(o, "Goals");
    // "  what: max VALUE  PASS", or FAIL with how far off, for a value that must stay <= limit.
    let goal = |o: &mut String, what: &str, shown: String, value: f64, limit: f64| {
        let verdict = if value <= limit {
            "PASS".to_string()
        } else {
            format!("FAIL (off by {:.0}%)", (value / limit - 1.0) * 100.0)
        };
        let _ = writeln!(o, "  {what}: {shown}  {verdict}");
    };
    let c = free("cimg", "python");
    if !c.is_empty() {
        let worst = c.iter().map(|w| w.meta()).fold(0.0, f64::max);
        let what = "cimg: metadata ops per node per launch <= 5 at every N";
        goal(&mut o, what, format!("max {worst:.1}"), worst, 5.0);
    }
    // The read and byte goals are the hot list's; an image without one is shown for comparison.
    for name in ["cimg-hot", "cimg"] {
        let h = free(name, "python");
        if h.is_empty() {
            continue;
        }
        let reads = h.iter().map(|w| w.reads()).fold(0.0, f64::max);
        let bytes = h.iter().map(|w| w.bytes()).fold(0.0, f64::max);
        let ratio = bytes / used.max(1) as f64;
        if name == "cimg-hot" {
            let what = format!("{name}: read calls per node <= 50");
            goal(&mut o, &what, format!("max {reads:.1}"), reads, 50.0);
            let what = format!(
                "{name}: bytes per node <= 1.5x used ({})",
                human_bytes(used)
            );
            let shown = format!("max {} = {ratio:.2}x", human_bytes(bytes as u64));
            goal(&mut o, &what, shown, ratio, 1.5);
        } else {
            let _ = writeln!(
                o,
                "  (no goal) {name} without a hot list: max {reads:.1} read calls and {} = {ratio:.2}x used per node",
                human_bytes(bytes as u64)
            );
        }
    }
    let _ = writeln!(o);
    let _ = writeln!(o, "commands:");
    for c in commands {
        let _ = writeln!(o, "  {c}");
    }
    o
}

mod plot {
    //! The SVG of storm-bench: metadata operations per node and the time until all N finished,
    //! measured, against the number of nodes; and the model's time up to the extrapolation's
    //! largest N. One colour per image.

    use super::{Contender, Wave};
    use anyhow::{Result, anyhow};
    use plotters::prelude::*;
    use std::path::Path;

    const COLORS: [RGBColor; 4] = [
        RGBColor(214, 39, 40),
        RGBColor(255, 127, 14),
        RGBColor(31, 119, 180),
        RGBColor(44, 160, 44),
    ];

    fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
        anyhow!("{e}")
    }

    /// A line of one image: its label, points, and whether it is a faint (secondary) line.
    struct Line {
        color: RGBColor,
        label: String,
        faint: bool,
        /// Mark every point (measured ones; not the model's dense curve).
        dots: bool,
        points: Vec<(f64, f64)>,
    }

    fn panel(
        area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
        title: &str,
        xmax: f64,
        lines: &[Line],
    ) -> Result<()> {
        let ys: Vec<f64> = lines
            .iter()
            .flat_map(|l| l.points.iter().map(|p| p.1))
            .collect();
        let ymax = ys.iter().copied().fold(1.0, f64::max) * 3.0;
        let ymin = ys.iter().copied().fold(f64::INFINITY, f64::min).min(1.0) / 3.0;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d((1.0..xmax * 1.3).log_scale(), (ymin..ymax).log_scale())
            .map_err(err)?;
        chart
            .configure_mesh()
            .light_line_style(TRANSPARENT)
            .x_desc("nodes N (log)")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| {
                if *y >= 1.0 {
                    format!("{y:.0}")
                } else {
                    format!("{y:.2}")
                }
            })
            .draw()
            .map_err(err)?;
        for l in lines {
            let style = if l.faint {
                l.color.mix(0.45).stroke_width(1)
            } else {
                l.color.stroke_width(2)
            };
            chart
                .draw_series(LineSeries::new(l.points.clone(), style))
                .map_err(err)?
                .label(l.label.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            if !l.dots {
                continue;
            }
            let c = l.color;
            chart
                .draw_series(l.points.iter().map(|q| Circle::new(*q, 3, c.filled())))
                .map_err(err)?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(err)?;
        Ok(())
    }

    /// `model(k, n)`: the model's time of image `k` at `n` nodes (`None`: no data).
    pub fn write_svg(
        waves: &[Wave],
        contenders: &[Contender],
        nodes: &[usize],
        extrapolate: &[u64],
        model: &dyn Fn(&Contender, f64) -> Option<f64>,
        path: &Path,
    ) -> Result<()> {
        let root = SVGBackend::new(path, (1500, 470)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let root = root
            .titled(
                "storm-bench: N nodes start python3 at once from a simulated parallel filesystem",
                ("sans-serif", 20),
            )
            .map_err(err)?;
        let panels = root.split_evenly((1, 3));
        let xmax = nodes.iter().copied().max().unwrap_or(1).max(2) as f64;
        let measured = |k: &Contender, limited: bool, get: fn(&Wave) -> f64| {
            let mut v: Vec<(f64, f64)> = waves
                .iter()
                .filter(|w| {
                    w.contender == k.name
                        && w.workload == "python"
                        && w.mds_rate.is_some() == limited
                })
                .map(|w| (w.nodes as f64, get(w).max(1e-3)))
                .collect();
            v.sort_by(|a, b| a.0.total_cmp(&b.0));
            v
        };
        let color = |i: usize| COLORS[i % COLORS.len()];
        let ops: Vec<Line> = contenders
            .iter()
            .enumerate()
            .map(|(i, k)| Line {
                color: color(i),
                label: k.name.clone(),
                faint: false,
                dots: true,
                points: measured(k, false, |w| w.meta()),
            })
            .collect();
        panel(
            &panels[0],
            "metadata ops per node, measured (log)",
            xmax,
            &ops,
        )?;
        let mut times = Vec::new();
        for (i, k) in contenders.iter().enumerate() {
            times.push(Line {
                color: color(i),
                label: k.name.clone(),
                faint: false,
                dots: true,
                points: measured(k, false, |w| w.wall_secs),
            });
            let lim = measured(k, true, |w| w.wall_secs);
            if !lim.is_empty() {
                times.push(Line {
                    color: color(i),
                    label: format!("{} (rate-limited MDS)", k.name),
                    faint: true,
                    dots: true,
                    points: lim,
                });
            }
        }
        panel(
            &panels[1],
            "time until all N finished, s, measured on 2 cores (log)",
            xmax,
            &times,
        )?;
        let xm = extrapolate.iter().copied().max().unwrap_or(10_000).max(2) as f64;
        let grid: Vec<f64> = (0..=40).map(|j| xm.powf(j as f64 / 40.0)).collect();
        let model_lines: Vec<Line> = contenders
            .iter()
            .enumerate()
            .map(|(i, k)| Line {
                color: color(i),
                label: k.name.clone(),
                faint: false,
                dots: false,
                points: grid
                    .iter()
                    .filter_map(|&n| model(k, n).map(|t| (n, t)))
                    .collect(),
            })
            .filter(|l| !l.points.is_empty())
            .collect();
        panel(
            &panels[2],
            "model: time, s, one node per machine (log)",
            xm,
            &model_lines,
        )?;
        root.present().map_err(err)?;
        Ok(())
    }
}
