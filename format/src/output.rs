//! Creating output files: the one routine every writer of this workspace uses for a file the
//! user named (`cimg pack`'s image, `cimg-mount --record-hot`'s list) and for an appended log
//! (`cimg-mount --log`).
//!
//! Guarantees of [`Output`] (create, write, [`Output::commit`]):
//! - no partial file is ever visible under the destination's name: the content is written
//!   to a temporary in the destination's directory, synced, and renamed onto the destination
//!   only when complete; a failed write (a full disk) or sync is an error naming the path;
//! - a planted symlink is never followed: the temporary is anonymous (`O_TMPFILE`) and is
//!   linked into the directory under a random name that `linkat` refuses to reuse, or, where
//!   `O_TMPFILE` is not supported (some NFS and Lustre), it is created under a random name
//!   with `O_CREAT | O_EXCL | O_NOFOLLOW`; the rename replaces a symlink at the destination
//!   itself, it does not write through it;
//! - on error (the [`Output`] dropped uncommitted) the temporary is removed; on SIGINT,
//!   SIGTERM or SIGHUP too, in a program whose signal thread calls [`exit_removing_pending`]
//!   (the `cimg` binary does);
//! - SIGKILL or a power cut leaves nothing with `O_TMPFILE` (the inode was never linked), and
//!   with the fallback a `.NAME.XXXXXXXXXXXXXXXX` file beside the destination (the random
//!   name tells it from anything else there).
//!
//! The final mode is the one `File::create` gives (0644 less the umask), set with `fchmod`
//! before the file gets a name; while it is being written the fallback's file is 0600.

use crate::{Error, Result};
use rustix::fs::{AtFlags, CWD, FileType, Mode, OFlags};
use rustix::io::Errno;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// Temporaries that have a name in a directory and are not yet renamed onto their
/// destination (absolute paths). A signal thread removes them before exiting; it keeps the
/// lock until the process exits, so that no new one appears after it looked.
static PENDING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn pending() -> MutexGuard<'static, Vec<PathBuf>> {
    PENDING.lock().unwrap_or_else(|p| p.into_inner())
}

fn unregister(path: &Path) {
    let mut p = pending();
    if let Some(i) = p.iter().position(|x| x == path) {
        p.swap_remove(i);
    }
}

/// Remove every named temporary not yet renamed onto its destination, then exit with
/// `code`; for a thread that has received a stop signal. Files being written anonymously
/// (`O_TMPFILE`) need nothing: they vanish with the process.
pub fn exit_removing_pending(code: i32) -> ! {
    let guard = pending();
    for p in guard.iter() {
        let _ = std::fs::remove_file(p);
    }
    // The lock is held until the process is gone: a writer about to name a temporary waits.
    std::process::exit(code)
}

/// The process's umask, read without changing it (`umask(2)` can only set it, and setting
/// it to read it races with other threads creating files). From `/proc/self/status`; 022 if
/// that does not say (kernels before 4.7).
fn umask() -> u32 {
    static UMASK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Umask:"))
                    .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            })
            .unwrap_or(0o022)
    })
}

/// `.NAME.` and 16 random hex digits.
fn random_name(name: &OsStr) -> Result<OsString> {
    let mut r = [0u8; 8];
    let mut got = 0;
    while got < r.len() {
        match rustix::rand::getrandom(&mut r[got..], rustix::rand::GetRandomFlags::empty()) {
            Ok(n) => got += n,
            Err(Errno::INTR) => {}
            Err(e) => {
                return Err(Error::io("getrandom", e.into()));
            }
        }
    }
    let mut s = OsString::from(".");
    s.push(name);
    s.push(".");
    for b in r {
        s.push(format!("{b:02x}"));
    }
    Ok(s)
}

/// How many random names are tried before giving up (a collision of 64 random bits means
/// something else is going on).
const NAME_TRIES: usize = 16;

/// A file being written; it appears under its destination's name only when
/// [`commit`](Output::commit)ted. Dropped uncommitted, it leaves nothing.
#[derive(Debug)]
pub struct Output {
    file: File,
    /// The destination's directory.
    dir: OwnedFd,
    /// The destination as given, for messages.
    dest: PathBuf,
    /// The destination's directory, absolute: temporaries are registered by absolute path.
    abs_dir: PathBuf,
    /// The destination's file name in `dir`.
    name: OsString,
    /// The mode it gets before it is named.
    mode: u32,
    /// The fallback's named temporary: (name in `dir`, absolute path as registered).
    named: Option<(OsString, PathBuf)>,
}

