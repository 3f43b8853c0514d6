//! Round trips through the real writer and unpacker: a hand-made tree with every file type,
//! property-generated trees, the host's `/usr`, and a million entries; plus reproducibility
//! (the same bytes whatever the thread count) and what the reader reports for each entry.

mod common;

use cimg_format::reader::BlockCache;
use cimg_format::writer::{self, PackOptions};
use cimg_format::{FileKind, Image};
use common::*;
use proptest::prelude::*;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn pack(src: &Path, out: &Path, opts: &PackOptions) -> cimg_format::PackStats {
    cimg_format::pack_dir(src, out, opts, &|_, _| {})
        .unwrap_or_else(|e| panic!("pack {}: {e}", src.display()))
}

fn round_trip(src: &Path, opts: &PackOptions) {
    let work = tempfile::tempdir().unwrap();
    let img_path = work.path().join("t.cimg");
    pack(src, &img_path, opts);
    let img = Image::open(&img_path).unwrap();
    let dest = work.path().join("out");
    cimg_format::unpack::unpack(&img, &dest, |_| {}).unwrap();
    assert_same_tree(src, &dest);
    let bad = img.verify(|_| {}).unwrap();
    assert!(bad.is_empty(), "verify: {bad:?}");
}

#[test]
fn rich_tree_round_trips_at_several_block_sizes() {
    let root = require_root("rich tree");
    let src = tempfile::tempdir().unwrap();
    make_rich_tree(src.path(), root);
    for block_log in [12, 17, 20] {
        round_trip(
            src.path(),
            &PackOptions {
                block_log,
                ..PackOptions::default()
            },
        );
    }
}

#[test]
fn reader_reports_what_was_packed() {
    let root = require_root("reader attributes");
    let src = tempfile::tempdir().unwrap();
    make_rich_tree(src.path(), root);
    let work = tempfile::tempdir().unwrap();
    let p = work.path().join("t.cimg");
    let stats = pack(
        src.path(),
        &p,
        &PackOptions {
            block_log: 12,
            ..PackOptions::default()
        },
    );
    assert!(
        stats.dedup_bytes >= 200_000,
        "identical files deduplicated: {stats:?}"
    );
    let img = Image::open(&p).unwrap();
    // Holes cost nothing: a 5 GiB file and a 10 MiB sparse one fit in a small image.
    assert!(
        std::fs::metadata(&p).unwrap().len() < 2 << 20,
        "image too big for its data"
    );
    let huge = img.resolve(b"huge").unwrap();
    let a = img.attr(huge).unwrap();
    assert_eq!(a.size, (5 << 30) + 123);
    let mut buf = [0u8; 17];
    assert_eq!(img.read_at(huge, 5 << 30, &mut buf).unwrap(), 17);
    assert_eq!(&buf, b"end of a big file");
    assert_eq!(img.read_at(huge, 1 << 30, &mut buf).unwrap(), 17);
    assert_eq!(buf, [0u8; 17]);
    assert_eq!(img.read_at(huge, a.size, &mut buf).unwrap(), 0);
    // Symlinks, hard links, xattrs, special files.
    let l = img.resolve(b"link_rel").unwrap();
    assert_eq!(img.readlink(l).unwrap(), b"small.txt");
    let s = img.resolve(b"small.txt").unwrap();
    assert_eq!(img.resolve(b"hard1").unwrap(), s);
    assert_eq!(img.resolve(b"a/hard2").unwrap(), s);
    assert_eq!(img.attr(s).unwrap().nlink, 3);
    assert_eq!(
        img.getxattr(s, b"user.comment").unwrap(),
        Some(&b"a comment"[..])
    );
    assert_eq!(img.getxattr(s, b"user.none").unwrap(), None);
    assert_eq!(
        img.attr(img.resolve(b"fifo").unwrap()).unwrap().kind,
        FileKind::Fifo
    );
    assert_eq!(
        img.attr(img.resolve(b"sock").unwrap()).unwrap().kind,
        FileKind::Socket
    );
    assert_eq!(
        img.attr(img.resolve(b"setuid").unwrap()).unwrap().perm(),
        0o4755
    );
    assert_eq!(
        img.attr(img.resolve(b"sticky").unwrap()).unwrap().perm(),
        0o1777
    );
    let t = img.attr(s).unwrap();
    assert_eq!((t.mtime_sec, t.mtime_nsec), (1_600_000_000, 123_456_789));
    if root {
        let n = img.attr(img.resolve(b"null").unwrap()).unwrap();
        assert_eq!(
            (n.kind, n.rdev),
            (FileKind::CharDev, nix::sys::stat::makedev(1, 3))
        );
        let p = img.attr(img.resolve(b"private").unwrap()).unwrap();
        assert_eq!((p.uid, p.gid), (1234, 5678));
    }
    // Directory listing sorted by bytes, lookup by binary search, `..` and missing names.
    let names: Vec<Vec<u8>> = img
        .readdir(1)
        .unwrap()
        .map(|e| e.unwrap().name.to_vec())
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    assert!(names.iter().any(|n| n.as_slice() == b"bad\xff\xfename"));
    assert_eq!(
        img.resolve(b"a/b/../b/c/deep.txt").unwrap(),
        img.resolve(b"a/b/c/deep.txt").unwrap()
    );
    assert!(matches!(
        img.resolve(b"nope"),
        Err(cimg_format::Error::NotFound(_))
    ));
    assert!(matches!(
        img.resolve(b"small.txt/x"),
        Err(cimg_format::Error::NotFound(_))
    ));
    let deep = img.resolve(b"deep/d0/d1/d2").unwrap();
    assert_eq!(img.attr(deep).unwrap().kind, FileKind::Dir);
    // Unaligned reads through the cache agree with the source.
    let want = std::fs::read(src.path().join("multi.bin")).unwrap();
    let m = img.resolve(b"multi.bin").unwrap();
    let mut cache = BlockCache::new(2);
    for (off, len) in [
        (0usize, 1usize),
        (4095, 2),
        (5000, 70_000),
        (want.len() - 3, 10),
    ] {
        let mut buf = vec![0u8; len];
        let n = cache.read_at(&img, m, off as u64, &mut buf).unwrap();
        assert_eq!(&buf[..n], &want[off..(off + len).min(want.len())]);
    }
}

