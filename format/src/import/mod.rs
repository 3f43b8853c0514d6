//! Importers: sources that yield a [`Tree`](crate::writer::Tree) and stream its files' data
//! into the writer, without unpacking anything to disk.
//!
//! - a tar archive (plain, gzip, zstd or xz; see [`tar`]), a file or a seekable standard input;
//! - a `docker save` archive and an OCI image layout, directory or `oci-archive` tar (see
//!   [`oci`]): layers applied in order with whiteouts, the image config kept as JSON;
//! - a SquashFS image (see [`sqfs`]).
//!
//! Every layer is read twice: once for the metadata (the tree is complete only after the last
//! entry of the last layer: later entries and whiteouts replace or delete earlier ones), once
//! for the data, streamed through the writer's bounded pipeline. Memory is the tree's metadata
//! plus the writer's fixed window, whatever the image size; nothing is written to disk but the
//! output image. Digests are checked during the first pass.
//!
//! A source read from a pipe cannot be read twice: `-` works when standard input is a regular
//! file (`cimg pack - out.cimg < image.tar`), not from a pipe.

pub mod oci;
pub mod sqfs;
pub mod tar;

use crate::writer::{self, PackOptions, PackStats, Progress};
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// The kind of a source for `cimg pack`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A directory on disk.
    Dir,
    /// A tar archive, maybe compressed.
    Tar,
    /// A `docker save` archive (a tar holding `manifest.json`).
    Docker,
    /// An OCI image layout: a directory holding `oci-layout`, or a tar of one.
    Oci,
    /// A SquashFS image (see [`sqfs`] for what is kept).
    Sqfs,
}

impl Kind {
    /// Parse the name given to `--from`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "dir" => Kind::Dir,
            "tar" => Kind::Tar,
            "docker" => Kind::Docker,
            "oci" => Kind::Oci,
            "sqfs" => Kind::Sqfs,
            _ => return None,
        })
    }
}

/// Choices for layered images.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Image to take when the source holds several: an OCI `org.opencontainers.image.ref.name`
    /// annotation, or a `docker save` repo tag.
    pub reference: Option<String>,
    /// Platform `os/arch[/variant]` to take from a multi-platform index; default `linux/amd64`.
    pub platform: Option<String>,
}

/// Compression of a stream, by its magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// None.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
    /// xz.
    Xz,
    /// bzip2 (recognized, refused).
    Bzip2,
}

/// The compression announced by the first bytes of a stream.
pub fn compression_of(head: &[u8]) -> Compression {
    if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Compression::Xz
    } else if head.starts_with(b"BZh") {
        Compression::Bzip2
    } else {
        Compression::None
    }
}

/// The path to read for `src`: `-` is standard input, which must be a regular file.
pub fn resolve_stdin(src: &Path) -> Result<PathBuf> {
    if src != Path::new("-") {
        return Ok(src.to_path_buf());
    }
    let md = std::fs::metadata("/dev/stdin").map_err(|e| Error::io("standard input", e))?;
    if !md.is_file() {
        return Err(Error::Invalid(
            "standard input is not a regular file: an archive is read twice (metadata, then \
             data) to keep memory bounded, so it cannot come from a pipe; give a file or \
             redirect one (`< image.tar`)"
                .into(),
        ));
    }
    Ok(PathBuf::from("/dev/stdin"))
}

/// What kind of source `src` is, by looking at it: a directory (an OCI layout if it holds
/// `oci-layout`), or a file: compressed → tar; SquashFS magic → sqfs; a tar holding
/// `manifest.json` → docker, one holding `oci-layout` → oci; any other tar → tar.
pub fn detect(src: &Path) -> Result<Kind> {
    let src = resolve_stdin(src)?;
    let md = std::fs::metadata(&src).map_err(|e| Error::io(&src, e))?;
    if md.is_dir() {
        return Ok(if src.join("oci-layout").is_file() {
            Kind::Oci
        } else {
            Kind::Dir
        });
    }
    let mut f = crate::reader::open_regular(&src, false)?;
    let mut head = [0u8; 512];
    let n = crate::writer::read_full(&mut f, &mut head).map_err(|e| Error::io(&src, e))?;
    if head[..n].starts_with(b"hsqs") {
        return Ok(Kind::Sqfs);
    }
    if compression_of(&head[..n]) != Compression::None {
        return Ok(Kind::Tar);
    }
    let members = oci::list_members(&src)?;
    Ok(if members.contains_key("manifest.json") {
        Kind::Docker
    } else if members.contains_key("oci-layout") {
        Kind::Oci
    } else {
        Kind::Tar
    })
}

/// Pack `src` of kind `kind` into `out`. For layered images the image config (Env,
/// WorkingDir, Entrypoint, Cmd, User) is stored in `opts.config` unless one is already set.
pub fn pack(
    kind: Kind,
    src: &Path,
    out: &Path,
    import: &ImportOptions,
    opts: &PackOptions,
    progress: Progress,
) -> Result<PackStats> {
    match kind {
        Kind::Dir => writer::pack_dir(src, out, opts, progress),
        Kind::Sqfs => sqfs::pack_sqfs(&resolve_stdin(src)?, out, opts, progress),
        Kind::Tar => {
            let path = resolve_stdin(src)?;
            let layer = tar::Layer::whole_file(&path);
            tar::pack_layers(vec![layer], false, out, opts, progress)
        }
        Kind::Docker | Kind::Oci => {
            let path = resolve_stdin(src)?;
            // Refused here, not where the archive is read: a FIFO would block that open.
            drop(crate::reader::open_regular(&path, kind == Kind::Oci)?);
            let img = if kind == Kind::Docker {
                oci::docker_image(&path, import)?
            } else {
                oci::oci_image(&path, import)?
            };
            let mut opts = opts.clone();
            if opts.config.is_none() {
                opts.config = img.config;
            }
            tar::pack_layers(img.layers, true, out, &opts, progress)
        }
    }
}
