//! cimg-benches: benchmarks of cimg against its peers (mksquashfs, squashfuse, kernel squashfs,
//! Charliecloud), and helpers shared by the benchmark binaries.
