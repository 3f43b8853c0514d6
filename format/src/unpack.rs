//! Unpacking an image back into a directory: every file type, permission bits, ownership
//! (when running as root, or for the caller's own ids), modification times, xattrs, hard
//! links and holes (both the image's holes and all-zero pages stored as data).
//!
//! Safety: nothing outside the target DEST is ever touched, whatever happens to the paths
//! leading to it or inside it while the unpack runs.
//!
//! - DEST is opened once (`O_DIRECTORY | O_NOFOLLOW`) and everything after that goes through
//!   that descriptor: no path is ever resolved from the current directory again, so swapping
//!   DEST or one of its ancestors for a symlink changes nothing.
//! - Every directory is created with `mkdirat` in its parent's descriptor and opened with
//!   `openat(O_DIRECTORY | O_NOFOLLOW)` of that one name; names come from a validated image
//!   (no `/`, `.`, `..` or NUL), so each such open goes exactly one level down. Regular files
//!   are created with `O_CREAT | O_EXCL | O_NOFOLLOW` and finished through their descriptor
//!   (`fchown`, `fsetxattr`, `fchmod`, `futimens`), directories likewise through theirs.
//! - DEST is owned by the unpacking user and mode 0700 while it fills (a directory owned by
//!   someone else is refused, unless root, who takes it over), and each directory stays 0700
//!   until its last child is done: its final owner, xattrs, mode and times are applied when
//!   the walk leaves it (post-order), on its still-open descriptor. So no other non-root user
//!   can create, rename or remove a name anywhere beneath DEST during the unpack, and the few
//!   calls that must name an entry (symlinks and device nodes cannot be opened for writing:
//!   `fchownat`/`utimensat` with `AT_SYMLINK_NOFOLLOW`, `fchmodat` without following, and
//!   `lsetxattr` through `/proc/self/fd/<parent>/<name>`, which pins the parent directory)
//!   act on the entry just created.
//! - Hard links are made with `linkat` from the first path's directory, reached by opening
//!   its components one by one (`O_NOFOLLOW`) from the deepest open directory they share with
//!   the current walk position, or from DEST.
//!
//! Depth: the walk keeps the descriptors of the directories along its current path only, and
//! of those at most [`MAX_OPEN`]; deeper trees close the shallowest ones and reopen them, a
//! chunk at a time by walking down from DEST, when the walk climbs back to them. So depth is
//! bounded neither by `PATH_MAX` nor by `RLIMIT_NOFILE` (raising the soft limit would not help
//! when the hard one is lower than the depth), at the cost of O(depth²/MAX_OPEN) opens for a
//! pathologically deep tree.
//!
//! An ordinary user cannot create device nodes, give files away or set `trusted.*` and
//! `security.*` xattrs: those are skipped and counted in [`UnpackStats`] (with a few example
//! paths) instead of stopping the unpack. On an error the directories still open are given
//! their final attributes (best effort) before the error is returned, so a partial tree is not
//! left full of 0700 directories.

use crate::layout::ROOT_INO;
use crate::reader::{Attr, BlockCache, DirEntry, Image, ReadAt};
use crate::writer::tree::os;
use crate::{Error, FileKind, Result};
use rustix::fs::{self as rfs, AtFlags, Mode, OFlags, Timespec, Timestamps, XattrFlags};
use rustix::io::Errno;
use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Most directory descriptors the walk keeps open along its path (besides DEST's).
pub const MAX_OPEN: usize = 256;

/// Granularity of the holes left for all-zero data: one page, the block size of the usual
/// Linux filesystems. Extents start at multiples of the image block size (at least 4 KiB), so
/// pages counted from an extent's start are aligned in the file.
const PAGE: usize = 4096;

/// How many example paths a [`Skipped`] keeps.
const EXAMPLES: usize = 3;

/// What to recreate.
#[derive(Debug, Clone, Copy)]
pub struct UnpackOptions {
    /// Create device nodes (otherwise they are left out and counted in
    /// [`UnpackStats::omitted_devices`]).
    pub devices: bool,
    /// Give entries the image's owners when permitted (root, or the caller's own ids).
    pub same_owner: bool,
}

impl Default for UnpackOptions {
    fn default() -> Self {
        UnpackOptions {
            devices: true,
            same_owner: true,
        }
    }
}

/// Things not recreated because the unpacking user may not: how many, and the first few
/// paths (relative to DEST).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// How many.
    pub count: u64,
    /// The first few paths, relative to DEST.
    pub examples: Vec<PathBuf>,
}

