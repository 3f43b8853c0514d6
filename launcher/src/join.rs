//! Peers of one group (the ranks of one job step on one node) share one container: one user
//! and mount namespace, one FUSE mount, one FUSE server.
//!
//! Rendezvous is an abstract Unix socket named after the user and the group tag
//! (`cimg-join/UID/TAG`): nothing on disk, and the name disappears with its last holder, so
//! a SIGKILLed peer leaves nothing behind and a stale group never blocks a new one.
//!
//! - The first peer binds the name (the atomic election) and creates the container; its FUSE
//!   server inherits the listening socket and runs [`serve_group`] in a thread.
//! - A peer that finds the name bound connects and asks to join ([`JoinRequest::Join`]). The
//!   server answers with a pidfd of a peer already inside (`SCM_RIGHTS`) and the image's
//!   config; the newcomer enters with `setns(pidfd, CLONE_NEWUSER | CLONE_NEWNS)`, says so
//!   ([`JoinRequest::Inside`]), starts its command, and keeps the connection open for as long as it lives.
//! - The creator, once its command runs, moves into the container's mount namespace too and
//!   registers the same way. So every registered peer is inside, and a closed connection
//!   means that peer is gone; if the server itself dies, every peer sees end of file.
//! - The server stops listening when COUNT peers have registered (the group is complete) or
//!   when every registered peer has gone (the group is over: later starts with the same tag
//!   make a new container). Peers that overlap in time share; the container lives as long as
//!   any of their processes, whichever peer created it.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    UnixAddr, accept4, bind, connect, getsockopt, listen, recvmsg, sendmsg, socket, sockopt,
};
use nix::unistd::{Uid, read, write};

use crate::error::{Error, errno_msg};
use crate::plan::Plan;
use crate::protocol::{self, JoinReply, JoinRequest};
use crate::rendezvous::{self, same_user};

/// How a launch relates to others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinMode {
    /// A container of its own.
    Alone,
    /// One of `count` peers tagged `tag` on this node.
    Group {
        /// The group's tag.
        tag: String,
        /// Peers per node.
        count: u32,
    },
    /// Enter the container of process `pid`.
    Pid(i32),
}

/// Decide the join mode from the options and the environment (`env` looks a variable up).
/// Explicit flags win; under Open MPI (`OMPI_COMM_WORLD_LOCAL_SIZE`) or a Slurm step
/// (`SLURM_STEP_ID` and `SLURM_JOB_ID`) peers join automatically unless `--no-join`.
pub fn mode(plan: &Plan, env: &dyn Fn(&str) -> Option<String>) -> Result<JoinMode, Error> {
    if let Some(pid) = plan.join_pid {
        if plan.join || plan.join_ct.is_some() || plan.join_tag.is_some() {
            return Err(Error::usage(
                "--join-pid cannot be combined with --join, --join-ct or --join-tag".into(),
            ));
        }
        if pid <= 0 {
            return Err(Error::usage(format!("--join-pid {pid}: not a process id")));
        }
        return Ok(JoinMode::Pid(pid));
    }
    if plan.no_join {
        return Ok(JoinMode::Alone);
    }
    let explicit = plan.join || plan.join_ct.is_some() || plan.join_tag.is_some();
    let ompi = env("OMPI_COMM_WORLD_LOCAL_SIZE").is_some();
    let slurm = env("SLURM_STEP_ID").is_some() && env("SLURM_JOB_ID").is_some();
    if !explicit && !ompi && !slurm {
        return Ok(JoinMode::Alone);
    }
    let count = match plan.join_ct {
        Some(n) => n,
        None => count_from_env(env)?,
    };
    if count == 0 {
        return Err(Error::usage(
            "--join-ct 0: a group has at least one peer".into(),
        ));
    }
    let tag = match &plan.join_tag {
        Some(t) => t.clone(),
        None => tag_from_env(env)?,
    };
    if tag.is_empty() || tag.len() > 200 || tag.contains('\0') {
        return Err(Error::usage(format!(
            "join tag {tag:?}: must be 1 to 200 bytes without NUL"
        )));
    }
    Ok(JoinMode::Group { tag, count })
}

