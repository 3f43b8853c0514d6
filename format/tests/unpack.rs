//! `cimg unpack`'s safety and reliability: nothing outside DEST is touched while DEST is
//! swapped for a symlink, a tree deeper than PATH_MAX round-trips, an ordinary user's unpack
//! of a root filesystem skips what it may not create with one warning, `--no-devices` and
//! `--no-same-owner`, and all-zero data comes back as holes.
//!
//! These tests need root (device nodes, foreign owners, `setpriv`); without it they fail and
//! say so rather than pass having checked nothing.

use cimg_format::writer::tree::{Node, Source, Tree};
use cimg_format::writer::{self, PackOptions};
use cimg_format::{FileKind, Image};
use rustix::fs::{self as rfs, AtFlags, CWD, Mode, OFlags, RenameFlags};
use std::fs;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

fn must_be_root(what: &str) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "{what}: this test needs root (device nodes, chown, another uid); run it as root"
    );
}

fn pack(src: &Path, out: &Path) {
    cimg_format::pack_dir(src, out, &PackOptions::default(), &|_, _| {})
        .unwrap_or_else(|e| panic!("pack {}: {e}", src.display()));
}

fn cimg(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cimg"))
        .args(args)
        .output()
        .expect("run cimg")
}

fn set_mtime(p: &Path, sec: i64) {
    let t = rfs::Timespec {
        tv_sec: sec,
        tv_nsec: 0,
    };
    let ts = rfs::Timestamps {
        last_access: t,
        last_modification: t,
    };
    rfs::utimensat(CWD, p, &ts, AtFlags::SYMLINK_NOFOLLOW).unwrap();
}

/// (mode, uid, gid, mtime, ino) of a file.
type Ident = (u32, u32, u32, i64, u64);

/// The [`Ident`] of `p`, not following a symlink.
fn ident(p: &Path) -> Ident {
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.mode(), m.uid(), m.gid(), m.mtime(), m.ino())
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A root-owned 0600 file, a root-owned 0600 file named like one of the image's 0777
/// directories, in a 0755 directory: what a swapped DEST must never reach.
fn make_victim(dir: &Path) -> Vec<(PathBuf, Ident)> {
    fs::create_dir(dir).unwrap();
    for n in ["secret", "d0"] {
        let p = dir.join(n);
        fs::write(&p, b"root only\n").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        set_mtime(&p, 1_000_000);
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    set_mtime(dir, 1_000_000);
    [dir.to_path_buf(), dir.join("secret"), dir.join("d0")]
        .into_iter()
        .map(|p| {
            let i = ident(&p);
            (p, i)
        })
        .collect()
}

/// Item 1: DEST swapped with a symlink to a victim directory (or file), with
/// `renameat2(RENAME_EXCHANGE)` in a tight loop during many unpacks.
#[test]
fn dest_swapped_for_a_symlink_touches_nothing_outside() {
    must_be_root("dest swap race");
    let w = tempfile::tempdir().unwrap();
    let src = w.path().join("src");
    fs::create_dir(&src).unwrap();
    for i in 0..20 {
        let d = src.join(format!("d{i}"));
        fs::create_dir(&d).unwrap();
        for j in 0..15 {
            let s = d.join(format!("s{j}"));
            fs::create_dir(&s).unwrap();
            fs::write(s.join("f"), format!("{i} {j}\n")).unwrap();
            fs::set_permissions(&s, fs::Permissions::from_mode(0o755)).unwrap();
        }
        fs::set_permissions(&d, fs::Permissions::from_mode(0o777)).unwrap();
    }
    fs::set_permissions(&src, fs::Permissions::from_mode(0o777)).unwrap();
    let img_path = w.path().join("t.cimg");
    pack(&src, &img_path);
    let img = Image::open(&img_path).unwrap();
    let victim = w.path().join("victim");
    let before = make_victim(&victim);
    let listing = names(&victim);

    let start = Instant::now();
    let (mut runs, mut ok, mut swaps) = (0, 0, 0u64);
    while runs < 50 && start.elapsed() < Duration::from_secs(25) {
        let parent = w.path().join(format!("p{runs}"));
        fs::create_dir(&parent).unwrap();
        let dest = parent.join("dest");
        let link = parent.join("l");
        // Every other run the symlink points at the file itself, so a chmod of DEST that
        // follows it would hit the file.
        let target = if runs % 2 == 0 {
            victim.clone()
        } else {
            victim.join("secret")
        };
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let attacker = {
            let stop = stop.clone();
            let (dest, link) = (dest.clone(), link.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if rfs::renameat_with(CWD, &dest, CWD, &link, RenameFlags::EXCHANGE).is_ok() {
                        n += 1;
                    }
                }
                n
            })
        };
        let r = cimg_format::unpack::unpack(&img, &dest, |_| {});
        stop.store(true, Ordering::Relaxed);
        swaps += attacker.join().unwrap();
        if r.is_ok() {
            ok += 1;
        }
        for (p, id) in &before {
            assert_eq!(
                &ident(p),
                id,
                "run {runs}: {} changed (unpack said {r:?})",
                p.display()
            );
        }
        assert_eq!(
            names(&victim),
            listing,
            "run {runs}: entries created in the victim directory (unpack said {r:?})"
        );
        fs::remove_dir_all(&parent).unwrap();
        runs += 1;
    }
    assert!(runs >= 10, "only {runs} unpacks in the time allowed");
    assert!(swaps > 0, "the attacker never swapped DEST");
    eprintln!("{runs} unpacks, {ok} succeeded, {swaps} swaps");
}

