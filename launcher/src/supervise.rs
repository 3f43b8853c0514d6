//! The process tree of one container and its supervision.
//!
//! On the image's shared server ([`crate::service`], the default), launch gets a detached
//! copy of the server's mount, attaches it as the root of the container it builds in its
//! own namespaces, and watches its connection to the server: the server's end ends the
//! container (status 125). Processes that outlive the command keep the container alive
//! through a keeper (`cimg-keeper`, see [`leave_keeper`]). With `--private` (or
//! `--record-hot`), launch starts a FUSE server of its own ([`crate::server`]).
//!
//! Launch forwards SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH and SIGALRM
//! to the app (read from a signalfd; a signal the terminal sent to the whole foreground
//! process group, which the app got too, is not sent twice), and exits with the app's status
//! (128+N if it was killed by signal N) as soon as the app exits.

use std::ffi::OsString;
use std::fs;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sched::CloneFlags;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::UnixAddr;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{Gid, Group, Pid, Uid, User, getpgid, getpgrp, getppid, pipe2};

use crate::build::{Hosts, carry_out};
use crate::enter::{self, HostPath, Root, STAGE};
use crate::error::{Error, errno_msg};
use crate::host::HostFacts;
use crate::join::{self, JoinMode, Role};
use crate::keeper::leave_keeper;
use crate::plan::{self, Env, EnvOp, Plan};
use crate::protocol::{self, Startup};
use crate::server::{StartingServer, connection_gone, exited_within, server_main};
use crate::service;
use crate::spec;
use crate::sys::{Forked, fork};
use cimg_format::ImageConfig;

const FORWARDED: [Signal; 8] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
    Signal::SIGALRM,
];

/// The image: a `.cimg` file (opened and validated) or a directory.
enum Source {
    Cimg(Box<cimg_format::Image>),
    Dir(PathBuf),
    /// A container on the image's shared server ([`service`]).
    Shared(Box<service::Attached>),
}

/// Say what is done when `-v` was given.
struct Log {
    level: i8,
    t0: Instant,
}

impl Log {
    fn v(&self, msg: impl FnOnce() -> String) {
        if self.level > 0 {
            eprintln!(
                "launch: [{:7.3} ms] {}",
                self.t0.elapsed().as_secs_f64() * 1e3,
                msg()
            );
        }
    }
    fn warn(&self, msg: impl FnOnce() -> String) {
        if self.level >= 0 {
            eprintln!("launch: warning: {}", msg());
        }
    }
}

/// A group this launch creates: the listening socket for the FUSE server, and what peers
/// must agree on.
struct NewGroup {
    listener: OwnedFd,
    /// The rendezvous name the listener is bound to.
    addr: UnixAddr,
    tag: String,
    count: u32,
    image: PathBuf,
}

/// How a launch enters a container that exists.
enum Entry {
    /// `--join-pid`.
    Pid(i32),
    /// A joiner of a group, already inside.
    Joined { conn: OwnedFd, config: Vec<u8> },
}

/// Run the plan: build or join the container, run the command, return its exit code.
pub fn run(plan: Plan) -> Result<i32, Error> {
    let log = Log {
        level: plan.verbosity,
        t0: Instant::now(),
    };
    if let Some(m) = &plan.manage {
        return service::manage(m, &|msg| log.v(|| msg.to_string()));
    }
    let facts = HostFacts::read();
    match join::mode(&plan, &|k| facts.var(k))? {
        JoinMode::Alone => create(plan, None, log, &facts),
        JoinMode::Pid(pid) => {
            let host = Host::read(&plan, &facts)?;
            enter_existing(plan, host, Entry::Pid(pid), log, &facts)
        }
        JoinMode::Group { tag, count } => {
            // Peers compare image paths made absolute without touching the filesystem (no
            // per-rank lookups of every path component on the parallel filesystem).
            let image = std::path::absolute(&plan.image).map_err(|e| {
                Error::image(format!("{}: {}", plan.image.display(), enter::io_msg(&e)))
            })?;
            let host = Host::read(&plan, &facts)?;
            // A peer that answered may exit before we enter through it (ESRCH): ask again.
            for _ in 0..1000 {
                match join::rendezvous(&tag, count, &image)? {
                    Role::Creator { listener, addr } => {
                        log.v(|| format!("group {tag}: first of {count}, creating the container"));
                        let g = NewGroup {
                            listener,
                            addr,
                            tag,
                            count,
                            image,
                        };
                        return create(plan, Some(g), log, &facts);
                    }
                    Role::Alone(why) => {
                        log.warn(|| why);
                        return create(plan, None, log, &facts);
                    }
                    Role::Joiner {
                        conn,
                        pidfd,
                        config,
                    } => {
                        let flags = CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS;
                        match nix::sched::setns(&pidfd, flags) {
                            Ok(()) => {
                                log.v(|| format!("group {tag}: joined"));
                                let entry = Entry::Joined { conn, config };
                                return enter_existing(plan, host, entry, log, &facts);
                            }
                            Err(Errno::ESRCH) => continue,
                            Err(e) => {
                                return Err(Error::other(errno_msg(
                                    "cannot enter the group's container",
                                    e,
                                )));
                            }
                        }
                    }
                }
            }
            Err(Error::other(format!(
                "join {tag}: every peer left before this one could enter"
            )))
        }
    }
}