fn count_from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<u32, Error> {
    let bad = |var: &str, v: &str| Error::usage(format!("{var}={v:?}: not a valid peer count"));
    if let Some(v) = env("OMPI_COMM_WORLD_LOCAL_SIZE") {
        return v
            .trim()
            .parse()
            .map_err(|_| bad("OMPI_COMM_WORLD_LOCAL_SIZE", &v));
    }
    for var in ["SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"] {
        if let Some(v) = env(var) {
            let per_node = expand_tasks_per_node(&v).ok_or_else(|| bad(var, &v))?;
            let node: usize = match env("SLURM_NODEID") {
                Some(n) => n.trim().parse().map_err(|_| bad("SLURM_NODEID", &n))?,
                None => 0,
            };
            return per_node.get(node).copied().ok_or_else(|| {
                Error::usage(format!("{var}={v:?} has no entry for SLURM_NODEID={node}"))
            });
        }
    }
    Err(Error::usage(
        "cannot tell how many peers share the container: give --join-ct N (or run under \
         Slurm or Open MPI)"
            .into(),
    ))
}

/// Slurm's compressed task counts: `2(x3),1` → `[2, 2, 2, 1]`.
pub fn expand_tasks_per_node(v: &str) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    for part in v.trim().split(',') {
        let (n, reps) = match part.split_once("(x") {
            Some((n, r)) => (n, r.strip_suffix(')')?.parse::<usize>().ok()?),
            None => (part, 1),
        };
        let n: u32 = n.parse().ok()?;
        if reps == 0 || reps > 1 << 20 {
            return None;
        }
        out.extend(std::iter::repeat_n(n, reps));
    }
    (!out.is_empty()).then_some(out)
}

fn tag_from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<String, Error> {
    if env("OMPI_COMM_WORLD_LOCAL_SIZE").is_some() {
        for (var, prefix) in [
            ("PMIX_NAMESPACE", "pmix"),
            ("OMPI_MCA_ess_base_jobid", "ompi"),
            ("OMPI_MCA_orte_ess_jobid", "ompi"),
        ] {
            if let Some(v) = env(var).filter(|v| !v.is_empty()) {
                return Ok(format!("{prefix}-{v}"));
            }
        }
    }
    if let (Some(job), Some(step)) = (env("SLURM_JOB_ID"), env("SLURM_STEP_ID")) {
        // The node is part of the tag: the ranks of one step on one node form a group (and
        // several slurmd on one host, as in tests, do not merge their nodes' groups).
        let node = env("SLURM_NODEID")
            .or_else(|| env("SLURMD_NODENAME"))
            .unwrap_or_default();
        return Ok(format!("slurm-{job}.{step}.{node}"));
    }
    if let Some(v) = env("PMIX_NAMESPACE").filter(|v| !v.is_empty()) {
        return Ok(format!("pmix-{v}"));
    }
    Err(Error::usage(
        "cannot tell which peers belong together: give --join-tag TAG (or run under Slurm or \
         Open MPI)"
            .into(),
    ))
}

/// Name `k` of the group `tag` of host user `uid` ([`crate::rendezvous`]).
fn address(uid: Uid, tag: &str, k: u32) -> Result<UnixAddr, Error> {
    crate::rendezvous::address(uid, "join", tag, k)
}

/// What the rendezvous made of this launch.
pub enum Role {
    /// First: create the container; the listening socket (bound to `addr`) goes to the FUSE
    /// server.
    Creator {
        /// The listening socket.
        listener: OwnedFd,
        /// Its name, for the creator's own connection once it is inside.
        addr: UnixAddr,
    },
    /// The container exists: enter it with `pidfd`; `conn` stays open while this peer lives.
    Joiner {
        /// The connection to the group's server.
        conn: OwnedFd,
        /// A process inside the container.
        pidfd: OwnedFd,
        /// The image's config (JSON), empty if none.
        config: Vec<u8>,
    },
    /// Every name of the group is held by other users: run in a container of its own (the
    /// message says why, as a warning).
    Alone(String),
}

/// How long a peer waits for the creator to finish the container.
const WAIT: Duration = Duration::from_secs(120);

