//! Time in the PFS simulator: the metadata server's shared rate limit ([`TokenBucket`]) and
//! the [`Delayer`] that holds each reply until its simulated completion time, so that added
//! latency never blocks the FUSE event loops (thousands of requests can be in flight).

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// A token bucket of `rate` tokens per second holding at most `burst` tokens, in the virtual
/// scheduling form: [`TokenBucket::reserve`] never blocks, it returns the instant at which the
/// operation may be served. `n` operations arriving at once are served over `(n - burst) / rate`
/// seconds.
#[derive(Debug)]
pub struct TokenBucket {
    interval: Duration,
    /// How far behind `now` the next free slot may lag: `(burst - 1)` intervals.
    slack: Duration,
    next: Mutex<Instant>,
}

impl TokenBucket {
    /// `rate` > 0 operations per second; `burst` ≥ 1.
    pub fn new(rate: f64, burst: u32) -> Self {
        let interval = Duration::from_secs_f64(1.0 / rate.max(1e-9));
        let slack = interval * burst.max(1).saturating_sub(1);
        let now = Instant::now();
        // Full at the start.
        TokenBucket {
            interval,
            slack,
            next: Mutex::new(now.checked_sub(slack).unwrap_or(now)),
        }
    }

    /// Take one token: the instant at which the operation may be served (now, or later when
    /// the bucket is empty).
    pub fn reserve(&self) -> Instant {
        let now = Instant::now();
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let earliest = now.checked_sub(self.slack).unwrap_or(now);
        let start = (*next).max(earliest);
        *next = start + self.interval;
        start.max(now)
    }
}

type Job = Box<dyn FnOnce() + Send>;

struct Pending {
    at: Instant,
    seq: u64,
    job: Job,
}

impl PartialEq for Pending {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, o: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(o))
    }
}
impl Ord for Pending {
    /// Reversed: the earliest deadline is the greatest, for the max-heap.
    fn cmp(&self, o: &Self) -> CmpOrdering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

#[derive(Default)]
struct Queue {
    heap: BinaryHeap<Pending>,
    seq: u64,
    stop: bool,
}

/// Runs closures at given instants on one background thread (replies to the kernel are cheap
/// writes, so one thread keeps up). Jobs due now run in the caller's thread.
pub struct Delayer {
    shared: Arc<(Mutex<Queue>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Delayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delayer").finish_non_exhaustive()
    }
}

impl Delayer {
    pub fn start() -> std::io::Result<Self> {
        let shared: Arc<(Mutex<Queue>, Condvar)> = Arc::default();
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("pfssim-delay".into())
            .spawn(move || run(&s))?;
        Ok(Delayer {
            shared,
            thread: Some(thread),
        })
    }

    /// Run `job` at `at` (now if `at` has passed).
    pub fn at(&self, at: Instant, job: impl FnOnce() + Send + 'static) {
        if at <= Instant::now() {
            job();
            return;
        }
        let (m, cv) = &*self.shared;
        let mut q = m.lock().unwrap_or_else(|e| e.into_inner());
        q.seq += 1;
        let seq = q.seq;
        let wake = q.heap.peek().is_none_or(|p| at < p.at);
        q.heap.push(Pending {
            at,
            seq,
            job: Box::new(job),
        });
        if wake {
            cv.notify_one();
        }
    }
}

fn run(shared: &(Mutex<Queue>, Condvar)) {
    let (m, cv) = shared;
    let mut q = m.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let now = Instant::now();
        match q.heap.peek() {
            Some(p) if p.at <= now => {
                let Some(p) = q.heap.pop() else { continue };
                drop(q);
                (p.job)();
                q = m.lock().unwrap_or_else(|e| e.into_inner());
            }
            Some(p) => {
                let wait = p.at - now;
                q = cv
                    .wait_timeout(q, wait)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
            None if q.stop => return,
            None => q = cv.wait(q).unwrap_or_else(|e| e.into_inner()),
        }
    }
}

impl Drop for Delayer {
    /// Runs what is still pending (in deadline order), then stops the thread.
    fn drop(&mut self) {
        {
            let (m, cv) = &*self.shared;
            m.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
            cv.notify_one();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
