//! The transparency-log benchmark (the transparency-log issue): how fast records join the log
//! and get a signed checkpoint, and what proofs cost in a log of 1,000,000 leaves.
//!
//! A release DbSync (signing key, the default `LOG_INTERVAL` of 500 ms) on its own PostgreSQL:
//!
//! 1. `--sources` clients push changed trees (100 files, one changed each time) to a source
//!    each, back to back, for `--seconds`: every push stores a record the log takes in. The
//!    lag of each record, from its snapshot's commit to the first checkpoint that covers it,
//!    is read from PostgreSQL afterwards (both times are stamped there or by DbSync on this
//!    machine).
//! 2. `--leaves` records are queued at once (as that many syncs would queue them, in SQL), and
//!    the time until a checkpoint covers them all gives the log's append rate.
//! 3. `--proofs` inclusion proofs of random leaves and consistency proofs from random sizes in
//!    that log, over gRPC, beside the bare health check on the same connection: the proof's
//!    own cost is the difference.
//!
//! Targets: ≥ 1,000 records/s appended; checkpoint lag p99 ≤ 1 s; each proof under 1 ms
//! server-side at 1,000,000 leaves. Anchors (their published figures, not measured here):
//! Trillian Tessera's POSIX driver ~2,900 entries/s on a 12-core VM, its MySQL driver ~300/s on
//! a small VM.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use merkle_proto::dbsync::v1::{
    GetLogCheckpointRequest, GetLogConsistencyProofRequest, GetLogInclusionProofRequest,
    db_sync_service_client::DbSyncServiceClient,
};
use merklectl::{history::ensure_signing_key, local::build_tree, stored::upload};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::rpc::{self, Load, Row};

/// Options of `merkle-bench log`.
#[derive(Debug, clap::Args)]
pub struct LogBenchArgs {
    /// Sources pushed concurrently in phase 1.
    #[arg(long, default_value_t = 16)]
    sources: usize,
    /// How long phase 1 pushes.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Records queued at once in phase 2 (the log's size for the proofs).
    #[arg(long, default_value_t = 1_000_000)]
    leaves: u64,
    /// Proofs of each kind timed in phase 3.
    #[arg(long, default_value_t = 2000)]
    proofs: usize,
}

pub fn run(args: LogBenchArgs) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(run_async(args))
}

fn load(mut times: Vec<Duration>) -> Load {
    times.sort();
    let at = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize];
    let total: Duration = times.iter().sum();
    Load {
        clients: 1,
        p50: at(0.5),
        p99: at(0.99),
        calls_per_sec: times.len() as f64 / total.as_secs_f64(),
        peak_rss: None,
    }
}

/// A small deterministic generator (xorshift64*) for the random leaves and sizes.
struct Random(u64);

