//! `launch` given a FIFO as its image refuses it at once, in one line naming it, instead of
//! waiting forever in `open` for a writer. The child runs under a deadline and is killed past
//! it, so this test cannot hang the suite.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(5);

#[test]
fn a_fifo_as_the_image_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("img.cimg");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_launch"))
        .arg(&fifo)
        .args(["--", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn launch");
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("launch still ran after {DEADLINE:?} on a fifo");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!status.success(), "launch ran a fifo");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "not one line: {err:?}");
    assert!(
        lines[0].starts_with("launch: ")
            && lines[0].contains(&*fifo.to_string_lossy())
            && lines[0].contains("(a fifo)"),
        "the message does not name the fifo: {err:?}"
    );
}