/// Item 1 (PATH_MAX): a 10,000-level chain of directories, with a file, a symlink and two
/// hard links at the bottom, packs and unpacks; every level comes back with its mode and
/// mtime. The tree is built in memory (its paths are longer than PATH_MAX, which the
/// directory scanner resolves by path).
#[test]
fn tree_deeper_than_path_max_round_trips() {
    const DEPTH: usize = 10_000;
    let w = tempfile::tempdir().unwrap();
    let content = w.path().join("content");
    fs::write(&content, b"at the bottom\n").unwrap();
    let mut nodes = vec![Node::new(Vec::new(), 0, FileKind::Dir, 0o755)];
    for i in 1..=DEPTH {
        let mut n = Node::new(
            b"d".to_vec(),
            (i - 1) as u32,
            FileKind::Dir,
            if i % 2 == 0 { 0o755 } else { 0o711 },
        );
        n.mtime_sec = i as i64;
        nodes.push(n);
    }
    let bottom = DEPTH as u32;
    let mut f = Node::new(b"f".to_vec(), bottom, FileKind::File, 0o640);
    f.size = 14;
    f.mtime_sec = 42;
    f.source = Some(Source::Path(content.clone()));
    let fid = nodes.len() as u32;
    nodes.push(f);
    let mut h = Node::new(b"g".to_vec(), bottom, FileKind::File, 0o640);
    h.link = Some(fid);
    nodes.push(h);
    let mut s = Node::new(b"s".to_vec(), bottom, FileKind::Symlink, 0o777);
    s.target = b"f".to_vec();
    nodes.push(s);
    let n = nodes.len() as u32;
    nodes[bottom as usize].children = vec![fid, fid + 1, fid + 2];
    for (i, node) in nodes.iter_mut().enumerate().take(DEPTH) {
        node.children = vec![(i + 1) as u32];
    }
    // A second link to the file near the top: linkat from a directory far up the path.
    let mut top_link = Node::new(b"top".to_vec(), 0, FileKind::File, 0o640);
    top_link.link = Some(fid);
    nodes.push(top_link);
    nodes[0].children.push(n);
    let tree = Tree { nodes };
    let img_path = w.path().join("deep.cimg");
    writer::pack_tree(&tree, &img_path, &PackOptions::default(), &|_, _| {})
        .unwrap_or_else(|e| panic!("pack: {e}"));
    let img = Image::open(&img_path).unwrap();
    let dest = w.path().join("out");
    let st = cimg_format::unpack::unpack(&img, &dest, |_| {})
        .unwrap_or_else(|e| panic!("unpack: {:.300}", e.to_string()));
    assert_eq!(st.entries, DEPTH as u64 + 4);

    // Walk down with descriptors, checking each level.
    let mut fd: OwnedFd =
        rfs::open(&dest, OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty()).unwrap();
    for i in 1..=DEPTH {
        let next = rfs::openat(
            &fd,
            "d",
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW,
            Mode::empty(),
        )
        .unwrap_or_else(|e| panic!("level {i}: {e}"));
        let m = rfs::fstat(&next).unwrap();
        let want = if i % 2 == 0 { 0o755 } else { 0o711 };
        assert_eq!(m.st_mode & 0o7777, want, "mode of level {i}");
        assert_eq!(m.st_mtime, i as i64, "mtime of level {i}");
        fd = next;
    }
    let file = rfs::openat(&fd, "f", OFlags::RDONLY | OFlags::NOFOLLOW, Mode::empty()).unwrap();
    let file = fs::File::from(file);
    let mut buf = [0u8; 64];
    let k = file.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf[..k], b"at the bottom\n");
    let fm = file.metadata().unwrap();
    assert_eq!((fm.mode() & 0o7777, fm.mtime(), fm.nlink()), (0o640, 42, 3));
    let g = rfs::statat(&fd, "g", AtFlags::SYMLINK_NOFOLLOW).unwrap();
    assert_eq!(g.st_ino, fm.ino(), "g is a hard link of f");
    let top = fs::symlink_metadata(dest.join("top")).unwrap();
    assert_eq!(top.ino(), fm.ino(), "top is a hard link of f");
    let t = rfs::readlinkat(&fd, "s", Vec::new()).unwrap();
    assert_eq!(t.as_bytes(), b"f");
    drop(fd);
    // Removing it needs descriptors too (std's remove_dir_all works relative to them).
    fs::remove_dir_all(&dest).unwrap();
}

