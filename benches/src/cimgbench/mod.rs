//! The `cimg-bench` filesystem-throughput tool: what it measures ([`Metric`]), the results it
//! writes and reads back as JSON ([`Run`]), and the parsing of its option values. The tree walk
//! is in [`tree`], the timed workloads in [`workload`], the terminal tables in [`report`] and the
//! SVG plot in [`plot`]; the command line itself is `src/bin/cimg_bench.rs`.

pub mod plot;
pub mod report;
pub mod tree;
pub mod workload;

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// One thing `cimg-bench` measures, each with 1..N parallel readers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Sequential reads of `--block-size` through big files (MB/s).
    SeqRead,
    /// Reads of `--block-size` at random block-aligned offsets of big files (MB/s).
    RandRead,
    /// Reads of 4 KiB at random 4 KiB-aligned offsets of big files (operations per second).
    #[serde(rename = "rand_4k_iops")]
    Rand4kIops,
    /// `lstat` of the entries found by the walk (operations per second).
    Stat,
    /// `open` + `close` of the regular files found by the walk (operations per second).
    Open,
    /// Listing whole directories found by the walk (directories per second).
    Readdir,
}

impl Metric {
    pub const ALL: [Metric; 6] = [
        Metric::SeqRead,
        Metric::RandRead,
        Metric::Rand4kIops,
        Metric::Stat,
        Metric::Open,
        Metric::Readdir,
    ];

    /// The name used in JSON and in `--metrics`.
    pub fn name(self) -> &'static str {
        match self {
            Metric::SeqRead => "seq_read",
            Metric::RandRead => "rand_read",
            Metric::Rand4kIops => "rand_4k_iops",
            Metric::Stat => "stat",
            Metric::Open => "open",
            Metric::Readdir => "readdir",
        }
    }

    /// A short title for tables and plots.
    pub fn title(self) -> &'static str {
        match self {
            Metric::SeqRead => "sequential read",
            Metric::RandRead => "random read",
            Metric::Rand4kIops => "random 4 KiB read",
            Metric::Stat => "stat (lstat)",
            Metric::Open => "open + close",
            Metric::Readdir => "readdir (whole dir)",
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Metric::SeqRead | Metric::RandRead => "MB/s",
            Metric::Rand4kIops => "IOPS",
            Metric::Stat | Metric::Open => "ops/s",
            Metric::Readdir => "dirs/s",
        }
    }

    /// Whether the metric reads file data from the big files (as opposed to metadata).
    pub fn reads_data(self) -> bool {
        matches!(
            self,
            Metric::SeqRead | Metric::RandRead | Metric::Rand4kIops
        )
    }

    /// Parses a name as accepted by `--metrics` (the JSON names and a few short forms).
    pub fn parse(s: &str) -> Option<Metric> {
        Some(match s.trim() {
            "seq" | "seq_read" | "sequential" => Metric::SeqRead,
            "rand" | "rand_read" | "random" => Metric::RandRead,
            "iops" | "4k" | "rand_4k_iops" => Metric::Rand4kIops,
            "stat" => Metric::Stat,
            "open" => Metric::Open,
            "readdir" | "ls" => Metric::Readdir,
            _ => return None,
        })
    }
}

/// One measurement: one metric with one number of readers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Point {
    pub readers: usize,
    /// The metric's value in its unit (MB/s = 10^6 bytes per second, or operations per second).
    pub value: f64,
    /// Operations completed by all readers (reads, stats, opens or directory listings).
    pub ops: u64,
    /// Bytes read (file data for the read metrics, 0 for stat and open, entries for readdir).
    pub bytes: u64,
    /// Wall-clock seconds from the start of the readers to the end of the last one.
    pub secs: f64,
    /// Mean time of one operation as seen by one reader, in microseconds.
    pub latency_us: f64,
    /// Operations that failed (counted, not timed into `value`).
    pub errors: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// Every reader ran out of work before the duration was over: in a cold-cache run each
    /// block and entry is used once, and there were not enough of them.
    #[serde(default)]
    pub exhausted: bool,
}

/// The results of one metric over the reader counts, or why it was skipped.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MetricResult {
    pub metric: Metric,
    pub title: String,
    pub unit: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    pub points: Vec<Point>,
}

impl MetricResult {
    pub fn point(&self, readers: usize) -> Option<&Point> {
        self.points.iter().find(|p| p.readers == readers)
    }
}

/// A file used by the data metrics.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BigFile {
    pub path: String,
    pub size: u64,
}

/// What the walk found.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TreeSummary {
    pub files: u64,
    pub dirs: u64,
    pub other: u64,
    pub bytes: u64,
    pub errors: u64,
    /// The walk stopped at `--max-entries`.
    pub truncated: bool,
    pub walk_secs: f64,
}

