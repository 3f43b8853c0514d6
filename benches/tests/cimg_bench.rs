//! End-to-end tests of the `cimg-bench` binary on small generated trees: the JSON has every metric
//! for every reader count with plausible values, the tree is left untouched, read metrics are
//! skipped (with a reason) when there is no big file, `--compare` plots several runs in one SVG,
//! and errors are one line with a non-zero exit status.

use cimg_benches::Prng;
use serde_json::Value;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_cimg-bench");

/// Makes a tree of 3 directories with 10 small files each, a symlink and, if `big`, two files of
/// 2 MiB and 1.5 MiB of random bytes. Returns the number of regular files.
fn make_tree(root: &Path, big: bool) -> u64 {
    let mut rng = Prng::new(42);
    let mut files = 0;
    for d in ["a", "b", "a/c"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
        for k in 0..10 {
            let mut buf = vec![0u8; rng.range(10, 5000) as usize];
            rng.fill(&mut buf);
            std::fs::write(root.join(d).join(format!("f{k}")), buf).unwrap();
            files += 1;
        }
    }
    std::os::unix::fs::symlink("a/f0", root.join("link")).unwrap();
    if big {
        for (name, size) in [("big1", 2 << 20), ("a/big2", 3 << 19)] {
            let mut buf = vec![0u8; size];
            rng.fill(&mut buf);
            std::fs::write(root.join(name), buf).unwrap();
            files += 1;
        }
    }
    files
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Every path, size and mtime under `root`: the tree as a reader must leave it.
fn snapshot(root: &Path) -> Vec<(PathBuf, u64, i64)> {
    let mut v = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                stack.push(p.clone());
            }
            v.push((p, m.len(), m.mtime()));
        }
    }
    v.sort();
    v
}

fn assert_one_line_error(out: &Output, code: i32, starts: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "not one line: {err:?}");
    assert!(
        err.starts_with(starts),
        "{err:?} does not start with {starts:?}"
    );
    assert!(out.stdout.is_empty(), "stdout: {:?}", out.stdout);
}

