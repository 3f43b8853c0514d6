//! The command line turned into a [`Plan`]: what to mount where, which environment the
//! command gets, which files to write. Pure: nothing here touches the system, so every rule
//! is unit-tested without root or namespaces.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};

use clap::{ArgAction, CommandFactory, FromArgMatches, Parser};

use crate::error::Error;

const AFTER_HELP: &str = "\
Runs CMD in an unprivileged container (user + mount namespaces) whose root is IMAGE: a .cimg
file (served by the built-in FUSE driver) or a directory (bound). Launches of one .cimg by one
user on one node share one FUSE server and mount (the image service), each in a container of its
own; the server stays --linger (default 5m) after its last container, keeping the image file
open: `launch --stop IMAGE` (e.g. in a job epilog) or `--stop-all` ends it; `--servers` lists
them. --private mounts the image for this container alone. /dev, /proc, /sys, the host's
/tmp (or $TMPDIR), /etc/hosts, /etc/resolv.conf and /etc/machine-id are bound in (/sys,
/proc/sys, /proc/sysrq-trigger, /proc/irq and /proc/bus read-only); /etc/passwd and /etc/group
name the user. The image is read-only unless -W is given.

Environment: the host's, then --set-env and --unset-env in command-line order, then
CIMG_RUNNING=1 and CIMG_IMAGE=IMAGE. --set-env takes NAME=VALUE, a file of NAME=VALUE lines
(blank lines and lines starting with # are ignored; one pair of enclosing quotes is removed;
$NAME and ${NAME} are expanded unless single-quoted), or nothing: the image's own Env (from its
OCI/Docker config, else the file /ch/environment in the image).

Working directory: --cd, else the image's WorkingDir, else the current directory if it exists
in the container, else /.

Exit status: the command's status, 128+N if it was killed by signal N; launch's own failures:
  2 bad option, 120 image unusable, 121 no user namespaces, 122 no FUSE,
  123 container filesystem setup failed, 125 other failure, 126 command not executable,
  127 command not found.";

/// `launch [OPTIONS] IMAGE -- CMD [ARG...]`
#[derive(Debug, Parser)]
#[command(
    name = "launch",
    version,
    about = "Run a command in an unprivileged container whose root is a .cimg image",
    after_help = AFTER_HELP
)]
struct Cli {
    /// Bind SRC (host) at DST (container; default: same path). DST must exist in the image
    /// (or is created with -W). Repeatable.
    #[arg(short = 'b', long = "bind", value_name = "SRC[:DST]", action = ArgAction::Append)]
    bind: Vec<OsString>,

    /// Start in DIR (in the container).
    #[arg(short = 'c', long = "cd", value_name = "DIR")]
    cd: Option<PathBuf>,

