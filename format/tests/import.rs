//! Importing tar archives, `docker save` archives and OCI layouts: fixtures are built here
//! with the `tar` crate, then packed through `cimg_format::import` and read back with
//! `cimg_format::Image`.

use cimg_format::import::{self, ImportOptions, Kind};
use cimg_format::writer::{self, Node, PackOptions, Source, Tree};
use cimg_format::{FileKind, Image};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use tar::{EntryType, Header};

const MTIME: u64 = 1_700_000_000;

/// Builds tar archives entry by entry, with raw names (so hostile ones can be written).
struct T(tar::Builder<Vec<u8>>);

impl T {
    fn new() -> Self {
        T(tar::Builder::new(Vec::new()))
    }

    fn raw(&mut self, name: &[u8], kind: EntryType, mode: u32, link: &[u8], data: &[u8]) {
        self.raw_sized(name, kind, mode, link, data, data.len() as u64);
    }

    fn raw_sized(
        &mut self,
        name: &[u8],
        kind: EntryType,
        mode: u32,
        link: &[u8],
        data: &[u8],
        size: u64,
    ) {
        let mut h = Header::new_ustar();
        h.as_mut_bytes()[..100].fill(0);
        h.as_mut_bytes()[..name.len()].copy_from_slice(name);
        h.as_mut_bytes()[157..157 + link.len()].copy_from_slice(link);
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(MTIME);
        h.set_uid(1000);
        h.set_gid(1000);
        h.set_cksum();
        self.0.get_mut().extend_from_slice(h.as_bytes());
        self.0.get_mut().extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.0.get_mut().extend(std::iter::repeat_n(0u8, pad));
    }

    fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        self.raw(name.as_bytes(), EntryType::Regular, 0o644, b"", data);
        self
    }

    fn dir(&mut self, name: &str) -> &mut Self {
        self.raw(name.as_bytes(), EntryType::Directory, 0o755, b"", b"");
        self
    }

    fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.raw(
            name.as_bytes(),
            EntryType::Symlink,
            0o777,
            target.as_bytes(),
            b"",
        );
        self
    }

    fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.raw(
            name.as_bytes(),
            EntryType::Link,
            0o644,
            target.as_bytes(),
            b"",
        );
        self
    }

    fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        let mut data = Vec::new();
        for (k, v) in records {
            let body_len = k.len() + v.len() + 3;
            let mut len = body_len + 1;
            while format!("{len}").len() + body_len != len {
                len += 1;
            }
            data.extend_from_slice(format!("{len} {k}=").as_bytes());
            data.extend_from_slice(v);
            data.push(b'\n');
        }
        self.raw(b"././@PaxHeader", EntryType::XHeader, 0o644, b"", &data);
        self
    }

    fn finish(mut self) -> Vec<u8> {
        self.0.get_mut().extend_from_slice(&[0u8; 1024]);
        self.0.into_inner().unwrap()
    }
}

/// What an image holds: path → description.
fn dump(img: &Path) -> BTreeMap<String, String> {
    let img = Image::open(img).unwrap();
    let mut out = BTreeMap::new();
    img.walk(|path, e| {
        let a = img.attr(e.ino)?;
        let what = match e.kind {
            FileKind::File => {
                let mut buf = vec![0u8; a.size as usize];
                let n = img.read_at(e.ino, 0, &mut buf)?;
                assert_eq!(n, buf.len());
                format!(
                    "file {:o} {} {:?}",
                    a.perm(),
                    a.nlink,
                    String::from_utf8_lossy(&buf)
                )
            }
            FileKind::Dir => format!("dir {:o}", a.perm()),
            FileKind::Symlink => {
                format!("link -> {}", String::from_utf8_lossy(img.readlink(e.ino)?))
            }
            k => format!("{k:?} {:o} {}", a.perm(), a.rdev),
        };
        out.insert(String::from_utf8_lossy(path).into_owned(), what);
        Ok(())
    })
    .unwrap();
    out
}

fn opts() -> PackOptions {
    PackOptions {
        threads: 3,
        block_log: 12,
        ..PackOptions::default()
    }
}

fn pack(kind: Kind, src: &Path, out: &Path, io: &ImportOptions) -> cimg_format::Result<()> {
    import::pack(kind, src, out, io, &opts(), &|_, _| {}).map(|_| ())
}

fn write(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

/// Pack `archive` as a tar and expect an error mentioning `needle`; no output is left.
fn refuse(archive: &[u8], needle: &str) {
    let d = tempfile::tempdir().unwrap();
    let src = write(d.path(), "in.tar", archive);
    let out = d.path().join("out.cimg");
    let err = pack(Kind::Tar, &src, &out, &ImportOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(needle),
        "error {err:?} does not mention {needle:?}"
    );
    let left: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        vec![std::ffi::OsString::from("in.tar")],
        "output left behind"
    );
}

