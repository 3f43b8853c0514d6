//! Shared fixtures of the launcher's end-to-end tests: a small real root filesystem made
//! from the host's own programs and their libraries, packed into a `.cimg`, and helpers that
//! run the real `launch` binary (as root, or as an ordinary user in a private namespace).

#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

/// The launch binary under test.
pub const LAUNCH: &str = env!("CARGO_BIN_EXE_launch");

/// Programs copied into the test image (with the libraries they load).
const PROGRAMS: &[&str] = &[
    "sh", "cat", "id", "ls", "env", "sleep", "mknod", "touch", "stat", "mount", "readlink", "echo",
    "pwd", "true", "false", "kill", "setpriv", "grep", "head", "wc", "rm", "mkdir", "fincore",
];

/// Whether `tool` is on the PATH.
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether tests that need a capability must fail rather than skip.
pub fn ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// Probe what the launcher needs: root (the tests prepare namespaces and device nodes),
/// /dev/fuse and user namespaces. Outside CI a missing piece skips the test; in CI it fails.
pub fn capable() -> bool {
    let root = nix::unistd::geteuid().is_root();
    let fuse = Path::new("/dev/fuse").exists();
    let userns = Command::new("unshare")
        .args(["-Urm", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if root && fuse && userns {
        return true;
    }
    assert!(
        !ci(),
        "launch tests need root, /dev/fuse and user namespaces (root {root}, fuse {fuse}, userns {userns})"
    );
    eprintln!("skipping: needs root, /dev/fuse and user namespaces");
    false
}

/// The fixture: a root filesystem directory and its packed image, both readable by anyone.
/// It lives in a static, which is never dropped, so [`remove_after_exit`] removes it.
pub struct Fixture {
    /// The work directory (mode 0755).
    pub work: PathBuf,
    /// The root filesystem directory.
    pub rootfs: PathBuf,
    /// The packed image.
    pub image: PathBuf,
}

/// The shared fixture (made once per test binary).
pub fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let work = tempfile::Builder::new()
            .prefix("launch-test")
            .tempdir_in("/var/tmp")
            .unwrap()
            .keep();
        remove_after_exit(&work);
        fs::set_permissions(&work, fs::Permissions::from_mode(0o755)).unwrap();
        let rootfs = work.join("rootfs");
        make_rootfs(&rootfs);
        let image = work.join("img.cimg");
        pack(&rootfs, &image, None);
        Fixture {
            work,
            rootfs,
            image,
        }
    })
}

/// Remove `dir` once this test process has exited, however it ends (statics are never
/// dropped, and a panic or SIGKILL skips destructors anyway): a detached shell waits for
/// this process with `tail --pid` and then removes the directory.
fn remove_after_exit(dir: &Path) {
    Command::new("setsid")
        .args([
            "-f",
            "sh",
            "-c",
            r#"tail --pid="$1" -f /dev/null; rm -rf -- "$2""#,
            "sh",
        ])
        .arg(std::process::id().to_string())
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("start the fixture's cleaner (setsid, tail, rm)");
}

/// Pack `dir` into `out` (with `config` JSON stored as the image config).
pub fn pack(dir: &Path, out: &Path, config: Option<&str>) {
    let opts = cimg_format::PackOptions {
        level: 3,
        config: config.map(|c| c.as_bytes().to_vec()),
        ..Default::default()
    };
    cimg_format::writer::pack_dir(dir, out, &opts, &|_, _| {}).unwrap();
    fs::set_permissions(out, fs::Permissions::from_mode(0o644)).unwrap();
}

fn which(p: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(p))
        .find(|c| c.is_file())
}

/// A usrmerged root: /bin, /lib, /lib64, /sbin link into /usr; the programs above and every
/// library `ldd` lists for them; /etc with passwd, group, hosts, resolv.conf; the usual
/// mount points; a setuid-root copy of `id`.
pub fn make_rootfs(root: &Path) {
    for d in [
        "etc", "dev", "proc", "sys", "tmp", "home", "root", "mnt", "srv/work",
    ] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    cimg_tests::host_programs_tree(root, PROGRAMS);
    fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:image root:/root:/bin/sh\n",
    )
    .unwrap();
    fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
    fs::write(root.join("etc/hosts"), "127.0.0.1 image-hosts\n").unwrap();
    fs::write(root.join("etc/resolv.conf"), "# image\n").unwrap();
    fs::write(root.join("srv/work/marker"), "in the image\n").unwrap();
    fs::copy(root.join("usr/bin/id"), root.join("usr/bin/suid-id")).unwrap();
    fs::set_permissions(
        root.join("usr/bin/suid-id"),
        fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
}