impl Skipped {
    fn add(&mut self, rel: &[u8]) {
        self.count += 1;
        if self.examples.len() < EXAMPLES {
            self.examples
                .push(PathBuf::from(OsString::from_vec(rel.to_vec())));
        }
    }

    fn describe(&self, what: &str) -> Option<String> {
        if self.count == 0 {
            return None;
        }
        let mut list: Vec<String> = self
            .examples
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        if self.count > self.examples.len() as u64 {
            list.push("...".into());
        }
        Some(format!("{} {what} ({})", self.count, list.join(", ")))
    }
}

/// What an unpack did.
#[derive(Debug, Default, Clone)]
pub struct UnpackStats {
    /// Entries created (hard links included).
    pub entries: u64,
    /// Bytes of file content from stored blocks (the image's holes not counted; all-zero
    /// pages of stored blocks are, though left as holes on disk).
    pub bytes: u64,
    /// Device nodes the system refused to create (`EPERM`: not root, or no `CAP_MKNOD`).
    pub skipped_devices: Skipped,
    /// Entries left owned by the unpacking user because it may not give them away.
    pub skipped_owners: Skipped,
    /// `trusted.*` and `security.*` xattrs the unpacking user may not set.
    pub skipped_xattrs: Skipped,
    /// Device nodes left out on request ([`UnpackOptions::devices`] false).
    pub omitted_devices: u64,
}

impl UnpackStats {
    /// One line saying what was skipped for lack of permission, if anything was.
    pub fn warning(&self) -> Option<String> {
        let parts: Vec<String> = [
            self.skipped_devices.describe("device nodes"),
            self.skipped_owners
                .describe("entries keep the unpacking user as owner"),
            self.skipped_xattrs.describe("trusted.*/security.* xattrs"),
        ]
        .into_iter()
        .flatten()
        .collect();
        (!parts.is_empty()).then(|| {
            format!(
                "not permitted for this user, not recreated: {}",
                parts.join("; ")
            )
        })
    }
}

/// Unpack `img` into `dest`, which must not exist or be an empty directory, recreating
/// everything the caller is permitted to.
pub fn unpack<R: ReadAt>(
    img: &Image<R>,
    dest: &Path,
    progress: impl FnMut(u64),
) -> Result<UnpackStats> {
    unpack_with(img, dest, &UnpackOptions::default(), progress)
}

/// [`unpack`] with options.
pub fn unpack_with<R: ReadAt>(
    img: &Image<R>,
    dest: &Path,
    opts: &UnpackOptions,
    mut progress: impl FnMut(u64),
) -> Result<UnpackStats> {
    let as_root = nix::unistd::geteuid().is_root();
    let dest_fd = open_dest(dest, as_root)?;
    let mut u = Unpacker {
        ctx: Ctx {
            img,
            dest: dest.to_path_buf(),
            opts: *opts,
            as_root,
            me: (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            ),
        },
        dirs: DirStack {
            dest: dest.to_path_buf(),
            levels: vec![Level {
                name: Vec::new(),
                ino: ROOT_INO,
                fd: Some(dest_fd),
            }],
            lo: 1,
        },
        links: HashMap::new(),
        cache: BlockCache::new(4),
        stats: UnpackStats::default(),
        progress: &mut progress,
    };
    let r = img.walk(|rel, e| u.entry(rel, e)).and_then(|()| {
        while !u.dirs.levels.is_empty() {
            u.leave()?;
        }
        Ok(())
    });
    if let Err(e) = r {
        u.unwind();
        return Err(e);
    }
    Ok(u.stats)
}

fn io_err(path: impl Into<PathBuf>, e: Errno) -> Error {
    Error::io(path, e.into())
}

