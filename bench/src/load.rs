//! `merkle-bench load`: the release stack under many concurrent callers while builds run.
//!
//! Every service as its release binary on this machine (PostgreSQL, Redis, Cache, DbSync,
//! TreeBuilder, Scheduler, Discovery listing the TreeBuilder as a node). Sources over small
//! trees are built every few seconds while a writer changes a file in each, so syncs run
//! throughout. Callers, each with its own connections, call a mix of the real calls back to
//! back: GetLatestRoot, ListDirectory, DiffSnapshots, GetBuild, ListClients and now and then
//! TriggerBuild. One caller first (the single-caller figures), then `--callers` at once; for
//! each call: the rate, p50/p90/p99 and the errors, and each service's peak RSS.
//!
//! A TriggerBuild answered FAILED_PRECONDITION (a build of the source is still running,
//! FORBID) is counted as `busy`, not as an error: that is the answer the contract promises.

use parking_lot::RwLock;
use std::{
    collections::BTreeMap,
    fs,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use merkle_proto::{
    dbsync::v1::{
        DiffSnapshotsRequest, GetLatestRootRequest, ListDirectoryRequest, ListSnapshotsRequest,
        db_sync_service_client::DbSyncServiceClient,
    },
    discovery::v1::{ListClientsRequest, discovery_service_client::DiscoveryServiceClient},
    scheduler::v1::{
        CreateSourceRequest, GetBuildRequest, ListBuildsRequest, Source, TriggerBuildRequest,
        scheduler_service_client::SchedulerServiceClient, source::Schedule,
    },
};
use tonic::Code;

use crate::rpc::{self, Channel};

/// Options of `merkle-bench load`.
#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// Concurrent callers of the main run.
    #[arg(long, default_value_t = 200)]
    callers: usize,
    /// Seconds of the main run.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Seconds of the single-caller run before it.
    #[arg(long, default_value_t = 10)]
    single_seconds: u64,
    /// Sources built during the run (each every `--every` seconds, its tree changing).
    #[arg(long, default_value_t = 5)]
    sources: usize,
    /// Seconds between two scheduled builds of a source.
    #[arg(long, default_value_t = 5)]
    every: i64,
}

/// The calls of the mix, with their share of the calls (out of 100).
const MIX: [(Call, u32); 6] = [
    (Call::GetLatestRoot, 40),
    (Call::ListDirectory, 20),
    (Call::DiffSnapshots, 10),
    (Call::GetBuild, 15),
    (Call::ListClients, 14),
    (Call::TriggerBuild, 1),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Call {
    GetLatestRoot,
    ListDirectory,
    DiffSnapshots,
    GetBuild,
    ListClients,
    TriggerBuild,
}

/// What the callers read from: the sources, their two latest roots, a recent build of each.
#[derive(Debug, Default, Clone)]
struct Targets {
    sources: Vec<String>,
    roots: Vec<(String, String)>,
    builds: Vec<String>,
}

/// The clients of one caller (its own connections).
#[derive(Clone)]
struct Clients {
    db_sync: DbSyncServiceClient<Channel>,
    scheduler: SchedulerServiceClient<Channel>,
    discovery: DiscoveryServiceClient<Channel>,
}

/// One call's outcome.
enum Outcome {
    Ok,
    Busy,
    Error(String),
}

/// Latencies and outcomes of one kind of call.
#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    busy: u64,
    errors: u64,
    first_error: Option<String>,
}

