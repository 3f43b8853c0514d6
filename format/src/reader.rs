//! The reader: [`Image::open`] validates an image once — superblock, metadata checksum, every
//! table bound, every inode, directory entry, chunk, block and xattr record, and the directory
//! graph (no cycles, no directory reachable twice) — and then answers lookup, readdir,
//! getattr, readlink, xattr and data reads without further metadata I/O. A lazy open
//! ([`OpenOptions::lazy`], the FUSE driver's and the launcher's) checks the superblock, the
//! checksum, the header and the root, and the rest where it is used: each metadata frame is
//! decompressed the first time one of its records is read, each directory's entries are
//! checked the first time it is listed or searched, each inode, chunk and block record each
//! time it is read.
//!
//! Opening costs two `pread`s: the superblock and the whole stored metadata. Data blocks are
//! read with `pread` as well, never `mmap`: an I/O error on a mapped file on a parallel
//! filesystem would be a SIGBUS. Every number taken from the file is checked before use, so a
//! hostile image gives an [`Error`], never a panic, a hang or an allocation beyond
//! [`OpenOptions::max_metadata`] (data blocks are at most 1 MiB each).

use crate::layout::{
    Block, Chunk, Dirent, HOLE, INCOMPAT_KNOWN, INCOMPAT_META_FRAMES, Inode, MAGIC, MAX_BLOCK_LOG,
    MAX_META_FRAME_LOG, MIN_BLOCK_LOG, MIN_META_FRAME_LOG, MetaHeader, ROOT_INO, Superblock, Table,
    VERSION_MAJOR, Xattr,
};
use crate::{Error, FileKind, Result};
use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use xxhash_rust::xxh3::{xxh3_64, xxh3_128};
use zerocopy::{FromBytes, IntoBytes};

/// A source of image bytes read by offset: a file, or memory in tests and tools.
pub trait ReadAt: Send + Sync {
    /// Fill `buf` from `offset`, or fail (a short read is an error).
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Current length in bytes.
    fn size(&self) -> io::Result<u64>;
}

impl ReadAt for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
    /// The size the kernel holds from the open (`AT_STATX_DONT_SYNC`): on a network or FUSE
    /// filesystem (Lustre through FUSE, NFS, the PFS simulator) a plain `fstat` right after
    /// `open` asks the server again, one more metadata operation per node for nothing — the
    /// open's lookup has just brought the attributes. Local filesystems ignore the flag.
    fn size(&self) -> io::Result<u64> {
        use rustix::fs::{AtFlags, StatxFlags, statx};
        match statx(
            self,
            "",
            AtFlags::EMPTY_PATH | AtFlags::STATX_DONT_SYNC,
            StatxFlags::SIZE,
        ) {
            Ok(st) if st.stx_mask & StatxFlags::SIZE.bits() != 0 => Ok(st.stx_size),
            // No statx (old kernel, seccomp) or no size in its answer: a plain fstat.
            _ => Ok(self.metadata()?.len()),
        }
    }
}

impl ReadAt for Vec<u8> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let src = usize::try_from(offset)
            .ok()
            .and_then(|o| Some(o..o.checked_add(buf.len())?))
            .and_then(|r| self.get(r))
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
}

/// Limits applied while opening an image.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Largest decompressed metadata accepted, in bytes (default 2 GiB, enough for some
    /// twenty million entries). Bounds the only large allocation the reader makes.
    pub max_metadata: u64,
    /// Threads that decompress metadata frames and validate in parallel (default: the
    /// cores, at most 8; 1 does everything in the calling thread).
    pub threads: usize,
    /// Directory entries from which validation uses the helper threads (default
    /// [`PARALLEL_VALIDATION_MIN`]; below it one thread is faster).
    pub parallel_validation_min: usize,
    /// Decompress and check the metadata as it is used (FORMAT.md §13, "lazy reader")
    /// instead of all of it at open (default `false`). Open then reads and checksums the
    /// stored metadata, decompresses the frame holding the header and the frames holding
    /// the blob, and checks the header's counts and the root; every other frame is
    /// decompressed the first time a record in it is used, every inode is checked each time
    /// it is read, every directory's entries the first time it is listed or searched, every
    /// block record and chunk each time it is used. A corruption then fails the call that
    /// meets it (the FUSE driver answers EIO for it and serves the rest) instead of the open.
    /// For an image whose metadata is one frame only the checks are deferred.
    pub lazy: bool,
    /// The file's size, if the caller knows it from a `stat` it made (default `None`: the
    /// reader asks the file). On a parallel filesystem each `fstat` can be a metadata
    /// operation on the server; a caller that has just looked saves one.
    pub size: Option<u64>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            max_metadata: 2 << 30,
            threads: crate::cores().clamp(1, 8),
            parallel_validation_min: PARALLEL_VALIDATION_MIN,
            lazy: false,
            size: None,
        }
    }
}

/// Attributes of one inode, as `stat` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    /// Inode number (root is 1).
    pub ino: u32,
    /// File type.
    pub kind: FileKind,
    /// Full `st_mode` (type and permission bits).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Link count.
    pub nlink: u32,
    /// Size in bytes (directories: number of entries).
    pub size: u64,
    /// Modification time, seconds.
    pub mtime_sec: i64,
    /// Modification time, nanoseconds.
    pub mtime_nsec: u32,
    /// Device number of a character or block device.
    pub rdev: u64,
}

impl Attr {
    /// Permission bits (including setuid, setgid, sticky).
    pub fn perm(&self) -> u32 {
        self.mode & 0o7777
    }
}

/// One directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirEntry<'a> {
    /// Name bytes (never empty, never `.` or `..`, no `/` or NUL).
    pub name: &'a [u8],
    /// Inode number.
    pub ino: u32,
    /// File type.
    pub kind: FileKind,
}

/// A contiguous piece of a regular file: `len` bytes at `file_offset`, stored at
/// `block_offset` in block `block`, or zeros when `block` is `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Offset in the file.
    pub file_offset: u64,
    /// Length in bytes.
    pub len: u32,
    /// Block index, `None` for a hole.
    pub block: Option<u32>,
    /// Offset inside the decompressed block.
    pub block_offset: u32,
}

/// What the superblock says, in native integers.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Format version (major, minor).
    pub version: (u16, u16),
    /// Block size in bytes.
    pub block_size: u32,
    /// zstd level used by the writer.
    pub level: i8,
    /// Compatible feature bits.
    pub compat: u64,
    /// Incompatible feature bits.
    pub incompat: u64,
    /// Size of the image file.
    pub image_size: u64,
    /// Data region.
    pub data: Range<u64>,
    /// Stored metadata region.
    pub meta: Range<u64>,
    /// Decompressed metadata length.
    pub meta_raw_len: u64,
    /// Number of hot blocks at the start of the data region.
    pub hot_blocks: u64,
    /// xxh3-128 of the data and metadata regions.
    pub digest: u128,
}

/// An open, validated image. Cheap to share between threads (`&Image` is `Sync`).
pub struct Image<R = File> {
    src: R,
    label: PathBuf,
    sum: Summary,
    block_log: u8,
    meta: Meta,
    hdr: MetaHeader,
    inodes: Range<usize>,
    dirents: Range<usize>,
    chunks: Range<usize>,
    blocks: Range<usize>,
    xattrs: Range<usize>,
    blob: Range<usize>,
    /// Threads validation may use ([`OpenOptions::threads`]).
    threads: usize,
    /// From how many directory entries it uses them.
    parallel_validation_min: usize,
    /// Everything was validated at open; `false` after a lazy open, where each record is
    /// checked where it is used ([`OpenOptions::lazy`]).
    checked: bool,
    /// Lazy open: the directories whose entries passed their checks, one bit per inode.
    dir_ok: Vec<AtomicU64>,
}

impl<R> std::fmt::Debug for Image<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("label", &self.label)
            .field("summary", &self.sum)
            .finish()
    }
}

/// What `ft` is, in words, for "not a regular file (a fifo)".
fn kind_words(ft: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a fifo"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_symlink() {
        "a symlink"
    } else {
        "of an unknown type"
    }
}

/// `file` (opened from `path`) is a regular file, or a directory when `dirs`: else an error
/// naming `path` and what it is. An image, an archive or a file's data is read with `pread`
/// and read again: a pipe, a device or a socket cannot serve that.
pub fn check_regular(file: &File, path: &Path, dirs: bool) -> Result<()> {
    let ft = file.metadata().map_err(|e| Error::io(path, e))?.file_type();
    if ft.is_file() || (dirs && ft.is_dir()) {
        return Ok(());
    }
    let what = if dirs {
        "not a regular file or a directory"
    } else {
        "not a regular file"
    };
    Err(Error::io(
        path,
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} ({})", kind_words(ft)),
        ),
    ))
}

/// Open `path` for reading without blocking whatever it is: opening a FIFO for reading waits
/// for a writer, so it is opened `O_NONBLOCK`, and the flag is cleared at once (`fcntl`, on
/// the descriptor: no path lookup). The caller checks the type ([`check_regular`], or
/// [`open_regular`] does both); a FIFO, a device or a socket has size 0, which the reader
/// refuses, and `pread` fails on a FIFO, so even unchecked nothing hangs.
pub fn open_nonblocking(path: &Path) -> Result<File> {
    use rustix::fs::OFlags;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let flags = rustix::fs::fcntl_getfl(&file).map_err(|e| Error::io(path, e.into()))?;
    rustix::fs::fcntl_setfl(&file, flags - OFlags::NONBLOCK)
        .map_err(|e| Error::io(path, e.into()))?;
    Ok(file)
}

/// Open `path` without blocking ([`open_nonblocking`]) and refuse anything but a regular
/// file (or a directory when `dirs`), naming `path`. The images and pack sources are opened
/// so, that no tool hangs on a FIFO.
pub fn open_regular(path: &Path, dirs: bool) -> Result<File> {
    let file = open_nonblocking(path)?;
    check_regular(&file, path, dirs)?;
    Ok(file)
}

impl Image<File> {
    /// Open and validate the image at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, &OpenOptions::default())
    }

    /// Open and validate with explicit limits.
    pub fn open_with(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Self> {
        let path = path.as_ref();
        let file = open_regular(path, false)?;
        Image::from_reader(file, path, opts)
    }
}