fn sample_tar() -> Vec<u8> {
    let mut t = T::new();
    t.dir("etc/")
        .file("etc/hosts", b"127.0.0.1 localhost\n")
        .file("etc/big", &vec![7u8; 10_000])
        .symlink("etc/link", "/etc/hosts")
        .hardlink("etc/hosts2", "etc/hosts")
        .file("./usr/bin/tool", b"#!/bin/sh\n")
        .raw(b"run/fifo", EntryType::Fifo, 0o600, b"", b"");
    let mut h = Header::new_ustar();
    h.set_path("dev/null").unwrap();
    h.set_entry_type(EntryType::Char);
    h.set_mode(0o666);
    h.set_size(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(MTIME);
    h.set_device_major(1).unwrap();
    h.set_device_minor(3).unwrap();
    h.set_cksum();
    t.0.append(&h, &b""[..]).unwrap();
    t.finish()
}

#[test]
fn stream_sourced_files_pack_in_feed_order() {
    let d = tempfile::tempdir().unwrap();
    let mut root = Node::new(Vec::new(), 0, FileKind::Dir, 0o755);
    root.children = vec![1, 2];
    let mut a = Node::new(b"a".to_vec(), 0, FileKind::File, 0o644);
    a.size = 5000;
    a.source = Some(Source::Stream);
    let path_file = write(d.path(), "src", b"from a path");
    let mut b = Node::new(b"b".to_vec(), 0, FileKind::File, 0o644);
    b.size = 11;
    b.source = Some(Source::Path(path_file));
    let tree = Tree {
        nodes: vec![root, a, b],
    };
    let out = d.path().join("o.cimg");
    writer::pack_tree_with(&tree, &out, &opts(), &|_, _| {}, |sink| {
        sink(1, &mut &vec![9u8; 5000][..])
    })
    .unwrap();
    let m = dump(&out);
    assert_eq!(m["b"], "file 644 1 \"from a path\"");
    assert!(m["a"].starts_with("file 644 1 \"\\t\\t"));
    // Short content, long content and a file never fed are errors; nothing is left.
    for (feed, needle) in [
        (vec![9u8; 10], "content ended after 10 of 5000"),
        (vec![9u8; 5001], "longer than its declared 5000"),
    ] {
        let err = writer::pack_tree_with(&tree, &out, &opts(), &|_, _| {}, |sink| {
            sink(1, &mut &feed[..])
        })
        .unwrap_err();
        assert!(err.to_string().contains(needle), "{err}");
    }
    let err = writer::pack_tree_with(&tree, &d.path().join("x.cimg"), &opts(), &|_, _| {}, |_| {
        Ok(())
    })
    .unwrap_err();
    assert!(err.to_string().contains("a: content never given"), "{err}");
    assert!(!d.path().join("x.cimg").exists());
}

#[test]
fn plain_tar_imports_every_kind() {
    let d = tempfile::tempdir().unwrap();
    let src = write(d.path(), "a.tar", &sample_tar());
    assert_eq!(import::detect(&src).unwrap(), Kind::Tar);
    let out = d.path().join("a.cimg");
    pack(Kind::Tar, &src, &out, &ImportOptions::default()).unwrap();
    let m = dump(&out);
    assert_eq!(m["etc/hosts"], "file 644 2 \"127.0.0.1 localhost\\n\"");
    assert_eq!(m["etc/hosts2"], m["etc/hosts"]);
    assert_eq!(m["etc/link"], "link -> /etc/hosts");
    assert_eq!(m["usr"], "dir 755");
    assert_eq!(m["usr/bin/tool"], "file 644 1 \"#!/bin/sh\\n\"");
    assert_eq!(m["dev/null"], "CharDev 666 259");
    assert_eq!(m["run/fifo"], "Fifo 600 0");
    assert_eq!(
        m["etc/big"],
        format!("file 644 1 {:?}", String::from_utf8_lossy(&[7u8; 10_000]))
    );
    let img = Image::open(&out).unwrap();
    let a = img.attr(img.resolve(b"etc/hosts").unwrap()).unwrap();
    assert_eq!((a.uid, a.gid, a.mtime_sec), (1000, 1000, MTIME as i64));
}

#[test]
fn compressed_tars_give_the_same_image() {
    let d = tempfile::tempdir().unwrap();
    let plain = sample_tar();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&plain).unwrap();
    let gz = gz.finish().unwrap();
    let zst = zstd::encode_all(&plain[..], 3).unwrap();
    let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 6);
    xz.write_all(&plain).unwrap();
    let xz = xz.finish().unwrap();
    let reference = d.path().join("plain.cimg");
    pack(
        Kind::Tar,
        &write(d.path(), "p.tar", &plain),
        &reference,
        &Default::default(),
    )
    .unwrap();
    let reference = std::fs::read(reference).unwrap();
    for (name, data) in [("t.tgz", gz), ("t.tzst", zst), ("t.txz", xz)] {
        let src = write(d.path(), name, &data);
        assert_eq!(import::detect(&src).unwrap(), Kind::Tar, "{name}");
        let out = d.path().join(format!("{name}.cimg"));
        pack(
            import::detect(&src).unwrap(),
            &src,
            &out,
            &Default::default(),
        )
        .unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), reference, "{name}");
    }
}

