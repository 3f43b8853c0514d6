//! Tar layers applied in order into a [`Tree`], then streamed into the writer.
//!
//! Supported: ustar, PAX (long paths and link names, `mtime`, `uid`, `gid`, `size`,
//! `SCHILY.xattr.*`), GNU long names and links, GNU sparse files (the old GNU format, and the
//! PAX formats 0.0, 0.1 and 1.0 that `tar --format=posix --sparse` writes; their holes come
//! back as zeros, which the writer stores as holes), hard links (to any earlier entry, also of
//! a lower layer), symlinks, character and block devices, fifos. Later entries replace earlier
//! ones with the same path, as when extracting. In layers of an image, `.wh.NAME` deletes NAME
//! and `.wh..wh..opq` hides everything the lower layers put in its directory.
//!
//! Refused with an error naming the layer and the entry: a path whose `..` leaves the root
//! (a leading `/` is dropped), an entry under a non-directory (symlinks are never followed),
//! a hard link to a missing entry, a directory or outside the root, an unsupported entry
//! type, an empty symlink target, an extended header over 1 MiB, content shorter than
//! declared, a sparse map that is malformed, overlapping, out of order, beyond the file's size
//! or not matching the stored data, a truncated or corrupt archive or compressed stream, a
//! digest mismatch. Symlink targets are kept as they are: they are resolved inside the
//! container, never here.
//!
//! A PAX sparse file (formats 0.0, 0.1, 1.0) reaches the writer with its map: the writer
//! makes the ranges outside it holes without reading them, in time and memory linear in the
//! map, not the file's size. An old-format GNU sparse entry (type `S`), whose map the tar
//! crate keeps to itself, reaches it as zeros, which it stores as holes, in time linear in the
//! logical size. A file larger than the format holds (`writer::max_file_size` at the largest
//! block size) is refused as its header is read.

use super::{Compression, compression_of};
use crate::writer::{self, Node, NodeId, PackOptions, PackStats, Progress, Source, Tree};
use crate::{Error, FileKind, Result};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Largest extended header (PAX record set, GNU long name) accepted.
const HEADER_BUDGET: u64 = 1 << 20;

/// One tar stream: a byte range of a file, maybe compressed, with the digests it must have.
#[derive(Debug, Clone)]
pub struct Layer {
    /// File holding it.
    pub file: PathBuf,
    /// Start of the stream in the file.
    pub offset: u64,
    /// Length of the stream; `None`: to the end of the file.
    pub len: Option<u64>,
    /// Expected sha256 (hex) of the stored bytes (an OCI blob digest).
    pub digest: Option<String>,
    /// Expected sha256 (hex) of the uncompressed tar (a `diff_id`).
    pub diff_id: Option<String>,
    /// Name for messages.
    pub name: String,
}

impl Layer {
    /// A whole file, no digest.
    pub fn whole_file(path: &Path) -> Self {
        Layer {
            file: path.to_path_buf(),
            offset: 0,
            len: None,
            digest: None,
            diff_id: None,
            name: path.display().to_string(),
        }
    }
}

/// Checks a sha256 when its inner reader ends; a mismatch is a read error.
struct HashReader<R> {
    inner: R,
    hasher: Option<Sha256>,
    want: String,
    what: String,
}

impl<R: Read> Read for HashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(h) = self.hasher.as_mut() {
            if n > 0 {
                h.update(&buf[..n]);
            } else if !buf.is_empty() {
                let got = hex(&self.hasher.take().map(|h| h.finalize()).unwrap_or_default());
                if !got.eq_ignore_ascii_case(&self.want) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "{} does not match its digest: sha256:{} expected, sha256:{got} found",
                            self.what, self.want
                        ),
                    ));
                }
            }
        }
        Ok(n)
    }
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Refuses to read more than its budget: bounds what the tar reader buffers for extended
/// headers.
struct Budget<R> {
    inner: R,
    left: Arc<AtomicU64>,
}