async fn one(c: &mut Clients, call: Call, targets: &Targets, n: usize) -> Outcome {
    let pick = |v: &[String]| v[n % v.len()].clone();
    let result: Result<(), tonic::Status> = match call {
        Call::GetLatestRoot => c
            .db_sync
            .get_latest_root(GetLatestRootRequest {
                source: pick(&targets.sources),
                ..Default::default()
            })
            .await
            .map(drop),
        Call::ListDirectory => {
            let (_, root) = &targets.roots[n % targets.roots.len()];
            c.db_sync
                .list_directory(ListDirectoryRequest {
                    root_hash: root.clone(),
                    ..Default::default()
                })
                .await
                .map(drop)
        }
        Call::DiffSnapshots => {
            let (old, new) = &targets.roots[n % targets.roots.len()];
            match c
                .db_sync
                .diff_snapshots(DiffSnapshotsRequest {
                    old_root_hash: old.clone(),
                    new_root_hash: new.clone(),
                })
                .await
            {
                Ok(stream) => {
                    let mut stream = stream.into_inner();
                    loop {
                        match stream.message().await {
                            Ok(Some(_)) => {}
                            Ok(None) => break Ok(()),
                            Err(status) => break Err(status),
                        }
                    }
                }
                Err(status) => Err(status),
            }
        }
        Call::GetBuild => c
            .scheduler
            .get_build(GetBuildRequest {
                build_id: pick(&targets.builds),
            })
            .await
            .map(drop),
        Call::ListClients => c
            .discovery
            .list_clients(ListClientsRequest::default())
            .await
            .map(drop),
        Call::TriggerBuild => match c
            .scheduler
            .trigger_build(TriggerBuildRequest {
                source: pick(&targets.sources),
            })
            .await
        {
            Err(status) if status.code() == Code::FailedPrecondition => return Outcome::Busy,
            other => other.map(drop),
        },
    };
    match result {
        Ok(()) => Outcome::Ok,
        Err(status) => Outcome::Error(format!("{:?}: {}", status.code(), status.message())),
    }
}

/// The call a caller makes as its `n`th, following the mix.
fn call_of(n: usize) -> Call {
    let at = (n.wrapping_mul(2_654_435_761) % 100) as u32;
    let mut sum = 0;
    for (call, share) in MIX {
        sum += share;
        if at < sum {
            return call;
        }
    }
    Call::GetLatestRoot
}

/// Runs `callers` callers for `duration`; returns each call's tally and the elapsed time.
async fn run(
    uris: &Uris,
    targets: &Arc<RwLock<Targets>>,
    callers: usize,
    duration: Duration,
) -> anyhow::Result<(BTreeMap<Call, Tally>, Duration)> {
    let mut tasks = Vec::new();
    let began = Instant::now();
    for caller in 0..callers {
        let mut clients = Clients {
            db_sync: DbSyncServiceClient::new(rpc::channel(&uris.db_sync)?),
            scheduler: SchedulerServiceClient::new(rpc::channel(&uris.scheduler)?),
            discovery: DiscoveryServiceClient::new(rpc::channel(&uris.discovery)?),
        };
        let targets = targets.clone();
        tasks.push(tokio::spawn(async move {
            let mut tallies: BTreeMap<Call, Tally> = BTreeMap::new();
            let deadline = Instant::now() + duration;
            let mut n = caller * 7919;
            while Instant::now() < deadline {
                let call = call_of(n);
                let view = targets.read().clone();
                let t = Instant::now();
                let outcome = one(&mut clients, call, &view, n).await;
                let tally = tallies.entry(call).or_default();
                tally.latencies.push(t.elapsed());
                match outcome {
                    Outcome::Ok => {}
                    Outcome::Busy => tally.busy += 1,
                    Outcome::Error(e) => {
                        tally.errors += 1;
                        tally.first_error.get_or_insert(e);
                    }
                }
                n += 1;
            }
            tallies
        }));
    }
    let mut all: BTreeMap<Call, Tally> = BTreeMap::new();
    for task in tasks {
        for (call, t) in task.await? {
            let into = all.entry(call).or_default();
            into.latencies.extend(t.latencies);
            into.busy += t.busy;
            into.errors += t.errors;
            if into.first_error.is_none() {
                into.first_error = t.first_error;
            }
        }
    }
    Ok((all, began.elapsed()))
}

struct Uris {
    db_sync: String,
    scheduler: String,
    discovery: String,
}

/// Reads the targets the callers use from the services, now and then.
async fn refresh(uris: &Uris, names: &[String]) -> anyhow::Result<Targets> {
    let mut db_sync = DbSyncServiceClient::new(rpc::channel(&uris.db_sync)?);
    let mut scheduler = SchedulerServiceClient::new(rpc::channel(&uris.scheduler)?);
    let mut targets = Targets {
        sources: names.to_vec(),
        ..Default::default()
    };
    for name in names {
        let listed = db_sync
            .list_snapshots(ListSnapshotsRequest {
                source: name.clone(),
                page_size: 2,
                ..Default::default()
            })
            .await;
        let snapshots = match listed {
            Ok(answer) => answer.into_inner().snapshots,
            // Not built yet.
            Err(status) if status.code() == tonic::Code::NotFound => continue,
            Err(status) => return Err(status.into()),
        };
        if let [new, old, ..] = snapshots.as_slice() {
            targets
                .roots
                .push((old.root_hash.clone(), new.root_hash.clone()));
        }
    }
    let builds = scheduler
        .list_builds(ListBuildsRequest {
            page_size: 50,
            ..Default::default()
        })
        .await?
        .into_inner()
        .builds;
    targets.builds = builds.into_iter().map(|b| b.build_id).collect();
    Ok(targets)
}

