//! The read path and the worker pool. Reads go through the shared
//! [`BlockCache`](crate::cache::BlockCache): a block is read, verified and decompressed once
//! into a page-aligned buffer, and a bad one is logged once (block, inode, paths) while its
//! readers get EIO. A read whose blocks are all cached is answered by the event loop that
//! received it; otherwise it is handed (with its `Send` reply) to a pool of decompression
//! workers (crossbeam channel), so the event loop can take the next request while the block
//! loads. A read inside one extent (the common case: the kernel asks in pieces aligned to
//! the block size) is answered straight from the cached block without copying. The workers
//! take reads first, then the reads of the background process
//! ([`FsOptions::background_pid`](crate::FsOptions::background_pid)), then prefetches
//! ([`crate::prefetch`]).

use crate::cache::Block;
use crate::fs::{CimgFs, FResult, Inner};
use crate::prefetch::{cpu_busy, prefetch_exec, prefetch_hot};
use crate::push::{StoreJob, Tail};
use cimg_format::Error;
use crossbeam_channel::Receiver;
use fuser::ReplyData;
use std::cell::RefCell;
use std::io;
use std::sync::Arc;

/// Bad blocks logged (one line each) before the log falls silent, and how many of them get
/// the paths of their files (a walk of the whole tree each).
const MAX_BAD_LOGGED: usize = 100;
const MAX_BAD_NAMED: usize = 16;

/// Queue length of reads waiting for a worker; event loops wait when it is full.
pub(crate) const READ_QUEUE: usize = 1024;

impl Inner {
    /// Read, verify and decompress block `idx` into a page-aligned buffer.
    fn load(&self, idx: u32) -> cimg_format::Result<Block> {
        thread_local! {
            static STORED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
        }
        STORED.with(|s| {
            let mut stored = s.borrow_mut();
            self.img.read_stored(idx, &mut stored)?;
            self.decode(idx, &stored)
        })
    }

    /// Block `idx` from its stored bytes, already read (the hot-list prefetch reads many
    /// blocks at once): verified, then decompressed like [`Inner::load`].
    pub(crate) fn load_from(&self, idx: u32, stored: &[u8]) -> cimg_format::Result<Block> {
        self.img.check_stored(idx, stored)?;
        self.decode(idx, stored)
    }

    /// Decompress block `idx`'s verified stored bytes into a page-aligned buffer.
    fn decode(&self, idx: u32, stored: &[u8]) -> cimg_format::Result<Block> {
        let (_, _, raw) = self.img.block_info(idx)?;
        let mut block = self.cache.alloc(raw as usize).map_err(|err| Error::Io {
            path: "anonymous memory for a block".into(),
            err,
        })?;
        self.img.decode_block(idx, stored, block.as_mut_slice())?;
        Ok(block)
    }

    /// Block `idx` through the cache; a bad block is logged once, naming `ino` if known.
    /// When this call loaded it, the registered tails in it are pushed (but `ino`'s: its
    /// reader is answered from the block).
    pub(crate) fn block(&self, idx: u32, ino: Option<u32>) -> cimg_format::Result<Arc<Block>> {
        let mut loaded = false;
        let data = self
            .cache
            .get_or_load(idx, || {
                loaded = true;
                self.load(idx)
            })
            .inspect_err(|e| {
                if ino.is_some() {
                    self.log_bad(idx, ino, e);
                }
            })?;
        if loaded {
            self.push_tails(idx, &data, ino);
        }
        Ok(data)
    }