impl<R: Read> Read for Budget<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.left.load(Ordering::Relaxed);
        if left == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "extended header (PAX or GNU long name) larger than 1 MiB",
            ));
        }
        let cap = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..cap])?;
        if left != u64::MAX {
            self.left.fetch_sub(n as u64, Ordering::Relaxed);
        }
        Ok(n)
    }
}

type Stream = Budget<Box<dyn Read + Send>>;

/// Open a layer's tar stream, decompressed, checking digests if `verify`.
fn open(layer: &Layer, verify: bool) -> Result<(Stream, Arc<AtomicU64>)> {
    let mut f = crate::reader::open_regular(&layer.file, false)?;
    f.seek(SeekFrom::Start(layer.offset))
        .map_err(|e| Error::io(&layer.file, e))?;
    let raw: Box<dyn Read + Send> = match layer.len {
        Some(l) => Box::new(f.take(l)),
        None => Box::new(f),
    };
    let raw: Box<dyn Read + Send> = match (&layer.digest, verify) {
        (Some(d), true) => Box::new(HashReader {
            inner: raw,
            hasher: Some(Sha256::new()),
            want: d.clone(),
            what: layer.name.clone(),
        }),
        _ => raw,
    };
    let mut buf = BufReader::with_capacity(1 << 16, raw);
    let head = buf.fill_buf().map_err(|e| Error::io(&layer.file, e))?;
    let plain: Box<dyn Read + Send> = match compression_of(head) {
        Compression::None => Box::new(buf),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buf)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(buf).map_err(|e| Error::io(&layer.file, e))?,
        ),
        Compression::Xz => Box::new(liblzma::bufread::XzDecoder::new_multi_decoder(buf)),
        Compression::Bzip2 => {
            return Err(Error::Invalid(format!(
                "{}: bzip2 compression is not supported",
                layer.name
            )));
        }
    };
    let plain: Box<dyn Read + Send> = match (&layer.diff_id, verify) {
        (Some(d), true) => Box::new(HashReader {
            inner: plain,
            hasher: Some(Sha256::new()),
            want: d.clone(),
            what: format!("{} (uncompressed)", layer.name),
        }),
        _ => plain,
    };
    let left = Arc::new(AtomicU64::new(u64::MAX));
    Ok((
        Budget {
            inner: plain,
            left: left.clone(),
        },
        left,
    ))
}

/// Which node each (layer, entry index) holding a file's final content feeds.
pub type Providers = HashMap<(u32, u64), NodeId>;

/// A node while layers are applied.
struct B {
    node: Node,
    kids: BTreeMap<Vec<u8>, NodeId>,
    layer: u32,
    /// (layer, entry index) holding a regular file's content.
    prov: Option<(u32, u64)>,
    alive: bool,
    linked_by: Vec<NodeId>,
}

/// Applies tar entries, layer after layer, into a tree.
struct Builder {
    b: Vec<B>,
    layered: bool,
}

fn escape(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Components of an entry path: leading `/` and `.` dropped, `..` resolved; `None` when it
/// leaves the root.
fn normalize(path: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    for c in path.split(|&c| c == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                out.pop()?;
            }
            c => out.push(c.to_vec()),
        }
    }
    Some(out)
}

fn pax_num(v: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(v).ok()?;
    let (i, f) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = i.parse().ok()?;
    let mut frac = f.bytes().take(9).collect::<Vec<_>>();
    frac.resize(9, b'0');
    let nsec: u32 = std::str::from_utf8(&frac).ok()?.parse().ok()?;
    Some((secs, if secs < 0 && nsec > 0 { 0 } else { nsec }))
}

fn makedev(major: u64, minor: u64) -> u64 {
    ((major & 0xffff_f000) << 32)
        | ((major & 0xfff) << 8)
        | ((minor & 0xffff_ff00) << 12)
        | (minor & 0xff)
}

