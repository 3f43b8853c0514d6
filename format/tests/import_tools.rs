//! Importing images made by real tools on this machine: `umoci` (multi-layer OCI layouts with
//! whiteouts, an opaque directory, hard links, symlinks, xattrs, devices, owners, two images
//! in one layout), `skopeo` (`oci-archive:`, `docker-archive:`, zstd layers), `buildah` (from
//! scratch, vfs storage, `oci:`, `oci-archive:` and `docker-archive:`; a two-platform manifest
//! list by `buildah manifest push --all`), `podman` (`save` as a multi-image `docker-archive`,
//! `oci-archive`, `oci-dir`), `mksquashfs` and GNU `tar` (gzip, zstd, xz; gnu and posix
//! formats, sparse files). Each is packed with the `cimg` binary and unpacked again with
//! `cimg unpack`, and the result is compared with the tree the tool itself says the image
//! holds: `umoci unpack`'s rootfs, `unsquashfs`'s output, `tar -x`'s output (the manifest
//! list, which umoci cannot unpack, with its sources).
//!
//! A test whose tool is missing fails when `CI=true` (the CI script installs them), and
//! otherwise prints why it is skipped. The layered-image tests need root (owners, devices).

mod common;

use common::{Snapshot, assert_same_tree, in_ci, pseudo_data, require_root, snapshot};
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Whether `tool` can be run (`tool version_flag`; its exit status does not matter: `unsquashfs
/// -version` exits 1). Missing in CI is a failure.
fn have(tool: &str, version_flag: &str, test: &str) -> bool {
    let ok = Command::new(tool)
        .arg(version_flag)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !ok {
        assert!(
            !in_ci(),
            "{test}: `{tool}` is not installed; CI must install it (.ci/run)"
        );
        eprintln!("{test}: skipped: `{tool}` is not installed");
    }
    ok
}

/// Run `cmd`; panic with its output when it fails. Returns its standard output.
fn run(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn cimg() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cimg"))
}

/// `cimg pack SRC OUT` then `cimg unpack OUT DIR`; returns DIR.
fn pack_unpack(src: &Path, work: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let img = work.join(format!("{name}.cimg"));
    let dir = work.join(format!("{name}.unpacked"));
    run(cimg()
        .args(["pack", "-q", "--threads", "2"])
        .args(extra)
        .arg(src)
        .arg(&img));
    run(cimg().args(["unpack", "-q"]).arg(&img).arg(&dir));
    dir
}

fn write(p: &Path, data: &[u8]) {
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, data).unwrap();
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

fn chown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap();
}

fn set_mtime(p: &Path, sec: i64, nsec: i64) {
    let t = nix::sys::time::TimeSpec::new(sec, nsec);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        p,
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
}

fn mknod(p: &Path, kind: nix::sys::stat::SFlag, mode: u32, major: u64, minor: u64) {
    nix::sys::stat::mknod(
        p,
        kind,
        nix::sys::stat::Mode::from_bits_truncate(mode),
        nix::sys::stat::makedev(major, minor),
    )
    .unwrap();
}

