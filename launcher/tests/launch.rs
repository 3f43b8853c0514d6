//! End-to-end tests of `launch`: the real binary, a real image under a real FUSE mount, real
//! user and mount namespaces; as root and as an ordinary user (uid 65534).

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn img() -> String {
    fixture().image.display().to_string()
}

#[test]
fn runs_a_command_with_its_status() {
    if !capable() {
        return;
    }
    let o = launch(&[&img(), "--", "sh", "-c", "echo hello; exit 7"]);
    assert_eq!(code(&o), 7);
    assert_eq!(out(&o), "hello\n");
    let o = launch(&[&img(), "--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(code(&o), 128 + 15);
    let o = launch(&[&img(), "--", "true"]);
    assert_eq!(code(&o), 0);
    // With speculative read-ahead on, the same bytes.
    let o = launch(&["--read-ahead", &img(), "--", "cat", "/srv/work/marker"]);
    assert_eq!(ok(&o), "in the image\n");
    assert!(err(&o).is_empty(), "{}", err(&o));
}

#[test]
fn signal_dispositions_are_the_callers() {
    if !capable() {
        return;
    }
    // SIGPIPE (signal 13, bit 12 of SigIgn) is not ignored in the container when the caller
    // does not ignore it: a writer into a closed pipe ends quietly, as on the host.
    let o = launch(&[
        &img(),
        "--",
        "sh",
        "-c",
        "cat /dev/zero | head -c 1 | wc -c; grep SigIgn /proc/self/status",
    ]);
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert!(err(&o).is_empty(), "{}", err(&o));
    let ign = |o: &std::process::Output| {
        let line = out(o)
            .lines()
            .find(|l| l.starts_with("SigIgn:"))
            .unwrap()
            .to_string();
        u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
    };
    assert_eq!(out(&o).lines().next(), Some("1"));
    assert_eq!(ign(&o) & (1 << 12), 0, "{}", out(&o));
    // A caller that ignores it (like nohup for SIGHUP) passes that on.
    let o = Command::new("sh")
        .args(["-c", "trap '' PIPE; exec \"$0\" \"$@\""])
        .arg(LAUNCH)
        .args([&img(), "--", "grep", "SigIgn", "/proc/self/status"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert_ne!(ign(&o) & (1 << 12), 0, "{}", out(&o));
}

#[test]
fn the_root_is_the_image_read_only_with_host_binds() {
    if !capable() {
        return;
    }
    let script = "cat /srv/work/marker; touch /new 2>&1; ls /proc/self/ns >/dev/null && echo proc; \
                  ls /dev/null /dev/fuse >/dev/null && echo dev; ls /sys/kernel >/dev/null && echo sys; \
                  cat /etc/hosts; echo $CIMG_RUNNING $CIMG_IMAGE";
    let s = ok(&launch(&[&img(), "--", "sh", "-c", script]));
    assert!(s.contains("in the image\n"), "{s}");
    assert!(s.contains("Read-only file system"), "{s}");
    assert!(s.contains("proc\ndev\nsys\n"), "{s}");
    // /etc/hosts is the host's, bound because both sides have one.
    assert_eq!(
        s.contains("image-hosts"),
        !Path::new("/etc/hosts").exists(),
        "{s}"
    );
    assert!(s.trim_end().ends_with(&format!("1 {}", img())), "{s}");
}

#[test]
fn host_tmp_is_shared_unless_private() {
    if !capable() {
        return;
    }
    let host = tempfile::tempdir_in("/tmp").unwrap();
    fs::write(host.path().join("f"), "from the host").unwrap();
    let p = host.path().join("f").display().to_string();
    assert_eq!(ok(&launch(&[&img(), "--", "cat", &p])), "from the host");
    let o = launch(&[
        "-t",
        &img(),
        "--",
        "sh",
        "-c",
        &format!("ls -A /tmp; cat {p}"),
    ]);
    assert_ne!(code(&o), 0);
    assert_eq!(out(&o), "", "private /tmp is empty");
    // Written from the container, seen on the host.
    let w = host.path().join("w").display().to_string();
    ok(&launch(&[
        &img(),
        "--",
        "sh",
        "-c",
        &format!("echo x > {w}"),
    ]));
    assert_eq!(fs::read_to_string(&w).unwrap(), "x\n");
}

#[test]
fn namespaces_differ_and_privileges_are_gone() {
    if !capable() {
        return;
    }
    let host_user = fs::read_link("/proc/self/ns/user").unwrap();
    let host_mnt = fs::read_link("/proc/self/ns/mnt").unwrap();
    let s = ok(&launch(&[
        &img(),
        "--",
        "sh",
        "-c",
        "readlink /proc/self/ns/user /proc/self/ns/mnt; mount -t tmpfs none /mnt 2>/dev/null && echo MOUNTED; \
         mknod /tmp/cimg-test-node c 1 3 2>/dev/null && echo MKNOD; grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status",
    ]));
    let lines: Vec<&str> = s.lines().collect();
    assert_ne!(Path::new(lines[0]), host_user);
    assert_ne!(Path::new(lines[1]), host_mnt);
    assert!(!s.contains("MOUNTED") && !s.contains("MKNOD"), "{s}");
    assert!(s.contains("CapEff:\t0000000000000000"), "{s}");
    assert!(s.contains("CapBnd:\t0000000000000000"), "{s}");
    assert!(s.contains("NoNewPrivs:\t1"), "{s}");
}

#[test]
fn as_an_ordinary_user() {
    if !capable() {
        return;
    }
    let script = format!(
        r#"set -e
"$LAUNCH" '{img}' -- sh -c 'id -u; id -g; id -un; readlink /proc/self/ns/user; suid-id -u; touch /x 2>&1 || true; mount -t tmpfs none /mnt 2>&1 || true; setpriv --reuid 0 true 2>&1 || true; cat /srv/work/marker'
echo host $(readlink /proc/self/ns/user)
"$LAUNCH" -W '{img}' -- sh -c 'touch /x && echo wrote; id -u'
set +e; "$LAUNCH" '{img}' -- false; echo status $?
"#,
        img = img()
    );
    let o = as_user(&script);
    let s = ok(&o);
    let lines: Vec<&str> = s.lines().collect();
    assert_eq!(&lines[..3], ["65534", "65534", "nobody"], "{s}");
    let host_ns = s.lines().find_map(|l| l.strip_prefix("host ")).unwrap();
    assert_ne!(lines[3], host_ns, "user namespace differs");
    assert_eq!(lines[4], "65534", "setuid bit ignored: {s}");
    assert!(s.contains("Read-only file system"), "{s}");
    assert!(s.contains("in the image"), "{s}");
    assert!(
        s.contains("mount: /mnt: must be superuser")
            || s.contains("mount: /mnt: permission denied")
            || s.contains("Operation not permitted"),
        "{s}"
    );
    assert!(s.contains("wrote\n65534\n"), "{s}");
    assert!(s.contains("status 1"), "{s}");
}

/// The command's shared libraries are in the kernel's page cache before it faults them in:
/// the FUSE server reads them ahead through launch's descriptor of the mount (which lives in
/// a mount namespace the server is not in), as root and as an ordinary user. The programs
/// run here touch only part of libc (about 88% of its pages without the read-ahead). The
/// helper that reads ahead is gone by then, not left a zombie. The server skips all
/// prefetching while more tasks are runnable than twice the cores plus two,
/// which other tests running at the same time can cause: each case gets several tries.
#[test]
fn the_command_s_libraries_are_read_ahead() {
    if !capable() {
        return;
    }
    let check = r#"sleep 0.5; for f in /usr/lib/*/libc.so.6 /usr/lib64/libc.so.6; do [ -f "$f" ] && fincore --bytes --noheadings --output RES,SIZE "$f"; done; for d in /proc/[0-9]*; do read -r p c st pp rest < $d/stat 2>/dev/null && [ "$c" = "(cimg-warm)" ] && [ "$st" = Z ] && [ "$pp" != 1 ] && echo "helper left: $p $c $st $pp"; done; true"#;
    let all_resident = |o: &std::process::Output| {
        let s = ok(o);
        // The helper is done with a few MiB long before, and its server has reaped it: no
        // zombie helper whose server lives. (A helper whose server died first, as when a
        // test SIGKILLs one, is reaped by init: its zombie, parent 1, may linger here.)
        assert!(!s.contains("helper left"), "{s}");
        let nums: Vec<u64> = s
            .split_whitespace()
            .map(|n| n.parse().expect("fincore's numbers"))
            .collect();
        assert_eq!(nums.len(), 2, "one libc.so.6: {s}");
        eprintln!("libc: {} of {} bytes resident", nums[0], nums[1]);
        nums[0] >= nums[1] / 4096 * 4096
    };
    let as_root = || launch(&[&img(), "--", "sh", "-c", check]);
    let as_nobody = || as_user(&format!(r#""$LAUNCH" '{}' -- sh -c '{check}'"#, img()));
    for (who, run) in [
        ("root", &as_root as &dyn Fn() -> std::process::Output),
        ("an ordinary user", &as_nobody),
    ] {
        assert!(
            (0..20).any(|_| all_resident(&run())),
            "libc never all resident in 20 runs as {who}"
        );
    }
}

/// A setup error right after the FUSE server started makes launch SIGKILL the server while
/// its read-ahead helper is at work: launch still ends at once, every time. (When the server
/// itself read ahead, a thread of the killed server could wait forever for its own FLUSH,
/// and launch with it: this test's `binds` case hung once in four runs.)
#[test]
fn killing_the_server_during_its_read_ahead_never_hangs() {
    if !capable() {
        return;
    }
    let src = fixture().work.join("bind-src");
    fs::write(&src, "x").unwrap();
    let bind = format!("{}:/not/in/image", src.display());
    for i in 0..30 {
        let mut child = launch_cmd()
            .args(["-b", &bind, &img(), "--", "true"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let start = std::time::Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                panic!("launch hung after a setup error (try {i})");
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        assert!(!status.success(), "a bind outside the image fails");
    }
}

#[test]
fn uid_and_gid_options_and_passwd() {
    if !capable() {
        return;
    }
    let s = ok(&launch(&[
        "-u",
        "1234",
        "-g",
        "567",
        &img(),
        "--",
        "sh",
        "-c",
        "id -u; id -g; cat /etc/passwd /etc/group",
    ]));
    assert!(s.starts_with("1234\n567\n"), "{s}");
    assert!(s.contains(":x:1234:567:"), "{s}");
    assert!(s.contains(":x:567:"), "{s}");
    assert!(!s.contains("image root"), "{s}");
    let s = ok(&launch(&[
        "--no-passwd",
        &img(),
        "--",
        "cat",
        "/etc/passwd",
    ]));
    assert_eq!(s, "root:x:0:0:image root:/root:/bin/sh\n");
}

#[test]
fn binds() {
    if !capable() {
        return;
    }
    let f = fixture();
    let d = tempfile::tempdir_in(&f.work).unwrap();
    fs::write(d.path().join("data"), "bound").unwrap();
    let file = d.path().join("data").display().to_string();
    let dir = d.path().display().to_string();
    // Directory at another path; a file onto a file; the default destination needs the path
    // to exist in the image.
    let s = ok(&launch(&[
        "-b",
        &format!("{dir}:/mnt"),
        "-b",
        &format!("{file}:/etc/resolv.conf"),
        &img(),
        "--",
        "sh",
        "-c",
        "cat /mnt/data; echo; cat /etc/resolv.conf; echo w > /mnt/written",
    ]));
    assert_eq!(s, "bound\nbound");
    assert_eq!(fs::read_to_string(d.path().join("written")).unwrap(), "w\n");
    // Missing source, missing destination, destination above the root.
    let o = launch(&["-b", "/nonexistent-src", &img(), "--", "true"]);
    assert_eq!(code(&o), 123);
    assert_eq!(
        err(&o),
        "launch: --bind /nonexistent-src: no such file or directory\n"
    );
    let o = launch(&["-b", &format!("{dir}:/not/in/image"), &img(), "--", "true"]);
    assert_eq!(code(&o), 123);
    assert!(
        err(&o).contains("/not/in/image does not exist in the image"),
        "{}",
        err(&o)
    );
    let o = launch(&["-b", &format!("{dir}:/../../etc"), &img(), "--", "true"]);
    assert_eq!(code(&o), 123);
    assert!(err(&o).contains("inside the image"), "{}", err(&o));
    // A symlink in the image cannot send a bind outside: /lib64 → usr/lib64 stays inside.
    let s = ok(&launch(&[
        "-b",
        &format!("{dir}:/lib64/sub"),
        "-W",
        &img(),
        "--",
        "cat",
        "/usr/lib64/sub/data",
    ]));
    assert_eq!(s, "bound");
    // -W creates missing destinations, and the image file is untouched.
    let before = fs::read(&f.image).unwrap();
    let s = ok(&launch(&[
        "-W",
        "-b",
        &format!("{dir}:/new/place"),
        "-b",
        &format!("{file}:/new/file"),
        &img(),
        "--",
        "sh",
        "-c",
        "cat /new/place/data /new/file; echo y > /etc/passwd; cat /etc/passwd; mkdir /made",
    ]));
    assert_eq!(s, "boundboundy\n");
    assert_eq!(fs::read(&f.image).unwrap(), before);
}

#[test]
fn working_directory() {
    if !capable() {
        return;
    }
    assert_eq!(
        ok(&launch(&["-c", "/srv/work", &img(), "--", "pwd"])),
        "/srv/work\n"
    );
    let o = launch(&["-c", "/nope", &img(), "--", "pwd"]);
    assert_eq!(code(&o), 123);
    assert!(err(&o).contains("--cd /nope"), "{}", err(&o));
    // The host's current directory when the container has it, else /.
    let o = launch_cmd()
        .args([&img(), "--", "pwd"])
        .current_dir("/srv")
        .output()
        .unwrap();
    let expect = if Path::new("/srv").exists() {
        "/srv\n"
    } else {
        "/\n"
    };
    assert_eq!(ok(&o), expect);
    let o = launch_cmd()
        .args([&img(), "--", "pwd"])
        .current_dir(&fixture().work)
        .output()
        .unwrap();
    assert_eq!(ok(&o), "/\n");
}

#[test]
fn environment_in_command_line_order() {
    if !capable() {
        return;
    }
    let f = fixture();
    let envfile = f.work.join(format!("env-{}", std::process::id()));
    fs::write(
        &envfile,
        "# vars\nFROM_FILE='$literal'\nEXPANDED=${HOSTVAR}-x\n\nQUOTED=\"a b\"\n",
    )
    .unwrap();
    let o = launch_cmd()
        .env("HOSTVAR", "h")
        .env("DROP_ME_1", "1")
        .env("DROP_ME_2", "2")
        .args([
            "--unset-env=DROP_*",
            "--set-env=DROP_ME_3=3",
            &format!("--set-env={}", envfile.display()),
            "--set-env=LATE=1",
            "--unset-env=LATE",
            &img(),
            "--",
            "env",
        ])
        .output()
        .unwrap();
    let s = ok(&o);
    let has = |kv: &str| s.lines().any(|l| l == kv);
    assert!(
        has("HOSTVAR=h") && has("DROP_ME_3=3") && has("FROM_FILE=$literal"),
        "{s}"
    );
    assert!(
        has("EXPANDED=h-x") && has("QUOTED=a b") && has("CIMG_RUNNING=1"),
        "{s}"
    );
    assert!(
        !s.contains("DROP_ME_1") && !s.contains("DROP_ME_2") && !s.contains("LATE="),
        "{s}"
    );
    let o = launch(&["--set-env=/no/such/file", &img(), "--", "true"]);
    assert_eq!(code(&o), 123);
    assert!(
        err(&o).starts_with("launch: --set-env /no/such/file: "),
        "{}",
        err(&o)
    );
    fs::remove_file(envfile).unwrap();
}

#[test]
fn image_config_env_and_workdir() {
    if !capable() {
        return;
    }
    let f = fixture();
    let img = f.work.join(format!("cfg-{}.cimg", std::process::id()));
    pack(
        &f.rootfs,
        &img,
        Some(r#"{"Env":["PATH=/usr/bin:/bin","IMG_VAR=from config"],"WorkingDir":"/srv/work"}"#),
    );
    let i = img.display().to_string();
    let s = ok(&launch(&[
        "--set-env",
        &i,
        "--",
        "sh",
        "-c",
        "pwd; echo $IMG_VAR",
    ]));
    assert_eq!(s, "/srv/work\nfrom config\n");
    // Without --set-env the image's Env is not applied; --cd wins over WorkingDir.
    let s = ok(&launch(&[
        "-c",
        "/",
        &i,
        "--",
        "sh",
        "-c",
        "pwd; echo \"[$IMG_VAR]\"",
    ]));
    assert_eq!(s, "/\n[]\n");
    // A directory image with /ch/environment.
    let dir = f.work.join(format!("dirimg-{}", std::process::id()));
    let o = Command::new("cp")
        .args(["-a"])
        .arg(&f.rootfs)
        .arg(&dir)
        .status()
        .unwrap();
    assert!(o.success());
    fs::create_dir(dir.join("ch")).unwrap();
    fs::write(dir.join("ch/environment"), "CH_VAR=from ch\n").unwrap();
    let d = dir.display().to_string();
    let s = ok(&launch(&[
        "--set-env",
        &d,
        "--",
        "sh",
        "-c",
        "echo $CH_VAR; touch /x 2>&1; true",
    ]));
    assert!(
        s.starts_with("from ch\n") && s.contains("Read-only file system"),
        "{s}"
    );
    fs::remove_dir_all(&dir).unwrap();
    fs::remove_file(&img).unwrap();
}

#[test]
fn home_option() {
    if !capable() {
        return;
    }
    let f = fixture();
    let home = tempfile::tempdir_in(&f.work).unwrap();
    fs::write(home.path().join("dotfile"), "mine").unwrap();
    let o = launch_cmd()
        .env("HOME", home.path())
        .env("USER", "root")
        .args([
            "--home",
            &img(),
            "--",
            "sh",
            "-c",
            "echo $HOME; cat $HOME/dotfile",
        ])
        .output()
        .unwrap();
    let s = ok(&o);
    let user = nix::unistd::User::from_uid(nix::unistd::getuid())
        .unwrap()
        .unwrap()
        .name;
    assert_eq!(s, format!("/home/{user}\nmine"));
}

#[test]
fn errors_are_one_line_with_documented_codes() {
    if !capable() {
        return;
    }
    let o = launch(&["--bogus", &img(), "--", "true"]);
    assert_eq!(code(&o), 2);
    let o = launch(&[&img()]);
    assert_eq!(code(&o), 2);
    let o = launch(&["/no/such.cimg", "--", "true"]);
    assert_eq!(
        (code(&o), err(&o)),
        (
            120,
            "launch: /no/such.cimg: no such file or directory\n".into()
        )
    );
    let o = launch(&["/etc/hostname", "--", "true"]);
    assert_eq!(code(&o), 120);
    assert_eq!(err(&o).lines().count(), 1, "{}", err(&o));
    let o = launch(&[&img(), "--", "no-such-command"]);
    assert_eq!(
        (code(&o), err(&o)),
        (
            127,
            "launch: no-such-command: command not found in the container\n".into()
        )
    );
    let o = launch(&[&img(), "--", "/etc/passwd"]);
    assert_eq!(code(&o), 126);
    // No /dev/fuse.
    let o = Command::new("unshare")
        .args([
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            &format!(
                "mount --bind /dev/null /dev/fuse && exec '{LAUNCH}' '{}' -- true",
                img()
            ),
        ])
        .output()
        .unwrap();
    assert_eq!(code(&o), 122, "{}", err(&o));
    assert!(
        err(&o).starts_with("launch: cannot open /dev/fuse")
            || err(&o).starts_with("launch: cannot mount"),
        "{}",
        err(&o)
    );
    // User namespaces disabled (in a user namespace of our own, so the host is untouched).
    let o = Command::new("unshare")
        .args([
            "-U",
            "-r",
            "sh",
            "-c",
            &format!(
                "echo 0 > /proc/sys/user/max_user_namespaces && exec '{LAUNCH}' '{}' -- true",
                img()
            ),
        ])
        .output()
        .unwrap();
    assert_eq!(code(&o), 121, "{}", err(&o));
    assert!(
        err(&o).starts_with("launch: cannot create a user namespace: "),
        "{}",
        err(&o)
    );
    // --version and --help.
    let o = launch(&["--version"]);
    assert!(ok(&o).starts_with("launch "));
    let o = launch(&["--help"]);
    assert!(ok(&o).contains("--write-fake") && out(&o).contains("127 command not found"));
}

#[test]
fn refuses_to_run_setuid() {
    if !capable() {
        return;
    }
    let f = fixture();
    let copy = f.work.join(format!("launch-suid-{}", std::process::id()));
    fs::copy(LAUNCH, &copy).unwrap();
    fs::set_permissions(&copy, fs::Permissions::from_mode(0o4755)).unwrap();
    // Another test thread forking while the copy was open for writing can hold it a moment
    // (ETXTBSY until that child execs): retry.
    let o = (0..100)
        .find_map(
            |_| match Command::new(&copy).args([&img(), "--", "true"]).output() {
                Err(e) if e.raw_os_error() == Some(nix::libc::ETXTBSY) => {
                    std::thread::sleep(Duration::from_millis(10));
                    None
                }
                r => Some(r.unwrap()),
            },
        )
        .expect("the copy stayed busy");
    assert_eq!(code(&o), 125);
    assert!(err(&o).contains("refusing to run setuid"), "{}", err(&o));
    fs::remove_file(copy).unwrap();
}

#[test]
fn signals_reach_the_app() {
    if !capable() {
        return;
    }
    for (sig, num) in [
        ("INT", 2),
        ("TERM", 15),
        ("HUP", 1),
        ("USR1", 10),
        ("USR2", 12),
    ] {
        let script = format!(
            "trap 'echo got {sig}; exit {num}' {sig}; echo ready; while :; do sleep 0.05; done"
        );
        // (A shell cannot trap a signal ignored when it started: the caller's dispositions,
        // e.g. under nohup, are reset for launch and so for the app.)
        let mut child = Command::new("env")
            .arg(format!("--default-signal={sig}"))
            .args([LAUNCH, &img(), "--", "sh", "-c", &script])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut buf = [0u8; 6];
        std::io::Read::read_exact(&mut stdout, &mut buf).unwrap();
        assert_eq!(&buf, b"ready\n");
        Command::new("kill")
            .args([&format!("-{sig}"), &child.id().to_string()])
            .status()
            .unwrap();
        let st = child.wait().unwrap();
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
        assert_eq!(rest, format!("got {sig}\n"));
        assert_eq!(st.code(), Some(num), "{sig}");
    }
}

#[test]
fn a_daemon_outlives_the_app_and_then_everything_goes() {
    if !capable() {
        return;
    }
    let (img, i) = private_image("daemon");
    let host = tempfile::tempdir_in("/tmp").unwrap();
    let out_file = host.path().join("daemon-out").display().to_string();
    let go = host.path().join("go").display().to_string();
    // The daemon waits for a go signal, then reads the image and writes to the host's /tmp.
    let script = format!(
        "(while [ ! -e {go} ]; do sleep 0.02; done; cat /srv/work/marker > {out_file}) >/dev/null 2>&1 & exit 0"
    );
    let o = launch(&[&i, "--", "sh", "-c", &script]);
    assert_eq!(code(&o), 0);
    // launch has exited; the daemon's container still has its mount and server.
    assert_eq!(mounts_of(&img), 1);
    assert!(!processes_with(&i).is_empty());
    fs::write(&go, "").unwrap();
    wait_until("the daemon's output", || {
        Path::new(&out_file).exists() && fs::read(&out_file).unwrap().len() == 13
    });
    assert_eq!(fs::read_to_string(&out_file).unwrap(), "in the image\n");
    // When the daemon ends, the container goes: no mount, no server.
    wait_until("the server to exit", || processes_with(&i).is_empty());
    assert_eq!(mounts_of(&img), 0);
    fs::remove_file(&img).unwrap();
}

/// A private copy of the test image, named after `tag`, so that counting its mounts and
/// servers is unambiguous: its path, and the path as a string.
fn private_image(tag: &str) -> (PathBuf, String) {
    let f = fixture();
    let img = f.work.join(format!("{tag}-{}.cimg", std::process::id()));
    fs::copy(&f.image, &img).unwrap();
    let i = img.display().to_string();
    (img, i)
}

/// The server holds the container's mount namespace until launch has exited (so that the
/// namespace's end is not part of launch's exit) and then lets it go: after a plain run, the
/// server ends and no mount of the image is left.
#[test]
fn after_a_run_the_server_lets_the_container_go() {
    if !capable() {
        return;
    }
    let (_, i) = private_image("plain");
    let o = launch(&[&i, "--", "true"]);
    assert_eq!(code(&o), 0, "{o:?}");
    gone(&i);
}

/// Start `sleep` in a container of a private copy of the image; returns (launch child, the
/// app's pid, the server's pid, image path).
fn sleeping_container(tag: &str) -> (std::process::Child, u32, u32, String) {
    running_container(tag, "echo $$; exec sleep 30")
}

/// A container running `script` (which first prints its pid) on a copy of the image:
/// (launch, the app's pid, the server's pid, the image copy).
fn running_container(tag: &str, script: &str) -> (std::process::Child, u32, u32, String) {
    let (_, i) = private_image(tag);
    let mut child = launch_cmd()
        .args([&i, "--", "sh", "-c", script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    let launch_pid = child.id();
    let app: u32 = line.trim().parse().unwrap();
    // The app's pid as seen from here is its pid (no pid namespace); the server is the other
    // process mentioning the image.
    let mut server = 0;
    wait_until("the server", || {
        server = processes_with(&i)
            .iter()
            .filter_map(|l| l.split(':').next()?.parse::<u32>().ok())
            .find(|&p| p != launch_pid && p != app)
            .unwrap_or(0);
        server != 0
    });
    (child, app, server, i)
}

fn gone(i: &str) {
    wait_until("no process of the container", || {
        processes_with(i).is_empty()
    });
    assert_eq!(mounts_of(Path::new(i)), 0);
    fs::remove_file(i).unwrap();
}

#[test]
fn sigkill_of_launch_leaves_nothing() {
    if !capable() {
        return;
    }
    let (mut child, app, _server, i) = sleeping_container("kill-launch");
    child.kill().unwrap();
    child.wait().unwrap();
    wait_until("the app to die", || {
        !Path::new(&format!("/proc/{app}")).exists() || processes_with(&i).is_empty()
    });
    gone(&i);
}

#[test]
fn sigkill_of_the_app_leaves_nothing() {
    if !capable() {
        return;
    }
    let (mut child, app, _server, i) = sleeping_container("kill-app");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(app as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(128 + 9));
    gone(&i);
}

#[test]
fn sigkill_of_the_server_leaves_nothing() {
    if !capable() {
        return;
    }
    let (mut child, _app, server, i) = sleeping_container("kill-server");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(125));
    gone(&i);
}

/// The server dies while the app's requests are in flight (each new name is a lookup that
/// reaches it): they must fail, not wait forever for an answer (launch held a second
/// /dev/fuse fd, which kept the connection alive and the app unkillable in D state).
#[test]
fn sigkill_of_the_server_during_requests_leaves_nothing() {
    if !capable() {
        return;
    }
    for round in 0..3 {
        let (mut child, _app, server, i) = running_container(
            &format!("kill-busy-server-{round}"),
            "echo $$; i=0; while :; do i=$((i+1)); test -e /nx$i; done",
        );
        std::thread::sleep(Duration::from_millis(100));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(server as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let t = std::time::Instant::now();
        let st = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "launch still waits 20 s after the server was killed"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(st.code(), Some(125));
        gone(&i);
    }
}

#[test]
fn record_hot_writes_the_files_read() {
    if !capable() {
        return;
    }
    let f = fixture();
    let hot = f.work.join(format!("hot-{}.txt", std::process::id()));
    let h = hot.display().to_string();
    ok(&launch(&[
        "--record-hot",
        &h,
        &img(),
        "--",
        "cat",
        "/srv/work/marker",
    ]));
    wait_until("the hot list", || hot.exists());
    let text = fs::read_to_string(&hot).unwrap();
    assert!(
        text.lines()
            .any(|l| l == "srv/work/marker" || l == "/srv/work/marker"),
        "{text}"
    );
    fs::remove_file(hot).unwrap();
}

#[test]
fn verbose_and_quiet() {
    if !capable() {
        return;
    }
    let o = launch(&["-v", &img(), "--", "true"]);
    assert!(
        err(&o).contains("launch: [") && err(&o).contains("exec'd true"),
        "{}",
        err(&o)
    );
    let o = launch(&["-q", &img(), "--", "true"]);
    assert_eq!(err(&o), "");
}

/// `launch` loads no `libgcc_s` (build.rs links the static unwinder): one library less per
/// start of every rank.
#[test]
fn launch_needs_only_libc() {
    let o = Command::new("readelf")
        .args(["--dynamic", env!("CARGO_BIN_EXE_launch")])
        .output()
        .expect("run readelf (binutils)");
    assert!(o.status.success(), "{o:?}");
    let text = String::from_utf8_lossy(&o.stdout);
    let needed: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| l.split('[').nth(1)?.split(']').next())
        .collect();
    assert!(needed.contains(&"libc.so.6"), "{text}");
    assert!(
        !needed.iter().any(|n| n.starts_with("libgcc_s")),
        "{needed:?}"
    );
}
