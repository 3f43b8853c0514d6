//! Hostile inputs given to the `cimg` tool itself: a FIFO (or other non-regular file) as an
//! image or a pack source must be refused at once, in one line naming it, never waited on.
//! Every child runs under a deadline and is killed past it, so no test can hang the suite.

mod common;

use cimg_format::{FileKind, Image};
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CIMG: &str = env!("CARGO_BIN_EXE_cimg");
/// A refusal must come within this; a tool waiting on a FIFO never returns.
const DEADLINE: Duration = Duration::from_secs(5);

/// Run `cimg args`, stdin from /dev/null, killed at `deadline`: exit status (None if it had to
/// be killed), stderr.
fn run(args: &[&str], deadline: Duration) -> (Option<std::process::ExitStatus>, String) {
    let mut child = Command::new(CIMG)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cimg");
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break Some(s);
        }
        if t0.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    (status, err)
}

/// `cimg args` must fail within [`DEADLINE`] with one line on stderr naming `path` and saying
/// what it is.
fn refuses(args: &[&str], path: &Path, what: &str) {
    let (status, err) = run(args, DEADLINE);
    let Some(status) = status else {
        panic!("cimg {args:?} still ran after {DEADLINE:?}: it waits on the {what}");
    };
    assert!(!status.success(), "cimg {args:?} succeeded on a {what}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "cimg {args:?}: not one line: {err:?}");
    assert!(
        lines[0].starts_with("cimg: ") && lines[0].contains(&*path.to_string_lossy()),
        "cimg {args:?}: the message does not name {}: {err:?}",
        path.display()
    );
    assert!(
        lines[0].contains(what),
        "cimg {args:?}: the message does not say it is a {what}: {err:?}"
    );
}

fn mkfifo(path: &Path) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o644)).expect("mkfifo");
}

#[test]
fn a_fifo_given_as_an_image_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("img.cimg");
    mkfifo(&fifo);
    let f = fifo.to_str().unwrap();
    let out = dir.path().join("out");
    let out = out.to_str().unwrap();
    for args in [
        vec!["ls", f],
        vec!["ls", "-l", f, "/"],
        vec!["cat", f, "/x"],
        vec!["info", f],
        vec!["verify", f],
        vec!["unpack", f, out],
    ] {
        refuses(&args, &fifo, "fifo");
    }
}

#[test]
fn a_fifo_given_as_a_pack_source_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("src.tar");
    mkfifo(&fifo);
    let f = fifo.to_str().unwrap();
    let out = dir.path().join("out.cimg");
    let out = out.to_str().unwrap();
    refuses(&["pack", f, out], &fifo, "fifo");
    for from in ["tar", "docker", "oci", "sqfs"] {
        refuses(&["pack", "--from", from, f, out], &fifo, "fifo");
    }
    // A directory source must be a directory.
    refuses(&["pack", "--from", "dir", f, out], &fifo, "not a directory");
    assert!(!Path::new(out).exists(), "a refused pack left an image");
}

#[test]
fn a_character_device_given_as_an_image_is_refused() {
    let dev = Path::new("/dev/zero");
    refuses(&["info", "/dev/zero"], dev, "character device");
}

#[test]
fn a_fifo_inside_a_directory_source_is_packed_not_opened() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("file"), b"data").unwrap();
    mkfifo(&src.join("pipe"));
    let out = dir.path().join("out.cimg");
    let (status, err) = run(
        &["pack", src.to_str().unwrap(), out.to_str().unwrap()],
        Duration::from_secs(30),
    );
    let status = status.expect("cimg pack of a directory holding a fifo did not return");
    assert!(status.success(), "cimg pack failed: {err}");
    let img = Image::open(&out).unwrap();
    let ino = img.resolve(b"/pipe").unwrap();
    assert_eq!(img.attr(ino).unwrap().kind, FileKind::Fifo);
}

// ---------------------------------------------------------------------------------------------
// Huge sparse files: refused at once beyond the format's limit, packed in time and memory
// linear in their data (not their size) below it.

const TIB: u64 = 1 << 40;
/// Where the sparse test files hold data: (offset, bytes).
const DATA_AT: [(u64, &[u8]); 3] = [
    (0, b"head"),
    (TIB / 2 + 12345, b"middle of a terabyte"),
    (TIB - 4, b"tail"),
];

/// A tar holding one PAX sparse file (GNU format 0.1) `f` of `size` bytes with `data` at its
/// offsets.
fn sparse_tar(size: u64, data: &[(u64, &[u8])]) -> Vec<u8> {
    let map: Vec<String> = data
        .iter()
        .map(|(o, d)| format!("{o},{}", d.len()))
        .collect();
    let (size_s, map_s) = (size.to_string(), map.join(","));
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([
        ("GNU.sparse.name", b"f".as_slice()),
        ("GNU.sparse.size", size_s.as_bytes()),
        ("GNU.sparse.map", map_s.as_bytes()),
    ])
    .unwrap();
    let stored: Vec<u8> = data.iter().flat_map(|(_, d)| d.iter().copied()).collect();
    let mut h = tar::Header::new_ustar();
    h.set_path("GNUSparseFile.0/f").unwrap();
    h.set_size(stored.len() as u64);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    b.append(&h, &stored[..]).unwrap();
    b.into_inner().unwrap()
}

