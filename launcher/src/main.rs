//! launch: runs a command in an unprivileged user + mount namespace whose root is a `.cimg`
//! image served by the in-tree FUSE driver.
//!
//! Not built yet: this binary is a placeholder until the launcher issue lands.

fn main() {
    eprintln!("launch: not implemented yet");
    std::process::exit(1);
}
