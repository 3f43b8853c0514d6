//! The only module of `launch` with `unsafe` code: the program's C entry point, process
//! creation (fork), and the two calls that neither `nix` nor `rustix` wraps (mount_setattr,
//! and pidfd_send_signal of signal 0). Everything else the launcher needs from the kernel
//! has a safe wrapper in `nix`, `rustix` or `caps`.

#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::unistd::{ForkResult, Pid};

/// The C entry point (`main.rs` is `#![no_main]`), called by the libc's start-up code. The
/// arguments are read by `std::env::args_os`, which the standard library fills from the
/// libc's start-up on Linux without its runtime.
#[cfg(not(test))]
// SAFETY: no other symbol of the program is named `main` (the crate has no Rust `fn main`
// outside tests), and the signature is C's `int main(void)`, which the libc may call with
// argc, argv and envp in registers that this function ignores.
#[unsafe(no_mangle)]
extern "C" fn main() -> nix::libc::c_int {
    ignore_sigpipe();
    crate::launch_main()
}

/// Whether the caller had SIGPIPE ignored when launch started.
static SIGPIPE_WAS_IGNORED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Ignore SIGPIPE in launch and its FUSE server: a write to a peer's socket or a pipe whose
/// reader went away is an EPIPE error to handle, not death. The caller's disposition is kept
/// for the app ([`restore_sigpipe`]).
#[cfg_attr(test, allow(dead_code))]
fn ignore_sigpipe() {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let ign = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    // SAFETY: installs SIG_IGN (no handler function runs); nothing else in the process
    // changes SIGPIPE's disposition concurrently (this runs first in main, single-threaded).
    if let Ok(old) = unsafe { sigaction(Signal::SIGPIPE, &ign) } {
        SIGPIPE_WAS_IGNORED.store(
            old.handler() == SigHandler::SigIgn,
            std::sync::atomic::Ordering::Relaxed,
        );
    }
}

/// In the app's process before exec: give SIGPIPE back the disposition the caller gave
/// launch (default, unless the caller ignored it), so `yes | head` in the container ends
/// quietly as on the host.
pub fn restore_sigpipe() -> Result<(), Errno> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    if SIGPIPE_WAS_IGNORED.load(std::sync::atomic::Ordering::Relaxed) {
        return Ok(());
    }
    let dfl = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    // SAFETY: installs SIG_DFL (no handler function); the app's process is single-threaded
    // (a fork of the single-threaded launcher) and about to exec.
    unsafe { sigaction(Signal::SIGPIPE, &dfl) }.map(|_| ())
}

/// Which side of a fork this is.
pub enum Forked {
    /// The parent; the child's pid.
    Parent(Pid),
    /// The child.
    Child,
}

/// fork(2). Callers fork only while the process is single-threaded (the launcher never
/// starts a thread; the FUSE server forks its read-ahead helper, then starts its threads), so
/// the child may allocate and do anything the parent could.
pub fn fork() -> Result<Forked, Errno> {
    // SAFETY: the launcher process, and the FUSE server before it starts serving, are
    // single-threaded whenever they fork (`cimg_format::Image::open` joins any helper threads
    // before returning), so no lock (allocator, stdio) can be held by another thread in the
    // child.
    match unsafe { nix::unistd::fork() }? {
        ForkResult::Parent { child } => Ok(Forked::Parent(child)),
        ForkResult::Child => Ok(Forked::Child),
    }
}

/// Stack of a [`spawn_shared`] child: it runs a few hundred bytes of frames (prctl, chdir,
/// the exec loop, an error message); generous, as an overflow would go unnoticed.
const SHARED_CHILD_STACK: usize = 512 << 10;

