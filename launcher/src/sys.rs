//! The only module of `launch` with `unsafe` code: the program's C entry point, process
//! creation (fork) and the two mount-API calls that `nix` does not wrap (open_tree,
//! move_mount). Everything else the launcher needs from the kernel has a safe wrapper in
//! `nix` or `caps`.

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

// From the kernel's uapi (linux/mount.h, fcntl.h); not all are in the libc crate.
const OPEN_TREE_CLONE: nix::libc::c_uint = 1;
const AT_RECURSIVE: nix::libc::c_uint = 0x8000;
const MOVE_MOUNT_F_EMPTY_PATH: nix::libc::c_uint = 0x4;
const MOVE_MOUNT_T_EMPTY_PATH: nix::libc::c_uint = 0x40;

/// open_tree(2) with `OPEN_TREE_CLONE | AT_RECURSIVE`: a detached copy of the mount tree at
/// `path` (following symlinks), as it is now. Later mounts on or under `path` are not in it.
pub fn clone_tree(path: &std::path::Path) -> Result<OwnedFd, Errno> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)?;
    let flags = OPEN_TREE_CLONE | AT_RECURSIVE | nix::libc::O_CLOEXEC as nix::libc::c_uint;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call; the syscall takes
    // (int dfd, const char *path, unsigned flags) and returns a new fd or -1.
    let fd = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_open_tree,
            nix::libc::AT_FDCWD,
            c.as_ptr(),
            flags,
        )
    };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// move_mount(2) of the detached tree `tree` onto the file or directory `target` refers to.
pub fn attach_tree(tree: &impl AsRawFd, target: &impl AsRawFd) -> Result<(), Errno> {
    let empty = c"";
    // SAFETY: both descriptors are open for the duration of the call and `empty` is a valid
    // NUL-terminated string; the syscall takes (int, const char *, int, const char *,
    // unsigned) and returns 0 or -1.
    let r = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            target.as_raw_fd(),
            empty.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
        )
    };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// pidfd_open(2): a descriptor of process `pid` (no flags).
pub fn pidfd_open(pid: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: the syscall takes (pid_t, unsigned) and returns a new fd or -1.
    let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid, 0u32) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
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
