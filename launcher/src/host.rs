//! The host facts a launch uses, read once when it starts: its environment and its working
//! directory. Every other module takes them from here, so that no function reads the
//! environment on its own, deep in a call, and what a launch saw of the host is one value.

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;

use crate::plan::Env;

/// What launch found on the host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// The environment launch was given.
    pub env: Env,
    /// The current directory, if there is one.
    pub cwd: Option<PathBuf>,
}

impl HostFacts {
    /// Read them (once per launch).
    pub fn read() -> HostFacts {
        HostFacts {
            env: std::env::vars_os().collect(),
            cwd: std::env::current_dir().ok(),
        }
    }

    /// A variable.
    pub fn var_os(&self, name: &str) -> Option<&OsStr> {
        self.env.get(OsStr::new(name)).map(OsString::as_os_str)
    }

    /// A variable that is valid UTF-8.
    pub fn var(&self, name: &str) -> Option<String> {
        self.var_os(name)?.to_str().map(str::to_string)
    }

    /// `$TMPDIR` if it is an absolute directory, else `/tmp`.
    pub fn tmp_dir(&self) -> PathBuf {
        match self.var_os("TMPDIR").map(PathBuf::from) {
            Some(t) if t.is_absolute() && t.is_dir() => t,
            _ => PathBuf::from("/tmp"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_and_the_temporary_directory() {
        let mut f = HostFacts::default();
        assert_eq!(f.tmp_dir(), PathBuf::from("/tmp"));
        f.env.insert("TMPDIR".into(), "relative".into());
        assert_eq!(f.tmp_dir(), PathBuf::from("/tmp"));
        f.env.insert("TMPDIR".into(), "/proc".into());
        assert_eq!(f.tmp_dir(), PathBuf::from("/proc"));
        assert_eq!(f.var("TMPDIR").as_deref(), Some("/proc"));
        assert_eq!(f.var("NONE"), None);
    }
}
