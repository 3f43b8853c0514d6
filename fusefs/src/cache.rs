//! The decompressed-block cache: bounded in bytes, sharded, page-aligned buffers, and
//! coalescing.
//!
//! - **Bounded**: every shard holds at most `capacity / shards` bytes (each block charged its
//!   length rounded up to whole pages); the least recently used blocks go first. A block larger
//!   than a shard's budget is handed to its readers but not kept.
//! - **Sharded**: block `i` lives in shard `i % shards`, so consecutive blocks (a sequential
//!   read, a prefetch) spread over all locks. A lock is held only for map updates, never while
//!   reading or decompressing.
//! - **Page-aligned**: each block is an anonymous mapping ([`memmap2::MmapMut::map_anon`]);
//!   evicting it returns the memory to the system at once, so the daemon's RSS follows the
//!   cache bound rather than the allocator's high-water mark. A few evicted mappings (at most
//!   8 MiB) are kept and reused by [`BlockCache::alloc`], saving an `mmap`/`munmap` pair per
//!   miss; evictions unmap outside the shard lock.
//! - **Coalescing**: the first reader of a missing block marks it as loading and decompresses
//!   it outside the lock; concurrent readers of the same block wait on the shard's condition
//!   variable for that one result. If the load fails (or panics) the mark is removed and the
//!   waiters try themselves, so an error is never cached.

use memmap2::MmapMut;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Bytes of a page; blocks are charged in whole pages.
pub const PAGE: usize = 4096;

/// Default number of shards.
pub const DEFAULT_SHARDS: usize = 16;

/// Evicted mappings kept for reuse: at most this many, and this many bytes.
const SPARE_MAX: usize = 32;
const SPARE_BYTES: usize = 8 << 20;

/// One decompressed block in its own page-aligned anonymous mapping.
pub struct Block {
    map: MmapMut,
    len: usize,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block").field("len", &self.len).finish()
    }
}

impl Block {
    /// A zero-filled block of `len` bytes.
    pub fn new(len: usize) -> io::Result<Self> {
        // An empty mapping is not allowed; map one page and expose none of it. The pages are
        // populated up front: the block is about to be written whole, and one `mmap` with
        // `MAP_POPULATE` is cheaper than a page fault per page.
        let map = memmap2::MmapOptions::new()
            .len(len.max(1).div_ceil(PAGE) * PAGE)
            .populate()
            .map_anon()?;
        Ok(Block { map, len })
    }

    /// The block's bytes, for filling.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.map[..self.len]
    }

    /// Bytes charged against the cache bound: the length rounded up to whole pages.
    pub fn charge(&self) -> usize {
        self.len.max(1).div_ceil(PAGE) * PAGE
    }
}

impl Deref for Block {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map[..self.len]
    }
}

enum Slot {
    /// Present; `tick` is its key in the shard's LRU order.
    Ready { data: Arc<Block>, tick: u64 },
    /// Being loaded by some thread; wait on the shard's condition variable.
    Loading,
    /// Being loaded by a background prefetch ([`BlockCache::prefetch`]): nobody waits for
    /// it (the prefetcher may run at a low priority); a reader loads the block itself.
    Prefetching,
}

#[derive(Default)]
struct State {
    map: HashMap<u32, Slot>,
    /// Ready blocks by last use, oldest first.
    lru: BTreeMap<u64, u32>,
    bytes: usize,
    tick: u64,
}

impl State {
    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// The block `id` if ready, marked as just used.
    fn hit(&mut self, id: u32) -> Option<Arc<Block>> {
        let t = self.next_tick();
        match self.map.get_mut(&id) {
            Some(Slot::Ready { data, tick }) => {
                self.lru.remove(tick);
                *tick = t;
                self.lru.insert(t, id);
                Some(data.clone())
            }
            _ => None,
        }
    }
}

struct Shard {
    state: Mutex<State>,
    ready: Condvar,
}