/// Create DEST if missing, open it without following a symlink, check it is empty and make
/// it private (ours, 0700) for the time of the unpack.
fn open_dest(dest: &Path, as_root: bool) -> Result<OwnedFd> {
    match rfs::mkdir(dest, Mode::from_raw_mode(0o700)) {
        Ok(()) | Err(Errno::EXIST) => {}
        Err(e) => return Err(io_err(dest, e)),
    }
    let fd = rfs::open(
        dest,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        Errno::NOTDIR | Errno::LOOP => {
            Error::Invalid(format!("{}: exists and is not a directory", dest.display()))
        }
        e => io_err(dest, e),
    })?;
    check_empty(&fd, dest)?;
    let st = rfs::fstat(&fd).map_err(|e| io_err(dest, e))?;
    let me = nix::unistd::geteuid().as_raw();
    if st.st_uid != me {
        if !as_root {
            return Err(Error::Invalid(format!(
                "{}: owned by another user; unpack into a directory of your own",
                dest.display()
            )));
        }
        // Root takes the directory over while filling it; the image's owner of its root
        // is given back at the end (unless --no-same-owner).
        rfs::fchown(
            &fd,
            Some(rfs::Uid::from_raw(me)),
            Some(rfs::Gid::from_raw(nix::unistd::getegid().as_raw())),
        )
        .map_err(|e| io_err(dest, e))?;
    }
    rfs::fchmod(&fd, Mode::from_raw_mode(0o700)).map_err(|e| io_err(dest, e))?;
    // Again: something may have been put there before it became private.
    check_empty(&fd, dest)?;
    Ok(fd)
}

fn check_empty(fd: &OwnedFd, dest: &Path) -> Result<()> {
    let dir = rfs::Dir::read_from(fd).map_err(|e| io_err(dest, e))?;
    for ent in dir {
        let ent = ent.map_err(|e| io_err(dest, e))?;
        let n = ent.file_name().to_bytes();
        if n != b"." && n != b".." {
            return Err(Error::Invalid(format!(
                "{}: directory is not empty",
                dest.display()
            )));
        }
    }
    Ok(())
}

/// Open the directory `name` in `dir`, refusing a symlink.
fn open_dir(dir: BorrowedFd<'_>, name: &[u8]) -> rustix::io::Result<OwnedFd> {
    rfs::openat(
        dir,
        os(name),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// One directory on the walk's current path.
struct Level {
    name: Vec<u8>,
    ino: u32,
    /// Closed for the shallower levels of a path deeper than [`MAX_OPEN`].
    fd: Option<OwnedFd>,
}

/// The directories along the walk's current path. Invariant: level 0 (DEST) is always open,
/// and of the others exactly the levels `lo..` are open.
struct DirStack {
    dest: PathBuf,
    levels: Vec<Level>,
    lo: usize,
}

impl DirStack {
    /// DEST joined with the names of levels `1..=k` (for messages).
    fn path(&self, k: usize) -> PathBuf {
        let mut p = self.dest.clone();
        for l in &self.levels[1..=k] {
            p.push(os(&l.name));
        }
        p
    }

    fn push(&mut self, name: &[u8], ino: u32, fd: OwnedFd) {
        self.levels.push(Level {
            name: name.to_vec(),
            ino,
            fd: Some(fd),
        });
        if self.levels.len() - self.lo > MAX_OPEN {
            self.levels[self.lo].fd = None;
            self.lo += 1;
        }
    }

    /// Remove the top level; its descriptor, reopened if it was closed.
    fn pop(&mut self) -> Result<(Level, OwnedFd)> {
        self.reopen_top()?;
        let mut l = self.levels.pop().expect("a level to pop");
        self.lo = self.lo.min(self.levels.len()).max(1);
        let fd = l.fd.take().expect("top level open");
        Ok((l, fd))
    }

    /// The top directory's descriptor.
    fn top(&mut self) -> Result<BorrowedFd<'_>> {
        self.reopen_top()?;
        Ok(self
            .levels
            .last()
            .and_then(|l| l.fd.as_ref())
            .expect("top level open")
            .as_fd())
    }

    /// Make sure the top level is open: if not, all of `1..=top` are closed (the open ones
    /// are a suffix); walk down from DEST and keep the last `MAX_OPEN / 2` of them.
    fn reopen_top(&mut self) -> Result<()> {
        let k = self.levels.len() - 1;
        if self.levels[k].fd.is_some() {
            return Ok(());
        }
        let keep_from = (k + 1).saturating_sub(MAX_OPEN / 2).max(1);
        let mut loose: Option<OwnedFd> = None;
        let mut base = 0;
        for i in 1..=k {
            let fd = {
                let b = match &loose {
                    Some(f) => f.as_fd(),
                    None => self.levels[base].fd.as_ref().expect("open base").as_fd(),
                };
                open_dir(b, &self.levels[i].name)
            }
            .map_err(|e| io_err(self.path(i), e))?;
            if i >= keep_from {
                self.levels[i].fd = Some(fd);
                loose = None;
                base = i;
            } else {
                loose = Some(fd);
            }
        }
        self.lo = keep_from;
        Ok(())
    }

    /// A descriptor of the directory `comps` (names from DEST), opened one component at a
    /// time without following symlinks from the deepest open level on the current path
    /// that is a prefix of it.
    fn open_rel(&self, comps: &[&[u8]]) -> rustix::io::Result<OwnedFd> {
        let common = comps
            .iter()
            .zip(self.levels.iter().skip(1))
            .take_while(|(c, l)| **c == l.name.as_slice())
            .count();
        let start = if common >= self.lo { common } else { 0 };
        let base = self.levels[start].fd.as_ref().expect("open level").as_fd();
        let mut fd = rustix::io::dup(base)?;
        for c in &comps[start..] {
            fd = open_dir(fd.as_fd(), c)?;
        }
        Ok(fd)
    }
}

/// How to reach an entry whose attributes are being set.
#[derive(Clone, Copy)]
enum Target<'a> {
    /// Through its own descriptor (directories, regular files).
    Fd(BorrowedFd<'a>),
    /// By name in its parent (symlinks, device nodes, fifos, sockets).
    At(BorrowedFd<'a>, &'a [u8]),
}

/// What does not change during an unpack.
struct Ctx<'a, R> {
    img: &'a Image<R>,
    dest: PathBuf,
    opts: UnpackOptions,
    as_root: bool,
    me: (u32, u32),
}

