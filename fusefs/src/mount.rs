//! Mounting an image and serving it: [`mount`] / [`mount_file`] (this crate mounts, itself
//! where mount(2) is allowed, else fuser through `fusermount3`), [`attach_fd`] (the caller
//! mounted a `/dev/fuse` fd itself, with [`kernel_mount_data`]), the [`Server`] that runs the
//! session and its [`Unmounter`], the thread that pushes blocks into the page cache, and the
//! mount's kernel read-ahead ([`mounted_device`], [`set_read_ahead_kb`]).

use crate::cores;
use crate::fs::{self, CacheHandle, CimgFs, FsOptions};
use std::io;
use std::path::{Path, PathBuf};

/// How to mount.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Event loops, each on its own `/dev/fuse` fd (at least 1).
    pub threads: usize,
    /// Filesystem behaviour (cache size, workers, ...).
    pub fs: FsOptions,
    /// Let every user use the mount (`allow_other`; default when running as root).
    pub allow_other: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        let cores = cores();
        MountOptions {
            threads: cores.clamp(1, 16),
            fs: FsOptions {
                workers: cores.clamp(1, 8),
                ..FsOptions::default()
            },
            allow_other: nix::unistd::geteuid().is_root(),
        }
    }
}

/// What can go wrong mounting or serving. Messages name the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The image does not open or validate.
    #[error("{}: {err}", image.display())]
    Image {
        /// Which image.
        image: PathBuf,
        /// Why.
        err: cimg_format::Error,
    },
    /// The mount itself failed.
    #[error("{}: mount: {err}", mountpoint.display())]
    Mount {
        /// Where.
        mountpoint: PathBuf,
        /// Why.
        err: io::Error,
    },
    /// The hot list (`record_hot`) could not be written at unmount.
    #[error("recording the hot list: {0}")]
    HotList(cimg_format::Error),
    /// The session failed while serving.
    #[error("{}: serving: {err}", mountpoint.display())]
    Serve {
        /// Where.
        mountpoint: PathBuf,
        /// Why.
        err: io::Error,
    },
}

/// A mounted image, not yet served.
pub struct Server {
    session: fuser::Session<CimgFs>,
    mountpoint: PathBuf,
    /// Where this crate mounted it itself (mount(2) on a `/dev/fuse` fd it opened), as opposed
    /// to fuser (through `fusermount3`) or the caller ([`attach_fd`]): see [`Server::unmounter`].
    own_mount: Option<PathBuf>,
    /// Where the session leaves the error of writing the hot list (`record_hot`).
    hot_failure: Option<fs::HotFailure>,
    cache: CacheHandle,
}

/// Unmounts a [`Server`]'s mount point from another thread (e.g. on SIGTERM).
pub enum Unmounter {
    /// This crate mounted it: unmount by path.
    Path(PathBuf),
    /// fuser mounted it (through `fusermount3`): fuser unmounts it. (After [`attach_fd`] the
    /// caller owns the mount and this does nothing.)
    Fuser(fuser::SessionUnmounter),
}

impl Unmounter {
    /// Unmount now; [`Server::run`] then returns once the kernel has let go. Fails with
    /// EBUSY while files are open on it.
    pub fn unmount(&mut self) -> io::Result<()> {
        match self {
            Unmounter::Path(p) => {
                nix::mount::umount2(p.as_path(), nix::mount::MntFlags::empty())?;
                Ok(())
            }
            Unmounter::Fuser(u) => u.unmount(),
        }
    }
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("mountpoint", &self.mountpoint)
            .finish()
    }
}

/// Blocks waiting to be pushed into the page cache; when full, pushes are skipped.
const STORE_QUEUE: usize = 64;

/// The fuser configuration for `opts` (mount options apply only when fuser mounts).
fn config(image_name: &str, opts: &MountOptions) -> fuser::Config {
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        fuser::MountOption::RO,
        fuser::MountOption::FSName(image_name.to_string()),
        fuser::MountOption::Subtype("cimg".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoAtime,
    ];
    if opts.allow_other {
        cfg.acl = fuser::SessionACL::All;
    }
    cfg.n_threads = Some(opts.threads.max(1));
    cfg.clone_fd = true;
    cfg
}

/// The queue of page-cache pushes, if `opts` want them ([`FsOptions::store`]).
fn store_channel(
    fs: &CimgFs,
    opts: &MountOptions,
) -> Option<crossbeam_channel::Receiver<fs::StoreJob>> {
    if !opts.fs.store {
        return None;
    }
    let (tx, rx) = crossbeam_channel::bounded(STORE_QUEUE);
    fs.set_store(tx);
    Some(rx)
}