fn table_range(t: &Table, elem: usize, meta_len: usize, name: &str) -> Result<Range<usize>> {
    let off = t.offset.get();
    let bytes = t.count.get().checked_mul(elem as u64);
    let end = bytes.and_then(|b| off.checked_add(b));
    match end {
        Some(end) if end <= meta_len as u64 => Ok(off as usize..end as usize),
        _ => Err(Error::corrupt(
            format!(
                "metadata {name} table (offset {off}, {} records) runs past the metadata end ({meta_len})",
                t.count.get()
            ),
            0,
        )),
    }
}

/// `fails[i]` = how many of records `0..i` fail `fails_at`, counted modulo 2^32: exact for
/// the difference over any range of at most `u32::MAX` records, the longest an inode names.
fn prefix_failures(n: usize, mut fails_at: impl FnMut(usize) -> bool) -> Vec<u32> {
    let mut out = Vec::with_capacity(n + 1);
    let mut acc = 0u32;
    out.push(acc);
    for j in 0..n {
        acc = acc.wrapping_add(fails_at(j) as u32);
        out.push(acc);
    }
    out
}

/// [`prefix_failures`] of records that are invalid (`key` is `None`) or whose key does not sort
/// strictly before the next record's.
fn sorted_failures<'a>(n: usize, key: impl Fn(usize) -> Option<&'a [u8]>) -> Vec<u32> {
    let mut next = if n > 0 { key(0) } else { None };
    prefix_failures(n, |j| {
        let cur = next;
        next = if j + 1 < n { key(j + 1) } else { None };
        match (cur, next) {
            (None, _) => true,
            (Some(a), Some(b)) => a >= b,
            (Some(_), None) => false,
        }
    })
}

/// For records `r`, how many fail `fails_at`, cumulated (modulo 2^32): element `i` counts
/// records `r.start ..= r.start + i`. [`join_prefix`] makes prefix arrays of such pieces.
fn range_failures(r: Range<usize>, mut fails_at: impl FnMut(usize) -> bool) -> Vec<u32> {
    let mut acc = 0u32;
    r.map(|j| {
        acc = acc.wrapping_add(fails_at(j) as u32);
        acc
    })
    .collect()
}

/// [`range_failures`] for records `r` of `n`, as [`sorted_failures`] judges them.
fn sorted_range_failures<'a>(
    r: Range<usize>,
    n: usize,
    key: impl Fn(usize) -> Option<&'a [u8]>,
) -> Vec<u32> {
    let mut next = if r.start < n { key(r.start) } else { None };
    range_failures(r, |j| {
        let cur = next;
        next = if j + 1 < n { key(j + 1) } else { None };
        match (cur, next) {
            (None, _) => true,
            (Some(a), Some(b)) => a >= b,
            (Some(_), None) => false,
        }
    })
}

/// The [`prefix_failures`] array of records `0..n` from the [`range_failures`] of consecutive
/// ranges covering them.
fn join_prefix(parts: Vec<Vec<u32>>) -> Vec<u32> {
    let n: usize = parts.iter().map(Vec::len).sum();
    let mut out = Vec::with_capacity(n + 1);
    let mut base = 0u32;
    out.push(base);
    for p in parts {
        out.extend(p.iter().map(|&x| base.wrapping_add(x)));
        base = out.last().copied().unwrap_or(0);
    }
    out
}

/// Range `k` of `parts` near-equal consecutive ranges covering `0..n`.
fn part(n: usize, parts: usize, k: usize) -> Range<usize> {
    let at = |k: usize| (n as u128 * k as u128 / parts.max(1) as u128) as usize;
    at(k)..at(k + 1)
}

/// Directory entries from which validation uses helper threads by default
/// ([`OpenOptions::parallel_validation_min`]). Measured on this 2-core VM
/// (`perf stat -r 60 cimg ls IMG /`, interleaved, three rounds): one thread was faster for
/// 8,300 entries (2.64–2.67 ms against 2.75–2.80) and for 53,000 (8.5–9.1 ms against
/// 9.4–9.7); two were faster for 101,000 (9.1–9.9 ms against 10.1–10.3). A helper starts late
/// on a busy core, and then only adds its start and the merge of the pieces.
pub const PARALLEL_VALIDATION_MIN: usize = 65_536;

/// A job for [`run_tasks`].
type Task<'a> = Box<dyn FnOnce() + Send + 'a>;

/// Run `tasks` on the calling thread and up to `threads - 1` helper threads, taking them in
/// order from a shared queue (if a helper cannot be started, the others do its share).
fn run_tasks(threads: usize, tasks: Vec<Task<'_>>) {
    let helpers = threads.clamp(1, tasks.len().max(1)) - 1;
    let queue = std::sync::Mutex::new(tasks.into_iter());
    let work = || {
        loop {
            let task = queue.lock().unwrap_or_else(|p| p.into_inner()).next();
            match task {
                Some(t) => t(),
                None => break,
            }
        }
    };
    if helpers == 0 {
        return work();
    }
    std::thread::scope(|s| {
        for _ in 0..helpers {
            if std::thread::Builder::new().spawn_scoped(s, work).is_err() {
                break;
            }
        }
        work();
    });
}

/// Whether records `a..e` all pass, from their [`prefix_failures`] (which need not judge the
/// last record, e.g. its order against the record after the range) and `last_ok`, the check of
/// record `e - 1`.
fn range_clean(fails: &[u32], a: usize, e: usize, last_ok: impl FnOnce() -> bool) -> bool {
    a >= e || (fails[e - 1].wrapping_sub(fails[a]) == 0 && last_ok())
}

/// Whether `name` is a valid entry name (§8): 1 to 255 bytes, neither `.` nor `..`, no `/`
/// and no NUL.
fn valid_name(name: &[u8]) -> bool {
    if name.is_empty() || name.len() > 255 || name == b"." || name == b".." {
        return false;
    }
    // Eight bytes at a time: a byte is 0 or `/` when `x` or `x ^ "////////"` has a zero byte.
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let has_zero = |x: u64| x.wrapping_sub(LO) & !x & HI != 0;
    let mut words = name.chunks_exact(8);
    for w in &mut words {
        let x = u64::from_le_bytes(<[u8; 8]>::try_from(w).unwrap_or([0; 8]));
        if has_zero(x) || has_zero(x ^ (LO * b'/' as u64)) {
            return false;
        }
    }
    !words.remainder().iter().any(|&c| c == b'/' || c == 0)
}

/// The name of directory entry `d` if the entry is valid on its own: the name lies in `blob`
/// and is a valid name, its inode exists in `inodes` and has the entry's kind.
fn entry_name<'a>(d: &Dirent, inodes: &[Inode], blob: &'a [u8]) -> Option<&'a [u8]> {
    let off = usize::try_from(d.name_offset.get()).ok()?;
    let name = blob.get(off..off.checked_add(d.name_len.get() as usize)?)?;
    let child = inodes.get((d.inode.get() as usize).checked_sub(1)?)?;
    let kind_ok = FileKind::from_mode(child.mode.get()).map(|k| k as u8) == Some(d.kind);
    (kind_ok && valid_name(name)).then_some(name)
}

/// The most decompressed bytes zstd can encode per stored byte: a block regenerates at most
/// 128 KiB (RFC 8878 §3.1.1.2, Block_Maximum_Size) and takes at least 4 stored bytes (an RLE
/// block: a 3-byte header and the byte repeated). A larger `meta_raw_len` is a lie, refused
/// from the lengths alone.
const MAX_ZSTD_RATIO: u64 = (128 << 10) / 4;

/// The `MetaHeader`: the first bytes of the first frame, decompressed by streaming so that
/// only they are produced (and the frame's window allocated, at most 2^META_WINDOW_LOG_MAX),
/// whatever the frame would decompress to.
fn read_header(stored: &[u8]) -> std::result::Result<MetaHeader, String> {
    use std::io::Read;
    let mut dec = zstd::stream::read::Decoder::with_buffer(stored)
        .and_then(|mut d| {
            d.window_log_max(META_WINDOW_LOG_MAX)?;
            Ok(d.single_frame())
        })
        .map_err(|e| format!("metadata does not decompress: zstd: {e}"))?;
    let mut h = [0u8; size_of::<MetaHeader>()];
    dec.read_exact(&mut h)
        .map_err(|e| format!("metadata header does not decompress: {e}"))?;
    MetaHeader::read_from_bytes(&h).map_err(|_| "metadata: short header".to_string())
}

/// §13 step 15 on the header alone, and its bound: each table lies within `raw_len` and the
/// last one ends there. The writer puts nothing after the last table, so a longer
/// `meta_raw_len` only makes a reader decompress and hold bytes nothing uses.
fn check_tables_end(hdr: &MetaHeader, raw_len: u64) -> Result<()> {
    let n = raw_len as usize;
    let end = [
        table_range(&hdr.inodes, size_of::<Inode>(), n, "inode")?,
        table_range(&hdr.dirents, size_of::<Dirent>(), n, "dirent")?,
        table_range(&hdr.chunks, size_of::<Chunk>(), n, "chunk")?,
        table_range(&hdr.blocks, size_of::<Block>(), n, "block")?,
        table_range(&hdr.xattrs, size_of::<Xattr>(), n, "xattr")?,
        table_range(&hdr.blob, 1, n, "blob")?,
    ]
    .iter()
    .map(|r| r.end)
    .max()
    .unwrap_or(0)
    .max(size_of::<MetaHeader>());
    if end != n {
        return Err(Error::corrupt(
            format!("metadata length {raw_len} is past the end of its last table ({end})"),
            72,
        ));
    }
    Ok(())
}

/// The stored metadata is corrupt at file offset `at`.
fn meta_region_err(what: String, at: u64) -> Error {
    Error::corrupt(what, at)
}

/// The largest zstd window a metadata frame may ask for: the writer compresses metadata at
/// level 19 at most (window 2^23).
const META_WINDOW_LOG_MAX: u32 = 24;

