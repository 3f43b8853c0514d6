//! The `fuser::Filesystem` over a [`cimg_format::Image`].
//!
//! Inode numbers are the image's inode indexes, used as FUSE node ids directly (the root is
//! 1), so the filesystem keeps no per-inode state and ignores `forget`. Every operation is a
//! thin shim that calls an inner function returning [`Fail`] and answers through one errno
//! mapping ([`Fail::errno`]); a bad data block is logged once (block, inode, paths) and its
//! readers get EIO while everything else keeps being served.
//!
//! Kernel caching: entries and attributes carry a one-year TTL (the image never changes),
//! missing names are answered as negative entries (node id 0) with the same TTL, OPEN and
//! OPENDIR are answered with ENOSYS once (the kernel then opens without asking, with
//! `FOPEN_KEEP_CACHE` / `FOPEN_CACHE_DIR`; with `zero_open` off they answer those flags
//! explicitly), symlinks are cached (`FUSE_CACHE_SYMLINKS`), every directory listing is a
//! readdirplus (not `FUSE_READDIRPLUS_AUTO`, whose switch to plain readdir after the first
//! batch of a large directory costs one LOOKUP per later entry that is then stat'ed: a
//! listing answered with attributes trades a bigger reply for no LOOKUPs; the cold walk of
//! `fuse-bench`, figures in `docs/perf.md`), lookups in one directory run in parallel
//! (`FUSE_PARALLEL_DIROPS`) and `max_background` is raised so readahead is not throttled.
//!
//! Every write operation answers EROFS: the refusals are together at the end of the
//! `Filesystem` impl (with OPEN for writing or truncation and `access(W_OK)`, which answer
//! it too).
//!
//! The rest of the filesystem lives in private modules of its own, each an `impl` of the
//! state shared by the event loops and the workers (`Inner`): the read path and the worker
//! pool (`read.rs`), page-cache pushes (`push.rs`), read-ahead and the prefetch threads
//! (`prefetch.rs`), and the hot-list recorder (`hot.rs`).

use crate::cache::BlockCache;
use cimg_format::{Attr, Error, FileKind, Image};
use crossbeam_channel::{Receiver, Sender};
use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use crate::hot::HotFailure;
use crate::hot::HotRecorder;
pub use crate::prefetch::{PREFETCH_BLOCKS, cpu_busy};
use crate::prefetch::{PREFETCH_QUEUE, RECENT, SEQ_SHARDS};
use crate::push::Tails;
pub use crate::push::{StoreJob, store_loop};
use crate::read::{READ_QUEUE, ReadJob};

/// TTL of entries and attributes: the image is immutable. (Not `Duration::MAX`: the kernel
/// converts the seconds to a signed count.)
pub const TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// The largest READ asked of an image of small blocks: the kernel's default read-ahead, so
/// a mount as an ordinary user (who cannot raise it) keeps that window.
const READ_MIN: u32 = 128 << 10;

/// Default size of the decompressed-block cache: 256 MiB.
pub const DEFAULT_CACHE_SIZE: u64 = 256 << 20;

