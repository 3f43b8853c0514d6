//! Everything that crosses a process boundary between launches and their servers, typed:
//! a launch and its image's server ([`crate::service`]: [`Request`], [`Reply`], one message
//! per `SOCK_SEQPACKET` datagram, JSON of at most [`MAX_MESSAGE`] bytes), and the peers of a
//! join group and the group's server ([`crate::join`]: [`JoinRequest`], [`JoinReply`], JSON
//! lines on a stream socket). Descriptors pass alongside with `SCM_RIGHTS`.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::PathBuf;

use nix::errno::Errno;
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};

/// The longest message either side accepts (the image config travels in one).
pub const MAX_MESSAGE: usize = 1 << 20;

/// The most descriptors one message carries.
const MAX_FDS: usize = 2;

/// Where the command's files are, for a starting server to read them ahead (see
/// [`cimg_fuse::exec::ExecHint`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hint {
    /// Paths the command may be found at, first match wins.
    pub candidates: Vec<PathBuf>,
    /// The working directory, for relative candidates.
    pub cwd: PathBuf,
    /// `LD_LIBRARY_PATH`'s directories.
    pub library_path: Vec<PathBuf>,
}

/// From a launch to the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// A new container: send a copy of the mount's tree. `linger_ms` is how long the server
    /// stays once idle (the latest launch's wish wins).
    Attach {
        /// Linger after the last container, in milliseconds.
        linger_ms: u64,
    },
    /// Serve the join group on the listening socket passed with this message.
    ServeGroup {
        /// Peers per node.
        count: u32,
        /// The image path peers must agree on.
        image: PathBuf,
    },
    /// How the server is.
    Status,
    /// End the server (and every container it serves).
    Stop,
}

/// From the server to a launch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// The mount's tree (a detached `open_tree` copy, passed with this message) and the
    /// image's config (JSON), if any.
    Tree {
        /// The image config.
        config: Option<Vec<u8>>,
    },
    /// The answer to [`Request::Status`].
    Status(Status),
    /// Done.
    Ok,
    /// The request cannot be served.
    Refused(String),
}

/// What `launch --servers` shows of a server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The server's pid (in the caller's pid namespace: there is only one here).
    pub pid: i32,
    /// The image, as the first launch named it (absolute).
    pub image: PathBuf,
    /// Containers alive.
    pub containers: usize,
    /// Milliseconds since the last container ended (0 while any is alive).
    pub idle_ms: u64,
    /// How long it lingers once idle.
    pub linger_ms: u64,
}

/// From a peer of a join group to the group's server (`crate::join`), one JSON line each on
/// a stream socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JoinRequest {
    /// Let me into the group's container (`count` peers per node, running `image`).
    Join {
        /// Peers per node, as this peer sees it.
        count: u32,
        /// The image path, made absolute.
        image: PathBuf,
    },
    /// The creator, inside its container, registers.
    Creator {
        /// Peers per node.
        count: u32,
        /// The image path, made absolute.
        image: PathBuf,
    },
    /// This joiner is inside now.
    Inside,
}

/// From a join group's server to a peer that asked to join.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JoinReply {
    /// Enter through the process whose pidfd comes with this message; the image's config.
    Enter {
        /// The image config (JSON), if any.
        config: Option<String>,
    },
    /// The peer does not belong to this group: why.
    Refused(String),
}

/// The start-up of a private mount's FUSE server (`supervise`), over two pipes: the server
/// says [`Startup::Left`] and [`Startup::Ready`], launch says [`Startup::Go`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Startup {
    /// The server has left launch's mount namespace: launch may mount.
    Left,
    /// The filesystem is mounted: serve it. `root_fd` is launch's descriptor of the mount's
    /// root, which the server's read-ahead helper reads through (`/proc/LAUNCH/fd/N`).
    Go {
        /// Launch's descriptor number of the mount's root.
        root_fd: Option<u32>,
    },
    /// The server answered the kernel's handshake and serves.
    Ready,
}

/// Write `msg` to the pipe `fd` as one line (one write, shorter than `PIPE_BUF`: atomic).
pub fn write_line<T: Serialize>(fd: BorrowedFd<'_>, msg: &T) -> Result<(), Errno> {
    nix::unistd::write(fd, &line(msg)).map(|_| ())
}