/// Start the thread that pushes freshly decompressed blocks into the kernel page cache.
fn start_store(
    session: &fuser::Session<CimgFs>,
    store_rx: crossbeam_channel::Receiver<fs::StoreJob>,
) -> io::Result<()> {
    let notifier = session.notifier();
    std::thread::Builder::new()
        .name("cimg-store".into())
        .spawn(move || fs::store_loop(&notifier, &store_rx))
        .map(|_| ())
}

/// Open and validate `image`, and mount it read-only on `mountpoint`. The kernel handshake is
/// done when this returns; requests are answered once the server runs.
///
/// Where mount(2) is allowed, this crate mounts itself and gives fuser only the fd, so that
/// the end of the session never unmounts by path: fuser 0.18 does, even when the kernel has
/// already let go (its `is_mounted` reads `POLLERR` the wrong way round), and so unmounted
/// whatever had been mounted on the same directory since (`umount DIR; cimg-mount IMG DIR`
/// lost the new mount 2–3 times in 45–120 tries). Through `fusermount3` fuser still mounts, and
/// that race remains.
pub fn mount(image: &Path, mountpoint: &Path, opts: &MountOptions) -> Result<Server, MountError> {
    let file = std::fs::File::open(image).map_err(|err| MountError::Image {
        image: image.to_path_buf(),
        err: cimg_format::Error::Io {
            path: image.to_path_buf(),
            err,
        },
    })?;
    mount_file(file, image, mountpoint, opts)
}

/// [`mount`] of an image already open as `file` (`image` names it in errors and is the
/// mount's source): a caller that opened it before, e.g. to advise the kernel, does not
/// open it again (on a parallel filesystem every open is a metadata operation).
pub fn mount_file(
    file: std::fs::File,
    image: &Path,
    mountpoint: &Path,
    opts: &MountOptions,
) -> Result<Server, MountError> {
    // Lazily: the metadata is decompressed and checked as the kernel asks for it, so that a
    // mount of a million files answers its first stat without decompressing all of them,
    // and a corrupt record gives EIO to the request that meets it.
    let lazy = cimg_format::OpenOptions {
        lazy: true,
        ..Default::default()
    };
    let img =
        cimg_format::Image::from_reader(file, image, &lazy).map_err(|err| MountError::Image {
            image: image.to_path_buf(),
            err,
        })?;
    let fs = CimgFs::new(img, opts.fs.clone());
    let hot_failure = fs.hot_failure();
    let cache = fs.cache_handle();
    let store_rx = store_channel(&fs, opts);
    let cfg = config(&image.display().to_string(), opts);
    let mount_err = |err| MountError::Mount {
        mountpoint: mountpoint.to_path_buf(),
        err,
    };
    let (session, own_mount) = match mount_direct(image, mountpoint, opts).map_err(mount_err)? {
        Some(fd) => (
            fuser::Session::from_fd(fs, fd, cfg.acl, cfg).map_err(mount_err)?,
            Some(std::path::absolute(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf())),
        ),
        None => (
            fuser::Session::new(fs, mountpoint, &cfg).map_err(mount_err)?,
            None,
        ),
    };
    if let Some(rx) = store_rx {
        start_store(&session, rx).map_err(mount_err)?;
    }
    Ok(Server {
        session,
        mountpoint: mountpoint.to_path_buf(),
        own_mount,
        hot_failure,
        cache,
    })
}