impl Random {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

type Client = DbSyncServiceClient<rpc::Channel>;

/// The newest checkpoint's size once it reaches `size` (polled every 20 ms, within `limit`).
async fn wait_for_size(c: &mut Client, size: u64, limit: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        let now = c
            .get_log_checkpoint(GetLogCheckpointRequest::default())
            .await
            .map(|r| r.into_inner().size)
            .unwrap_or(0);
        if now >= size {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(
            started.elapsed() < limit,
            "the log reached {now} of {size} leaves in {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn run_async(args: LogBenchArgs) -> anyhow::Result<()> {
    let (work, pg) = crate::db_sync::postgres_with_statements("merkle-bench-log-").await?;
    let w = work.path();
    let keys = w.join("keys");
    std::fs::create_dir_all(&keys)?;
    let private = ensure_signing_key(&keys)?;
    let db_sync = rpc::start_service(
        w,
        "db-sync",
        &[
            ("DATABASE_URL", pg.url()),
            ("SIGNING_KEY_FILE", private.display().to_string()),
        ],
    )
    .await?;
    let (db, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let mut c: Client =
        DbSyncServiceClient::new(rpc::channel(&db_sync.uri)?).max_decoding_message_size(64 << 20);

    // Phase 1: concurrent changed syncs.
    let tree_dir = w.join("tree");
    for f in 0..100 {
        let sub = tree_dir.join(format!("d{}", f % 10));
        std::fs::create_dir_all(&sub)?;
        std::fs::write(sub.join(format!("f{f:03}")), format!("{f}"))?;
    }
    let (outcome, a) = build_tree(&tree_dir, Default::default())?;
    std::fs::write(tree_dir.join("d3/f003"), "changed")?;
    let (_, b) = build_tree(&tree_dir, Default::default())?;
    let stats = outcome.stats;
    eprintln!(
        "phase 1: {} sources pushing for {} s ...",
        args.sources, args.seconds
    );
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let mut tasks = Vec::new();
    for i in 0..args.sources {
        let uri = db_sync.uri.clone();
        let trees = [a.clone(), b.clone()];
        tasks.push(tokio::spawn(async move {
            let mut client = DbSyncServiceClient::new(merklectl::remote::connect(&uri)?);
            let source = format!("bench-{i}");
            let mut times = Vec::new();
            let mut round = 0;
            while Instant::now() < deadline {
                let started = Instant::now();
                let answer = upload(&mut client, &source, "", &trees[round % 2], &stats).await?;
                times.push(started.elapsed());
                anyhow::ensure!(answer.changed, "a push of a new root stored nothing");
                round += 1;
            }
            anyhow::Ok(times)
        }));
    }
    let pushing = Instant::now();
    let mut push_times = Vec::new();
    for task in tasks {
        push_times.extend(task.await??);
    }
    let pushed_for = pushing.elapsed();
    let records = push_times.len() as u64;
    wait_for_size(&mut c, records, Duration::from_secs(30)).await?;
    let lag = db
        .query_one(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY lag), \
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY lag), max(lag) \
             FROM (SELECT extract(epoch FROM (SELECT min(c.created_at) FROM merkle_log_checkpoints c \
                   WHERE c.size > l.index) - r.created_at)::float8 AS lag \
                   FROM merkle_log_leaves l JOIN merkle_roots r ON r.id = l.snapshot_id) t",
            &[],
        )
        .await?;
    let (lag50, lag99, lag_max): (f64, f64, f64) = (lag.get(0), lag.get(1), lag.get(2));
    let checkpoints: i64 = db
        .query_one("SELECT count(*) FROM merkle_log_checkpoints", &[])
        .await?
        .get(0);

    // Phase 2: a million records queued at once.
    eprintln!("phase 2: queuing {} records ...", args.leaves);
    for start in (0..args.leaves).step_by(100_000) {
        let end = (start + 100_000).min(args.leaves);
        db.execute(
            "INSERT INTO merkle_log_pending (snapshot_id, source, sequence, record_hash) \
             SELECT 100000000 + i, 'bulk', i + 1, sha256(int8send(i)) \
             FROM generate_series($1::bigint, $2::bigint - 1) i",
            &[&(start as i64), &(end as i64)],
        )
        .await?;
    }
    let total = records + args.leaves;
    let appended_in = wait_for_size(&mut c, total, Duration::from_secs(900)).await?;
    let rate = args.leaves as f64 / appended_in.as_secs_f64();

    // Phase 3: proofs in the log of `total` leaves, beside the bare health check.
    eprintln!("phase 3: {} proofs of each kind ...", args.proofs);
    let mut health = HealthClient::new(rpc::channel(&db_sync.uri)?);
    let mut random = Random(0x9e37_79b9_7f4a_7c15);
    let (mut echo, mut inclusion, mut consistency) = (Vec::new(), Vec::new(), Vec::new());
    let mut proof_hashes = (0, 0);
    for _ in 0..args.proofs {
        let started = Instant::now();
        health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await?;
        echo.push(started.elapsed());
        let leaf = random.below(total);
        let started = Instant::now();
        let proof = c
            .get_log_inclusion_proof(GetLogInclusionProofRequest {
                leaf_index: leaf,
                tree_size: total,
                ..Default::default()
            })
            .await?
            .into_inner();
        inclusion.push(started.elapsed());
        proof_hashes.0 = proof_hashes.0.max(proof.hashes.len());
        let old = 1 + random.below(total - 1);
        let started = Instant::now();
        let proof = c
            .get_log_consistency_proof(GetLogConsistencyProofRequest {
                old_size: old,
                new_size: total,
            })
            .await?
            .into_inner();
        consistency.push(started.elapsed());
        proof_hashes.1 = proof_hashes.1.max(proof.hashes.len());
    }
    let rss = rpc::peak_rss(db_sync.pid)?;
    let (echo, inclusion, consistency) = (load(echo), load(inclusion), load(consistency));
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let inclusion_own = ms(inclusion.p50) - ms(echo.p50);
    let consistency_own = ms(consistency.p50) - ms(echo.p50);
    let pushes = load(push_times);

    let rows = vec![
        Row {
            what: format!(
                "phase 1: changed push (100 files, one changed), {} sources at once, {records} records in {:.1} s",
                args.sources,
                pushed_for.as_secs_f64()
            ),
            load: Load {
                clients: args.sources,
                calls_per_sec: records as f64 / pushed_for.as_secs_f64(),
                ..pushes
            },
        },
        Row {
            what: format!(
                "grpc.health.v1.Health/Check on DbSync, the bare round trip ({} calls)",
                args.proofs
            ),
            load: echo,
        },
        Row {
            what: format!(
                "GetLogInclusionProof, random leaf of {total} ({} hashes at most)",
                proof_hashes.0
            ),
            load: inclusion,
        },
        Row {
            what: format!(
                "GetLogConsistencyProof, random old size to {total} ({} hashes at most)",
                proof_hashes.1
            ),
            load: consistency,
        },
    ];
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "\nmerkle-bench log: {cores} cores, DbSync (release, LOG_INTERVAL 500ms) and PostgreSQL on this machine\n"
    );
    println!("| measurement | value |\n|---|---:|");
    println!(
        "| phase 1: records stored by concurrent syncs (per second) | {records} ({:.0}/s) |",
        records as f64 / pushed_for.as_secs_f64()
    );
    println!(
        "| phase 1: checkpoint lag, commit to covering checkpoint: p50 / p99 / max (s) | {lag50:.3} / {lag99:.3} / {lag_max:.3} |"
    );
    println!("| phase 1: checkpoints signed | {checkpoints} |");
    println!(
        "| phase 2: {} records queued at once, appended and checkpointed in (s; records/s) | {:.1}; {rate:.0} |",
        args.leaves,
        appended_in.as_secs_f64()
    );
    println!(
        "| phase 3: proof's own cost, p50 minus the health check's: inclusion / consistency (ms) | {inclusion_own:.3} / {consistency_own:.3} |"
    );
    println!("| DbSync peak RSS (MiB) | {:.1} |", rss as f64 / 1048576.0);
    let targets = vec![
        (
            format!(
                "≥ 1,000 records/s appended (is {rate:.0}/s at once; the log kept up with {:.0}/s of concurrent syncs)",
                records as f64 / pushed_for.as_secs_f64()
            ),
            rate >= 1000.0,
        ),
        (
            format!("checkpoint lag p99 ≤ 1 s under concurrent syncs (is {lag99:.3} s)"),
            lag99 <= 1.0,
        ),
        (
            format!(
                "inclusion and consistency proofs in a {total}-leaf log under 1 ms server-side (p50 {inclusion_own:.3} / {consistency_own:.3} ms above the bare round trip)"
            ),
            inclusion_own < 1.0 && consistency_own < 1.0,
        ),
    ];
    rpc::print(
        "Calls (p50/p99 per call, client and server on this machine)",
        &rows,
        &targets,
    );
    let _ = c
        .get_log_checkpoint(GetLogCheckpointRequest::default())
        .await
        .context("the log after the run")?;
    drop(pg);
    Ok(())
}