impl Builder {
    fn new(layered: bool) -> Self {
        let mut root = Node::new(Vec::new(), 0, FileKind::Dir, 0o755);
        root.mtime_sec = 0;
        Builder {
            b: vec![B {
                node: root,
                kids: BTreeMap::new(),
                layer: 0,
                prov: None,
                alive: true,
                linked_by: Vec::new(),
            }],
            layered,
        }
    }

    fn push(&mut self, node: Node, layer: u32, prov: Option<(u32, u64)>) -> Result<NodeId> {
        let id = NodeId::try_from(self.b.len())
            .ok()
            .filter(|&i| i < u32::MAX)
            .ok_or_else(|| Error::Invalid("more than 4 billion entries".into()))?;
        let parent = node.parent;
        let name = node.name.clone();
        self.b.push(B {
            node,
            kids: BTreeMap::new(),
            layer,
            prov,
            alive: true,
            linked_by: Vec::new(),
        });
        self.b[parent as usize].kids.insert(name, id);
        Ok(id)
    }

    /// The directory at `comps`, made (0755) where missing.
    fn dirs(&mut self, comps: &[Vec<u8>], layer: u32) -> std::result::Result<NodeId, String> {
        let mut id: NodeId = 0;
        for (i, c) in comps.iter().enumerate() {
            id = match self.b[id as usize].kids.get(c) {
                Some(&k) if self.b[k as usize].node.kind == FileKind::Dir => k,
                Some(_) => {
                    return Err(format!(
                        "{} is not a directory (symlinks are not followed)",
                        escape(&comps[..=i].join(&b'/'))
                    ));
                }
                None => {
                    let n = Node::new(c.clone(), id, FileKind::Dir, 0o755);
                    self.push(n, layer, None).map_err(|e| e.to_string())?
                }
            };
        }
        Ok(id)
    }

    fn find(&self, comps: &[Vec<u8>]) -> Option<NodeId> {
        let mut id: NodeId = 0;
        for c in comps {
            let b = &self.b[id as usize];
            if b.node.kind != FileKind::Dir {
                return None;
            }
            id = *b.kids.get(c)?;
        }
        Some(id)
    }

    /// Detach `id` and everything under it; hard links to a removed inode keep it alive.
    fn remove(&mut self, id: NodeId) {
        let parent = self.b[id as usize].node.parent;
        let name = self.b[id as usize].node.name.clone();
        self.b[parent as usize].kids.remove(&name);
        let mut stack = vec![id];
        while let Some(x) = stack.pop() {
            let kids: Vec<NodeId> = std::mem::take(&mut self.b[x as usize].kids)
                .into_values()
                .collect();
            stack.extend(kids);
            self.b[x as usize].alive = false;
            if let Some(p) = self.b[x as usize].node.link {
                self.b[p as usize].linked_by.retain(|&l| l != x);
                continue;
            }
            let links = std::mem::take(&mut self.b[x as usize].linked_by);
            let mut links = links.into_iter().filter(|&l| self.b[l as usize].alive);
            if let Some(q) = links.next() {
                // `q` becomes the inode's holder.
                let rest: Vec<NodeId> = links.collect();
                let src = &self.b[x as usize];
                let (node, prov) = (src.node.clone(), src.prov);
                let dst = &mut self.b[q as usize];
                let (qname, qparent) = (dst.node.name.clone(), dst.node.parent);
                dst.node = Node {
                    name: qname,
                    parent: qparent,
                    children: Vec::new(),
                    link: None,
                    ..node
                };
                dst.prov = prov;
                dst.linked_by = rest.clone();
                for r in rest {
                    self.b[r as usize].node.link = Some(q);
                }
                self.b[x as usize].prov = None;
            }
        }
    }

    /// `.wh..wh..opq` in layer `layer`: drop what lower layers put under `dir`.
    fn opaque(&mut self, dir: NodeId, layer: u32) {
        let kids: Vec<NodeId> = self.b[dir as usize].kids.values().copied().collect();
        for k in kids {
            if self.b[k as usize].layer < layer {
                self.remove(k);
            } else if self.b[k as usize].node.kind == FileKind::Dir {
                self.opaque(k, layer);
            }
        }
    }

