//! `cimg`: build and inspect `.cimg` images — pack, unpack, ls, cat, info, verify.
//!
//! Errors are one line, `cimg: what failed: why`, and a non-zero exit status (1 for a failed
//! operation or a failed verification, 2 for a bad command line).

use anyhow::{Context, Result, bail};
use cimg_format::reader::BlockCache;
use cimg_format::units::{human_bytes as human, parse_size};
use cimg_format::writer::{self, PackOptions};
use cimg_format::{FileKind, Image, import};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "cimg",
    version,
    about = "Build and inspect .cimg container images"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Pack a directory, a tar archive (plain, gzip, zstd, xz), a `docker save` archive, an
    /// OCI image layout (directory or oci-archive tar) or a SquashFS image into an image.
    Pack {
        /// Source: a directory, an archive, an OCI layout, a .sqfs; `-` for standard input (a
        /// redirected file, not a pipe: archives are read twice).
        src: PathBuf,
        /// Image file to write (replaced atomically when complete).
        out: PathBuf,
        /// Block size, a power of two from 4K to 1M.
        #[arg(long, default_value = "128K", value_parser = parse_size)]
        block_size: u64,
        /// zstd compression level (1..=22).
        #[arg(long, default_value_t = 9, allow_negative_numbers = true)]
        level: i32,
        /// Compression threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// File listing paths to lay out first (one per line), as recorded by `cimg-mount
        /// --record-hot`.
        #[arg(long)]
        hot: Option<PathBuf>,
        /// Layout of files not on the hot list: `dir` (directory order) or `type` (grouped
        /// by extension: smaller images, as similar small files share blocks).
        #[arg(long, default_value = "dir", value_parser = ["dir", "type"])]
        order: String,
        /// Record every entry as owned by root (0:0).
        #[arg(long)]
        root_owned: bool,
        /// Kind of source, instead of detecting it.
        #[arg(long, value_parser = ["dir", "tar", "docker", "oci", "sqfs"])]
        from: Option<String>,
        /// Image to take when the source holds several: an OCI ref name
        /// (org.opencontainers.image.ref.name) or a `docker save` repo tag.
        #[arg(long = "ref")]
        reference: Option<String>,
        /// Platform os/arch[/variant] to take from a multi-platform image.
        #[arg(long, default_value = "linux/amd64")]
        platform: String,
        /// No progress bar or summary.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Unpack an image into a directory that does not exist or is empty.
    ///
    /// Run as root, it recreates everything the image holds: owners and groups, setuid and
    /// setgid bits, device nodes, and all xattrs including trusted.* and security.* (file
    /// capabilities, SELinux labels). Unpack only images you trust as root, or use
    /// --no-same-owner and --no-devices. Run as another user, it recreates what that user
    /// may: device nodes, foreign owners and trusted.*/security.* xattrs are skipped with one
    /// warning at the end. Nothing outside DIR is touched, even if DIR or its parents are
    /// renamed or replaced by symlinks meanwhile.
    Unpack {
        /// Image file.
        img: PathBuf,
        /// Target directory.
        dir: PathBuf,
        /// Do not create device nodes.
        #[arg(long)]
        no_devices: bool,
        /// Do not give entries the image's owners, even as root: all belong to the caller.
        #[arg(long)]
        no_same_owner: bool,
        /// No progress bar.
        #[arg(short, long)]
        quiet: bool,
    },
    /// List a directory of the image (or one entry).
    Ls {
        /// Image file.
        img: PathBuf,
        /// Path inside the image (default: the root).
        #[arg(default_value = "/")]
        path: String,
        /// Long listing: mode, links, owner, size, time.
        #[arg(short, long)]
        long: bool,
        /// List subdirectories recursively.
        #[arg(short = 'R', long)]
        recursive: bool,
    },
    /// Write a file of the image to standard output.
    Cat {
        /// Image file.
        img: PathBuf,
        /// Path inside the image.
        path: String,
    },
    /// Show what an image holds.
    Info {
        /// Image file.
        img: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Check every checksum of an image; exit 0 only if all hold.
    Verify {
        /// Image file.
        img: PathBuf,
        /// Print nothing on success.
        #[arg(short, long)]
        quiet: bool,
    },
}

fn bar(quiet: bool, len: u64, what: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    pb.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_message(what.to_string());
    pb
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "cimg: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// SIGINT, SIGTERM and SIGHUP stop a pack without leaving its partial image: they are
/// blocked in this thread, and so in every thread spawned after (the mask is inherited), and
/// one thread waits for them, removes the named temporaries not yet renamed
/// ([`cimg_format::output::exit_removing_pending`]) and exits with 128 + the signal's number,
/// the status a shell reports for a death by that signal. An anonymous temporary (`O_TMPFILE`)
/// needs nothing: it goes with the process.
///
/// `sigwait` in a thread of its own (nix's `SigSet::wait`) rather than a handler (what the
/// `signal-hook` crate registers): a handler may only call async-signal-safe functions, so
/// it could not take the registry's lock or unlink files and would need such a thread
/// anyway; nix is a dependency already. Only `pack` does this: the other commands leave
/// nothing behind, and keep the default dispositions.
fn stop_on_signals() -> Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut sigs = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        sigs.add(s);
    }
    sigs.thread_block()?;
    std::thread::Builder::new()
        .name("cimg-signals".into())
        .spawn(move || {
            match sigs.wait() {
                Ok(sig) => cimg_format::output::exit_removing_pending(128 + sig as i32),
                // The wait itself failed (it does not, short of EINVAL): this thread takes
                // the signals with their default action, killing the process.
                Err(_) => {
                    let _ = sigs.thread_unblock();
                    loop {
                        std::thread::park();
                    }
                }
            }
        })?;
    Ok(())
}