    /// Set variables: NAME=VALUE, a FILE of such lines, or (no value) the image's own Env.
    #[arg(long = "set-env", value_name = "ARG", num_args = 0..=1, require_equals = true,
          default_missing_value = "", action = ArgAction::Append)]
    set_env: Vec<OsString>,

    /// Remove variables whose names match GLOB (`*`, `?`, `[...]`). Repeatable.
    #[arg(long = "unset-env", value_name = "GLOB", action = ArgAction::Append)]
    unset_env: Vec<String>,

    /// Bind the host's $HOME at /home/$USER (over a tmpfs on /home) and set HOME to it.
    #[arg(long)]
    home: bool,

    /// A private tmpfs at /tmp instead of the host's /tmp.
    #[arg(short = 't', long = "private-tmp")]
    private_tmp: bool,

    /// User ID in the container (default: the same as outside).
    #[arg(short = 'u', long = "uid", value_name = "UID")]
    uid: Option<u32>,

    /// Group ID in the container (default: the same as outside).
    #[arg(short = 'g', long = "gid", value_name = "GID")]
    gid: Option<u32>,

    /// Do not write temporary /etc/passwd and /etc/group.
    #[arg(long = "no-passwd")]
    no_passwd: bool,

    /// Make the root writable with a throw-away layer (tmpfs of SIZE, default half the
    /// memory, under overlayfs). The image file is never written.
    #[arg(short = 'W', long = "write-fake", value_name = "SIZE", num_args = 0..=1,
          require_equals = true, default_missing_value = "")]
    write_fake: Option<String>,

    /// Say what is done (repeat for more).
    #[arg(short = 'v', long = "verbose", action = ArgAction::Count)]
    verbose: u8,

    /// Print nothing but errors.
    #[arg(short = 'q', long = "quiet", conflicts_with = "verbose")]
    quiet: bool,

    /// Record the order in which the image's files are first read, and write it to FILE (for
    /// `cimg pack --hot`) when the container ends.
    #[arg(long = "record-hot", value_name = "FILE")]
    record_hot: Option<PathBuf>,

    /// Let the FUSE driver decompress ahead of sequential readers (for big sequential reads
    /// from the image; off by default: at start-up it takes the CPU from the application).
    #[arg(long = "read-ahead")]
    read_ahead: bool,

    /// Size of the FUSE driver's decompressed-block cache (e.g. 256M).
    #[arg(long = "cache-size", value_name = "SIZE")]
    cache_size: Option<String>,

    /// Share one container with the other peers of this group on this node (automatic under
    /// Slurm and Open MPI).
    #[arg(long)]
    join: bool,

    /// Never join: a container of its own even under Slurm or Open MPI.
    #[arg(long = "no-join", conflicts_with_all = ["join", "join_ct", "join_tag", "join_pid"])]
    no_join: bool,

    /// Number of peers in the group on this node (default: from Slurm or Open MPI).
    #[arg(long = "join-ct", value_name = "N")]
    join_ct: Option<u32>,

    /// Tag that names the group (default: from Slurm's job and step, or Open MPI's job).
    #[arg(long = "join-tag", value_name = "TAG")]
    join_tag: Option<String>,

    /// Run CMD in the running container of process PID.
    #[arg(long = "join-pid", value_name = "PID")]
    join_pid: Option<i32>,

    /// A mount of the image of its own, ended with the container, instead of a container on
    /// the image's shared server.
    #[arg(long)]
    private: bool,

    /// How long the image's shared server stays after its last container: seconds, or a
    /// duration such as 30s, 5m, 1h (default: $CIMG_LINGER, else 5m).
    #[arg(long, value_name = "DURATION")]
    linger: Option<String>,

    /// List this user's image servers on this node (pid, image, containers, idle time).
    #[arg(long, conflicts_with_all = ["stop", "stop_all"])]
    servers: bool,

    /// With --servers: as JSON.
    #[arg(long, requires = "servers")]
    json: bool,

    /// End the image servers of IMAGE (their running containers end with status 125).
    #[arg(long, value_name = "IMAGE", conflicts_with = "stop_all")]
    stop: Option<PathBuf>,

    /// End every image server of this user on this node.
    #[arg(long = "stop-all")]
    stop_all: bool,

    /// The image: a .cimg file or a directory.
    #[arg(value_name = "IMAGE", required_unless_present_any = ["servers", "stop", "stop_all"])]
    image: Option<PathBuf>,

    /// The command and its arguments.
    #[arg(value_name = "CMD", last = true, num_args = 1..,
          required_unless_present_any = ["servers", "stop", "stop_all"])]
    cmd: Vec<OsString>,
}

/// What the command line asks for besides running a command: the user's image servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Manage {
    /// `--servers` (`--json`).
    List {
        /// As JSON.
        json: bool,
    },
    /// `--stop IMAGE`, or `--stop-all` (`None`).
    Stop(Option<PathBuf>),
}

/// A host path bound into the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// Host path.
    pub src: PathBuf,
    /// Absolute path in the container, normalized (no `.`/`..`).
    pub dst: PathBuf,
}

