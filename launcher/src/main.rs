//! `launch [OPTIONS] IMAGE -- CMD [ARG...]`: run a command in an unprivileged container
//! (user + mount namespaces, no setuid, no daemon outside the job) whose root is a `.cimg`
//! image served by the built-in FUSE driver, or a directory.
//!
//! - [`plan`]: the command line → a plan (pure, unit-tested), exit codes, environment rules.
//! - [`enter`]: namespaces, mounts, binds, pivot_root, exec.
//! - [`supervise`]: the process tree (supervisor, FUSE server, app), signals, exit status.
//! - [`join`]: peers of one group share one container.
//! - [`sys`]: the only module with `unsafe` (fork).
//! - [`error`]: the one error type, carrying its exit code.

mod enter;
mod error;
mod join;
mod plan;
mod supervise;
mod sys;

use std::process::ExitCode;

fn main() -> ExitCode {
    let plan = match plan::parse(std::env::args_os()) {
        Ok(p) => p,
        Err(e) => {
            // Help and --version go to stdout with status 0; usage errors to stderr with 2.
            let _ = e.print();
            return ExitCode::from(e.exit_code() as u8);
        }
    };
    let result = refuse_setuid().and(plan).and_then(supervise::run);
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("launch: {e}");
            ExitCode::from(e.code() as u8)
        }
    }
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
