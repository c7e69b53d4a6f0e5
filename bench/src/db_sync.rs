//! The DbSync benchmark: the release DbSync (with the release Cache and Redis in front) on its
//! own PostgreSQL (with pg_stat_statements, to count exactly which queries ran), measured from
//! a client beside a bare tonic echo through two hops and `pgbench -S`, all in one run.
//!
//! Targets: `GetLatestRoot` from DbSync's copy (LOCAL) p50 within 1.2x and p99 within 2x of
//! the one-hop echo (the hot-path issue); without the copy (HIT) within 1.5x of the two-hop
//! echo; each also with the tracer's sampler off, in the same rounds; 32 callers over 50 sources, reads 100x more frequent than changes, with at
//! least 95% of `GetLatestRoot` and `ListDirectory` calls never reaching PostgreSQL;
//! `ListDirectory` of a 10,000-entry directory and `DiffSnapshots` of two 100,000-file
//! snapshots that differ in one file at least 5x faster warm than cold; an unchanged sync of the
//! 100,000-file tree writes nothing and answers in under 100 ms; a one-file change inserts at
//! most depth + 2 rows; the first sync of that tree takes under 5 s.
//!
//! "Cold" is a second DbSync with no process memory for nodes (`NODE_CACHE_BYTES=0`) and no
//! cache (`CACHE_ADDR` unset): every node comes from PostgreSQL, as on a first read.

use std::{
    fs,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use merkle_core::{MemTree, TreeStats};
use merkle_db_sync::sql as queries;
use merkle_proto::dbsync::v1::{
    DiffSnapshotsRequest, GetLatestRootRequest, ListDirectoryRequest,
    db_sync_service_client::DbSyncServiceClient,
};
use merkle_shared::client::Channel;
use merklectl::{
    local::build_tree,
    stack::{self, Postgres, Redis},
    stored::upload,
};
use tonic_health::pb::health_client::HealthClient;

use crate::rpc::{self, Load, Row};

/// Options of `merkle-bench db-sync`.
#[derive(Debug, clap::Args)]
pub struct DbSyncBenchArgs {
    /// Seconds each latency measurement runs.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Seconds of the mixed 32-caller workload.
    #[arg(long, default_value_t = 10)]
    mixed_seconds: u64,
    /// Where the 100,000-file tree is kept between runs.
    #[arg(long, default_value = "target/bench-trees")]
    work_dir: std::path::PathBuf,
}

type Client = DbSyncServiceClient<Channel>;

/// Alternating rounds of the echo and GetLatestRoot HIT measurements.
const ROUNDS: u32 = 5;

fn client(uri: &str) -> anyhow::Result<Client> {
    Ok(DbSyncServiceClient::new(merklectl::remote::connect(uri)?)
        .max_decoding_message_size(64 << 20))
}

/// A plain channel, as the echo's client has, for the latency rows: like compared with like.
type Plain = DbSyncServiceClient<crate::rpc::Channel>;

fn plain(uri: &str) -> anyhow::Result<Plain> {
    Ok(DbSyncServiceClient::new(rpc::channel(uri)?).max_decoding_message_size(64 << 20))
}

/// 100,000 files: `wide/` holds 10,000 of them, `dNN/eN/` the other 90,000 (100 each).
pub(crate) fn generate_hundred_k(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir.join("wide"))?;
    for i in 0..10_000u32 {
        fs::write(dir.join(format!("wide/w{i:05}")), i.to_le_bytes())?;
    }
    for d in 0..90u32 {
        for e in 0..10u32 {
            let sub = dir.join(format!("d{d:02}/e{e}"));
            fs::create_dir_all(&sub)?;
            for f in 0..100u32 {
                fs::write(
                    sub.join(format!("f{f:03}")),
                    (d * 1000 + e * 100 + f).to_le_bytes(),
                )?;
            }
        }
    }
    Ok(())
}

/// Calls, and rows, of the statements pg_stat_statements has seen, by kind.
#[derive(Debug, Default, Clone, Copy)]
struct Statements {
    latest: i64,
    node: i64,
    writes: i64,
    inserted: i64,
}