    fn log_bad(&self, idx: u32, ino: Option<u32>, e: &Error) {
        let n = {
            let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
            if !logged.insert(idx) {
                return;
            }
            logged.len()
        };
        if n > MAX_BAD_LOGGED {
            if n == MAX_BAD_LOGGED + 1 {
                crate::log(format_args!(
                    "{}: more bad blocks; no longer logging them",
                    self.img.label().display()
                ));
            }
            return;
        }
        // Naming the files walks the whole tree: only for the first few blocks.
        let files = if n <= MAX_BAD_NAMED {
            self.img.files_using_block(idx).unwrap_or_default()
        } else {
            Vec::new()
        };
        let mut files = files
            .into_iter()
            .map(|p| format!("/{}", String::from_utf8_lossy(&p)))
            .collect::<Vec<_>>();
        if files.len() > 3 {
            let more = files.len() - 3;
            files.truncate(3);
            files.push(format!("and {more} more"));
        }
        let ino = ino.map(|i| format!("inode {i}")).unwrap_or_default();
        crate::log(format_args!(
            "{}: block {idx} ({ino}{}{}): {e}; reads of it answer EIO",
            self.img.label().display(),
            if files.is_empty() { "" } else { ": " },
            files.join(", ")
        ));
    }

    /// Whether every block that a read of `size` bytes at `offset` touches is cached.
    pub(crate) fn all_ready(&self, ino: u32, offset: u64, size: u32) -> bool {
        let end = offset.saturating_add(size.into());
        let mut pos = offset;
        while pos < end {
            match self.img.extent_at(ino, pos) {
                Ok(Some(ext)) => {
                    if let Some(b) = ext.block
                        && !self.cache.is_ready(b)
                    {
                        return false;
                    }
                    pos = ext.file_offset + ext.len as u64;
                }
                // Past the end, or an error that the read itself will report.
                _ => return true,
            }
        }
        true
    }

    /// Read `size` bytes of `ino` at `offset` and hand them to `out` (one call).
    pub(crate) fn read(
        &self,
        ino: u32,
        offset: u64,
        size: u32,
        out: impl FnOnce(&[u8]),
    ) -> FResult<()> {
        let Some(ext) = self.img.extent_at(ino, offset)? else {
            out(&[]);
            return Ok(());
        };
        let size = size as usize;
        let within = (offset - ext.file_offset) as usize;
        let n = (ext.len as usize - within).min(size);
        let file_end = ext.file_offset + ext.len as u64;
        // One extent covers the request (or the file ends inside it): answer from the block.
        if n == size || self.img.extent_at(ino, file_end)?.is_none() {
            match ext.block {
                None => out(&vec![0; n]),
                Some(b) => {
                    let fresh = !self.cache.is_ready(b);
                    self.read_ahead(b, fresh);
                    let data = self.block(b, Some(ino))?;
                    out(slice(&data, b, ext.block_offset as usize + within, n)?);
                    // A read of part of a block just decompressed: give the kernel the rest
                    // of this file's bytes in it. Never past the end of the file (a store
                    // there would grow the file in the kernel's eyes): the extent stops at it.
                    if fresh
                        && n < ext.len as usize
                        && let Some(tx) = self.store.get()
                    {
                        let _ = tx.try_send(StoreJob {
                            block: data,
                            parts: vec![Tail {
                                ino,
                                file_offset: ext.file_offset,
                                start: ext.block_offset,
                                len: ext.len,
                            }],
                        });
                    }
                }
            }
            return Ok(());
        }
        let mut buf = Vec::with_capacity(size);
        let mut pos = offset;
        while buf.len() < size {
            let Some(ext) = self.img.extent_at(ino, pos)? else {
                break;
            };
            let within = (pos - ext.file_offset) as usize;
            let n = (ext.len as usize - within).min(size - buf.len());
            match ext.block {
                None => buf.resize(buf.len() + n, 0),
                Some(b) => {
                    self.read_ahead(b, !self.cache.is_ready(b));
                    let data = self.block(b, Some(ino))?;
                    buf.extend_from_slice(slice(&data, b, ext.block_offset as usize + within, n)?);
                }
            }
            pos += n as u64;
        }
        out(&buf);
        Ok(())
    }
}

/// A read request, answered where its blocks are (an event loop or a worker).
pub(crate) struct ReadJob {
    pub(crate) ino: u32,
    pub(crate) offset: u64,
    pub(crate) size: u32,
    pub(crate) reply: ReplyData,
}

