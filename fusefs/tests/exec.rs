//! The files a program's start reads, found in a real image of host programs
//! ([`cimg_fuse::exec`]).

use cimg_format::{Image, PackOptions, pack_dir};
use cimg_fuse::exec::{ExecHint, exec_files, loader_ranges, resolve_file};
use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Pack `root` and open it.
fn image_of(root: &Path, out: &Path) -> Image {
    pack_dir(root, out, &PackOptions::default(), &|_, _| {}).expect("pack");
    Image::open(out).expect("open")
}

/// Every regular file of the image, by inode, with its path.
fn paths(img: &Image) -> BTreeMap<u32, PathBuf> {
    let mut m = BTreeMap::new();
    img.walk(|p, e| {
        m.insert(e.ino, PathBuf::from(std::ffi::OsStr::from_bytes(p)));
        Ok(())
    })
    .expect("walk");
    m
}

/// The paths `exec_files` finds for `hint`, in order, with the bytes it would prefetch.
fn found_ranges(img: &Image, hint: &ExecHint) -> Vec<(PathBuf, u64)> {
    let names = paths(img);
    let mut out = Vec::new();
    exec_files(
        img,
        hint,
        |ino, path, ranges| {
            assert_eq!(
                path.strip_prefix("/").ok(),
                Some(names[&ino].as_path()),
                "the path given with inode {ino}"
            );
            out.push((
                names[&ino].clone(),
                ranges.iter().map(|r| r.end - r.start).sum(),
            ))
        },
        |ino, _, range| {
            let mut buf = vec![0u8; (range.end - range.start) as usize];
            let n = img.read_at(ino, range.start, &mut buf).ok()?;
            buf.truncate(n);
            Some(buf)
        },
    );
    out
}

fn found(img: &Image, hint: &ExecHint) -> Vec<PathBuf> {
    found_ranges(img, hint)
        .into_iter()
        .map(|(p, _)| p)
        .collect()
}

fn hint(cmd: &str) -> ExecHint {
    ExecHint {
        candidates: path_candidates(cmd),
        cwd: PathBuf::from("/"),
        library_path: Vec::new(),
    }
}

fn path_candidates(cmd: &str) -> Vec<PathBuf> {
    if cmd.contains('/') {
        return vec![PathBuf::from(cmd)];
    }
    ["/usr/local/bin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(cmd))
        .collect()
}

#[test]
fn finds_the_program_its_interpreter_and_libraries() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("root");
    cimg_tests::host_programs_tree(&root, &["true", "sh"]);
    // A script whose interpreter is reached through the /bin link.
    std::fs::write(root.join("usr/bin/script"), "#!/bin/sh -e\ntrue\n").expect("script");
    // Not an ELF file, though it starts like one: only the file itself is found.
    std::fs::write(root.join("usr/bin/junk"), b"\x7fELF\x02\x01\x01garbage").expect("junk");
    let img = image_of(&root, &tmp.path().join("img.cimg"));

    // Through the /bin -> usr/bin link: the link-free path of the program.
    let (_, p) = resolve_file(&img, Path::new("/bin/true")).expect("resolve /bin/true");
    assert_eq!(p, Path::new("/usr/bin/true"));
    assert!(
        resolve_file(&img, Path::new("/usr/bin")).is_none(),
        "a directory"
    );
    assert!(resolve_file(&img, Path::new("/usr/bin/missing")).is_none());

    let files = found(&img, &hint("true"));
    assert_eq!(
        files.first().map(PathBuf::as_path),
        Some(Path::new("usr/bin/true")),
        "{files:?}"
    );
    let has = |name: &str| {
        files
            .iter()
            .any(|f| f.file_name().is_some_and(|n| n == name))
    };
    // The interpreter named in the program (ld-linux-x86-64.so.2, ld-linux-aarch64.so.1...),
    // and the libc it needs.
    assert!(
        files.iter().any(|f| f
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("ld-linux"))),
        "interpreter missing: {files:?}"
    );
    assert!(has("libc.so.6"), "libc missing: {files:?}");
    // libc is small enough to be prefetched whole.
    let libc = ["x86_64-linux-gnu", "aarch64-linux-gnu"]
        .iter()
        .find_map(|d| std::fs::metadata(root.join("usr/lib").join(d).join("libc.so.6")).ok())
        .expect("the tree holds the host's libc.so.6");
    let (_, bytes) = found_ranges(&img, &hint("true"))
        .into_iter()
        .find(|(p, _)| p.ends_with("libc.so.6"))
        .expect("libc");
    assert_eq!(bytes, libc.len());
    // Each file once.
    let mut dedup = files.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(dedup.len(), files.len(), "{files:?}");

    // A script: the script, then its interpreter (and the interpreter's libraries).
    let files = found(&img, &hint("script"));
    assert_eq!(
        files.first().map(PathBuf::as_path),
        Some(Path::new("usr/bin/script"))
    );
    assert_eq!(
        files.get(1).map(PathBuf::as_path),
        Some(Path::new("usr/bin/sh")),
        "{files:?}"
    );
    assert!(files.iter().any(|f| f.ends_with("libc.so.6")), "{files:?}");

    // Garbage and a missing command: nothing beyond the file, no panic.
    assert_eq!(
        found(&img, &hint("junk")),
        vec![PathBuf::from("usr/bin/junk")]
    );
    assert!(found(&img, &hint("no-such-command")).is_empty());
    // A relative command is looked up from the working directory.
    let rel = ExecHint {
        candidates: vec![PathBuf::from("./true")],
        cwd: PathBuf::from("/usr/bin"),
        library_path: Vec::new(),
    };
    assert_eq!(
        found(&img, &rel).first().map(PathBuf::as_path),
        Some(Path::new("usr/bin/true"))
    );
}

