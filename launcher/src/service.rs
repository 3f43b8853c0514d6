//! The image service: one FUSE server per image, per user, per node, shared by every launch
//! of that image, which lingers for a while after its last container and then leaves
//! nothing behind.
//!
//! ```text
//! image server (its own session)  user ns S, mount ns H (the holder): the FUSE mount of the
//!  │                              image on a private tmpfs; answers launches on an
//!  │                              abstract socket `cimg-img/UID/KEY` ([`crate::rendezvous`])
//!  └─ cimg-warm                   (first container only) reads its command's files ahead
//! launch                          asks for the mount: gets a detached copy of the mount's
//!                                 tree (`open_tree`, same superblock: same page cache,
//!                                 dentries and decoded metadata), makes its own user and
//!                                 mount namespaces from the host's, and attaches the copy as
//!                                 the container's root (see `supervise`)
//! ```
//!
//! - **Identity.** KEY hashes the image file's device, inode, size, mtime and ctime (any
//!   write changes the ctime; a replacement changes the inode), the ids inside the container
//!   (the server's user namespace maps them: files owned by them show as theirs) and the
//!   options that shape the server (`--read-ahead`, `--cache-size`). A launch costs one
//!   `stat` of the image when its server is live: no open, no read.
//! - **Election.** The first launch binds the name and starts the server with the bound
//!   socket; concurrent first launches find it bound and connect, their requests queued
//!   until the server answers. Nobody waits on a file lock.
//! - **Containers and lifetime.** A container is a launch's connection: open while the
//!   launch lives, then, if processes of the container outlive its command, while the
//!   keeper the launch leaves behind lives (see `supervise`), and while a join group it
//!   handed over has peers. With none left the server gives its block cache's memory back
//!   and lingers (`--linger`, `CIMG_LINGER`, default [`DEFAULT_LINGER`]), then exits: its
//!   namespaces, and so the mount, go with it. A lingering server keeps the image file open
//!   (`launch --stop IMAGE` releases it, e.g. in a job epilog).
//! - **Access.** The mount is made without `allow_other`: the kernel lets only processes
//!   with the server's host uid and gid use it, in whatever user namespace they are. Every
//!   request is checked against the peer's host ids ([`crate::rendezvous::same_user`]).
//! - **Faults.** The server answers from one poll loop on non-blocking sockets and bounded
//!   messages; a client that does not read is dropped. A launch whose server does not answer
//!   within [`ANSWER`] says so and makes a private mount; a dead server's containers see
//!   their connection close and end with status 125.

use std::fs;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, accept4, bind, connect, listen, socket,
};
use nix::sys::wait::waitpid;
use nix::unistd::{Pid, Uid, setsid};

use crate::enter;
use crate::error::{Error, errno_msg};
use crate::protocol::{self, Hint, Received, Reply, Request, Status};
use crate::rendezvous::{self, same_user};
use crate::sys::{Forked, fork};

/// How long a server lingers after its last container when nothing says otherwise.
pub const DEFAULT_LINGER: Duration = Duration::from_secs(300);

/// How long a server may take to answer a launch before the launch gives up on it (one
/// just started opens and mounts the image first, on a node that may be busy). A stopped
/// server (SIGSTOP, a debugger) is given up on at once.
pub const ANSWER: Duration = Duration::from_secs(10);

/// How long a name may stay bound but not listening before it counts as another user's:
/// the server listens first thing once forked, but a loaded node may delay it.
const SQUAT_WAIT: Duration = Duration::from_secs(2);

/// How often a server looks whether its join groups have ended.
const SCAN: Duration = Duration::from_secs(1);

/// The most connections a server keeps; more are refused (bounded memory).
const MAX_CONNS: usize = 4096;

/// Where the server mounts the image, in its own mount namespace (on a private tmpfs).
const MOUNT_DIR: &str = "/tmp/image";

/// What makes two launches able to share a server.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    /// `st_dev`, `st_ino`, `st_size`, mtime and ctime (ns) of the image file.
    pub file: (u64, u64, u64, i128, i128),
    /// Uid and gid inside the container.
    pub ids: (u32, u32),
    /// `--read-ahead`.
    pub read_ahead: bool,
    /// `--cache-size`.
    pub cache_size: Option<u64>,
}

