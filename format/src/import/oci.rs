//! Layered images: `docker save` archives and OCI image layouts (a directory, or a tar of one
//! as written by `oci-archive:`), resolved to their ordered layers and their config.
//!
//! Every blob read is checked against its digest: the index, manifests and config when they
//! are read, the layers while they stream (the stored bytes against the OCI descriptor's
//! digest; for `docker save`, the uncompressed tar against the config's `rootfs.diff_ids`).
//! Blob names from a manifest must stay inside the layout (no `..`, no absolute path, no
//! symlink), and digests must be `sha256:` and 64 hex digits.
//!
//! The stored config is the JSON object `{"Env": [...], "WorkingDir": "...", "Entrypoint":
//! [...], "Cmd": [...], "User": "..."}` taken from the image config's `config`, keeping only
//! the keys the image sets.

use super::ImportOptions;
use super::tar::Layer;
use crate::{Error, Result};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
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
    Dir(PathBuf),
    Tar {
        path: PathBuf,
        members: HashMap<String, (u64, u64)>,
    },
}

impl Store {
    fn new(path: &Path) -> Result<Self> {
        let md = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        Ok(if md.is_dir() {
            Store::Dir(path.to_path_buf())
        } else {
            Store::Tar {
                path: path.to_path_buf(),
                members: list_members(path)?,
            }
        })
    }

    fn root(&self) -> &Path {
        match self {
            Store::Dir(p) => p,
            Store::Tar { path, .. } => path,
        }
    }

    /// File, offset and length of member `name`.
    fn locate(&self, name: &str) -> Result<(PathBuf, u64, Option<u64>)> {
        let n = clean(name)
            .ok_or_else(|| invalid(self.root(), format!("{name}: refused: leaves the image")))?;
        match self {
            Store::Dir(root) => {
                let p = root.join(&n);
                let md = std::fs::symlink_metadata(&p)
                    .map_err(|e| invalid(root, format!("{n}: {e}")))?;
                if !md.is_file() {
                    return Err(invalid(root, format!("{n}: not a regular file")));
                }
                Ok((p, 0, None))
            }
            Store::Tar { path, members } => {
                let &(off, len) = members
                    .get(&n)
                    .ok_or_else(|| invalid(path, format!("{n}: not in the archive")))?;
                Ok((path.clone(), off, Some(len)))
            }
        }
    }

    fn layer(&self, name: &str, digest: Option<String>, diff_id: Option<String>) -> Result<Layer> {
        let (file, offset, len) = self.locate(name)?;
        Ok(Layer {
            file,
            offset,
            len,
            digest,
            diff_id,
            name: format!("{}: {name}", self.root().display()),
        })
    }

    fn json(&self, name: &str, digest: Option<&str>) -> Result<Value> {
        let (file, offset, len) = self.locate(name)?;
        let what = || format!("{}: {name}", self.root().display());
        let mut f = std::fs::File::open(&file).map_err(|e| Error::io(&file, e))?;
        f.seek(SeekFrom::Start(offset))
            .map_err(|e| Error::io(&file, e))?;
        let mut data = Vec::new();
        f.take(len.unwrap_or(u64::MAX).min(JSON_MAX + 1))
            .read_to_end(&mut data)
            .map_err(|e| Error::io(&file, e))?;
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

/// The part of an image config that is stored (see the module doc).
pub fn image_config(cfg: &Value) -> Option<Vec<u8>> {
    let c = cfg.get("config").or_else(|| cfg.get("Config"))?;
    let mut out = serde_json::Map::new();
    for k in ["Env", "WorkingDir", "Entrypoint", "Cmd", "User"] {
        if let Some(v) = c.get(k).filter(|v| !v.is_null()) {
            out.insert(k.to_string(), v.clone());
        }
    }
    if out.is_empty() {
        return None;
    }
    serde_json::to_vec(&Value::Object(out)).ok()
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
    let manifest = store.json("manifest.json", None)?;
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
    let cfg = store.json(cfg_name, digest_in_name(cfg_name).as_deref())?;
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
        layers.push(store.layer(name, digest_in_name(name), diff)?);
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
    let layout = store.json("oci-layout", None)?;
    if layout.get("imageLayoutVersion").is_none() {
        return Err(invalid(path, "oci-layout: no imageLayoutVersion"));
    }
    let index = store.json("index.json", None)?;
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
        let v = store.json(&name, Some(&hex))?;
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
        let cfg = store.json(&cname, Some(&chex))?;
        let mut layers = Vec::new();
        for l in v
            .get("layers")
            .and_then(|l| l.as_array())
            .map(|a| a.as_slice())
            .unwrap_or(&[])
        {
            let media = l.get("mediaType").and_then(|m| m.as_str()).unwrap_or("");
            if media.contains("encrypted") {
                return Err(invalid(
                    path,
                    format!("encrypted layer ({media}) not supported"),
                ));
            }
            let d = l.get("digest").and_then(|d| d.as_str()).unwrap_or("");
            let (lname, lhex) = blob_name(d)?;
            layers.push(store.layer(&lname, Some(lhex), None)?);
        }
        return Ok(Image {
            layers,
            config: image_config(&cfg),
        });
    }
    Err(invalid(path, "indexes nested too deep"))
}