/// A small root filesystem: directories of several modes, a char device, files owned by
/// another uid, a setuid file.
fn make_rootfs(src: &Path) {
    fs::create_dir_all(src.join("dev")).unwrap();
    fs::create_dir_all(src.join("etc/ssl")).unwrap();
    fs::create_dir_all(src.join("home/user")).unwrap();
    fs::create_dir_all(src.join("tmp")).unwrap();
    fs::create_dir_all(src.join("usr/bin")).unwrap();
    nix::sys::stat::mknod(
        &src.join("dev/console"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        nix::sys::stat::makedev(5, 1),
    )
    .expect("mknod dev/console");
    fs::write(src.join("etc/passwd"), b"root:x:0:0::/root:/bin/sh\n").unwrap();
    fs::write(src.join("home/user/notes"), b"mine\n").unwrap();
    fs::write(src.join("usr/bin/su"), b"#!/bin/sh\n").unwrap();
    for p in ["home/user", "home/user/notes"] {
        rustix::fs::chown(
            src.join(p),
            Some(rfs::Uid::from_raw(1234)),
            Some(rfs::Gid::from_raw(1234)),
        )
        .unwrap();
    }
    let modes = [
        ("dev", 0o755),
        ("etc", 0o755),
        ("etc/ssl", 0o700),
        ("etc/passwd", 0o644),
        ("home", 0o755),
        ("home/user", 0o750),
        ("home/user/notes", 0o600),
        ("tmp", 0o1777),
        ("usr", 0o755),
        ("usr/bin", 0o555),
        ("usr/bin/su", 0o4755),
        ("", 0o755),
    ];
    for (p, m) in modes {
        fs::set_permissions(src.join(p), fs::Permissions::from_mode(m)).unwrap();
    }
}

/// The modes of everything under `root` but devices, by relative path.
fn modes(root: &Path) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let full = root.join(&rel);
        let m = fs::symlink_metadata(&full).unwrap();
        let ft = m.file_type();
        use std::os::unix::fs::FileTypeExt;
        if ft.is_char_device() || ft.is_block_device() {
            continue;
        }
        out.push((rel.display().to_string(), m.mode()));
        if ft.is_dir() {
            for e in fs::read_dir(&full).unwrap() {
                stack.push(rel.join(e.unwrap().file_name()));
            }
        }
    }
    out.sort();
    out
}

