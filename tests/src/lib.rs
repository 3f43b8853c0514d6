//! cimg-tests: end-to-end tests that drive the real binaries (`cimg`, `cimg-mount` and
//! `launch`). The tests live in `tests/tests/`; this library holds helpers shared by the
//! test suites of several crates (a dev-dependency of `launch` and `cimg-benches`).

use std::collections::BTreeSet;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A usrmerged tree of host programs under `root`: `/bin` and `/sbin` link to `usr/bin`,
/// `/lib` and `/lib64` to `usr/lib` and `usr/lib64`; each of `programs` (found on `PATH`) is
/// copied into `usr/bin` and every library `ldd` lists for them under `usr`. Enough to run
/// those programs in a container. Panics if a program is missing (a test needs it).
pub fn host_programs_tree(root: &Path, programs: &[&str]) {
    for d in ["usr/bin", "usr/lib", "usr/lib64"] {
        std::fs::create_dir_all(root.join(d)).expect("create the tree");
    }
    for (l, t) in [
        ("bin", "usr/bin"),
        ("sbin", "usr/bin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
    ] {
        symlink(t, root.join(l)).expect("link into usr");
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    let mut libs = BTreeSet::new();
    for p in programs {
        let src = std::env::split_paths(&path)
            .map(|d| d.join(p))
            .find(|c| c.is_file())
            .unwrap_or_else(|| panic!("the test needs {p} on the host"));
        std::fs::copy(&src, root.join("usr/bin").join(p)).expect("copy a program");
        let o = Command::new("ldd").arg(&src).output().expect("run ldd");
        for tok in String::from_utf8_lossy(&o.stdout).split_whitespace() {
            if tok.starts_with('/') {
                libs.insert(PathBuf::from(tok));
            }
        }
    }
    for l in libs {
        let rel = l.strip_prefix("/").expect("absolute");
        let dst = root
            .join("usr")
            .join(rel.strip_prefix("usr").unwrap_or(rel));
        std::fs::create_dir_all(dst.parent().expect("a parent")).expect("create a lib dir");
        std::fs::copy(&l, &dst).expect("copy a library");
    }
}

/// Run `cmd` (stdin and stdout closed, stderr piped) and wait for it at most `deadline`:
/// its exit status and standard error. Past the deadline it is killed and the test fails,
/// naming `what`, so a hang of the program under test cannot hang the suite.
pub fn run_within(
    cmd: &mut std::process::Command,
    deadline: std::time::Duration,
    what: &str,
) -> (std::process::ExitStatus, String) {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if t0.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} still ran after {deadline:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut err = String::new();
    let _ = child
        .stderr
        .take()
        .expect("piped stderr")
        .read_to_string(&mut err);
    (status, err)
}