/// Start a process that runs `child` and execs (or returns its exit status), sharing this
/// process's memory until then: `clone(CLONE_VM | CLONE_VFORK)`, as `posix_spawn` does. This
/// process waits meanwhile. Unlike `fork`, no page table is copied and neither side takes
/// copy-on-write faults afterwards (a joining `launch … -- /bin/true`, `perf stat -r 30 -e
/// task-clock,minor-faults`, interleaved with the fork build: 198 → 150 page faults, 1.46-1.59
/// → 1.33-1.45 ms of CPU).
///
/// `child` must not drop or move anything it borrows (that memory is this process's), must
/// not unwind, and must end in `execve` or by returning; it runs on its own stack, with this
/// process's file descriptors copied (closing one there does not close it here).
pub fn spawn_shared(child: &mut dyn FnMut() -> i32) -> Result<Pid, Errno> {
    let mut stack = vec![0u8; SHARED_CHILD_STACK];
    let cb: nix::sched::CloneCb<'_> = Box::new(|| child() as isize);
    // SAFETY: CLONE_VFORK suspends this process until the child execs or exits, so the two
    // never run at once on the shared memory; this process is single-threaded when it
    // spawns (as for `fork` above), so no other thread can hold a lock (the allocator's)
    // that the child needs. The child runs `child` on `stack`, which outlives it (we return
    // only after the child has execed or exited); nix's trampoline ends it with `_exit` of
    // the returned status (no atexit handlers, no stdio flush in the shared memory).
    unsafe {
        nix::sched::clone(
            cb,
            &mut stack,
            nix::sched::CloneFlags::CLONE_VM | nix::sched::CloneFlags::CLONE_VFORK,
            Some(nix::libc::SIGCHLD),
        )
    }
}

/// `struct mount_attr` of the kernel's uapi (linux/mount.h), which the libc crate lacks.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// `AT_RECURSIVE` of the kernel's uapi (fcntl.h).
const AT_RECURSIVE: nix::libc::c_uint = 0x8000;

/// mount_setattr(2) with `AT_EMPTY_PATH | AT_RECURSIVE`: make every mount of the tree `tree`
/// refers to (a detached `open_tree` clone or an attached mount's root) read-only. Neither
/// `nix` nor `rustix` wraps this call.
pub fn make_tree_read_only(tree: &impl AsRawFd) -> Result<(), Errno> {
    let attr = MountAttr {
        attr_set: nix::libc::MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let empty = c"";
    let flags = nix::libc::AT_EMPTY_PATH as nix::libc::c_uint | AT_RECURSIVE;
    // SAFETY: the descriptor is open for the call, `empty` is a valid NUL-terminated string
    // and `attr` a valid `struct mount_attr` whose size is passed; the syscall takes (int,
    // const char *, unsigned, struct mount_attr *, size_t), reads `attr` only, and returns
    // 0 or -1.
    let r = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// Whether this process may signal the process `pidfd` refers to: pidfd_send_signal(2) of
/// signal 0, which sends nothing and checks only the permission. The kernel compares the
/// two processes' user ids as kernel ids (the same user on the host, whatever user
/// namespace either is in), where `SO_PEERCRED` read inside a user namespace maps every
/// other user to the overflow uid. Not wrapped for signal 0 by `nix` or `rustix`.
pub fn may_signal(pidfd: &impl AsRawFd) -> bool {
    // SAFETY: the descriptor is open for the call; a null `siginfo_t *` is allowed (the
    // kernel fills in a default) and signal 0 delivers nothing; the syscall takes (int, int,
    // siginfo_t *, unsigned) and returns 0 or -1.
    let r = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            0,
            std::ptr::null::<nix::libc::siginfo_t>(),
            0u32,
        )
    };
    r == 0
}

/// Take ownership of descriptors the kernel just installed in our table (received in an
/// `SCM_RIGHTS` message, or returned by accept4).
pub fn own_fds(fds: Vec<RawFd>) -> Vec<OwnedFd> {
    fds.into_iter()
        // SAFETY: the kernel installed these descriptors for this call; no other owner
        // exists, and each is wrapped exactly once.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect()
}
