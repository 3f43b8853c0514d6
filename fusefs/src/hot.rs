//! The hot-list recorder (`--record-hot`,
//! [`FsOptions::record_hot`](crate::FsOptions::record_hot)): the order in which regular
//! files are first read, one bit per inode for "seen" and the list, written at unmount as
//! the paths `cimg pack --hot` reads.

use cimg_format::{Error, Image};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The order in which inodes are first read: a bitset for "seen" and the list.
pub(crate) struct HotRecorder {
    seen: Box<[AtomicU64]>,
    order: Mutex<Vec<u32>>,
    /// Why writing the list at unmount failed, for [`crate::Server::run`] to return.
    pub(crate) failed: HotFailure,
}

/// Where the error of writing the hot list at unmount is left (see
/// [`CimgFs::hot_failure`](crate::CimgFs::hot_failure)).
pub type HotFailure = Arc<Mutex<Option<Error>>>;

impl HotRecorder {
    pub(crate) fn new(inodes: u32) -> Self {
        HotRecorder {
            seen: (0..(inodes as usize + 1).div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            order: Mutex::new(Vec::new()),
            failed: Arc::default(),
        }
    }

    pub(crate) fn touch(&self, ino: u32) {
        let Some(w) = self.seen.get(ino as usize / 64) else {
            return;
        };
        let bit = 1u64 << (ino % 64);
        if w.load(Ordering::Relaxed) & bit == 0 && w.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
            self.order
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(ino);
        }
    }

    /// Write the recorded files as paths, one per line, all or nothing
    /// ([`cimg_format::output`]: no planted symlink followed, no empty file left on a full
    /// disk).
    pub(crate) fn write(&self, img: &Image, out: &Path) -> Result<usize, Error> {
        let order = std::mem::take(&mut *self.order.lock().unwrap_or_else(|p| p.into_inner()));
        let wanted: HashSet<u32> = order.iter().copied().collect();
        let mut paths: HashMap<u32, Vec<u8>> = HashMap::new();
        img.walk(|path, e| {
            if wanted.contains(&e.ino) {
                paths.entry(e.ino).or_insert_with(|| path.to_vec());
            }
            Ok(())
        })?;
        let mut text = Vec::new();
        let mut n = 0;
        for ino in order {
            // A name with a newline cannot be listed; it is left out.
            if let Some(p) = paths.get(&ino).filter(|p| !p.contains(&b'\n')) {
                text.push(b'/');
                text.extend_from_slice(p);
                text.push(b'\n');
                n += 1;
            }
        }
        cimg_format::output::write_file(out, &text)?;
        Ok(n)
    }
}