/// mount(2) of a fresh `/dev/fuse` fd on `mountpoint`, with the options fuser would use;
/// `None` if mount(2) is not allowed here (EPERM: an ordinary user).
fn mount_direct(
    image: &Path,
    mountpoint: &Path,
    opts: &MountOptions,
) -> io::Result<Option<std::os::fd::OwnedFd>> {
    use nix::fcntl::OFlag;
    use nix::mount::MsFlags;
    use std::os::fd::AsRawFd;
    let fd = nix::fcntl::open(
        "/dev/fuse",
        OFlag::O_RDWR | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    let data = kernel_mount_data(
        fd.as_raw_fd(),
        nix::unistd::getuid().as_raw(),
        nix::unistd::getgid().as_raw(),
        opts.allow_other,
    );
    let flags = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOATIME;
    match nix::mount::mount(
        Some(image.as_os_str()),
        mountpoint,
        Some("fuse.cimg"),
        flags,
        Some(data.as_str()),
    ) {
        Ok(()) => Ok(Some(fd)),
        Err(nix::errno::Errno::EPERM) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Read-ahead `cimg-mount` asks the kernel for (`--read-ahead-kb`): 1 MiB. The kernel's
/// default for a FUSE mount is 128 KiB; a wider window keeps more bytes in flight while the
/// workers decompress, which a cold sequential read gains from (`fuse-bench`'s big file;
/// figures in `docs/perf.md`). `launch` keeps the default: a start-up mostly faults in pieces
/// of executables, where a bigger window only decompresses more.
pub const DEFAULT_READ_AHEAD_KB: u32 = 1024;

/// The device number (`major:minor`) of the filesystem mounted last on `mountpoint` (an
/// absolute path without symlinks), from `/proc/self/mountinfo`: found without any request
/// to the filesystem, so it works before the server answers.
pub fn mounted_device(mountpoint: &Path) -> io::Result<(u32, u32)> {
    use std::os::unix::ffi::OsStrExt;
    // mountinfo escapes space, tab, newline and backslash as octal.
    let mut want = Vec::new();
    for &b in mountpoint.as_os_str().as_bytes() {
        match b {
            b' ' | b'\t' | b'\n' | b'\\' => want.extend_from_slice(format!("\\{b:03o}").as_bytes()),
            _ => want.push(b),
        }
    }
    let info = std::fs::read("/proc/self/mountinfo")?;
    info.split(|&c| c == b'\n')
        .filter_map(|line| {
            let mut f = line.split(|&c| c == b' ');
            let dev = f.nth(2)?;
            let mp = f.nth(1)?;
            (mp == want.as_slice()).then_some(dev)
        })
        .next_back()
        .and_then(|dev| {
            let dev = std::str::from_utf8(dev).ok()?;
            let (a, b) = dev.split_once(':')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{}: not a mount point", mountpoint.display()),
            )
        })
}

/// Set the kernel read-ahead of the filesystem on device `major:minor` (its bdi's
/// `read_ahead_kb`; writable by root only).
pub fn set_read_ahead_kb((major, minor): (u32, u32), kib: u32) -> io::Result<()> {
    std::fs::write(
        format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb"),
        format!("{kib}\n"),
    )
}

/// The data option string for mount(2) of a FUSE filesystem served on `/dev/fuse` fd `fd`:
/// for callers that mount it themselves (the launcher, inside its namespaces) and hand the fd
/// to [`attach_fd`]. The root is a directory; requests from `uid`/`gid` (as the mounting
/// process sees them) are allowed, from everyone in the mount's user namespace with
/// `allow_other`; the kernel checks permissions (`default_permissions`).
pub fn kernel_mount_data(fd: i32, uid: u32, gid: u32, allow_other: bool) -> String {
    let mut data =
        format!("fd={fd},rootmode=40000,user_id={uid},group_id={gid},default_permissions");
    if allow_other {
        data.push_str(",allow_other");
    }
    data
}

/// Attach an already opened image to a `/dev/fuse` fd that the caller mounts itself (see
/// [`kernel_mount_data`]): blocks in the kernel handshake until the mount exists, then
/// returns the server; [`Server::run`] serves until the kernel lets go of the filesystem
/// (it is unmounted, or the last mount namespace holding it disappears). `name` names the
/// mount in errors.
pub fn attach_fd(
    img: cimg_format::Image,
    fd: std::os::fd::OwnedFd,
    name: &Path,
    opts: &MountOptions,
) -> Result<Server, MountError> {
    let fs = CimgFs::new(img, opts.fs.clone());
    let hot_failure = fs.hot_failure();
    let cache = fs.cache_handle();
    let store_rx = store_channel(&fs, opts);
    let cfg = config(&name.display().to_string(), opts);
    let acl = cfg.acl;
    let mount_err = |err| MountError::Mount {
        mountpoint: name.to_path_buf(),
        err,
    };
    let session = fuser::Session::from_fd(fs, fd, acl, cfg).map_err(mount_err)?;
    if let Some(rx) = store_rx {
        start_store(&session, rx).map_err(mount_err)?;
    }
    Ok(Server {
        session,
        mountpoint: name.to_path_buf(),
        own_mount: None,
        hot_failure,
        cache,
    })
}

impl Server {
    /// A handle that unmounts from another thread (e.g. on SIGTERM); [`Server::run`] then
    /// returns once the kernel has let go.
    pub fn unmounter(&mut self) -> Unmounter {
        match &self.own_mount {
            Some(p) => Unmounter::Path(p.clone()),
            None => Unmounter::Fuser(self.session.unmount_callable()),
        }
    }

    /// The filesystem's block cache, reachable while [`Server::run`] serves.
    pub fn cache(&self) -> CacheHandle {
        self.cache.clone()
    }

    /// Serve until unmounted; then, with `record_hot`, the hot list has been written, and
    /// failing to is an error.
    pub fn run(self) -> Result<(), MountError> {
        let mountpoint = self.mountpoint;
        self.session
            .run()
            .map_err(|err| MountError::Serve { mountpoint, err })?;
        match self
            .hot_failure
            .and_then(|f| f.lock().unwrap_or_else(|p| p.into_inner()).take())
        {
            Some(e) => Err(MountError::HotList(e)),
            None => Ok(()),
        }
    }
}