    fn entry<R: Read>(
        &mut self,
        layer: u32,
        index: u64,
        e: &mut ::tar::Entry<'_, R>,
    ) -> std::result::Result<(), String> {
        let h = e.header().clone();
        let et = h.entry_type();
        if et.is_pax_global_extensions() {
            return Ok(());
        }
        let sparse = sparse_of(e)?;
        let path = match sparse.as_ref().and_then(|s| s.name.clone()) {
            Some(n) => n,
            None => e.path_bytes().into_owned(),
        };
        let comps = normalize(&path).ok_or("path leaves the root with '..'")?;
        // Header fields may be blank when a PAX record gives the value.
        let mut mtime = h.mtime().ok().map(|m| (m as i64, 0u32));
        let mut uid = h.uid().ok();
        let mut gid = h.gid().ok();
        let mut xattrs: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        if let Some(pax) = e.pax_extensions().map_err(|e| e.to_string())? {
            for ext in pax {
                let ext = ext.map_err(|e| e.to_string())?;
                let (k, v) = (ext.key_bytes(), ext.value_bytes());
                let num = || {
                    std::str::from_utf8(v)
                        .ok()
                        .and_then(|s| s.parse::<u64>().ok())
                };
                match k {
                    b"mtime" => mtime = Some(pax_num(v).ok_or("bad PAX mtime")?),
                    b"uid" => uid = Some(num().ok_or("bad PAX uid")?),
                    b"gid" => gid = Some(num().ok_or("bad PAX gid")?),
                    // Read by `sparse_of`.
                    _ if k.starts_with(b"GNU.sparse.") => {}
                    _ => {
                        if let Some(name) = k.strip_prefix(b"SCHILY.xattr.")
                            && !name.is_empty()
                        {
                            xattrs.retain(|(n, _)| n != name);
                            xattrs.push((name.to_vec(), v.to_vec()));
                        }
                    }
                }
            }
        }
        xattrs.sort();
        let mtime = mtime.ok_or("invalid mtime field")?;
        let uid = uid.ok_or("invalid uid field")?;
        let gid = gid.ok_or("invalid gid field")?;
        let Some((base, parent_comps)) = comps.split_last() else {
            // The root itself ("./").
            if !et.is_dir() {
                return Err("the root is not a directory".into());
            }
            let r = &mut self.b[0].node;
            r.perm = h.mode().map_err(|e| e.to_string())? & 0o7777;
            (r.uid, r.gid) = (uid as u32, gid as u32);
            (r.mtime_sec, r.mtime_nsec) = mtime;
            r.xattrs = xattrs;
            return Ok(());
        };
        if self.layered
            && let Some(victim) = base.strip_prefix(b".wh.")
        {
            let opaque = victim == b".wh..opq";
            if !opaque && (victim.is_empty() || victim == b"." || victim == b"..") {
                return Err("invalid whiteout".into());
            }
            // A whiteout never creates anything; its directory may be gone already.
            let Some(parent) = self
                .find(parent_comps)
                .filter(|&p| self.b[p as usize].node.kind == FileKind::Dir)
            else {
                return Ok(());
            };
            if opaque {
                self.opaque(parent, layer);
            } else if let Some(&v) = self.b[parent as usize].kids.get(victim) {
                self.remove(v);
            }
            return Ok(());
        }
        let parent = self.dirs(parent_comps, layer)?;
        let kind = match et {
            ::tar::EntryType::Regular
            | ::tar::EntryType::Continuous
            | ::tar::EntryType::GNUSparse => FileKind::File,
            ::tar::EntryType::Directory => FileKind::Dir,
            ::tar::EntryType::Symlink => FileKind::Symlink,
            ::tar::EntryType::Link => FileKind::File,
            ::tar::EntryType::Char => FileKind::CharDev,
            ::tar::EntryType::Block => FileKind::BlockDev,
            ::tar::EntryType::Fifo => FileKind::Fifo,
            other => {
                return Err(format!(
                    "unsupported entry type {:?}",
                    other.as_byte() as char
                ));
            }
        };
        let mut node = Node::new(
            base.clone(),
            parent,
            kind,
            h.mode().map_err(|e| e.to_string())? & 0o7777,
        );
        node.uid = u32::try_from(uid).map_err(|_| "uid out of range")?;
        node.gid = u32::try_from(gid).map_err(|_| "gid out of range")?;
        (node.mtime_sec, node.mtime_nsec) = mtime;
        node.xattrs = xattrs;
        let mut prov = None;
        let existing = self.b[parent as usize].kids.get(base.as_slice()).copied();
        match et {
            ::tar::EntryType::Link => {
                let target = e.link_name_bytes().ok_or("hard link without a target")?;
                let tcomps =
                    normalize(&target).ok_or("hard link target leaves the root with '..'")?;
                let t = self.find(&tcomps).ok_or_else(|| {
                    format!(
                        "hard link to {}, which is not in the archive before it",
                        escape(&target)
                    )
                })?;
                let t = self.b[t as usize].node.link.unwrap_or(t);
                if self.b[t as usize].node.kind == FileKind::Dir {
                    return Err(format!("hard link to directory {}", escape(&target)));
                }
                if existing == Some(t) {
                    return Ok(()); // a link to itself changes nothing
                }
                if let Some(old) = existing {
                    self.remove(old);
                }
                let mut l = Node::new(base.clone(), parent, self.b[t as usize].node.kind, 0);
                l.link = Some(t);
                let id = self.push(l, layer, None).map_err(|e| e.to_string())?;
                self.b[t as usize].linked_by.push(id);
                return Ok(());
            }
            ::tar::EntryType::Symlink => {
                node.target = e
                    .link_name_bytes()
                    .ok_or("symlink without a target")?
                    .into_owned();
                if node.target.is_empty() {
                    return Err("empty symlink target".into());
                }
            }
            ::tar::EntryType::Char | ::tar::EntryType::Block => {
                let ma = h.device_major().map_err(|e| e.to_string())?.unwrap_or(0);
                let mi = h.device_minor().map_err(|e| e.to_string())?.unwrap_or(0);
                node.rdev = makedev(ma as u64, mi as u64);
            }
            _ if kind == FileKind::File => {
                let mut sparse_map = None;
                node.size = e.size();
                node.sparse = et == ::tar::EntryType::GNUSparse;
                if let Some(sp) = sparse {
                    if et != ::tar::EntryType::Regular {
                        return Err("GNU sparse records on an entry that is not a regular file \
                                    or is an old-format sparse file"
                            .into());
                    }
                    // Check the map now, so that a bad one fails before anything is written.
                    let stored = e.size();
                    let (map, header) = match sp.map {
                        Some(m) => (m, 0),
                        None => read_map(e, stored)?,
                    };
                    check_map(&map, sp.real_size, stored - header)?;
                    node.size = sp.real_size;
                    node.sparse = true;
                    sparse_map = Some(map);
                }
                // At once, before its content is skipped over (an old-format sparse entry's
                // holes are read back as zeros) or anything is written.
                let most = writer::max_file_size(crate::layout::MAX_BLOCK_LOG);
                if node.size > most {
                    return Err(format!(
                        "{} bytes, more than the largest file the format holds ({most} bytes)",
                        node.size
                    ));
                }
                // A map's ranges as they are; the writer ignores empty ones.
                node.source = Some(match sparse_map {
                    Some(map) => Source::SparseStream(map),
                    None => Source::Stream,
                });
                // Layers are tagged from 1 (0 is the root); providers are keyed from 0.
                prov = Some((layer - 1, index));
            }
            _ => {}
        }
        if let Some(old) = existing {
            let o = &mut self.b[old as usize];
            if kind == FileKind::Dir && o.node.kind == FileKind::Dir {
                // Same directory again (or in a later layer): new attributes, same contents.
                o.node.perm = node.perm;
                (o.node.uid, o.node.gid) = (node.uid, node.gid);
                (o.node.mtime_sec, o.node.mtime_nsec) = (node.mtime_sec, node.mtime_nsec);
                o.node.xattrs = node.xattrs;
                o.layer = layer;
                return Ok(());
            }
            self.remove(old);
        }
        self.push(node, layer, prov).map_err(|e| e.to_string())?;
        Ok(())
    }

