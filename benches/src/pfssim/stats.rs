//! Operation counters of the PFS simulator: lock-free atomics bumped by every request
//! ([`Stats`]), and plain snapshots of them ([`Counters`]) that are written to the stats file,
//! read back by benchmarks and subtracted to get per-run deltas.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};

/// Kinds of request the simulator counts. All but [`Op::Read`] are metadata operations: on a
/// parallel filesystem they go to the metadata server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Lookup,
    Getattr,
    Readlink,
    Open,
    Release,
    Opendir,
    Readdir,
    Releasedir,
    Statfs,
    Getxattr,
    Listxattr,
    Access,
    Read,
}

const KINDS: usize = 13;

/// Live counters, shared by every mount of one simulator.
#[derive(Debug, Default)]
pub struct Stats {
    ops: [AtomicU64; KINDS],
    read_bytes: AtomicU64,
    read_sequential: AtomicU64,
}

impl Stats {
    /// Count one request of kind `op`.
    pub fn count(&self, op: Op) {
        self.ops[op as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Count `n` bytes returned by a read.
    pub fn add_bytes(&self, n: u64) {
        self.read_bytes.fetch_add(n, Ordering::Relaxed);
    }

    /// Count a read that started where the previous read of the same open file ended.
    pub fn count_sequential(&self) {
        self.read_sequential.fetch_add(1, Ordering::Relaxed);
    }

    /// A consistent-enough copy (each counter is read atomically).
    pub fn snapshot(&self) -> Counters {
        let g = |op: Op| self.ops[op as usize].load(Ordering::Relaxed);
        Counters {
            lookup: g(Op::Lookup),
            getattr: g(Op::Getattr),
            readlink: g(Op::Readlink),
            open: g(Op::Open),
            release: g(Op::Release),
            opendir: g(Op::Opendir),
            readdir: g(Op::Readdir),
            releasedir: g(Op::Releasedir),
            statfs: g(Op::Statfs),
            getxattr: g(Op::Getxattr),
            listxattr: g(Op::Listxattr),
            access: g(Op::Access),
            read_calls: g(Op::Read),
            read_bytes: self.read_bytes.load(Ordering::Relaxed),
            read_sequential: self.read_sequential.load(Ordering::Relaxed),
        }
    }
}

/// A snapshot of the counters (or the difference of two).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub lookup: u64,
    pub getattr: u64,
    pub readlink: u64,
    pub open: u64,
    /// Closes of files (`release`); a close is a metadata-server RPC on Lustre too.
    pub release: u64,
    pub opendir: u64,
    pub readdir: u64,
    pub releasedir: u64,
    pub statfs: u64,
    pub getxattr: u64,
    pub listxattr: u64,
    pub access: u64,
    /// Read requests (each is one data RPC).
    pub read_calls: u64,
    /// Bytes returned by reads.
    pub read_bytes: u64,
    /// Reads that started where the previous read of the same open file ended (the first
    /// read of an open file counts if it starts at offset 0).
    #[serde(default)]
    pub read_sequential: u64,
}

impl Counters {
    /// Every metadata operation (all counted kinds but reads).
    pub fn metadata_ops(&self) -> u64 {
        self.lookup
            + self.getattr
            + self.readlink
            + self.open
            + self.release
            + self.opendir
            + self.readdir
            + self.releasedir
            + self.statfs
            + self.getxattr
            + self.listxattr
            + self.access
    }

    /// `self - earlier`, counter by counter (saturating at 0).
    pub fn since(&self, earlier: &Counters) -> Counters {
        let d = |a: u64, b: u64| a.saturating_sub(b);
        Counters {
            lookup: d(self.lookup, earlier.lookup),
            getattr: d(self.getattr, earlier.getattr),
            readlink: d(self.readlink, earlier.readlink),
            open: d(self.open, earlier.open),
            release: d(self.release, earlier.release),
            opendir: d(self.opendir, earlier.opendir),
            readdir: d(self.readdir, earlier.readdir),
            releasedir: d(self.releasedir, earlier.releasedir),
            statfs: d(self.statfs, earlier.statfs),
            getxattr: d(self.getxattr, earlier.getxattr),
            listxattr: d(self.listxattr, earlier.listxattr),
            access: d(self.access, earlier.access),
            read_calls: d(self.read_calls, earlier.read_calls),
            read_bytes: d(self.read_bytes, earlier.read_bytes),
            read_sequential: d(self.read_sequential, earlier.read_sequential),
        }
    }
}

/// What the stats file holds: the counters, plus a sequence number that grows with every
/// write (so a reader that asked for a fresh write can tell it arrived) and the time.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatsFile {
    /// Incremented on every write of the file.
    pub seq: u64,
    /// Seconds since the Unix epoch at the write.
    pub unix_time: f64,
    /// Number of mounts served.
    pub mounts: usize,
    pub counters: Counters,
    /// `counters.metadata_ops()`, for readers that do not sum themselves.
    pub metadata_ops: u64,
}
