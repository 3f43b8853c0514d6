//! Robustness of the reader against corrupted and hostile images.
//!
//! A few small but rich trees (nested directories, tail-packed small files, multi-block files
//! stored compressed and raw, a sparse file, duplicate files, symlinks, hard links, a fifo,
//! `user.*` xattrs, a hot list and a config) are packed with 4 KiB blocks, then each image is
//! mutated thousands of times and every reader call is run on the result ([`exercise`]).
//! For every case this checks:
//! - no panic: each case runs under `catch_unwind`; failures name the class and the seed;
//! - no hang: a watchdog aborts the process, naming the case, if one runs over 10 s;
//! - bounded allocation: a counting global allocator measures the peak of each case, which
//!   must stay under [`alloc_cap`] (a small multiple of the image plus a constant, far below
//!   the 64 MiB `max_metadata` the bombs decompress to); a hard limit turns a runaway
//!   allocation into an abort;
//! - errors are `cimg_format::Error`s whose message is one non-empty line that does not start
//!   with a capital letter;
//! - internal consistency of whatever opens: `resolve`, `lookup`, `readdir`, `dir_entry`,
//!   `attr`, `getxattr`, `extent_at`, `read_at` and `read_block` agree with each other.
//!
//! Mutation classes:
//! - (a) `bitflip`: 1–8 random bit flips anywhere; (b) `truncate`: truncation to a random
//!   length and/or appended garbage. Every byte the reader uses is checksummed, so an image that
//!   still opens and reads without error must give exactly the original snapshot.
//! - (c) `superblock`: superblock bytes and fields overwritten, the superblock checksum resealed;
//! - (d) `metadata`: the decompressed metadata edited with knowledge of its structure (bit flips,
//!   boundary values in every record field, overlong lengths, offsets past the end, directory
//!   cycles, duplicate and unsorted names, bad names, type changes, resized tables, lying
//!   lengths, corrupt or oversized zstd frames, decompression bombs: the tables then zeros up
//!   to the limit, with a matching raw length), recompressed, every checksum and the digest
//!   recomputed, so that validation rather than checksums must catch it;
//! - (e) `datablock`: stored data blocks altered with their checksums recomputed, so the
//!   decompressor sees garbage; the image must still open and only those blocks may fail.
//!
//! Explicit tests check that a corrupt block is reported by index by `verify` and `read_at`,
//! and that metadata shaped to make validation quadratic (shared chunk lists, shared directory
//! entries, shared xattr lists) or very deep is handled in bounded time.
//!
//! Environment: `CIMG_MUTATIONS=N` sets the number of cases (default 10,000);
//! `CIMG_CASE=d:0x1234` runs one case (class letter and seed as printed on failure);
//! `CIMG_ROBUST_TRACE=1` prints each case before it runs, to find the case behind an abort;
//! `CIMG_ROBUST_ERRORS=1` lists, per class, the distinct errors met (which checks were reached).
//! Run with `--nocapture` to see the per-class report.

mod common;

use cap::Cap;
use cimg_format::layout::{
    self, Block, Chunk, Dirent, HOLE, Inode, MetaHeader, SUPERBLOCK_AREA, Superblock, Table, Xattr,
};
use cimg_format::reader::{BlockCache, Extent};
use cimg_format::{
    Attr, DirEntry, Error, FileKind, Image, OpenOptions, PackOptions, Result, mode, pack_dir,
};
use peak_alloc::PeakAlloc;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileExt, PermissionsExt, symlink};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};
use xxhash_rust::xxh3::{xxh3_64, xxh3_128};
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

/// Counts every allocation: `Cap` enforces a hard limit (set in [`serial`]), `PeakAlloc`
/// keeps the current total and a resettable peak.
#[global_allocator]
static ALLOC: Cap<PeakAlloc> = Cap::new(PeakAlloc, usize::MAX);

/// `max_metadata` used to open every mutated image.
const MAX_META: u64 = 64 << 20;
/// Largest allowed peak of one case, for a base image of `len` bytes: a small multiple of the
/// image (the mutated copies the case makes, the stored and the decompressed metadata, which
/// the reader decompresses no further than its tables end) plus a constant (a zstd window,
/// blocks of a few KiB, the test's own bookkeeping), whatever size the mutated superblock
/// and header declare and however far the stored metadata would decompress (up to
/// `MAX_META`: the bombs of [`frames`] and [`zeros_after`]).
fn alloc_cap(len: usize) -> usize {
    8 * len + (8 << 20)
}
/// Above this the allocator refuses, which aborts the process at once.
const HARD_LIMIT: usize = 1 << 30;
/// A case running longer than this is a hang.
const CASE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of file content one case reads at most (a mutated size may claim gigabytes of holes).
const READ_BUDGET: u64 = 16 << 20;
/// Entries and inodes one case visits at most.
const ENTRY_BUDGET: usize = 100_000;
const BLOCK_LOG: u8 = 12;
const BS: u64 = 1 << BLOCK_LOG;

// ---------------------------------------------------------------------------------------------
// Harness: serialisation, watchdog, PRNG.

/// Tests in this file run one at a time (allocation peaks are process-wide), and the hard
/// allocation limit is set once.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    static LIMIT: OnceLock<()> = OnceLock::new();
    let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    LIMIT.get_or_init(|| {
        assert!(
            ALLOC.set_limit(ALLOC.allocated() + HARD_LIMIT).is_ok(),
            "allocation limit"
        );
    });
    guard
}

/// Aborts the process, naming the case, when one case runs longer than [`CASE_TIMEOUT`].
struct Watchdog {
    state: Arc<WatchState>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct WatchState {
    current: Mutex<Option<(String, Instant)>>,
    stop: AtomicBool,
}

impl Watchdog {
    fn start() -> Self {
        let state = Arc::new(WatchState {
            current: Mutex::new(None),
            stop: AtomicBool::new(false),
        });
        let s = state.clone();
        let thread = std::thread::spawn(move || {
            while !s.stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
                let cur = s.current.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((what, t0)) = cur.as_ref()
                    && t0.elapsed() > CASE_TIMEOUT
                {
                    // Straight to stderr: the test harness's capture dies with the process.
                    let _ = writeln!(
                        std::io::stderr(),
                        "\nrobust: HANG: {what} has run for over {} s; aborting",
                        CASE_TIMEOUT.as_secs()
                    );
                    std::process::abort();
                }
            }
        });
        Watchdog {
            state,
            thread: Some(thread),
        }
    }

    fn begin(&self, what: String) {
        *self.state.current.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((what, Instant::now()));
    }

    fn end(&self) {
        *self.state.current.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// splitmix64: tiny, deterministic, good enough to drive mutations.
struct Rng(u64);

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
    fn index(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }
    fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.index(items.len())]
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

// ---------------------------------------------------------------------------------------------
// Source trees and base images.

fn text(seed: u64, n: usize) -> Vec<u8> {
    const WORDS: [&[u8]; 8] = [
        b"alpha ", b"beta ", b"gamma ", b"delta\n", b"image ", b"block ", b"cimg ", b"zstd ",
    ];
    let mut r = Rng(seed);
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        v.extend_from_slice(WORDS[r.index(WORDS.len())]);
    }
    v.truncate(n);
    v
}

fn noise(seed: u64, n: usize) -> Vec<u8> {
    Rng(seed ^ 0xA5A5).bytes(n)
}

fn write_file(root: &Path, rel: &str, data: &[u8]) {
    let p = root.join(rel);
    if let Some(d) = p.parent() {
        fs::create_dir_all(d).unwrap();
    }
    fs::write(&p, data).unwrap();
}

fn set_xattr(root: &Path, rel: &str, key: &str, value: &[u8]) {
    if let Err(e) = xattr::set(root.join(rel), key, value) {
        eprintln!("note: cannot set xattr {key} on {rel}: {e}");
    }
}

/// Packing input besides the tree: hot list and config.
type Extra = (Vec<Vec<u8>>, Option<Vec<u8>>);
/// Fills a directory with a source tree.
type Builder = fn(&Path) -> Extra;