impl<R> Ctx<'_, R> {
    fn full(&self, rel: &[u8]) -> PathBuf {
        self.dest.join(os(rel))
    }
}

struct Unpacker<'a, 'p, R> {
    ctx: Ctx<'a, R>,
    dirs: DirStack,
    /// First path of each non-directory inode with more than one link, once created.
    links: HashMap<u32, Vec<u8>>,
    cache: BlockCache,
    stats: UnpackStats,
    progress: &'p mut dyn FnMut(u64),
}

impl<R: ReadAt> Unpacker<'_, '_, R> {
    /// Create one entry of the walk (pre-order), after finishing the directories the walk
    /// has left.
    fn entry(&mut self, rel: &[u8], e: &DirEntry<'_>) -> Result<()> {
        let depth = rel.iter().filter(|&&c| c == b'/').count() + 1;
        while self.dirs.levels.len() > depth {
            self.leave()?;
        }
        let name = e.name;
        let ctx = &self.ctx;
        let full = |e: Errno| io_err(ctx.full(rel), e);
        if let Some(first) = self.links.get(&e.ino) {
            let mut comps: Vec<&[u8]> = first.split(|&c| c == b'/').collect();
            let first_name = comps.pop().expect("a name");
            let src = self
                .dirs
                .open_rel(&comps)
                .map_err(|err| io_err(ctx.full(first), err))?;
            let parent = self.dirs.top()?;
            rfs::linkat(&src, os(first_name), parent, os(name), AtFlags::empty()).map_err(full)?;
            self.stats.entries += 1;
            return Ok(());
        }
        let a = ctx.img.attr(e.ino)?;
        match e.kind {
            FileKind::Dir => {
                let parent = self.dirs.top()?;
                rfs::mkdirat(parent, os(name), Mode::from_raw_mode(0o700)).map_err(full)?;
                let fd = open_dir(parent, name).map_err(full)?;
                // In case the umask took bits away: we must be able to fill it.
                rfs::fchmod(&fd, Mode::from_raw_mode(0o700)).map_err(full)?;
                self.dirs.push(name, e.ino, fd);
            }
            FileKind::File => {
                let parent = self.dirs.top()?;
                let fd = rfs::openat(
                    parent,
                    os(name),
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(full)?;
                let f = File::from(fd);
                write_data(
                    ctx,
                    &mut self.cache,
                    &mut self.stats,
                    self.progress,
                    &f,
                    &a,
                    rel,
                )?;
                set_attrs(ctx, &mut self.stats, Target::Fd(f.as_fd()), &a, rel)?;
            }
            FileKind::Symlink => {
                let target = ctx.img.readlink(e.ino)?;
                let parent = self.dirs.top()?;
                rfs::symlinkat(os(target), parent, os(name)).map_err(full)?;
                set_attrs(ctx, &mut self.stats, Target::At(parent, name), &a, rel)?;
            }
            kind => {
                let ft = match kind {
                    FileKind::CharDev => rfs::FileType::CharacterDevice,
                    FileKind::BlockDev => rfs::FileType::BlockDevice,
                    FileKind::Fifo => rfs::FileType::Fifo,
                    _ => rfs::FileType::Socket,
                };
                let device = matches!(kind, FileKind::CharDev | FileKind::BlockDev);
                if device && !ctx.opts.devices {
                    self.stats.omitted_devices += 1;
                    return Ok(());
                }
                let parent = self.dirs.top()?;
                match rfs::mknodat(
                    parent,
                    os(name),
                    ft,
                    Mode::from_raw_mode(a.perm() & 0o777),
                    a.rdev as rfs::Dev,
                ) {
                    Ok(()) => {}
                    Err(Errno::PERM) if device => {
                        self.stats.skipped_devices.add(rel);
                        return Ok(());
                    }
                    Err(err) => return Err(full(err)),
                }
                set_attrs(ctx, &mut self.stats, Target::At(parent, name), &a, rel)?;
            }
        }
        if a.nlink > 1 && e.kind != FileKind::Dir {
            self.links.insert(e.ino, rel.to_vec());
        }
        self.stats.entries += 1;
        Ok(())
    }

    /// Finish the top directory: the walk is done with it.
    fn leave(&mut self) -> Result<()> {
        let k = self.dirs.levels.len() - 1;
        let rel = self.rel_of(k);
        let (l, fd) = self.dirs.pop()?;
        let a = self.ctx.img.attr(l.ino)?;
        set_attrs(&self.ctx, &mut self.stats, Target::Fd(fd.as_fd()), &a, &rel)
    }

    /// The path of level `k` relative to DEST.
    fn rel_of(&self, k: usize) -> Vec<u8> {
        let mut rel = Vec::new();
        for l in &self.dirs.levels[1..=k] {
            if !rel.is_empty() {
                rel.push(b'/');
            }
            rel.extend_from_slice(&l.name);
        }
        rel
    }

    /// After an error: give the directories still on the path their final attributes, best
    /// effort, so a partial tree does not keep its 0700 working modes.
    fn unwind(&mut self) {
        while let Some(n) = self.dirs.levels.len().checked_sub(1) {
            if self.leave().is_err() && self.dirs.levels.len() > n {
                // Could not reopen it: drop it and go on with its parent.
                self.dirs.levels.pop();
                self.dirs.lo = self.dirs.lo.min(self.dirs.levels.len()).max(1);
            }
        }
    }
}

/// Write the content of regular file `a` to `f`: each stored extent in one write per run
/// of pages that are not all zero; the image's holes and all-zero pages are left as holes
/// and the size set at the end. Reads each block once into the cache (a block, not the
/// file or the extent list, is the most held in memory).
fn write_data<R: ReadAt>(
    ctx: &Ctx<'_, R>,
    cache: &mut BlockCache,
    stats: &mut UnpackStats,
    progress: &mut dyn FnMut(u64),
    f: &File,
    a: &Attr,
    rel: &[u8],
) -> Result<()> {
    let io = |e: io::Error| Error::io(ctx.full(rel), e);
    let mut off = 0u64;
    while off < a.size {
        let Some(x) = ctx.img.extent_at(a.ino, off)? else {
            break;
        };
        if x.len == 0 {
            break;
        }
        if let Some(b) = x.block {
            let data = cache.get(ctx.img, b).map_err(|e| name_err(rel, e))?;
            let start = x.block_offset as usize;
            let src = data
                .get(start..start + x.len as usize)
                .ok_or_else(|| Error::BadBlock {
                    block: b,
                    offset: 0,
                    why: format!(
                        "extent {start}+{} outside the block (file {})",
                        x.len,
                        String::from_utf8_lossy(rel)
                    ),
                })?;
            write_sparse(f, x.file_offset, src).map_err(io)?;
            stats.bytes += x.len as u64;
            progress(x.len as u64);
        }
        off = x.file_offset + x.len as u64;
    }
    f.set_len(a.size).map_err(io)
}

/// Owner, xattrs, mode and times, in that order (chown clears setuid bits and file
/// capabilities).
fn set_attrs<R: ReadAt>(
    ctx: &Ctx<'_, R>,
    stats: &mut UnpackStats,
    t: Target<'_>,
    a: &Attr,
    rel: &[u8],
) -> Result<()> {
    let path = || ctx.full(rel);
    let err = |e: Errno| io_err(path(), e);
    if ctx.opts.same_owner {
        if ctx.as_root || (a.uid, a.gid) == ctx.me {
            let (u, g) = (
                Some(rfs::Uid::from_raw(a.uid)),
                Some(rfs::Gid::from_raw(a.gid)),
            );
            match t {
                Target::Fd(fd) => rfs::fchown(fd, u, g),
                Target::At(dir, name) => {
                    rfs::chownat(dir, os(name), u, g, AtFlags::SYMLINK_NOFOLLOW)
                }
            }
            .map_err(err)?;
        } else {
            stats.skipped_owners.add(rel);
        }
    }
    for (k, v) in ctx.img.xattrs(a.ino)? {
        let r = match t {
            Target::Fd(fd) => rfs::fsetxattr(fd, os(k), v, XattrFlags::empty()),
            Target::At(dir, name) => {
                // No descriptor of a symlink or device node can set xattrs (`O_PATH`
                // ones are refused); the magic link pins the parent directory.
                let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
                p.extend_from_slice(name);
                rfs::lsetxattr(os(&p), os(k), v, XattrFlags::empty())
            }
        };
        if let Err(e) = r {
            // Unprivileged users cannot set trusted.* or security.*: count them.
            if !ctx.as_root && (k.starts_with(b"trusted.") || k.starts_with(b"security.")) {
                stats.skipped_xattrs.add(rel);
            } else {
                return Err(Error::io(
                    path(),
                    io::Error::other(format!(
                        "set xattr {}: {}",
                        String::from_utf8_lossy(k),
                        io::Error::from(e)
                    )),
                ));
            }
        }
    }
    let perm = a.perm();
    match t {
        Target::Fd(fd) => rfs::fchmod(fd, Mode::from_raw_mode(perm)).map_err(err)?,
        Target::At(_, _) if a.kind == FileKind::Symlink => {}
        Target::At(dir, name) => nix::sys::stat::fchmodat(
            dir,
            os(name),
            nix::sys::stat::Mode::from_bits_truncate(perm),
            nix::sys::stat::FchmodatFlags::NoFollowSymlink,
        )
        .map_err(|e| Error::io(path(), e.into()))?,
    }
    let ts = Timespec {
        tv_sec: a.mtime_sec,
        tv_nsec: a.mtime_nsec as _,
    };
    let times = Timestamps {
        last_access: ts,
        last_modification: ts,
    };
    match t {
        Target::Fd(fd) => rfs::futimens(fd, &times),
        Target::At(dir, name) => rfs::utimensat(dir, os(name), &times, AtFlags::SYMLINK_NOFOLLOW),
    }
    .map_err(err)
}

/// Write `data` at `off`, leaving all-zero pages unwritten (the file is new, so they read as
/// zeros, and the final `set_len` covers a zero tail). Runs of other pages go out in one
/// write each.
fn write_sparse(f: &File, off: u64, data: &[u8]) -> io::Result<()> {
    let mut run: Option<usize> = None;
    let mut i = 0;
    while i < data.len() {
        let end = (i + PAGE).min(data.len());
        if is_zero(&data[i..end]) {
            if let Some(s) = run.take() {
                f.write_all_at(&data[s..i], off + s as u64)?;
            }
        } else if run.is_none() {
            run = Some(i);
        }
        i = end;
    }
    if let Some(s) = run {
        f.write_all_at(&data[s..], off + s as u64)?;
    }
    Ok(())
}

fn is_zero(b: &[u8]) -> bool {
    // OR-folding fixed chunks vectorises; the early exit per chunk keeps data pages cheap.
    b.chunks(64).all(|c| c.iter().fold(0u8, |x, &y| x | y) == 0)
}

fn name_err(rel: &[u8], e: Error) -> Error {
    match e {
        Error::BadBlock { block, offset, why } => Error::BadBlock {
            block,
            offset,
            why: format!("{why} (file {})", String::from_utf8_lossy(rel)),
        },
        e => e,
    }
}
