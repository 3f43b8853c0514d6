//! `cimg-bench PATH`: a filesystem-throughput tool for users of any path (a cimg mount, a Lustre
//! directory, local disk). It only reads: it walks PATH, then measures sequential and random read
//! bandwidth, 4 KiB random-read IOPS and stat / open / readdir rates, each with 1..N parallel
//! readers, and prints a table, writes `--json` and an SVG `--plot`. `cimg-bench --compare A.json
//! B.json` tables and plots earlier runs together. This file owns the command line, the order of
//! the measurements, the progress bar and the cache handling; the workloads, tables and plot are
//! in `cimg_benches::cimgbench`. See benches/README.md.

use anyhow::{Context, Result, bail};
use cimg_benches::cimgbench::tree::{self, Tree};
use cimg_benches::cimgbench::workload::{self, Target};
use cimg_benches::cimgbench::{
    BigFile, Metric, MetricResult, Run, parse_duration, parse_metrics, parse_readers, plot, report,
};
use cimg_benches::{human_bytes, parse_size};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Measures read throughput and metadata rates of a filesystem path with 1..N parallel readers.
///
/// Only reads PATH (it works on read-only mounts). Results are warm-cache unless --drop-caches
/// (root) drops the page cache, dentries and inodes before each measurement. `cimg-bench
/// --compare A.json B.json --plot out.svg` tables and plots earlier --json results together.
#[derive(Parser, Debug)]
#[command(name = "cimg-bench", version)]
struct Cli {
    /// Directory (or single file) to measure.
    #[arg(value_name = "PATH", conflicts_with = "compare")]
    path: Option<PathBuf>,
    /// Parallel readers: N for the sweep 1,2,4,...,N, or a list such as 1,3,6.
    #[arg(long, value_name = "N|LIST", default_value = "8")]
    readers: String,
    /// Time of each measurement (one metric with one number of readers): 2, 0.5s, 200ms.
    #[arg(long, value_name = "TIME", default_value = "2", value_parser = parse_duration)]
    duration: Duration,
    /// Read size of the sequential and random bandwidth metrics.
    #[arg(long, value_name = "SIZE", default_value = "1M", value_parser = parse_block)]
    block_size: u64,
    /// Read this file for the bandwidth and IOPS metrics instead of PATH's biggest files
    /// (repeatable).
    #[arg(long, value_name = "FILE")]
    file: Vec<PathBuf>,
    /// Smallest file that the bandwidth and IOPS metrics use.
    #[arg(long, value_name = "SIZE", default_value = "16M", value_parser = parse_size)]
    min_file_size: u64,
    /// Stop walking PATH after this many entries.
    #[arg(long, value_name = "N", default_value_t = 200_000)]
    max_entries: usize,
    /// Metrics to run: all, or a list of seq, rand, iops, stat, open, readdir.
    #[arg(long, value_name = "LIST", default_value = "all")]
    metrics: String,
    /// Drop the page cache, dentries and inodes before each measurement (needs root); each
    /// measurement then uses each block and entry at most once.
    #[arg(long)]
    drop_caches: bool,
    /// Do not read the big files once before measuring (without --drop-caches).
    #[arg(long)]
    no_warmup: bool,
    /// Name of this run in tables and plots (default: PATH).
    #[arg(long, value_name = "NAME")]
    label: Option<String>,
    /// Write the results as JSON (the input of --compare).
    #[arg(long, value_name = "FILE", conflicts_with = "compare")]
    json: Option<PathBuf>,
    /// Write an SVG plot of each metric against the number of readers.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Plot the values on a logarithmic axis (for runs that differ by orders of magnitude).
    #[arg(long, requires = "plot")]
    log_y: bool,
    /// No progress bar and no notes on stderr (the table still goes to stdout).
    #[arg(long, short)]
    quiet: bool,
    /// Compare earlier --json results: print them in one table and plot them together.
    #[arg(long, value_name = "JSON", num_args = 1..)]
    compare: Vec<PathBuf>,
}