fn tree_rich(root: &Path) -> Extra {
    let w = |rel: &str, data: &[u8]| write_file(root, rel, data);
    w("a/b/c/d/deep.txt", b"deep\n");
    w("a/b/sibling.txt", &text(1, 700));
    fs::create_dir_all(root.join("empty_dir")).unwrap();
    w("empty_file", b"");
    for i in 0..40u64 {
        let n = (i * 37 + 1) as usize;
        let data = if i % 2 == 0 {
            text(100 + i, n)
        } else {
            noise(100 + i, n)
        };
        w(&format!("small/f{i:02}"), &data);
    }
    let comp = text(2, 5 * BS as usize + 123);
    w("big/compressible.bin", &comp);
    w("big/copy_of_compressible.bin", &comp);
    w("big/random.bin", &noise(3, 3 * BS as usize + 7));
    w("big/exact_block.bin", &text(4, BS as usize));
    w("big/block_plus_one.bin", &noise(5, BS as usize + 1));
    let dup = text(6, 300);
    w("dup_1.txt", &dup);
    w("dup_2.txt", &dup);
    let f = fs::File::create(root.join("sparse.bin")).unwrap();
    f.set_len(10 * BS).unwrap();
    f.write_all_at(b"island", 5 * BS + 10).unwrap();
    f.write_all_at(b"end", 10 * BS - 3).unwrap();
    drop(f);
    fs::create_dir_all(root.join("links")).unwrap();
    symlink("../a/b/sibling.txt", root.join("links/rel")).unwrap();
    symlink("/etc/passwd", root.join("links/abs")).unwrap();
    symlink("nope/nothing", root.join("links/dangling")).unwrap();
    symlink("x/".repeat(100), root.join("links/long")).unwrap();
    symlink("../a", root.join("links/dir")).unwrap();
    w("hard1", &noise(7, 2 * BS as usize + 50));
    fs::hard_link(root.join("hard1"), root.join("a/hard2")).unwrap();
    nix::unistd::mkfifo(
        &root.join("pipe"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    w("name with spaces", b"spaces");
    w("ünïcödé", "ünïcödé".as_bytes());
    w(".hidden", b"h");
    w("z", b"z");
    set_xattr(root, "big/random.bin", "user.comment", b"hello");
    set_xattr(root, "a", "user.a", b"1");
    set_xattr(root, "a", "user.b", b"");
    set_xattr(root, "a", "user.zz", &text(8, 1000));
    set_xattr(root, "empty_file", "user.empty", b"");
    set_xattr(root, "small/f01", "user.big", &noise(9, 3000));
    set_xattr(root, "dup_1.txt", "user.x", b"1");
    fs::set_permissions(root.join("small/f03"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(root.join("a/b"), fs::Permissions::from_mode(0o750)).unwrap();
    (Vec::new(), None)
}

fn tree_hot(root: &Path) -> Extra {
    let w = |rel: &str, data: &[u8]| write_file(root, rel, data);
    let deep: String = (0..12).map(|i| format!("d{i}/")).collect();
    let leaf = format!("{deep}leaf.txt");
    w(&leaf, b"leaf\n");
    fs::create_dir_all(root.join("wide")).unwrap();
    for i in 0..300u64 {
        let name = format!("wide/e{i:03}");
        match i % 10 {
            0 => symlink(format!("e{:03}", (i + 1) % 300), root.join(&name)).unwrap(),
            1 => fs::create_dir(root.join(&name)).unwrap(),
            2 => w(&name, &noise(i, 50)),
            _ => w(&name, b""),
        }
    }
    let mut blob = text(10, 10 * BS as usize);
    blob.extend(noise(11, 10 * BS as usize));
    w("blob.bin", &blob);
    w("tail_a", &text(12, 5000));
    w("tail_b", &noise(13, 2000));
    w("tail_c", &text(12, 5000));
    set_xattr(root, "wide", "user.wide", b"yes");
    set_xattr(root, "blob.bin", "user.mime", b"application/octet-stream");
    let hot = vec![
        b"blob.bin".to_vec(),
        b"tail_b".to_vec(),
        leaf.into_bytes(),
        b"missing/file".to_vec(),
    ];
    (
        hot,
        Some(br#"{"entrypoint":["/bin/sh"],"env":["A=1"]}"#.to_vec()),
    )
}

fn tree_tiny(root: &Path) -> Extra {
    write_file(root, "hello", b"hello, cimg");
    fs::create_dir_all(root.join("d")).unwrap();
    symlink("../hello", root.join("d/link")).unwrap();
    (Vec::new(), None)
}

/// A packed image and everything the mutators need to know about it.
struct Base {
    name: &'static str,
    bytes: Vec<u8>,
    snap: Snapshot,
    sb: Superblock,
    raw: Vec<u8>,
    hdr: MetaHeader,
    dirs: Vec<DirInfo>,
    /// (dirent index, containing directory, child directory) for every subdirectory entry.
    dir_links: Vec<(usize, u32, u32)>,
    /// (inode, first, count) of every inode with xattrs.
    xattr_sets: Vec<(u32, usize, usize)>,
    files: Vec<u32>,
    symlinks: Vec<u32>,
}

#[derive(Debug, Clone, Copy)]
struct DirInfo {
    ino: u32,
    parent: u32,
    first: usize,
    count: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum T {
    Inode,
    Dirent,
    Chunk,
    Block,
    Xattr,
}

const TABLES: [T; 5] = [T::Inode, T::Dirent, T::Chunk, T::Block, T::Xattr];

impl T {
    fn record(self) -> &'static str {
        match self {
            T::Inode => "Inode",
            T::Dirent => "Dirent",
            T::Chunk => "Chunk",
            T::Block => "Block",
            T::Xattr => "Xattr",
        }
    }
    fn size(self) -> usize {
        match self {
            T::Inode => size_of::<Inode>(),
            T::Dirent => size_of::<Dirent>(),
            T::Chunk => size_of::<Chunk>(),
            T::Block => size_of::<Block>(),
            T::Xattr => size_of::<Xattr>(),
        }
    }
}

impl Base {
    fn table(&self, t: T) -> (usize, usize) {
        let h = &self.hdr;
        let tb = match t {
            T::Inode => &h.inodes,
            T::Dirent => &h.dirents,
            T::Chunk => &h.chunks,
            T::Block => &h.blocks,
            T::Xattr => &h.xattrs,
        };
        (tb.offset.get() as usize, tb.count.get() as usize)
    }
    fn count(&self, t: T) -> usize {
        self.table(t).1
    }
    /// Byte offset in the metadata of field `name` of record `i` of table `t`, and its width.
    fn at(&self, t: T, i: usize, name: &str) -> (usize, usize) {
        let (off, _) = self.table(t);
        let (fo, w) = field(t.record(), name);
        (off + i * t.size() + fo, w)
    }
    fn inode_at(&self, ino: u32, name: &str) -> (usize, usize) {
        self.at(T::Inode, ino as usize - 1, name)
    }
    fn blob_len(&self) -> u64 {
        self.hdr.blob.count.get()
    }
    fn meta_offset(&self) -> usize {
        self.sb.meta_offset.get() as usize
    }
    fn data_end(&self) -> u64 {
        self.sb.data_offset.get() + self.sb.data_len.get()
    }
    fn meta_get(&self, at: (usize, usize)) -> u64 {
        get(&self.raw, at.0, at.1)
    }
}

fn opts() -> OpenOptions {
    OpenOptions {
        max_metadata: MAX_META,
        // Parallel frame decompression and validation, whatever the machine and however
        // small the image: every corruption below is also caught by the pieces that the
        // helper threads check.
        threads: 3,
        parallel_validation_min: 0,
        lazy: false,
        size: None,
    }
}

/// As [`opts`], for a lazy open: the metadata decompressed and checked where it is used.
fn lazy_opts() -> OpenOptions {
    OpenOptions {
        lazy: true,
        ..opts()
    }
}

fn bases() -> &'static [Base] {
    static BASES: OnceLock<Vec<Base>> = OnceLock::new();
    BASES.get_or_init(|| {
        // The last one stores its metadata as 4 KiB frames (INCOMPAT_META_FRAMES).
        let builders: [(&'static str, Builder, u8); 4] = [
            ("rich", tree_rich, 20),
            ("hot", tree_hot, 20),
            ("tiny", tree_tiny, 20),
            ("framed", tree_rich, layout::MIN_META_FRAME_LOG),
        ];
        builders
            .iter()
            .map(|&(name, build, frame_log)| make_base(name, build, frame_log))
            .collect()
    })
}

fn pack(build: Builder, meta_frame_log: u8) -> Vec<u8> {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let (hot, config) = build(src.path());
    let path = out.path().join("img.cimg");
    let popts = PackOptions {
        block_log: BLOCK_LOG,
        threads: 2,
        hot,
        config,
        meta_frame_log,
        ..Default::default()
    };
    pack_dir(src.path(), &path, &popts, &|_, _| {}).expect("pack");
    fs::read(&path).unwrap()
}

fn make_base(name: &'static str, build: Builder, frame_log: u8) -> Base {
    let bytes = pack(build, frame_log);
    let img = Image::from_reader(bytes.clone(), "img", &opts()).expect("a fresh image opens");
    let snap = match exercise(&img) {
        Ok(s) => s,
        Err(e) => panic!("the fresh {name} image does not read cleanly: {e}"),
    };
    let sb = Superblock::read_from_bytes(&bytes[..size_of::<Superblock>()]).unwrap();
    let (mo, ml) = (
        sb.meta_offset.get() as usize,
        sb.meta_stored_len.get() as usize,
    );
    let raw = zstd::stream::decode_all(&bytes[mo..mo + ml]).unwrap();
    let framed = sb.incompat.get() & layout::INCOMPAT_META_FRAMES != 0;
    assert_eq!(
        framed,
        raw.len() > 1 << frame_log,
        "the {name} image is framed exactly when its metadata exceeds a frame"
    );
    let hdr = MetaHeader::read_from_prefix(&raw).unwrap().0;
    let mut base = Base {
        name,
        bytes,
        snap,
        sb,
        raw,
        hdr,
        dirs: Vec::new(),
        dir_links: Vec::new(),
        xattr_sets: Vec::new(),
        files: Vec::new(),
        symlinks: Vec::new(),
    };
    assert_eq!(
        base.meta_offset() as u64,
        base.data_end(),
        "metadata follows the data"
    );
    let (io, ic) = base.table(T::Inode);
    let inodes = <[Inode]>::ref_from_bytes(&base.raw[io..io + ic * T::Inode.size()]).unwrap();
    let (doff, dc) = base.table(T::Dirent);
    let dirents =
        <[Dirent]>::ref_from_bytes(&base.raw[doff..doff + dc * T::Dirent.size()]).unwrap();
    for (i, n) in inodes.iter().enumerate() {
        let ino = i as u32 + 1;
        match FileKind::from_mode(n.mode.get()) {
            Some(FileKind::Dir) => base.dirs.push(DirInfo {
                ino,
                parent: n.parent.get(),
                first: n.first.get() as usize,
                count: n.count.get() as usize,
            }),
            Some(FileKind::File) => base.files.push(ino),
            Some(FileKind::Symlink) => base.symlinks.push(ino),
            _ => {}
        }
        if n.xattr_count.get() > 0 {
            base.xattr_sets.push((
                ino,
                n.xattr_first.get() as usize,
                n.xattr_count.get() as usize,
            ));
        }
    }
    for d in &base.dirs {
        for (k, de) in dirents.iter().enumerate().skip(d.first).take(d.count) {
            if de.kind == FileKind::Dir as u8 {
                base.dir_links.push((k, d.ino, de.inode.get()));
            }
        }
    }
    base
}

// ---------------------------------------------------------------------------------------------
// Record layout helpers, driven by `layout::records()` so they follow the format.

type Records = Vec<(&'static str, usize, Vec<(&'static str, usize, usize)>)>;

fn records() -> &'static Records {
    static R: OnceLock<Records> = OnceLock::new();
    R.get_or_init(layout::records)
}

fn field(record: &str, name: &str) -> (usize, usize) {
    records()
        .iter()
        .find(|r| r.0 == record)
        .and_then(|r| r.2.iter().find(|f| f.0 == name))
        .map(|f| (f.1, f.2))
        .unwrap_or_else(|| panic!("no field {record}.{name}"))
}

/// Every integer slot of a record as (offset, width), wide fields split into u64s.
fn slots(record: &str) -> Vec<(usize, usize)> {
    let r = records()
        .iter()
        .find(|r| r.0 == record)
        .unwrap_or_else(|| panic!("{record}"));
    let mut out = Vec::new();
    for &(name, off, size) in &r.2 {
        if record == "Superblock" && name == "checksum" {
            continue;
        }
        match size {
            1 | 2 | 4 | 8 => out.push((off, size)),
            _ => (0..size / 8).for_each(|k| out.push((off + 8 * k, 8))),
        }
    }
    out
}

fn put(buf: &mut [u8], at: usize, width: usize, v: u64) {
    if let Some(s) = buf.get_mut(at..at + width) {
        s.copy_from_slice(&v.to_le_bytes()[..width]);
    }
}

fn get(buf: &[u8], at: usize, width: usize) -> u64 {
    let mut b = [0u8; 8];
    if let Some(s) = buf.get(at..at + width) {
        b[..width].copy_from_slice(s);
    }
    u64::from_le_bytes(b)
}

fn put_at(buf: &mut [u8], at: (usize, usize), v: u64) {
    put(buf, at.0, at.1, v);
}

/// Recompute the superblock checksum (xxh3-64 of bytes 0..120, stored at 120).
fn reseal(img: &mut [u8]) {
    if img.len() >= size_of::<Superblock>() {
        let c = xxh3_64(&img[..120]);
        img[120..128].copy_from_slice(&c.to_le_bytes());
    }
}

/// An image made of `prefix` (superblock area and data region), then `stored` as the metadata;
/// every length, checksum and the digest made to match, the superblock resealed.
fn assemble(prefix: &[u8], mut sb: Superblock, stored: &[u8], raw_len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(prefix.len() + stored.len());
    out.extend_from_slice(prefix);
    out.extend_from_slice(stored);
    sb.meta_offset = U64::new(prefix.len() as u64);
    sb.meta_stored_len = U64::new(stored.len() as u64);
    sb.meta_raw_len = U64::new(raw_len);
    sb.meta_checksum = U64::new(xxh3_64(stored));
    sb.image_size = U64::new(out.len() as u64);
    let data_offset = (sb.data_offset.get() as usize).min(out.len());
    sb.digest = xxh3_128(&out[data_offset..]).to_le_bytes();
    out[..size_of::<Superblock>()].copy_from_slice(sb.as_bytes());
    reseal(&mut out);
    out
}

fn compress(raw: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(raw, 1).unwrap()
}

/// `raw` compressed as one frame per `1 << log` bytes, as an image with
/// `INCOMPAT_META_FRAMES` stores its metadata.
fn compress_frames(raw: &[u8], log: u8) -> Vec<u8> {
    if raw.is_empty() {
        return compress(raw);
    }
    raw.chunks(1 << log).flat_map(compress).collect()
}

/// `raw` compressed the way `base` stores its metadata.
fn compress_like(base: &Base, raw: &[u8]) -> Vec<u8> {
    if base.sb.incompat.get() & layout::INCOMPAT_META_FRAMES != 0 {
        compress_frames(raw, base.sb.meta_frame_log)
    } else {
        compress(raw)
    }
}

/// Precomputed zstd frames that decompress to much more than they weigh.
struct Frames {
    /// `MAX_META` + 4 KiB of zeros: more than the largest metadata accepted.
    over: Vec<u8>,
    /// Exactly `MAX_META` zeros.
    exact: Vec<u8>,
    /// 1 MiB and 16 MiB of zeros, for data blocks.
    mib: Vec<u8>,
    mib16: Vec<u8>,
}

fn frames() -> &'static Frames {
    static F: OnceLock<Frames> = OnceLock::new();
    F.get_or_init(|| {
        let zeros = vec![0u8; MAX_META as usize + 4096];
        Frames {
            over: compress(&zeros),
            exact: compress(&zeros[..MAX_META as usize]),
            mib: compress(&zeros[..1 << 20]),
            mib16: compress(&zeros[..16 << 20]),
        }
    })
}

// ---------------------------------------------------------------------------------------------
// The exerciser.

/// One node as every accessor sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Node {
    attr: Attr,
    target: Option<Vec<u8>>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    extents: Vec<Extent>,
    content: Option<Vec<u8>>,
}

/// Everything an image says, in comparable form.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Snapshot {
    summary: String,
    inodes: u32,
    config: Option<Vec<u8>>,
    root: Option<Node>,
    /// (path, inode, node) in walk order.
    entries: Vec<(Vec<u8>, u32, Node)>,
    /// xxh3-128 of every decompressed block (0 when it failed).
    blocks: Vec<u128>,
    block0_users: Option<Vec<Vec<u8>>>,
}