/// One `--set-env` or `--unset-env`, in command-line order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvOp {
    /// `--set-env NAME=VALUE`.
    Pair(OsString, OsString),
    /// `--set-env FILE`.
    File(PathBuf),
    /// `--set-env` with no value: the image's environment.
    Image,
    /// `--unset-env GLOB`.
    Unset(glob::Pattern),
}

/// Everything `launch` will do, decided from the command line alone.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The image path as given.
    pub image: PathBuf,
    /// User binds, in order.
    pub binds: Vec<Bind>,
    /// `--cd`.
    pub cd: Option<PathBuf>,
    /// Environment edits, in command-line order.
    pub env_ops: Vec<EnvOp>,
    /// `--home`.
    pub home: bool,
    /// `--private-tmp`.
    pub private_tmp: bool,
    /// `-u`.
    pub uid: Option<u32>,
    /// `-g`.
    pub gid: Option<u32>,
    /// Write /etc/passwd and /etc/group.
    pub passwd: bool,
    /// `-W`: `Some(None)` for the default size, `Some(Some(bytes))` for a given one.
    pub write_fake: Option<Option<u64>>,
    /// -1 quiet, 0 normal, 1.. verbose.
    pub verbosity: i8,
    /// `--record-hot`.
    pub record_hot: Option<PathBuf>,
    /// `--cache-size` in bytes.
    pub cache_size: Option<u64>,
    /// `--read-ahead`.
    pub read_ahead: bool,
    /// `--join`.
    pub join: bool,
    /// `--no-join`.
    pub no_join: bool,
    /// `--join-ct`.
    pub join_ct: Option<u32>,
    /// `--join-tag`.
    pub join_tag: Option<String>,
    /// `--join-pid`.
    pub join_pid: Option<i32>,
    /// `--private`.
    pub private: bool,
    /// `--linger`.
    pub linger: Option<std::time::Duration>,
    /// `--servers`, `--stop`, `--stop-all`: no command is run.
    pub manage: Option<Manage>,
    /// The command and its arguments.
    pub cmd: Vec<OsString>,
}

/// Parse the command line (`args` includes the program name). Help and version requests and
/// usage errors come back as clap errors (the caller prints them and exits with their code).
pub fn parse<I, T>(args: I) -> Result<Result<Plan, Error>, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let matches = Cli::command().try_get_matches_from(args)?;
    let cli = Cli::from_arg_matches(&matches)?;
    // Merge --set-env and --unset-env by their position on the command line.
    let mut ops: Vec<(usize, Result<EnvOp, Error>)> = Vec::new();
    if let Some(idx) = matches.indices_of("set_env") {
        for (i, v) in idx.zip(&cli.set_env) {
            ops.push((i, Ok(set_env_op(v))));
        }
    }
    if let Some(idx) = matches.indices_of("unset_env") {
        for (i, g) in idx.zip(&cli.unset_env) {
            let op = glob::Pattern::new(g)
                .map(EnvOp::Unset)
                .map_err(|e| Error::usage(format!("--unset-env {g:?}: {e}")));
            ops.push((i, op));
        }
    }
    ops.sort_by_key(|(i, _)| *i);
    Ok(build(cli, ops))
}

