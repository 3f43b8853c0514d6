//! The in-memory tree the writer packs: metadata of every entry, no file content. Importers
//! produce it; [`scan_dir`] builds it from a directory on disk.
//!
//! Memory is proportional to the number of entries (about 150 bytes each plus names), never to
//! the data: content is read later, block by block, from each file's `source`.

use crate::{Error, FileKind, Result};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Index of a node in [`Tree::nodes`]; the root is 0.
pub type NodeId = u32;

/// Where a regular file's content comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Read by offset (in parallel) from this file.
    Path(PathBuf),
    /// Pushed, in the order the caller chooses, by the `feed` of
    /// [`pack_tree_with`](super::pack_tree_with); the data is laid out in that order.
    Stream,
    /// As `Stream`, for a sparse file: the data lies in these sorted, disjoint
    /// `(offset, length)` ranges within the size, and the stream yields exactly their bytes,
    /// back to back; the rest of the file is holes, which then cost nothing however large.
    SparseStream(Vec<(u64, u64)>),
}

/// One entry of the tree.
#[derive(Debug, Clone)]
pub struct Node {
    /// Name in its parent (empty for the root).
    pub name: Vec<u8>,
    /// Parent node (the root's is itself).
    pub parent: NodeId,
    /// File type.
    pub kind: FileKind,
    /// Permission bits (`0o7777` part of `st_mode`).
    pub perm: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds.
    pub mtime_sec: i64,
    /// Modification time, nanoseconds.
    pub mtime_nsec: u32,
    /// Device number for device nodes.
    pub rdev: u64,
    /// Size of a regular file.
    pub size: u64,
    /// Extended attributes, sorted by key.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Symlink target.
    pub target: Vec<u8>,
    /// Children of a directory, sorted by name.
    pub children: Vec<NodeId>,
    /// For a hard link after the first: the node holding the inode.
    pub link: Option<NodeId>,
    /// Where a regular file's content comes from.
    pub source: Option<Source>,
    /// The file may have holes (fewer blocks allocated than its size).
    pub sparse: bool,
}

impl Node {
    /// A node with the given kind and defaults elsewhere.
    pub fn new(name: Vec<u8>, parent: NodeId, kind: FileKind, perm: u32) -> Self {
        Node {
            name,
            parent,
            kind,
            perm,
            uid: 0,
            gid: 0,
            mtime_sec: 0,
            mtime_nsec: 0,
            rdev: 0,
            size: 0,
            xattrs: Vec::new(),
            target: Vec::new(),
            children: Vec::new(),
            link: None,
            source: None,
            sparse: false,
        }
    }
}

/// A whole tree; node 0 is the root directory.
#[derive(Debug, Clone)]
pub struct Tree {
    /// All nodes; children refer to them by index.
    pub nodes: Vec<Node>,
}