#[test]
fn root_owned_records_zero_owners() {
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("f"), b"x").unwrap();
    let work = tempfile::tempdir().unwrap();
    let p = work.path().join("t.cimg");
    if nix::unistd::geteuid().is_root() {
        nix::unistd::chown(&src.path().join("f"), Some(1000.into()), Some(1000.into())).unwrap();
    }
    pack(
        src.path(),
        &p,
        &PackOptions {
            root_owned: true,
            ..PackOptions::default()
        },
    );
    let img = Image::open(&p).unwrap();
    for ino in 1..=img.inode_count() {
        let a = img.attr(ino).unwrap();
        assert_eq!((a.uid, a.gid), (0, 0));
    }
}

#[test]
fn same_bytes_whatever_the_thread_count() {
    let src = tempfile::tempdir().unwrap();
    make_rich_tree(src.path(), false);
    // Real data too: many small files and some larger ones.
    let doc = Path::new("/usr/share/doc");
    let work = tempfile::tempdir().unwrap();
    for (i, tree) in [src.path(), doc].into_iter().enumerate() {
        if !tree.exists() {
            continue;
        }
        let mut images = Vec::new();
        for threads in [1, 2, 8] {
            let p = work.path().join(format!("{i}-{threads}.cimg"));
            pack(
                tree,
                &p,
                &PackOptions {
                    threads,
                    block_log: 15,
                    ..PackOptions::default()
                },
            );
            images.push(std::fs::read(&p).unwrap());
        }
        assert!(
            images.windows(2).all(|w| w[0] == w[1]),
            "{}: images differ by thread count",
            tree.display()
        );
    }
}

