//! join-bench: start N ranks on one node at once, with and without `--join`, and as a floor
//! the same number of plain `unshare -Urm /bin/true`; report the time until all ranks ran
//! `/bin/true`, the number of FUSE servers and of mount namespaces holding the image, and the
//! servers' total RSS (sampled in a second start whose ranks sleep briefly).

use anyhow::{Context, Result, bail};
use cimg_benches::median;
use clap::Parser;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(
    name = "join-bench",
    about = "many ranks on one node: launch with and without --join"
)]
struct Args {
    /// The image (default: the launch-bench image, packed from its rootfs).
    #[arg(long, default_value = "/var/tmp/launch-bench/img.cimg")]
    image: PathBuf,
    /// Rank counts.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
    ranks: Vec<usize>,
    /// Runs per configuration.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// launch binary (default: next to this one).
    #[arg(long)]
    launch: Option<PathBuf>,
    /// Write all runs as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Default, Serialize, Clone)]
struct Row {
    ranks: usize,
    mode: String,
    wall_ms: Vec<f64>,
    servers: usize,
    mount_namespaces: usize,
    server_rss_kib: u64,
}

fn spawn_all(argv: &[String], n: usize, tag: Option<&str>) -> Result<Vec<Child>> {
    (0..n)
        .map(|_| {
            let mut c = Command::new(&argv[0]);
            if let Some(t) = tag {
                c.args(["--join-ct", &n.to_string(), "--join-tag", t]);
            }
            c.args(&argv[1..])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .with_context(|| format!("start {}", argv[0]))
        })
        .collect()
}

fn wait_all(children: Vec<Child>) -> Result<()> {
    for c in children {
        let o = c.wait_with_output()?;
        if !o.status.success() {
            bail!(
                "a rank failed ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
    }
    Ok(())
}

/// (servers, mount namespaces holding the image, servers' RSS in KiB), from /proc.
fn census(image: &Path, ranks: &[u32]) -> (usize, usize, u64) {
    let img = image.display().to_string();
    let mut servers = 0;
    let mut rss = 0;
    let mut namespaces = std::collections::BTreeSet::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if let (Ok(m), Ok(ns)) = (
            std::fs::read_to_string(e.path().join("mountinfo")),
            std::fs::read_link(e.path().join("ns/mnt")),
        ) && m
            .lines()
            .any(|l| l.contains("fuse.cimg") && l.contains(&img))
        {
            namespaces.insert(ns);
        }
        if !cmd.contains(&img) || ranks.contains(&pid) {
            continue;
        }
        // A server is a launch process leading its own session.
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let f: Vec<&str> = stat.rsplit(") ").next().unwrap_or("").split(' ').collect();
        if f.get(3) == Some(&pid.to_string().as_str()) {
            servers += 1;
            let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
            rss += status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    (servers, namespaces.len(), rss)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let launch = cimg_benches::sibling_binary("launch", args.launch.as_deref())?;
    if !args.image.is_file() {
        bail!(
            "{} does not exist (run launch-bench first, or pass --image)",
            args.image.display()
        );
    }
    let l = launch.display().to_string();
    let img = args.image.display().to_string();
    let mut rows = Vec::new();
    let mut seq = 0u64;
    for &n in &args.ranks {
        for mode in ["join", "no join", "floor: unshare -Urm"] {
            let argv: Vec<String> = match mode {
                "join" => vec![l.clone(), img.clone(), "--".into(), "/bin/true".into()],
                "no join" => vec![
                    l.clone(),
                    "--no-join".into(),
                    img.clone(),
                    "--".into(),
                    "/bin/true".into(),
                ],
                _ => vec!["unshare".into(), "-Urm".into(), "/bin/true".into()],
            };
            let mut row = Row {
                ranks: n,
                mode: mode.into(),
                ..Default::default()
            };
            for _ in 0..args.runs {
                seq += 1;
                let tag = format!("join-bench-{}-{seq}", std::process::id());
                let t = Instant::now();
                let children = spawn_all(&argv, n, (mode == "join").then_some(tag.as_str()))?;
                wait_all(children)?;
                row.wall_ms.push(t.elapsed().as_secs_f64() * 1e3);
            }
            if mode != "floor: unshare -Urm" {
                // Census: the same start with ranks that stay a moment.
                seq += 1;
                let tag = format!("join-bench-{}-{seq}", std::process::id());
                let mut sleepy = argv.clone();
                let last = sleepy.len() - 1;
                sleepy[last] = "sleep".into();
                sleepy.push("2".into());
                let children = spawn_all(&sleepy, n, (mode == "join").then_some(tag.as_str()))?;
                let pids: Vec<u32> = children.iter().map(|c| c.id()).collect();
                std::thread::sleep(Duration::from_millis(1000));
                let (s, m, r) = census(&args.image, &pids);
                row.servers = s;
                row.mount_namespaces = m;
                row.server_rss_kib = r;
                wait_all(children)?;
                std::thread::sleep(Duration::from_millis(200));
            }
            eprintln!("{n:>3} ranks, {mode}: {:.1} ms", median(&row.wall_ms));
            rows.push(row);
        }
    }
    println!(
        "join-bench: {} ranks started at once on one node, each runs /bin/true; medians of {} runs",
        args.ranks
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join("/"),
        args.runs
    );
    println!("image {}", img);
    println!();
    println!(
        "{:>5}  {:<22} {:>10} {:>8} {:>7} {:>12}",
        "ranks", "mode", "wall ms", "servers", "mounts", "server RSS"
    );
    for r in &rows {
        let census = if r.mode.starts_with("floor") {
            format!("{:>8} {:>7} {:>12}", "-", "-", "-")
        } else {
            format!(
                "{:>8} {:>7} {:>9} MiB",
                r.servers,
                r.mount_namespaces,
                r.server_rss_kib / 1024
            )
        };
        println!(
            "{:>5}  {:<22} {:>10.1} {census}",
            r.ranks,
            r.mode,
            median(&r.wall_ms)
        );
    }
    println!();
    if let Some(&max) = args.ranks.iter().max() {
        let get = |mode: &str| {
            rows.iter()
                .find(|r| r.ranks == max && r.mode == mode)
                .map(|r| median(&r.wall_ms))
                .unwrap_or(f64::NAN)
        };
        let j = rows.iter().find(|r| r.ranks == max && r.mode == "join");
        let (join, nojoin, floor) = (get("join"), get("no join"), get("floor: unshare -Urm"));
        let verdict = |ok: bool| if ok { "PASS" } else { "FAIL" };
        println!(
            "{max} ranks: join / floor = {:.2} (goal <= 1.5) {}",
            join / floor,
            verdict(join / floor <= 1.5)
        );
        println!(
            "{max} ranks: no join / join = {:.2} (goal >= 2) {}",
            nojoin / join,
            verdict(nojoin / join >= 2.0)
        );
        if let Some(j) = j {
            println!(
                "{max} ranks with join: {} server(s), {} mount namespace(s) (goal 1 and 1) {}",
                j.servers,
                j.mount_namespaces,
                verdict(j.servers == 1 && j.mount_namespaces == 1)
            );
        }
    }
    println!();
    println!("commands (N ranks at once):");
    println!("  join:    {l} --join-ct N --join-tag TAG {img} -- /bin/true");
    println!("  no join: {l} --no-join {img} -- /bin/true");
    println!("  floor:   unshare -Urm /bin/true");
    if let Some(j) = &args.json {
        std::fs::write(j, serde_json::to_vec_pretty(&rows)?)
            .with_context(|| format!("write {}", j.display()))?;
    }
    Ok(())
}
