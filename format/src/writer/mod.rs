//! The pack pipeline: scan → order → chunk → compress (parallel) → dedup → write.
//!
//! 1. **Order.** Regular files are laid out in directory order (depth-first, names sorted), or
//!    hot-list order first when one is given; the hot files' blocks come first and contiguous.
//! 2. **Chunk + compress** (stage 1, parallel): each file is cut into full blocks and a tail.
//!    Workers read a block, detect zeros (holes), hash it (xxh3-128) and compress full blocks
//!    with zstd, unless the sequencer already holds a block with that hash.
//! 3. **Sequence** (one thread, in order): deduplicates full blocks and tails by hash, packs
//!    tails and small files into shared fragment blocks, assigns block indexes.
//! 4. **Compress fragments** (stage 2, parallel) and **write** (in order).
//!
//! Every decision is taken in input order by one thread, so the output is byte-identical
//! whatever the number of threads. At most a fixed window of blocks is in flight, so memory is
//! bounded by the tree's metadata plus `threads × window × block size`.

mod pipeline;
pub mod tree;

use crate::layout::{
    self, Block, Chunk, Dirent, HOLE, Inode, MetaHeader, ROOT_INO, SUPERBLOCK_AREA, Superblock,
    Table, Xattr,
};
use crate::reader::{block_checksum, content_hash, seal_superblock};
use crate::{Error, FileKind, Result};
use pipeline::ordered_map;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Mutex, RwLock};
pub use tree::{Node, NodeId, Source, Tree, scan_dir};
use zerocopy::IntoBytes;
use zerocopy::little_endian::{I64, U16, U32, U64};

/// How to pack.
#[derive(Debug, Clone)]
pub struct PackOptions {
    /// log2 of the block size (12..=20); default 17 (128 KiB).
    pub block_log: u8,
    /// zstd level, 1..=22 (negative levels are zstd's fast modes); default 9, measured on the
    /// host's /usr as the best trade (about 1.05x the size of mksquashfs's level-15 image in
    /// about 0.12x its time; see benches/). Decompression speed barely depends on the level.
    pub level: i32,
    /// Compression threads; default all cores.
    pub threads: usize,
    /// Paths (relative to the root, `/`-separated) whose data goes first, in this order.
    pub hot: Vec<Vec<u8>>,
    /// Record every entry as owned by 0:0.
    pub root_owned: bool,
    /// Image config (JSON) to store, if any.
    pub config: Option<Vec<u8>>,
    /// How files after the hot list are ordered.
    pub order: Order,
    /// log2 of the decompressed bytes per metadata frame (12..=30); default 18 (256 KiB).
    /// Metadata larger than one frame is stored as independent zstd frames that readers
    /// decompress in parallel, and a lazy reader as it uses them (feature
    /// `INCOMPAT_META_FRAMES`); smaller metadata is one frame, readable by readers that predate
    /// the feature. With 256 KiB rather than 1 MiB frames, `cimg-mount` of `fuse-bench`'s
    /// image of 100,000 files (9.5 MiB of metadata), evicted from the page cache by
    /// `posix_fadvise(DONTNEED)`, then a `stat` of one of its directories, took 7.5–9.2 ms
    /// rather than 12.1–12.5 (medians of 15 such mounts, two rounds for each frame size, on a
    /// 2-core VM); its stored metadata was 894 KiB rather than 890.
    pub meta_frame_log: u8,
}

/// Data layout order of the files that are not on the hot list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Order {
    /// Directory order: depth-first, names sorted. Files of one directory share blocks.
    #[default]
    Dir,
    /// Grouped by file name extension, then name: similar small files share fragment blocks,
    /// which compress better. Start-up locality then comes from the hot list.
    Type,
}

impl Default for PackOptions {
    fn default() -> Self {
        PackOptions {
            block_log: 17,
            level: 9,
            threads: crate::cores(),
            hot: Vec::new(),
            root_owned: false,
            config: None,
            order: Order::default(),
            meta_frame_log: 18,
        }
    }
}

/// What a pack produced.
#[derive(Debug, Clone, Default)]
pub struct PackStats {
    /// Entries in the tree (inodes; hard links once).
    pub inodes: u64,
    /// Bytes of file content (hard links once).
    pub logical_bytes: u64,
    /// Bytes not stored thanks to deduplication.
    pub dedup_bytes: u64,
    /// Data blocks written.
    pub blocks: u64,
    /// Size of the image file.
    pub image_size: u64,
    /// Hot blocks at the start of the data.
    pub hot_blocks: u64,
    /// Hot-list entries that named nothing in the tree (or no regular file).
    pub hot_missing: u64,
}

/// Progress of a pack: bytes of file content handled so far out of a total.
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

/// Parse a hot list: one path per line, `#` comments and blank lines ignored.
pub fn parse_hot_list(text: &[u8]) -> Vec<Vec<u8>> {
    text.split(|&c| c == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .filter(|l| !l.is_empty() && !l.starts_with(b"#"))
        .map(|l| l.strip_prefix(b"/").unwrap_or(l).to_vec())
        .collect()
}

/// Pack directory `src` into the image file `out`.
pub fn pack_dir(
    src: &Path,
    out: &Path,
    opts: &PackOptions,
    progress: Progress,
) -> Result<PackStats> {
    let tree = scan_dir(src, |_| {})?;
    pack_tree(&tree, out, opts, progress)
}

/// A chunk while packing: fragment numbers become block indexes when the fragment is written.
/// `Holes(n)` stands for `n` consecutive hole chunks: a file's list holds one entry per data
/// chunk and one per run of holes (adjacent runs merged, so equal files have equal lists),
/// so a sparse file costs memory by its data, not by its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum PChunk {
    Block(u32),
    Frag(u32, u32),
    Holes(u32),
}