/// An image file, looked up once: an `O_PATH` descriptor of it and its identity.
#[derive(Debug)]
pub struct Looked {
    /// The file (`O_PATH`: opening it sent no open to the filesystem).
    pub fd: OwnedFd,
    /// `st_dev`, `st_ino`, `st_size`, mtime and ctime (ns).
    pub file: (u64, u64, u64, i128, i128),
}

/// Look `path` up for the service: `None` unless it is a regular file. One path walk
/// (`O_PATH`, which sends a parallel filesystem's client no open), and the attributes that
/// walk brought (`AT_STATX_DONT_SYNC`: where the walk asked the server, the attributes are
/// what it answered; where the kernel's cache answered, they are what a `stat` would have
/// given), so a launch on a live server costs the filesystem that walk only.
pub fn look(path: &Path) -> Option<Looked> {
    use rustix::fs::{AtFlags, FileType, OFlags, StatxFlags};
    let fd = rustix::fs::open(
        path,
        OFlags::PATH | OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .ok()?;
    let st = rustix::fs::statx(
        &fd,
        "",
        AtFlags::EMPTY_PATH | AtFlags::STATX_DONT_SYNC,
        StatxFlags::BASIC_STATS,
    )
    .ok()?;
    if FileType::from_raw_mode(st.stx_mode.into()) != FileType::RegularFile {
        return None;
    }
    let ns = |t: rustix::fs::StatxTimestamp| {
        i128::from(t.tv_sec) * 1_000_000_000 + i128::from(t.tv_nsec)
    };
    let dev = nix::sys::stat::makedev(st.stx_dev_major.into(), st.stx_dev_minor.into());
    Some(Looked {
        fd,
        file: (
            dev,
            st.stx_ino,
            st.stx_size,
            ns(st.stx_mtime),
            ns(st.stx_ctime),
        ),
    })
}

impl Key {
    /// The key of the image file `file` (see [`Looked::file`]).
    pub fn new(
        file: (u64, u64, u64, i128, i128),
        ids: (u32, u32),
        read_ahead: bool,
        cache_size: Option<u64>,
    ) -> Key {
        Key {
            file,
            ids,
            read_ahead,
            cache_size,
        }
    }

    /// The key as a socket name's last part.
    fn name(&self) -> String {
        // A server of another build of launch may speak another protocol: it is not shared.
        let text = format!("{} {self:?}", env!("CARGO_PKG_VERSION"));
        format!("{:032x}", xxhash_rust::xxh3::xxh3_128(text.as_bytes()))
    }
}

/// A launch's side of a shared mount.
#[derive(Debug)]
pub struct Attached {
    /// The connection to the server, kept while the launch lives: its end means the server
    /// died.
    pub conn: OwnedFd,
    /// The mount's tree, to attach as the container's root.
    pub tree: OwnedFd,
    /// The image's config (JSON), if any.
    pub config: Option<Vec<u8>>,
}

/// What [`attach`] came to.
#[derive(Debug)]
pub enum Outcome {
    /// A container on the shared mount.
    Shared(Attached),
    /// A mount of its own, as with `--private`; the warning says why, if it is worth one
    /// (none when a starting server failed on the image: the private mount then says why).
    Private(Option<String>),
}

/// What the server needs to start.
#[derive(Debug, Clone)]
pub struct Start {
    /// The image as named (absolute).
    pub image: PathBuf,
    /// `--read-ahead`.
    pub read_ahead: bool,
    /// `--cache-size`.
    pub cache_size: Option<u64>,
    /// The first command's files, read ahead as the server starts.
    pub hint: Hint,
    /// The image file's size, from the launch's look-up (the server need not ask again).
    pub size: u64,
}

/// Get a container's root from the server of `key`, starting the server if there is none.
/// Must be called while this process is single-threaded and has made no namespace.
pub fn attach(
    key: &Key,
    image: &Looked,
    start: &Start,
    linger: Duration,
) -> Result<Outcome, Error> {
    let uid = Uid::current();
    let name = key.name();
    let mut k = 0;
    let mut started = false;
    let mut closed = 0;
    let mut refused_since: Option<Instant> = None;
    let t0 = Instant::now();
    loop {
        if k == rendezvous::NAMES {
            return Ok(Outcome::Private(Some(
                "the image service's socket names are held by another user; using a private \
                 mount"
                    .into(),
            )));
        }
        if t0.elapsed() > 2 * ANSWER {
            return Ok(Outcome::Private(Some(
                "no image server could be reached; using a private mount".into(),
            )));
        }
        let addr = rendezvous::address(uid, "img", &name, k)?;
        let s = seqpacket()?;
        match connect(s.as_raw_fd(), &addr) {
            Ok(()) if !same_user(&s) => {
                k += 1;
                continue;
            }
            Ok(()) => {
                match ask(&s, linger)? {
                    Answer::Tree(tree, config) => {
                        return Ok(Outcome::Shared(Attached {
                            conn: s,
                            tree,
                            config,
                        }));
                    }
                    Answer::Silent(why) => {
                        let pid = rendezvous::peer_pid(&s).unwrap_or(0);
                        return Ok(Outcome::Private(Some(format!(
                            "the image server (pid {pid}) did not answer ({why}); using a \
                             private mount"
                        ))));
                    }
                    Answer::Refused(why) => {
                        return Ok(Outcome::Private(Some(format!(
                            "the image server refused: {why}; using a private mount"
                        ))));
                    }
                    // The server we started failed (on the image, most likely): the private
                    // mount meets the same problem and reports it.
                    Answer::Closed if started => return Ok(Outcome::Private(None)),
                    // A server that was just exiting (its linger over): try again.
                    Answer::Closed => {
                        closed += 1;
                        if closed > 20 {
                            return Ok(Outcome::Private(Some(
                                "the image server keeps closing the connection; using a \
                                 private mount"
                                    .into(),
                            )));
                        }
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                }
            }
            Err(Errno::ECONNREFUSED) | Err(Errno::ENOENT) => {}
            Err(e) => return Err(Error::other(errno_msg("image service: connect", e))),
        }
        // Binding the name elects this launch to start the server; the server listens on
        // it (so that the socket's credentials are the server's own).
        let l = seqpacket()?;
        match bind(l.as_raw_fd(), &addr) {
            Ok(()) => {
                start_server(l, key, image, start)?;
                started = true;
            }
            Err(Errno::EADDRINUSE) => {
                let since = *refused_since.get_or_insert_with(Instant::now);
                if since.elapsed() > SQUAT_WAIT {
                    k += 1;
                    refused_since = None;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(Error::other(errno_msg("image service: bind", e))),
        }
    }
}

fn seqpacket() -> Result<OwnedFd, Error> {
    socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| Error::other(errno_msg("image service: socket", e)))
}

enum Answer {
    Tree(OwnedFd, Option<Vec<u8>>),
    /// No answer in time, or from a stopped server: why.
    Silent(String),
    Refused(String),
    Closed,
}

/// Ask for a container's tree, waiting at most [`ANSWER`], and not at all for a stopped
/// server.
fn ask(s: &OwnedFd, linger: Duration) -> Result<Answer, Error> {
    let req = Request::Attach {
        linger_ms: u64::try_from(linger.as_millis()).unwrap_or(u64::MAX),
    };
    if protocol::send(s.as_fd(), &req, &[]).is_err() {
        return Ok(Answer::Closed);
    }
    let pid = rendezvous::peer_pid(s);
    let t0 = Instant::now();
    loop {
        let mut pfd = [PollFd::new(s.as_fd(), PollFlags::POLLIN)];
        match poll(&mut pfd, PollTimeout::from(200u16)) {
            Ok(0) => {}
            Ok(_) => break,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(Error::other(errno_msg("image service: poll", e))),
        }
        if pid.is_some_and(stopped) {
            return Ok(Answer::Silent("it is stopped".into()));
        }
        if t0.elapsed() > ANSWER {
            return Ok(Answer::Silent(format!("within {} s", ANSWER.as_secs())));
        }
    }
    match protocol::recv::<Reply>(s.as_fd()) {
        Ok(Received::Message(Reply::Tree { config }, fds)) => match fds.into_iter().next() {
            Some(tree) => Ok(Answer::Tree(tree, config)),
            None => Ok(Answer::Refused("no tree came with the answer".into())),
        },
        Ok(Received::Message(Reply::Refused(why), _)) => Ok(Answer::Refused(why)),
        Ok(Received::Message(other, _)) => {
            Ok(Answer::Refused(format!("unexpected answer {other:?}")))
        }
        Ok(Received::Closed) | Err(_) => Ok(Answer::Closed),
    }
}

/// Whether process `pid` is stopped (state `T` or `t` in `/proc/PID/stat`).
fn stopped(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(") ")
            .next()
            .is_some_and(|r| r.starts_with('T') || r.starts_with('t'))
    })
}

/// Hand the join group's listening socket to the server, which answers its peers.
pub fn serve_group(
    conn: &OwnedFd,
    listener: &OwnedFd,
    count: u32,
    image: &Path,
) -> Result<(), Error> {
    let req = Request::ServeGroup {
        count,
        image: image.to_path_buf(),
    };
    protocol::send(conn.as_fd(), &req, &[listener.as_raw_fd()])
        .map_err(|e| Error::other(errno_msg("image service: hand over the join group", e)))
}

/// Open the image and start its server, a daemon of its own (not a child of this process:
/// it outlives it), serving `listener`. The file is not checked against the key again (one
/// metadata operation less per node): an image replaced between the launch's `stat` and this
/// open is served under the old file's key, which no later `stat` gives, so only the
/// launches that saw the old file in that moment share the new one.
fn start_server(listener: OwnedFd, key: &Key, image: &Looked, start: &Start) -> Result<(), Error> {
    // Opened through the looked-up file itself: no second path walk.
    let file = fs::File::open(enter::fd_path(&image.fd))
        .map_err(|e| Error::image(format!("{}: {}", start.image.display(), enter::io_msg(&e))))?;
    match fork().map_err(|e| Error::other(errno_msg("fork", e)))? {
        Forked::Parent(child) => {
            let _ = waitpid(child, None);
            Ok(())
        }
        Forked::Child => {
            // The middle process exits at once: the server is nobody's child here.
            match fork() {
                Ok(Forked::Child) => server_main(listener, file, key.ids, start),
                _ => std::process::exit(0),
            }
        }
    }
}

/// One connection.
struct Conn {
    fd: OwnedFd,
    /// A container's: open while any process of the container lives (its launch, then the
    /// keeper a launch leaves behind when processes outlive its command).
    container: bool,
}

/// The server: never returns. Errors before it serves end it silently (its first launch
/// then makes a private mount, which reports them).
fn server_main(listener: OwnedFd, file: fs::File, ids: (u32, u32), start: &Start) -> ! {
    // Nothing of the launch that started it: it outlives that launch (see `close_all_but`).
    enter::close_all_but(&[listener.as_raw_fd(), file.as_raw_fd()]);
    // Launches may be waiting to connect already.
    if listen(&listener, Backlog::new(1024).unwrap_or(Backlog::MAXCONN)).is_err() {
        std::process::exit(1);
    }
    let _ = setsid();
    enter::detach_stdio(true);
    let _ = nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    );
    let _ = nix::sys::prctl::set_name(c"cimg-server");
    match serve(listener, file, ids, start) {
        Ok(()) => std::process::exit(0),
        Err(_) => std::process::exit(1),
    }
}