#[test]
fn hot_list_files_come_first() {
    let src = tempfile::tempdir().unwrap();
    for i in 0..50 {
        std::fs::write(
            src.path().join(format!("f{i:02}")),
            pseudo_data(i, 3000 + i as usize * 100),
        )
        .unwrap();
    }
    std::fs::write(src.path().join("big"), pseudo_data(99, 100_000)).unwrap();
    let work = tempfile::tempdir().unwrap();
    let p = work.path().join("t.cimg");
    let hot = writer::parse_hot_list(b"# start-up order\n/f40\nbig\n/nonexistent\nf07\n");
    let stats = pack(
        src.path(),
        &p,
        &PackOptions {
            block_log: 12,
            hot,
            ..PackOptions::default()
        },
    );
    assert_eq!(stats.hot_missing, 1);
    let img = Image::open(&p).unwrap();
    let hot_blocks = img.summary().hot_blocks as u32;
    assert!(hot_blocks > 0);
    let blocks_of = |name: &[u8]| -> Vec<u32> {
        img.extents(img.resolve(name).unwrap())
            .unwrap()
            .filter_map(|e| e.block)
            .collect()
    };
    for name in [&b"f40"[..], b"big", b"f07"] {
        assert!(
            blocks_of(name).iter().all(|&b| b < hot_blocks),
            "{} not in the hot range",
            String::from_utf8_lossy(name)
        );
    }
    assert!(blocks_of(b"f00").iter().all(|&b| b >= hot_blocks));
    // The hot range is contiguous at the start of the data region.
    let (first_off, _, _) = img.block_info(0).unwrap();
    assert_eq!(first_off, img.summary().data.start);
    let mut end = first_off;
    for b in 0..hot_blocks {
        let (off, st, _) = img.block_info(b).unwrap();
        assert_eq!(off, end);
        end += st as u64;
    }
    round_trip(src.path(), &PackOptions::default());
}

#[test]
fn host_usr_round_trips() {
    // The whole host /usr (or CIMG_ROUNDTRIP_TREE): real binaries, libraries, scripts,
    // symlink farms and hard links.
    let tree = std::env::var_os("CIMG_ROUNDTRIP_TREE").unwrap_or_else(|| "/usr".into());
    // Level 3: this test is about fidelity, and the default level packs /usr slower.
    round_trip(
        Path::new(&tree),
        &PackOptions {
            level: 3,
            ..PackOptions::default()
        },
    );
}

#[test]
fn a_million_entries() {
    let n_dirs = 1000;
    let per_dir = 1000;
    let src = tempfile::tempdir().unwrap();
    for d in 0..n_dirs {
        let dir = src.path().join(format!("d{d:04}"));
        std::fs::create_dir(&dir).unwrap();
        for f in 0..per_dir - 1 {
            std::fs::File::create(dir.join(format!("{f}"))).unwrap();
        }
        std::fs::write(dir.join("data"), format!("dir {d}")).unwrap();
    }
    let work = tempfile::tempdir().unwrap();
    let p = work.path().join("t.cimg");
    let stats = pack(src.path(), &p, &PackOptions::default());
    assert_eq!(stats.inodes, 1 + n_dirs as u64 * (per_dir as u64 + 1));
    let img = Image::open(&p).unwrap();
    assert_eq!(img.inode_count() as u64, stats.inodes);
    assert_eq!(img.dir_len(1).unwrap(), n_dirs);
    let mut count = 0u64;
    img.walk(|_, _| {
        count += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(count, stats.inodes - 1);
    for d in [0, 517, 999] {
        let ino = img.resolve(format!("d{d:04}/data").as_bytes()).unwrap();
        let mut buf = vec![0u8; 32];
        let k = img.read_at(ino, 0, &mut buf).unwrap();
        assert_eq!(&buf[..k], format!("dir {d}").as_bytes());
        assert!(img.resolve(format!("d{d:04}/998").as_bytes()).is_ok());
        assert!(img.resolve(format!("d{d:04}/999").as_bytes()).is_err());
    }
}

/// A generated entry: a path of 1–3 components and what to put there.
#[derive(Debug, Clone)]
enum Gen {
    File { len: usize, seed: u64, hole: bool },
    Link(Vec<u8>),
    Dir,
    Fifo,
    HardLink(usize),
}

fn name_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        "[a-z]{1,8}".prop_map(|s| s.into_bytes()),
        proptest::collection::vec(1u8..=255, 1..12).prop_map(|mut v| {
            v.retain(|&c| c != b'/');
            if v.is_empty() || v == b"." || v == b".." {
                v = b"n".to_vec();
            }
            v
        }),
    ]
}

