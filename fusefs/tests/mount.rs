//! Mount real images with the `cimg-mount` binary and check them through the kernel.
//!
//! Needs `/dev/fuse` and the right to mount (root, or fusermount3). Without `/dev/fuse` the
//! tests are skipped with a message, unless `CI=true`, where that is a failure.

use cimg_format::{Image, PackOptions, pack_dir};
use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, FileTimes};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

const BIN: &str = env!("CARGO_BIN_EXE_cimg-mount");
const EROFS: i32 = 30;
const EIO: i32 = 5;

fn fuse_available() -> bool {
    match fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("/dev/fuse is not usable ({e}) and CI=true: FUSE tests cannot be skipped");
            }
            eprintln!("skipping: /dev/fuse is not usable ({e})");
            false
        }
    }
}

/// xorshift64*: reproducible bytes without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    /// Compressible text.
    fn text(&mut self, n: usize) -> Vec<u8> {
        let words: [&[u8]; 6] = [
            b"alpha ", b"beta ", b"gamma\n", b"delta ", b"eps ", b"zeta ",
        ];
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(words[self.below(6) as usize]);
        }
        v.truncate(n);
        v
    }
}

fn write(path: &Path, data: &[u8], mode: u32) {
    fs::write(path, data).expect("write");
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

fn set_mtime(path: &Path, secs: u64, nanos: u32) {
    let t = SystemTime::UNIX_EPOCH + Duration::new(secs, nanos);
    File::open(path)
        .and_then(|f| f.set_times(FileTimes::new().set_modified(t).set_accessed(t)))
        .expect("set mtime");
}

/// Build the source tree; returns whether xattrs could be set on it.
fn build_tree(root: &Path) -> bool {
    let mut r = Rng(0x9E37_79B9_7F4A_7C15);
    fs::create_dir_all(root.join("sub/deeper")).expect("mkdir");
    fs::create_dir_all(root.join("many")).expect("mkdir");
    fs::create_dir_all(root.join("empty-dir")).expect("mkdir");
    write(&root.join("empty"), b"", 0o644);
    write(&root.join("small.txt"), b"hello\n", 0o644);
    write(&root.join("page"), &r.bytes(4095), 0o600);
    write(&root.join("exact"), &r.text(128 << 10), 0o644);
    let mut multi = r.text(200_000);
    multi.extend(r.bytes(200_017));
    write(&root.join("multi"), &multi, 0o755);
    let mut big = Vec::new();
    for i in 0..26 {
        match i % 3 {
            0 => big.extend(r.bytes(128 << 10)),
            1 => big.extend(r.text(128 << 10)),
            _ => big.extend(std::iter::repeat_n(0u8, 128 << 10)),
        }
    }
    big.extend(r.bytes(5));
    write(&root.join("big"), &big, 0o644);
    {
        let f = File::create(root.join("sparse")).expect("sparse");
        f.set_len(3 << 20).expect("set_len");
        f.write_all_at(b"tail", (3 << 20) - 4).expect("write tail");
    }
    write(&root.join("setuid"), b"#!/bin/sh\n", 0o4755);
    write(&root.join("sub/deeper/leaf"), &r.text(70_000), 0o640);
    write(&root.join("sub/a b"), b"space", 0o644);
    fs::hard_link(root.join("multi"), root.join("sub/multi-link")).expect("hard link");
    for i in 0..300 {
        let n = r.below(5000) as usize;
        write(&root.join(format!("many/f{i:03}")), &r.text(n), 0o644);
    }
    symlink("small.txt", root.join("rel-link")).expect("symlink");
    symlink("/etc/passwd", root.join("abs-link")).expect("symlink");
    symlink("nope/nothing", root.join("dangling")).expect("symlink");
    symlink("sub", root.join("dir-link")).expect("symlink");
    nix::unistd::mkfifo(
        &root.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .expect("mkfifo");

    // A device node, when allowed (root).
    let _ = nix::sys::stat::mknod(
        &root.join("null-dev"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    );
    let xattrs = xattr::set(root.join("small.txt"), "user.a", b"1").is_ok();
    if xattrs {
        xattr::set(root.join("small.txt"), "user.empty", b"").expect("xattr");
        xattr::set(root.join("small.txt"), "user.big", &r.bytes(1000)).expect("xattr");
        xattr::set(root.join("sub"), "user.dir", b"on a directory").expect("xattr");
    } else {
        eprintln!("note: the temp filesystem has no user xattrs; not comparing xattrs");
    }

    // mtimes last, deepest first, with nanoseconds.
    let mut k = 0u32;
    for p in [
        "empty",
        "small.txt",
        "page",
        "exact",
        "multi",
        "big",
        "sparse",
        "setuid",
        "sub/deeper/leaf",
        "sub/a b",
    ] {
        k += 1;
        set_mtime(
            &root.join(p),
            1_600_000_000 + u64::from(k) * 1000,
            k * 123_457,
        );
    }
    for d in ["sub/deeper", "sub", "many", "empty-dir", ""] {
        k += 1;
        set_mtime(&root.join(d), 1_500_000_000 + u64::from(k), k * 7);
    }
    xattrs
}

/// Under `dir`: the paths of a source tree, an image file and a mount point (none made).
fn paths(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    (dir.join("src"), dir.join("img.cimg"), dir.join("mnt"))
}

fn pack(src: &Path, img: &Path, block_log: u8) {
    let opts = PackOptions {
        block_log,
        threads: 4,
        ..PackOptions::default()
    };
    pack_dir(src, img, &opts, &|_, _| {}).expect("pack");
}

fn dev(p: &Path) -> u64 {
    fs::metadata(p).expect("stat").dev()
}

fn is_mounted(dir: &Path) -> bool {
    let info = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    // (mountinfo writes a space as \040.)
    let dir = dir.to_str().expect("utf-8 path").replace(' ', "\\040");
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(dir.as_str()))
}

/// Unmounts (lazily) on drop if a test failed while mounted.
struct Mounted(PathBuf);

impl Mounted {
    fn unmount(self) {
        let st = Command::new("umount")
            .arg(&self.0)
            .status()
            .expect("umount");
        assert!(st.success(), "umount {}", self.0.display());
        assert!(!is_mounted(&self.0), "still mounted after umount");
        std::mem::forget(self);
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

fn mount(img: &Path, mnt: &Path, extra: &[&str]) -> Mounted {
    fs::create_dir_all(mnt).expect("mkdir mnt");
    let parent_dev = dev(mnt);
    let st = Command::new(BIN)
        .arg(img)
        .arg(mnt)
        .args(extra)
        .status()
        .expect("run cimg-mount");
    assert!(st.success(), "cimg-mount failed: {st}");
    // The default mode returns once the mount answers.
    assert_ne!(dev(mnt), parent_dev, "cimg-mount returned before mounting");
    assert!(is_mounted(mnt));
    Mounted(mnt.to_path_buf())
}

fn mtime(m: &fs::Metadata) -> (i64, i64) {
    (m.mtime(), m.mtime_nsec())
}

fn sorted_xattrs(p: &Path) -> BTreeMap<String, Vec<u8>> {
    xattr::list(p)
        .expect("listxattr")
        .filter(|k| k.to_string_lossy().starts_with("user."))
        .map(|k| {
            let v = xattr::get(p, &k)
                .expect("getxattr")
                .expect("listed xattr exists");
            (k.to_string_lossy().into_owned(), v)
        })
        .collect()
}

fn names(dir: &Path) -> Vec<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    fs::read_dir(dir)
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().as_bytes().to_vec())
        .collect()
}

/// Compare the mounted tree with its source, recursively; returns the files compared.
type Links = std::collections::HashMap<(u64, u64), u64>;

/// How many names each (device, inode) has inside the tree at `root`: the link count an
/// image of that tree records (links from outside the tree do not count).
fn links_in_tree(root: &Path, out: &mut Links) {
    for e in fs::read_dir(root).expect("readdir") {
        let e = e.expect("entry");
        let m = e.metadata().expect("lstat");
        if m.is_dir() {
            links_in_tree(&e.path(), out);
        } else {
            *out.entry((m.dev(), m.ino())).or_default() += 1;
        }
    }
}

/// A mounted file's path and its expected content.
type FileData = (PathBuf, Arc<Vec<u8>>);

/// With `files` set, the regular files' paths and contents are collected there.
fn compare(
    src: &Path,
    mnt: &Path,
    xattrs: bool,
    links: &Links,
    mut files: Option<&mut Vec<FileData>>,
) {
    let mut want = names(src);
    want.sort();
    let got = names(mnt);
    assert_eq!(got, want, "entries of {}", mnt.display());
    assert_eq!(
        names(mnt),
        got,
        "readdir order of {} is stable",
        mnt.display()
    );
    use std::os::unix::ffi::OsStrExt;
    for n in want {
        let name = std::ffi::OsStr::from_bytes(&n);
        let (s, m) = (src.join(name), mnt.join(name));
        let sm = fs::symlink_metadata(&s).expect("lstat src");
        let mm = fs::symlink_metadata(&m).expect("lstat mnt");
        let what = m.display();
        assert_eq!(sm.file_type(), mm.file_type(), "type of {what}");
        assert_eq!(sm.mode(), mm.mode(), "mode of {what}");
        assert_eq!(
            (sm.uid(), sm.gid()),
            (mm.uid(), mm.gid()),
            "owner of {what}"
        );
        assert_eq!(sm.rdev(), mm.rdev(), "rdev of {what}");
        if !sm.is_symlink() {
            assert_eq!(mtime(&sm), mtime(&mm), "mtime of {what}");
        }
        if sm.is_dir() {
            if xattrs {
                assert_eq!(sorted_xattrs(&s), sorted_xattrs(&m), "xattrs of {what}");
            }
            compare(&s, &m, xattrs, links, files.as_deref_mut());
            continue;
        }
        let want = links.get(&(sm.dev(), sm.ino())).copied().unwrap_or(1);
        assert_eq!(want, mm.nlink(), "nlink of {what}");
        if sm.is_symlink() {
            assert_eq!(sm.len(), mm.len(), "size of {what}");
            assert_eq!(
                fs::read_link(&s).ok(),
                fs::read_link(&m).ok(),
                "target of {what}"
            );
        } else if sm.is_file() {
            assert_eq!(sm.len(), mm.len(), "size of {what}");
            let data = fs::read(&s).expect("read src");
            assert!(fs::read(&m).expect("read mnt") == data, "content of {what}");
            if xattrs {
                assert_eq!(sorted_xattrs(&s), sorted_xattrs(&m), "xattrs of {what}");
            }
            if let Some(files) = files.as_deref_mut() {
                files.push((m, Arc::new(data)));
            }
        }
    }
}

#[test]
fn mounted_tree_matches_source() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (src, img, mnt) = paths(tmp.path());
    let xattrs = build_tree(&src);
    pack(&src, &img, 17);
    let m = mount(&img, &mnt, &["--threads", "4", "--cache-size", "2M"]);

    let root_s = fs::metadata(&src).expect("stat");
    let root_m = fs::metadata(&mnt).expect("stat");
    assert_eq!(root_s.mode(), root_m.mode());
    assert_eq!(mtime(&root_s), mtime(&root_m));

    let mut files = Vec::new();
    let mut links = Links::new();
    links_in_tree(&src, &mut links);
    compare(&src, &mnt, xattrs, &links, Some(&mut files));
    assert!(files.len() > 300);

    // Hard links share an inode.
    let a = fs::metadata(mnt.join("multi")).expect("stat");
    let b = fs::metadata(mnt.join("sub/multi-link")).expect("stat");
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));

    // Through symlinks, and xattr probes.
    assert_eq!(fs::read(mnt.join("dir-link/a b")).expect("read"), b"space");
    if xattrs {
        assert_eq!(
            xattr::get(mnt.join("small.txt"), "user.missing").expect("getxattr"),
            None
        );
        assert_eq!(
            xattr::get(mnt.join("small.txt"), "user.empty").expect("getxattr"),
            Some(Vec::new())
        );
    }

    // Missing names, twice (the second from the kernel's negative entry).
    for _ in 0..2 {
        let e = fs::metadata(mnt.join("no-such-file")).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    }
    assert_eq!(
        fs::metadata(mnt.join("small.txt/x"))
            .unwrap_err()
            .raw_os_error(),
        Some(20) // ENOTDIR
    );

    // Every write is refused.
    let erofs = |r: std::io::Result<()>| {
        assert_eq!(r.unwrap_err().raw_os_error(), Some(EROFS));
    };
    erofs(File::create(mnt.join("new")).map(drop));
    erofs(
        fs::OpenOptions::new()
            .write(true)
            .open(mnt.join("small.txt"))
            .map(drop),
    );
    erofs(fs::create_dir(mnt.join("newdir")));
    erofs(fs::remove_file(mnt.join("small.txt")));
    erofs(fs::rename(mnt.join("small.txt"), mnt.join("moved")));
    erofs(symlink("x", mnt.join("newlink")));
    erofs(fs::set_permissions(
        mnt.join("small.txt"),
        fs::Permissions::from_mode(0o777),
    ));
    if xattrs {
        erofs(xattr::set(mnt.join("small.txt"), "user.new", b"v"));
    }

    // 16 threads of random reads of random files (the cache is small: 2 MiB, so blocks are
    // evicted and reloaded while other threads read them).
    let files = Arc::new(files);
    let threads: Vec<_> = (0..16u64)
        .map(|t| {
            let files = files.clone();
            std::thread::spawn(move || {
                let mut r = Rng(0x1234_5678 + t * 0x9E37_79B9);
                for _ in 0..400 {
                    let (path, data) = &files[r.below(files.len() as u64) as usize];
                    let f = File::open(path).expect("open");
                    let off = r.below(data.len() as u64 + 10) as usize;
                    let len = r.below(300 << 10) as usize;
                    let mut buf = vec![0u8; len];
                    let mut got = 0;
                    loop {
                        let n = f
                            .read_at(&mut buf[got..], (off + got) as u64)
                            .expect("read_at");
                        if n == 0 {
                            break;
                        }
                        got += n;
                        if got == len {
                            break;
                        }
                    }
                    let want = &data[off.min(data.len())..(off + len).min(data.len())];
                    assert!(
                        &buf[..got] == want,
                        "{} at {off}+{len}: wrong bytes",
                        path.display()
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("reader thread");
    }

    m.unmount();
    assert_eq!(dev(&mnt), dev(tmp.path()));
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn wait_child(child: &mut Child) -> std::process::ExitStatus {
    let mut st = None;
    wait_until("server exit", || {
        st = child.try_wait().expect("try_wait");
        st.is_some()
    });
    st.expect("exit status")
}

/// In `dir`: an image holding one file `f` ("data"), and an empty mount point.
fn one_file_image(dir: &Path) -> (PathBuf, PathBuf) {
    let (src, img, mnt) = paths(dir);
    fs::create_dir_all(&src).expect("mkdir");
    fs::create_dir_all(&mnt).expect("mkdir");
    fs::write(src.join("f"), b"data").expect("write");
    pack(&src, &img, 12);
    (img, mnt)
}

#[test]
fn sigterm_unmounts_cleanly() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (img, mnt) = one_file_image(tmp.path());
    let d0 = dev(&mnt);
    let mut child = Command::new(BIN)
        .arg(&img)
        .arg(&mnt)
        .arg("--foreground")
        .spawn()
        .expect("spawn");
    let guard = Mounted(mnt.clone());
    wait_until("mount", || dev(&mnt) != d0);
    assert_eq!(fs::read(mnt.join("f")).expect("read"), b"data");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("kill");
    let st = wait_child(&mut child);
    assert!(st.success(), "server exit status {st}");
    assert!(!is_mounted(&mnt));
    assert_eq!(dev(&mnt), d0);
    std::mem::forget(guard);

    // External unmount ends the server too.
    let mut child = Command::new(BIN)
        .arg(&img)
        .arg(&mnt)
        .arg("--foreground")
        .spawn()
        .expect("spawn");
    let guard = Mounted(mnt.clone());
    wait_until("mount", || dev(&mnt) != d0);
    guard.unmount();
    let st = wait_child(&mut child);
    assert!(st.success(), "server exit status {st}");
}

/// A server whose mount was unmounted from outside must not, when it stops, unmount what has
/// been mounted on the same directory since (`umount DIR; cimg-mount IMG DIR` in a script).
/// fuser 0.18 unmounts by path at the end of every session it mounted; here the first server
/// only starts serving after the second mount exists, which makes that race certain.
#[test]
fn a_stopping_server_leaves_the_next_mount_alone() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (img, mnt) = one_file_image(tmp.path());
    let opts = cimg_fuse::MountOptions::default();

    let first = cimg_fuse::mount(&img, &mnt, &opts).expect("first mount");
    let guard = Mounted(mnt.clone());
    nix::mount::umount2(&mnt, nix::mount::MntFlags::empty()).expect("umount the first");
    assert!(!is_mounted(&mnt));
    let mut second = cimg_fuse::mount(&img, &mnt, &opts).expect("second mount");
    // The first server sees its connection gone and stops.
    first.run().expect("the first server stops cleanly");
    assert!(
        is_mounted(&mnt),
        "the first server unmounted the second mount on its way out"
    );
    let mut unmounter = second.unmounter();
    let serving = std::thread::spawn(move || second.run());
    assert_eq!(fs::read(mnt.join("f")).expect("read"), b"data");
    unmounter.unmount().expect("unmount the second");
    serving
        .join()
        .expect("server thread")
        .expect("the second server stops cleanly");
    assert!(!is_mounted(&mnt));
    std::mem::forget(guard);
}

/// The mount's kernel read-ahead in KiB.
fn read_ahead_kb(mnt: &Path) -> u32 {
    let d = dev(mnt);
    let knob = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        nix::sys::stat::major(d),
        nix::sys::stat::minor(d)
    );
    fs::read_to_string(&knob)
        .expect("read_ahead_kb")
        .trim()
        .parse()
        .expect("a number")
}

#[test]
fn read_ahead_is_raised_unless_told_not_to() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (src, img) = (tmp.path().join("src"), tmp.path().join("img.cimg"));
    fs::create_dir_all(&src).expect("mkdir");
    fs::write(src.join("f"), b"data").expect("write");
    pack(&src, &img, 12);
    // A directory name that mountinfo escapes.
    let mnt = tmp.path().join("a mount");
    let m = mount(&img, &mnt, &[]);
    assert_eq!(read_ahead_kb(&mnt), 1024);
    m.unmount();
    let m = mount(&img, &mnt, &["--read-ahead-kb", "0"]);
    assert_eq!(read_ahead_kb(&mnt), 128, "the kernel's default");
    m.unmount();
    // In the foreground too, set before the mount answers.
    let d0 = dev(&mnt);
    let mut child = Command::new(BIN)
        .arg(&img)
        .arg(&mnt)
        .args(["--foreground", "--read-ahead-kb", "512"])
        .spawn()
        .expect("spawn");
    let guard = Mounted(mnt.clone());
    wait_until("mount", || dev(&mnt) != d0);
    assert_eq!(read_ahead_kb(&mnt), 512);
    guard.unmount();
    assert!(wait_child(&mut child).success());
}

#[test]
fn bad_image_errors() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let mnt = tmp.path().join("mnt");
    fs::create_dir_all(&mnt).expect("mkdir");
    let not_image = tmp.path().join("not-an-image");
    fs::write(&not_image, b"hello").expect("write");
    let out = Command::new(BIN)
        .arg(&not_image)
        .arg(&mnt)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("cimg-mount: "), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    // Names the image, says what is wrong once (no error chain repeating itself).
    assert!(err.contains(&not_image.display().to_string()), "{err}");
    assert_eq!(err.matches("corrupt image").count(), 1, "{err}");
    assert!(!is_mounted(&mnt));
}