/// How the filesystem behaves.
#[derive(Debug, Clone)]
pub struct FsOptions {
    /// Bytes of decompressed blocks to cache.
    pub cache_size: u64,
    /// Decompression worker threads for prefetch (0: no prefetch).
    pub workers: usize,
    /// Answer OPEN/OPENDIR with ENOSYS so the kernel stops sending them.
    pub zero_open: bool,
    /// Prefetch the image's hot blocks at mount.
    pub prefetch_hot: bool,
    /// Read ahead (in image order, and after sequential reads of a file) on the workers.
    /// Off for a short container start on few cores, where decompressing blocks nobody asks
    /// for takes the CPU from the application (`launch-bench`).
    pub read_ahead: bool,
    /// Push the rest of a freshly decompressed block, and the tails in it of the files the
    /// kernel knows, into the kernel's page cache (FUSE_NOTIFY_STORE, on its own thread).
    /// Off in `launch`: the kernel takes page locks for a store without a way to interrupt
    /// it, so a store into pages that a read in flight has locked waits for that read's
    /// answer; if the server is SIGKILLed then, the storing thread can never exit, the dying
    /// server keeps its `/dev/fuse` fds, and the container hangs (seen in CI). `cimg-mount`
    /// keeps it: it pays for small random reads and small-file trees, and a SIGKILLed daemon
    /// in that state is freed by aborting the connection (`umount -f`, or
    /// `/sys/fs/fuse/connections/N/abort`).
    pub store: bool,
    /// Record the order in which regular files are first read, and write it here (one path
    /// per line, as `cimg pack --hot` reads it) when the filesystem is unmounted.
    pub record_hot: Option<PathBuf>,
    /// The program about to be started on this mount: when the workers start, its file, ELF
    /// interpreter and shared libraries are found ([`crate::exec`]) and their blocks
    /// decompressed ahead on the workers (at most half the cache).
    pub exec: Option<crate::exec::ExecHint>,
    /// A process whose reads only fill the page cache ahead of others (`launch`'s read-ahead
    /// helper, [`crate::warm`]): its reads that must load blocks wait behind everyone
    /// else's, so that the application is never queued behind its own read-ahead.
    pub background_pid: Option<u32>,
}

impl Default for FsOptions {
    fn default() -> Self {
        FsOptions {
            cache_size: DEFAULT_CACHE_SIZE,
            workers: 4,
            zero_open: true,
            prefetch_hot: true,
            read_ahead: true,
            store: true,
            record_hot: None,
            exec: None,
            background_pid: None,
        }
    }
}

/// Why an operation failed: an image error (mapped by [`errno_of`]) or a plain errno.
#[derive(Debug)]
pub enum Fail {
    /// From the image reader.
    Image(Error),
    /// Answer this errno.
    Errno(Errno),
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Fail::Image(e)
    }
}

impl Fail {
    /// The one errno mapping of the filesystem.
    pub fn errno(&self) -> Errno {
        match self {
            Fail::Image(e) => errno_of(e),
            Fail::Errno(e) => *e,
        }
    }
}

/// The errno answered for an image error: the system's own for an I/O error (EIO if it gave
/// none), ENOENT for a missing path, ENOTDIR or EINVAL for the wrong file type, EIO for
/// everything else (a corrupt image or block, an unsupported feature). The reader knows
/// nothing of errnos: this mapping is the filesystem's.
pub fn errno_of(e: &Error) -> Errno {
    match e {
        Error::Io { err, .. } => err.raw_os_error().map_or(Errno::EIO, Errno::from_i32),
        Error::NotFound(_) => Errno::ENOENT,
        Error::WrongType { what, .. } if what.contains("directory") => Errno::ENOTDIR,
        Error::WrongType { .. } => Errno::EINVAL,
        _ => Errno::EIO,
    }
}

pub(crate) type FResult<T> = Result<T, Fail>;

/// State shared by the event loops and the workers.
pub(crate) struct Inner {
    pub(crate) img: Image,
    pub(crate) cache: BlockCache,
    pub(crate) blksize: u32,
    /// Bad blocks already logged.
    pub(crate) logged: Mutex<HashSet<u32>>,
    /// Where freshly decompressed blocks go to be pushed into the kernel's page cache
    /// (see [`StoreJob`]); unset until the session exists.
    pub(crate) store: std::sync::OnceLock<Sender<StoreJob>>,
    /// The prefetch queue of the workers, for image-order read-ahead (see
    /// [`Inner::read_ahead`]); unset without workers. (The workers stop when the read-job
    /// channel closes, so this sender does not keep them alive.)
    pub(crate) prefetch: std::sync::OnceLock<Sender<u32>>,
    /// Recently read blocks, direct-mapped by index modulo [`RECENT`]: whether the reader
    /// of a block just read the one or two before it.
    pub(crate) recent: [AtomicU32; RECENT],
    /// Tails of the files the kernel knows, by block, pushed when their block is loaded.
    pub(crate) tails: Tails,
}

