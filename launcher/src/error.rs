//! The launcher's one error type: a message for the one-line report (`launch: what: why`)
//! and the exit code that says which kind of failure it was (see [`exit`]).

/// Exit codes of `launch` itself (the command's own status is passed through otherwise).
pub mod exit {
    /// A bad option or argument (clap's usage error).
    pub const USAGE: i32 = 2;
    /// The image cannot be used: missing, not a cimg image or directory, corrupt.
    pub const IMAGE: i32 = 120;
    /// Unprivileged user namespaces are not available.
    pub const USERNS: i32 = 121;
    /// FUSE is not available (`/dev/fuse` missing or not openable, mount refused).
    pub const FUSE: i32 = 122;
    /// Setting up the container's filesystem failed (a bind source or destination, the
    /// writable layer, the root).
    pub const SETUP: i32 = 123;
    /// Any other failure of the launcher (refused to run setuid, the FUSE server died, ...).
    pub const OTHER: i32 = 125;
    /// The command was found but cannot be executed.
    pub const NOEXEC: i32 = 126;
    /// The command was not found in the container.
    pub const NOTFOUND: i32 = 127;
}

/// A launcher failure.
#[derive(Debug, thiserror::Error)]
#[error("{msg}")]
pub struct Error {
    msg: String,
    code: i32,
}

impl Error {
    /// A failure with exit code `code`.
    pub fn new(code: i32, msg: String) -> Self {
        Error { msg, code }
    }
    /// A bad option or argument.
    pub fn usage(msg: String) -> Self {
        Error::new(exit::USAGE, msg)
    }
    /// The image cannot be used.
    pub fn image(msg: String) -> Self {
        Error::new(exit::IMAGE, msg)
    }
    /// No user namespaces.
    pub fn userns(msg: String) -> Self {
        Error::new(exit::USERNS, msg)
    }
    /// No FUSE.
    pub fn fuse(msg: String) -> Self {
        Error::new(exit::FUSE, msg)
    }
    /// The container's filesystem could not be set up.
    pub fn setup(msg: String) -> Self {
        Error::new(exit::SETUP, msg)
    }
    /// Anything else.
    pub fn other(msg: String) -> Self {
        Error::new(exit::OTHER, msg)
    }
    /// The exit code for this failure.
    pub fn code(&self) -> i32 {
        self.code
    }
}

/// `what: why` for an errno, as the one-line messages want it.
pub fn errno_msg(what: impl std::fmt::Display, e: nix::errno::Errno) -> String {
    format!("{what}: {}", e.desc().to_lowercase())
}