fn serve(listener: OwnedFd, file: fs::File, ids: (u32, u32), start: &Start) -> Result<(), Error> {
    let lazy = cimg_format::OpenOptions {
        lazy: true,
        size: Some(start.size),
        ..Default::default()
    };
    let img = cimg_format::Image::from_reader(file, &start.image, &lazy)
        .map_err(|e| Error::image(e.to_string()))?;
    let config = img.config().map(<[u8]>::to_vec);
    enter::unshare_user_mount(ids.0, ids.1)?;
    enter::mount_tmpfs(
        Path::new(enter::STAGE),
        "mode=0700,size=1m",
        "the image server",
    )?;
    enter::mkdir(Path::new(MOUNT_DIR))?;
    let fuse = enter::open_dev_fuse()?;
    enter::mount_fuse(&start.image, &fuse, Path::new(MOUNT_DIR), ids, false)?;
    let root = nix::fcntl::open(
        MOUNT_DIR,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| Error::fuse(errno_msg("the image server's mount", e)))?;
    let mut opts = enter::server_options(start.cache_size, start.read_ahead, false);
    // The first command's files and the hot files are read into the page cache by a helper
    // process (not by the server: `cimg_fuse::warm` says why), forked while the server is
    // still single-threaded, through the mount; its reads wait behind everyone else's. Later
    // containers find what it read in the page cache.
    let exec = cimg_fuse::exec::ExecHint {
        candidates: start.hint.candidates.clone(),
        cwd: start.hint.cwd.clone(),
        library_path: start.hint.library_path.clone(),
    };
    if !cimg_fuse::fs::cpu_busy() {
        let me = Pid::this();
        match fork() {
            Ok(Forked::Child) => {
                drop((fuse, listener, root));
                let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
                if nix::unistd::getppid() == me {
                    let _ = nix::sys::prctl::set_name(c"cimg-warm");
                    let budget = opts.fs.cache_size / 2;
                    cimg_fuse::warm::read_ahead(&img, Path::new(MOUNT_DIR), Some(&exec), budget);
                }
                std::process::exit(0)
            }
            Ok(Forked::Parent(pid)) => {
                opts.fs.background_pid = u32::try_from(pid.as_raw()).ok();
                // Reaped when done, so that it is no zombie for the server's life.
                let _ = std::thread::Builder::new()
                    .name("cimg-reap".into())
                    .spawn(move || waitpid(pid, None));
            }
            Err(_) => {}
        }
    }
    let server = cimg_fuse::attach_fd(img, fuse, &start.image, &opts)
        .map_err(|e| Error::fuse(e.to_string()))?;
    let cache = server.cache();
    std::thread::Builder::new()
        .name("cimg-fuse".into())
        .spawn(move || {
            let _ = server.run();
            // The kernel let go of the filesystem: nothing is left to serve.
            std::process::exit(0)
        })
        .map_err(|e| Error::other(format!("thread: {e}")))?;
    listen_loop(listener, &root, config, &cache, &start.image)
}

