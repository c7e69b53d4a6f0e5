//! The TreeBuilder benchmark: `merklectl hash` and the TreeBuilder service (release builds)
//! beside the peers the TreeBuilder issue names, in one run on this machine.
//!
//! Trees: T1 = 10,000 files of 1-64 KiB in nested directories, T2 = 100 files of 10 MiB (both
//! generated deterministically, incompressible), and the Rust toolchain's sysroot. Warm page
//! cache: every command runs once before it is timed; the best of `--runs` is reported.
//! Peers: `find | xargs sha256sum`, `git add -A && git write-tree` (fresh repository each
//! run), `openssl speed -evp sha256`. Memory: peak RSS of merklectl on each tree, on one 10 GiB
//! file (sparse), and optionally on a 1,000,000-file tree (`--million`).
//! Incremental: T1 after changing 1% of its files, through `merklectl hash` with its stat
//! cache (a new process each time), and through the TreeBuilder service, which keeps the
//! trees it builds watched; both against a full build by the same tool in the same run.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// Options of the tree benchmark (the default command).
#[derive(Debug, clap::Args)]
pub struct TreeArgs {
    /// Where the generated trees are kept between runs.
    #[arg(long, default_value = "target/bench-trees")]
    work_dir: PathBuf,
    /// Timed runs per measurement (the best is reported).
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// Also build a 1,000,000-file tree and report merklectl's peak memory on it.
    #[arg(long)]
    million: bool,
    /// Skip the git peer (slow on large trees).
    #[arg(long)]
    no_git: bool,
    /// Only the incremental rows (T1 through merklectl and through TreeBuilder).
    #[arg(long)]
    incremental_only: bool,
}

/// A deterministic, fast pseudo-random generator (xorshift64*): the trees are the same on
/// every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

fn generate_t1(dir: &Path) -> anyhow::Result<()> {
    let mut rng = Rng(0x5eed_0001);
    let mut buf = vec![0u8; 64 * 1024];
    for i in 0..10_000u32 {
        let sub = dir.join(format!("d{:02}/e{:02}", i % 25, (i / 25) % 16));
        fs::create_dir_all(&sub)?;
        let size = 1024 + (rng.next() % (63 * 1024 + 1)) as usize;
        rng.fill(&mut buf[..size]);
        fs::write(sub.join(format!("f{i:05}.bin")), &buf[..size])?;
    }
    Ok(())
}

fn generate_t2(dir: &Path) -> anyhow::Result<()> {
    let mut rng = Rng(0x5eed_0002);
    let mut buf = vec![0u8; 10 << 20];
    fs::create_dir_all(dir)?;
    for i in 0..100u32 {
        rng.fill(&mut buf);
        fs::write(dir.join(format!("big{i:03}.bin")), &buf)?;
    }
    Ok(())
}

pub(crate) fn generate_million(dir: &Path) -> anyhow::Result<()> {
    for i in 0..1_000_000u32 {
        let sub = dir.join(format!("d{:03}/e{:02}", i % 1000, (i / 1000) % 10));
        if i < 10_000 {
            fs::create_dir_all(&sub)?;
        }
        fs::write(sub.join(format!("f{i:07}")), i.to_le_bytes())?;
    }
    Ok(())
}

/// Generates a tree once; a marker file says it is complete.
pub(crate) fn ensure(dir: &Path, generate: fn(&Path) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let marker = dir.with_extension("done");
    if marker.exists() {
        return Ok(());
    }
    if dir.exists() {
        fs::remove_dir_all(dir)?;
    }
    eprintln!("generating {} ...", dir.display());
    generate(dir)?;
    fs::write(marker, b"")?;
    Ok(())
}

fn tree_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => total += e.metadata().map_or(0, |m| m.len()),
                _ => {}
            }
        }
    }
    total
}