impl Shard {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the maps consistent (no invariant spans two
        // statements that can panic), so poisoning is ignored.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Counters, for statistics and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Loads performed (successful or not).
    pub loads: u64,
    /// Lookups that waited for another thread's load.
    pub waits: u64,
}

/// The sharded, bounded, coalescing cache of decompressed blocks, keyed by block index.
pub struct BlockCache {
    shards: Box<[Shard]>,
    shard_budget: usize,
    /// Mappings of evicted blocks that no reader held, for reuse by [`BlockCache::alloc`]
    /// (saves an `mmap`/`munmap` pair per miss, and the latter's TLB shootdown).
    spare: Mutex<Vec<MmapMut>>,
    hits: AtomicU64,
    loads: AtomicU64,
    waits: AtomicU64,
}

impl std::fmt::Debug for BlockCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockCache")
            .field("shards", &self.shards.len())
            .field("shard_budget", &self.shard_budget)
            .field("bytes", &self.bytes())
            .finish()
    }
}

/// Clears a block's loading mark (and wakes its waiters) unless disarmed: on an error or a
/// panic in the loader.
struct LoadingGuard<'a> {
    shard: &'a Shard,
    id: u32,
    armed: bool,
}

impl Drop for LoadingGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut st = self.shard.lock();
            if matches!(st.map.get(&self.id), Some(Slot::Loading)) {
                st.map.remove(&self.id);
            }
            drop(st);
            self.shard.ready.notify_all();
        }
    }
}

impl BlockCache {
    /// A cache of at most `capacity` bytes in [`DEFAULT_SHARDS`] shards.
    pub fn new(capacity: u64) -> Self {
        Self::with_shards(capacity, DEFAULT_SHARDS)
    }

    /// A cache of at most `capacity` bytes in `shards` shards (at least one).
    pub fn with_shards(capacity: u64, shards: usize) -> Self {
        let shards = shards.max(1);
        let budget = usize::try_from(capacity / shards as u64).unwrap_or(usize::MAX);
        BlockCache {
            shards: (0..shards)
                .map(|_| Shard {
                    state: Mutex::new(State::default()),
                    ready: Condvar::new(),
                })
                .collect(),
            shard_budget: budget,
            spare: Mutex::new(Vec::new()),
            hits: AtomicU64::new(0),
            loads: AtomicU64::new(0),
            waits: AtomicU64::new(0),
        }
    }

    fn shard(&self, id: u32) -> &Shard {
        &self.shards[id as usize % self.shards.len()]
    }

    /// The capacity in bytes (the sum of the shard budgets).
    pub fn capacity(&self) -> u64 {
        self.shard_budget as u64 * self.shards.len() as u64
    }