/// Answer launches until idle for longer than the linger, or told to stop.
fn listen_loop(
    listener: OwnedFd,
    root: &OwnedFd,
    config: Option<Vec<u8>>,
    cache: &cimg_fuse::CacheHandle,
    image: &Path,
) -> Result<(), Error> {
    let _ = nix::fcntl::fcntl(&listener, nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK));
    let mut conns: Vec<Conn> = Vec::new();
    // Join groups being served (their peers are containers too, whose creator may be gone).
    let groups = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut idle_since: Option<Instant> = Some(Instant::now());
    let mut linger = DEFAULT_LINGER;
    loop {
        let live = conns.iter().filter(|c| c.container).count()
            + groups.load(std::sync::atomic::Ordering::Acquire);
        if live == 0 && idle_since.is_none() {
            idle_since = Some(Instant::now());
            cache.clear();
        }
        if live > 0 {
            idle_since = None;
        }
        if let Some(t) = idle_since
            && t.elapsed() >= linger
            && !conns.iter().any(|c| !c.container)
        {
            return Ok(());
        }
        // A group that ends wakes nobody: look again every second while one runs.
        let timeout = match idle_since {
            Some(t) => linger
                .saturating_sub(t.elapsed())
                .max(Duration::from_millis(1)),
            None if groups.load(std::sync::atomic::Ordering::Acquire) > 0 => SCAN,
            None => Duration::from_secs(3600),
        };
        let mut fds: Vec<PollFd> = Vec::with_capacity(conns.len() + 1);
        fds.push(PollFd::new(listener.as_fd(), PollFlags::POLLIN));
        for c in &conns {
            fds.push(PollFd::new(c.fd.as_fd(), PollFlags::POLLIN));
        }
        let ms = PollTimeout::try_from(timeout.as_millis().min(i32::MAX as u128) as i32)
            .unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, ms) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(Error::other(errno_msg("poll", e))),
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        // Requests, and connections that ended.
        let mut gone = Vec::new();
        for (i, c) in conns.iter_mut().enumerate() {
            if !ready[i + 1] {
                continue;
            }
            let handled = match protocol::recv::<Request>(c.fd.as_fd()) {
                Err(Errno::EAGAIN) | Err(Errno::EINTR) => Handled::Keep,
                Ok(Received::Closed) | Err(_) => Handled::Drop,
                Ok(Received::Message(req, fds)) => {
                    let now = Now {
                        live,
                        idle_since,
                        groups: &groups,
                    };
                    handle(req, fds, c, root, &config, image, &now, &mut linger)
                }
            };
            match handled {
                Handled::Keep => {}
                Handled::Drop => gone.push(i),
                // The containers see their connections close and end (status 125).
                Handled::Stop => return Ok(()),
            }
        }
        for i in gone.into_iter().rev() {
            conns.remove(i);
        }
        // New connections (non-blocking: drain the backlog).
        if ready[0] {
            while let Ok(fd) = accept4(
                listener.as_raw_fd(),
                SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            ) {
                let Some(fd) = crate::sys::own_fds(vec![fd]).pop() else {
                    break;
                };
                if conns.len() < MAX_CONNS && same_user(&fd) {
                    conns.push(Conn {
                        fd,
                        container: false,
                    });
                }
            }
        }
    }
}