#[test]
fn corrupt_block_and_truncated_image_give_eio() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (src, img, mnt) = paths(tmp.path());
    fs::create_dir_all(&src).expect("mkdir");
    let mut r = Rng(77);
    // c spans more blocks (64 KiB) than the read-ahead that follows b's reads brings in.
    let (a, b, c) = (r.bytes(300_000), r.text(300_000), r.bytes(3_000_000));
    fs::write(src.join("a"), &a).expect("write");
    fs::write(src.join("b"), &b).expect("write");
    fs::write(src.join("c"), &c).expect("write");
    pack(&src, &img, 16);

    // Flip one byte in a's second block.
    let (off, c_off) = {
        let im = Image::open(&img).expect("open image");
        let ino = im.resolve(b"a").expect("resolve");
        let blk = im
            .extent_at(ino, 70_000)
            .expect("extent")
            .and_then(|e| e.block)
            .expect("a block");
        let c_ino = im.resolve(b"c").expect("resolve");
        let c_blk = im
            .extent_at(c_ino, 0)
            .expect("extent")
            .and_then(|e| e.block)
            .expect("c block");
        (
            im.block_info(blk).expect("block").0,
            im.block_info(c_blk).expect("block").0,
        )
    };
    {
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&img)
            .expect("open");
        let mut byte = [0u8];
        f.read_exact_at(&mut byte, off + 10).expect("read");
        f.write_all_at(&[byte[0] ^ 0x55], off + 10).expect("write");
    }
    let log = tmp.path().join("log");
    let m = mount(&img, &mnt, &["--log", log.to_str().expect("utf-8")]);
    // The first block of a reads; the corrupt one gives EIO, every time.
    let fa = File::open(mnt.join("a")).expect("open");
    let mut buf = vec![0u8; 4096];
    fa.read_exact_at(&mut buf, 0).expect("first block of a");
    assert_eq!(&buf[..], &a[..4096]);
    for _ in 0..2 {
        let e = fs::read(mnt.join("a")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(EIO), "{e}");
    }
    // Everything else still reads.
    assert!(fs::read(mnt.join("b")).expect("read b") == b);
    assert_eq!(
        fs::metadata(mnt.join("a")).expect("stat a").len(),
        a.len() as u64
    );

    // Truncate the image under the mount: c (never read, only its first blocks read ahead
    // after b) gives EIO, b (cached) still reads.
    File::options()
        .write(true)
        .open(&img)
        .and_then(|f| f.set_len(c_off))
        .expect("truncate");
    let e = fs::read(mnt.join("c")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(EIO), "{e}");
    assert!(fs::read(mnt.join("b")).expect("read b again") == b);
    drop(fa);
    m.unmount();
    // One line per bad block, naming the block and the file: a's corrupt block, and the
    // blocks of c past the image's new end that the kernel's read-ahead asked for (several
    // READs in flight, one block each), never a block twice, never b.
    let log = fs::read_to_string(&log).expect("log");
    let lines: Vec<_> = log.lines().collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("cimg-mount: ") && l.contains(": /a)")),
        "{log}"
    );
    let mut blocks = HashSet::new();
    for l in &lines {
        assert!(l.starts_with("cimg-mount: "), "{log}");
        assert!(l.contains(": /a)") || l.contains(": /c)"), "{log}");
        let block = l
            .split(": block ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .expect("a block number");
        assert!(
            blocks.insert(block.to_string()),
            "block {block} twice:\n{log}"
        );
    }
}

