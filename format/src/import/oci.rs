//! Layered images: `docker save` archives and OCI image layouts (a directory, or a tar of one
//! as written by `oci-archive:`), resolved to their ordered layers and their config.
//!
//! Every blob read is checked against its digest: the index, manifests and config when they
//! are read, the layers while they stream (the stored bytes against the OCI descriptor's
//! digest, and the uncompressed tar against the config's `rootfs.diff_ids`, OCI and `docker
//! save` alike). A blob whose size differs from its OCI descriptor's `size` is refused before
//! it is read. Blob names from a manifest must stay inside the layout (no `..`, no absolute
//! path, no symlink on the way: a `blobs/` symlink pointing out of a layout directory is
//! refused), and digests must be `sha256:` and 64 hex digits.
//!
//! The stored config is the JSON object `{"Env": [...], "WorkingDir": "...", "Entrypoint":
//! [...], "Cmd": [...], "User": "..."}` taken from the image config's `config`, keeping only
//! the keys the image sets.

use super::ImportOptions;
use super::tar::Layer;
use crate::{Error, Result};
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

/// Largest JSON blob (index, manifest, config) read.
const JSON_MAX: u64 = 64 << 20;

/// An image resolved to its layers, bottom first, and its config.
#[derive(Debug)]
pub struct Image {
    /// Layers, applied in this order.
    pub layers: Vec<Layer>,
    /// The config to store (see the module doc).
    pub config: Option<Vec<u8>>,
}

fn invalid(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("{}: {why}", path.display()))
}

/// Regular members of an uncompressed tar: normalized name → (data offset, size).
pub fn list_members(path: &Path) -> Result<HashMap<String, (u64, u64)>> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut ar = ::tar::Archive::new(f);
    let mut out = HashMap::new();
    let entries = ar
        .entries_with_seek()
        .map_err(|e| invalid(path, format!("not a tar archive: {e}")))?;
    for e in entries {
        let e = e.map_err(|e| invalid(path, format!("not a valid tar archive: {e}")))?;
        if !e.header().entry_type().is_file() {
            continue;
        }
        if let Some(name) = clean(&String::from_utf8_lossy(&e.path_bytes())) {
            out.insert(name, (e.raw_file_position(), e.size()));
        }
    }
    Ok(out)
}

/// `a/./b` → `a/b`; `None` for names with `..` or nothing left.
fn clean(name: &str) -> Option<String> {
    let parts: Vec<&str> = name
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if parts.is_empty() || parts.contains(&"..") {
        return None;
    }
    Some(parts.join("/"))
}

enum Store {
    /// A layout directory, and an fd of it that member names are resolved beneath.
    Dir(PathBuf, OwnedFd),
    Tar {
        path: PathBuf,
        members: HashMap<String, (u64, u64)>,
    },
}

/// A member found: the file holding it, where it starts, its size, and for a directory
/// layout the member opened (read from this fd, not reopened by name, where possible).
struct Found {
    file: PathBuf,
    offset: u64,
    size: u64,
    open: Option<File>,
}

impl Store {
    fn new(path: &Path) -> Result<Self> {
        let md = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        Ok(if md.is_dir() {
            let fd = rustix::fs::open(
                path,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| Error::io(path, e.into()))?;
            Store::Dir(path.to_path_buf(), fd)
        } else {
            Store::Tar {
                path: path.to_path_buf(),
                members: list_members(path)?,
            }
        })
    }

    fn root(&self) -> &Path {
        match self {
            Store::Dir(p, _) => p,
            Store::Tar { path, .. } => path,
        }
    }

