//! `fuse-bench`: the `cimg-mount` FUSE driver against `squashfuse_ll` and the kernel's squashfs
//! (loop mount), in one run on the same corpora.
//!
//! Each corpus (the host's `/usr` by default, plus a generated tree of ≥100,000 small files and a
//! generated ≥1 GiB file) is packed once with `cimg pack` (default options) and once with
//! `mksquashfs -comp zstd -b 128K`; the `.sqfs` is served by both `squashfuse_ll` and the kernel.
//! Every run then measures, per contender: mount-to-first-stat, a cold metadata walk
//! (`find -printf '%s\n'`), a cold and a warm read of every file (4 readers), a cold sequential
//! read of the corpus's largest file, 4 KiB random-read IOPS on it (`fio`, or an in-process pread
//! loop), and the daemon's peak RSS. Prints medians, ratios and the issue's goals with PASS/FAIL.
//!
//! Needs root (mounts, `drop_caches`). Everything mounted is unmounted again, also on error and
//! on SIGINT/SIGTERM/SIGHUP (a signal thread lazily unmounts whatever is registered).

use anyhow::{Context, Result, bail};
use cimg_benches::{
    Synth, TreeStats, cimg_binary, command_line, cores, find_program, human_bytes, median,
    parse_size, read_tree, slug,
};
use clap::Parser;
use serde::Serialize;
use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, mpsc};
use std::time::{Duration, Instant};

/// The daemon may use this much more than its block cache (the goal of the issue).
const RSS_SLACK: u64 = 32 << 20;
/// Files smaller than this are not used for the sequential and random read of "the big file".
const MIN_BIG_FILE: u64 = 16 << 20;
/// How long a mount may take to answer, and a mount command or daemon to exit.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(60);
/// Bump when the generated corpora change.
const GEN_VERSION: u32 = 1;
/// Names fuse-bench creates in the work directory (removed at the end unless `--keep`).
const WORK_ITEMS: [&str; 6] = [
    "small-files",
    "small-files.stamp",
    "big-file",
    "big-file.stamp",
    "images",
    "mnt",
];

#[derive(Parser)]
#[command(
    name = "fuse-bench",
    about = "cimg-mount against squashfuse_ll and kernel squashfs on the same corpora"
)]
struct Args {
    /// Host directory to use as a corpus (repeatable).
    #[arg(long = "corpus", value_name = "DIR", default_value = "/usr")]
    corpora: Vec<PathBuf>,
    /// Skip the host directories (--corpus): only the generated corpora.
    #[arg(long)]
    no_host: bool,
    /// Skip the generated tree of small files.
    #[arg(long)]
    no_small_files: bool,
    /// Skip the generated big file.
    #[arg(long)]
    no_big_file: bool,
    /// Number of files in the generated small-file tree (100 per directory, 100 B – 8 KiB).
    #[arg(long, default_value_t = 100_000)]
    small_files: u64,
    /// Size of the generated big file.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    big_file_size: u64,
    /// PRNG seed of the generated corpora.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Runs per metric and contender (medians are reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Contenders, comma-separated: cimg, squashfuse (squashfuse_ll), kernel.
    #[arg(long, value_delimiter = ',', default_value = "cimg,squashfuse,kernel", value_parser = parse_contender)]
    contenders: Vec<Contender>,
    /// Where generated corpora, images and mount points go (default: a temporary directory,
    /// removed at the end; with --keep: /var/tmp/fuse-bench).
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// Keep generated corpora and images in the work directory, and reuse the ones already there
    /// (a corpus or image is only made if missing).
    #[arg(long)]
    keep: bool,
    /// With --keep: pack the images again even if they exist.
    #[arg(long)]
    repack: bool,
    /// Block cache size given to cimg-mount (`--cache-size`); the RSS goal is this + 32 MiB.
    #[arg(long, default_value = "256M")]
    cache_size: String,
    /// Event loops given to cimg-mount (`--threads`; default: cimg-mount's own default).
    #[arg(long)]
    threads: Option<usize>,
    /// Reader threads of the full reads (the same for every contender).
    #[arg(long, default_value_t = 4)]
    readers: usize,
    /// Seconds of random 4 KiB reads per measurement.
    #[arg(long, default_value_t = 10)]
    rand_secs: u64,
    /// Use the in-process random-read loop even if fio is installed.
    #[arg(long)]
    no_fio: bool,
    /// Also write every measurement as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// cimg binary (default: `cimg` next to this executable).
    #[arg(long)]
    cimg: Option<PathBuf>,
    /// cimg-mount binary (default: `cimg-mount` next to this executable).
    #[arg(long)]
    cimg_mount: Option<PathBuf>,
    /// squashfuse_ll binary.
    #[arg(long, default_value = "squashfuse_ll")]
    squashfuse_ll: PathBuf,
    /// mksquashfs binary.
    #[arg(long, default_value = "mksquashfs")]
    mksquashfs: PathBuf,
    /// fio binary (optional).
    #[arg(long, default_value = "fio")]
    fio: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
enum Contender {
    #[serde(rename = "cimg")]
    Cimg,
    #[serde(rename = "squashfuse_ll")]
    Squashfuse,
    #[serde(rename = "kernel")]
    Kernel,
}

impl Contender {
    fn name(self) -> &'static str {
        match self {
            Contender::Cimg => "cimg",
            Contender::Squashfuse => "squashfuse_ll",
            Contender::Kernel => "kernel",
        }
    }
}