#[test]
fn pax_long_names_xattrs_and_mtime() {
    let long = format!("{}/{}", "d".repeat(120), "f".repeat(200));
    let mut t = T::new();
    t.pax(&[
        ("path", long.as_bytes()),
        ("mtime", b"1234567890.5"),
        ("uid", b"4000000"),
        ("SCHILY.xattr.user.b", b"2"),
        ("SCHILY.xattr.user.a", b"1"),
    ])
    .file("short-name-replaced", b"pax");
    // A GNU long name, via the tar crate's own writer.
    let gnu_long = format!("g/{}", "x".repeat(150));
    let mut h = Header::new_gnu();
    h.set_size(3);
    h.set_mode(0o600);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(MTIME);
    t.0.append_data(&mut h, &gnu_long, &b"gnu"[..]).unwrap();
    let d = tempfile::tempdir().unwrap();
    let src = write(d.path(), "p.tar", &t.finish());
    let out = d.path().join("p.cimg");
    pack(Kind::Tar, &src, &out, &Default::default()).unwrap();
    let m = dump(&out);
    assert_eq!(m[&long], "file 644 1 \"pax\"");
    assert_eq!(m[&gnu_long], "file 600 1 \"gnu\"");
    assert!(!m.contains_key("short-name-replaced"));
    let img = Image::open(&out).unwrap();
    let ino = img.resolve(long.as_bytes()).unwrap();
    let a = img.attr(ino).unwrap();
    assert_eq!(
        (a.mtime_sec, a.mtime_nsec, a.uid),
        (1234567890, 500_000_000, 4_000_000)
    );
    let x: Vec<(Vec<u8>, Vec<u8>)> = img
        .xattrs(ino)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k.to_vec(), v.to_vec()))
        .collect();
    assert_eq!(
        x,
        vec![
            (b"user.a".to_vec(), b"1".to_vec()),
            (b"user.b".to_vec(), b"2".to_vec())
        ]
    );
}

#[test]
fn duplicates_later_wins_and_links_keep_the_old_content() {
    let mut t = T::new();
    t.file("a", b"old")
        .hardlink("b", "a")
        .file("a", b"new")
        .dir("d/")
        .file("d/x", b"x")
        .file("d", b"now a file");
    let d = tempfile::tempdir().unwrap();
    let src = write(d.path(), "t.tar", &t.finish());
    let out = d.path().join("t.cimg");
    pack(Kind::Tar, &src, &out, &Default::default()).unwrap();
    let m = dump(&out);
    assert_eq!(m["a"], "file 644 1 \"new\"");
    assert_eq!(m["b"], "file 644 1 \"old\"");
    assert_eq!(m["d"], "file 644 1 \"now a file\"");
    assert!(!m.contains_key("d/x"));
}

#[test]
fn leading_slash_and_inner_dotdot_are_normalized() {
    let mut t = T::new();
    t.file("/abs/f", b"1").file("a/../b/f", b"2");
    let d = tempfile::tempdir().unwrap();
    let src = write(d.path(), "t.tar", &t.finish());
    let out = d.path().join("t.cimg");
    pack(Kind::Tar, &src, &out, &Default::default()).unwrap();
    let m = dump(&out);
    assert_eq!(m["abs/f"], "file 644 1 \"1\"");
    assert_eq!(m["b/f"], "file 644 1 \"2\"");
    assert!(!m.contains_key("a"));
}

#[test]
fn hostile_dotdot_escape() {
    let mut t = T::new();
    t.file("a/../../etc/passwd", b"x");
    refuse(
        &t.finish(),
        "entry a/../../etc/passwd: path leaves the root",
    );
}

#[test]
fn hostile_hardlink_outside() {
    let mut t = T::new();
    t.hardlink("l", "../../etc/shadow");
    refuse(&t.finish(), "entry l: hard link target leaves the root");
}

#[test]
fn hostile_hardlink_to_missing() {
    let mut t = T::new();
    t.hardlink("l", "nothing").file("nothing", b"late");
    refuse(
        &t.finish(),
        "entry l: hard link to nothing, which is not in the archive",
    );
}

#[test]
fn hostile_hardlink_to_directory() {
    let mut t = T::new();
    t.dir("d/").hardlink("l", "d");
    refuse(&t.finish(), "entry l: hard link to directory d");
}

#[test]
fn hostile_entry_under_symlink() {
    let mut t = T::new();
    t.symlink("s", "/etc").file("s/passwd", b"x");
    refuse(&t.finish(), "entry s/passwd: s is not a directory");
}

#[test]
fn hostile_declared_size_beyond_the_data() {
    let mut t = T::new();
    t.file("ok", b"fine");
    t.raw_sized(b"huge", EntryType::Regular, 0o644, b"", b"tiny", 1 << 40);
    let mut data = t.finish();
    data.truncate(data.len() - 1024);
    refuse(&data, "huge");
}

#[test]
fn hostile_truncated_archive() {
    let mut t = T::new();
    t.file("a", &vec![1u8; 5000]).file("b", b"b");
    let data = t.finish();
    refuse(&data[..512 + 2048], "entry a");
}

#[test]
fn hostile_corrupt_header() {
    let mut t = T::new();
    t.file("a", b"a").file("b", b"b");
    let mut data = t.finish();
    data[1024 + 148] ^= 0x55; // checksum field of the second header
    refuse(&data, "after entry a");
}

#[test]
fn hostile_corrupt_gzip() {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&sample_tar()).unwrap();
    let mut data = gz.finish().unwrap();
    let n = data.len();
    data.truncate(n / 2);
    refuse(&data, "in.tar");
}

