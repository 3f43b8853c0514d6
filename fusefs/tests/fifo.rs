//! `cimg-mount` given a FIFO as its image refuses it at once, in one line naming it, instead
//! of waiting forever in `open` for a writer. The child runs under a deadline and is killed
//! past it, so this test cannot hang the suite.

use std::process::Command;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(5);

#[test]
fn a_fifo_as_the_image_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("img.cimg");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    for fg in [false, true] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cimg-mount"));
        if fg {
            cmd.arg("--foreground");
        }
        let (status, err) = cimg_tests::run_within(
            cmd.arg(&fifo).arg(&mnt),
            DEADLINE,
            &format!("cimg-mount (foreground {fg}) on a fifo"),
        );
        assert!(!status.success(), "cimg-mount mounted a fifo");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "not one line: {err:?}");
        assert!(
            lines[0].starts_with("cimg-mount: ")
                && lines[0].contains(&*fifo.to_string_lossy())
                && lines[0].contains("not a regular file (a fifo)"),
            "the message does not name the fifo: {err:?}"
        );
    }
}