/// CPU seconds of a process and, with `children`, of its children still running.
fn process_cpu(pid: u32, children: bool) -> f64 {
    let mut total = rpc::cpu_seconds(pid).unwrap_or(0.0);
    if !children {
        return total;
    }
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let parent = fs::read_to_string(entry.path().join("stat"))
                .ok()
                .and_then(|s| {
                    s[s.rfind(')')? + 2..]
                        .split_whitespace()
                        .nth(1)?
                        .parse::<u32>()
                        .ok()
                });
            if parent == Some(pid) {
                total += rpc::cpu_seconds(child).unwrap_or(0.0);
            }
        }
    }
    total
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// The table of one run: a row per call.
fn print_run(title: &str, callers: usize, tallies: &mut BTreeMap<Call, Tally>, took: Duration) {
    println!(
        "\n{title}: {callers} caller(s), {:.0} s",
        took.as_secs_f64()
    );
    println!("| call | calls | calls/s | p50 ms | p90 ms | p99 ms | errors | busy |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let (mut total, mut errors) = (0usize, 0u64);
    for (call, tally) in tallies.iter_mut() {
        tally.latencies.sort_unstable();
        if tally.latencies.is_empty() {
            continue;
        }
        total += tally.latencies.len();
        errors += tally.errors;
        println!(
            "| {call:?} | {} | {:.0} | {} | {} | {} | {} | {} |",
            tally.latencies.len(),
            tally.latencies.len() as f64 / took.as_secs_f64(),
            ms(percentile(&tally.latencies, 0.50)),
            ms(percentile(&tally.latencies, 0.90)),
            ms(percentile(&tally.latencies, 0.99)),
            tally.errors,
            tally.busy
        );
        if let Some(e) = &tally.first_error {
            println!("|   first error | {e} | | | | | | |");
        }
    }
    println!(
        "| all | {total} | {:.0} | | | | {errors} | |",
        total as f64 / took.as_secs_f64()
    );
}

fn source(name: &str, path: &Path, every: i64) -> CreateSourceRequest {
    CreateSourceRequest {
        source: Some(Source {
            name: name.into(),
            path: path.display().to_string(),
            schedule: Some(Schedule::Interval(prost_types::Duration {
                seconds: every,
                nanos: 0,
            })),
            enabled: true,
            ..Default::default()
        }),
    }
}

pub fn run_load(args: LoadArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async move { load(args).await })
}

