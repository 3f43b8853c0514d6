//! Unpacking an image back into a directory: every file type, permission bits, ownership
//! (when running as root, or for the caller's own ids), modification times, xattrs, hard
//! links and holes.
//!
//! Safety: names come from a validated image (no `/`, `.`, `..` or NUL), every entry is
//! created fresh beneath the target (never through an existing file or symlink), and the
//! target must be absent or an empty directory, so nothing is written outside it.

use crate::reader::{BlockCache, Image, ReadAt};
use crate::writer::tree::os;
use crate::{Error, FileKind, Result};
use nix::sys::stat::{Mode, SFlag, UtimensatFlags, mknod, utimensat};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, fchownat};
use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// What an unpack did.
#[derive(Debug, Default, Clone, Copy)]
pub struct UnpackStats {
    /// Entries created (hard links included).
    pub entries: u64,
    /// Bytes of file content written (holes not counted).
    pub bytes: u64,
}

/// Unpack `img` into `dest`, which must not exist or be an empty directory.
pub fn unpack<R: ReadAt>(
    img: &Image<R>,
    dest: &Path,
    mut progress: impl FnMut(u64),
) -> Result<UnpackStats> {
    match fs::symlink_metadata(dest) {
        Ok(md) if md.is_dir() => {
            let mut rd = fs::read_dir(dest).map_err(|e| Error::io(dest, e))?;
            if rd.next().is_some() {
                return Err(Error::Invalid(format!(
                    "{}: directory is not empty",
                    dest.display()
                )));
            }
        }
        Ok(_) => {
            return Err(Error::Invalid(format!(
                "{}: exists and is not a directory",
                dest.display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir(dest).map_err(|e| Error::io(dest, e))?;
        }
        Err(e) => return Err(Error::io(dest, e)),
    }
    let as_root = nix::unistd::geteuid().is_root();
    let me = (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    let mut cache = BlockCache::new(4);
    let mut first_path: HashMap<u32, PathBuf> = HashMap::new();
    let mut dirs: Vec<(PathBuf, u32)> = vec![(dest.to_path_buf(), 1)];
    let mut stats = UnpackStats::default();
    let mut buf = Vec::new();
    img.walk(|rel, e| {
        let path = dest.join(os(rel));
        if let Some(p) = first_path.get(&e.ino) {
            fs::hard_link(p, &path).map_err(|err| Error::io(&path, err))?;
            stats.entries += 1;
            return Ok(());
        }
        let a = img.attr(e.ino)?;
        let perm = Mode::from_bits_truncate(a.perm() & 0o777);
        match e.kind {
            FileKind::Dir => {
                fs::create_dir(&path).map_err(|err| Error::io(&path, err))?;
                fs::set_permissions(&path, fs::Permissions::from_mode(0o700))
                    .map_err(|err| Error::io(&path, err))?;
                dirs.push((path.clone(), e.ino));
            }
            FileKind::File => {
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(nix::libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&path)
                    .map_err(|err| Error::io(&path, err))?;
                let exts: Vec<_> = img.extents(e.ino)?.collect();
                for x in exts {
                    match x.block {
                        None => {
                            f.seek(SeekFrom::Current(x.len as i64))
                                .map_err(|err| Error::io(&path, err))?;
                        }
                        Some(_) => {
                            buf.resize(x.len as usize, 0);
                            cache
                                .read_at(img, e.ino, x.file_offset, &mut buf)
                                .map_err(|err| name_err(rel, err))?;
                            f.write_all(&buf).map_err(|err| Error::io(&path, err))?;
                            stats.bytes += x.len as u64;
                            progress(x.len as u64);
                        }
                    }
                }
                f.set_len(a.size).map_err(|err| Error::io(&path, err))?;
            }
            FileKind::Symlink => {
                std::os::unix::fs::symlink(os(img.readlink(e.ino)?), &path)
                    .map_err(|err| Error::io(&path, err))?;
            }
            kind => {
                let sflag = match kind {
                    FileKind::CharDev => SFlag::S_IFCHR,
                    FileKind::BlockDev => SFlag::S_IFBLK,
                    FileKind::Fifo => SFlag::S_IFIFO,
                    _ => SFlag::S_IFSOCK,
                };
                mknod(&path, sflag, perm, a.rdev as nix::libc::dev_t)
                    .map_err(|err| Error::io(&path, err.into()))?;
            }
        }
        if e.kind != FileKind::Dir {
            finish(&path, img, e.ino, as_root, me)?;
        }
        first_path.insert(e.ino, path);
        stats.entries += 1;
        Ok(())
    })?;
    // Directories last, deepest first, so creating their contents does not change their
    // times and a read-only directory does not stop its own filling.
    for (path, ino) in dirs.iter().rev() {
        finish(path, img, *ino, as_root, me)?;
    }
    Ok(stats)
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

/// Owner, xattrs, mode and mtime, in that order (chown clears setuid bits).
fn finish<R: ReadAt>(
    path: &Path,
    img: &Image<R>,
    ino: u32,
    as_root: bool,
    me: (u32, u32),
) -> Result<()> {
    let a = img.attr(ino)?;
    let io = |e: nix::Error| Error::io(path, e.into());
    if as_root || (a.uid, a.gid) == me {
        fchownat(
            nix::fcntl::AT_FDCWD,
            path,
            Some(Uid::from_raw(a.uid)),
            Some(Gid::from_raw(a.gid)),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(io)?;
    }
    for (k, v) in img.xattrs(ino)? {
        if let Err(e) = xattr::set(path, os(k), v) {
            // Unprivileged users cannot set trusted.* or security.*; say so rather than fail.
            if as_root || !(k.starts_with(b"trusted.") || k.starts_with(b"security.")) {
                return Err(Error::io(path, e));
            }
        }
    }
    if a.kind != FileKind::Symlink {
        fs::set_permissions(path, fs::Permissions::from_mode(a.perm()))
            .map_err(|e| Error::io(path, e))?;
    }
    let t = TimeSpec::new(a.mtime_sec, a.mtime_nsec as i64);
    utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &t,
        &t,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(io)?;
    Ok(())
}