impl Tree {
    /// The node, by id.
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id as usize]
    }

    /// Path of a node from the root, `/`-separated without a leading slash.
    pub fn path_of(&self, mut id: NodeId) -> Vec<u8> {
        let mut parts = Vec::new();
        while id != 0 {
            let n = self.node(id);
            parts.push(n.name.as_slice());
            id = n.parent;
        }
        parts.reverse();
        parts.join(&b'/')
    }

    /// Find a node by `/`-separated path from the root (no symlinks followed).
    pub fn find(&self, path: &[u8]) -> Option<NodeId> {
        let mut id = 0;
        for comp in path
            .split(|&c| c == b'/')
            .filter(|c| !c.is_empty() && *c != b".")
        {
            let n = self.node(id);
            let pos = n
                .children
                .binary_search_by(|&c| self.node(c).name.as_slice().cmp(comp))
                .ok()?;
            id = n.children[pos];
        }
        Some(id)
    }

    /// Check what the format requires of a tree, so an importer's mistake is an error here
    /// and not an image the reader refuses: valid unique sorted names, one parent per
    /// directory, hard links to non-directories, sorted xattr keys, non-empty symlinks.
    pub fn check(&self) -> Result<()> {
        let bad = |id: NodeId, why: &str| {
            Error::Invalid(format!(
                "{}: {why}",
                String::from_utf8_lossy(&self.path_of(id))
            ))
        };
        let root = self
            .nodes
            .first()
            .ok_or_else(|| Error::Invalid("empty tree".into()))?;
        if root.kind != FileKind::Dir {
            return Err(Error::Invalid("the root is not a directory".into()));
        }
        let mut seen = vec![false; self.nodes.len()];
        seen[0] = true;
        for (i, n) in self.nodes.iter().enumerate() {
            let id = i as NodeId;
            if n.kind == FileKind::Symlink && n.target.is_empty() && n.link.is_none() {
                return Err(bad(id, "empty symlink target"));
            }
            if n.xattrs.windows(2).any(|w| w[0].0 >= w[1].0)
                || n.xattrs.iter().any(|(k, _)| k.is_empty() || k.contains(&0))
            {
                return Err(bad(id, "xattr keys empty, repeated or unsorted"));
            }
            if let Some(l) = n.link {
                let t = self
                    .nodes
                    .get(l as usize)
                    .ok_or_else(|| bad(id, "hard link to nothing"))?;
                if t.kind == FileKind::Dir || t.link.is_some() || n.kind == FileKind::Dir {
                    return Err(bad(id, "hard link to a directory or to another link"));
                }
            }
            if n.kind != FileKind::Dir && !n.children.is_empty() {
                return Err(bad(id, "entries under a non-directory"));
            }
            let mut prev: Option<&[u8]> = None;
            for &c in &n.children {
                let cn = self
                    .nodes
                    .get(c as usize)
                    .ok_or_else(|| bad(id, "child out of range"))?;
                let name = cn.name.as_slice();
                if name.is_empty()
                    || name.len() > 255
                    || name == b"."
                    || name == b".."
                    || name.iter().any(|&b| b == b'/' || b == 0)
                {
                    return Err(bad(c, "invalid name"));
                }
                if prev.is_some_and(|p| p >= name) {
                    return Err(bad(id, "entries repeated or not sorted"));
                }
                prev = Some(name);
                if cn.parent != id || std::mem::replace(&mut seen[c as usize], true) {
                    return Err(bad(c, "entry with two parents"));
                }
            }
        }
        Ok(())
    }

    /// Directory-order (depth-first, names sorted) list of all nodes, root first.
    pub fn dfs(&self) -> Vec<NodeId> {
        let mut out = Vec::with_capacity(self.nodes.len());
        let mut stack = vec![0];
        while let Some(id) = stack.pop() {
            out.push(id);
            stack.extend(self.node(id).children.iter().rev());
        }
        out
    }
}

fn read_xattrs(path: &Path) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let names = match xattr::list(path) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(nix::libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let mut out = Vec::new();
    for name in names {
        match xattr::get(path, &name) {
            Ok(Some(v)) => out.push((name.as_bytes().to_vec(), v)),
            Ok(None) => {}
            Err(e) if e.raw_os_error() == Some(nix::libc::ENODATA) => {}
            Err(e) => return Err(Error::io(path, e)),
        }
    }
    out.sort();
    Ok(out)
}

/// Statistics of a scan, for progress reporting.
#[derive(Debug, Default, Clone, Copy)]
pub struct ScanCount {
    /// Entries seen.
    pub entries: u64,
    /// Bytes of regular files (hard links once).
    pub bytes: u64,
}

