//! Links `launch` without `libgcc_s.so.1`: Rust's standard library asks for `-lgcc_s` (its
//! unwinder), and loading that library costs every start of `launch` an open, a mapping,
//! relocations and `__cpu_indicator_init`'s CPUID instructions, which trap to the
//! hypervisor in a VM. Here `-lgcc_s` finds a linker script in this build's `OUT_DIR` that
//! names the static unwinder (`libgcc_eh.a`) instead, as `gcc -static-libgcc` does for C.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::write(out.join("libgcc_s.so"), "INPUT(-lgcc_eh)\n").expect("write linker script");
    println!("cargo:rustc-link-search=native={}", out.display());
}
