//! Files `cimg-mount` writes for the user (`cimg_format::output`): `--log` never appends
//! through a planted symlink, and `--record-hot` onto a full disk is an error (a log line and
//! exit status 1), not an empty or partial list.
//!
//! The full-disk test mounts a tmpfs and FUSE and needs root; it fails, saying so, without.

use cimg_format::{PackOptions, pack_dir};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_cimg-mount");

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// An image of one file `f`, and an empty mount point, in `dir`.
fn image(dir: &Path) -> (PathBuf, PathBuf) {
    let src = dir.join("src");
    fs::create_dir(&src).expect("mkdir");
    fs::write(src.join("f"), b"data").expect("write");
    let img = dir.join("img.cimg");
    pack_dir(&src, &img, &PackOptions::default(), &|_, _| {}).expect("pack");
    let mnt = dir.join("mnt");
    fs::create_dir(&mnt).expect("mkdir");
    (img, mnt)
}

fn is_mounted(dir: &Path) -> bool {
    let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(&*dir.to_string_lossy()))
}

/// Lazily unmounts `0` if the test leaves it mounted.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// `--log` naming a symlink to a victim: refused before anything is mounted, with a message
/// saying it is a symlink; the victim is untouched.
#[test]
fn log_through_a_planted_symlink_is_refused() {
    let d = tempfile::tempdir().expect("tempdir");
    let (img, mnt) = image(d.path());
    let _guard = Unmount(mnt.clone());
    let victim = d.path().join("victim");
    fs::write(&victim, b"precious").expect("write");
    let log = d.path().join("mount.log");
    symlink(&victim, &log).expect("symlink");
    let o = Command::new(BIN)
        .arg(&img)
        .arg(&mnt)
        .arg("--log")
        .arg(&log)
        .stdin(Stdio::null())
        .output()
        .expect("run cimg-mount");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("cimg-mount: ")
            && err.contains(&format!("{}: is a symlink", log.display())),
        "{err}"
    );
    assert!(!is_mounted(&mnt));
    assert_eq!(fs::read(&victim).expect("victim"), b"precious");
}

/// A tmpfs of 1 MiB on a fresh directory, filled up, unmounted when dropped.
struct FullFs {
    dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl FullFs {
    fn new() -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("small");
        fs::create_dir(&dir).expect("mkdir");
        if let Err(e) = nix::mount::mount(
            Some("tmpfs"),
            &dir,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=1m"),
        ) {
            panic!(
                "mounting a 1 MiB tmpfs on {} failed ({e}): this test needs root (or \
                 CAP_SYS_ADMIN) to make a full filesystem",
                dir.display()
            );
        }
        let fs = FullFs { dir, _tmp: tmp };
        let mut f = fs::File::create(fs.dir.join("filler")).expect("filler");
        let chunk = vec![0x5au8; 4096];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
        fs
    }
}

impl Drop for FullFs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Kills the server if the test fails while it runs.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `--record-hot` onto a full filesystem: at unmount the server says why the list could not
/// be written (one line naming the file) and exits 1; no file is left beside the filler.
#[test]
fn record_hot_onto_a_full_filesystem_is_an_error() {
    if let Err(e) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        panic!("/dev/fuse is not usable ({e}): this test needs FUSE (modprobe fuse) and root");
    }
    let full = FullFs::new();
    let d = tempfile::tempdir().expect("tempdir");
    let (img, mnt) = image(d.path());
    let _guard = Unmount(mnt.clone());
    let hot = full.dir.join("hot.txt");
    let parent_dev = fs::metadata(&mnt).expect("mnt").dev();
    let child = Command::new(BIN)
        .arg(&img)
        .arg(&mnt)
        .arg("--foreground")
        .arg("--record-hot")
        .arg(&hot)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cimg-mount");
    let mut child = Reap(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !is_mounted(&mnt) {
        assert!(Instant::now() < deadline, "not mounted within 30 s");
        assert!(
            child.0.try_wait().expect("try_wait").is_none(),
            "cimg-mount exited before mounting"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_ne!(fs::metadata(&mnt).expect("mnt").dev(), parent_dev);
    assert_eq!(fs::read(mnt.join("f")).expect("read f"), b"data");
    let st = Command::new("umount").arg(&mnt).status().expect("umount");
    assert!(st.success(), "umount {}", mnt.display());
    let status = loop {
        if let Some(s) = child.0.try_wait().expect("try_wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "the server did not exit");
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    child
        .0
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("read stderr");
    assert_eq!(names(&full.dir), vec!["filler".to_string()], "{err}");
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.lines().any(|l| l.starts_with("cimg-mount: ")
            && l.contains(&format!("{}: ", hot.display()))
            && l.contains("No space left on device")),
        "{err}"
    );
}
