//! The Scheduler benchmark: every service as its release binary on this machine, the
//! Scheduler measured from the outside.
//!
//! Targets (the Scheduler issue): 1,000 sources on a 10 s interval over small trees (each with a
//! 9 s jitter, so they spread over the interval), every tick starting within 1 s of its due
//! time (p99 lateness reported); the Scheduler's own CPU time per
//! unchanged build (not TreeBuilder's or DbSync's) under 1 ms; an unchanged rebuild of a
//! 100,000-file watched source end to end (TriggerBuild to SUCCEEDED_UNCHANGED) under 50 ms;
//! and the Scheduler's peak memory while a large tree's nodes pass through it (the
//! 100,000-file tree, or 1,000,000 files with `--million`).

use std::{
    fs,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use merkle_proto::scheduler::v1::{
    BuildState, CreateSourceRequest, ListBuildsRequest, Source, TriggerBuildRequest,
    WatchBuildRequest, scheduler_service_client::SchedulerServiceClient, source::Schedule,
};

use crate::rpc;

/// Options of `merkle-bench scheduler`.
#[derive(Debug, clap::Args)]
pub struct SchedulerBenchArgs {
    /// Sources of the schedule row.
    #[arg(long, default_value_t = 1000)]
    sources: usize,
    /// Seconds the schedule row runs (after the first round of builds).
    #[arg(long, default_value_t = 40)]
    seconds: u64,
    /// Also measure the Scheduler's peak memory on a 1,000,000-file tree (generated once).
    #[arg(long)]
    million: bool,
    /// Where the large trees are kept between runs.
    #[arg(long, default_value = "target/bench-trees")]
    work_dir: std::path::PathBuf,
}

type Client = SchedulerServiceClient<crate::rpc::Channel>;

/// User and system CPU time of a process so far (from /proc).
fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = &stat[stat.rfind(')').context("stat")? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // /proc counts in USER_HZ, which Linux fixes at 100 for every architecture's ABI.
    Ok(Duration::from_millis(ticks * 10))
}

/// CPU time of a process and every process under it (PostgreSQL's backends), from /proc.
fn tree_cpu(root: u32) -> Duration {
    let mut stats: Vec<(u32, u32)> = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        if let Some(ppid) = after.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
            stats.push((pid, ppid));
        }
    }
    let mut todo = vec![root];
    let mut total = Duration::ZERO;
    while let Some(pid) = todo.pop() {
        total += cpu_time(pid).unwrap_or_default();
        todo.extend(stats.iter().filter(|(_, pp)| *pp == pid).map(|(p, _)| *p));
    }
    total
}

fn interval(seconds: i64) -> Option<Schedule> {
    Some(Schedule::Interval(prost_types::Duration {
        seconds,
        nanos: 0,
    }))
}

async fn create(
    c: &mut Client,
    name: &str,
    path: &Path,
    schedule: Option<Schedule>,
) -> anyhow::Result<()> {
    c.create_source(CreateSourceRequest {
        source: Some(Source {
            name: name.into(),
            path: path.display().to_string(),
            schedule,
            enabled: true,
            ..Default::default()
        }),
    })
    .await?;
    Ok(())
}

/// Triggers a build and waits for its end; returns the time it took and its final state.
async fn build(c: &mut Client, source: &str) -> anyhow::Result<(Duration, BuildState)> {
    let started = Instant::now();
    let id = c
        .trigger_build(TriggerBuildRequest {
            source: source.into(),
        })
        .await?
        .into_inner()
        .build_id;
    let mut stream = c
        .watch_build(WatchBuildRequest { build_id: id })
        .await?
        .into_inner();
    let mut last = None;
    while let Some(m) = stream.message().await? {
        last = m.build;
    }
    let state = BuildState::try_from(last.context("no build")?.state)?;
    Ok((started.elapsed(), state))
}

fn seconds(t: Option<prost_types::Timestamp>) -> f64 {
    t.map_or(0.0, |t| t.seconds as f64 + f64::from(t.nanos) / 1e9)
}

pub fn run(args: SchedulerBenchArgs) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(run_async(args))
}

