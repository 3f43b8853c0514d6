//! The terminal tables of `cimg-bench`: one run (a row per metric, a column per reader count)
//! and several runs compared (a row per metric and run).

use super::{Metric, MetricResult, Run, fmt_value};
use crate::human_bytes;
use std::fmt::Write;

/// The reader counts of all `runs`, sorted.
pub fn all_readers(runs: &[Run]) -> Vec<usize> {
    let mut v: Vec<usize> = runs.iter().flat_map(|r| r.readers.clone()).collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// The title of a metric in a table or plot, with the read size where there is one.
pub fn metric_title(r: &MetricResult, block_size: u64) -> String {
    match r.metric {
        Metric::SeqRead | Metric::RandRead => {
            format!("{} ({} reads)", r.title, fmt_block(block_size))
        }
        _ => r.title.clone(),
    }
}

/// A read size: `1 MiB`, `64 KiB`, or as [`human_bytes`] when not a whole number of units.
pub fn fmt_block(n: u64) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{} MiB", n >> 20)
    } else if n >= 1 << 10 && n.is_multiple_of(1 << 10) {
        format!("{} KiB", n >> 10)
    } else {
        human_bytes(n)
    }
}

/// The values of `r` for `readers`: `-` where not measured, a `*` after a value whose readers ran
/// out of work before the time was up.
fn cells(r: &MetricResult, readers: &[usize]) -> Vec<String> {
    readers
        .iter()
        .map(|&n| match r.point(n) {
            Some(p) if p.exhausted => format!("{}*", fmt_value(p.value)),
            Some(p) => fmt_value(p.value),
            None => "-".into(),
        })
        .collect()
}

const EXHAUSTED: &str = "* every block or entry was used once before the time was up (a cold-cache run uses each at most once): a short measurement";

fn header(first: &[(&str, usize)], readers: &[usize]) -> String {
    let mut s = String::new();
    for (h, w) in first {
        let _ = write!(s, "{h:<w$}  ");
    }
    for (k, n) in readers.iter().enumerate() {
        let h = if k == 0 {
            format!("{n} reader{}", if *n == 1 { "" } else { "s" })
        } else {
            n.to_string()
        };
        let _ = write!(s, "{h:>10}");
    }
    s.trim_end().to_string()
}

/// The table of one run: a line per metric, a column per reader count, then the reasons of any
/// skipped metric.
pub fn run_table(run: &Run) -> String {
    let titles: Vec<String> = run
        .metrics
        .iter()
        .map(|m| metric_title(m, run.block_size))
        .collect();
    let tw = titles.iter().map(|t| t.len()).max().unwrap_or(6).max(6);
    let mut out = header(&[("metric", tw), ("unit  ", 6)], &run.readers);
    out.push('\n');
    let mut notes = Vec::new();
    for (m, title) in run.metrics.iter().zip(&titles) {
        let _ = write!(out, "{title:<tw$}  {:<6}  ", m.unit);
        if let Some(why) = &m.skipped {
            let _ = writeln!(out, "{:>10}", "skipped");
            notes.push(format!("{}: skipped: {why}", m.metric.name()));
            continue;
        }
        for c in cells(m, &run.readers) {
            let _ = write!(out, "{c:>10}");
        }
        out.push('\n');
        for p in &m.points {
            if p.errors > 0 {
                notes.push(format!(
                    "{}, {} reader(s): {} failed operations (not counted), e.g. {}",
                    m.metric.name(),
                    p.readers,
                    p.errors,
                    p.first_error.as_deref().unwrap_or("?")
                ));
            }
        }
    }
    let any_exhausted = run
        .metrics
        .iter()
        .flat_map(|m| &m.points)
        .any(|p| p.exhausted);
    if any_exhausted {
        notes.push(EXHAUSTED.into());
    }
    for n in notes {
        let _ = writeln!(out, "{n}");
    }
    out
}