fn parse_block(s: &str) -> Result<u64, String> {
    match parse_size(s)? {
        n if (512..=(1 << 30)).contains(&n) => Ok(n),
        _ => Err(format!("{s:?}: the block size must be between 512 and 1G")),
    }
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind::*;
            if matches!(e.kind(), DisplayHelp | DisplayVersion) {
                e.exit();
            }
            // clap's message up to its first blank line (tips and usage follow), on one line.
            let msg = e.to_string();
            let what: Vec<&str> = msg
                .lines()
                .map(str::trim)
                .take_while(|l| !l.is_empty())
                .collect();
            let what = what.join(" ");
            let what = what.strip_prefix("error: ").unwrap_or(&what);
            eprintln!("cimg-bench: bad arguments: {what} (see cimg-bench --help)");
            std::process::exit(2);
        }
    };
    let result = if cli.compare.is_empty() {
        bench(&cli)
    } else {
        compare(&cli)
    };
    if let Err(e) = result {
        eprintln!("cimg-bench: {e:#}");
        std::process::exit(1);
    }
}

fn scale(cli: &Cli) -> plot::Scale {
    if cli.log_y {
        plot::Scale::Log
    } else {
        plot::Scale::Linear
    }
}

/// `1 reader`, `2 readers`.
fn readers_text(n: usize) -> String {
    format!("{n} reader{}", if n == 1 { "" } else { "s" })
}

/// Fails early (before minutes of measuring) when an output file cannot be written.
fn check_output(p: &Path, what: &str) -> Result<()> {
    let dir = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        bail!(
            "{what} {}: no such directory {}",
            p.display(),
            dir.display()
        );
    }
    Ok(())
}

fn compare(cli: &Cli) -> Result<()> {
    if let Some(p) = &cli.plot {
        check_output(p, "--plot")?;
    }
    let mut runs = Vec::new();
    for p in &cli.compare {
        let text = std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))?;
        let run: Run = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a cimg-bench --json file", p.display()))?;
        runs.push(run);
    }
    // Runs must be told apart in the table and the plot (by label and cache mode).
    for i in 0..runs.len() {
        let same = |r: &Run| r.label == runs[i].label && r.cache == runs[i].cache;
        if runs[..i].iter().any(same) {
            let name = cli.compare[i]
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            runs[i].label = format!("{} ({name})", runs[i].label);
        }
    }
    print!("{}", report::compare_table(&runs));
    if let Some(p) = &cli.plot {
        plot::write_svg(&runs, p, scale(cli))?;
        if !cli.quiet {
            eprintln!("plot written to {}", p.display());
        }
    }
    Ok(())
}

fn drop_caches() -> Result<()> {
    std::fs::write("/proc/sys/vm/drop_caches", "3\n")
        .context("--drop-caches: write 3 to /proc/sys/vm/drop_caches")
}

