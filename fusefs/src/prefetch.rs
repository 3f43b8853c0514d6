//! Decompressing ahead of the readers, on the workers' prefetch queue or a thread of its
//! own: sequential read-ahead (a read that starts where the previous read of the same inode
//! ended queues the next [`PREFETCH_BLOCKS`] blocks of the file), image-order read-ahead
//! ([`Inner::read_ahead`]), the exec prefetch (the blocks of the files a start of the
//! program reads, [`crate::exec`]), the hot-list prefetch (the image's hot blocks, at mount,
//! in the idle scheduling class), and the check that skips the optional ones when no core is
//! to spare ([`cpu_busy`]). The workers take reads first and prefetches when idle; a read
//! never waits for a prefetch (it loads the block itself).

use crate::fs::{CimgFs, Inner};
use crossbeam_channel::Sender;
use std::sync::atomic::Ordering;

/// Blocks queued ahead of a sequential reader (2 MiB at 128 KiB blocks: enough to keep the
/// workers decompressing while the kernel asks for the next 128 KiB). Deeper decompresses
/// more blocks that a reader who stops early never reads; shallower lets the workers run dry
/// between READs. Not sensitive between 4 and 16 (`fuse-bench`'s big file, `docs/perf.md`).
pub const PREFETCH_BLOCKS: usize = 16;

/// Queue length of the prefetch workers; prefetches beyond it are dropped.
pub(crate) const PREFETCH_QUEUE: usize = 256;

/// Inodes remembered per shard for sequential-read detection before the shard is cleared.
const SEQ_MAX: usize = 4096;
pub(crate) const SEQ_SHARDS: usize = 16;

/// Slots of [`Inner::recent`].
pub(crate) const RECENT: usize = 16;

impl Inner {
    /// Image-order read-ahead: files read in the order they are laid out (a tree read in
    /// directory order, small files sharing blocks) read the image's blocks in index order
    /// without any one file being read sequentially. When block `idx` is read and block
    /// `idx - 1` or `idx - 2` was read just before, the next [`PREFETCH_BLOCKS`] blocks go to
    /// the prefetch queue: on a miss of `idx`, and on every eighth block when it hits (the
    /// window moves along without checking it on every read). Random reads cost two atomic
    /// loads and a store.
    pub(crate) fn read_ahead(&self, idx: u32, miss: bool) {
        let slot = |b: u32| &self.recent[b as usize % RECENT];
        let follows = [1, 2].iter().any(|&d| {
            idx.checked_sub(d)
                .is_some_and(|p| slot(p).load(Ordering::Relaxed) == p)
        });
        slot(idx).store(idx, Ordering::Relaxed);
        if !follows || !(miss || idx.is_multiple_of(8)) {
            return;
        }
        let Some(tx) = self.prefetch.get() else {
            return;
        };
        let end = idx
            .saturating_add(PREFETCH_BLOCKS as u32)
            .min(self.img.block_count().saturating_sub(1));
        for b in idx.saturating_add(1)..=end {
            if !self.cache.contains(b) && tx.try_send(b).is_err() {
                return;
            }
        }
    }
}

/// Decompress ahead, on the workers, the blocks of the files a start of `hint`'s program
/// reads ([`crate::exec::exec_files`]), at most `budget` bytes of them. The parts the search
/// looks inside are read here through the cache ([`Inner::read`]: a block a worker or a
/// reader is already loading is waited for, not loaded twice).
pub(crate) fn prefetch_exec(
    inner: &Inner,
    hint: &crate::exec::ExecHint,
    tx: &Sender<u32>,
    budget: u64,
) {
    let mut left = budget;
    crate::exec::exec_files(
        &inner.img,
        hint,
        |ino, _, ranges| {
            let Ok(extents) = inner.img.extents(ino) else {
                return;
            };
            let mut last = None;
            for e in extents {
                let (start, end) = (e.file_offset, e.file_offset + u64::from(e.len));
                let Some(b) = e.block else { continue };
                if last == Some(b) || !ranges.iter().any(|r| r.start < end && start < r.end) {
                    continue;
                }
                last = Some(b);
                let charge = u64::from(inner.blksize);
                if inner.cache.contains(b) {
                    continue;
                }
                if charge > left {
                    return;
                }
                left -= charge;
                // Blocking: the workers take reads first; a full queue waits for them.
                if tx.send(b).is_err() {
                    return;
                }
            }
        },
        |ino, _, range| {
            let mut bytes = None;
            let len = u32::try_from(range.end - range.start).ok()?;
            inner
                .read(ino, range.start, len, |d| bytes = Some(d.to_vec()))
                .ok()?;
            bytes
        },
    );
}

