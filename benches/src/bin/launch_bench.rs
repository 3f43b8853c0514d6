//! launch-bench: container start-up of `launch` against Charliecloud's `ch-run`, on the same
//! root filesystem, in one run.
//!
//! The tree (by default a Debian minbase rootfs with python3 made by debootstrap, see
//! `--rootfs`) is packed once with `cimg pack` and with `mksquashfs -comp zstd` (cached in
//! `--work-dir`), plus a `.cimg` packed with the hot list that `launch --record-hot` recorded
//! for the Python start. Then, rotating the order of the contenders on every run, it times:
//!
//! - `CMD -- /bin/true`: the launch latency;
//! - `CMD -- python3 -c 'import json, email, http.client'` warm (page cache kept) and cold
//!   (the images' servers stopped and `/proc/sys/vm/drop_caches` before every start; needs
//!   root), so that a cold start is a first launch.
//!
//! Contenders: `launch img.cimg` (on the image's shared server, started by an untimed launch
//! before the warm runs; every launch is given `CIMG_LINGER` long), `launch --private
//! img.cimg` (a mount of its own), `launch img-hot.cimg`, `ch-run img.sqfs`, `launch DIR`,
//! `ch-run DIR`, and as floors `unshare -Urm /bin/true` and `unshare -Ur chroot DIR` for
//! Python. It prints medians, the ratios the launcher issues set as goals, and the commands.
//!
//! Then N (32) unrelated launches of the image at once, whose Python sleeps a moment: the
//! image servers and their total RSS, sampled from `/proc` while they run, against the one
//! server of a single launch; and the same with `--private`. It ends with `launch
//! --stop` of its images, so it leaves no server behind.