    /// Member `name`, which must stay inside the image: no `..`, and in a directory no
    /// symlink anywhere on the way (each component is opened with `O_NOFOLLOW` beneath the
    /// previous one, so a `blobs` or `blobs/sha256` symlink pointing out of the layout is
    /// refused, as is a symlinked blob), and a regular file.
    fn locate(&self, name: &str) -> Result<Found> {
        let n = clean(name)
            .ok_or_else(|| invalid(self.root(), format!("{name}: refused: leaves the image")))?;
        match self {
            Store::Dir(root, dirfd) => {
                let fail = |e: Errno, at: &Path| -> Error {
                    let link = rustix::fs::statat(dirfd, at, AtFlags::SYMLINK_NOFOLLOW)
                        .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink);
                    if link {
                        invalid(root, format!("{n}: refused: {} is a symlink", at.display()))
                    } else {
                        invalid(root, format!("{n}: {}", io::Error::from(e)))
                    }
                };
                let parts: Vec<&str> = n.split('/').collect();
                let (last, dirs) = parts.split_last().unwrap_or((&"", &[]));
                let mut at = PathBuf::new();
                let mut cur: Option<OwnedFd> = None;
                for d in dirs {
                    at.push(d);
                    let base = cur.as_ref().unwrap_or(dirfd);
                    let next = rustix::fs::openat(
                        base,
                        *d,
                        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(|e| fail(e, &at))?;
                    cur = Some(next);
                }
                at.push(last);
                // Non-blocking: a FIFO planted here must not hang the open (refused below).
                let fd = rustix::fs::openat(
                    cur.as_ref().unwrap_or(dirfd),
                    *last,
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| fail(e, &at))?;
                let st = rustix::fs::fstat(&fd).map_err(|e| fail(e, &at))?;
                if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
                    return Err(invalid(root, format!("{n}: not a regular file")));
                }
                Ok(Found {
                    file: root.join(&n),
                    offset: 0,
                    size: st.st_size as u64,
                    open: Some(File::from(fd)),
                })
            }
            Store::Tar { path, members } => {
                let &(offset, size) = members
                    .get(&n)
                    .ok_or_else(|| invalid(path, format!("{n}: not in the archive")))?;
                Ok(Found {
                    file: path.clone(),
                    offset,
                    size,
                    open: None,
                })
            }
        }
    }

    /// Member `name`, refused before it is read if a descriptor gave its size and the
    /// member has another.
    fn locate_sized(&self, name: &str, size: Option<u64>) -> Result<Found> {
        let f = self.locate(name)?;
        match size {
            Some(want) if want != f.size => Err(invalid(
                self.root(),
                format!("{name}: {} bytes, but its descriptor says {want}", f.size),
            )),
            _ => Ok(f),
        }
    }

    fn layer(
        &self,
        name: &str,
        digest: Option<String>,
        diff_id: Option<String>,
        size: Option<u64>,
    ) -> Result<Layer> {
        let f = self.locate_sized(name, size)?;
        Ok(Layer {
            // The tar reader opens the file again by name; the stored bytes are bounded by
            // the size found here and checked against the digest as they stream.
            file: f.file,
            offset: f.offset,
            len: Some(f.size),
            digest,
            diff_id,
            name: format!("{}: {name}", self.root().display()),
        })
    }

    fn json(&self, name: &str, digest: Option<&str>, size: Option<u64>) -> Result<Value> {
        let found = self.locate_sized(name, size)?;
        let what = || format!("{}: {name}", self.root().display());
        let file = &found.file;
        let mut f = match found.open {
            Some(f) => f,
            None => File::open(file).map_err(|e| Error::io(file, e))?,
        };
        f.seek(SeekFrom::Start(found.offset))
            .map_err(|e| Error::io(file, e))?;
        let mut data = Vec::new();
        f.take(found.size.min(JSON_MAX + 1))
            .read_to_end(&mut data)
            .map_err(|e| Error::io(file, e))?;
        if data.len() as u64 > JSON_MAX {
            return Err(Error::Invalid(format!("{}: larger than 64 MiB", what())));
        }
        if let Some(d) = digest {
            let got = super::tar::hex(&Sha256::digest(&data));
            if got != d {
                return Err(Error::Invalid(format!(
                    "{} does not match its digest: sha256:{d} expected, sha256:{got} found",
                    what()
                )));
            }
        }
        serde_json::from_slice(&data)
            .map_err(|e| Error::Invalid(format!("{}: invalid JSON: {e}", what())))
    }
}

/// A descriptor's `size`: `None` if absent (the digest still holds the blob to its bytes),
/// an error if it is not a byte count.
fn desc_size(path: &Path, d: &Value) -> Result<Option<u64>> {
    match d.get("size") {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| invalid(path, format!("descriptor size {v} is not a byte count"))),
    }
}

/// `sha256:HEX` → (`blobs/sha256/HEX`, HEX).
fn blob_name(digest: &str) -> Result<(String, String)> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|c| c.is_ascii_hexdigit()))
        .ok_or_else(|| Error::Invalid(format!("unsupported or invalid digest {digest:?}")))?
        .to_ascii_lowercase();
    Ok((format!("blobs/sha256/{hex}"), hex))
}

