//! The parallel-filesystem simulator (`pfs-sim`): a read-only FUSE passthrough of a local
//! directory that stands in for a Lustre client and its metadata server. It owns:
//!
//! - [`SimConfig`]: latency added to every metadata request and every read (per call and per
//!   byte), the metadata server's rate limit shared by all mounts, kernel cache TTLs;
//! - [`Simulator`]: one or more mounts of the same directory (one per simulated node: each
//!   mount has its own kernel caches, like a node's client) served by one process, sharing the
//!   counters and the rate limit; the stats file;
//! - [`stats`]: the counters (every request by kind, every byte read);
//! - [`timing`]: the token bucket and the reply delayer;
//! - [`fs`]: the `fuser` filesystem.
//!
//! Metadata requests are every counted kind except reads: lookup, getattr, readlink, open,
//! release (close), opendir, readdir, releasedir, statfs, getxattr, listxattr, access. Each
//! takes a token from the shared bucket (its reply waits until the bucket allows it) and then
//! `meta_latency`. A read is answered after `read_latency + bytes / read_bandwidth`.

pub mod fs;
pub mod stats;
pub mod timing;

pub use stats::{Counters, StatsFile};

use fs::{PfsFs, Shared};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use timing::{Delayer, TokenBucket};

/// How the simulated parallel filesystem behaves.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Added to every metadata request (after the rate limit let it through).
    pub meta_latency: Duration,
    /// Added to every read request.
    pub read_latency: Duration,
    /// Per-byte cost of reads in bytes per second (0: none).
    pub read_bandwidth: f64,
    /// Metadata operations per second, shared by all mounts (`None`: unlimited).
    pub mds_rate: Option<f64>,
    /// Tokens the bucket holds when full.
    pub mds_burst: u32,
    /// How long the kernel may cache a name lookup.
    pub entry_ttl: Duration,
    /// How long the kernel may cache attributes.
    pub attr_ttl: Duration,
    /// Answer opens with `FOPEN_KEEP_CACHE` (keep a file's cached pages across opens).
    pub keep_cache: bool,
    /// Kernel read-ahead of each mount in KiB (written to its bdi's `read_ahead_kb`; `None`
    /// leaves the kernel's default).
    pub read_ahead_kb: Option<u32>,
    /// FUSE event-loop threads per mount.
    pub threads: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            meta_latency: Duration::ZERO,
            read_latency: Duration::ZERO,
            read_bandwidth: 0.0,
            mds_rate: None,
            mds_burst: 1,
            entry_ttl: Duration::ZERO,
            attr_ttl: Duration::ZERO,
            keep_cache: false,
            read_ahead_kb: None,
            threads: 2,
        }
    }
}

/// What can go wrong starting or running the simulator. Messages name the path.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("{}: not a directory", .0.display())]
    NotADir(PathBuf),
    #[error("{}: mount: {err}", path.display())]
    Mount { path: PathBuf, err: std::io::Error },
    #[error("{}: set read-ahead: {err}", path.display())]
    ReadAhead { path: PathBuf, err: std::io::Error },
    #[error("{}: write stats: {err}", path.display())]
    Stats { path: PathBuf, err: std::io::Error },
    #[error("start delay thread: {0}")]
    Thread(std::io::Error),
}

/// A running simulator: every mount serves `backing`; dropping it unmounts them all.
pub struct Simulator {
    shared: Arc<Shared>,
    sessions: Vec<(PathBuf, fuser::BackgroundSession)>,
    writer: StatsWriter,
}

/// Writes the stats file of a simulator; cheap to clone (e.g. into a thread that writes it
/// periodically).
#[derive(Debug, Clone)]
pub struct StatsWriter {
    shared: Arc<Shared>,
    path: Option<PathBuf>,
    seq: Arc<std::sync::atomic::AtomicU64>,
    mounts: usize,
}

impl StatsWriter {
    /// Write the stats file (if one was given), atomically (a temporary file renamed over it).
    pub fn write(&self) -> Result<(), SimError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let counters = self.shared.stats.snapshot();
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let body = StatsFile {
            seq,
            unix_time: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
            mounts: self.mounts,
            metadata_ops: counters.metadata_ops(),
            counters,
        };
        let err = |err| SimError::Stats {
            path: path.clone(),
            err,
        };
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        let json = serde_json::to_vec_pretty(&body).map_err(|e| err(e.into()))?;
        std::fs::write(&tmp, json).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }
}