/// The server's state a request may need.
struct Now<'a> {
    live: usize,
    idle_since: Option<Instant>,
    groups: &'a std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

enum Handled {
    Keep,
    Drop,
    Stop,
}

#[allow(clippy::too_many_arguments)]
fn handle(
    req: Request,
    mut fds: Vec<OwnedFd>,
    c: &mut Conn,
    root: &OwnedFd,
    config: &Option<Vec<u8>>,
    image: &Path,
    now: &Now<'_>,
    linger: &mut Duration,
) -> Handled {
    let reply = |r: &Reply, fds: &[std::os::fd::RawFd]| {
        if protocol::send(c.fd.as_fd(), r, fds).is_ok() {
            Handled::Keep
        } else {
            Handled::Drop
        }
    };
    match req {
        Request::Attach { linger_ms } if !c.container => {
            *linger = Duration::from_millis(linger_ms);
            let tree = match clone_root(root) {
                Ok(t) => t,
                Err(e) => return reply(&Reply::Refused(errno_msg("open_tree", e)), &[]),
            };
            let r = Reply::Tree {
                config: config.clone(),
            };
            let h = reply(&r, &[tree.as_raw_fd()]);
            c.container = matches!(h, Handled::Keep);
            h
        }
        Request::ServeGroup {
            count,
            image: group_image,
        } if c.container => {
            let Some(l) = fds.pop() else {
                return Handled::Drop;
            };
            let config = config.clone().unwrap_or_default();
            let groups = now.groups.clone();
            groups.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            let spawned = std::thread::Builder::new()
                .name("join".into())
                .spawn(move || {
                    crate::join::serve_group(l, count, group_image, config);
                    groups.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                });
            if spawned.is_err() {
                now.groups.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                return Handled::Drop;
            }
            Handled::Keep
        }
        Request::Status => {
            let s = Status {
                pid: std::process::id() as i32,
                image: image.to_path_buf(),
                containers: now.live,
                idle_ms: now.idle_since.map_or(0, |t| t.elapsed().as_millis() as u64),
                linger_ms: linger.as_millis() as u64,
            };
            reply(&Reply::Status(s), &[])
        }
        Request::Stop => {
            let _ = reply(&Reply::Ok, &[]);
            Handled::Stop
        }
        _ => Handled::Drop,
    }
}