/// The hex digest in a blob path `blobs/sha256/HEX` or `HEX.json`, if it is one.
fn digest_in_name(name: &str) -> Option<String> {
    let n = clean(name)?;
    let base = n
        .strip_prefix("blobs/sha256/")
        .or_else(|| n.strip_suffix(".json"))?;
    (base.len() == 64 && base.bytes().all(|c| c.is_ascii_hexdigit()))
        .then(|| base.to_ascii_lowercase())
}

/// The part of an image config that is stored (see the module doc), as JSON.
pub fn image_config(cfg: &Value) -> Option<Vec<u8>> {
    crate::ImageConfig::from_image_config(cfg).map(|c| c.to_json())
}

fn strs(v: Option<&Value>) -> Vec<String> {
    v.and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Resolve a `docker save` archive (or a directory of one).
pub fn docker_image(path: &Path, opts: &ImportOptions) -> Result<Image> {
    let store = Store::new(path)?;
    let manifest = store.json("manifest.json", None, None)?;
    let list = manifest
        .as_array()
        .filter(|a| !a.is_empty())
        .ok_or_else(|| invalid(path, "manifest.json: not a non-empty list"))?;
    let tags = || {
        list.iter()
            .flat_map(|m| strs(m.get("RepoTags")))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let m = match &opts.reference {
        Some(r) => {
            let with_tag = if r.contains(':') {
                r.clone()
            } else {
                format!("{r}:latest")
            };
            list.iter()
                .find(|m| {
                    strs(m.get("RepoTags"))
                        .iter()
                        .any(|t| t == r || *t == with_tag)
                })
                .ok_or_else(|| invalid(path, format!("no image tagged {r} (tags: {})", tags())))?
        }
        None if list.len() == 1 => &list[0],
        None => {
            return Err(invalid(
                path,
                format!(
                    "holds {} images; choose one with --ref (tags: {})",
                    list.len(),
                    tags()
                ),
            ));
        }
    };
    let cfg_name = m
        .get("Config")
        .and_then(|c| c.as_str())
        .ok_or_else(|| invalid(path, "manifest.json: no Config"))?;
    let cfg = store.json(cfg_name, digest_in_name(cfg_name).as_deref(), None)?;
    let diff_ids = strs(cfg.get("rootfs").and_then(|r| r.get("diff_ids")));
    let names = strs(m.get("Layers"));
    if !diff_ids.is_empty() && diff_ids.len() != names.len() {
        return Err(invalid(
            path,
            format!(
                "{} layers but {} diff_ids in the config",
                names.len(),
                diff_ids.len()
            ),
        ));
    }
    let mut layers = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let diff = match diff_ids.get(i) {
            Some(d) => Some(blob_name(d)?.1),
            None => None,
        };
        layers.push(store.layer(name, digest_in_name(name), diff, None)?);
    }
    Ok(Image {
        layers,
        config: image_config(&cfg),
    })
}

fn platform_of(d: &Value) -> Option<String> {
    let p = d.get("platform")?;
    let mut s = format!(
        "{}/{}",
        p.get("os")?.as_str()?,
        p.get("architecture")?.as_str()?
    );
    if let Some(v) = p.get("variant").and_then(|v| v.as_str()) {
        s.push('/');
        s.push_str(v);
    }
    Some(s)
}

fn platform_matches(d: &Value, want: &str) -> bool {
    match platform_of(d) {
        Some(p) => {
            p == want || (want.matches('/').count() == 1 && p.starts_with(&format!("{want}/")))
        }
        None => false,
    }
}

fn ref_names(d: &Value) -> Vec<String> {
    let a = d.get("annotations");
    [
        "org.opencontainers.image.ref.name",
        "io.containerd.image.name",
    ]
    .iter()
    .filter_map(|k| a.and_then(|a| a.get(*k)).and_then(|v| v.as_str()))
    .map(String::from)
    .collect()
}

/// Resolve an OCI image layout (directory or tar of one).
pub fn oci_image(path: &Path, opts: &ImportOptions) -> Result<Image> {
    let store = Store::new(path)?;
    let layout = store.json("oci-layout", None, None)?;
    if layout.get("imageLayoutVersion").is_none() {
        return Err(invalid(path, "oci-layout: no imageLayoutVersion"));
    }
    let index = store.json("index.json", None, None)?;
    let want = opts.platform.as_deref().unwrap_or("linux/amd64");
    let all: Vec<&Value> = index
        .get("manifests")
        .and_then(|m| m.as_array())
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let names = || {
        all.iter()
            .flat_map(|d| ref_names(d))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut cands: Vec<&Value> = match &opts.reference {
        Some(r) => all
            .iter()
            .copied()
            .filter(|d| {
                ref_names(d)
                    .iter()
                    .any(|n| n == r || n.rsplit_once(':').is_some_and(|(_, t)| t == r))
            })
            .collect(),
        None => all.clone(),
    };
    if cands.len() > 1 {
        let on_platform: Vec<&Value> = cands
            .iter()
            .copied()
            .filter(|d| platform_matches(d, want))
            .collect();
        if on_platform.len() == 1 {
            cands = on_platform;
        }
    }
    let mut desc = match cands.as_slice() {
        [d] => (*d).clone(),
        [] => {
            return Err(invalid(
                path,
                match &opts.reference {
                    Some(r) => format!("no image named {r} in index.json (names: {})", names()),
                    None => "index.json lists no image".into(),
                },
            ));
        }
        _ => {
            return Err(invalid(
                path,
                format!(
                    "index.json holds {} images; choose one with --ref (names: {})",
                    cands.len(),
                    names()
                ),
            ));
        }
    };
    for _ in 0..8 {
        let digest = desc
            .get("digest")
            .and_then(|d| d.as_str())
            .ok_or_else(|| invalid(path, "descriptor without a digest"))?;
        let (name, hex) = blob_name(digest)?;
        let v = store.json(&name, Some(&hex), desc_size(path, &desc)?)?;
        if let Some(ms) = v.get("manifests").and_then(|m| m.as_array()) {
            // An index (or Docker manifest list): choose by platform.
            desc = ms
                .iter()
                .find(|d| platform_matches(d, want))
                .cloned()
                .ok_or_else(|| {
                    let have: Vec<String> = ms.iter().filter_map(platform_of).collect();
                    invalid(
                        path,
                        format!(
                            "no image for platform {want} (platforms: {}); choose with --platform",
                            have.join(", ")
                        ),
                    )
                })?;
            continue;
        }
        let cdesc = v
            .get("config")
            .ok_or_else(|| invalid(path, format!("{name}: manifest without a config")))?;
        let cdigest = cdesc.get("digest").and_then(|d| d.as_str()).unwrap_or("");
        let (cname, chex) = blob_name(cdigest)?;
        let cfg = store.json(&cname, Some(&chex), desc_size(path, cdesc)?)?;
        let descs = v
            .get("layers")
            .and_then(|l| l.as_array())
            .map(|a| a.as_slice())
            .unwrap_or(&[]);
        // The uncompressed digest of each layer; checked as its tar is read (after the
        // stored bytes' digest), so a config that lies about the layers is refused. A config
        // without them (against the spec) is taken on the layers' digests alone.
        let diff_ids = strs(cfg.get("rootfs").and_then(|r| r.get("diff_ids")));
        if !diff_ids.is_empty() && diff_ids.len() != descs.len() {
            return Err(invalid(
                path,
                format!(
                    "{name}: {} layers but {} diff_ids in the config",
                    descs.len(),
                    diff_ids.len()
                ),
            ));
        }
        let mut layers = Vec::new();
        for (i, l) in descs.iter().enumerate() {
            let media = l.get("mediaType").and_then(|m| m.as_str()).unwrap_or("");
            if media.contains("encrypted") {
                return Err(invalid(
                    path,
                    format!("encrypted layer ({media}) not supported"),
                ));
            }
            let d = l.get("digest").and_then(|d| d.as_str()).unwrap_or("");
            let (lname, lhex) = blob_name(d)?;
            let diff = match diff_ids.get(i) {
                Some(d) => Some(blob_name(d)?.1),
                None => None,
            };
            layers.push(store.layer(&lname, Some(lhex), diff, desc_size(path, l)?)?);
        }
        return Ok(Image {
            layers,
            config: image_config(&cfg),
        });
    }
    Err(invalid(path, "indexes nested too deep"))
}
