//! Raw on-disk records of the `.cimg` format, exactly as `FORMAT.md` specifies them.
//!
//! Every struct here is `#[repr(C)]`, made only of little-endian integer types from zerocopy
//! (alignment 1, no padding), so a record is read from any byte offset without copying or
//! unsafe code. Sizes and field offsets are pinned at compile time below, and a test compares
//! them with the tables of `FORMAT.md`, so code and spec cannot drift apart.
//! Nothing in this module validates: that is the reader's job.

use zerocopy::little_endian::{I64, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// The eight bytes every image starts with. The high byte and the CR LF / ^Z pair catch
/// transfers that mangle binary files, as in PNG.
pub const MAGIC: [u8; 8] = *b"\x89CIMG\r\n\x1a";
/// Major version: a reader refuses any other.
pub const VERSION_MAJOR: u16 = 1;
/// Minor version: additions that an older reader of the same major version can ignore.
/// (Features an older reader cannot ignore set an incompatible feature bit instead.)
pub const VERSION_MINOR: u16 = 0;
/// Bytes reserved for the superblock at offset 0; data starts at or after this.
pub const SUPERBLOCK_AREA: u64 = 4096;
/// Smallest and largest allowed `block_log` (4 KiB to 1 MiB blocks).
pub const MIN_BLOCK_LOG: u8 = 12;
/// See [`MIN_BLOCK_LOG`].
pub const MAX_BLOCK_LOG: u8 = 20;
/// Incompatible feature bit: the stored metadata is a sequence of zstd frames, each holding
/// `1 << meta_frame_log` bytes of the decompressed metadata (the last one the rest), so that a
/// reader can decompress them in parallel. Clear: one frame.
pub const INCOMPAT_META_FRAMES: u64 = 1;
/// Incompatible feature bits this reader understands.
pub const INCOMPAT_KNOWN: u64 = INCOMPAT_META_FRAMES;
/// Smallest and largest `meta_frame_log` when [`INCOMPAT_META_FRAMES`] is set (4 KiB to
/// 1 GiB frames).
pub const MIN_META_FRAME_LOG: u8 = 12;
/// See [`MIN_META_FRAME_LOG`].
pub const MAX_META_FRAME_LOG: u8 = 30;
/// A chunk whose block is this value is a hole: it reads as zeros and stores nothing.
pub const HOLE: u32 = u32::MAX;
/// Inode number of the root directory. Inode `n` is entry `n - 1` of the inode table.
pub const ROOT_INO: u32 = 1;

/// The superblock: offset 0, 128 bytes, then zero padding up to [`SUPERBLOCK_AREA`].
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Superblock {
    /// [`MAGIC`].
    pub magic: [u8; 8],
    /// [`VERSION_MAJOR`].
    pub version_major: U16,
    /// [`VERSION_MINOR`].
    pub version_minor: U16,
    /// log2 of the block size.
    pub block_log: u8,
    /// zstd level the writer used (informational).
    pub level: i8,
    /// With [`INCOMPAT_META_FRAMES`]: log2 of the decompressed bytes per metadata frame.
    /// Zero (and ignored) otherwise.
    pub meta_frame_log: u8,
    /// Zero.
    pub reserved0: u8,
    /// Compatible feature bits: a reader may ignore unknown ones.
    pub compat: U64,
    /// Incompatible feature bits: a reader must refuse unknown ones.
    pub incompat: U64,
    /// Total size of the image file in bytes.
    pub image_size: U64,
    /// File offset of the data region.
    pub data_offset: U64,
    /// Length of the data region.
    pub data_len: U64,
    /// File offset of the stored (compressed) metadata region.
    pub meta_offset: U64,
    /// Length of the stored metadata region.
    pub meta_stored_len: U64,
    /// Length of the metadata once decompressed.
    pub meta_raw_len: U64,
    /// xxh3-64 of the stored metadata bytes.
    pub meta_checksum: U64,
    /// Blocks `0..hot_blocks` hold the hot list's data, contiguous at the start of the data region.
    pub hot_blocks: U64,
    /// xxh3-128 of every byte from `data_offset` to `image_size`, little-endian.
    pub digest: [u8; 16],
    /// Zero in version 1.0; a later minor version may give it a meaning old readers ignore.
    pub reserved1: U64,
    /// xxh3-64 of bytes 0..120 of the superblock.
    pub checksum: U64,
}

/// Header at offset 0 of the decompressed metadata: where each table lies in it.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct MetaHeader {
    /// Inode table: offset in the metadata and number of [`Inode`] records.
    pub inodes: Table,
    /// Directory entry table ([`Dirent`]).
    pub dirents: Table,
    /// Chunk table ([`Chunk`]).
    pub chunks: Table,
    /// Block table ([`Block`]).
    pub blocks: Table,
    /// Extended attribute table ([`Xattr`]).
    pub xattrs: Table,
    /// The blob: names, symlink targets, xattr keys and values, config. `count` is in bytes.
    pub blob: Table,
    /// The image config (UTF-8 JSON) inside the blob; offset and length, both 0 when absent.
    pub config: Table,
    /// Bytes of regular-file content in the tree (each hard-linked inode once).
    pub logical_bytes: U64,
    /// Bytes of file content not stored thanks to deduplication of files, blocks and tails.
    pub dedup_bytes: U64,
}