/// A detached copy of the mount's tree.
fn clone_root(root: &OwnedFd) -> Result<OwnedFd, Errno> {
    use rustix::mount::OpenTreeFlags as F;
    rustix::mount::open_tree(
        root,
        "",
        F::OPEN_TREE_CLONE | F::AT_RECURSIVE | F::OPEN_TREE_CLOEXEC | F::AT_EMPTY_PATH,
    )
    .map_err(enter::errno)
}

/// The live servers of this user: their status and connection, from the abstract names in
/// `/proc/net/unix`.
pub fn servers() -> Vec<(Status, OwnedFd)> {
    let prefix = format!("@cimg-img/{}/", Uid::current());
    let Ok(table) = fs::read_to_string("/proc/net/unix") else {
        return Vec::new();
    };
    let mut names: Vec<&str> = table
        .lines()
        .filter_map(|l| l.split_whitespace().nth(7))
        .filter(|n| n.starts_with(&prefix))
        .collect();
    names.sort_unstable();
    names.dedup();
    let mut out = Vec::new();
    for n in names {
        let Ok(addr) = nix::sys::socket::UnixAddr::new_abstract(&n.as_bytes()[1..]) else {
            continue;
        };
        let Ok(s) = seqpacket() else { continue };
        if connect(s.as_raw_fd(), &addr).is_err() || !same_user(&s) {
            continue;
        }
        if protocol::send(s.as_fd(), &Request::Status, &[]).is_err() {
            continue;
        }
        let mut pfd = [PollFd::new(s.as_fd(), PollFlags::POLLIN)];
        let ms = PollTimeout::try_from(ANSWER.as_millis() as i32).unwrap_or(PollTimeout::MAX);
        if !matches!(poll(&mut pfd, ms), Ok(n) if n > 0) {
            continue;
        }
        if let Ok(Received::Message(Reply::Status(st), _)) = protocol::recv::<Reply>(s.as_fd()) {
            out.push((st, s));
        }
    }
    out.sort_by_key(|(st, _)| st.pid);
    out
}