/// A mount opens its image lazily: a metadata frame that does not decompress (its checksums
/// resealed, so the open does not see it) fails only the requests that need it, with EIO,
/// and the server goes on serving everything else; the usual open refuses the image.
#[test]
fn a_corrupt_metadata_frame_gives_eio_to_what_it_holds_only() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (src, img, mnt) = paths(tmp.path());
    // a is small; b's 1,500 entries are the last of the entry table and fill six 4 KiB frames.
    fs::create_dir_all(src.join("a")).expect("mkdir");
    fs::create_dir_all(src.join("b")).expect("mkdir");
    fs::write(src.join("a/x"), b"x data").expect("write");
    for k in 0..1500 {
        fs::write(src.join(format!("b/f{k:04}")), format!("{k}")).expect("write");
    }
    let opts = PackOptions {
        block_log: 16,
        meta_frame_log: 12,
        threads: 2,
        ..PackOptions::default()
    };
    pack_dir(&src, &img, &opts, &|_, _| {}).expect("pack");

    // The last frame that holds only entries: b's (the root's two and a's one come first).
    let h = *Image::open(&img).expect("open").header();
    let entries = h.dirents.offset.get()..h.dirents.offset.get() + h.dirents.count.get() * 16;
    let victim = (entries.end >> 12) as usize - 1;
    assert!(
        (victim as u64) << 12 >= entries.start + 3 * 16,
        "frame {victim} holds more than b's entries"
    );

    let mut bytes = fs::read(&img).expect("read image");
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8"));
    let (meta_off, meta_len) = (u64_at(&bytes, 56) as usize, u64_at(&bytes, 64) as usize);
    let stored = &mut bytes[meta_off..meta_off + meta_len];
    let mut pos = 0;
    for _ in 0..victim {
        pos += zstd::zstd_safe::find_frame_compressed_size(&stored[pos..]).expect("frame");
    }
    // The frame's first block header, after the magic, the descriptor and what it announces
    // (RFC 8878 §3.1.1.1): typed raw instead of compressed, the frame still parses (the open
    // finds every frame) but gives its compressed bytes, not the 4 KiB it must.
    let fhd = stored[pos + 4];
    let single = fhd & 0x20 != 0;
    let fcs = match fhd >> 6 {
        0 => usize::from(single),
        1 => 2,
        2 => 4,
        _ => 8,
    };
    let hdr = 4 + 1 + usize::from(!single) + [0, 1, 2, 4][usize::from(fhd & 3)] + fcs;
    assert_eq!(stored[pos + hdr] & 0b110, 0b100, "a compressed block");
    stored[pos + hdr] &= !0b110;
    let sum = xxhash_rust::xxh3::xxh3_64(stored);
    bytes[80..88].copy_from_slice(&sum.to_le_bytes());
    let sb = xxhash_rust::xxh3::xxh3_64(&bytes[..120]);
    bytes[120..128].copy_from_slice(&sb.to_le_bytes());
    fs::write(&img, &bytes).expect("write image");
    let refused = Image::open(&img).expect_err("the usual open checks every frame");
    assert!(refused.to_string().contains("metadata frame"), "{refused}");

    let m = mount(&img, &mnt, &[]);
    for _ in 0..2 {
        let listed = fs::read_dir(mnt.join("b")).and_then(|d| d.collect::<Result<Vec<_>, _>>());
        let e = listed.expect_err("b's entries are in the broken frame");
        assert_eq!(e.raw_os_error(), Some(EIO), "{e}");
        // Everything else is served.
        assert_eq!(fs::read(mnt.join("a/x")).expect("read a/x"), b"x data");
        assert_eq!(names(&mnt), vec![b"a".to_vec(), b"b".to_vec()]);
    }
    m.unmount();
}