impl Output {
    /// Start writing `dest`, to have mode 0644 less the umask.
    pub fn create(dest: &Path) -> Result<Self> {
        Self::with_mode(dest, 0o644)
    }

    /// Start writing `dest`, to have mode `mode` less the umask.
    pub fn with_mode(dest: &Path, mode: u32) -> Result<Self> {
        Self::open(dest, mode, true)
    }

    /// `anonymous`: try `O_TMPFILE` first (false only in tests, to reach the fallback).
    fn open(dest: &Path, mode: u32, anonymous: bool) -> Result<Self> {
        let name = dest
            .file_name()
            .ok_or_else(|| Error::Invalid(format!("{}: not a file name", dest.display())))?
            .to_owned();
        let dir_path = dest
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        // Readable to be synced after the rename; a directory the user may only write to and
        // search is opened as a path (everything but that sync works on it).
        let dir = rustix::fs::open(
            dir_path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .or_else(|e| match e {
            Errno::ACCESS => rustix::fs::open(
                dir_path,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            ),
            e => Err(e),
        })
        .map_err(|e| Error::io(dir_path, e.into()))?;
        let abs_dir = std::path::absolute(dir_path).map_err(|e| Error::io(dir_path, e))?;
        let mode = mode & 0o7777 & !umask();
        // Anonymous first. The kernel answers EISDIR (before 3.11: O_TMPFILE unknown, taken
        // as O_DIRECTORY), EOPNOTSUPP (the filesystem cannot) or EINVAL; then a named file.
        // Without /proc the anonymous file could not be named later (`linkat` with
        // AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH), so then too.
        let anon = if anonymous && Path::new("/proc/self/fd").is_dir() {
            rustix::fs::openat(
                &dir,
                ".",
                OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
        } else {
            Err(Errno::OPNOTSUPP)
        };
        let (fd, named) = match anon {
            Ok(fd) => (fd, None),
            Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL) => {
                let mut tries = 0;
                loop {
                    let tmp = random_name(&name)?;
                    let abs = abs_dir.join(&tmp);
                    // Created and registered under the lock: a signal thread either sees it
                    // or stops this thread before it exists.
                    let mut reg = pending();
                    match rustix::fs::openat(
                        &dir,
                        &tmp,
                        OFlags::CREATE
                            | OFlags::EXCL
                            | OFlags::NOFOLLOW
                            | OFlags::RDWR
                            | OFlags::CLOEXEC,
                        Mode::from_raw_mode(0o600),
                    ) {
                        Ok(fd) => {
                            reg.push(abs.clone());
                            break (fd, Some((tmp, abs)));
                        }
                        Err(Errno::EXIST) if tries < NAME_TRIES => tries += 1,
                        Err(e) => return Err(Error::io(abs, e.into())),
                    }
                }
            }
            Err(e) => return Err(Error::io(dest, e.into())),
        };
        Ok(Output {
            file: File::from(fd),
            dir,
            dest: dest.to_path_buf(),
            abs_dir,
            name,
            mode,
            named,
        })
    }

    /// The file being written (for positioned writes).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The destination, as given.
    pub fn path(&self) -> &Path {
        &self.dest
    }

    /// Sync the content, set the final mode and rename the file onto the destination,
    /// replacing what is there. Every step's failure is an error naming the destination.
    pub fn commit(mut self) -> Result<()> {
        let dest = self.dest.clone();
        let fail = |what: &str, e: io::Error| {
            Error::io(&dest, io::Error::new(e.kind(), format!("{what}: {e}")))
        };
        self.file.flush().map_err(|e| fail("write", e))?;
        // A write the disk could not take may only be reported here (delayed allocation,
        // NFS): this is what makes a full disk an error and not a short file.
        self.file.sync_all().map_err(|e| fail("sync", e))?;
        rustix::fs::fchmod(&self.file, Mode::from_raw_mode(self.mode))
            .map_err(|e| fail("chmod", e.into()))?;
        let tmp = match &self.named {
            Some((tmp, _)) => tmp.clone(),
            None => self.link_anonymous().map_err(|e| fail("link", e))?,
        };
        let renamed = rustix::fs::renameat(&self.dir, &tmp, &self.dir, &self.name);
        if let Err(e) = renamed {
            // Drop removes the named temporary.
            return Err(fail("rename", e.into()));
        }
        if let Some((_, abs)) = self.named.take() {
            unregister(&abs);
        }
        // Durability of the new name after a power cut; the file is complete and in place
        // whatever this says (some filesystems refuse fsync on a directory), so it is not an
        // error.
        let _ = rustix::fs::fsync(&self.dir);
        Ok(())
    }

    /// Give the anonymous file a random name in the directory (registered as pending).
    fn link_anonymous(&mut self) -> io::Result<OsString> {
        let proc_path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
        let mut tries = 0;
        loop {
            let tmp = random_name(&self.name).map_err(|e| io::Error::other(e.to_string()))?;
            let abs = self.abs_dir.join(&tmp);
            let mut reg = pending();
            // linkat never replaces an existing name (EEXIST), so a planted symlink there
            // is not followed; the magic link in /proc is followed to the file itself.
            let r = rustix::fs::linkat(CWD, &proc_path, &self.dir, &tmp, AtFlags::SYMLINK_FOLLOW)
                .or_else(|e| match e {
                    // No /proc after all: the privileged way.
                    Errno::NOENT => {
                        rustix::fs::linkat(&self.file, "", &self.dir, &tmp, AtFlags::EMPTY_PATH)
                    }
                    e => Err(e),
                });
            match r {
                Ok(()) => {
                    reg.push(abs.clone());
                    self.named = Some((tmp.clone(), abs));
                    return Ok(tmp);
                }
                Err(Errno::EXIST) if tries < NAME_TRIES => tries += 1,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        if let Some((tmp, abs)) = self.named.take() {
            let _ = rustix::fs::unlinkat(&self.dir, &tmp, AtFlags::empty());
            unregister(&abs);
        }
    }
}

/// Write `data` to `dest` through an [`Output`]: all of it or, on error, nothing.
pub fn write_file(dest: &Path, data: &[u8]) -> Result<()> {
    let mut out = Output::create(dest)?;
    out.write_all(data)
        .map_err(|e| Error::io(dest, io::Error::new(e.kind(), format!("write: {e}"))))?;
    out.commit()
}

/// Open the log file `path` for appending, creating it with mode 0600: a file the user asked
/// for, so it is not replaced. A symlink there is refused (`O_NOFOLLOW`), and so is anything
/// but a regular file (a FIFO would block the writer; it is opened non-blocking to look).
pub fn open_log(path: &Path) -> Result<File> {
    let refuse = |why: &str| Error::Invalid(format!("{}: {why}: refused", path.display()));
    let fd: OwnedFd = match rustix::fs::openat(
        CWD,
        path,
        OFlags::WRONLY
            | OFlags::APPEND
            | OFlags::CREATE
            | OFlags::NOFOLLOW
            | OFlags::CLOEXEC
            | OFlags::NONBLOCK,
        Mode::from_raw_mode(0o600),
    ) {
        Ok(fd) => fd,
        Err(e @ (Errno::LOOP | Errno::NXIO)) => {
            // ELOOP: a symlink (O_NOFOLLOW) or too many in the directories; ENXIO: a FIFO
            // without a reader, or a device without its driver.
            return Err(match rustix::fs::lstat(path) {
                Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => {
                    refuse("is a symlink")
                }
                Ok(_) if e == Errno::NXIO => refuse("not a regular file"),
                _ => Error::io(path, e.into()),
            });
        }
        Err(e) => return Err(Error::io(path, e.into())),
    };
    let st = rustix::fs::fstat(&fd).map_err(|e| Error::io(path, e.into()))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(refuse("not a regular file"));
    }
    let flags = rustix::fs::fcntl_getfl(&fd).map_err(|e| Error::io(path, e.into()))?;
    rustix::fs::fcntl_setfl(&fd, flags - OFlags::NONBLOCK)
        .map_err(|e| Error::io(path, e.into()))?;
    Ok(File::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// While being written, nothing is visible in the directory (O_TMPFILE here; the test
    /// directory is on a filesystem that has it, checked first).
    #[test]
    fn the_temporary_is_invisible_until_commit() {
        let d = tempfile::tempdir().unwrap();
        let probe = rustix::fs::openat(
            CWD,
            d.path(),
            OFlags::TMPFILE | OFlags::RDWR,
            Mode::from_raw_mode(0o600),
        );
        assert!(
            probe.is_ok(),
            "the temporary directory's filesystem has no O_TMPFILE ({probe:?}); set TMPDIR to \
             one that has (ext4, xfs, btrfs, tmpfs)"
        );
        let dest = d.path().join("out.img");
        let mut o = Output::create(&dest).unwrap();
        o.write_all(b"hello").unwrap();
        assert!(o.named.is_none(), "anonymous");
        assert_eq!(names(d.path()), Vec::<String>::new());
        o.commit().unwrap();
        assert_eq!(names(d.path()), vec!["out.img".to_string()]);
        assert_eq!(std::fs::read(&dest).unwrap(), b"hello");
        let mode = std::fs::metadata(&dest).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o644 & !umask());
    }

    /// Dropped uncommitted, nothing is left and the old destination stays.
    #[test]
    fn drop_leaves_the_old_destination() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("out.img");
        std::fs::write(&dest, b"old").unwrap();
        let mut o = Output::create(&dest).unwrap();
        o.write_all(b"new, partial").unwrap();
        drop(o);
        assert_eq!(names(d.path()), vec!["out.img".to_string()]);
        assert_eq!(std::fs::read(&dest).unwrap(), b"old");
    }

    /// The named fallback: created O_EXCL (an existing name, a planted symlink, is not
    /// reused), mode 0600 while written, registered as pending, removed when dropped; and
    /// committed, it is the destination.
    #[test]
    fn the_named_fallback_is_exclusive_and_removed() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"victim").unwrap();
        // The flags the fallback opens with, on a name that exists as a symlink.
        std::os::unix::fs::symlink(&victim, d.path().join(".x.0")).unwrap();
        let r = rustix::fs::openat(
            CWD,
            d.path().join(".x.0"),
            OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::RDWR,
            Mode::from_raw_mode(0o600),
        );
        assert_eq!(r.err(), Some(Errno::EXIST));
        assert_eq!(std::fs::read(&victim).unwrap(), b"victim");
        std::fs::remove_file(d.path().join(".x.0")).unwrap();