/// Errors met so far, and the content budget.
#[derive(Default)]
struct Run {
    errors: Vec<Error>,
    read: u64,
}

impl Run {
    fn keep<T>(&mut self, r: Result<T>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                if self.errors.len() < 64 {
                    self.errors.push(e);
                }
                None
            }
        }
    }
}

/// Walk the whole tree and call every accessor (attr, readdir, dir_entry, dir_len, parent,
/// lookup, resolve, readlink, xattrs, getxattr, extents, extent_at, read_at, read_block,
/// read_stored, decode_block, verify, files_using_block) on it; the snapshot on success, else
/// the first error. Consistency between accessors is asserted (a panic names the oracle).
fn exercise(img: &Image<Vec<u8>>) -> Result<Snapshot> {
    let (snap, mut errors) = exercise_all(img);
    if errors.is_empty() {
        Ok(snap)
    } else {
        Err(errors.swap_remove(0))
    }
}

/// As [`exercise`], going on after errors where sensible: a partial snapshot and every error.
fn exercise_all(img: &Image<Vec<u8>>) -> (Snapshot, Vec<Error>) {
    let mut run = Run::default();
    let n = img.inode_count();
    let nb = img.block_count();
    let summary = format!("{:?}", img.summary());
    let _ = (
        img.header().logical_bytes.get(),
        img.label(),
        img.block_size(),
    );
    let config = img.config().map(<[u8]>::to_vec);

    // Every inode number, and the invalid ones around the table.
    for ino in (0..=n.saturating_add(1))
        .take(ENTRY_BUDGET)
        .chain([u32::MAX])
    {
        probe_inode(img, &mut run, ino);
    }

    // The tree.
    let mut walked: Vec<(Vec<u8>, u32, FileKind)> = Vec::new();
    let r = img.walk(|path, e| {
        if walked.len() >= ENTRY_BUDGET {
            return Err(Error::Invalid("test budget: too many entries".into()));
        }
        walked.push((path.to_vec(), e.ino, e.kind));
        Ok(())
    });
    run.keep(r);
    let root = node(img, &mut run, 1);
    let mut dirs: HashMap<Vec<u8>, u32> = HashMap::from([(Vec::new(), 1)]);
    let mut entries = Vec::new();
    for (path, ino, kind) in walked {
        let (parent_path, name) = match path.iter().rposition(|&c| c == b'/') {
            Some(i) => (&path[..i], &path[i + 1..]),
            None => (&path[..0], &path[..]),
        };
        let show = String::from_utf8_lossy(&path).into_owned();
        let parent = *dirs
            .get(parent_path)
            .unwrap_or_else(|| panic!("oracle: walk gave {show} before its directory"));
        if let Some(found) = run.keep(img.lookup(parent, name)) {
            assert_eq!(found, Some(ino), "oracle: lookup of {show}");
        }
        if let Some(found) = run.keep(img.resolve(&path)) {
            assert_eq!(found, ino, "oracle: resolve of {show}");
        }
        let mut tilde = name.to_vec();
        tilde.push(b'~');
        run.keep(img.lookup(parent, &tilde));
        if kind == FileKind::Dir {
            dirs.insert(path.clone(), ino);
            let mut up = b"./".to_vec();
            up.extend_from_slice(&path);
            up.extend_from_slice(b"/.//..");
            if let Some(found) = run.keep(img.resolve(&up)) {
                assert_eq!(found, parent, "oracle: resolve of {show}/..");
            }
        }
        if let Some(nd) = node(img, &mut run, ino) {
            assert_eq!(
                nd.attr.kind, kind,
                "oracle: entry kind of {show} differs from its inode"
            );
            entries.push((path, ino, nd));
        }
    }
    let _ = img.resolve(b"no/such/path/at/all/..");

    // Blocks.
    let mut blocks = Vec::new();
    for idx in 0..nb.min(ENTRY_BUDGET as u32) {
        let info = run.keep(img.block_info(idx));
        match run.keep(img.read_block(idx)) {
            Some(b) => {
                if let Some((_, _, raw)) = info {
                    assert_eq!(b.len(), raw as usize, "oracle: block {idx} length");
                }
                blocks.push(xxh3_128(&b));
            }
            None => blocks.push(0),
        }
    }
    assert!(
        img.read_block(nb).is_err() && img.block_info(nb).is_err(),
        "oracle: block {nb} exists"
    );
    if nb > 0 {
        let mut stored = Vec::new();
        if img.read_stored(0, &mut stored).is_ok()
            && let Ok((_, _, raw)) = img.block_info(0)
        {
            let mut out = vec![0u8; raw as usize + 1];
            assert!(
                img.decode_block(0, &stored, &mut out).is_err(),
                "oracle: wrong-size buffer"
            );
        }
    }
    match img.verify(|_| {}) {
        Ok(bad) => bad.into_iter().for_each(|e| {
            run.keep::<()>(Err(e));
        }),
        Err(e) => {
            run.keep::<()>(Err(e));
        }
    }
    let mut head = [0u8; 128];
    run.keep(img.read_raw(0, &mut head));
    assert!(
        img.read_raw(img.summary().image_size, &mut head).is_err(),
        "oracle: read past the end"
    );

    // Who uses block 0; checked against the extents when everything else read cleanly.
    let clean = run.errors.is_empty();
    let block0_users = if nb > 0 {
        run.keep(img.files_using_block(0))
    } else {
        None
    };
    if let (true, Some(users)) = (clean, &block0_users) {
        let want: Vec<Vec<u8>> = entries
            .iter()
            .filter(|(_, _, nd)| nd.extents.iter().any(|x| x.block == Some(0)))
            .map(|(p, _, _)| p.clone())
            .collect();
        assert_eq!(users, &want, "oracle: files_using_block(0)");
    }
    let snap = Snapshot {
        summary,
        inodes: n,
        config,
        root,
        entries,
        blocks,
        block0_users,
    };
    (snap, run.errors)
}

/// Every per-inode accessor on `ino`, checking that each accepts exactly its file type.
fn probe_inode(img: &Image<Vec<u8>>, run: &mut Run, ino: u32) {
    let valid = (1..=img.inode_count()).contains(&ino);
    let attr = img.attr(ino);
    if !valid {
        assert!(
            attr.is_err()
                && img.readdir(ino).is_err()
                && img.readlink(ino).is_err()
                && img.xattrs(ino).is_err()
                && img.extents(ino).is_err()
                && img.parent(ino).is_err()
                && img.dir_len(ino).is_err()
                && img.lookup(ino, b"x").is_err(),
            "oracle: inode {ino} outside the table was accepted"
        );
        return;
    }
    let Some(attr) = run.keep(attr) else { return };
    assert_eq!(attr.ino, ino, "oracle: attr ino");
    assert_eq!(
        attr.mode & mode::S_IFMT,
        attr.kind.mode_bits(),
        "oracle: attr mode of {ino}"
    );
    let is = |k: FileKind| attr.kind == k;
    match img.readdir(ino) {
        Ok(it) => {
            assert!(
                is(FileKind::Dir),
                "oracle: readdir accepted inode {ino}, a {:?}",
                attr.kind
            );
            let ents: Vec<Result<DirEntry<'_>>> = it.collect();
            for (i, e) in ents.iter().enumerate() {
                match (e, img.dir_entry(ino, i)) {
                    (Ok(a), Ok(Some(b))) => assert_eq!(*a, b, "oracle: entry {i} of {ino}"),
                    (Err(_), Err(_)) => {}
                    (a, b) => {
                        panic!("oracle: readdir and dir_entry differ on {ino}/{i}: {a:?} {b:?}")
                    }
                }
            }
            let count = ents.len();
            for e in ents {
                run.keep(e);
            }
            if let Some(l) = run.keep(img.dir_len(ino)) {
                assert_eq!(l, count, "oracle: dir_len of {ino}");
            }
            assert!(
                matches!(img.dir_entry(ino, count), Ok(None)),
                "oracle: entry past the end"
            );
            run.keep(img.parent(ino));
            run.keep(img.lookup(ino, b"\xffnot-there"));
        }
        Err(Error::WrongType { .. }) => {
            assert!(
                !is(FileKind::Dir),
                "oracle: readdir refused directory {ino}"
            )
        }
        Err(e) => {
            run.keep::<()>(Err(e));
        }
    }
    match img.readlink(ino) {
        Ok(_) => assert!(
            is(FileKind::Symlink),
            "oracle: readlink accepted inode {ino}"
        ),
        Err(Error::WrongType { .. }) => {
            assert!(
                !is(FileKind::Symlink),
                "oracle: readlink refused symlink {ino}"
            )
        }
        Err(e) => {
            run.keep::<()>(Err(e));
        }
    }
    match img.extents(ino) {
        Ok(it) => {
            assert!(is(FileKind::File), "oracle: extents accepted inode {ino}");
            let total: u64 = it.map(|x| x.len as u64).sum();
            assert_eq!(
                total, attr.size,
                "oracle: extents of {ino} do not add up to its size"
            );
        }
        Err(Error::WrongType { .. }) => {
            assert!(!is(FileKind::File), "oracle: extents refused file {ino}")
        }
        Err(e) => {
            run.keep::<()>(Err(e));
        }
    }
    run.keep(img.xattrs(ino));
}

/// Attributes, target, xattrs, extents and content of `ino`.
fn node(img: &Image<Vec<u8>>, run: &mut Run, ino: u32) -> Option<Node> {
    let attr = run.keep(img.attr(ino))?;
    let target = match attr.kind {
        FileKind::Symlink => {
            let t = run.keep(img.readlink(ino))?.to_vec();
            assert_eq!(t.len() as u64, attr.size, "oracle: symlink size of {ino}");
            Some(t)
        }
        _ => None,
    };
    let xattrs: Vec<(Vec<u8>, Vec<u8>)> = run
        .keep(img.xattrs(ino))?
        .into_iter()
        .map(|(k, v)| (k.to_vec(), v.to_vec()))
        .collect();
    for (k, v) in &xattrs {
        if let Some(got) = run.keep(img.getxattr(ino, k)) {
            assert_eq!(got, Some(&v[..]), "oracle: getxattr of inode {ino}");
        }
    }
    run.keep(img.getxattr(ino, b"user.not-there"));
    let (extents, content) = if attr.kind == FileKind::File {
        let ex: Vec<Extent> = run.keep(img.extents(ino))?.collect();
        let c = read_content(img, run, ino, attr.size, &ex)?;
        (ex, Some(c))
    } else {
        (Vec::new(), None)
    };
    Some(Node {
        attr,
        target,
        xattrs,
        extents,
        content,
    })
}

