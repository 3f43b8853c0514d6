//! pfs-sim: serve a local directory through the parallel-filesystem simulator
//! (`cimg_benches::pfssim`) at one or more mount points until SIGTERM or SIGINT, with added
//! metadata and read latency, a shared metadata-server rate limit, and counters written to a
//! JSON stats file (periodically, on SIGUSR1, and at unmount).

use anyhow::{Context, Result, bail};
use cimg_benches::pfssim::{SimConfig, Simulator};
use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "pfs-sim",
    about = "FUSE passthrough that simulates a parallel filesystem: latency, a shared metadata-server rate limit, counters"
)]
struct Args {
    /// The directory served.
    backing: PathBuf,
    /// A mount point (repeatable; every mount serves the same directory, with its own kernel
    /// caches, like one node's client).
    #[arg(long = "mount", short = 'm')]
    mounts: Vec<PathBuf>,
    /// Also mount at BASE/node0 .. BASE/node{N-1} (created) for `--nodes N`.
    #[arg(long)]
    mount_base: Option<PathBuf>,
    /// Number of mounts under --mount-base.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Latency added to every metadata request, in microseconds.
    #[arg(long, default_value_t = 0)]
    meta_latency_us: u64,
    /// Latency added to every read request, in microseconds.
    #[arg(long, default_value_t = 0)]
    read_latency_us: u64,
    /// Per-byte read cost as a bandwidth (bytes per second, e.g. 1G; 0 = none).
    #[arg(long, default_value = "0")]
    read_bandwidth: String,
    /// Metadata operations per second for all mounts together (0 = unlimited).
    #[arg(long, default_value_t = 0.0)]
    mds_rate: f64,
    /// Burst of the metadata rate limit (tokens in a full bucket).
    #[arg(long, default_value_t = 1)]
    mds_burst: u32,
    /// Kernel entry TTL in milliseconds (0: every path lookup reaches the simulator).
    #[arg(long, default_value_t = 0)]
    entry_ttl_ms: u64,
    /// Kernel attribute TTL in milliseconds (0: every stat reaches the simulator).
    #[arg(long, default_value_t = 0)]
    attr_ttl_ms: u64,
    /// Keep a file's cached pages across opens (FOPEN_KEEP_CACHE).
    #[arg(long)]
    keep_cache: bool,
    /// Kernel read-ahead per mount in KiB (default: the kernel's).
    #[arg(long)]
    read_ahead_kb: Option<u32>,
    /// FUSE event-loop threads per mount.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// JSON stats file.
    #[arg(long)]
    stats: Option<PathBuf>,
    /// Rewrite the stats file every this many milliseconds (0: only on SIGUSR1 and at exit).
    #[arg(long, default_value_t = 200)]
    stats_interval_ms: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut mounts = args.mounts.clone();
    if let Some(base) = &args.mount_base {
        for i in 0..args.nodes {
            let d = base.join(format!("node{i}"));
            std::fs::create_dir_all(&d).with_context(|| format!("create {}", d.display()))?;
            mounts.push(d);
        }
    }
    if mounts.is_empty() {
        bail!("no mount point: give --mount DIR or --mount-base DIR --nodes N");
    }
    let bw = cimg_benches::parse_size(&args.read_bandwidth)
        .map_err(|e| anyhow::anyhow!("bad --read-bandwidth {}: {e}", args.read_bandwidth))?;
    let cfg = SimConfig {
        meta_latency: Duration::from_micros(args.meta_latency_us),
        read_latency: Duration::from_micros(args.read_latency_us),
        read_bandwidth: bw as f64,
        mds_rate: (args.mds_rate > 0.0).then_some(args.mds_rate),
        mds_burst: args.mds_burst.max(1),
        entry_ttl: Duration::from_millis(args.entry_ttl_ms),
        attr_ttl: Duration::from_millis(args.attr_ttl_ms),
        keep_cache: args.keep_cache,
        read_ahead_kb: args.read_ahead_kb,
        threads: args.threads.max(1),
    };
    // Signals are taken synchronously by this thread; block them before any thread starts so
    // that every thread inherits the mask.
    let mut sigs = SigSet::empty();
    for s in [
        Signal::SIGUSR1,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        sigs.add(s);
    }
    sigs.thread_block().context("block signals")?;
    let sim = Simulator::start(&args.backing, &mounts, cfg, args.stats.clone())?;
    eprintln!(
        "pfs-sim: serving {} at {} mount(s); SIGUSR1 writes the stats, SIGTERM unmounts",
        args.backing.display(),
        mounts.len()
    );
    if args.stats_interval_ms > 0 && args.stats.is_some() {
        let w = sim.stats_writer();
        let every = Duration::from_millis(args.stats_interval_ms);
        std::thread::Builder::new()
            .name("pfssim-stats".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(every);
                    if let Err(e) = w.write() {
                        eprintln!("pfs-sim: {e}");
                    }
                }
            })
            .context("start stats thread")?;
    }
    // SIGUSR1 writes the stats; any other of the signals ends the service.
    while let Signal::SIGUSR1 = sigs.wait().context("wait for signals")? {
        sim.write_stats()?;
    }
    let c = sim.stop()?;
    eprintln!(
        "pfs-sim: unmounted; {} metadata ops, {} reads, {} bytes read",
        c.metadata_ops(),
        c.read_calls,
        c.read_bytes
    );
    Ok(())
}
