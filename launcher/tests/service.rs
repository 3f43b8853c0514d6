//! End-to-end tests of the image service: launches of one image by one user share one FUSE
//! server and mount, each in a container of its own; the server lingers, then leaves
//! nothing; it serves only its user; its faults never hang or break a launch.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The tests of this file, one at a time: `--stop-all` ends every server of the user,
/// another test's too, and the timing of a linger must not be cut short by it.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A private copy of the test image in a directory of its own (removed on drop), so that its
/// servers and processes are this test's alone.
struct Image {
    dir: tempfile::TempDir,
    path: String,
}

impl Image {
    fn new(tag: &str) -> Image {
        let dir = tempfile::Builder::new()
            .prefix(tag)
            .tempdir_in("/var/tmp")
            .unwrap();
        let p = dir.path().join("img.cimg");
        fs::copy(&fixture().image, &p).unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        Image {
            path: p.display().to_string(),
            dir,
        }
    }

    /// Launch `script` in a container of this image, lingering `linger`.
    fn run(&self, linger: &str, args: &[&str], script: &str) -> Output {
        self.spawn(linger, args, script).wait_with_output().unwrap()
    }

    fn spawn(&self, linger: &str, args: &[&str], script: &str) -> Child {
        launch_cmd()
            .env("CIMG_LINGER", linger)
            .args(args)
            .arg(&self.path)
            .args(["--", "sh", "-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .current_dir("/")
            .spawn()
            .unwrap()
    }

    /// The image's servers (pids of `cimg-server` processes naming it).
    fn servers(&self) -> Vec<u32> {
        processes_with(&self.path)
            .iter()
            .filter_map(|l| l.split(':').next()?.parse::<u32>().ok())
            .filter(|p| {
                fs::read_to_string(format!("/proc/{p}/comm"))
                    .is_ok_and(|c| c.trim() == "cimg-server")
            })
            .collect()
    }

    /// Stop its servers and wait until nothing of it is left.
    fn stop(&self) {
        let o = launch(&["--stop", &self.path]);
        ok(&o);
        wait_until("nothing of the image left", || {
            processes_with(&self.path).is_empty()
        });
    }
}

/// How many container shells (not their launches, whose command lines name the same file)
/// wait for `file`.
fn waiting_for(file: &Path) -> usize {
    processes_with(&file.display().to_string())
        .iter()
        .filter(|l| {
            l.split_once(": ")
                .is_some_and(|(_, cmd)| cmd.starts_with("sh -c"))
        })
        .count()
}

/// The abstract socket names (`@cimg-img/…`) the process `pid` holds, from `/proc/net/unix`
/// by the inodes of its descriptors (a connection it accepted shows its listener's name too:
/// each name once).
fn socket_names(pid: u32) -> Vec<String> {
    let inodes: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| fs::read_link(e.path()).ok())
                .filter_map(|l| {
                    let l = l.display().to_string();
                    l.strip_prefix("socket:[")?
                        .strip_suffix(']')
                        .map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default();
    let names: std::collections::BTreeSet<String> = fs::read_to_string("/proc/net/unix")
        .unwrap()
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| {
            f.len() > 7 && inodes.contains(&f[6].to_string()) && f[7].starts_with("@cimg-img/")
        })
        .map(|f| f[7].to_string())
        .collect();
    names.into_iter().collect()
}

impl Drop for Image {
    fn drop(&mut self) {
        for l in processes_with(&self.path) {
            if let Some(pid) = l.split(':').next().and_then(|p| p.parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// Two launches of one image share one mount (the same device at `/`) in two distinct mount
/// namespaces, served by one server; `--private` makes a mount of its own.
#[test]
fn launches_share_one_mount_in_distinct_namespaces() {
    if !capable() {
        return;
    }
    let _serial = serial();
    let img = Image::new("share");
    let script = "stat -c %d /; readlink /proc/self/ns/mnt";
    ok(&img.run("60", &[], "true"));
    let servers = img.servers();
    assert_eq!(servers.len(), 1, "one server lingers");
    // Two containers at once (a namespace's inode number is reused once it is gone).
    let release = tempfile::tempdir_in("/tmp").unwrap();
    let go = release.path().join("go");
    let first = img.spawn(
        "60",
        &[],
        &format!(
            "{script}; while [ ! -e {} ]; do sleep 0.02; done",
            go.display()
        ),
    );
    wait_until("the first container", || waiting_for(&go) == 1);
    let b = ok(&img.run("60", &[], script));
    fs::write(&go, "").unwrap();
    let a = ok(&first.wait_with_output().unwrap());
    assert_eq!(
        img.servers(),
        servers,
        "the later launches used the same server"
    );
    let (a, b): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    assert_eq!(a[0], b[0], "one mount (the same device at /)");
    assert_ne!(a[1], b[1], "two containers");
    let p = ok(&img.run("60", &["--private"], script));
    let p: Vec<&str> = p.lines().collect();
    assert_ne!(p[0], a[0], "--private mounts the image itself");
    assert_eq!(
        img.servers(),
        servers,
        "--private left the shared server alone"
    );
    img.stop();
}

/// Twenty launches at once elect one server, and all run on it.
#[test]
fn twenty_simultaneous_launches_use_one_server() {
    if !capable() {
        return;
    }
    let _serial = serial();
    let img = Image::new("twenty");
    let release = tempfile::tempdir_in("/tmp").unwrap();
    let go = release.path().join("go");
    let script = format!(
        "stat -c %d /; while [ ! -e {} ]; do sleep 0.02; done",
        go.display()
    );
    let children: Vec<Child> = (0..20).map(|_| img.spawn("60", &[], &script)).collect();
    wait_until("twenty containers", || waiting_for(&go) == 20);
    assert_eq!(img.servers().len(), 1, "one server for twenty launches");
    let o = launch(&["--servers", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let mine: Vec<&serde_json::Value> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["image"] == img.path.as_str())
        .collect();
    assert_eq!(mine.len(), 1, "{list}");
    let containers = mine[0]["containers"].clone();
    fs::write(&go, "").unwrap();
    let outs: Vec<Output> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let devs: std::collections::BTreeSet<String> = outs.iter().map(ok).collect();
    for o in &outs {
        assert!(err(o).is_empty(), "{}", err(o));
    }
    assert_eq!(devs.len(), 1, "{devs:?}");
    assert_eq!(containers, 20, "{list}");
    img.stop();
}

/// Binds, `-W` writes, the environment and the working directory of one container are
/// invisible in another container of the same server.
#[test]
fn containers_of_one_server_are_isolated() {
    if !capable() {
        return;
    }
    let _serial = serial();
    let img = Image::new("isolated");
    let host = tempfile::tempdir_in("/var/tmp").unwrap();
    fs::write(host.path().join("only-in-a"), "a").unwrap();
    let release = tempfile::tempdir_in("/tmp").unwrap();
    let go = release.path().join("go");
    let bind = format!("{}:/mnt", host.path().display());
    let a = img.spawn(
        "60",
        &["-W", "-b", &bind, "--set-env=SECRET=a", "-c", "/srv"],
        &format!(
            "echo written > /srv/work/by-a; ls /mnt; while [ ! -e {} ]; do sleep 0.02; done",
            go.display()
        ),
    );
    wait_until("container a", || waiting_for(&go) == 1);
    let b = ok(&img.run(
        "60",
        &[],
        "ls /mnt; test ! -e /srv/work/by-a && echo no-by-a; echo \"secret=$SECRET\"; pwd",
    ));
    assert_eq!(b, "no-by-a\nsecret=\n/\n");
    assert_eq!(img.servers().len(), 1, "both on one server");
    fs::write(&go, "").unwrap();
    assert_eq!(ok(&a.wait_with_output().unwrap()), "only-in-a\n");
    img.stop();
}

/// A server outlives its last container by the linger, then leaves nothing: no process holds
/// the image, no mount, no socket name, no zombie.
#[test]
fn linger_expiry_leaves_nothing() {
    if !capable() {
        return;
    }
    let _serial = serial();
    let img = Image::new("linger");
    let t = Instant::now();
    ok(&img.run("2", &[], "true"));
    let server = img.servers();
    assert_eq!(server.len(), 1);
    let names = socket_names(server[0]);
    assert_eq!(names.len(), 1, "the server listens on one name");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(img.servers(), server, "still lingering after 0.5 s");
    wait_until("the linger to expire", || {
        processes_with(&img.path).is_empty()
    });
    let lingered = t.elapsed();
    assert!(lingered >= Duration::from_secs(2), "{lingered:?}");
    let table = fs::read_to_string("/proc/net/unix").unwrap();
    assert!(!table.contains(&names[0]), "the socket name is left");
    assert_eq!(mounts_of(Path::new(&img.path)), 0);
    // No zombie of the server or its helper is left: the server reaps its helper, and the
    // server, nobody's child, is reaped by init (as promptly as init does).
    let zombies = || -> Vec<String> {
        fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| fs::read_to_string(e.path().join("stat")).ok())
            .filter(|s| {
                s.contains("(cimg-") && s.rsplit(") ").next().is_some_and(|r| r.starts_with('Z'))
            })
            .collect()
    };
    wait_until("no zombie", || zombies().is_empty());
}

/// `--servers` lists the user's servers; `--stop IMAGE` ends that image's, and its running
/// containers end with 125; `--stop-all` ends every one.
#[test]
fn servers_stop_and_stop_all() {
    if !capable() {
        return;
    }
    let _serial = serial();
    let (a, b) = (Image::new("stop-a"), Image::new("stop-b"));
    ok(&a.run("60", &[], "true"));
    let running = b.spawn("60", &[], "echo up; exec sleep 30");
    wait_until("b's container", || {
        b.servers().len() == 1
            && processes_with("sleep 30")
                .iter()
                .any(|l| l.contains("sleep"))
    });
    let list = ok(&launch(&["--servers"]));
    for (img, containers) in [(&a, "0 containers"), (&b, "1 container")] {
        let line = list
            .lines()
            .find(|l| l.contains(&img.path))
            .unwrap_or_else(|| panic!("{} not listed: {list}", img.path));
        assert!(line.contains(containers), "{line}");
        assert!(line.starts_with(&img.servers()[0].to_string()), "{line}");
    }
    ok(&launch(&["--stop", &b.path]));
    let o = running.wait_with_output().unwrap();
    assert_eq!(code(&o), 125, "{}", err(&o));
    assert!(err(&o).contains("FUSE server ended"), "{}", err(&o));
    wait_until("b's server gone", || processes_with(&b.path).is_empty());
    assert_eq!(a.servers().len(), 1, "--stop b left a alone");
    ok(&launch(&["--stop-all"]));
    wait_until("a's server gone", || processes_with(&a.path).is_empty());
}

/// An image replaced while its server lingers (a new file under the same name) is served
/// fresh: the next launch gets a server of the new file.
#[test]
fn a_replaced_image_is_served_fresh() {
    if !capable() {
        return;
    }
    let _serial = serial();
    let img = Image::new("replace");
    assert_eq!(
        ok(&img.run("60", &[], "cat /srv/work/marker")),
        "in the image\n"
    );
    let old = img.servers();
    let root = img.dir.path().join("root");
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(&fixture().rootfs)
        .arg(&root)
        .status()
        .unwrap();
    assert!(st.success());
    fs::write(root.join("srv/work/marker"), "replaced\n").unwrap();
    let new = img.dir.path().join("new.cimg");
    pack(&root, &new, None);
    fs::rename(&new, &img.path).unwrap();
    assert_eq!(
        ok(&img.run("60", &[], "cat /srv/work/marker")),
        "replaced\n"
    );
    let now = img.servers();
    assert_eq!(
        now.len(),
        2,
        "the old server lingers, a new one serves the new file"
    );
    assert!(old.iter().all(|p| now.contains(p)));
    img.stop();
}

/// SIGKILL of the server during a run ends the container with 125; between runs, the next
/// launch starts a new server. Either way nothing is left.
#[test]
fn sigkill_of_the_server_during_and_between_runs() {
    if !capable() {
        return;
    }
    let _serial = serial();
    let img = Image::new("sigkill");
    let kill = |pid: u32| {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap()
    };
    // During a run.
    let mut running = img.spawn("60", &[], "echo up; exec sleep 30");
    assert_eq!(first_line(&mut running), "up\n");
    let s = img.servers();
    assert_eq!(s.len(), 1);
    kill(s[0]);
    let o = running.wait_with_output().unwrap();
    assert_eq!(code(&o), 125, "{}", err(&o));
    wait_until("nothing left", || processes_with(&img.path).is_empty());
    assert_eq!(mounts_of(Path::new(&img.path)), 0);
    // Between runs.
    assert_eq!(
        ok(&img.run("60", &[], "cat /srv/work/marker")),
        "in the image\n"
    );
    let s = img.servers();
    kill(s[0]);
    wait_until("the server gone", || img.servers().is_empty());
    assert_eq!(
        ok(&img.run("60", &[], "cat /srv/work/marker")),
        "in the image\n"
    );
    assert_eq!(img.servers().len(), 1);
    img.stop();
}

/// A server that does not answer (stopped with SIGSTOP) does not hang the next launch: it
/// says so in one line and runs on a mount of its own.
#[test]
fn a_stopped_server_does_not_hang_the_next_launch() {
    if !capable() {
        return;
    }
    let _serial = serial();
    let img = Image::new("sigstop");
    ok(&img.run("60", &[], "true"));
    let s = img.servers();
    let pid = nix::unistd::Pid::from_raw(s[0] as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let t = Instant::now();
    let o = img.run("60", &[], "cat /srv/work/marker");
    let took = t.elapsed();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert_eq!(ok(&o), "in the image\n");
    let e = err(&o);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(
        e.contains("did not answer") && e.contains("private mount"),
        "{e}"
    );
    assert!(took < Duration::from_secs(15), "{took:?}");
    img.stop();
}

/// Another user's launch of the same image file gets a server of its own; neither can use
/// the other's: a connection from another uid to a user's server is dropped unanswered.
#[test]
fn two_users_get_two_servers_and_cannot_reach_each_other() {
    if !capable() {
        return;
    }
    let _serial = serial();
    let img = Image::new("users");
    ok(&img.run("60", &[], "true"));
    let root_server = img.servers();
    assert_eq!(root_server.len(), 1);
    let o = as_user(&format!(
        "CIMG_LINGER=60 \"$LAUNCH\" {} -- id -u; \"$LAUNCH\" --servers",
        img.path
    ));
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("65534"));
    let listed: Vec<&str> = lines.collect();
    assert_eq!(
        listed.len(),
        1,
        "the user sees its own server only: {listed:?}"
    );
    assert!(
        !listed[0].starts_with(&root_server[0].to_string()),
        "{listed:?}"
    );
    assert_eq!(img.servers().len(), 2, "two users, two servers");
    // The root server's socket, asked for its status by uid 65534.
    let table = fs::read_to_string("/proc/net/unix").unwrap();
    let root_name = table
        .lines()
        .filter_map(|l| l.split_whitespace().nth(7))
        .find(|n| n.starts_with("@cimg-img/0/"))
        .expect("root's server name")
        .trim_start_matches('@')
        .to_string();
    const ASK: &str = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.settimeout(3)
try:
    s.connect("\0" + sys.argv[1])
    s.send(b'"Status"')
    print("answer", s.recv(65536))
except (BrokenPipeError, ConnectionResetError):
    print("dropped")
except socket.timeout:
    print("no answer")
"#;
    let o = python_as(65534, ASK, &[&root_name])
        .wait_with_output()
        .unwrap();
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(
        ["answer b''\n", "dropped\n"].contains(&&*said),
        "another user got: {said}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    ok(&launch(&["--stop-all"]));
    let o = as_user("\"$LAUNCH\" --stop-all");
    assert!(o.status.success());
    wait_until("both servers gone", || processes_with(&img.path).is_empty());
}

/// A name of the service held by another user does not stop the user's launches: they move
/// to the next name and still share one server.
#[test]
fn a_squatted_service_name_is_skipped() {
    if !capable() {
        return;
    }
    let _serial = serial();
    let img = Image::new("squat");
    ok(&img.run("60", &[], "true"));
    let pid = img.servers()[0];
    let name = socket_names(pid)
        .pop()
        .expect("the server's name")
        .trim_start_matches('@')
        .to_string();
    img.stop();
    const SQUAT: &str = r#"
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.bind("\0" + sys.argv[1]); s.listen(8)
print("held", flush=True)
time.sleep(60)
"#;
    let mut squatter = python_as(1234, SQUAT, &[&name]);
    assert_eq!(first_line(&mut squatter), "held\n");
    let a = img.run("60", &[], "stat -c %d /");
    let b = img.run("60", &[], "stat -c %d /");
    let _ = squatter.kill();
    let _ = squatter.wait();
    assert_eq!(ok(&a), ok(&b), "one server despite the squatter");
    assert!(
        err(&a).is_empty() && err(&b).is_empty(),
        "{}{}",
        err(&a),
        err(&b)
    );
    assert_eq!(img.servers().len(), 1);
    img.stop();
}