/// The content of file `ino` through `read_at` in uneven pieces, checked against the extents
/// decoded through a `BlockCache`.
fn read_content(
    img: &Image<Vec<u8>>,
    run: &mut Run,
    ino: u32,
    size: u64,
    extents: &[Extent],
) -> Option<Vec<u8>> {
    if run.read.saturating_add(size) > READ_BUDGET {
        run.keep::<()>(Err(Error::Invalid(format!(
            "test budget: file {ino} of {size} bytes"
        ))));
        return None;
    }
    run.read += size;
    let mut content = vec![0u8; size as usize];
    let (mut off, mut step) = (0usize, 1000usize);
    while off < content.len() {
        let end = (off + step).min(content.len());
        let n = run.keep(img.read_at(ino, off as u64, &mut content[off..end]))?;
        assert_eq!(n, end - off, "oracle: short read inside file {ino}");
        off = end;
        step = (step * 3 + 1).min(64 << 10);
    }
    let mut tail = [0u8; 16];
    for past in [size, size.saturating_add(1), u64::MAX] {
        if let Some(n) = run.keep(img.read_at(ino, past, &mut tail)) {
            assert_eq!(n, 0, "oracle: read past the end of {ino}");
        }
    }
    for at in [0, size / 2, size.saturating_sub(1), size] {
        match run.keep(img.extent_at(ino, at)) {
            Some(Some(x)) => {
                assert!(
                    at < size && extents.contains(&x),
                    "oracle: extent_at({ino}, {at})"
                )
            }
            Some(None) => assert!(at >= size, "oracle: no extent at {at} in {ino} of {size}"),
            None => {}
        }
    }
    let mut cache = BlockCache::new(2);
    let mut rebuilt = Vec::with_capacity(content.len());
    for x in extents {
        match x.block {
            None => rebuilt.resize(rebuilt.len() + x.len as usize, 0),
            Some(b) => {
                let data = run.keep(cache.get(img, b))?;
                let s = x.block_offset as usize;
                let piece = data.get(s..s + x.len as usize).unwrap_or_else(|| {
                    panic!(
                        "oracle: extent {x:?} of {ino} outside block {b} of {}",
                        data.len()
                    )
                });
                rebuilt.extend_from_slice(piece);
            }
        }
    }
    assert!(
        rebuilt == content,
        "oracle: read_at of {ino} differs from its decoded extents"
    );
    Some(content)
}

/// A line describing the first difference between two snapshots.
fn diff(a: &Snapshot, b: &Snapshot) -> String {
    let cut = |s: String| s.chars().take(400).collect::<String>();
    if a.summary != b.summary {
        return cut(format!("summary {} vs {}", a.summary, b.summary));
    }
    if a.root != b.root {
        return cut(format!("root {:?} vs {:?}", a.root, b.root));
    }
    for (x, y) in a.entries.iter().zip(&b.entries) {
        if x != y {
            return cut(format!("entry {:?} vs {:?}", x, y));
        }
    }
    if a.entries.len() != b.entries.len() {
        return format!("{} entries vs {}", a.entries.len(), b.entries.len());
    }
    cut(format!(
        "blocks {:?}/{:?}, config {:?}/{:?}, block 0 users {:?}/{:?}",
        a.blocks.len(),
        b.blocks.len(),
        a.config,
        b.config,
        a.block0_users,
        b.block0_users
    ))
}

/// An error message must be one non-empty line not starting with a capital or a space.
fn check_message(e: &Error) -> std::result::Result<(), String> {
    let s = e.to_string();
    match s.chars().next() {
        None => Err(format!("empty error message ({e:?})")),
        Some(c) if c.is_uppercase() || c.is_whitespace() => Err(format!("error message {s:?}")),
        _ if s.contains('\n') => Err(format!("multi-line error message {s:?}")),
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// Mutations.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    BitFlip,
    Truncate,
    Superblock,
    Metadata,
    DataBlock,
}

/// Each class with its share of the cases, in percent.
const CLASSES: [(Class, usize); 5] = [
    (Class::BitFlip, 25),
    (Class::Truncate, 10),
    (Class::Superblock, 15),
    (Class::Metadata, 40),
    (Class::DataBlock, 10),
];

impl Class {
    fn name(self) -> &'static str {
        match self {
            Class::BitFlip => "a:bitflip",
            Class::Truncate => "b:truncate",
            Class::Superblock => "c:superblock",
            Class::Metadata => "d:metadata",
            Class::DataBlock => "e:datablock",
        }
    }
    /// Corruption without resealing: any image that reads cleanly must be the original.
    fn plain(self) -> bool {
        matches!(self, Class::BitFlip | Class::Truncate)
    }
    fn from_letter(s: &str) -> Option<Class> {
        CLASSES
            .iter()
            .map(|c| c.0)
            .find(|c| c.name().starts_with(s) || c.name() == s)
    }
}

fn case_seed(class: Class, i: usize) -> u64 {
    mix(0x5EED_C1A6_0000_0000 ^ ((class as u64) << 40) ^ i as u64)
}

struct Mutant {
    bytes: Vec<u8>,
    /// Blocks whose stored bytes a data-block mutation changed.
    touched: Vec<u32>,
}

fn mutate(class: Class, base: &Base, rng: &mut Rng) -> Mutant {
    let plain = |bytes| Mutant {
        bytes,
        touched: Vec::new(),
    };
    match class {
        Class::BitFlip => plain(flip_bits(base, rng)),
        Class::Truncate => plain(truncate(base, rng)),
        Class::Superblock => plain(mutate_superblock(base, rng)),
        Class::Metadata => plain(mutate_metadata(base, rng)),
        Class::DataBlock => mutate_data(base, rng),
    }
}

/// (a) 1–8 bit flips: anywhere, or aimed at the superblock, its padding or the metadata.
fn flip_bits(base: &Base, rng: &mut Rng) -> Vec<u8> {
    let mut img = base.bytes.clone();
    let len = img.len();
    let meta = base.meta_offset();
    for _ in 0..1 + rng.index(8) {
        let pos = match rng.below(10) {
            0..=4 => rng.index(len),
            5 | 6 => rng.index(size_of::<Superblock>()),
            7 | 8 => meta + rng.index(len - meta),
            _ => 128 + rng.index(SUPERBLOCK_AREA as usize - 128),
        };
        img[pos] ^= 1 << rng.below(8);
    }
    img
}

/// (b) Truncation to a random length and/or garbage appended.
fn truncate(base: &Base, rng: &mut Rng) -> Vec<u8> {
    let orig = &base.bytes;
    let len = orig.len();
    let cut = match rng.below(6) {
        0 => rng.index(len + 1),
        1 => len - rng.index(17.min(len + 1)),
        2 => rng.index(300),
        3 => (base.meta_offset() + rng.index(9))
            .saturating_sub(4)
            .min(len),
        4 => (SUPERBLOCK_AREA as usize + rng.index(9))
            .saturating_sub(4)
            .min(len),
        _ => len,
    };
    let mut img = orig[..cut].to_vec();
    let extra = match rng.below(4) {
        0 => 0,
        1 => 1 + rng.index(64),
        2 => rng.index(6000),
        _ => 1,
    };
    match rng.below(4) {
        0 => img.extend(rng.bytes(extra)),
        1 => img.resize(img.len() + extra, 0),
        2 => img.extend_from_slice(&orig[cut..(cut + extra).min(len)]),
        _ => img.extend_from_slice(&orig[..extra.min(len)]),
    }
    img
}

/// A value likely to sit on a boundary of a check: 0, 1, the maximum, off-by-ones of the
/// original, or one of `extras` (counts, lengths and offsets of this image).
fn boundary(rng: &mut Rng, orig: u64, width: usize, extras: &[u64]) -> u64 {
    let max = if width >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * width)) - 1
    };
    let v = match rng.below(16) {
        0 => 0,
        1 => 1,
        2 => max,
        3 => max - 1,
        4 => max / 2 + 1,
        5 => orig.wrapping_add(1),
        6 => orig.wrapping_sub(1),
        7 => orig.wrapping_mul(2),
        8 => orig ^ (1 << rng.below(8 * width as u64)),
        9 => rng.pick(&[
            255,
            256,
            65535,
            65536,
            65537,
            BS,
            BS + 1,
            1 << 20,
            1 << 31,
            1 << 32,
        ]),
        10 => rng.next(),
        _ if !extras.is_empty() => {
            let e = rng.pick(extras);
            match rng.below(3) {
                0 => e,
                1 => e.wrapping_add(1),
                _ => e.wrapping_sub(1),
            }
        }
        _ => orig,
    };
    v & max
}

/// (c) Superblock bytes and fields overwritten, the checksum resealed.
fn mutate_superblock(base: &Base, rng: &mut Rng) -> Vec<u8> {
    let mut img = base.bytes.clone();
    let len = img.len() as u64;
    let sb_slots = slots("Superblock");
    let extras = [
        len,
        base.sb.meta_offset.get(),
        base.sb.data_offset.get(),
        base.data_end(),
        base.sb.meta_stored_len.get(),
        base.sb.meta_raw_len.get(),
        base.count(T::Block) as u64,
        127,
        128,
        SUPERBLOCK_AREA,
        MAX_META,
    ];
    match rng.below(7) {
        0 => {
            for _ in 0..1 + rng.index(4) {
                img[rng.index(120)] = rng.next() as u8;
            }
        }
        1 | 2 => {
            let (at, w) = rng.pick(&sb_slots);
            let v = boundary(rng, get(&img, at, w), w, &extras);
            put(&mut img, at, w, v);
        }
        3 => {
            // Resize the file and make image_size agree.
            if rng.one_in(2) {
                img.truncate(rng.index(img.len() + 1).max(128));
            } else {
                let n = 1 + rng.index(5000);
                img.extend(rng.bytes(n));
            }
            let n = img.len() as u64;
            put_at(&mut img, field("Superblock", "image_size"), n);
        }
        4 => {
            let wide: Vec<(usize, usize)> = sb_slots.iter().copied().filter(|s| s.1 == 8).collect();
            let (a, b) = (rng.pick(&wide), rng.pick(&wide));
            let (va, vb) = (get(&img, a.0, 8), get(&img, b.0, 8));
            put(&mut img, a.0, 8, vb);
            put(&mut img, b.0, 8, va);
        }
        5 => {
            let v = rng.pick(&[0, 11, 12, 13, 16, 17, 20, 21, 64, 255]);
            put_at(&mut img, field("Superblock", "block_log"), v);
        }
        _ => {
            let name = rng.pick(&[
                "hot_blocks",
                "version_minor",
                "compat",
                "level",
                "reserved0",
                "reserved1",
                "meta_frame_log",
                "incompat",
            ]);
            let at = field("Superblock", name);
            let v = match name {
                "hot_blocks" => rng.below(base.count(T::Block) as u64 + 3),
                "meta_frame_log" => rng.pick(&[0, 1, 11, 12, 13, 19, 20, 21, 30, 31, 255]),
                "incompat" if rng.one_in(2) => get(&img, at.0, at.1) ^ layout::INCOMPAT_META_FRAMES,
                _ => boundary(rng, get(&img, at.0, at.1), at.1, &[]),
            };
            put_at(&mut img, at, v);
        }
    }
    reseal(&mut img);
    img
}

