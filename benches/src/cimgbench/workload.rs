//! The timed workloads of `cimg-bench`: N reader threads doing one kind of operation (sequential
//! or random `pread`, `lstat`, `open` + `close`, whole-directory listing) for a fixed time, and
//! the resulting [`Point`]. Files are opened before the clock starts; the threads start together
//! on a barrier; the time runs until the last reader has finished its current operation after
//! the stop. In "once" mode (cold-cache runs) the readers split the work so that every block and
//! every entry is used at most once per measurement, and a reader stops when its share is done.

use super::tree::Tree;
use super::{BigFile, Metric, Point};
use crate::Prng;
use anyhow::{Context, Result, anyhow, bail};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// What the workloads run on, and how.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub tree: &'a Tree,
    pub big: &'a [BigFile],
    /// Read size of the sequential and random bandwidth metrics.
    pub block_size: u64,
    /// Use every block and entry at most once (the readers split them), instead of going round
    /// again until the time is up: with a dropped cache, nothing is then read from the cache
    /// that the measurement itself filled.
    pub once: bool,
}

/// The block size of [`Metric::Rand4kIops`].
pub const IOPS_BLOCK: u64 = 4096;

#[derive(Debug, Default)]
struct Counts {
    ops: u64,
    bytes: u64,
    errors: u64,
    first_error: Option<String>,
    /// The reader ran out of work (once mode) before it was stopped.
    done: bool,
}

/// Whether a failed operation ends the measurement (reads of the big files) or is counted and
/// skipped (metadata operations on a tree that may change or hold unreadable entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnError {
    Fail,
    Count,
}

/// Runs one reader: waits on the barrier (also when `prep` failed, so that no thread is left
/// waiting), then calls `step` until `stop` is set or `step` has no more work (`Ok(None)`);
/// `step` returns the bytes (or items) it transferred.
fn reader<S>(
    prep: Result<S>,
    barrier: &Barrier,
    stop: &AtomicBool,
    on_error: OnError,
    mut step: impl FnMut(&mut S) -> Result<Option<u64>>,
) -> Result<Counts> {
    barrier.wait();
    let mut state = prep?;
    let mut c = Counts::default();
    loop {
        match step(&mut state) {
            Ok(Some(n)) => {
                c.ops += 1;
                c.bytes += n;
            }
            Ok(None) => {
                c.done = true;
                return Ok(c);
            }
            Err(e) if on_error == OnError::Count => {
                c.errors += 1;
                c.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
            Err(e) => return Err(e),
        }
        if stop.load(Ordering::Relaxed) {
            return Ok(c);
        }
    }
}

/// Measures `metric` with `readers` parallel readers for `duration` (or, in once mode, until the
/// work is done if that comes first). `tick` is called from the timing thread about every 50 ms
/// with the fraction of `duration` elapsed.
pub fn measure(
    metric: Metric,
    readers: usize,
    duration: Duration,
    target: Target,
    tick: &mut dyn FnMut(f64),
) -> Result<Point> {
    let stop = AtomicBool::new(false);
    let barrier = Barrier::new(readers + 1);
    let (results, secs) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..readers)
            .map(|i| {
                let (stop, barrier) = (&stop, &barrier);
                s.spawn(move || run_reader(metric, i, readers, target, barrier, stop))
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        loop {
            let el = start.elapsed();
            if el >= duration || handles.iter().all(|h| h.is_finished()) {
                break;
            }
            tick(el.as_secs_f64() / duration.as_secs_f64());
            std::thread::sleep((duration - el).min(Duration::from_millis(20)));
        }
        stop.store(true, Ordering::Relaxed);
        let results: Vec<Result<Counts>> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("a reader thread panicked")))
            })
            .collect();
        (results, start.elapsed().as_secs_f64())
    });
    let mut total = Counts {
        done: true,
        ..Counts::default()
    };
    for r in results {
        let c = r?;
        total.ops += c.ops;
        total.bytes += c.bytes;
        total.errors += c.errors;
        total.done &= c.done;
        if total.first_error.is_none() {
            total.first_error = c.first_error;
        }
    }
    if total.ops == 0 {
        bail!(
            "every operation failed: {}",
            total
                .first_error
                .as_deref()
                .unwrap_or("no operation completed")
        );
    }
    let value = if matches!(metric, Metric::SeqRead | Metric::RandRead) {
        total.bytes as f64 / secs / 1e6
    } else {
        total.ops as f64 / secs
    };
    Ok(Point {
        readers,
        value,
        ops: total.ops,
        bytes: total.bytes,
        secs,
        latency_us: readers as f64 * secs / total.ops as f64 * 1e6,
        errors: total.errors,
        first_error: total.first_error,
        exhausted: total.done,
    })
}

