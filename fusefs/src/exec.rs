//! What a program's start will read, found before it runs: the program, its ELF interpreter
//! and the shared libraries it needs, in the image.
//!
//! A container start faults in pieces of the program, `ld.so` and `libc` one page fault at a
//! time, each a FUSE read waiting for a block to be decompressed. `launch` knows the command
//! before it starts it, so its server finds these files ([`exec_files`]) and decompresses
//! their blocks on the workers while the kernel and the dynamic loader work through them:
//! files up to 16 MiB whole, of bigger ones (a GPU or MPI library is mostly code that a start
//! does not run) the parts the loader reads ([`loader_ranges`]). The trade-off: blocks
//! decompressed that the start may not need, against page faults that no longer wait for a
//! decompression; it pays on `/bin/true` and a cold Python start (`launch-bench`; figures in
//! `docs/perf.md`). Another process can also read them ahead into the kernel's page cache
//! ([`crate::warm`]).
//!
//! The search follows the dynamic loader's, without its cache file: `#!` scripts lead to their
//! interpreter; `DT_RPATH` (without `DT_RUNPATH`), `LD_LIBRARY_PATH`, `DT_RUNPATH` (with
//! `$ORIGIN`), then the interpreter's own directory and the usual library directories.
//! A file it gets wrong costs a few useless decompressions; nothing here can fail the start.

use cimg_format::{FileKind, Image};
use std::collections::{HashSet, VecDeque};
use std::ffi::OsStr;
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// What the program about to be started is, as the launcher sees it.
#[derive(Debug, Clone, Default)]
pub struct ExecHint {
    /// Where the command may be, in the order they are tried (`PATH` order); relative ones
    /// are relative to `cwd`.
    pub candidates: Vec<PathBuf>,
    /// The command's working directory in the container.
    pub cwd: PathBuf,
    /// The command's `LD_LIBRARY_PATH`, split.
    pub library_path: Vec<PathBuf>,
}

/// At most this many files are followed (program, interpreter, libraries).
const MAX_FILES: usize = 64;

/// Symbolic links followed in one path, as the kernel allows.
const MAX_LINKS: usize = 40;

/// Library directories tried after the object's own paths (the loader's defaults and the
/// usual multiarch ones; its cache file is not read).
const LIB_DIRS: [&str; 10] = [
    "/lib64",
    "/usr/lib64",
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib/aarch64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/lib",
    "/usr/lib",
    "/usr/local/lib",
    "/usr/local/lib64",
];

/// Resolve absolute `path` in `img`, following symbolic links (in every component): the
/// inode and the path without links, or `None` if it does not lead to a regular file.
pub fn resolve_file(img: &Image, path: &Path) -> Option<(u32, PathBuf)> {
    let mut todo: Vec<Vec<u8>> = components(path.as_os_str().as_bytes());
    todo.reverse();
    // (inode, name) from the root down to the current directory.
    let mut stack: Vec<(u32, Vec<u8>)> = Vec::new();
    let mut links = 0;
    let root = 1;
    while let Some(name) = todo.pop() {
        let dir = stack.last().map_or(root, |s| s.0);
        match name.as_slice() {
            b"." => {}
            b".." => {
                stack.pop();
            }
            _ => {
                let ino = img.lookup(dir, &name).ok()??;
                let attr = img.attr(ino).ok()?;
                if attr.kind == FileKind::Symlink {
                    links += 1;
                    if links > MAX_LINKS {
                        return None;
                    }
                    let target = img.readlink(ino).ok()?;
                    if target.first() == Some(&b'/') {
                        stack.clear();
                    }
                    let mut more = components(target);
                    more.reverse();
                    todo.extend(more);
                } else {
                    stack.push((ino, name));
                }
            }
        }
    }
    let (ino, _) = stack.last()?;
    if img.attr(*ino).ok()?.kind != FileKind::File {
        return None;
    }
    let mut p = PathBuf::from("/");
    for (_, n) in &stack {
        p.push(OsStr::from_bytes(n));
    }
    Some((*ino, p))
}