fn parse_contender(s: &str) -> Result<Contender, String> {
    match s.trim() {
        "cimg" | "cimg-mount" => Ok(Contender::Cimg),
        "squashfuse" | "squashfuse_ll" => Ok(Contender::Squashfuse),
        "kernel" | "squashfs" => Ok(Contender::Kernel),
        o => Err(format!(
            "{o:?} is not a contender (cimg, squashfuse, kernel)"
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Clean-up: watchdog, unmounting

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Environment variable that turns fuse-bench into its watchdog (see [`start_watchdog`]).
const WATCHDOG_ENV: &str = "FUSE_BENCH_WATCHDOG";

/// Starts a watchdog: this binary again, in its own mode, which waits for this process to end
/// (however it ends: error, Ctrl-C, SIGTERM, SIGKILL) and then lazily unmounts anything still
/// mounted under `mnt` and removes `remove`. Blocking signals here instead would leave them
/// blocked in every child (std does not reset the signal mask on spawn); the watchdog blocks
/// them only in itself, so that the Ctrl-C that ends the benchmark does not end it too.
fn start_watchdog(mnt: &Path, remove: &[PathBuf]) -> Result<Watchdog> {
    let mut cmd = Command::new(std::env::current_exe().context("find own executable")?);
    cmd.env(WATCHDOG_ENV, std::process::id().to_string())
        .arg(mnt)
        .args(remove)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    Ok(Watchdog(cmd.spawn().context("start the watchdog")?))
}

/// The watchdog process, killed when dropped (this process cleaned up itself).
struct Watchdog(std::process::Child);

impl Drop for Watchdog {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The watchdog's main: `args` are the mount directory and the paths to remove.
fn watchdog(parent: &str) -> ExitCode {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    let _ = set.thread_block();
    let parent: u32 = parent.parse().unwrap_or(0);
    let mut args = std::env::args_os().skip(1).map(PathBuf::from);
    let Some(mnt) = args.next() else {
        return ExitCode::from(2);
    };
    let remove: Vec<PathBuf> = args.collect();
    while nix::unistd::getppid().as_raw() as u32 == parent {
        std::thread::sleep(Duration::from_millis(50));
    }
    // A mount command the benchmark started just before it died may still complete.
    for _ in 0..4 {
        sweep_mounts(&mnt);
        std::thread::sleep(Duration::from_millis(250));
    }
    if mounts_under(&mnt).is_empty() {
        for p in &remove {
            remove_path(p);
        }
    }
    ExitCode::SUCCESS
}

fn lazy_unmount(dir: &Path) {
    let _ = Command::new("umount")
        .arg("-l")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn remove_path(p: &Path) {
    let _ = match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(_) => Ok(()),
    };
}

/// Decodes the octal escapes (`\040`) of a /proc/self/mountinfo field.
fn unescape_mountinfo(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = oct.iter().fold(0u32, |a, &c| a * 8 + u32::from(c - b'0'));
                out.push(v as u8);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(OsStr::from_bytes(&out))
}

/// Mount points at or under `root`, deepest first.
fn mounts_under(root: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|p| p.starts_with(root))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v
}

/// Lazily unmounts anything still mounted at or under `root` (leftovers of a killed run).
fn sweep_mounts(root: &Path) -> usize {
    let mut n = 0;
    for _ in 0..3 {
        let left = mounts_under(root);
        if left.is_empty() {
            break;
        }
        for m in &left {
            eprintln!("fuse-bench: unmounting leftover mount {}", m.display());
            lazy_unmount(m);
            n += 1;
        }
    }
    n
}

// ---------------------------------------------------------------------------------------------
// Mounting

/// What one contender mounts, and how.
struct Setup {
    contender: Contender,
    image: PathBuf,
    dir: PathBuf,
    /// Program and arguments of the mount command.
    cmd: Vec<OsString>,
    /// Name of the daemon process (`argv[0]`'s file name), for FUSE contenders.
    daemon: Option<OsString>,
}

impl Setup {
    fn command(&self) -> Command {
        let mut c = Command::new(&self.cmd[0]);
        c.args(&self.cmd[1..]);
        c
    }
}

/// A mounted contender; unmounted (lazily) when dropped if [`Mounted::unmount`] was not called.
struct Mounted<'a> {
    setup: &'a Setup,
    mounted: bool,
}

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        if self.mounted {
            lazy_unmount(&self.setup.dir);
            self.mounted = false;
        }
    }
}

/// Spawns the mount command and polls `probe` until it can be stat'ed; returns the mount and
/// the time from spawn to the first successful stat. The mount command must exit with status 0.
fn mount<'a>(setup: &'a Setup, probe: &Path) -> Result<(Mounted<'a>, Duration)> {
    if !mounts_under(&setup.dir).is_empty() {
        bail!("{} is already mounted", setup.dir.display());
    }
    // Before spawning: if the mount command fails half-way, the guard still unmounts.
    let m = Mounted {
        setup,
        mounted: true,
    };
    let t = spawn_mount(setup, probe)?;
    Ok((m, t))
}

fn spawn_mount(setup: &Setup, probe: &Path) -> Result<Duration> {
    let mut cmd = setup.command();
    cmd.stdin(Stdio::null()).stdout(Stdio::null());
    let line = command_line(&cmd);
    let t0 = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("run {line}"))?;
    let mut status = None;
    let elapsed = loop {
        if std::fs::symlink_metadata(probe).is_ok() {
            break t0.elapsed();
        }
        if status.is_none()
            && let Some(st) = child.try_wait()?
        {
            if !st.success() {
                bail!("`{line}` failed ({st})");
            }
            status = Some(st);
        }
        if t0.elapsed() > MOUNT_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "`{line}`: {} did not appear within {} s",
                probe.display(),
                MOUNT_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_micros(50));
    };
    // The command itself returns once mounted (cimg-mount, mount) or once daemonized
    // (squashfuse_ll).
    while status.is_none() {
        if let Some(st) = child.try_wait()? {
            if !st.success() {
                bail!("`{line}` failed ({st})");
            }
            status = Some(st);
        } else if t0.elapsed() > MOUNT_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "`{line}` did not return within {} s",
                MOUNT_TIMEOUT.as_secs()
            );
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    Ok(elapsed)
}

