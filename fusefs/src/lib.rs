//! cimg-fuse: the FUSE filesystem that serves a `.cimg` image lazily, block by block, with a
//! page-aligned decompressed-block cache and prefetch; and the `cimg-mount` binary.
//!
//! - [`fs`]: the `fuser` 0.18 filesystem over [`cimg_format::Image`] (every read-only
//!   operation, EROFS for every write, kernel caching used fully, the one errno mapping).
//!   Its subsystems are private modules: `read` (the read path; reads that need a block
//!   loaded go to a worker pool), `push` (page-cache pushes), `prefetch` (sequential,
//!   image-order, exec and hot-list prefetch, skipped when the CPU is busy) and `hot` (the
//!   `--record-hot` recorder).
//! - [`cache`]: the bounded, sharded, coalescing block cache.
//! - [`exec`]: the files a program's start reads (program, ELF interpreter, libraries), for
//!   the server to decompress ahead.
//! - [`warm`]: read those files and the hot files ahead into the kernel's page cache, from a
//!   process other than the server (`launch` forks one).
//! - [`mount()`] / [`Server`]: mount an image and serve it ([`Server::run`]). Several event
//!   loops run, each on its own cloned `/dev/fuse` fd (`Config { n_threads, clone_fd: true }`).
//!   As root (or in a user namespace owning its mount namespace) this crate calls mount(2)
//!   itself and hands the fd to fuser; otherwise fuser mounts through `fusermount3`.
//!   (Module `mount`.)
//! - [`log()`]: one-line messages on stderr, prefixed with the program's name
//!   ([`set_log_prefix`]). (Module `log`.)
//!
//! Mounting as an ordinary user goes through `fusermount3`, which needs a `/dev/fuse` the user
//! can open (mode 0666 on usual systems); the test `ordinary_user_mounts_through_fusermount3`
//! runs `cimg-mount` that way, as an unused uid with a 0666 `/dev/fuse` bound in a private
//! mount namespace.

pub mod cache;
pub mod exec;
pub mod fs;
mod hot;
mod log;
mod mount;
mod prefetch;
mod push;
mod read;
pub mod warm;

pub use self::log::{log, set_log_prefix};
pub use fs::{CacheHandle, CimgFs, DEFAULT_CACHE_SIZE, FsOptions};
pub use mount::{
    DEFAULT_READ_AHEAD_KB, MountError, MountOptions, Server, Unmounter, attach_fd,
    kernel_mount_data, mount, mount_file, mounted_device, set_read_ahead_kb,
};

/// The CPUs this process may use, looked up once per process ([`cimg_format::cores`], shared
/// with the image reader's thread count).
pub use cimg_format::cores;