/// The host's `/usr`, packed and compared whole through the kernel: content, type, mode,
/// size, mtime, link targets, xattrs, hard links, readdir order. It reads `/usr` three times
/// (here, 5.6 GiB in 140,000 entries: 46 s).
#[test]
fn host_usr_matches_source() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (img, mnt) = (tmp.path().join("usr.cimg"), tmp.path().join("mnt"));
    let opts = PackOptions {
        level: 1,
        ..PackOptions::default()
    };
    pack_dir(Path::new("/usr"), &img, &opts, &|_, _| {}).expect("pack /usr");
    let m = mount(&img, &mnt, &[]);
    let mut links = Links::new();
    links_in_tree(Path::new("/usr"), &mut links);
    compare(Path::new("/usr"), &mnt, true, &links, None);
    m.unmount();
}

/// Under `dir`: `src` with the files `names` (in `src/d` too) of `len` random text bytes
/// each; the paths of `src`, an image file and a mount point (neither made).
fn text_tree(dir: &Path, seed: u64, names: &[&str], len: usize) -> (PathBuf, PathBuf, PathBuf) {
    let (src, img, mnt) = paths(dir);
    fs::create_dir_all(src.join("d")).expect("mkdir");
    let mut r = Rng(seed);
    for n in names {
        fs::write(src.join(n), r.text(len)).expect("write");
    }
    (src, img, mnt)
}