/// What a peer entering an existing container takes from the host before it enters.
struct Host {
    env_files: Vec<(PathBuf, Vec<u8>)>,
    cwd: Option<PathBuf>,
    user_name: String,
}

impl Host {
    fn read(plan: &Plan, facts: &HostFacts) -> Result<Host, Error> {
        Ok(Host {
            env_files: read_env_files(plan)?,
            cwd: facts.cwd.clone(),
            // Only --home needs the name: skip the user database (NSS) otherwise, it is a
            // measurable part of a joining rank's start.
            user_name: if plan.home {
                User::from_uid(Uid::current())
                    .ok()
                    .flatten()
                    .map(|u| u.name)
                    .or_else(|| facts.var("USER"))
                    .unwrap_or_else(|| format!("user{}", Uid::current()))
            } else {
                String::new()
            },
        })
    }
}

/// Block the signals launch handles and read them from a signalfd; the old mask (for the
/// children to restore).
fn block_signals() -> Result<(SignalFd, SigSet), Error> {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    for s in FORWARDED {
        mask.add(s);
    }
    let mut old_mask = SigSet::empty();
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), Some(&mut old_mask))
        .map_err(|e| Error::other(errno_msg("sigprocmask", e)))?;
    let sfd = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC)
        .map_err(|e| Error::other(errno_msg("signalfd", e)))?;
    Ok((sfd, old_mask))
}

/// Read the `--set-env FILE` files (host paths), in order.
fn read_env_files(plan: &Plan) -> Result<Vec<(PathBuf, Vec<u8>)>, Error> {
    plan.env_ops
        .iter()
        .filter_map(|op| match op {
            EnvOp::File(f) => Some(fs::read(f).map(|t| (f.clone(), t)).map_err(|e| {
                Error::setup(format!("--set-env {}: {}", f.display(), enter::io_msg(&e)))
            })),
            _ => None,
        })
        .collect()
}

/// The command's environment: the host's, the edits in order, the cimg variables.
/// `image_env` is the image config's Env; `ch_env` reads the image's /ch/environment.
fn build_env(
    plan: &Plan,
    facts: &HostFacts,
    env_files: &[(PathBuf, Vec<u8>)],
    image_env: Option<&[String]>,
    ch_env: &dyn Fn() -> Option<Vec<u8>>,
    home: Option<&Path>,
    log: &Log,
) -> Result<Env, Error> {
    let mut env: Env = facts.env.clone();
    let mut files = env_files.iter();
    for op in &plan.env_ops {
        match op {
            EnvOp::Pair(k, v) => {
                env.insert(k.clone(), v.clone());
            }
            EnvOp::File(_) => {
                if let Some((f, text)) = files.next() {
                    plan::apply_env_file(&mut env, text, &f.display().to_string())?;
                }
            }
            EnvOp::Image => {
                if let Some(list) = image_env {
                    plan::apply_env_list(&mut env, list);
                } else if let Some(text) = ch_env() {
                    plan::apply_env_file(&mut env, &text, "/ch/environment (in the image)")?;
                } else {
                    log.warn(|| "--set-env: the image has no environment".into());
                }
            }
            EnvOp::Unset(g) => plan::unset_env(&mut env, g),
        }
    }
    env.insert("CIMG_RUNNING".into(), "1".into());
    env.insert("CIMG_IMAGE".into(), plan.image.clone().into_os_string());
    if let Some(h) = home {
        env.insert("HOME".into(), h.as_os_str().to_os_string());
    }
    Ok(env)
}