/// The launch binary as a command, its image servers set to end with their last container
/// (`CIMG_LINGER=0`): a test's leftovers are then only what the launcher leaves. Tests of
/// the lingering itself set their own.
pub fn launch_cmd() -> Command {
    let mut c = Command::new(LAUNCH);
    c.env("CIMG_LINGER", "0");
    c
}

/// Run launch with `args` as root, stdin closed; its output.
pub fn launch(args: &[&str]) -> Output {
    launch_cmd()
        .args(args)
        .stdin(Stdio::null())
        .current_dir("/")
        .output()
        .unwrap()
}

/// Text of stdout.
pub fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Text of stderr.
pub fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exit code (panics if killed).
pub fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or_else(|| panic!("killed: {o:?}"))
}

/// Assert success and return stdout.
pub fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "launch failed: {o:?}\nstderr: {}",
        err(o)
    );
    out(o)
}

/// A shell script run as uid/gid 65534 with `--clear-groups`, in a private mount namespace
/// where `/dev/fuse` is a 0666 node (the host's may be 0600). `$LAUNCH` is the binary.
pub fn as_user(script: &str) -> Output {
    let f = fixture();
    let node = f.work.join(format!("fuse-{}", std::process::id()));
    let wrapper = format!(
        r#"set -e
[ -e '{node}' ] || mknod '{node}' c 10 229
chmod 666 '{node}'; mount --bind '{node}' /dev/fuse
cd /
exec setpriv --reuid 65534 --regid 65534 --clear-groups env LAUNCH='{launch}' CIMG_LINGER=0 sh -c "$0"
"#,
        node = node.display(),
        launch = LAUNCH,
    );
    Command::new("unshare")
        .args([
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            &wrapper,
            script,
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Processes whose command line mentions `needle` (other than this test process).
pub fn processes_with(needle: &str) -> Vec<String> {
    let me = std::process::id();
    let mut found = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Ok(cmd) = fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            let stat = fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            let zombie = stat.split(") ").nth(1).is_some_and(|s| s.starts_with('Z'));
            if cmd.contains(needle) && !zombie {
                found.push(format!("{pid}: {cmd}"));
            }
        }
    }
    found
}

/// Wait until `cond` holds (up to 10 s).
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let t = std::time::Instant::now();
    while !cond() {
        assert!(t.elapsed().as_secs() < 10, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The number of distinct mount namespaces (of the processes we can see) that hold a cimg
/// FUSE mount of `image`: the containers on it. An image server's own namespace (the holder
/// of a shared mount, where `cimg-server` and its `cimg-warm` run) is not a container and
/// is not counted; that nothing is left once it has gone, `processes_with` tells.
pub fn mounts_of(image: &Path) -> usize {
    let mut namespaces = std::collections::BTreeSet::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        if e.file_name().to_string_lossy().parse::<u32>().is_err() {
            continue;
        }
        let comm = fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if matches!(comm.trim(), "cimg-server" | "cimg-warm") {
            continue;
        }
        let (Ok(m), Ok(ns)) = (
            fs::read_to_string(e.path().join("mountinfo")),
            fs::read_link(e.path().join("ns/mnt")),
        ) else {
            continue;
        };
        if m.lines()
            .any(|l| l.contains("fuse.cimg") && l.contains(&*image.to_string_lossy()))
        {
            namespaces.insert(ns);
        }
    }
    namespaces.len()
}

/// A Python program run as uid/gid `uid` (an unused one, to play another user), stdout and
/// stderr piped. The system's Python: another user cannot run one under root's home (pyenv).
pub fn python_as(uid: u32, program: &str, args: &[&str]) -> std::process::Child {
    const PYTHON: &str = "/usr/bin/python3";
    assert!(
        have("setpriv") && Path::new(PYTHON).exists(),
        "needs setpriv (util-linux) and {PYTHON} (python3)"
    );
    let id = uid.to_string();
    Command::new("setpriv")
        .args(["--reuid", &id, "--regid", &id, "--clear-groups"])
        .args([PYTHON, "-c", program])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The first line `child` writes to its (piped) standard output.
pub fn first_line(child: &mut std::process::Child) -> String {
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().expect("piped stdout")),
        &mut line,
    )
    .unwrap();
    line
}