async fn load(args: LoadArgs) -> anyhow::Result<()> {
    let storage = rpc::Storage::start("merkle-bench-load-").await?;
    let w = storage.dir();
    let (cache, db_sync) = (&storage.cache, &storage.db_sync);
    let tree_builder = rpc::start_service(
        w,
        "tree-builder",
        &[("ALLOWED_ROOTS", w.display().to_string())],
    )
    .await?;
    let clients = w.join("clients.yaml");
    fs::write(
        &clients,
        format!(
            "clients:\n- {{id: node-a, tree_builder_address: \"{}\"}}\n",
            tree_builder.uri.trim_start_matches("http://")
        ),
    )?;
    let discovery = rpc::start_service(
        w,
        "discovery",
        &[
            ("STATIC_FILE", clients.display().to_string()),
            ("CACHE_ADDR", cache.uri.clone()),
        ],
    )
    .await?;
    let scheduler = rpc::start_service(
        w,
        "scheduler",
        &[
            ("DATABASE_URL", storage.postgres.url()),
            ("CACHE_ADDR", cache.uri.clone()),
            ("DB_SYNC_ADDR", db_sync.uri.clone()),
            ("TREE_BUILDER_ADDR", tree_builder.uri.clone()),
            ("DISCOVERY_ADDR", discovery.uri.clone()),
            ("MIN_INTERVAL", "1s".into()),
        ],
    )
    .await?;
    let uris = Uris {
        db_sync: db_sync.uri.clone(),
        scheduler: scheduler.uri.clone(),
        discovery: discovery.uri.clone(),
    };

    // The sources, each a tree of 100 files; a writer changes one file of each every second.
    let mut sched = SchedulerServiceClient::new(rpc::channel(&scheduler.uri)?);
    let mut names = Vec::new();
    for i in 0..args.sources {
        let dir = w.join(format!("tree-{i}"));
        for f in 0..100 {
            let path = dir.join(format!("d{}/f{f}", f % 10));
            fs::create_dir_all(path.parent().expect("parent"))?;
            fs::write(path, format!("{i}-{f}"))?;
        }
        let name = format!("load-{i}");
        sched.create_source(source(&name, &dir, args.every)).await?;
        names.push(name);
    }
    let writer_dir = w.to_path_buf();
    let sources = args.sources;
    let writer = tokio::spawn(async move {
        for round in 0u64.. {
            for i in 0..sources {
                let _ = fs::write(
                    writer_dir.join(format!("tree-{i}/d{}/f0", round % 10)),
                    round.to_string(),
                );
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    eprintln!("waiting for two snapshots of every source ...");
    let deadline = Instant::now() + Duration::from_secs(120);
    let targets = loop {
        let t = refresh(&uris, &names).await?;
        if t.roots.len() == names.len() && !t.builds.is_empty() {
            break t;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the sources did not build twice in 2 minutes"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let targets = Arc::new(RwLock::new(targets));
    let refresher = {
        let targets = targets.clone();
        let uris = Uris {
            db_sync: uris.db_sync.clone(),
            scheduler: uris.scheduler.clone(),
            discovery: uris.discovery.clone(),
        };
        let names = names.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if let Ok(t) = refresh(&uris, &names).await
                    && t.roots.len() == names.len()
                    && !t.builds.is_empty()
                {
                    *targets.write() = t;
                }
            }
        })
    };

    let (mut single, took) =
        run(&uris, &targets, 1, Duration::from_secs(args.single_seconds)).await?;
    print_run("single caller", 1, &mut single, took);
    // (name, pid, with its children: PostgreSQL's backends; the services are the benchmark's
    // own children and are counted on their rows.)
    let processes = [
        ("scheduler", scheduler.pid, false),
        ("tree-builder", tree_builder.pid, false),
        ("db-sync", db_sync.pid, false),
        ("cache", cache.pid, false),
        ("discovery", discovery.pid, false),
        ("postgres", storage.postgres.pid().unwrap_or(0), true),
        ("redis-server", storage.redis.pid().unwrap_or(0), false),
        ("the callers (merkle-bench)", std::process::id(), false),
    ];
    let cpu_before: Vec<f64> = processes
        .iter()
        .map(|(_, pid, children)| process_cpu(*pid, *children))
        .collect();
    let (mut many, took) = run(
        &uris,
        &targets,
        args.callers,
        Duration::from_secs(args.seconds),
    )
    .await?;
    let cpu_after: Vec<f64> = processes
        .iter()
        .map(|(_, pid, children)| process_cpu(*pid, *children))
        .collect();
    print_run("under load", args.callers, &mut many, took);
    refresher.abort();
    writer.abort();

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    println!(
        "\neach process: CPU during the run under load (of {:.0} core-seconds on {cores:.0} cores; \
         PostgreSQL with its backends) and peak \
         RSS (VmHWM) after both runs:",
        took.as_secs_f64() * cores
    );
    println!("| process | CPU s | share of the machine | peak RSS (MiB) |");
    println!("|---|---:|---:|---:|");
    for (i, (name, pid, _)) in processes.iter().enumerate() {
        let cpu = cpu_after[i] - cpu_before[i];
        let share = cpu / (took.as_secs_f64() * cores) * 100.0;
        let rss = rpc::peak_rss(*pid).map_or(f64::NAN, |b| b as f64 / (1 << 20) as f64);
        println!("| {name} | {cpu:.1} | {share:.0}% | {rss:.1} |");
    }
    let errors: u64 = many.values().chain(single.values()).map(|t| t.errors).sum();
    println!(
        "\nerrors: {errors} (target 0); busy TriggerBuilds (a build still running) are not errors"
    );
    Ok(())
}
