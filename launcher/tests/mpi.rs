//! `mpirun -np 4 launch img.cimg -- /srv/mpi_hello` with Open MPI: the image holds the host's
//! MPI stack (the program, its libraries, Open MPI's and PMIx's plugins and data); the ranks
//! join one container automatically (OMPI_COMM_WORLD_LOCAL_SIZE, PMIX_NAMESPACE) and
//! exchange 1 MiB messages over shared memory with CMA single copy, which works only between
//! processes of one user namespace.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::*;

#[test]
fn mpirun_ranks_share_one_container_and_shared_memory() {
    if !capable() {
        return;
    }
    let missing: Vec<&str> = ["mpirun", "mpicc"]
        .into_iter()
        .filter(|t| !have(t))
        .collect();
    if !missing.is_empty() {
        assert!(
            !ci(),
            "the MPI test needs {missing:?} (apt-get install openmpi-bin libopenmpi-dev)"
        );
        eprintln!("skipping: needs {missing:?}");
        return;
    }
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let root = work.path().join("rootfs");
    make_rootfs(&root);
    let bin = root.join("srv/mpi_hello");
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mpi/mpi_hello.c");
    let o = Command::new("mpicc")
        .arg("-O2")
        .arg("-o")
        .arg(&bin)
        .arg(src)
        .output()
        .unwrap();
    assert!(o.status.success(), "mpicc: {}", err(&o));
    // The host's MPI stack: Open MPI's and PMIx's library trees and data, and every library
    // the program and the plugins load.
    let script = r#"set -e
R=$1
multi=$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
for d in /usr/lib/$multi/openmpi /usr/lib/$multi/pmix2 /usr/lib/$multi/pmix /usr/share/openmpi /usr/share/pmix /etc/openmpi /usr/share/hwloc; do
  [ -e "$d" ] || continue
  mkdir -p "$R$(dirname "$d")"
  cp -a "$d" "$R$(dirname "$d")/"
done
{ ldd "$R/srv/mpi_hello"; find /usr/lib/$multi/openmpi /usr/lib/$multi/pmix* -name '*.so*' -type f -exec ldd {} \; 2>/dev/null; } \
  | grep -o '/[^ ]*' | sort -u | while read -r l; do
    [ -e "$l" ] || continue
    rel=${l#/usr}
    mkdir -p "$R/usr$(dirname "$rel")"
    cp -L "$l" "$R/usr$rel"
  done
"#;
    let o = Command::new("bash")
        .args(["-c", script, "stack"])
        .arg(&root)
        .output()
        .unwrap();
    assert!(o.status.success(), "copying the MPI stack: {}", err(&o));
    let img = work.path().join("mpi.cimg");
    pack(&root, &img, None);
    let i = img.display().to_string();
    let o = Command::new("mpirun")
        .args([
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            "4",
            "--mca",
            "pml",
            "ob1",
            "--mca",
            "btl",
            "self,vader",
            "--mca",
            "btl_vader_single_copy_mechanism",
            "cma",
            LAUNCH,
            &i,
            "--",
            "/srv/mpi_hello",
        ])
        .env("CIMG_LINGER", "0")
        .current_dir(work.path())
        .output()
        .unwrap();
    let s = out(&o);
    assert!(o.status.success(), "mpirun failed:\n{s}\n{}", err(&o));
    let ranks: Vec<&str> = s.lines().filter(|l| l.starts_with("RANK ")).collect();
    assert_eq!(ranks.len(), 4, "{s}");
    let host_ns = fs::read_link("/proc/self/ns/mnt").unwrap();
    let namespaces: std::collections::BTreeSet<&str> =
        ranks.iter().map(|l| l.split(' ').nth(5).unwrap()).collect();
    assert_eq!(namespaces.len(), 1, "one container: {s}");
    assert_ne!(Path::new(namespaces.iter().next().unwrap()), host_ns);
    assert!(ranks.iter().all(|l| l.ends_with("img in the image")), "{s}");
    for r in 0..4 {
        assert!(
            ranks
                .iter()
                .any(|l| l.starts_with(&format!("RANK {r} of 4 "))),
            "{s}"
        );
    }
}