impl Mounted<'_> {
    /// Reads the daemon's peak RSS (VmHWM, KiB), unmounts with `umount DIR` (retried, then
    /// `umount -l`) and waits for the daemon to exit.
    fn unmount(mut self) -> Result<Option<u64>> {
        let dir = self.setup.dir.clone();
        let pids = self
            .setup
            .daemon
            .as_deref()
            .map(|name| daemon_pids(name, &dir))
            .unwrap_or_default();
        let hwm = pids.iter().filter_map(|&p| vm_hwm_kib(p)).max();
        if self.setup.daemon.is_some() && hwm.is_none() {
            eprintln!(
                "fuse-bench: warning: no {} daemon found for {}",
                self.setup.contender.name(),
                dir.display()
            );
        }
        let mut ok = false;
        for attempt in 0..50 {
            let st = Command::new("umount")
                .arg(&dir)
                .stdout(Stdio::null())
                .stderr(if attempt == 49 {
                    Stdio::inherit()
                } else {
                    Stdio::null()
                })
                .status()
                .context("run umount")?;
            if st.success() {
                ok = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if !ok {
            eprintln!(
                "fuse-bench: warning: `umount {}` keeps failing; unmounting lazily",
                dir.display()
            );
            lazy_unmount(&dir);
        }
        self.mounted = false;
        // Let the daemon finish so that the next mount does not compete with it.
        let t0 = Instant::now();
        while pids
            .iter()
            .any(|p| Path::new(&format!("/proc/{p}")).exists())
        {
            if t0.elapsed() > MOUNT_TIMEOUT {
                eprintln!(
                    "fuse-bench: warning: the daemon of {} did not exit",
                    dir.display()
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(hwm)
    }
}

/// Processes whose `argv[0]` file name is `name` and which have `dir` as an argument.
fn daemon_pids(name: &OsStr, dir: &Path) -> Vec<u32> {
    let me = std::process::id();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            let Ok(cl) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let mut args = cl.split(|&b| b == 0).map(OsStr::from_bytes);
            let Some(a0) = args.next() else { return false };
            Path::new(a0).file_name() == Some(name) && args.any(|a| Path::new(a) == dir)
        })
        .collect()
}

/// VmHWM (peak resident set size) of a process, in KiB.
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

const DROP_CACHES: &str = "sync; echo 3 > /proc/sys/vm/drop_caches";

fn drop_caches() -> Result<()> {
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").context("write /proc/sys/vm/drop_caches")
}

/// Drops one file's pages from the page cache.
fn evict_file(p: &Path) -> Result<()> {
    use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
    let f = std::fs::File::open(p).with_context(|| format!("open {}", p.display()))?;
    f.sync_all().ok();
    posix_fadvise(&f, 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED)
        .with_context(|| format!("posix_fadvise {}", p.display()))
}

// ---------------------------------------------------------------------------------------------
// Workloads

#[derive(Debug, Default, Clone, Copy, Serialize)]
struct ReadResult {
    secs: f64,
    files: u64,
    bytes: u64,
    errors: u64,
}

impl ReadResult {
    fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.secs.max(1e-9)
    }
}

/// Reads every regular file under `root` to the end: the calling thread walks the tree in
/// directory order (pre-order, readdir order) and hands the files to `readers` threads.
fn read_everything(root: &Path, readers: usize) -> Result<ReadResult> {
    let files = AtomicU64::new(0);
    let bytes = AtomicU64::new(0);
    let errors = AtomicU64::new(0);
    let t0 = Instant::now();
    let (tx, rx) = mpsc::sync_channel::<PathBuf>(4096);
    let rx = Mutex::new(rx);
    std::thread::scope(|s| -> Result<()> {
        for _ in 0..readers.max(1) {
            s.spawn(|| {
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let next = lock(&rx).recv();
                    let Ok(path) = next else { break };
                    let mut n = 0u64;
                    let ok = match std::fs::File::open(&path) {
                        Ok(mut f) => loop {
                            match f.read(&mut buf) {
                                Ok(0) => break true,
                                Ok(k) => n += k as u64,
                                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                                Err(_) => break false,
                            }
                        },
                        Err(_) => false,
                    };
                    if !ok {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    files.fetch_add(1, Ordering::Relaxed);
                    bytes.fetch_add(n, Ordering::Relaxed);
                }
            });
        }
        let mut stack =
            vec![std::fs::read_dir(root).with_context(|| format!("read {}", root.display()))?];
        while let Some(top) = stack.last_mut() {
            match top.next() {
                None => {
                    stack.pop();
                }
                Some(Err(_)) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                Some(Ok(e)) => match e.file_type() {
                    Ok(t) if t.is_dir() => match std::fs::read_dir(e.path()) {
                        Ok(rd) => stack.push(rd),
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    },
                    Ok(t) if t.is_file() => {
                        if tx.send(e.path()).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                },
            }
        }
        drop(tx);
        Ok(())
    })?;
    Ok(ReadResult {
        secs: t0.elapsed().as_secs_f64(),
        files: files.into_inner(),
        bytes: bytes.into_inner(),
        errors: errors.into_inner(),
    })
}

/// Reads one file from start to end with 1 MiB reads.
fn read_sequential(p: &Path) -> Result<ReadResult> {
    let t0 = Instant::now();
    let mut f = std::fs::File::open(p).with_context(|| format!("open {}", p.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => n += k as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).with_context(|| format!("read {}", p.display())),
        }
    }
    Ok(ReadResult {
        secs: t0.elapsed().as_secs_f64(),
        files: 1,
        bytes: n,
        errors: 0,
    })
}

fn fio_command(fio: &Path, file: &Path, secs: u64) -> Command {
    let mut c = Command::new(fio);
    let mut fname = OsString::from("--filename=");
    fname.push(file);
    c.arg("--name=rr").arg(fname).args([
        "--rw=randread",
        "--bs=4k",
        "--ioengine=psync",
        "--numjobs=4",
        &format!("--runtime={secs}"),
        "--time_based",
        "--group_reporting",
        "--output-format=json",
        "--invalidate=1",
        "--readonly",
    ]);
    c
}

/// 4 KiB random-read IOPS on `file` with fio.
fn random_fio(fio: &Path, file: &Path, secs: u64) -> Result<f64> {
    let mut cmd = fio_command(fio, file, secs);
    let line = command_line(&cmd);
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("run {line}"))?;
    if !out.status.success() {
        bail!("`{line}` failed ({})", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let json = &text[text
        .find('{')
        .with_context(|| format!("`{line}`: no JSON output"))?..];
    let v: serde_json::Value =
        serde_json::from_str(json).with_context(|| format!("`{line}`: bad JSON output"))?;
    let job = &v["jobs"][0];
    if job["error"].as_i64().unwrap_or(0) != 0 {
        bail!("`{line}`: fio reports error {}", job["error"]);
    }
    job["read"]["iops"]
        .as_f64()
        .with_context(|| format!("`{line}`: no jobs[0].read.iops in the output"))
}

/// 4 KiB random-read IOPS on `file` with 4 threads doing `pread` at random 4 KiB-aligned offsets
/// for `secs` seconds (the fallback when fio is not installed).
fn random_pread(file: &Path, secs: u64, seed: u64) -> Result<f64> {
    let size = std::fs::metadata(file)?.len();
    let blocks = (size / 4096).max(1);
    let ops = AtomicU64::new(0);
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(secs);
    std::thread::scope(|s| -> Result<()> {
        let mut hs = vec![];
        for t in 0..4u64 {
            let ops = &ops;
            hs.push(s.spawn(move || -> Result<()> {
                let f = std::fs::File::open(file)?;
                let mut rng = cimg_benches::Prng::new(seed ^ (t + 1).wrapping_mul(0x9E37));
                let mut buf = [0u8; 4096];
                let mut n = 0u64;
                while Instant::now() < deadline {
                    f.read_at(&mut buf, rng.below(blocks) * 4096)?;
                    n += 1;
                }
                ops.fetch_add(n, Ordering::Relaxed);
                Ok(())
            }));
        }
        for h in hs {
            h.join()
                .map_err(|_| anyhow::anyhow!("a reader panicked"))??;
        }
        Ok(())
    })?;
    Ok(ops.into_inner() as f64 / t0.elapsed().as_secs_f64())
}

// ---------------------------------------------------------------------------------------------
// Corpora and images

struct Corpus {
    name: String,
    path: PathBuf,
    generated: bool,
}

/// Generates `dir` with `gen` unless `stamp` says it is already there with the same parameters.
fn ensure_generated(
    dir: &Path,
    stamp: &Path,
    want: &str,
    what: &str,
    generate: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    if dir.is_dir() && std::fs::read_to_string(stamp).is_ok_and(|s| s == want) {
        eprintln!("fuse-bench: reusing {what} in {}", dir.display());
        return Ok(());
    }
    remove_path(stamp);
    remove_path(dir);
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let t0 = Instant::now();
    generate(dir).with_context(|| format!("generate {what} in {}", dir.display()))?;
    nix::unistd::sync();
    std::fs::write(stamp, want)?;
    eprintln!(
        "fuse-bench: generated {what} in {} ({:.1} s)",
        dir.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `count` text-like files of 100 B – 8 KiB (log-uniform-ish), 100 per directory.
fn generate_small_files(dir: &Path, count: u64, seed: u64) -> Result<()> {
    let mut g = Synth::new(seed);
    let mut buf = Vec::with_capacity(8192);
    for i in 0..count {
        let d = dir.join(format!("d{:04}", i / 100));
        if i % 100 == 0 {
            std::fs::create_dir(&d).with_context(|| format!("create {}", d.display()))?;
        }
        let top = g.rng.range(7, 13);
        let size = g.rng.range(100, (1u64 << top).max(100)) as usize;
        buf.clear();
        g.text(&mut buf, size);
        let p = d.join(format!("f{i:06}.txt"));
        std::fs::write(&p, &buf).with_context(|| format!("write {}", p.display()))?;
    }
    Ok(())
}

/// One file of `size` bytes of moderately compressible data: 1 MiB chunks, in turn text-like
/// (45%), binary-like (35%) or random (20%).
fn generate_big_file(path: &Path, size: u64, seed: u64) -> Result<()> {
    let mut g = Synth::new(seed);
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?,
    );
    let mut buf = Vec::with_capacity((1 << 20) + 4096);
    let mut left = size;
    while left > 0 {
        let n = left.min(1 << 20) as usize;
        buf.clear();
        match g.rng.below(20) {
            0..=8 => g.text(&mut buf, n),
            9..=15 => g.binary(&mut buf, n),
            _ => g.random(&mut buf, n),
        }
        f.write_all(&buf)?;
        left -= n as u64;
    }
    f.flush()?;
    Ok(())
}

/// The largest regular file under `root` (path, size), not following symlinks.
fn largest_file(root: &Path) -> Option<(PathBuf, u64)> {
    let mut best: Option<(PathBuf, u64)> = None;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                if best.as_ref().is_none_or(|b| len > b.1) {
                    best = Some((e.path(), len));
                }
            }
        }
    }
    best
}