fn gen_strategy() -> impl Strategy<Value = Gen> {
    prop_oneof![
        4 => (0usize..20_000, any::<u64>(), any::<bool>()).prop_map(|(len, seed, hole)| Gen::File { len, seed, hole }),
        1 => (0usize..3, 0usize..40_000).prop_map(|(k, len)| Gen::File { len: [0, 4096, 8192][k] + len % 3, seed: 7, hole: false }),
        1 => name_strategy().prop_map(Gen::Link),
        1 => Just(Gen::Dir),
        1 => Just(Gen::Fifo),
        1 => (0usize..100).prop_map(Gen::HardLink),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn generated_trees_round_trip(
        entries in proptest::collection::vec((proptest::collection::vec(name_strategy(), 1..4), gen_strategy(), 0u32..0o7777, any::<u32>()), 1..60),
        block_log in 12u8..=14,
        threads in 1usize..4,
        xattr_value in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let src = tempfile::tempdir().unwrap();
        let mut files: Vec<std::path::PathBuf> = Vec::new();
        for (i, (comps, g, perm, mtime)) in entries.iter().enumerate() {
            let mut p = src.path().to_path_buf();
            for c in &comps[..comps.len() - 1] {
                p.push(std::ffi::OsStr::from_bytes(c));
                if p.exists() && !p.is_dir() { break; }
                let _ = std::fs::create_dir(&p);
            }
            if !p.is_dir() { continue; }
            p.push(std::ffi::OsStr::from_bytes(&comps[comps.len() - 1]));
            if std::fs::symlink_metadata(&p).is_ok() { continue; }
            match g {
                Gen::File { len, seed, hole } => {
                    let f = std::fs::File::create(&p).unwrap();
                    use std::os::unix::fs::FileExt;
                    f.write_all_at(&pseudo_data(*seed, *len), if *hole { 100_000 } else { 0 }).unwrap();
                    files.push(p.clone());
                }
                Gen::Link(t) => std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(t), &p).unwrap(),
                Gen::Dir => std::fs::create_dir(&p).unwrap(),
                Gen::Fifo => nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap(),
                Gen::HardLink(k) => {
                    if files.is_empty() { continue; }
                    std::fs::hard_link(&files[k % files.len()], &p).unwrap();
                }
            }
            let is_link = matches!(g, Gen::Link(_));
            if !is_link {
                use std::os::unix::fs::PermissionsExt;
                // Keep directories traversable and files readable for the packer.
                let perm = if matches!(g, Gen::Dir) { perm | 0o700 } else { perm | 0o400 };
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(perm)).unwrap();
                if i % 3 == 0 && !matches!(g, Gen::Fifo) {
                    xattr::set(&p, "user.gen", &xattr_value).unwrap();
                }
            }
            let t = nix::sys::time::TimeSpec::new(*mtime as i64, (*mtime % 1_000_000_000) as i64);
            nix::sys::stat::utimensat(nix::fcntl::AT_FDCWD, &p, &t, &t, nix::sys::stat::UtimensatFlags::NoFollowSymlink).unwrap();
        }
        round_trip(src.path(), &PackOptions { block_log, threads, ..PackOptions::default() });
    }
}

/// `advise_metadata` accepts an image (its superblock checks pass) and refuses anything else
/// with the reader's own reason.
#[test]
fn advise_metadata_checks_the_superblock() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), b"hello").unwrap();
    let img = work.path().join("t.cimg");
    pack(&src, &img, &PackOptions::default());
    let f = std::fs::File::open(&img).unwrap();
    cimg_format::advise_metadata(&f).expect("an image is advised");

    let mut bytes = std::fs::read(&img).unwrap();
    bytes[0] ^= 0xff;
    let bad = work.path().join("bad.cimg");
    std::fs::write(&bad, &bytes).unwrap();
    let e = cimg_format::advise_metadata(&std::fs::File::open(&bad).unwrap()).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    assert!(e.to_string().contains("bad magic"), "{e}");
    bytes[0] ^= 0xff;
    bytes[100] ^= 1;
    std::fs::write(&bad, &bytes).unwrap();
    let e = cimg_format::advise_metadata(&std::fs::File::open(&bad).unwrap()).unwrap_err();
    assert!(e.to_string().contains("checksum"), "{e}");
}