/// One file's chunks while packing: the run-length list and the number of chunks it stands for.
#[derive(Debug, Default)]
struct FileChunks {
    list: Vec<PChunk>,
    count: u64,
}

impl FileChunks {
    fn push(&mut self, c: PChunk) {
        match (self.list.last_mut(), c) {
            (Some(PChunk::Holes(n)), PChunk::Holes(m)) if n.checked_add(m).is_some() => *n += m,
            _ => self.list.push(c),
        }
        self.count += match c {
            PChunk::Holes(m) => m as u64,
            _ => 1,
        };
    }
}

/// The largest regular file the format holds with `2^block_log`-byte blocks: a file has at
/// most `2^32 - 1` chunks (FORMAT.md §14). The writer refuses larger files before it reads
/// anything.
pub fn max_file_size(block_log: u8) -> u64 {
    (u32::MAX as u64) << block_log
}

/// Work for stage 1.
enum Item {
    /// Chunk `chunk` of data-order file `file`; `len` bytes.
    Piece {
        file: u32,
        chunk: u32,
        len: u32,
        /// The bytes, for a stream-sourced file (read by the worker otherwise).
        data: Option<Vec<u8>>,
    },
    /// Chunks `chunk .. chunk + count` of file `file`, `bytes` in all, known to be holes (an
    /// unallocated range of a sparse source): one item however long the run.
    Holes {
        file: u32,
        chunk: u32,
        count: u32,
        bytes: u64,
    },
    /// End of the hot files.
    HotEnd,
}

/// Result of stage 1.
enum Piece {
    Full {
        file: u32,
        chunk: u32,
        hash: u128,
        len: u32,
        stored: Option<Vec<u8>>,
    },
    Tail {
        file: u32,
        chunk: u32,
        hash: u128,
        data: Vec<u8>,
    },
    /// `count` hole chunks from `chunk`, `bytes` in all.
    Holes {
        file: u32,
        chunk: u32,
        count: u32,
        bytes: u64,
    },
    HotEnd,
}

fn piece_out_of_order(st: &SeqState, p: &Piece) -> bool {
    match *p {
        Piece::Full { file, chunk, .. }
        | Piece::Tail { file, chunk, .. }
        | Piece::Holes { file, chunk, .. } => {
            st.chunks.get(file as usize).map(|c| c.count) != Some(chunk as u64)
        }
        Piece::HotEnd => false,
    }
}

/// Input of stage 2.
enum Out {
    Ready { stored: Vec<u8>, raw_len: u32 },
    Frag(Vec<u8>),
}

/// Compress one block, keeping it raw when zstd does not make it smaller.
fn compress(ctx: &mut zstd::bulk::Compressor<'_>, data: &[u8]) -> Result<Vec<u8>> {
    let c = ctx
        .compress(data)
        .map_err(|e| Error::Invalid(format!("zstd compression failed: {e}")))?;
    Ok(if c.len() < data.len() {
        c
    } else {
        data.to_vec()
    })
}

fn compressor(level: i32) -> Result<zstd::bulk::Compressor<'static>> {
    let mut c = zstd::bulk::Compressor::new(level)
        .map_err(|e| Error::Invalid(format!("zstd level {level}: {e}")))?;
    // The block table knows each block's length; the frame need not repeat it.
    let _ = c.include_checksum(false);
    Ok(c)
}

/// State kept by the sequencer, read back when the data is written.
struct SeqState {
    chunks: Vec<FileChunks>,
    frag_block: Vec<u32>,
    next_block: u32,
    hot_blocks: u32,
    dedup_bytes: u64,
    error: Option<Error>,
}

/// Data files in layout order: hot files first, then directory order.
fn data_order(tree: &Tree, hot: &[Vec<u8>], by_type: bool) -> (Vec<NodeId>, usize, u64) {
    let mut placed = vec![false; tree.nodes.len()];
    let mut order = Vec::new();
    let mut missing = 0;
    let primary = |id: NodeId| tree.node(id).link.unwrap_or(id);
    let streamed = |id: NodeId| {
        matches!(
            tree.node(id).source,
            Some(Source::Stream | Source::SparseStream(_))
        )
    };
    for p in hot {
        match tree.find(p).map(primary) {
            Some(id) if tree.node(id).kind == FileKind::File && !streamed(id) => {
                if !placed[id as usize] {
                    placed[id as usize] = true;
                    order.push(id);
                }
            }
            _ => missing += 1,
        }
    }
    let hot_len = order.len();
    for id in tree.dfs() {
        let n = tree.node(id);
        if n.kind == FileKind::File && n.link.is_none() && !placed[id as usize] && !streamed(id) {
            placed[id as usize] = true;
            order.push(id);
        }
    }
    if by_type {
        let key = |id: NodeId| {
            let name = &tree.node(id).name;
            let ext = name
                .iter()
                .rposition(|&c| c == b'.')
                .map(|p| &name[p..])
                .unwrap_or(b"");
            (ext.to_vec(), name.clone())
        };
        order[hot_len..].sort_by_cached_key(|&id| key(id));
    }
    (order, hot_len, missing)
}