#[derive(Serialize, Clone)]
struct ImageJson {
    path: PathBuf,
    bytes: u64,
    command: String,
    /// Seconds to pack, if packed in this invocation.
    pack_secs: Option<f64>,
}

/// Packs `corpus` into `out` with `cmd` unless `out` and its `.ok` stamp exist (and `reuse`).
fn ensure_image(out: &Path, cmd: &mut Command, reuse: bool) -> Result<ImageJson> {
    let line = command_line(cmd);
    let mut ok = out.as_os_str().to_owned();
    ok.push(".ok");
    let ok = PathBuf::from(ok);
    let mut pack_secs = None;
    if reuse && out.is_file() && std::fs::read_to_string(&ok).is_ok_and(|s| s == line) {
        eprintln!("fuse-bench: reusing {}", out.display());
    } else {
        remove_path(&ok);
        remove_path(out);
        eprintln!("fuse-bench: {line}");
        let t0 = Instant::now();
        let st = cmd.status().with_context(|| format!("run {line}"))?;
        if !st.success() {
            bail!("`{line}` failed ({st})");
        }
        pack_secs = Some(t0.elapsed().as_secs_f64());
        nix::unistd::sync();
        std::fs::write(&ok, &line)?;
    }
    Ok(ImageJson {
        path: out.to_path_buf(),
        bytes: std::fs::metadata(out)
            .with_context(|| format!("stat {}", out.display()))?
            .len(),
        command: line,
        pack_secs,
    })
}

// ---------------------------------------------------------------------------------------------
// Measurements and reports

#[derive(Default, Serialize, Clone)]
struct Samples {
    mount_to_first_stat_ms: Vec<f64>,
    cold_walk_secs: Vec<f64>,
    cold_read: Vec<ReadResult>,
    warm_read: Vec<ReadResult>,
    seq_read: Vec<ReadResult>,
    random_4k_iops: Vec<f64>,
    /// Largest VmHWM of the daemon over the mounts of each run, KiB.
    daemon_peak_rss_kib: Vec<u64>,
}

#[derive(Serialize, Clone, Copy, PartialEq)]
#[serde(rename_all = "lowercase")]
enum Better {
    Lower,
    Higher,
}

#[derive(Serialize, Clone)]
struct MetricJson {
    key: &'static str,
    label: &'static str,
    unit: &'static str,
    better: Better,
    /// Median per contender (absent: not measured / not applicable).
    values: Vec<(Contender, Option<f64>)>,
    /// cimg / squashfuse_ll and cimg / kernel of the medians.
    cimg_over_squashfuse: Option<f64>,
    cimg_over_kernel: Option<f64>,
}

#[derive(Serialize, Clone)]
struct GoalJson {
    goal: &'static str,
    /// The measured ratio or value, as the goal states it.
    value: Option<f64>,
    target: f64,
    /// true: value must be ≥ target; false: ≤ target.
    at_least: bool,
    pass: Option<bool>,
    /// Why there is no verdict, if there is none.
    note: Option<String>,
}

#[derive(Serialize)]
struct ContenderJson {
    contender: Contender,
    image: PathBuf,
    mount_command: String,
    walk_command: String,
    random_command: String,
    unmount_command: String,
    samples: Samples,
}

#[derive(Serialize)]
struct CorpusJson {
    name: String,
    path: PathBuf,
    generated: bool,
    tree: TreeStats,
    probe: PathBuf,
    big_file: Option<(PathBuf, u64)>,
    cimg_image: Option<ImageJson>,
    sqfs_image: Option<ImageJson>,
    contenders: Vec<ContenderJson>,
    metrics: Vec<MetricJson>,
    goals: Vec<GoalJson>,
}

#[derive(Serialize)]
struct ReportJson {
    cores: usize,
    kernel: String,
    runs: usize,
    readers: usize,
    rand_secs: u64,
    random_tool: String,
    cache_size: String,
    cache_size_bytes: u64,
    cimg_mount_threads: Option<usize>,
    drop_caches: &'static str,
    corpora: Vec<CorpusJson>,
}

fn median_opt(xs: &[f64]) -> Option<f64> {
    (!xs.is_empty()).then(|| median(xs))
}

