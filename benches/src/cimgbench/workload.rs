//! The timed workloads of `cimg-bench`: N reader threads doing one kind of operation (sequential
//! or random `pread`, `lstat`, `open` + `close`, whole-directory listing) for a fixed time, and
//! the resulting [`Point`]. Files are opened before the clock starts; the threads start together
//! on a barrier; each reader completes at least one operation, and the time runs until the last
//! reader has finished its current operation after the stop.

use super::tree::Tree;
use super::{BigFile, Metric, Point};
use crate::Prng;
use anyhow::{Context, Result, anyhow, bail};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// What the workloads run on.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub tree: &'a Tree,
    pub big: &'a [BigFile],
    /// Read size of the sequential and random bandwidth metrics.
    pub block_size: u64,
}

/// The block size of [`Metric::Rand4kIops`].
pub const IOPS_BLOCK: u64 = 4096;

#[derive(Debug, Default)]
struct Counts {
    ops: u64,
    bytes: u64,
    errors: u64,
    first_error: Option<String>,
}

/// Whether a failed operation ends the measurement (reads of the big files) or is counted and
/// skipped (metadata operations on a tree that may change or hold unreadable entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnError {
    Fail,
    Count,
}

/// Runs one reader: waits on the barrier (also when `prep` failed, so that no thread is left
/// waiting), then calls `step` until `stop` is set; `step` returns the bytes it transferred.
fn reader<S>(
    prep: Result<S>,
    barrier: &Barrier,
    stop: &AtomicBool,
    on_error: OnError,
    mut step: impl FnMut(&mut S) -> Result<u64>,
) -> Result<Counts> {
    barrier.wait();
    let mut state = prep?;
    let mut c = Counts::default();
    loop {
        match step(&mut state) {
            Ok(n) => {
                c.ops += 1;
                c.bytes += n;
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

/// Measures `metric` with `readers` parallel readers for `duration`. `tick` is called from the
/// timing thread about every 50 ms with the fraction of `duration` elapsed.
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
            std::thread::sleep((duration - el).min(Duration::from_millis(50)));
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
    let mut total = Counts::default();
    for r in results {
        let c = r?;
        total.ops += c.ops;
        total.bytes += c.bytes;
        total.errors += c.errors;
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

/// Items `i * n / readers`, `+1`, ... (wrapping) of `list`: each reader starts at its own place.
fn cycle<T>(list: &[T], i: usize, readers: usize) -> impl Iterator<Item = &T> {
    let start = if list.is_empty() {
        0
    } else {
        i * list.len() / readers
    };
    list[start..].iter().chain(&list[..start]).cycle()
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
            // Reader i reads file i % n from its own start offset, so that readers sharing a
            // file (more readers than big files) read different parts of it.
            let prep = open_big(t.big).map(|files| {
                let nf = files.len();
                let (f, b) = files.into_iter().nth(i % nf).expect("i % nf < nf");
                let groups = readers.div_ceil(nf) as u64;
                let k = (i / nf) as u64;
                let off = (b.size / groups * k) / t.block_size * t.block_size;
                (f, b, off, vec![0u8; t.block_size as usize])
            });
            reader(prep, barrier, stop, OnError::Fail, |(f, b, off, buf)| {
                let mut n = read_block(f, b, buf, *off)?;
                if n == 0 {
                    // The end: start again from the beginning.
                    *off = 0;
                    n = read_block(f, b, buf, 0)?;
                    if n == 0 {
                        bail!("read {}: the file is empty", b.path);
                    }
                }
                *off += n;
                Ok(n)
            })
        }
        Metric::RandRead | Metric::Rand4kIops => {
            let bs = if metric == Metric::RandRead {
                t.block_size
            } else {
                IOPS_BLOCK
            };
            let prep = open_big(t.big).map(|files| {
                let rng = Prng::new(0x5EED_0000 + i as u64);
                (files, rng, vec![0u8; bs as usize])
            });
            reader(prep, barrier, stop, OnError::Fail, |(files, rng, buf)| {
                let (f, b) = &files[rng.below(files.len() as u64) as usize];
                let blocks = (b.size / bs).max(1);
                read_block(f, b, buf, rng.below(blocks) * bs)
            })
        }
        Metric::Stat => {
            let prep = nonempty(&t.tree.entries, "entry").map(|l| cycle(l, i, readers));
            reader(prep, barrier, stop, OnError::Count, |it| {
                let p = it.next().expect("cycle is endless");
                std::fs::symlink_metadata(p).with_context(|| format!("lstat {}", p.display()))?;
                Ok(0)
            })
        }
        Metric::Open => {
            let prep = nonempty(&t.tree.files, "regular file").map(|l| cycle(l, i, readers));
            reader(prep, barrier, stop, OnError::Count, |it| {
                let (p, _) = it.next().expect("cycle is endless");
                File::open(p).with_context(|| format!("open {}", p.display()))?;
                Ok(0)
            })
        }
        Metric::Readdir => {
            let prep = nonempty(&t.tree.dirs, "directory").map(|l| cycle(l, i, readers));
            reader(prep, barrier, stop, OnError::Count, |it| {
                let p: &PathBuf = it.next().expect("cycle is endless");
                let mut n = 0;
                for e in std::fs::read_dir(p).with_context(|| format!("readdir {}", p.display()))? {
                    e.with_context(|| format!("readdir {}", p.display()))?;
                    n += 1;
                }
                Ok(n)
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
        };
        let p = measure(Metric::Stat, 1, Duration::from_millis(30), t, &mut |_| {}).unwrap();
        assert!(p.errors > 0 && p.ops > 0, "{p:?}");
        assert!(p.first_error.unwrap().starts_with("lstat "));
    }
}