async fn run_async(args: SchedulerBenchArgs) -> anyhow::Result<()> {
    fs::create_dir_all(&args.work_dir)?;
    let trees = args.work_dir.canonicalize()?;
    let hundred_k = trees.join("hundred-k");
    crate::trees::ensure(&hundred_k, crate::db_sync::generate_hundred_k)?;
    let million = trees.join("million");
    if args.million {
        crate::trees::ensure(&million, crate::trees::generate_million)?;
    }
    let storage = rpc::Storage::start("merkle-bench-scheduler-").await?;
    let w = storage.dir();
    let (cache, db_sync, pg) = (&storage.cache, &storage.db_sync, &storage.postgres);
    let roots = format!("{},{}", w.display(), trees.display());
    let tree_builder = rpc::start_service(
        w,
        "tree-builder",
        &[
            ("ALLOWED_ROOTS", roots),
            ("WATCH_MAX_ENTRIES", "2000000".into()),
            ("WATCH_TREES", "16".into()),
            // Many small sources: more builds at once than the default 2, sized for big trees.
            ("MAX_CONCURRENT_BUILDS", "16".into()),
        ],
    )
    .await?;
    let scheduler = rpc::start_service(
        w,
        "scheduler",
        &[
            ("DATABASE_URL", pg.url()),
            ("CACHE_ADDR", cache.uri.clone()),
            ("DB_SYNC_ADDR", db_sync.uri.clone()),
            ("TREE_BUILDER_ADDR", tree_builder.uri.clone()),
            (
                "LOG_LEVEL",
                std::env::var("BENCH_SCHEDULER_LOG").unwrap_or_else(|_| "warn".into()),
            ),
        ],
    )
    .await?;
    let pid = scheduler.pid;
    let mut c = SchedulerServiceClient::new(rpc::channel(&scheduler.uri)?);

    // Memory: a large tree's nodes pass through the Scheduler batch by batch.
    let big = if args.million { &million } else { &hundred_k };
    create(&mut c, "big", big, None).await?;
    eprintln!("building {} through the Scheduler ...", big.display());
    let rss_before = rpc::peak_rss(pid)?;
    let (first, state) = build(&mut c, "big").await?;
    anyhow::ensure!(
        state == BuildState::SucceededChanged,
        "the first build of {} ended {state:?}",
        big.display()
    );
    let rss_after = rpc::peak_rss(pid)?;

    // An unchanged rebuild of the 100,000-file tree, which TreeBuilder keeps watched.
    if args.million {
        create(&mut c, "hundred-k", &hundred_k, None).await?;
        build(&mut c, "hundred-k").await?;
    }
    let watched = if args.million { "hundred-k" } else { "big" };
    let mut unchanged = Vec::new();
    for _ in 0..10 {
        let (took, state) = build(&mut c, watched).await?;
        anyhow::ensure!(
            state == BuildState::SucceededUnchanged,
            "an unchanged rebuild ended {state:?}"
        );
        unchanged.push(took);
    }
    unchanged.sort();
    let unchanged_p50 = unchanged[unchanged.len() / 2];

    // The schedule: small sources on a 10 s interval.
    eprintln!("registering {} sources ...", args.sources);
    for i in 0..args.sources {
        let dir = w.join(format!("sources/s{i:04}"));
        fs::create_dir_all(dir.join("sub"))?;
        fs::write(dir.join("a.txt"), format!("{i}"))?;
        fs::write(dir.join("sub/b.txt"), "b")?;
        create(&mut c, &format!("s{i:04}"), &dir, interval(10)).await?;
    }
    // Let the first round (every source due at once) pass, then measure.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let from = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    let cpu_before = cpu_time(pid)?;
    let components = [
        ("scheduler", pid),
        ("tree-builder", tree_builder.pid),
        ("db-sync", db_sync.pid),
        ("cache", cache.pid),
        ("redis", storage.redis.pid().unwrap_or(0)),
        ("postgres", pg.pid().unwrap_or(0)),
    ];
    let cpu_all_before: Vec<Duration> = components.iter().map(|(_, p)| tree_cpu(*p)).collect();
    eprintln!("measuring the schedule for {} s ...", args.seconds);
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    let cpu = cpu_time(pid)? - cpu_before;
    let cpu_all: Vec<(&str, f64)> = components
        .iter()
        .zip(&cpu_all_before)
        .map(|((name, p), before)| (*name, (tree_cpu(*p).saturating_sub(*before)).as_secs_f64()))
        .collect();
    let until = from + args.seconds as f64;
    let mut lateness = Vec::new();
    let mut durations: Vec<f64> = Vec::new();
    let mut unchanged_builds = 0u64;
    let mut other = 0u64;
    let mut others: std::collections::BTreeMap<&str, u64> = std::collections::BTreeMap::new();
    let mut page_token = String::new();
    loop {
        let page = c
            .list_builds(ListBuildsRequest {
                source: String::new(),
                page_size: 1000,
                page_token,
                ..Default::default()
            })
            .await?
            .into_inner();
        for b in &page.builds {
            let tick = seconds(b.scheduled_time);
            if b.scheduled_time.is_none() || tick < from || tick > until {
                continue;
            }
            match BuildState::try_from(b.state) {
                Ok(BuildState::SucceededUnchanged) => unchanged_builds += 1,
                Ok(state) => {
                    other += 1;
                    *others.entry(state.as_str_name()).or_insert(0u64) += 1;
                }
                Err(_) => {
                    other += 1;
                    *others.entry("unknown state").or_insert(0u64) += 1;
                }
            }
            if b.start_time.is_some() {
                lateness.push(seconds(b.start_time) - seconds(b.due_time.or(b.scheduled_time)));
            }
            if b.end_time.is_some() && b.start_time.is_some() {
                durations.push(seconds(b.end_time) - seconds(b.start_time));
            }
        }
        page_token = page.next_page_token;
        if page_token.is_empty()
            || page
                .builds
                .last()
                .is_some_and(|b| seconds(b.create_time) < from - 20.0)
        {
            break;
        }
    }
    lateness.sort_by(f64::total_cmp);
    anyhow::ensure!(!lateness.is_empty(), "no scheduled build in the window");
    let p = |q: f64| lateness[((lateness.len() as f64 * q) as usize).min(lateness.len() - 1)];
    let expected = args.sources as f64 * args.seconds as f64 / 10.0;
    let per_build = cpu.as_secs_f64() * 1000.0 / unchanged_builds.max(1) as f64;
    let (p50, p99, max) = (p(0.50), p(0.99), lateness[lateness.len() - 1]);

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("\nmerkle-bench scheduler: {cores} cores, every service on this machine\n");
    println!("| measurement | value |\n|---|---:|");
    println!("| sources on a 10 s interval | {} |", args.sources);
    println!(
        "| scheduled builds in the {} s window (expected {expected:.0}) | {unchanged_builds} unchanged{} |",
        args.seconds,
        others
            .iter()
            .map(|(state, n)| format!(", {n} {state}"))
            .collect::<String>()
    );
    println!(
        "| lateness (start - due time), p50 / p99 / max (s) | {p50:.3} / {p99:.3} / {max:.3} |"
    );
    durations.sort_by(f64::total_cmp);
    if !durations.is_empty() {
        println!(
            "| build duration (end - start), p50 / p99 (s) | {:.3} / {:.3} |",
            durations[durations.len() / 2],
            durations[(durations.len() * 99 / 100).min(durations.len() - 1)]
        );
    }
    println!("| Scheduler CPU per unchanged build (ms) | {per_build:.3} |");
    for (name, seconds) in &cpu_all {
        println!(
            "| CPU of {name} in the window (s, of {} core-seconds) | {seconds:.2} |",
            cores as u64 * args.seconds
        );
    }
    println!(
        "| unchanged rebuild of 100,000 watched files, TriggerBuild to SUCCEEDED_UNCHANGED, p50 of 10 (ms) | {:.1} |",
        unchanged_p50.as_secs_f64() * 1000.0
    );
    println!(
        "| first build of {} through the Scheduler (s) | {:.2} |",
        big.display(),
        first.as_secs_f64()
    );
    println!(
        "| Scheduler peak RSS before / after that build (MiB) | {:.1} / {:.1} |",
        rss_before as f64 / 1048576.0,
        rss_after as f64 / 1048576.0
    );
    let targets = [
        (
            format!("every tick starts within 1 s of its due time: p99 lateness {p99:.3} s"),
            p99 < 1.0,
        ),
        (
            format!("Scheduler CPU per unchanged build under 1 ms: {per_build:.3} ms"),
            per_build < 1.0,
        ),
        (
            format!(
                "unchanged rebuild of a 100,000-file watched source under 50 ms: {:.1} ms",
                unchanged_p50.as_secs_f64() * 1000.0
            ),
            unchanged_p50 < Duration::from_millis(50),
        ),
        (
            format!(
                "scheduled ticks all built (99% or more, the window's edges aside): {} of {expected:.0}",
                unchanged_builds + other
            ),
            (unchanged_builds + other) as f64 >= expected * 0.99,
        ),
    ];
    println!("\n| target | met |\n|---|---|");
    for (what, met) in targets {
        println!("| {what} | {} |", if met { "yes" } else { "NO" });
    }
    drop((scheduler, tree_builder));
    drop(storage);
    Ok(())
}
