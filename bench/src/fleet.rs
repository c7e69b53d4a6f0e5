//! The fleet benchmark (the scale-out issue): a fleet source built on 10,000 nodes (or
//! `--nodes`) that the Nomad stand-in lists, their `merkle_tree_builder` addresses spread over
//! a few real TreeBuilder processes, so the whole path runs for real: Discovery, the
//! Scheduler's fan-out (`FLEET_PARALLELISM`), a node build per node, a `<source>@<node>`
//! history per node in PostgreSQL.
//!
//! Each TreeBuilder's first allowed root holds its own copy of a small tree, and the source's
//! path is relative (`site`), so each node builds the tree of the TreeBuilder it points at:
//! every node but 1% (`--differing-percent`) points at one whose tree is the same; the rest at
//! one whose tree differs in one file.
//!
//! Meanwhile 1% of the nodes change every minute (the stand-in's churn), as in a live fleet,
//! and Discovery follows them.
//!
//! Targets: the fleet build within 5 minutes; the Scheduler's peak RSS under 200 MiB;
//! identical nodes cost storage for one tree plus one snapshot row each (rows and bytes
//! counted); an unchanged rebuild writes only the builds' own rows; `ListBuilds` pages through
//! the node builds with p99 under 50 ms per page. Beside them, in the same run, the same tree
//! built as a plain source on one node.

use std::{
    fs,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use merkle_proto::scheduler::v1::{
    BuildState, CreateSourceRequest, FleetMode, GetBuildRequest, ListBuildsRequest, Source,
    TriggerBuildRequest, scheduler_service_client::SchedulerServiceClient,
};
use merkle_stand_ins::nomad::{Node, NomadStandIn};

use crate::rpc;

/// Options of `merkle-bench fleet`.
#[derive(Debug, clap::Args)]
pub struct FleetBenchArgs {
    /// Nodes the Nomad stand-in lists.
    #[arg(long, default_value_t = 10_000)]
    nodes: usize,
    /// TreeBuilder processes the nodes point at (at least 2: the last one's tree differs).
    #[arg(long, default_value_t = 4)]
    tree_builders: usize,
    /// Nodes whose tree differs from the others', in percent.
    #[arg(long, default_value_t = 1.0)]
    differing_percent: f64,
    /// The Scheduler's FLEET_PARALLELISM.
    #[arg(long, default_value_t = 32)]
    parallelism: usize,
    /// Builds per ListBuilds page.
    #[arg(long, default_value_t = 100)]
    page_size: u32,
}

type Client = SchedulerServiceClient<rpc::Channel>;

pub fn run(args: FleetBenchArgs) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(run_async(args))
}

/// The small tree every node holds: 24 files in 4 directories; `variant` changes one file.
fn write_tree(dir: &Path, variant: &str) -> anyhow::Result<()> {
    for d in ["bin", "etc", "lib", "share/doc"] {
        fs::create_dir_all(dir.join(d))?;
        for f in 0..6 {
            fs::write(
                dir.join(d).join(format!("file-{f}.txt")),
                format!("{d}/{f}\n").repeat(40),
            )?;
        }
    }
    fs::write(dir.join("etc/file-0.txt"), format!("setting = {variant}\n"))?;
    Ok(())
}

/// Rows and bytes (tables with their indexes and TOAST) of the tables a build writes.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    tree_nodes: i64,
    snapshots: i64,
    sources: i64,
    builds: i64,
    tree_bytes: i64,
    snapshot_bytes: i64,
    build_bytes: i64,
}

async fn usage(db: &tokio_postgres::Client) -> anyhow::Result<Usage> {
    // The planner's statistics are not what is wanted here: count, and size after a VACUUM
    // so that the bytes are the pages in use.
    db.batch_execute("VACUUM merkle_tree_data, merkle_roots, scheduler_builds")
        .await?;
    let row = db
        .query_one(
            "SELECT (SELECT count(*) FROM merkle_tree_data), (SELECT count(*) FROM merkle_roots), \
             (SELECT count(*) FROM merkle_sources), (SELECT count(*) FROM scheduler_builds), \
             pg_total_relation_size('merkle_tree_data'), pg_total_relation_size('merkle_roots'), \
             pg_total_relation_size('scheduler_builds')",
            &[],
        )
        .await?;
    Ok(Usage {
        tree_nodes: row.get(0),
        snapshots: row.get(1),
        sources: row.get(2),
        builds: row.get(3),
        tree_bytes: row.get(4),
        snapshot_bytes: row.get(5),
        build_bytes: row.get(6),
    })
}