#[test]
fn hostile_huge_extended_header() {
    // A decompression bomb aimed at the tar reader's buffering of long names: refused after
    // 1 MiB, whatever its declared size.
    let mut t = T::new();
    let big = vec![b'a'; 3 << 20];
    t.raw(b"././@LongLink", EntryType::GNULongName, 0o644, b"", &big);
    t.file("x", b"x");
    let plain = t.finish();
    let zst = zstd::encode_all(&plain[..], 19).unwrap();
    assert!(zst.len() < 100_000);
    refuse(&zst, "larger than 1 MiB");
}

#[test]
fn hostile_unsupported_type() {
    let mut t = T::new();
    t.raw(b"v", EntryType::new(b'V'), 0o644, b"", b"");
    refuse(&t.finish(), "entry v: unsupported entry type");
}

// ---- layered images ----

fn sha(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn layers() -> Vec<Vec<u8>> {
    let mut l1 = T::new();
    l1.dir("etc/")
        .file("etc/a", b"a1")
        .file("etc/b", b"b1")
        .dir("opt/")
        .file("opt/old", b"old")
        .dir("opt/sub/")
        .file("opt/sub/deep", b"deep")
        .file("keep", b"k");
    let mut l2 = T::new();
    l2.file("etc/.wh.b", b"")
        .file("opt/.wh..wh..opq", b"")
        .file("opt/new", b"new")
        .hardlink("keep2", "keep")
        .file("etc/a", b"a2");
    let mut l3 = T::new();
    l3.file(".wh.keep", b"").file("late", b"l");
    vec![l1.finish(), l2.finish(), l3.finish()]
}

fn expect_layers(m: &BTreeMap<String, String>) {
    assert_eq!(m["etc/a"], "file 644 1 \"a2\"");
    assert!(!m.contains_key("etc/b"));
    assert!(!m.contains_key("opt/old") && !m.contains_key("opt/sub"));
    assert_eq!(m["opt/new"], "file 644 1 \"new\"");
    assert!(!m.contains_key("keep"));
    assert_eq!(m["keep2"], "file 644 1 \"k\"");
    assert_eq!(m["late"], "file 644 1 \"l\"");
    assert!(!m.keys().any(|k| k.contains(".wh.")));
}

fn config_json() -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/bin", "A=1"],
            "WorkingDir": "/opt",
            "Entrypoint": ["/bin/sh"],
            "Cmd": ["-c", "true"],
            "User": "1000:1000",
            "Labels": {"x": "y"}
        },
        "rootfs": {"type": "layers", "diff_ids": layers().iter().map(|l| format!("sha256:{}", sha(l))).collect::<Vec<_>>()}
    }))
    .unwrap()
}

fn docker_save(corrupt_layer: bool) -> Vec<u8> {
    let ls = layers();
    let cfg = config_json();
    let mut t = T::new();
    let mut names = Vec::new();
    for (i, l) in ls.iter().enumerate() {
        let name = format!("l{i}/layer.tar");
        let mut l = l.clone();
        if corrupt_layer && i == 1 {
            l[1536] ^= 1; // content of opt/new, not a header
        }
        t.file(&name, &l);
        names.push(name);
    }
    let cfg_name = format!("{}.json", sha(&cfg));
    t.file(&cfg_name, &cfg);
    let manifest =
        serde_json::json!([{"Config": cfg_name, "RepoTags": ["test:1"], "Layers": names}]);
    t.file("manifest.json", &serde_json::to_vec(&manifest).unwrap());
    t.finish()
}

fn expect_config(out: &Path) {
    let img = Image::open(out).unwrap();
    let c: serde_json::Value = serde_json::from_slice(img.config().unwrap()).unwrap();
    assert_eq!(
        c,
        serde_json::json!({"Env": ["PATH=/usr/bin", "A=1"], "WorkingDir": "/opt",
            "Entrypoint": ["/bin/sh"], "Cmd": ["-c", "true"], "User": "1000:1000"})
    );
}

#[test]
fn docker_save_layers_whiteouts_links_and_config() {
    let d = tempfile::tempdir().unwrap();
    let src = write(d.path(), "img.tar", &docker_save(false));
    assert_eq!(import::detect(&src).unwrap(), Kind::Docker);
    let out = d.path().join("img.cimg");
    pack(Kind::Docker, &src, &out, &Default::default()).unwrap();
    expect_layers(&dump(&out));
    expect_config(&out);
    // Choosing by tag.
    let io = ImportOptions {
        reference: Some("test:1".into()),
        platform: None,
    };
    pack(Kind::Docker, &src, &out, &io).unwrap();
    let io = ImportOptions {
        reference: Some("other".into()),
        platform: None,
    };
    let err = pack(Kind::Docker, &src, &out, &io).unwrap_err().to_string();
    assert!(
        err.contains("no image tagged other (tags: test:1)"),
        "{err}"
    );
}

#[test]
fn hostile_docker_layer_digest_mismatch() {
    let d = tempfile::tempdir().unwrap();
    let src = write(d.path(), "img.tar", &docker_save(true));
    let out = d.path().join("img.cimg");
    let err = pack(Kind::Docker, &src, &out, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("l1/layer.tar (uncompressed) does not match its digest"),
        "{err}"
    );
    assert!(!out.exists());
}