/// A handle on a filesystem's decompressed-block cache that outlives the borrow of the
/// filesystem by its session: a server gone idle gives the cache's memory back with it.
#[derive(Clone)]
pub struct CacheHandle(Arc<Inner>);

impl std::fmt::Debug for CacheHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("CacheHandle").field(&self.0.cache).finish()
    }
}

impl CacheHandle {
    /// Drop every cached block ([`BlockCache::clear`]).
    pub fn clear(&self) {
        self.0.cache.clear();
    }

    /// Bytes the cache holds.
    pub fn bytes(&self) -> u64 {
        self.0.cache.bytes()
    }
}

/// The filesystem. Cheap to build: the image was validated by [`Image::open`].
pub struct CimgFs {
    pub(crate) inner: Arc<Inner>,
    pub(crate) opts: FsOptions,
    /// Prefetch queue; `None` without workers. Dropping it stops the workers.
    pub(crate) tx: Option<Sender<u32>>,
    pub(crate) rx: Option<Receiver<u32>>,
    /// Reads whose blocks must be loaded, answered by the workers; `None` without workers.
    pub(crate) jobs: Option<Sender<ReadJob>>,
    pub(crate) jobs_rx: Option<Receiver<ReadJob>>,
    /// The same for the reads of [`FsOptions::background_pid`], taken after the others.
    pub(crate) background: Option<Sender<ReadJob>>,
    pub(crate) background_rx: Option<Receiver<ReadJob>>,
    /// Per inode: where the last read ended (sequential-read detection).
    pub(crate) seq: Box<[Mutex<HashMap<u32, u64>>]>,
    /// First-read order of files, with `--record-hot`.
    pub(crate) hot: Option<HotRecorder>,
}

impl std::fmt::Debug for CimgFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CimgFs")
            .field("image", &self.inner.img)
            .field("cache", &self.inner.cache)
            .field("opts", &self.opts)
            .finish()
    }
}

fn file_type(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::CharDev => FileType::CharDevice,
        FileKind::BlockDev => FileType::BlockDevice,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
    }
}

fn time(sec: i64, nsec: u32) -> SystemTime {
    let t = if sec >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(sec.unsigned_abs()))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(sec.unsigned_abs()))
    };
    t.and_then(|t| t.checked_add(Duration::from_nanos(nsec.into())))
        .unwrap_or(UNIX_EPOCH)
}

fn file_attr(a: &Attr, blksize: u32) -> FileAttr {
    let t = time(a.mtime_sec, a.mtime_nsec);
    FileAttr {
        ino: INodeNo(a.ino.into()),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        kind: file_type(a.kind),
        perm: a.perm() as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev as u32,
        blksize,
        flags: 0,
    }
}

/// The node id as an image inode number (ids above `u32::MAX` name nothing).
fn ino(i: INodeNo) -> FResult<u32> {
    u32::try_from(i.0).map_err(|_| Fail::Errno(Errno::ENOENT))
}

