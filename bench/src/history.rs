//! The history benchmark (the tamper-evident history issue): what chaining and signing add to a
//! changed `SyncTree`, and `merklectl verify-history` of 100,000 signed records.
//!
//! Two release DbSyncs share one PostgreSQL (with pg_stat_statements): one with a signing key,
//! one without (its records are chained, not signed). A 1,000-file tree and the same tree with
//! one file changed are pushed in turn, so every push stores a new record; the two services
//! take turns, so the machine's drift falls on both alike. The chain's own work is the record
//! hash (in process) and the head checkpoint upsert (its mean execution time, from
//! pg_stat_statements); the signature's is the difference between the two services.
//!
//! Then 100,000 records are appended to one source, chained and signed with the same key as
//! DbSync would, and the release `merklectl verify-history` checks them from DbSync and from an
//! exported file, and with `--log`: by the transparency log's proofs (the last record's
//! inclusion in a checkpoint consistent with the one seen before) instead of every record's
//! signature. Targets: signing and chaining add under 1 ms to a changed SyncTree;
//! verify-history of 100,000 records under 2 s; by the log's proofs, of `--records
//! 1000000`, in seconds.

use std::{
    fs,
    path::Path,
    process::Command,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use ed25519_dalek::{SigningKey, pkcs8::DecodePrivateKey as _};
use merkle_core::{
    Digest, MemTree, Profile, TreeStats,
    history::{Checkpoint, HEAD, Record, seal},
};
use merkle_db_sync::sql as queries;
use merkle_proto::dbsync::v1::db_sync_service_client::DbSyncServiceClient;
use merklectl::{
    history::{PUBLIC_KEY_FILE, ensure_signing_key},
    local::build_tree,
    stored::upload,
};

use crate::rpc::{self, Load, Row};

/// Options of `merkle-bench history`.
#[derive(Debug, clap::Args)]
pub struct HistoryBenchArgs {
    /// Changed SyncTrees per service.
    #[arg(long, default_value_t = 300)]
    rounds: usize,
    /// Records verify-history checks.
    #[arg(long, default_value_t = 100_000)]
    records: u64,
    /// A DbSync binary built from an older commit (e.g. the one before the transparency log):
    /// its changed pushes are timed beside today's, in the same turns, on a database of its own.
    #[arg(long, value_name = "BINARY")]
    baseline_db_sync: Option<std::path::PathBuf>,
}

pub fn run(args: HistoryBenchArgs) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(run_async(args))
}

