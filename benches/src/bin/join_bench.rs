//! join-bench: start N ranks on one node at once, with and without `--join`, and as a floor
//! the same number of plain `unshare -Urm /bin/true`; report the time until all ranks ran
//! `/bin/true`, the number of FUSE servers and of container mount namespaces holding the
//! image, and the servers' total RSS (sampled in a second start whose ranks sleep briefly).
//!
//! With and without `--join` the ranks run on the image's shared server (started before the
//! timed runs and kept with a long `CIMG_LINGER`): a join group gets one container, ranks
//! without join one each. `--private --no-join` gives each rank a mount of its own, as every
//! rank without join had before the image service. It starts and ends with `launch
//! --stop IMAGE`.

use anyhow::{Context, Result, bail};
use cimg_benches::median;
use cimg_benches::service::{self, LINGER};
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
                .env("CIMG_LINGER", LINGER)
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

/// (servers, container mount namespaces holding the image, servers' RSS in KiB), from
/// /proc. The servers' own mount namespaces (a shared server holds the image's mount in
/// one) are not counted.
fn census(image: &Path, ranks: &[u32]) -> (usize, usize, u64) {
    let img = image.display().to_string();
    let servers = service::servers_of(image, ranks);
    let server_ns: std::collections::BTreeSet<_> = servers
        .iter()
        .filter_map(|p| std::fs::read_link(format!("/proc/{}/ns/mnt", p.pid)).ok())
        .collect();
    let mut namespaces = std::collections::BTreeSet::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().parse::<u32>().is_err() {
            continue;
        }
        if let (Ok(m), Ok(ns)) = (
            std::fs::read_to_string(e.path().join("mountinfo")),
            std::fs::read_link(e.path().join("ns/mnt")),
        ) && !server_ns.contains(&ns)
            && m.lines()
                .any(|l| l.contains("fuse.cimg") && l.contains(&img))
        {
            namespaces.insert(ns);
        }
    }
    let rss = servers.iter().map(|p| p.rss_kib).sum();
    (servers.len(), namespaces.len(), rss)
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
    // No server of an earlier run (or launch binary); then the image's server, warm.
    service::stop(&launch, &[&args.image])?;
    wait_all(spawn_all(
        &[l.clone(), img.clone(), "--".into(), "/bin/true".into()],
        1,
        None,
    )?)?;
    let mut rows = Vec::new();
    let mut seq = 0u64;
    for &n in &args.ranks {
        for mode in ["join", "no join", "private", "floor: unshare -Urm"] {
            let argv: Vec<String> = match mode {
                "join" => vec![l.clone(), img.clone(), "--".into(), "/bin/true".into()],
                "no join" => vec![
                    l.clone(),
                    "--no-join".into(),
                    img.clone(),
                    "--".into(),
                    "/bin/true".into(),
                ],
                "private" => vec![
                    l.clone(),
                    "--private".into(),
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
        let private = get("private");
        println!(
            "{max} ranks: join / floor = {:.2} (goal <= 1.3) {}",
            join / floor,
            verdict(join / floor <= 1.3)
        );
        println!(
            "{max} ranks: no join / floor = {:.2} (no goal; one container each on the shared server)",
            nojoin / floor
        );
        println!(
            "{max} ranks: private / join = {:.2} (goal >= 2) {}",
            private / join,
            verdict(private / join >= 2.0)
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
    println!("  private: {l} --private --no-join {img} -- /bin/true");
    println!("  floor:   unshare -Urm /bin/true");
    println!(
        "  (CIMG_LINGER={LINGER} for every launch; the shared server started by one launch first, \
         and counted among the servers of every mode)"
    );
    service::stop(&launch, &[&args.image])?;
    if let Some(j) = &args.json {
        std::fs::write(j, serde_json::to_vec_pretty(&rows)?)
            .with_context(|| format!("write {}", j.display()))?;
    }
    Ok(())
}