/// The first layer of the test images: every kind of entry a container layer holds.
fn base_layer(r: &Path) {
    write(&r.join("etc/hosts"), b"127.0.0.1 localhost\n");
    write(&r.join("etc/shadow"), b"root:*:19000:0:99999:7:::\n");
    chmod(&r.join("etc/shadow"), 0o640);
    chown(&r.join("etc/shadow"), 0, 42);
    write(&r.join("etc/to_change"), b"old content\n");
    write(&r.join("etc/to_delete"), b"doomed\n");
    write(&r.join("usr/bin/tool"), &pseudo_data(1, 200_000));
    chmod(&r.join("usr/bin/tool"), 0o755);
    write(&r.join("usr/bin/su"), b"#!/bin/sh\n");
    chown(&r.join("usr/bin/su"), 1000, 1000);
    chmod(&r.join("usr/bin/su"), 0o4755);
    // Hard links: a group of three, one in another directory.
    write(&r.join("usr/bin/busy"), &pseudo_data(2, 50_000));
    chmod(&r.join("usr/bin/busy"), 0o755);
    fs::hard_link(r.join("usr/bin/busy"), r.join("usr/bin/ls")).unwrap();
    fs::create_dir_all(r.join("usr/sbin")).unwrap();
    fs::hard_link(r.join("usr/bin/busy"), r.join("usr/sbin/init")).unwrap();
    fs::hard_link(r.join("usr/bin/busy"), r.join("usr/bin/cat")).unwrap();
    write(&r.join("usr/lib/libx.so.1"), &pseudo_data(3, 1_500_000));
    symlink("libx.so.1", r.join("usr/lib/libx.so")).unwrap();
    symlink("/usr/bin/tool", r.join("usr/lib/abs_link")).unwrap();
    symlink("does/not/exist", r.join("usr/lib/dangling")).unwrap();
    // A target over 100 bytes (PAX linkpath or GNU long link).
    symlink(
        format!("../{}/target", "t".repeat(150)),
        r.join("usr/lib/long_target"),
    )
    .unwrap();
    write(&r.join("usr/share/empty"), b"");
    write(&r.join("usr/share/zeros"), &vec![0u8; 600_000]);
    // Long names (PAX or GNU long-name records) and a name that is not UTF-8.
    let long = r
        .join("usr/share")
        .join("d".repeat(120))
        .join("e".repeat(150));
    write(&long.join("f".repeat(200)), b"deep and long");
    write(
        &r.join("usr/share")
            .join(OsStr::from_bytes(b"latin1-\xe9t\xe9")),
        b"caf\xe9",
    );
    // Modes, owners, a sticky directory.
    fs::create_dir_all(r.join("tmp")).unwrap();
    chmod(&r.join("tmp"), 0o1777);
    fs::create_dir_all(r.join("root")).unwrap();
    chmod(&r.join("root"), 0o700);
    write(&r.join("home/user/.profile"), b"export A=1\n");
    chown(&r.join("home/user/.profile"), 1000, 1000);
    chown(&r.join("home/user"), 1000, 1000);
    // Ids beyond the 7 octal digits of a ustar header (PAX uid/gid, or base-256).
    write(&r.join("home/big/id"), b"big ids");
    chown(&r.join("home/big/id"), 100_000_000, 3_000_000_000);
    // xattrs on a file and a directory.
    xattr::set(r.join("usr/bin/tool"), "user.origin", b"built here").unwrap();
    xattr::set(r.join("home/user"), "user.quota", b"10G").unwrap();
    // Devices and a fifo.
    fs::create_dir_all(r.join("dev")).unwrap();
    mknod(
        &r.join("dev/null"),
        nix::sys::stat::SFlag::S_IFCHR,
        0o666,
        1,
        3,
    );
    mknod(
        &r.join("dev/loop9"),
        nix::sys::stat::SFlag::S_IFBLK,
        0o660,
        7,
        9,
    );
    nix::unistd::mkfifo(
        &r.join("dev/initctl"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    // What later layers delete, replace or make opaque.
    write(&r.join("var/cache/gone/a/b"), &pseudo_data(4, 10_000));
    write(&r.join("var/cache/gone/c"), b"c");
    write(&r.join("var/lib/opq/old1"), b"old1");
    write(&r.join("var/lib/opq/sub/old2"), b"old2");
    write(&r.join("var/lib/becomes_link"), b"a file first");
    fs::create_dir_all(r.join("var/lib/dir_becomes_file/x")).unwrap();
    set_mtime(&r.join("etc/hosts"), 1_600_000_000, 0);
    set_mtime(&r.join("usr/bin/tool"), 1_650_000_000, 0);
}

/// The second layer, as changes to the first's tree (umoci and buildah diff it). With
/// `dir_to_file`, a directory holding a file becomes a file: umoci 0.4.7 then writes the new
/// file and after it a whiteout *under* it (`var/lib/dir_becomes_file/.wh.x`), which
/// `umoci unpack` and `cimg` ignore but podman's storage refuses to apply.
fn second_layer(r: &Path, dir_to_file: bool) {
    fs::remove_dir_all(r.join("var/cache/gone")).unwrap();
    fs::remove_file(r.join("etc/to_delete")).unwrap();
    write(
        &r.join("etc/to_change"),
        b"new content, longer than before\n",
    );
    chmod(&r.join("etc/to_change"), 0o600);
    chown(&r.join("etc/hosts"), 7, 8);
    chmod(&r.join("root"), 0o750);
    // One name of the hard-link group goes, a new one comes (a link to a lower file).
    fs::remove_file(r.join("usr/bin/ls")).unwrap();
    fs::hard_link(r.join("usr/bin/busy"), r.join("usr/bin/sh")).unwrap();
    fs::remove_file(r.join("var/lib/becomes_link")).unwrap();
    symlink("../../etc/hosts", r.join("var/lib/becomes_link")).unwrap();
    if dir_to_file {
        fs::remove_dir_all(r.join("var/lib/dir_becomes_file")).unwrap();
        write(&r.join("var/lib/dir_becomes_file"), b"now a file");
    }
    write(&r.join("opt/app/run"), &pseudo_data(5, 300_000));
    chmod(&r.join("opt/app/run"), 0o750);
    xattr::set(r.join("opt/app/run"), "user.layer", b"2").unwrap();
}

/// A third layer written by GNU tar with whiteouts: `var/lib/opq` made opaque (and given a new
/// file), `usr/sbin/init` (a hard link whose other names stay) and `usr/lib/libx.so` removed;
/// and `usr/bin/sh2`, a hard link to `usr/bin/busy` of the first layer (the target's member is
/// deleted from the archive with `tar --delete`, as a layer holding only the new name).
fn third_layer_tar(work: &Path) -> PathBuf {
    let s = work.join("layer3");
    write(&s.join("var/lib/opq/.wh..wh..opq"), b"");
    write(&s.join("var/lib/opq/fresh"), b"fresh");
    write(&s.join("usr/sbin/.wh.init"), b"");
    write(&s.join("usr/lib/.wh.libx.so"), b"");
    let tar = work.join("layer3.tar");
    let gnu_tar = || {
        let mut c = Command::new("tar");
        c.args(["--numeric-owner", "--owner=0", "--group=0", "-C"]);
        c
    };
    run(gnu_tar().arg(&s).arg("-cf").arg(&tar).arg("."));
    let h = work.join("layer3-links");
    write(&h.join("usr/bin/busy"), b"not this content");
    fs::hard_link(h.join("usr/bin/busy"), h.join("usr/bin/sh2")).unwrap();
    run(gnu_tar()
        .arg(&h)
        .arg("-rf")
        .arg(&tar)
        .args(["./usr/bin/busy", "./usr/bin/sh2"]));
    run(Command::new("tar")
        .args(["--delete", "-f"])
        .arg(&tar)
        .arg("./usr/bin/busy"));
    tar
}

/// Build a three-layer OCI layout `DIR/img:t` with umoci (layers 1, 2 by `umoci repack`, layer
/// 3 by `umoci raw add-layer`) and a config; `DIR/img:t2` is the image after layer 2. Returns
/// the layout. `dir_to_file`: see [`second_layer`].
fn umoci_image(work: &Path, dir_to_file: bool) -> PathBuf {
    let img = work.join("img");
    let tagged = format!("{}:t", img.display());
    run(Command::new("umoci").args(["init", "--layout"]).arg(&img));
    run(Command::new("umoci").args(["new", "--image", &tagged]));
    let b1 = work.join("b1");
    run(Command::new("umoci")
        .args(["unpack", "--image", &tagged])
        .arg(&b1));
    base_layer(&b1.join("rootfs"));
    run(Command::new("umoci")
        .args(["repack", "--image", &tagged])
        .arg(&b1));
    let b2 = work.join("b2");
    run(Command::new("umoci")
        .args(["unpack", "--image", &tagged])
        .arg(&b2));
    second_layer(&b2.join("rootfs"), dir_to_file);
    run(Command::new("umoci")
        .args(["repack", "--image", &tagged])
        .arg(&b2));
    run(Command::new("umoci").args(["tag", "--image", &tagged, "t2"]));
    let l3 = third_layer_tar(work);
    run(Command::new("umoci")
        .args(["raw", "add-layer", "--image", &tagged])
        .arg(&l3));
    run(Command::new("umoci").args([
        "config",
        "--image",
        &tagged,
        "--config.env",
        "FOO=bar",
        "--config.workingdir",
        "/opt/app",
        "--config.entrypoint",
        "/opt/app/run",
        "--config.user",
        "1000:1000",
    ]));
    img
}

/// `umoci unpack` of `layout:tag`: the tree umoci says the image holds.
fn umoci_rootfs(layout: &Path, tag: &str, work: &Path, name: &str) -> PathBuf {
    let b = work.join(name);
    run(Command::new("umoci")
        .args(["unpack", "--image", &format!("{}:{tag}", layout.display())])
        .arg(&b));
    b.join("rootfs")
}

/// The number of layers in the manifest of image `tag` (or the only image) of an OCI layout
/// directory.
fn layer_count(layout: &Path, tag: Option<&str>) -> usize {
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let all = index["manifests"].as_array().unwrap();
    let desc = match tag {
        Some(t) => all
            .iter()
            .find(|d| d["annotations"]["org.opencontainers.image.ref.name"] == t)
            .unwrap(),
        None => {
            assert_eq!(all.len(), 1);
            &all[0]
        }
    };
    let d = desc["digest"].as_str().unwrap();
    let m: serde_json::Value = serde_json::from_slice(
        &fs::read(
            layout
                .join("blobs/sha256")
                .join(d.strip_prefix("sha256:").unwrap()),
        )
        .unwrap(),
    )
    .unwrap();
    m["layers"].as_array().unwrap().len()
}

/// What a reference tree made from [`base_layer`] (and [`second_layer`]) must hold, so that
/// comparing with it tests owners, modes, xattrs, devices and hard links: `what` names the
/// properties the tool keeps.
fn check_reference(r: &Path, links: &[&str], owners: &[(&str, u32, u32)], xattrs: bool) {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let md = |p: &str| fs::symlink_metadata(r.join(p)).unwrap();
    let busy = md("usr/bin/busy");
    for l in links {
        assert_eq!(busy.ino(), md(l).ino(), "{l}: hard link lost by the tool");
    }
    let null = md("dev/null");
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), nix::sys::stat::makedev(1, 3));
    assert!(md("dev/initctl").file_type().is_fifo());
    assert_eq!(md("usr/bin/su").mode() & 0o7777, 0o4755);
    assert_eq!(md("tmp").mode() & 0o7777, 0o1777);
    assert_eq!(
        fs::read_link(r.join("usr/lib/abs_link")).unwrap(),
        Path::new("/usr/bin/tool")
    );
    for &(p, uid, gid) in owners {
        assert_eq!((md(p).uid(), md(p).gid()), (uid, gid), "owner of {p}");
    }
    if xattrs {
        assert_eq!(
            xattr::get(r.join("usr/bin/tool"), "user.origin").unwrap(),
            Some(b"built here".to_vec())
        );
    }
}