use anyhow::{Context, Result, bail};
use cimg_benches::service::{self, LINGER};
use cimg_benches::{median, require_program, run_quiet};
use clap::Parser;
use serde::Serialize;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(
    name = "launch-bench",
    about = "launch vs ch-run start-up latency and Python start"
)]
struct Args {
    /// Root filesystem with python3 (e.g. `debootstrap --variant=minbase --include=python3
    /// bookworm DIR`).
    #[arg(long, default_value = "/var/tmp/launch-bench/rootfs")]
    rootfs: PathBuf,
    /// Where the images are kept between runs.
    #[arg(long, default_value = "/var/tmp/launch-bench")]
    work_dir: PathBuf,
    /// Runs of each warm measurement.
    #[arg(long, default_value_t = 21)]
    runs: usize,
    /// Runs of each cold measurement (each drops the page cache).
    #[arg(long, default_value_t = 7)]
    cold_runs: usize,
    /// Skip the cold measurements.
    #[arg(long)]
    no_cold: bool,
    /// Concurrent launches of the server census (0 skips it).
    #[arg(long, default_value_t = 32)]
    concurrent: usize,
    /// Seconds the Python of the census's launches sleeps after its imports.
    #[arg(long, default_value_t = 3)]
    concurrent_sleep: u64,
    /// Only the server census (no timing).
    #[arg(long)]
    only_concurrent: bool,
    /// Repack the images even if they exist.
    #[arg(long)]
    repack: bool,
    /// The Python statement timed.
    #[arg(long, default_value = "import json, email, http.client")]
    python: String,
    /// launch binary (default: next to this one).
    #[arg(long)]
    launch: Option<PathBuf>,
    /// cimg binary (default: next to this one).
    #[arg(long)]
    cimg: Option<PathBuf>,
    /// ch-run binary.
    #[arg(long, default_value = "ch-run")]
    ch_run: PathBuf,
    /// mksquashfs binary.
    #[arg(long, default_value = "mksquashfs")]
    mksquashfs: PathBuf,
    /// Write all runs as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One way of starting a container: argv before the command.
#[derive(Debug, Clone, Serialize)]
struct Contender {
    name: String,
    prefix: Vec<String>,
    /// Runs the host's own programs: timed on /bin/true only (the host's python3 is not
    /// the rootfs's).
    host: bool,
}

#[derive(Debug, Default, Serialize)]
struct Row {
    name: String,
    true_ms: Vec<f64>,
    py_warm_ms: Vec<f64>,
    py_cold_ms: Vec<f64>,
}

/// Time one start of `prefix + cmd` (ms); it must succeed.
fn time_one(prefix: &[String], cmd: &[&str]) -> Result<f64> {
    let mut c = Command::new(&prefix[0]);
    c.args(&prefix[1..])
        .args(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(u) = USER.get() {
        c.env("USER", u);
    }
    c.env("CIMG_LINGER", LINGER);
    let t = Instant::now();
    let o = c.output().with_context(|| format!("run {}", prefix[0]))?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    if !o.status.success() {
        bail!(
            "{} {} failed ({}): {}",
            prefix.join(" "),
            cmd.join(" "),
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(ms)
}

fn drop_caches() -> Result<()> {
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3\n")
        .context("write /proc/sys/vm/drop_caches (needs root)")
}

/// Run every contender `runs` times on `cmd`, rotating the order; `prepare` runs before each
/// start (untimed).
fn measure_all(
    contenders: &[Contender],
    cmd_for: &dyn Fn(&Contender) -> Vec<String>,
    runs: usize,
    prepare: &dyn Fn() -> Result<()>,
    out: &mut [Vec<f64>],
) -> Result<()> {
    let n = contenders.len();
    for r in 0..runs {
        for k in 0..n {
            let i = (r + k) % n;
            if contenders[i].host && runs > 0 && cmd_for(&contenders[i])[0] != "/bin/true" {
                continue;
            }
            let cmd = cmd_for(&contenders[i]);
            let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
            prepare()?;
            out[i].push(time_one(&contenders[i].prefix, &cmd)?);
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let launch = cimg_benches::sibling_binary("launch", args.launch.as_deref())?;
    let cimg = cimg_benches::sibling_binary("cimg", args.cimg.as_deref())?;
    let ch_run = require_program(&args.ch_run, "charliecloud")?;
    let mksquashfs = require_program(&args.mksquashfs, "squashfs-tools")?;
    let rootfs = &args.rootfs;
    if !rootfs.join("usr/bin/python3").exists() {
        bail!(
            "{} has no usr/bin/python3: make one with `debootstrap --variant=minbase --include=python3 bookworm {}`",
            rootfs.display(),
            rootfs.display()
        );
    }
    if !nix::unistd::geteuid().is_root() && !args.no_cold {
        bail!("cold runs drop the page cache and need root (or pass --no-cold)");
    }
    if std::env::var_os("USER").is_none() {
        // ch-run refuses to start without it: given to every timed command.
        let name = nix::unistd::User::from_uid(nix::unistd::getuid())?
            .map(|u| u.name)
            .unwrap_or_else(|| "root".into());
        USER.set(OsString::from(name)).ok();
    }
    std::fs::create_dir_all(&args.work_dir)?;
    let img = args.work_dir.join("img.cimg");
    let img_hot = args.work_dir.join("img-hot.cimg");
    let hot = args.work_dir.join("python.hot");
    let sqfs = args.work_dir.join("img.sqfs");
    let py = ["python3".to_string(), "-c".to_string(), args.python.clone()];
    let pack_cmd = |out: &Path, hot: Option<&Path>| {
        let mut c = Command::new(&cimg);
        c.arg("pack").arg(rootfs).arg(out).arg("-q");
        if let Some(h) = hot {
            c.arg("--hot").arg(h);
        }
        c
    };
    let mut commands: Vec<String> = Vec::new();
    if args.repack || !img.exists() {
        eprintln!("packing {}", img.display());
        run_quiet(&mut pack_cmd(&img, None))?;
    }
    commands.push(cimg_benches::command_line(&pack_cmd(&img, None)));
    let mut sq = Command::new(&mksquashfs);
    sq.arg(rootfs)
        .arg(&sqfs)
        .args(["-comp", "zstd", "-noappend", "-quiet", "-no-progress"]);
    if args.repack || !sqfs.exists() {
        eprintln!("packing {}", sqfs.display());
        run_quiet(&mut sq)?;
    }
    commands.push(cimg_benches::command_line(&sq));
    let mut rec = Command::new(&launch);
    rec.arg("--record-hot")
        .arg(&hot)
        .arg(&img)
        .arg("--")
        .args(&py);
    if args.repack || !img_hot.exists() {
        eprintln!("recording the hot list and packing {}", img_hot.display());
        let _ = std::fs::remove_file(&hot);
        run_quiet(&mut rec)?;
        let t = Instant::now();
        while !hot.exists() && t.elapsed().as_secs() < 10 {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        run_quiet(&mut pack_cmd(&img_hot, Some(&hot)))?;
    }
    commands.push(cimg_benches::command_line(&rec));
    commands.push(cimg_benches::command_line(&pack_cmd(&img_hot, Some(&hot))));

    let s = |p: &Path| p.display().to_string();
    let l = s(&launch);
    let c = s(&ch_run);
    let contenders = vec![
        Contender {
            name: "launch img.cimg".into(),
            prefix: vec![l.clone(), s(&img), "--".into()],
            host: false,
        },
        Contender {
            name: "launch --private img.cimg".into(),
            prefix: vec![l.clone(), "--private".into(), s(&img), "--".into()],
            host: false,
        },
        Contender {
            name: "launch img-hot.cimg".into(),
            prefix: vec![l.clone(), s(&img_hot), "--".into()],
            host: false,
        },
        Contender {
            name: "ch-run img.sqfs".into(),
            prefix: vec![c.clone(), s(&sqfs), "--".into()],
            host: false,
        },
        Contender {
            name: "launch DIR".into(),
            prefix: vec![l.clone(), s(rootfs), "--".into()],
            host: false,
        },
        Contender {
            name: "ch-run DIR".into(),
            prefix: vec![c.clone(), s(rootfs), "--".into()],
            host: false,
        },
        Contender {
            name: "floor: unshare -Urm".into(),
            prefix: vec!["unshare".into(), "-Urm".into()],
            host: true,
        },
        Contender {
            name: "floor: unshare -Ur chroot DIR".into(),
            prefix: vec!["unshare".into(), "-Ur".into(), "chroot".into(), s(rootfs)],
            host: false,
        },
    ];
    for k in &contenders {
        commands.push(format!("{} CMD", k.prefix.join(" ")));
    }
    commands.push(format!("CIMG_LINGER={LINGER} for every launch above"));
    // No server of an earlier run (or of an earlier launch binary) may serve this one.
    service::stop(&launch, &[&img, &img_hot])?;
    if args.only_concurrent {
        let census = census(&args, &launch, &img, &mut commands)?;
        print_census(&census);
        service::stop(&launch, &[&img, &img_hot])?;
        return Ok(());
    }
    let n = contenders.len();
    let mut rows: Vec<Row> = contenders
        .iter()
        .map(|k| Row {
            name: k.name.clone(),
            ..Default::default()
        })
        .collect();

    // Warm-up: every contender once on each command (page cache of images and rootfs); the
    // first launch of each image starts its server, which the timed launches find.
    let nothing = || Ok(());
    let true_cmd = |_: &Contender| vec!["/bin/true".to_string()];
    let py_cmd = |_: &Contender| py.to_vec();
    let mut scratch = vec![Vec::new(); n];
    measure_all(&contenders, &true_cmd, 1, &nothing, &mut scratch)?;
    measure_all(&contenders, &py_cmd, 1, &nothing, &mut scratch)?;

    eprintln!("timing /bin/true ({} runs each)", args.runs);
    let mut t = vec![Vec::new(); n];
    measure_all(&contenders, &true_cmd, args.runs, &nothing, &mut t)?;
    eprintln!("timing warm python ({} runs each)", args.runs);
    let mut w = vec![Vec::new(); n];
    measure_all(&contenders, &py_cmd, args.runs, &nothing, &mut w)?;
    let mut cd = vec![Vec::new(); n];
    if !args.no_cold {
        eprintln!(
            "timing cold python ({} runs each, servers stopped and page cache dropped before each)",
            args.cold_runs
        );
        let cold = || {
            service::stop(&launch, &[&img, &img_hot])?;
            drop_caches()
        };
        measure_all(&contenders, &py_cmd, args.cold_runs, &cold, &mut cd)?;
    }
    let census = if args.concurrent > 0 {
        Some(census(&args, &launch, &img, &mut commands)?)
    } else {
        None
    };
    service::stop(&launch, &[&img, &img_hot])?;
    for i in 0..n {
        rows[i].true_ms = t[i].clone();
        rows[i].py_warm_ms = w[i].clone();
        rows[i].py_cold_ms = cd[i].clone();
    }

    // Report.
    let files = cimg_benches::read_tree(rootfs, false);
    println!(
        "launch-bench: rootfs {} ({} files, {}), python3 -c '{}'",
        rootfs.display(),
        files.files,
        cimg_benches::human_bytes(files.bytes),
        args.python
    );
    println!(
        "medians in ms; /bin/true and warm python over {} runs, cold python over {} runs",
        args.runs, args.cold_runs
    );
    println!();
    println!(
        "{:<32} {:>10} {:>12} {:>12}",
        "contender", "/bin/true", "python warm", "python cold"
    );
    let med = |v: &[f64]| if v.is_empty() { f64::NAN } else { median(v) };
    let cell = |v: f64| {
        if v.is_nan() {
            "-".to_string()
        } else {
            format!("{v:.2}")
        }
    };
    for r in &rows {
        println!(
            "{:<32} {:>10} {:>12} {:>12}",
            r.name,
            cell(med(&r.true_ms)),
            cell(med(&r.py_warm_ms)),
            cell(med(&r.py_cold_ms))
        );
    }
    let get = |name: &str| rows.iter().find(|r| r.name == name).unwrap();
    let (li, lp, lh, ch, ld, cd) = (
        get("launch img.cimg"),
        get("launch --private img.cimg"),
        get("launch img-hot.cimg"),
        get("ch-run img.sqfs"),
        get("launch DIR"),
        get("ch-run DIR"),
    );
    println!();
    let goal = |what: &str, x: f64, limit: f64| {
        println!(
            "{:<62} {:>6.3}  (goal <= {limit})  {}",
            what,
            x,
            if x <= limit { "PASS" } else { "FAIL" }
        );
    };
    println!("goals of the image service (launch img.cimg on its shared, warm server):");
    goal(
        "launch latency: launch img.cimg / ch-run img.sqfs",
        med(&li.true_ms) / med(&ch.true_ms),
        0.3,
    );
    goal(
        "launch latency: launch img.cimg / ch-run DIR",
        med(&li.true_ms) / med(&cd.true_ms),
        1.3,
    );
    goal(
        "warm python: launch img.cimg / launch DIR",
        med(&li.py_warm_ms) / med(&ld.py_warm_ms),
        1.1,
    );
    if !args.no_cold {
        goal(
            "cold python (first launch): launch img.cimg / --private",
            med(&li.py_cold_ms) / med(&lp.py_cold_ms),
            1.05,
        );
    }
    if let Some(c) = &census {
        goal(
            &format!("{} launches at once: servers (goal 1)", c.n),
            c.shared.servers as f64,
            1.0,
        );
        goal(
            &format!("{} launches at once: server RSS / one launch's", c.n),
            c.shared.rss_kib as f64 / c.single.rss_kib.max(1) as f64,
            1.2,
        );
    }
    println!();
    println!("earlier goals:");
    goal(
        "launch latency: launch img.cimg / ch-run img.sqfs",
        med(&li.true_ms) / med(&ch.true_ms),
        0.5,
    );
    if !args.no_cold {
        goal(
            "cold python: launch img.cimg / ch-run img.sqfs",
            med(&li.py_cold_ms) / med(&ch.py_cold_ms),
            0.7,
        );
        goal(
            "cold python: launch img-hot.cimg / ch-run img.sqfs",
            med(&lh.py_cold_ms) / med(&ch.py_cold_ms),
            0.7,
        );
    }
    goal(
        "warm python: launch img-hot.cimg / launch DIR",
        med(&lh.py_warm_ms) / med(&ld.py_warm_ms),
        1.1,
    );
    if let Some(c) = &census {
        println!();
        print_census(c);
    }
    println!();
    println!("commands:");
    for c in &commands {
        println!("  {c}");
    }
    if let Some(j) = &args.json {
        let v = serde_json::json!({ "rootfs": rootfs, "python": args.python, "contenders": contenders, "rows": rows, "census": census, "commands": commands });
        std::fs::write(j, serde_json::to_vec_pretty(&v)?)
            .with_context(|| format!("write {}", j.display()))?;
    }
    Ok(())
}

/// Image servers seen while launches ran.
#[derive(Debug, Default, Clone, Serialize)]
struct Seen {
    /// The most servers of the image at one time.
    servers: usize,
    /// The largest total RSS of those servers at one time (KiB).
    rss_kib: u64,
    /// Samples taken.
    samples: usize,
    /// Seconds from the first spawn until all launches exited.
    wall_secs: f64,
}

/// The server census: one launch, N shared launches at once, N private ones at once.
#[derive(Debug, Clone, Serialize)]
struct Census {
    n: usize,
    statement: String,
    single: Seen,
    shared: Seen,
    private: Seen,
}

/// Start `n` launches of `prefix + cmd` at once (no server running), sample the image's
/// servers every 50 ms until all have exited, and stop the servers.
fn seen(launch: &Path, img: &Path, prefix: &[String], cmd: &[String], n: usize) -> Result<Seen> {
    service::stop(launch, &[img])?;
    let t0 = Instant::now();
    let mut kids = Vec::with_capacity(n);
    for _ in 0..n {
        let mut c = Command::new(&prefix[0]);
        c.args(&prefix[1..])
            .args(cmd)
            .env("CIMG_LINGER", LINGER)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(u) = USER.get() {
            c.env("USER", u);
        }
        kids.push(c.spawn().with_context(|| format!("run {}", prefix[0]))?);
    }
    let pids: Vec<u32> = kids.iter().map(|k| k.id()).collect();
    let mut s = Seen::default();
    let mut running = n;
    while running > 0 {
        let servers = service::servers_of(img, &pids);
        s.servers = s.servers.max(servers.len());
        s.rss_kib = s.rss_kib.max(servers.iter().map(|p| p.rss_kib).sum());
        s.samples += 1;
        std::thread::sleep(std::time::Duration::from_millis(50));
        running = 0;
        for k in &mut kids {
            if k.try_wait()?.is_none() {
                running += 1;
            }
        }
    }
    s.wall_secs = t0.elapsed().as_secs_f64();
    for k in kids {
        let o = k.wait_with_output()?;
        if !o.status.success() {
            bail!(
                "{} {} failed ({}): {}",
                prefix.join(" "),
                cmd.join(" "),
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
    }
    service::stop(launch, &[img])?;
    Ok(s)
}

fn census(args: &Args, launch: &Path, img: &Path, commands: &mut Vec<String>) -> Result<Census> {
    let statement = format!(
        "{}; import time; time.sleep({})",
        args.python, args.concurrent_sleep
    );
    let cmd = vec!["python3".to_string(), "-c".into(), statement.clone()];
    let l = launch.display().to_string();
    let i = img.display().to_string();
    let shared = vec![l.clone(), i.clone(), "--".into()];
    let private = vec![l.clone(), "--private".into(), i.clone(), "--".into()];
    let n = args.concurrent;
    eprintln!("server census: 1 launch, then {n} at once, shared and --private");
    let single = seen(launch, img, &shared, &cmd, 1)?;
    let shared_seen = seen(launch, img, &shared, &cmd, n)?;
    let private_seen = seen(launch, img, &private, &cmd, n)?;
    let q = cimg_benches::shell_quote(std::ffi::OsStr::new(&statement));
    commands.push(format!("census: {n} x at once: {l} {i} -- python3 -c {q}"));
    commands.push(format!(
        "census: {n} x at once: {l} --private {i} -- python3 -c {q}"
    ));
    Ok(Census {
        n,
        statement,
        single,
        shared: shared_seen,
        private: private_seen,
    })
}

fn print_census(c: &Census) {
    println!(
        "server census: python3 -c '{}'; image servers (cimg-server, or a private server: a \
         launch leading its own session) sampled every 50 ms from /proc, the most at once and \
         their largest total VmRSS",
        c.statement
    );
    println!(
        "{:<34} {:>8} {:>14} {:>10} {:>8}",
        "launches", "servers", "server RSS", "x one", "wall s"
    );
    let one = c.single.rss_kib.max(1) as f64;
    for (what, s) in [
        ("1 launch img.cimg".to_string(), &c.single),
        (format!("{} launch img.cimg at once", c.n), &c.shared),
        (format!("{} launch --private at once", c.n), &c.private),
    ] {
        println!(
            "{:<34} {:>8} {:>10.1} MiB {:>10.2} {:>8.2}",
            what,
            s.servers,
            s.rss_kib as f64 / 1024.0,
            s.rss_kib as f64 / one,
            s.wall_secs
        );
    }
}

/// `USER` for the timed commands when the environment has none.
static USER: std::sync::OnceLock<OsString> = std::sync::OnceLock::new();