async fn statements(db: &tokio_postgres::Client) -> anyhow::Result<Statements> {
    let rows = db
        .query(
            "SELECT query, calls, rows FROM pg_stat_statements \
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[],
        )
        .await?;
    let mut s = Statements::default();
    for row in rows {
        let query: String = row.get(0);
        let calls: i64 = row.get(1);
        let affected: i64 = row.get(2);
        // pg_stat_statements shows constants as parameters (`LIMIT 1` as `LIMIT $2`): compare
        // the text up to the first constant.
        let latest_text = queries::LATEST.split(" LIMIT").next().unwrap_or_default();
        if query.starts_with(latest_text) {
            s.latest += calls;
        } else if query == queries::NODE {
            s.node += calls;
        }
        let verb = query.split_whitespace().next().unwrap_or("").to_uppercase();
        if matches!(verb.as_str(), "INSERT" | "UPDATE" | "DELETE")
            || query.contains("UPDATE merkle_tree_data")
        {
            s.writes += calls;
        }
        if verb == "INSERT" {
            s.inserted += affected;
        }
    }
    Ok(s)
}

async fn next_xid(db: &tokio_postgres::Client) -> anyhow::Result<String> {
    Ok(db
        .query_one("SELECT pg_snapshot_xmax(pg_current_snapshot())::text", &[])
        .await?
        .get(0))
}

async fn timed<T>(f: impl std::future::Future<Output = T>) -> (Duration, T) {
    let started = Instant::now();
    let out = f.await;
    (started.elapsed(), out)
}

/// `pgbench -S` (one indexed point read per transaction), one client: (average latency, tps).
fn pgbench(port: u16) -> anyhow::Result<(Duration, f64)> {
    let bindir = stack::postgres_bindir()?;
    let pgbench = bindir.join("pgbench");
    let base = |cmd: &mut std::process::Command| {
        cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "merkle"]);
    };
    let mut init = std::process::Command::new(&pgbench);
    base(&mut init);
    let out = init.args(["-i", "-q", "-s", "1", "pgbench"]).output()?;
    anyhow::ensure!(
        out.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut run = std::process::Command::new(&pgbench);
    base(&mut run);
    let out = run
        .args(["-S", "-n", "-c", "1", "-j", "1", "-T", "3", "pgbench"])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "pgbench -S: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |prefix: &str| -> anyhow::Result<f64> {
        let line = text
            .lines()
            .find(|l| l.starts_with(prefix))
            .with_context(|| format!("pgbench printed no {prefix}"))?;
        line.split('=')
            .nth(1)
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("parsing {line}"))
    };
    Ok((
        Duration::from_secs_f64(field("latency average")? / 1000.0),
        field("tps")?,
    ))
}

/// A work folder and a PostgreSQL in it that loads pg_stat_statements (to count and time
/// exactly which queries ran).
pub(crate) async fn postgres_with_statements(
    prefix: &str,
) -> anyhow::Result<(tempfile::TempDir, Postgres)> {
    let work = tempfile::Builder::new().prefix(prefix).tempdir()?;
    // The Postgres folder must be reachable by the server's user when running as root.
    {
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(work.path(), fs::Permissions::from_mode(0o755))?;
    }
    let pg = Postgres::start_with(
        &work.path().join("postgres"),
        stack::free_port()?,
        &[("shared_preload_libraries", "pg_stat_statements")],
    )
    .await?;
    Ok((work, pg))
}

pub fn run(args: DbSyncBenchArgs) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(run_async(args))
}

