//! Helpers shared by the format crate's integration tests: build rich source trees and
//! compare two trees on disk in everything `cimg pack` stores.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// True when running in CI, where a missing capability is a failure, not a skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Whether we may create device nodes and chown (root). Outside CI a test without it
/// prints why it does less; in CI it fails.
pub fn require_root(what: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        assert!(!in_ci(), "{what}: needs root in CI");
        eprintln!("{what}: not root, skipping the parts that need it");
    }
    root
}

/// Everything about one entry that a round trip must keep.
#[derive(Debug, PartialEq, Eq)]
pub struct Entry {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, i64),
    pub size: u64,
    pub rdev: u64,
    pub content: Option<u128>,
    pub target: Option<Vec<u8>>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    pub nlink: u64,
}

/// Snapshot of a tree: relative path → entry, plus the hard-link groups (sets of paths
/// sharing an inode, for non-directories with more than one link).
pub type Snapshot = (BTreeMap<Vec<u8>, Entry>, Vec<Vec<Vec<u8>>>);

/// Take a [`Snapshot`] of the tree at `root`.
pub fn snapshot(root: &Path, with_content: bool) -> Snapshot {
    let mut out = BTreeMap::new();
    let mut groups: HashMap<(u64, u64), Vec<Vec<u8>>> = HashMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let full = root.join(&rel);
        let md =
            std::fs::symlink_metadata(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()));
        let ft = md.file_type();
        let mut xattrs = BTreeMap::new();
        if let Ok(names) = xattr::list(&full) {
            for n in names {
                if let Ok(Some(v)) = xattr::get(&full, &n) {
                    xattrs.insert(n.as_bytes().to_vec(), v);
                }
            }
        }
        let content = (ft.is_file() && with_content).then(|| hash_file(&full));
        let target = ft.is_symlink().then(|| {
            std::fs::read_link(&full)
                .unwrap()
                .as_os_str()
                .as_bytes()
                .to_vec()
        });
        let key = rel.as_os_str().as_bytes().to_vec();
        if !ft.is_dir() && md.nlink() > 1 {
            groups
                .entry((md.dev(), md.ino()))
                .or_default()
                .push(key.clone());
        }
        out.insert(
            key,
            Entry {
                mode: md.mode(),
                uid: md.uid(),
                gid: md.gid(),
                mtime: (md.mtime(), md.mtime_nsec()),
                size: if ft.is_dir() { 0 } else { md.len() },
                rdev: md.rdev(),
                content,
                target,
                xattrs,
                nlink: if ft.is_dir() { 0 } else { md.nlink() },
            },
        );
        if ft.is_dir() {
            for e in std::fs::read_dir(&full).unwrap() {
                stack.push(rel.join(e.unwrap().file_name()));
            }
        }
    }
    let mut groups: Vec<Vec<Vec<u8>>> = groups
        .into_values()
        .map(|mut g| {
            g.sort();
            g
        })
        .collect();
    groups.sort();
    (out, groups)
}

/// xxh3-128 of a file's content.
pub fn hash_file(p: &Path) -> u128 {
    let mut f = std::fs::File::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.digest128()
}

/// Assert that two trees are identical in content, type, mode, owner, mtime, xattrs, link
/// targets and hard-link structure (the copy's link counts must be the in-tree group sizes;
/// the source's may count links outside the packed tree). The root's own mtime/owner are
/// compared too.
pub fn assert_same_tree(a: &Path, b: &Path) {
    let (sa, ga) = snapshot(a, true);
    let (sb, gb) = snapshot(b, true);
    let ka: Vec<_> = sa.keys().collect();
    let kb: Vec<_> = sb.keys().collect();
    if ka != kb {
        let only_a: Vec<_> = sa
            .keys()
            .filter(|k| !sb.contains_key(*k))
            .take(5)
            .map(|k| String::from_utf8_lossy(k))
            .collect();
        let only_b: Vec<_> = sb
            .keys()
            .filter(|k| !sa.contains_key(*k))
            .take(5)
            .map(|k| String::from_utf8_lossy(k))
            .collect();
        panic!("trees differ in names: only in source {only_a:?}, only in copy {only_b:?}");
    }
    // Hard links: the groups of names sharing an inode inside the tree must match, and in
    // the copy each name's link count is its group's size. The source's counts may include
    // links outside the packed tree (a perf build-id cache linking /usr/lib/debug files, say),
    // which are not the image's business, so link counts are not compared directly.
    let ga: Vec<_> = ga.into_iter().filter(|g| g.len() > 1).collect();
    let gb: Vec<_> = gb.into_iter().filter(|g| g.len() > 1).collect();
    assert_eq!(ga, gb, "hard-link groups differ");
    let in_group: HashMap<&Vec<u8>, u64> = gb
        .iter()
        .flat_map(|g| g.iter().map(move |k| (k, g.len() as u64)))
        .collect();
    for (k, ea) in &sa {
        let eb = &sb[k];
        if eb.nlink != 0 {
            let want = in_group.get(k).copied().unwrap_or(1);
            assert_eq!(
                eb.nlink,
                want,
                "link count of {} in the copy",
                String::from_utf8_lossy(k)
            );
        }
        let ea = Entry {
            nlink: eb.nlink,
            xattrs: ea.xattrs.clone(),
            target: ea.target.clone(),
            ..*ea
        };
        assert_eq!(&ea, eb, "entry {} differs", String::from_utf8_lossy(k));
    }
}