#[test]
fn json_has_every_metric_for_each_reader_count() {
    let d = tempfile::tempdir().unwrap();
    let tree = d.path().join("tree");
    let files = make_tree(&tree, true);
    let before = snapshot(&tree);
    let (json, svg) = (d.path().join("r.json"), d.path().join("r.svg"));
    let out = run(&[
        s(&tree),
        "--duration",
        "0.1",
        "--readers",
        "1,2",
        "--min-file-size",
        "1M",
        "--block-size",
        "64K",
        "--json",
        s(&json),
        "--plot",
        s(&svg),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(snapshot(&tree), before, "cimg-bench changed the tree");

    let j = read_json(&json);
    assert_eq!(j["tool"], "cimg-bench");
    assert_eq!(j["cache"], "warm");
    assert_eq!(j["readers"], serde_json::json!([1, 2]));
    assert_eq!(j["block_size"], 65536);
    assert_eq!(j["tree"]["files"], files);
    assert_eq!(j["tree"]["dirs"], 4);
    assert_eq!(j["tree"]["other"], 1);
    let big = j["big_files"].as_array().unwrap();
    assert_eq!(big.len(), 2);
    assert_eq!(big[0]["size"], 2 << 20);
    assert!(big[0]["path"].as_str().unwrap().ends_with("big1"));
    assert!(j["command"].as_str().unwrap().contains("--readers 1,2"));

    let metrics = j["metrics"].as_array().unwrap();
    let names: Vec<&str> = metrics
        .iter()
        .map(|m| m["metric"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "seq_read",
            "rand_read",
            "rand_4k_iops",
            "stat",
            "open",
            "readdir"
        ]
    );
    for m in metrics {
        let name = m["metric"].as_str().unwrap();
        assert!(m.get("skipped").is_none(), "{name} skipped: {m}");
        let points = m["points"].as_array().unwrap();
        assert_eq!(points.len(), 2, "{name}");
        for (p, readers) in points.iter().zip([1u64, 2]) {
            assert_eq!(p["readers"], readers, "{name}");
            let (value, ops, bytes, secs) = (
                p["value"].as_f64().unwrap(),
                p["ops"].as_u64().unwrap(),
                p["bytes"].as_u64().unwrap(),
                p["secs"].as_f64().unwrap(),
            );
            assert!(
                (0.1..5.0).contains(&secs),
                "{name}/{readers}: {secs} s for 0.1 s"
            );
            assert!(ops >= readers, "{name}/{readers}: {ops} ops");
            assert_eq!(p["errors"], 0, "{name}/{readers}");
            assert!(p["latency_us"].as_f64().unwrap() > 0.0);
            // The value is what the counts say, and not absurd for a local tempdir.
            let (expect, max) = match name {
                "seq_read" | "rand_read" => (bytes as f64 / secs / 1e6, 1e6),
                _ => (ops as f64 / secs, 1e9),
            };
            assert!(
                (value - expect).abs() <= 1e-6 * expect,
                "{name}: {value} vs {expect}"
            );
            assert!(value > 0.0 && value < max, "{name}/{readers}: {value}");
            match name {
                "seq_read" | "rand_read" => assert_eq!(bytes % 65536, 0, "{name}: whole blocks"),
                "rand_4k_iops" => assert_eq!(bytes, ops * 4096),
                _ => {}
            }
        }
    }

    // The terminal table: a header with the reader counts and a row per metric.
    assert!(stdout.contains("1 reader"), "{stdout}");
    for title in [
        "sequential read (64 KiB reads)",
        "random read (64 KiB reads)",
        "random 4 KiB read",
        "stat (lstat)",
        "open + close",
        "readdir",
    ] {
        assert!(stdout.contains(title), "no {title:?} in {stdout}");
    }
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains(s(&tree)), "the legend names the run");
}

#[test]
fn without_a_big_file_the_read_metrics_are_skipped() {
    let d = tempfile::tempdir().unwrap();
    let tree = d.path().join("tree");
    make_tree(&tree, false);
    let json = d.path().join("r.json");
    let out = run(&[
        s(&tree),
        "--duration",
        "0.05",
        "--readers",
        "2",
        "--json",
        s(&json),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("no file of at least 16 MiB under"),
        "{stderr}"
    );
    assert!(stderr.contains("skipping sequential read"), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("skipped"), "{stdout}");
    let j = read_json(&json);
    for m in j["metrics"].as_array().unwrap() {
        let name = m["metric"].as_str().unwrap();
        let points = m["points"].as_array().unwrap();
        if ["seq_read", "rand_read", "rand_4k_iops"].contains(&name) {
            assert!(
                m["skipped"]
                    .as_str()
                    .unwrap()
                    .contains("--file FILE, or a smaller --min-file-size"),
                "{m}"
            );
            assert!(points.is_empty());
        } else {
            assert!(m.get("skipped").is_none(), "{m}");
            assert_eq!(points.len(), 2, "{name}: readers 1 and 2");
        }
    }

    // --file names the file to read instead.
    let f = tree.join("a/f3");
    let out = run(&[
        s(&tree),
        "--duration",
        "0.05",
        "--readers",
        "1",
        "--metrics",
        "seq,iops",
        "--file",
        s(&f),
        "-q",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stderr.is_empty(), "--quiet prints nothing on stderr");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("skipped"), "{stdout}");
    assert!(
        !stdout.contains("stat (lstat)"),
        "only the chosen metrics: {stdout}"
    );
}

#[test]
fn compare_plots_both_runs() {
    let d = tempfile::tempdir().unwrap();
    let tree = d.path().join("tree");
    make_tree(&tree, false);
    let (a, b, svg) = (
        d.path().join("a.json"),
        d.path().join("b.json"),
        d.path().join("cmp.svg"),
    );
    for (json, label, readers) in [(&a, "alpha-run", "1,2"), (&b, "beta-run", "1,3")] {
        let out = run(&[
            s(&tree),
            "--duration",
            "0.05",
            "--readers",
            readers,
            "--metrics",
            "stat,readdir",
            "--label",
            label,
            "--json",
            s(json),
            "-q",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = run(&["--compare", s(&a), s(&b), "--plot", s(&svg)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("alpha-run") && table.contains("beta-run"),
        "{table}"
    );
    assert!(
        table.lines().skip(1).all(|l| l.contains(" warm ")),
        "the cache column: {table}"
    );
    // The union of the reader counts, with `-` where a run did not measure.
    let header = table.lines().next().unwrap();
    assert!(header.ends_with("1 reader         2         3"), "{header}");
    assert!(
        table
            .lines()
            .any(|l| l.contains("alpha-run") && l.trim_end().ends_with('-')),
        "{table}"
    );

    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg") && text.trim_end().ends_with("</svg>"));
    assert!(
        text.contains("alpha-run") && text.contains("beta-run"),
        "both runs' labels in the plot"
    );
    // Two panels (stat, readdir), each with a line per run (2 px wide, in the run's colour).
    for color in ["#1F77B4", "#FF7F0E"] {
        let line = format!("stroke=\"{color}\" stroke-width=\"2\"");
        assert_eq!(text.matches(&line).count(), 2, "{color}: {text}");
    }
    assert!(text.contains("stat (lstat)") && text.contains("readdir"));

    // --log-y: the same runs on logarithmic value axes, labelled with the values.
    let log = d.path().join("log.svg");
    let out = run(&["--compare", s(&a), s(&b), "--plot", s(&log), "--log-y"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("alpha-run") && text.contains("beta-run"));
    assert_eq!(
        text.matches("ops/s (log scale)").count(),
        1,
        "the stat panel"
    );
    assert_eq!(
        text.matches("dirs/s (log scale)").count(),
        1,
        "the readdir panel"
    );

    // The same run twice: the labels are told apart.
    let out = run(&["--compare", s(&a), s(&a)]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("alpha-run (a.json)"), "{table}");
}

#[test]
fn errors_are_one_line_with_a_nonzero_status() {
    let d = tempfile::tempdir().unwrap();
    let missing = d.path().join("missing");
    assert_one_line_error(&run(&[s(&missing)]), 1, "cimg-bench: stat ");
    let out = run(&[s(&missing)]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("No such file or directory"));

    assert_one_line_error(
        &run(&[s(d.path()), "--bogus"]),
        2,
        "cimg-bench: bad arguments: unexpected argument '--bogus'",
    );
    assert_one_line_error(
        &run(&[s(d.path()), "--duration", "soon"]),
        2,
        "cimg-bench: bad arguments: invalid value 'soon' for '--duration",
    );
    assert_one_line_error(
        &run(&[s(d.path()), "--readers", "0"]),
        1,
        "cimg-bench: --readers: ",
    );
    assert_one_line_error(
        &run(&[s(d.path()), "--metrics", "seq,warp"]),
        1,
        "cimg-bench: --metrics: unknown metric \"warp\"",
    );
    assert_one_line_error(&run(&[]), 1, "cimg-bench: no PATH given");
    assert_one_line_error(
        &run(&[s(d.path()), "--log-y"]),
        2,
        "cimg-bench: bad arguments: the following required arguments were not provided: --plot <FILE.svg>",
    );
    assert_one_line_error(
        &run(&["--compare", s(&d.path().join("none.json"))]),
        1,
        "cimg-bench: read ",
    );
    let not_json = d.path().join("x.json");
    std::fs::write(&not_json, "{}").unwrap();
    assert_one_line_error(&run(&["--compare", s(&not_json)]), 1, "cimg-bench: ");
    assert_one_line_error(
        &run(&[s(d.path()), "--json", "/nonexistent-dir/r.json"]),
        1,
        "cimg-bench: --json /nonexistent-dir/r.json: no such directory",
    );
}

/// As root: a cold run drops the caches and visits each entry once; otherwise it refuses.
#[test]
fn drop_caches_needs_root_and_marks_the_run_cold() {
    let d = tempfile::tempdir().unwrap();
    let tree = d.path().join("tree");
    make_tree(&tree, false);
    let json = d.path().join("r.json");
    let out = run(&[
        s(&tree),
        "--drop-caches",
        "--metrics",
        "stat",
        "--readers",
        "1",
        "--duration",
        "5",
        "--json",
        s(&json),
        "-q",
    ]);
    if nix::unistd::geteuid().is_root() {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let j = read_json(&json);
        assert_eq!(j["cache"], "cold");
        // A cold run visits each entry once: the root, 3 directories, 30 files and a symlink,
        // in far less than the 5 s allowed.
        let p = &j["metrics"][0]["points"][0];
        assert_eq!(p["ops"], 35, "{p}");
        assert_eq!(p["exhausted"], true, "{p}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("cold cache"), "{stdout}");
        assert!(
            stdout.contains("* every block or entry was used once"),
            "{stdout}"
        );
    } else {
        assert_one_line_error(&out, 1, "cimg-bench: --drop-caches: needs root");
    }
}
