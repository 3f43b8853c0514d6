//! Entering the container: the user and mount namespaces, the staging tmpfs, the image as
//! the root (FUSE mount, bound directory, or overlayfs with a throw-away upper layer), the
//! standard and user binds, `/etc/passwd` and `/etc/group`, and finally (in the app's
//! process) pivot_root and exec.
//!
//! Paths inside the image are always resolved with `openat2(RESOLVE_IN_ROOT)` from a
//! descriptor of the new root, and mounts are made onto `/proc/self/fd/N` of the result, so a
//! symlink in the image can never make a bind land outside the container. Host bind sources
//! are opened (`O_PATH`) before anything is mounted, so nothing the launcher mounts can hide
//! them.

use std::ffi::{CString, OsStr, OsString};
use std::fs;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, open, openat2};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::sys::stat::{Mode, mkdirat};
use nix::sys::statvfs::{FsFlags, fstatvfs};
use nix::unistd::{Gid, Uid};

use crate::error::{Error, errno_msg};
use crate::plan::Plan;

/// Where the launcher stages the container inside its private mount namespace: a tmpfs
/// mounted over the host's `/tmp` (whose own content stays reachable through a descriptor
/// opened before).
pub const STAGE: &str = "/tmp";

/// A host path to be bound into the container: a detached copy of its mount tree, taken
/// (after the namespaces are made) before anything is mounted, so nothing the launcher mounts
/// later (the staging tmpfs on `/tmp`) is in it.
#[derive(Debug)]
pub struct HostPath {
    /// The detached tree (open_tree clone).
    pub tree: OwnedFd,
    /// Whether it is a directory.
    pub is_dir: bool,
}

impl HostPath {
    /// Clone the tree at `path` (following symlinks). `what` prefixes the error.
    pub fn open(path: &Path, what: &str) -> Result<HostPath, Error> {
        let tree = clone_tree(rustix::fs::CWD, path)
            .map_err(|e| Error::setup(errno_msg(format!("{what} {}", path.display()), e)))?;
        let is_dir = nix::sys::stat::fstat(&tree)
            .map(|st| st.st_mode & nix::libc::S_IFMT == nix::libc::S_IFDIR)
            .unwrap_or(false);
        Ok(HostPath { tree, is_dir })
    }

    /// Clone `path` if it exists; `None` if it does not.
    pub fn open_optional(path: &Path) -> Option<HostPath> {
        HostPath::open(path, "").ok()
    }

    /// Attach the tree onto `target` (a descriptor in the container's root).
    pub fn attach(&self, target: &OwnedFd, what: &str) -> Result<(), Error> {
        attach_tree(&self.tree, target)
            .map_err(|e| Error::setup(errno_msg(format!("cannot bind {what}"), e)))
    }

    /// Make every mount of the tree read-only (before it is attached).
    pub fn read_only(&self, what: &str) -> Result<(), Error> {
        crate::sys::make_tree_read_only(&self.tree)
            .map_err(|e| Error::setup(errno_msg(format!("cannot make {what} read-only"), e)))
    }
}

/// open_tree(2) with `OPEN_TREE_CLONE | AT_RECURSIVE`: a detached copy of the mount tree at
/// `path` relative to `dir` (following symlinks; `path` empty: `dir` itself), as it is now.
/// Later mounts on or under it are not in the copy.
fn clone_tree(dir: impl AsFd, path: &Path) -> Result<OwnedFd, Errno> {
    use rustix::mount::OpenTreeFlags as F;
    let mut flags = F::OPEN_TREE_CLONE | F::AT_RECURSIVE | F::OPEN_TREE_CLOEXEC;
    if path.as_os_str().is_empty() {
        flags |= F::AT_EMPTY_PATH;
    }
    rustix::mount::open_tree(dir, path, flags).map_err(errno)
}

/// move_mount(2) of the detached tree `tree` onto the file or directory `target` refers to.
pub fn attach_tree(tree: &impl AsFd, target: &impl AsFd) -> Result<(), Errno> {
    use rustix::mount::MoveMountFlags as F;
    rustix::mount::move_mount(
        tree,
        "",
        target,
        "",
        F::MOVE_MOUNT_F_EMPTY_PATH | F::MOVE_MOUNT_T_EMPTY_PATH,
    )
    .map_err(errno)
}