/// Append `bytes` to the blob when it ends the metadata (as the writer lays it out); the
/// offset of the new bytes in the blob.
fn blob_append(raw: &mut Vec<u8>, bytes: &[u8]) -> Option<u64> {
    let (at, _) = field("MetaHeader", "blob");
    let (off, count) = (get(raw, at, 8) as usize, get(raw, at + 8, 8) as usize);
    if off.checked_add(count) != Some(raw.len()) {
        return None;
    }
    raw.extend_from_slice(bytes);
    put(raw, at + 8, 8, (count + bytes.len()) as u64);
    Some(count as u64)
}

/// (d) Structure-aware metadata edits, recompressed and resealed.
fn mutate_metadata(base: &Base, rng: &mut Rng) -> Vec<u8> {
    let mut raw = base.raw.clone();
    let rounds = if rng.one_in(4) { 2 + rng.index(3) } else { 1 };
    for _ in 0..rounds {
        meta_edit(base, &mut raw, rng);
    }
    let mut stored = compress_like(base, &raw);
    let mut raw_len = raw.len() as u64;
    let f = frames();
    let framed = base.sb.incompat.get() & layout::INCOMPAT_META_FRAMES != 0;
    match rng.below(30) {
        // Frames of the wrong size, or one frame where several are expected.
        8 if framed => {
            let log = base.sb.meta_frame_log;
            stored = match rng.below(3) {
                0 => compress(&raw),
                1 => compress_frames(&raw, log + 1),
                _ => compress_frames(&raw, log - 1),
            };
        }
        // Two frames swapped.
        9 if framed && !raw.is_empty() => {
            let mut pieces: Vec<Vec<u8>> = raw
                .chunks(1 << base.sb.meta_frame_log)
                .map(compress)
                .collect();
            let (a, b) = (rng.index(pieces.len()), rng.index(pieces.len()));
            pieces.swap(a, b);
            stored = pieces.concat();
        }
        0 => {
            let l = raw_len;
            raw_len = rng.pick(&[
                l + 1,
                l.saturating_sub(1),
                0,
                127,
                128,
                MAX_META,
                MAX_META + 1,
                u64::MAX,
                l * 2,
            ]);
        }
        1 => {
            for _ in 0..1 + rng.index(4) {
                let p = rng.index(stored.len());
                stored[p] ^= 1 << rng.below(8);
            }
        }
        2 => stored = raw.clone(),
        3 => stored.clear(),
        4 => {
            let n = 1 + rng.index(200);
            let garbage = rng.bytes(n);
            stored.extend(compress(&garbage));
        }
        5 => {
            let n = 1 + rng.index(16);
            stored.extend(rng.bytes(n));
        }
        6 => stored.truncate(rng.index(stored.len())),
        // A bomb that really decompresses that far: the tables, then zeros up to a raw
        // length the limit allows, which the superblock declares.
        10 | 11 => {
            let l = raw_len;
            raw_len = rng.pick(&[l + 1, l + 8, l + 4096, 1 << 20, MAX_META / 2, MAX_META]);
            stored = zeros_after(base, &raw, raw_len);
        }
        7 if rng.one_in(3) => {
            // Decompression bombs: more than the limit, or exactly the limit of zeros.
            if rng.one_in(2) {
                stored = f.over.clone();
                raw_len = rng.pick(&[MAX_META, MAX_META - 1, raw_len, 1 << 20]);
            } else {
                stored = f.exact.clone();
                raw_len = MAX_META;
            }
        }
        _ => {}
    }
    let prefix = &base.bytes[..base.meta_offset()];
    assemble(prefix, base.sb, &stored, raw_len)
}

/// `raw` then zeros up to `len` bytes, stored the way `base` stores its metadata, as RLE
/// blocks that cost nothing to build.
fn zeros_after(base: &Base, raw: &[u8], len: u64) -> Vec<u8> {
    if base.sb.incompat.get() & layout::INCOMPAT_META_FRAMES == 0 {
        return common::zstd_rle_frame(raw, len);
    }
    let f = 1u64 << base.sb.meta_frame_log;
    (0..len.div_ceil(f))
        .flat_map(|k| {
            let (a, e) = (k * f, ((k + 1) * f).min(len));
            let real = raw
                .get(a as usize..(e as usize).min(raw.len()))
                .unwrap_or(&[]);
            common::zstd_rle_frame(real, e - a)
        })
        .collect()
}

/// Counts, lengths and offsets of `base` that make good boundary values.
fn meta_extras(base: &Base) -> Vec<u64> {
    let mut v: Vec<u64> = TABLES.iter().map(|&t| base.count(t) as u64).collect();
    v.extend([
        base.raw.len() as u64,
        base.blob_len(),
        base.hdr.blob.offset.get(),
        HOLE as u64,
        base.data_end(),
        base.sb.data_offset.get(),
        BS,
    ]);
    v
}

fn meta_edit(base: &Base, raw: &mut Vec<u8>, rng: &mut Rng) {
    if raw.len() < base.raw.len() {
        // Cut short by an earlier round: the records below may be gone.
        return;
    }
    let extras = meta_extras(base);
    let nonempty: Vec<T> = TABLES
        .iter()
        .copied()
        .filter(|&t| base.count(t) > 0)
        .collect();
    match rng.below(14) {
        // Bit flips in the tables, or anywhere including the header.
        0 | 1 => {
            let from = if rng.one_in(2) { 128 } else { 0 };
            for _ in 0..1 + rng.index(4) {
                let p = from + rng.index(raw.len() - from);
                raw[p] ^= 1 << rng.below(8);
            }
        }
        // A random field of a random record set to a boundary value.
        2 => {
            let t = rng.pick(&nonempty);
            let i = rng.index(base.count(t));
            let (fo, w) = rng.pick(&slots(t.record()));
            let at = base.table(t).0 + i * t.size() + fo;
            let v = boundary(rng, get(raw, at, w), w, &extras);
            put(raw, at, w, v);
        }
        // A field copied from another record of the same table: plausible but wrong.
        3 => {
            let t = rng.pick(&nonempty);
            let (i, j) = (rng.index(base.count(t)), rng.index(base.count(t)));
            let (fo, w) = rng.pick(&slots(t.record()));
            let (off, _) = base.table(t);
            let v = get(raw, off + j * t.size() + fo, w);
            put(raw, off + i * t.size() + fo, w, v);
        }
        // The header: a table's offset or count, or two tables swapped.
        4 => {
            let hs = slots("MetaHeader");
            if rng.one_in(4) {
                let (a, b) = (rng.index(7) * 16, rng.index(7) * 16);
                let (ta, tb) = (raw[a..a + 16].to_vec(), raw[b..b + 16].to_vec());
                raw[a..a + 16].copy_from_slice(&tb);
                raw[b..b + 16].copy_from_slice(&ta);
            } else {
                let (at, w) = rng.pick(&hs);
                let orig = get(raw, at, w);
                let mut ex = extras.clone();
                ex.extend([8, 16, 24, 64].map(|d| orig.wrapping_add(d)));
                ex.extend([8, 16, 24, 64].map(|d| orig.wrapping_sub(d)));
                let v = boundary(rng, orig, w, &ex);
                put(raw, at, w, v);
            }
        }
        5 => overlong(base, raw, rng),
        6 => past_end(base, raw, rng),
        7 => cycle(base, raw, rng),
        8 => disorder(base, raw, rng),
        // Invalid names, keys and targets appended to the blob.
        9 => {
            let bad: [&[u8]; 9] = [
                b".",
                b"..",
                b"a/b",
                b"x\0y",
                b"/",
                b"\xff\xfe",
                &[b'n'; 256],
                b"aaa",
                b"zzz",
            ];
            let name = rng.pick(&bad);
            let Some(off) = blob_append(raw, name) else {
                return;
            };
            let len = name.len() as u64;
            match rng.below(3) {
                0 if base.count(T::Dirent) > 0 => {
                    let i = rng.index(base.count(T::Dirent));
                    put_at(raw, base.at(T::Dirent, i, "name_offset"), off);
                    put_at(raw, base.at(T::Dirent, i, "name_len"), len);
                }
                1 if base.count(T::Xattr) > 0 => {
                    let i = rng.index(base.count(T::Xattr));
                    put_at(raw, base.at(T::Xattr, i, "key_offset"), off);
                    put_at(raw, base.at(T::Xattr, i, "key_len"), len);
                }
                _ if !base.symlinks.is_empty() => {
                    let ino = rng.pick(&base.symlinks);
                    put_at(raw, base.inode_at(ino, "first"), off);
                    put_at(raw, base.inode_at(ino, "count"), len);
                    put_at(raw, base.inode_at(ino, "size"), len);
                }
                _ => {}
            }
        }
        10 => xattr_edit(base, raw, rng),
        // A type change, with the directory entry's kind made to agree or not.
        11 => {
            let ino = 1 + rng.index(base.count(T::Inode)) as u32;
            let at = base.inode_at(ino, "mode");
            let perm = get(raw, at.0, at.1) & 0o7777;
            let kinds = [
                mode::S_IFREG,
                mode::S_IFDIR,
                mode::S_IFLNK,
                mode::S_IFCHR,
                mode::S_IFBLK,
                mode::S_IFIFO,
                mode::S_IFSOCK,
            ];
            let ty = if rng.one_in(8) {
                rng.pick(&[0, mode::S_IFMT, 0o030000])
            } else {
                rng.pick(&kinds)
            };
            put_at(raw, at, perm | ty as u64);
            if let (false, Some(k)) = (rng.one_in(3), FileKind::from_mode(ty)) {
                for i in 0..base.count(T::Dirent) {
                    if base.meta_get(base.at(T::Dirent, i, "inode")) == ino as u64 {
                        put_at(raw, base.at(T::Dirent, i, "kind"), k as u64);
                    }
                }
            }
        }
        // The metadata cut short or lengthened.
        12 => {
            if rng.one_in(2) {
                let l = raw.len();
                let any = rng.index(l + 1);
                let to = rng.pick(&[
                    any,
                    0,
                    127,
                    128,
                    129,
                    l - 1,
                    base.hdr.blob.offset.get() as usize,
                ]);
                raw.truncate(to.min(l));
            } else {
                let n = 1 + rng.index(64);
                let tail = if rng.one_in(2) {
                    vec![0; n]
                } else {
                    rng.bytes(n)
                };
                raw.extend(tail);
            }
        }
        // Inode numbers of two directory entries swapped.
        _ => {
            let nd = base.count(T::Dirent);
            if nd >= 2 {
                let (i, j) = (rng.index(nd), rng.index(nd));
                let (ai, aj) = (
                    base.at(T::Dirent, i, "inode"),
                    base.at(T::Dirent, j, "inode"),
                );
                let (vi, vj) = (get(raw, ai.0, ai.1), get(raw, aj.0, aj.1));
                put_at(raw, ai, vj);
                put_at(raw, aj, vi);
                if rng.one_in(2) {
                    let (ki, kj) = (base.at(T::Dirent, i, "kind"), base.at(T::Dirent, j, "kind"));
                    let (vi, vj) = (get(raw, ki.0, ki.1), get(raw, kj.0, kj.1));
                    put_at(raw, ki, vj);
                    put_at(raw, kj, vi);
                }
            }
        }
    }
}