/// Item 7: an ordinary user unpacks a root filesystem with a device node and foreign owners:
/// it succeeds with one warning, and every mode but the device's is right.
#[test]
fn ordinary_user_skips_devices_and_owners_with_one_warning() {
    must_be_root("ordinary user unpack (makes the image as root)");
    let setpriv = Command::new("setpriv").arg("--version").output();
    assert!(
        setpriv.is_ok_and(|o| o.status.success()),
        "setpriv not found: install util-linux"
    );
    let w = tempfile::tempdir().unwrap();
    fs::set_permissions(w.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let src = w.path().join("src");
    make_rootfs(&src);
    let img = w.path().join("root.cimg");
    pack(&src, &img);
    fs::set_permissions(&img, fs::Permissions::from_mode(0o644)).unwrap();
    // The binary where uid 65534 can run it.
    let bin = w.path().join("cimg");
    fs::copy(env!("CARGO_BIN_EXE_cimg"), &bin).unwrap();
    let home = w.path().join("nobody");
    fs::create_dir(&home).unwrap();
    rustix::fs::chown(
        &home,
        Some(rfs::Uid::from_raw(65534)),
        Some(rfs::Gid::from_raw(65534)),
    )
    .unwrap();
    let dest = home.join("rootfs");
    let out = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(&bin)
        .args(["unpack", "-q"])
        .arg(&img)
        .arg(&dest)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "unpack as uid 65534 failed: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one warning line expected: {stderr}");
    assert!(
        lines[0].starts_with("cimg: warning: ")
            && lines[0].contains("1 device nodes (dev/console)")
            && lines[0].contains("entries keep the unpacking user as owner"),
        "warning: {stderr}"
    );
    assert!(
        fs::symlink_metadata(dest.join("dev/console")).is_err(),
        "a device node was created by an ordinary user"
    );
    assert_eq!(modes(&dest), modes(&src), "modes of the unpacked tree");
    let m = fs::metadata(dest.join("home/user/notes")).unwrap();
    assert_eq!((m.uid(), m.gid()), (65534, 65534));
    assert_eq!(fs::read(dest.join("home/user/notes")).unwrap(), b"mine\n");
}

