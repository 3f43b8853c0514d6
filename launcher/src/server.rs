//! A private mount's FUSE server (`--private`, `--record-hot`): its process, its start-up
//! with launch ([`Startup`] over two pipes), the guard launch holds on it while the
//! container is being set up ([`StartingServer`]), and its read-ahead helper.
//!
//! ```text
//! launch (supervisor)   user ns U, mount ns B: builds the root on a staging tmpfs over /tmp,
//!  │                    then pivot_root's into it (the host's root is detached)
//!  ├─ FUSE server       ns U, its own mount ns C (a copy made before anything was mounted,
//!  │   │                so without the image's mount); its own session
//!  │   └─ cimg-warm     reads the command's files and the hot files ahead into the page
//!  │                    cache through launch's descriptor of the mount (its reads wait
//!  │                    behind the container's in the server), then exits
//!  └─ app (exec'd CMD)  forked by launch inside the container (ns U, B)
//! ```
//!
//! The FUSE mount exists only in B. When the last process of the container has left it (the
//! app, whatever it started, launch itself, joined peers), the kernel drops the mount, aborts
//! the FUSE connection, and the server's read of `/dev/fuse` ends: the server exits. So the
//! filesystem lives exactly as long as any container process, and SIGKILL of any part leaves
//! nothing behind. (The server also holds a reference to B until launch has exited, so that
//! B's end, the FUSE unmount with the eviction of the image's inodes, runs in the server
//! after launch's parent has its status rather than inside launch's exit; it lets go as soon
//! as launch is gone, however launch ended.) The server has `PR_SET_PDEATHSIG(SIGKILL)`
//! until its handshake is done (launch killed during setup → server killed), and keeps
//! launch's stderr only while launch lives (then /dev/null), so a caller reading launch's
//! output is not held open by it.

use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{Pid, getppid, pipe2, setsid};

use crate::enter;
use crate::error::{Error, errno_msg};
use crate::join;
use crate::protocol::{self, Startup};
use crate::sys::{Forked, fork};

/// The FUSE server while launch sets the container up. Dropped before it serves (any
/// set-up failure), it is killed and reaped; and it tells a set-up failure caused by its
/// death (SIGKILL, OOM) from any other, so that whichever call saw the death first (the
/// mount, a bind, the exec of the command through a dead mount) the launch ends with the
/// documented status of a dead server ([`exit::OTHER`](crate::error::exit::OTHER)), not
/// with that call's own.
pub struct StartingServer {
    pid: Pid,
    /// Already waited for (its pid may belong to another process now).
    reaped: bool,
}

impl StartingServer {
    pub fn new(pid: Pid) -> StartingServer {
        StartingServer { pid, reaped: false }
    }

    /// Wait for the server to say `what` (it has left the mount namespace, or finished its
    /// handshake); end of file means it failed (it printed why) or was killed.
    pub fn wait_for(&mut self, fd: &OwnedFd, what: Startup) -> Result<(), Error> {
        if protocol::read_line::<Startup>(fd.as_fd()).is_some_and(|m| m == what) {
            return Ok(());
        }
        // End of file: the server is exiting, killed or on its own.
        let e = Error::fuse("the FUSE server failed to start".into());
        let how = self.ended_within(std::time::Duration::from_millis(500));
        Err(match how {
            Some(how) if how.starts_with("signal") => Error::other(format!(
                "the FUSE server ended ({how}) while the container was being set up"
            )),
            _ => e,
        })
    }

    /// How the server ended, if it has (waiting at most `wait` for it to).
    fn ended_within(&mut self, wait: std::time::Duration) -> Option<String> {
        if self.reaped {
            return Some("gone".into());
        }
        let how = exited_within(self.pid, wait)?;
        self.reaped = true;
        Some(how)
    }

    /// `e`, or the server's death if that is what caused it: a death shows at once as an
    /// aborted connection of the mount ([`connection_gone`]), its exit status a moment
    /// later. Costs nothing when the server is alive (a genuine failure).
    pub fn judge(&mut self, e: Error, fuse_root: Option<&OwnedFd>) -> Error {
        let gone = fuse_root.is_some_and(connection_gone);
        let wait = if gone {
            std::time::Duration::from_millis(500)
        } else {
            std::time::Duration::ZERO
        };
        match self.ended_within(wait) {
            Some(how) if how.starts_with("signal") || gone => Error::other(format!(
                "the FUSE server ended ({how}) while the container was being set up"
            )),
            None if gone => Error::other(
                "the FUSE connection broke while the container was being set up".into(),
            ),
            _ => e,
        }
    }

