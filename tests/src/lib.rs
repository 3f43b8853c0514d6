//! cimg-tests: end-to-end tests that drive the real binaries (`cimg`, later `cimg-mount` and
//! `launch`). The tests live in `tests/tests/`; this library holds their shared helpers.