/// Item 7: an error mid-way (a corrupt block) names the file, and the directories created
/// so far are left with their final modes, not the 0700 they are filled with.
#[test]
fn error_mid_way_names_the_path_and_leaves_final_modes() {
    let w = tempfile::tempdir().unwrap();
    let src = w.path().join("src");
    fs::create_dir_all(src.join("a/b")).unwrap();
    let data: Vec<u8> = (0..20_000u32)
        .flat_map(|i| i.wrapping_mul(2654435761).to_le_bytes())
        .collect();
    fs::write(src.join("a/b/data"), &data).unwrap();
    fs::set_permissions(src.join("a/b"), fs::Permissions::from_mode(0o751)).unwrap();
    fs::set_permissions(src.join("a"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&src, fs::Permissions::from_mode(0o775)).unwrap();
    let img_path = w.path().join("t.cimg");
    pack(&src, &img_path);
    {
        let img = Image::open(&img_path).unwrap();
        assert_eq!(img.block_count(), 1);
        let (off, stored, _) = img.block_info(0).unwrap();
        let f = fs::OpenOptions::new().write(true).open(&img_path).unwrap();
        f.write_all_at(b"\xde\xad\xbe\xef", off + stored as u64 / 2)
            .unwrap();
    }
    let img = Image::open(&img_path).unwrap();
    let dest = w.path().join("out");
    let e = cimg_format::unpack::unpack(&img, &dest, |_| {}).expect_err("a corrupt block");
    assert!(
        e.to_string().contains("a/b/data"),
        "the message names the file: {e}"
    );
    for (p, m) in [("", 0o775), ("a", 0o755), ("a/b", 0o751)] {
        let got = fs::symlink_metadata(dest.join(p)).unwrap().mode() & 0o7777;
        assert_eq!(got, m, "mode of {p:?} after the error");
    }
}

/// `--no-devices` and `--no-same-owner`, as root.
#[test]
fn no_devices_and_no_same_owner() {
    must_be_root("--no-devices/--no-same-owner");
    let w = tempfile::tempdir().unwrap();
    let src = w.path().join("src");
    make_rootfs(&src);
    let img = w.path().join("root.cimg");
    pack(&src, &img);

    let a = w.path().join("a");
    let o = cimg(&[
        "unpack".as_ref(),
        "-q".as_ref(),
        "--no-devices".as_ref(),
        img.as_os_str(),
        a.as_os_str(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        o.stderr.is_empty(),
        "no warning for what was asked: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        fs::symlink_metadata(a.join("dev/console")).is_err(),
        "--no-devices made a device"
    );
    let m = fs::symlink_metadata(a.join("home/user/notes")).unwrap();
    assert_eq!(
        (m.uid(), m.gid()),
        (1234, 1234),
        "owners kept without --no-same-owner"
    );
    assert_eq!(modes(&a), modes(&src));

    let b = w.path().join("b");
    let o = cimg(&[
        "unpack".as_ref(),
        "-q".as_ref(),
        "--no-same-owner".as_ref(),
        img.as_os_str(),
        b.as_os_str(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    use std::os::unix::fs::FileTypeExt;
    let dev = fs::symlink_metadata(b.join("dev/console")).expect("device made as root");
    assert!(dev.file_type().is_char_device());
    assert_eq!(dev.rdev(), nix::sys::stat::makedev(5, 1));
    for p in ["home/user", "home/user/notes", "dev/console", "usr/bin/su"] {
        let m = fs::symlink_metadata(b.join(p)).unwrap();
        assert_eq!(
            (m.uid(), m.gid()),
            (0, 0),
            "{p}: --no-same-owner gives it to the caller"
        );
    }
    let su = fs::metadata(b.join("usr/bin/su")).unwrap();
    assert_eq!(su.mode() & 0o7777, 0o4755);
    assert_eq!(modes(&b), modes(&src));
}

/// Item 10: 64 MiB of zeros written as data, a sparse file, and a file with one page of data
/// per MiB come back as holes (little allocated) with the same content.
#[test]
fn zero_data_comes_back_as_holes() {
    let w = tempfile::tempdir().unwrap();
    let src = w.path().join("src");
    fs::create_dir(&src).unwrap();
    const SIZE: u64 = 64 << 20;
    {
        let mut f = fs::File::create(src.join("zeros")).unwrap();
        let mb = vec![0u8; 1 << 20];
        for _ in 0..64 {
            f.write_all(&mb).unwrap();
        }
        f.sync_all().unwrap();
    }
    assert!(
        fs::metadata(src.join("zeros")).unwrap().blocks() * 512 >= SIZE,
        "the source of zeros must be allocated (written as data)"
    );
    {
        let f = fs::File::create(src.join("holes")).unwrap();
        f.set_len(SIZE).unwrap();
        f.write_all_at(b"start", 0).unwrap();
        f.write_all_at(b"middle", SIZE / 2).unwrap();
        f.write_all_at(b"end", SIZE - 3).unwrap();
    }
    {
        // One 4 KiB page of data per MiB, written with the zeros between: holes inside blocks.
        let mut f = fs::File::create(src.join("pages")).unwrap();
        let mut mb = vec![0u8; 1 << 20];
        for i in 0..64u8 {
            mb[..4096].fill(i + 1);
            f.write_all(&mb).unwrap();
        }
    }
    let img_path = w.path().join("z.cimg");
    pack(&src, &img_path);
    let img = Image::open(&img_path).unwrap();
    let dest = w.path().join("out");
    cimg_format::unpack::unpack(&img, &dest, |_| {}).unwrap();
    for (name, max) in [
        ("zeros", 1u64 << 20),
        ("holes", 1 << 20),
        ("pages", (64 * 4096) + (1 << 20)),
    ] {
        let m = fs::metadata(dest.join(name)).unwrap();
        assert_eq!(m.len(), SIZE, "{name}: size");
        assert!(
            m.blocks() * 512 < max,
            "{name}: {} bytes allocated for {SIZE}, want < {max}",
            m.blocks() * 512
        );
        assert!(
            fs::read(dest.join(name)).unwrap() == fs::read(src.join(name)).unwrap(),
            "{name}: content differs"
        );
    }
}