fn metrics(samples: &[(Contender, Samples)]) -> Vec<MetricJson> {
    type Get = fn(&Samples) -> Vec<f64>;
    let defs: [(&str, &str, &str, Better, Get); 9] = [
        (
            "mount_to_first_stat",
            "mount to first stat",
            "ms",
            Better::Lower,
            |s| s.mount_to_first_stat_ms.clone(),
        ),
        (
            "cold_walk",
            "cold metadata walk (find)",
            "s",
            Better::Lower,
            |s| s.cold_walk_secs.clone(),
        ),
        (
            "cold_read_time",
            "cold read of every file",
            "s",
            Better::Lower,
            |s| s.cold_read.iter().map(|r| r.secs).collect(),
        ),
        (
            "cold_read_throughput",
            "cold read of every file",
            "MB/s",
            Better::Higher,
            |s| s.cold_read.iter().map(ReadResult::mb_per_s).collect(),
        ),
        (
            "warm_read_time",
            "warm read of every file",
            "s",
            Better::Lower,
            |s| s.warm_read.iter().map(|r| r.secs).collect(),
        ),
        (
            "warm_read_throughput",
            "warm read of every file",
            "MB/s",
            Better::Higher,
            |s| s.warm_read.iter().map(ReadResult::mb_per_s).collect(),
        ),
        (
            "seq_read_big_file",
            "cold sequential read, big file",
            "MB/s",
            Better::Higher,
            |s| s.seq_read.iter().map(ReadResult::mb_per_s).collect(),
        ),
        (
            "random_4k_iops",
            "random 4 KiB reads, big file",
            "IOPS",
            Better::Higher,
            |s| s.random_4k_iops.clone(),
        ),
        (
            "daemon_peak_rss",
            "daemon peak RSS (max of runs)",
            "MiB",
            Better::Lower,
            |s| {
                s.daemon_peak_rss_kib
                    .iter()
                    .max()
                    .map(|&k| vec![k as f64 / 1024.0])
                    .unwrap_or_default()
            },
        ),
    ];
    defs.iter()
        .map(|&(key, label, unit, better, get)| {
            let values: Vec<(Contender, Option<f64>)> = samples
                .iter()
                .map(|(c, s)| (*c, median_opt(&get(s))))
                .collect();
            let of = |c: Contender| values.iter().find(|v| v.0 == c).and_then(|v| v.1);
            let ratio = |o: Contender| match (of(Contender::Cimg), of(o)) {
                (Some(a), Some(b)) if b > 0.0 => Some(a / b),
                _ => None,
            };
            MetricJson {
                key,
                label,
                unit,
                better,
                cimg_over_squashfuse: ratio(Contender::Squashfuse),
                cimg_over_kernel: ratio(Contender::Kernel),
                values: values.clone(),
            }
        })
        .collect()
}

/// A corpus with fewer entries than this has no verdict on the walk goal (too short to time).
const MIN_WALK_ENTRIES: u64 = 1000;

fn goals(m: &[MetricJson], cache_bytes: u64, entries: u64, big_file: bool) -> Vec<GoalJson> {
    let get = |k: &str| m.iter().find(|x| x.key == k);
    let r_sq = |k: &str| get(k).and_then(|x| x.cimg_over_squashfuse);
    let r_k = |k: &str| get(k).and_then(|x| x.cimg_over_kernel);
    let cimg = |k: &str| {
        get(k).and_then(|x| {
            x.values
                .iter()
                .find(|v| v.0 == Contender::Cimg)
                .and_then(|v| v.1)
        })
    };
    let g = |goal, value: Option<f64>, target, at_least| GoalJson {
        goal,
        value,
        target,
        at_least,
        pass: value.map(|v| if at_least { v >= target } else { v <= target }),
        note: value.is_none().then(|| "not measured".to_string()),
    };
    let mut v = vec![
        g(
            "cold full read throughput >= 2x squashfuse_ll (cimg MB/s / squashfuse_ll MB/s)",
            r_sq("cold_read_throughput"),
            2.0,
            true,
        ),
        g(
            "cold full read throughput >= 1.0x kernel squashfs (cimg MB/s / kernel MB/s)",
            r_k("cold_read_throughput"),
            1.0,
            true,
        ),
        g(
            "warm full read time within 1.3x of kernel squashfs (cimg s / kernel s)",
            r_k("warm_read_time"),
            1.3,
            false,
        ),
        g(
            "cold metadata walk >= 3x faster than squashfuse_ll (squashfuse_ll s / cimg s)",
            r_sq("cold_walk").map(|r| 1.0 / r),
            3.0,
            true,
        ),
        g(
            "random 4 KiB IOPS >= 2x squashfuse_ll (cimg IOPS / squashfuse_ll IOPS)",
            r_sq("random_4k_iops"),
            2.0,
            true,
        ),
        g(
            "mount to first stat <= 20 ms (cimg, ms)",
            cimg("mount_to_first_stat"),
            20.0,
            false,
        ),
        g(
            "daemon peak RSS <= cache size + 32 MiB (cimg, MiB)",
            cimg("daemon_peak_rss"),
            (cache_bytes + RSS_SLACK) as f64 / (1 << 20) as f64,
            false,
        ),
    ];
    if !big_file {
        v[4].note = Some(format!(
            "no file of at least {} in this corpus",
            human_bytes(MIN_BIG_FILE)
        ));
    }
    if entries < MIN_WALK_ENTRIES {
        let w = &mut v[3];
        w.pass = None;
        w.note = Some(format!(
            "only {entries} entries (< {MIN_WALK_ENTRIES}): too short a walk for a verdict"
        ));
    }
    v
}

fn fmt_num(v: Option<f64>) -> String {
    match v {
        None => "n/a".into(),
        Some(v) if v.abs() >= 1000.0 => format!("{v:.0}"),
        Some(v) if v.abs() >= 10.0 => format!("{v:.1}"),
        Some(v) if v.abs() >= 0.1 => format!("{v:.2}"),
        Some(v) => format!("{v:.4}"),
    }
}

fn fmt_ratio(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |v| format!("{v:.2}x"))
}

fn format_corpus(c: &CorpusJson, runs: usize, readers: usize) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let t = &c.tree;
    let _ = writeln!(
        s,
        "\n== {} ({}): {} in {} files, {} dirs, {} symlinks; {} run{} (medians), {readers} readers ==",
        c.name,
        c.path.display(),
        human_bytes(t.bytes),
        t.files,
        t.dirs,
        t.symlinks,
        runs,
        if runs == 1 { "" } else { "s" }
    );
    for (what, img) in [("cimg image", &c.cimg_image), ("sqfs image", &c.sqfs_image)] {
        if let Some(i) = img {
            let _ = writeln!(
                s,
                "{what}: {} ({:.2}x){}",
                human_bytes(i.bytes),
                t.bytes as f64 / i.bytes.max(1) as f64,
                i.pack_secs
                    .map_or(String::new(), |p| format!(", packed in {p:.1} s"))
            );
        }
    }
    match &c.big_file {
        Some((p, n)) => {
            let _ = writeln!(s, "big file: {} ({})", p.display(), human_bytes(*n));
        }
        None => {
            let _ = writeln!(
                s,
                "big file: none of at least {} (sequential and random reads not run)",
                human_bytes(MIN_BIG_FILE)
            );
        }
    }
    let cs: Vec<Contender> = c.contenders.iter().map(|x| x.contender).collect();
    let _ = write!(s, "{:<32} {:>5} {:>7}", "metric", "unit", "better");
    for x in &cs {
        let _ = write!(s, " {:>13}", x.name());
    }
    let _ = writeln!(s, " {:>14} {:>12}", "cimg/squashfuse", "cimg/kernel");
    for m in &c.metrics {
        let _ = write!(
            s,
            "{:<32} {:>5} {:>7}",
            m.label,
            m.unit,
            match m.better {
                Better::Lower => "lower",
                Better::Higher => "higher",
            }
        );
        for x in &cs {
            let v = m.values.iter().find(|v| v.0 == *x).and_then(|v| v.1);
            let v = if *x == Contender::Kernel && m.key == "daemon_peak_rss" {
                "n/a (kernel)".to_string()
            } else {
                fmt_num(v)
            };
            let _ = write!(s, " {v:>13}");
        }
        let _ = writeln!(
            s,
            " {:>14} {:>12}",
            fmt_ratio(m.cimg_over_squashfuse),
            fmt_ratio(m.cimg_over_kernel)
        );
    }
    let _ = writeln!(
        s,
        "ratios are cimg's median / the other's: below 1 is better for cimg where lower is better, above 1 where higher is better"
    );
    let _ = writeln!(s, "goals:");
    for g in &c.goals {
        let verdict = match g.pass {
            Some(true) => "PASS".to_string(),
            Some(false) => {
                let v = g.value.unwrap_or(f64::NAN);
                let by = if g.at_least {
                    (g.target / v - 1.0) * 100.0
                } else {
                    (v / g.target - 1.0) * 100.0
                };
                format!("FAIL (off by {by:.0}%)")
            }
            None => "n/a".to_string(),
        };
        let _ = writeln!(
            s,
            "  {verdict:<18} {}: {} (target {} {}){}",
            g.goal,
            fmt_num(g.value),
            if g.at_least { ">=" } else { "<=" },
            fmt_num(Some(g.target)),
            g.note.as_ref().map_or(String::new(), |n| format!(" [{n}]"))
        );
    }
    let _ = writeln!(s, "commands:");
    for i in [&c.cimg_image, &c.sqfs_image].into_iter().flatten() {
        let _ = writeln!(s, "  {}", i.command);
    }
    let _ = writeln!(s, "  cold: {DROP_CACHES}, then mount");
    for x in &c.contenders {
        let _ = writeln!(s, "  {}:", x.contender.name());
        let _ = writeln!(s, "    mount:   {}", x.mount_command);
        let _ = writeln!(s, "    walk:    {}", x.walk_command);
        if c.big_file.is_some() {
            let _ = writeln!(s, "    random:  {}", x.random_command);
        }
        let _ = writeln!(s, "    unmount: {}", x.unmount_command);
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Driver

fn main() -> ExitCode {
    cimg_benches::init();
    if let Some(parent) = std::env::var_os(WATCHDOG_ENV) {
        return watchdog(&parent.to_string_lossy());
    }
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fuse-bench: {e:#}");
            ExitCode::from(1)
        }
    }
}