fn components(p: &[u8]) -> Vec<Vec<u8>> {
    p.split(|&c| c == b'/')
        .filter(|c| !c.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

/// Bytes read from the start of each file before anything else: the ELF header and program
/// headers, or a script's `#!` line.
const HEAD: u64 = 64 << 10;

/// Files up to this size are prefetched whole: below it, prefetching only the loader's parts
/// decompresses less but made no start faster and a Python start slightly slower
/// (`launch-bench`'s `/bin/true` and Python starts; figures in `docs/perf.md`).
const WHOLE_MAX: u64 = 16 << 20;

/// At most this much of one segment is prefetched.
const SEGMENT_CAP: u64 = 8 << 20;

/// Files bigger than this are not looked inside (their head is still prefetched).
const PARSE_MAX: u64 = 1 << 30;

/// Find the files an exec of `hint`'s command reads, in the order it reads them, and which
/// parts of them: the dynamic loader reads an object's headers, its dynamic symbol, string
/// and relocation tables (the first, read-only segment) and writes its data (the writable
/// segments); the code is left to page faults, as it is run only in part (a big library is
/// mostly code). `found` is told of each file (inode and absolute path without symbolic
/// links) and those byte ranges as soon as they are known, before they are read, so that
/// their blocks can be queued; `read` gives a byte range of a file (inode and path as for
/// `found`), or `None`.
pub fn exec_files(
    img: &Image,
    hint: &ExecHint,
    mut found: impl FnMut(u32, &Path, &[Range<u64>]),
    mut read: impl FnMut(u32, &Path, Range<u64>) -> Option<Vec<u8>>,
) {
    let Some((ino, path)) = hint.candidates.iter().find_map(|c| {
        let abs = if c.is_absolute() {
            c.clone()
        } else {
            hint.cwd.join(c)
        };
        resolve_file(img, &abs)
    }) else {
        return;
    };
    let mut seen: HashSet<u32> = HashSet::new();
    // Objects to look inside: (inode, path without links, is the program run).
    let mut queue: VecDeque<(u32, PathBuf, bool)> = VecDeque::new();
    seen.insert(ino);
    queue.push_back((ino, path, true));
    // The interpreter's directory: where a distribution's loader finds its own libraries.
    let mut interp_dir: Option<PathBuf> = None;
    let mut scripts = 0;
    while let Some((ino, path, main)) = queue.pop_front() {
        let size = img.attr(ino).map_or(0, |a| a.size);
        let head_range = 0..size.min(HEAD);
        let Some(head) = read(ino, &path, head_range.clone()) else {
            found(ino, &path, std::slice::from_ref(&head_range));
            continue;
        };
        let mut add = |ino: u32, path: PathBuf, main: bool, queue: &mut VecDeque<_>| {
            if seen.len() < MAX_FILES && seen.insert(ino) {
                queue.push_back((ino, path, main));
            }
        };
        if main && head.starts_with(b"#!") && scripts < 4 {
            // A script: its interpreter is the program that runs.
            scripts += 1;
            found(ino, &path, std::slice::from_ref(&head_range));
            if let Some(interp) = shebang(&head)
                && let Some((i, p)) = resolve_file(img, &interp)
            {
                add(i, p, true, &mut queue);
            }
            continue;
        }
        // A small file is read whole (its code too: the start runs through much of `ld.so`
        // and `libc`); of a big one, the parts the loader reads.
        let ranges = if size <= WHOLE_MAX {
            std::iter::once(0..size).collect()
        } else {
            loader_ranges(&head, size)
        };
        found(ino, &path, &ranges);
        if !head.starts_with(b"\x7fELF") || size > PARSE_MAX {
            continue;
        }
        // The file as the loader sees it: the parts it reads, zeros elsewhere (pages of a
        // large zeroed allocation cost nothing until written). Only those parts are read here,
        // whatever was queued: the libraries are known without waiting for the whole file.
        let mut sparse = vec![0u8; size as usize];
        let mut complete = true;
        for r in &loader_ranges(&head, size) {
            match read(ino, &path, r.clone()) {
                Some(b) if b.len() as u64 == r.end - r.start => {
                    sparse[r.start as usize..r.end as usize].copy_from_slice(&b);
                }
                _ => complete = false,
            }
        }
        if !complete {
            continue;
        }
        let Ok(elf) = goblin::elf::Elf::parse(&sparse) else {
            continue;
        };
        let origin = path.parent().map(Path::to_path_buf).unwrap_or_default();
        if let Some(interp) = elf.interpreter
            && let Some((i, p)) = resolve_file(img, Path::new(interp))
        {
            interp_dir = p.parent().map(Path::to_path_buf);
            add(i, p, false, &mut queue);
        }
        let expand = |list: &[&str]| -> Vec<PathBuf> {
            list.iter()
                .flat_map(|l| l.split(':'))
                .filter(|d| !d.is_empty())
                .map(|d| {
                    let d = d
                        .replace("${ORIGIN}", &origin.to_string_lossy())
                        .replace("$ORIGIN", &origin.to_string_lossy());
                    PathBuf::from(d)
                })
                .collect()
        };
        let mut dirs: Vec<PathBuf> = Vec::new();
        if elf.runpaths.is_empty() {
            dirs.extend(expand(&elf.rpaths));
        }
        dirs.extend(hint.library_path.iter().cloned());
        dirs.extend(expand(&elf.runpaths));
        dirs.extend(interp_dir.iter().cloned());
        dirs.extend(LIB_DIRS.iter().map(PathBuf::from));
        for lib in &elf.libraries {
            let hit = if lib.contains('/') {
                resolve_file(img, &origin.join(lib))
            } else {
                dirs.iter()
                    .filter(|d| d.is_absolute())
                    .find_map(|d| resolve_file(img, &d.join(lib)))
            };
            if let Some((i, p)) = hit {
                add(i, p, false, &mut queue);
            }
        }
    }
}

/// The byte ranges of an ELF file of `size` bytes (whose first bytes are `head`) that its
/// loading reads: the head; the first loadable segment (headers, hash, dynamic symbols and
/// strings, relocations; not code with `ld -z separate-code`, the default, and at most
/// `SEGMENT_CAP` where it is); the writable segments and the dynamic section. Sorted and
/// merged; just the head if `head` is not an ELF file whose program headers it holds.
pub fn loader_ranges(head: &[u8], size: u64) -> Vec<Range<u64>> {
    use goblin::elf::program_header::{PF_W, PT_DYNAMIC, PT_LOAD, ProgramHeader};
    let mut out: Vec<Range<u64>> =
        std::iter::once(0..size.min(HEAD).min(head.len() as u64)).collect();
    let phdrs = goblin::elf::Elf::parse_header(head).ok().and_then(|h| {
        let ctx = goblin::container::Ctx::new(h.container().ok()?, h.endianness().ok()?);
        ProgramHeader::parse(
            head,
            usize::try_from(h.e_phoff).ok()?,
            h.e_phnum.into(),
            ctx,
        )
        .ok()
    });
    let Some(phdrs) = phdrs else {
        return out;
    };
    let mut first_load = true;
    for ph in &phdrs {
        let range = || {
            let end = ph
                .p_offset
                .saturating_add(ph.p_filesz.min(SEGMENT_CAP))
                .min(size);
            ph.p_offset.min(end)..end
        };
        match ph.p_type {
            PT_LOAD => {
                if ph.p_flags & PF_W != 0 || first_load {
                    out.push(range());
                }
                first_load = false;
            }
            PT_DYNAMIC => out.push(range()),
            _ => {}
        }
    }
    out.retain(|r| r.start < r.end);
    out.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::new();
    for r in out {
        match merged.last_mut() {
            Some(m) if r.start <= m.end => m.end = m.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged
}

/// The program the kernel runs to execute a file whose first bytes are `head`: an ELF
/// file's `PT_INTERP` (its dynamic loader; `None` for a static one) or a script's `#!`
/// interpreter. For explaining an exec that fails with `ENOENT` although the file exists.
pub fn interpreter(head: &[u8]) -> Option<PathBuf> {
    use goblin::elf::program_header::{PT_INTERP, ProgramHeader};
    if head.starts_with(b"#!") {
        return shebang(head);
    }
    let h = goblin::elf::Elf::parse_header(head).ok()?;
    let ctx = goblin::container::Ctx::new(h.container().ok()?, h.endianness().ok()?);
    let phdrs = ProgramHeader::parse(
        head,
        usize::try_from(h.e_phoff).ok()?,
        h.e_phnum.into(),
        ctx,
    )
    .ok()?;
    let ph = phdrs.iter().find(|ph| ph.p_type == PT_INTERP)?;
    let start = usize::try_from(ph.p_offset).ok()?;
    let len = usize::try_from(ph.p_filesz).ok()?;
    let bytes = head.get(start..start.checked_add(len)?)?;
    let name = bytes.split(|&c| c == 0).next()?;
    (!name.is_empty()).then(|| PathBuf::from(OsStr::from_bytes(name)))
}

/// The interpreter named on a script's `#!` line.
fn shebang(bytes: &[u8]) -> Option<PathBuf> {
    let line = bytes.get(2..)?.split(|&c| c == b'\n').next()?;
    let word = line
        .split(|&c| c == b' ' || c == b'\t')
        .find(|w| !w.is_empty())?;
    (word.first() == Some(&b'/')).then(|| PathBuf::from(OsStr::from_bytes(word)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shebang_lines() {
        assert_eq!(
            shebang(b"#!/usr/bin/python3 -u\nprint()"),
            Some(PathBuf::from("/usr/bin/python3"))
        );
        assert_eq!(shebang(b"#! /bin/sh\n"), Some(PathBuf::from("/bin/sh")));
        assert_eq!(shebang(b"#!python\n"), None);
        assert_eq!(shebang(b"#!"), None);
    }
}