/// The table of several runs: for each metric a line per run (its label and cache mode), a
/// column per reader count (the union of the runs' reader counts; `-` where a run did not
/// measure it).
pub fn compare_table(runs: &[Run]) -> String {
    let readers = all_readers(runs);
    let lw = runs
        .iter()
        .map(|r| r.label.len())
        .max()
        .unwrap_or(3)
        .clamp(3, 40);
    let mut rows = Vec::new();
    for m in Metric::ALL {
        for run in runs {
            let Some(r) = run.metric(m) else { continue };
            rows.push((
                m,
                metric_title(r, run.block_size),
                r.unit.clone(),
                &run.label,
                &run.cache,
                r.skipped.is_some(),
                cells(r, &readers),
            ));
        }
    }
    let tw = rows.iter().map(|r| r.1.len()).max().unwrap_or(6).max(6);
    let mut out = header(
        &[("metric", tw), ("unit  ", 6), ("run", lw), ("cache", 5)],
        &readers,
    );
    out.push('\n');
    let mut last = None;
    for (m, title, unit, label, cache, skipped, cells) in rows {
        let (title, unit) = if last == Some(m) {
            (String::new(), String::new())
        } else {
            (title, unit)
        };
        last = Some(m);
        let label: String = label.chars().take(lw).collect();
        let _ = write!(out, "{title:<tw$}  {unit:<6}  {label:<lw$}  {cache:<5}  ");
        if skipped {
            let _ = write!(out, "{:>10}", "skipped");
        } else {
            for c in cells {
                let _ = write!(out, "{c:>10}");
            }
        }
        out.push('\n');
    }
    if runs
        .iter()
        .flat_map(|r| &r.metrics)
        .flat_map(|m| &m.points)
        .any(|p| p.exhausted)
    {
        let _ = writeln!(out, "{EXHAUSTED}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cimgbench::{Point, TreeSummary};

    fn point(readers: usize, value: f64) -> Point {
        Point {
            readers,
            value,
            ops: 10,
            bytes: 0,
            secs: 1.0,
            latency_us: 1.0,
            errors: 0,
            first_error: None,
            exhausted: false,
        }
    }

    fn run(label: &str, cache: &str, readers: Vec<usize>, metrics: Vec<MetricResult>) -> Run {
        Run {
            tool: "cimg-bench".into(),
            version: "0".into(),
            label: label.into(),
            path: "/x".into(),
            command: "cimg-bench /x".into(),
            started_unix: 0,
            host: "h".into(),
            cores: 2,
            cache: cache.into(),
            duration_secs: 1.0,
            block_size: 1 << 20,
            readers,
            tree: TreeSummary::default(),
            big_files: vec![],
            metrics,
        }
    }

    fn result(metric: Metric, points: Vec<Point>, skipped: Option<&str>) -> MetricResult {
        MetricResult {
            metric,
            title: metric.title().into(),
            unit: metric.unit().into(),
            skipped: skipped.map(Into::into),
            points,
        }
    }

    #[test]
    fn run_table_marks_skips_errors_and_exhausted_values() {
        let mut failing = point(2, 1500.0);
        failing.errors = 3;
        failing.first_error = Some("open /x/y: Permission denied".into());
        let mut short = point(1, 42.5);
        short.exhausted = true;
        let r = run(
            "a",
            "cold",
            vec![1, 2],
            vec![
                result(Metric::SeqRead, vec![], Some("no file of at least 16 MiB")),
                result(Metric::Open, vec![short, failing], None),
            ],
        );
        let t = run_table(&r);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "metric                         unit      1 reader         2"
        );
        assert_eq!(
            lines[1],
            "sequential read (1 MiB reads)  MB/s       skipped"
        );
        assert_eq!(
            lines[2],
            "open + close                   ops/s       42.50*      1500"
        );
        assert_eq!(lines[3], "seq_read: skipped: no file of at least 16 MiB");
        assert!(
            lines[4].starts_with(
                "open, 2 reader(s): 3 failed operations (not counted), e.g. open /x/y"
            )
        );
        assert!(lines[5].starts_with("* every block or entry was used once"));
        assert_eq!(lines.len(), 6);
    }

    #[test]
    fn compare_table_lines_up_runs_and_reader_counts() {
        let a = run(
            "disk",
            "warm",
            vec![1, 2],
            vec![result(
                Metric::Stat,
                vec![point(1, 10.0), point(2, 20.0)],
                None,
            )],
        );
        let b = run(
            "fuse",
            "cold",
            vec![2, 4],
            vec![result(
                Metric::Stat,
                vec![point(2, 5.0), point(4, 7.0)],
                None,
            )],
        );
        let t = compare_table(&[a, b]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[0].ends_with("1 reader         2         4"), "{t}");
        assert!(
            lines[1].starts_with("stat (lstat)  ops/s   disk  warm"),
            "{t}"
        );
        assert!(lines[1].ends_with("10.00     20.00         -"), "{t}");
        assert!(
            lines[2].starts_with("                      fuse  cold"),
            "{t}"
        );
        assert!(lines[2].ends_with("-     5.000     7.000"), "{t}");
    }

    #[test]
    fn block_sizes() {
        assert_eq!(fmt_block(1 << 20), "1 MiB");
        assert_eq!(fmt_block(64 << 10), "64 KiB");
        assert_eq!(fmt_block(1536 << 10), "1536 KiB");
        assert_eq!(fmt_block(512), "512 B");
    }
}