/// Runs a shell command; fails loudly if it fails.
fn sh(script: &str, env: &[(&str, &Path)]) -> anyhow::Result<Duration> {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(script).stdout(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let started = Instant::now();
    let status = cmd.status().with_context(|| format!("running {script}"))?;
    if !status.success() {
        bail!("{script} failed: {status}");
    }
    Ok(started.elapsed())
}

/// Best wall time of `runs` runs after one warm-up.
fn best(runs: u32, mut f: impl FnMut() -> anyhow::Result<Duration>) -> anyhow::Result<Duration> {
    f()?;
    let mut best = Duration::MAX;
    for _ in 0..runs {
        best = best.min(f()?);
    }
    Ok(best)
}

struct Hash {
    root: String,
    rss: u64,
    files_hashed: u64,
}

fn merklectl_hash(
    merklectl: &Path,
    dir: &Path,
    extra: &[&str],
) -> anyhow::Result<(Duration, Hash)> {
    let started = Instant::now();
    let out = Command::new(merklectl)
        .arg("hash")
        .arg(dir)
        .arg("--json")
        .args(extra)
        .stderr(Stdio::inherit())
        .output()
        .context("running merklectl hash")?;
    let elapsed = started.elapsed();
    if !out.status.success() {
        bail!("merklectl hash {} failed", dir.display());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok((
        elapsed,
        Hash {
            root: v["root_hash"].as_str().unwrap_or_default().to_owned(),
            rss: v["peak_rss_bytes"].as_u64().unwrap_or(0),
            files_hashed: v["files_hashed"].as_u64().unwrap_or(0),
        },
    ))
}

/// TreeBuilder's times on T1: a full build, and the best rebuild after changing 1% of it.
struct ServiceTimes {
    full: Duration,
    incremental: Duration,
    files_read: u64,
    full_root: String,
    incremental_root: String,
}

/// Starts the release TreeBuilder on a loopback port and times BuildTree calls on T1 (from
/// the request to the final result, as a client sees it).
fn tree_builder_rebuilds(work: &Path, t1: &Path, runs: u32) -> anyhow::Result<ServiceTimes> {
    use merkle_proto::treebuilder::v1::{
        BuildResult, BuildTreeRequest, build_tree_response::Event,
        tree_builder_service_client::TreeBuilderServiceClient,
    };
    use merklectl::stack;

    let spec = stack::SERVICES
        .iter()
        .find(|s| s.name == "tree-builder")
        .context("tree-builder spec")?;
    let port = stack::free_port()?;
    let env = [
        ("ALLOWED_ROOTS", work.display().to_string()),
        (
            "STAT_CACHE_DIR",
            work.join("tree-builder-cache").display().to_string(),
        ),
        ("LOG_LEVEL", "warn".to_owned()),
    ];
    let credentials = merklectl::credentials::Credentials::ensure(work)?;
    let env: Vec<(&str, String)> = env
        .into_iter()
        .chain(credentials.service_env("tree-builder"))
        .collect();
    merkle_shared::auth::token::install(&credentials.token("operator")?)
        .map_err(anyhow::Error::msg)?;
    let mut process = stack::spawn_service(spec, port, &env, &work.join("tree-builder.log"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        stack::wait_for_status(
            addr,
            spec.grpc_name,
            tonic_health::pb::health_check_response::ServingStatus::Serving,
            Duration::from_secs(20),
        )
        .await?;
        let mut client =
            TreeBuilderServiceClient::new(crate::rpc::channel(&format!("http://{addr}"))?);
        let mut call = async |fresh: bool| -> anyhow::Result<(Duration, BuildResult)> {
            let request = BuildTreeRequest {
                path: t1.display().to_string(),
                disable_stat_cache: fresh,
                ..BuildTreeRequest::default()
            };
            let started = Instant::now();
            let mut stream = client.build_tree(request).await?.into_inner();
            while let Some(message) = stream.message().await? {
                if let Some(Event::Result(result)) = message.event {
                    return Ok((started.elapsed(), result));
                }
            }
            bail!("BuildTree ended without a result")
        };
        let mut full = Duration::MAX;
        call(true).await?; // warm-up
        for _ in 0..runs {
            full = full.min(call(true).await?.0);
        }
        let mut rng = Rng(0x5eed_0004);
        let mut incremental = Duration::MAX;
        let mut files_read = 0;
        let mut incremental_root = String::new();
        for round in 0..runs {
            change_one_percent(t1, &mut rng, round)?;
            let (d, r) = call(false).await?;
            incremental = incremental.min(d);
            files_read = r.files_hashed;
            incremental_root = r.root_hash;
        }
        // The root to compare with: a full build of the tree as the last rebuild saw it.
        let (_, reference) = call(true).await?;
        anyhow::Ok(ServiceTimes {
            full,
            incremental,
            files_read,
            full_root: reference.root_hash,
            incremental_root,
        })
    });
    process.stop(Duration::from_secs(10));
    result
}

/// Rewrites the start of 100 of T1's 10,000 files (a different 1% each round).
fn change_one_percent(t1: &Path, rng: &mut Rng, round: u32) -> anyhow::Result<()> {
    for k in 0..100u32 {
        let i = (k * 100 + round * 7) % 10_000;
        let path = t1.join(format!("d{:02}/e{:02}/f{i:05}.bin", i % 25, (i / 25) % 16));
        let mut f = fs::OpenOptions::new().write(true).open(&path)?;
        f.write_all(&rng.next().to_le_bytes())?;
    }
    Ok(())
}

fn openssl_sha256_bytes_per_sec() -> anyhow::Result<f64> {
    let out = Command::new("openssl")
        .args([
            "speed", "-evp", "sha256", "-bytes", "1048576", "-seconds", "2",
        ])
        .stderr(Stdio::null())
        .output()
        .context("running openssl speed")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // The last line: "sha256  1234567.89k" (thousands of bytes per second).
    let line = text
        .lines()
        .rev()
        .find(|l| l.trim_start().to_lowercase().starts_with("sha256"))
        .context("openssl speed printed no sha256 line")?;
    let value = line
        .split_whitespace()
        .last()
        .and_then(|v| v.trim_end_matches('k').parse::<f64>().ok())
        .context("parsing openssl speed")?;
    Ok(value * 1000.0)
}

struct Row {
    tree: String,
    tool: String,
    time: Duration,
    bytes: u64,
    rss: Option<u64>,
    ours: Option<Duration>,
}

fn mb_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

/// Runs the tree benchmark and prints its tables.
pub fn run(args: TreeArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let bin_dir = exe.parent().context("binary folder")?;
    let merklectl = bin_dir.join("merklectl");
    if !merklectl.is_file() {
        bail!(
            "{} not found: run scripts/bench.sh (it builds the release binaries)",
            merklectl.display()
        );
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    fs::create_dir_all(&args.work_dir)?;
    let work = args.work_dir.canonicalize()?;
    let t1 = work.join("t1");
    let t2 = work.join("t2");
    ensure(&t1, generate_t1)?;
    ensure(&t2, generate_t2)?;
    let sysroot = PathBuf::from(
        String::from_utf8(
            Command::new("rustc")
                .args(["--print", "sysroot"])
                .output()?
                .stdout,
        )?
        .trim(),
    );
    let trees = [
        ("T1 10k files", t1.clone()),
        ("T2 100x10MiB", t2.clone()),
        ("sysroot", sysroot),
    ];

    let mut rows = Vec::new();
    let mut targets: Vec<(String, bool)> = Vec::new();
    for (name, dir) in trees.iter().filter(|_| !args.incremental_only) {
        let bytes = tree_bytes(dir);
        let mut rss = 0;
        let ours = best(args.runs, || {
            let (d, h) = merklectl_hash(&merklectl, dir, &["--no-cache"])?;
            rss = rss.max(h.rss);
            Ok(d)
        })?;
        rows.push(Row {
            tree: name.to_string(),
            tool: "merklectl hash".into(),
            time: ours,
            bytes,
            rss: Some(rss),
            ours: None,
        });

        let sha = best(args.runs, || {
            sh(
                "find \"$DIR\" -type f -print0 | xargs -0 sha256sum",
                &[("DIR", dir)],
            )
        })?;
        rows.push(Row {
            tree: name.to_string(),
            tool: "find \\| xargs sha256sum".into(),
            time: sha,
            bytes,
            rss: None,
            ours: Some(ours),
        });
        let ratio = sha.as_secs_f64() / ours.as_secs_f64();
        targets.push((
            format!("{name}: full build >= 4x sha256sum (is {ratio:.1}x)"),
            ratio >= 4.0,
        ));

        if !args.no_git {
            let git_dir = work.join("git-repo");
            let git = best(args.runs.min(2), || {
                let _ = fs::remove_dir_all(&git_dir);
                sh("git init -q", &[("GIT_DIR", &git_dir)])?;
                sh(
                    "git add -A && git write-tree",
                    &[("GIT_DIR", &git_dir), ("GIT_WORK_TREE", dir)],
                )
            })?;
            let _ = fs::remove_dir_all(&git_dir);
            rows.push(Row {
                tree: name.to_string(),
                tool: "git add -A && git write-tree".into(),
                time: git,
                bytes,
                rss: None,
                ours: Some(ours),
            });
            let ratio = git.as_secs_f64() / ours.as_secs_f64();
            targets.push((
                format!("{name}: full build >= 1.3x git (is {ratio:.1}x)"),
                ratio >= 1.3,
            ));
        }
        if *name == "T2 100x10MiB" {
            let openssl = openssl_sha256_bytes_per_sec()?;
            let ours_rate = bytes as f64 / ours.as_secs_f64();
            let share = ours_rate / (openssl * cores as f64);
            targets.push((
                format!(
                    "T2: >= 80% of openssl speed x {cores} cores ({:.0} MB/s of {:.0} MB/s = {:.0}%)",
                    ours_rate / 1e6,
                    openssl * cores as f64 / 1e6,
                    share * 100.0
                ),
                share >= 0.8,
            ));
            rows.push(Row {
                tree: "(1 MiB blocks)".into(),
                tool: format!(
                    "openssl speed -evp sha256 (1 core; x{cores} = {:.0} MB/s)",
                    openssl * cores as f64 / 1e6
                ),
                time: Duration::from_secs_f64(bytes as f64 / openssl),
                bytes,
                rss: None,
                ours: None,
            });
        }
    }

    // Incremental: T1 with a primed stat cache, after changing 1% of its files.
    let cache_dir = work.join("stat-cache");
    let _ = fs::remove_dir_all(&cache_dir);
    let cache_arg = cache_dir.display().to_string();
    // Files must be older than the racy margin (2 s) before the priming scan to be trusted.
    std::thread::sleep(Duration::from_millis(2500));
    merklectl_hash(&merklectl, &t1, &["--cache-dir", &cache_arg])?;
    let full_t1 = match rows.first() {
        Some(row) => row.time,
        None => {
            let time = best(args.runs, || {
                Ok(merklectl_hash(&merklectl, &t1, &["--no-cache"])?.0)
            })?;
            rows.push(Row {
                tree: "T1".into(),
                tool: "merklectl hash".into(),
                time,
                bytes: tree_bytes(&t1),
                rss: None,
                ours: None,
            });
            time
        }
    };
    let mut rng = Rng(0x5eed_0003);
    let mut incremental = Duration::MAX;
    let mut hashed = 0;
    let mut inc_root = String::new();
    for round in 0..args.runs {
        change_one_percent(&t1, &mut rng, round)?;
        // Builds run minutes apart, not right after an edit: let the edits age past the racy
        // margin (2 s), else they are read once more by the following build.
        std::thread::sleep(Duration::from_millis(2500));
        let (d, h) = merklectl_hash(&merklectl, &t1, &["--cache-dir", &cache_arg])?;
        incremental = incremental.min(d);
        hashed = h.files_hashed;
        inc_root = h.root;
    }
    let (_, full) = merklectl_hash(&merklectl, &t1, &["--no-cache"])?;
    let speedup = full_t1.as_secs_f64() / incremental.as_secs_f64();
    rows.push(Row {
        tree: "T1, 1% changed".into(),
        tool: format!(
            "merklectl hash, stat cache ({hashed} files read; {speedup:.1}x faster than full)"
        ),
        time: incremental,
        bytes: tree_bytes(&t1),
        rss: None,
        ours: None,
    });

    // The same through the TreeBuilder service, which keeps the trees it builds watched.
    let service = tree_builder_rebuilds(&work, &t1, args.runs)?;
    rows.push(Row {
        tree: "T1".into(),
        tool: "TreeBuilder BuildTree, disable_stat_cache (full)".into(),
        time: service.full,
        bytes: tree_bytes(&t1),
        rss: None,
        ours: None,
    });
    rows.push(Row {
        tree: "T1, 1% changed".into(),
        tool: format!(
            "TreeBuilder BuildTree, watched ({} files read; {:.1}x faster than full)",
            service.files_read,
            service.full.as_secs_f64() / service.incremental.as_secs_f64()
        ),
        time: service.incremental,
        bytes: tree_bytes(&t1),
        rss: None,
        ours: None,
    });
    let speedup = service.full.as_secs_f64() / service.incremental.as_secs_f64();
    targets.push((
        format!(
            "T1 rebuild after 1% changed >= 20x faster than a full build (TreeBuilder: is {speedup:.1}x)"
        ),
        speedup >= 20.0,
    ));
    targets.push((
        "T1 incremental roots == full root (merklectl and TreeBuilder)".into(),
        inc_root == full.root && service.incremental_root == service.full_root,
    ));
    // The benchmark changed T1: regenerate it next time.
    let _ = fs::remove_file(t1.with_extension("done"));

    if args.incremental_only {
        print_tables(cores, args.runs, &rows, &targets);
        return Ok(());
    }

    // Memory: one 10 GiB file (sparse: no disk needed, every byte is still read and hashed).
    let big = work.join("ten-gib");
    fs::create_dir_all(&big)?;
    fs::File::create(big.join("ten-gib.bin"))?.set_len(10 << 30)?;
    let (d, h) = merklectl_hash(&merklectl, &big, &["--no-cache"])?;
    rows.push(Row {
        tree: "one 10 GiB file".into(),
        tool: "merklectl hash".into(),
        time: d,
        bytes: 10 << 30,
        rss: Some(h.rss),
        ours: None,
    });
    targets.push((
        format!(
            "10 GiB file under 64 MiB RSS (is {:.1} MiB)",
            h.rss as f64 / 1048576.0
        ),
        h.rss < 64 << 20,
    ));
    fs::remove_dir_all(&big)?;

    if args.million {
        let million = work.join("million");
        ensure(&million, generate_million)?;
        let (d, h) = merklectl_hash(&merklectl, &million, &["--no-cache"])?;
        rows.push(Row {
            tree: "1,000,000 files".into(),
            tool: "merklectl hash".into(),
            time: d,
            bytes: 4_000_000,
            rss: Some(h.rss),
            ours: None,
        });
    }

    print_tables(cores, args.runs, &rows, &targets);
    Ok(())
}

fn print_tables(cores: usize, runs: u32, rows: &[Row], targets: &[(String, bool)]) {
    println!("\nmerkle-bench: {cores} cores, best of {runs} warm runs\n");
    println!("| tree | tool | time (s) | MB/s | peak RSS (MiB) | ours is faster by |");
    println!("|---|---|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {:.3} | {:.0} | {} | {} |",
            r.tree,
            r.tool,
            r.time.as_secs_f64(),
            mb_s(r.bytes, r.time),
            r.rss
                .map_or("".to_owned(), |b| format!("{:.1}", b as f64 / 1048576.0)),
            r.ours.map_or("".to_owned(), |o| format!(
                "{:.1}x",
                r.time.as_secs_f64() / o.as_secs_f64()
            )),
        );
    }
    println!("\n| target | met |\n|---|---|");
    for (what, met) in targets {
        println!("| {what} | {} |", if *met { "yes" } else { "NO" });
    }
}