async fn create(c: &mut Client, name: &str, fleet: bool) -> anyhow::Result<Duration> {
    let started = Instant::now();
    c.create_source(CreateSourceRequest {
        source: Some(Source {
            name: name.into(),
            path: "site".into(),
            enabled: true,
            fleet_mode: if fleet {
                FleetMode::AllClients as i32
            } else {
                FleetMode::Unspecified as i32
            },
            ..Default::default()
        }),
    })
    .await
    .with_context(|| format!("creating source {name}"))?;
    Ok(started.elapsed())
}

/// Triggers a build and polls it to its end (a fleet build outlasts a stream's patience);
/// returns how long it took and the build as it ended.
async fn build(
    c: &mut Client,
    source: &str,
    poll: Duration,
) -> anyhow::Result<(Duration, merkle_proto::scheduler::v1::Build)> {
    let started = Instant::now();
    let id = c
        .trigger_build(TriggerBuildRequest {
            source: source.into(),
        })
        .await?
        .into_inner()
        .build_id;
    loop {
        let b = c
            .get_build(GetBuildRequest {
                build_id: id.clone(),
            })
            .await?
            .into_inner()
            .build
            .context("GetBuild answered no build")?;
        let state = BuildState::try_from(b.state)?;
        if !matches!(state, BuildState::Queued | BuildState::Running) {
            return Ok((started.elapsed(), b));
        }
        tokio::time::sleep(poll).await;
    }
}

/// A build of the source `fleet`, which must end in `expected`; its failed nodes are named.
async fn fleet_build(
    c: &mut Client,
    expected: BuildState,
) -> anyhow::Result<(Duration, merkle_proto::scheduler::v1::Build)> {
    let (took, fleet) = build(c, "fleet", Duration::from_millis(200)).await?;
    anyhow::ensure!(
        fleet.state == expected as i32,
        "the fleet build ended {fleet:?}, not {expected:?}"
    );
    if !fleet.error_message.is_empty() {
        eprintln!(
            "the fleet build {}: {}",
            fleet.build_id, fleet.error_message
        );
    }
    Ok((took, fleet))
}

/// Every build of `source` through ListBuilds, page by page: the page latencies and, per
/// parent build id, the node builds' states.
async fn page_through(
    c: &mut Client,
    source: &str,
    page_size: u32,
) -> anyhow::Result<(
    Vec<Duration>,
    std::collections::HashMap<String, Vec<BuildState>>,
)> {
    let (mut took, mut children) = (Vec::new(), std::collections::HashMap::new());
    let mut page_token = String::new();
    loop {
        let started = Instant::now();
        let page = c
            .list_builds(ListBuildsRequest {
                source: source.into(),
                page_size,
                page_token,
                ..Default::default()
            })
            .await?
            .into_inner();
        took.push(started.elapsed());
        for b in page.builds {
            if !b.parent_build_id.is_empty() {
                children
                    .entry(b.parent_build_id.clone())
                    .or_insert_with(Vec::new)
                    .push(BuildState::try_from(b.state)?);
            }
        }
        page_token = page.next_page_token;
        if page_token.is_empty() {
            return Ok((took, children));
        }
    }
}

/// GetDrift of a fleet source, timed, beside the way a client would find the same without it.
struct Drift {
    baseline: u64,
    outliers: u64,
    groups: u64,
    paths: u64,
    first: Duration,
    calls: Vec<Duration>,
    p50: Duration,
    p99: Duration,
    peer: Duration,
    peer_pages: usize,
}