#[test]
fn record_hot_lists_first_reads_and_packs_hot() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (src, img, mnt) = text_tree(tmp.path(), 5, &["a", "b", "c", "d/e", "unread"], 200_000);
    pack(&src, &img, 16);
    let hot = tmp.path().join("hot.txt");
    let m = mount(&img, &mnt, &["--record-hot", hot.to_str().expect("utf-8")]);
    for n in ["d/e", "c", "a", "c", "b"] {
        assert!(fs::read(mnt.join(n)).expect("read") == fs::read(src.join(n)).expect("read"));
    }
    fs::metadata(mnt.join("unread")).expect("stat only");
    m.unmount();
    // The server writes the list as it stops, just after the unmount.
    wait_until("hot list written", || hot.exists());
    let list = fs::read(&hot).expect("hot list");
    assert_eq!(String::from_utf8_lossy(&list), "/d/e\n/c\n/a\n/b\n");

    // `pack --hot` takes it, and a mount of the result prefetches the hot blocks.
    let img2 = tmp.path().join("hot.cimg");
    let opts = PackOptions {
        block_log: 16,
        hot: cimg_format::writer::parse_hot_list(&list),
        ..PackOptions::default()
    };
    pack_dir(&src, &img2, &opts, &|_, _| {}).expect("pack --hot");
    assert!(Image::open(&img2).expect("open").summary().hot_blocks > 0);
    let m = mount(&img2, &mnt, &[]);
    for n in ["a", "b", "c", "d/e", "unread"] {
        assert!(fs::read(mnt.join(n)).expect("read") == fs::read(src.join(n)).expect("read"));
    }
    m.unmount();
}

