//! The container's tree as a value: from the options, the host facts read once and what the
//! image holds, the ordered list of what goes on top of the container's root (binds, tmpfs
//! mounts, read-only remounts, written files). Pure: [`mounts`] only looks at the image
//! through [`ImageView`], so every combination of options is unit-tested without root or
//! namespaces; `supervise` carries the list out with the syscalls.
//!
//! The order matters and is fixed here: the standard binds (`/dev`, `/proc`, `/sys`) first,
//! then the read-only parts of `/proc`, `/etc` files from the host, `/tmp`, `--home`, the
//! user's binds in command-line order (a later bind may land inside an earlier one), and
//! the temporary `/etc/passwd` and `/etc/group` last (they must not be hidden by a bind).

use std::path::{Path, PathBuf};

use crate::enter::Make;
use crate::plan::Bind;

/// The parts of `/proc` through which a process writes kernel settings or pokes hardware,
/// made read-only in every container, as Docker and Podman do: a sysctl write is checked
/// against the file's owner only, so a container run by the real root (uid 0 inside is
/// uid 0 outside, even without capabilities) could otherwise set `kernel.core_pattern` (a
/// program the kernel runs as full root on the next crash) or `vm.*`.
pub const PROC_READ_ONLY: [&str; 4] =
    ["/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus"];

/// Host files bound into the container when both sides have them.
pub const HOST_ETC: [&str; 3] = ["/etc/hosts", "/etc/resolv.conf", "/etc/machine-id"];

/// What the container's tree is made of, besides the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSpec {
    /// `-W`: the root is writable (missing destinations are created).
    pub writable: bool,
    /// `-t`: a private tmpfs at `/tmp` instead of the host's.
    pub private_tmp: bool,
    /// `--home`: the user's name (the directory `/home/NAME`).
    pub home: Option<String>,
    /// The user's binds, each with whether its host source is a directory.
    pub binds: Vec<(Bind, bool)>,
    /// Which of [`HOST_ETC`] the host has.
    pub host_etc: [bool; 3],
    /// The temporary `/etc/passwd` and `/etc/group` texts, unless `--no-passwd`.
    pub passwd: Option<(String, String)>,
}

/// Where a bind's source comes from: a host path opened before anything was mounted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostSource {
    /// `/dev`.
    Dev,
    /// `/proc`.
    Proc,
    /// `/sys` (read-only, submounts included).
    Sys,
    /// [`HOST_ETC`]`[i]`.
    Etc(usize),
    /// The host's temporary directory (`$TMPDIR` or `/tmp`).
    Tmp,
    /// The user's home.
    Home,
    /// The user's bind number `i`.
    Bind(usize),
}

/// One thing put on the container's tree, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mount {
    /// Bind `src` at `dst`, making `dst` as `make` if it is missing; read-only if asked
    /// (the bind itself; the kernel keeps locked flags as they are).
    Host {
        /// The source.
        src: HostSource,
        /// Where, in the container.
        dst: PathBuf,
        /// What to create if `dst` is missing.
        make: Make,
        /// Remount the bind read-only.
        read_only: bool,
    },
    /// Bind `dst` (bound from the host already) read-only onto itself.
    ReadOnly(PathBuf),
    /// A fresh tmpfs at `dst` (a directory, made if missing) with mount options `opts`.
    Tmpfs {
        /// Where.
        dst: PathBuf,
        /// tmpfs options.
        opts: &'static str,
    },
    /// A directory made at `dst` (its parent exists: an earlier tmpfs).
    Mkdir(PathBuf),
    /// `text` written to the staging area as `name` and bound at `dst` (made if missing).
    File {
        /// The staged file's name.
        name: &'static str,
        /// Its content.
        text: String,
        /// Where, in the container.
        dst: PathBuf,
    },
}

/// What [`mounts`] needs to know of the image's tree (the root as mounted, before any of
/// the list is carried out).
pub trait ImageView {
    /// Whether `p` exists in the image (symlinks resolved inside it).
    fn exists(&self, p: &Path) -> bool;
    /// Whether `p` is a directory in the image.
    fn is_dir(&self, p: &Path) -> bool;
}