    /// Bytes currently charged.
    pub fn bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.lock().bytes as u64).sum()
    }

    /// Number of blocks held.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().lru.len()).sum()
    }

    /// Whether the cache holds no block.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        Stats {
            hits: self.hits.load(Ordering::Relaxed),
            loads: self.loads.load(Ordering::Relaxed),
            waits: self.waits.load(Ordering::Relaxed),
        }
    }

    /// Whether block `id` is present or being loaded (does not count as a use).
    pub fn contains(&self, id: u32) -> bool {
        self.shard(id).lock().map.contains_key(&id)
    }

    /// Whether block `id` is present and loaded (does not count as a use).
    pub fn is_ready(&self, id: u32) -> bool {
        matches!(self.shard(id).lock().map.get(&id), Some(Slot::Ready { .. }))
    }

    /// Block `id` if present, marked as just used.
    pub fn get(&self, id: u32) -> Option<Arc<Block>> {
        let r = self.shard(id).lock().hit(id);
        if r.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Block `id`, from the cache or by calling `load` (outside any lock). Concurrent callers
    /// for the same block wait for one load; a failed load is not cached.
    pub fn get_or_load<E>(
        &self,
        id: u32,
        load: impl FnOnce() -> Result<Block, E>,
    ) -> Result<Arc<Block>, E> {
        let shard = self.shard(id);
        let mut st = shard.lock();
        let mut waited = false;
        loop {
            if let Some(data) = st.hit(id) {
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(data);
            }
            if matches!(st.map.get(&id), Some(Slot::Loading)) {
                // (A `Prefetching` block is loaded again here rather than waited for.)
                if !waited {
                    self.waits.fetch_add(1, Ordering::Relaxed);
                    waited = true;
                }
                st = shard.ready.wait(st).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            break;
        }
        st.map.insert(id, Slot::Loading);
        drop(st);
        self.loads.fetch_add(1, Ordering::Relaxed);

        let mut guard = LoadingGuard {
            shard,
            id,
            armed: true,
        };
        let block = load()?; // the guard clears the mark on error
        let data = Arc::new(block);
        guard.armed = false;
        self.insert(shard, id, data.clone());
        Ok(data)
    }

    /// Load block `id` in the background unless it is present or being loaded: readers that
    /// ask for it meanwhile do not wait for this load (they load it themselves, and their
    /// copy wins), so a prefetcher at a low priority never holds a reader up. Returns whether
    /// this call loaded the block.
    pub fn prefetch<E>(&self, id: u32, load: impl FnOnce() -> Result<Block, E>) -> Result<bool, E> {
        let shard = self.shard(id);
        {
            let mut st = shard.lock();
            if st.map.contains_key(&id) {
                return Ok(false);
            }
            st.map.insert(id, Slot::Prefetching);
        }
        self.loads.fetch_add(1, Ordering::Relaxed);
        let block = match load() {
            Ok(b) => b,
            Err(e) => {
                let mut st = shard.lock();
                if matches!(st.map.get(&id), Some(Slot::Prefetching)) {
                    st.map.remove(&id);
                }
                return Err(e);
            }
        };
        let st = shard.lock();
        if !matches!(st.map.get(&id), Some(Slot::Prefetching)) {
            // A reader loaded it meanwhile (or is loading it): keep theirs.
            drop(st);
            self.recycle(block);
            return Ok(false);
        }
        drop(st);
        self.insert(shard, id, Arc::new(block));
        Ok(true)
    }

    /// Make `data` block `id`'s ready copy, evicting the least recently used blocks beyond
    /// the shard's budget, and wake the block's waiters.
    fn insert(&self, shard: &Shard, id: u32, data: Arc<Block>) {
        let charge = data.charge();
        let mut victims = Vec::new();
        let mut st = shard.lock();
        if charge <= self.shard_budget {
            if let Some(Slot::Ready { tick, .. }) = st.map.get(&id) {
                let old = *tick;
                st.lru.remove(&old);
                if let Some(Slot::Ready { data, .. }) = st.map.remove(&id) {
                    st.bytes -= data.charge();
                }
            }
            let tick = st.next_tick();
            st.map.insert(id, Slot::Ready { data, tick });
            st.lru.insert(tick, id);
            st.bytes += charge;
            while st.bytes > self.shard_budget {
                let Some((_, victim)) = st.lru.pop_first() else {
                    break;
                };
                if let Some(Slot::Ready { data, .. }) = st.map.remove(&victim) {
                    st.bytes -= data.charge();
                    victims.push(data);
                }
            }
        } else {
            st.map.remove(&id);
        }
        drop(st);
        shard.ready.notify_all();
        // Outside the shard lock: keep a few evicted mappings for reuse, unmap the rest.
        for v in victims {
            if let Ok(b) = Arc::try_unwrap(v) {
                self.recycle(b);
            }
        }
    }

    /// A block of `len` bytes for a load: a recycled mapping of the same size if there is
    /// one (its old contents remain: the loader overwrites all `len` bytes), else a new one.
    pub fn alloc(&self, len: usize) -> io::Result<Block> {
        let size = len.max(1).div_ceil(PAGE) * PAGE;
        {
            let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = spare.iter().position(|m| m.len() == size) {
                let map = spare.swap_remove(i);
                return Ok(Block { map, len });
            }
        }
        Block::new(len)
    }

    /// Drop every ready block and every spare mapping, giving their memory back to the
    /// system (a reader holding a block keeps it until done). Blocks being loaded are left
    /// to their loaders. For a server gone idle: the kernel's page cache keeps the data it
    /// read, and what it evicts is decompressed again on demand.
    pub fn clear(&self) {
        for shard in self.shards.iter() {
            let mut st = shard.lock();
            let ready: Vec<u32> = st.lru.values().copied().collect();
            for id in ready {
                st.map.remove(&id);
            }
            st.lru.clear();
            st.bytes = 0;
        }
        self.spare.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    fn recycle(&self, b: Block) {
        let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        let held: usize = spare.iter().map(|m| m.len()).sum();
        if spare.len() < SPARE_MAX && held + b.map.len() <= SPARE_BYTES {
            spare.push(b.map);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    fn block(len: usize, fill: u8) -> Block {
        let mut b = Block::new(len).expect("map_anon");
        b.as_mut_slice().fill(fill);
        b
    }

    fn ok(len: usize, fill: u8) -> impl FnOnce() -> Result<Block, ()> {
        move || Ok(block(len, fill))
    }

    #[test]
    fn block_is_page_aligned_and_sized() {
        let b = block(5000, 7);
        assert_eq!(b.len(), 5000);
        assert_eq!(b.as_ptr() as usize % PAGE, 0);
        assert_eq!(b.charge(), 2 * PAGE);
        assert!(b.iter().all(|&x| x == 7));
        let e = Block::new(0).expect("empty");
        assert!(e.is_empty());
        assert_eq!(e.charge(), PAGE);
    }

    #[test]
    fn bound_holds() {
        let cap = 64 * PAGE as u64;
        let c = BlockCache::with_shards(cap, 4);
        for id in 0..1000u32 {
            let len = 1 + (id as usize * 7919) % (3 * PAGE);
            let b = c.get_or_load(id, ok(len, id as u8)).expect("load");
            assert_eq!(b.len(), len);
            assert!(c.bytes() <= cap, "{} > {cap}", c.bytes());
        }
        assert!(c.len() > 4);
        // A block over a shard's budget is returned but not kept.
        let big = c
            .get_or_load(5000, ok(20 * PAGE, 1))
            .expect("big block load");
        assert_eq!(big.len(), 20 * PAGE);
        assert!(!c.contains(5000));
        assert!(c.bytes() <= cap);
    }

    #[test]
    fn clear_drops_every_ready_block() {
        let c = BlockCache::with_shards(8 * PAGE as u64, 2);
        for id in 1..=4 {
            c.get_or_load(id, ok(PAGE, id as u8)).expect("load");
        }
        let held = c.get(1).expect("cached");
        c.clear();
        assert_eq!((c.len(), c.bytes()), (0, 0));
        assert!(c.get(2).is_none());
        assert_eq!(held[0], 1, "a held block stays readable");
        c.get_or_load(2, ok(PAGE, 9)).expect("reload");
        assert_eq!(c.get(2).expect("reloaded")[0], 9);
    }

    #[test]
    fn evicts_least_recently_used() {
        let c = BlockCache::with_shards(3 * PAGE as u64, 1);
        for id in 1..=3 {
            c.get_or_load(id, ok(PAGE, id as u8)).expect("load");
        }
        assert!(c.get(1).is_some()); // 2 is now the oldest
        c.get_or_load(4, ok(PAGE, 4)).expect("load");
        assert!(c.contains(1) && !c.contains(2) && c.contains(3) && c.contains(4));
        assert_eq!(c.len(), 3);
        assert_eq!(c.bytes(), 3 * PAGE as u64);
        // A hit does not call the loader.
        let b = c
            .get_or_load(3, || -> Result<Block, ()> {
                panic!("loaded a cached block")
            })
            .expect("hit");
        assert_eq!(b[0], 3);
        // Evicted blocks stay valid for readers holding them.
        let held = c.get(4).expect("present");
        for id in 10..20 {
            c.get_or_load(id, ok(PAGE, 0)).expect("load");
        }
        assert!(!c.contains(4));
        assert_eq!(held[PAGE - 1], 4);
    }

    #[test]
    fn evicted_mappings_are_reused() {
        let c = BlockCache::with_shards(2 * PAGE as u64, 1);
        for id in 0..2 {
            c.get_or_load(id, ok(PAGE, 1)).expect("load");
        }
        let held = c.get(0).expect("present");
        c.get_or_load(2, ok(PAGE, 2)).expect("load"); // evicts 0, still held: not reused
        c.get_or_load(3, ok(PAGE, 3)).expect("load"); // evicts 1: recycled
        let old = c.get(3).expect("present").as_ptr();
        let b = c.alloc(PAGE - 10).expect("alloc");
        assert_eq!(b.len(), PAGE - 10);
        assert_eq!(b[0], 1, "a recycled mapping keeps its old bytes");
        assert_ne!(b.as_ptr(), old);
        assert_ne!(b.as_ptr(), held.as_ptr());
        // No spare of another size: a fresh, zeroed mapping.
        let z = c.alloc(3 * PAGE).expect("alloc");
        assert!(z.iter().all(|&x| x == 0));
        assert_eq!(held[0], 1);
    }

    #[test]
    fn concurrent_readers_coalesce() {
        let c = Arc::new(BlockCache::new(1 << 20));
        let calls = Arc::new(AtomicUsize::new(0));
        let start = Arc::new(Barrier::new(16));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (c, calls, start) = (c.clone(), calls.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    let b = c
                        .get_or_load(42, || -> Result<Block, ()> {
                            calls.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(100));
                            Ok(block(PAGE, 9))
                        })
                        .expect("load");
                    assert_eq!(b[0], 9);
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let s = c.stats();
        assert_eq!(s.loads, 1);
        assert_eq!(s.hits + s.loads, 16);
        assert!(s.waits >= 1);
    }

    #[test]
    fn errors_are_not_cached_and_waiters_retry() {
        let c = Arc::new(BlockCache::new(1 << 20));
        assert_eq!(
            c.get_or_load(7, || Err::<Block, _>("bad")).unwrap_err(),
            "bad"
        );
        assert!(!c.contains(7));
        // A waiter behind a failing load retries with its own loader.
        let c2 = c.clone();
        let failing = std::thread::spawn(move || {
            c2.get_or_load(8, || {
                std::thread::sleep(Duration::from_millis(100));
                Err::<Block, _>("bad")
            })
        });
        std::thread::sleep(Duration::from_millis(20));
        let b = c.get_or_load(8, ok(10, 3)).expect("retry succeeds");
        assert_eq!(&b[..], &[3; 10]);
        assert!(failing.join().expect("thread").is_err());
        // A panicking loader clears its mark too.
        let c3 = c.clone();
        let r = std::thread::spawn(move || {
            c3.get_or_load(9, || -> Result<Block, ()> { panic!("loader panics") })
        })
        .join();
        assert!(r.is_err());
        assert!(!c.contains(9));
        assert!(c.get_or_load(9, ok(1, 1)).is_ok());
    }

    #[test]
    fn readers_do_not_wait_for_a_prefetch() {
        let c = Arc::new(BlockCache::new(1 << 20));
        // A prefetch of block 5 that cannot finish until the reader below has its block.
        let (started, go) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
        let t = {
            let (c, started, go) = (c.clone(), started.clone(), go.clone());
            std::thread::spawn(move || {
                c.prefetch(5, || {
                    started.wait();
                    go.wait();
                    Ok::<_, ()>(block(PAGE, 1))
                })
            })
        };
        started.wait();
        assert!(c.contains(5) && !c.is_ready(5));
        // The reader loads the block itself instead of waiting (this would deadlock if it
        // waited: the prefetch finishes only after it).
        let got = c.get_or_load(5, ok(PAGE, 2)).unwrap();
        assert_eq!(got[0], 2);
        go.wait();
        // The prefetch's copy is dropped: the reader's stays.
        assert_eq!(t.join().unwrap(), Ok(false));
        assert_eq!(c.get(5).unwrap()[0], 2);
        assert_eq!(c.bytes(), PAGE as u64);
        // A prefetch of a present block does nothing; of an absent one, loads it.
        assert_eq!(c.prefetch(5, ok(PAGE, 3)), Ok(false));
        assert_eq!(c.prefetch(6, ok(PAGE, 4)), Ok(true));
        assert_eq!(c.get(6).unwrap()[0], 4);
        // A failed prefetch leaves nothing behind.
        assert_eq!(c.prefetch(7, || Err::<Block, _>("bad")), Err("bad"));
        assert!(!c.contains(7));
        assert_eq!(c.get_or_load(7, ok(PAGE, 5)).unwrap()[0], 5);
    }
}