/// An ordinary user mounts through the fusermount3 fallback. The host's /dev/fuse is 0600
/// here, so the test (as root) makes a private mount namespace, binds a 0666 node over
/// /dev/fuse there, and runs `cimg-mount` as an unused uid with `setpriv`: the user mounts,
/// reads the image through the kernel, and unmounts with `fusermount3 -u`.
#[test]
fn ordinary_user_mounts_through_fusermount3() {
    if !fuse_available() {
        return;
    }
    let ci = std::env::var("CI").as_deref() == Ok("true");
    let root = nix::unistd::geteuid().is_root();
    let tools = ["unshare", "setpriv", "fusermount3"].iter().all(|t| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !root || !tools {
        assert!(!ci, "needs root, unshare, setpriv and fusermount3 in CI");
        eprintln!("skipping: needs root (to set up the namespace), unshare, setpriv, fusermount3");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    fs::set_permissions(work.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let src = work.path().join("src");
    fs::create_dir(&src).unwrap();
    let data = b"read by an ordinary user\n".repeat(10_000);
    write(&src.join("file"), &data, 0o644);
    let img = work.path().join("t.cimg");
    pack(&src, &img, 12);
    fs::set_permissions(&img, fs::Permissions::from_mode(0o644)).unwrap();
    let mnt = work.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    nix::unistd::chown(&mnt, Some(65534.into()), Some(65534.into())).unwrap();
    let node = work.path().join("fuse");
    let script = format!(
        r#"set -e
mknod '{node}' c 10 229; chmod 666 '{node}'; mount --bind '{node}' /dev/fuse
as_user() {{ setpriv --reuid 65534 --regid 65534 --clear-groups "$@"; }}
as_user '{bin}' '{img}' '{mnt}'
grep -q ' {mnt} .*user_id=65534' /proc/self/mountinfo
as_user cat '{mnt}/file' > '{out}.tmp'; mv '{out}.tmp' '{out}'
as_user fusermount3 -u '{mnt}'
! grep -q ' {mnt} ' /proc/self/mountinfo
"#,
        node = node.display(),
        bin = BIN,
        img = img.display(),
        mnt = mnt.display(),
        out = work.path().join("out").display(),
    );
    let o = Command::new("unshare")
        .args(["-m", "--propagation", "private", "bash", "-c", &script])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "unprivileged mount failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(fs::read(work.path().join("out")).unwrap(), data);
}

/// Bytes of `file` in the kernel's page cache (`fincore`, which does not read the file).
fn resident(file: &Path) -> u64 {
    let out = Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(file)
        .output()
        .expect("run fincore (util-linux)");
    assert!(out.status.success(), "fincore {}: {out:?}", file.display());
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("fincore's RES")
}

/// Another process (`launch` forks one) reads a program's files ahead into the kernel's page
/// cache through the mount, before the program runs: libc, which nothing else reads here,
/// ends up all resident.
#[test]
fn warm_reads_a_program_s_libraries_into_the_page_cache() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (root, img, mnt) = (
        tmp.path().join("root"),
        tmp.path().join("img.cimg"),
        tmp.path().join("mnt"),
    );
    cimg_tests::host_programs_tree(&root, &["true"]);
    fs::create_dir_all(&mnt).expect("mkdir");
    pack(&root, &img, 17);
    let libc = walk_files(&root)
        .into_iter()
        .find(|p| p.file_name().is_some_and(|n| n == "libc.so.6"))
        .expect("the host's true links libc.so.6");
    let lib = mnt.join(libc.strip_prefix(&root).expect("in the tree"));
    let size = fs::metadata(&libc).expect("stat libc").len();

    let m = mount(&img, &mnt, &[]);
    assert_eq!(resident(&lib), 0, "nothing read libc yet");
    let hint = cimg_fuse::exec::ExecHint {
        candidates: vec![PathBuf::from("/usr/bin/true")],
        cwd: PathBuf::from("/"),
        library_path: Vec::new(),
    };
    let image = Image::open(&img).expect("open");
    cimg_fuse::warm::read_ahead(&image, &mnt, Some(&hint), u64::MAX);
    wait_until("libc read ahead into the page cache", || {
        resident(&lib) >= size / 4096 * 4096
    });
    m.unmount();
}

/// Every regular file under `dir`.
fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).expect("read_dir") {
        let e = e.expect("entry");
        let t = e.file_type().expect("file type");
        if t.is_dir() {
            out.extend(walk_files(&e.path()));
        } else if t.is_file() {
            out.push(e.path());
        }
    }
    out
}

