//! `pack-bench`: `cimg pack` against `mksquashfs -comp zstd` on the same corpus, in one run.
//!
//! For each corpus: one untimed pass reads every file (so every tool sees a warm page cache),
//! then each run times every configuration (order rotated between runs), recording wall time,
//! CPU time, image size and peak RSS. Prints medians and ratios against the first mksquashfs
//! configuration, and the exact command lines used.

use anyhow::{Context, Result, bail};
use cimg_benches::{
    Measurement, TreeStats, cimg_binary, command_line, cores, file_size, find_program, human_bytes,
    measure, median, parse_size, read_tree, slug,
};
use clap::Parser;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

/// mksquashfs's zstd level when `-Xcompression-level` is not given (`mksquashfs -help`).
const SQFS_DEFAULT_ZSTD_LEVEL: i32 = 15;
/// The highest zstd level.
const MAX_LEVEL: i32 = 22;

#[derive(Parser)]
#[command(
    name = "pack-bench",
    about = "Time cimg pack against mksquashfs (zstd) on the same corpus"
)]
struct Args {
    /// Corpus directory (repeatable).
    #[arg(long = "corpus", value_name = "DIR", default_value = "/usr")]
    corpora: Vec<PathBuf>,
    /// Timed runs per configuration (medians are reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Compression threads for both tools (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Block size for both tools, a power of two from 4K to 1M.
    #[arg(long, default_value = "128K", value_parser = parse_size)]
    block_size: u64,
    /// cimg zstd levels, comma-separated: a number, `default` (no --level flag) or `max` (22).
    #[arg(long, value_delimiter = ',', default_value = "default,max", value_parser = parse_level)]
    levels: Vec<Level>,
    /// mksquashfs zstd levels, comma-separated: a number (-Xcompression-level N), `default` (15)
    /// or `max` (22). Ratios are against the first.
    #[arg(long, alias = "sqfs-level", value_delimiter = ',', default_value = "default", value_parser = parse_level)]
    sqfs_levels: Vec<Level>,
    /// Directory for the images (kept); default: a temporary directory, removed at the end.
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// cimg binary (default: `cimg` next to this executable).
    #[arg(long)]
    cimg: Option<PathBuf>,
    /// mksquashfs binary.
    #[arg(long, default_value = "mksquashfs")]
    mksquashfs: PathBuf,
    /// Skip the untimed warm-up read of the corpus.
    #[arg(long)]
    no_warmup: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Level {
    Default,
    N(i32),
}

fn parse_level(s: &str) -> Result<Level, String> {
    match s.trim() {
        "default" | "def" => Ok(Level::Default),
        "max" => Ok(Level::N(MAX_LEVEL)),
        n => n
            .parse::<i32>()
            .map(Level::N)
            .map_err(|_| format!("{n:?} is not a level (a number, `default` or `max`)")),
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Tool {
    Mksquashfs,
    Cimg,
}

impl Tool {
    fn name(self) -> &'static str {
        match self {
            Tool::Mksquashfs => "mksquashfs",
            Tool::Cimg => "cimg",
        }
    }
}

struct Config {
    tool: Tool,
    level: Level,
    out: PathBuf,
    cmd: Command,
    samples: Vec<(Measurement, u64)>,
}

#[derive(Serialize)]
struct RunJson {
    wall_secs: f64,
    user_secs: f64,
    sys_secs: f64,
    max_rss_kib: u64,
    image_bytes: u64,
}

#[derive(Serialize)]
struct ResultJson {
    tool: &'static str,
    /// The zstd level actually used (from `cimg info --json` for cimg), if known.
    level: Option<i32>,
    level_is_default: bool,
    command: String,
    median_wall_secs: f64,
    median_cpu_secs: f64,
    median_image_bytes: u64,
    median_max_rss_kib: u64,
    /// Median time / median time of the baseline (first mksquashfs configuration).
    time_ratio_vs_mksquashfs: f64,
    size_ratio_vs_mksquashfs: f64,
    /// Corpus bytes / image bytes.
    compression_ratio: f64,
    runs: Vec<RunJson>,
}

#[derive(Serialize)]
struct CorpusJson {
    corpus: PathBuf,
    tree: TreeStats,
    results: Vec<ResultJson>,
}

#[derive(Serialize)]
struct ReportJson {
    cores: usize,
    threads: usize,
    block_size: u64,
    runs: usize,
    corpora: Vec<CorpusJson>,
}

fn main() -> ExitCode {
    cimg_benches::init();
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pack-bench: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn level_tag(l: Level) -> String {
    match l {
        Level::Default => "default".into(),
        Level::N(n) => format!("L{n}"),
    }
}

/// The zstd level recorded in a cimg image (`cimg info --json`).
fn cimg_image_level(cimg: &Path, img: &Path) -> Option<i32> {
    let out = Command::new(cimg)
        .arg("info")
        .arg("--json")
        .arg(img)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v.get("level")?.as_i64().map(|l| l as i32)
}

fn run(args: Args) -> Result<()> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let bs = args.block_size;
    if !bs.is_power_of_two() || !(4096..=1 << 20).contains(&bs) {
        bail!("block size {bs} is not a power of two from 4K to 1M");
    }
    if args.levels.is_empty() && args.sqfs_levels.is_empty() {
        bail!("nothing to run: no --levels and no --sqfs-levels");
    }
    let mksquashfs = find_program(&args.mksquashfs).with_context(|| {
        format!(
            "{} not found (install squashfs-tools, or pass --mksquashfs PATH)",
            args.mksquashfs.display()
        )
    })?;
    let cimg = cimg_binary(args.cimg.as_deref())?;
    let threads = args.threads.unwrap_or_else(cores);
    let _tmp;
    let out_dir = match &args.out_dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
            d.clone()
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("pack-bench.")
                .tempdir()
                .context("create temporary directory")?;
            let p = t.path().to_path_buf();
            _tmp = t;
            p
        }
    };