impl CimgFs {
    /// A filesystem over `img`.
    pub fn new(img: Image, opts: FsOptions) -> Self {
        let blksize = img.block_size();
        let img_inodes = img.inode_count();
        let inner = Arc::new(Inner {
            img,
            cache: BlockCache::new(opts.cache_size),
            blksize,
            logged: Mutex::new(HashSet::new()),
            store: std::sync::OnceLock::new(),
            prefetch: std::sync::OnceLock::new(),
            recent: std::array::from_fn(|_| AtomicU32::new(u32::MAX)),
            // Recording the first reads needs every first read to reach the server: a file
            // whose bytes were pushed is read without one, so nothing is registered then.
            tails: Tails::new(
                img_inodes,
                if opts.record_hot.is_some() {
                    0
                } else {
                    opts.cache_size
                },
            ),
        });
        let (tx, rx, jobs, jobs_rx, background, background_rx) = if opts.workers > 0 {
            let (tx, rx) = crossbeam_channel::bounded(PREFETCH_QUEUE);
            let (jobs, jobs_rx) = crossbeam_channel::bounded(READ_QUEUE);
            let (bg, bg_rx) = crossbeam_channel::bounded(READ_QUEUE);
            (
                Some(tx),
                Some(rx),
                Some(jobs),
                Some(jobs_rx),
                Some(bg),
                Some(bg_rx),
            )
        } else {
            (None, None, None, None, None, None)
        };
        if let Some(tx) = &tx
            && opts.read_ahead
        {
            let _ = inner.prefetch.set(tx.clone());
        }
        let hot = opts
            .record_hot
            .is_some()
            .then(|| HotRecorder::new(inner.img.inode_count()));
        CimgFs {
            inner,
            opts,
            tx,
            rx,
            jobs,
            jobs_rx,
            background,
            background_rx,
            hot,
            seq: (0..SEQ_SHARDS)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
        }
    }

    /// Send freshly decompressed blocks to `tx`, for [`store_loop`] to push into the kernel's
    /// page cache. Returns false if already set.
    pub fn set_store(&self, tx: Sender<StoreJob>) -> bool {
        self.inner.store.set(tx).is_ok()
    }

    /// A handle on the block cache, for a server that gives its memory back when idle.
    pub fn cache_handle(&self) -> CacheHandle {
        CacheHandle(self.inner.clone())
    }

    /// With `record_hot`: where the error of writing the hot list at unmount is left.
    pub fn hot_failure(&self) -> Option<HotFailure> {
        self.hot.as_ref().map(|h| h.failed.clone())
    }

    /// The image served.
    pub fn image(&self) -> &Image {
        &self.inner.img
    }

    /// The block cache.
    pub fn cache(&self) -> &BlockCache {
        &self.inner.cache
    }

    fn do_lookup(&self, parent: INodeNo, name: &OsStr) -> FResult<Option<FileAttr>> {
        let img = &self.inner.img;
        match img.lookup(ino(parent)?, name.as_bytes())? {
            Some(i) => {
                let a = img.attr(i)?;
                self.inner.note_file(&a);
                Ok(Some(file_attr(&a, self.inner.blksize)))
            }
            None => Ok(None),
        }
    }

    fn do_getattr(&self, i: INodeNo) -> FResult<FileAttr> {
        Ok(file_attr(
            &self.inner.img.attr(ino(i)?)?,
            self.inner.blksize,
        ))
    }

    fn do_open(&self, i: INodeNo, flags: OpenFlags, dir: bool) -> FResult<FopenFlags> {
        if flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & libc_o_trunc() != 0 {
            return Err(Fail::Errno(Errno::EROFS));
        }
        let a = self.inner.img.attr(ino(i)?)?;
        if dir && a.kind != FileKind::Dir {
            return Err(Fail::Errno(Errno::ENOTDIR));
        }
        if self.opts.zero_open {
            return Err(Fail::Errno(Errno::ENOSYS));
        }
        Ok(if dir {
            FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR
        } else {
            FopenFlags::FOPEN_KEEP_CACHE
        })
    }

    /// Fill a readdir reply from position `offset`: 0 is `.`, 1 is `..`, `i + 2` is entry
    /// `i`; each entry carries the position of the next. `add` returns true when full.
    fn do_readdir(
        &self,
        dir: INodeNo,
        offset: u64,
        mut add: impl FnMut(u32, u64, &OsStr, FileKind, Option<&Attr>) -> bool,
        plus: bool,
    ) -> FResult<()> {
        let img = &self.inner.img;
        let d = ino(dir)?;
        let mut pos = offset;
        if pos == 0 {
            let a = plus.then(|| img.attr(d)).transpose()?;
            if add(d, 1, OsStr::new("."), FileKind::Dir, a.as_ref()) {
                return Ok(());
            }
            pos = 1;
        }
        if pos == 1 {
            let p = img.parent(d)?;
            let a = plus.then(|| img.attr(p)).transpose()?;
            if add(p, 2, OsStr::new(".."), FileKind::Dir, a.as_ref()) {
                return Ok(());
            }
            pos = 2;
        }
        let start = usize::try_from(pos - 2).unwrap_or(usize::MAX);
        for e in img.readdir_from(d, start)? {
            let e = e?;
            let a = plus.then(|| img.attr(e.ino)).transpose()?;
            let name = OsStr::from_bytes(e.name);
            if add(e.ino, pos + 1, name, e.kind, a.as_ref()) {
                break;
            }
            pos += 1;
        }
        Ok(())
    }

