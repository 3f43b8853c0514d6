//! cimg-benches: benchmarks of cimg against its peers (mksquashfs, squashfuse, kernel squashfs,
//! Charliecloud), and helpers shared by the benchmark binaries.
//!
//! The binaries are `pack-bench` (cimg pack vs mksquashfs: time, size, peak memory), `pack-mem`
//! (peak memory of `cimg pack` on a synthetic ~1 GB tree) and `fuse-bench` (cimg-mount vs
//! squashfuse_ll vs kernel squashfs: mount time, walks, reads, daemon RSS). See `README.md`.
//!
//! # Measuring a child
//!
//! [`measure`] reports the wall time, CPU time and peak resident set size of one command. The
//! peak RSS comes from `getrusage(RUSAGE_CHILDREN)`, which is a maximum over *all* children a
//! process ever waited for, so it cannot tell two successive commands apart. `measure` therefore
//! re-executes the current binary as a tiny shim (selected by an environment variable) that runs
//! exactly one command, waits for it and reports its usage. Every binary that calls [`measure`]
//! must call [`init`] first thing in `main`.

pub mod cimgbench;
pub mod pfssim;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Environment variable that turns a benchmark binary into the measuring shim; its value is the
/// file the shim writes its report to.
const SHIM_ENV: &str = "CIMG_BENCH_MEASURE_REPORT";

static SHIM_READY: AtomicBool = AtomicBool::new(false);

/// Call first thing in `main` of every binary that uses [`measure`]: when the process was started
/// as the measuring shim it runs the command, reports, and exits here.
pub fn init() {
    if let Some(report) = std::env::var_os(SHIM_ENV) {
        std::process::exit(run_shim(&report));
    }
    SHIM_READY.store(true, Ordering::Relaxed);
}

fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

fn run_shim(report: &OsStr) -> i32 {
    let mut args = std::env::args_os().skip(1);
    let Some(prog) = args.next() else {
        eprintln!("measure shim: no command given");
        return 125;
    };
    let start = Instant::now();
    let status = Command::new(&prog).args(args).env_remove(SHIM_ENV).status();
    let wall = start.elapsed().as_secs_f64();
    let status = match status {
        Ok(s) => s,
        Err(e) => {
            eprintln!("measure shim: cannot run {}: {e}", prog.to_string_lossy());
            return 127;
        }
    };
    let code = exit_code(status);
    let usage = match nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("measure shim: getrusage: {e}");
            return 125;
        }
    };
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    let line = format!(
        "{wall} {} {} {} {code}\n",
        secs(usage.user_time()),
        secs(usage.system_time()),
        usage.max_rss()
    );
    if let Err(e) = std::fs::write(report, line) {
        eprintln!("measure shim: write report: {e}");
        return 125;
    }
    code
}

/// Resources used by one command.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Measurement {
    /// Wall-clock seconds from spawn to exit.
    pub wall_secs: f64,
    /// CPU seconds in user mode (all threads and descendants).
    pub user_secs: f64,
    /// CPU seconds in kernel mode (all threads and descendants).
    pub sys_secs: f64,
    /// Peak resident set size in KiB (the largest process of the command and its descendants).
    pub max_rss_kib: u64,
}

/// Runs `cmd` (program, arguments, environment and working directory are taken from it; its
/// standard streams are inherited) and reports its wall time, CPU time and peak RSS. Fails if it
/// does not exit with status 0. Needs [`init`] to have been called in `main`.
pub fn measure(cmd: &Command) -> Result<Measurement> {
    if !SHIM_READY.load(Ordering::Relaxed) {
        bail!("measure: cimg_benches::init() was not called at the start of main");
    }
    let report = tempfile::NamedTempFile::new().context("measure: create report file")?;
    let mut shim = Command::new(std::env::current_exe().context("measure: find own executable")?);
    shim.arg(cmd.get_program())
        .args(cmd.get_args())
        .env(SHIM_ENV, report.path());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => shim.env(k, v),
            None => shim.env_remove(k),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        shim.current_dir(dir);
    }
    let line = command_line(cmd);
    let status = shim.status().with_context(|| format!("run {line}"))?;
    if !status.success() {
        bail!("`{line}` failed with exit status {}", exit_code(status));
    }
    let text = std::fs::read_to_string(report.path()).context("measure: read report")?;
    let f: Vec<&str> = text.split_whitespace().collect();
    let parse = |i: usize| -> Result<f64> {
        f.get(i)
            .and_then(|s| s.parse::<f64>().ok())
            .with_context(|| format!("measure: bad report {text:?}"))
    };
    Ok(Measurement {
        wall_secs: parse(0)?,
        user_secs: parse(1)?,
        sys_secs: parse(2)?,
        max_rss_kib: parse(3)? as u64,
    })
}