    /// The final tree (live nodes, depth-first), and which (layer, entry) feeds which node.
    fn finish(self) -> Result<(Tree, Providers)> {
        let mut new_id: Vec<NodeId> = vec![u32::MAX; self.b.len()];
        let mut order: Vec<NodeId> = Vec::new();
        let mut stack = vec![0 as NodeId];
        while let Some(x) = stack.pop() {
            new_id[x as usize] = order.len() as NodeId;
            order.push(x);
            stack.extend(self.b[x as usize].kids.values().rev());
        }
        let mut nodes = Vec::with_capacity(order.len());
        let mut prov = HashMap::new();
        let mut b = self.b;
        for &old in &order {
            let x = &mut b[old as usize];
            let mut n = std::mem::replace(&mut x.node, Node::new(Vec::new(), 0, FileKind::Fifo, 0));
            n.parent = new_id[n.parent as usize];
            n.children = x.kids.values().map(|&k| new_id[k as usize]).collect();
            if let Some(l) = n.link {
                let nl = new_id[l as usize];
                if nl == u32::MAX {
                    return Err(Error::Invalid(format!(
                        "internal: hard link {} lost its inode",
                        escape(&n.name)
                    )));
                }
                n.link = Some(nl);
            }
            if let Some(p) = x.prov.filter(|_| n.link.is_none()) {
                prov.insert(p, new_id[old as usize]);
            }
            nodes.push(n);
        }
        nodes[0].parent = 0;
        Ok((Tree { nodes }, prov))
    }
}