/// Writes an OCI layout in `dir`: two platform images of the layers under one index named
/// `test:1`, plus a single-image `other`; gzip layers.
fn oci_layout(dir: &Path, corrupt: bool) {
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    let put = |data: &[u8]| -> String {
        let h = sha(data);
        std::fs::write(dir.join("blobs/sha256").join(&h), data).unwrap();
        format!("sha256:{h}")
    };
    let mut descs = Vec::new();
    for (i, l) in layers().iter().enumerate() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(l).unwrap();
        let gz = gz.finish().unwrap();
        let dg = put(&gz);
        if corrupt && i == 2 {
            let p = dir.join("blobs/sha256").join(&dg[7..]);
            let mut b = std::fs::read(&p).unwrap();
            let n = b.len();
            b[n - 9] ^= 1; // the gzip CRC: the tar is intact, the blob is not
            std::fs::write(&p, b).unwrap();
        }
        descs.push(
            serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": dg, "size": gz.len()}),
        );
    }
    let cfg = config_json();
    let cfg_d = put(&cfg);
    let manifest = serde_json::to_vec(&serde_json::json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_d, "size": cfg.len()},
        "layers": descs})).unwrap();
    let man_d = put(&manifest);
    // An arm64 image with only the first layer, and a config whose diff_ids say so.
    let mut arm_cfg: serde_json::Value = serde_json::from_slice(&cfg).unwrap();
    arm_cfg["rootfs"]["diff_ids"] = serde_json::json!([format!("sha256:{}", sha(&layers()[0]))]);
    let arm_cfg = serde_json::to_vec(&arm_cfg).unwrap();
    let arm_cfg_d = put(&arm_cfg);
    let arm = serde_json::to_vec(&serde_json::json!({"schemaVersion": 2,
        "config": {"digest": arm_cfg_d, "size": arm_cfg.len()}, "layers": [descs[0]]}))
    .unwrap();
    let arm_d = put(&arm);
    let idx = serde_json::to_vec(&serde_json::json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": arm_d, "size": arm.len(),
             "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": man_d, "size": manifest.len(),
             "platform": {"os": "linux", "architecture": "amd64"}}
        ]})).unwrap();
    let idx_d = put(&idx);
    let top = serde_json::json!({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": idx_d, "size": idx.len(),
         "annotations": {"org.opencontainers.image.ref.name": "test:1"}},
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": arm_d, "size": arm.len(),
         "annotations": {"org.opencontainers.image.ref.name": "other"}}
    ]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
    std::fs::write(
        dir.join("oci-layout"),
        br#"{"imageLayoutVersion": "1.0.0"}"#,
    )
    .unwrap();
}

fn tar_dir(dir: &Path) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.append_dir_all(".", dir).unwrap();
    b.into_inner().unwrap()
}

#[test]
fn oci_layout_dir_and_archive_with_ref_and_platform() {
    let d = tempfile::tempdir().unwrap();
    let lay = d.path().join("layout");
    oci_layout(&lay, false);
    assert_eq!(import::detect(&lay).unwrap(), Kind::Oci);
    let archive = write(d.path(), "img.oci.tar", &tar_dir(&lay));
    assert_eq!(import::detect(&archive).unwrap(), Kind::Oci);
    let out = d.path().join("o.cimg");
    // Two images in the index: --ref is needed.
    let err = pack(Kind::Oci, &lay, &out, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("choose one with --ref (names: test:1, other)"),
        "{err}"
    );
    for src in [&lay, &archive] {
        let io = ImportOptions {
            reference: Some("test:1".into()),
            platform: None,
        };
        pack(Kind::Oci, src, &out, &io).unwrap();
        expect_layers(&dump(&out));
        expect_config(&out);
        let io = ImportOptions {
            reference: Some("test:1".into()),
            platform: Some("linux/arm64".into()),
        };
        pack(Kind::Oci, src, &out, &io).unwrap();
        let m = dump(&out);
        assert_eq!(m["etc/b"], "file 644 1 \"b1\"");
        assert_eq!(m["opt/old"], "file 644 1 \"old\"");
        let io = ImportOptions {
            reference: Some("test:1".into()),
            platform: Some("linux/s390x".into()),
        };
        let err = pack(Kind::Oci, src, &out, &io).unwrap_err().to_string();
        assert!(err.contains("no image for platform linux/s390x"), "{err}");
    }
}

