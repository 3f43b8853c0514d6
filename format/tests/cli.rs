//! The `cimg` binary end to end: every subcommand on a real tree, and the one-line errors and
//! exit codes for bad input (missing files, non-images, corrupt blocks, refused unpacks).

mod common;

use std::path::Path;
use std::process::{Command, Output};

fn cimg(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cimg"));
    for a in args {
        c.arg(a);
    }
    c.output().expect("run cimg")
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "cimg failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Failure with exactly one line on stderr starting `cimg: `, containing `needle`.
fn fails_with(o: &Output, needle: &str) {
    assert!(!o.status.success(), "cimg succeeded unexpectedly");
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "one line expected, got: {err}");
    assert!(err.starts_with("cimg: "), "{err}");
    assert!(err.contains(needle), "{err:?} lacks {needle:?}");
}

fn packed(src: &Path, dir: &Path) -> std::path::PathBuf {
    let img = dir.join("t.cimg");
    ok(&cimg(&[&"pack", &src, &img, &"-q", &"--block-size", &"4K"]));
    img
}

#[test]
fn every_subcommand_works() {
    let root = common::require_root("cli");
    let src = tempfile::tempdir().unwrap();
    common::make_rich_tree(src.path(), root);
    let work = tempfile::tempdir().unwrap();
    let img = packed(src.path(), work.path());

    let ls = ok(&cimg(&[&"ls", &img]));
    assert!(ls.lines().any(|l| l == "small.txt"), "{ls}");
    let ls_l = ok(&cimg(&[&"ls", &img, &"/", &"-l"]));
    assert!(
        ls_l.lines()
            .any(|l| l.starts_with("lrwxrwxrwx") && l.ends_with("link_rel -> small.txt")),
        "{ls_l}"
    );
    assert!(
        ls_l.lines()
            .any(|l| l.starts_with("-rwsr-xr-x") && l.ends_with(" setuid")),
        "{ls_l}"
    );
    assert!(
        ls_l.lines()
            .any(|l| l.starts_with("drwxrwxrwt") && l.ends_with(" sticky")),
        "{ls_l}"
    );
    let one = ok(&cimg(&[&"ls", &img, &"a/b/c/deep.txt", &"-l"]));
    assert!(one.contains(" 1000 "), "{one}");
    let rec = ok(&cimg(&[&"ls", &img, &"a", &"-R"]));
    assert!(rec.lines().any(|l| l == "a/b/c/deep.txt"), "{rec}");

    let cat = cimg(&[&"cat", &img, &"multi.bin"]);
    assert!(cat.status.success());
    assert_eq!(
        cat.stdout,
        std::fs::read(src.path().join("multi.bin")).unwrap()
    );
    let cat = cimg(&[&"cat", &img, &"sparse"]);
    assert_eq!(
        cat.stdout,
        std::fs::read(src.path().join("sparse")).unwrap()
    );

    let info = ok(&cimg(&[&"info", &img, &"--json"]));
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["block_size"], 4096);
    assert_eq!(v["version"], "1.0");
    assert!(v["dedup_saved"].as_u64().unwrap() >= 200_000);
    assert_eq!(
        v["image_size"].as_u64().unwrap(),
        std::fs::metadata(&img).unwrap().len()
    );
    assert!(v["counts"]["symlinks"].as_u64().unwrap() >= 4);
    let human = ok(&cimg(&[&"info", &img]));
    assert!(
        human.contains("ratio") && human.contains("digest"),
        "{human}"
    );

    let verify = ok(&cimg(&[&"verify", &img]));
    assert!(verify.contains("ok"), "{verify}");

    let out = work.path().join("out");
    ok(&cimg(&[&"unpack", &img, &out, &"-q"]));
    common::assert_same_tree(src.path(), &out);
}