/// 10 directories of 100 files.
fn thousand_files(dir: &Path) -> anyhow::Result<()> {
    for d in 0..10 {
        let sub = dir.join(format!("d{d}"));
        fs::create_dir_all(&sub)?;
        for f in 0..100 {
            fs::write(sub.join(format!("f{f:03}")), format!("{d}-{f}"))?;
        }
    }
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn load(mut times: Vec<Duration>) -> Load {
    times.sort();
    let total: Duration = times.iter().sum();
    Load {
        clients: 1,
        p50: percentile(&times, 0.5),
        p99: percentile(&times, 0.99),
        calls_per_sec: times.len() as f64 / total.as_secs_f64(),
        peak_rss: None,
    }
}

/// Runs `merklectl` `times` times; the fastest run.
/// `merklectl` calling as the admin of the credentials in `work` (the services require a token).
fn merklectl_as_admin(merklectl: &Path, work: &Path) -> anyhow::Result<Command> {
    let token = merklectl::credentials::Credentials::ensure(work)?.token_file("admin");
    let mut command = Command::new(merklectl);
    command.env("MERKLE_TOKEN_FILE", token);
    Ok(command)
}

fn best_run(
    merklectl: &Path,
    work: &Path,
    args: &[&str],
    times: usize,
) -> anyhow::Result<Duration> {
    let mut best = Duration::MAX;
    for _ in 0..times {
        let started = Instant::now();
        let out = merklectl_as_admin(merklectl, work)?.args(args).output()?;
        let took = started.elapsed();
        if !out.status.success() {
            bail!(
                "merklectl {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        best = best.min(took);
    }
    Ok(best)
}

/// Appends records 2..=`count` to `source` (whose record 1 DbSync stored), chained and signed
/// as DbSync does, and moves its signed head.
async fn append_records(
    db: &tokio_postgres::Client,
    key: &SigningKey,
    source: &str,
    roots: [Digest; 2],
    stats: TreeStats,
    count: u64,
) -> anyhow::Result<()> {
    let row = db
        .query_one(
            "SELECT record_hash FROM merkle_roots WHERE source = $1 AND sequence = 1",
            &[&source],
        )
        .await?;
    let mut previous = Digest(
        row.get::<_, Vec<u8>>(0)
            .try_into()
            .map_err(|_| anyhow::anyhow!("record 1 has no hash"))?,
    );
    let start = SystemTime::now().duration_since(UNIX_EPOCH)?.as_micros() as i64;
    let n = |v: u64| v as i64;
    for batch in (2..=count).collect::<Vec<_>>().chunks(10_000) {
        let mut columns: (Vec<i64>, Vec<Vec<u8>>, Vec<String>, Vec<SystemTime>) =
            Default::default();
        let (mut previous_hashes, mut hashes, mut signatures) =
            (Vec::new(), Vec::new(), Vec::new());
        for &sequence in batch {
            let micros = start + sequence as i64;
            let record = Record {
                source: source.to_owned(),
                sequence,
                root: roots[(sequence % 2) as usize],
                profile: Profile::Content,
                build_id: format!("bench-{sequence}"),
                create_time_micros: micros,
                stats,
                previous: Some(previous),
            };
            let hash = record.hash();
            columns.0.push(sequence as i64);
            columns.1.push(record.root.0.to_vec());
            columns.2.push(record.build_id);
            columns
                .3
                .push(UNIX_EPOCH + Duration::from_micros(micros as u64));
            previous_hashes.push(previous.0.to_vec());
            hashes.push(hash.0.to_vec());
            signatures.push(seal(key, &hash).signature.to_vec());
            previous = hash;
        }
        let key_id = merkle_core::history::key_id(&key.verifying_key());
        // Queued for the transparency log in the same statement, as DbSync's own insert does.
        db.execute(
            "WITH r AS (INSERT INTO merkle_roots (source, sequence, root_hash, profile, build_id, created_at, \
             file_count, dir_count, symlink_count, skipped_count, total_bytes, \
             previous_record_hash, record_hash, signature, key_id) \
             SELECT $1, s, r, 1, b, t, $2, $3, $4, $5, $6, p, h, g, $7 \
             FROM unnest($8::bigint[], $9::bytea[], $10::text[], $11::timestamptz[], \
                         $12::bytea[], $13::bytea[], $14::bytea[]) AS x(s, r, b, t, p, h, g) \
             RETURNING id, source, sequence, record_hash) \
             INSERT INTO merkle_log_pending (snapshot_id, source, sequence, record_hash) \
             SELECT id, source, sequence, record_hash FROM r",
            &[
                &source,
                &n(stats.file_count),
                &n(stats.dir_count),
                &n(stats.symlink_count),
                &n(stats.skipped_count),
                &n(stats.total_bytes),
                &key_id,
                &columns.0,
                &columns.1,
                &columns.2,
                &columns.3,
                &previous_hashes,
                &hashes,
                &signatures,
            ],
        )
        .await?;
    }
    let head = Checkpoint {
        kind: HEAD.to_owned(),
        source: source.to_owned(),
        sequence: count,
        record_hash: previous,
        actor: String::new(),
    };
    let sealed = seal(key, &head.hash());
    db.execute(
        queries::UPSERT_CHECKPOINT,
        &[
            &source,
            &HEAD,
            &(count as i64),
            &previous.0.as_slice(),
            &sealed.signature.as_slice(),
            &sealed.key_id,
            &"",
        ],
    )
    .await?;
    Ok(())
}

async fn run_async(args: HistoryBenchArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let merklectl = exe.parent().context("binary folder")?.join("merklectl");
    if !merklectl.is_file() {
        bail!(
            "{} not found: run scripts/bench.sh history (it builds the release binaries)",
            merklectl.display()
        );
    }
    let (work, pg) = crate::db_sync::postgres_with_statements("merkle-bench-history-").await?;
    let w = work.path();
    let keys = w.join("keys");
    fs::create_dir_all(&keys)?;
    let private = ensure_signing_key(&keys)?;
    let public = keys.join(PUBLIC_KEY_FILE);
    let key = SigningKey::from_pkcs8_pem(&fs::read_to_string(&private)?)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let signed = rpc::start_service(
        w,
        "db-sync",
        &[
            ("DATABASE_URL", pg.url()),
            ("SIGNING_KEY_FILE", private.display().to_string()),
        ],
    )
    .await?;
    let unsigned = rpc::start_service(w, "db-sync", &[("DATABASE_URL", pg.url())]).await?;
    let (db, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let baseline = match &args.baseline_db_sync {
        None => None,
        Some(binary) => {
            db.batch_execute("CREATE DATABASE baseline").await?;
            let url = format!(
                "{}/baseline",
                pg.url().rsplit_once('/').context("a database URL")?.0
            );
            Some(
                rpc::start_binary(
                    w,
                    "db-sync",
                    Some(binary),
                    &[
                        ("DATABASE_URL", url),
                        ("SIGNING_KEY_FILE", private.display().to_string()),
                    ],
                )
                .await?,
            )
        }
    };
    db.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .await?;

    // Two trees one file apart.
    let tree_dir = w.join("tree");
    thousand_files(&tree_dir)?;
    let (outcome, a) = build_tree(&tree_dir, Default::default())?;
    fs::write(tree_dir.join("d3/f042"), "changed")?;
    let (_, b) = build_tree(&tree_dir, Default::default())?;
    let trees: [&MemTree; 2] = [&a, &b];
    let stats = outcome.stats;

    let channel = |uri: &str| -> anyhow::Result<_> {
        Ok(DbSyncServiceClient::new(merklectl::remote::connect(uri)?))
    };
    let (mut to_signed, mut to_unsigned) = (channel(&signed.uri)?, channel(&unsigned.uri)?);
    let mut to_baseline = baseline.as_ref().map(|b| channel(&b.uri)).transpose()?;
    // Warm-up: the first push of each tree writes every node.
    for tree in trees {
        upload(&mut to_signed, "signed", "", tree, &stats).await?;
        upload(&mut to_unsigned, "unsigned", "", tree, &stats).await?;
        if let Some(c) = &mut to_baseline {
            upload(c, "baseline", "", tree, &stats).await?;
        }
    }
    db.batch_execute("SELECT pg_stat_statements_reset()")
        .await?;
    let (mut signed_times, mut unsigned_times, mut baseline_times) =
        (Vec::new(), Vec::new(), Vec::new());
    for round in 0..args.rounds {
        let tree = trees[round % 2];
        for (client, source, times) in [
            (&mut to_signed, "signed", &mut signed_times),
            (&mut to_unsigned, "unsigned", &mut unsigned_times),
        ] {
            let started = Instant::now();
            let answer = upload(client, source, "", tree, &stats).await?;
            times.push(started.elapsed());
            anyhow::ensure!(answer.changed, "a push of a new root stored nothing");
        }
        if let Some(c) = &mut to_baseline {
            let started = Instant::now();
            let answer = upload(c, "baseline", "", tree, &stats).await?;
            baseline_times.push(started.elapsed());
            anyhow::ensure!(answer.changed, "a push of a new root stored nothing");
        }
    }
    let row = db
        .query_one(
            "SELECT coalesce(sum(total_exec_time) / nullif(sum(calls), 0), 0)::float8 \
             FROM pg_stat_statements WHERE query LIKE 'INSERT INTO merkle_history_checkpoints%'",
            &[],
        )
        .await?;
    let checkpoint_ms: f64 = row.get(0);
    let record = Record {
        source: "signed".into(),
        sequence: 2,
        root: a.root,
        profile: Profile::Content,
        build_id: String::new(),
        create_time_micros: 0,
        stats,
        previous: Some(b.root),
    };
    let iterations = 10_000u32;
    let started = Instant::now();
    for _ in 0..iterations {
        std::hint::black_box(record.hash());
    }
    let hash_time = started.elapsed() / iterations;
    let started = Instant::now();
    for _ in 0..iterations {
        std::hint::black_box(seal(&key, &record.hash()));
    }
    let hash_and_sign = started.elapsed() / iterations;
    let (signed_load, unsigned_load) = (load(signed_times), load(unsigned_times));
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let signature_cost = ms(signed_load.p50) - ms(unsigned_load.p50);
    let added = signature_cost.max(0.0) + checkpoint_ms + ms(hash_time);

    // The unsigned DbSync would sign (not) checkpoints of the shared log too: only the
    // signed one runs from here on.
    drop(to_unsigned);
    drop(unsigned);
    drop(to_baseline);
    drop(baseline);
    let baseline_load = (!baseline_times.is_empty()).then(|| load(baseline_times));
    // 100,000 records, verified from DbSync and from a file.
    eprintln!("appending {} signed records ...", args.records);
    upload(&mut to_signed, "hundred-k", "", &a, &stats).await?;
    append_records(
        &db,
        &key,
        "hundred-k",
        [a.root, b.root],
        stats,
        args.records,
    )
    .await?;
    let public_arg = public.to_str().context("utf-8 path")?;
    // Every record in a checkpoint before verify-history --log runs.
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let (logged, queued): (i64, i64) = {
            let row = db
                .query_one(
                    "SELECT (SELECT count(*) FROM merkle_log_leaves), \
                     (SELECT count(*) FROM merkle_log_pending)",
                    &[],
                )
                .await?;
            (row.get(0), row.get(1))
        };
        let checkpoint = to_signed
            .get_log_checkpoint(merkle_proto::dbsync::v1::GetLogCheckpointRequest { size: 0 })
            .await?
            .into_inner();
        if queued == 0 && checkpoint.size == logged as u64 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the log did not take in the records"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let log_state = w.join("log-state.json");
    let log_state_arg = log_state.to_str().context("utf-8 path")?;
    let verify_by_log = best_run(
        &merklectl,
        w,
        &[
            "verify-history",
            "hundred-k",
            "--addr",
            &signed.uri,
            "--trusted-key",
            public_arg,
            "--log",
            "--log-state",
            log_state_arg,
        ],
        3,
    )?;
    let verify_server = best_run(
        &merklectl,
        w,
        &[
            "verify-history",
            "hundred-k",
            "--addr",
            &signed.uri,
            "--trusted-key",
            public_arg,
        ],
        3,
    )?;
    let export = merklectl_as_admin(&merklectl, w)?
        .args(["export-history", "hundred-k", "--addr", &signed.uri])
        .output()?;
    anyhow::ensure!(export.status.success(), "export-history failed");
    let file = w.join("hundred-k.jsonl");
    fs::write(&file, &export.stdout)?;
    let file_arg = file.to_str().context("utf-8 path")?;
    let verify_file = best_run(
        &merklectl,
        w,
        &[
            "verify-history",
            "--file",
            file_arg,
            "--trusted-key",
            public_arg,
        ],
        3,
    )?;

    let single = |d: Duration| Load {
        clients: 1,
        p50: d,
        p99: d,
        calls_per_sec: 1.0 / d.as_secs_f64(),
        peak_rss: None,
    };
    let mut rows = vec![
        Row {
            what: format!(
                "changed push (GetLatestRoot, FindMissingNodes, SyncTree; 1,000 files, one changed), signed ({} calls)",
                args.rounds
            ),
            load: signed_load,
        },
        Row {
            what: "changed push, chained but unsigned (no SIGNING_KEY_FILE)".into(),
            load: unsigned_load,
        },
        Row {
            what: "record hash, in process".into(),
            load: single(hash_time),
        },
        Row {
            what: "record hash + Ed25519 signature, in process".into(),
            load: single(hash_and_sign),
        },
        Row {
            what: "head checkpoint upsert, PostgreSQL mean execution (pg_stat_statements)".into(),
            load: single(Duration::from_secs_f64(checkpoint_ms / 1000.0)),
        },
        Row {
            what: format!(
                "merklectl verify-history, {} records from DbSync (best of 3)",
                args.records
            ),
            load: single(verify_server),
        },
        Row {
            what: format!(
                "merklectl verify-history --file, {} records, no server (best of 3)",
                args.records
            ),
            load: single(verify_file),
        },
        Row {
            what: format!(
                "merklectl verify-history --log, {} records from DbSync by the log's proofs, no record signature checked (best of 3)",
                args.records
            ),
            load: single(verify_by_log),
        },
    ];
    let mut targets = vec![
        (
            format!(
                "signing and chaining add under 1 ms to a changed SyncTree (is {added:.3} ms: signed - unsigned p50 {signature_cost:.3} ms + checkpoint upsert {checkpoint_ms:.3} ms + record hash {:.4} ms)",
                ms(hash_time)
            ),
            added < 1.0,
        ),
        (
            format!(
                "verify-history of {} records under 2 s (is {:.2} s from DbSync, {:.2} s from a file)",
                args.records,
                verify_server.as_secs_f64(),
                verify_file.as_secs_f64()
            ),
            verify_server < Duration::from_secs(2) && verify_file < Duration::from_secs(2),
        ),
        (
            format!(
                "verify-history of {} records by the log's proofs in seconds, under 10 s (is {:.2} s; {:.1}x the chain's signature replay)",
                args.records,
                verify_by_log.as_secs_f64(),
                verify_server.as_secs_f64() / verify_by_log.as_secs_f64()
            ),
            verify_by_log < Duration::from_secs(10),
        ),
    ];
    if let (Some(b), Some(binary)) = (baseline_load, &args.baseline_db_sync) {
        let added = ms(signed_load.p50) - ms(b.p50);
        targets.push((
            format!(
                "the transparency log adds at most 0.5 ms to a changed sync (is {added:.3} ms: today's signed p50 {:.3} - the baseline's {:.3} ms)",
                ms(signed_load.p50),
                ms(b.p50)
            ),
            added <= 0.5,
        ));
        rows.insert(
            1,
            Row {
                what: format!(
                    "changed push, signed, by the baseline DbSync {} (its own database, same turns)",
                    binary.display()
                ),
                load: b,
            },
        );
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    rpc::print(
        &format!(
            "merkle-bench history: {cores} cores, client, DbSync and PostgreSQL on this machine"
        ),
        &rows,
        &targets,
    );
    drop(pg);
    Ok(())
}