    let mut report = ReportJson {
        cores: cores(),
        threads,
        block_size: bs,
        runs: args.runs,
        corpora: vec![],
    };
    let mut text = String::new();
    for corpus in &args.corpora {
        if !corpus.is_dir() {
            bail!("corpus {} is not a directory", corpus.display());
        }
        let t0 = Instant::now();
        let tree = read_tree(corpus, !args.no_warmup);
        eprintln!(
            "pack-bench: {} {}: {} in {} files ({:.1} s){}",
            if args.no_warmup {
                "scanned"
            } else {
                "warm-up read of"
            },
            corpus.display(),
            human_bytes(tree.bytes),
            tree.files,
            t0.elapsed().as_secs_f64(),
            if tree.errors > 0 {
                format!(", {} unreadable entries", tree.errors)
            } else {
                String::new()
            }
        );

        let mut configs: Vec<Config> = vec![];
        for &level in &args.sqfs_levels {
            let out = out_dir.join(format!("{}-sqfs-{}.sqfs", slug(corpus), level_tag(level)));
            let mut cmd = Command::new(&mksquashfs);
            cmd.arg(corpus).arg(&out).args(["-comp", "zstd"]);
            if let Level::N(n) = level {
                cmd.arg("-Xcompression-level").arg(n.to_string());
            }
            cmd.arg("-processors")
                .arg(threads.to_string())
                .arg("-b")
                .arg(bs.to_string())
                .args(["-noappend", "-quiet", "-no-progress"]);
            configs.push(Config {
                tool: Tool::Mksquashfs,
                level,
                out,
                cmd,
                samples: vec![],
            });
        }
        for &level in &args.levels {
            let out = out_dir.join(format!("{}-cimg-{}.cimg", slug(corpus), level_tag(level)));
            let mut cmd = Command::new(&cimg);
            cmd.arg("pack")
                .arg(corpus)
                .arg(&out)
                .arg("--block-size")
                .arg(bs.to_string())
                .arg("--threads")
                .arg(threads.to_string())
                .arg("-q");
            if let Level::N(n) = level {
                cmd.arg("--level").arg(n.to_string());
            }
            configs.push(Config {
                tool: Tool::Cimg,
                level,
                out,
                cmd,
                samples: vec![],
            });
        }

        let n = configs.len();
        for r in 0..args.runs {
            for k in 0..n {
                let c = &mut configs[(k + r) % n];
                match std::fs::remove_file(&c.out) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e).with_context(|| format!("remove {}", c.out.display())),
                }
                // Flush the previous tool's dirty pages so they are not written back on this one's time.
                nix::unistd::sync();
                let m = measure(&c.cmd)?;
                let size = file_size(&c.out)?;
                eprintln!(
                    "pack-bench: run {}/{} {} {}: {:.2} s, {}, peak RSS {}",
                    r + 1,
                    args.runs,
                    c.tool.name(),
                    level_tag(c.level),
                    m.wall_secs,
                    human_bytes(size),
                    human_bytes(m.max_rss_kib * 1024)
                );
                c.samples.push((m, size));
            }
        }

        let med = |c: &Config| {
            let w: Vec<f64> = c.samples.iter().map(|s| s.0.wall_secs).collect();
            let cpu: Vec<f64> = c
                .samples
                .iter()
                .map(|s| s.0.user_secs + s.0.sys_secs)
                .collect();
            let sz: Vec<f64> = c.samples.iter().map(|s| s.1 as f64).collect();
            let rss: Vec<f64> = c.samples.iter().map(|s| s.0.max_rss_kib as f64).collect();
            (
                median(&w),
                median(&cpu),
                median(&sz) as u64,
                median(&rss) as u64,
            )
        };
        let base = configs
            .iter()
            .find(|c| c.tool == Tool::Mksquashfs)
            .map(&med);
        let mut results = vec![];
        for c in &configs {
            let (wall, cpu, size, rss) = med(c);
            let level = match (c.tool, c.level) {
                (_, Level::N(n)) => Some(n),
                (Tool::Mksquashfs, Level::Default) => Some(SQFS_DEFAULT_ZSTD_LEVEL),
                (Tool::Cimg, Level::Default) => cimg_image_level(&cimg, &c.out),
            };
            let (tr, sr) = base.map_or((f64::NAN, f64::NAN), |b| {
                (wall / b.0, size as f64 / b.2 as f64)
            });
            results.push(ResultJson {
                tool: c.tool.name(),
                level,
                level_is_default: c.level == Level::Default,
                command: command_line(&c.cmd),
                median_wall_secs: wall,
                median_cpu_secs: cpu,
                median_image_bytes: size,
                median_max_rss_kib: rss,
                time_ratio_vs_mksquashfs: tr,
                size_ratio_vs_mksquashfs: sr,
                compression_ratio: tree.bytes as f64 / size.max(1) as f64,
                runs: c
                    .samples
                    .iter()
                    .map(|(m, s)| RunJson {
                        wall_secs: m.wall_secs,
                        user_secs: m.user_secs,
                        sys_secs: m.sys_secs,
                        max_rss_kib: m.max_rss_kib,
                        image_bytes: *s,
                    })
                    .collect(),
            });
        }
        let corpus_json = CorpusJson {
            corpus: corpus.clone(),
            tree,
            results,
        };
        let table = format_table(&corpus_json, threads, bs, args.runs, !args.no_warmup);
        print!("{table}");
        text.push_str(&table);
        report.corpora.push(corpus_json);
    }
    if let Some(path) = &args.json {
        let j = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, j + "\n").with_context(|| format!("write {}", path.display()))?;
        eprintln!("pack-bench: wrote {}", path.display());
    }
    if args.out_dir.is_some() {
        eprintln!("pack-bench: images kept in {}", out_dir.display());
    }
    Ok(())
}

