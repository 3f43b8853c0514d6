//! The read-only walk of the target tree that finds what `cimg-bench` measures on: every entry
//! (for stat), regular files (for open), directories (for readdir), and the biggest files (for
//! the read metrics). It never follows symlinks, stays on the target's filesystem, and stops at
//! a limit so that a huge tree (a Lustre project directory) does not take forever.

use super::{BigFile, TreeSummary};
use std::collections::VecDeque;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What the walk collected.
#[derive(Debug, Default)]
pub struct Tree {
    /// Every entry found, the root included (files, directories, symlinks, others).
    pub entries: Vec<PathBuf>,
    /// Regular files, with their sizes.
    pub files: Vec<(PathBuf, u64)>,
    /// Directories, the root included.
    pub dirs: Vec<PathBuf>,
    pub summary: TreeSummary,
}

impl Tree {
    /// The largest regular files of at least `min_size` bytes, biggest first, at most `max`.
    pub fn big_files(&self, min_size: u64, max: usize) -> Vec<BigFile> {
        let mut v: Vec<&(PathBuf, u64)> =
            self.files.iter().filter(|(_, s)| *s >= min_size).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v.into_iter()
            .take(max)
            .map(|(p, s)| BigFile {
                path: p.to_string_lossy().into_owned(),
                size: *s,
            })
            .collect()
    }
}

/// Walks `root` breadth-first (so that a truncated walk still spans the top of the tree), without
/// following symlinks or crossing into other filesystems, until `max_entries` entries are found.
/// `progress` is called every 1,000 entries with the count so far. `root` must be a directory.
pub fn walk(root: &Path, max_entries: usize, mut progress: impl FnMut(usize)) -> Tree {
    let start = Instant::now();
    let mut t = Tree::default();
    let root_dev = std::fs::symlink_metadata(root).map(|m| m.dev()).ok();
    let mut queue = VecDeque::from([root.to_path_buf()]);
    t.entries.push(root.to_path_buf());
    'walk: while let Some(dir) = queue.pop_front() {
        t.summary.dirs += 1;
        t.dirs.push(dir.clone());
        let Ok(rd) = std::fs::read_dir(&dir) else {
            t.summary.errors += 1;
            continue;
        };
        for e in rd {
            if t.entries.len() >= max_entries {
                t.summary.truncated = true;
                break 'walk;
            }
            let Ok(e) = e else {
                t.summary.errors += 1;
                continue;
            };
            let path = e.path();
            let Ok(md) = std::fs::symlink_metadata(&path) else {
                t.summary.errors += 1;
                continue;
            };
            t.entries.push(path.clone());
            if t.entries.len().is_multiple_of(1000) {
                progress(t.entries.len());
            }
            let ft = md.file_type();
            if ft.is_dir() {
                if root_dev.is_none_or(|d| d == md.dev()) {
                    queue.push_back(path);
                } else {
                    t.summary.other += 1;
                }
            } else if ft.is_file() {
                t.summary.files += 1;
                t.summary.bytes += md.len();
                t.files.push((path, md.len()));
            } else {
                t.summary.other += 1;
            }
        }
    }
    t.summary.walk_secs = start.elapsed().as_secs_f64();
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_and_picks_big_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a/b")).unwrap();
        std::fs::write(d.path().join("a/small"), b"x").unwrap();
        std::fs::write(d.path().join("a/b/big"), vec![0u8; 5000]).unwrap();
        std::fs::write(d.path().join("mid"), vec![0u8; 3000]).unwrap();
        std::os::unix::fs::symlink("a", d.path().join("link")).unwrap();
        let t = walk(d.path(), 1000, |_| {});
        assert_eq!(t.summary.files, 3);
        assert_eq!(t.summary.dirs, 3);
        assert_eq!(t.summary.other, 1);
        assert_eq!(t.summary.bytes, 8001);
        assert_eq!(t.entries.len(), 7);
        assert!(!t.summary.truncated);
        let big = t.big_files(2000, 8);
        assert_eq!(big.len(), 2);
        assert!(big[0].path.ends_with("a/b/big") && big[0].size == 5000);
        assert_eq!(t.big_files(2000, 1).len(), 1);
        assert!(t.big_files(10_000, 8).is_empty());
        let t = walk(d.path(), 3, |_| {});
        assert!(t.summary.truncated);
        assert_eq!(t.entries.len(), 3);
    }
}