/// Decompress one metadata frame (or, without frames, the whole stored metadata) into
/// exactly `out.len()` bytes: a frame that would produce more fails ("destination buffer too
/// small") instead of writing past `out`.
fn decompress_exact(
    dctx: &mut Option<zstd::bulk::Decompressor<'static>>,
    src: &[u8],
    out: &mut [u8],
) -> std::result::Result<(), String> {
    if dctx.is_none() {
        let mut d = zstd::bulk::Decompressor::new().map_err(|e| format!("zstd: {e}"))?;
        d.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(
            META_WINDOW_LOG_MAX,
        ))
        .map_err(|e| format!("zstd: {e}"))?;
        *dctx = Some(d);
    }
    let Some(d) = dctx.as_mut() else {
        return Err("zstd context".into());
    };
    match d.decompress_to_buffer(src, out) {
        Ok(n) if n == out.len() => Ok(()),
        Ok(n) => Err(format!("decompresses to {n} bytes, expected {}", out.len())),
        Err(e) => Err(format!("does not decompress: {e}")),
    }
}

/// The decompressed metadata: on the heap, or (large) in anonymous memory that the kernel may
/// back with huge pages, which saves most of the page faults of filling it (`cimg info` of an
/// image of 100,000 files, 9.5 MiB of metadata, `perf stat -r 20`: 3,200 page faults and
/// 16.5 ms before, 1,200–1,700 and 14 ms after). A hostile `meta_raw_len` cannot make it big:
/// it is checked against the reader's metadata limit, the stored length and the end of the
/// header's last table first.
enum MetaBuf {
    Heap(Vec<u8>),
    Anon(memmap2::MmapMut),
}

impl MetaBuf {
    /// At least this long, the metadata goes to huge-page-advised anonymous memory.
    const ANON_MIN: usize = 4 << 20;

    fn zeroed(len: usize) -> Self {
        if len >= Self::ANON_MIN
            && let Ok(m) = memmap2::MmapOptions::new().len(len).map_anon()
        {
            let _ = m.advise(memmap2::Advice::HugePage);
            return MetaBuf::Anon(m);
        }
        MetaBuf::Heap(vec![0u8; len])
    }
}

impl std::ops::Deref for MetaBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            MetaBuf::Heap(v) => v,
            MetaBuf::Anon(m) => m,
        }
    }
}

impl std::ops::DerefMut for MetaBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            MetaBuf::Heap(v) => v,
            MetaBuf::Anon(m) => m,
        }
    }
}

/// Where each metadata frame lies in the stored metadata (`INCOMPAT_META_FRAMES`: `count`
/// frames of `1 << log` decompressed bytes, the last one the rest), found by parsing their
/// headers; the error carries the stored offset of the bad frame.
fn find_frames(
    stored: &[u8],
    raw_len: u64,
    log: u8,
) -> std::result::Result<Vec<Range<usize>>, (String, u64)> {
    let count = raw_len.div_ceil(1u64 << log) as usize;
    // Each is at least a frame header long, so there are no more of them than stored bytes.
    let mut frames = Vec::with_capacity(count.min(stored.len()));
    let mut pos = 0usize;
    for k in 0..count {
        let rest = stored.get(pos..).unwrap_or(&[]);
        let n = zstd::zstd_safe::find_frame_compressed_size(rest).map_err(|_| {
            (
                format!("metadata frame {k} of {count} does not parse"),
                pos as u64,
            )
        })?;
        if n == 0 || n > rest.len() {
            return Err((
                format!("metadata frame {k} of {count} is cut short"),
                pos as u64,
            ));
        }
        frames.push(pos..pos + n);
        pos += n;
    }
    if pos != stored.len() {
        return Err((
            format!(
                "{} stored bytes after the last of {count} metadata frames",
                stored.len() - pos
            ),
            pos as u64,
        ));
    }
    Ok(frames)
}

