//! `cimg-mount IMG DIR [--foreground] [--threads N] [--workers N] [--cache-size S] [--log FILE]
//! [--record-hot FILE] [--read-ahead-kb KIB]`: mount a `.cimg` image read-only on DIR.
//!
//! By default it returns once the mount answers, so a script can use DIR on the next line:
//! it starts itself with `--foreground` as a child in a new session (setsid), which says on a
//! pipe when DIR is mounted, and returns after one stat of DIR has been answered (or the child
//! fails, whose message it passes on). The server stops
//! when DIR is unmounted (`umount DIR`, `fusermount3 -u DIR`) or on SIGTERM/SIGINT/SIGHUP, on
//! which it unmounts DIR itself. Errors are one line, `cimg-mount: what: why`, exit status 1.

use anyhow::{Context, bail};
use cimg_fuse::MountOptions;
use clap::Parser;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{ChildStdout, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// How long the default mode waits for the server to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Parser, Debug)]
#[command(
    name = "cimg-mount",
    version,
    about = "Mount a .cimg image read-only with FUSE"
)]
struct Args {
    /// The image file.
    image: PathBuf,
    /// The directory to mount on.
    dir: PathBuf,
    /// Serve in this process until unmounted instead of returning once mounted.
    #[arg(long)]
    foreground: bool,
    /// FUSE event loops, each on its own /dev/fuse fd (default: cores, at most 16).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Threads that load blocks (read, verify, decompress) and prefetch (default: twice the
    /// cores, 4 to 16: they also wait for the disk; 0 loads in the event loops and does not
    /// prefetch).
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// Decompressed-block cache size, e.g. 512M (default 256M).
    #[arg(long, value_name = "S", value_parser = cimg_format::units::parse_size)]
    cache_size: Option<u64>,
    /// Where a background server writes its log lines (default: nowhere once mounted).
    #[arg(long, value_name = "FILE")]
    log: Option<PathBuf>,
    /// Kernel read-ahead of the mount in KiB (0: the kernel's default, 128 KiB). Needs root
    /// (it is the mount's `/sys/class/bdi/*/read_ahead_kb`); otherwise the default stays.
    #[arg(long, value_name = "KIB", default_value_t = cimg_fuse::DEFAULT_READ_AHEAD_KB)]
    read_ahead_kb: u32,
    /// Record the order in which files are first read, written to FILE at unmount in the
    /// form `cimg pack --hot` reads.
    #[arg(long, value_name = "FILE")]
    record_hot: Option<PathBuf>,
    /// Set by the default mode on the server it starts: begin a new session (setsid), away
    /// from the caller's terminal and its hangups.
    #[arg(long, hide = true)]
    detached: bool,
    /// Set by the default mode on the server it starts when it has the image open already:
    /// the image is this process's standard input (one open of it, not two).
    #[arg(long, hide = true)]
    image_on_stdin: bool,
}

fn options(a: &Args) -> MountOptions {
    let mut o = MountOptions::default();
    if let Some(t) = a.threads {
        o.threads = t.max(1);
    }
    if let Some(c) = a.cache_size {
        o.fs.cache_size = c;
    }
    // Twice the cores: a worker waiting for the image's bytes leaves its core to another, so
    // a cold read keeps every core decompressing (`fuse-bench`; figures in docs/perf.md).
    let cores = cimg_fuse::cores();
    o.fs.workers = a.workers.unwrap_or((2 * cores).clamp(4, 16));
    o.fs.record_hot = a.record_hot.clone();
    o
}

fn foreground(a: &Args) -> anyhow::Result<()> {
    // Block the stop signals in every thread (they inherit the mask); one thread waits for them.
    let mut sigs = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        sigs.add(s);
    }
    sigs.thread_block().context("blocking signals")?;
    if a.detached {
        nix::unistd::setsid().context("setsid")?;
    }
    // Resolved now: once mounted, resolving DIR would ask the server, which does not serve yet.
    let resolved = std::fs::canonicalize(&a.dir);
    let mut server = if a.image_on_stdin {
        let file: std::fs::File = std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .context("the image on standard input")?
            .into();
        cimg_format::reader::check_regular(&file, &a.image, false)?;
        // Standard input is the image no more: /dev/null, as for any background server.
        let null = std::fs::File::open("/dev/null").context("/dev/null")?;
        nix::unistd::dup2_stdin(&null).context("standard input")?;
        cimg_fuse::mount_file(file, &a.image, &a.dir, &options(a))?
    } else {
        // Not `cimg_fuse::mount`'s plain open, which would wait forever on a FIFO.
        let file = cimg_format::reader::open_regular(&a.image, false)?;
        cimg_fuse::mount_file(file, &a.image, &a.dir, &options(a))?
    };
    if a.read_ahead_kb > 0 && nix::unistd::geteuid().is_root() {
        // Before serving, so that it is in place when the mount answers. Best effort.
        let set = resolved
            .and_then(|d| cimg_fuse::mounted_device(&d))
            .and_then(|dev| cimg_fuse::set_read_ahead_kb(dev, a.read_ahead_kb));
        if let Err(e) = set {
            cimg_fuse::log(format_args!("{}: read-ahead: {e}", a.dir.display()));
        }
    }
    if a.detached {
        // Tell the waiting parent (see `background`). Nothing else is written to stdout.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{READY_LINE}").and_then(|()| out.flush());
    }
    let mut unmounter = server.unmounter();
    let dir = a.dir.clone();
    std::thread::Builder::new()
        .name("cimg-signals".into())
        .spawn(move || {
            if let Ok(sig) = sigs.wait() {
                cimg_fuse::log(format_args!("{}: unmounting on {sig}", dir.display()));
                if let Err(e) = unmounter.unmount() {
                    // Busy: detach it lazily; the server answers the files still open and
                    // stops when the last one is closed.
                    cimg_fuse::log(format_args!(
                        "{}: unmount: {e}; detaching lazily",
                        dir.display()
                    ));
                    lazy_unmount(&dir);
                }
            }
        })
        .context("starting the signal thread")?;
    server.run()?;
    Ok(())
}