/// Byte ranges of `path` that hold data (SEEK_DATA/SEEK_HOLE), for sparse files.
fn data_ranges(path: &Path, size: u64) -> Result<Vec<(u64, u64)>> {
    use nix::unistd::{Whence, lseek};
    let f = crate::reader::open_nonblocking(path)?;
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    let size = size as i64;
    while pos < size {
        let start = match lseek(&f, pos, Whence::SeekData) {
            Ok(s) => s,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(_) => return Ok(vec![(0, size as u64)]),
        };
        let end = lseek(&f, start, Whence::SeekHole).unwrap_or(size).min(size);
        if end <= start {
            break;
        }
        out.push((start as u64, end as u64));
        pos = end;
    }
    Ok(out)
}

/// Hole runs and data chunks covering chunks `0 .. nchunks` of a file of `size` bytes whose
/// data lies in the sorted, disjoint byte ranges `ranges` (SEEK_DATA/SEEK_HOLE, or a tar
/// sparse map), in chunk order: `each(first, Some((count, bytes)))` for each run of chunks
/// no range touches, `each(chunk, None)` for each other chunk. O(ranges + data chunks),
/// whatever the size.
fn walk_chunks(
    ranges: &[(u64, u64)],
    size: u64,
    bs: u64,
    mut each: impl FnMut(u64, Option<(u64, u64)>) -> Result<()>,
) -> Result<()> {
    let nchunks = size.div_ceil(bs);
    let mut next = 0u64;
    for &(a, b) in ranges {
        let b = b.min(size);
        if b <= a {
            continue;
        }
        let (first, last) = ((a / bs).max(next), (b - 1) / bs);
        if first > next {
            each(next, Some((first - next, first * bs - next * bs)))?;
        }
        for k in first..=last {
            each(k, None)?;
        }
        next = next.max(last + 1);
    }
    if nchunks > next {
        each(next, Some((nchunks - next, size - next * bs)))?;
    }
    Ok(())
}

/// Stage-1 item list for one file: one item per chunk that may hold data, one per run of
/// holes of a sparse file.
fn file_items(tree: &Tree, order_idx: u32, id: NodeId, bs: u64) -> Result<Vec<Item>> {
    let n = tree.node(id);
    let piece = |k: u64| Item::Piece {
        file: order_idx,
        chunk: k as u32,
        len: (n.size - k * bs).min(bs) as u32,
        data: None,
    };
    let ranges = match (&n.source, n.sparse) {
        (Some(Source::Path(p)), true) => data_ranges(p, n.size)?,
        _ => return Ok((0..n.size.div_ceil(bs)).map(piece).collect()),
    };
    let mut items = Vec::new();
    walk_chunks(&ranges, n.size, bs, |k, holes| {
        items.push(match holes {
            Some((count, bytes)) => Item::Holes {
                file: order_idx,
                chunk: k as u32,
                count: count as u32,
                bytes,
            },
            None => piece(k),
        });
        Ok(())
    })?;
    Ok(items)
}

/// Pack `tree` into the image file `out`. The file is written to a temporary in `out`'s
/// directory and renamed when complete ([`crate::output`]); on error nothing is left behind. Every regular file must
/// have a [`Source::Path`] (or be empty); see [`pack_tree_with`] for streamed content.
pub fn pack_tree(
    tree: &Tree,
    out: &Path,
    opts: &PackOptions,
    progress: Progress,
) -> Result<PackStats> {
    pack_tree_with(tree, out, opts, progress, |_| Ok(()))
}

/// Receives the content of one stream-sourced file: `(node, reader)`; the reader must yield
/// exactly the node's `size` bytes ([`Source::Stream`]), or its ranges' bytes
/// ([`Source::SparseStream`]).
pub type Sink<'a> = dyn FnMut(NodeId, &mut dyn Read) -> Result<()> + 'a;