fn open_big(big: &[BigFile]) -> Result<Vec<(File, &BigFile)>> {
    if big.is_empty() {
        bail!("no file to read");
    }
    big.iter()
        .map(|b| {
            File::open(&b.path)
                .with_context(|| format!("open {}", b.path))
                .map(|f| (f, b))
        })
        .collect()
}

/// Reads at `off` into `buf`, retrying short reads until the buffer is full or the file ends;
/// returns the bytes read.
fn read_block(f: &File, b: &BigFile, buf: &mut [u8], off: u64) -> Result<u64> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).with_context(|| format!("read {} at {off}", b.path)),
        }
    }
    Ok(done as u64)
}

/// The items reader `i` of `readers` uses: in once mode its own slice of `list`; otherwise all
/// of `list` round and round, starting at the beginning of its slice.
fn share<'a, T>(
    list: &'a [T],
    i: usize,
    readers: usize,
    once: bool,
) -> Box<dyn Iterator<Item = &'a T> + Send + 'a>
where
    T: Sync,
{
    let (start, end) = (i * list.len() / readers, (i + 1) * list.len() / readers);
    if once {
        Box::new(list[start..end].iter())
    } else {
        Box::new(list[start..].iter().chain(&list[..start]).cycle())
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The blocks of all the read files as one numbered space, visited in a pseudo-random order
/// (an affine permutation `k -> (a k + c) mod n` with `a` coprime to `n`), so that readers can
/// split it without coordination and, in once mode, read each block exactly once.
#[derive(Debug)]
pub struct BlockSpace {
    /// `starts[f]` is the number of the first block of file `f`; the last entry is the total.
    starts: Vec<u64>,
    a: u64,
    c: u64,
}

impl BlockSpace {
    /// Blocks of `bs` bytes of each file (at least one per file; a partial last block is left
    /// out unless the file is smaller than one block).
    pub fn new(sizes: &[u64], bs: u64, seed: u64) -> Self {
        let mut starts = vec![0];
        for s in sizes {
            let last = *starts.last().expect("non-empty");
            starts.push(last + (s / bs).max(1));
        }
        let n = *starts.last().expect("non-empty");
        let mut a = ((n as f64 * 0.618_033_988_75) as u64).max(1);
        while gcd(a, n) != 1 {
            a += 1;
        }
        let c = Prng::new(seed).below(n);
        BlockSpace { starts, a, c }
    }

    /// The number of blocks.
    pub fn len(&self) -> u64 {
        *self.starts.last().expect("non-empty")
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `k`-th block of the order (`k < len()`): (file index, block index in the file).
    pub fn get(&self, k: u64) -> (usize, u64) {
        let n = self.len();
        let g = ((self.a as u128 * k as u128 + self.c as u128) % n as u128) as u64;
        let f = self.starts.partition_point(|&s| s <= g) - 1;
        (f, g - self.starts[f])
    }
}

fn run_reader(
    metric: Metric,
    i: usize,
    readers: usize,
    t: Target,
    barrier: &Barrier,
    stop: &AtomicBool,
) -> Result<Counts> {
    match metric {
        Metric::SeqRead => {
            // Reader i reads file i % F; the readers of one file start at evenly spaced offsets
            // (each its own part). Without once mode a reader goes on past its part and starts
            // again at 0 at the end of the file; in once mode it stops at the end of its part.
            let prep = open_big(t.big).map(|files| {
                let nf = files.len();
                let (f, b) = files.into_iter().nth(i % nf).expect("i % nf < nf");
                // Readers of this file, and which of them this one is.
                let group = (readers - i % nf).div_ceil(nf) as u64;
                let k = (i / nf) as u64;
                let bs = t.block_size;
                let at = |k: u64| (b.size / group * k) / bs * bs;
                let end = if k + 1 == group { b.size } else { at(k + 1) };
                (f, b, at(k), end, vec![0u8; bs as usize])
            });
            let once = t.once;
            reader(
                prep,
                barrier,
                stop,
                OnError::Fail,
                |(f, b, off, end, buf)| {
                    if once && *off >= *end {
                        return Ok(None);
                    }
                    let mut n = read_block(f, b, buf, *off)?;
                    if n == 0 {
                        // The end of the file: start again from the beginning.
                        *off = 0;
                        n = read_block(f, b, buf, 0)?;
                        if n == 0 {
                            bail!("read {}: the file is empty", b.path);
                        }
                    }
                    *off += n;
                    Ok(Some(n))
                },
            )
        }
        Metric::RandRead | Metric::Rand4kIops => {
            let bs = if metric == Metric::RandRead {
                t.block_size
            } else {
                IOPS_BLOCK
            };
            let sizes: Vec<u64> = t.big.iter().map(|b| b.size).collect();
            let space = BlockSpace::new(&sizes, bs, 0x5EED);
            let n = space.len();
            let prep = open_big(t.big).map(|files| (files, i as u64, vec![0u8; bs as usize]));
            let once = t.once;
            reader(prep, barrier, stop, OnError::Fail, |(files, k, buf)| {
                if *k >= n {
                    if once {
                        return Ok(None);
                    }
                    *k %= n;
                }
                let (fi, block) = space.get(*k);
                *k += readers as u64;
                let (f, b) = &files[fi];
                read_block(f, b, buf, block * bs).map(Some)
            })
        }
        Metric::Stat => {
            let prep = nonempty(&t.tree.entries, "entry").map(|l| share(l, i, readers, t.once));
            reader(prep, barrier, stop, OnError::Count, |it| {
                let Some(p) = it.next() else { return Ok(None) };
                std::fs::symlink_metadata(p).with_context(|| format!("lstat {}", p.display()))?;
                Ok(Some(0))
            })
        }
        Metric::Open => {
            let prep =
                nonempty(&t.tree.files, "regular file").map(|l| share(l, i, readers, t.once));
            reader(prep, barrier, stop, OnError::Count, |it| {
                let Some((p, _)) = it.next() else {
                    return Ok(None);
                };
                File::open(p).with_context(|| format!("open {}", p.display()))?;
                Ok(Some(0))
            })
        }
        Metric::Readdir => {
            let prep = nonempty(&t.tree.dirs, "directory").map(|l| share(l, i, readers, t.once));
            reader(prep, barrier, stop, OnError::Count, |it| {
                let Some(p) = it.next() else { return Ok(None) };
                let mut n = 0;
                for e in std::fs::read_dir(p).with_context(|| format!("readdir {}", p.display()))? {
                    e.with_context(|| format!("readdir {}", p.display()))?;
                    n += 1;
                }
                Ok(Some(n))
            })
        }
    }
}

fn nonempty<'a, T>(list: &'a [T], what: &str) -> Result<&'a [T]> {
    if list.is_empty() {
        bail!("no {what} to use");
    }
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_counts_operations() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        for k in 0..5 {
            std::fs::write(d.path().join(format!("sub/f{k}")), b"hello").unwrap();
        }
        std::fs::write(d.path().join("big"), vec![7u8; 256 * 1024]).unwrap();
        let tree = super::super::tree::walk(d.path(), 1000, |_| {});
        let big = tree.big_files(100_000, 4);
        assert_eq!(big.len(), 1);
        let t = Target {
            tree: &tree,
            big: &big,
            block_size: 64 * 1024,
            once: false,
        };
        for m in Metric::ALL {
            for readers in [1, 3] {
                let mut ticks = 0;
                let p = measure(m, readers, Duration::from_millis(60), t, &mut |f| {
                    assert!((0.0..=1.0).contains(&f));
                    ticks += 1;
                })
                .unwrap();
                assert!(ticks >= 1, "{m:?}");
                assert!(p.ops >= readers as u64, "{m:?}: {p:?}");
                assert!(p.value > 0.0 && p.secs >= 0.06, "{m:?}: {p:?}");
                assert_eq!(p.errors, 0, "{m:?}: {p:?}");
                match m {
                    Metric::SeqRead | Metric::RandRead => {
                        assert_eq!(p.bytes, p.ops * 64 * 1024, "{m:?}");
                        let mbps = p.bytes as f64 / p.secs / 1e6;
                        assert!((p.value - mbps).abs() < 1e-6 * mbps);
                    }
                    Metric::Rand4kIops => assert_eq!(p.bytes, p.ops * 4096),
                    // Every listing of `sub` or the root finds 5 or 2 entries.
                    Metric::Readdir => assert!(p.bytes >= 2 * p.ops),
                    _ => assert_eq!(p.bytes, 0),
                }
            }
        }
    }

    #[test]
    fn read_metrics_need_a_file() {
        let d = tempfile::tempdir().unwrap();
        let tree = super::super::tree::walk(d.path(), 1000, |_| {});
        let t = Target {
            tree: &tree,
            big: &[],
            block_size: 4096,
            once: false,
        };
        let e = measure(
            Metric::SeqRead,
            2,
            Duration::from_millis(10),
            t,
            &mut |_| {},
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "no file to read");
        let e = measure(Metric::Open, 1, Duration::from_millis(10), t, &mut |_| {}).unwrap_err();
        assert_eq!(e.to_string(), "no regular file to use");
        // The root directory is an entry and a directory.
        assert!(measure(Metric::Stat, 1, Duration::from_millis(10), t, &mut |_| {}).is_ok());
    }

    #[test]
    fn metadata_errors_are_counted() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), b"x").unwrap();
        let mut tree = super::super::tree::walk(d.path(), 1000, |_| {});
        tree.entries.push(d.path().join("gone"));
        let t = Target {
            tree: &tree,
            big: &[],
            block_size: 4096,
            once: false,
        };
        let p = measure(Metric::Stat, 1, Duration::from_millis(30), t, &mut |_| {}).unwrap();
        assert!(p.errors > 0 && p.ops > 0, "{p:?}");
        assert!(p.first_error.unwrap().starts_with("lstat "));
    }
}

