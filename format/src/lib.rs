//! cimg-format: the `.cimg` image format — its on-disk layout ([`layout`], specified in
//! `FORMAT.md`), the writer that packs a tree into one file ([`writer`]), the validating reader
//! ([`reader`]), unpacking back to a directory ([`unpack`]) and importers of tar archives,
//! `docker save` archives and OCI layouts ([`import`]).
//!
//! This crate knows nothing of FUSE or namespaces; the FUSE driver and the launcher build on it.

pub mod config;
pub mod import;
pub mod layout;
pub mod output;
pub mod reader;
pub mod units;
pub mod unpack;
pub mod writer;

pub use config::ImageConfig;
pub use reader::{
    Attr, DirEntry, Image, OpenOptions, PARALLEL_VALIDATION_MIN, ReadAt, advise_metadata,
};
pub use writer::{PackOptions, PackStats, pack_dir};

use std::io;
use std::path::PathBuf;

/// The CPUs this process may use (`std::thread::available_parallelism`, which reads the
/// cgroup's CPU quota: three files), looked up once per process and kept across `fork`: the
/// reader's and writer's default thread counts and the FUSE driver's (`cimg_fuse::cores`)
/// share it, so that `launch` reads those files once on its way to the container, not once
/// per user.
pub fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Everything that can go wrong in this crate. Messages are lowercase and name the path or
/// the offset concerned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system call failed on a named file.
    #[error("{}: {err}", path.display())]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// What the system said (shown in the message, not chained as a source).
        err: io::Error,
    },
    /// The image contradicts the format; `offset` is a byte offset in the image file, or in
    /// the decompressed metadata when `what` says so.
    #[error("corrupt image: {what} (at offset {offset:#x})")]
    Corrupt {
        /// What is wrong, naming the record.
        what: String,
        /// Where.
        offset: u64,
    },
    /// A data block failed its checksum or did not decompress.
    #[error("corrupt image: block {block} at offset {offset:#x}: {why}")]
    BadBlock {
        /// Index of the block in the block table.
        block: u32,
        /// File offset of its stored bytes.
        offset: u64,
        /// What is wrong with it.
        why: String,
    },
    /// The image is valid but needs a newer reader (version or feature bits).
    #[error("unsupported image: {0}")]
    Unsupported(String),
    /// An input to the writer or unpacker that cannot be represented or is refused.
    #[error("{0}")]
    Invalid(String),
    /// No such path in the image.
    #[error("{0}: no such file or directory in the image")]
    NotFound(String),
    /// An operation that needs a certain file type got another.
    #[error("inode {ino}: {what}")]
    WrongType {
        /// The inode concerned.
        ino: u32,
        /// What was expected, e.g. "not a directory".
        what: &'static str,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn corrupt(what: impl Into<String>, offset: u64) -> Self {
        Error::Corrupt {
            what: what.into(),
            offset,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err: source,
        }
    }
}

/// The type of an inode. The discriminant is the `kind` byte of a directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum FileKind {
    /// Regular file.
    File = 1,
    /// Directory.
    Dir = 2,
    /// Symbolic link.
    Symlink = 3,
    /// Character device.
    CharDev = 4,
    /// Block device.
    BlockDev = 5,
    /// Named pipe.
    Fifo = 6,
    /// Unix socket.
    Socket = 7,
}

/// `S_IFMT` and the type bits of `st_mode` (Linux values, fixed by the format).
pub mod mode {
    /// Mask of the type bits.
    pub const S_IFMT: u32 = 0o170000;
    /// Socket.
    pub const S_IFSOCK: u32 = 0o140000;
    /// Symlink.
    pub const S_IFLNK: u32 = 0o120000;
    /// Regular file.
    pub const S_IFREG: u32 = 0o100000;
    /// Block device.
    pub const S_IFBLK: u32 = 0o060000;
    /// Directory.
    pub const S_IFDIR: u32 = 0o040000;
    /// Character device.
    pub const S_IFCHR: u32 = 0o020000;
    /// Fifo.
    pub const S_IFIFO: u32 = 0o010000;
}

impl FileKind {
    /// The kind encoded in the type bits of `mode`, if any.
    pub fn from_mode(m: u32) -> Option<Self> {
        Some(match m & mode::S_IFMT {
            mode::S_IFREG => FileKind::File,
            mode::S_IFDIR => FileKind::Dir,
            mode::S_IFLNK => FileKind::Symlink,
            mode::S_IFCHR => FileKind::CharDev,
            mode::S_IFBLK => FileKind::BlockDev,
            mode::S_IFIFO => FileKind::Fifo,
            mode::S_IFSOCK => FileKind::Socket,
            _ => return None,
        })
    }

    /// The kind stored in a directory entry's `kind` byte, if valid.
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => FileKind::File,
            2 => FileKind::Dir,
            3 => FileKind::Symlink,
            4 => FileKind::CharDev,
            5 => FileKind::BlockDev,
            6 => FileKind::Fifo,
            7 => FileKind::Socket,
            _ => return None,
        })
    }

    /// The type bits of `st_mode` for this kind.
    pub fn mode_bits(self) -> u32 {
        match self {
            FileKind::File => mode::S_IFREG,
            FileKind::Dir => mode::S_IFDIR,
            FileKind::Symlink => mode::S_IFLNK,
            FileKind::CharDev => mode::S_IFCHR,
            FileKind::BlockDev => mode::S_IFBLK,
            FileKind::Fifo => mode::S_IFIFO,
            FileKind::Socket => mode::S_IFSOCK,
        }
    }

    /// One letter as `ls -l` shows it.
    pub fn letter(self) -> char {
        match self {
            FileKind::File => '-',
            FileKind::Dir => 'd',
            FileKind::Symlink => 'l',
            FileKind::CharDev => 'c',
            FileKind::BlockDev => 'b',
            FileKind::Fifo => 'p',
            FileKind::Socket => 's',
        }
    }
}