#[test]
fn hostile_oci_blob_digest_mismatch() {
    let d = tempfile::tempdir().unwrap();
    let lay = d.path().join("layout");
    oci_layout(&lay, true);
    let out = d.path().join("o.cimg");
    let io = ImportOptions {
        reference: Some("test:1".into()),
        platform: None,
    };
    let err = pack(Kind::Oci, &lay, &out, &io).unwrap_err().to_string();
    assert!(
        err.contains("blobs/sha256/") && err.contains("does not match its digest"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn hostile_oci_blob_path_escape() {
    let d = tempfile::tempdir().unwrap();
    let lay = d.path().join("layout");
    oci_layout(&lay, false);
    // A docker manifest naming a layer outside the archive.
    let mut t = T::new();
    t.file(
        "manifest.json",
        br#"[{"Config": "c.json", "Layers": ["../../etc/passwd"]}]"#,
    )
    .file("c.json", b"{}");
    let src = write(d.path(), "evil.tar", &t.finish());
    let err = pack(
        Kind::Docker,
        &src,
        &d.path().join("o.cimg"),
        &Default::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("../../etc/passwd: refused: leaves the image"),
        "{err}"
    );
}

#[test]
fn hostile_whiteout_escape() {
    let mut l = T::new();
    l.file("a/.wh...", b"");
    let d = tempfile::tempdir().unwrap();
    let layer = write(d.path(), "l.tar", &l.finish());
    let mut t = T::new();
    t.file("l.tar", &std::fs::read(&layer).unwrap())
        .file(
            "manifest.json",
            br#"[{"Config": "c.json", "Layers": ["l.tar"]}]"#,
        )
        .file("c.json", b"{}");
    let src = write(d.path(), "img.tar", &t.finish());
    let err = pack(
        Kind::Docker,
        &src,
        &d.path().join("o.cimg"),
        &Default::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("entry a/.wh...: invalid whiteout"), "{err}");
}

/// SquashFS images made by `mksquashfs` (skipped when it is not installed, outside CI): the
/// imported tree equals the same directory packed directly (hard links and xattrs aside, which
/// the `backhand` reader does not expose), for each compressor.
#[test]
fn sqfs_from_mksquashfs() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    std::fs::create_dir_all(src.join("a/b")).unwrap();
    std::fs::write(src.join("a/f"), b"hello").unwrap();
    std::fs::write(src.join("a/b/big"), pseudo(300_000)).unwrap();
    std::fs::write(src.join("empty"), b"").unwrap();
    std::os::unix::fs::symlink("a/f", src.join("l")).unwrap();
    let direct = d.path().join("direct.cimg");
    writer::pack_dir(&src, &direct, &opts(), &|_, _| {}).unwrap();
    let mut want = dump(&direct);
    want.insert("dev/null".into(), "CharDev 666 259".into());
    want.insert("dev".into(), "dir 755".into());
    for comp in ["gzip", "xz", "zstd"] {
        let img = d.path().join(format!("{comp}.sqfs"));
        let ok = std::process::Command::new("mksquashfs")
            .arg(&src)
            .arg(&img)
            .args([
                "-quiet",
                "-no-progress",
                "-noappend",
                "-no-xattrs",
                "-comp",
                comp,
            ])
            .args(["-p", "dev d 755 0 0", "-p", "dev/null c 666 0 0 1 3"])
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
            assert!(
                !ci,
                "mksquashfs not installed or failed ({comp}); CI must have it"
            );
            eprintln!("skipped: mksquashfs not installed or failed ({comp})");
            return;
        }
        assert_eq!(import::detect(&img).unwrap(), Kind::Sqfs);
        let out = d.path().join(format!("{comp}.cimg"));
        pack(Kind::Sqfs, &img, &out, &Default::default()).unwrap();
        assert_eq!(dump(&out), want, "{comp}");
        let i = Image::open(&out).unwrap();
        let a = i.attr(i.resolve(b"a/f").unwrap()).unwrap();
        let m = std::fs::metadata(src.join("a/f")).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!((a.uid, a.mtime_sec), (m.uid(), m.mtime()));
    }
    // A truncated image is refused, and nothing is left.
    let data = std::fs::read(d.path().join("zstd.sqfs")).unwrap();
    let bad = write(d.path(), "bad.sqfs", &data[..data.len() / 2]);
    let out = d.path().join("bad.cimg");
    assert!(pack(Kind::Sqfs, &bad, &out, &Default::default()).is_err());
    assert!(!out.exists());
}

fn pseudo(len: usize) -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..len)
        .map(|i| {
            if i % 7 == 0 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
            }
            (x >> (i % 7 * 8)) as u8 % 16 + b'a'
        })
        .collect()
}

#[test]
fn whiteout_in_a_missing_directory_creates_nothing() {
    let mut l = T::new();
    l.file("gone/.wh.x", b"")
        .file("gone2/.wh..wh..opq", b"")
        .file("f", b"f");
    let d = tempfile::tempdir().unwrap();
    let mut t = T::new();
    t.file("l.tar", &l.finish())
        .file(
            "manifest.json",
            br#"[{"Config": "c.json", "Layers": ["l.tar"]}]"#,
        )
        .file("c.json", b"{}");
    let src = write(d.path(), "img.tar", &t.finish());
    let out = d.path().join("o.cimg");
    pack(Kind::Docker, &src, &out, &Default::default()).unwrap();
    assert_eq!(dump(&out).keys().collect::<Vec<_>>(), vec!["f"]);
    assert!(Image::open(&out).unwrap().config().is_none());
}

/// A PAX sparse entry (GNU format 1.0, as `tar --format=posix --sparse` writes): `records`
/// besides the version, then `map` (padded to 512 bytes) and `chunks` as its data.
fn pax_sparse_1_0(records: &[(&str, &[u8])], map: &[u8], chunks: &[u8]) -> Vec<u8> {
    let mut recs: Vec<(&str, &[u8])> = vec![("GNU.sparse.major", b"1"), ("GNU.sparse.minor", b"0")];
    recs.extend_from_slice(records);
    let mut data = map.to_vec();
    data.resize(map.len().div_ceil(512) * 512, 0);
    data.extend_from_slice(chunks);
    let mut t = T::new();
    t.dir("dir/")
        .pax(&recs)
        .file("dir/GNUSparseFile.0/real", &data)
        .file("after", b"after");
    t.finish()
}