/// Find the group or become its creator. Must be called before the user namespace is made.
pub fn rendezvous(tag: &str, count: u32, image: &Path) -> Result<Role, Error> {
    let uid = Uid::current();
    let start = Instant::now();
    let sock_err = |what: &str, e| Error::other(errno_msg(format!("join {tag}: {what}"), e));
    let mut k = 0;
    let mut addr = address(uid, tag, k)?;
    // Since when the current name has refused connections and bindings alike.
    let mut refused_since: Option<Instant> = None;
    loop {
        if start.elapsed() > WAIT {
            return Err(Error::other(format!(
                "join {tag}: no container after {} s (the creating peer did not finish)",
                WAIT.as_secs()
            )));
        }
        let mut squatted = false;
        let s = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| sock_err("socket", e))?;
        match connect(s.as_raw_fd(), &addr) {
            Ok(()) if !same_user(&s) => squatted = true,
            Ok(()) => match ask(&s, tag, count, image)? {
                Some((pidfd, config)) => {
                    return Ok(Role::Joiner {
                        conn: s,
                        pidfd,
                        config,
                    });
                }
                // The creator failed or the group just ended: start over.
                None => {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                }
            },
            Err(Errno::ECONNREFUSED) | Err(Errno::ENOENT) => {}
            Err(e) => return Err(sock_err("connect", e)),
        }
        if !squatted {
            let l = socket(
                AddressFamily::Unix,
                SockType::Stream,
                SockFlag::SOCK_CLOEXEC,
                None,
            )
            .map_err(|e| sock_err("socket", e))?;
            match bind(l.as_raw_fd(), &addr) {
                Ok(()) => {
                    listen(&l, Backlog::new(1024).unwrap_or(Backlog::MAXCONN))
                        .map_err(|e| sock_err("listen", e))?;
                    return Ok(Role::Creator { listener: l, addr });
                }
                Err(Errno::EADDRINUSE) => {
                    let since = *refused_since.get_or_insert_with(Instant::now);
                    squatted = since.elapsed() > rendezvous::SQUAT_WAIT;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => return Err(sock_err("bind", e)),
            }
        }
        if squatted {
            k += 1;
            if k == rendezvous::NAMES {
                return Ok(Role::Alone(format!(
                    "join {tag}: the group's socket names are held by another user; \
                     running in a container of its own"
                )));
            }
            addr = address(uid, tag, k)?;
            refused_since = None;
        }
    }
}

/// Ask the server to join: `Some((pidfd, config))`, or `None` if the connection closed first.
fn ask(
    s: &OwnedFd,
    tag: &str,
    count: u32,
    image: &Path,
) -> Result<Option<(OwnedFd, Vec<u8>)>, Error> {
    let req = JoinRequest::Join {
        count,
        image: image.to_path_buf(),
    };
    if write(s, &protocol::line(&req)).is_err() {
        return Ok(None);
    }
    // Wait (bounded) for the answer: the creator may still be building the container.
    let mut pfd = [PollFd::new(s.as_fd(), PollFlags::POLLIN)];
    match poll(
        &mut pfd,
        PollTimeout::try_from(WAIT.as_millis() as i32).unwrap_or(PollTimeout::MAX),
    ) {
        Ok(0) => {
            return Err(Error::other(format!(
                "join {tag}: no answer from the group's server"
            )));
        }
        Ok(_) => {}
        Err(e) => return Err(Error::other(errno_msg(format!("join {tag}"), e))),
    }
    // The answer carries the image config (its Env, WorkingDir, ...): 256 KiB is plenty; a
    // longer one is cut (MSG_TRUNC) and refused below.
    let mut buf = vec![0u8; 256 << 10];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let (n, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = match recvmsg::<UnixAddr>(
            s.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(_) => return Ok(None),
        };
        let mut fds = Vec::new();
        if let Ok(cms) = msg.cmsgs() {
            for c in cms {
                if let ControlMessageOwned::ScmRights(f) = c {
                    fds.extend(f);
                }
            }
        }
        if msg.flags.contains(MsgFlags::MSG_TRUNC) {
            return Err(Error::other(format!(
                "join {tag}: the image config is too long to pass"
            )));
        }
        (msg.bytes, crate::sys::own_fds(fds))
    };
    let reply = &buf[..n];
    if reply.is_empty() {
        return Ok(None);
    }
    let reply = reply.strip_suffix(b"\n").unwrap_or(reply);
    match protocol::parse_line::<JoinReply>(reply) {
        Some(JoinReply::Enter { config }) => {
            let pidfd = fds
                .into_iter()
                .next()
                .ok_or_else(|| Error::other(format!("join {tag}: the server sent no process")))?;
            Ok(Some((
                pidfd,
                config.map(String::into_bytes).unwrap_or_default(),
            )))
        }
        Some(JoinReply::Refused(why)) => Err(Error::usage(format!("join {tag}: {why}"))),
        None => Err(Error::other(format!(
            "join {tag}: unexpected answer from the server"
        ))),
    }
}