#[cfg(test)]
mod once_tests {
    use super::*;

    #[test]
    fn block_space_is_a_permutation() {
        for sizes in [
            vec![10 * 4096u64],
            vec![3 * 4096, 100, 7 * 4096 + 5],
            vec![1],
        ] {
            let s = BlockSpace::new(&sizes, 4096, 9);
            let n = s.len();
            let expect: u64 = sizes.iter().map(|x| (x / 4096).max(1)).sum();
            assert_eq!(n, expect);
            let mut seen: Vec<(usize, u64)> = (0..n).map(|k| s.get(k)).collect();
            assert!(seen.iter().all(|&(f, b)| b < (sizes[f] / 4096).max(1)));
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen.len() as u64, n, "{sizes:?}: every block once");
        }
    }

    /// In once mode every entry, file and block is used exactly once, however many readers.
    #[test]
    fn once_mode_uses_everything_exactly_once() {
        let d = tempfile::tempdir().unwrap();
        for k in 0..7 {
            std::fs::create_dir(d.path().join(format!("d{k}"))).unwrap();
            std::fs::write(d.path().join(format!("d{k}/f")), b"abc").unwrap();
        }
        std::fs::write(d.path().join("big"), vec![1u8; 40 * 4096 + 100]).unwrap();
        std::fs::write(d.path().join("big2"), vec![2u8; 24 * 4096]).unwrap();
        let tree = super::super::tree::walk(d.path(), 1000, |_| {});
        let big = tree.big_files(10 * 4096, 4);
        let t = Target {
            tree: &tree,
            big: &big,
            block_size: 8192,
            once: true,
        };
        let long = Duration::from_secs(30);
        for readers in [1, 3, 4, 50] {
            let m = |m| measure(m, readers, long, t, &mut |_| {}).unwrap();
            let p = m(Metric::Stat);
            assert_eq!(p.ops, tree.entries.len() as u64);
            assert!(p.exhausted && p.secs < 10.0);
            assert_eq!(m(Metric::Open).ops, 9);
            let p = m(Metric::Readdir);
            assert_eq!((p.ops, p.bytes), (8, 9 + 7));
            // Sequential: every byte once, in parts.
            let p = m(Metric::SeqRead);
            let want = if readers == 1 {
                40 * 4096 + 100
            } else {
                64 * 4096 + 100
            };
            assert_eq!(p.bytes, want, "{readers} readers");
            assert!(p.exhausted);
            // Random: every whole block once.
            let p = m(Metric::RandRead);
            assert_eq!(p.ops, 20 + 12, "{readers} readers");
            assert_eq!(p.bytes, 32 * 8192);
            assert_eq!(m(Metric::Rand4kIops).ops, 40 + 24);
        }
    }
}