/// The three PAX sparse formats give the same file: data chunks where the map says, zeros
/// (stored as holes) elsewhere, under the real name.
#[test]
fn pax_sparse_formats_expand_holes() {
    let size = 40 * 4096u64;
    let size_s = size.to_string();
    let mut want = vec![0u8; size as usize];
    want[..5].copy_from_slice(b"hello");
    want[1000..1003].copy_from_slice(b"end");
    let archives = [
        (
            "1.0",
            pax_sparse_1_0(
                &[
                    ("GNU.sparse.name", b"dir/real"),
                    ("GNU.sparse.realsize", size_s.as_bytes()),
                ],
                format!("3\n0\n5\n1000\n3\n{size}\n0\n").as_bytes(),
                b"helloend",
            ),
        ),
        ("0.1", {
            let mut t = T::new();
            t.pax(&[
                ("GNU.sparse.name", b"dir/real"),
                ("GNU.sparse.size", size_s.as_bytes()),
                ("GNU.sparse.map", b"0,5,1000,3"),
            ])
            .file("dir/GNUSparseFile.0/real", b"helloend")
            .file("after", b"after");
            t.finish()
        }),
        ("0.0", {
            let mut t = T::new();
            t.pax(&[
                ("GNU.sparse.name", b"dir/real"),
                ("GNU.sparse.size", size_s.as_bytes()),
                ("GNU.sparse.offset", b"0"),
                ("GNU.sparse.numbytes", b"5"),
                ("GNU.sparse.offset", b"1000"),
                ("GNU.sparse.numbytes", b"3"),
            ])
            .file("dir/GNUSparseFile.0/real", b"helloend")
            .file("after", b"after");
            t.finish()
        }),
    ];
    let d = tempfile::tempdir().unwrap();
    for (version, data) in archives {
        let src = write(d.path(), &format!("{version}.tar"), &data);
        let out = d.path().join(format!("{version}.cimg"));
        pack(Kind::Tar, &src, &out, &ImportOptions::default()).unwrap();
        let m = dump(&out);
        assert_eq!(
            m.keys().collect::<Vec<_>>(),
            ["after", "dir", "dir/real"],
            "{version}"
        );
        assert_eq!(m["after"], "file 644 1 \"after\"", "{version}");
        let img = Image::open(&out).unwrap();
        let ino = img.resolve(b"dir/real").unwrap();
        assert_eq!(img.attr(ino).unwrap().size, size, "{version}");
        let mut buf = vec![1u8; size as usize];
        assert_eq!(img.read_at(ino, 0, &mut buf).unwrap(), buf.len());
        assert!(buf == want, "{version}: content differs");
        // Holes are stored as holes.
        assert!(
            std::fs::metadata(&out).unwrap().len() < 16 << 10,
            "{version}"
        );
    }
}

#[test]
fn hostile_pax_sparse_maps() {
    let real = |n: &'static str| -> (&'static str, &'static [u8]) {
        ("GNU.sparse.realsize", n.as_bytes())
    };
    let name: (&str, &[u8]) = ("GNU.sparse.name", b"dir/real");
    let cases: [(Vec<u8>, &str); 7] = [
        (
            pax_sparse_1_0(&[name, real("100")], b"2\n0\n5\n3\n3\n", b"hello..."),
            "entry dir/real: sparse map chunk at 3 (length 3) overlaps",
        ),
        (
            pax_sparse_1_0(&[name, real("100")], b"2\n0\n5\n200\n3\n", b"hello..."),
            "beyond the size 100",
        ),
        (
            pax_sparse_1_0(&[name, real("100")], b"1\n0\n5\n", b"helloEXTRA"),
            "entry dir/real: sparse map describes 5 bytes of data but the entry stores 10",
        ),
        (
            pax_sparse_1_0(&[name, real("100")], b"2\nx\n", b"hello"),
            "malformed sparse map",
        ),
        (
            pax_sparse_1_0(&[name, real("100")], b"99999999\n", b""),
            "99999999 chunks cannot fit",
        ),
        (
            pax_sparse_1_0(&[name], b"1\n0\n5\n", b"hello"),
            "without GNU.sparse.realsize",
        ),
        (
            {
                let mut t = T::new();
                t.pax(&[
                    ("GNU.sparse.major", b"2"),
                    ("GNU.sparse.minor", b"0"),
                    real("5"),
                ])
                .file("GNUSparseFile.0/f", b"hello");
                t.finish()
            },
            "unsupported GNU sparse format 2.0",
        ),
    ];
    for (archive, needle) in cases {
        refuse(&archive, needle);
    }
}

