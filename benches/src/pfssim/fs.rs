//! The simulator's `fuser::Filesystem`: a read-only passthrough of a local directory that counts
//! every request, charges metadata requests to the shared metadata-server [`TokenBucket`] and
//! adds the configured latency to every reply (through the [`Delayer`]).
//!
//! Kernel caching is set up like a parallel-filesystem client that revalidates: entry and
//! attribute TTLs from the config (0 by default), no `FOPEN_KEEP_CACHE` unless asked (so every
//! open drops the file's cached pages), no readdirplus, no cached symlinks.

use super::SimConfig;
use super::stats::{Op, Stats};
use super::timing::{Delayer, TokenBucket};
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

/// What every mount of one simulator shares: configuration, counters, the metadata server's
/// rate limit and the reply delayer.
#[derive(Debug)]
pub struct Shared {
    pub cfg: SimConfig,
    pub stats: Stats,
    pub bucket: Option<TokenBucket>,
    pub delayer: Delayer,
}

impl Shared {
    /// Count a metadata request and return when its reply is due.
    fn meta(&self, op: Op) -> Instant {
        self.stats.count(op);
        let start = match &self.bucket {
            Some(b) => b.reserve(),
            None => Instant::now(),
        };
        start + self.cfg.meta_latency
    }
}

/// Inode numbers handed to the kernel, mapped to backing paths. Entries are never forgotten
/// (the trees served are a few hundred thousand entries at most).
#[derive(Default)]
struct Inodes {
    paths: HashMap<u64, PathBuf>,
    by_host: HashMap<(u64, u64), u64>,
    next: u64,
}

/// An open directory: its entries, read once at opendir.
struct DirList(Vec<(u64, FileType, OsString)>);

/// An open file and where its last read ended.
struct OpenFile {
    file: File,
    last_end: AtomicU64,
}

/// One mount of the simulator over `root`.
pub struct PfsFs {
    shared: Arc<Shared>,
    inodes: Mutex<Inodes>,
    files: Mutex<HashMap<u64, Arc<OpenFile>>>,
    dirs: Mutex<HashMap<u64, Arc<DirList>>>,
    next_fh: AtomicU64,
    root: PathBuf,
}

impl std::fmt::Debug for PfsFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PfsFs").field("root", &self.root).finish()
    }
}

fn kind_of(ft: std::fs::FileType) -> FileType {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        FileType::Directory
    } else if ft.is_symlink() {
        FileType::Symlink
    } else if ft.is_block_device() {
        FileType::BlockDevice
    } else if ft.is_char_device() {
        FileType::CharDevice
    } else if ft.is_fifo() {
        FileType::NamedPipe
    } else if ft.is_socket() {
        FileType::Socket
    } else {
        FileType::RegularFile
    }
}

/// The errno of `e` (EIO when it has none).
fn errno(e: &io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(0))
}

fn time(sec: i64, nsec: i64) -> std::time::SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec.clamp(0, 999_999_999) as u32)
    } else {
        UNIX_EPOCH
    }
}

fn attr(ino: u64, m: &std::fs::Metadata) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: m.len(),
        blocks: m.blocks(),
        atime: time(m.atime(), m.atime_nsec()),
        mtime: time(m.mtime(), m.mtime_nsec()),
        ctime: time(m.ctime(), m.ctime_nsec()),
        crtime: time(m.mtime(), m.mtime_nsec()),
        kind: kind_of(m.file_type()),
        perm: (m.mode() & 0o7777) as u16,
        nlink: m.nlink() as u32,
        uid: m.uid(),
        gid: m.gid(),
        rdev: m.rdev() as u32,
        blksize: m.blksize() as u32,
        flags: 0,
    }
}

impl PfsFs {
    pub fn new(root: PathBuf, shared: Arc<Shared>) -> Self {
        let mut inodes = Inodes {
            next: 2,
            ..Default::default()
        };
        inodes.paths.insert(1, root.clone());
        if let Ok(m) = std::fs::metadata(&root) {
            inodes.by_host.insert((m.dev(), m.ino()), 1);
        }
        PfsFs {
            shared,
            inodes: Mutex::new(inodes),
            files: Mutex::default(),
            dirs: Mutex::default(),
            next_fh: AtomicU64::new(1),
            root,
        }
    }

    fn path(&self, ino: INodeNo) -> Result<PathBuf, Errno> {
        let t = self.inodes.lock().unwrap_or_else(|e| e.into_inner());
        t.paths.get(&ino.0).cloned().ok_or(Errno::ENOENT)
    }

    /// The kernel inode number of the backing file `(dev, ino)` found at `path`.
    fn intern(&self, dev: u64, host_ino: u64, path: &Path) -> u64 {
        let mut t = self.inodes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&i) = t.by_host.get(&(dev, host_ino)) {
            return i;
        }
        let i = t.next;
        t.next += 1;
        t.by_host.insert((dev, host_ino), i);
        t.paths.insert(i, path.to_path_buf());
        i
    }

    fn fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    fn later(&self, at: Instant, job: impl FnOnce() + Send + 'static) {
        self.shared.delayer.at(at, job);
    }

    fn read_dir(&self, dir: &Path, ino: u64) -> io::Result<DirList> {
        let mut v = vec![
            (ino, FileType::Directory, OsString::from(".")),
            (ino, FileType::Directory, OsString::from("..")),
        ];
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let m = e.metadata()?;
            let path = e.path();
            let i = self.intern(m.dev(), m.ino(), &path);
            v.push((i, kind_of(m.file_type()), e.file_name()));
        }
        Ok(DirList(v))
    }
}