fn open(img: &PathBuf) -> Result<Image> {
    Image::open(img).with_context(|| format!("open {}", img.display()))
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Pack {
            src,
            out,
            block_size,
            level,
            threads,
            hot,
            order,
            root_owned,
            from,
            reference,
            platform,
            quiet,
        } => {
            // First, while this is the only thread: the mask is inherited by the threads the
            // pack spawns.
            stop_on_signals().context("pack: signal handling")?;
            if !block_size.is_power_of_two() || !(4096..=1 << 20).contains(&block_size) {
                bail!("pack: block size {block_size} is not a power of two from 4K to 1M");
            }
            let mut opts = PackOptions {
                block_log: block_size.trailing_zeros() as u8,
                level,
                root_owned,
                order: if order == "type" {
                    writer::Order::Type
                } else {
                    writer::Order::Dir
                },
                ..PackOptions::default()
            };
            if let Some(t) = threads {
                opts.threads = t.max(1);
            }
            if let Some(h) = &hot {
                let text = std::fs::read(h)
                    .with_context(|| format!("pack: read hot list {}", h.display()))?;
                opts.hot = writer::parse_hot_list(&text);
            }
            let ctx = || format!("pack {}", src.display());
            let kind = match &from {
                Some(f) => import::Kind::parse(f).context("pack: bad --from")?,
                None => import::detect(&src).with_context(ctx)?,
            };
            let pb = bar(quiet, 0, "packing");
            let progress = |done, total| {
                pb.set_length(total);
                pb.set_position(done);
            };
            let stats = if kind == import::Kind::Dir {
                let tree = writer::scan_dir(&src, |_| {}).with_context(ctx)?;
                writer::pack_tree(&tree, &out, &opts, &progress).with_context(ctx)?
            } else {
                let io = import::ImportOptions {
                    reference,
                    platform: Some(platform),
                };
                import::pack(kind, &src, &out, &io, &opts, &progress).with_context(ctx)?
            };
            pb.finish_and_clear();
            if !quiet {
                eprintln!(
                    "{}: {} inodes, {} in {} blocks -> {} (ratio {:.2}, dedup saved {}){}",
                    out.display(),
                    stats.inodes,
                    human(stats.logical_bytes),
                    stats.blocks,
                    human(stats.image_size),
                    stats.logical_bytes as f64 / stats.image_size.max(1) as f64,
                    human(stats.dedup_bytes),
                    if stats.hot_missing > 0 {
                        format!(", {} hot-list paths not found", stats.hot_missing)
                    } else {
                        String::new()
                    }
                );
            }
        }
        Cmd::Unpack {
            img,
            dir,
            no_devices,
            no_same_owner,
            quiet,
        } => {
            let image = open(&img)?;
            let pb = bar(quiet, image.header().logical_bytes.get(), "unpacking");
            let opts = cimg_format::unpack::UnpackOptions {
                devices: !no_devices,
                same_owner: !no_same_owner,
            };
            let stats = cimg_format::unpack::unpack_with(&image, &dir, &opts, |n| pb.inc(n))
                .with_context(|| format!("unpack {} into {}", img.display(), dir.display()))?;
            pb.finish_and_clear();
            // Shown even with --quiet: the tree is not what the image holds.
            if let Some(w) = stats.warning() {
                eprintln!("cimg: warning: {w}");
            }
        }
        Cmd::Ls {
            img,
            path,
            long,
            recursive,
        } => {
            let image = open(&img)?;
            let ctx = || format!("ls {}", path);
            let ino = image.resolve(path.as_bytes()).with_context(ctx)?;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let attr = image.attr(ino).with_context(ctx)?;
            let r = if attr.kind != FileKind::Dir {
                print_entry(&mut out, &image, path.as_bytes(), ino, long)
            } else if recursive {
                let base = path.trim_matches('/').as_bytes().to_vec();
                let mut res = Ok(());
                image
                    .walk(|rel, e| {
                        if !rel.starts_with(&base) {
                            return Ok(());
                        }
                        res = print_entry(&mut out, &image, rel, e.ino, long);
                        Ok(())
                    })
                    .with_context(ctx)?;
                res
            } else {
                let mut res = Ok(());
                for e in image.readdir(ino).with_context(ctx)? {
                    let e = e.with_context(ctx)?;
                    res = res.and_then(|()| print_entry(&mut out, &image, e.name, e.ino, long));
                }
                res
            };
            match r.and_then(|()| Ok(out.flush()?)) {
                Err(e) if is_broken_pipe(&e) => {}
                r => r?,
            }
        }
        Cmd::Cat { img, path } => {
            let image = open(&img)?;
            let ctx = || format!("cat {path}");
            let ino = image.resolve(path.as_bytes()).with_context(ctx)?;
            let a = image.attr(ino).with_context(ctx)?;
            if a.kind != FileKind::File {
                bail!("cat {path}: not a regular file");
            }
            let mut cache = BlockCache::new(2);
            let mut buf = vec![0u8; image.block_size() as usize];
            let mut stdout = std::io::stdout().lock();
            let mut off = 0;
            while off < a.size {
                let n = cache
                    .read_at(&image, ino, off, &mut buf)
                    .with_context(ctx)?;
                if n == 0 {
                    break;
                }
                if let Err(e) = stdout.write_all(&buf[..n]) {
                    if e.kind() == std::io::ErrorKind::BrokenPipe {
                        return Ok(ExitCode::SUCCESS);
                    }
                    return Err(e).context("cat: write to standard output");
                }
                off += n as u64;
            }
            let _ = stdout.flush();
        }
        Cmd::Info { img, json } => {
            let image = open(&img)?;
            info(&image, json)?;
        }
        Cmd::Verify { img, quiet } => {
            let image = open(&img)?;
            let pb = bar(
                quiet,
                image.summary().data.end - image.summary().data.start,
                "verifying",
            );
            let bad = image
                .verify(|n| pb.inc(n))
                .with_context(|| format!("verify {}", img.display()))?;
            pb.finish_and_clear();
            if bad.is_empty() {
                if !quiet {
                    emit(&format!(
                        "{}: ok, {} blocks, digest {:032x}\n",
                        img.display(),
                        image.block_count(),
                        image.summary().digest
                    ))?;
                }
            } else {
                for e in &bad {
                    let users = match e {
                        cimg_format::Error::BadBlock { block, .. } => image
                            .files_using_block(*block)
                            .unwrap_or_default()
                            .iter()
                            .map(|p| String::from_utf8_lossy(p).into_owned())
                            .collect::<Vec<_>>(),
                        _ => Vec::new(),
                    };
                    let users = if users.is_empty() {
                        String::new()
                    } else {
                        format!(" (used by {})", users.join(", "))
                    };
                    eprintln!("cimg: verify {}: {e}{users}", img.display());
                }
                eprintln!(
                    "cimg: verify {}: {} problem(s) found",
                    img.display(),
                    bad.len()
                );
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Write to standard output; a closed pipe (`cimg info | head`) is not an error.
fn emit(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r.context("write to standard output")?),
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}

fn print_entry(out: &mut impl Write, img: &Image, name: &[u8], ino: u32, long: bool) -> Result<()> {
    if !long {
        out.write_all(name)?;
        out.write_all(b"\n")?;
        return Ok(());
    }
    let a = img.attr(ino)?;
    let size = match a.kind {
        FileKind::CharDev | FileKind::BlockDev => {
            format!(
                "{}, {}",
                nix::sys::stat::major(a.rdev),
                nix::sys::stat::minor(a.rdev)
            )
        }
        _ => a.size.to_string(),
    };
    write!(
        out,
        "{}{} {:>3} {:>5} {:>5} {:>10} {} ",
        a.kind.letter(),
        perm_string(a.perm()),
        a.nlink,
        a.uid,
        a.gid,
        size,
        date(a.mtime_sec)
    )?;
    out.write_all(name)?;
    if a.kind == FileKind::Symlink {
        out.write_all(b" -> ")?;
        out.write_all(img.readlink(ino)?)?;
    }
    out.write_all(b"\n")?;
    Ok(())
}

fn perm_string(p: u32) -> String {
    let mut s: Vec<u8> = b"rwxrwxrwx".to_vec();
    for (i, c) in s.iter_mut().enumerate() {
        if p & (0o400 >> i) == 0 {
            *c = b'-';
        }
    }
    let special = |s: &mut Vec<u8>, i: usize, bit: u32, on: u8, off: u8| {
        if p & bit != 0 {
            s[i] = if s[i] == b'-' { off } else { on };
        }
    };
    special(&mut s, 2, 0o4000, b's', b'S');
    special(&mut s, 5, 0o2000, b's', b'S');
    special(&mut s, 8, 0o1000, b't', b'T');
    String::from_utf8_lossy(&s).into_owned()
}

/// `YYYY-MM-DD HH:MM` in UTC (days-from-civil inverse, after Howard Hinnant).
fn date(secs: i64) -> String {
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60
    )
}

fn info(img: &Image, json: bool) -> Result<()> {
    use std::fmt::Write as _;
    let mut o = String::new();
    let s = img.summary();
    let h = img.header();
    let mut counts = std::collections::BTreeMap::<&str, u64>::new();
    let mut hardlinked = 0u64;
    for ino in 1..=img.inode_count() {
        let a = img.attr(ino)?;
        let k = match a.kind {
            FileKind::File => "files",
            FileKind::Dir => "directories",
            FileKind::Symlink => "symlinks",
            FileKind::CharDev | FileKind::BlockDev => "devices",
            FileKind::Fifo => "fifos",
            FileKind::Socket => "sockets",
        };
        *counts.entry(k).or_default() += 1;
        if a.kind != FileKind::Dir && a.nlink > 1 {
            hardlinked += 1;
        }
    }
    let logical = h.logical_bytes.get();
    let ratio = logical as f64 / s.image_size.max(1) as f64;
    let config: Option<serde_json::Value> = img
        .config()
        .and_then(cimg_format::ImageConfig::parse)
        .and_then(|c| serde_json::to_value(c).ok());
    if json {
        let v = serde_json::json!({
            "version": format!("{}.{}", s.version.0, s.version.1),
            "image_size": s.image_size,
            "data_size": s.data.end - s.data.start,
            "metadata_size": s.meta.end - s.meta.start,
            "metadata_raw_size": s.meta_raw_len,
            "logical_size": logical,
            "ratio": ratio,
            "dedup_saved": h.dedup_bytes.get(),
            "block_size": s.block_size,
            "level": s.level,
            "blocks": img.block_count(),
            "hot_blocks": s.hot_blocks,
            "inodes": img.inode_count(),
            "counts": counts,
            "hardlinked_inodes": hardlinked,
            "compat_features": s.compat,
            "incompat_features": s.incompat,
            "digest": format!("{:032x}", s.digest),
            "config": config,
        });
        writeln!(o, "{}", serde_json::to_string_pretty(&v)?)?;
        return emit(&o);
    }
    writeln!(o, "format version   {}.{}", s.version.0, s.version.1)?;
    writeln!(
        o,
        "image size       {} ({} bytes)",
        human(s.image_size),
        s.image_size
    )?;
    writeln!(o, "  data           {}", human(s.data.end - s.data.start))?;
    writeln!(
        o,
        "  metadata       {} ({} decompressed)",
        human(s.meta.end - s.meta.start),
        human(s.meta_raw_len)
    )?;
    writeln!(o, "content          {} ({} bytes)", human(logical), logical)?;
    writeln!(o, "ratio            {ratio:.2}")?;
    writeln!(o, "dedup saved      {}", human(h.dedup_bytes.get()))?;
    writeln!(o, "block size       {}", human(s.block_size as u64))?;
    writeln!(o, "zstd level       {}", s.level)?;
    writeln!(
        o,
        "blocks           {} ({} hot)",
        img.block_count(),
        s.hot_blocks
    )?;
    writeln!(o, "inodes           {}", img.inode_count())?;
    for (k, v) in &counts {
        writeln!(o, "  {k:<14} {v}")?;
    }
    writeln!(o, "digest           {:032x}", s.digest)?;
    if let Some(c) = config {
        writeln!(o, "config           {c}")?;
    }
    emit(&o)
}
