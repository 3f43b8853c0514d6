//! The keeper: a process of a container on a shared server that outlives the command's
//! launch while other processes of the container live on (daemons), holding the connection
//! that stands for the container ([`leave_keeper`]).

use std::fs;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{Pid, setsid};

use crate::enter;
use crate::join;
use crate::sys::{Forked, fork};

/// The command has ended but processes it started live on (daemons, reparented to launch,
/// their subreaper): leave behind a keeper, a process of the container that holds the
/// connection standing for it (the shared server counts the container alive while it is
/// open) until no other process is left in the container, or kills them if the server dies
/// first. Launch itself exits with the command's status at once, as without a keeper.
/// It keeps nothing else of launch's: a join group's connection in particular ends with the
/// command (a group whose peers have all ended is over; the next launch with its tag makes
/// a new container).
pub fn leave_keeper(conns: &[(&OwnedFd, &'static str)], log: &dyn Fn(&str)) {
    if !matches!(
        waitpid(None, Some(WaitPidFlag::WNOHANG)),
        Ok(WaitStatus::StillAlive)
    ) {
        return;
    }
    log("processes outlive the command: a keeper holds the container");
    if let Ok(Forked::Child) = fork() {
        let keep: Vec<_> = conns.iter().map(|(c, _)| c.as_raw_fd()).collect();
        enter::close_all_but(&keep);
        let _ = setsid();
        let _ = nix::sys::prctl::set_name(c"cimg-keeper");
        let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
        enter::detach_stdio(true);
        keeper_main(conns)
    }
}

/// The keeper's loop: every second, or when a connection closes.
fn keeper_main(conns: &[(&OwnedFd, &'static str)]) -> ! {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    loop {
        let mut fds: Vec<PollFd> = conns
            .iter()
            .map(|(c, _)| PollFd::new(c.as_fd(), PollFlags::POLLIN))
            .collect();
        let _ = poll(&mut fds, PollTimeout::from(1000u16));
        let closed = fds.iter().zip(conns).any(|(f, (c, _))| {
            f.revents().is_some_and(|r| !r.is_empty()) && join::closed(c.as_fd())
        });
        drop(fds);
        let others = others_in_this_container();
        if closed {
            for pid in others {
                let _ = kill(pid, Signal::SIGKILL);
            }
            std::process::exit(0);
        }
        if others.is_empty() {
            std::process::exit(0);
        }
    }
}

/// The other processes in this process's mount namespace (the container's).
fn others_in_this_container() -> Vec<Pid> {
    let (Ok(me), Ok(dir)) = (fs::read_link("/proc/self/ns/mnt"), fs::read_dir("/proc")) else {
        return Vec::new();
    };
    let own = std::process::id();
    dir.flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            (pid != own && fs::read_link(e.path().join("ns/mnt")).is_ok_and(|ns| ns == me))
                .then(|| Pid::from_raw(pid as i32))
        })
        .collect()
}