/// Of a big library only what the loader reads is prefetched: the headers, the first
/// (read-only, not code) segment and the writable ones; not the code.
#[test]
fn loader_ranges_leave_the_code_out() {
    let libc = [
        "/usr/lib/x86_64-linux-gnu/libc.so.6",
        "/usr/lib/aarch64-linux-gnu/libc.so.6",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .expect("the test needs the host's libc.so.6");
    let bytes = std::fs::read(libc).expect("read libc");
    let size = bytes.len() as u64;
    let ranges = loader_ranges(&bytes[..bytes.len().min(64 << 10)], size);
    let total: u64 = ranges.iter().map(|r| r.end - r.start).sum();
    assert_eq!(ranges.first().map(|r| r.start), Some(0), "{ranges:?}");
    assert!(total < size / 2, "{total} of {size} bytes: {ranges:?}");
    // The writable segment (data, GOT) is near the end of the file.
    assert!(ranges.iter().any(|r| r.end > size / 2), "{ranges:?}");
    // Sorted, not overlapping, inside the file.
    assert!(
        ranges.windows(2).all(|w| w[0].end < w[1].start),
        "{ranges:?}"
    );
    assert!(ranges.iter().all(|r| r.end <= size));
    // Not an ELF file: just the head.
    let only_head = |head: &[u8], size: u64| {
        let r = loader_ranges(head, size);
        assert_eq!(r.len(), 1, "{r:?}");
        r[0].clone()
    };
    assert_eq!(only_head(b"#!/bin/sh\n", 10), 0..10);
    assert_eq!(only_head(b"\x7fELF\x02\x01\x01garbage", 1 << 20), 0..14);
}

#[test]
fn link_loops_end() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("root");
    std::fs::create_dir_all(&root).expect("mkdir");
    std::os::unix::fs::symlink("b", root.join("a")).expect("link");
    std::os::unix::fs::symlink("a", root.join("b")).expect("link");
    std::os::unix::fs::symlink("/", root.join("up")).expect("link");
    std::fs::write(root.join("f"), "x").expect("file");
    let img = image_of(&root, &tmp.path().join("img.cimg"));
    assert!(resolve_file(&img, Path::new("/a")).is_none());
    let (_, p) = resolve_file(&img, Path::new("/up/up/../f")).expect("through links and ..");
    assert_eq!(p, Path::new("/f"));
}
