//! An ordered parallel map: items go to a pool of worker threads and come back in input
//! order, with at most `window` items in flight, so memory stays bounded whatever the input
//! size and the output does not depend on the number of threads.
//!
//! Flow control is a pool of credits: the feeder takes one before sending an item, the
//! consumer returns it when it hands the item's result on. When the consumer is dropped (an
//! error stopped the writer), the feeder finds no more credits and everything winds down.

use crossbeam_channel::{Receiver, Sender, bounded, unbounded};
use std::collections::BTreeMap;
use std::thread::Scope;

/// The consumer end: yields the mapped items in input order.
pub(crate) struct Ordered<O> {
    results: Receiver<(u64, O)>,
    credits: Sender<()>,
    pending: BTreeMap<u64, O>,
    next: u64,
}

impl<O> Iterator for Ordered<O> {
    type Item = O;

    fn next(&mut self) -> Option<O> {
        loop {
            if let Some(o) = self.pending.remove(&self.next) {
                self.next += 1;
                let _ = self.credits.send(());
                return Some(o);
            }
            let (seq, o) = self.results.recv().ok()?;
            self.pending.insert(seq, o);
        }
    }
}

/// Map `input` through workers made by `make_worker` (one per thread, so a worker can own a
/// compression context) on `threads` threads of `scope`.
pub(crate) fn ordered_map<'scope, 'env, I, O, W, F>(
    scope: &'scope Scope<'scope, 'env>,
    input: impl Iterator<Item = I> + Send + 'scope,
    threads: usize,
    window: usize,
    make_worker: W,
) -> Ordered<O>
where
    I: Send + 'scope,
    O: Send + 'scope,
    W: Fn() -> F + Send + Sync + 'scope,
    F: FnMut(I) -> O,
{
    let window = window.max(1);
    let (credit_tx, credit_rx) = bounded::<()>(window);
    for _ in 0..window {
        let _ = credit_tx.send(());
    }
    let (job_tx, job_rx) = unbounded::<(u64, I)>();
    let (res_tx, res_rx) = unbounded::<(u64, O)>();
    scope.spawn(move || {
        for (seq, item) in (0u64..).zip(input) {
            if credit_rx.recv().is_err() || job_tx.send((seq, item)).is_err() {
                break;
            }
        }
    });
    let make_worker = std::sync::Arc::new(make_worker);
    for _ in 0..threads.max(1) {
        let (job_rx, res_tx, make_worker) = (job_rx.clone(), res_tx.clone(), make_worker.clone());
        scope.spawn(move || {
            let mut work = make_worker();
            for (seq, item) in job_rx {
                if res_tx.send((seq, work(item))).is_err() {
                    break;
                }
            }
        });
    }
    Ordered {
        results: res_rx,
        credits: credit_tx,
        pending: BTreeMap::new(),
        next: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_order_and_bounds_flight() {
        for threads in [1, 2, 7] {
            let out: Vec<u64> = std::thread::scope(|s| {
                ordered_map(s, 0..1000u64, threads, 8, || {
                    |x: u64| {
                        if x.is_multiple_of(13) {
                            std::thread::sleep(std::time::Duration::from_micros(200));
                        }
                        x * 2
                    }
                })
                .collect()
            });
            assert_eq!(out, (0..1000).map(|x| x * 2).collect::<Vec<_>>());
        }
    }

    #[test]
    fn stops_when_consumer_drops() {
        let taken: Vec<u64> =
            std::thread::scope(|s| ordered_map(s, 0.., 2, 4, || |x: u64| x).take(10).collect());
        assert_eq!(taken, (0..10).collect::<Vec<_>>());
    }
}