/// Peak RSS of the children waited for so far, in bytes.
fn children_max_rss() -> u64 {
    let r = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN).unwrap();
    r.max_rss() as u64 * 1024
}

/// `img`'s file `/f` is `size` bytes with `data` at its offsets and zeros around them and at
/// sampled places elsewhere.
fn check_sparse(img: &Path, size: u64, data: &[(u64, &[u8])]) {
    let img = Image::open(img).unwrap();
    let ino = img.resolve(b"/f").unwrap();
    assert_eq!(img.attr(ino).unwrap().size, size);
    for &(off, d) in data {
        let at = off.saturating_sub(8);
        let mut buf = vec![1u8; (d.len() + 16).min((size - at) as usize)];
        img.read_at(ino, at, &mut buf).unwrap();
        let k = (off - at) as usize;
        assert_eq!(&buf[k..k + d.len()], d, "data at {off}");
        assert!(buf[..k].iter().chain(&buf[k + d.len()..]).all(|&b| b == 0));
    }
    for k in 1..64u64 {
        let at = size / 64 * k + 77;
        let mut buf = [1u8; 4096];
        let n = img.read_at(ino, at, &mut buf).unwrap();
        let hit = data
            .iter()
            .any(|&(o, d)| o < at + n as u64 && o + d.len() as u64 > at);
        assert!(hit || buf[..n].iter().all(|&b| b == 0), "zeros at {at}");
    }
}

/// Pack `src` (tar or directory) with the real `cimg`: it must finish within `limit`, its
/// peak RSS stay under `rss`, and the file `/f` read back as `DATA_AT` in a terabyte of zeros.
fn packs_sparse_terabyte(src: &Path, limit: Duration, rss: u64) {
    let out = src.with_extension("cimg");
    let t0 = Instant::now();
    let (status, err) = run(
        &["pack", src.to_str().unwrap(), out.to_str().unwrap()],
        limit,
    );
    let took = t0.elapsed();
    let status = status.unwrap_or_else(|| panic!("packing a sparse terabyte took over {limit:?}"));
    assert!(status.success(), "cimg pack failed: {err}");
    let peak = children_max_rss();
    assert!(
        peak < rss,
        "packing a sparse terabyte peaked at {} MiB of RSS (cap {} MiB)",
        peak >> 20,
        rss >> 20
    );
    eprintln!(
        "sparse terabyte packed in {took:?}, children's peak RSS {} MiB",
        peak >> 20
    );
    assert!(
        std::fs::metadata(&out).unwrap().len() < 16 << 20,
        "holes stored as data"
    );
    check_sparse(&out, TIB, &DATA_AT);
}

#[test]
fn a_sparse_file_larger_than_the_format_holds_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let tar = dir.path().join("big.tar");
    std::fs::write(&tar, sparse_tar(1 << 60, &[(0, b"hello")])).unwrap();
    assert!(std::fs::metadata(&tar).unwrap().len() < 10 << 10);
    let out = dir.path().join("big.cimg");
    let t0 = Instant::now();
    let (status, err) = run(
        &["pack", tar.to_str().unwrap(), out.to_str().unwrap()],
        DEADLINE,
    );
    let took = t0.elapsed();
    let status = status.expect("cimg pack of a 2^60-byte sparse file did not return");
    assert!(!status.success(), "a 2^60-byte file was packed");
    assert!(took < Duration::from_secs(1), "refusing took {took:?}");
    assert_eq!(err.lines().count(), 1, "not one line: {err:?}");
    assert!(
        err.contains("entry f") && err.contains("more than the largest file the format holds"),
        "unclear message: {err:?}"
    );
}

#[test]
fn a_sparse_terabyte_in_a_tar_packs_in_bounded_time_and_memory() {
    let dir = tempfile::tempdir().unwrap();
    let tar = dir.path().join("tb.tar");
    std::fs::write(&tar, sparse_tar(TIB, &DATA_AT)).unwrap();
    packs_sparse_terabyte(&tar, Duration::from_secs(10), 512 << 20);
}

#[test]
fn a_sparse_terabyte_in_a_directory_packs_in_bounded_time_and_memory() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("tree");
    std::fs::create_dir(&src).unwrap();
    let f = std::fs::File::create(src.join("f")).unwrap();
    if let Err(e) = f.set_len(TIB) {
        panic!(
            "{}: cannot make a 1 TiB sparse file here ({e}): run with TMPDIR on a filesystem \
             that allows it (ext4, xfs, btrfs, tmpfs)",
            src.display()
        );
    }
    for (off, d) in DATA_AT {
        std::os::unix::fs::FileExt::write_all_at(&f, d, off).unwrap();
    }
    drop(f);
    packs_sparse_terabyte(&src, Duration::from_secs(10), 512 << 20);
}