/// Lengths longer than the data they describe, or past the format's limits.
fn overlong(base: &Base, raw: &mut [u8], rng: &mut Rng) {
    let blob_len = base.blob_len();
    match rng.below(6) {
        0 if base.count(T::Dirent) > 0 => {
            let i = rng.index(base.count(T::Dirent));
            let at = base.at(T::Dirent, i, "name_len");
            let off = base.meta_get(base.at(T::Dirent, i, "name_offset"));
            let orig = base.meta_get(at);
            let v = rng.pick(&[
                0,
                256,
                65535,
                blob_len,
                orig + 1,
                blob_len.wrapping_sub(off).wrapping_add(1),
            ]);
            put_at(raw, at, v);
        }
        1 | 2 if base.count(T::Xattr) > 0 => {
            let i = rng.index(base.count(T::Xattr));
            let name = if rng.one_in(2) {
                "key_len"
            } else {
                "value_len"
            };
            let at = base.at(T::Xattr, i, name);
            let orig = base.meta_get(at);
            let v = rng.pick(&[0, 256, 65536, 65537, u32::MAX as u64, blob_len, orig + 1]);
            put_at(raw, at, v);
        }
        3 if !base.symlinks.is_empty() => {
            let ino = rng.pick(&base.symlinks);
            let orig = base.meta_get(base.inode_at(ino, "count"));
            let v = rng.pick(&[0, orig + 1, blob_len, blob_len + 1, u32::MAX as u64]);
            match rng.below(3) {
                0 => put_at(raw, base.inode_at(ino, "count"), v),
                1 => put_at(raw, base.inode_at(ino, "size"), v),
                _ => {
                    put_at(raw, base.inode_at(ino, "count"), v);
                    put_at(raw, base.inode_at(ino, "size"), v);
                }
            }
        }
        4 if !base.files.is_empty() => {
            let ino = rng.pick(&base.files);
            let orig = base.meta_get(base.inode_at(ino, "size"));
            let v = rng.pick(&[
                orig + 1,
                orig + BS,
                orig * 4 + 1,
                u64::MAX,
                u64::MAX - BS,
                0,
                1 << 40,
            ]);
            put_at(raw, base.inode_at(ino, "size"), v);
            if rng.one_in(2) {
                // Keep the chunk count consistent, so the chunk range is what fails.
                put_at(
                    raw,
                    base.inode_at(ino, "count"),
                    v.div_ceil(BS).min(u32::MAX as u64),
                );
            }
        }
        _ => {
            let d = rng.pick(&base.dirs);
            let v = rng.pick(&[
                d.count as u64 + 1,
                base.count(T::Dirent) as u64,
                u32::MAX as u64,
                0,
            ]);
            put_at(raw, base.inode_at(d.ino, "count"), v);
            if rng.one_in(3) {
                put_at(raw, base.inode_at(d.ino, "size"), v);
            }
        }
    }
}

/// Offsets and indexes just past, or far past, what they index.
fn past_end(base: &Base, raw: &mut [u8], rng: &mut Rng) {
    let blob_len = base.blob_len();
    // Just past the end (len bytes starting one byte too late), far past, and overflowing.
    let past = |end: u64, len: u64| end.wrapping_sub(len).wrapping_add(1);
    let far = |rng: &mut Rng, len: u64| {
        rng.pick(&[
            blob_len,
            past(blob_len, len),
            u64::MAX,
            past(u64::MAX, len),
            1 << 40,
        ])
    };
    match rng.below(7) {
        0 if base.count(T::Dirent) > 0 => {
            let i = rng.index(base.count(T::Dirent));
            let len = base.meta_get(base.at(T::Dirent, i, "name_len"));
            let v = far(rng, len);
            put_at(raw, base.at(T::Dirent, i, "name_offset"), v);
        }
        1 if base.count(T::Xattr) > 0 => {
            let i = rng.index(base.count(T::Xattr));
            let (o, l) = if rng.one_in(2) {
                ("key_offset", "key_len")
            } else {
                ("value_offset", "value_len")
            };
            let len = base.meta_get(base.at(T::Xattr, i, l));
            let v = far(rng, len);
            put_at(raw, base.at(T::Xattr, i, o), v);
        }
        2 if !base.files.is_empty() => {
            let ino = rng.pick(&base.files);
            let (nc, cnt) = (
                base.count(T::Chunk) as u64,
                base.meta_get(base.inode_at(ino, "count")),
            );
            let v = rng.pick(&[nc, past(nc, cnt), u64::MAX, past(u64::MAX, cnt)]);
            put_at(raw, base.inode_at(ino, "first"), v);
        }
        3 => {
            let d = rng.pick(&base.dirs);
            let nd = base.count(T::Dirent) as u64;
            let c = d.count as u64;
            let v = rng.pick(&[nd, past(nd, c), u64::MAX, past(u64::MAX, c)]);
            put_at(raw, base.inode_at(d.ino, "first"), v);
        }
        4 if !base.xattr_sets.is_empty() => {
            let (ino, _, count) = rng.pick(&base.xattr_sets);
            let nx = base.count(T::Xattr) as u64;
            let c = count as u64;
            let v = rng.pick(&[nx, past(nx, c), u64::MAX, past(u64::MAX, c)]);
            put_at(raw, base.inode_at(ino, "xattr_first"), v);
        }
        5 if base.count(T::Chunk) > 0 => {
            let i = rng.index(base.count(T::Chunk));
            let nb = base.count(T::Block) as u64;
            if rng.one_in(2) {
                let v = rng.pick(&[nb, nb.wrapping_sub(1), HOLE as u64 - 1, HOLE as u64, nb + 1]);
                put_at(raw, base.at(T::Chunk, i, "block"), v);
            } else {
                let v = rng.pick(&[BS - 1, BS, BS + 1, u32::MAX as u64, u32::MAX as u64 - 10, 1]);
                put_at(raw, base.at(T::Chunk, i, "offset"), v);
            }
        }
        _ if base.count(T::Block) > 0 => {
            let i = rng.index(base.count(T::Block));
            let st = base.meta_get(base.at(T::Block, i, "stored_len"));
            let rl = base.meta_get(base.at(T::Block, i, "raw_len"));
            let end = base.data_end();
            match rng.below(3) {
                0 => {
                    let v = rng.pick(&[
                        end,
                        end - st + 1,
                        0,
                        127,
                        base.meta_offset() as u64,
                        u64::MAX - 1,
                    ]);
                    put_at(raw, base.at(T::Block, i, "offset"), v);
                }
                1 => {
                    let v = rng.pick(&[rl + 1, 0, u32::MAX as u64, st + 1]);
                    put_at(raw, base.at(T::Block, i, "stored_len"), v);
                }
                _ => {
                    let v = rng.pick(&[BS + 1, 0, st.saturating_sub(1), u32::MAX as u64, rl + 1]);
                    put_at(raw, base.at(T::Block, i, "raw_len"), v);
                }
            }
        }
        _ => {}
    }
}

/// A directory entry made to name the root, its own directory, an ancestor, or another
/// directory (a directory hard link), with or without the parent field made to agree.
fn cycle(base: &Base, raw: &mut [u8], rng: &mut Rng) {
    if base.dir_links.is_empty() {
        return;
    }
    let (k, dir, child) = rng.pick(&base.dir_links);
    let parent_of: HashMap<u32, u32> = base.dirs.iter().map(|d| (d.ino, d.parent)).collect();
    let mut ancestors = vec![dir];
    let mut cur = dir;
    while let Some(&p) = parent_of.get(&cur) {
        if p == cur || ancestors.len() > 64 {
            break;
        }
        ancestors.push(p);
        cur = p;
    }
    let target = match rng.below(4) {
        0 => 1,
        1 => dir,
        2 => rng.pick(&ancestors),
        _ => rng.pick(&base.dirs).ino,
    };
    put_at(raw, base.at(T::Dirent, k, "inode"), target as u64);
    if rng.one_in(2) {
        put_at(raw, base.inode_at(target, "parent"), dir as u64);
    }
    if rng.one_in(4) {
        // The displaced child now claims the moved directory's parent.
        put_at(raw, base.inode_at(child, "parent"), target as u64);
    }
}

/// Entries of one directory swapped (unsorted), a name duplicated, or names exchanged.
fn disorder(base: &Base, raw: &mut [u8], rng: &mut Rng) {
    let multi: Vec<DirInfo> = base.dirs.iter().copied().filter(|d| d.count >= 2).collect();
    if multi.is_empty() {
        return;
    }
    let d = rng.pick(&multi);
    let i = d.first + rng.index(d.count);
    let mut j = d.first + rng.index(d.count);
    if i == j {
        j = if j + 1 < d.first + d.count {
            j + 1
        } else {
            d.first
        };
    }
    let (oi, oj) = (
        base.at(T::Dirent, i, "name_offset").0,
        base.at(T::Dirent, j, "name_offset").0,
    );
    let size = T::Dirent.size();
    match rng.below(3) {
        0 => {
            let (a, b) = (raw[oi..oi + size].to_vec(), raw[oj..oj + size].to_vec());
            raw[oi..oi + size].copy_from_slice(&b);
            raw[oj..oj + size].copy_from_slice(&a);
        }
        1 => {
            for name in ["name_offset", "name_len"] {
                let v = base.meta_get(base.at(T::Dirent, j, name));
                put_at(raw, base.at(T::Dirent, i, name), v);
            }
        }
        _ => {
            for name in ["name_offset", "name_len"] {
                let (a, b) = (base.at(T::Dirent, i, name), base.at(T::Dirent, j, name));
                let (va, vb) = (base.meta_get(a), base.meta_get(b));
                put_at(raw, a, vb);
                put_at(raw, b, va);
            }
        }
    }
}

/// Xattr keys unsorted or repeated, a value over 64 KiB, or an empty key.
fn xattr_edit(base: &Base, raw: &mut Vec<u8>, rng: &mut Rng) {
    if base.xattr_sets.is_empty() {
        return;
    }
    let (_, first, count) = rng.pick(&base.xattr_sets);
    let i = first + rng.index(count);
    let j = first + rng.index(count);
    match rng.below(4) {
        0 | 1 if count >= 2 => {
            let swap = rng.one_in(2);
            for name in ["key_offset", "key_len"] {
                let (a, b) = (base.at(T::Xattr, i, name), base.at(T::Xattr, j, name));
                let (va, vb) = (base.meta_get(a), base.meta_get(b));
                put_at(raw, a, vb);
                if swap {
                    put_at(raw, b, va);
                }
            }
        }
        2 => {
            let n = rng.pick(&[65536usize, 65537]);
            if let Some(off) = blob_append(raw, &vec![b'v'; n]) {
                put_at(raw, base.at(T::Xattr, i, "value_offset"), off);
                put_at(raw, base.at(T::Xattr, i, "value_len"), n as u64);
            }
        }
        _ => put_at(raw, base.at(T::Xattr, i, "key_len"), 0),
    }
}

/// (e) Stored bytes of 1–3 blocks altered, their checksums in the block table recomputed.
fn mutate_data(base: &Base, rng: &mut Rng) -> Mutant {
    let mut img = base.bytes.clone();
    let mut raw = base.raw.clone();
    let nb = base.count(T::Block);
    assert!(nb > 0, "every base image has blocks");
    let f = frames();
    let mut touched: Vec<u32> = Vec::new();
    let mut spans = Vec::new();
    for _ in 0..1 + rng.index(3) {
        let idx = rng.index(nb);
        if touched.contains(&(idx as u32)) {
            continue;
        }
        // Writes stay inside the block's own stored bytes, so no other block changes.
        let off = base.meta_get(base.at(T::Block, idx, "offset")) as usize;
        let mut st = base.meta_get(base.at(T::Block, idx, "stored_len")) as usize;
        let rl = base.meta_get(base.at(T::Block, idx, "raw_len")) as usize;
        match rng.below(6) {
            0 => {
                for _ in 0..1 + rng.index(8) {
                    let p = off + rng.index(st);
                    img[p] ^= 1 << rng.below(8);
                }
            }
            1 => {
                let a = off + rng.index(st);
                let n = 1 + rng.index(off + st - a);
                let junk = rng.bytes(n);
                img[a..a + n].copy_from_slice(&junk);
            }
            2 => img[off..off + st].fill(0),
            3 => {
                // A well-formed frame of the wrong size (or a bomb) in place of the block.
                let mut zeros = vec![0u8; rl + 1];
                zeros[0] = 1;
                let small = compress(&zeros[..rl.saturating_sub(1).max(1)]);
                let over = compress(&zeros);
                let frame = match rng.below(4) {
                    0 => over,
                    1 => small,
                    2 => f.mib.clone(),
                    _ => f.mib16.clone(),
                };
                if frame.len() < rl && frame.len() <= st {
                    img[off..off + frame.len()].copy_from_slice(&frame);
                    st = frame.len();
                } else {
                    img[off] ^= 0x55;
                }
            }
            4 => st -= rng.index(st.min(16)),
            _ => {
                // Make a compressed block look stored raw (or the reverse) when it fits.
                if off as u64 + rl as u64 <= base.data_end() {
                    st = rl;
                } else {
                    st = st.saturating_sub(1).max(1);
                }
            }
        }
        put_at(&mut raw, base.at(T::Block, idx, "stored_len"), st as u64);
        spans.push((idx, off, st));
        touched.push(idx as u32);
    }
    for (idx, off, st) in spans {
        let sum = xxh3_64(&img[off..off + st]);
        put_at(&mut raw, base.at(T::Block, idx, "checksum"), sum);
    }
    let stored = compress_like(base, &raw);
    let bytes = assemble(
        &img[..base.meta_offset()],
        base.sb,
        &stored,
        raw.len() as u64,
    );
    Mutant { bytes, touched }
}