/// The hot files of an image (those of `pack --hot`) are read ahead into the page cache in
/// hot-list order, and no other file.
///
/// The files are whole blocks long, with no tail: a tail shares a fragment block with other
/// files' tails, and the `fincore` that checks a cold file looks it up, which pushes its tail
/// at once if a hot file's read already loaded that block (`FsOptions::store`). The check
/// would then race with a push it caused itself (it failed in CI, and 2 times in 30 here).
#[test]
fn warm_reads_the_hot_files_into_the_page_cache() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let len = 4 << 16;
    let (src, img, mnt) = text_tree(tmp.path(), 9, &["a", "b", "d/e", "cold"], len);
    let opts = PackOptions {
        block_log: 16,
        hot: cimg_format::writer::parse_hot_list(b"/d/e\n/a\n"),
        ..PackOptions::default()
    };
    pack_dir(&src, &img, &opts, &|_, _| {}).expect("pack --hot");
    let image = Image::open(&img).expect("open");
    let blocks = u32::try_from(image.summary().hot_blocks).expect("few blocks");
    let hot: Vec<PathBuf> = cimg_fuse::warm::hot_files(&image, blocks)
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    assert_eq!(
        hot,
        [Path::new("/d/e"), Path::new("/a")],
        "in hot-list order"
    );

    let m = mount(&img, &mnt, &[]);
    cimg_fuse::warm::read_ahead(&image, &mnt, None, u64::MAX);
    let full = len as u64;
    wait_until("the hot files in the page cache", || {
        resident(&mnt.join("d/e")) >= full && resident(&mnt.join("a")) >= full
    });
    assert_eq!(resident(&mnt.join("b")), 0, "b is not hot");
    assert_eq!(resident(&mnt.join("cold")), 0, "cold is not hot");
    assert!(fs::read(mnt.join("a")).expect("read") == fs::read(src.join("a")).expect("read"));
    m.unmount();
}

/// Under a temporary directory, a tree of one directory `small` holding a file `fNNN` of random
/// text per size in `sizes`, packed with 64 KiB blocks and mounted with `args`, the mounted
/// directory listed (READDIRPLUS): the temporary directory, the mount, the source directory
/// and the mounted files in name order, none of them read yet.
fn listed_small_files(
    seed: u64,
    sizes: &[usize],
    args: &[&str],
) -> (tempfile::TempDir, Mounted, PathBuf, Vec<PathBuf>) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (src, img, mnt) = paths(tmp.path());
    let dir = src.join("small");
    fs::create_dir_all(&dir).expect("mkdir");
    let mut r = Rng(seed);
    for (k, &len) in sizes.iter().enumerate() {
        fs::write(dir.join(format!("f{k:03}")), r.text(len)).expect("write");
    }
    pack(&src, &img, 16);
    let m = mount(&img, &mnt, args);
    let mut names: Vec<PathBuf> = fs::read_dir(mnt.join("small"))
        .expect("list (READDIRPLUS)")
        .map(|e| e.expect("entry").path())
        .collect();
    names.sort();
    assert_eq!(names.len(), sizes.len());
    for p in &names {
        assert_eq!(resident(p), 0, "{} read before anyone asked", p.display());
    }
    (tmp, m, dir, names)
}

/// Every mounted file in `names` reads back as its namesake in `src`.
fn read_back(names: &[PathBuf], src: &Path) {
    for p in names {
        let want = fs::read(src.join(p.file_name().expect("a file name"))).expect("source");
        assert_eq!(fs::read(p).expect("read"), want, "{}", p.display());
    }
}

