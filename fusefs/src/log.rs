//! Log lines on stderr, `PROGRAM: message`: the bad-block reports and hot-list results of the
//! filesystem, and `cimg-mount`'s own messages. The prefix names the program the server runs
//! in, which is not always `cimg-mount` (`launch` serves images too): set by the program
//! ([`set_log_prefix`]), else the name it was started under.

use std::io::{self, Write};
use std::path::Path;
use std::sync::{OnceLock, RwLock};

/// Set by [`set_log_prefix`]; `None` until then.
static PREFIX: RwLock<Option<&'static str>> = RwLock::new(None);

/// Start every later log line with `prefix` (a program name, without the colon). Without
/// this call the prefix is the file name of the program's `argv[0]` (else its
/// `/proc/self/comm`).
pub fn set_log_prefix(prefix: &'static str) {
    *PREFIX.write().unwrap_or_else(|p| p.into_inner()) = Some(prefix);
}

/// The prefix without [`set_log_prefix`]: the program's name, looked up once.
fn default_prefix() -> &'static str {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(|| {
        std::env::args_os()
            .next()
            .and_then(|a| Some(Path::new(&a).file_name()?.to_string_lossy().into_owned()))
            .or_else(|| {
                let comm = std::fs::read_to_string("/proc/self/comm").ok()?;
                Some(comm.trim_end_matches('\n').to_string())
            })
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "cimg-fuse".into())
    })
}

/// Log one line to stderr as `PREFIX: ...` ([`set_log_prefix`]), ignoring write errors (a
/// background server's stderr may be gone).
pub fn log(msg: std::fmt::Arguments<'_>) {
    let prefix = *PREFIX.read().unwrap_or_else(|p| p.into_inner());
    let prefix = prefix.unwrap_or_else(default_prefix);
    let _ = writeln!(io::stderr().lock(), "{prefix}: {msg}");
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_default_prefix_is_the_program_s_name() {
        // The test harness's program: `cimg_fuse-HASH`.
        assert!(super::default_prefix().starts_with("cimg_fuse-"));
    }
}