    fn do_getxattr(&self, i: INodeNo, name: &OsStr, size: u32) -> FResult<XattrAnswer> {
        let v = self
            .inner
            .img
            .getxattr(ino(i)?, name.as_bytes())?
            .ok_or(Fail::Errno(Errno::NO_XATTR))?;
        xattr_answer(v.to_vec(), size)
    }

    fn do_listxattr(&self, i: INodeNo, size: u32, uid: u32) -> FResult<XattrAnswer> {
        let mut list = Vec::new();
        let trusted = uid == 0 && in_initial_user_namespace();
        for (k, _) in self.inner.img.xattrs(ino(i)?)? {
            if !trusted && k.starts_with(b"trusted.") {
                continue;
            }
            list.extend_from_slice(k);
            list.push(0);
        }
        xattr_answer(list, size)
    }
}

/// Whether this server runs in the initial user namespace (its uid map is the identity over
/// every id). The kernel's own filesystems list `trusted.*` attributes only to a caller with
/// `CAP_SYS_ADMIN` there, and the kernel refuses to read them to anyone else whatever a
/// filesystem answers; so this driver lists them to uid 0 only, and only when serving from
/// the initial namespace (`cimg-mount` run by root). Inside `launch`'s user namespace no
/// caller qualifies. Read once per process.
fn in_initial_user_namespace() -> bool {
    static INITIAL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *INITIAL.get_or_init(|| {
        std::fs::read_to_string("/proc/self/uid_map")
            .is_ok_and(|m| m.split_whitespace().collect::<Vec<_>>() == ["0", "0", "4294967295"])
    })
}

enum XattrAnswer {
    Size(u32),
    Data(Vec<u8>),
}

/// Size-probe semantics: size 0 asks for the length; a buffer too small is ERANGE.
fn xattr_answer(v: Vec<u8>, size: u32) -> FResult<XattrAnswer> {
    let len = u32::try_from(v.len()).map_err(|_| Fail::Errno(Errno::E2BIG))?;
    if size == 0 {
        Ok(XattrAnswer::Size(len))
    } else if len > size {
        Err(Fail::Errno(Errno::ERANGE))
    } else {
        Ok(XattrAnswer::Data(v))
    }
}

const fn libc_o_trunc() -> i32 {
    0o1000
}