// ---------------------------------------------------------------------------------------------
// Running the cases.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// `open` refused the image.
    OpenErr,
    /// It opened, some call failed.
    RunErr,
    /// It opened and read exactly as the original.
    Same,
    /// It opened and read cleanly, differently (only allowed for resealed mutations).
    Differs,
}

#[derive(Debug, Default, Clone)]
struct Stats {
    cases: usize,
    open_err: usize,
    run_err: usize,
    same: usize,
    differs: usize,
    max_peak: usize,
    max_time: Duration,
    /// First error of each case, numbers masked, with how often it came: which checks the
    /// mutations reach (`CIMG_ROBUST_ERRORS=1` prints them).
    kinds: BTreeMap<String, usize>,
}

/// An error message with its numbers masked, so that messages group by the check that failed.
fn error_kind(e: &Error) -> String {
    let mut out = String::new();
    let mut in_number = false;
    for c in e.to_string().chars() {
        if in_number && (c.is_ascii_hexdigit() || c == 'x') {
            continue;
        }
        in_number = c.is_ascii_digit();
        out.push(if in_number { '#' } else { c });
    }
    out
}

static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);

/// Run one case: the outcome and the first error met, if any.
/// Open the mutated image `bytes` with `opts` and exercise it: the outcome, the kind of its
/// first error, and the snapshot when everything read without error.
fn check_open(
    class: Class,
    base: &Base,
    bytes: Vec<u8>,
    touched: &[u32],
    opts: &OpenOptions,
) -> std::result::Result<(Outcome, Option<String>, Option<Snapshot>), String> {
    let img = match Image::from_reader(bytes, "img", opts) {
        Ok(img) => img,
        Err(e) => {
            check_message(&e)?;
            if class == Class::DataBlock {
                return Err(format!("open failed after a data-block mutation: {e}"));
            }
            return Ok((Outcome::OpenErr, Some(error_kind(&e)), None));
        }
    };
    let (snap, errors) = exercise_all(&img);
    for e in &errors {
        check_message(e)?;
        if class == Class::DataBlock
            && !matches!(e, Error::BadBlock { block, .. } if touched.contains(block))
        {
            return Err(format!("error not naming a mutated block {touched:?}: {e}"));
        }
    }
    if let Some(e) = errors.first() {
        return Ok((Outcome::RunErr, Some(error_kind(e)), None));
    }
    if snap == base.snap {
        return Ok((Outcome::Same, None, Some(snap)));
    }
    if class.plain() {
        return Err(format!(
            "corrupt image read without error but differs: {}",
            diff(&base.snap, &snap)
        ));
    }
    Ok((Outcome::Differs, None, Some(snap)))
}

/// One case: the mutated image opened as usual (everything validated at open) and lazily
/// (checked where used). Both must pass every check of [`check_open`], and agree: what the
/// usual open reads cleanly the lazy one reads the same (or refuses a directory that the root
/// does not reach), and what it refuses or fails to read the lazy one refuses or fails on
/// too (the exercise uses every record).
fn check_case(
    class: Class,
    base: &Base,
    rng: &mut Rng,
) -> std::result::Result<(Outcome, Option<String>), String> {
    let m = mutate(class, base, rng);
    let (outcome, kind, snap) = check_open(class, base, m.bytes.clone(), &m.touched, &opts())?;
    let (lazy, lazy_kind, lazy_snap) = check_open(class, base, m.bytes, &m.touched, &lazy_opts())?;
    let failed = |o: Outcome| matches!(o, Outcome::OpenErr | Outcome::RunErr);
    // One difference is allowed: the usual open checks the directories reached from the
    // root, the lazy one every directory it is asked to list (the exercise lists each
    // directory inode, reached or not).
    let stricter = !failed(outcome)
        && lazy == Outcome::RunErr
        && lazy_kind
            .as_deref()
            .is_some_and(|k| k.starts_with("corrupt image: metadata: directory inode"));
    if !stricter && (failed(outcome) != failed(lazy) || snap != lazy_snap) {
        return Err(format!(
            "the lazy open disagrees: {outcome:?} ({kind:?}) as usual, {lazy:?} ({lazy_kind:?}) lazily"
        ));
    }
    Ok((outcome, kind))
}

fn run_case(
    class: Class,
    seed: u64,
    wd: &Watchdog,
    stats: &mut Stats,
    trace: bool,
) -> std::result::Result<(), String> {
    let bases = bases();
    let mut rng = Rng(seed);
    let base = &bases[rng.index(bases.len())];
    let label = format!("{} seed {seed:#018x} (image {})", class.name(), base.name);
    if trace {
        let _ = writeln!(std::io::stderr(), "robust: {label}");
    }
    wd.begin(label.clone());
    let before = PeakAlloc.current_usage();
    PeakAlloc.reset_peak_usage();
    let t0 = Instant::now();
    let res = catch_unwind(AssertUnwindSafe(|| check_case(class, base, &mut rng)));
    let elapsed = t0.elapsed();
    let peak = PeakAlloc.peak_usage().saturating_sub(before);
    wd.end();
    stats.cases += 1;
    stats.max_peak = stats.max_peak.max(peak);
    stats.max_time = stats.max_time.max(elapsed);
    let res = match res {
        Ok(r) => r,
        Err(payload) => {
            let msg = LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()).take();
            let msg = msg
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(format!("panic: {}", msg.replace('\n', " ")))
        }
    };
    let (outcome, kind) = res.map_err(|m| format!("{label}: {m}"))?;
    match outcome {
        Outcome::OpenErr => stats.open_err += 1,
        Outcome::RunErr => stats.run_err += 1,
        Outcome::Same => stats.same += 1,
        Outcome::Differs => stats.differs += 1,
    }
    if let Some(k) = kind {
        *stats.kinds.entry(k).or_default() += 1;
    }
    let cap = alloc_cap(base.bytes.len());
    if peak > cap {
        return Err(format!(
            "{label}: allocated a peak of {} KiB (cap {} KiB)",
            peak >> 10,
            cap >> 10
        ));
    }
    Ok(())
}