struct Tools {
    cimg: Option<PathBuf>,
    cimg_mount: Option<PathBuf>,
    squashfuse_ll: Option<PathBuf>,
    mksquashfs: Option<PathBuf>,
    fio: Option<PathBuf>,
}

fn find_tools(args: &Args) -> Result<Tools> {
    if !nix::unistd::geteuid().is_root() {
        bail!("must run as root (it mounts, and drops the page cache)");
    }
    let mut contenders = args.contenders.clone();
    contenders.sort();
    contenders.dedup();
    if contenders.is_empty() {
        bail!("no contenders");
    }
    let want = |c| contenders.contains(&c);
    let sqfs = want(Contender::Squashfuse) || want(Contender::Kernel);
    let mut t = Tools {
        cimg: None,
        cimg_mount: None,
        squashfuse_ll: None,
        mksquashfs: None,
        fio: None,
    };
    if want(Contender::Cimg) {
        t.cimg = Some(cimg_binary(args.cimg.as_deref())?);
        let p = match &args.cimg_mount {
            Some(p) => p.clone(),
            None => std::env::current_exe()
                .context("find own executable")?
                .with_file_name("cimg-mount"),
        };
        t.cimg_mount = Some(find_program(&p).with_context(|| {
            format!(
                "cimg-mount not found at {} (build it with `cargo build --release -p cimg-fuse`, or pass --cimg-mount PATH, or leave cimg out of --contenders)",
                p.display()
            )
        })?);
    }
    if sqfs {
        t.mksquashfs = Some(find_program(&args.mksquashfs).with_context(|| {
            format!(
                "{} not found (apt-get install squashfs-tools, or pass --mksquashfs PATH)",
                args.mksquashfs.display()
            )
        })?);
    }
    if want(Contender::Squashfuse) {
        t.squashfuse_ll = Some(find_program(&args.squashfuse_ll).with_context(|| {
            format!(
                "{} not found (apt-get install squashfuse, or pass --squashfuse-ll PATH, or leave squashfuse out of --contenders)",
                args.squashfuse_ll.display()
            )
        })?);
    }
    if want(Contender::Kernel)
        && !std::fs::read_to_string("/proc/filesystems")
            .unwrap_or_default()
            .lines()
            .any(|l| l.trim_end().ends_with("squashfs"))
    {
        eprintln!(
            "fuse-bench: warning: squashfs is not in /proc/filesystems; the kernel mount may fail"
        );
    }
    if !args.no_fio {
        t.fio = find_program(&args.fio);
        if t.fio.is_none() {
            eprintln!(
                "fuse-bench: {} not found (apt-get install fio): random reads use the in-process pread loop",
                args.fio.display()
            );
        }
    }
    Ok(t)
}

