//! End-to-end tests of the launcher's defences, each written against a way in that once
//! worked: host kernel settings written from a container run by root, a FUSE server killed
//! while the container is being set up, and an exec whose failure named the wrong cause.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn img() -> String {
    fixture().image.display().to_string()
}

/// A container run by the real root (uid 0 inside is uid 0 outside) cannot write the host's
/// kernel settings: `/proc/sys`, `/proc/sysrq-trigger` and all of `/sys` (its submounts
/// too) are read-only, while reading them still works. Each write only opens the file
/// (`: >` writes nothing), so a failure of this test changes no setting.
#[test]
fn a_container_run_by_root_cannot_write_host_kernel_settings() {
    if !capable() {
        return;
    }
    for file in [
        "/proc/sys/kernel/core_pattern",
        "/proc/sys/vm/overcommit_memory",
        "/proc/sysrq-trigger",
        "/sys/kernel/mm/transparent_hugepage/enabled",
    ] {
        if !Path::new(file).exists() {
            continue;
        }
        let o = launch(&[&img(), "--", "sh", "-c", &format!(": > {file}")]);
        assert_ne!(code(&o), 0, "{file} was writable from the container");
        assert!(
            err(&o).contains("Read-only file system"),
            "{file}: {}",
            err(&o)
        );
    }
    // A submount of /sys (cgroup2 here) is read-only too.
    let o = launch(&[&img(), "--", "sh", "-c", "mkdir /sys/fs/cgroup/cimg-test"]);
    assert_ne!(code(&o), 0);
    assert!(err(&o).contains("Read-only file system"), "{}", err(&o));
    assert!(!Path::new("/sys/fs/cgroup/cimg-test").exists());
    // Reading is unchanged.
    let o = launch(&[&img(), "--", "cat", "/proc/sys/kernel/ostype"]);
    assert_eq!(ok(&o), "Linux\n");
}

/// Killing the FUSE server at any moment of a launch's start ends the launch with the
/// documented status of a dead server, 125, or (killed too late to matter) the command's
/// own 0: never the status of whichever set-up step met the dead mount first (122 for the
/// mount, 123 for a bind, 126/127 for the exec of the command through it). For a private
/// mount's server and for the image's shared server alike.
#[test]
fn killing_the_server_during_start_up_gives_125() {
    if !capable() {
        return;
    }
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let image = dir.path().join("kill-start.cimg");
    fs::copy(&fixture().image, &image).unwrap();
    let image = image.display().to_string();
    for private in [true, false] {
        let mut seen = std::collections::BTreeMap::new();
        for round in 0..40u64 {
            let mut args = vec![image.as_str(), "--", "sh", "-c", "cat /srv/work/marker"];
            if private {
                args.insert(0, "--private");
            }
            let mut child = launch_cmd()
                .args(&args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            // Kill the server as soon as it shows, after a delay that walks through the
            // start-up. It is the process other than launch that names the image.
            let delay = Duration::from_micros(round % 10 * 700);
            let t = Instant::now();
            let mut server = None;
            while server.is_none() && t.elapsed() < Duration::from_secs(5) {
                server = processes_with(&image)
                    .iter()
                    .filter_map(|l| l.split(':').next()?.parse::<u32>().ok())
                    .find(|&p| p != child.id());
                if server.is_none() && child.try_wait().unwrap().is_some() {
                    break;
                }
            }
            std::thread::sleep(delay);
            if let Some(s) = server {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(s as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let o = child.wait_with_output().unwrap();
            let c = code(&o);
            assert!(
                c == 0 || c == 125,
                "private {private}, round {round}: exit {c}, stderr: {}",
                err(&o)
            );
            *seen.entry(c).or_insert(0) += 1;
            wait_until("no process of the image", || {
                processes_with(&image).is_empty()
            });
        }
        // The kills landed inside the start-up at least once (else the test proved nothing).
        assert!(
            seen.get(&125).is_some_and(|&n| n > 0),
            "private {private}: {seen:?}"
        );
    }
}

/// A copy of the fixture's root filesystem, as a directory image, with `extra` added.
fn rootfs_with(extra: &[(&str, Vec<u8>, u32)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let st = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", fixture().rootfs.display()))
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(st.success());
    for (name, data, mode) in extra {
        let p = dir.path().join(name.trim_start_matches('/'));
        fs::write(&p, data).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).unwrap();
    }
    dir
}

/// `true`'s bytes with its ELF interpreter renamed (same length) to one that does not exist.
fn with_missing_interpreter() -> (Vec<u8>, String) {
    let bytes = fs::read(fixture().rootfs.join("usr/bin/true")).unwrap();
    let interp = b"ld-linux";
    let at = bytes
        .windows(interp.len())
        .position(|w| w == interp)
        .expect("the host's true names ld-linux as its interpreter");
    let mut patched = bytes.clone();
    patched[at..at + interp.len()].copy_from_slice(b"ld-nowhr");
    // The interpreter's path is the run of printable bytes around it (`.interp`, NUL-ended).
    let printable = |c: &u8| (0x21..0x7f).contains(c);
    let end = at + bytes[at..].iter().position(|c| !printable(c)).unwrap();
    let start = bytes[..at].iter().rposition(|c| !printable(c)).unwrap() + 1;
    let name = String::from_utf8_lossy(&patched[start..end]).into_owned();
    (patched, name)
}

/// A program that exists but whose interpreter does not is not "not found": the error
/// names the missing interpreter, for an ELF file's dynamic loader and a script's `#!`.
#[test]
fn a_missing_interpreter_is_named() {
    if !capable() {
        return;
    }
    let (elf, loader) = with_missing_interpreter();
    let root = rootfs_with(&[
        ("/usr/bin/orphan", elf, 0o755),
        (
            "/usr/bin/script",
            b"#!/opt/none/python\nprint(1)\n".to_vec(),
            0o755,
        ),
    ]);
    let r = root.path().display().to_string();
    let o = launch(&[&r, "--", "orphan"]);
    assert_eq!(code(&o), 127);
    assert_eq!(
        err(&o),
        format!(
            "launch: cannot execute /usr/bin/orphan: its interpreter {loader} is not in the container\n"
        )
    );
    let o = launch(&[&r, "--", "/usr/bin/script"]);
    assert_eq!(code(&o), 127);
    assert!(
        err(&o).contains("its interpreter /opt/none/python is not"),
        "{}",
        err(&o)
    );
    // A command that is not there at all is still "not found".
    let o = launch(&[&r, "--", "no-such-command"]);
    assert_eq!(code(&o), 127);
    assert!(
        err(&o).contains("no-such-command: command not found"),
        "{}",
        err(&o)
    );
}
