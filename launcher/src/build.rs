//! Carrying the container's tree out: the host paths a container gets, opened once before
//! anything is mounted ([`Hosts`]), and the list of [`spec::mounts`] made on the container's
//! root ([`carry_out`]). What to mount and in which order is decided in [`crate::spec`];
//! this module only makes the calls.

use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::unistd::User;

use crate::enter::{self, HostPath, Make, Root};
use crate::error::{Error, errno_msg};
use crate::host::HostFacts;
use crate::plan::Plan;
use crate::spec;

/// The host paths a container gets ([`spec::HostSource`]), opened (cloned as detached mount
/// trees) before anything is mounted in launch's namespace.
pub struct Hosts {
    dev: HostPath,
    proc_: HostPath,
    sys: HostPath,
    /// [`spec::HOST_ETC`], where the host has them.
    pub etc: [Option<HostPath>; 3],
    tmp: Option<HostPath>,
    home: Option<HostPath>,
    /// The user's binds, with the option as errors name it (`--bind SRC:DST`).
    pub binds: Vec<(HostPath, String)>,
}

impl Hosts {
    /// Open every host path `plan` binds in (with the standard ones).
    pub fn open(plan: &Plan, user: Option<&User>, facts: &HostFacts) -> Result<Hosts, Error> {
        let sys = HostPath::open(Path::new("/sys"), "host")?;
        // All of /sys read-only, submounts included, before it is attached.
        sys.read_only("/sys")?;
        let home = if plan.home {
            let h = facts
                .var_os("HOME")
                .map(PathBuf::from)
                .or_else(|| user.map(|u| u.dir.clone()))
                .ok_or_else(|| Error::setup("--home: HOME is not set".into()))?;
            Some(HostPath::open(&h, "--home")?)
        } else {
            None
        };
        Ok(Hosts {
            dev: HostPath::open(Path::new("/dev"), "host")?,
            proc_: HostPath::open(Path::new("/proc"), "host")?,
            sys,
            etc: spec::HOST_ETC.map(|p| HostPath::open_optional(Path::new(p))),
            tmp: if plan.private_tmp {
                None
            } else {
                Some(HostPath::open(
                    &facts.tmp_dir(),
                    "host temporary directory",
                )?)
            },
            home,
            binds: plan
                .binds
                .iter()
                .map(|b| {
                    let what = format!("--bind {}:{}", b.src.display(), b.dst.display());
                    Ok((HostPath::open(&b.src, "--bind")?, what))
                })
                .collect::<Result<_, Error>>()?,
        })
    }

    fn get(&self, src: spec::HostSource) -> Option<&HostPath> {
        use spec::HostSource as S;
        match src {
            S::Dev => Some(&self.dev),
            S::Proc => Some(&self.proc_),
            S::Sys => Some(&self.sys),
            S::Etc(i) => self.etc.get(i)?.as_ref(),
            S::Tmp => self.tmp.as_ref(),
            S::Home => self.home.as_ref(),
            S::Bind(i) => self.binds.get(i).map(|(h, _)| h),
        }
    }
}

impl spec::ImageView for Root {
    fn exists(&self, p: &Path) -> bool {
        Root::exists(self, p)
    }
    fn is_dir(&self, p: &Path) -> bool {
        Root::is_dir(self, p)
    }
}

/// Carry out the container's tree ([`spec::mounts`]) on `root`, staging written files in
/// `stage`.
pub fn carry_out(
    root: &Root,
    mounts: &[spec::Mount],
    hosts: &Hosts,
    stage: &Path,
) -> Result<(), Error> {
    use spec::Mount as M;
    for m in mounts {
        match m {
            M::Host {
                src,
                dst,
                make,
                read_only,
            } => {
                let what = match src {
                    spec::HostSource::Bind(i) => hosts.binds[*i].1.clone(),
                    _ => dst.display().to_string(),
                };
                let Some(h) = hosts.get(*src) else {
                    continue;
                };
                let t = root.target(dst, *make, &what)?;
                h.attach(&t, &what)?;
                if *read_only {
                    let t = root.target(dst, Make::No, &what)?;
                    enter::remount_ro(&t, &what)?;
                }
            }
            M::ReadOnly(p) => {
                if root.exists(p) {
                    enter::bind_read_only(root, p)?;
                }
            }
            M::Tmpfs { dst, opts } => {
                let what = dst.display().to_string();
                let t = root.target(dst, Make::Dir, &what)?;
                enter::mount_tmpfs(&enter::fd_path(&t), opts, &what)?;
            }
            M::Mkdir(dir) => {
                let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
                    continue;
                };
                let p = root
                    .resolve(parent, OFlag::O_PATH | OFlag::O_DIRECTORY)
                    .map_err(|e| Error::setup(errno_msg(parent.display(), e)))?;
                nix::sys::stat::mkdirat(
                    std::os::fd::AsFd::as_fd(&p),
                    name,
                    nix::sys::stat::Mode::from_bits_truncate(0o755),
                )
                .map_err(|e| Error::setup(errno_msg(dir.display(), e)))?;
            }
            M::File { name, text, dst } => {
                let staged = stage.join(name);
                enter::write_file(&staged, text)?;
                let src = HostPath::open(&staged, "staged")?;
                let what = dst.display().to_string();
                let t = root.target(dst, Make::File, &what)?;
                src.attach(&t, &what)?;
            }
        }
    }
    Ok(())
}