/// A sparse file in PAX records (GNU sparse formats 0.0, 0.1 and 1.0).
struct Sparse {
    /// The file's real name (`GNU.sparse.name`), when given.
    name: Option<Vec<u8>>,
    /// Its logical size.
    real_size: u64,
    /// (offset, length) of each data chunk, in order; `None`: at the start of the entry's
    /// data (format 1.0).
    map: Option<Vec<(u64, u64)>>,
}

/// The GNU sparse description in an entry's PAX records, if any.
fn sparse_of<R: Read>(e: &mut ::tar::Entry<'_, R>) -> std::result::Result<Option<Sparse>, String> {
    let Some(pax) = e.pax_extensions().map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    let (mut major, mut minor, mut name, mut size, mut map) = (None, None, None, None, None);
    let mut pairs: Vec<(u64, u64)> = Vec::new();
    let mut offset = None;
    let mut any = false;
    for ext in pax {
        let ext = ext.map_err(|e| e.to_string())?;
        let (k, v) = (ext.key_bytes(), ext.value_bytes());
        let Some(k) = k.strip_prefix(b"GNU.sparse.") else {
            continue;
        };
        any = true;
        let num = |v: &[u8]| {
            std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| format!("bad GNU.sparse.{} record", escape(k)))
        };
        match k {
            b"major" => major = Some(num(v)?),
            b"minor" => minor = Some(num(v)?),
            b"name" => name = Some(v.to_vec()),
            b"realsize" | b"size" => size = Some(num(v)?),
            b"numblocks" => {}
            b"map" => {
                let nums = v
                    .split(|&c| c == b',')
                    .map(num)
                    .collect::<std::result::Result<Vec<u64>, String>>()?;
                if nums.len() % 2 != 0 {
                    return Err("GNU.sparse.map has an odd number of values".into());
                }
                map = Some(nums.chunks(2).map(|c| (c[0], c[1])).collect());
            }
            b"offset" => {
                if offset.replace(num(v)?).is_some() {
                    return Err("GNU.sparse.offset without its numbytes".into());
                }
            }
            b"numbytes" => {
                let o = offset
                    .take()
                    .ok_or("GNU.sparse.numbytes without an offset")?;
                pairs.push((o, num(v)?));
            }
            _ => return Err(format!("unknown record GNU.sparse.{}", escape(k))),
        }
    }
    if !any {
        return Ok(None);
    }
    let real_size = size.ok_or("GNU sparse records without GNU.sparse.realsize")?;
    let map = match (major, minor) {
        (Some(1), Some(0)) => None,
        (Some(ma), mi) => {
            return Err(format!(
                "unsupported GNU sparse format {ma}.{}",
                mi.map_or("?".into(), |m| m.to_string())
            ));
        }
        (None, _) if map.is_some() => map,
        (None, _) if !pairs.is_empty() || offset.is_some() => {
            if offset.is_some() {
                return Err("GNU.sparse.offset without its numbytes".into());
            }
            Some(pairs)
        }
        (None, _) => return Err("GNU sparse records without a map".into()),
    };
    Ok(Some(Sparse {
        name,
        real_size,
        map,
    }))
}