/// Bytes the kernel could give without swapping (`MemAvailable`), if known.
fn mem_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn bench(cli: &Cli) -> Result<()> {
    let started = Instant::now();
    let Some(path) = &cli.path else {
        bail!(
            "no PATH given (usage: cimg-bench PATH [options], or cimg-bench --compare A.json B.json)"
        );
    };
    let readers = parse_readers(&cli.readers).map_err(|e| anyhow::anyhow!("--readers: {e}"))?;
    let metrics = parse_metrics(&cli.metrics).map_err(|e| anyhow::anyhow!("--metrics: {e}"))?;
    let md = std::fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
    if !md.is_dir() && !md.is_file() {
        bail!("{}: not a directory or a regular file", path.display());
    }
    if cli.drop_caches && !nix::unistd::geteuid().is_root() {
        bail!(
            "--drop-caches: needs root (it writes /proc/sys/vm/drop_caches); without it results are warm-cache"
        );
    }
    if let Some(p) = &cli.json {
        check_output(p, "--json")?;
    }
    if let Some(p) = &cli.plot {
        check_output(p, "--plot")?;
    }
    let note = |s: String| {
        if !cli.quiet {
            eprintln!("{s}");
        }
    };

    // The walk.
    let spinner = if cli.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new_spinner()
    };
    spinner.set_message(format!("walking {}", path.display()));
    spinner.enable_steady_tick(Duration::from_millis(100));
    let tree = if md.is_dir() {
        tree::walk(path, cli.max_entries, |n| {
            spinner.set_message(format!("walking {}: {n} entries", path.display()))
        })
    } else {
        let mut t = Tree::default();
        t.entries.push(path.clone());
        t.files.push((path.clone(), md.len()));
        t.summary.files = 1;
        t.summary.bytes = md.len();
        t
    };
    spinner.finish_and_clear();
    let s = &tree.summary;
    note(format!(
        "{}: {} files, {} directories, {} others, {} of file data; walked in {:.1} s{}{}",
        path.display(),
        s.files,
        s.dirs,
        s.other,
        human_bytes(s.bytes),
        s.walk_secs,
        if s.truncated {
            format!(" (stopped at --max-entries {})", cli.max_entries)
        } else {
            String::new()
        },
        if s.errors > 0 {
            format!("; {} entries could not be read", s.errors)
        } else {
            String::new()
        }
    ));

    // The files of the read metrics.
    let max_readers = *readers.last().expect("at least one reader count");
    let big: Vec<BigFile> = if cli.file.is_empty() {
        tree.big_files(cli.min_file_size, max_readers)
    } else {
        let mut v = Vec::new();
        for f in &cli.file {
            let m =
                std::fs::metadata(f).with_context(|| format!("--file: stat {}", f.display()))?;
            if !m.is_file() || m.len() == 0 {
                bail!("--file {}: not a non-empty regular file", f.display());
            }
            v.push(BigFile {
                path: f.to_string_lossy().into_owned(),
                size: m.len(),
            });
        }
        v
    };
    let no_big = format!(
        "no file of at least {} under {} (pass --file FILE, or a smaller --min-file-size)",
        report::fmt_block(cli.min_file_size),
        path.display()
    );
    if big.is_empty() {
        if metrics.iter().any(|m| m.reads_data()) {
            note(format!(
                "{no_big}: skipping sequential read, random read and random 4 KiB read"
            ));
        }
    } else if metrics.iter().any(|m| m.reads_data()) {
        let total: u64 = big.iter().map(|b| b.size).sum();
        note(format!(
            "read metrics use {} file{} ({} in all; largest {}, {})",
            big.len(),
            if big.len() == 1 { "" } else { "s" },
            human_bytes(total),
            human_bytes(big[0].size),
            big[0].path
        ));
    }

    // The cache.
    let cache = if cli.drop_caches { "cold" } else { "warm" };
    if cli.drop_caches {
        note(
            "cold cache: page cache, dentries and inodes are dropped before each measurement, \
             which uses each block and entry at most once"
                .into(),
        );
    } else {
        note("warm cache: nothing is dropped (run as root with --drop-caches for cold-cache numbers)".into());
    }
    let data_metrics = metrics.iter().any(|m| m.reads_data());
    if !cli.drop_caches && !cli.no_warmup && data_metrics && !big.is_empty() {
        warm_up(&big, cli.quiet, &note)?;
    }

    // The measurements.
    let per = cli.duration.as_secs_f64();
    let runnable = |m: Metric| -> Option<String> {
        if m.reads_data() && big.is_empty() {
            Some(no_big.clone())
        } else if m == Metric::Readdir && tree.dirs.is_empty() {
            Some(format!("{} is a file", path.display()))
        } else if m == Metric::Open && tree.files.is_empty() {
            Some(format!("no regular file under {}", path.display()))
        } else {
            None
        }
    };
    let count = metrics.iter().filter(|m| runnable(**m).is_none()).count() * readers.len();
    let pb = if cli.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new((count as f64 * per * 1000.0) as u64)
    };
    pb.set_style(
        ProgressStyle::with_template("{bar:30} {percent:>3}% eta {eta:>3} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let target = Target {
        tree: &tree,
        big: &big,
        block_size: cli.block_size,
        once: cli.drop_caches,
    };
    let mut results = Vec::new();
    let mut done = 0usize;
    for &m in &metrics {
        let mut r = MetricResult {
            metric: m,
            title: m.title().into(),
            unit: m.unit().into(),
            skipped: runnable(m),
            points: Vec::new(),
        };
        if r.skipped.is_none() {
            for &n in &readers {
                pb.set_message(format!("{}, {}", m.title(), readers_text(n)));
                if cli.drop_caches {
                    drop_caches()?;
                }
                let base = done as f64 * per * 1000.0;
                let p = workload::measure(m, n, cli.duration, target, &mut |f| {
                    pb.set_position((base + f * per * 1000.0) as u64)
                })
                .with_context(|| format!("{}, {}", m.title(), readers_text(n)))?;
                done += 1;
                pb.set_position((done as f64 * per * 1000.0) as u64);
                r.points.push(p);
            }
        }
        results.push(r);
    }
    pb.finish_and_clear();

    let run = Run {
        tool: "cimg-bench".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        label: cli
            .label
            .clone()
            .unwrap_or_else(|| path.display().to_string()),
        path: path.display().to_string(),
        command: std::env::args_os()
            .map(|a| cimg_benches::shell_quote(&a))
            .collect::<Vec<_>>()
            .join(" "),
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
            .saturating_sub(started.elapsed().as_secs()),
        host: std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        cores: cimg_benches::cores(),
        cache: cache.into(),
        duration_secs: per,
        block_size: cli.block_size,
        readers,
        tree: tree.summary.clone(),
        big_files: big,
        metrics: results,
    };
    println!(
        "cimg-bench {}: {} cache, {} s per measurement, {} cores",
        run.path, run.cache, run.duration_secs, run.cores
    );
    print!("{}", report::run_table(&run));
    if let Some(p) = &cli.json {
        let text = serde_json::to_string_pretty(&run).context("encode the results")?;
        std::fs::write(p, text + "\n").with_context(|| format!("write {}", p.display()))?;
        note(format!("results written to {}", p.display()));
    }
    if let Some(p) = &cli.plot {
        plot::write_svg(std::slice::from_ref(&run), p, scale(cli))?;
        note(format!("plot written to {}", p.display()));
    }
    Ok(())
}

/// Reads the big files once (untimed) so that the first measurement sees the same warm cache as
/// the later ones, unless they do not fit in half the available memory.
fn warm_up(big: &[BigFile], quiet: bool, note: &dyn Fn(String)) -> Result<()> {
    let total: u64 = big.iter().map(|b| b.size).sum();
    if mem_available().is_some_and(|m| total > m / 2) {
        note(format!(
            "the read metrics' files ({}) do not fit in half the available memory: no warm-up, so they read partly from the filesystem",
            human_bytes(total)
        ));
        return Ok(());
    }
    let pb = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total)
    };
    pb.set_style(
        ProgressStyle::with_template("{bar:30} {percent:>3}% {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message("warm-up: reading the big files once");
    let mut buf = vec![0u8; 1 << 20];
    for b in big {
        let mut f = std::fs::File::open(&b.path).with_context(|| format!("open {}", b.path))?;
        loop {
            let n = f
                .read(&mut buf)
                .with_context(|| format!("read {}", b.path))?;
            if n == 0 {
                break;
            }
            pb.inc(n as u64);
        }
    }
    pb.finish_and_clear();
    Ok(())
}