/// Tell the server this peer is inside (the joiner after setns, the creator after moving
/// into its app's mount namespace).
pub fn register(conn: &OwnedFd) -> Result<(), Error> {
    write(conn, &protocol::line(&JoinRequest::Inside))
        .map(|_| ())
        .map_err(|e| Error::other(errno_msg("join: register", e)))
}

/// The creator's own connection to `addr` (its group's name), made once it is inside.
pub fn connect_creator(
    tag: &str,
    addr: &UnixAddr,
    count: u32,
    image: &Path,
) -> Result<OwnedFd, Error> {
    let s = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| Error::other(errno_msg("join: socket", e)))?;
    connect(s.as_raw_fd(), addr)
        .map_err(|e| Error::other(errno_msg(format!("join {tag}: connect"), e)))?;
    let req = JoinRequest::Creator {
        count,
        image: image.to_path_buf(),
    };
    write(&s, &protocol::line(&req)).map_err(|e| Error::other(errno_msg("join: register", e)))?;
    Ok(s)
}

/// Whether the server at the other end of `conn` is gone, waiting at most `wait` for it to
/// say so (a peer only ever reads end of file or an error from it once registered).
pub fn closed_within(conn: BorrowedFd<'_>, wait: Duration) -> bool {
    let mut fds = [PollFd::new(conn, PollFlags::POLLIN)];
    let ms = PollTimeout::try_from(wait.as_millis() as i32).unwrap_or(PollTimeout::ZERO);
    matches!(poll(&mut fds, ms), Ok(n) if n > 0) && closed(conn)
}

/// Whether the peer at the other end of `conn` is gone (end of file or error).
pub fn closed(conn: BorrowedFd<'_>) -> bool {
    let mut b = [0u8; 64];
    matches!(nix::unistd::read(conn, &mut b), Ok(0) | Err(_))
}

/// One connection the server knows.
struct Peer {
    fd: OwnedFd,
    pid: i32,
    buf: Vec<u8>,
    state: State,
}

#[derive(PartialEq, Eq)]
enum State {
    /// Nothing complete read yet.
    New,
    /// Asked to join; waiting for a peer inside.
    Waiting,
    /// Answered; entering.
    Entering,
    /// Inside.
    Inside,
}