/// The plan of the container's tree: the ordered mounts, and what the user should be told
/// (a part left out because the image lacks its place).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tree {
    /// In order.
    pub mounts: Vec<Mount>,
    /// Warnings (shown unless `-q`).
    pub warnings: Vec<String>,
    /// Notes (shown with `-v`).
    pub notes: Vec<String>,
    /// `/home/NAME` with `--home`.
    pub home: Option<PathBuf>,
}

/// The container's tree for `spec` on `image`.
pub fn mounts(spec: &ContainerSpec, image: &dyn ImageView) -> Tree {
    let mut t = Tree::default();
    let m = &mut t.mounts;
    for (src, dst) in [
        (HostSource::Dev, "/dev"),
        (HostSource::Proc, "/proc"),
        (HostSource::Sys, "/sys"),
    ] {
        m.push(Mount::Host {
            src,
            dst: dst.into(),
            make: Make::Dir,
            read_only: false,
        });
    }
    for p in PROC_READ_ONLY {
        // They are the host's /proc's: present unless the host lacks them.
        m.push(Mount::ReadOnly(p.into()));
    }
    for (i, p) in HOST_ETC.iter().enumerate() {
        if spec.host_etc[i] && image.exists(Path::new(p)) {
            m.push(Mount::Host {
                src: HostSource::Etc(i),
                dst: p.into(),
                make: Make::No,
                read_only: true,
            });
        }
    }
    let tmp = Path::new("/tmp");
    if spec.private_tmp {
        m.push(Mount::Tmpfs {
            dst: tmp.into(),
            opts: "mode=1777",
        });
    } else if image.is_dir(tmp) || spec.writable {
        m.push(Mount::Host {
            src: HostSource::Tmp,
            dst: tmp.into(),
            make: Make::Dir,
            read_only: false,
        });
    } else {
        t.warnings
            .push("the image has no /tmp: the host's is not bound".into());
    }
    if let Some(name) = &spec.home {
        let dir = Path::new("/home").join(name);
        m.push(Mount::Tmpfs {
            dst: "/home".into(),
            opts: "mode=0755,size=1m",
        });
        m.push(Mount::Mkdir(dir.clone()));
        m.push(Mount::Host {
            src: HostSource::Home,
            dst: dir.clone(),
            make: Make::No,
            read_only: false,
        });
        t.home = Some(dir);
    }
    for (i, (b, is_dir)) in spec.binds.iter().enumerate() {
        m.push(Mount::Host {
            src: HostSource::Bind(i),
            dst: b.dst.clone(),
            make: if *is_dir { Make::Dir } else { Make::File },
            read_only: false,
        });
    }
    if let Some((passwd, group)) = &spec.passwd {
        for (name, text) in [("passwd", passwd), ("group", group)] {
            let dst = Path::new("/etc").join(name);
            if image.exists(&dst) || spec.writable {
                m.push(Mount::File {
                    name,
                    text: text.clone(),
                    dst,
                });
            } else {
                t.notes
                    .push(format!("the image has no {}: not written", dst.display()));
            }
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// An image of the listed paths (directories end in `/`).
    struct Fake(BTreeSet<&'static str>);

    impl ImageView for Fake {
        fn exists(&self, p: &Path) -> bool {
            let p = p.to_str().unwrap();
            self.0.contains(p) || self.0.contains(format!("{p}/").as_str())
        }
        fn is_dir(&self, p: &Path) -> bool {
            self.0.contains(format!("{}/", p.display()).as_str())
        }
    }

    fn full() -> Fake {
        Fake(
            [
                "/tmp/",
                "/home/",
                "/etc/",
                "/etc/passwd",
                "/etc/group",
                "/etc/hosts",
                "/etc/resolv.conf",
            ]
            .into(),
        )
    }

    fn spec() -> ContainerSpec {
        ContainerSpec {
            writable: false,
            private_tmp: false,
            home: None,
            binds: Vec::new(),
            host_etc: [true, true, true],
            passwd: Some(("P\n".into(), "G\n".into())),
        }
    }

    fn dsts(t: &Tree) -> Vec<String> {
        t.mounts
            .iter()
            .map(|m| match m {
                Mount::Host { dst, .. } => format!("bind {}", dst.display()),
                Mount::ReadOnly(d) => format!("ro {}", d.display()),
                Mount::Tmpfs { dst, .. } => format!("tmpfs {}", dst.display()),
                Mount::Mkdir(d) => format!("mkdir {}", d.display()),
                Mount::File { dst, .. } => format!("file {}", dst.display()),
            })
            .collect()
    }

    fn bind(src: &str, dst: &str, is_dir: bool) -> (Bind, bool) {
        (
            Bind {
                src: src.into(),
                dst: dst.into(),
            },
            is_dir,
        )
    }

    #[test]
    fn the_default_tree_in_its_order() {
        let t = mounts(&spec(), &full());
        assert_eq!(
            dsts(&t),
            [
                "bind /dev",
                "bind /proc",
                "bind /sys",
                "ro /proc/sys",
                "ro /proc/sysrq-trigger",
                "ro /proc/irq",
                "ro /proc/bus",
                "bind /etc/hosts",
                "bind /etc/resolv.conf",
                "bind /tmp",
                "file /etc/passwd",
                "file /etc/group",
            ]
        );
        assert!(t.warnings.is_empty() && t.notes.is_empty());
        // The host's /etc files are bound read-only; /etc/machine-id is not in the image.
        assert!(t.mounts.iter().any(|m| matches!(
            m,
            Mount::Host {
                src: HostSource::Etc(0),
                read_only: true,
                make: Make::No,
                ..
            }
        )));
    }

    #[test]
    fn host_files_and_passwd_need_their_place_unless_writable() {
        let bare = Fake(["/etc/"].into());
        let mut s = spec();
        s.host_etc = [true, false, true];
        let t = mounts(&s, &bare);
        assert!(
            !dsts(&t).iter().any(|d| d.contains("/etc/")),
            "{:?}",
            dsts(&t)
        );
        assert_eq!(
            t.warnings,
            ["the image has no /tmp: the host's is not bound"]
        );
        assert_eq!(t.notes.len(), 2);
        s.writable = true;
        let t = mounts(&s, &bare);
        let d = dsts(&t);
        assert!(d.contains(&"bind /tmp".to_string()) && d.contains(&"file /etc/passwd".into()));
        // Host /etc files are bound over the image's only: -W does not create them.
        assert!(!d.iter().any(|x| x.starts_with("bind /etc")), "{d:?}");
        s.passwd = None;
        assert!(
            !dsts(&mounts(&s, &bare))
                .iter()
                .any(|x| x.starts_with("file"))
        );
    }

    #[test]
    fn private_tmp_home_and_binds() {
        let mut s = spec();
        s.private_tmp = true;
        s.home = Some("alice".into());
        s.binds = vec![bind("/data", "/data", true), bind("/x/f", "/data/f", false)];
        let t = mounts(&s, &full());
        let d = dsts(&t);
        let at = |x: &str| {
            d.iter()
                .position(|y| y == x)
                .unwrap_or_else(|| panic!("{x}: {d:?}"))
        };
        assert!(at("tmpfs /tmp") < at("tmpfs /home"));
        assert!(at("tmpfs /home") < at("mkdir /home/alice"));
        assert!(at("mkdir /home/alice") < at("bind /home/alice"));
        // Binds in command-line order, after --home, before the written /etc files.
        assert!(at("bind /home/alice") < at("bind /data"));
        assert!(at("bind /data") < at("bind /data/f"));
        assert!(at("bind /data/f") < at("file /etc/passwd"));
        assert!(
            !d.contains(&"bind /tmp".to_string()),
            "-t replaces the host's /tmp"
        );
        assert_eq!(t.home, Some(PathBuf::from("/home/alice")));
        let makes: Vec<Make> = t
            .mounts
            .iter()
            .filter_map(|m| match m {
                Mount::Host {
                    src: HostSource::Bind(_),
                    make,
                    ..
                } => Some(*make),
                _ => None,
            })
            .collect();
        assert_eq!(makes, [Make::Dir, Make::File]);
    }
}