fn node_from_meta(
    name: Vec<u8>,
    parent: NodeId,
    path: &Path,
    md: &std::fs::Metadata,
) -> Result<Node> {
    let ft = md.file_type();
    let kind = if ft.is_file() {
        FileKind::File
    } else if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_symlink() {
        FileKind::Symlink
    } else if ft.is_char_device() {
        FileKind::CharDev
    } else if ft.is_block_device() {
        FileKind::BlockDev
    } else if ft.is_fifo() {
        FileKind::Fifo
    } else if ft.is_socket() {
        FileKind::Socket
    } else {
        return Err(Error::Invalid(format!(
            "{}: unknown file type",
            path.display()
        )));
    };
    let mut n = Node::new(name, parent, kind, md.mode() & 0o7777);
    n.uid = md.uid();
    n.gid = md.gid();
    n.mtime_sec = md.mtime();
    n.mtime_nsec = md.mtime_nsec().clamp(0, 999_999_999) as u32;
    n.xattrs = read_xattrs(path)?;
    match kind {
        FileKind::File => {
            n.size = md.len();
            n.sparse = md.blocks().saturating_mul(512) < md.len();
            n.source = Some(Source::Path(path.to_path_buf()));
        }
        FileKind::Symlink => {
            n.target = std::fs::read_link(path)
                .map_err(|e| Error::io(path, e))?
                .into_os_string()
                .into_vec();
            if n.target.is_empty() {
                return Err(Error::Invalid(format!(
                    "{}: empty symlink target",
                    path.display()
                )));
            }
        }
        FileKind::CharDev | FileKind::BlockDev => n.rdev = md.rdev(),
        _ => {}
    }
    Ok(n)
}

use std::os::unix::ffi::OsStringExt;

/// Scan the directory `root` into a tree, without following symlinks. `progress` is called
/// every few thousand entries.
pub fn scan_dir(root: &Path, mut progress: impl FnMut(ScanCount)) -> Result<Tree> {
    let md = std::fs::symlink_metadata(root).map_err(|e| Error::io(root, e))?;
    if !md.is_dir() {
        return Err(Error::Invalid(format!(
            "{}: not a directory",
            root.display()
        )));
    }
    let root_node = node_from_meta(Vec::new(), 0, root, &md)?;
    let mut tree = Tree {
        nodes: vec![root_node],
    };
    let mut links: HashMap<(u64, u64), NodeId> = HashMap::new();
    let mut count = ScanCount {
        entries: 1,
        bytes: 0,
    };
    let mut stack: Vec<(NodeId, PathBuf)> = vec![(0, root.to_path_buf())];
    while let Some((dir, dpath)) = stack.pop() {
        let rd = std::fs::read_dir(&dpath).map_err(|e| Error::io(&dpath, e))?;
        let mut names: Vec<std::ffi::OsString> = Vec::new();
        for ent in rd {
            names.push(ent.map_err(|e| Error::io(&dpath, e))?.file_name());
        }
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let mut children = Vec::with_capacity(names.len());
        for name in names {
            let path = dpath.join(&name);
            let md = std::fs::symlink_metadata(&path).map_err(|e| Error::io(&path, e))?;
            let id = NodeId::try_from(tree.nodes.len())
                .map_err(|_| Error::Invalid("more than 4 billion entries".into()))?;
            let mut node = node_from_meta(name.into_vec(), dir, &path, &md)?;
            if node.kind != FileKind::Dir && md.nlink() > 1 {
                match links.entry((md.dev(), md.ino())) {
                    std::collections::hash_map::Entry::Occupied(o) => {
                        node.link = Some(*o.get());
                        node.source = None;
                    }
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(id);
                    }
                }
            }
            if node.kind == FileKind::File && node.link.is_none() {
                count.bytes += node.size;
            }
            if node.kind == FileKind::Dir {
                stack.push((id, path));
            }
            tree.nodes.push(node);
            children.push(id);
            count.entries += 1;
            if count.entries.is_multiple_of(4096) {
                progress(count);
            }
        }
        tree.nodes[dir as usize].children = children;
    }
    progress(count);
    Ok(tree)
}

/// Name as an `OsStr`, for building paths.
pub fn os(name: &[u8]) -> &OsStr {
    OsStr::from_bytes(name)
}
