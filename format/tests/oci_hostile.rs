//! OCI image layouts that lie: a descriptor `size` that is not the blob's, a config whose
//! `rootfs.diff_ids` are not the layers', a `blobs/` symlink pointing out of the layout. Each
//! is refused with a message naming what is wrong; the genuine layout imports.

use cimg_format::Image;
use cimg_format::import::{self, ImportOptions, Kind};
use cimg_format::writer::PackOptions;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::Path;

fn sha(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A one-file layer: `hello` holding "hello, world\n".
fn layer_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let data = b"hello, world\n";
    let mut h = tar::Header::new_ustar();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, "hello", &data[..]).expect("append");
    b.into_inner().expect("tar")
}

/// What to get wrong.
#[derive(Clone, Copy, PartialEq)]
enum Lie {
    None,
    /// The layer descriptor's size, one more than the blob's.
    LayerSize,
    /// The manifest descriptor's size in index.json, one less.
    ManifestSize,
    /// The config's diff_id for the layer: the digest of other bytes.
    DiffId,
}

/// Writes an OCI layout of one gzip layer into `dir`; returns the layer's (stored digest,
/// true diff_id, diff_id written).
fn layout(dir: &Path, lie: Lie) -> (String, String, String) {
    std::fs::create_dir_all(dir.join("blobs/sha256")).expect("mkdir");
    let put = |data: &[u8]| -> String {
        let h = sha(data);
        std::fs::write(dir.join("blobs/sha256").join(&h), data).expect("write blob");
        format!("sha256:{h}")
    };
    let tar = layer_tar();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).expect("gzip");
    let gz = gz.finish().expect("gzip");
    let layer_d = put(&gz);
    let true_diff = format!("sha256:{}", sha(&tar));
    let diff = if lie == Lie::DiffId {
        format!("sha256:{}", sha(b"some other layer"))
    } else {
        true_diff.clone()
    };
    let cfg = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/hello"]},
        "rootfs": {"type": "layers", "diff_ids": [diff]}
    }))
    .expect("json");
    let cfg_d = put(&cfg);
    let layer_size = gz.len() + usize::from(lie == Lie::LayerSize);
    let manifest = serde_json::to_vec(&serde_json::json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": cfg_d, "size": cfg.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer_d, "size": layer_size}]}))
    .expect("json");
    let man_d = put(&manifest);
    let man_size = manifest.len() - usize::from(lie == Lie::ManifestSize);
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json",
         "digest": man_d, "size": man_size,
         "platform": {"os": "linux", "architecture": "amd64"}}]});
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&index).expect("json"),
    )
    .expect("write");
    std::fs::write(
        dir.join("oci-layout"),
        br#"{"imageLayoutVersion": "1.0.0"}"#,
    )
    .expect("write");
    (layer_d, true_diff, diff)
}

fn pack(src: &Path, out: &Path) -> cimg_format::Result<cimg_format::PackStats> {
    import::pack(
        Kind::Oci,
        src,
        out,
        &ImportOptions::default(),
        &PackOptions::default(),
        &|_, _| {},
    )
}

/// The layout as an `oci-archive` tar.
fn archive(dir: &Path, out: &Path) {
    let mut b = tar::Builder::new(Vec::new());
    b.append_dir_all(".", dir).expect("tar the layout");
    std::fs::write(out, b.into_inner().expect("tar")).expect("write archive");
}

#[test]
fn the_genuine_layout_imports() {
    let d = tempfile::tempdir().expect("tempdir");
    let lay = d.path().join("layout");
    layout(&lay, Lie::None);
    let tar = d.path().join("img.oci.tar");
    archive(&lay, &tar);
    for src in [&lay, &tar] {
        let out = d.path().join("img.cimg");
        pack(src, &out).expect("genuine layout");
        let img = Image::open(&out).expect("open");
        let ino = img.resolve(b"hello").expect("hello in the image");
        assert_eq!(img.attr(ino).expect("attr").size, 13);
    }
}

fn refused(lie: Lie, want: &[&str]) {
    let d = tempfile::tempdir().expect("tempdir");
    let lay = d.path().join("layout");
    layout(&lay, lie);
    let tar = d.path().join("img.oci.tar");
    archive(&lay, &tar);
    for src in [&lay, &tar] {
        let out = d.path().join("img.cimg");
        let err = pack(src, &out).expect_err("refused").to_string();
        for w in want {
            assert!(err.contains(w), "{} wanted in: {err}", w);
        }
        assert!(!out.exists());
    }
}

#[test]
fn a_layer_size_that_is_not_the_blobs_is_refused() {
    refused(
        Lie::LayerSize,
        &["blobs/sha256/", "but its descriptor says"],
    );
}

#[test]
fn a_manifest_size_that_is_not_the_blobs_is_refused() {
    refused(
        Lie::ManifestSize,
        &["blobs/sha256/", "but its descriptor says"],
    );
}

#[test]
fn a_wrong_diff_id_is_refused_naming_both_digests() {
    let d = tempfile::tempdir().expect("tempdir");
    let (layer, truth, lie) = layout(&d.path().join("probe"), Lie::DiffId);
    refused(
        Lie::DiffId,
        &[
            &format!("blobs/sha256/{} (uncompressed)", &layer[7..]),
            &format!("{lie} expected, {truth} found"),
        ],
    );
}

/// `blobs` a symlink to a directory outside the layout holding the very same blobs: refused
/// although every digest would hold.
#[test]
fn a_blobs_symlink_out_of_the_layout_is_refused() {
    let d = tempfile::tempdir().expect("tempdir");
    let lay = d.path().join("layout");
    layout(&lay, Lie::None);
    let outside = d.path().join("outside");
    std::fs::create_dir(&outside).expect("mkdir");
    std::fs::rename(lay.join("blobs"), outside.join("blobs")).expect("move blobs");
    std::os::unix::fs::symlink("../outside/blobs", lay.join("blobs")).expect("symlink");
    let out = d.path().join("img.cimg");
    let err = pack(&lay, &out).expect_err("refused").to_string();
    assert!(err.contains("refused: blobs is a symlink"), "{err}");
    assert!(!out.exists());
    // A symlinked blob too.
    std::fs::remove_file(lay.join("blobs")).expect("rm");
    std::fs::rename(outside.join("blobs"), lay.join("blobs")).expect("move back");
    let (layer, _, _) = layout(&d.path().join("probe"), Lie::None);
    let blob = lay.join("blobs/sha256").join(&layer[7..]);
    std::fs::rename(&blob, outside.join("blob")).expect("move blob");
    std::os::unix::fs::symlink(outside.join("blob"), &blob).expect("symlink");
    let err = pack(&lay, &out).expect_err("refused").to_string();
    assert!(
        err.contains(&format!(
            "refused: blobs/sha256/{} is a symlink",
            &layer[7..]
        )),
        "{err}"
    );
}