/// Like [`pack_tree`], for trees whose regular files may have [`Source::Stream`]: `feed` runs
/// on a thread of its own and must call the sink once for every such file (for hard links,
/// on the node that holds the inode, the one without `link`), in any order; that order is the
/// layout order of their data, after all path-sourced files. Data moves through a bounded
/// channel, so memory stays bounded. Hot-list entries naming streamed files are counted as
/// missing (their data comes when the stream says). An error from `feed` or from the sink
/// (short or long content, a node fed twice or not streamed) fails the pack.
pub fn pack_tree_with<F>(
    tree: &Tree,
    out: &Path,
    opts: &PackOptions,
    progress: Progress,
    feed: F,
) -> Result<PackStats>
where
    F: FnOnce(&mut Sink<'_>) -> Result<()> + Send,
{
    if !(layout::MIN_BLOCK_LOG..=layout::MAX_BLOCK_LOG).contains(&opts.block_log) {
        return Err(Error::Invalid(format!(
            "block size must be a power of two from 4 KiB to 1 MiB, not 2^{}",
            opts.block_log
        )));
    }
    let range = zstd::compression_level_range();
    if !range.contains(&opts.level) {
        return Err(Error::Invalid(format!(
            "zstd level {} outside {}..={}",
            opts.level,
            range.start(),
            range.end()
        )));
    }
    tree.check()?;
    // The output module owns the temporary: anonymous or randomly named, never through a
    // planted symlink, removed on error, renamed onto `out` once synced.
    let tmp = crate::output::Output::create(out)?;
    let stats = write_image(tree, tmp.file(), out, opts, progress, feed)?;
    tmp.commit()?;
    Ok(stats)
}

fn is_streamed(n: &Node) -> bool {
    n.kind == FileKind::File
        && n.link.is_none()
        && matches!(n.source, Some(Source::Stream | Source::SparseStream(_)))
}

/// Read until `buf` is full or the reader ends; the count read.
pub(crate) fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn write_image<F>(
    tree: &Tree,
    file: &File,
    path: &Path,
    opts: &PackOptions,
    progress: Progress,
    feed: F,
) -> Result<PackStats>
where
    F: FnOnce(&mut Sink<'_>) -> Result<()> + Send,
{
    let bs = 1u64 << opts.block_log;
    let threads = opts.threads.max(1);
    let limit = max_file_size(opts.block_log);
    if let Some((i, n)) = tree
        .nodes
        .iter()
        .enumerate()
        .find(|(_, n)| n.kind == FileKind::File && n.size > limit)
    {
        return Err(Error::Invalid(format!(
            "{}: {} bytes, more than the largest file the format holds with {} KiB blocks \
             ({limit} bytes: 2^32 - 1 blocks; larger blocks hold up to {} bytes)",
            String::from_utf8_lossy(&tree.path_of(i as NodeId)),
            n.size,
            bs >> 10,
            max_file_size(layout::MAX_BLOCK_LOG)
        )));
    }
    let (mut order, hot_len, hot_missing) = data_order(tree, &opts.hot, opts.order == Order::Type);
    let path_files = order.len();
    let n_stream = tree.nodes.iter().filter(|n| is_streamed(n)).count();
    let total: u64 = order.iter().map(|&id| tree.node(id).size).sum::<u64>()
        + tree
            .nodes
            .iter()
            .filter(|n| is_streamed(n))
            .map(|n| n.size)
            .sum::<u64>();
    let fed: Mutex<Vec<NodeId>> = Mutex::new(Vec::with_capacity(n_stream));
    let seen: RwLock<HashMap<u128, u32>> = RwLock::new(HashMap::new());
    let state = Mutex::new(SeqState {
        chunks: (0..order.len() + n_stream)
            .map(|_| FileChunks::default())
            .collect(),
        frag_block: Vec::new(),
        next_block: 0,
        hot_blocks: 0,
        dedup_bytes: 0,
        error: None,
    });
    let io = |e| Error::io(path, e);
    let mut w = BufWriter::with_capacity(1 << 20, file);
    w.write_all(&[0u8; SUPERBLOCK_AREA as usize]).map_err(io)?;
    let mut pos = SUPERBLOCK_AREA;
    let mut digest = xxhash_rust::xxh3::Xxh3::new();
    let mut blocks: Vec<Block> = Vec::new();

    let write_result: Result<()> = std::thread::scope(|s| {
        // Streamed files: their blocks come from the feeder through a bounded channel, after
        // the path-sourced files' items.
        let (data_tx, data_rx) = crossbeam_channel::bounded::<Result<Item>>(threads * 2);
        if n_stream > 0 {
            let fed = &fed;
            s.spawn(move || {
                let mut done = vec![false; tree.nodes.len()];
                let mut next_file = path_files as u32;
                let mut sink = |id: NodeId, r: &mut dyn Read| -> Result<()> {
                    let name = || String::from_utf8_lossy(&tree.path_of(id)).into_owned();
                    let n = tree
                        .nodes
                        .get(id as usize)
                        .filter(|n| is_streamed(n))
                        .ok_or_else(|| {
                            Error::Invalid(format!("internal: node {id} fed but not streamed"))
                        })?;
                    if std::mem::replace(&mut done[id as usize], true) {
                        return Err(Error::Invalid(format!("internal: {} fed twice", name())));
                    }
                    let file = next_file;
                    next_file += 1;
                    fed.lock()
                        .map_err(|_| Error::Invalid("internal: lock".into()))?
                        .push(id);
                    let send = |item: Item| {
                        data_tx
                            .send(Ok(item))
                            .map_err(|_| Error::Invalid("packing stopped".into()))
                    };
                    let short = |at: u64| {
                        Error::Invalid(format!(
                            "{}: content ended after {at} of {} bytes",
                            name(),
                            n.size
                        ))
                    };
                    let read_err = |e: std::io::Error| {
                        Error::Invalid(format!("{}: reading content: {e}", name()))
                    };
                    // As byte ranges `start .. end`.
                    let ranges: Vec<(u64, u64)> = match &n.source {
                        Some(Source::SparseStream(map)) => {
                            map.iter().map(|&(o, l)| (o, o.saturating_add(l))).collect()
                        }
                        _ => vec![(0, n.size)],
                    };
                    // With a map the reader yields the ranges' bytes only: `idx` is the range
                    // being read, `used` how much of it has been.
                    let (mut idx, mut used) = (0usize, 0u64);
                    walk_chunks(&ranges, n.size, bs, |k, holes| {
                        if let Some((count, bytes)) = holes {
                            return send(Item::Holes {
                                file,
                                chunk: k as u32,
                                count: count as u32,
                                bytes,
                            });
                        }
                        let (s, e) = (k * bs, ((k + 1) * bs).min(n.size));
                        let mut data = vec![0u8; (e - s) as usize];
                        while let Some(&(o, end)) = ranges.get(idx) {
                            let (a, b) = ((o + used).max(s), end.min(e));
                            if o >= e {
                                break;
                            }
                            if b > a {
                                let buf = &mut data[(a - s) as usize..(b - s) as usize];
                                let got = read_full(r, buf).map_err(read_err)?;
                                if got < buf.len() {
                                    return Err(short(a + got as u64));
                                }
                                used = b - o;
                            }
                            if end > e {
                                break;
                            }
                            (idx, used) = (idx + 1, 0);
                        }
                        send(Item::Piece {
                            file,
                            chunk: k as u32,
                            len: (e - s) as u32,
                            data: Some(data),
                        })
                    })?;
                    let mut extra = [0u8; 1];
                    if read_full(r, &mut extra).unwrap_or(0) > 0 {
                        return Err(Error::Invalid(format!(
                            "{}: content longer than its declared {} bytes",
                            name(),
                            n.size
                        )));
                    }
                    Ok(())
                };
                let mut r = feed(&mut sink);
                if r.is_ok() {
                    let missing = tree
                        .nodes
                        .iter()
                        .enumerate()
                        .find(|&(i, n)| is_streamed(n) && !done[i]);
                    if let Some((i, _)) = missing {
                        r = Err(Error::Invalid(format!(
                            "{}: content never given",
                            String::from_utf8_lossy(&tree.path_of(i as NodeId))
                        )));
                    }
                }
                if let Err(e) = r {
                    let _ = data_tx.send(Err(e));
                }
            });
        } else {
            drop(data_tx);
        }
        let order = &order;
        // Item generation: per file, lazily, so the item list is never whole in memory.
        let items = order
            .iter()
            .enumerate()
            .flat_map(move |(i, &id)| {
                let mut v = match file_items(tree, i as u32, id, bs) {
                    Ok(v) => v.into_iter().map(Ok).collect::<Vec<_>>(),
                    Err(e) => vec![Err(e)],
                };
                if i + 1 == hot_len {
                    v.push(Ok(Item::HotEnd));
                }
                v
            })
            .chain(data_rx);
        let seen_ref = &seen;
        let stage1 = ordered_map(s, items, threads, threads * 8, move || {
            let mut ctx = compressor(opts.level);
            let mut open: Option<(u32, File)> = None;
            move |item: Result<Item>| -> Result<Piece> {
                let (file, chunk, len, given) = match item? {
                    Item::HotEnd => return Ok(Piece::HotEnd),
                    Item::Holes {
                        file,
                        chunk,
                        count,
                        bytes,
                    } => {
                        return Ok(Piece::Holes {
                            file,
                            chunk,
                            count,
                            bytes,
                        });
                    }
                    Item::Piece {
                        file,
                        chunk,
                        len,
                        data,
                    } => (file, chunk, len, data),
                };
                let data = match given {
                    Some(d) => d,
                    None => {
                        let node = tree.node(order[file as usize]);
                        let src = match &node.source {
                            Some(Source::Path(p)) => p.as_path(),
                            _ => {
                                return Err(Error::Invalid(format!(
                                    "{}: no data source",
                                    String::from_utf8_lossy(&tree.path_of(order[file as usize]))
                                )));
                            }
                        };
                        if open.as_ref().map(|o| o.0) != Some(file) {
                            open = Some((file, crate::reader::open_nonblocking(src)?));
                        }
                        let f = &open
                            .as_ref()
                            .map(|o| &o.1)
                            .ok_or_else(|| Error::Invalid("no file".into()))?;
                        let mut data = vec![0u8; len as usize];
                        f.read_exact_at(&mut data, chunk as u64 * bs).map_err(|e| {
                            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                                Error::Invalid(format!(
                                    "{}: file shrank while packing",
                                    src.display()
                                ))
                            } else {
                                Error::io(src, e)
                            }
                        })?;
                        data
                    }
                };
                if data.iter().all(|&b| b == 0) {
                    return Ok(Piece::Holes {
                        file,
                        chunk,
                        count: 1,
                        bytes: len as u64,
                    });
                }
                let hash = content_hash(&data);
                if (len as u64) < bs {
                    return Ok(Piece::Tail {
                        file,
                        chunk,
                        hash,
                        data,
                    });
                }
                let known = seen_ref
                    .read()
                    .map(|m| m.contains_key(&hash))
                    .unwrap_or(false);
                let stored = if known {
                    None
                } else {
                    let ctx = ctx.as_mut().map_err(|e| Error::Invalid(e.to_string()))?;
                    Some(compress(ctx, &data)?)
                };
                Ok(Piece::Full {
                    file,
                    chunk,
                    hash,
                    len,
                    stored,
                })
            }
        });

        // The sequencer: in order, one thread (stage 2's feeder).
        let state_ref = &state;
        let level = opts.level;
        let mut frag: Vec<u8> = Vec::new();
        let mut frag_no: u32 = 0;
        let mut tails: HashMap<(u128, u32), PChunk> = HashMap::new();
        let mut done: u64 = 0;
        let mut stage1 = stage1;
        let mut pending: std::collections::VecDeque<Out> = Default::default();
        let mut finished = false;
        let seq = std::iter::from_fn(move || {
            loop {
                if let Some(o) = pending.pop_front() {
                    return Some(o);
                }
                if finished {
                    return None;
                }
                let mut st = state_ref.lock().ok()?;
                let flush =
                    |st: &mut SeqState,
                     frag: &mut Vec<u8>,
                     frag_no: &mut u32,
                     pending: &mut std::collections::VecDeque<Out>| {
                        if !frag.is_empty() {
                            st.frag_block.push(st.next_block);
                            st.next_block += 1;
                            *frag_no += 1;
                            pending.push_back(Out::Frag(std::mem::take(frag)));
                        }
                    };
                match stage1.next() {
                    None => {
                        flush(&mut st, &mut frag, &mut frag_no, &mut pending);
                        finished = true;
                    }
                    Some(Err(e)) => {
                        st.error = Some(e);
                        return None;
                    }
                    Some(Ok(Piece::HotEnd)) => {
                        flush(&mut st, &mut frag, &mut frag_no, &mut pending);
                        st.hot_blocks = st.next_block;
                    }
                    Some(Ok(piece)) if piece_out_of_order(&st, &piece) => {
                        st.error = Some(Error::Invalid("internal: chunks out of order".into()));
                        return None;
                    }
                    Some(Ok(Piece::Holes {
                        file,
                        chunk: _,
                        count,
                        bytes,
                    })) => {
                        st.chunks[file as usize].push(PChunk::Holes(count));
                        done += bytes;
                    }
                    Some(Ok(Piece::Full {
                        file,
                        chunk: _,
                        hash,
                        len,
                        stored,
                    })) => {
                        done += len as u64;
                        let existing = seen_ref.read().ok().and_then(|m| m.get(&hash).copied());
                        let c = match (existing, stored) {
                            (Some(b), _) => {
                                st.dedup_bytes += len as u64;
                                PChunk::Block(b)
                            }
                            (None, stored) => {
                                let stored = match stored {
                                    Some(s) => s,
                                    None => {
                                        st.error = Some(Error::Invalid(
                                            "internal: block skipped without a copy".into(),
                                        ));
                                        return None;
                                    }
                                };
                                let b = st.next_block;
                                st.next_block += 1;
                                if let Ok(mut m) = seen_ref.write() {
                                    m.insert(hash, b);
                                }
                                pending.push_back(Out::Ready {
                                    stored,
                                    raw_len: len,
                                });
                                PChunk::Block(b)
                            }
                        };
                        st.chunks[file as usize].push(c);
                    }
                    Some(Ok(Piece::Tail {
                        file,
                        chunk: _,
                        hash,
                        data,
                    })) => {
                        let len = data.len() as u32;
                        done += len as u64;
                        let c = match tails.get(&(hash, len)) {
                            Some(&c) => {
                                st.dedup_bytes += len as u64;
                                c
                            }
                            None => {
                                if frag.len() + data.len() > bs as usize {
                                    flush(&mut st, &mut frag, &mut frag_no, &mut pending);
                                }
                                let c = PChunk::Frag(frag_no, frag.len() as u32);
                                frag.extend_from_slice(&data);
                                tails.insert((hash, len), c);
                                c
                            }
                        };
                        st.chunks[file as usize].push(c);
                    }
                }
                drop(st);
                progress(done, total);
            }
        });
        let stage2 = ordered_map(s, seq, threads, threads * 4, move || {
            let mut ctx = compressor(level);
            move |o: Out| -> Result<(Vec<u8>, u32)> {
                match o {
                    Out::Ready { stored, raw_len } => Ok((stored, raw_len)),
                    Out::Frag(data) => {
                        let ctx = ctx.as_mut().map_err(|e| Error::Invalid(e.to_string()))?;
                        let stored = compress(ctx, &data)?;
                        Ok((stored, data.len() as u32))
                    }
                }
            }
        });
        for r in stage2 {
            let (stored, raw_len) = r?;
            blocks.push(Block {
                offset: U64::new(pos),
                checksum: U64::new(block_checksum(&stored)),
                stored_len: U32::new(stored.len() as u32),
                raw_len: U32::new(raw_len),
            });
            w.write_all(&stored).map_err(io)?;
            digest.update(&stored);
            pos += stored.len() as u64;
        }
        Ok(())
    });
    let mut st = state
        .into_inner()
        .map_err(|_| Error::Invalid("internal: sequencer panicked".into()))?;
    if let Some(e) = st.error.take() {
        return Err(e);
    }
    write_result?;
    order.extend(
        fed.into_inner()
            .map_err(|_| Error::Invalid("internal: feeder panicked".into()))?,
    );
    if order.len() != st.chunks.len() {
        return Err(Error::Invalid(
            "internal: streamed file count mismatch".into(),
        ));
    }
    if blocks.len() as u64 != st.next_block as u64 {
        return Err(Error::Invalid("internal: block count mismatch".into()));
    }
    if hot_len == 0 {
        st.hot_blocks = 0;
    }
    let data_len = pos - SUPERBLOCK_AREA;

    // Metadata.
    let meta = build_metadata(tree, opts, &order, &st, &blocks, total)?;
    let level = opts.level.clamp(3, 19);
    let (stored_meta, frame_log) =
        compress_metadata(&meta.bytes, level, opts.meta_frame_log, opts.threads)?;
    w.write_all(&stored_meta).map_err(io)?;
    digest.update(&stored_meta);
    let meta_offset = pos;
    pos += stored_meta.len() as u64;
    w.flush().map_err(io)?;
    drop(w);

    let mut sb = Superblock {
        magic: layout::MAGIC,
        version_major: U16::new(layout::VERSION_MAJOR),
        version_minor: U16::new(layout::VERSION_MINOR),
        block_log: opts.block_log,
        level: opts.level.clamp(i8::MIN as i32, i8::MAX as i32) as i8,
        meta_frame_log: frame_log.unwrap_or(0),
        reserved0: 0,
        compat: U64::new(0),
        incompat: U64::new(if frame_log.is_some() {
            layout::INCOMPAT_META_FRAMES
        } else {
            0
        }),
        image_size: U64::new(pos),
        data_offset: U64::new(SUPERBLOCK_AREA),
        data_len: U64::new(data_len),
        meta_offset: U64::new(meta_offset),
        meta_stored_len: U64::new(stored_meta.len() as u64),
        meta_raw_len: U64::new(meta.bytes.len() as u64),
        meta_checksum: U64::new(xxhash_rust::xxh3::xxh3_64(&stored_meta)),
        hot_blocks: U64::new(st.hot_blocks as u64),
        digest: digest.digest128().to_le_bytes(),
        reserved1: U64::new(0),
        checksum: U64::new(0),
    };
    let sbytes = seal_superblock(&mut sb);
    file.write_all_at(&sbytes, 0).map_err(io)?;
    Ok(PackStats {
        inodes: meta.inodes,
        logical_bytes: total,
        dedup_bytes: st.dedup_bytes,
        blocks: blocks.len() as u64,
        image_size: pos,
        hot_blocks: st.hot_blocks as u64,
        hot_missing,
    })
}

struct Meta {
    bytes: Vec<u8>,
    inodes: u64,
}

/// Compress the metadata: one zstd frame when it fits in `1 << frame_log` bytes (readable by
/// readers predating frames), else one frame per `1 << frame_log` bytes, compressed by up to
/// `threads` threads, and the frame log to record (`INCOMPAT_META_FRAMES`). The output does
/// not depend on the thread count.
fn compress_metadata(
    raw: &[u8],
    level: i32,
    frame_log: u8,
    threads: usize,
) -> Result<(Vec<u8>, Option<u8>)> {
    if !(layout::MIN_META_FRAME_LOG..=layout::MAX_META_FRAME_LOG).contains(&frame_log) {
        return Err(Error::Invalid(format!(
            "metadata frame log {frame_log} outside {}..={}",
            layout::MIN_META_FRAME_LOG,
            layout::MAX_META_FRAME_LOG
        )));
    }
    let fail =
        |e: std::io::Error| Error::Invalid(format!("zstd compression of metadata failed: {e}"));
    let frame_len = 1usize << frame_log;
    if raw.len() <= frame_len {
        return Ok((zstd::bulk::compress(raw, level).map_err(fail)?, None));
    }
    let pieces: Vec<&[u8]> = raw.chunks(frame_len).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let done: Mutex<Vec<Option<std::io::Result<Vec<u8>>>>> =
        Mutex::new((0..pieces.len()).map(|_| None).collect());
    let work = || {
        loop {
            let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(piece) = pieces.get(k) else { break };
            let r = zstd::bulk::compress(piece, level);
            done.lock().unwrap_or_else(|p| p.into_inner())[k] = Some(r);
        }
    };
    std::thread::scope(|s| {
        for _ in 1..threads.clamp(1, pieces.len()) {
            if std::thread::Builder::new().spawn_scoped(s, work).is_err() {
                break;
            }
        }
        work();
    });
    let mut out = Vec::new();
    for r in done.into_inner().unwrap_or_else(|p| p.into_inner()) {
        let frame = r
            .ok_or_else(|| Error::Invalid("internal: metadata frame not compressed".into()))?
            .map_err(fail)?;
        out.extend_from_slice(&frame);
    }
    Ok((out, Some(frame_log)))
}

fn build_metadata(
    tree: &Tree,
    opts: &PackOptions,
    order: &[NodeId],
    st: &SeqState,
    blocks: &[Block],
    logical: u64,
) -> Result<Meta> {
    let too_many = |what: &str| Error::Invalid(format!("too many {what} for the format"));
    // Inode numbers in breadth-first order: a directory's children get neighbouring numbers.
    let mut ino_of: Vec<u32> = vec![0; tree.nodes.len()];
    let mut by_ino: Vec<NodeId> = vec![0];
    ino_of[0] = ROOT_INO;
    let mut nlink: Vec<u32> = vec![2];
    let mut q = std::collections::VecDeque::from([0 as NodeId]);
    while let Some(d) = q.pop_front() {
        for &c in &tree.node(d).children {
            let n = tree.node(c);
            let primary = n.link.unwrap_or(c);
            if ino_of[primary as usize] == 0 {
                let ino = u32::try_from(by_ino.len() + 1)
                    .ok()
                    .filter(|&i| i < u32::MAX)
                    .ok_or_else(|| too_many("inodes"))?;
                ino_of[primary as usize] = ino;
                by_ino.push(primary);
                nlink.push(if n.kind == FileKind::Dir { 2 } else { 0 });
            }
            let ino = ino_of[primary as usize];
            if n.kind == FileKind::Dir {
                nlink[ino_of[d as usize] as usize - 1] += 1;
                q.push_back(c);
            } else {
                nlink[ino as usize - 1] += 1;
            }
        }
    }
    let file_pos: HashMap<NodeId, usize> =
        order.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    let mut blob: Vec<u8> = Vec::new();
    let mut put = |bytes: &[u8]| -> u64 {
        let off = blob.len() as u64;
        blob.extend_from_slice(bytes);
        off
    };
    let mut inodes: Vec<Inode> = Vec::with_capacity(by_ino.len());
    let mut dirents: Vec<Dirent> = Vec::new();
    let mut chunks: Vec<Chunk> = Vec::new();
    let mut xattrs: Vec<Xattr> = Vec::new();
    let mut shared: HashMap<&[PChunk], u64> = HashMap::new();
    let resolve = |c: &PChunk| -> Chunk {
        let (block, offset) = match *c {
            PChunk::Block(b) => (b, 0),
            PChunk::Frag(f, off) => (st.frag_block.get(f as usize).copied().unwrap_or(HOLE), off),
            PChunk::Holes(_) => (HOLE, 0),
        };
        Chunk {
            block: U32::new(block),
            offset: U32::new(offset),
        }
    };
    for (i, &id) in by_ino.iter().enumerate() {
        let n = tree.node(id);
        let (mut size, mut first, mut count) = (0u64, 0u64, 0u32);
        match n.kind {
            FileKind::File => {
                size = n.size;
                let (pcs, n_chunks): (&[PChunk], u64) = file_pos
                    .get(&id)
                    .map(|&p| (st.chunks[p].list.as_slice(), st.chunks[p].count))
                    .unwrap_or((&[], 0));
                count = u32::try_from(n_chunks).map_err(|_| too_many("chunks in one file"))?;
                first = match shared.get(pcs) {
                    Some(&f) => f,
                    None => {
                        let f = chunks.len() as u64;
                        for c in pcs {
                            let n = match *c {
                                PChunk::Holes(n) => n as usize,
                                _ => 1,
                            };
                            chunks.extend(std::iter::repeat_n(resolve(c), n));
                        }
                        shared.insert(pcs, f);
                        f
                    }
                };
            }
            FileKind::Dir => {
                first = dirents.len() as u64;
                count = u32::try_from(n.children.len())
                    .map_err(|_| too_many("entries in one directory"))?;
                size = count as u64;
                for &c in &n.children {
                    let cn = tree.node(c);
                    let primary = cn.link.unwrap_or(c);
                    let name_len = u16::try_from(cn.name.len())
                        .ok()
                        .filter(|&l| (1..=255).contains(&l))
                        .ok_or_else(|| {
                            Error::Invalid(format!(
                                "{}: name longer than 255 bytes",
                                String::from_utf8_lossy(&tree.path_of(c))
                            ))
                        })?;
                    dirents.push(Dirent {
                        name_offset: U64::new(put(&cn.name)),
                        inode: U32::new(ino_of[primary as usize]),
                        name_len: U16::new(name_len),
                        kind: tree.node(primary).kind as u8,
                        reserved: 0,
                    });
                }
            }
            FileKind::Symlink => {
                first = put(&n.target);
                count = u32::try_from(n.target.len()).map_err(|_| too_many("symlink bytes"))?;
                size = count as u64;
            }
            FileKind::CharDev | FileKind::BlockDev => first = n.rdev,
            FileKind::Fifo | FileKind::Socket => {}
        }
        let xattr_first = xattrs.len() as u64;
        for (k, v) in &n.xattrs {
            if k.is_empty() || k.len() > 255 || v.len() > 65536 {
                return Err(Error::Invalid(format!(
                    "{}: xattr {} too large for the format",
                    String::from_utf8_lossy(&tree.path_of(id)),
                    String::from_utf8_lossy(k)
                )));
            }
            xattrs.push(Xattr {
                key_offset: U64::new(put(k)),
                value_offset: U64::new(put(v)),
                key_len: U32::new(k.len() as u32),
                value_len: U32::new(v.len() as u32),
            });
        }
        let parent = if n.kind == FileKind::Dir {
            ino_of[n.parent as usize]
        } else {
            0
        };
        let (uid, gid) = if opts.root_owned {
            (0, 0)
        } else {
            (n.uid, n.gid)
        };
        inodes.push(Inode {
            mode: U32::new(n.kind.mode_bits() | (n.perm & 0o7777)),
            uid: U32::new(uid),
            gid: U32::new(gid),
            nlink: U32::new(nlink[i]),
            mtime_sec: I64::new(n.mtime_sec),
            mtime_nsec: U32::new(n.mtime_nsec),
            parent: U32::new(parent),
            size: U64::new(size),
            first: U64::new(first),
            count: U32::new(count),
            xattr_count: U32::new(n.xattrs.len() as u32),
            xattr_first: U64::new(xattr_first),
        });
    }
    let config = match &opts.config {
        Some(c) => Table {
            offset: U64::new(put(c)),
            count: U64::new(c.len() as u64),
        },
        None => Table::default(),
    };
    let mut bytes = vec![0u8; size_of::<MetaHeader>()];
    let mut place = |data: &[u8], count: usize| -> Table {
        while !bytes.len().is_multiple_of(8) {
            bytes.push(0);
        }
        let t = Table {
            offset: U64::new(bytes.len() as u64),
            count: U64::new(count as u64),
        };
        bytes.extend_from_slice(data);
        t
    };
    let hdr = MetaHeader {
        inodes: place(inodes.as_bytes(), inodes.len()),
        dirents: place(dirents.as_bytes(), dirents.len()),
        chunks: place(chunks.as_bytes(), chunks.len()),
        blocks: place(blocks.as_bytes(), blocks.len()),
        xattrs: place(xattrs.as_bytes(), xattrs.len()),
        blob: place(&blob, blob.len()),
        config,
        logical_bytes: U64::new(logical),
        dedup_bytes: U64::new(st.dedup_bytes),
    };
    bytes[..size_of::<MetaHeader>()].copy_from_slice(hdr.as_bytes());
    Ok(Meta {
        bytes,
        inodes: inodes.len() as u64,
    })
}