/// An entry's name for messages: the real name of a PAX sparse file, else its path.
fn display_name<R: Read>(e: &mut ::tar::Entry<'_, R>) -> Vec<u8> {
    let real = e.pax_extensions().ok().flatten().and_then(|pax| {
        pax.filter_map(|x| x.ok())
            .find(|x| x.key_bytes() == b"GNU.sparse.name")
            .map(|x| x.value_bytes().to_vec())
    });
    real.unwrap_or_else(|| e.path_bytes().into_owned())
}

/// Read the map at the start of a format 1.0 sparse entry's data (decimal numbers, one per
/// line: the count, then offset and length of each chunk; padded to 512 bytes). Returns it
/// and the bytes it took.
fn read_map(r: &mut dyn Read, stored: u64) -> std::result::Result<(Vec<(u64, u64)>, u64), String> {
    let mut block = [0u8; 512];
    let (mut pos, mut used) = (512usize, 0u64);
    let mut number = |what: &str| -> std::result::Result<u64, String> {
        let mut n: u64 = 0;
        let mut digits = 0;
        loop {
            if pos == 512 {
                if used + 512 > stored {
                    return Err("sparse map runs past the entry's data".into());
                }
                r.read_exact(&mut block)
                    .map_err(|e| format!("reading the sparse map: {e}"))?;
                used += 512;
                pos = 0;
            }
            let c = block[pos];
            pos += 1;
            match c {
                b'\n' if digits > 0 => return Ok(n),
                b'0'..=b'9' if digits < 20 => {
                    n = n
                        .checked_mul(10)
                        .and_then(|n| n.checked_add(u64::from(c - b'0')))
                        .ok_or_else(|| format!("sparse map: {what} out of range"))?;
                    digits += 1;
                }
                _ => return Err(format!("malformed sparse map ({what})")),
            }
        }
    };
    let count = number("count")?;
    if count > stored / 4 {
        return Err(format!(
            "sparse map: {count} chunks cannot fit in the entry"
        ));
    }
    let mut map = Vec::new();
    for _ in 0..count {
        let off = number("offset")?;
        let len = number("length")?;
        map.push((off, len));
    }
    Ok((map, used))
}

/// A sparse map must be in order, not overlap, stay within the file and describe exactly the
/// stored data.
fn check_map(map: &[(u64, u64)], real_size: u64, data: u64) -> std::result::Result<(), String> {
    let (mut end, mut total) = (0u64, 0u64);
    for &(off, len) in map {
        let e = off
            .checked_add(len)
            .filter(|&e| off >= end && e <= real_size)
            .ok_or_else(|| {
                format!(
                    "sparse map chunk at {off} (length {len}) overlaps, is out of order or \
                     beyond the size {real_size}"
                )
            })?;
        end = e;
        total += len;
    }
    if total != data {
        return Err(format!(
            "sparse map describes {total} bytes of data but the entry stores {data}"
        ));
    }
    Ok(())
}