/// GNU tar's own sparse archives (old GNU format) and hard links, when `tar` is installed.
#[test]
fn gnu_tar_sparse_archive() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let f = std::fs::File::create(src.join("hole")).unwrap();
    f.set_len(5 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"end", 5 << 20).unwrap();
    std::fs::write(src.join("a"), b"a").unwrap();
    std::fs::hard_link(src.join("a"), src.join("b")).unwrap();
    let archive = d.path().join("s.tar");
    let ok = std::process::Command::new("tar")
        .args(["--sparse", "--format=gnu", "-cf"])
        .arg(&archive)
        .arg("-C")
        .arg(&src)
        .arg(".")
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        assert!(!ci, "GNU tar is missing or failed; CI must have it");
        eprintln!("skipped: no GNU tar");
        return;
    }
    let out = d.path().join("s.cimg");
    pack(Kind::Tar, &archive, &out, &Default::default()).unwrap();
    let img = Image::open(&out).unwrap();
    let ino = img.resolve(b"hole").unwrap();
    let mut buf = vec![1u8; (5 << 20) + 3];
    assert_eq!(img.read_at(ino, 0, &mut buf).unwrap(), buf.len());
    assert!(buf[..5 << 20].iter().all(|&b| b == 0));
    assert_eq!(&buf[5 << 20..], b"end");
    assert_eq!(img.attr(img.resolve(b"b").unwrap()).unwrap().nlink, 2);
    // Holes are stored as holes: the image is small.
    assert!(std::fs::metadata(&out).unwrap().len() < 64 << 10);
}

#[test]
fn cli_detects_sources_and_reads_redirected_stdin() {
    let cimg = env!("CARGO_BIN_EXE_cimg");
    let d = tempfile::tempdir().unwrap();
    let run = |args: &[&std::ffi::OsStr], stdin: Option<&Path>| {
        let mut c = std::process::Command::new(cimg);
        c.args(args);
        match stdin {
            Some(p) => c.stdin(std::fs::File::open(p).unwrap()),
            None => c.stdin(std::process::Stdio::piped()),
        };
        c.output().unwrap()
    };
    let os = |s: &Path| s.as_os_str().to_owned();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&sample_tar()).unwrap();
    let tgz = write(d.path(), "a.tgz", &gz.finish().unwrap());
    let docker = write(d.path(), "img.tar", &docker_save(false));
    let (a, b, c) = (
        d.path().join("a.cimg"),
        d.path().join("b.cimg"),
        d.path().join("c.cimg"),
    );
    let o = run(&["pack".as_ref(), "-q".as_ref(), &os(&tgz), &os(&a)], None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(
        &["pack".as_ref(), "-q".as_ref(), "-".as_ref(), &os(&b)],
        Some(&tgz),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    // From a pipe: refused with a reason.
    let o = run(
        &["pack".as_ref(), "-q".as_ref(), "-".as_ref(), &os(&c)],
        None,
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot come from a pipe"));
    // A docker archive: detected, config shown by info.
    let o = run(
        &["pack".as_ref(), "-q".as_ref(), &os(&docker), &os(&c)],
        None,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(&["info".as_ref(), &os(&c)], None);
    let info = String::from_utf8_lossy(&o.stdout);
    assert!(info.contains("\"WorkingDir\":\"/opt\""), "{info}");
    // --from overrides detection.
    let o = run(
        &[
            "pack".as_ref(),
            "-q".as_ref(),
            "--from".as_ref(),
            "oci".as_ref(),
            &os(&tgz),
            &os(&c),
        ],
        None,
    );
    assert!(!o.status.success());
}

/// Streams: packing a 256 MiB tar with the `cimg` binary peaks far below the data size.
#[test]
fn import_memory_is_bounded() {
    struct Gen(u64, u64);
    impl std::io::Read for Gen {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.1 as usize);
            for b in &mut buf[..n] {
                // xorshift: incompressible, no duplicate blocks
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                *b = self.0 as u8;
            }
            self.1 -= n as u64;
            Ok(n)
        }
    }
    let d = tempfile::tempdir().unwrap();
    let archive = d.path().join("big.tar");
    let mut b = tar::Builder::new(std::io::BufWriter::new(
        std::fs::File::create(&archive).unwrap(),
    ));
    for (i, len) in [(0, 200u64 << 20), (1, 56 << 20)] {
        let mut h = Header::new_gnu();
        h.set_size(len);
        h.set_mode(0o644);
        h.set_mtime(MTIME);
        h.set_uid(0);
        h.set_gid(0);
        b.append_data(&mut h, format!("f{i}"), Gen(0x9e37_79b9_7f4a_7c15 + i, len))
            .unwrap();
    }
    b.into_inner().unwrap().flush().unwrap();
    let out = d.path().join("big.cimg");
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_cimg"))
        .args(["pack", "-q", "--level", "1", "--threads", "2"])
        .arg(&archive)
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    // Max RSS of any child of this process so far (other tests' children are small).
    let ru = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN).unwrap();
    let peak_kib = ru.max_rss() as u64;
    eprintln!("peak RSS of cimg pack: {} MiB", peak_kib >> 10);
    assert!(peak_kib < 128 << 10, "peak RSS {peak_kib} KiB");
    let img = Image::open(&out).unwrap();
    let mut buf = vec![0u8; 4096];
    let ino = img.resolve(b"f1").unwrap();
    img.read_at(ino, (56 << 20) - 4096, &mut buf).unwrap();
    let mut g = Gen(0x9e37_79b9_7f4a_7c16, 56 << 20);
    let mut all = vec![0u8; 56 << 20];
    std::io::Read::read_exact(&mut g, &mut all).unwrap();
    assert_eq!(&buf[..], &all[(56 << 20) - 4096..]);
}