/// Stop a server through its connection; waits (bounded) until it has exited. The wait is
/// on the server's pidfd (readable once it has exited, reaped or not: the server is nobody's
/// child here, and some init processes reap late).
pub fn stop(conn: &OwnedFd) -> bool {
    let pidfd = nix::sys::socket::getsockopt(conn, nix::sys::socket::sockopt::PeerPidfd).ok();
    if protocol::send(conn.as_fd(), &Request::Stop, &[]).is_err() {
        return false;
    }
    let Some(pidfd) = pidfd else {
        // No pidfd (an old kernel): its connection's end is the next best sign.
        return crate::join::closed_within(conn.as_fd(), ANSWER);
    };
    let mut pfd = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
    let ms = PollTimeout::try_from(ANSWER.as_millis() as i32).unwrap_or(PollTimeout::MAX);
    matches!(poll(&mut pfd, ms), Ok(n) if n > 0)
}

/// `--servers`, `--stop IMAGE`, `--stop-all`: the user's image servers on this node.
pub fn manage(m: &crate::plan::Manage, verbose: &dyn Fn(&str)) -> Result<i32, Error> {
    let servers = servers();
    match m {
        crate::plan::Manage::List { json: true } => {
            let list: Vec<_> = servers.iter().map(|(st, _)| st).collect();
            let text = serde_json::to_string_pretty(&list)
                .map_err(|e| Error::other(format!("--json: {e}")))?;
            println!("{text}");
        }
        crate::plan::Manage::List { json: false } => {
            for (st, _) in &servers {
                println!("{}", status_line(st));
            }
        }
        crate::plan::Manage::Stop(which) => {
            // The servers name their image as the first launch did, made absolute; compare
            // resolved paths where both still resolve.
            let resolve = |p: &Path| fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
            let want = which
                .as_deref()
                .map(|p| resolve(&std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())));
            for (st, conn) in &servers {
                if want.as_ref().is_some_and(|w| *w != resolve(&st.image)) {
                    continue;
                }
                if stop(conn) {
                    verbose(&format!("stopped {}", status_line(st)));
                } else {
                    return Err(Error::other(format!(
                        "the image server {} ({}) did not stop",
                        st.pid,
                        st.image.display()
                    )));
                }
            }
        }
    }
    Ok(0)
}

/// `CIMG_LINGER` or `--linger`: seconds, or a number with `s`, `m` or `h`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num.parse().ok()?;
    let mult = match unit {
        "s" | "" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        "ms" => 0.001,
        _ => return None,
    };
    let secs = n * mult;
    (secs.is_finite() && (0.0..1e9).contains(&secs)).then(|| Duration::from_secs_f64(secs))
}

/// The command-line words of a status line (for `launch --servers`).
pub fn status_line(st: &Status) -> String {
    format!(
        "{}\t{}\t{} container{}\tidle {}",
        st.pid,
        st.image.display(),
        st.containers,
        if st.containers == 1 { "" } else { "s" },
        if st.containers > 0 {
            "-".to_string()
        } else {
            format!(
                "{} s (lingers {} s)",
                st.idle_ms / 1000,
                st.linger_ms / 1000
            )
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_duration("30"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("-1"), None);
        assert_eq!(parse_duration("5 weeks"), None);
        assert_eq!(parse_duration(""), None);
    }

    #[test]
    fn keys_differ_by_file_ids_and_options() {
        let m = look(Path::new("/proc/self/exe")).unwrap().file;
        use std::os::unix::fs::MetadataExt;
        let md = fs::metadata("/proc/self/exe").unwrap();
        assert_eq!(
            (m.0, m.1, m.2),
            (md.dev(), md.ino(), md.size()),
            "look agrees with stat"
        );
        assert!(
            look(Path::new("/proc")).is_none(),
            "a directory is no image file"
        );
        let a = Key::new(m, (1000, 1000), false, None);
        assert_eq!(a.name(), Key::new(m, (1000, 1000), false, None).name());
        assert_ne!(a.name(), Key::new(m, (0, 0), false, None).name());
        assert_ne!(a.name(), Key::new(m, (1000, 1000), true, None).name());
        assert_ne!(
            a.name(),
            Key::new(m, (1000, 1000), false, Some(1 << 20)).name()
        );
        let mut b = a.clone();
        b.file.4 += 1; // a write changes the ctime
        assert_ne!(a.name(), b.name());
    }
}