#[test]
fn bad_input_gives_one_line_and_nonzero_exit() {
    let work = tempfile::tempdir().unwrap();
    let missing = work.path().join("missing.cimg");
    fails_with(&cimg(&[&"info", &missing]), "missing.cimg");
    fails_with(
        &cimg(&[
            &"pack",
            &work.path().join("nodir"),
            &work.path().join("x.cimg"),
        ]),
        "nodir",
    );
    let text = work.path().join("text.cimg");
    std::fs::write(&text, vec![b'x'; 10_000]).unwrap();
    fails_with(&cimg(&[&"ls", &text]), "not a cimg image");
    let tiny = work.path().join("tiny.cimg");
    std::fs::write(&tiny, b"\x89CIMG").unwrap();
    fails_with(&cimg(&[&"verify", &tiny]), "too small");

    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("f"), b"data").unwrap();
    let img = packed(src.path(), work.path());
    fails_with(&cimg(&[&"cat", &img, &"nope"]), "nope");
    fails_with(&cimg(&[&"cat", &img, &"/"]), "not a regular file");
    // Unpack refuses a non-empty directory and a file.
    let full = work.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("keep"), b"mine").unwrap();
    fails_with(&cimg(&[&"unpack", &img, &full]), "not empty");
    assert_eq!(std::fs::read(full.join("keep")).unwrap(), b"mine");
    fails_with(&cimg(&[&"unpack", &img, &img]), "not a directory");
    // Truncated image.
    let bytes = std::fs::read(&img).unwrap();
    let trunc = work.path().join("trunc.cimg");
    std::fs::write(&trunc, &bytes[..bytes.len() - 10]).unwrap();
    fails_with(&cimg(&[&"info", &trunc]), "truncated");
    // Bad options: clap's usage error, exit 2.
    let o = cimg(&[
        &"pack",
        &src.path(),
        &work.path().join("y.cimg"),
        &"--block-size",
        &"3000",
    ]);
    assert!(!o.status.success());
    assert!(!work.path().join("y.cimg").exists());
    let o = cimg(&[&"frobnicate"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn corrupt_block_is_named_by_verify_and_cat() {
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("victim"), common::pseudo_data(1, 20_000)).unwrap();
    std::fs::write(src.path().join("bystander"), common::pseudo_data(2, 20_000)).unwrap();
    let work = tempfile::tempdir().unwrap();
    let img = packed(src.path(), work.path());
    let image = cimg_format::Image::open(&img).unwrap();
    let ino = image.resolve(b"victim").unwrap();
    let block = image.extents(ino).unwrap().find_map(|e| e.block).unwrap();
    let (off, len, _) = image.block_info(block).unwrap();
    drop(image);
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[(off + len as u64 / 2) as usize] ^= 0x40;
    std::fs::write(&img, &bytes).unwrap();

    let o = cimg(&[&"verify", &img]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("block {block} ")) && err.contains("checksum mismatch"),
        "{err}"
    );
    assert!(err.contains("victim"), "verify names the file: {err}");
    assert!(err.lines().all(|l| l.starts_with("cimg: ")), "{err}");

    fails_with(
        &cimg(&[&"cat", &img, &"victim"]),
        &format!("block {block} "),
    );
    let by = cimg(&[&"cat", &img, &"bystander"]);
    assert!(by.status.success());
    assert_eq!(by.stdout, common::pseudo_data(2, 20_000));
}

#[test]
fn closed_stdout_is_not_an_error() {
    let src = tempfile::tempdir().unwrap();
    for i in 0..5000 {
        std::fs::write(
            src.path().join(format!("file-with-a-long-name-{i:05}")),
            b"",
        )
        .unwrap();
    }
    std::fs::write(src.path().join("big"), common::pseudo_data(3, 1 << 20)).unwrap();
    let work = tempfile::tempdir().unwrap();
    let img = packed(src.path(), work.path());
    let img_s = img.display().to_string();
    let cases: [&[&str]; 5] = [
        &["ls", &img_s, "/", "-R"],
        &["ls", &img_s, "/", "-l"],
        &["cat", &img_s, "big"],
        &["info", &img_s],
        &["verify", &img_s],
    ];
    for args in cases {
        let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
        // `true` exits at once, so cimg writes into a pipe nobody reads.
        let cmd = format!(
            "'{}' {} | true",
            env!("CARGO_BIN_EXE_cimg"),
            quoted.join(" ")
        );
        let o = Command::new("bash")
            .args(["-o", "pipefail", "-c", &cmd])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            o.status.success() && err.is_empty(),
            "{cmd}: {:?} {err}",
            o.status
        );
    }
}