fn format_table(c: &CorpusJson, threads: usize, bs: u64, runs: usize, warm: bool) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let t = &c.tree;
    let _ = writeln!(
        s,
        "\n== {}: {} in {} files, {} dirs, {} symlinks{}; threads {threads} of {} cores, block {}, {} run{} (medians) ==",
        c.corpus.display(),
        human_bytes(t.bytes),
        t.files,
        t.dirs,
        t.symlinks,
        if warm { " (page cache warmed)" } else { "" },
        cores(),
        human_bytes(bs),
        runs,
        if runs == 1 { "" } else { "s" }
    );
    let _ = writeln!(
        s,
        "{:<11} {:<13} {:>9} {:>9} {:>11} {:>6} {:>10} {:>10} {:>11}",
        "tool",
        "zstd level",
        "time s",
        "cpu s",
        "image",
        "ratio",
        "time/sqfs",
        "size/sqfs",
        "peak RSS"
    );
    for r in &c.results {
        let level = match (r.level, r.level_is_default) {
            (Some(l), true) => format!("{l} (default)"),
            (Some(l), false) => l.to_string(),
            (None, _) => "default".into(),
        };
        let _ = writeln!(
            s,
            "{:<11} {:<13} {:>9.2} {:>9.2} {:>11} {:>6.2} {:>10.2} {:>10.3} {:>11}",
            r.tool,
            level,
            r.median_wall_secs,
            r.median_cpu_secs,
            human_bytes(r.median_image_bytes),
            r.compression_ratio,
            r.time_ratio_vs_mksquashfs,
            r.size_ratio_vs_mksquashfs,
            human_bytes(r.median_max_rss_kib * 1024)
        );
    }
    let _ = writeln!(s, "commands:");
    for r in &c.results {
        let _ = writeln!(s, "  {}", r.command);
    }
    s
}
