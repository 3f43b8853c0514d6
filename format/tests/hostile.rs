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