/// Quotes one word for a POSIX shell (only when needed).
pub fn shell_quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+%@".contains(c));
    if plain {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The command line of `cmd` as a shell would run it.
pub fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(shell_quote)
        .collect::<Vec<_>>()
        .join(" ")
}

pub use cimg_format::units::{human_bytes, parse_size};

/// Number of cores this process may use.
pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// A file-name-safe form of a path (`/usr/share` → `usr_share`; `/` → `root`).
pub fn slug(p: &Path) -> String {
    let s: String = p
        .to_string_lossy()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let s = s.trim_matches('_');
    if s.is_empty() {
        "root".into()
    } else {
        s.into()
    }
}

/// Median of a non-empty sample (mean of the two middle values for an even count).
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Run `cmd` with no input, its output captured; fail naming the command line and with its
/// stderr when it does not succeed.
pub fn run_quiet(cmd: &mut Command) -> Result<()> {
    let line = command_line(cmd);
    let o = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("run {line}"))?;
    if !o.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(())
}

/// [`find_program`], or an error naming the Debian package that provides it.
pub fn require_program(name: &Path, package: &str) -> Result<PathBuf> {
    find_program(name)
        .with_context(|| format!("{} not found (apt-get install {package})", name.display()))
}

/// Finds an executable: a path containing `/` is taken as is, otherwise `$PATH` is searched.
pub fn find_program(name: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let is_exe = |p: &Path| {
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if name.as_os_str().as_encoded_bytes().contains(&b'/') {
        return is_exe(name).then(|| name.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/bin:/bin"));
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_exe(p))
}

/// A binary of this workspace: `explicit` if given, else the one named `name` next to the
/// running executable (the same cargo target directory).
pub fn sibling_binary(name: &str, explicit: Option<&Path>) -> Result<PathBuf> {
    let p = match explicit {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()
            .context("find own executable")?
            .with_file_name(name),
    };
    if !p.is_file() {
        bail!(
            "{name} binary not found at {} (build it with `cargo build --release`, or pass --{name} PATH)",
            p.display()
        );
    }
    Ok(p)
}

/// The `cimg` binary: `explicit` if given, else the one next to the running executable.
pub fn cimg_binary(explicit: Option<&Path>) -> Result<PathBuf> {
    sibling_binary("cimg", explicit)
}

/// What a directory tree holds, as counted by [`read_tree`].
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct TreeStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub other: u64,
    /// Bytes of regular file content (hard links counted once per name).
    pub bytes: u64,
    /// Entries that could not be read (skipped).
    pub errors: u64,
}

/// Walks `root` without following symlinks and, if `read` is set, reads every regular file to
/// the end (a warm-up pass that fills the page cache).
pub fn read_tree(root: &Path, read: bool) -> TreeStats {
    let mut st = TreeStats::default();
    let mut buf = vec![0u8; 1 << 20];
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        st.dirs += 1;
        let Ok(entries) = std::fs::read_dir(&dir) else {
            st.errors += 1;
            continue;
        };
        for e in entries {
            let Ok(e) = e else {
                st.errors += 1;
                continue;
            };
            let Ok(ft) = e.file_type() else {
                st.errors += 1;
                continue;
            };
            let path = e.path();
            if ft.is_dir() {
                stack.push(path);
            } else if ft.is_symlink() {
                st.symlinks += 1;
            } else if ft.is_file() {
                st.files += 1;
                if read {
                    match std::fs::File::open(&path) {
                        Ok(mut f) => loop {
                            match f.read(&mut buf) {
                                Ok(0) => break,
                                Ok(n) => st.bytes += n as u64,
                                Err(_) => {
                                    st.errors += 1;
                                    break;
                                }
                            }
                        },
                        Err(_) => st.errors += 1,
                    }
                } else {
                    st.bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
                }
            } else {
                st.other += 1;
            }
        }
    }
    st
}