/// Everything one `cimg-bench PATH` run produced: the `--json` file, and the input of `--compare`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    pub tool: String,
    pub version: String,
    /// The name of the run in tables and plots (`--label`, default PATH).
    pub label: String,
    pub path: String,
    /// The exact command line.
    pub command: String,
    /// Seconds since the Unix epoch when the run started.
    pub started_unix: u64,
    pub host: String,
    pub cores: usize,
    /// `warm` or `cold` (page cache, dentries and inodes dropped before each measurement).
    pub cache: String,
    pub duration_secs: f64,
    pub block_size: u64,
    pub readers: Vec<usize>,
    pub tree: TreeSummary,
    pub big_files: Vec<BigFile>,
    pub metrics: Vec<MetricResult>,
}

impl Run {
    pub fn metric(&self, m: Metric) -> Option<&MetricResult> {
        self.metrics.iter().find(|r| r.metric == m)
    }
}

/// Parses a duration: `2`, `0.2`, `1.5s`, `200ms`, `1m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, mul) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else {
        (t, 1.0)
    };
    match num.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v * mul <= 86_400.0 => {
            Ok(Duration::from_secs_f64(v * mul))
        }
        _ => Err(format!(
            "{s:?} is not a positive duration (e.g. 2, 0.5s, 200ms)"
        )),
    }
}

/// Parses `--readers`: a single number N is the sweep 1, 2, 4, ... up to N (N included); a
/// comma-separated list is taken as is (sorted, duplicates removed).
pub fn parse_readers(s: &str) -> Result<Vec<usize>, String> {
    let bad = || format!("{s:?} is not a reader count or list (e.g. 8, or 1,2,4,8)");
    let nums: Vec<usize> = s
        .split(',')
        .map(|x| x.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|_| bad())?;
    if nums.is_empty() || nums.iter().any(|&n| n == 0 || n > 1024) {
        return Err(format!("{s:?}: reader counts must be between 1 and 1024"));
    }
    let mut v = if nums.len() == 1 {
        let max = nums[0];
        let mut v: Vec<usize> = std::iter::successors(Some(1usize), |n| Some(n * 2))
            .take_while(|&n| n < max)
            .collect();
        v.push(max);
        v
    } else {
        nums
    };
    v.sort_unstable();
    v.dedup();
    Ok(v)
}

/// Parses `--metrics`: a comma-separated list of metric names, or `all`.
pub fn parse_metrics(s: &str) -> Result<Vec<Metric>, String> {
    if s.trim() == "all" {
        return Ok(Metric::ALL.to_vec());
    }
    let mut v = Vec::new();
    for part in s.split(',') {
        let m = Metric::parse(part).ok_or_else(|| {
            format!(
                "unknown metric {:?} (known: seq, rand, iops, stat, open, readdir, all)",
                part.trim()
            )
        })?;
        if !v.contains(&m) {
            v.push(m);
        }
    }
    // Keep the canonical order, whatever the order given.
    v.sort_by_key(|m| Metric::ALL.iter().position(|x| x == m));
    Ok(v)
}

/// A number with about four significant digits, for tables (`1234567` → `1234567`,
/// `812.345` → `812.3`, `0.01234` → `0.0123`).
pub fn fmt_value(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    let a = v.abs();
    if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 10.0 {
        format!("{v:.2}")
    } else if a >= 1.0 {
        format!("{v:.3}")
    } else {
        format!("{v:.4}")
    }
}

/// A number with an SI suffix, for plot axes (`1500` → `1.5k`, `2e6` → `2M`).
pub fn fmt_si(v: f64) -> String {
    let a = v.abs();
    let (x, suf) = if a >= 1e9 {
        (v / 1e9, "G")
    } else if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e3 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let s = format!("{x:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}{suf}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("0.2s").unwrap(), Duration::from_millis(200));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("fast").is_err());
    }

    #[test]
    fn readers() {
        assert_eq!(parse_readers("8").unwrap(), vec![1, 2, 4, 8]);
        assert_eq!(parse_readers("6").unwrap(), vec![1, 2, 4, 6]);
        assert_eq!(parse_readers("1").unwrap(), vec![1]);
        assert_eq!(parse_readers("4,1, 2,4").unwrap(), vec![1, 2, 4]);
        assert!(parse_readers("0").is_err());
        assert!(parse_readers("1,x").is_err());
        assert!(parse_readers("").is_err());
    }

    #[test]
    fn metrics() {
        assert_eq!(parse_metrics("all").unwrap(), Metric::ALL.to_vec());
        assert_eq!(
            parse_metrics("stat,seq").unwrap(),
            vec![Metric::SeqRead, Metric::Stat]
        );
        assert!(parse_metrics("seq,bogus").is_err());
        for m in Metric::ALL {
            assert_eq!(Metric::parse(m.name()), Some(m));
            let json = serde_json::to_string(&m).unwrap();
            assert_eq!(json, format!("\"{}\"", m.name()));
        }
    }

    #[test]
    fn numbers() {
        assert_eq!(fmt_value(1234567.8), "1234568");
        assert_eq!(fmt_value(812.345), "812.3");
        assert_eq!(fmt_value(0.01234), "0.0123");
        assert_eq!(fmt_si(1500.0), "1.5k");
        assert_eq!(fmt_si(2e6), "2M");
        assert_eq!(fmt_si(0.0), "0");
    }
}
