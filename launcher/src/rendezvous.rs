//! Meeting places on this node: abstract Unix socket names, one set per host user, where
//! launches of one user find each other (a join group, an image's server).
//!
//! - Nothing on disk: a name disappears with the last socket bound to it, so a SIGKILLed
//!   holder leaves nothing behind; binding a name is the atomic election of its holder.
//! - Names are made from the caller's uid on the host, read before any user namespace is
//!   made (inside one, with `-u`, the caller's uid is another).
//! - Trust is checked on host ids at both ends ([`same_user`]): another user can see the
//!   names (`/proc/net/unix`) and bind them, but never pass for the owner.
//! - A name held by another user (squatting) moves the caller to the next of [`NAMES`]
//!   names; all of them held costs the caller its sharing, never its job.

use std::os::fd::AsFd;
use std::time::Duration;

use nix::sys::socket::{UnixAddr, getsockopt, sockopt};
use nix::unistd::Uid;

use crate::error::{Error, errno_msg};

/// How many names a meeting place has: the first free one of the owner is used.
pub const NAMES: u32 = 8;

/// How long a name that refuses connections but cannot be bound (bound by a socket that does
/// not listen) may stay so before it counts as held by someone else: a holder is in that
/// state only between its bind and its listen.
pub const SQUAT_WAIT: Duration = Duration::from_millis(500);

/// Name `k` (0-based) of the meeting place `kind`/`key` of host user `uid`:
/// `cimg-KIND/UID/KEY`, then `…#K`. A key longer than 64 bytes is hashed.
pub fn address(uid: Uid, kind: &str, key: &str, k: u32) -> Result<UnixAddr, Error> {
    let key = if key.len() > 64 {
        format!("{:032x}", xxhash_rust::xxh3::xxh3_128(key.as_bytes()))
    } else {
        key.to_string()
    };
    let name = match k {
        0 => format!("cimg-{kind}/{uid}/{key}"),
        k => format!("cimg-{kind}/{uid}/{key}#{k}"),
    };
    UnixAddr::new_abstract(name.as_bytes()).map_err(|e| Error::other(errno_msg("socket name", e)))
}

/// Whether the process at the other end of `fd` belongs to this process's user on the host.
/// `SO_PEERCRED` is read in this process's user namespace, where every host user it does
/// not map reads as the overflow uid: when that is this process's own uid there (`-u
/// 65534`), another user would pass for it, so the peer must also be one this process may
/// signal, which the kernel decides on host ids ([`crate::sys::may_signal`], on the peer's
/// pidfd: no pid reuse). Otherwise the uid says it all (and a listening socket's peer may
/// be a process that has exited, whose pidfd says nothing).
pub fn same_user(fd: &impl AsFd) -> bool {
    let Ok(c) = getsockopt(fd, sockopt::PeerCredentials) else {
        return false;
    };
    let me = Uid::current().as_raw();
    if c.uid() != me {
        return false;
    }
    me != overflow_uid()
        || getsockopt(fd, sockopt::PeerPidfd).is_ok_and(|p| crate::sys::may_signal(&p))
}

/// The uid the kernel shows for an unmapped one (`kernel.overflowuid`), read once.
fn overflow_uid() -> u32 {
    static OVERFLOW: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *OVERFLOW.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/overflowuid")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(65534)
    })
}

/// The pid of the process at the other end of `fd`, as this process's pid namespace sees it.
pub fn peer_pid(fd: &impl AsFd) -> Option<i32> {
    getsockopt(fd, sockopt::PeerCredentials)
        .ok()
        .map(|c| c.pid())
}