async fn measure_drift(db_sync: &str, fleet: &str) -> anyhow::Result<Drift> {
    use merkle_proto::dbsync::v1::{
        DiffSnapshotsRequest, GetDriftRequest, ListSourcesRequest,
        db_sync_service_client::DbSyncServiceClient,
    };
    let mut c =
        DbSyncServiceClient::new(rpc::channel(db_sync)?).max_decoding_message_size(64 << 20);
    let ask = GetDriftRequest {
        fleet_source: fleet.into(),
        page_size: 100,
        ..Default::default()
    };
    let mut calls = Vec::new();
    let mut answer = None;
    for _ in 0..21 {
        let started = Instant::now();
        let page = c.get_drift(ask.clone()).await?.into_inner();
        calls.push(started.elapsed());
        answer = Some(page);
    }
    let answer = answer.context("no drift answer")?;
    let first = calls.remove(0);
    let mut sorted = calls.clone();
    let (p50, p99) = (percentile(&mut sorted, 0.5), percentile(&mut sorted, 0.99));
    let baseline = answer.baseline.clone().unwrap_or_default();
    // The peer: read every source's latest root (ListSources pages through all of them, the
    // node histories among them), group by root here, and diff one outlier against the baseline.
    let prefix = format!("{fleet}@");
    let mut peers = Vec::new();
    let mut peer_pages = 0;
    for _ in 0..5 {
        let started = Instant::now();
        let mut roots: std::collections::HashMap<String, usize> = Default::default();
        let mut token = String::new();
        peer_pages = 0;
        loop {
            let page = c
                .list_sources(ListSourcesRequest {
                    page_size: 1000,
                    page_token: token,
                })
                .await?
                .into_inner();
            peer_pages += 1;
            for s in page
                .sources
                .iter()
                .filter(|s| s.source.starts_with(&prefix))
            {
                let root = s
                    .latest
                    .as_ref()
                    .map(|l| l.root_hash.clone())
                    .unwrap_or_default();
                *roots.entry(root).or_default() += 1;
            }
            token = page.next_page_token;
            if token.is_empty() {
                break;
            }
        }
        let common = roots
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(r, _)| r.clone());
        let other = roots.keys().find(|r| Some(*r) != common.as_ref()).cloned();
        if let (Some(old), Some(new)) = (common, other) {
            let mut diff = c
                .diff_snapshots(DiffSnapshotsRequest {
                    old_root_hash: old,
                    new_root_hash: new,
                })
                .await?
                .into_inner();
            while diff.message().await?.is_some() {}
        }
        peers.push(started.elapsed());
    }
    Ok(Drift {
        baseline: baseline.member_count,
        outliers: answer.outlier_count,
        groups: answer.outlier_group_count,
        paths: answer.outliers.iter().map(|g| g.change_count).sum(),
        first,
        calls,
        p50,
        p99,
        peer: percentile(&mut peers, 0.5),
        peer_pages,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

fn percentile(values: &mut [Duration], q: f64) -> Duration {
    values.sort();
    values[((values.len() as f64 * q) as usize).min(values.len() - 1)]
}

fn count_states(states: &[BuildState]) -> String {
    let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
    for s in states {
        *counts.entry(s.as_str_name()).or_default() += 1;
    }
    counts
        .iter()
        .map(|(s, n)| format!("{n} {s}"))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn run_async(args: FleetBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.tree_builders >= 2, "--tree-builders: at least 2");
    let storage = rpc::Storage::start("merkle-bench-fleet-").await?;
    let w = storage.dir();
    let pg = &storage.postgres;

    // The TreeBuilders, each with its own copy of the tree; the last one's differs.
    let mut tree_builders = Vec::new();
    for k in 0..args.tree_builders {
        let root = w.join(format!("node-root-{k}"));
        let last = k + 1 == args.tree_builders;
        write_tree(&root.join("site"), if last { "outlier" } else { "common" })?;
        tree_builders.push(
            rpc::start_service(
                w,
                "tree-builder",
                &[
                    ("ALLOWED_ROOTS", root.display().to_string()),
                    ("MAX_CONCURRENT_BUILDS", "16".into()),
                ],
            )
            .await?,
        );
    }
    let address = |k: usize| {
        tree_builders[k]
            .uri
            .trim_start_matches("http://")
            .to_owned()
    };

    // The fleet: 1% of the nodes point at the last TreeBuilder, the rest spread over the others.
    let differing = ((args.nodes as f64 * args.differing_percent / 100.0).round() as usize)
        .clamp(1, args.nodes);
    let nomad = NomadStandIn::start().await?;
    for n in 0..args.nodes {
        let mut node = Node::numbered(n);
        let stride = (args.nodes / differing).max(1);
        let k = if n % stride == 0 && n / stride < differing {
            args.tree_builders - 1
        } else {
            n % (args.tree_builders - 1)
        };
        node.meta.insert("merkle_tree_builder".into(), address(k));
        nomad.upsert(node);
    }
    let discovery = rpc::start_service(
        w,
        "discovery",
        &[
            ("DISCOVERY_BACKEND", "nomad".into()),
            ("NOMAD_ADDR", nomad.addr()),
            ("CACHE_ADDR", storage.cache.uri.clone()),
        ],
    )
    .await?;
    let scheduler = rpc::start_service(
        w,
        "scheduler",
        &[
            ("DATABASE_URL", pg.url()),
            ("CACHE_ADDR", storage.cache.uri.clone()),
            ("DB_SYNC_ADDR", storage.db_sync.uri.clone()),
            ("TREE_BUILDER_ADDR", tree_builders[0].uri.clone()),
            ("DISCOVERY_ADDR", discovery.uri.clone()),
            ("FLEET_PARALLELISM", args.parallelism.to_string()),
        ],
    )
    .await?;
    let mut c = SchedulerServiceClient::new(rpc::channel(&scheduler.uri)?);
    // The fleet lives on meanwhile: 1% of the nodes change every minute, which Discovery
    // follows by blocking queries.
    // A WatchClients stream is open throughout, as an operator's console keeps one: Discovery
    // then follows the fleet by blocking queries rather than at each list's expiry.
    let mut watch =
        merkle_proto::discovery::v1::discovery_service_client::DiscoveryServiceClient::new(
            rpc::channel(&discovery.uri)?,
        )
        .watch_clients(merkle_proto::discovery::v1::WatchClientsRequest {})
        .await?
        .into_inner();
    let events = tokio::spawn(async move {
        let mut changed = 0u64;
        while let Ok(Some(event)) = watch.message().await {
            changed += u64::from(
                event.event_type == merkle_proto::discovery::v1::ClientEventType::Changed as i32,
            );
        }
        changed
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    nomad.reset_calls();
    let churn = nomad.churn(1.0, Duration::from_secs(60));
    let (db, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls).await?;
    tokio::spawn(connection);

    // The peer: the same tree as a plain source on one node (TREE_BUILDER_ADDR's).
    create(&mut c, "one", false).await?;
    let before_one = usage(&db).await?;
    let (one_first, b) = build(&mut c, "one", Duration::from_millis(5)).await?;
    anyhow::ensure!(
        b.state == BuildState::SucceededChanged as i32,
        "the single-node build ended {b:?}"
    );
    let one = usage(&db).await?;
    let mut one_unchanged = Vec::new();
    for _ in 0..10 {
        let (took, b) = build(&mut c, "one", Duration::from_millis(5)).await?;
        anyhow::ensure!(
            b.state == BuildState::SucceededUnchanged as i32,
            "an unchanged single-node build ended {b:?}"
        );
        one_unchanged.push(took);
    }
    let one_unchanged = percentile(&mut one_unchanged, 0.5);

    // The fleet source: CreateSource asks every node's TreeBuilder about the path.
    eprintln!("creating the fleet source on {} nodes ...", args.nodes);
    let created = create(&mut c, "fleet", true).await?;
    let before = usage(&db).await?;
    rpc::reset_peak_rss(scheduler.pid)?;
    rpc::reset_peak_rss(discovery.pid)?;
    let cpu_before = rpc::cpu_seconds(scheduler.pid)?;
    eprintln!("building it ...");
    let (first, fleet) = fleet_build(&mut c, BuildState::SucceededChanged).await?;
    let first_cpu = rpc::cpu_seconds(scheduler.pid)? - cpu_before;
    let scheduler_rss = rpc::peak_rss(scheduler.pid)?;
    let built = usage(&db).await?;

    eprintln!("building it again, unchanged ...");
    let (again, rebuild) = fleet_build(&mut c, BuildState::SucceededUnchanged).await?;
    let rebuilt = usage(&db).await?;
    let discovery_rss = rpc::peak_rss(discovery.pid)?;
    let churned = churn.stop().await;
    let served = nomad.calls();
    events.abort();

    eprintln!("paging through the builds ...");
    let (mut pages, children) = page_through(&mut c, "fleet", args.page_size).await?;
    let first_nodes = children.get(&fleet.build_id).cloned().unwrap_or_default();
    let again_nodes = children.get(&rebuild.build_id).cloned().unwrap_or_default();
    let page_count = pages.len();
    let (page50, page99) = (percentile(&mut pages, 0.5), percentile(&mut pages, 0.99));
    eprintln!("asking for the fleet's drift ...");
    let drift = measure_drift(&storage.db_sync.uri, "fleet").await?;
    let cli_started = Instant::now();
    let credentials = merklectl::credentials::Credentials::ensure(w)?;
    let cli = std::process::Command::new(merklectl::stack::binary_dir()?.join("merklectl"))
        .args(["builds", "fleet", "--limit", &args.page_size.to_string()])
        .env("SCHEDULER_ADDR", &scheduler.uri)
        .env(
            merklectl::credentials::TOKEN_FILE_VARIABLE,
            credentials.token_file("admin"),
        )
        .output()?;
    let cli_took = cli_started.elapsed();
    anyhow::ensure!(
        cli.status.success(),
        "merklectl builds failed: {}",
        String::from_utf8_lossy(&cli.stderr)
    );
    let drift_cli_started = Instant::now();
    let drift_cli = std::process::Command::new(merklectl::stack::binary_dir()?.join("merklectl"))
        .args(["drift", "fleet"])
        .env("DB_SYNC_ADDR", &storage.db_sync.uri)
        .env(
            merklectl::credentials::TOKEN_FILE_VARIABLE,
            credentials.token_file("reader"),
        )
        .output()?;
    let drift_cli_took = drift_cli_started.elapsed();
    anyhow::ensure!(
        drift_cli.status.code() == Some(1),
        "merklectl drift did not report the outliers: {}",
        String::from_utf8_lossy(&drift_cli.stderr)
    );

    let per_node = |a: i64, b: i64| (b - a) as f64 / args.nodes as f64;
    let tree_rows_one = one.tree_nodes - before_one.tree_nodes;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "\nmerkle-bench fleet: {cores} cores, {} Nomad nodes (stand-in) over {} TreeBuilders ({differing} nodes with a differing tree), FLEET_PARALLELISM {}, every service on this machine\n",
        args.nodes, args.tree_builders, args.parallelism
    );
    println!(
        "| measurement | one node (plain source) | fleet of {} |",
        args.nodes
    );
    println!("|---|---:|---:|");
    println!(
        "| first build, TriggerBuild to SUCCEEDED_CHANGED (s) | {:.3} | {:.1} |",
        one_first.as_secs_f64(),
        first.as_secs_f64()
    );
    println!(
        "| node builds per second | | {:.0} |",
        args.nodes as f64 / first.as_secs_f64()
    );
    println!(
        "| unchanged rebuild (s) | {:.3} (p50 of 10) | {:.1} |",
        one_unchanged.as_secs_f64(),
        again.as_secs_f64()
    );
    println!(
        "| node builds of the first / the unchanged fleet build | | {} / {} |",
        count_states(&first_nodes),
        count_states(&again_nodes)
    );
    println!(
        "| Scheduler CPU during the first build (s; per node build, ms) | | {first_cpu:.1}; {:.2} |",
        first_cpu * 1000.0 / args.nodes as f64
    );
    println!(
        "| Scheduler peak RSS during the builds (MiB) | | {:.1} |",
        mib(scheduler_rss)
    );
    println!(
        "| Discovery peak RSS during the builds (MiB) | | {:.1} |",
        mib(discovery_rss)
    );
    println!(
        "| nodes changed meanwhile (1% a minute); Discovery's Nomad calls: blocking queries / list pages / details | | {churned}; {} / {} / {} |",
        served.blocking, served.list, served.detail
    );
    println!(
        "| CreateSource, every node's path checked (ms) | | {:.0} |",
        ms(created)
    );
    println!(
        "| tree rows (merkle_tree_data) written by the first build | {tree_rows_one} | {} |",
        built.tree_nodes - before.tree_nodes
    );
    println!(
        "| snapshot rows written by the first build (per node) | {} | {} ({:.2}) |",
        one.snapshots - before_one.snapshots,
        built.snapshots - before.snapshots,
        per_node(before.snapshots, built.snapshots)
    );
    println!(
        "| bytes of tree / snapshot rows written by the first build, per node | | {:.0} / {:.0} |",
        per_node(before.tree_bytes, built.tree_bytes),
        per_node(before.snapshot_bytes, built.snapshot_bytes)
    );
    println!(
        "| rows written by the unchanged rebuild: tree / snapshot / build (per node) | | {} / {} / {} ({:.2}) |",
        rebuilt.tree_nodes - built.tree_nodes,
        rebuilt.snapshots - built.snapshots,
        rebuilt.builds - built.builds,
        per_node(built.builds, rebuilt.builds)
    );
    println!(
        "| bytes of build rows (scheduler_builds) per node build | | {:.0} |",
        (rebuilt.build_bytes - built.build_bytes) as f64
            / (rebuilt.builds - built.builds).max(1) as f64
    );
    println!(
        "| histories (`<source>@<node>`) in PostgreSQL | | {} |",
        rebuilt.sources - before.sources
    );
    println!(
        "| ListBuilds of the source, {} builds in {page_count} pages of {}: p50 / p99 per page (ms) | | {:.1} / {:.1} |",
        rebuilt.builds - before.builds,
        args.page_size,
        ms(page50),
        ms(page99)
    );
    println!(
        "| `merklectl builds fleet --limit {}`, whole command (ms) | | {:.0} |",
        args.page_size,
        ms(cli_took)
    );

    println!(
        "| GetDrift of the fleet: baseline nodes / outlier nodes / outlier roots / paths differing | | {} / {} / {} / {} |",
        drift.baseline, drift.outliers, drift.groups, drift.paths
    );
    println!(
        "| GetDrift of the fleet, first call / p50 / p99 of {} (ms) | | {:.1} / {:.1} / {:.1} |",
        drift.calls.len(),
        ms(drift.first),
        ms(drift.p50),
        ms(drift.p99)
    );
    println!(
        "| the same without GetDrift: every node's latest root by ListSources ({} pages) + one DiffSnapshots, p50 (ms) | | {:.1} |",
        drift.peer_pages,
        ms(drift.peer)
    );
    println!(
        "| `merklectl drift fleet`, whole command (ms) | | {:.0} |",
        ms(drift_cli_took)
    );

    // Identical nodes: one tree for the common nodes plus one (differing in one file, so a few
    // rows) for the outliers; every node one snapshot row.
    let distinct_trees_allowed = 2 * tree_rows_one;
    let targets = [
        (
            format!(
                "the fleet build within 5 minutes (is {:.1} s)",
                first.as_secs_f64()
            ),
            first <= Duration::from_secs(300),
        ),
        (
            format!(
                "drift of the fleet under 1 s (p99 {:.1} ms, one node in {} differing)",
                ms(drift.p99),
                args.nodes / differing
            ),
            drift.p99 < Duration::from_secs(1) && drift.outliers as usize == differing,
        ),
        (
            format!(
                "Scheduler peak RSS under 200 MiB (is {:.1} MiB)",
                mib(scheduler_rss)
            ),
            scheduler_rss < 200 << 20,
        ),
        (
            format!(
                "identical nodes cost one tree plus one snapshot row each: {} tree rows (one node's tree is {tree_rows_one}), {} snapshot rows for {} nodes",
                built.tree_nodes - before.tree_nodes,
                built.snapshots - before.snapshots,
                args.nodes
            ),
            built.tree_nodes - before.tree_nodes <= distinct_trees_allowed
                && built.snapshots - before.snapshots == args.nodes as i64,
        ),
        (
            format!(
                "an unchanged rebuild writes only the builds' own rows: {} tree, {} snapshot rows",
                rebuilt.tree_nodes - built.tree_nodes,
                rebuilt.snapshots - built.snapshots
            ),
            rebuilt.tree_nodes == built.tree_nodes && rebuilt.snapshots == built.snapshots,
        ),
        (
            format!(
                "every node built: {} node builds succeeded of {} and {} of {}",
                first_nodes
                    .iter()
                    .filter(|s| **s == BuildState::SucceededChanged)
                    .count(),
                args.nodes,
                again_nodes
                    .iter()
                    .filter(|s| **s == BuildState::SucceededUnchanged)
                    .count(),
                args.nodes
            ),
            first_nodes
                .iter()
                .filter(|s| **s == BuildState::SucceededChanged)
                .count()
                == args.nodes
                && again_nodes
                    .iter()
                    .filter(|s| **s == BuildState::SucceededUnchanged)
                    .count()
                    == args.nodes,
        ),
        (
            format!(
                "Discovery follows the churn with one detail per changed node and at most 2 list pages per 1,000 nodes per wake-up: {} details for {churned} changes, {} pages for {} blocking queries",
                served.detail, served.list, served.blocking
            ),
            served.detail <= churned
                && served.list <= 2 * args.nodes.div_ceil(1000) as u64 * served.blocking.max(1),
        ),
        (
            format!(
                "Discovery's peak RSS under 100 MiB with the list, a watch and the churn (is {:.1} MiB)",
                mib(discovery_rss)
            ),
            discovery_rss < 100 << 20,
        ),
        (
            format!(
                "ListBuilds p99 under 50 ms per page (is {:.1} ms)",
                ms(page99)
            ),
            page99 < Duration::from_millis(50),
        ),
    ];
    println!("\n| target | met |\n|---|---|");
    for (what, met) in targets {
        println!("| {what} | {} |", if met { "yes" } else { "NO" });
    }
    drop((scheduler, discovery, tree_builders));
    drop(storage);
    Ok(())
}