    /// Set-up is done: the server serves, and the supervisor watches it from now on.
    pub fn serving(mut self) -> Pid {
        self.reaped = true; // not killed on drop: it is no longer ours to end
        self.pid
    }
}

impl Drop for StartingServer {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = kill(self.pid, Signal::SIGKILL);
            let _ = waitpid(self.pid, None);
        }
    }
}

/// The FUSE server's process: leave the mount namespace, do the handshake, serve (and, for
/// a group, answer joiners).
#[allow(clippy::too_many_arguments)]
pub fn server_main(
    img: cimg_format::Image,
    fuse: OwnedFd,
    (go, ready): (OwnedFd, OwnedFd),
    parent: Pid,
    mask: &SigSet,
    name: &Path,
    opts: &cimg_fuse::MountOptions,
    group: Option<(OwnedFd, u32, PathBuf, Vec<u8>)>,
) -> ! {
    let res = (|| -> Result<(), String> {
        let _ = setsid();
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(|e| errno_msg("pdeathsig", e))?;
        if getppid() != parent {
            return Err("launch exited".into());
        }
        // SIGUSR1 stays blocked in every thread: it is read from a signalfd (below).
        let mut mask = *mask;
        mask.add(Signal::SIGUSR1);
        sigprocmask(SigmaskHow::SIG_SETMASK, Some(&mask), None)
            .map_err(|e| errno_msg("sigprocmask", e))?;
        enter::detach_stdio(false);
        // Launch's mount namespace, the container's, held until launch has exited: the
        // namespace's end (the FUSE unmount, and the eviction of every inode and dentry the
        // kernel holds of the image) then happens here, after launch's parent has its exit
        // status, instead of inside launch's exit where the parent waits for it. Dropped
        // when launch is gone (the stderr guard, below), so the container still ends with
        // its last process; if this process dies, the kernel drops it.
        let container_ns = fs::File::open("/proc/self/ns/mnt").ok();
        unshare(CloneFlags::CLONE_NEWNS).map_err(|e| errno_msg("unshare", e))?;
        protocol::write_line(ready.as_fd(), &Startup::Left).map_err(|e| errno_msg("pipe", e))?;
        // The command's files and the hot files are read ahead into the page cache by a
        // process of their own (`cimg_fuse::warm` says why not by this one), forked while
        // this one is single-threaded, when a core is to spare, and while launch mounts (not
        // between the mount and the kernel's INIT, which launch waits for). The mount lives
        // in launch's mount namespace, not in this one: the helper reaches it through
        // launch's descriptor of its root, whose number it is sent once launch has it.
        let mut helper = None;
        if (opts.fs.exec.is_some() || img.summary().hot_blocks > 0) && !cimg_fuse::fs::cpu_busy() {
            let me = Pid::this();
            let (fd_r, fd_w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| errno_msg("pipe", e))?;
            match fork() {
                Ok(Forked::Child) => {
                    drop((fuse, ready, go, group, fd_w, container_ns));
                    warm_main(&img, &fd_r, parent, opts, me);
                }
                Ok(Forked::Parent(pid)) => helper = Some((pid, fd_r, fd_w)),
                Err(_) => {}
            }
        }
        // Launch has mounted; with the number of its descriptor of the mount's root.
        let root_fd = match protocol::read_line::<Startup>(go.as_fd()) {
            Some(Startup::Go { root_fd }) => root_fd,
            _ => return Err("launch did not mount the filesystem".into()),
        };
        drop(go);
        // The helper learns the descriptor (or, without one, sees end of file and exits);
        // its reads wait behind everyone else's.
        let mut opts = opts.clone();
        let helper = helper.map(|(pid, fd_r, fd_w)| {
            drop(fd_r);
            if let Some(fd) = root_fd {
                let _ = nix::unistd::write(&fd_w, fd.to_string().as_bytes());
            }
            opts.fs.background_pid = u32::try_from(pid.as_raw()).ok();
            pid
        });
        let server = cimg_fuse::attach_fd(img, fuse, name, &opts).map_err(|e| e.to_string())?;
        // From now on the server outlives launch as long as the container lives, but it must
        // not keep launch's stderr open (a caller reading it would wait for the container's
        // last daemon): when launch exits, SIGUSR1 arrives and stderr becomes /dev/null.
        let usr1 = SigSet::from(Signal::SIGUSR1);
        let sfd = SignalFd::with_flags(&usr1, SfdFlags::SFD_CLOEXEC)
            .map_err(|e| errno_msg("signalfd", e))?;
        nix::sys::prctl::set_pdeathsig(Signal::SIGUSR1).map_err(|e| errno_msg("pdeathsig", e))?;
        std::thread::Builder::new()
            .name("stderr-guard".into())
            .spawn(move || {
                if getppid() == parent {
                    let _ = sfd.read_signal();
                }
                if let Ok(null) = fs::OpenOptions::new().write(true).open("/dev/null") {
                    let _ = nix::unistd::dup2_stderr(&null);
                }
                drop(container_ns);
            })
            .map_err(|e| e.to_string())?;
        protocol::write_line(ready.as_fd(), &Startup::Ready).map_err(|e| errno_msg("pipe", e))?;
        drop(ready);
        if let Some(pid) = helper {
            // Reaped as soon as it is done, so that it does not stay a zombie for as long as
            // the container lives.
            std::thread::Builder::new()
                .name("cimg-reap".into())
                .spawn(move || waitpid(pid, None))
                .map_err(|e| e.to_string())?;
        }
        if let Some((listener, count, image, config)) = group {
            std::thread::Builder::new()
                .name("join".into())
                .spawn(move || join::serve_group(listener, count, image, config))
                .map_err(|e| e.to_string())?;
        }
        server.run().map_err(|e| e.to_string())
    })();
    match res {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("launch: FUSE server: {e}");
            std::process::exit(1)
        }
    }
}