#[test]
fn mutated_images_never_panic_hang_or_overallocate() {
    let _serial = serial();
    let trace = std::env::var_os("CIMG_ROBUST_TRACE").is_some();
    let total: usize = std::env::var("CIMG_MUTATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let single: Option<(Class, u64)> = std::env::var("CIMG_CASE").ok().map(|s| {
        let (c, seed) = s.rsplit_once(':').expect("CIMG_CASE=class:seed");
        let class = Class::from_letter(c).expect("class letter a..e");
        let seed = seed.trim_start_matches("0x");
        (class, u64::from_str_radix(seed, 16).expect("hex seed"))
    });
    // Build everything shared before measuring any case.
    let _ = (bases(), frames(), records());
    for r in ["Superblock", "MetaHeader"] {
        let _ = slots(r);
    }

    let wd = Watchdog::start();
    let prev_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|info| {
        *LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()) = Some(info.to_string());
    }));
    let started = Instant::now();
    let mut stats = vec![Stats::default(); CLASSES.len()];
    let mut failures: Vec<String> = Vec::new();
    let mut failed = 0usize;
    let cases: Vec<(usize, Class, u64)> = match single {
        Some((class, seed)) => vec![(
            CLASSES.iter().position(|c| c.0 == class).unwrap_or(0),
            class,
            seed,
        )],
        None => CLASSES
            .iter()
            .enumerate()
            .flat_map(|(k, &(class, pct))| {
                let n = (total * pct).div_ceil(100);
                (0..n).map(move |i| (k, class, case_seed(class, i)))
            })
            .collect(),
    };
    for (k, class, seed) in cases {
        if let Err(f) = run_case(class, seed, &wd, &mut stats[k], trace) {
            failed += 1;
            if failures.len() < 40 {
                failures.push(f);
            }
        }
    }
    std::panic::set_hook(prev_hook);
    drop(wd);
    let elapsed = started.elapsed();
    let mut report = String::new();
    for (k, s) in stats.iter().enumerate() {
        report.push_str(&format!(
            "  {:<13} {:>5} cases: {:>5} refused at open, {:>5} failed a call, {:>5} read as the original, {:>4} read differently; {:>3} distinct errors; peak {:>3} MiB, slowest {:?}\n",
            CLASSES[k].0.name(),
            s.cases,
            s.open_err,
            s.run_err,
            s.same,
            s.differs,
            s.kinds.len(),
            s.max_peak >> 20,
            s.max_time
        ));
        if std::env::var_os("CIMG_ROBUST_ERRORS").is_some() {
            for (kind, count) in &s.kinds {
                report.push_str(&format!("      {count:>5}  {kind}\n"));
            }
        }
    }
    let n: usize = stats.iter().map(|s| s.cases).sum();
    println!("robust: {n} cases in {elapsed:?}\n{report}");
    assert!(
        failures.is_empty(),
        "{failed} of {n} cases failed (rerun one with CIMG_CASE=<class>:<seed>):\n{}\n{report}",
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// A corrupt data block is reported by its index.

/// Corrupt one stored byte of a block used by some file (compressed or stored raw as asked),
/// without resealing anything, and check what `verify`, `read_at` and `files_using_block` say.
fn corrupt_one_block(raw_block: bool) {
    let base = &bases()[0];
    let img = Image::from_reader(base.bytes.clone(), "img", &opts()).unwrap();
    let is_raw = |b: u32| img.block_info(b).map(|(_, st, rl)| st == rl).unwrap();
    let files: Vec<&(Vec<u8>, u32, Node)> = base
        .snap
        .entries
        .iter()
        .filter(|(_, _, n)| n.content.as_ref().is_some_and(|c| !c.is_empty()))
        .collect();
    let uses = |n: &Node, b: u32| n.extents.iter().any(|x| x.block == Some(b));
    let (victim, block) = files
        .iter()
        .find_map(|e| {
            e.2.extents
                .iter()
                .filter_map(|x| x.block)
                .find(|&b| is_raw(b) == raw_block && files.iter().any(|o| !uses(&o.2, b)))
                .map(|b| (*e, b))
        })
        .expect("a file in a block of the wanted kind, and a file elsewhere");
    let bystander = files.iter().find(|o| !uses(&o.2, block)).unwrap();
    let (off, st, _) = img.block_info(block).unwrap();
    drop(img);

    let mut bytes = base.bytes.clone();
    bytes[(off + st as u64 / 2) as usize] ^= 0xFF;
    // Through a real file too, to cover the `File` reader.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.cimg");
    fs::write(&path, &bytes).unwrap();
    let from_file = Image::open_with(&path, &opts()).expect("a bad data block does not stop open");
    let img =
        Image::from_reader(bytes, "img", &opts()).expect("a bad data block does not stop open");

    for img_bad in [
        img.verify(|_| {}).unwrap(),
        from_file.verify(|_| {}).unwrap(),
    ] {
        let blocks: Vec<u32> = img_bad
            .iter()
            .filter_map(|e| match e {
                Error::BadBlock { block, .. } => Some(*block),
                _ => None,
            })
            .collect();
        assert_eq!(
            blocks,
            vec![block],
            "verify names exactly the corrupt block: {img_bad:?}"
        );
        assert!(
            img_bad
                .iter()
                .any(|e| matches!(e, Error::Corrupt { what, .. } if what.contains("digest"))),
            "verify reports the digest mismatch: {img_bad:?}"
        );
    }

    let (vpath, vino, vnode) = victim;
    let x = vnode
        .extents
        .iter()
        .find(|x| x.block == Some(block))
        .unwrap();
    let mut buf = vec![0u8; x.len as usize];
    match img.read_at(*vino, x.file_offset, &mut buf) {
        Err(Error::BadBlock {
            block: b,
            offset,
            why,
        }) => {
            assert_eq!(b, block, "read_at names the corrupt block");
            assert_eq!(offset, off, "and its offset");
            assert!(!why.is_empty());
        }
        other => panic!(
            "read_at of {} over a corrupt block gave {other:?}",
            String::from_utf8_lossy(vpath)
        ),
    }
    let e = img.read_block(block).unwrap_err();
    assert!(
        matches!(e, Error::BadBlock { block: b, .. } if b == block),
        "{e}"
    );
    assert!(
        e.to_string().contains(&format!("block {block}")),
        "the message names the block: {e}"
    );

    let (bpath, bino, bnode) = bystander;
    let want = bnode.content.as_ref().unwrap();
    let mut got = vec![0u8; want.len()];
    assert_eq!(img.read_at(*bino, 0, &mut got).unwrap(), want.len());
    assert_eq!(
        &got,
        want,
        "{} in other blocks reads correctly",
        String::from_utf8_lossy(bpath)
    );
    assert!(
        img.files_using_block(block).unwrap().contains(vpath),
        "files_using_block names the victim"
    );
}

#[test]
fn corrupt_compressed_block_is_reported_by_index() {
    let _serial = serial();
    corrupt_one_block(false);
}

#[test]
fn corrupt_raw_block_is_reported_by_index() {
    let _serial = serial();
    corrupt_one_block(true);
}

// ---------------------------------------------------------------------------------------------
// Metadata shaped to make validation quadratic or deep.

#[derive(Default)]
struct Tables {
    inodes: Vec<Inode>,
    dirents: Vec<Dirent>,
    chunks: Vec<Chunk>,
    xattrs: Vec<Xattr>,
    blob: Vec<u8>,
}

fn mk_inode(kind: FileKind, size: u64, first: u64, count: u32) -> Inode {
    let mut n = Inode::new_zeroed();
    n.mode = U32::new(kind.mode_bits() | 0o755);
    n.nlink = U32::new(1);
    n.size = U64::new(size);
    n.first = U64::new(first);
    n.count = U32::new(count);
    n
}

fn mk_dirent(blob: &mut Vec<u8>, name: &[u8], ino: u32, kind: FileKind) -> Dirent {
    let off = blob.len() as u64;
    blob.extend_from_slice(name);
    Dirent {
        name_offset: U64::new(off),
        inode: U32::new(ino),
        name_len: U16::new(name.len() as u16),
        kind: kind as u8,
        reserved: 0,
    }
}

/// An image with these tables, reusing the tiny base image's data region and block table.
fn hostile_image(t: &Tables) -> Vec<u8> {
    let base = &bases()[2];
    let (bo, bc) = base.table(T::Block);
    let blocks = &base.raw[bo..bo + bc * T::Block.size()];
    let mut raw = vec![0u8; size_of::<MetaHeader>()];
    let mut place = |data: &[u8], count: usize| {
        while !raw.len().is_multiple_of(8) {
            raw.push(0);
        }
        let tb = Table {
            offset: U64::new(raw.len() as u64),
            count: U64::new(count as u64),
        };
        raw.extend_from_slice(data);
        tb
    };
    let mut hdr = MetaHeader::new_zeroed();
    hdr.inodes = place(t.inodes.as_bytes(), t.inodes.len());
    hdr.dirents = place(t.dirents.as_bytes(), t.dirents.len());
    hdr.chunks = place(t.chunks.as_bytes(), t.chunks.len());
    hdr.blocks = place(blocks, bc);
    hdr.xattrs = place(t.xattrs.as_bytes(), t.xattrs.len());
    hdr.blob = place(&t.blob, t.blob.len());
    raw[..size_of::<MetaHeader>()].copy_from_slice(hdr.as_bytes());
    assemble(
        &base.bytes[..base.meta_offset()],
        base.sb,
        &compress(&raw),
        raw.len() as u64,
    )
}

/// Open under the watchdog; the result and the time taken.
fn timed_open(what: &str, bytes: Vec<u8>) -> (Result<Image<Vec<u8>>>, Duration) {
    let wd = Watchdog::start();
    wd.begin(what.to_string());
    let t0 = Instant::now();
    let r = Image::from_reader(bytes, "img", &opts());
    let took = t0.elapsed();
    wd.end();
    (r, took)
}

/// A generous bound for work linear in some tens of MiB of metadata, in a debug build.
const LINEAR: Duration = Duration::from_secs(5);

/// 100,000 files sharing one list of a million chunks (the writer shares chunk lists between
/// identical files, so sharing is legal): validation must not cost files × chunks.
#[test]
fn shared_chunk_lists_validate_in_linear_time() {
    let _serial = serial();
    let (files, chunks) = (100_000u32, 1_000_000u32);
    let mut t = Tables::default();
    let mut root = mk_inode(FileKind::Dir, 0, 0, 0);
    root.parent = U32::new(1);
    t.inodes.push(root);
    t.inodes
        .extend((0..files).map(|_| mk_inode(FileKind::File, chunks as u64 * BS, 0, chunks)));
    t.chunks = vec![
        Chunk {
            block: U32::new(HOLE),
            offset: U32::new(0)
        };
        chunks as usize
    ];
    let (r, took) = timed_open("shared chunk lists", hostile_image(&t));
    let img = r.expect("shared chunk lists are valid");
    assert!(took < LINEAR, "open took {took:?}");
    let last = files + 1;
    let size = img.attr(last).unwrap().size;
    let mut buf = [1u8; 10];
    assert_eq!(img.read_at(last, size - 10, &mut buf).unwrap(), 10);
    assert_eq!(buf, [0; 10]);
}

/// 100,000 directories all listing the same 200,000 entries (hard links; FORMAT.md lets
/// directories share entry ranges when no directory is named twice): accepted quickly, not
/// after directories × entries name checks.
#[test]
fn shared_directory_entries_validate_in_linear_time() {
    let _serial = serial();
    let (dirs, entries) = (100_000u32, 200_000u32);
    let mut t = Tables::default();
    let mut root = mk_inode(FileKind::Dir, dirs as u64, 0, dirs);
    root.parent = U32::new(1);
    t.inodes.push(root);
    for i in 0..dirs {
        t.dirents.push(mk_dirent(
            &mut t.blob,
            format!("d{i:07}").as_bytes(),
            2 + i,
            FileKind::Dir,
        ));
        let mut d = mk_inode(FileKind::Dir, entries as u64, dirs as u64, entries);
        d.parent = U32::new(1);
        t.inodes.push(d);
    }
    let file = dirs + 2;
    t.inodes.push(mk_inode(FileKind::File, 0, 0, 0));
    for i in 0..entries {
        t.dirents.push(mk_dirent(
            &mut t.blob,
            format!("f{i:07}").as_bytes(),
            file,
            FileKind::File,
        ));
    }
    let (r, took) = timed_open("shared directory entries", hostile_image(&t));
    assert!(took < LINEAR, "open took {took:?}");
    let img = r.expect("directories sharing entries of files are valid");
    assert_eq!(img.resolve(b"d0099999/f0199999").unwrap(), file);
    assert_eq!(img.lookup(2, b"f0000000").unwrap(), Some(file));
}

/// 100,000 inodes sharing one list of 100,000 xattrs: validation must not cost
/// inodes × xattrs key comparisons.
#[test]
fn shared_xattr_lists_validate_in_linear_time() {
    let _serial = serial();
    let (inodes, xattrs) = (100_000u32, 100_000u32);
    let mut t = Tables::default();
    let mut root = mk_inode(FileKind::Dir, 0, 0, 0);
    root.parent = U32::new(1);
    t.inodes.push(root);
    for i in 0..xattrs {
        let off = t.blob.len() as u64;
        t.blob.extend_from_slice(format!("user.k{i:07}").as_bytes());
        t.xattrs.push(Xattr {
            key_offset: U64::new(off),
            value_offset: U64::new(off),
            key_len: U32::new(13),
            value_len: U32::new(1),
        });
    }
    for _ in 0..inodes {
        let mut n = mk_inode(FileKind::Fifo, 0, 0, 0);
        n.xattr_count = U32::new(xattrs);
        t.inodes.push(n);
    }
    let (r, took) = timed_open("shared xattr lists", hostile_image(&t));
    assert!(took < LINEAR, "open took {took:?}");
    let img = r.expect("shared xattr lists are valid");
    assert_eq!(
        img.getxattr(inodes + 1, b"user.k0050000").unwrap(),
        Some(&b"u"[..])
    );
}

/// Framed metadata whose blob starts in the header's frame (a tiny tree with a long symlink
/// target): the lazy open moves that frame into the blob's buffer rather than decompressing it
/// twice, and reads exactly as the usual open.
#[test]
fn lazy_open_with_the_blob_in_the_first_frame_reads_as_the_usual_one() {
    let _serial = serial();
    fn tree(root: &Path) -> Extra {
        write_file(root, "f", b"data");
        symlink("x".repeat(4000), root.join("long")).unwrap();
        (Vec::new(), None)
    }
    let frame = 1u64 << layout::MIN_META_FRAME_LOG;
    let bytes = pack(tree, layout::MIN_META_FRAME_LOG);
    let usual = Image::from_reader(bytes.clone(), "img", &opts()).unwrap();
    assert!(usual.summary().meta_raw_len > frame, "two frames at least");
    assert!(
        usual.header().blob.offset.get() < frame,
        "the blob starts in frame 0"
    );
    let lazy = Image::from_reader(bytes, "img", &lazy_opts()).unwrap();
    assert_eq!(exercise(&lazy).unwrap(), exercise(&usual).unwrap());
}

/// A chain of 100,000 nested directories: no recursion, no stack overflow, linear time.
#[test]
fn deep_directory_chain_is_fine() {
    let _serial = serial();
    let depth = 100_000u32;
    let mut t = Tables::default();
    for i in 0..depth {
        let ino = i + 1;
        let last = i + 1 == depth;
        let count = if last { 0 } else { 1 };
        let mut d = mk_inode(FileKind::Dir, count as u64, i as u64, count);
        d.parent = U32::new(if i == 0 { 1 } else { ino - 1 });
        t.inodes.push(d);
        if !last {
            t.dirents
                .push(mk_dirent(&mut t.blob, b"d", ino + 1, FileKind::Dir));
        }
    }
    let (r, took) = timed_open("deep directory chain", hostile_image(&t));
    assert!(took < LINEAR, "open took {took:?}");
    let img = r.expect("a deep chain is valid");
    let wd = Watchdog::start();
    wd.begin("walk of a deep directory chain".into());
    let mut n = 0;
    img.walk(|_, _| {
        n += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(n, depth - 1);
    let path = vec![&b"d"[..]; depth as usize - 1].join(&b'/');
    assert_eq!(img.resolve(&path).unwrap(), depth);
    wd.end();
}