/// Size of a file in bytes.
pub fn file_size(p: &Path) -> Result<u64> {
    Ok(std::fs::metadata(p)
        .with_context(|| format!("stat {}", p.display()))?
        .len())
}

/// A small deterministic PRNG (SplitMix64): fast, seedable, good enough for synthetic data.
#[derive(Debug, Clone)]
pub struct Prng(u64);

impl Prng {
    pub fn new(seed: u64) -> Self {
        Prng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`; the tiny modulo bias does not matter here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let x = self.next_u64().to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(&x[..n]);
    }
}

/// Deterministic synthetic file content: text-like (lines of words with a skewed vocabulary),
/// binary-like (code-like opcode runs, zero runs, random runs) and random bytes, from a
/// [`Prng`] whose seed fixes every byte.
#[derive(Debug, Clone)]
pub struct Synth {
    /// The generator's PRNG, also usable for other choices (sizes, kinds) so that one seed
    /// determines a whole tree.
    pub rng: Prng,
    words: Vec<Vec<u8>>,
    opcodes: Vec<[u8; 4]>,
}

impl Synth {
    pub fn new(seed: u64) -> Self {
        let mut rng = Prng::new(seed);
        let words = (0..4000)
            .map(|_| {
                let len = rng.range(1, 10) as usize;
                (0..len)
                    .map(|_| {
                        b"etaoinshrdlucmfwypvbgkjqxz"[rng.below(26).min(rng.below(26)) as usize]
                    })
                    .collect()
            })
            .collect();
        let opcodes = (0..256)
            .map(|_| (rng.next_u64() as u32).to_le_bytes())
            .collect();
        Synth {
            rng,
            words,
            opcodes,
        }
    }

    /// Appends text-like bytes (lines of words, Zipf-ish word choice) until `buf` holds `n` bytes.
    pub fn text(&mut self, buf: &mut Vec<u8>, n: usize) {
        while buf.len() < n {
            let indent = self.rng.below(4) as usize * 4;
            buf.extend(std::iter::repeat_n(b' ', indent));
            for w in 0..self.rng.range(3, 14) {
                if w > 0 {
                    buf.push(b' ');
                }
                let i = if self.rng.chance(0.7) {
                    self.rng.below(100)
                } else {
                    self.rng.below(4000)
                } as usize;
                buf.extend_from_slice(&self.words[i]);
            }
            buf.extend_from_slice(if self.rng.chance(0.3) { b";\n" } else { b"\n" });
        }
        buf.truncate(n);
    }

    /// Appends binary-like bytes (code-like opcode runs, zero runs, random runs) until `buf` holds
    /// `n` bytes.
    pub fn binary(&mut self, buf: &mut Vec<u8>, n: usize) {
        while buf.len() < n {
            match self.rng.below(10) {
                0 | 1 => {
                    let len = self.rng.range(16, 2048) as usize;
                    buf.resize(buf.len() + len, 0);
                }
                2 => {
                    let at = buf.len();
                    let len = self.rng.range(16, 512) as usize;
                    buf.resize(at + len, 0);
                    self.rng.fill(&mut buf[at..]);
                }
                _ => {
                    for _ in 0..self.rng.range(8, 256) {
                        let i = if self.rng.chance(0.7) {
                            self.rng.below(16)
                        } else {
                            self.rng.below(256)
                        };
                        buf.extend_from_slice(&self.opcodes[i as usize]);
                        if self.rng.chance(0.2) {
                            let imm = (self.rng.below(4096) as u32).to_le_bytes();
                            buf.extend_from_slice(&imm);
                        }
                    }
                }
            }
        }
        buf.truncate(n);
    }

    /// Appends random (incompressible) bytes until `buf` holds `n` bytes.
    pub fn random(&mut self, buf: &mut Vec<u8>, n: usize) {
        let at = buf.len().min(n);
        buf.resize(n, 0);
        self.rng.fill(&mut buf[at..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote(OsStr::new("-b")), "-b");
        assert_eq!(shell_quote(OsStr::new("a b")), "'a b'");
        assert_eq!(shell_quote(OsStr::new("it's")), r"'it'\''s'");
        let mut c = Command::new("mksquashfs");
        c.args(["/usr", "out dir/x.sqfs"]);
        assert_eq!(command_line(&c), "mksquashfs /usr 'out dir/x.sqfs'");
    }

    #[test]
    fn prng_is_deterministic() {
        let (mut a, mut b) = (Prng::new(7), Prng::new(7));
        let (mut x, mut y) = ([0u8; 13], [0u8; 13]);
        a.fill(&mut x);
        b.fill(&mut y);
        assert_eq!(x, y);
        assert!((0..1000).all(|_| (3..=9).contains(&a.range(3, 9))));
    }
}

/// `launch`'s image service as the benchmarks see it: stopping the servers, finding them and
/// their memory in `/proc`.
pub mod service {
    use anyhow::Result;
    use std::path::Path;
    use std::process::Command;

    /// The linger given to every timed launch, so that no server ends during a benchmark.
    pub const LINGER: &str = "1h";

    /// `launch --stop IMAGE` for each of `images`: end their servers (the benchmarks start
    /// and end with it, and cold runs need it). Not `--stop-all`, which would end the
    /// servers of other work of the same user (every root process on a shared machine).
    pub fn stop(launch: &Path, images: &[&Path]) -> Result<()> {
        for i in images {
            super::run_quiet(Command::new(launch).arg("--stop").arg(i))?;
        }
        Ok(())
    }

    /// A process seen in `/proc`.
    #[derive(Debug, Clone)]
    pub struct Proc {
        pub pid: u32,
        /// `/proc/PID/comm`.
        pub comm: String,
        /// `/proc/PID/cmdline`, the arguments joined by spaces.
        pub cmdline: String,
        /// Whether it leads its own session.
        pub session_leader: bool,
        /// `VmRSS` in KiB.
        pub rss_kib: u64,
    }

    /// Every process readable in `/proc`.
    pub fn processes() -> Vec<Proc> {
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let p = e.path();
            let Ok(comm) = std::fs::read_to_string(p.join("comm")) else {
                continue;
            };
            let cmd = std::fs::read(p.join("cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(p.join("stat")).unwrap_or_default();
            let f: Vec<&str> = stat.rsplit(") ").next().unwrap_or("").split(' ').collect();
            let status = std::fs::read_to_string(p.join("status")).unwrap_or_default();
            let rss_kib = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0);
            out.push(Proc {
                pid,
                comm: comm.trim().to_string(),
                cmdline: String::from_utf8_lossy(&cmd).replace('\0', " "),
                session_leader: f.get(3) == Some(&pid.to_string().as_str()),
                rss_kib,
            });
        }
        out
    }

    /// The FUSE servers of `image` (as named on the launches' command lines): the shared
    /// ones (`cimg-server`) and the private ones (a `launch` process leading its own
    /// session), not counting the launches `exclude` (their own pids).
    pub fn servers_of(image: &Path, exclude: &[u32]) -> Vec<Proc> {
        let img = image.display().to_string();
        processes()
            .into_iter()
            .filter(|p| {
                !exclude.contains(&p.pid)
                    && p.cmdline.contains(&img)
                    && (p.comm == "cimg-server" || (p.comm == "launch" && p.session_leader))
            })
            .collect()
    }
}