fn build(cli: Cli, ops: Vec<(usize, Result<EnvOp, Error>)>) -> Result<Plan, Error> {
    let env_ops = ops
        .into_iter()
        .map(|(_, op)| op)
        .collect::<Result<Vec<_>, _>>()?;
    let binds = cli
        .bind
        .iter()
        .map(|b| parse_bind(b))
        .collect::<Result<Vec<_>, _>>()?;
    let write_fake = match cli.write_fake.as_deref() {
        None => None,
        Some("") => Some(None),
        Some(s) => Some(Some(parse_size("-W", s)?)),
    };
    let cache_size = match cli.cache_size.as_deref() {
        None => None,
        Some(s) => Some(parse_size("--cache-size", s)?),
    };
    if let Some(cd) = &cli.cd
        && !cd.is_absolute()
    {
        return Err(Error::usage(format!(
            "--cd {}: must be an absolute path",
            cd.display()
        )));
    }
    let manage = if cli.servers {
        Some(Manage::List { json: cli.json })
    } else if cli.stop_all {
        Some(Manage::Stop(None))
    } else {
        cli.stop.clone().map(|p| Manage::Stop(Some(p)))
    };
    if manage.is_none() && cli.cmd.first().is_none_or(|c| c.is_empty()) {
        return Err(Error::usage("missing command after --".into()));
    }
    let linger = match cli.linger.as_deref() {
        None => None,
        Some(s) => Some(crate::service::parse_duration(s).ok_or_else(|| {
            Error::usage(format!(
                "--linger {s:?}: not a duration (e.g. 300, 30s, 5m, 1h)"
            ))
        })?),
    };
    Ok(Plan {
        image: cli.image.unwrap_or_default(),
        binds,
        cd: cli.cd,
        env_ops,
        home: cli.home,
        private_tmp: cli.private_tmp,
        uid: cli.uid,
        gid: cli.gid,
        passwd: !cli.no_passwd,
        write_fake,
        verbosity: if cli.quiet { -1 } else { cli.verbose as i8 },
        record_hot: cli.record_hot,
        cache_size,
        read_ahead: cli.read_ahead,
        join: cli.join,
        no_join: cli.no_join,
        join_ct: cli.join_ct,
        join_tag: cli.join_tag,
        join_pid: cli.join_pid,
        private: cli.private,
        linger,
        manage,
        cmd: cli.cmd,
    })
}

fn parse_size(opt: &str, s: &str) -> Result<u64, Error> {
    cimg_format::units::parse_size(s).map_err(|e| Error::usage(format!("{opt} {s:?}: {e}")))
}

fn set_env_op(v: &OsStr) -> EnvOp {
    if v.is_empty() {
        return EnvOp::Image;
    }
    let b = v.as_bytes();
    match b.iter().position(|&c| c == b'=') {
        // NAME=VALUE where NAME looks like a variable name: a pair; anything else is a file.
        Some(i) if i > 0 && is_name(&b[..i]) => EnvOp::Pair(
            OsString::from_vec(b[..i].to_vec()),
            OsString::from_vec(b[i + 1..].to_vec()),
        ),
        _ => EnvOp::File(PathBuf::from(v)),
    }
}

fn is_name(b: &[u8]) -> bool {
    !b.is_empty()
        && !b[0].is_ascii_digit()
        && b.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'_')
}

/// Parse `SRC[:DST]`. DST defaults to SRC; it must be absolute and is normalized lexically;
/// a DST that climbs above `/` is refused.
pub fn parse_bind(arg: &OsStr) -> Result<Bind, Error> {
    let b = arg.as_bytes();
    let (src, dst) = match b.iter().rposition(|&c| c == b':') {
        Some(i) => (&b[..i], &b[i + 1..]),
        None => (b, b),
    };
    let shown = arg.to_string_lossy();
    if src.is_empty() || dst.is_empty() {
        return Err(Error::usage(format!(
            "--bind {shown}: empty source or destination"
        )));
    }
    let src = PathBuf::from(OsStr::from_bytes(src));
    let dst = normalize_dst(Path::new(OsStr::from_bytes(dst))).ok_or_else(|| {
        Error::setup(format!(
            "--bind {shown}: destination must be an absolute path inside the image"
        ))
    })?;
    if dst == Path::new("/") {
        return Err(Error::setup(format!(
            "--bind {shown}: cannot bind over the container's root (the image is the root)"
        )));
    }
    Ok(Bind { src, dst })
}

