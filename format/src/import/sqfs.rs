//! SquashFS images (`.sqfs`, as made by `mksquashfs`), read with the `backhand` crate.
//!
//! The directory tree is read first, then each file's content is streamed into the writer in
//! the image's own order. Kept: types, permissions, owners, mtimes (seconds), symlink targets,
//! device numbers, content (gzip, xz, zstd, lz4). Not kept, because `backhand` does not
//! expose them: extended attributes, and hard links (each name becomes its own inode; the
//! content is still stored once, by deduplication).

use crate::writer::{self, Node, NodeId, PackOptions, PackStats, Progress, Source, Tree};
use crate::{Error, FileKind, Result};
use backhand::{FilesystemReader, InnerNode};
use std::collections::HashMap;
use std::io::BufReader;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

fn open(path: &Path) -> Result<FilesystemReader<'static>> {
    let f = crate::reader::open_regular(path, false)?;
    FilesystemReader::from_reader(BufReader::new(f)).map_err(|e| {
        Error::Invalid(format!(
            "{}: not a valid SquashFS image: {e}",
            path.display()
        ))
    })
}

/// SquashFS's 32-bit device encoding → Linux `dev_t`.
fn dev(d: u32) -> u64 {
    let d = d as u64;
    let major = (d >> 8) & 0xfff;
    let minor = (d & 0xff) | ((d >> 12) & 0xfff00);
    ((major & 0xffff_f000) << 32)
        | ((major & 0xfff) << 8)
        | ((minor & 0xffff_ff00) << 12)
        | (minor & 0xff)
}

/// Pack the SquashFS image `src` into `out`.
pub fn pack_sqfs(
    src: &Path,
    out: &Path,
    opts: &PackOptions,
    progress: Progress,
) -> Result<PackStats> {
    let fs = open(src)?;
    let bad = |p: &Path, why: &str| {
        Error::Invalid(format!("{}: entry {}: {why}", src.display(), p.display()))
    };
    let mut nodes: Vec<Node> = Vec::new();
    let mut dirs: HashMap<PathBuf, NodeId> = HashMap::new();
    // Index in `files()` of each regular file → node.
    let mut prov: HashMap<usize, NodeId> = HashMap::new();
    for (i, n) in fs.files().enumerate() {
        let h = &n.header;
        let p = n.fullpath.as_path();
        let (kind, size, target, rdev) = match &n.inner {
            InnerNode::File(f) => (FileKind::File, f.file_len() as u64, Vec::new(), 0),
            InnerNode::Dir(_) => (FileKind::Dir, 0, Vec::new(), 0),
            InnerNode::Symlink(s) => (
                FileKind::Symlink,
                0,
                s.link.as_os_str().as_bytes().to_vec(),
                0,
            ),
            InnerNode::CharacterDevice(d) => {
                (FileKind::CharDev, 0, Vec::new(), dev(d.device_number))
            }
            InnerNode::BlockDevice(d) => (FileKind::BlockDev, 0, Vec::new(), dev(d.device_number)),
            InnerNode::NamedPipe => (FileKind::Fifo, 0, Vec::new(), 0),
            InnerNode::Socket => (FileKind::Socket, 0, Vec::new(), 0),
        };
        let is_root = p == Path::new("/");
        let (name, parent) = if is_root {
            if kind != FileKind::Dir {
                return Err(bad(p, "the root is not a directory"));
            }
            (Vec::new(), 0)
        } else {
            let name = p
                .file_name()
                .ok_or_else(|| bad(p, "no name"))?
                .as_bytes()
                .to_vec();
            let parent = p
                .parent()
                .and_then(|pp| dirs.get(pp).copied())
                .ok_or_else(|| bad(p, "listed before its directory"))?;
            (name, parent)
        };
        if !is_root && nodes.is_empty() {
            return Err(bad(p, "listed before the root"));
        }
        let id = nodes.len() as NodeId;
        let mut node = Node::new(name, parent, kind, (h.permissions & 0o7777) as u32);
        node.uid = h.uid;
        node.gid = h.gid;
        node.mtime_sec = h.mtime as i64;
        node.size = size;
        node.target = target;
        node.rdev = rdev;
        if kind == FileKind::File {
            node.source = Some(Source::Stream);
            prov.insert(i, id);
        }
        if kind == FileKind::Dir {
            dirs.insert(p.to_path_buf(), id);
        }
        if !is_root {
            nodes[parent as usize].children.push(id);
        }
        nodes.push(node);
    }
    if nodes.is_empty() {
        return Err(Error::Invalid(format!("{}: empty image", src.display())));
    }
    let names: Vec<Vec<u8>> = nodes.iter().map(|n| n.name.clone()).collect();
    for n in &mut nodes {
        n.children
            .sort_by(|a, b| names[*a as usize].cmp(&names[*b as usize]));
    }
    let tree = Tree { nodes };
    tree.check()
        .map_err(|e| Error::Invalid(format!("{}: {e}", src.display())))?;
    drop(fs);
    let src = src.to_path_buf();
    writer::pack_tree_with(&tree, out, opts, progress, move |sink| {
        let fs = open(&src)?;
        for (i, n) in fs.files().enumerate() {
            if let (Some(&id), InnerNode::File(f)) = (prov.get(&i), &n.inner) {
                let mut r = fs.file(f).reader_checked().map_err(|e| {
                    Error::Invalid(format!("{}: {}: {e}", src.display(), n.fullpath.display()))
                })?;
                sink(id, &mut r).map_err(|e| {
                    Error::Invalid(format!("{}: {}: {e}", src.display(), n.fullpath.display()))
                })?;
            }
        }
        Ok(())
    })
}