impl ReadJob {
    pub(crate) fn run(self, inner: &Inner) {
        let mut reply = Some(self.reply);
        let r = inner.read(self.ino, self.offset, self.size, |data| {
            if let Some(r) = reply.take() {
                r.data(data);
            }
        });
        if let (Err(e), Some(r)) = (r, reply) {
            r.error(e.errno());
        }
    }
}

/// A worker: answers read jobs first, then the background process's reads
/// ([`FsOptions::background_pid`]), prefetches when there are none; stops when the filesystem
/// is dropped (a channel disconnects).
///
/// [`FsOptions::background_pid`]: crate::FsOptions::background_pid
fn worker(
    inner: &Inner,
    jobs: &Receiver<ReadJob>,
    background: &Receiver<ReadJob>,
    prefetch: &Receiver<u32>,
) {
    loop {
        if let Ok(job) = jobs.try_recv() {
            job.run(inner);
            continue;
        }
        if let Ok(job) = background.try_recv() {
            job.run(inner);
            continue;
        }
        crossbeam_channel::select! {
            recv(jobs) -> job => match job {
                Ok(job) => job.run(inner),
                Err(_) => return,
            },
            recv(background) -> job => match job {
                Ok(job) => job.run(inner),
                Err(_) => return,
            },
            recv(prefetch) -> idx => match idx {
                // Errors are reported to the reader that needs the block.
                Ok(idx) => drop(inner.block(idx, None)),
                Err(_) => return,
            },
        }
    }
}

fn slice(data: &[u8], block: u32, start: usize, n: usize) -> cimg_format::Result<&[u8]> {
    start
        .checked_add(n)
        .and_then(|end| data.get(start..end))
        .ok_or_else(|| Error::BadBlock {
            block,
            offset: 0,
            why: format!("extent {start}+{n} outside the block"),
        })
}

impl CimgFs {
    /// Start the prefetch workers and the hot-list prefetch (called from `init`). Only the
    /// first worker is started here: it starts the others and the prefetch threads itself,
    /// so that the kernel's INIT is answered after one thread start rather than four or five
    /// (`launch` waits for INIT). If a later thread cannot be started, the first worker still
    /// answers every read.
    pub(crate) fn start_workers(&mut self) -> io::Result<()> {
        let (Some(rx), Some(jobs), Some(bg)) = (
            self.rx.take(),
            self.jobs_rx.take(),
            self.background_rx.take(),
        ) else {
            return Ok(());
        };
        let workers = self.opts.workers;
        let exec = self
            .opts
            .exec
            .clone()
            .zip(self.tx.clone())
            .filter(|_| !cpu_busy());
        let budget = self.opts.cache_size / 2;
        let hot = self.inner.img.summary().hot_blocks;
        let hot = (self.opts.prefetch_hot && hot > 0).then_some(hot);
        let inner = self.inner.clone();
        std::thread::Builder::new()
            .name("cimg-worker-0".into())
            .spawn(move || {
                for i in 1..workers {
                    let (rx, jobs, bg, inner) =
                        (rx.clone(), jobs.clone(), bg.clone(), inner.clone());
                    let _ = std::thread::Builder::new()
                        .name(format!("cimg-worker-{i}"))
                        .spawn(move || worker(&inner, &jobs, &bg, &rx));
                }
                if let Some((hint, tx)) = exec {
                    let inner = inner.clone();
                    let _ = std::thread::Builder::new()
                        .name("cimg-exec".into())
                        .spawn(move || prefetch_exec(&inner, &hint, &tx, budget));
                }
                if let Some(hot) = hot {
                    let inner = inner.clone();
                    let _ = std::thread::Builder::new()
                        .name("cimg-hot".into())
                        .spawn(move || prefetch_hot(&inner, hot));
                }
                worker(&inner, &jobs, &bg, &rx)
            })?;
        Ok(())
    }
}