/// pidfd_open(2): a descriptor of process `pid`, to enter its namespaces or hand to a peer.
pub fn pidfd_open(pid: i32) -> Result<OwnedFd, Errno> {
    let pid = rustix::process::Pid::from_raw(pid).ok_or(Errno::ESRCH)?;
    rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).map_err(errno)
}

/// A rustix error as nix's.
pub fn errno(e: rustix::io::Errno) -> Errno {
    Errno::from_raw(e.raw_os_error())
}

/// Bind `path` of the container (already bound from the host) read-only onto itself.
pub fn bind_read_only(root: &Root, path: &Path) -> Result<(), Error> {
    let what = path.display().to_string();
    let target = root.target(path, Make::No, "read-only bind")?;
    let tree = clone_tree(&target, Path::new(""))
        .map_err(|e| Error::setup(errno_msg(format!("cannot bind {what}"), e)))?;
    crate::sys::make_tree_read_only(&tree)
        .map_err(|e| Error::setup(errno_msg(format!("cannot make {what} read-only"), e)))?;
    attach_tree(&tree, &target)
        .map_err(|e| Error::setup(errno_msg(format!("cannot bind {what}"), e)))
}

/// Point standard input and output (and error, with `stderr`) at `/dev/null`: for a process
/// that outlives launch (a server, a keeper), so that a caller reading launch's output is not
/// held open by it.
pub fn detach_stdio(stderr: bool) {
    if let Ok(null) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        let _ = nix::unistd::dup2_stdin(&null);
        let _ = nix::unistd::dup2_stdout(&null);
        if stderr {
            let _ = nix::unistd::dup2_stderr(&null);
        }
    }
}

/// Close every descriptor above standard error but `keep`: for a process forked from launch
/// that outlives it (an image server, a keeper), which must hold nothing of launch's (a join
/// group's listening socket or connection, held on, would keep the group alive, and its
/// name bound, for as long as that process lives). From `/proc/self/fd`; the descriptors
/// are the caller's own copies (a fork's), never closed again (the caller does not return).
pub fn close_all_but(keep: &[std::os::fd::RawFd]) {
    let Ok(dir) = fs::read_dir("/proc/self/fd") else {
        return;
    };
    let open: Vec<std::os::fd::RawFd> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    for fd in open {
        if fd > 2 && !keep.contains(&fd) {
            let _ = nix::unistd::close(fd);
        }
    }
}

/// The FUSE server's options for `launch`: the block cache's size if given, speculative
/// read-ahead only if asked (the image's hot list is prefetched regardless: it is what the
/// start-up reads), and no page-cache pushes (with them a SIGKILLed server can hang the
/// container: see `FsOptions::store`).
pub fn server_options(
    cache_size: Option<u64>,
    read_ahead: bool,
    allow_other: bool,
) -> cimg_fuse::MountOptions {
    let mut opts = cimg_fuse::MountOptions {
        allow_other,
        ..Default::default()
    };
    if let Some(c) = cache_size {
        opts.fs.cache_size = c;
    }
    opts.fs.read_ahead = read_ahead;
    opts.fs.store = false;
    opts
}

/// `/proc/self/fd/N`: a path that mount(2) follows to exactly the file `fd` refers to.
pub fn fd_path(fd: &impl AsRawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Create the user and mount namespaces and map `inside_uid`/`inside_gid` to the caller's
/// ids; make every mount private, so nothing done here reaches the host.
pub fn unshare_user_mount(inside_uid: u32, inside_gid: u32) -> Result<(), Error> {
    let uid = Uid::current().as_raw();
    let gid = Gid::current().as_raw();
    wait_single_threaded();
    unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS).map_err(|e| {
        let hint = match fs::read_to_string("/proc/sys/user/max_user_namespaces") {
            Ok(s) if s.trim() == "0" => " (user.max_user_namespaces is 0)",
            _ => " (are unprivileged user namespaces enabled?)",
        };
        Error::userns(format!(
            "{}{hint}",
            errno_msg("cannot create a user namespace", e)
        ))
    })?;
    let write = |file: &str, text: String| {
        fs::write(file, text)
            .map_err(|e| Error::userns(format!("cannot write {file}: {}", io_msg(&e))))
    };
    write("/proc/self/setgroups", "deny".into())?;
    write("/proc/self/uid_map", format!("{inside_uid} {uid} 1\n"))?;
    write("/proc/self/gid_map", format!("{inside_gid} {gid} 1\n"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| Error::userns(errno_msg("cannot make / private", e)))?;
    Ok(())
}

/// unshare(CLONE_NEWUSER) needs a single-threaded process. Helper threads (the image
/// reader's parallel validation) are joined before use, but a joined thread can still be
/// leaving the kernel's thread group for a moment: wait (briefly) until it has.
fn wait_single_threaded() {
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_millis(200) {
        let threads = fs::read_dir("/proc/self/task").map_or(1, |d| d.count());
        if threads <= 1 {
            return;
        }
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
}

/// An io::Error as a lowercase reason.
pub fn io_msg(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => Errno::from_raw(n).desc().to_lowercase(),
        None => e.to_string(),
    }
}

/// Mount a tmpfs at `dir` (in this namespace) with `opts`.
pub fn mount_tmpfs(dir: &Path, opts: &str, what: &str) -> Result<(), Error> {
    mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(opts),
    )
    .map_err(|e| Error::setup(errno_msg(format!("cannot mount a tmpfs for {what}"), e)))
}

