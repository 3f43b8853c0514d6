//! `pack-mem`: peak memory of `cimg pack` on a synthetic tree (default ~1 GiB).
//!
//! The tree is generated deterministically from a seed: many small files of text-like and
//! binary-like content, some multi-MiB files (text-like, binary-like and incompressible), exact
//! duplicates, a few hard links and symlinks. It is generated in a temporary directory (removed
//! at the end), or at `--keep DIR`, where it is reused by later runs with the same seed and size.
//! Exits with status 1 if the peak RSS of `cimg pack` exceeds `--limit` (default 512 MiB).

use anyhow::{Context, Result, bail};
use cimg_benches::{
    Synth, cimg_binary, command_line, file_size, human_bytes, measure, parse_size, read_tree,
};
use clap::Parser;
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

const STAMP: &str = ".pack-mem-tree";
const INCOMPLETE: &str = ".pack-mem-incomplete";
const GEN_VERSION: u32 = 2;

#[derive(Parser)]
#[command(
    name = "pack-mem",
    about = "Peak RSS of cimg pack on a synthetic ~1 GiB tree"
)]
struct Args {
    /// Generate the tree here (if not already generated with the same seed and size) and keep it.
    #[arg(long, value_name = "DIR")]
    keep: Option<PathBuf>,
    /// Approximate total size of file content.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    size: u64,
    /// PRNG seed of the tree.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Peak RSS that `cimg pack` must stay under.
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    limit: u64,
    /// Compression threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Block size.
    #[arg(long, default_value = "128K", value_parser = parse_size)]
    block_size: u64,
    /// zstd level (default: cimg's default, no --level flag).
    #[arg(long, allow_negative_numbers = true)]
    level: Option<i32>,
    /// Image to write (default: in a temporary directory, removed at the end).
    #[arg(long)]
    out: Option<PathBuf>,
    /// cimg binary (default: `cimg` next to this executable).
    #[arg(long)]
    cimg: Option<PathBuf>,
    /// Also write the result as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Serialize)]
struct ReportJson {
    tree: PathBuf,
    seed: u64,
    content_bytes: u64,
    files: u64,
    dirs: u64,
    symlinks: u64,
    command: String,
    wall_secs: f64,
    cpu_secs: f64,
    image_bytes: u64,
    dedup_saved_bytes: Option<u64>,
    max_rss_kib: u64,
    limit_bytes: u64,
    pass: bool,
}

fn main() -> ExitCode {
    cimg_benches::init();
    let args = Args::parse();
    match run(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("pack-mem: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn stamp_text(seed: u64, size: u64) -> String {
    format!("pack-mem tree v{GEN_VERSION} seed={seed} size={size}\n")
}

/// Makes sure `dir` holds the tree for (`seed`, `size`), generating it if needed.
fn ensure_tree(dir: &Path, seed: u64, size: u64) -> Result<()> {
    let want = stamp_text(seed, size);
    if dir.exists() {
        if std::fs::read_to_string(dir.join(STAMP)).is_ok_and(|s| s == want) {
            eprintln!("pack-mem: reusing the tree in {}", dir.display());
            return Ok(());
        }
        let empty = std::fs::read_dir(dir)
            .with_context(|| format!("read {}", dir.display()))?
            .next()
            .is_none();
        let ours =
            std::fs::read_to_string(dir.join(STAMP)).is_ok_and(|s| s.starts_with("pack-mem tree "));
        if ours || dir.join(INCOMPLETE).exists() {
            eprintln!(
                "pack-mem: removing the outdated or incomplete tree in {}",
                dir.display()
            );
            std::fs::remove_dir_all(dir).with_context(|| format!("remove {}", dir.display()))?;
        } else if !empty {
            bail!(
                "{} exists and is not a pack-mem tree of seed {seed} and size {size}: remove it or pick another --keep",
                dir.display()
            );
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    std::fs::write(dir.join(INCOMPLETE), b"")?;
    let t0 = Instant::now();
    let mut g = Gen::new(dir, seed);
    g.generate(size)
        .with_context(|| format!("generate the tree in {}", dir.display()))?;
    std::fs::remove_file(dir.join(INCOMPLETE))?;
    std::fs::write(dir.join(STAMP), want)?;
    eprintln!(
        "pack-mem: generated {} in {} files ({} duplicates, {} hard links, {} symlinks) in {:.1} s",
        human_bytes(g.total),
        g.files.len() + g.dups as usize,
        g.dups,
        g.hardlinks,
        g.symlinks,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

#[derive(Clone, Copy)]
enum Kind {
    Text,
    Binary,
    Random,
}

struct Gen {
    root: PathBuf,
    synth: Synth,
    /// Generated (not duplicated) files and their sizes.
    files: Vec<(PathBuf, u64)>,
    total: u64,
    dups: u64,
    hardlinks: u64,
    symlinks: u64,
    buf: Vec<u8>,
}

const CHUNK: usize = 256 << 10;

impl Gen {
    fn new(root: &Path, seed: u64) -> Self {
        Gen {
            root: root.to_path_buf(),
            synth: Synth::new(seed),
            files: vec![],
            total: 0,
            dups: 0,
            hardlinks: 0,
            symlinks: 0,
            buf: Vec::with_capacity(CHUNK + 4096),
        }
    }

    fn write_file(&mut self, path: PathBuf, size: u64, kind: Kind) -> Result<()> {
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)?;
        }
        let mut f =
            std::fs::File::create(&path).with_context(|| format!("create {}", path.display()))?;
        let mut left = size;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            self.buf.clear();
            match kind {
                Kind::Text => self.synth.text(&mut self.buf, n),
                Kind::Binary => self.synth.binary(&mut self.buf, n),
                Kind::Random => self.synth.random(&mut self.buf, n),
            }
            f.write_all(&self.buf)?;
            left -= n as u64;
        }
        self.total += size;
        self.files.push((path, size));
        Ok(())
    }

    fn generate(&mut self, size: u64) -> Result<()> {
        // ~40% in multi-MiB files.
        let mut i = 0;
        while self.total < size * 40 / 100 {
            let sz = self
                .synth
                .rng
                .range(2 << 20, 48 << 20)
                .min(size * 40 / 100 - self.total)
                .max(1);
            let (kind, ext) = match i % 3 {
                0 => (Kind::Binary, "so"),
                1 => (Kind::Text, "txt"),
                _ => (Kind::Random, "dat"),
            };
            let p = self.root.join(format!("big/b{i:03}.{ext}"));
            self.write_file(p, sz, kind)?;
            i += 1;
        }
        // ~45% in small files (64 B .. 64 KiB roughly log-uniform, 3% up to 1 MiB), 100 per directory,
        // 3 levels deep.
        let mut j = 0u64;
        while self.total < size * 85 / 100 {
            let (lo, top) = if self.synth.rng.chance(0.97) {
                (6, self.synth.rng.range(7, 16))
            } else {
                (16, self.synth.rng.range(17, 20))
            };
            let sz = self.synth.rng.range(1 << lo, 1 << top);
            let r = self.synth.rng.below(10);
            let (kind, ext) = match r {
                0..=4 => (Kind::Text, "txt"),
                5..=8 => (Kind::Binary, "bin"),
                _ => (Kind::Random, "dat"),
            };
            let leaf = j / 100;
            let p = self.root.join(format!(
                "small/d{:02}/d{:02}/d{:03}/f{:05}.{ext}",
                leaf / 1000,
                leaf / 100 % 10,
                leaf % 100,
                j
            ));
            self.write_file(p, sz, kind)?;
            j += 1;
        }
        // A few empty files.
        for k in 0..20 {
            let p = self.root.join(format!("small/empty{k:02}"));
            std::fs::File::create(&p)?;
        }
        // The rest: exact duplicates of earlier files (small ones mostly, by count).
        std::fs::create_dir_all(self.root.join("dup"))?;
        let generated = self.files.len() as u64;
        while self.total < size {
            let (src, sz) = self.files[self.synth.rng.below(generated) as usize].clone();
            let dst = self.root.join(format!(
                "dup/c{:05}-{}",
                self.dups,
                src.file_name().unwrap_or_default().to_string_lossy()
            ));
            std::fs::copy(&src, &dst)
                .with_context(|| format!("copy {} to {}", src.display(), dst.display()))?;
            self.total += sz;
            self.dups += 1;
        }
        // Hard links and symlinks (no extra content).
        std::fs::create_dir_all(self.root.join("links"))?;
        for k in 0..100 {
            let (src, _) = &self.files[self.synth.rng.below(generated) as usize];
            std::fs::hard_link(src, self.root.join(format!("links/h{k:03}")))?;
            self.hardlinks += 1;
        }
        for k in 0..1000 {
            let (src, _) = &self.files[self.synth.rng.below(generated) as usize];
            let rel = src.strip_prefix(&self.root).unwrap_or(src);
            std::os::unix::fs::symlink(
                Path::new("..").join(rel),
                self.root.join(format!("links/s{k:04}")),
            )?;
            self.symlinks += 1;
        }
        Ok(())
    }
}

fn run(args: Args) -> Result<bool> {
    let cimg = cimg_binary(args.cimg.as_deref())?;
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let tmp = tempfile::Builder::new()
        .prefix("pack-mem.")
        .tempdir()
        .context("create temporary directory")?;
    let tree = args.keep.clone().unwrap_or_else(|| tmp.path().join("tree"));
    ensure_tree(&tree, args.seed, args.size)?;
    let stats = read_tree(&tree, true);
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| tmp.path().join("tree.cimg"));
    let _ = std::fs::remove_file(&out);

    let mut cmd = Command::new(&cimg);
    cmd.arg("pack")
        .arg(&tree)
        .arg(&out)
        .arg("--block-size")
        .arg(args.block_size.to_string())
        .arg("--threads")
        .arg(threads.to_string())
        .arg("-q");
    if let Some(l) = args.level {
        cmd.arg("--level").arg(l.to_string());
    }
    let m = measure(&cmd)?;
    let image = file_size(&out)?;
    let dedup = Command::new(&cimg)
        .arg("info")
        .arg("--json")
        .arg(&out)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
        .and_then(|v| v.get("dedup_saved")?.as_u64());
    let rss = m.max_rss_kib * 1024;
    let pass = rss < args.limit;

    println!(
        "\n== pack-mem: {}: {} in {} files, {} dirs, {} symlinks (seed {}); threads {threads}, block {} ==",
        tree.display(),
        human_bytes(stats.bytes),
        stats.files,
        stats.dirs,
        stats.symlinks,
        args.seed,
        human_bytes(args.block_size)
    );
    println!(
        "{:>9} {:>9} {:>11} {:>6} {:>12} {:>11} {:>11}",
        "time s", "cpu s", "image", "ratio", "dedup saved", "peak RSS", "limit"
    );
    println!(
        "{:>9.2} {:>9.2} {:>11} {:>6.2} {:>12} {:>11} {:>11}",
        m.wall_secs,
        m.user_secs + m.sys_secs,
        human_bytes(image),
        stats.bytes as f64 / image.max(1) as f64,
        dedup.map_or("?".into(), human_bytes),
        human_bytes(rss),
        human_bytes(args.limit)
    );
    println!("command: {}", command_line(&cmd));
    println!(
        "{}: peak RSS {} {} the limit of {}",
        if pass { "PASS" } else { "FAIL" },
        human_bytes(rss),
        if pass { "is under" } else { "is NOT under" },
        human_bytes(args.limit)
    );

    if let Some(path) = &args.json {
        let j = ReportJson {
            tree: tree.clone(),
            seed: args.seed,
            content_bytes: stats.bytes,
            files: stats.files,
            dirs: stats.dirs,
            symlinks: stats.symlinks,
            command: command_line(&cmd),
            wall_secs: m.wall_secs,
            cpu_secs: m.user_secs + m.sys_secs,
            image_bytes: image,
            dedup_saved_bytes: dedup,
            max_rss_kib: m.max_rss_kib,
            limit_bytes: args.limit,
            pass,
        };
        std::fs::write(path, serde_json::to_string_pretty(&j)? + "\n")
            .with_context(|| format!("write {}", path.display()))?;
    }
    if args.keep.is_some() {
        eprintln!("pack-mem: tree kept in {}", tree.display());
    }
    Ok(pass)
}