/// Build a new container and run the command in it (the first peer of a group, or alone).
fn create(plan: Plan, group: Option<NewGroup>, log: Log, facts: &HostFacts) -> Result<i32, Error> {
    let source = match shared_mount(&plan, &log, facts)? {
        Some(a) => Source::Shared(Box::new(a)),
        None => open_image(&plan.image)?,
    };
    let config = match &source {
        Source::Cimg(img) => img.config().and_then(ImageConfig::parse),
        Source::Shared(a) => a.config.as_deref().and_then(ImageConfig::parse),
        Source::Dir(_) => None,
    };
    let image_env = config
        .as_ref()
        .map(|c| c.env.clone())
        .filter(|e| !e.is_empty());
    let image_workdir = config
        .as_ref()
        .and_then(|c| c.working_dir().map(Path::to_path_buf));
    log.v(|| format!("opened {}", plan.image.display()));

    // The user's ids and names, as the host knows them.
    let uid = Uid::current();
    let gid = Gid::current();
    let user = User::from_uid(uid).ok().flatten();

    let (in_uid, in_gid) = enter::inside_ids(&plan);
    enter::unshare_user_mount(in_uid, in_gid)?;
    log.v(|| format!("user and mount namespaces created, uid {in_uid} gid {in_gid}"));

    // Everything from the host that goes into the container, opened before anything is
    // mounted (in this namespace: a bind's source must be a mount of it).
    let user_name = user
        .as_ref()
        .map(|u| u.name.clone())
        .or_else(|| facts.var("USER"))
        .unwrap_or_else(|| format!("user{uid}"));
    let hosts = Hosts::open(&plan, user.as_ref(), facts)?;
    let passwd = plan.passwd.then(|| {
        let group_name = Group::from_gid(gid)
            .ok()
            .flatten()
            .map(|g| g.name)
            .unwrap_or_else(|| user_name.clone());
        let gecos = user
            .as_ref()
            .map(|u| u.gecos.to_string_lossy().into_owned())
            .unwrap_or_default();
        (
            plan::passwd_text(&user_name, in_uid, in_gid, &gecos),
            plan::group_text(&group_name, in_gid),
        )
    });
    let container = spec::ContainerSpec {
        writable: plan.write_fake.is_some(),
        private_tmp: plan.private_tmp,
        home: plan.home.then(|| user_name.clone()),
        binds: plan
            .binds
            .iter()
            .zip(&hosts.binds)
            .map(|(b, (h, _))| (b.clone(), h.is_dir))
            .collect(),
        host_etc: std::array::from_fn(|i| hosts.etc[i].is_some()),
        passwd,
    };
    let env_files = read_env_files(&plan)?;
    let record_hot = match &plan.record_hot {
        Some(p) => Some(std::path::absolute(p).map_err(|e| {
            Error::usage(format!(
                "--record-hot {}: {}",
                p.display(),
                enter::io_msg(&e)
            ))
        })?),
        None => None,
    };
    let host_cwd = facts.cwd.clone();

    // Signals are taken from a signalfd from now on; the children restore this mask.
    let (sfd, old_mask) = block_signals()?;

    // The FUSE server, forked while this process is single-threaded; it leaves this mount
    // namespace before anything is mounted in it.
    let me = Pid::this();
    let stage = Path::new(STAGE);
    let mut server: Option<(StartingServer, OwnedFd, OwnedFd)> = None;
    // launch's /dev/fuse fd, closed as soon as the server serves: the server's must be the
    // only one, so that its death aborts the connection (requests in flight then fail
    // instead of waiting for an answer that never comes, unkillable).
    let mut fuse_fd: Option<OwnedFd> = None;
    // The FUSE mount's root (O_PATH), to ask whether the connection is still alive.
    let mut fuse_root: Option<OwnedFd> = None;
    let mut image = None;
    let mut shared: Option<Box<service::Attached>> = None;
    match source {
        Source::Cimg(img) => {
            let fuse = enter::open_dev_fuse()?;
            let (ready_r, ready_w) =
                pipe2(OFlag::O_CLOEXEC).map_err(|e| Error::other(errno_msg("pipe", e)))?;
            let (go_r, go_w) =
                pipe2(OFlag::O_CLOEXEC).map_err(|e| Error::other(errno_msg("pipe", e)))?;
            let mut opts = enter::server_options(plan.cache_size, plan.read_ahead, true);
            opts.fs.record_hot = record_hot.clone();
            opts.fs.exec = Some(exec_hint(
                &plan,
                facts,
                image_env.as_deref(),
                image_workdir.as_deref(),
            ));
            match fork().map_err(|e| Error::other(errno_msg("fork", e)))? {
                Forked::Child => {
                    drop((ready_r, go_w));
                    let pipes = (go_r, ready_w);
                    let group = group.map(|g| {
                        let config = img.config().map(<[u8]>::to_vec).unwrap_or_default();
                        (g.listener, g.count, g.image, config)
                    });
                    server_main(*img, fuse, pipes, me, &old_mask, &plan.image, &opts, group)
                }
                Forked::Parent(pid) => {
                    drop((ready_w, go_r));
                    let mut s = StartingServer::new(pid);
                    s.wait_for(&ready_r, Startup::Left)?;
                    server = Some((s, ready_r, go_w));
                    fuse_fd = Some(fuse);
                }
            }
        }
        Source::Dir(d) => {
            if group.is_some() {
                return Err(Error::usage(
                    "joining needs a .cimg image (a directory image has no server to share)".into(),
                ));
            }
            image = Some(HostPath::open(&d, "image")?)
        }
        Source::Shared(a) => {
            // The group's peers are answered by the image's server, from a copy of the
            // listening socket; the name stays bound while it holds it.
            if let Some(g) = &group {
                service::serve_group(&a.conn, &g.listener, g.count, &g.image)?;
            }
            shared = Some(a);
        }
    }
    // The listener now belongs to the server (its copy); the group's name stays bound.
    let group = group.map(|g| (g.tag, g.addr, g.count, g.image));

    let built = (|| -> Result<Built, Error> {
        enter::mount_tmpfs(stage, "mode=0700,size=4m", "the staging area")?;
        let root_dir = stage.join("root");
        enter::mkdir(&root_dir)?;
        let writable = plan.write_fake.is_some();
        let lower = if writable {
            let l = stage.join("lower");
            enter::mkdir(&l)?;
            l
        } else {
            root_dir.clone()
        };
        if let (Some((srv, ready_r, go_w)), Some(fuse)) = (&mut server, fuse_fd.take()) {
            enter::mount_fuse(&plan.image, &fuse, &lower, (in_uid, in_gid), true)?;
            fuse_root = nix::fcntl::open(
                &lower,
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )
            .ok();
            // /dev/fuse can be read only once it is mounted: now the server may start. It
            // is told the number of launch's descriptor of the mount, to read the program's
            // files ahead through it (see `server_main`).
            let go = Startup::Go {
                root_fd: fuse_root
                    .as_ref()
                    .and_then(|r| u32::try_from(r.as_raw_fd()).ok()),
            };
            protocol::write_line(go_w.as_fd(), &go)
                .map_err(|e| Error::other(errno_msg("pipe", e)))?;
            srv.wait_for(ready_r, Startup::Ready)?;
            drop(fuse);
            log.v(|| "FUSE server answered".into());
        }
        if let Some(a) = &shared {
            let what = "the image's shared mount";
            let t = nix::fcntl::open(
                &lower,
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )
            .map_err(|e| Error::setup(errno_msg(what, e)))?;
            enter::attach_tree(&a.tree, &t)
                .map_err(|e| Error::setup(errno_msg(format!("cannot attach {what}"), e)))?;
            fuse_root = nix::fcntl::open(
                &lower,
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )
            .ok();
            log.v(|| "the image's shared mount attached".into());
        }
        if let Some(dir) = &image {
            let t = Root::open(&lower, false)?
                .resolve(Path::new("/"), OFlag::O_PATH)
                .map_err(|e| Error::setup(errno_msg(format!("{}", lower.display()), e)))?;
            dir.attach(&t, &plan.image.display().to_string())?;
            if !writable {
                let top = Root::open(&lower, false)?;
                enter::remount_ro(
                    &top.resolve(Path::new("/"), OFlag::O_PATH)
                        .map_err(|e| Error::setup(errno_msg("cannot reopen the root", e)))?,
                    "the image",
                )?;
            }
        }
        if let Some(size) = plan.write_fake {
            let rw = stage.join("rw");
            enter::mkdir(&rw)?;
            let opts = match size {
                Some(b) => format!("mode=0755,size={b}"),
                None => "mode=0755".to_string(),
            };
            enter::mount_tmpfs(&rw, &opts, "-W")?;
            enter::mkdir(&rw.join("up"))?;
            enter::mkdir(&rw.join("work"))?;
            let data = format!(
                "lowerdir={},upperdir={},workdir={},userxattr",
                lower.display(),
                rw.join("up").display(),
                rw.join("work").display()
            );
            nix::mount::mount(
                Some("overlay"),
                &root_dir,
                Some("overlay"),
                nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
                Some(data.as_str()),
            )
            .map_err(|e| Error::setup(errno_msg("-W: cannot mount the overlay", e)))?;
            log.v(|| "writable overlay mounted".into());
        }
        let root = Root::open(&root_dir, writable)?;
        let tree = spec::mounts(&container, &root);
        for w in &tree.warnings {
            log.warn(|| w.clone());
        }
        for n in &tree.notes {
            log.v(|| n.clone());
        }
        carry_out(&root, &tree.mounts, &hosts, stage)?;
        let container_home = tree.home;

        // The environment.
        let env = build_env(
            &plan,
            facts,
            &env_files,
            image_env.as_deref(),
            &|| root.read(Path::new("/ch/environment")).ok(),
            container_home.as_deref(),
            &log,
        )?;

        // The working directory.
        let cwd = if let Some(cd) = &plan.cd {
            if !root.is_dir(cd) {
                return Err(Error::setup(format!(
                    "--cd {}: no such directory in the container",
                    cd.display()
                )));
            }
            cd.clone()
        } else if let Some(w) = image_workdir.as_ref().filter(|w| root.is_dir(w)) {
            w.clone()
        } else if let Some(c) = host_cwd.as_ref().filter(|c| root.is_dir(c)) {
            c.clone()
        } else {
            PathBuf::from("/")
        };
        Ok(Built {
            root: root_dir,
            cwd,
            env,
        })
    })();
    // From here on, a failure is checked against the server's state: one caused by its
    // death is reported as that death. Dropping the guard on the way out kills it (before
    // its pipes close, which it would take for launch's failure and say so).
    let shared_conn = shared.as_ref().map(|a| &a.conn);
    let fail = |server: &mut Option<(StartingServer, OwnedFd, OwnedFd)>,
                fuse_root: &Option<OwnedFd>,
                e: Error| match server {
        Some((s, ..)) => s.judge(e, fuse_root.as_ref()),
        // A shared server's death shows as the mount's broken connection, or its socket's
        // end.
        None if shared_conn.is_some_and(|c| join::closed_within(c.as_fd(), Duration::ZERO))
            || fuse_root.as_ref().is_some_and(connection_gone) =>
        {
            Error::other("the image's server ended while the container was being set up".into())
        }
        None => e,
    };
    let built = match built {
        Ok(b) => b,
        Err(e) => return Err(fail(&mut server, &fuse_root, e)),
    };
    log.v(|| format!("container ready, cwd {}", built.cwd.display()));
    drop(hosts);

    // Launch itself moves into the container (pivot_root in this namespace; the staging
    // area and the host's root are detached), so the app needs no namespace of its own and
    // joiners enter through launch.
    if let Err(e) = enter::pivot(&built.root, &built.cwd) {
        return Err(fail(&mut server, &fuse_root, e));
    }
    log.v(|| "entered the container (pivot_root)".into());
    // A group's creator registers as soon as it is inside, so the other ranks enter while
    // its own command starts: joiners enter through registered peers.
    let conn = match group {
        Some((tag, addr, count, image)) => {
            match join::connect_creator(&tag, &addr, count, &image) {
                Ok(c) => Some(c),
                Err(e) => return Err(fail(&mut server, &fuse_root, e)),
            }
        }
        None => None,
    };
    // On a shared server, processes the command leaves behind come to launch (it is their
    // subreaper), so that it can tell they outlive the command ([`leave_keeper`]).
    if shared.is_some() {
        let _ = nix::sys::prctl::set_child_subreaper(true);
    }
    // The app.
    let app = match fork_app(&built.cwd, &built.env, &plan.cmd, me, &old_mask) {
        Ok(app) => app,
        Err(e) => return Err(fail(&mut server, &fuse_root, e)),
    };
    log.v(|| format!("exec'd {}", plan.cmd[0].to_string_lossy()));
    let mut conns: Vec<(&OwnedFd, &'static str)> = Vec::new();
    if let Some(a) = &shared {
        conns.push((&a.conn, "the image's FUSE server"));
    }
    if let Some(c) = &conn {
        conns.push((c, "the group's FUSE server"));
    }
    let watch = Watch {
        server: server.map(|(s, ..)| s.serving()),
        keep: shared.is_some(),
        fuse_root,
        conns,
    };
    supervise(&sfd, app, watch, &log)
}

/// Run the command in a container that exists: a group's (through a peer inside) or a
/// process's (`--join-pid`).
fn enter_existing(
    plan: Plan,
    host: Host,
    entry: Entry,
    log: Log,
    facts: &HostFacts,
) -> Result<i32, Error> {
    let Host {
        env_files,
        cwd: host_cwd,
        user_name,
    } = host;
    let (sfd, old_mask) = block_signals()?;
    let (conn, config, what) = match entry {
        Entry::Pid(pid) => {
            // A process in the middle of an execve shows an empty environment until the
            // new program's is set up, which can take a FUSE read (`sh -c '...; exec
            // sleep 30'` joined right after its output failed 3 times in 10): ask again
            // for a while before concluding.
            let read_environ = || {
                fs::read(format!("/proc/{pid}/environ"))
                    .map_err(|e| Error::usage(format!("--join-pid {pid}: {}", enter::io_msg(&e))))
            };
            let mut environ = read_environ()?;
            for _ in 0..100 {
                if !environ.is_empty() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
                environ = read_environ()?;
            }
            if !environ.split(|&c| c == 0).any(|v| v == b"CIMG_RUNNING=1") {
                return Err(Error::usage(format!(
                    "--join-pid {pid}: that process is not in a cimg container"
                )));
            }
            let pidfd = enter::pidfd_open(pid)
                .map_err(|e| Error::usage(errno_msg(format!("--join-pid {pid}"), e)))?;
            let what = format!("the container of process {pid}");
            nix::sched::setns(&pidfd, CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS)
                .map_err(|e| Error::other(errno_msg(format!("cannot enter {what}"), e)))?;
            (None, Vec::new(), what)
        }
        Entry::Joined { conn, config } => (Some(conn), config, "the group's container".to_string()),
    };
    if let Some(c) = &conn {
        join::register(c)?;
    }
    log.v(|| format!("entered {what}"));
    let ignored: Vec<&str> = [
        (!plan.binds.is_empty(), "--bind"),
        (plan.write_fake.is_some(), "--write-fake"),
        (plan.private_tmp, "--private-tmp"),
        (plan.uid.is_some() || plan.gid.is_some(), "--uid/--gid"),
        (!plan.passwd, "--no-passwd"),
        (plan.record_hot.is_some(), "--record-hot"),
        (plan.cache_size.is_some(), "--cache-size"),
    ]
    .into_iter()
    .filter_map(|(given, opt)| given.then_some(opt))
    .collect();
    if !ignored.is_empty() {
        log.warn(|| {
            format!(
                "{} ignored: {what} was made by another launch, with its options",
                ignored.join(", ")
            )
        });
    }
    let config = ImageConfig::parse(&config);
    let home = PathBuf::from("/home").join(&user_name);
    let home = (plan.home && home.is_dir()).then_some(home);
    let env = build_env(
        &plan,
        facts,
        &env_files,
        config
            .as_ref()
            .map(|c| c.env.as_slice())
            .filter(|e| !e.is_empty()),
        &|| fs::read("/ch/environment").ok(),
        home.as_deref(),
        &log,
    )?;
    let cwd = if let Some(cd) = &plan.cd {
        if !cd.is_dir() {
            return Err(Error::setup(format!(
                "--cd {}: no such directory in the container",
                cd.display()
            )));
        }
        cd.clone()
    } else if let Some(w) = config
        .as_ref()
        .and_then(|c| c.working_dir().map(Path::to_path_buf))
        .filter(|w| w.is_dir())
    {
        w
    } else if let Some(c) = host_cwd.filter(|c| c.is_dir()) {
        c
    } else {
        PathBuf::from("/")
    };
    let app = fork_app(&cwd, &env, &plan.cmd, Pid::this(), &old_mask)?;
    log.v(|| format!("exec'd {}", plan.cmd[0].to_string_lossy()));
    let watch = Watch {
        server: None,
        fuse_root: None,
        conns: conn
            .iter()
            .map(|c| (c, "the group's FUSE server"))
            .collect(),
        keep: false,
    };
    supervise(&sfd, app, watch, &log)
}

/// Fork the app and wait until it has exec'd the command (or failed to: its error).
fn fork_app(
    cwd: &Path,
    env: &Env,
    cmd: &[OsString],
    me: Pid,
    old_mask: &SigSet,
) -> Result<Pid, Error> {
    let (err_r, err_w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| Error::other(errno_msg("pipe", e)))?;
    let exec = enter::Exec::new(cmd, env);
    let app = crate::sys::spawn_shared(&mut || app_main(cwd, &exec, &err_w, me, old_mask))
        .map_err(|e| Error::other(errno_msg("clone", e)))?;
    drop(err_w);
    let mut report = Vec::new();
    let _ = fs::File::from(err_r).read_to_end(&mut report);
    if !report.is_empty() {
        let _ = waitpid(app, None);
        let text = String::from_utf8_lossy(&report);
        let (code, msg) = text.split_once('\t').unwrap_or(("125", &text));
        return Err(Error::new(code.parse().unwrap_or(125), msg.to_string()));
    }
    Ok(app)
}

/// The container, ready to enter.
struct Built {
    /// The new root, to pivot into.
    root: PathBuf,
    cwd: PathBuf,
    env: Env,
}

/// Where the command will be found, for the server to decompress its program and libraries
/// ahead ([`cimg_fuse::exec`]). A guess made before the container's environment is complete
/// (`--set-env` files and the image's `/ch/environment` are read later): the `PATH`s of the
/// host and of the image's config, then the default one, are all tried, first match wins.
fn exec_hint(
    plan: &Plan,
    facts: &HostFacts,
    image_env: Option<&[String]>,
    image_workdir: Option<&Path>,
) -> cimg_fuse::exec::ExecHint {
    let cmd = plan.cmd.first().map(|c| c.as_os_str()).unwrap_or_default();
    let image_path = image_env
        .into_iter()
        .flatten()
        .find_map(|kv| kv.strip_prefix("PATH="))
        .map(std::ffi::OsStr::new);
    let mut candidates = Vec::new();
    for path in [facts.var_os("PATH"), image_path, None] {
        for c in plan::candidates(cmd, path) {
            if !candidates.contains(&c) {
                candidates.push(c);
            }
        }
    }
    let cwd = plan
        .cd
        .as_deref()
        .or(image_workdir)
        .or(facts.cwd.as_deref())
        .unwrap_or(Path::new("/"))
        .to_path_buf();
    let library_path = facts
        .var_os("LD_LIBRARY_PATH")
        .map(|l| std::env::split_paths(l).collect())
        .unwrap_or_default();
    cimg_fuse::exec::ExecHint {
        candidates,
        cwd,
        library_path,
    }
}

/// A container on the image's shared server, unless `--private` (or an option that shapes
/// one container's server, `--record-hot`) says otherwise or the image is not a file: then
/// `None`, and the launch mounts the image itself. One `stat` of the image when its server
/// is live ([`service`]).
fn shared_mount(
    plan: &Plan,
    log: &Log,
    facts: &HostFacts,
) -> Result<Option<service::Attached>, Error> {
    if plan.private || plan.record_hot.is_some() {
        return Ok(None);
    }
    // A directory, or an error the private path reports: not for the service.
    let Some(looked) = service::look(&plan.image) else {
        return Ok(None);
    };
    let linger = match (plan.linger, facts.var("CIMG_LINGER")) {
        (Some(l), _) => l,
        (None, Some(v)) => service::parse_duration(&v).ok_or_else(|| {
            Error::usage(format!(
                "CIMG_LINGER={v:?}: not a duration (e.g. 300, 30s, 5m, 1h)"
            ))
        })?,
        (None, None) => service::DEFAULT_LINGER,
    };
    let key = service::Key::new(
        looked.file,
        enter::inside_ids(plan),
        plan.read_ahead,
        plan.cache_size,
    );
    let h = exec_hint(plan, facts, None, None);
    let start = service::Start {
        image: std::path::absolute(&plan.image).unwrap_or_else(|_| plan.image.clone()),
        read_ahead: plan.read_ahead,
        cache_size: plan.cache_size,
        hint: crate::protocol::Hint {
            candidates: h.candidates,
            cwd: h.cwd,
            library_path: h.library_path,
        },
        size: looked.file.2,
    };
    match service::attach(&key, &looked, &start, linger)? {
        service::Outcome::Shared(a) => {
            log.v(|| format!("on the shared server of {}", plan.image.display()));
            Ok(Some(a))
        }
        service::Outcome::Private(why) => {
            if let Some(w) = why {
                log.warn(|| w);
            }
            Ok(None)
        }
    }
}

fn open_image(path: &Path) -> Result<Source, Error> {
    // One open and the reader's one fstat: on a parallel filesystem every stat or lookup of
    // the path is a metadata operation on the server (the storm benchmark counts them). A
    // directory opens too, and its first read says what it is.
    // Opened without blocking: a FIFO would block a plain open forever (its type is looked
    // at only if the reader refuses it, to keep to one fstat).
    let file = cimg_format::reader::open_nonblocking(path).map_err(|e| match e {
        cimg_format::Error::Io { err, .. } => {
            Error::image(format!("{}: {}", path.display(), enter::io_msg(&err)))
        }
        e => Error::image(e.to_string()),
    })?;
    let probe = file.try_clone().ok();
    // Lazily, as the FUSE driver opens it: the metadata is decompressed and checked as the
    // container uses it (`cimg_format::OpenOptions::lazy`).
    let opts = cimg_format::OpenOptions {
        lazy: true,
        ..Default::default()
    };
    match cimg_format::Image::from_reader(file, path, &opts) {
        Ok(img) => Ok(Source::Cimg(Box::new(img))),
        Err(cimg_format::Error::Io { err, .. })
            if err.raw_os_error() == Some(nix::libc::EISDIR) =>
        {
            Ok(Source::Dir(path.to_path_buf()))
        }
        // A directory too small for the reader's first check (tmpfs reports tiny sizes).
        Err(_) if path.is_dir() => Ok(Source::Dir(path.to_path_buf())),
        Err(e) => match probe.map(|f| cimg_format::reader::check_regular(&f, path, true)) {
            Some(Err(not_regular)) => Err(Error::image(not_regular.to_string())),
            _ => Err(Error::image(e.to_string())),
        },
    }
}

/// The app's process inside the container, before it execs, sharing launch's memory
/// ([`crate::sys::spawn_shared`], so it only borrows): no privileges, exec. On failure,
/// `code\tmessage` goes to `report` (closed by a successful exec) and the code is returned.
fn app_main(cwd: &Path, exec: &enter::Exec, report: &OwnedFd, parent: Pid, mask: &SigSet) -> i32 {
    let err = (|| -> Error {
        if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
            return Error::other(errno_msg("pdeathsig", e));
        }
        if getppid() != parent {
            return Error::other("launch exited".into());
        }
        if let Err(e) = sigprocmask(SigmaskHow::SIG_SETMASK, Some(mask), None) {
            return Error::other(errno_msg("sigprocmask", e));
        }
        if let Err(e) = crate::sys::restore_sigpipe() {
            return Error::other(errno_msg("SIGPIPE", e));
        }
        if let Err(e) = nix::unistd::chdir(cwd) {
            return Error::setup(errno_msg(format!("cannot change to {}", cwd.display()), e));
        }
        if let Err(e) = enter::drop_privileges() {
            return e;
        }
        exec.exec()
    })();
    let msg = format!("{}\t{}", err.code(), err);
    let _ = nix::unistd::write(report, msg.as_bytes());
    err.code()
}