/// `mkdir` for the staging area (errors are setup errors naming the path).
pub fn mkdir(path: &Path) -> Result<(), Error> {
    nix::unistd::mkdir(path, Mode::from_bits_truncate(0o755))
        .map_err(|e| Error::setup(errno_msg(format!("cannot create {}", path.display()), e)))
}

/// Open `/dev/fuse` for a mount made in this user namespace (the device file must be opened
/// here: the kernel wants its opener's namespace to own the mount).
pub fn open_dev_fuse() -> Result<OwnedFd, Error> {
    open("/dev/fuse", OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| Error::fuse(errno_msg("cannot open /dev/fuse", e)))
}

/// Mount the FUSE filesystem served on `fuse` at `dir`, read-only, nosuid, nodev. With
/// `allow_other`, any process of this user namespace (and those below it) may use it;
/// without, the kernel lets only processes with the mounting uid and gid (as host ids) use
/// it, in whatever user namespace: a shared server's containers each have their own.
pub fn mount_fuse(
    image: &Path,
    fuse: &OwnedFd,
    dir: &Path,
    (uid, gid): (u32, u32),
    allow_other: bool,
) -> Result<(), Error> {
    let data = cimg_fuse::kernel_mount_data(fuse.as_raw_fd(), uid, gid, allow_other);
    mount(
        Some(image.as_os_str()),
        dir,
        Some("fuse.cimg"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(data.as_str()),
    )
    .map_err(|e| {
        Error::fuse(errno_msg(
            format!("cannot mount {} with FUSE", image.display()),
            e,
        ))
    })
}

/// Make the bind mount at `target` (a descriptor of its root) read-only, keeping the flags
/// the kernel locks (nosuid, nodev, noexec, atime) as they are.
pub fn remount_ro(target: &OwnedFd, what: &str) -> Result<(), Error> {
    let keep = fstatvfs(target)
        .map(|s| s.flags())
        .unwrap_or(FsFlags::empty());
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    for (f, m) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if keep.contains(f) {
            flags |= m;
        }
    }
    mount(
        None::<&str>,
        &fd_path(target),
        None::<&str>,
        flags,
        None::<&str>,
    )
    .map_err(|e| Error::setup(errno_msg(format!("cannot make {what} read-only"), e)))
}

/// The container's root as it is being built: a descriptor of its top directory, and
/// whether missing destinations may be created (`-W`).
pub struct Root {
    fd: OwnedFd,
    writable: bool,
}

/// What to create when a destination is missing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Make {
    /// Nothing: a missing destination is an error.
    No,
    /// A directory.
    Dir,
    /// An empty regular file.
    File,
}

impl Root {
    /// Open the root at `path`.
    pub fn open(path: &Path, writable: bool) -> Result<Root, Error> {
        let fd = open(
            path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| {
            Error::setup(errno_msg(
                format!("cannot open the root {}", path.display()),
                e,
            ))
        })?;
        Ok(Root { fd, writable })
    }