impl std::fmt::Debug for Simulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulator")
            .field("mounts", &self.sessions.len())
            .finish_non_exhaustive()
    }
}

impl Simulator {
    /// Mount `backing` read-only at each of `mountpoints` (existing directories). On error,
    /// whatever was already mounted is unmounted again.
    pub fn start(
        backing: &Path,
        mountpoints: &[PathBuf],
        cfg: SimConfig,
        stats_file: Option<PathBuf>,
    ) -> Result<Simulator, SimError> {
        if !backing.is_dir() {
            return Err(SimError::NotADir(backing.to_path_buf()));
        }
        let bucket = cfg
            .mds_rate
            .map(|r| TokenBucket::new(r, cfg.mds_burst.max(1)));
        let shared = Arc::new(Shared {
            bucket,
            stats: Default::default(),
            delayer: Delayer::start().map_err(SimError::Thread)?,
            cfg,
        });
        let writer = StatsWriter {
            shared: Arc::clone(&shared),
            path: stats_file,
            seq: Default::default(),
            mounts: mountpoints.len(),
        };
        let mut sim = Simulator {
            shared,
            sessions: Vec::new(),
            writer,
        };
        for mp in mountpoints {
            let s = sim.mount_one(backing, mp)?;
            sim.sessions.push((mp.clone(), s));
            if let Some(kb) = sim.shared.cfg.read_ahead_kb {
                set_read_ahead(mp, kb)?;
            }
        }
        sim.write_stats()?;
        Ok(sim)
    }

    fn mount_one(&self, backing: &Path, mp: &Path) -> Result<fuser::BackgroundSession, SimError> {
        let fs = PfsFs::new(backing.to_path_buf(), Arc::clone(&self.shared));
        let mut cfg = fuser::Config::default();
        cfg.mount_options = vec![
            fuser::MountOption::RO,
            fuser::MountOption::FSName("pfssim".into()),
            fuser::MountOption::Subtype("pfssim".into()),
            fuser::MountOption::DefaultPermissions,
            fuser::MountOption::NoAtime,
        ];
        // Containers in user namespaces read through the mounts too.
        cfg.acl = fuser::SessionACL::All;
        cfg.n_threads = Some(self.shared.cfg.threads.max(1));
        cfg.clone_fd = true;
        let err = |err| SimError::Mount {
            path: mp.to_path_buf(),
            err,
        };
        fuser::Session::new(fs, mp, &cfg)
            .map_err(err)?
            .spawn()
            .map_err(err)
    }

    /// The counters now.
    pub fn counters(&self) -> Counters {
        self.shared.stats.snapshot()
    }

    /// The mount points served.
    pub fn mountpoints(&self) -> Vec<PathBuf> {
        self.sessions.iter().map(|(p, _)| p.clone()).collect()
    }

    /// Write the stats file (if one was given).
    pub fn write_stats(&self) -> Result<(), SimError> {
        self.writer.write()
    }

    /// A handle that writes the stats file from another thread.
    pub fn stats_writer(&self) -> StatsWriter {
        self.writer.clone()
    }

    /// Unmount every mount (lazily if one is still busy) and write the stats file a last time.
    pub fn stop(mut self) -> Result<Counters, SimError> {
        self.unmount_all();
        self.write_stats()?;
        Ok(self.counters())
    }

    fn unmount_all(&mut self) {
        for (mp, s) in self.sessions.drain(..) {
            if s.umount_and_join().is_err() {
                let _ = std::process::Command::new("umount")
                    .arg("-l")
                    .arg(&mp)
                    .status();
            }
        }
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.unmount_all();
    }
}

/// Set the kernel read-ahead of the FUSE mount at `mp` (its bdi is named by the device number).
fn set_read_ahead(mp: &Path, kb: u32) -> Result<(), SimError> {
    use std::os::unix::fs::MetadataExt;
    let err = |err| SimError::ReadAhead {
        path: mp.to_path_buf(),
        err,
    };
    let dev = std::fs::metadata(mp).map_err(err)?.dev();
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    cimg_fuse::set_read_ahead_kb((major as u32, minor as u32), kb).map_err(err)
}

/// Read a stats file written by a simulator.
pub fn read_stats_file(path: &Path) -> std::io::Result<StatsFile> {
    let b = std::fs::read(path)?;
    serde_json::from_slice(&b).map_err(std::io::Error::other)
}
