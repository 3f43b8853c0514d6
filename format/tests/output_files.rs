//! Output files of `cimg pack` (`cimg_format::output`): never written through a symlink
//! planted at a temporary's name, nothing left behind on SIGINT, SIGTERM or a full disk.
//!
//! The full-disk test mounts a tmpfs and needs root; it fails, saying so, without.

use cimg_format::{PackOptions, pack_dir};
use std::fs;
use std::os::unix::fs::symlink;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_cimg");

/// Incompressible bytes (xorshift64*), fast enough for hundreds of MB.
fn noise(path: &Path, len: usize) {
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        v.extend_from_slice(&s.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    v.truncate(len);
    fs::write(path, v).expect("write source");
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Symlinks named like every temporary a writer could plausibly use (the old
/// `.OUT.tmpPID` with this process's pid, `OUT.tmp`, `.OUT.tmp`) all point at a victim:
/// the pack succeeds, the victim is untouched, the links are left as they were.
#[test]
fn pack_does_not_write_through_symlinks_at_temporary_names() {
    let d = tempfile::tempdir().expect("tempdir");
    let src = d.path().join("src");
    fs::create_dir(&src).expect("mkdir");
    fs::write(src.join("a"), b"content of a").expect("write");
    let out_dir = d.path().join("out");
    fs::create_dir(&out_dir).expect("mkdir");
    let victim = d.path().join("victim");
    fs::write(&victim, b"precious").expect("write");
    let pid = std::process::id();
    let planted = [
        format!(".img.cimg.tmp{pid}"),
        ".img.cimg.tmp".to_string(),
        "img.cimg.tmp".to_string(),
        format!("img.cimg.tmp{pid}"),
    ];
    for n in &planted {
        symlink(&victim, out_dir.join(n)).expect("symlink");
    }
    let out = out_dir.join("img.cimg");
    pack_dir(&src, &out, &PackOptions::default(), &|_, _| {}).expect("pack");
    assert!(
        fs::read(&victim).expect("victim") == b"precious",
        "the victim was written through a symlink"
    );
    assert!(
        !fs::symlink_metadata(&out).expect("out").is_symlink(),
        "the image is a file of its own"
    );
    cimg_format::Image::open(&out).expect("a valid image");
    let mut want: Vec<String> = planted.to_vec();
    want.push("img.cimg".into());
    want.sort();
    assert_eq!(names(&out_dir), want);
}

/// Kills the child if the test fails before it ends.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Bytes the process has written (any fd), from `/proc/PID/io`.
fn written(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("wchar:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// A pack of 200 MB of incompressible data at level 19 stopped by `sig` once it writes:
/// exits 128 + sig, and its output directory is empty.
fn stopped_pack_leaves_nothing(sig: nix::sys::signal::Signal) {
    let d = tempfile::tempdir().expect("tempdir");
    let src = d.path().join("src");
    fs::create_dir(&src).expect("mkdir");
    noise(&src.join("big"), 200 << 20);
    let out_dir = d.path().join("out");
    fs::create_dir(&out_dir).expect("mkdir");
    let child = Command::new(BIN)
        .arg("pack")
        .arg(&src)
        .arg(out_dir.join("img.cimg"))
        .args(["--level", "19", "--quiet"])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cimg");
    let mut child = Reap(child);
    let pid = child.0.id();
    let deadline = Instant::now() + Duration::from_secs(60);
    // The image's first bytes (the zeroed superblock area) are written at once.
    while written(pid) == 0 {
        assert!(Instant::now() < deadline, "cimg pack wrote nothing in 60 s");
        assert!(
            child.0.try_wait().expect("try_wait").is_none(),
            "cimg pack ended before it was signalled"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.0.try_wait().expect("try_wait").is_none(),
        "cimg pack ended before it was signalled: the source is too small for this machine"
    );
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).expect("kill");
    let status = loop {
        if let Some(s) = child.0.try_wait().expect("try_wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "cimg pack did not stop on {sig}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(names(&out_dir), Vec::<String>::new(), "left after {sig}");
    assert_eq!(
        (status.code(), status.signal()),
        (Some(128 + sig as i32), None),
        "exit status on {sig}"
    );
}

#[test]
fn sigint_of_pack_leaves_nothing() {
    stopped_pack_leaves_nothing(nix::sys::signal::Signal::SIGINT);
}

#[test]
fn sigterm_of_pack_leaves_nothing() {
    stopped_pack_leaves_nothing(nix::sys::signal::Signal::SIGTERM);
}

/// A tmpfs of 1 MiB mounted on a fresh directory, unmounted when dropped.
struct SmallFs {
    dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl SmallFs {
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
        SmallFs { dir, _tmp: tmp }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A pack that does not fit fails with one line naming the image and the full disk, and
/// leaves no file.
#[test]
fn pack_onto_a_full_filesystem_fails_and_leaves_nothing() {
    let small = SmallFs::new();
    let d = tempfile::tempdir().expect("tempdir");
    let src = d.path().join("src");
    fs::create_dir(&src).expect("mkdir");
    noise(&src.join("big"), 4 << 20);
    let out = small.dir.join("img.cimg");
    let o = Command::new(BIN)
        .arg("pack")
        .arg(&src)
        .arg(&out)
        .args(["--level", "1", "--quiet"])
        .stdin(Stdio::null())
        .output()
        .expect("run cimg");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.starts_with("cimg: ")
            && err.contains(&format!("{}: ", out.display()))
            && err.contains("No space left on device"),
        "{err}"
    );
    assert_eq!(names(&small.dir), Vec::<String>::new());
}

/// A destination given as a bare file name lands in the current directory, alone.
#[test]
fn pack_to_a_bare_file_name() {
    let d = tempfile::tempdir().expect("tempdir");
    fs::create_dir(d.path().join("src")).expect("mkdir");
    fs::write(d.path().join("src/a"), b"a").expect("write");
    let o = Command::new(BIN)
        .current_dir(d.path())
        .args(["pack", "src", "img.cimg", "--quiet"])
        .output()
        .expect("run cimg");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        names(d.path()),
        vec!["img.cimg".to_string(), "src".to_string()]
    );
}