/// Write `len` bytes of deterministic, moderately compressible data.
pub fn pseudo_data(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let words: [&[u8]; 8] = [
        b"alpha ",
        b"beta ",
        b"gamma ",
        b"delta\n",
        b"\x00\x01\x02",
        b"epsilon ",
        b"zeta ",
        b"eta ",
    ];
    let mut v = Vec::with_capacity(len + 16);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x.is_multiple_of(5) {
            v.extend_from_slice(&x.to_le_bytes());
        } else {
            v.extend_from_slice(words[(x % 8) as usize]);
        }
    }
    v.truncate(len);
    v
}

/// Build a tree with every kind of entry the format stores. Device nodes and foreign owners
/// only when `root` is true.
pub fn make_rich_tree(dir: &Path, root: bool) {
    use std::fs;
    let w = |p: &str, data: &[u8]| {
        let p = dir.join(p);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, data).unwrap();
    };
    w("empty", b"");
    w("small.txt", b"hello\n");
    w("a/b/c/deep.txt", &pseudo_data(1, 1000));
    w("block", &pseudo_data(2, 4096));
    w("block_plus_one", &pseudo_data(3, 4097));
    w("multi.bin", &pseudo_data(4, 3 * 131072 + 77));
    w("dup1", &pseudo_data(5, 200_000));
    w("sub/dup2", &pseudo_data(5, 200_000));
    w("zeros", &vec![0u8; 300_000]);
    fs::create_dir(dir.join("emptydir")).unwrap();
    // Sparse file: data, a hole, data.
    {
        let mut f = fs::File::create(dir.join("sparse")).unwrap();
        f.write_all(&pseudo_data(6, 5000)).unwrap();
        f.seek(SeekFrom::Start(10 << 20)).unwrap();
        f.write_all(&pseudo_data(7, 5000)).unwrap();
    }
    // Over 4 GiB, nearly all hole.
    {
        let f = fs::File::create(dir.join("huge")).unwrap();
        f.set_len((5 << 30) + 123).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"end of a big file", 5 << 30).unwrap();
        f.write_all_at(b"start", 0).unwrap();
    }
    // Names that are not UTF-8, and odd ones.
    fs::write(dir.join(OsStr::from_bytes(b"bad\xff\xfename")), b"latin1").unwrap();
    fs::write(dir.join("with space & 'quote'"), b"x").unwrap();
    fs::write(dir.join("n\nl"), b"newline in name").unwrap();
    fs::write(dir.join("x".repeat(255)), b"long name").unwrap();
    // Symlinks: relative, absolute, dangling, to a directory.
    std::os::unix::fs::symlink("small.txt", dir.join("link_rel")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", dir.join("link_abs")).unwrap();
    std::os::unix::fs::symlink("does/not/exist", dir.join("link_dangling")).unwrap();
    std::os::unix::fs::symlink("a/b", dir.join("link_dir")).unwrap();
    // Hard links, one across directories.
    fs::hard_link(dir.join("small.txt"), dir.join("hard1")).unwrap();
    fs::hard_link(dir.join("small.txt"), dir.join("a/hard2")).unwrap();
    // A fifo and a socket.
    nix::unistd::mkfifo(
        &dir.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o640),
    )
    .unwrap();
    {
        let _l = std::os::unix::net::UnixListener::bind(dir.join("sock")).unwrap();
    }
    // Permission bits.
    w("setuid", b"#!/bin/sh\n");
    fs::set_permissions(dir.join("setuid"), fs::Permissions::from_mode(0o4755)).unwrap();
    w("setgid", b"#!/bin/sh\n");
    fs::set_permissions(dir.join("setgid"), fs::Permissions::from_mode(0o2711)).unwrap();
    fs::create_dir(dir.join("sticky")).unwrap();
    fs::set_permissions(dir.join("sticky"), fs::Permissions::from_mode(0o1777)).unwrap();
    w("private", b"secret");
    fs::set_permissions(dir.join("private"), fs::Permissions::from_mode(0o600)).unwrap();
    // Deep tree.
    let mut deep = dir.join("deep");
    for i in 0..300 {
        deep.push(format!("d{}", i % 10));
    }
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join("bottom"), b"bottom").unwrap();
    // xattrs.
    xattr::set(dir.join("small.txt"), "user.comment", b"a comment").unwrap();
    xattr::set(dir.join("a"), "user.dir", b"on a dir").unwrap();
    xattr::set(dir.join("multi.bin"), "user.empty", b"").unwrap();
    xattr::set(dir.join("multi.bin"), "user.big", &pseudo_data(8, 4000)).unwrap();
    if root {
        xattr::set(dir.join("block"), "trusted.t", b"trusted value").unwrap();
        nix::sys::stat::mknod(
            &dir.join("null"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 3),
        )
        .unwrap();
        nix::sys::stat::mknod(
            &dir.join("loop9"),
            nix::sys::stat::SFlag::S_IFBLK,
            nix::sys::stat::Mode::from_bits_truncate(0o660),
            nix::sys::stat::makedev(7, 9),
        )
        .unwrap();
        let own = |p: &str, u, g| {
            nix::unistd::fchownat(
                nix::fcntl::AT_FDCWD,
                &dir.join(p),
                Some(nix::unistd::Uid::from_raw(u)),
                Some(nix::unistd::Gid::from_raw(g)),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .unwrap();
        };
        own("private", 1234, 5678);
        own("link_rel", 42, 43);
        own("a/b", 65534, 65534);
        // chown clears setuid; set it again.
        own("setuid", 1000, 1000);
        fs::set_permissions(dir.join("setuid"), fs::Permissions::from_mode(0o4755)).unwrap();
    }
    // mtimes with nanoseconds, last so writes above do not change them.
    let t = nix::sys::time::TimeSpec::new(1_600_000_000, 123_456_789);
    for p in [
        "small.txt",
        "a",
        "a/b/c/deep.txt",
        "link_rel",
        "emptydir",
        "sparse",
    ] {
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            &dir.join(p),
            &t,
            &t,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
    }
}