/// A table's place in the metadata: byte offset and element count.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Table {
    /// Byte offset from the start of the decompressed metadata.
    pub offset: U64,
    /// Number of records (bytes for the blob).
    pub count: U64,
}

/// One inode, 64 bytes. Field meaning by file type is in FORMAT.md.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Inode {
    /// `st_mode`: file type and permission bits, Linux encoding.
    pub mode: U32,
    /// Owner user id.
    pub uid: U32,
    /// Owner group id.
    pub gid: U32,
    /// Number of directory entries naming this inode (directories: 2 + subdirectories).
    pub nlink: U32,
    /// Modification time, seconds since the epoch.
    pub mtime_sec: I64,
    /// Nanoseconds of the modification time, below 1e9.
    pub mtime_nsec: U32,
    /// Directories: inode number of the parent (the root's is itself). Others: 0.
    pub parent: U32,
    /// Regular: size in bytes. Symlink: target length. Directory: entry count. Others: 0.
    pub size: U64,
    /// Regular: first chunk. Directory: first dirent. Symlink: target offset in the blob.
    /// Character/block device: `rdev`. Others: 0.
    pub first: U64,
    /// Regular: chunk count. Directory: entry count. Symlink: target length. Others: 0.
    pub count: U32,
    /// Number of xattrs.
    pub xattr_count: U32,
    /// First xattr in the xattr table.
    pub xattr_first: U64,
}

/// A directory entry, 16 bytes. A directory's entries are contiguous and sorted by name bytes.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Dirent {
    /// Offset of the name in the blob.
    pub name_offset: U64,
    /// Inode number of the entry.
    pub inode: U32,
    /// Length of the name, 1 to 255.
    pub name_len: U16,
    /// File type of the inode ([`crate::FileKind`] as u8).
    pub kind: u8,
    /// Zero.
    pub reserved: u8,
}

/// One block-sized piece of a regular file, 8 bytes. Chunk `i` of a file covers file bytes
/// `i * block_size .. min((i + 1) * block_size, size)`.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Chunk {
    /// Index in the block table, or [`HOLE`].
    pub block: U32,
    /// Offset of the chunk's bytes inside the decompressed block.
    pub offset: U32,
}

/// A stored data block, 24 bytes.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Block {
    /// File offset of the stored bytes.
    pub offset: U64,
    /// xxh3-64 of the stored bytes.
    pub checksum: U64,
    /// Stored length. Smaller than `raw_len`: one zstd frame. Equal: stored raw.
    pub stored_len: U32,
    /// Decompressed length, 1 to the block size.
    pub raw_len: U32,
}

/// An extended attribute, 24 bytes. An inode's xattrs are contiguous and sorted by key bytes.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Xattr {
    /// Offset of the key (full name, e.g. `user.comment`) in the blob.
    pub key_offset: U64,
    /// Offset of the value in the blob.
    pub value_offset: U64,
    /// Length of the key, 1 to 255.
    pub key_len: U32,
    /// Length of the value, at most 65536.
    pub value_len: U32,
}

const _: () = {
    assert!(size_of::<Superblock>() == 128);
    assert!(size_of::<MetaHeader>() == 128);
    assert!(size_of::<Table>() == 16);
    assert!(size_of::<Inode>() == 64);
    assert!(size_of::<Dirent>() == 16);
    assert!(size_of::<Chunk>() == 8);
    assert!(size_of::<Block>() == 24);
    assert!(size_of::<Xattr>() == 24);
    assert!(std::mem::offset_of!(Superblock, checksum) == 120);
};

/// A record's name, size, and fields as (name, offset, size).
pub type RecordLayout = (&'static str, usize, Vec<(&'static str, usize, usize)>);

/// Name, size and field offsets of every record, for the test that checks FORMAT.md.
pub fn records() -> Vec<RecordLayout> {
    use std::mem::offset_of;
    macro_rules! rec {
        ($t:ty; $($f:ident : $ft:ty),* $(,)?) => {
            (stringify!($t), size_of::<$t>(), vec![$((stringify!($f), offset_of!($t, $f), size_of::<$ft>())),*])
        };
    }
    vec![
        rec!(Superblock; magic: [u8; 8], version_major: U16, version_minor: U16, block_log: u8,
            level: i8, meta_frame_log: u8, reserved0: u8, compat: U64, incompat: U64, image_size: U64,
            data_offset: U64, data_len: U64, meta_offset: U64, meta_stored_len: U64,
            meta_raw_len: U64, meta_checksum: U64, hot_blocks: U64, digest: [u8; 16],
            reserved1: U64, checksum: U64),
        rec!(MetaHeader; inodes: Table, dirents: Table, chunks: Table, blocks: Table,
            xattrs: Table, blob: Table, config: Table, logical_bytes: U64, dedup_bytes: U64),
        rec!(Table; offset: U64, count: U64),
        rec!(Inode; mode: U32, uid: U32, gid: U32, nlink: U32, mtime_sec: I64, mtime_nsec: U32,
            parent: U32, size: U64, first: U64, count: U32, xattr_count: U32, xattr_first: U64),
        rec!(Dirent; name_offset: U64, inode: U32, name_len: U16, kind: u8, reserved: u8),
        rec!(Chunk; block: U32, offset: U32),
        rec!(Block; offset: U64, checksum: U64, stored_len: U32, raw_len: U32),
        rec!(Xattr; key_offset: U64, value_offset: U64, key_len: U32, value_len: U32),
    ]
}