async fn run_async(args: DbSyncBenchArgs) -> anyhow::Result<()> {
    let duration = Duration::from_secs(args.seconds);
    fs::create_dir_all(&args.work_dir)?;
    let tree_dir = args.work_dir.canonicalize()?.join("hundred-k");
    crate::trees::ensure(&tree_dir, generate_hundred_k)?;
    let (work, pg) = postgres_with_statements("merkle-bench-dbsync-").await?;
    let w = work.path();
    let redis = Redis::start(&w.join("redis"), stack::free_port()?).await?;
    let cache = rpc::start_service(w, "cache", &[("REDIS_URL", redis.url())]).await?;
    let warm = rpc::start_service(
        w,
        "db-sync",
        &[
            ("DATABASE_URL", pg.url()),
            ("CACHE_ADDR", cache.uri.clone()),
        ],
    )
    .await?;
    // The same read paths without the copy (every read a HIT: three hops), and both with the
    // tracer's sampler off, each through a Cache of the same setting.
    let without_copy = |cache: &rpc::Service, extra: &[(&'static str, String)]| {
        let mut env = vec![
            ("DATABASE_URL", pg.url()),
            ("CACHE_ADDR", cache.uri.clone()),
            ("LATEST_COPY_ENTRIES", "0".to_owned()),
        ];
        env.extend(extra.iter().cloned());
        env
    };
    let off = [("OTEL_TRACES_SAMPLER", "always_off".to_owned())];
    let cache_off =
        rpc::start_service(w, "cache", &[("REDIS_URL", redis.url()), off[0].clone()]).await?;
    let shared = rpc::start_service(w, "db-sync", &without_copy(&cache, &[])).await?;
    let shared_off = rpc::start_service(w, "db-sync", &without_copy(&cache_off, &off)).await?;
    let warm_off = rpc::start_service(
        w,
        "db-sync",
        &[
            ("DATABASE_URL", pg.url()),
            ("CACHE_ADDR", cache_off.uri.clone()),
            off[0].clone(),
        ],
    )
    .await?;
    let cold = rpc::start_service(
        w,
        "db-sync",
        &[("DATABASE_URL", pg.url()), ("NODE_CACHE_BYTES", "0".into())],
    )
    .await?;
    let (db, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    db.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .await?;
    db.batch_execute("CREATE DATABASE pgbench").await?;

    // Syncs of the 100,000-file tree.
    eprintln!("hashing {} ...", tree_dir.display());
    let (outcome, mut tree) = build_tree(&tree_dir, Default::default())?;
    let mut c = client(&warm.uri)?;
    rpc::reset_peak_rss(warm.pid)?;
    let (first_sync, answer) = timed(upload(&mut c, "big", "", &tree, &outcome.stats)).await;
    anyhow::ensure!(answer?.changed, "the first sync stored nothing");
    let first_sync_rss = rpc::peak_rss(warm.pid)?;

    let before = statements(&db).await?;
    let xid = next_xid(&db).await?;
    let mut unchanged = Duration::MAX;
    for _ in 0..5 {
        let (d, answer) = timed(upload(&mut c, "big", "", &tree, &outcome.stats)).await;
        anyhow::ensure!(!answer?.changed, "an unchanged sync stored something");
        unchanged = unchanged.min(d);
    }
    let after = statements(&db).await?;
    let unchanged_writes = after.writes - before.writes;
    let unchanged_xids_moved = next_xid(&db).await? != xid;

    // One file changed, three directories deep (the root, d42, e7, then the file), as an
    // hourly sync sees it: every stored node last used two hours ago, so the sync marks all
    // the nodes it relies on as used again (the most it ever writes besides its new rows).
    db.execute(
        "UPDATE merkle_tree_data SET last_used = now() - interval '2 hours'",
        &[],
    )
    .await?;
    let path = tree_dir.join("d42/e7/f013");
    let original = fs::read(&path)?;
    fs::write(&path, b"changed")?;
    let (changed_outcome, changed_tree) = build_tree(&tree_dir, Default::default())?;
    fs::write(&path, &original)?;
    let before = statements(&db).await?;
    let (one_file_time, answer) = timed(upload(
        &mut c,
        "big",
        "",
        &changed_tree,
        &changed_outcome.stats,
    ))
    .await;
    let answer = answer?;
    let after = statements(&db).await?;
    let inserted = after.inserted - before.inserted;
    let depth = 3;
    let old_root = tree.root;
    tree = changed_tree;

    // Latency: GetLatestRoot LOCAL, HIT and MISS, the one- and two-hop echoes, pgbench -S.
    let echo_far = rpc::start_echo(w, None).await?;
    let echo_near = rpc::start_echo(w, Some(&echo_far.uri)).await?;
    let connect_echo1 = || rpc::channel(&echo_far.uri).map(HealthClient::new);
    let connect_echo2 = || rpc::channel(&echo_near.uri).map(HealthClient::new);
    let latest = |mut c: Plain| async move {
        c.get_latest_root(GetLatestRootRequest {
            source: "big".into(),
            ..Default::default()
        })
        .await?;
        anyhow::Ok(())
    };
    // Each path is compared with its echo in alternating rounds, so that this machine's drifts
    // in speed fall on both alike; each is reported by its median round.
    let round = duration / ROUNDS;
    let mut rounds: [Vec<Load>; 6] = Default::default();
    for _ in 0..ROUNDS {
        let echo1 = rpc::measure(1, round, connect_echo1, rpc::echo_call);
        rounds[0].push(rpc::on(echo_far.pid, echo1).await?);
        let local = rpc::measure(1, round, || plain(&warm.uri), latest);
        rounds[1].push(rpc::on(warm.pid, local).await?);
        let local_off = rpc::measure(1, round, || plain(&warm_off.uri), latest);
        rounds[2].push(rpc::on(warm_off.pid, local_off).await?);
        let echo2 = rpc::measure(1, round, connect_echo2, rpc::echo_call);
        rounds[3].push(rpc::on(echo_near.pid, echo2).await?);
        let hit = rpc::measure(1, round, || plain(&shared.uri), latest);
        rounds[4].push(rpc::on(shared.pid, hit).await?);
        let hit_off = rpc::measure(1, round, || plain(&shared_off.uri), latest);
        rounds[5].push(rpc::on(shared_off.pid, hit_off).await?);
    }
    let [echo1, local, local_off, echo2, hit, hit_off] = rounds.map(rpc::median);
    let before_miss = statements(&db).await?;
    let miss = rpc::on(
        cold.pid,
        rpc::measure(1, duration, || plain(&cold.uri), latest),
    )
    .await?;
    // The counting below relies on pg_stat_statements seeing DbSync's queries by their text.
    let seen = statements(&db).await?.latest - before_miss.latest;
    anyhow::ensure!(
        seen as f64 >= miss.calls_per_sec * duration.as_secs_f64() * 0.9,
        "pg_stat_statements counted {seen} reads of the latest root for the MISS row; \
         the query counts below would be wrong"
    );
    let (pgbench_latency, pgbench_tps) = pgbench(pg.port())?;

    // ListDirectory of the 10,000-entry directory, and DiffSnapshots of the two big trees.
    let root = tree.root.to_hex();
    let list = move |page: u32| {
        let root = root.clone();
        move |mut c: Plain| {
            let root = root.clone();
            async move {
                let answer = c
                    .list_directory(ListDirectoryRequest {
                        root_hash: root,
                        path: "wide".into(),
                        page_size: page,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                anyhow::ensure!(answer.entries.len() == page as usize, "short page");
                anyhow::Ok(())
            }
        }
    };
    let warm_pid = warm.pid;
    let cold_pid = cold.pid;
    let list_warm = rpc::on(
        warm_pid,
        rpc::measure(1, duration, || plain(&warm.uri), list(1000)),
    )
    .await?;
    let list_cold = rpc::on(
        cold_pid,
        rpc::measure(1, duration, || plain(&cold.uri), list(1000)),
    )
    .await?;
    let list_all_warm = rpc::on(
        warm_pid,
        rpc::measure(1, duration, || plain(&warm.uri), list(10_000)),
    )
    .await?;
    let list_all_cold = rpc::on(
        cold_pid,
        rpc::measure(1, duration, || plain(&cold.uri), list(10_000)),
    )
    .await?;
    let (old, new) = (old_root.to_hex(), tree.root.to_hex());
    let diff = move |mut c: Plain| {
        let (old, new) = (old.clone(), new.clone());
        async move {
            let mut stream = c
                .diff_snapshots(DiffSnapshotsRequest {
                    old_root_hash: old,
                    new_root_hash: new,
                })
                .await?
                .into_inner();
            let mut n = 0;
            while let Some(batch) = stream.message().await? {
                n += batch.changes.len();
            }
            anyhow::ensure!(n == 1, "the snapshots differ in one file, not {n}");
            anyhow::Ok(())
        }
    };
    let diff_warm = rpc::on(
        warm_pid,
        rpc::measure(1, duration, || plain(&warm.uri), diff.clone()),
    )
    .await?;
    let diff_cold = rpc::on(
        cold_pid,
        rpc::measure(1, duration, || plain(&cold.uri), diff),
    )
    .await?;

    // 32 callers, 50 sources, 100 reads per change.
    let (read_queries, reads, changes) =
        mixed(w, &warm.uri, &db, Duration::from_secs(args.mixed_seconds)).await?;

    let read_pg_share = read_queries as f64 / reads.max(1) as f64;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let ratio = |cold: Load, warm: Load| cold.p50.as_secs_f64() / warm.p50.as_secs_f64();
    let targets = vec![
        (
            format!(
                "GetLatestRoot LOCAL p50 <= 1.2x the one-hop echo p50 (is {:.2}x: {:.3} ms)",
                local.p50.as_secs_f64() / echo1.p50.as_secs_f64(),
                ms(local.p50)
            ),
            local.p50.as_secs_f64() <= 1.2 * echo1.p50.as_secs_f64(),
        ),
        (
            format!(
                "GetLatestRoot LOCAL p99 <= 2x the one-hop echo p99 (is {:.2}x)",
                local.p99.as_secs_f64() / echo1.p99.as_secs_f64()
            ),
            local.p99.as_secs_f64() <= 2.0 * echo1.p99.as_secs_f64(),
        ),
        (
            format!(
                "GetLatestRoot HIT (no copy) p50 <= 1.5x the two-hop echo p50 (is {:.2}x)",
                hit.p50.as_secs_f64() / echo2.p50.as_secs_f64()
            ),
            hit.p50.as_secs_f64() <= 1.5 * echo2.p50.as_secs_f64(),
        ),
        (
            format!(
                "32 callers, 50 sources, 100 reads per change: >= 95% of {reads} GetLatestRoot and ListDirectory calls never reached PostgreSQL (is {:.1}%: {read_queries} PostgreSQL reads, counted by pg_stat_statements; {changes} changes)",
                100.0 * (1.0 - read_pg_share)
            ),
            read_pg_share <= 0.05,
        ),
        (
            format!(
                "ListDirectory of a 10,000-entry directory (a 1000-entry page): warm >= 5x faster than cold (is {:.1}x)",
                ratio(list_cold, list_warm)
            ),
            ratio(list_cold, list_warm) >= 5.0,
        ),
        (
            format!(
                "DiffSnapshots of two 100,000-file snapshots differing in one file: warm >= 5x faster than cold (is {:.1}x)",
                ratio(diff_cold, diff_warm)
            ),
            ratio(diff_cold, diff_warm) >= 5.0,
        ),
        (
            format!(
                "unchanged SyncTree of 100,000 files: no write ({unchanged_writes} write statements, transaction id {}) in under 100 ms (is {:.1} ms)",
                if unchanged_xids_moved {
                    "moved"
                } else {
                    "unmoved"
                },
                ms(unchanged)
            ),
            unchanged_writes == 0
                && !unchanged_xids_moved
                && unchanged < Duration::from_millis(100),
        ),
        (
            format!(
                "one file changed (depth {depth}): at most depth + 2 = {} rows inserted (is {inserted}, {} nodes written)",
                depth + 2,
                answer.nodes_written
            ),
            inserted <= depth + 2,
        ),
        (
            format!(
                "first SyncTree of 100,000 files ({} nodes) under 5 s (is {:.2} s)",
                outcome.node_count,
                first_sync.as_secs_f64()
            ),
            first_sync < Duration::from_secs(5),
        ),
    ];
    let row = |what: &str, load: Load| Row {
        what: what.to_owned(),
        load,
    };
    let single = |d: Duration, per_sec: f64| Load {
        clients: 1,
        p50: d,
        p99: d,
        calls_per_sec: per_sec,
        peak_rss: None,
    };
    let rows = vec![
        row("bare tonic echo, one hop (client -> echo)", echo1),
        row("GetLatestRoot, LOCAL (DbSync's copy)", local),
        row(
            "GetLatestRoot, LOCAL, OTEL_TRACES_SAMPLER=always_off",
            local_off,
        ),
        row("bare tonic echo, two hops (client -> echo -> echo)", echo2),
        row(
            "GetLatestRoot, HIT (no copy: DbSync -> Cache -> Redis)",
            hit,
        ),
        row(
            "GetLatestRoot, HIT, OTEL_TRACES_SAMPLER=always_off",
            hit_off,
        ),
        row("GetLatestRoot, MISS (PostgreSQL; no cache)", miss),
        row(
            "pgbench -S (average; p50 = p99 = average)",
            single(pgbench_latency, pgbench_tps),
        ),
        row(
            "ListDirectory wide/ (10,000 entries), 1000-entry page, warm",
            list_warm,
        ),
        row("ListDirectory wide/, 1000-entry page, cold", list_cold),
        row(
            "ListDirectory wide/, all 10,000 entries, warm",
            list_all_warm,
        ),
        row(
            "ListDirectory wide/, all 10,000 entries, cold",
            list_all_cold,
        ),
        row("DiffSnapshots, 100,000 files, one changed, warm", diff_warm),
        row("DiffSnapshots, 100,000 files, one changed, cold", diff_cold),
        row(
            "SyncTree, 100,000 files, first (once)",
            Load {
                peak_rss: Some(first_sync_rss),
                ..single(first_sync, 1.0 / first_sync.as_secs_f64())
            },
        ),
        row(
            "SyncTree, 100,000 files, unchanged (best of 5)",
            single(unchanged, 1.0 / unchanged.as_secs_f64()),
        ),
        row(
            "SyncTree, 100,000 files, one file changed, nodes last used 2 h ago (once)",
            single(one_file_time, 1.0 / one_file_time.as_secs_f64()),
        ),
    ];
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    rpc::print(
        &format!(
            "merkle-bench db-sync: {cores} cores, {} s per latency row, client and servers on this machine",
            args.seconds
        ),
        &rows,
        &targets,
    );
    drop(pg);
    Ok(())
}

/// Two trees per source, pushed in turn so every change is a new root.
struct SourceTrees {
    name: String,
    trees: [(MemTree, TreeStats); 2],
    next: AtomicU64,
}

/// The mixed workload: returns (reads that reached PostgreSQL, reads, changes).
async fn mixed(
    work: &Path,
    uri: &str,
    db: &tokio_postgres::Client,
    duration: Duration,
) -> anyhow::Result<(i64, u64, u64)> {
    let mut sources = Vec::new();
    for s in 0..50 {
        let mut trees = Vec::new();
        for version in 0..2 {
            let dir = work.join(format!("mixed/s{s:02}-{version}"));
            for f in 0..20 {
                let p = dir.join(format!("sub{}/f{f}", f % 4));
                fs::create_dir_all(p.parent().context("parent")?)?;
                fs::write(p, format!("{s}-{f}-{}", if f == 0 { version } else { 0 }))?;
            }
            let (outcome, tree) = build_tree(&dir, Default::default())?;
            trees.push((tree, outcome.stats));
        }
        let trees: [(MemTree, TreeStats); 2] =
            trees.try_into().map_err(|_| anyhow::anyhow!("two trees"))?;
        let name = format!("mixed-{s:02}");
        let mut c = client(uri)?;
        upload(&mut c, &name, "", &trees[0].0, &trees[0].1).await?;
        sources.push(SourceTrees {
            name,
            trees,
            next: AtomicU64::new(1),
        });
    }
    let sources = Arc::new(sources);
    let reads = Arc::new(AtomicU64::new(0));
    let changes = Arc::new(AtomicU64::new(0));
    let before = statements(db).await?;
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for worker in 0..32u64 {
        let (sources, reads, changes) = (sources.clone(), reads.clone(), changes.clone());
        let mut c = client(uri)?;
        tasks.push(tokio::spawn(async move {
            let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (worker + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            while Instant::now() < deadline {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let source = &sources[(x % 50) as usize];
                if x.is_multiple_of(101) {
                    let turn = source.next.fetch_add(1, Ordering::Relaxed) as usize % 2;
                    let (tree, stats) = &source.trees[turn];
                    upload(&mut c, &source.name, "", tree, stats).await?;
                    changes.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let latest = c
                    .get_latest_root(GetLatestRootRequest {
                        source: source.name.clone(),
                        ..Default::default()
                    })
                    .await?
                    .into_inner()
                    .snapshot
                    .context("snapshot")?;
                c.list_directory(ListDirectoryRequest {
                    root_hash: latest.root_hash,
                    ..Default::default()
                })
                .await?;
                reads.fetch_add(2, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let after = statements(db).await?;
    let changes = changes.load(Ordering::Relaxed);
    let reads = reads.load(Ordering::Relaxed);
    // Each change reads the latest root once inside its own transaction; that is the write
    // path, not a read that missed the cache.
    let read_queries =
        (after.latest - before.latest - changes as i64).max(0) + (after.node - before.node);
    Ok((read_queries, reads, changes))
}