/// Read the hot blocks' stored range in 4 MiB pieces and decompress each piece's blocks from
/// the bytes read (verified like any other), up to half the cache, on this thread in the
/// idle scheduling class: it uses the CPU the container leaves idle (while launch sets up,
/// while the application waits on I/O) instead of competing with it; a read of a block it is
/// still decompressing does not wait for it ([`BlockCache::prefetch`]). It yields after each
/// block: even in the idle class, a thread that keeps its core makes a woken task of the
/// container wait behind it for milliseconds, and yielding after each block removes most of
/// that delay for the cost of a system call per block (`launch-bench` with a hot list; the
/// scheduler trace and A/B figures are in `docs/perf.md`).
///
/// [`BlockCache::prefetch`]: crate::cache::BlockCache::prefetch
pub(crate) fn prefetch_hot(inner: &Inner, hot: u64) {
    const CHUNK: u64 = 4 << 20;
    // Best effort: without it the prefetch runs at the normal priority.
    let _ = thread_priority::set_thread_priority_and_policy(
        thread_priority::thread_native_id(),
        thread_priority::ThreadPriority::Min,
        thread_priority::ThreadSchedulePolicy::Normal(
            thread_priority::NormalThreadSchedulePolicy::Idle,
        ),
    );
    let budget = inner.cache.capacity() / 2;
    let n = u32::try_from(hot)
        .unwrap_or(u32::MAX)
        .min(inner.img.block_count());
    let mut buf = Vec::new();
    let mut raw_total = 0u64;
    let mut idx = 0u32;
    while idx < n {
        let Ok((start, _, _)) = inner.img.block_info(idx) else {
            return;
        };
        let mut end = start;
        let first = idx;
        while idx < n {
            let Ok((off, stored, raw)) = inner.img.block_info(idx) else {
                return;
            };
            if off != end || (idx > first && off + stored as u64 - start > CHUNK) {
                break;
            }
            if raw_total + raw as u64 > budget {
                break;
            }
            raw_total += raw as u64;
            end = off + stored as u64;
            idx += 1;
        }
        if idx == first {
            return; // budget reached or a non-contiguous table: stop quietly
        }
        buf.resize((end - start) as usize, 0);
        if inner.img.read_raw(start, &mut buf).is_err() {
            return;
        }
        for b in first..idx {
            let Ok((off, stored, _)) = inner.img.block_info(b) else {
                return;
            };
            let at = (off - start) as usize;
            let Some(bytes) = buf.get(at..at + stored as usize) else {
                return;
            };
            // Errors are reported to the reader that needs the block (it reads it again).
            // A block this loaded pushes its registered tails, as a read's load does.
            if let Ok(true) = inner.cache.prefetch(b, || inner.load_from(b, bytes))
                && let Some(data) = inner.cache.get(b)
            {
                inner.push_tails(b, &data, None);
            }
            std::thread::yield_now();
        }
    }
}

impl CimgFs {
    /// Record a read of `ino` at `offset..end`; whether it continues the previous one.
    pub(crate) fn sequential(&self, ino: u32, offset: u64, end: u64) -> bool {
        let mut m = self.seq[ino as usize % SEQ_SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if m.len() >= SEQ_MAX {
            m.clear();
        }
        m.insert(ino, end) == Some(offset)
    }

    /// Queue the blocks after `from` in `ino` that are not cached yet.
    pub(crate) fn prefetch_after(&self, ino: u32, from: u64) {
        let Some(tx) = &self.tx else { return };
        let mut pos = from;
        for _ in 0..PREFETCH_BLOCKS {
            let Ok(Some(ext)) = self.inner.img.extent_at(ino, pos) else {
                return;
            };
            if let Some(b) = ext.block
                && !self.inner.cache.contains(b)
                && tx.try_send(b).is_err()
            {
                return;
            }
            pos = ext.file_offset + ext.len as u64;
        }
    }
}

/// Whether more tasks are runnable than twice the cores plus two (`/proc/loadavg`'s running
/// count; the margin leaves room for one start's own tasks): decompressing ahead pays only
/// with a core to spare, and when many containers start at once on one node, every server
/// prefetching takes the cores from the applications (`join-bench`; figures in
/// `docs/perf.md`).
pub fn cpu_busy() -> bool {
    let cores = crate::cores();
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| {
            let running = l.split_whitespace().nth(3)?.split('/').next()?;
            running.parse::<usize>().ok()
        })
        .is_some_and(|r| r > 2 * cores + 2)
}