fn o(s: &str) -> &OsStr {
    OsStr::new(s)
}

fn info(img: &Path) -> String {
    run(cimg().arg("info").arg(img))
}

/// umoci's three-layer image, as an OCI layout directory, and converted by skopeo to an
/// `oci-archive:`, a `docker-archive:` and a layout with zstd layers: each imports to exactly
/// the tree `umoci unpack` gives, and the config is kept.
#[test]
fn umoci_and_skopeo_images_equal_umoci_unpack() {
    let t = "umoci_and_skopeo_images_equal_umoci_unpack";
    if !have("umoci", "--version", t) || !have("tar", "--version", t) || !require_root(t) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let w = d.path();
    let img = umoci_image(w, true);
    assert_eq!(layer_count(&img, Some("t")), 3);
    assert_eq!(layer_count(&img, Some("t2")), 2);
    let want = umoci_rootfs(&img, "t", w, "ref");
    check_reference(
        &want,
        &["usr/bin/cat", "usr/bin/sh2"],
        &[
            ("etc/shadow", 0, 42),
            ("usr/bin/su", 1000, 1000),
            ("home/big/id", 100_000_000, 3_000_000_000),
            ("etc/hosts", 7, 8),
        ],
        true,
    );
    // The reference really holds what the layers say, so the comparison means something.
    assert!(!want.join("var/cache/gone").exists());
    assert!(!want.join("var/lib/opq/old1").exists());
    assert_eq!(fs::read(want.join("var/lib/opq/fresh")).unwrap(), b"fresh");
    assert!(want.join("usr/bin/sh").exists() && !want.join("usr/sbin/init").exists());
    assert!(want.join("var/lib/dir_becomes_file").is_file());
    assert_eq!(
        fs::read_link(want.join("var/lib/becomes_link")).unwrap(),
        Path::new("../../etc/hosts")
    );

    // The layout holds two images: --ref chooses.
    let out = cimg()
        .args(["pack", "-q"])
        .arg(&img)
        .arg(w.join("which.cimg"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--ref") && err.contains("t2"),
        "{err}"
    );
    let got = pack_unpack(&img, w, "oci-dir", &["--ref", "t"]);
    assert_same_tree(&want, &got);
    let i = info(&w.join("oci-dir.cimg"));
    for needle in ["FOO=bar", "/opt/app", "/opt/app/run", "1000:1000"] {
        assert!(i.contains(needle), "cimg info lacks {needle}:\n{i}");
    }
    let want2 = umoci_rootfs(&img, "t2", w, "ref2");
    assert!(want2.join("var/lib/opq/old1").exists());
    let got = pack_unpack(&img, w, "oci-dir-t2", &["--ref", "t2"]);
    assert_same_tree(&want2, &got);

    if !have("skopeo", "--version", t) {
        return;
    }
    let src = format!("oci:{}:t", img.display());
    let copies = [
        (
            "oci-archive",
            format!("oci-archive:{}/oa.tar:t", w.display()),
        ),
        (
            "docker-archive",
            format!("docker-archive:{}/da.tar:t:latest", w.display()),
        ),
    ];
    for (name, dest) in &copies {
        run(Command::new("skopeo").args(["--insecure-policy", "copy", "-q", &src, dest]));
        let file = w.join(if *name == "oci-archive" {
            "oa.tar"
        } else {
            "da.tar"
        });
        let got = pack_unpack(&file, w, name, &[]);
        assert_same_tree(&want, &got);
        assert!(info(&w.join(format!("{name}.cimg"))).contains("FOO=bar"));
    }
    // zstd-compressed layers.
    let zst = w.join("zst");
    run(Command::new("skopeo").args([
        "--insecure-policy",
        "copy",
        "-q",
        "--dest-compress-format",
        "zstd",
        &src,
        &format!("oci:{}:t", zst.display()),
    ]));
    let index = fs::read_to_string(zst.join("index.json")).unwrap();
    let mdigest = index.split("sha256:").nth(1).unwrap().get(..64).unwrap();
    let manifest = fs::read_to_string(zst.join("blobs/sha256").join(mdigest)).unwrap();
    assert!(manifest.contains("tar+zstd"), "{manifest}");
    let got = pack_unpack(&zst, w, "oci-zstd", &[]);
    assert_same_tree(&want, &got);
}

/// buildah from scratch with the vfs driver: a base image made by `buildah copy`, a second
/// layer made by editing the mounted container (deletions become whiteouts), committed as
/// `oci:`, `oci-archive:` and `docker-archive:`.
#[test]
fn buildah_images_equal_umoci_unpack() {
    let t = "buildah_images_equal_umoci_unpack";
    if !have("buildah", "--version", t) || !have("umoci", "--version", t) || !require_root(t) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let w = d.path();
    let src = w.join("src");
    base_layer(&src);
    let bh = |args: &[&OsStr]| {
        run(Command::new("buildah")
            .arg("--root")
            .arg(w.join("storage"))
            .arg("--runroot")
            .arg(w.join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args))
        .trim()
        .to_string()
    };
    let c = bh(&[o("from"), o("scratch")]);
    bh(&[o("copy"), o(&c), src.as_os_str(), o("/")]);
    bh(&[o("commit"), o("-q"), o(&c), o("base")]);
    let c2 = bh(&[o("from"), o("base")]);
    let mnt = PathBuf::from(bh(&[o("mount"), o(&c2)]));
    second_layer(&mnt, true);
    bh(&[
        o("config"),
        o("--env"),
        o("FOO=bar"),
        o("--workingdir"),
        o("/opt/app"),
        o(&c2),
    ]);
    let dests = [
        ("oci", format!("oci:{}/lay:t", w.display()), w.join("lay")),
        (
            "oci-archive",
            format!("oci-archive:{}/oa.tar:t", w.display()),
            w.join("oa.tar"),
        ),
        (
            "docker-archive",
            format!("docker-archive:{}/da.tar:t:latest", w.display()),
            w.join("da.tar"),
        ),
    ];
    for (_, dest, _) in &dests {
        bh(&[o("commit"), o("-q"), o(&c2), o(dest)]);
    }
    assert_eq!(layer_count(&w.join("lay"), None), 2);
    let want = umoci_rootfs(&w.join("lay"), "t", w, "ref");
    // `buildah copy` makes everything root's; the second layer's chown stays.
    check_reference(&want, &["usr/bin/cat"], &[("etc/hosts", 7, 8)], true);
    assert!(!want.join("var/cache/gone").exists());
    assert!(!want.join("etc/to_delete").exists());
    assert!(want.join("opt/app/run").exists());
    for (name, _, file) in &dests {
        let got = pack_unpack(file, w, name, &[]);
        assert_same_tree(&want, &got);
        assert!(info(&w.join(format!("{name}.cimg"))).contains("FOO=bar"));
    }
}

/// `buildah manifest push --all` writes an OCI layout whose index points to an image index
/// (a manifest list) of two platforms: `--platform` chooses, a missing one is refused with
/// the platforms the list has.
#[test]
fn buildah_manifest_list_by_platform() {
    let t = "buildah_manifest_list_by_platform";
    if !have("buildah", "--version", t) || !require_root(t) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let w = d.path();
    let bh = |args: &[&OsStr]| {
        run(Command::new("buildah")
            .arg("--root")
            .arg(w.join("storage"))
            .arg("--runroot")
            .arg(w.join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args))
        .trim()
        .to_string()
    };
    bh(&[o("manifest"), o("create"), o("list")]);
    for arch in ["amd64", "arm64"] {
        let src = w.join(arch);
        write(&src.join("which"), arch.as_bytes());
        write(
            &src.join("lib/data"),
            &pseudo_data(arch.len() as u64, 300_000),
        );
        let c = bh(&[o("from"), o("scratch")]);
        bh(&[o("copy"), o(&c), src.as_os_str(), o("/")]);
        bh(&[o("config"), o("--arch"), o(arch), o(&c)]);
        bh(&[o("commit"), o("-q"), o(&c), o(&format!("img-{arch}"))]);
        bh(&[
            o("manifest"),
            o("add"),
            o("--arch"),
            o(arch),
            o("list"),
            o(&format!("containers-storage:localhost/img-{arch}")),
        ]);
    }
    let lay = w.join("lay");
    bh(&[
        o("manifest"),
        o("push"),
        o("-q"),
        o("--all"),
        o("list"),
        o(&format!("oci:{}:multi", lay.display())),
    ]);
    let index = fs::read_to_string(lay.join("index.json")).unwrap();
    assert!(index.contains("image.index"), "{index}");
    for arch in ["amd64", "arm64"] {
        let got = pack_unpack(&lay, w, arch, &["--platform", &format!("linux/{arch}")]);
        assert_eq!(fs::read(got.join("which")).unwrap(), arch.as_bytes());
        assert_eq!(
            fs::read(got.join("lib/data")).unwrap(),
            fs::read(w.join(arch).join("lib/data")).unwrap()
        );
    }
    let out = cimg()
        .args(["pack", "-q", "--platform", "linux/ppc64le"])
        .arg(&lay)
        .arg(w.join("ppc.cimg"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("no image for platform linux/ppc64le")
            && err.contains("linux/amd64, linux/arm64"),
        "{err}"
    );
    assert!(!w.join("ppc.cimg").exists());
}

/// podman (vfs storage) pulls umoci's two images from the OCI layout and saves them: both in
/// one `docker-archive` (`save -m`, chosen with `--ref`), and one as `oci-archive` and
/// `oci-dir`.
#[test]
fn podman_saved_images_equal_umoci_unpack() {
    let t = "podman_saved_images_equal_umoci_unpack";
    if !have("podman", "--version", t)
        || !have("umoci", "--version", t)
        || !have("tar", "--version", t)
        || !require_root(t)
    {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let w = d.path();
    let img = umoci_image(w, false);
    assert_eq!(img, w.join("img"));
    let pm = |args: &[&OsStr]| {
        // In `w`: `pull oci:img:TAG` names the image after the path, which must be lowercase.
        run(Command::new("podman")
            .current_dir(w)
            .arg("--root")
            .arg(w.join("storage"))
            .arg("--runroot")
            .arg(w.join("run"))
            .args([
                "--storage-driver",
                "vfs",
                "--events-backend",
                "none",
                "--cgroup-manager",
                "cgroupfs",
            ])
            .args(args))
        .trim()
        .to_string()
    };
    for (tag, name) in [
        ("t", "localhost/one:latest"),
        ("t2", "localhost/two:latest"),
    ] {
        let id = pm(&[o("pull"), o("-q"), o(&format!("oci:img:{tag}"))]);
        pm(&[o("tag"), o(&id), o(name)]);
    }
    let multi = w.join("multi.tar");
    pm(&[
        o("save"),
        o("-q"),
        o("-m"),
        o("--format"),
        o("docker-archive"),
        o("-o"),
        multi.as_os_str(),
        o("localhost/one:latest"),
        o("localhost/two:latest"),
    ]);
    let one = umoci_rootfs(&img, "t", w, "ref");
    let two = umoci_rootfs(&img, "t2", w, "ref2");
    let got = pack_unpack(&multi, w, "multi-one", &["--ref", "localhost/one:latest"]);
    assert_same_tree(&one, &got);
    assert!(info(&w.join("multi-one.cimg")).contains("FOO=bar"));
    let got = pack_unpack(&multi, w, "multi-two", &["--ref", "localhost/two"]);
    assert_same_tree(&two, &got);
    for (format, file) in [("oci-archive", "po.tar"), ("oci-dir", "pod")] {
        let out = w.join(file);
        pm(&[
            o("save"),
            o("-q"),
            o("--format"),
            o(format),
            o("-o"),
            out.as_os_str(),
            o("localhost/one:latest"),
        ]);
        let got = pack_unpack(&out, w, format, &[]);
        assert_same_tree(&one, &got);
    }
}

/// A tree for the tar and SquashFS tests: the base layer without its parts that need root
/// when not root, plus a sparse file.
fn plain_tree(root: &Path, as_root: bool) {
    if as_root {
        base_layer(root);
    } else {
        write(&root.join("etc/hosts"), b"127.0.0.1 localhost\n");
        write(&root.join("usr/bin/tool"), &pseudo_data(1, 200_000));
        chmod(&root.join("usr/bin/tool"), 0o4755);
        write(&root.join("usr/bin/busy"), &pseudo_data(2, 50_000));
        fs::hard_link(root.join("usr/bin/busy"), root.join("usr/bin/ls")).unwrap();
        symlink("busy", root.join("usr/bin/sh")).unwrap();
        let long = root.join("d".repeat(120)).join("e".repeat(150));
        write(&long.join("f".repeat(200)), b"deep and long");
        xattr::set(root.join("usr/bin/tool"), "user.origin", b"here").unwrap();
        nix::unistd::mkfifo(
            &root.join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
    }
    let f = fs::File::create(root.join("sparse")).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&pseudo_data(9, 5000), 0).unwrap();
    f.write_all_at(b"tail", 20 << 20).unwrap();
    set_mtime(&root.join("sparse"), 1_700_000_000, 123_456_789);
    set_mtime(&root.join("etc"), 1_700_000_001, 5);
}

/// GNU tar archives (gnu and posix formats; gzip, zstd, xz, none; sparse files in the old
/// GNU format and in the three PAX formats) import to exactly what `tar -x` extracts.
#[test]
fn gnu_tar_archives_equal_tar_extract() {
    let t = "gnu_tar_archives_equal_tar_extract";
    if !have("tar", "--version", t) {
        return;
    }
    let as_root = nix::unistd::geteuid().is_root();
    let d = tempfile::tempdir().unwrap();
    let w = d.path();
    let src = w.join("src");
    fs::create_dir(&src).unwrap();
    plain_tree(&src, as_root);
    let cases: [(&str, &str, &[&str]); 7] = [
        ("gnu-gz", "gnu", &["-z", "--sparse"]),
        ("posix-zst", "posix", &["--zstd"]),
        ("gnu-xz", "gnu", &["-J", "--sparse"]),
        ("posix-plain", "posix", &[]),
        // Sparse files in PAX records, in GNU tar's three versions.
        (
            "posix-sparse-1.0",
            "posix",
            &["--sparse", "--sparse-version=1.0"],
        ),
        (
            "posix-sparse-0.1-gz",
            "posix",
            &["-z", "--sparse", "--sparse-version=0.1"],
        ),
        (
            "posix-sparse-0.0",
            "posix",
            &["--sparse", "--sparse-version=0.0"],
        ),
    ];
    for (name, format, flags) in cases {
        if flags.contains(&"--zstd") && !have("zstd", "--version", t) {
            continue;
        }
        let ar = w.join(format!("{name}.tar"));
        let mut c = Command::new("tar");
        if format == "posix" {
            // GNU tar stores xattrs only in PAX records.
            c.args(["--xattrs", "--xattrs-include=*"]);
        }
        run(c
            .arg("--numeric-owner")
            .arg(format!("--format={format}"))
            .args(flags)
            .arg("-C")
            .arg(&src)
            .arg("-cf")
            .arg(&ar)
            .arg("."));
        if name.starts_with("posix-sparse") && !name.ends_with("gz") {
            // The sparse file really went in as PAX sparse records.
            let data = fs::read(&ar).unwrap();
            assert!(data.windows(11).any(|x| x == b"GNU.sparse."), "{name}");
        }
        let want = w.join(format!("{name}.ref"));
        fs::create_dir(&want).unwrap();
        let mut x = Command::new("tar");
        x.args(["--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf"])
            .arg(&ar)
            .arg("-C")
            .arg(&want);
        if as_root {
            x.arg("--same-owner");
        }
        run(&mut x);
        if as_root {
            check_reference(
                &want,
                &["usr/bin/ls", "usr/bin/cat", "usr/sbin/init"],
                &[
                    ("etc/shadow", 0, 42),
                    ("usr/bin/su", 1000, 1000),
                    ("home/big/id", 100_000_000, 3_000_000_000),
                ],
                format == "posix",
            );
        }
        let got = pack_unpack(&ar, w, name, &[]);
        assert_same_tree(&want, &got);
    }
}

/// Compare what `cimg` made of a SquashFS image with `unsquashfs`'s extraction, in all but what
/// the `backhand` reader does not expose (documented in `import::sqfs`): xattrs, hard links
/// (each name of a group is its own inode in the import, with the group's content).
fn assert_same_sqfs_tree(want: &Path, got: &Path) {
    let (sw, groups): Snapshot = snapshot(want, true);
    let (sg, _) = snapshot(got, true);
    assert_eq!(
        sw.keys().collect::<Vec<_>>(),
        sg.keys().collect::<Vec<_>>(),
        "names differ"
    );
    for (k, ew) in &sw {
        let eg = &sg[k];
        let name = String::from_utf8_lossy(k);
        assert_eq!(
            (ew.mode, ew.uid, ew.gid, ew.mtime, ew.size, ew.rdev),
            (eg.mode, eg.uid, eg.gid, eg.mtime, eg.size, eg.rdev),
            "{name}: mode, owner, mtime, size or rdev differ"
        );
        assert_eq!(ew.content, eg.content, "{name}: content differs");
        assert_eq!(ew.target, eg.target, "{name}: symlink target differs");
    }
    for g in groups {
        let c: Vec<_> = g.iter().map(|k| sg[k].content).collect();
        assert!(c.windows(2).all(|p| p[0] == p[1]), "{g:?}");
    }
}

/// `mksquashfs` images (zstd, gzip with xattrs; lz4 without) import to what `unsquashfs`
/// extracts.
#[test]
fn mksquashfs_images_equal_unsquashfs() {
    let t = "mksquashfs_images_equal_unsquashfs";
    if !have("mksquashfs", "-version", t) || !have("unsquashfs", "-version", t) {
        return;
    }
    let as_root = nix::unistd::geteuid().is_root();
    let d = tempfile::tempdir().unwrap();
    let w = d.path();
    let src = w.join("src");
    fs::create_dir(&src).unwrap();
    plain_tree(&src, as_root);
    for (comp, extra) in [
        ("zstd", &[][..]),
        ("gzip", &["-b", "64K"][..]),
        ("lz4", &["-no-xattrs"][..]),
    ] {
        let sq = w.join(format!("{comp}.sqfs"));
        run(Command::new("mksquashfs")
            .arg(&src)
            .arg(&sq)
            .args(["-noappend", "-quiet", "-no-progress", "-comp", comp])
            .args(extra));
        let want = w.join(format!("{comp}.ref"));
        run(Command::new("unsquashfs")
            .args(["-q", "-n", "-d"])
            .arg(&want)
            .arg(&sq));
        if as_root {
            check_reference(
                &want,
                &["usr/bin/ls", "usr/bin/cat", "usr/sbin/init"],
                &[
                    ("etc/shadow", 0, 42),
                    ("usr/bin/su", 1000, 1000),
                    ("home/big/id", 100_000_000, 3_000_000_000),
                ],
                comp != "lz4",
            );
        }
        let got = pack_unpack(&sq, w, comp, &[]);
        assert_same_sqfs_tree(&want, &got);
    }
}