/// Read one line from the pipe `fd` (its writer sends one at a time and waits for an
/// answer) and parse it; `None` at end of file or on anything else.
pub fn read_line<T: for<'de> Deserialize<'de>>(fd: BorrowedFd<'_>) -> Option<T> {
    let mut buf = [0u8; 256];
    let mut got = 0;
    while got < buf.len() {
        match nix::unistd::read(fd, &mut buf[got..]) {
            Ok(0) => return None,
            Ok(n) => {
                got += n;
                if buf[..got].ends_with(b"\n") {
                    return parse_line(&buf[..got - 1]);
                }
            }
            Err(Errno::EINTR) => {}
            Err(_) => return None,
        }
    }
    None
}

/// `msg` as one line of JSON (compact JSON has no raw newline), for a stream socket.
pub fn line<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut v = serde_json::to_vec(msg).unwrap_or_default();
    v.push(b'\n');
    v
}

/// One line of JSON (without its newline) parsed, or `None`.
pub fn parse_line<T: for<'de> Deserialize<'de>>(line: &[u8]) -> Option<T> {
    serde_json::from_slice(line).ok()
}

/// Send `msg` with `fds` on the datagram socket `fd`, without blocking: a peer that does not
/// read cannot hold the sender.
pub fn send<T: Serialize>(fd: BorrowedFd<'_>, msg: &T, fds: &[RawFd]) -> Result<(), Errno> {
    let bytes = serde_json::to_vec(msg).map_err(|_| Errno::EINVAL)?;
    if bytes.len() > MAX_MESSAGE {
        return Err(Errno::EMSGSIZE);
    }
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    sendmsg::<UnixAddr>(
        fd.as_raw_fd(),
        &[IoSlice::new(&bytes)],
        cmsgs,
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map(|_| ())
}

/// What [`recv`] got.
#[derive(Debug)]
pub enum Received<T> {
    /// A message and the descriptors that came with it.
    Message(T, Vec<OwnedFd>),
    /// The peer closed the connection.
    Closed,
}

/// Receive one message from `fd` (blocking unless the socket is non-blocking). A message
/// that is cut (longer than [`MAX_MESSAGE`]) or does not parse is `EBADMSG`.
pub fn recv<T: for<'de> Deserialize<'de>>(fd: BorrowedFd<'_>) -> Result<Received<T>, Errno> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (n, fds, cut) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<UnixAddr>(
            fd.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut fds = Vec::new();
        if let Ok(cms) = msg.cmsgs() {
            for c in cms {
                if let ControlMessageOwned::ScmRights(f) = c {
                    fds.extend(f);
                }
            }
        }
        let cut = msg
            .flags
            .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
        (msg.bytes, crate::sys::own_fds(fds), cut)
    };
    if n == 0 && fds.is_empty() {
        return Ok(Received::Closed);
    }
    if cut {
        return Err(Errno::EBADMSG);
    }
    let msg = serde_json::from_slice(&buf[..n]).map_err(|_| Errno::EBADMSG)?;
    Ok(Received::Message(msg, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    use std::os::fd::AsFd;

    #[test]
    fn messages_and_descriptors_cross_a_socket() {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let req = Request::Attach { linger_ms: 7 };
        send(a.as_fd(), &req, &[]).unwrap();
        match recv::<Request>(b.as_fd()).unwrap() {
            Received::Message(m, fds) => {
                assert_eq!(m, req);
                assert!(fds.is_empty());
            }
            Received::Closed => panic!("closed"),
        }
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        let reply = Reply::Tree {
            config: Some(b"{}".to_vec()),
        };
        send(b.as_fd(), &reply, &[file.as_raw_fd()]).unwrap();
        match recv::<Reply>(a.as_fd()).unwrap() {
            Received::Message(m, fds) => {
                assert_eq!(m, reply);
                assert_eq!(fds.len(), 1);
            }
            Received::Closed => panic!("closed"),
        }
        // Garbage is refused, not parsed into something.
        nix::unistd::write(&a, b"not json").unwrap();
        assert_eq!(recv::<Reply>(b.as_fd()).unwrap_err(), Errno::EBADMSG);
        drop(a);
        assert!(matches!(
            recv::<Reply>(b.as_fd()).unwrap(),
            Received::Closed
        ));
    }
}