/// `umount -l`, or `fusermount3 -u -z` without the privilege for it.
fn lazy_unmount(dir: &Path) {
    let r = nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH);
    if r.is_ok() {
        return;
    }
    let ok = Command::new("fusermount3")
        .arg("-u")
        .arg("-z")
        .arg(dir)
        .stdin(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        cimg_fuse::log(format_args!(
            "{}: lazy unmount failed too; unmount it by hand",
            dir.display()
        ));
    }
}

fn background(a: &Args) -> anyhow::Result<()> {
    let image =
        std::fs::canonicalize(&a.image).with_context(|| format!("{}", a.image.display()))?;
    let dir = std::fs::canonicalize(&a.dir).with_context(|| format!("{}", a.dir.display()))?;
    if !dir.is_dir() {
        bail!("{}: not a directory", dir.display());
    }
    // The child's start overlaps the first read of the image's metadata (cold, milliseconds,
    // more on a parallel filesystem: `fuse-bench`'s mount time, docs/perf.md); the child gets
    // this open file as its standard input instead of opening the image again. It reports any
    // error in the image; what does not open, or is not a regular file (a FIFO would block a
    // plain open), is refused here.
    let opened = cimg_format::reader::open_regular(&image, false)?;
    let _ = cimg_format::advise_metadata(&opened);
    let exe = std::env::current_exe().context("finding this executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg(&image)
        .arg(&dir)
        .arg("--foreground")
        .arg("--detached");
    if let Some(t) = a.threads {
        cmd.arg("--threads").arg(t.to_string());
    }
    if let Some(c) = a.cache_size {
        cmd.arg("--cache-size").arg(c.to_string());
    }
    if let Some(w) = a.workers {
        cmd.arg("--workers").arg(w.to_string());
    }
    cmd.arg("--read-ahead-kb").arg(a.read_ahead_kb.to_string());
    if let Some(f) = &a.record_hot {
        let f = std::path::absolute(f).with_context(|| format!("{}", f.display()))?;
        cmd.arg("--record-hot").arg(f);
    }
    let stderr = match &a.log {
        // Appended to, created 0600; a symlink or anything but a regular file is refused.
        Some(f) => Stdio::from(cimg_format::output::open_log(f)?),
        None => Stdio::piped(),
    };
    cmd.arg("--image-on-stdin");
    let stdin = Stdio::from(opened);
    // The child says on its stdout when DIR is mounted; its end of file before that means
    // it failed (its stderr says why).
    cmd.stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .current_dir("/");
    let mut child = cmd.spawn().context("starting the server")?;
    let mounted = child
        .stdout
        .take()
        .map(|out| wait_for_line(out, READY_TIMEOUT))
        .transpose()
        .context("waiting for the server")?
        .flatten();
    match mounted.as_deref() {
        Some(READY_LINE) => {
            // Mounted; the first request waits for the server's answer to the kernel's INIT,
            // so that DIR answers when we return.
            std::fs::metadata(&dir).with_context(|| format!("{}", dir.display()))?;
            Ok(())
        }
        Some(_) => {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{}: the server did not answer within {} s",
                dir.display(),
                READY_TIMEOUT.as_secs()
            );
        }
        None => {
            let status = child.wait().context("waiting for the server")?;
            let mut msg = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut msg);
            }
            if msg.trim().is_empty() {
                bail!(
                    "{}: the server exited before mounting ({status})",
                    dir.display()
                );
            }
            // The server already said why, in our format.
            eprint!("{msg}");
            std::process::exit(1);
        }
    }
}

/// What the detached server writes to its stdout once DIR is mounted.
const READY_LINE: &str = "mounted";

/// The first line of `out` (`None` at end of file before one), or an empty line if none came
/// within `timeout`.
fn wait_for_line(out: ChildStdout, timeout: Duration) -> std::io::Result<Option<String>> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut out = out;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms =
            PollTimeout::try_from(left.as_millis().min(60_000) as i32).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(out.as_fd(), PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, ms) {
            Ok(0) if left.is_zero() => return Ok(Some(String::new())),
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
        let mut buf = [0u8; 64];
        let n = match out.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok(None);
        }
        got.extend_from_slice(&buf[..n]);
        if let Some(end) = got.iter().position(|&b| b == b'\n') {
            return Ok(Some(String::from_utf8_lossy(&got[..end]).into_owned()));
        }
    }
}

fn main() -> ExitCode {
    cimg_fuse::set_log_prefix("cimg-mount");
    let args = Args::parse();
    let r = if args.foreground {
        foreground(&args)
    } else {
        background(&args)
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            cimg_fuse::log(format_args!("{e:#}"));
            ExitCode::FAILURE
        }
    }
}