/// `/a/./b/../c` → `/a/c`; `None` if not absolute or if `..` climbs above `/`.
pub fn normalize_dst(p: &Path) -> Option<PathBuf> {
    if !p.is_absolute() {
        return None;
    }
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::Normal(n) => out.push(n),
            Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// The environment being built: an ordered map, so the result is deterministic.
pub type Env = BTreeMap<OsString, OsString>;

/// Apply one `--set-env` file's text to `env` (see the help text for the syntax). `what`
/// names the file in errors.
pub fn apply_env_file(env: &mut Env, text: &[u8], what: &str) -> Result<(), Error> {
    for (n, line) in text.split(|&c| c == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let trimmed = line.trim_ascii_start();
        if trimmed.is_empty() || trimmed.starts_with(b"#") {
            continue;
        }
        let Some(eq) = line.iter().position(|&c| c == b'=') else {
            return Err(Error::setup(format!(
                "--set-env {what}: line {}: no '=' in {:?}",
                n + 1,
                String::from_utf8_lossy(line)
            )));
        };
        let name = &line[..eq];
        if !is_name(name) {
            return Err(Error::setup(format!(
                "--set-env {what}: line {}: bad variable name {:?}",
                n + 1,
                String::from_utf8_lossy(name)
            )));
        }
        let raw = &line[eq + 1..];
        let value = match unquote(raw) {
            (inner, b'\'') => inner.to_vec(),
            (inner, _) => expand(inner, env),
        };
        env.insert(OsString::from_vec(name.to_vec()), OsString::from_vec(value));
    }
    Ok(())
}

/// Strip one pair of enclosing quotes; returns the inner bytes and the quote (0 if none).
fn unquote(v: &[u8]) -> (&[u8], u8) {
    if v.len() >= 2 {
        let q = v[0];
        if (q == b'"' || q == b'\'') && v[v.len() - 1] == q {
            return (&v[1..v.len() - 1], q);
        }
    }
    (v, 0)
}

/// Expand `$NAME` and `${NAME}` from `env` (unset: empty).
pub fn expand(v: &[u8], env: &Env) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        if v[i] == b'$' {
            let (name, next) = if v.get(i + 1) == Some(&b'{') {
                match v[i + 2..].iter().position(|&c| c == b'}') {
                    Some(end) => (&v[i + 2..i + 2 + end], i + 3 + end),
                    None => (&v[i..i], i),
                }
            } else {
                let len = v[i + 1..]
                    .iter()
                    .take_while(|&&c| c.is_ascii_alphanumeric() || c == b'_')
                    .count();
                (&v[i + 1..i + 1 + len], i + 1 + len)
            };
            if !name.is_empty() && is_name(name) {
                if let Some(val) = env.get(OsStr::from_bytes(name)) {
                    out.extend_from_slice(val.as_bytes());
                }
                i = next;
                continue;
            }
        }
        out.push(v[i]);
        i += 1;
    }
    out
}

/// Apply the image's `Env` list (`NAME=VALUE` strings, set literally as OCI says).
pub fn apply_env_list(env: &mut Env, list: &[String]) {
    for kv in list {
        if let Some((k, v)) = kv.split_once('=')
            && !k.is_empty()
        {
            env.insert(k.into(), v.into());
        }
    }
}

/// Remove every variable whose name matches `pat`.
pub fn unset_env(env: &mut Env, pat: &glob::Pattern) {
    env.retain(|k, _| !pat.matches(&k.to_string_lossy()));
}

/// Temporary `/etc/passwd` for the container: root, nobody and the user (`name`, `uid`,
/// `gid`, home `/home/NAME`), each once.
pub fn passwd_text(name: &str, uid: u32, gid: u32, gecos: &str) -> String {
    let mut s = String::new();
    if uid != 0 {
        s.push_str("root:x:0:0:root:/root:/bin/sh\n");
    }
    if uid != 65534 {
        s.push_str("nobody:x:65534:65534:nobody:/:/bin/false\n");
    }
    let gecos = gecos.replace([':', '\n'], " ");
    let home = if uid == 0 {
        "/root".to_string()
    } else {
        format!("/home/{name}")
    };
    s.push_str(&format!("{name}:x:{uid}:{gid}:{gecos}:{home}:/bin/sh\n"));
    s
}