impl Filesystem for CimgFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        for cap in [
            InitFlags::FUSE_ASYNC_READ,
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_MAX_PAGES,
            InitFlags::FUSE_NO_OPEN_SUPPORT,
            InitFlags::FUSE_NO_OPENDIR_SUPPORT,
        ] {
            // Capabilities the kernel lacks are simply not used.
            let _ = config.add_capabilities(cap);
        }
        // READs of at most one block (the kernel's largest READ follows the larger of these
        // two), unless blocks are smaller than the kernel's own 128 KiB read-ahead: each READ
        // is then answered straight from its cached block, with no copy to assemble one that
        // spans blocks, and the read-ahead window (1 MiB as root, `--read-ahead-kb`) goes out
        // as several READs that the workers answer in parallel. The cost is more requests
        // per byte; it pays on a big file's cold and sequential reads and is neutral on a
        // tree of small files (`fuse-bench`; the A/B figures are in `docs/perf.md`).
        let most = self.inner.blksize.max(READ_MIN);
        let _ = config.set_max_write(most);
        let _ = config.set_max_readahead(most);
        let _ = config.set_max_background(256);
        let _ = config.set_congestion_threshold(192);
        self.start_workers()
    }

    fn destroy(&mut self) {
        self.tx = None;
        self.jobs = None;
        self.background = None;
        if let (Some(hot), Some(out)) = (self.hot.take(), self.opts.record_hot.as_ref()) {
            match hot.write(&self.inner.img, out) {
                Ok(n) => crate::log(format_args!(
                    "{}: recorded {n} files in first-read order",
                    out.display()
                )),
                // For `Server::run` to return (its caller reports it, one line, and fails) if
                // it holds the other end; otherwise (a session dropped unserved) said here.
                Err(e) if Arc::strong_count(&hot.failed) > 1 => {
                    *hot.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                }
                Err(e) => crate::log(format_args!("recording the hot list: {e}")),
            }
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.do_lookup(parent, name) {
            Ok(Some(a)) => reply.entry(&TTL, &a, Generation(0)),
            // A negative entry: node id 0 with a TTL, cached by the kernel.
            Ok(None) => {
                let mut a = file_attr(
                    &Attr {
                        ino: 0,
                        kind: FileKind::File,
                        mode: 0,
                        uid: 0,
                        gid: 0,
                        nlink: 0,
                        size: 0,
                        mtime_sec: 0,
                        mtime_nsec: 0,
                        rdev: 0,
                    },
                    self.inner.blksize,
                );
                a.ino = INodeNo(0);
                reply.entry(&TTL, &a, Generation(0))
            }
            Err(e) => reply.error(e.errno()),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.do_getattr(ino) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn readlink(&self, _req: &Request, i: INodeNo, reply: ReplyData) {
        match ino(i).and_then(|i| Ok(self.inner.img.readlink(i)?)) {
            Ok(t) => reply.data(t),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.do_open(ino, flags, false) {
            Ok(f) => reply.opened(FileHandle(0), f),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.do_open(ino, flags, true) {
            Ok(f) => reply.opened(FileHandle(0), f),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn read(
        &self,
        req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let i = match ino(i) {
            Ok(i) => i,
            Err(e) => return reply.error(e.errno()),
        };
        let end = offset.saturating_add(size.into());
        if let Some(h) = &self.hot {
            h.touch(i);
        }
        if self.opts.read_ahead && self.sequential(i, offset, end) {
            self.prefetch_after(i, end);
        }
        // Blocks to load: hand the request to a worker so this event loop can take the next
        // one; cached blocks are answered here.
        let queue = if self.opts.background_pid.is_some_and(|p| p == req.pid()) {
            &self.background
        } else {
            &self.jobs
        };
        if let Some(jobs) = queue
            && !self.inner.all_ready(i, offset, size)
        {
            let job = ReadJob {
                ino: i,
                offset,
                size,
                reply,
            };
            match jobs.send(job) {
                Ok(()) => return,
                Err(e) => return e.into_inner().run(&self.inner),
            }
        }
        ReadJob {
            ino: i,
            offset,
            size,
            reply,
        }
        .run(&self.inner);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let r = self.do_readdir(
            ino,
            offset,
            |i, next, name, kind, _| reply.add(INodeNo(i.into()), next, file_type(kind), name),
            false,
        );
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let blksize = self.inner.blksize;
        let inner = &self.inner;
        let r = self.do_readdir(
            ino,
            offset,
            |i, next, name, _, a| match a {
                Some(a) => {
                    let full = reply.add(
                        INodeNo(i.into()),
                        next,
                        name,
                        &TTL,
                        &file_attr(a, blksize),
                        Generation(0),
                    );
                    if !full {
                        inner.note_file(a);
                    }
                    full
                }
                None => true,
            },
            true,
        );
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let img = &self.inner.img;
        let bs = img.block_size();
        reply.statfs(
            img.summary().image_size.div_ceil(bs.into()),
            0,
            0,
            img.inode_count().into(),
            0,
            bs,
            255,
            bs,
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.do_getxattr(ino, name, size) {
            Ok(XattrAnswer::Size(n)) => reply.size(n),
            Ok(XattrAnswer::Data(v)) => reply.data(&v),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.do_listxattr(ino, size, req.uid()) {
            Ok(XattrAnswer::Size(n)) => reply.size(n),
            Ok(XattrAnswer::Data(v)) => reply.data(&v),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn access(&self, _req: &Request, i: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        // Permissions are checked by the kernel (`default_permissions`); this answers
        // existence and the read-only rule.
        match ino(i).and_then(|i| Ok(self.inner.img.attr(i)?)) {
            Err(e) => reply.error(e.errno()),
            Ok(_) if mask.contains(AccessFlags::W_OK) => reply.error(Errno::EROFS),
            Ok(_) => reply.ok(),
        }
    }

    // Every write operation: read-only filesystem.

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EROFS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cimg_format::{PackOptions, pack_dir};

    fn image(files: &[(&str, Vec<u8>)], block_log: u8) -> (tempfile::TempDir, CimgFs) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let src = tmp.path().join("src");
        for (name, data) in files {
            let p = src.join(name);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(&p, data).expect("write");
        }
        let img = tmp.path().join("img.cimg");
        let opts = PackOptions {
            block_log,
            threads: 2,
            ..PackOptions::default()
        };
        pack_dir(&src, &img, &opts, &|_, _| {}).expect("pack");
        let fs = CimgFs::new(
            Image::open(&img).expect("open"),
            FsOptions {
                cache_size: 64 << 10,
                workers: 0,
                ..FsOptions::default()
            },
        );
        (tmp, fs)
    }

    fn pseudo(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if i % 3 == 0 {
                    b'a' + (i % 7) as u8
                } else {
                    x as u8
                }
            })
            .collect()
    }

    /// Entries from position `offset` as (ino, next offset, name), at most `max`.
    fn listing(fs: &CimgFs, dir: u32, offset: u64, max: usize) -> Vec<(u32, u64, Vec<u8>)> {
        let mut out = Vec::new();
        fs.do_readdir(
            INodeNo(dir.into()),
            offset,
            |i, next, name, _, _| {
                out.push((i, next, name.as_bytes().to_vec()));
                out.len() >= max
            },
            false,
        )
        .expect("readdir");
        out
    }

    #[test]
    fn readdir_offsets_resume() {
        let files: Vec<(String, Vec<u8>)> =
            (0..7).map(|i| (format!("d/f{i}"), vec![i as u8])).collect();
        let files: Vec<(&str, Vec<u8>)> =
            files.iter().map(|(n, d)| (n.as_str(), d.clone())).collect();
        let (_tmp, fs) = image(&files, 12);
        let d = fs.image().resolve(b"d").expect("d");
        let all = listing(&fs, d, 0, usize::MAX);
        assert_eq!(all.len(), 9);
        assert_eq!((all[0].0, all[0].2.as_slice()), (d, &b"."[..]));
        assert_eq!((all[1].0, all[1].2.as_slice()), (1, &b".."[..]));
        assert_eq!(all[2].2, b"f0");
        for (k, e) in all.iter().enumerate() {
            assert_eq!(e.1, k as u64 + 1, "next offset of entry {k}");
            // Resuming at any entry's next offset gives the rest.
            assert_eq!(listing(&fs, d, e.1, usize::MAX), all[k + 1..]);
        }
        assert!(listing(&fs, d, 100, usize::MAX).is_empty());
        assert_eq!(listing(&fs, d, 3, 2), all[3..5]);
        // Not a directory.
        let f = fs.image().resolve(b"d/f0").expect("f0");
        let e = fs
            .do_readdir(INodeNo(f.into()), 0, |_, _, _, _, _| false, false)
            .unwrap_err();
        assert_eq!(e.errno(), Errno::ENOTDIR);
    }

    #[test]
    fn reads_across_blocks_and_at_the_end() {
        let a = pseudo(3 * 4096 + 123, 1);
        let b = pseudo(1000, 2);
        let (_tmp, fs) = image(&[("a", a.clone()), ("b", b.clone())], 12);
        let ino = fs.image().resolve(b"a").expect("a");
        for (off, size) in [
            (0u64, 4096u32),
            (0, 100_000),
            (4000, 200),
            (4095, 4098),
            (12_000, 4096),
            (a.len() as u64 - 1, 10),
            (a.len() as u64, 10),
            (a.len() as u64 + 5000, 10),
        ] {
            let mut got = None;
            fs.inner
                .read(ino, off, size, |d| got = Some(d.to_vec()))
                .expect("read");
            let s = (off as usize).min(a.len());
            let e = (off as usize + size as usize).min(a.len());
            assert_eq!(got.expect("answered"), &a[s..e], "{off}+{size}");
        }
        let bi = fs.image().resolve(b"b").expect("b");
        let mut got = Vec::new();
        fs.inner
            .read(bi, 0, 4096, |d| got = d.to_vec())
            .expect("read");
        assert_eq!(got, b);
        assert!(fs.cache().bytes() <= 64 << 10);
        // Reading a directory is an error, not a panic.
        assert!(fs.inner.read(1, 0, 10, |_| {}).is_err());
    }

    #[test]
    fn image_errors_map_to_errnos() {
        let io = |err| Error::Io {
            path: "x".into(),
            err,
        };
        let wrong = |what| Error::WrongType { ino: 2, what };
        for (e, want) in [
            (io(io::Error::from_raw_os_error(13)), Errno::from_i32(13)),
            (io(io::Error::other("no errno")), Errno::EIO),
            (Error::NotFound("a/b".into()), Errno::ENOENT),
            (wrong("not a directory"), Errno::ENOTDIR),
            (wrong("not a symlink"), Errno::EINVAL),
            (
                Error::Corrupt {
                    what: "x".into(),
                    offset: 0,
                },
                Errno::EIO,
            ),
        ] {
            assert_eq!(Fail::from(e).errno(), want);
        }
    }

    #[test]
    fn xattr_size_probe_and_erange() {
        assert!(matches!(
            xattr_answer(b"abc".to_vec(), 0),
            Ok(XattrAnswer::Size(3))
        ));
        assert!(matches!(
            xattr_answer(b"abc".to_vec(), 2),
            Err(Fail::Errno(Errno::ERANGE))
        ));
        assert!(matches!(
            xattr_answer(b"abc".to_vec(), 3),
            Ok(XattrAnswer::Data(v)) if v == b"abc"
        ));
        assert!(matches!(
            xattr_answer(Vec::new(), 0),
            Ok(XattrAnswer::Size(0))
        ));
    }

    #[test]
    fn attrs_and_times() {
        let (_tmp, fs) = image(&[("x", b"hello".to_vec())], 12);
        let a = fs.do_getattr(INodeNo(2)).expect("getattr");
        assert_eq!((a.size, a.kind, a.blocks), (5, FileType::RegularFile, 1));
        assert_eq!(
            fs.do_getattr(INodeNo(1)).expect("root").kind,
            FileType::Directory
        );
        assert!(fs.do_getattr(INodeNo(99)).is_err());
        assert!(fs.do_getattr(INodeNo(u64::MAX)).is_err());
        assert_eq!(
            time(-1, 5),
            UNIX_EPOCH - Duration::from_secs(1) + Duration::from_nanos(5)
        );
        assert_eq!(time(2, 0), UNIX_EPOCH + Duration::from_secs(2));
        assert_eq!(
            fs.do_lookup(INodeNo(1), OsStr::new("missing"))
                .expect("lookup"),
            None
        );
        assert_eq!(
            fs.do_lookup(INodeNo(2), OsStr::new("x"))
                .unwrap_err()
                .errno(),
            Errno::ENOTDIR
        );
    }
}