    /// Resolve the absolute container path `p` inside the root (symlinks resolve inside).
    pub fn resolve(&self, p: &Path, flags: OFlag) -> Result<OwnedFd, Errno> {
        let rel = p.strip_prefix("/").unwrap_or(p);
        let rel: &Path = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        openat2(
            self.fd.as_fd(),
            rel,
            OpenHow::new()
                .flags(flags | OFlag::O_CLOEXEC)
                .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS),
        )
    }

    /// An `O_PATH` descriptor of `p` in the container; when it is missing, create it as
    /// `make` says if the root is writable, else fail naming `what`.
    pub fn target(&self, p: &Path, make: Make, what: &str) -> Result<OwnedFd, Error> {
        match self.resolve(p, OFlag::O_PATH) {
            Ok(fd) => Ok(fd),
            Err(Errno::ENOENT) if self.writable && make != Make::No => self.create(p, make, what),
            Err(Errno::ENOENT) => Err(Error::setup(format!(
                "{what}: {} does not exist in the image",
                p.display()
            ))),
            Err(e) => Err(Error::setup(errno_msg(
                format!("{what}: {}", p.display()),
                e,
            ))),
        }
    }

    /// Whether `p` exists in the container.
    pub fn exists(&self, p: &Path) -> bool {
        self.resolve(p, OFlag::O_PATH).is_ok()
    }

    /// Whether `p` is a directory in the container.
    pub fn is_dir(&self, p: &Path) -> bool {
        self.resolve(p, OFlag::O_PATH | OFlag::O_DIRECTORY).is_ok()
    }

    /// Read a file of the container (at most 1 MiB).
    pub fn read(&self, p: &Path) -> Result<Vec<u8>, Errno> {
        use std::io::Read;
        let fd = self.resolve(p, OFlag::O_RDONLY)?;
        let mut buf = Vec::new();
        fs::File::from(fd)
            .take(1 << 20)
            .read_to_end(&mut buf)
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(nix::libc::EIO)))?;
        Ok(buf)
    }

    fn create(&self, p: &Path, make: Make, what: &str) -> Result<OwnedFd, Error> {
        let fail = |e| {
            Error::setup(errno_msg(
                format!("{what}: cannot create {}", p.display()),
                e,
            ))
        };
        let mut cur = PathBuf::from("/");
        let comps: Vec<&OsStr> = p
            .components()
            .filter_map(|c| match c {
                std::path::Component::Normal(n) => Some(n),
                _ => None,
            })
            .collect();
        for (i, name) in comps.iter().enumerate() {
            let next = cur.join(name);
            let last = i + 1 == comps.len();
            match self.resolve(&next, OFlag::O_PATH) {
                Ok(_) => {}
                Err(Errno::ENOENT) => {
                    let parent = self
                        .resolve(&cur, OFlag::O_PATH | OFlag::O_DIRECTORY)
                        .map_err(fail)?;
                    if last && make == Make::File {
                        nix::fcntl::openat(
                            parent.as_fd(),
                            *name,
                            OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_CLOEXEC | OFlag::O_EXCL,
                            Mode::from_bits_truncate(0o644),
                        )
                        .map_err(fail)?;
                    } else {
                        mkdirat(parent.as_fd(), *name, Mode::from_bits_truncate(0o755))
                            .map_err(fail)?;
                    }
                }
                Err(e) => return Err(fail(e)),
            }
            cur = next;
        }
        self.resolve(p, OFlag::O_PATH).map_err(fail)
    }
}

/// Write `text` to a new file `path` (mode 0644) in the staging area.
pub fn write_file(path: &Path, text: &str) -> Result<(), Error> {
    let mut f = fs::File::create(path)
        .map_err(|e| Error::setup(format!("cannot create {}: {}", path.display(), io_msg(&e))))?;
    f.write_all(text.as_bytes())
        .map_err(|e| Error::setup(format!("cannot write {}: {}", path.display(), io_msg(&e))))
}

/// In the app's process, after its own `unshare(CLONE_NEWNS)`: make `root` the root with
/// pivot_root and drop the old root, then change to `cwd`.
pub fn pivot(root: &Path, cwd: &Path) -> Result<(), Error> {
    let fail = |what: &str, e| Error::setup(errno_msg(what, e));
    nix::unistd::chdir(root).map_err(|e| fail("cannot enter the new root", e))?;
    nix::unistd::pivot_root(".", ".").map_err(|e| fail("pivot_root", e))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| fail("cannot detach the old root", e))?;
    nix::unistd::chdir("/").map_err(|e| fail("chdir /", e))?;
    nix::unistd::chdir(cwd).map_err(|e| fail(&format!("cannot change to {}", cwd.display()), e))?;
    Ok(())
}

