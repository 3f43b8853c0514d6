//! Page-cache pushes (FUSE_NOTIFY_STORE): a block loaded for the first time gives the kernel
//! the rest of the requested file's bytes in it, and the small files and tails in it of the
//! other files the kernel has looked up or listed ([`Tails`]), which are then read without
//! asking the daemon. The pushes run on a thread of their own ([`store_loop`]), never on the
//! threads that answer reads.

use crate::cache::Block;
use crate::fs::Inner;
use cimg_format::{Attr, FileKind};
use crossbeam_channel::Receiver;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Shards of [`Tails::by_block`].
const TAIL_SHARDS: usize = 16;

/// The small files and file tails (chunks shorter than a block, which share fragment blocks,
/// FORMAT.md §9) of regular files the kernel holds an inode for (answered by LOOKUP or
/// READDIRPLUS), indexed by their block. When such a block is loaded, every tail in it is
/// pushed into the kernel's page cache ([`StoreJob`]), so a later read of those files is
/// answered by the kernel without a FUSE round trip: reading a tree of small files, most
/// files cost no READ at all. (The kernel's squashfs keeps a decompressed fragment block in
/// its fragment cache for the same reason.) A store needs the kernel's inode, hence only
/// files it was told about; each inode is registered once, and each registration is pushed
/// at most once. The registrations waiting for their block are bounded (by a 32nd of the
/// block cache's size, [`Tails::new`]): a walk of millions of files that reads none of them
/// does not grow the daemon without bound; files listed past the bound are read as usual.
/// With `--record-hot` nothing is registered: a pushed file's first read would not reach the
/// server, and the hot list would miss it.
pub(crate) struct Tails {
    /// One bit per inode: registered.
    known: Box<[AtomicU64]>,
    by_block: Box<[Mutex<TailMap>]>,
    /// Registrations waiting for their block, and the most allowed.
    pending: AtomicUsize,
    max_pending: usize,
}

/// Registered tails by block index.
type TailMap = HashMap<u32, Vec<Tail>>;

/// Bytes of one file inside a decompressed block, to push into the kernel's page cache.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tail {
    pub(crate) ino: u32,
    /// Where they go in the file (a multiple of the block size).
    pub(crate) file_offset: u64,
    /// Where they are in the block.
    pub(crate) start: u32,
    pub(crate) len: u32,
}

impl Tails {
    /// For `inodes` inodes, and a block cache of `cache_size` bytes: at most a 32nd of it in
    /// waiting registrations (8 MiB, some 260,000 files, with the default 256 MiB cache).
    pub(crate) fn new(inodes: u32, cache_size: u64) -> Self {
        let per = std::mem::size_of::<Tail>() + 8; // the record, and the map's share of it
        Tails {
            pending: AtomicUsize::new(0),
            max_pending: usize::try_from(cache_size / 32).unwrap_or(usize::MAX) / per,
            known: (0..inodes as usize / 64 + 1)
                .map(|_| AtomicU64::new(0))
                .collect(),
            by_block: (0..TAIL_SHARDS)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
        }
    }

    fn shard(&self, block: u32) -> std::sync::MutexGuard<'_, TailMap> {
        self.by_block[block as usize % TAIL_SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Mark `ino` registered; false if it already was.
    fn first(&self, ino: u32) -> bool {
        let bit = 1u64 << (ino % 64);
        self.known
            .get(ino as usize / 64)
            .is_some_and(|w| w.fetch_or(bit, Ordering::Relaxed) & bit == 0)
    }
}

/// Parts of a freshly decompressed block to push into the kernel's page cache with
/// FUSE_NOTIFY_STORE: the rest of the block for the file that asked for part of it, as the
/// kernel's own squashfs fills the page cache with a whole block on the first read of any
/// page of it (later small reads of that block, random 4 KiB reads say, are then answered by
/// the kernel without a FUSE round trip), and the other files' tails in it (`Tails`).
/// Sent to a thread of its own: a store can wait on a page that an in-flight read holds
/// locked, and must never hold up the threads that answer reads.
pub struct StoreJob {
    pub(crate) block: Arc<Block>,
    pub(crate) parts: Vec<Tail>,
}

/// Push [`StoreJob`]s into the kernel's page cache until the filesystem is dropped.
pub fn store_loop(notifier: &fuser::Notifier, jobs: &Receiver<StoreJob>) {
    for j in jobs {
        for t in &j.parts {
            let (start, len) = (t.start as usize, t.len as usize);
            if let Some(data) = j.block.get(start..start + len) {
                // A failure (inode evicted meanwhile, old kernel) only costs the optimisation.
                let _ = notifier.store(fuser::INodeNo(t.ino as u64), t.file_offset, data);
            }
        }
    }
}

impl Inner {
    /// Register the tail of regular file `a` (see [`Tails`]) if the filesystem pushes into
    /// the page cache; pushed now if its block is cached, else when the block is loaded.
    pub(crate) fn note_file(&self, a: &Attr) {
        if a.kind != FileKind::File || a.size == 0 || self.store.get().is_none() {
            return;
        }
        if self.tails.pending.load(Ordering::Relaxed) >= self.tails.max_pending
            || !self.tails.first(a.ino)
        {
            return;
        }
        let bs = self.img.block_size();
        let last = (a.size - 1) & !(u64::from(bs) - 1);
        let Ok(Some(ext)) = self.img.extent_at(a.ino, last) else {
            return;
        };
        let Some(b) = ext.block else {
            return;
        };
        if ext.len >= bs {
            // A full block of its own: a read of it pushes the rest (see `read`).
            return;
        }
        self.tails.pending.fetch_add(1, Ordering::Relaxed);
        self.tails.shard(b).entry(b).or_default().push(Tail {
            ino: a.ino,
            file_offset: ext.file_offset,
            start: ext.block_offset,
            len: ext.len,
        });
        // The loader of `b` takes the list after the block is ready, so a tail registered
        // while `b` loads is pushed by one of the two.
        if let Some(data) = self.cache.get(b) {
            self.push_tails(b, &data, None);
        }
    }

    /// Push the registered tails in block `idx` (`data`), except `skip`'s.
    pub(crate) fn push_tails(&self, idx: u32, data: &Arc<Block>, skip: Option<u32>) {
        let Some(tx) = self.store.get() else {
            return;
        };
        let Some(mut parts) = self.tails.shard(idx).remove(&idx) else {
            return;
        };
        self.tails.pending.fetch_sub(parts.len(), Ordering::Relaxed);
        parts.retain(|t| Some(t.ino) != skip);
        if !parts.is_empty() {
            let _ = tx.try_send(StoreJob {
                block: data.clone(),
                parts,
            });
        }
    }
}
