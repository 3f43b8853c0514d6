//! Reading a mounted image's files ahead into the kernel's page cache, from a process that is
//! not the FUSE server: the files a program's start reads ([`crate::exec::exec_files`]) and
//! the image's hot files (§11 of the format). The program then finds them looked up and in
//! the page cache, instead of sending a LOOKUP and READs for each: the program then sends a
//! fraction of the READs and LOOKUPs it would (request counts in `docs/perf.md`; timings in
//! `launch-bench`).
//!
//! Not from the server itself: closing a file of its own mount sends a FLUSH, which the
//! kernel waits for without interruption. A server SIGKILLed at that moment keeps that thread
//! stuck there, so its `/dev/fuse` descriptors stay open and the mount hangs (a `launch` test
//! did). Another process waiting on a dead server is freed when the connection is aborted,
//! which the server's death does.
//!
//! The work holds the mount's root open, which keeps the filesystem (and so its server)
//! alive: the program's files (at most 64) are read through one opening of it, and for the
//! hot files it is reopened for each file and the work stops once that fails, so the caller
//! can end it by closing the descriptor the path names.

use crate::exec::ExecHint;
use cimg_format::{FileKind, Image};
use nix::fcntl::{OFlag, OpenHow, PosixFadviseAdvice, ResolveFlag};
use nix::sys::stat::Mode;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::ops::Range;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// The kernel reads at most one read-ahead window per `posix_fadvise(WILLNEED)` call: ask
/// in pieces of the default window (128 KiB; a raised window only makes them overlap).
const STEP: u64 = 128 << 10;

/// Read ahead, through the mount whose root is reachable at `root`, the files a start of
/// `exec`'s program reads (if given), then the image's hot files in hot-list order: at most
/// `budget` bytes in all. Stops early once `root` cannot be opened. The hot files go one at a
/// time (the last page of each is waited for before the next is asked), so that the server,
/// which decompresses them at the application's priority, is never flooded. Nothing here can
/// fail: a file that cannot be opened or read is skipped.
pub fn read_ahead(img: &Image, root: &Path, exec: Option<&ExecHint>, budget: u64) {
    let mut left = budget;
    let mut take = |bytes: u64| {
        let ok = bytes <= left;
        if ok {
            left -= bytes;
        }
        ok
    };
    if let Some(hint) = exec {
        let Some(dir) = open_root(root) else {
            return;
        };
        // The search reads a file's headers and then tells its ranges: each file is opened
        // once (at most 64, closed with `dir`).
        let files: RefCell<HashMap<u32, Option<Rc<File>>>> = RefCell::default();
        let file = |ino: u32, path: &Path| {
            files
                .borrow_mut()
                .entry(ino)
                .or_insert_with(|| open_file(&dir, path).map(Rc::new))
                .clone()
        };
        crate::exec::exec_files(
            img,
            hint,
            |ino, path, ranges| {
                if take(ranges.iter().map(|r| r.end - r.start).sum())
                    && let Some(f) = file(ino, path)
                {
                    advise(&f, ranges);
                }
            },
            |ino, path, range| {
                let f = file(ino, path)?;
                let mut buf = vec![0u8; usize::try_from(range.end - range.start).ok()?];
                let n = f.read_at(&mut buf, range.start).ok()?;
                buf.truncate(n);
                Some(buf)
            },
        );
    }
    let hot = u32::try_from(img.summary().hot_blocks).unwrap_or(u32::MAX);
    if hot == 0 {
        return;
    }
    for (size, path) in hot_files(img, hot) {
        let Some(dir) = open_root(root) else {
            return;
        };
        if !take(size) {
            return;
        }
        let Some(f) = open_file(&dir, &path) else {
            continue;
        };
        advise(&f, std::slice::from_ref(&(0..size)));
        // Wait for this file before asking for the next.
        let mut last = [0u8; 1];
        let _ = f.read_at(&mut last, size.saturating_sub(1));
    }
}

/// The hot files (data in blocks `0..hot`), in the order of their first block, which is the
/// hot list's: (size, absolute path). Each inode once, under its first path.
pub fn hot_files(img: &Image, hot: u32) -> Vec<(u64, PathBuf)> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let _ = img.walk(|path, e| {
        if e.kind != FileKind::File {
            return Ok(());
        }
        let mut first = u32::MAX;
        for x in img.extents(e.ino)? {
            if let Some(b) = x.block {
                first = first.min(b);
            }
        }
        if first < hot && seen.insert(e.ino) {
            let p = Path::new("/").join(OsStr::from_bytes(path));
            out.push((first, img.attr(e.ino)?.size, p));
        }
        Ok(())
    });
    out.sort_by_key(|f| f.0);
    out.into_iter().map(|(_, s, p)| (s, p)).collect()
}

fn open_root(root: &Path) -> Option<OwnedFd> {
    nix::fcntl::open(
        root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .ok()
}

/// The regular file at `path` (absolute in the image, without symbolic links) under `root`,
/// without leaving the mount.
fn open_file(root: &OwnedFd, path: &Path) -> Option<File> {
    let rel = path.strip_prefix("/").ok()?;
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK)
        .resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS
                | ResolveFlag::RESOLVE_NO_XDEV,
        );
    let fd = nix::fcntl::openat2(root, rel, how).ok()?;
    Some(File::from(fd))
}

/// Ask the kernel to read `ranges` of `f` into the page cache, without waiting.
fn advise(f: &File, ranges: &[Range<u64>]) {
    for r in ranges {
        let mut at = r.start - r.start % STEP;
        while at < r.end {
            let (Ok(off), Ok(len)) = (i64::try_from(at), i64::try_from(STEP)) else {
                return;
            };
            if nix::fcntl::posix_fadvise(f, off, len, PosixFadviseAdvice::POSIX_FADV_WILLNEED)
                .is_err()
            {
                return;
            }
            at += STEP;
        }
    }
}