/// In the app's process, last thing before exec: no new privileges, and no capabilities,
/// not even for uid 0 in the container (empty bounding, ambient, inheritable sets).
pub fn drop_privileges() -> Result<(), Error> {
    use caps::CapSet;
    nix::sys::prctl::set_no_new_privs()
        .map_err(|e| Error::other(errno_msg("PR_SET_NO_NEW_PRIVS", e)))?;
    let fail = |e: caps::errors::CapsError| Error::other(format!("cannot drop capabilities: {e}"));
    caps::clear(None, CapSet::Ambient).map_err(fail)?;
    for cap in caps::all() {
        caps::drop(None, CapSet::Bounding, cap).map_err(fail)?;
    }
    caps::clear(None, CapSet::Inheritable).map_err(fail)?;
    Ok(())
}

/// A command ready to exec: `argv` with `env`, `PATH` of `env` searched for a bare name,
/// every string converted beforehand so that [`Exec::exec`] allocates only to report a
/// failure (it runs in a child that shares launch's memory).
pub struct Exec {
    args: Vec<CString>,
    envp: Vec<CString>,
    candidates: Vec<(PathBuf, CString)>,
    shown: String,
}

impl Exec {
    /// Prepare `argv` (not empty) with `env`.
    pub fn new(argv: &[OsString], env: &crate::plan::Env) -> Exec {
        let cstr = |s: &OsStr| CString::new(s.as_bytes()).unwrap_or_default();
        let args: Vec<CString> = argv.iter().map(|a| cstr(a)).collect();
        let envp: Vec<CString> = env
            .iter()
            .map(|(k, v)| {
                let mut kv = k.as_bytes().to_vec();
                kv.push(b'=');
                kv.extend_from_slice(v.as_bytes());
                CString::new(kv).unwrap_or_default()
            })
            .collect();
        let cmd = argv.first().map(|c| c.as_os_str()).unwrap_or_default();
        let candidates =
            crate::plan::candidates(cmd, env.get(OsStr::new("PATH")).map(|p| p.as_os_str()))
                .into_iter()
                .map(|c| {
                    let cs = cstr(c.as_os_str());
                    (c, cs)
                })
                .collect();
        Exec {
            args,
            envp,
            candidates,
            shown: cmd.to_string_lossy().into_owned(),
        }
    }

    /// Exec the command. Returns only on failure, with the exit code (127 not found, 126 not
    /// executable) and the message.
    pub fn exec(&self) -> Error {
        use crate::error::exit;
        let mut denied: Option<Errno> = None;
        let mut no_interpreter: Option<(&Path, PathBuf)> = None;
        for (cand, path) in &self.candidates {
            let e = nix::unistd::execve(path, &self.args, &self.envp).unwrap_err();
            match e {
                Errno::ENOENT if no_interpreter.is_none() => {
                    no_interpreter = missing_interpreter(cand).map(|i| (cand.as_path(), i));
                }
                Errno::ENOENT | Errno::ENOTDIR => {}
                Errno::EACCES | Errno::ENOEXEC | Errno::EPERM | Errno::EISDIR => {
                    denied.get_or_insert(e);
                }
                e => {
                    return Error::new(exit::NOEXEC, errno_msg(format!("{}", cand.display()), e));
                }
            }
        }
        let shown = &self.shown;
        match (denied, no_interpreter) {
            (Some(e), _) => Error::new(
                exit::NOEXEC,
                errno_msg(format!("cannot execute {shown}"), e),
            ),
            (None, Some((cand, interp))) => Error::new(
                exit::NOTFOUND,
                format!(
                    "cannot execute {}: its interpreter {} is not in the container",
                    cand.display(),
                    interp.display()
                ),
            ),
            (None, None) => Error::new(
                exit::NOTFOUND,
                format!("{shown}: command not found in the container"),
            ),
        }
    }
}

/// Why an exec of `path` failed with `ENOENT` if `path` itself exists: the interpreter its
/// header names (an ELF file's dynamic loader, a script's `#!` line), when that is missing.
fn missing_interpreter(path: &Path) -> Option<PathBuf> {
    use std::io::Read;
    let mut head = Vec::new();
    fs::File::open(path)
        .ok()?
        .take(64 << 10)
        .read_to_end(&mut head)
        .ok()?;
    let interp = cimg_fuse::exec::interpreter(&head)?;
    (!interp.exists()).then_some(interp)
}

/// The plan's inside ids: `-u`/`-g` or the caller's.
pub fn inside_ids(plan: &Plan) -> (u32, u32) {
    (
        plan.uid.unwrap_or(Uid::current().as_raw()),
        plan.gid.unwrap_or(Gid::current().as_raw()),
    )
}