impl Filesystem for PfsFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        for cap in [
            InitFlags::FUSE_ASYNC_READ,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_MAX_PAGES,
        ] {
            let _ = config.add_capabilities(cap);
        }
        let _ = config.set_max_background(256);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let due = self.shared.meta(Op::Lookup);
        let ttl = self.shared.cfg.entry_ttl;
        let r = self.path(parent).and_then(|p| {
            let path = p.join(name);
            let m = std::fs::symlink_metadata(&path).map_err(|e| errno(&e))?;
            let i = self.intern(m.dev(), m.ino(), &path);
            Ok(attr(i, &m))
        });
        self.later(due, move || match r {
            Ok(a) => reply.entry(&ttl, &a, Generation(0)),
            Err(e) => reply.error(e),
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let due = self.shared.meta(Op::Getattr);
        let ttl = self.shared.cfg.attr_ttl;
        let r = self.path(ino).and_then(|p| {
            let m = std::fs::symlink_metadata(&p).map_err(|e| errno(&e))?;
            Ok(attr(ino.0, &m))
        });
        self.later(due, move || match r {
            Ok(a) => reply.attr(&ttl, &a),
            Err(e) => reply.error(e),
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let due = self.shared.meta(Op::Readlink);
        let r = self.path(ino).and_then(|p| {
            std::fs::read_link(&p)
                .map(|t| t.into_os_string().into_encoded_bytes())
                .map_err(|e| errno(&e))
        });
        self.later(due, move || match r {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(e),
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let due = self.shared.meta(Op::Open);
        let keep = if self.shared.cfg.keep_cache {
            FopenFlags::FOPEN_KEEP_CACHE
        } else {
            FopenFlags::empty()
        };
        let r = if flags.acc_mode() != OpenAccMode::O_RDONLY {
            Err(Errno::EROFS)
        } else {
            self.path(ino).and_then(|p| {
                let f = File::open(&p).map_err(|e| errno(&e))?;
                let fh = self.fh();
                self.files.lock().unwrap_or_else(|e| e.into_inner()).insert(
                    fh,
                    Arc::new(OpenFile {
                        file: f,
                        last_end: AtomicU64::new(0),
                    }),
                );
                Ok(fh)
            })
        };
        self.later(due, move || match r {
            Ok(fh) => reply.opened(FileHandle(fh), keep),
            Err(e) => reply.error(e),
        });
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let stats = &self.shared.stats;
        stats.count(Op::Read);
        let start = Instant::now();
        let file = self
            .files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&fh.0)
            .cloned();
        let r = match file {
            None => Err(Errno::EBADF),
            Some(of) => {
                let f = &of.file;
                let mut buf = vec![0u8; size as usize];
                let mut got = 0usize;
                loop {
                    match f.read_at(&mut buf[got..], offset + got as u64) {
                        Ok(0) => break Ok(buf),
                        Ok(n) => {
                            got += n;
                            if got == buf.len() {
                                break Ok(buf);
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => break Err(errno(&e)),
                    }
                }
                .map(|mut b| {
                    b.truncate(got);
                    let end = offset + got as u64;
                    if of.last_end.swap(end, Ordering::Relaxed) == offset {
                        stats.count_sequential();
                    }
                    b
                })
            }
        };
        let n = r.as_ref().map(|b| b.len()).unwrap_or(0) as u64;
        stats.add_bytes(n);
        let cfg = &self.shared.cfg;
        let mut due = start + cfg.read_latency;
        if cfg.read_bandwidth > 0.0 {
            due += Duration::from_secs_f64(n as f64 / cfg.read_bandwidth);
        }
        self.later(due, move || match r {
            Ok(b) => reply.data(&b),
            Err(e) => reply.error(e),
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let due = self.shared.meta(Op::Release);
        self.files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fh.0);
        self.later(due, move || reply.ok());
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let due = self.shared.meta(Op::Opendir);
        let r = self.path(ino).and_then(|p| {
            let list = self.read_dir(&p, ino.0).map_err(|e| errno(&e))?;
            let fh = self.fh();
            self.dirs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(fh, Arc::new(list));
            Ok(fh)
        });
        self.later(due, move || match r {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let due = self.shared.meta(Op::Readdir);
        let list = self
            .dirs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&fh.0)
            .cloned();
        let Some(list) = list else {
            return self.later(due, move || reply.error(Errno::EBADF));
        };
        for (k, (i, kind, name)) in list.0.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*i), k as u64 + 1, *kind, name) {
                break;
            }
        }
        self.later(due, move || reply.ok());
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let due = self.shared.meta(Op::Releasedir);
        self.dirs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fh.0);
        self.later(due, move || reply.ok());
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let due = self.shared.meta(Op::Statfs);
        let r = nix::sys::statvfs::statvfs(&self.root);
        self.later(due, move || match r {
            Ok(s) => reply.statfs(
                s.blocks(),
                s.blocks_free(),
                s.blocks_available(),
                s.files(),
                s.files_free(),
                s.block_size() as u32,
                s.name_max() as u32,
                s.fragment_size() as u32,
            ),
            Err(e) => reply.error(Errno::from_i32(e as i32)),
        });
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        let due = self.shared.meta(Op::Getxattr);
        self.later(due, move || reply.error(Errno::NO_XATTR));
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        let due = self.shared.meta(Op::Listxattr);
        self.later(due, move || {
            if size == 0 {
                reply.size(0)
            } else {
                reply.data(&[])
            }
        });
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let due = self.shared.meta(Op::Access);
        let r = self.path(ino).and_then(|p| {
            std::fs::symlink_metadata(&p).map_err(|e| errno(&e))?;
            Ok(())
        });
        self.later(due, move || match r {
            Ok(()) if mask.contains(AccessFlags::W_OK) => reply.error(Errno::EROFS),
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        });
    }
}