/// The FUSE server's helper: read the command's files and the hot files ahead into the page
/// cache through the mount ([`cimg_fuse::warm::read_ahead`]), then exit. The mount is
/// `/proc/LAUNCH/fd/N`, launch's descriptor of its root, N read from `fd_num` (end of file:
/// no mount, nothing to do). It dies with the server and holds none of its `/dev/fuse`, pipe
/// or socket descriptors (the caller closed them), so it can never keep the server or launch
/// waiting; it stops once launch has exited.
fn warm_main(
    img: &cimg_format::Image,
    fd_num: &OwnedFd,
    launch: Pid,
    opts: &cimg_fuse::MountOptions,
    server: Pid,
) -> ! {
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    if getppid() == server {
        let _ = nix::sys::prctl::set_name(c"cimg-warm");
        if let Ok(null) = fs::OpenOptions::new().write(true).open("/dev/null") {
            let _ = nix::unistd::dup2_stderr(&null);
        }
        let mut b = [0u8; 16];
        let fd = match nix::unistd::read(fd_num, &mut b) {
            Ok(n) => std::str::from_utf8(&b[..n])
                .ok()
                .and_then(|t| t.parse::<u32>().ok()),
            Err(_) => None,
        };
        if let Some(fd) = fd {
            let root = PathBuf::from(format!("/proc/{launch}/fd/{fd}"));
            let budget = opts.fs.cache_size / 2;
            cimg_fuse::warm::read_ahead(img, &root, opts.fs.exec.as_ref(), budget);
        }
    }
    std::process::exit(0)
}

/// Whether the FUSE connection of the mount whose root is `root` is gone: a statfs reaches
/// the server, and fails with `ENOTCONN` (or `ECONNABORTED`, once the kernel has aborted the
/// connection) when nobody serves it any more.
pub fn connection_gone(root: &OwnedFd) -> bool {
    matches!(
        nix::sys::statfs::fstatfs(root),
        Err(Errno::ENOTCONN | Errno::ECONNABORTED)
    )
}

/// Whether process `pid` (a child) ends within `wait` (polled every millisecond); how.
pub fn exited_within(pid: Pid, wait: std::time::Duration) -> Option<String> {
    let start = std::time::Instant::now();
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, c)) => return Some(format!("exit status {c}")),
            Ok(WaitStatus::Signaled(_, s, _)) => return Some(format!("signal {s}")),
            Ok(_) if start.elapsed() < wait => {
                std::thread::sleep(std::time::Duration::from_millis(1))
            }
            _ => return None,
        }
    }
}