/// Decompress the consecutive metadata frames `srcs` (ranges of `stored`) into `out`, back to
/// back, each to exactly its length (`frame_len`, the last one the rest of `out`), with up to
/// `threads` threads; the first error in stored order, with the frame's stored offset.
fn decompress_frames(
    stored: &[u8],
    srcs: &[Range<usize>],
    out: &mut [u8],
    frame_len: usize,
    threads: usize,
) -> std::result::Result<(), (String, u64)> {
    let mut jobs: Vec<(&Range<usize>, &mut [u8])> =
        srcs.iter().zip(out.chunks_mut(frame_len)).collect();
    // A queue of frames that the calling thread and up to `threads - 1` helpers empty (if a
    // helper cannot be started, the others do its share).
    let queue = std::sync::Mutex::new(jobs.iter_mut());
    let errors = std::sync::Mutex::new(Vec::new());
    let work = || {
        let mut dctx = None;
        loop {
            let job = queue.lock().unwrap_or_else(|p| p.into_inner()).next();
            let Some((src, out)) = job else { break };
            let bytes = stored.get((*src).clone()).unwrap_or(&[]);
            if let Err(why) = decompress_exact(&mut dctx, bytes, out) {
                errors.lock().unwrap_or_else(|p| p.into_inner()).push((
                    format!("metadata frame at stored offset {}: {why}", src.start),
                    src.start as u64,
                ));
            }
        }
    };
    let helpers = threads.clamp(1, srcs.len().max(1)) - 1;
    std::thread::scope(|s| {
        for _ in 0..helpers {
            if std::thread::Builder::new().spawn_scoped(s, work).is_err() {
                break;
            }
        }
        work();
    });
    drop(jobs);
    let mut errors = errors.into_inner().unwrap_or_else(|p| p.into_inner());
    errors.sort_by_key(|e| e.1);
    match errors.into_iter().next() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Decompress the stored metadata into exactly `raw_len` bytes. With `frame_log` (the
/// [`INCOMPAT_META_FRAMES`] feature) it is a sequence of zstd frames decompressed by up to
/// `threads` threads; the error carries the stored offset of the bad frame.
fn decompress_meta(
    stored: &[u8],
    raw_len: u64,
    frame_log: Option<u8>,
    threads: usize,
) -> std::result::Result<MetaBuf, (String, u64)> {
    let Some(log) = frame_log else {
        // Without the feature: one frame, decompressed in one shot into the spare capacity.
        let mut raw: Vec<u8> = Vec::with_capacity(raw_len as usize);
        let dec = zstd::bulk::Decompressor::new().and_then(|mut d| {
            d.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(
                META_WINDOW_LOG_MAX,
            ))?;
            d.decompress_to_buffer(stored, &mut raw)
        });
        return match dec {
            Ok(n) if n as u64 == raw_len => Ok(MetaBuf::Heap(raw)),
            Ok(n) => Err((
                format!("metadata decompresses to {n} bytes, superblock says {raw_len}"),
                0,
            )),
            Err(e) => Err((format!("metadata does not decompress: {e}"), 0)),
        };
    };
    let frames = find_frames(stored, raw_len, log)?;
    // Zero-filled by the allocator (fresh pages), written by the decompressors.
    let mut raw = MetaBuf::zeroed(raw_len as usize);
    decompress_frames(stored, &frames, &mut raw, 1 << log, threads)?;
    Ok(raw)
}

/// The decompressed metadata of an open image.
enum Meta {
    /// All of it, decompressed at open.
    Whole(MetaBuf),
    /// Frame by frame on first use (a lazy open of an image stored as frames).
    Frames(Box<Frames>),
}

/// The metadata of a lazy open: the stored frames, each decompressed the first time one of
/// its bytes is read, except those holding the blob, decompressed at open in one piece so
/// that names, link targets and xattrs are contiguous.
struct Frames {
    stored: Vec<u8>,
    /// Each frame's bytes in `stored`.
    srcs: Vec<Range<usize>>,
    /// File offset of the stored metadata, for errors.
    at: u64,
    log: u8,
    raw_len: usize,
    /// Frames decompressed so far, or why one does not decompress.
    out: Vec<OnceLock<std::result::Result<Box<[u8]>, String>>>,
    /// The frames decompressed at open into `blob_buf`, back to back.
    blob_frames: Range<usize>,
    blob_buf: MetaBuf,
}

impl Frames {
    /// Frame `k`'s decompressed bytes.
    fn frame(&self, k: usize) -> Result<&[u8]> {
        let f = 1usize << self.log;
        if self.blob_frames.contains(&k) {
            let a = (k - self.blob_frames.start) * f;
            return Ok(self
                .blob_buf
                .get(a..(a + f).min(self.blob_buf.len()))
                .unwrap_or(&[]));
        }
        let (Some(slot), Some(src)) = (self.out.get(k), self.srcs.get(k)) else {
            return Err(meta_region_err(
                format!("metadata frame {k} does not exist"),
                self.at,
            ));
        };
        let out = slot.get_or_init(|| {
            thread_local! {
                static DCTX: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
            }
            let len = f.min(self.raw_len.saturating_sub(k * f));
            let mut buf = vec![0u8; len].into_boxed_slice();
            let bytes = self.stored.get(src.clone()).unwrap_or(&[]);
            DCTX.with(|d| decompress_exact(&mut d.borrow_mut(), bytes, &mut buf))
                .map(|()| buf)
                .map_err(|why| format!("metadata frame at stored offset {}: {why}", src.start))
        });
        out.as_deref()
            .map_err(|why| meta_region_err(why.clone(), self.at + src.start as u64))
    }

    /// Copy metadata bytes `off .. off + out.len()` (within the metadata) into `out`.
    fn copy(&self, mut off: usize, out: &mut [u8]) -> Result<()> {
        let mut done = 0;
        while done < out.len() {
            let k = off >> self.log;
            let within = off - (k << self.log);
            let frame = self.frame(k)?;
            let src = frame
                .get(within..)
                .filter(|s| !s.is_empty())
                .ok_or_else(|| {
                    meta_err(format!("offset {off} past the end of the metadata"), off)
                })?;
            let n = src.len().min(out.len() - done);
            out[done..done + n].copy_from_slice(&src[..n]);
            done += n;
            off += n;
        }
        Ok(())
    }

    /// Metadata bytes `r`, which lie in the blob's frames.
    fn blob(&self, r: &Range<usize>) -> &[u8] {
        let base = self.blob_frames.start << self.log;
        r.start
            .checked_sub(base)
            .zip(r.end.checked_sub(base))
            .and_then(|(a, e)| self.blob_buf.get(a..e))
            .unwrap_or(&[])
    }
}

/// Prepare a lazy open of frames-stored metadata: find the frames, decompress the first (the
/// header) and those holding the blob (with up to `threads` threads). `at` is the stored
/// metadata's file offset.
fn open_frames(
    stored: Vec<u8>,
    raw_len: u64,
    log: u8,
    at: u64,
    threads: usize,
) -> Result<(Frames, MetaHeader)> {
    let srcs = find_frames(&stored, raw_len, log)
        .map_err(|(what, pos)| meta_region_err(what, at + pos))?;
    let mut f = Frames {
        out: srcs.iter().map(|_| OnceLock::new()).collect(),
        stored,
        srcs,
        at,
        log,
        raw_len: raw_len as usize,
        blob_frames: 0..0,
        blob_buf: MetaBuf::Heap(Vec::new()),
    };
    let mut h = [0u8; size_of::<MetaHeader>()];
    f.copy(0, &mut h)?;
    let hdr = MetaHeader::read_from_bytes(&h).map_err(|_| meta_err("short header", 0))?;
    let blob = table_range(&hdr.blob, 1, f.raw_len, "blob")?;
    if !blob.is_empty() {
        let ks = blob.start >> log..((blob.end - 1) >> log) + 1;
        let len = (ks.end << log).min(f.raw_len) - (ks.start << log);
        let mut buf = MetaBuf::zeroed(len);
        // Frame 0, decompressed for the header, is moved in rather than decompressed again.
        let mut first = ks.start;
        if first == 0
            && let Some(Ok(head)) = f.out[0].take()
        {
            buf[..head.len()].copy_from_slice(&head);
            first = 1;
        }
        let rest = first - ks.start;
        decompress_frames(
            &f.stored,
            &f.srcs[first..ks.end],
            &mut buf[rest << log..],
            1 << log,
            threads,
        )
        .map_err(|(what, pos)| meta_region_err(what, at + pos))?;
        f.blob_frames = ks;
        f.blob_buf = buf;
    }
    Ok((f, hdr))
}

/// Ask the kernel to start reading `file`'s stored metadata into the page cache now
/// (`posix_fadvise(WILLNEED)` of the region its superblock names), so that the disk or the
/// parallel filesystem works while the caller does something else — start a process, enter
/// namespaces — before [`Image::open`]. Costs one read of the superblock. Best effort: nothing
/// is validated here beyond the magic and the checksum, and nothing is used.
pub fn advise_metadata(file: &File) -> io::Result<()> {
    let mut sbuf = [0u8; size_of::<Superblock>()];
    FileExt::read_exact_at(file, &mut sbuf, 0)?;
    let sb = checked_superblock(&sbuf)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    let len = std::num::NonZeroU64::new(sb.meta_stored_len.get());
    rustix::fs::fadvise(
        file,
        sb.meta_offset.get(),
        len,
        rustix::fs::Advice::WillNeed,
    )?;
    Ok(())
}

/// The superblock in `sbuf` if its magic and checksum are right (§13 steps 2 and 3).
fn checked_superblock(sbuf: &[u8; size_of::<Superblock>()]) -> Result<Superblock> {
    let sb = Superblock::read_from_bytes(sbuf).map_err(|_| Error::corrupt("superblock", 0))?;
    if sb.magic != MAGIC {
        return Err(Error::corrupt("bad magic: not a cimg image", 0));
    }
    if sb.checksum.get() != xxh3_64(&sbuf[..120]) {
        return Err(Error::corrupt("superblock checksum mismatch", 120));
    }
    Ok(sb)
}

/// Decompressed metadata offsets are reported relative to the metadata region, marked so.
fn meta_err(what: impl std::fmt::Display, at: usize) -> Error {
    Error::corrupt(format!("metadata: {what}"), at as u64)
}

impl<R: ReadAt> Image<R> {
    /// Open and validate an image from any [`ReadAt`]; `label` names it in errors.
    pub fn from_reader(src: R, label: impl Into<PathBuf>, opts: &OpenOptions) -> Result<Self> {
        let label = label.into();
        let io = |e| Error::io(&label, e);
        let file_size = match opts.size {
            Some(n) => n,
            None => src.size().map_err(io)?,
        };
        if file_size < size_of::<Superblock>() as u64 {
            return Err(Error::corrupt(
                format!("file is {file_size} bytes, too small to be a cimg image"),
                0,
            ));
        }
        let mut sbuf = [0u8; size_of::<Superblock>()];
        src.read_exact_at(&mut sbuf, 0).map_err(io)?;
        let sb = checked_superblock(&sbuf)?;
        if sb.version_major.get() != VERSION_MAJOR {
            return Err(Error::Unsupported(format!(
                "format version {}.{}, this reader knows {VERSION_MAJOR}.x",
                sb.version_major.get(),
                sb.version_minor.get()
            )));
        }
        let unknown = sb.incompat.get() & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(Error::Unsupported(format!(
                "incompatible feature bits {unknown:#x}"
            )));
        }
        let frame_log = if sb.incompat.get() & INCOMPAT_META_FRAMES != 0 {
            if !(MIN_META_FRAME_LOG..=MAX_META_FRAME_LOG).contains(&sb.meta_frame_log) {
                return Err(Error::corrupt(
                    format!("meta_frame_log {} out of range", sb.meta_frame_log),
                    14,
                ));
            }
            Some(sb.meta_frame_log)
        } else {
            None
        };
        if !(MIN_BLOCK_LOG..=MAX_BLOCK_LOG).contains(&sb.block_log) {
            return Err(Error::corrupt(
                format!("block_log {} out of range", sb.block_log),
                12,
            ));
        }
        let image_size = sb.image_size.get();
        if image_size != file_size {
            return Err(Error::corrupt(
                format!(
                    "superblock says {image_size} bytes but the file has {file_size}: truncated or altered"
                ),
                32,
            ));
        }
        let region = |off: u64, len: u64, what: &str, at: u64| -> Result<Range<u64>> {
            match off.checked_add(len) {
                Some(end) if off >= size_of::<Superblock>() as u64 && end <= image_size => {
                    Ok(off..end)
                }
                _ => Err(Error::corrupt(
                    format!("{what} region {off}+{len} outside the file"),
                    at,
                )),
            }
        };
        let data = region(sb.data_offset.get(), sb.data_len.get(), "data", 40)?;
        let meta = region(
            sb.meta_offset.get(),
            sb.meta_stored_len.get(),
            "metadata",
            56,
        )?;
        if meta.start < data.end {
            return Err(Error::corrupt(
                "metadata region overlaps the data region",
                56,
            ));
        }
        let raw_len = sb.meta_raw_len.get();
        if raw_len < size_of::<MetaHeader>() as u64 || raw_len > opts.max_metadata {
            return Err(Error::corrupt(
                format!(
                    "metadata length {raw_len} outside 128..={}",
                    opts.max_metadata
                ),
                72,
            ));
        }
        if meta.end - meta.start > opts.max_metadata {
            return Err(Error::corrupt("stored metadata larger than the limit", 64));
        }
        let stored_len = meta.end - meta.start;
        if raw_len > stored_len.saturating_mul(MAX_ZSTD_RATIO) {
            return Err(Error::corrupt(
                format!(
                    "metadata length {raw_len} is more than zstd can encode in {stored_len} stored bytes"
                ),
                72,
            ));
        }
        let mut stored = vec![0u8; stored_len as usize];
        src.read_exact_at(&mut stored, meta.start).map_err(io)?;
        if xxh3_64(&stored) != sb.meta_checksum.get() {
            return Err(Error::corrupt("metadata checksum mismatch", meta.start));
        }
        // The header first, alone: the tables it locates must end exactly at `raw_len`,
        // so that nothing is decompressed (nor allocated) beyond what they need.
        let head = read_header(&stored).map_err(|why| meta_region_err(why, meta.start))?;
        check_tables_end(&head, raw_len)?;
        let (raw, hdr) = match frame_log {
            Some(log) if opts.lazy => {
                let (f, hdr) = open_frames(stored, raw_len, log, meta.start, opts.threads)?;
                (Meta::Frames(Box::new(f)), hdr)
            }
            _ => {
                let raw = decompress_meta(&stored, raw_len, frame_log, opts.threads)
                    .map_err(|(what, at)| meta_region_err(what, meta.start + at))?;
                drop(stored);
                let hdr = MetaHeader::read_from_prefix(&raw)
                    .map_err(|_| meta_err("short header", 0))?
                    .0;
                (Meta::Whole(raw), hdr)
            }
        };
        let n = raw_len as usize;
        let mut image = Image {
            inodes: table_range(&hdr.inodes, size_of::<Inode>(), n, "inode")?,
            dirents: table_range(&hdr.dirents, size_of::<Dirent>(), n, "dirent")?,
            chunks: table_range(&hdr.chunks, size_of::<Chunk>(), n, "chunk")?,
            blocks: table_range(&hdr.blocks, size_of::<Block>(), n, "block")?,
            xattrs: table_range(&hdr.xattrs, size_of::<Xattr>(), n, "xattr")?,
            blob: table_range(&hdr.blob, 1, n, "blob")?,
            src,
            label,
            block_log: sb.block_log,
            sum: Summary {
                version: (sb.version_major.get(), sb.version_minor.get()),
                block_size: 1 << sb.block_log,
                level: sb.level,
                compat: sb.compat.get(),
                incompat: sb.incompat.get(),
                image_size,
                data,
                meta,
                meta_raw_len: raw_len,
                hot_blocks: sb.hot_blocks.get(),
                digest: u128::from_le_bytes(sb.digest),
            },
            meta: raw,
            hdr,
            threads: opts.threads.max(1),
            parallel_validation_min: opts.parallel_validation_min,
            checked: !opts.lazy,
            dir_ok: Vec::new(),
        };
        if opts.lazy {
            image.check_header()?;
            let words = image.inodes.len() / size_of::<Inode>() / 64 + 1;
            image.dir_ok = (0..words).map(|_| AtomicU64::new(0)).collect();
        } else {
            image.validate()?;
        }
        Ok(image)
    }

    /// A table of the whole metadata, for the validation at open (which a lazy open, the
    /// only one that keeps frames, does not run): empty for frames.
    fn table<T: FromBytes + zerocopy::Immutable + zerocopy::KnownLayout>(
        &self,
        r: &Range<usize>,
    ) -> &[T] {
        let Meta::Whole(meta) = &self.meta else {
            return &[];
        };
        meta.get(r.clone())
            .and_then(|b| <[T]>::ref_from_bytes(b).ok())
            .unwrap_or(&[])
    }

    fn inode_table(&self) -> &[Inode] {
        self.table(&self.inodes)
    }
    fn dirent_table(&self) -> &[Dirent] {
        self.table(&self.dirents)
    }
    fn chunk_table(&self) -> &[Chunk] {
        self.table(&self.chunks)
    }
    fn block_table(&self) -> &[Block] {
        self.table(&self.blocks)
    }
    fn xattr_table(&self) -> &[Xattr] {
        self.table(&self.xattrs)
    }
    fn blob(&self) -> &[u8] {
        match &self.meta {
            Meta::Whole(meta) => meta.get(self.blob.clone()).unwrap_or(&[]),
            Meta::Frames(f) => f.blob(&self.blob),
        }
    }

    /// Record `i` of the table at `table` (a copy, read from whichever frames hold it):
    /// `None` past the table's end, an error if its frame does not decompress.
    fn rec<T: FromBytes + zerocopy::Immutable + zerocopy::KnownLayout>(
        &self,
        table: &Range<usize>,
        i: usize,
    ) -> Result<Option<T>> {
        const { assert!(size_of::<T>() <= 64) };
        let size = size_of::<T>();
        let Some(off) = i
            .checked_mul(size)
            .and_then(|o| o.checked_add(table.start))
            .filter(|o| o.checked_add(size).is_some_and(|e| e <= table.end))
        else {
            return Ok(None);
        };
        match &self.meta {
            Meta::Whole(meta) => Ok(meta
                .get(off..off + size)
                .and_then(|b| T::read_from_bytes(b).ok())),
            Meta::Frames(f) => {
                let mut buf = [0u8; 64];
                f.copy(off, &mut buf[..size])?;
                Ok(T::read_from_bytes(&buf[..size]).ok())
            }
        }
    }

    fn inode_count_usize(&self) -> usize {
        self.inodes.len() / size_of::<Inode>()
    }
    fn dirent_count(&self) -> usize {
        self.dirents.len() / size_of::<Dirent>()
    }
    fn chunk_count(&self) -> usize {
        self.chunks.len() / size_of::<Chunk>()
    }
    fn xattr_count(&self) -> usize {
        self.xattrs.len() / size_of::<Xattr>()
    }

    fn dirent(&self, j: usize) -> Result<Dirent> {
        self.rec(&self.dirents, j)?.ok_or_else(|| {
            meta_err(
                format!("directory entry {j} does not exist"),
                self.dirents.start,
            )
        })
    }

    fn chunk(&self, j: usize) -> Result<Chunk> {
        self.rec(&self.chunks, j)?
            .ok_or_else(|| meta_err(format!("chunk {j} does not exist"), self.chunks.start))
    }

    fn blob_slice(&self, off: u64, len: u64, what: &str) -> Result<&[u8]> {
        off.checked_add(len)
            .filter(|&e| e <= self.blob.len() as u64)
            .and_then(|e| self.blob().get(off as usize..e as usize))
            .ok_or_else(|| {
                meta_err(
                    format!("{what} {off}+{len} outside the blob"),
                    self.blob.start,
                )
            })
    }

    fn inode_offset(&self, ino: u32) -> usize {
        self.inodes.start + (ino as usize).saturating_sub(1) * size_of::<Inode>()
    }

    /// The name of directory entry `j` if the entry is valid on its own: the name lies in the
    /// blob and is a valid name (§8), the inode exists and has the entry's kind.
    fn entry_name(&self, j: usize) -> Option<&[u8]> {
        let d = self.dirent_table().get(j)?;
        entry_name(d, self.inode_table(), self.blob())
    }

    /// After a lazy open: what §13 checks before the records (steps 16 to 19) and the root
    /// (step 22).
    fn check_header(&self) -> Result<()> {
        let n = self.inode_count_usize();
        if n == 0 || n >= u32::MAX as usize {
            return Err(meta_err(format!("inode count {n}"), self.inodes.start));
        }
        let blocks = self.blocks.len() / size_of::<Block>();
        if blocks >= HOLE as usize {
            return Err(meta_err("too many blocks", self.blocks.start));
        }
        if self.sum.hot_blocks > blocks as u64 {
            return Err(Error::corrupt("hot_blocks exceeds the block count", 88));
        }
        let cfg = &self.hdr.config;
        self.blob_slice(cfg.offset.get(), cfg.count.get(), "config")?;
        let root = self.inode(ROOT_INO)?;
        if FileKind::from_mode(root.mode.get()) != Some(FileKind::Dir)
            || root.parent.get() != ROOT_INO
        {
            return Err(meta_err(
                "inode 1 is not a root directory",
                self.inodes.start,
            ));
        }
        Ok(())
    }

    /// Inode `ino`'s own fields and ranges (§13 step 21 without its chunks' and xattrs' own
    /// records): of every inode at a usual open, of each inode read after a lazy one.
    fn check_inode(&self, ino: u32, node: &Inode) -> Result<()> {
        let at = self.inode_offset(ino);
        let bad = |what: String| meta_err(format!("inode {ino}: {what}"), at);
        let kind = FileKind::from_mode(node.mode.get())
            .ok_or_else(|| bad(format!("unknown file type in mode {:#o}", node.mode.get())))?;
        if node.mtime_nsec.get() >= 1_000_000_000 {
            return Err(bad("nanoseconds out of range".into()));
        }
        let (first, count, size) = (node.first.get(), node.count.get() as u64, node.size.get());
        let fits = |n: usize| first.checked_add(count).is_some_and(|e| e <= n as u64);
        match kind {
            FileKind::File => {
                let want = size.div_ceil(self.sum.block_size as u64);
                if count != want {
                    return Err(bad(format!("{count} chunks for {size} bytes")));
                }
                if !fits(self.chunk_count()) {
                    return Err(bad(format!("chunks {first}+{count} out of range")));
                }
            }
            FileKind::Dir => {
                if !fits(self.dirent_count()) {
                    return Err(bad(format!("entries {first}+{count} out of range")));
                }
                if size != count {
                    return Err(bad("size differs from the entry count".into()));
                }
            }
            FileKind::Symlink => {
                if count == 0 || size != count {
                    return Err(bad("bad symlink target length".into()));
                }
                self.blob_slice(first, count, "symlink target")?;
            }
            _ => {
                if size != 0 || count != 0 {
                    return Err(bad("special file with a size".into()));
                }
            }
        }
        if kind != FileKind::Dir && node.parent.get() != 0 {
            return Err(bad("non-directory with a parent".into()));
        }
        let (xf, xc) = (node.xattr_first.get(), node.xattr_count.get() as u64);
        if xf
            .checked_add(xc)
            .is_none_or(|e| e > self.xattr_count() as u64)
        {
            return Err(bad(format!("xattrs {xf}+{xc} out of range")));
        }
        Ok(())
    }

    /// Entry `k` of directory `dir` (record `j` of the table, `d`), checked on its own and
    /// against the previous entry's name `prev` (§13 step 23 but whether a directory was
    /// reached before): the name, the child's number and kind, and a child directory's parent;
    /// the child's number if it is a directory.
    fn check_entry<'a>(
        &'a self,
        dir: u32,
        k: usize,
        j: usize,
        d: &Dirent,
        prev: &mut Option<&'a [u8]>,
    ) -> Result<Option<u32>> {
        let at = self.dirents.start + j * size_of::<Dirent>();
        let bad = |what: String| meta_err(format!("directory inode {dir} entry {k}: {what}"), at);
        let name = self.blob_slice(d.name_offset.get(), d.name_len.get() as u64, "name")?;
        if !valid_name(name) {
            return Err(bad("invalid name".into()));
        }
        if prev.is_some_and(|p| p >= name) {
            return Err(bad("names not sorted or repeated".into()));
        }
        *prev = Some(name);
        let child = d.inode.get();
        let cnode = match child.checked_sub(1) {
            Some(c) => self.rec::<Inode>(&self.inodes, c as usize)?,
            None => None,
        }
        .ok_or_else(|| bad(format!("inode {child} out of range")))?;
        let ckind = FileKind::from_mode(cnode.mode.get());
        if ckind.map(|k| k as u8) != Some(d.kind) {
            return Err(bad("kind differs from the inode's type".into()));
        }
        if ckind != Some(FileKind::Dir) {
            return Ok(None);
        }
        if cnode.parent.get() != dir {
            return Err(bad(format!("directory inode {child} names another parent")));
        }
        Ok(Some(child))
    }

    /// After a lazy open: directory `dir`'s entries `r` (§13 step 23 for one directory), once.
    /// Each subdirectory names `dir` as its parent and appears once, and the root in none:
    /// so the directories reached from the root form a tree, as the walk at open ensures.
    fn check_dir(&self, dir: u32, r: Range<usize>) -> Result<()> {
        let (word, bit) = (self.dir_ok.get(dir as usize / 64), 1u64 << (dir % 64));
        if word.is_some_and(|w| w.load(Ordering::Acquire) & bit != 0) {
            return Ok(());
        }
        let mut prev: Option<&[u8]> = None;
        let mut subdirs = Vec::new();
        for (k, j) in r.enumerate() {
            let d = self.dirent(j)?;
            if let Some(child) = self.check_entry(dir, k, j, &d, &mut prev)? {
                if child == ROOT_INO {
                    return Err(meta_err(
                        format!(
                            "directory inode {dir} entry {k}: directory inode 1 reached twice (cycle)"
                        ),
                        self.dirents.start + j * size_of::<Dirent>(),
                    ));
                }
                subdirs.push(child);
            }
        }
        subdirs.sort_unstable();
        if let Some(w) = subdirs.windows(2).find(|w| w[0] == w[1]) {
            return Err(meta_err(
                format!(
                    "directory inode {dir}: directory inode {} reached twice (cycle)",
                    w[0]
                ),
                self.inode_offset(dir),
            ));
        }
        if let Some(w) = word {
            w.fetch_or(bit, Ordering::Release);
        }
        Ok(())
    }

    /// Block `idx`'s record (§13 step 20): of every block at a usual open, of each block used
    /// after a lazy one.
    fn check_block(&self, idx: u32, b: &Block) -> Result<()> {
        let (off, st, raw) = (
            b.offset.get(),
            b.stored_len.get() as u64,
            b.raw_len.get() as u64,
        );
        let inside = off >= self.sum.data.start
            && off.checked_add(st).is_some_and(|e| e <= self.sum.data.end);
        if !inside || st == 0 || raw == 0 || raw > self.sum.block_size as u64 || st > raw {
            return Err(meta_err(
                format!("block {idx} (offset {off}, {st}/{raw} bytes) invalid"),
                self.blocks.start + idx as usize * size_of::<Block>(),
            ));
        }
        Ok(())
    }

    /// After a lazy open: chunk `k` of file `ino`, `len` bytes, lies in its block.
    fn check_chunk(&self, ino: u32, k: u64, c: &Chunk, len: u64) -> Result<()> {
        let blk = c.block.get();
        if blk == HOLE {
            return Ok(());
        }
        let at = self.inode_offset(ino);
        let (_, _, raw) = self.block_info(blk)?;
        if (c.offset.get() as u64).saturating_add(len) > raw as u64 {
            return Err(meta_err(
                format!("inode {ino}: chunk {k} runs past the end of block {blk}"),
                at,
            ));
        }
        Ok(())
    }

    /// The config, every block, and every inode with its chunks and xattrs (§13 steps 19-21).
    fn check_records(&self) -> Result<()> {
        let inodes = self.inode_table();
        let chunks = self.chunk_table();
        let blocks = self.block_table();
        let xattrs = self.xattr_table();
        let bs = self.sum.block_size as u64;
        let cfg = &self.hdr.config;
        self.blob_slice(cfg.offset.get(), cfg.count.get(), "config")?;
        for (i, b) in blocks.iter().enumerate() {
            self.check_block(i as u32, b)?;
        }
        // Inodes may share or overlap their chunk, entry and xattr ranges (FORMAT.md §6), so
        // checking each inode's range record by record could cost inodes × records on a
        // hostile image. Each record is checked once instead, the failures counted
        // cumulatively, and a range is checked in O(1) (`range_clean`); the record-by-record
        // loops below run only to report what is wrong in a range that is not clean.
        let chunk_fits = |c: &Chunk, len: u64| {
            let blk = c.block.get();
            blk == HOLE
                || blocks.get(blk as usize).is_some_and(|b| {
                    (c.offset.get() as u64).saturating_add(len) <= b.raw_len.get() as u64
                })
        };
        let full_chunk_fails = prefix_failures(chunks.len(), |j| !chunk_fits(&chunks[j], bs));
        let xattr_key = |j: usize| -> Option<&[u8]> {
            let x = &xattrs[j];
            let key = self
                .blob_slice(x.key_offset.get(), x.key_len.get() as u64, "xattr key")
                .ok()?;
            self.blob_slice(
                x.value_offset.get(),
                x.value_len.get() as u64,
                "xattr value",
            )
            .ok()?;
            let ok = !key.is_empty()
                && key.len() <= 255
                && !key.contains(&0)
                && x.value_len.get() <= 65536;
            ok.then_some(key)
        };
        let xattr_fails = sorted_failures(xattrs.len(), xattr_key);
        for (i, node) in inodes.iter().enumerate() {
            let ino = i as u32 + 1;
            let at = self.inodes.start + i * size_of::<Inode>();
            let bad = |what: String| meta_err(format!("inode {ino}: {what}"), at);
            // The inode's own fields and ranges, as a lazy open checks them; then its chunks
            // and xattrs, in O(1) per clean range.
            self.check_inode(ino, node)?;
            let (first, count, size) = (
                node.first.get() as usize,
                node.count.get() as usize,
                node.size.get(),
            );
            if FileKind::from_mode(node.mode.get()) == Some(FileKind::File) {
                let (a, e) = (first, first + count);
                let last_len = size - (count as u64).saturating_sub(1) * bs;
                let clean = range_clean(&full_chunk_fails, a, e, || {
                    chunk_fits(&chunks[e - 1], last_len)
                });
                let suspect = if clean { &chunks[a..a] } else { &chunks[a..e] };
                for (k, c) in suspect.iter().enumerate() {
                    let len = (size - k as u64 * bs).min(bs);
                    let blk = c.block.get();
                    if blk == HOLE {
                        continue;
                    }
                    let b = blocks
                        .get(blk as usize)
                        .ok_or_else(|| bad(format!("chunk {k} names missing block {blk}")))?;
                    if (c.offset.get() as u64).saturating_add(len) > b.raw_len.get() as u64 {
                        return Err(bad(format!("chunk {k} runs past the end of block {blk}")));
                    }
                }
            }
            let a = node.xattr_first.get() as usize;
            let e = a + node.xattr_count.get() as usize;
            let clean = range_clean(&xattr_fails, a, e, || xattr_key(e - 1).is_some());
            let suspect = if clean { &xattrs[a..a] } else { &xattrs[a..e] };
            let mut prev: Option<&[u8]> = None;
            for x in suspect {
                let key =
                    self.blob_slice(x.key_offset.get(), x.key_len.get() as u64, "xattr key")?;
                self.blob_slice(
                    x.value_offset.get(),
                    x.value_len.get() as u64,
                    "xattr value",
                )?;
                if key.is_empty() || key.len() > 255 || key.contains(&0) {
                    return Err(bad("invalid xattr key".into()));
                }
                if x.value_len.get() > 65536 {
                    return Err(bad("xattr value over 64 KiB".into()));
                }
                if prev.is_some_and(|p| p >= key) {
                    return Err(bad("xattr keys not sorted or repeated".into()));
                }
                prev = Some(key);
            }
        }
        Ok(())
    }

    /// Checks every record once so later accessors cannot meet an inconsistency.
    fn validate(&self) -> Result<()> {
        let inodes = self.inode_table();
        let dirents = self.dirent_table();
        let blocks = self.block_table();
        if inodes.is_empty() || inodes.len() >= u32::MAX as usize {
            return Err(meta_err(
                format!("inode count {}", inodes.len()),
                self.inodes.start,
            ));
        }
        if blocks.len() >= HOLE as usize {
            return Err(meta_err("too many blocks", self.blocks.start));
        }
        if self.sum.hot_blocks > blocks.len() as u64 {
            return Err(Error::corrupt("hot_blocks exceeds the block count", 88));
        }
        // The per-record checks, and the name checks of every directory entry that the graph
        // walk below uses, are independent: with several threads they run side by side, the
        // entries cut in two pieces per thread so that the threads finish together. Below
        // [`PARALLEL_VALIDATION_MIN`] entries a helper thread costs more than it saves.
        let n = dirents.len();
        let threads = if n >= self.parallel_validation_min {
            self.threads
        } else {
            1
        };
        let parts = if threads > 1 { 2 * threads } else { 1 };
        let records = std::sync::OnceLock::new();
        let pieces: Vec<std::sync::OnceLock<(Vec<u32>, Vec<u32>)>> =
            (0..parts).map(|_| std::sync::OnceLock::new()).collect();
        let (inode_table, blob) = (self.inode_table(), self.blob());
        let entry_piece = |k: usize| {
            let r = part(n, parts, k);
            (
                sorted_range_failures(r.clone(), n, |j| entry_name(&dirents[j], inode_table, blob)),
                range_failures(r, |j| dirents[j].kind == FileKind::Dir as u8),
            )
        };
        let mut tasks: Vec<Task<'_>> = vec![Box::new(|| {
            let _ = records.set(self.check_records());
        })];
        for (k, slot) in pieces.iter().enumerate() {
            tasks.push(Box::new(move || {
                let _ = slot.set(entry_piece(k));
            }));
        }
        run_tasks(threads, tasks);
        records
            .into_inner()
            .unwrap_or_else(|| self.check_records())?;
        let (entry_parts, dir_parts): (Vec<_>, Vec<_>) = pieces
            .into_iter()
            .enumerate()
            .map(|(k, p)| p.into_inner().unwrap_or_else(|| entry_piece(k)))
            .unzip();
        let (entry_fails, subdirs) = (join_prefix(entry_parts), join_prefix(dir_parts));
        // The directory graph: a tree rooted at inode 1, every directory reached exactly once,
        // its parent field naming the directory that holds it.
        let root = &inodes[0];
        if FileKind::from_mode(root.mode.get()) != Some(FileKind::Dir)
            || root.parent.get() != ROOT_INO
        {
            return Err(meta_err(
                "inode 1 is not a root directory",
                self.inodes.start,
            ));
        }
        // A range of valid, sorted entries naming no directory needs no walk (see above). The
        // others are walked whole; each directory entry is reached at most once, so the ranges
        // walked without error each hold an entry no other one holds, and such intervals
        // cover any point at most twice: the walk stays linear however ranges are shared.
        let mut seen = vec![false; inodes.len()];
        seen[0] = true;
        let mut stack = vec![ROOT_INO];
        while let Some(dir) = stack.pop() {
            let node = &inodes[dir as usize - 1];
            let (first, count) = (node.first.get() as usize, node.count.get() as usize);
            let (a, e) = (first, first + count);
            if subdirs[e].wrapping_sub(subdirs[a]) == 0
                && range_clean(&entry_fails, a, e, || self.entry_name(e - 1).is_some())
            {
                continue;
            }
            let mut prev: Option<&[u8]> = None;
            for (k, d) in dirents[first..first + count].iter().enumerate() {
                if let Some(child) = self.check_entry(dir, k, first + k, d, &mut prev)? {
                    let slot = &mut seen[child as usize - 1];
                    if *slot {
                        return Err(meta_err(
                            format!(
                                "directory inode {dir} entry {k}: directory inode {child} reached twice (cycle)"
                            ),
                            self.dirents.start + (first + k) * size_of::<Dirent>(),
                        ));
                    }
                    *slot = true;
                    stack.push(child);
                }
            }
        }
        Ok(())
    }

    /// What the superblock says.
    pub fn summary(&self) -> &Summary {
        &self.sum
    }

    /// The metadata header (table sizes, logical and deduplicated bytes).
    pub fn header(&self) -> &MetaHeader {
        &self.hdr
    }

    /// The name used for this image in errors.
    pub fn label(&self) -> &Path {
        &self.label
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.sum.block_size
    }

    /// Number of inodes; valid inode numbers are `1..=inode_count()`.
    pub fn inode_count(&self) -> u32 {
        self.inode_count_usize() as u32
    }

    /// Number of data blocks.
    pub fn block_count(&self) -> u32 {
        (self.blocks.len() / size_of::<Block>()) as u32
    }

    /// The image config (JSON) if the image carries one.
    pub fn config(&self) -> Option<&[u8]> {
        let c = &self.hdr.config;
        match self.blob_slice(c.offset.get(), c.count.get(), "config") {
            Ok(b) if !b.is_empty() => Some(b),
            _ => None,
        }
    }

    /// Inode `ino` (after a lazy open, checked on its own first).
    fn inode(&self, ino: u32) -> Result<Inode> {
        let node = match ino.checked_sub(1) {
            Some(i) => self.rec::<Inode>(&self.inodes, i as usize)?,
            None => None,
        }
        .ok_or_else(|| Error::corrupt(format!("inode {ino} does not exist"), 0))?;
        if !self.checked {
            self.check_inode(ino, &node)?;
        }
        Ok(node)
    }

    /// Attributes of `ino`.
    pub fn attr(&self, ino: u32) -> Result<Attr> {
        let n = self.inode(ino)?;
        let mode = n.mode.get();
        let kind = FileKind::from_mode(mode)
            .ok_or_else(|| meta_err(format!("inode {ino} has no type"), self.inode_offset(ino)))?;
        let rdev = match kind {
            FileKind::CharDev | FileKind::BlockDev => n.first.get(),
            _ => 0,
        };
        Ok(Attr {
            ino,
            kind,
            mode,
            uid: n.uid.get(),
            gid: n.gid.get(),
            nlink: n.nlink.get(),
            size: n.size.get(),
            mtime_sec: n.mtime_sec.get(),
            mtime_nsec: n.mtime_nsec.get(),
            rdev,
        })
    }

    /// The indexes of directory `dir`'s entries (after a lazy open, checked once first).
    fn dir_range(&self, dir: u32) -> Result<Range<usize>> {
        let n = self.inode(dir)?;
        if FileKind::from_mode(n.mode.get()) != Some(FileKind::Dir) {
            return Err(Error::WrongType {
                ino: dir,
                what: "not a directory",
            });
        }
        let first = n.first.get() as usize;
        let r = first
            .checked_add(n.count.get() as usize)
            .filter(|&e| e <= self.dirent_count())
            .map(|e| first..e)
            .ok_or_else(|| meta_err(format!("entries of inode {dir}"), self.inode_offset(dir)))?;
        if !self.checked {
            self.check_dir(dir, r.clone())?;
        }
        Ok(r)
    }

    fn entry(&self, d: &Dirent) -> Result<DirEntry<'_>> {
        let name = self.blob_slice(d.name_offset.get(), d.name_len.get() as u64, "name")?;
        let kind = FileKind::from_u8(d.kind)
            .ok_or_else(|| meta_err(format!("entry kind {}", d.kind), self.dirents.start))?;
        Ok(DirEntry {
            name,
            ino: d.inode.get(),
            kind,
        })
    }

    /// Number of entries of directory `dir`.
    pub fn dir_len(&self, dir: u32) -> Result<usize> {
        Ok(self.dir_range(dir)?.len())
    }

    /// Entry `index` of directory `dir` in name order, or `None` past the end.
    pub fn dir_entry(&self, dir: u32, index: usize) -> Result<Option<DirEntry<'_>>> {
        let r = self.dir_range(dir)?;
        if index >= r.len() {
            return Ok(None);
        }
        self.entry(&self.dirent(r.start + index)?).map(Some)
    }

    /// All entries of directory `dir`, in name order.
    pub fn readdir(&self, dir: u32) -> Result<impl Iterator<Item = Result<DirEntry<'_>>> + '_> {
        self.readdir_from(dir, 0)
    }

    /// The entries of directory `dir` from entry `start` on, in name order (none if `start`
    /// is past the end).
    pub fn readdir_from(
        &self,
        dir: u32,
        start: usize,
    ) -> Result<impl Iterator<Item = Result<DirEntry<'_>>> + '_> {
        let r = self.dir_range(dir)?;
        let a = r.start.saturating_add(start).min(r.end);
        Ok((a..r.end).map(|j| self.dirent(j).and_then(|d| self.entry(&d))))
    }

    /// The inode named `name` in directory `dir` (binary search), if any.
    pub fn lookup(&self, dir: u32, name: &[u8]) -> Result<Option<u32>> {
        let r = self.dir_range(dir)?;
        let (mut lo, mut hi) = (r.start, r.end);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let d = self.dirent(mid)?;
            let n = self.blob_slice(d.name_offset.get(), d.name_len.get() as u64, "name")?;
            match n.cmp(name) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Ok(Some(d.inode.get())),
            }
        }
        Ok(None)
    }

    /// Parent directory of directory `dir` (the root's parent is the root).
    pub fn parent(&self, dir: u32) -> Result<u32> {
        let n = self.inode(dir)?;
        if FileKind::from_mode(n.mode.get()) != Some(FileKind::Dir) {
            return Err(Error::WrongType {
                ino: dir,
                what: "not a directory",
            });
        }
        Ok(n.parent.get())
    }

    /// Resolve a `/`-separated path from the root without following symlinks. Empty
    /// components and `.` are skipped, `..` goes to the parent.
    pub fn resolve(&self, path: &[u8]) -> Result<u32> {
        let mut ino = ROOT_INO;
        for comp in path.split(|&c| c == b'/') {
            match comp {
                b"" | b"." => {}
                b".." => ino = self.parent(ino)?,
                name => {
                    ino = match self.lookup(ino, name) {
                        Ok(Some(i)) => i,
                        Ok(None) | Err(Error::WrongType { .. }) => {
                            return Err(Error::NotFound(String::from_utf8_lossy(path).into()));
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Ok(ino)
    }

    /// Target of symlink `ino`.
    pub fn readlink(&self, ino: u32) -> Result<&[u8]> {
        let n = self.inode(ino)?;
        if FileKind::from_mode(n.mode.get()) != Some(FileKind::Symlink) {
            return Err(Error::WrongType {
                ino,
                what: "not a symlink",
            });
        }
        self.blob_slice(n.first.get(), n.count.get() as u64, "symlink target")
    }

    /// Extended attributes of `ino` as (key, value) pairs sorted by key.
    pub fn xattrs(&self, ino: u32) -> Result<Vec<(&[u8], &[u8])>> {
        let n = self.inode(ino)?;
        let first = n.xattr_first.get() as usize;
        let end = first
            .checked_add(n.xattr_count.get() as usize)
            .filter(|&e| e <= self.xattr_count())
            .ok_or_else(|| meta_err(format!("xattrs of inode {ino}"), self.inode_offset(ino)))?;
        let mut out: Vec<(&[u8], &[u8])> = Vec::with_capacity((end - first).min(1024));
        for j in first..end {
            let x: Xattr = self.rec(&self.xattrs, j)?.ok_or_else(|| {
                meta_err(format!("xattrs of inode {ino}"), self.inode_offset(ino))
            })?;
            let key = self.blob_slice(x.key_offset.get(), x.key_len.get() as u64, "xattr key")?;
            let value = self.blob_slice(
                x.value_offset.get(),
                x.value_len.get() as u64,
                "xattr value",
            )?;
            if !self.checked {
                let bad =
                    |what: &str| meta_err(format!("inode {ino}: {what}"), self.inode_offset(ino));
                if key.is_empty() || key.len() > 255 || key.contains(&0) {
                    return Err(bad("invalid xattr key"));
                }
                if value.len() > 65536 {
                    return Err(bad("xattr value over 64 KiB"));
                }
                if out.last().is_some_and(|(p, _)| *p >= key) {
                    return Err(bad("xattr keys not sorted or repeated"));
                }
            }
            out.push((key, value));
        }
        Ok(out)
    }

    /// Value of extended attribute `key` of `ino`, if present.
    pub fn getxattr(&self, ino: u32, key: &[u8]) -> Result<Option<&[u8]>> {
        Ok(self
            .xattrs(ino)?
            .into_iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v))
    }

    /// The indexes of regular file `ino`'s chunks, and its size.
    fn file_chunks(&self, ino: u32) -> Result<(Range<usize>, u64)> {
        let n = self.inode(ino)?;
        if FileKind::from_mode(n.mode.get()) != Some(FileKind::File) {
            return Err(Error::WrongType {
                ino,
                what: "not a regular file",
            });
        }
        let first = n.first.get() as usize;
        let r = first
            .checked_add(n.count.get() as usize)
            .filter(|&e| e <= self.chunk_count())
            .map(|e| first..e)
            .ok_or_else(|| meta_err(format!("chunks of inode {ino}"), self.inode_offset(ino)))?;
        Ok((r, n.size.get()))
    }

    /// Extent `k` of file `ino` (of `size` bytes) from its chunk `c` (after a lazy open,
    /// checked first).
    fn extent(&self, ino: u32, size: u64, k: u64, c: &Chunk) -> Result<Extent> {
        let file_offset = k << self.block_log;
        let len = size
            .saturating_sub(file_offset)
            .min(self.sum.block_size as u64);
        if !self.checked {
            self.check_chunk(ino, k, c, len)?;
        }
        Ok(Extent {
            file_offset,
            len: len as u32,
            block: (c.block.get() != HOLE).then(|| c.block.get()),
            block_offset: c.offset.get(),
        })
    }

    /// The extents of regular file `ino`, in file order (one per chunk).
    pub fn extents(&self, ino: u32) -> Result<impl Iterator<Item = Extent> + '_> {
        let (r, size) = self.file_chunks(ino)?;
        let v = r
            .enumerate()
            .map(|(k, j)| self.extent(ino, size, k as u64, &self.chunk(j)?))
            .collect::<Result<Vec<Extent>>>()?;
        Ok(v.into_iter())
    }

    /// The extent holding byte `offset` of file `ino`, if `offset` is inside the file.
    pub fn extent_at(&self, ino: u32, offset: u64) -> Result<Option<Extent>> {
        let (r, size) = self.file_chunks(ino)?;
        if offset >= size {
            return Ok(None);
        }
        let k = offset >> self.block_log;
        if k >= r.len() as u64 {
            return Err(meta_err(
                format!("inode {ino} lacks chunk {k}"),
                self.inode_offset(ino),
            ));
        }
        let c = self.chunk(r.start + k as usize)?;
        self.extent(ino, size, k, &c).map(Some)
    }

    /// Block `idx`'s record (after a lazy open, checked first).
    fn block(&self, idx: u32) -> Result<Block> {
        let b = self
            .rec::<Block>(&self.blocks, idx as usize)?
            .ok_or_else(|| meta_err(format!("block {idx} does not exist"), self.blocks.start))?;
        if !self.checked {
            self.check_block(idx, &b)?;
        }
        Ok(b)
    }

    /// Where block `idx` lies: file offset, stored length and decompressed length.
    pub fn block_info(&self, idx: u32) -> Result<(u64, u32, u32)> {
        let b = self.block(idx)?;
        Ok((b.offset.get(), b.stored_len.get(), b.raw_len.get()))
    }

    /// Read the stored bytes of block `idx` into `buf` (resized) and verify their checksum.
    pub fn read_stored(&self, idx: u32, buf: &mut Vec<u8>) -> Result<()> {
        let (off, st, _) = self.block_info(idx)?;
        buf.resize(st as usize, 0);
        self.src
            .read_exact_at(buf, off)
            .map_err(|e| Error::BadBlock {
                block: idx,
                offset: off,
                why: format!("read of {}: {e}", self.label.display()),
            })?;
        self.check_stored(idx, buf)
    }

    /// Verify that `stored` are block `idx`'s stored bytes (length and checksum), e.g. a
    /// slice of a larger read that covered several blocks.
    pub fn check_stored(&self, idx: u32, stored: &[u8]) -> Result<()> {
        let b = self.block(idx)?;
        let (off, st, sum) = (b.offset.get(), b.stored_len.get(), b.checksum.get());
        if stored.len() != st as usize || xxh3_64(stored) != sum {
            return Err(Error::BadBlock {
                block: idx,
                offset: off,
                why: "checksum mismatch".into(),
            });
        }
        Ok(())
    }

    /// Decode the verified stored bytes of block `idx` into `out`, which must be exactly the
    /// block's decompressed length.
    pub fn decode_block(&self, idx: u32, stored: &[u8], out: &mut [u8]) -> Result<()> {
        let (off, st, raw) = self.block_info(idx)?;
        let bad = |why: String| Error::BadBlock {
            block: idx,
            offset: off,
            why,
        };
        if out.len() != raw as usize || stored.len() != st as usize {
            return Err(bad("buffer sizes differ from the block table".into()));
        }
        if st == raw {
            out.copy_from_slice(stored);
            return Ok(());
        }
        thread_local! {
            static DCTX: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
        }
        DCTX.with(|cell| {
            let mut cell = cell.borrow_mut();
            if cell.is_none() {
                *cell =
                    Some(zstd::bulk::Decompressor::new().map_err(|e| bad(format!("zstd: {e}")))?);
            }
            let Some(d) = cell.as_mut() else {
                return Err(bad("zstd context".into()));
            };
            match d.decompress_to_buffer(stored, out) {
                Ok(n) if n == raw as usize => Ok(()),
                Ok(n) => Err(bad(format!("decompressed to {n} bytes, expected {raw}"))),
                Err(e) => Err(bad(format!("does not decompress: {e}"))),
            }
        })
    }

    /// Read, verify and decompress block `idx`.
    pub fn read_block(&self, idx: u32) -> Result<Vec<u8>> {
        let mut stored = Vec::new();
        self.read_stored(idx, &mut stored)?;
        let (_, _, raw) = self.block_info(idx)?;
        let mut out = vec![0u8; raw as usize];
        self.decode_block(idx, &stored, &mut out)?;
        Ok(out)
    }

    /// Read bytes of regular file `ino` at `offset` into `buf`; returns how many (0 at or past
    /// the end). Decompresses each block it touches; callers that read many small pieces
    /// should use a [`BlockCache`] instead.
    pub fn read_at(&self, ino: u32, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let mut cache = BlockCache::new(1);
        cache.read_at(self, ino, offset, buf)
    }

    /// Read the raw bytes `range` of the image file (for digests and prefetch).
    pub fn read_raw(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.src
            .read_exact_at(buf, offset)
            .map_err(|e| Error::io(&self.label, e))
    }

    /// Verify every block and the image digest; returns the indexes of bad blocks with their
    /// errors. The metadata was verified by `open`.
    pub fn verify(&self, mut progress: impl FnMut(u64)) -> Result<Vec<Error>> {
        let mut bad = Vec::new();
        let mut stored = Vec::new();
        let mut out = Vec::new();
        for idx in 0..self.block_count() {
            let (_, st, raw) = self.block_info(idx)?;
            out.resize(raw as usize, 0);
            let r = self
                .read_stored(idx, &mut stored)
                .and_then(|()| self.decode_block(idx, &stored, &mut out));
            if let Err(e) = r {
                bad.push(e);
            }
            progress(st as u64);
        }
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut off = self.sum.data.start;
        while off < self.sum.image_size {
            let n = (self.sum.image_size - off).min(buf.len() as u64) as usize;
            self.read_raw(off, &mut buf[..n])?;
            h.update(&buf[..n]);
            off += n as u64;
        }
        if h.digest128() != self.sum.digest {
            bad.push(Error::corrupt("image digest mismatch", self.sum.data.start));
        }
        Ok(bad)
    }

    /// Paths of the regular files that use block `idx` (for naming the victims of a bad
    /// block). Walks the whole tree.
    pub fn files_using_block(&self, idx: u32) -> Result<Vec<Vec<u8>>> {
        let mut found = Vec::new();
        self.walk(|path, e| {
            if e.kind == FileKind::File && self.extents(e.ino)?.any(|x| x.block == Some(idx)) {
                found.push(path.to_vec());
            }
            Ok(())
        })?;
        Ok(found)
    }

    /// Visit every entry below the root in depth-first name order with its path (no leading
    /// slash). Directories are visited before their contents.
    pub fn walk(&self, mut f: impl FnMut(&[u8], &DirEntry<'_>) -> Result<()>) -> Result<()> {
        // Each directory's entries not visited yet, and the length of its path.
        let mut stack: Vec<(Range<usize>, usize)> = vec![(self.dir_range(ROOT_INO)?, 0)];
        let mut path: Vec<u8> = Vec::new();
        while let Some((entries, plen)) = stack.last_mut() {
            let plen = *plen;
            let Some(j) = entries.next() else {
                stack.pop();
                continue;
            };
            let e = self.entry(&self.dirent(j)?)?;
            path.truncate(plen);
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(e.name);
            f(&path, &e)?;
            if e.kind == FileKind::Dir {
                stack.push((self.dir_range(e.ino)?, path.len()));
            }
        }
        Ok(())
    }
}

/// A small most-recently-used cache of decompressed blocks for sequential tools (`cat`,
/// `unpack`): files packed together share tail blocks, so consecutive reads hit.
#[derive(Debug)]
pub struct BlockCache {
    slots: Vec<(u32, Vec<u8>)>,
    cap: usize,
    stored: Vec<u8>,
}

impl BlockCache {
    /// A cache of `cap` blocks (at least one).
    pub fn new(cap: usize) -> Self {
        BlockCache {
            slots: Vec::new(),
            cap: cap.max(1),
            stored: Vec::new(),
        }
    }

    /// The decompressed block `idx`.
    pub fn get<R: ReadAt>(&mut self, img: &Image<R>, idx: u32) -> Result<&[u8]> {
        if let Some(p) = self.slots.iter().position(|(i, _)| *i == idx) {
            let hit = self.slots.remove(p);
            self.slots.push(hit);
        } else {
            img.read_stored(idx, &mut self.stored)?;
            let (_, _, raw) = img.block_info(idx)?;
            let mut buf = if self.slots.len() >= self.cap {
                self.slots.remove(0).1
            } else {
                Vec::new()
            };
            buf.resize(raw as usize, 0);
            img.decode_block(idx, &self.stored, &mut buf)?;
            self.slots.push((idx, buf));
        }
        Ok(self.slots.last().map(|(_, b)| b.as_slice()).unwrap_or(&[]))
    }

    /// As [`Image::read_at`], through this cache.
    pub fn read_at<R: ReadAt>(
        &mut self,
        img: &Image<R>,
        ino: u32,
        mut offset: u64,
        buf: &mut [u8],
    ) -> Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            let Some(ext) = img.extent_at(ino, offset)? else {
                break;
            };
            let within = (offset - ext.file_offset) as usize;
            let n = (ext.len as usize - within).min(buf.len() - done);
            let dst = &mut buf[done..done + n];
            match ext.block {
                None => dst.fill(0),
                Some(b) => {
                    let data = self.get(img, b)?;
                    let start = ext.block_offset as usize + within;
                    let src = data.get(start..start + n).ok_or_else(|| Error::BadBlock {
                        block: b,
                        offset: 0,
                        why: format!("extent {start}+{n} outside the block"),
                    })?;
                    dst.copy_from_slice(src);
                }
            }
            done += n;
            offset += n as u64;
        }
        Ok(done)
    }
}

/// Checksum helpers shared with the writer, so both sides agree by construction.
pub(crate) fn block_checksum(stored: &[u8]) -> u64 {
    xxh3_64(stored)
}

/// Content hash used for deduplication by the writer.
pub(crate) fn content_hash(data: &[u8]) -> u128 {
    xxh3_128(data)
}

/// Serialize a superblock with its checksum filled in.
pub(crate) fn seal_superblock(sb: &mut Superblock) -> [u8; 128] {
    let mut bytes = [0u8; 128];
    bytes.copy_from_slice(sb.as_bytes());
    sb.checksum.set(xxh3_64(&bytes[..120]));
    bytes.copy_from_slice(sb.as_bytes());
    bytes
}
