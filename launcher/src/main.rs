//! `launch [OPTIONS] IMAGE -- CMD [ARG...]`: run a command in an unprivileged container
//! (user + mount namespaces, no setuid, no daemon outside the job) whose root is a `.cimg`
//! image served by the built-in FUSE driver, or a directory.
//!
//! - [`plan`]: the command line → a plan (pure, unit-tested), environment rules.
//! - [`spec`]: the container's tree as a value: the ordered mounts and files (pure).
//! - [`build`]: carries the container's tree out on its root.
//! - [`enter`]: namespaces, mounts, binds, pivot_root, exec.
//! - [`supervise`]: the process tree (supervisor, FUSE server, app), signals, exit status.
//! - [`server`]: a private mount's FUSE server and its start-up with launch.
//! - [`service`]: the image service, one shared FUSE server per image, user and node.
//! - [`protocol`]: the typed messages between a launch and its image's server.
//! - [`rendezvous`]: the abstract socket names launches meet at, and whom they trust.
//! - [`join`]: peers of one group share one container.
//! - [`keeper`]: holds a shared server's container while daemons outlive the command.
//! - [`sys`]: the only module with `unsafe` (fork, and the calls no crate wraps).
//! - [`host`]: the host facts (environment, working directory), read once.
//! - [`error`]: the one error type, carrying its exit code, and the exit codes.

// The entry point is `sys::main`: the C `main` without Rust's runtime set-up, which reads
// /proc/self/maps to place a stack guard (every rank of a thousand-node job pays the
// start-up), and ignores SIGPIPE without a record of the caller's disposition, which the
// container's processes then inherited (`yes | head` failed with EPIPE instead of ending
// quietly). launch ignores SIGPIPE itself and gives the app the caller's disposition.
#![cfg_attr(not(test), no_main)]

mod build;
mod enter;
mod error;
mod host;
mod join;
mod keeper;
mod plan;
mod protocol;
mod rendezvous;
mod server;
mod service;
mod spec;
mod supervise;
mod sys;

/// The program: parse, run, report; the exit status. Called by the C `main` in `sys`.
#[cfg_attr(test, allow(dead_code))]
fn launch_main() -> i32 {
    let code = match plan::parse(std::env::args_os()) {
        // Help and --version go to stdout with status 0; usage errors to stderr with 2.
        Err(e) => {
            let _ = e.print();
            e.exit_code()
        }
        Ok(plan) => match refuse_setuid().and(plan).and_then(supervise::run) {
            Ok(code) => code.clamp(0, 255),
            Err(e) => {
                eprintln!("launch: {e}");
                e.code()
            }
        },
    };
    // Without Rust's runtime nothing flushes stdout at exit.
    let _ = std::io::Write::flush(&mut std::io::stdout());
    code
}

/// Refuse to run with more privileges than the caller has: setuid/setgid installs, or an
/// executable carrying those bits.
fn refuse_setuid() -> Result<(), error::Error> {
    use nix::unistd::{getegid, geteuid, getgid, getuid};
    use std::os::unix::fs::PermissionsExt;
    let bits = std::fs::metadata("/proc/self/exe")
        .map(|m| m.permissions().mode() & 0o6000)
        .unwrap_or(0);
    if getuid() != geteuid() || getgid() != getegid() || bits != 0 {
        return Err(error::Error::other(
            "refusing to run setuid or setgid: launch needs no privileges; remove the bits \
             (chmod u-s,g-s)"
                .into(),
        ));
    }
    Ok(())
}