/// Temporary `/etc/group`: root, nogroup and the user's group, each once.
pub fn group_text(group: &str, gid: u32) -> String {
    let mut s = String::new();
    if gid != 0 {
        s.push_str("root:x:0:\n");
    }
    if gid != 65534 {
        s.push_str("nogroup:x:65534:\n");
    }
    s.push_str(&format!("{group}:x:{gid}:\n"));
    s
}

/// Find `cmd` on `path` (a `PATH` value) the way a shell does: a name with a slash is used
/// as is; otherwise each directory is tried in order (empty entries mean `.`).
pub fn candidates(cmd: &OsStr, path: Option<&OsStr>) -> Vec<PathBuf> {
    if cmd.as_bytes().contains(&b'/') {
        return vec![PathBuf::from(cmd)];
    }
    let path = path.unwrap_or(OsStr::new(
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ));
    path.as_bytes()
        .split(|&c| c == b':')
        .map(|d| {
            let d = if d.is_empty() { b"." as &[u8] } else { d };
            Path::new(OsStr::from_bytes(d)).join(cmd)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::exit;

    fn plan(args: &[&str]) -> Plan {
        let mut v = vec!["launch"];
        v.extend_from_slice(args);
        parse(v).expect("clap").expect("plan")
    }

    #[test]
    fn minimal_command_line() {
        let p = plan(&["img.cimg", "--", "/bin/true"]);
        assert_eq!(p.image, PathBuf::from("img.cimg"));
        assert_eq!(p.cmd, vec![OsString::from("/bin/true")]);
        assert!(p.passwd && !p.home && !p.private_tmp && p.write_fake.is_none());
        assert!(p.env_ops.is_empty() && p.binds.is_empty());
    }

    #[test]
    fn command_needs_double_dash_and_a_command() {
        assert!(parse(["launch", "img.cimg"]).is_err());
        assert!(parse(["launch", "img.cimg", "--"]).is_err());
        assert!(parse(["launch", "--bogus", "img", "--", "x"]).is_err());
        // Options after -- belong to the command.
        let p = plan(&["img", "--", "ls", "-l", "--bind", "x"]);
        assert_eq!(p.cmd.len(), 4);
        assert!(p.binds.is_empty());
    }

    #[test]
    fn env_ops_keep_command_line_order() {
        let p = plan(&[
            "--unset-env=A*",
            "--set-env=X=1",
            "--set-env",
            "--unset-env",
            "B",
            "--set-env=./vars.env",
            "img",
            "--",
            "x",
        ]);
        let kinds: Vec<String> = p
            .env_ops
            .iter()
            .map(|o| match o {
                EnvOp::Pair(k, v) => {
                    format!("pair {}={}", k.to_string_lossy(), v.to_string_lossy())
                }
                EnvOp::File(f) => format!("file {}", f.display()),
                EnvOp::Image => "image".into(),
                EnvOp::Unset(g) => format!("unset {}", g.as_str()),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "unset A*",
                "pair X=1",
                "image",
                "unset B",
                "file ./vars.env"
            ]
        );
    }

    #[test]
    fn bad_glob_is_a_usage_error() {
        let r = parse(["launch", "--unset-env=[", "img", "--", "x"]).expect("clap");
        assert_eq!(r.unwrap_err().code(), exit::USAGE);
    }

    #[test]
    fn a_bind_over_the_root_is_refused() {
        for arg in ["/data:/", "/", "/x:/a/..", "/x:/./"] {
            let e = parse_bind(OsStr::new(arg)).unwrap_err();
            assert!(
                e.to_string().contains("over the container's root"),
                "{arg}: {e}"
            );
        }
    }

    #[test]
    fn binds() {
        assert_eq!(
            parse_bind(OsStr::new("/data")).unwrap(),
            Bind {
                src: "/data".into(),
                dst: "/data".into()
            }
        );
        assert_eq!(
            parse_bind(OsStr::new("rel/dir:/mnt/./x/../y")).unwrap(),
            Bind {
                src: "rel/dir".into(),
                dst: "/mnt/y".into()
            }
        );
        assert!(parse_bind(OsStr::new("/a:rel")).is_err());
        assert!(parse_bind(OsStr::new("/a:/../../etc")).is_err());
        assert!(parse_bind(OsStr::new(":/x")).is_err());
        assert!(parse_bind(OsStr::new("/x:")).is_err());
    }

    #[test]
    fn write_fake_and_sizes() {
        assert_eq!(plan(&["-W", "i", "--", "x"]).write_fake, Some(None));
        assert_eq!(
            plan(&["--write-fake=1G", "i", "--", "x"]).write_fake,
            Some(Some(1 << 30))
        );
        let r = parse(["launch", "-W=lots", "i", "--", "x"]).expect("clap");
        assert!(r.is_err());
        assert_eq!(
            plan(&["--cache-size", "64M", "i", "--", "x"]).cache_size,
            Some(64 << 20)
        );
    }

    #[test]
    fn cd_must_be_absolute() {
        let r = parse(["launch", "-c", "rel", "i", "--", "x"]).expect("clap");
        assert!(r.is_err());
        assert_eq!(
            plan(&["-c", "/work", "i", "--", "x"]).cd,
            Some("/work".into())
        );
    }

    #[test]
    fn env_file_syntax() {
        let mut env = Env::new();
        env.insert("PATH".into(), "/bin".into());
        let text =
            b"# comment\n\nA=1\nB=\"two words\"\nC='$PATH'\nPATH=/opt/bin:$PATH\nD=${A}x$NOPE.\r\n";
        apply_env_file(&mut env, text, "f").unwrap();
        let get = |k: &str| {
            env.get(OsStr::new(k))
                .unwrap()
                .to_string_lossy()
                .into_owned()
        };
        assert_eq!(get("A"), "1");
        assert_eq!(get("B"), "two words");
        assert_eq!(get("C"), "$PATH");
        assert_eq!(get("PATH"), "/opt/bin:/bin");
        assert_eq!(get("D"), "1x.");
        assert!(apply_env_file(&mut env, b"novalue\n", "f").is_err());
        assert!(apply_env_file(&mut env, b"1X=2\n", "f").is_err());
    }

    #[test]
    fn unset_and_image_env() {
        let mut env = Env::new();
        apply_env_list(
            &mut env,
            &[
                "SLURM_A=1".into(),
                "SLURM_B=2".into(),
                "KEEP=a=b".into(),
                "bad".into(),
            ],
        );
        unset_env(&mut env, &glob::Pattern::new("SLURM_*").unwrap());
        assert_eq!(env.len(), 1);
        assert_eq!(env.get(OsStr::new("KEEP")).unwrap(), "a=b");
    }

    #[test]
    fn passwd_and_group() {
        let p = passwd_text("alice", 1000, 1000, "Alice: A");
        assert!(p.contains("root:x:0:0:"));
        assert!(p.contains("alice:x:1000:1000:Alice  A:/home/alice:/bin/sh\n"));
        let r = passwd_text("root", 0, 0, "root");
        assert_eq!(r.matches("root:x:0:0").count(), 1);
        assert_eq!(
            group_text("users", 100),
            "root:x:0:\nnogroup:x:65534:\nusers:x:100:\n"
        );
    }

    #[test]
    fn command_search() {
        assert_eq!(
            candidates(OsStr::new("./x"), None),
            vec![PathBuf::from("./x")]
        );
        assert_eq!(
            candidates(OsStr::new("ls"), Some(OsStr::new("/a::/b"))),
            vec![
                PathBuf::from("/a/ls"),
                PathBuf::from("./ls"),
                PathBuf::from("/b/ls")
            ]
        );
    }
}