/// Reading one small file pushes the other small files and file tails of its block, those of
/// files the kernel has been told about (here by a directory listing), into the page cache:
/// they are resident before anyone reads them, and read back exactly as packed.
#[test]
fn a_read_pushes_the_listed_files_of_its_block_into_the_page_cache() {
    if !fuse_available() {
        return;
    }
    // Sizes that end inside a page, on a page boundary, and a file of two chunks (a full
    // 64 KiB block and a tail in the shared block); twice over, 12 files whose tails (50 KiB)
    // share one 64 KiB block.
    let sizes = [1, 700, 4096, 5000, 12_345, 65_536 + 3000].repeat(2);
    let (_tmp, m, src, names) = listed_small_files(17, &sizes, &[]);
    fs::read(&names[0]).expect("read the first file");
    // The file of 65,536 + 3000 bytes has a full block of its own, not pushed by this read:
    // only its tail is.
    for p in &names[1..] {
        let len = fs::metadata(p).expect("stat").len();
        let tail = len % 65_536;
        wait_until(&format!("{} pushed", p.display()), || {
            resident(p) >= tail.div_ceil(4096) * 4096
        });
    }
    read_back(&names, &src);
    m.unmount();
}

/// The registrations waiting for their block are bounded by a 32nd of the cache: with a
/// 128 KiB cache, 128 of them (32 bytes each). Listing 300 small files of one block and
/// reading the first pushes the next 127 listed, and no more; every file still reads back
/// as packed.
#[test]
fn the_files_waiting_for_a_push_are_bounded_by_the_cache_size() {
    if !fuse_available() {
        return;
    }
    let (_tmp, m, src, names) = listed_small_files(23, &[100; 300], &["--cache-size", "128K"]);
    fs::read(&names[0]).expect("read the first file");
    wait_until("the registered files pushed", || {
        names[1..128].iter().all(|p| resident(p) > 0)
    });
    // Give any stray push time to land before checking that none came.
    std::thread::sleep(Duration::from_millis(200));
    let pushed = names[128..].iter().filter(|p| resident(p) > 0).count();
    assert_eq!(pushed, 0, "files listed past the bound were pushed");
    read_back(&names, &src);
    m.unmount();
}

/// With `--record-hot`, small files that share a block are not pushed into the page cache
/// ahead of their reads (the kernel would read them without asking the server, and the hot
/// list would miss them): listed, then read one by one, every one is recorded, in read order.
#[test]
fn record_hot_records_small_files_of_one_block() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let hot = tmp.path().join("hot.txt");
    let hot_arg = hot.to_str().expect("utf-8").to_string();
    let (_tmp, m, src, names) = listed_small_files(29, &[700; 8], &["--record-hot", &hot_arg]);
    let order = [3, 0, 7, 1, 6, 2, 5, 4];
    fs::read(&names[order[0]]).expect("read");
    // Time for pushes (if any were made) to land before the other files are read.
    std::thread::sleep(Duration::from_millis(300));
    for &k in &order[1..] {
        fs::read(&names[k]).expect("read");
    }
    read_back(&names, &src);
    m.unmount();
    wait_until("hot list written", || hot.exists());
    let want: String = order.iter().map(|&k| format!("/small/f{k:03}\n")).collect();
    assert_eq!(fs::read_to_string(&hot).expect("hot list"), want);
}

/// `trusted.*` attributes, which the kernel lets only a caller with `CAP_SYS_ADMIN` read, are
/// not even listed to an ordinary reader (as ext4 and tmpfs behave); root still sees them,
/// and `user.*` attributes are listed to everyone.
#[test]
fn trusted_xattr_names_are_listed_to_root_only() {
    if !fuse_available() {
        return;
    }
    let ci = std::env::var("CI").as_deref() == Ok("true");
    let root = nix::unistd::geteuid().is_root();
    let have = |t: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !root || !have("setpriv") || !have("getfattr") {
        assert!(
            !ci,
            "needs root, setpriv (util-linux) and getfattr (attr) in CI"
        );
        eprintln!("skipping: needs root, setpriv (util-linux) and getfattr (attr)");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let (src, img, mnt) = paths(tmp.path());
    fs::create_dir(&src).expect("mkdir");
    write(&src.join("f"), b"x", 0o644);
    xattr::set(src.join("f"), "user.seen", b"1").expect("set user.seen");
    xattr::set(src.join("f"), "trusted.hidden", b"2").expect("set trusted.hidden");
    pack(&src, &img, 12);
    let m = mount(&img, &mnt, &[]);
    let listed = |user: Option<&str>| {
        let mut c = match user {
            Some(uid) => {
                let mut c = Command::new("setpriv");
                c.args(["--reuid", uid, "--regid", uid, "--clear-groups", "getfattr"]);
                c
            }
            None => Command::new("getfattr"),
        };
        let o = c
            .args(["--absolute-names", "-m", "-"])
            .arg(mnt.join("f"))
            .output()
            .expect("run getfattr");
        assert!(o.status.success(), "getfattr: {o:?}");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let as_root = listed(None);
    assert!(
        as_root.contains("user.seen") && as_root.contains("trusted.hidden"),
        "{as_root}"
    );
    let as_user = listed(Some("65534"));
    assert!(as_user.contains("user.seen"), "{as_user}");
    assert!(
        !as_user.contains("trusted."),
        "an ordinary reader sees: {as_user}"
    );
    m.unmount();
}