/// Walk a layer's entries: `f(index, entry)` for each; the error names the layer and entry.
fn walk(
    layer: &Layer,
    verify: bool,
    mut f: impl FnMut(u64, &mut ::tar::Entry<'_, Stream>) -> std::result::Result<bool, Error>,
) -> Result<()> {
    let (stream, budget) = open(layer, verify)?;
    let mut ar = ::tar::Archive::new(stream);
    let bad = |what: &str, e: &dyn std::fmt::Display| {
        Error::Invalid(format!("{}: {what}: {e}", layer.name))
    };
    let mut entries = ar.entries().map_err(|e| bad("reading the archive", &e))?;
    let mut index = 0u64;
    let mut last = String::from("(start)");
    loop {
        budget.store(HEADER_BUDGET, Ordering::Relaxed);
        let mut e = match entries.next() {
            None => break,
            Some(r) => r.map_err(|e| bad(&format!("after entry {last}"), &e))?,
        };
        budget.store(u64::MAX, Ordering::Relaxed);
        last = escape(&display_name(&mut e));
        if !f(index, &mut e)? {
            return Ok(());
        }
        io::copy(&mut e, &mut io::sink()).map_err(|err| bad(&format!("entry {last}"), &err))?;
        index += 1;
    }
    if verify {
        // To the end of the stream, so the digests are checked.
        io::copy(&mut ar.into_inner(), &mut io::sink())
            .map_err(|e| bad("after the last entry", &e))?;
    }
    Ok(())
}

/// Apply `layers` in order (whiteouts only when `layered`), then pack the tree into `out`,
/// streaming each file's content from its layer in a second pass.
pub fn pack_layers(
    layers: Vec<Layer>,
    layered: bool,
    out: &Path,
    opts: &PackOptions,
    progress: Progress,
) -> Result<PackStats> {
    let (tree, prov) = read_tree(&layers, layered)?;
    let mut per_layer = vec![0u64; layers.len()];
    for &(l, _) in prov.keys() {
        per_layer[l as usize] += 1;
    }
    writer::pack_tree_with(&tree, out, opts, progress, move |sink| {
        for (l, layer) in layers.iter().enumerate() {
            let mut left = per_layer[l];
            if left == 0 {
                continue;
            }
            walk(layer, false, |index, e| {
                if let Some(&id) = prov.get(&(l as u32, index)) {
                    let name = display_name(e);
                    let bad = |err: &dyn std::fmt::Display| {
                        Error::Invalid(format!("{}: entry {}: {err}", layer.name, escape(&name)))
                    };
                    match sparse_of(e).map_err(|err| bad(&err))? {
                        None => sink(id, e).map_err(|err| bad(&err))?,
                        Some(sp) => {
                            // Format 1.0: the map (kept in the node at pass 1) heads the data.
                            if sp.map.is_none() {
                                let stored = e.size();
                                read_map(e, stored).map_err(|err| bad(&err))?;
                            }
                            // The entry's data is the map's ranges back to back; the writer
                            // makes the rest holes without reading or counting them.
                            sink(id, e).map_err(|err| bad(&err))?;
                        }
                    }
                    left -= 1;
                }
                Ok(left > 0)
            })?;
        }
        Ok(())
    })
}

/// Pass 1: the tree of `layers` applied in order, and the entry feeding each file.
pub fn read_tree(layers: &[Layer], layered: bool) -> Result<(Tree, Providers)> {
    let mut b = Builder::new(layered);
    for (l, layer) in layers.iter().enumerate() {
        let l = u32::try_from(l).map_err(|_| Error::Invalid("too many layers".into()))?;
        walk(layer, true, |index, e| {
            b.entry(l + 1, index, e).map_err(|why| {
                Error::Invalid(format!(
                    "{}: entry {}: {why}",
                    layer.name,
                    escape(&display_name(e))
                ))
            })?;
            Ok(true)
        })?;
    }
    let (tree, prov) = b.finish()?;
    tree.check()?;
    Ok((tree, prov))
}
