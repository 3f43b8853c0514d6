//! Metadata decompression bombs: a small image whose stored metadata decompresses to about
//! 2 GiB (the reader's default limit) must be refused at open, eager or lazy, quickly and
//! without allocating anything near its declared size.
//!
//! The bombs are hand-made zstd frames of RLE blocks (RFC 8878 §3.1.1.2: four stored bytes
//! per 128 KiB of zeros), so that building them costs nothing: 2 GiB of zeros weigh 64 KiB.

mod common;

use cap::Cap;
use cimg_format::layout::{self, MetaHeader, Superblock};
use cimg_format::{Error, Image, OpenOptions, PackOptions, pack_dir};
use peak_alloc::PeakAlloc;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};
use xxhash_rust::xxh3::{xxh3_64, xxh3_128};
use zerocopy::little_endian::U64;
use zerocopy::{FromBytes, IntoBytes};

#[global_allocator]
static ALLOC: Cap<PeakAlloc> = Cap::new(PeakAlloc, usize::MAX);

/// Largest allocation peak allowed for opening one bomb: the stored metadata (64 KiB), the
/// header frame's decompression window and the tiny image's real tables, with slack.
const PEAK_CAP: usize = 32 << 20;
/// Opening a bomb must fail this fast (decompressing 2 GiB of zeros takes seconds).
const OPEN_TIME: Duration = Duration::from_secs(2);
/// The declared size of every bomb: the reader's default `max_metadata`.
const BOMB: u64 = 2 << 30;

/// Peaks are process-wide: one test at a time.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A real (tiny) image: its bytes up to the metadata, its superblock and its raw metadata.
fn tiny() -> (Vec<u8>, Superblock, Vec<u8>) {
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("f"), b"hello").unwrap();
    std::fs::create_dir(src.path().join("d")).unwrap();
    let out = tempfile::tempdir().unwrap();
    let path = out.path().join("img.cimg");
    pack_dir(src.path(), &path, &PackOptions::default(), &|_, _| {}).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let sb = Superblock::read_from_bytes(&bytes[..size_of::<Superblock>()]).unwrap();
    let (mo, ml) = (
        sb.meta_offset.get() as usize,
        sb.meta_stored_len.get() as usize,
    );
    let raw = zstd::stream::decode_all(&bytes[mo..mo + ml]).unwrap();
    (bytes[..mo].to_vec(), sb, raw)
}

/// `prefix` then `stored` as the metadata, every length and checksum made to match.
fn assemble(prefix: &[u8], mut sb: Superblock, stored: &[u8], raw_len: u64) -> Vec<u8> {
    let mut out = prefix.to_vec();
    out.extend_from_slice(stored);
    sb.meta_offset = U64::new(prefix.len() as u64);
    sb.meta_stored_len = U64::new(stored.len() as u64);
    sb.meta_raw_len = U64::new(raw_len);
    sb.meta_checksum = U64::new(xxh3_64(stored));
    sb.image_size = U64::new(out.len() as u64);
    sb.digest = xxh3_128(&out[sb.data_offset.get() as usize..]).to_le_bytes();
    out[..size_of::<Superblock>()].copy_from_slice(sb.as_bytes());
    let c = xxh3_64(&out[..120]);
    out[120..128].copy_from_slice(&c.to_le_bytes());
    out
}

/// Open `img` eagerly and lazily: each must fail with `Error::Corrupt`, within [`OPEN_TIME`]
/// and an allocation peak under [`PEAK_CAP`].
fn refused(what: &str, img: &[u8]) {
    for lazy in [false, true] {
        let opts = OpenOptions {
            lazy,
            ..OpenOptions::default()
        };
        let before = PeakAlloc.current_usage();
        PeakAlloc.reset_peak_usage();
        let t0 = Instant::now();
        let r = Image::from_reader(img.to_vec(), "bomb", &opts);
        let took = t0.elapsed();
        let peak = PeakAlloc.peak_usage().saturating_sub(before);
        let mode = if lazy { "lazy" } else { "eager" };
        match r {
            Err(Error::Corrupt { what: why, offset }) => {
                eprintln!("{what} ({mode}): refused: {why} at {offset:#x}")
            }
            Err(e) => panic!("{what} ({mode}): refused, but not as corrupt: {e}"),
            Ok(_) => panic!("{what} ({mode}): a metadata bomb opened"),
        }
        assert!(
            took < OPEN_TIME,
            "{what} ({mode}): refusing took {took:?}, over {OPEN_TIME:?}"
        );
        assert!(
            peak < PEAK_CAP,
            "{what} ({mode}): opening allocated a peak of {} MiB, over the cap of {} MiB",
            peak >> 20,
            PEAK_CAP >> 20
        );
    }
}

#[test]
fn metadata_of_zeros_is_refused_before_decompressing() {
    let _s = serial();
    let (prefix, sb, _) = tiny();
    let img = assemble(&prefix, sb, &common::zstd_rle_frame(&[], BOMB), BOMB);
    assert!(img.len() < 100 << 10, "the bomb weighs {} bytes", img.len());
    refused("2 GiB of zeros", &img);
}

#[test]
fn real_tables_followed_by_zeros_are_refused() {
    let _s = serial();
    let (prefix, sb, raw) = tiny();
    let hdr = MetaHeader::read_from_prefix(&raw).unwrap().0;
    let blob_end = hdr.blob.offset.get() + hdr.blob.count.get();
    assert_eq!(
        blob_end,
        raw.len() as u64,
        "the writer ends the metadata at the blob"
    );
    let img = assemble(&prefix, sb, &common::zstd_rle_frame(&raw, BOMB), BOMB);
    refused("the tables, then zeros up to 2 GiB", &img);
}

#[test]
fn framed_metadata_bomb_is_refused() {
    let _s = serial();
    let (prefix, mut sb, raw) = tiny();
    // Two frames of 1 GiB: the real tables then zeros, then only zeros.
    let f = 1u64 << layout::MAX_META_FRAME_LOG;
    sb.incompat = U64::new(layout::INCOMPAT_META_FRAMES);
    sb.meta_frame_log = layout::MAX_META_FRAME_LOG;
    let mut stored = common::zstd_rle_frame(&raw, f);
    stored.extend(common::zstd_rle_frame(&[], BOMB - f));
    let img = assemble(&prefix, sb, &stored, BOMB);
    refused("two frames of 1 GiB", &img);
}

#[test]
fn declared_size_beyond_what_zstd_can_encode_is_refused() {
    let _s = serial();
    let (prefix, sb, raw) = tiny();
    // The real metadata, but a declared size more than 32768 times the stored bytes (the
    // most zstd can regenerate from them): refused from the lengths alone.
    let stored = zstd::bulk::compress(&raw, 3).unwrap();
    let img = assemble(&prefix, sb, &stored, BOMB);
    refused("a lying raw size", &img);
}