        let dest = d.path().join("out.img");
        let mut o = Output::open(&dest, 0o644, false).unwrap();
        let abs = o.named.as_ref().expect("named").1.clone();
        assert!(
            abs.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(".out.img."),
            "{abs:?}"
        );
        o.write_all(b"data").unwrap();
        assert_eq!(std::fs::metadata(&abs).unwrap().mode() & 0o777, 0o600);
        assert!(pending().contains(&abs));
        drop(o);
        assert!(!abs.exists());
        assert!(!pending().contains(&abs));
        assert_eq!(names(d.path()), vec!["victim".to_string()]);

        let mut o = Output::open(&dest, 0o644, false).unwrap();
        o.write_all(b"data").unwrap();
        o.commit().unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"data");
        let mode = std::fs::metadata(&dest).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o644 & !umask());
        assert_eq!(
            names(d.path()),
            vec!["out.img".to_string(), "victim".to_string()]
        );
        assert!(!pending().iter().any(|p| p.starts_with(d.path())));
    }

    /// Symlinks planted at plausible temporary names are left alone, and so is their target.
    #[test]
    fn planted_symlinks_are_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"victim").unwrap();
        for n in [
            ".out.img.tmp",
            "out.img.tmp",
            ".out.img.tmp1",
            ".out.img.0000000000000000",
        ] {
            std::os::unix::fs::symlink(&victim, d.path().join(n)).unwrap();
        }
        write_file(&d.path().join("out.img"), b"content").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"victim");
        assert_eq!(std::fs::read(d.path().join("out.img")).unwrap(), b"content");
        assert_eq!(names(d.path()).len(), 6);
    }

    #[test]
    fn open_log_refuses_symlinks_and_fifos_and_appends() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"victim").unwrap();
        let link = d.path().join("log");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let e = open_log(&link).unwrap_err().to_string();
        assert!(e.contains("is a symlink"), "{e}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"victim");

        let fifo = d.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = open_log(&fifo).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");

        let log = d.path().join("real.log");
        std::fs::write(&log, b"one\n").unwrap();
        let mut f = open_log(&log).unwrap();
        f.write_all(b"two\n").unwrap();
        assert_eq!(std::fs::read(&log).unwrap(), b"one\ntwo\n");
        let fresh = d.path().join("fresh.log");
        open_log(&fresh).unwrap();
        assert_eq!(
            std::fs::metadata(&fresh).unwrap().mode() & 0o777,
            0o600 & !umask()
        );
    }
}