fn run(args: Args) -> Result<()> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if args.readers == 0 {
        bail!("--readers must be at least 1");
    }
    let cache_bytes = parse_size(&args.cache_size)
        .map_err(|e| anyhow::anyhow!("--cache-size {}: {e}", args.cache_size))?;
    let tools = find_tools(&args)?;
    let mut contenders = vec![];
    for c in &args.contenders {
        if !contenders.contains(c) {
            contenders.push(*c);
        }
    }

    // Work directory.
    let _tmp;
    let work = match (&args.work_dir, args.keep) {
        (Some(d), _) => d.clone(),
        (None, true) => PathBuf::from("/var/tmp/fuse-bench"),
        (None, false) => {
            let t = tempfile::Builder::new()
                .prefix("fuse-bench.")
                .tempdir()
                .context("create temporary directory")?;
            let p = t.path().to_path_buf();
            _tmp = t;
            p
        }
    };
    std::fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;
    let work = work
        .canonicalize()
        .with_context(|| format!("resolve {}", work.display()))?;
    let mnt = work.join("mnt");
    sweep_mounts(&mnt);
    let items: Vec<PathBuf> = if args.keep {
        vec![]
    } else {
        WORK_ITEMS.iter().map(|i| work.join(i)).collect()
    };
    for p in &items {
        remove_path(p);
    }
    let remove_when_killed = if args.work_dir.is_none() && !args.keep {
        vec![work.clone()]
    } else {
        items.clone()
    };
    // Dropped last: stopped once this process has cleaned up by itself.
    let _watchdog = start_watchdog(&mnt, &remove_when_killed)?;
    // Removes what we made, at the end (not with --keep); the watchdog does it when killed.
    struct Cleanup(Vec<PathBuf>, PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            sweep_mounts(&self.1);
            if mounts_under(&self.1).is_empty() {
                for p in &self.0 {
                    remove_path(p);
                }
            }
        }
    }
    let cleanup = Cleanup(items, mnt.clone());
    let images = work.join("images");
    std::fs::create_dir_all(&images)?;

    // Corpora.
    let mut corpora = vec![];
    if !args.no_host {
        for c in &args.corpora {
            if !c.is_dir() {
                bail!("corpus {} is not a directory", c.display());
            }
            let path = c
                .canonicalize()
                .with_context(|| format!("resolve {}", c.display()))?;
            corpora.push(Corpus {
                name: path.display().to_string(),
                path,
                generated: false,
            });
        }
    }
    if !args.no_small_files {
        let dir = work.join("small-files");
        let (n, seed) = (args.small_files, args.seed);
        ensure_generated(
            &dir,
            &work.join("small-files.stamp"),
            &format!("fuse-bench small files v{GEN_VERSION} seed={seed} count={n}\n"),
            &format!("{n} small files"),
            |d| generate_small_files(d, n, seed),
        )?;
        corpora.push(Corpus {
            name: format!("generated: {n} small files"),
            path: dir,
            generated: true,
        });
    }
    if !args.no_big_file {
        let dir = work.join("big-file");
        let (size, seed) = (args.big_file_size, args.seed);
        ensure_generated(
            &dir,
            &work.join("big-file.stamp"),
            &format!("fuse-bench big file v{GEN_VERSION} seed={seed} size={size}\n"),
            &format!("a {} file", human_bytes(size)),
            |d| generate_big_file(&d.join("big.dat"), size, seed),
        )?;
        corpora.push(Corpus {
            name: format!("generated: one {} file", human_bytes(size)),
            path: dir,
            generated: true,
        });
    }
    if corpora.is_empty() {
        bail!("no corpora (all of --no-host, --no-small-files, --no-big-file)");
    }

    let random_tool = match &tools.fio {
        Some(f) => format!("fio ({})", f.display()),
        None => "in-process pread loop (4 threads)".into(),
    };
    let mut report = ReportJson {
        cores: cores(),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        runs: args.runs,
        readers: args.readers,
        rand_secs: args.rand_secs,
        random_tool,
        cache_size: args.cache_size.clone(),
        cache_size_bytes: cache_bytes,
        cimg_mount_threads: args.threads,
        drop_caches: DROP_CACHES,
        corpora: vec![],
    };
    let mut all_goals: Vec<(String, GoalJson)> = vec![];
    for corpus in &corpora {
        let cj = bench_corpus(
            &args,
            &tools,
            &contenders,
            corpus,
            &images,
            &mnt,
            cache_bytes,
        )?;
        print!("{}", format_corpus(&cj, args.runs, args.readers));
        for g in &cj.goals {
            all_goals.push((cj.name.clone(), g.clone()));
        }
        report.corpora.push(cj);
    }
    if report.corpora.len() > 1 {
        println!("\n== goals, all corpora ==");
        for (name, g) in &all_goals {
            let v = match g.pass {
                Some(true) => "PASS",
                Some(false) => "FAIL",
                None => "n/a",
            };
            println!("  {v:<4} {name}: {}: {}", g.goal, fmt_num(g.value));
        }
    }
    if let Some(path) = &args.json {
        let j = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, j + "\n").with_context(|| format!("write {}", path.display()))?;
        eprintln!("fuse-bench: wrote {}", path.display());
    }
    if sweep_mounts(&mnt) > 0 {
        eprintln!("fuse-bench: warning: some mounts were left behind and have been unmounted");
    }
    if args.keep {
        eprintln!("fuse-bench: corpora and images kept in {}", work.display());
    }
    drop(cleanup);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn bench_corpus(
    args: &Args,
    tools: &Tools,
    contenders: &[Contender],
    corpus: &Corpus,
    images: &Path,
    mnt: &Path,
    cache_bytes: u64,
) -> Result<CorpusJson> {
    let tag = if corpus.generated {
        corpus
            .path
            .file_name()
            .map_or("gen".into(), |n| format!("gen-{}", n.to_string_lossy()))
    } else {
        slug(&corpus.path)
    };
    let tree = read_tree(&corpus.path, false);
    eprintln!(
        "fuse-bench: corpus {}: {} in {} files, {} dirs",
        corpus.name,
        human_bytes(tree.bytes),
        tree.files,
        tree.dirs
    );
    let mut top: Vec<OsString> = std::fs::read_dir(&corpus.path)
        .with_context(|| format!("read {}", corpus.path.display()))?
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect();
    top.sort();
    let probe = PathBuf::from(
        top.first()
            .with_context(|| format!("corpus {} is empty", corpus.path.display()))?,
    );
    let big_file = largest_file(&corpus.path)
        .filter(|b| b.1 >= MIN_BIG_FILE)
        .map(|(p, n)| (p.strip_prefix(&corpus.path).unwrap_or(&p).to_path_buf(), n));

    // Images.
    let reuse = args.keep && !args.repack;
    let cimg_image = match &tools.cimg {
        Some(cimg) => {
            let out = images.join(format!("{tag}.cimg"));
            let mut cmd = Command::new(cimg);
            cmd.arg("pack").arg(&corpus.path).arg(&out).arg("-q");
            Some(ensure_image(&out, &mut cmd, reuse)?)
        }
        None => None,
    };
    let sqfs_image = match &tools.mksquashfs {
        Some(mk) => {
            let out = images.join(format!("{tag}.sqfs"));
            let mut cmd = Command::new(mk);
            cmd.arg(&corpus.path).arg(&out).args([
                "-comp",
                "zstd",
                "-b",
                "128K",
                "-noappend",
                "-quiet",
                "-no-progress",
            ]);
            Some(ensure_image(&out, &mut cmd, reuse)?)
        }
        None => None,
    };

    // Mount setups.
    let mut setups = vec![];
    for &c in contenders {
        let dir = mnt.join(c.name());
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let (image, cmd, daemon) = match c {
            Contender::Cimg => {
                let img = cimg_image.as_ref().context("no cimg image")?.path.clone();
                let bin = tools.cimg_mount.clone().context("no cimg-mount")?;
                let mut v: Vec<OsString> = vec![
                    bin.clone().into(),
                    img.clone().into(),
                    dir.clone().into(),
                    "--cache-size".into(),
                    args.cache_size.clone().into(),
                ];
                if let Some(t) = args.threads {
                    v.push("--threads".into());
                    v.push(t.to_string().into());
                }
                (img, v, bin.file_name().map(OsStr::to_owned))
            }
            Contender::Squashfuse => {
                let img = sqfs_image.as_ref().context("no sqfs image")?.path.clone();
                let bin = tools.squashfuse_ll.clone().context("no squashfuse_ll")?;
                let v: Vec<OsString> =
                    vec![bin.clone().into(), img.clone().into(), dir.clone().into()];
                (img, v, bin.file_name().map(OsStr::to_owned))
            }
            Contender::Kernel => {
                let img = sqfs_image.as_ref().context("no sqfs image")?.path.clone();
                let v: Vec<OsString> = vec![
                    "mount".into(),
                    "-t".into(),
                    "squashfs".into(),
                    "-o".into(),
                    "loop,ro".into(),
                    img.clone().into(),
                    dir.clone().into(),
                ];
                (img, v, None)
            }
        };
        setups.push(Setup {
            contender: c,
            image,
            dir,
            cmd,
            daemon,
        });
    }

    let mut samples: Vec<(Contender, Samples)> = contenders
        .iter()
        .map(|&c| (c, Samples::default()))
        .collect();
    let mut checked = vec![false; setups.len()];
    let n = setups.len();
    for r in 0..args.runs {
        for k in 0..n {
            let i = (k + r) % n;
            let s = &setups[i];
            let name = s.contender.name();
            let probe_path = s.dir.join(&probe);
            let mut peak: Option<u64> = None;
            let mut note = |h: Option<u64>| {
                if let Some(h) = h {
                    peak = Some(peak.map_or(h, |p| p.max(h)));
                }
            };
            let smp = &mut samples[i].1;

            // Mount to first stat: image not in the page cache, tools warm. The cold
            // measurements of the previous contender dropped every cache, the tool's binary
            // and libraries with them: an untimed mount and unmount reads them in again.
            let (m, _) = mount(s, &probe_path)?;
            note(m.unmount()?);
            nix::unistd::sync();
            evict_file(&s.image)?;
            let (m, t) = mount(s, &probe_path)?;
            note(m.unmount()?);
            let mount_ms = t.as_secs_f64() * 1e3;
            smp.mount_to_first_stat_ms.push(mount_ms);

            // Cold metadata walk.
            drop_caches()?;
            let (m, _) = mount(s, &probe_path)?;
            let mut find = Command::new("find");
            find.arg(&s.dir).args(["-printf", "%s\\n"]);
            find.stdout(Stdio::null());
            let t0 = Instant::now();
            let st = find
                .status()
                .with_context(|| format!("run {}", command_line(&find)))?;
            let walk = t0.elapsed().as_secs_f64();
            if !st.success() {
                bail!("`{}` failed ({st})", command_line(&find));
            }
            note(m.unmount()?);
            smp.cold_walk_secs.push(walk);

            // Cold, then warm, read of every file.
            drop_caches()?;
            let (m, _) = mount(s, &probe_path)?;
            let cold = read_everything(&s.dir, args.readers)?;
            let warm = read_everything(&s.dir, args.readers)?;
            note(m.unmount()?);
            if !checked[i] {
                checked[i] = true;
                if cold.files != tree.files || cold.bytes != tree.bytes || cold.errors > 0 {
                    eprintln!(
                        "fuse-bench: warning: {name} read {} files, {} B, {} errors; the corpus has {} files, {} B",
                        cold.files, cold.bytes, cold.errors, tree.files, tree.bytes
                    );
                }
            }
            smp.cold_read.push(cold);
            smp.warm_read.push(warm);

            let mut line = format!(
                "run {}/{} {name}: mount {mount_ms:.1} ms, walk {walk:.2} s, cold read {:.2} s ({:.0} MB/s), warm read {:.2} s ({:.0} MB/s)",
                r + 1,
                args.runs,
                cold.secs,
                cold.mb_per_s(),
                warm.secs,
                warm.mb_per_s()
            );

            if let Some((big, _)) = &big_file {
                let file = s.dir.join(big);
                drop_caches()?;
                let (m, _) = mount(s, &probe_path)?;
                let seq = read_sequential(&file)?;
                note(m.unmount()?);
                smp.seq_read.push(seq);

                drop_caches()?;
                let (m, _) = mount(s, &probe_path)?;
                let fio_ok = file.as_os_str().as_bytes().iter().all(|&b| b != b':');
                let iops = match (&tools.fio, fio_ok) {
                    (Some(fio), true) => random_fio(fio, &file, args.rand_secs)?,
                    _ => random_pread(&file, args.rand_secs, args.seed)?,
                };
                note(m.unmount()?);
                smp.random_4k_iops.push(iops);
                line += &format!(", seq {:.0} MB/s, random 4K {iops:.0} IOPS", seq.mb_per_s());
            }
            if let Some(p) = peak {
                smp.daemon_peak_rss_kib.push(p);
                line += &format!(", peak RSS {}", human_bytes(p * 1024));
            }
            eprintln!("fuse-bench: [{tag}] {line}");
        }
    }

    let metrics = metrics(&samples);
    let goals = goals(
        &metrics,
        cache_bytes,
        tree.files + tree.dirs + tree.symlinks + tree.other,
        big_file.is_some(),
    );
    let contenders_json = setups
        .iter()
        .zip(samples)
        .map(|(s, (_, smp))| {
            let mut find = Command::new("find");
            find.arg(&s.dir).args(["-printf", "%s\\n"]);
            let random = match (&big_file, &tools.fio) {
                (Some((big, _)), Some(fio)) => {
                    command_line(&fio_command(fio, &s.dir.join(big), args.rand_secs))
                }
                (Some((big, _)), None) => format!(
                    "(in process) 4 threads x pread of 4 KiB at random 4 KiB-aligned offsets of {} for {} s",
                    s.dir.join(big).display(),
                    args.rand_secs
                ),
                (None, _) => String::new(),
            };
            ContenderJson {
                contender: s.contender,
                image: s.image.clone(),
                mount_command: command_line(&s.command()),
                walk_command: format!("{} > /dev/null", command_line(&find)),
                random_command: random,
                unmount_command: format!("umount {}", s.dir.display()),
                samples: smp,
            }
        })
        .collect();
    Ok(CorpusJson {
        name: corpus.name.clone(),
        path: corpus.path.clone(),
        generated: corpus.generated,
        tree,
        probe,
        big_file,
        cimg_image,
        sqfs_image,
        contenders: contenders_json,
        metrics,
        goals,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(
            unescape_mountinfo(r"/tmp/a\040b\134c"),
            PathBuf::from("/tmp/a b\\c")
        );
        assert_eq!(unescape_mountinfo(r"/x\04"), PathBuf::from(r"/x\04"));
    }

    #[test]
    fn ratios_and_goals() {
        let c = Samples {
            cold_walk_secs: vec![1.0, 3.0, 2.0],
            random_4k_iops: vec![3000.0],
            mount_to_first_stat_ms: vec![25.0],
            daemon_peak_rss_kib: vec![100 * 1024, 300 * 1024],
            ..Default::default()
        };
        let q = Samples {
            cold_walk_secs: vec![8.0],
            random_4k_iops: vec![1000.0],
            daemon_peak_rss_kib: vec![1024],
            ..Default::default()
        };
        let m = metrics(&[(Contender::Cimg, c), (Contender::Squashfuse, q)]);
        let walk = m.iter().find(|x| x.key == "cold_walk").unwrap();
        assert_eq!(walk.cimg_over_squashfuse, Some(0.25));
        assert_eq!(walk.cimg_over_kernel, None);
        let rss = m.iter().find(|x| x.key == "daemon_peak_rss").unwrap();
        assert_eq!(rss.values[0].1, Some(300.0));
        let g = goals(&m, 256 << 20, 5000, true);
        assert_eq!(g[3].value, Some(4.0));
        assert_eq!(g[3].pass, Some(true));
        assert_eq!(g[4].pass, Some(true));
        assert_eq!(g[5].pass, Some(false));
        assert_eq!(g[6].pass, Some(false));
        assert_eq!(g[0].pass, None);
        let g = goals(&m, 256 << 20, 10, false);
        assert!(g[4].note.as_deref().unwrap().starts_with("no file"));
        assert_eq!(g[3].pass, None);
    }
}