/// What the supervisor watches besides the app: the FUSE server it started (a private
/// mount), the mount's root (to ask whether its connection is alive), and connections whose
/// end means the image's server died (a shared server's, a join group's).
struct Watch<'a> {
    server: Option<Pid>,
    fuse_root: Option<OwnedFd>,
    conns: Vec<(&'a OwnedFd, &'static str)>,
    /// The first connection stands for the container on a shared server: while processes
    /// of the container outlive the command, a keeper must hold it.
    keep: bool,
}

/// Wait for the app, forwarding signals; the app's exit code, 128+N for signal N.
fn supervise(sfd: &SignalFd, app: Pid, watch: Watch<'_>, log: &Log) -> Result<i32, Error> {
    let Watch {
        server,
        fuse_root,
        mut conns,
        keep,
    } = watch;
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let pgrp = getpgrp();
    let mut server_died: Option<String> = None;
    let ended = |what: &str| format!("{what} ended; the container was killed");
    loop {
        let mut fds = vec![PollFd::new(sfd.as_fd(), PollFlags::POLLIN)];
        for (c, _) in &conns {
            fds.push(PollFd::new(c.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(Error::other(errno_msg("poll", e))),
        }
        let ready: Vec<bool> = fds[1..]
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        let mut i = 0;
        conns.retain(|(c, what)| {
            let keep = !(ready[i] && join::closed(c.as_fd()));
            i += 1;
            if !keep && server_died.is_none() {
                server_died = Some(ended(what));
                kill_container(app);
            }
            keep
        });
        let si = match sfd.read_signal() {
            Ok(Some(si)) => si,
            Ok(None) | Err(Errno::EINTR) | Err(Errno::EAGAIN) => continue,
            Err(e) => return Err(Error::other(errno_msg("signalfd", e))),
        };
        let Ok(sig) = Signal::try_from(si.ssi_signo as i32) else {
            continue;
        };
        if sig != Signal::SIGCHLD {
            // The terminal signals the whole foreground group: the app got it already.
            let from_tty = si.ssi_code == nix::libc::SI_KERNEL;
            if !(from_tty && getpgid(Some(app)) == Ok(pgrp)) {
                let _ = kill(app, sig);
            }
            continue;
        }
        let mut app_status = None;
        loop {
            let st = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(st) => st,
            };
            let (pid, code, how) = match st {
                WaitStatus::Exited(p, c) => (p, c, format!("exit status {c}")),
                WaitStatus::Signaled(p, s, _) => (p, 128 + s as i32, format!("signal {s}")),
                _ => continue,
            };
            if pid == app {
                log.v(|| format!("app ended: {how}"));
                app_status = Some(code);
            }
            if Some(pid) == server {
                server_died = Some(ended(&format!("the FUSE server ({how})")));
                kill_container(app);
            }
        }
        if let Some(code) = app_status {
            // The app may have died because the image went away — by the aborted mount
            // itself (SIGBUS on a mapped page, an exec or read error) or killed by a peer
            // that saw it first (SIGKILL) — while the server's end has not shown yet. Say
            // so rather than pass on the app's status: after an abnormal end, ask the mount
            // (a statfs reaches the server; ENOTCONN once the connection is gone) and then
            // give the server's exit a moment to be seen.
            let abnormal = code != 0;
            let gone = abnormal && fuse_root.as_ref().is_some_and(connection_gone);
            let wait = if gone || code == 128 + Signal::SIGKILL as i32 {
                std::time::Duration::from_millis(200)
            } else {
                std::time::Duration::ZERO
            };
            if server_died.is_none()
                && let Some(pid) = server
                && let Some(how) = exited_within(pid, wait)
            {
                server_died = Some(ended(&format!("the FUSE server ({how})")));
                kill_container(app);
            }
            if server_died.is_none()
                && let Some((_, what)) = conns
                    .iter()
                    .find(|(c, _)| join::closed_within(c.as_fd(), wait))
            {
                server_died = Some(ended(what));
            }
            if server_died.is_none() && gone {
                server_died = Some("the FUSE connection is gone; the container was killed".into());
                kill_container(app);
            }
            if server_died.is_none() && keep {
                leave_keeper(&conns[..conns.len().min(1)], &|m| log.v(|| m.to_string()));
            }
            return match server_died {
                Some(why) => Err(Error::other(why)),
                None => Ok(code),
            };
        }
    }
}

/// The image is gone (its server died): SIGKILL the app and every other process of this
/// container (those in launch's mount namespace), so nothing is left using a dead mount —
/// except the other peers' launch processes, which see the same and report it themselves.
fn kill_container(app: Pid) {
    let _ = kill(app, Signal::SIGKILL);
    let (Ok(me), Ok(exe)) = (
        fs::read_link("/proc/self/ns/mnt"),
        fs::read_link("/proc/self/exe"),
    ) else {
        return;
    };
    let own = std::process::id();
    let Ok(dir) = fs::read_dir("/proc") else {
        return;
    };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid as u32 != own
            && fs::read_link(e.path().join("ns/mnt")).is_ok_and(|ns| ns == me)
            && fs::read_link(e.path().join("exe")).is_ok_and(|x| x != exe)
        {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}
