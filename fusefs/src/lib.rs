//! cimg-fuse: the FUSE filesystem that serves a `.cimg` image lazily, block by block, with a
//! page-aligned decompressed-block cache and prefetch; and the `cimg-mount` binary.
//!
//! Not built yet: this crate is a placeholder until the FUSE driver issue lands.