/// The largest block a zstd frame may hold (RFC 8878 Block_Maximum_Size).
const ZSTD_BLOCK_MAX: usize = 128 << 10;

/// A zstd frame (no content size, 128 KiB window) holding `prefix` in raw blocks, then zeros
/// in RLE blocks up to `total` bytes: a decompression bomb that costs nothing to build (four
/// stored bytes per 128 KiB of zeros, RFC 8878 §3.1.1.2).
pub fn zstd_rle_frame(prefix: &[u8], total: u64) -> Vec<u8> {
    let mut out = vec![0x28, 0xB5, 0x2F, 0xFD, 0x00, 7 << 3];
    let mut blocks: Vec<(u32, usize)> = Vec::new(); // (type, regenerated size)
    for piece in prefix.chunks(ZSTD_BLOCK_MAX) {
        blocks.push((0, piece.len()));
    }
    let mut zeros = total - prefix.len() as u64;
    while zeros > 0 {
        let n = zeros.min(ZSTD_BLOCK_MAX as u64) as usize;
        blocks.push((1, n));
        zeros -= n as u64;
    }
    if blocks.is_empty() {
        blocks.push((0, 0));
    }
    let last = blocks.len() - 1;
    let mut pieces = prefix.chunks(ZSTD_BLOCK_MAX);
    for (k, &(ty, n)) in blocks.iter().enumerate() {
        let h = (n as u32) << 3 | ty << 1 | u32::from(k == last);
        out.extend_from_slice(&h.to_le_bytes()[..3]);
        match ty {
            0 => out.extend_from_slice(pieces.next().unwrap_or(&[])),
            _ => out.push(0),
        }
    }
    out
}