/// The server's side: answer joiners until the group is complete or over. Runs in a thread
/// of the FUSE server; `image` is the creator's canonical image path, `config` the image's
/// config JSON.
pub fn serve_group(listener: OwnedFd, count: u32, image: PathBuf, config: Vec<u8>) {
    let _ = nix::fcntl::fcntl(
        &listener,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    );
    let mut listener = Some(listener);
    let mut peers: Vec<Peer> = Vec::new();
    let mut registered: u32 = 0;
    loop {
        if registered >= count {
            listener = None;
        }
        let inside = peers.iter().filter(|p| p.state == State::Inside).count();
        if registered > 0 && inside == 0 && peers.iter().all(|p| p.state != State::Entering) {
            // Every peer that was inside has gone: the group is over. Those still asking see
            // the connection close and start a new container.
            return;
        }
        if listener.is_none() && peers.is_empty() {
            return;
        }
        let mut fds: Vec<PollFd> = Vec::with_capacity(peers.len() + 1);
        if let Some(l) = &listener {
            fds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
        }
        for p in &peers {
            fds.push(PollFd::new(p.fd.as_fd(), PollFlags::POLLIN));
        }
        if poll(&mut fds, PollTimeout::NONE).is_err() {
            continue;
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        let offset = usize::from(listener.is_some());
        let mut gone = Vec::new();
        for (i, p) in peers.iter_mut().enumerate() {
            if !ready[i + offset] {
                continue;
            }
            let mut b = [0u8; 4096];
            match read(&p.fd, &mut b) {
                Ok(0) | Err(_) => gone.push(i),
                Ok(n) => p.buf.extend_from_slice(&b[..n]),
            }
        }
        for i in gone.into_iter().rev() {
            peers.remove(i);
        }
        // Handle complete requests.
        for p in peers.iter_mut() {
            while let Some(nl) = p.buf.iter().position(|&c| c == b'\n') {
                let line: Vec<u8> = p.buf.drain(..=nl).collect();
                let line = &line[..line.len() - 1];
                let req = protocol::parse_line::<JoinRequest>(line);
                match (req, &p.state) {
                    (Some(JoinRequest::Inside), State::Entering) => {
                        p.state = State::Inside;
                        registered += 1;
                    }
                    (
                        Some(r @ (JoinRequest::Join { .. } | JoinRequest::Creator { .. })),
                        State::New,
                    ) => {
                        let creator = matches!(r, JoinRequest::Creator { .. });
                        match check(&r, count, &image) {
                            Err(msg) => {
                                let _ = write(&p.fd, &protocol::line(&JoinReply::Refused(msg)));
                                p.state = State::Entering; // closed below by the client
                                p.buf.clear();
                            }
                            Ok(()) if creator => {
                                p.state = State::Inside;
                                registered += 1;
                            }
                            Ok(()) => p.state = State::Waiting,
                        }
                    }
                    _ => p.buf.clear(),
                }
            }
        }
        // Answer the waiting with a peer that is inside.
        let inside: Vec<i32> = peers
            .iter()
            .filter(|p| p.state == State::Inside)
            .map(|p| p.pid)
            .collect();
        if !inside.is_empty() {
            for p in peers.iter_mut().filter(|p| p.state == State::Waiting) {
                for &pid in &inside {
                    let Ok(pidfd) = crate::enter::pidfd_open(pid) else {
                        continue;
                    };
                    let msg = protocol::line(&JoinReply::Enter {
                        config: (!config.is_empty())
                            .then(|| String::from_utf8_lossy(&config).into_owned()),
                    });
                    let fds = [pidfd.as_raw_fd()];
                    let cmsg = [ControlMessage::ScmRights(&fds)];
                    if sendmsg::<UnixAddr>(
                        p.fd.as_raw_fd(),
                        &[IoSlice::new(&msg)],
                        &cmsg,
                        MsgFlags::empty(),
                        None,
                    )
                    .is_ok()
                    {
                        p.state = State::Entering;
                    }
                    break;
                }
            }
        }
        // New connections (the listener is non-blocking: drain the backlog).
        if let (Some(l), true) = (&listener, offset == 1 && ready[0]) {
            while let Ok(fd) = accept4(
                l.as_raw_fd(),
                SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            ) {
                let Some(fd) = crate::sys::own_fds(vec![fd]).pop() else {
                    break;
                };
                if same_user(&fd)
                    && let Ok(c) = getsockopt(&fd, sockopt::PeerCredentials)
                {
                    peers.push(Peer {
                        fd,
                        pid: c.pid(),
                        buf: Vec::new(),
                        state: State::New,
                    });
                }
            }
        }
    }
}

/// Check a request to join: the same count and image as the group's.
fn check(req: &JoinRequest, count: u32, image: &Path) -> Result<(), String> {
    let (JoinRequest::Join {
        count: n,
        image: img,
    }
    | JoinRequest::Creator {
        count: n,
        image: img,
    }) = req
    else {
        return Err("not a request to join".into());
    };
    if *n != count {
        return Err(format!(
            "this peer says the group has {n} peers, the group was made for {count}"
        ));
    }
    if img != image {
        return Err(format!(
            "this peer runs {}, the group's container is {}",
            img.display(),
            image.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn plan(args: &[&str]) -> Plan {
        let mut v = vec!["launch"];
        v.extend_from_slice(args);
        v.extend_from_slice(&["img", "--", "x"]);
        crate::plan::parse(v).unwrap().unwrap()
    }

    fn with(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn slurm_task_counts() {
        assert_eq!(expand_tasks_per_node("4"), Some(vec![4]));
        assert_eq!(expand_tasks_per_node("2(x3),1"), Some(vec![2, 2, 2, 1]));
        assert_eq!(expand_tasks_per_node("x"), None);
        assert_eq!(expand_tasks_per_node("2(x"), None);
        assert_eq!(expand_tasks_per_node(""), None);
    }

    #[test]
    fn modes() {
        let none = with(&[]);
        assert_eq!(mode(&plan(&[]), &none).unwrap(), JoinMode::Alone);
        assert_eq!(
            mode(&plan(&["--join-ct", "4", "--join-tag", "t"]), &none).unwrap(),
            JoinMode::Group {
                tag: "t".into(),
                count: 4
            }
        );
        assert_eq!(
            mode(&plan(&["--join-pid", "42"]), &none).unwrap(),
            JoinMode::Pid(42)
        );
        assert!(mode(&plan(&["--join-pid", "42", "--join"]), &none).is_err());
        // --join with nothing to go on: a clear error.
        let e = mode(&plan(&["--join"]), &none).unwrap_err();
        assert!(e.to_string().contains("--join-ct"), "{e}");
        let e = mode(&plan(&["--join-ct", "2"]), &none).unwrap_err();
        assert!(e.to_string().contains("--join-tag"), "{e}");
        assert!(mode(&plan(&["--join-ct", "0", "--join-tag", "t"]), &none).is_err());
        // Slurm.
        let slurm = with(&[
            ("SLURM_JOB_ID", "77"),
            ("SLURM_STEP_ID", "3"),
            ("SLURM_STEP_TASKS_PER_NODE", "4(x2),2"),
            ("SLURM_NODEID", "2"),
        ]);
        assert_eq!(
            mode(&plan(&[]), &slurm).unwrap(),
            JoinMode::Group {
                tag: "slurm-77.3.2".into(),
                count: 2
            }
        );
        assert_eq!(
            mode(&plan(&["--no-join"]), &slurm).unwrap(),
            JoinMode::Alone
        );
        let bad = with(&[
            ("SLURM_JOB_ID", "1"),
            ("SLURM_STEP_ID", "0"),
            ("SLURM_STEP_TASKS_PER_NODE", "4"),
            ("SLURM_NODEID", "5"),
        ]);
        assert!(mode(&plan(&[]), &bad).is_err());
        // Open MPI.
        let ompi = with(&[
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "8"),
            ("PMIX_NAMESPACE", "prterun-x-1@1"),
        ]);
        assert_eq!(
            mode(&plan(&[]), &ompi).unwrap(),
            JoinMode::Group {
                tag: "pmix-prterun-x-1@1".into(),
                count: 8
            }
        );
        let ompi_bad = with(&[
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "eight"),
            ("PMIX_NAMESPACE", "x"),
        ]);
        assert!(mode(&plan(&[]), &ompi_bad).is_err());
    }

    #[test]
    fn requests_are_checked() {
        let img = Path::new("/a/img.cimg");
        let join = |count, image: &str| JoinRequest::Join {
            count,
            image: image.into(),
        };
        assert!(check(&join(4, "/a/img.cimg"), 4, img).is_ok());
        assert!(
            check(&join(3, "/a/img.cimg"), 4, img)
                .unwrap_err()
                .contains("3 peers")
        );
        assert!(
            check(&join(4, "/b.cimg"), 4, img)
                .unwrap_err()
                .contains("/b.cimg")
        );
        assert!(check(&JoinRequest::Inside, 4, img).is_err());
        // On the wire: one JSON line each, parsed back; anything else is no request.
        let line = protocol::line(&join(4, "/a/img.cimg"));
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(
            protocol::parse_line::<JoinRequest>(&line[..line.len() - 1]),
            Some(join(4, "/a/img.cimg"))
        );
        assert_eq!(
            protocol::parse_line::<JoinRequest>(b"J 4 /a/img.cimg"),
            None
        );
    }
}
