//! DbSync on a PostgreSQL primary and a real streaming replica (`pg_basebackup -R -X stream`):
//! heavy reads run on the replica (seen in each server's `pg_stat_statements`), a read right
//! after a write is never missing it, and a replica that stops costs no caller an error.

use std::time::{Duration, Instant};

use integration_tests::{ServingStatus, TestStack, free_port, get_metrics};
use merkle_db_sync::sql;
use merkle_proto::dbsync::v1::{
    DiffSnapshotsRequest, GetHistoryProofRequest, GetInclusionProofRequest, ListDirectoryRequest,
    ListSnapshotsRequest,
};

use super::support::*;

const STATEMENTS: [(&str, &str); 1] = [("shared_preload_libraries", "pg_stat_statements")];

/// Calls of `query` in `pg_stat_statements` of the server at `url`.
async fn calls(url: &str, query: &str) -> i64 {
    let (db, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    db.query_one(
        "SELECT COALESCE(sum(calls), 0)::bigint FROM pg_stat_statements WHERE query = $1",
        &[&query],
    )
    .await
    .expect("pg_stat_statements")
    .get(0)
}

async fn reset(url: &str) {
    let (db, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    db.execute("SELECT pg_stat_statements_reset()", &[])
        .await
        .expect("reset");
}

/// Waits until the replica at `replica` has replayed everything the primary has now.
async fn caught_up(primary: &tokio_postgres::Client, replica: &str) {
    let (db, conn) = tokio_postgres::connect(replica, tokio_postgres::NoTls)
        .await
        .expect("connect to the replica");
    tokio::spawn(conn);
    let lsn: String = primary
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("lsn")
        .get(0);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let done: bool = db
            .query_one(
                "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
                &[&lsn],
            )
            .await
            .expect("replay lsn")
            .get(0);
        if done {
            return;
        }
        assert!(Instant::now() < deadline, "the replica catches up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every name of `root`'s directory `path`.
async fn names(c: &mut Client, root: &str, path: &str) -> Vec<String> {
    c.list_directory(ListDirectoryRequest {
        root_hash: root.into(),
        path: path.into(),
        page_size: 1000,
        ..Default::default()
    })
    .await
    .expect("ListDirectory")
    .into_inner()
    .entries
    .into_iter()
    .map(|e| e.name)
    .collect()
}

async fn sequences(c: &mut Client, source: &str) -> Vec<u64> {
    c.list_snapshots(ListSnapshotsRequest {
        source: source.into(),
        ..Default::default()
    })
    .await
    .expect("ListSnapshots")
    .into_inner()
    .snapshots
    .into_iter()
    .map(|s| s.sequence)
    .collect()
}

async fn history_records(c: &mut Client, source: &str) -> usize {
    c.get_history_proof(GetHistoryProofRequest {
        source: source.into(),
        ..Default::default()
    })
    .await
    .expect("GetHistoryProof")
    .into_inner()
    .records
    .len()
}

#[tokio::test(flavor = "multi_thread")]
async fn heavy_reads_run_on_the_replica_and_none_is_wrong_when_it_lags_or_stops() {
    let mut stack = TestStack::new();
    stack.start_postgres_with(&STATEMENTS).await;
    stack
        .sql()
        .await
        .batch_execute("CREATE EXTENSION pg_stat_statements")
        .await
        .expect("extension");
    stack.start_postgres_replica(&STATEMENTS).await;
    let primary_url = stack.postgres.as_ref().expect("primary").url();
    let replica_url = stack.postgres_replicas[0].url();
    // No cache and no node memory: every node read reaches PostgreSQL.
    let metrics_addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port().expect("port")));
    let db_sync = stack.start_service(
        "db-sync",
        &[
            ("METRICS_LISTEN_ADDR", metrics_addr.to_string()),
            ("DATABASE_READ_URL", replica_url.clone()),
            ("DATABASE_READ_CHECK_INTERVAL", "200ms".into()),
            ("NODE_CACHE_BYTES", "0".into()),
        ],
    );
    db_sync.wait_for(ServingStatus::Serving).await;
    let mut c = client(&db_sync.uri());
    let primary = stack.sql().await;

    // A read right after each write sees it, whatever the replica has replayed yet.
    let mut t = wide_tree(4, 6);
    let mut first = None;
    for i in 1..=3 {
        t.edit(&format!("d00/new{i}"), "x");
        push(&mut c, "docs", &t).await;
        first.get_or_insert_with(|| t.tree.root.to_hex());
        let root = t.tree.root.to_hex();
        assert!(
            names(&mut c, &root, "d00")
                .await
                .contains(&format!("new{i}"))
        );
        assert_eq!(
            sequences(&mut c, "docs").await.first(),
            Some(&i),
            "write {i} is listed"
        );
        assert_eq!(history_records(&mut c, "docs").await, i as usize);
    }

    // Caught up: the heavy reads run on the replica, none on the primary.
    caught_up(&primary, &replica_url).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    reset(&primary_url).await;
    reset(&replica_url).await;
    let root = t.tree.root.to_hex();
    assert_eq!(names(&mut c, &root, "d01").await.len(), 3);
    let mut diff = c
        .diff_snapshots(DiffSnapshotsRequest {
            old_root_hash: first.clone().expect("a first snapshot"),
            new_root_hash: root.clone(),
        })
        .await
        .expect("diff")
        .into_inner();
    let mut changes = 0;
    while let Some(batch) = diff.message().await.expect("batch") {
        changes += batch.changes.len();
    }
    assert_eq!(changes, 2, "new2 and new3 added");
    let proof = c
        .get_inclusion_proof(GetInclusionProofRequest {
            root_hash: root.clone(),
            path: "d02/e1/f001".into(),
            ..Default::default()
        })
        .await
        .expect("proof")
        .into_inner();
    assert!(proof.proof.is_some());
    assert_eq!(sequences(&mut c, "docs").await.len(), 3);
    assert_eq!(history_records(&mut c, "docs").await, 3);
    for (name, query) in [
        ("node loads", sql::NODE),
        ("snapshot pages", sql::PAGE),
        ("history records", sql::HISTORY),
    ] {
        let on_replica = calls(&replica_url, query).await;
        let on_primary = calls(&primary_url, query).await;
        assert!(on_replica > 0, "{name} run on the replica");
        assert_eq!(
            on_primary, 0,
            "{name} never on the primary ({on_replica} on the replica)"
        );
    }

    let usable = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("merkle_postgres_replica_usable{"))
            .and_then(|l| l.rsplit(' ').next())
            .map(str::to_owned)
    };
    let metrics = get_metrics(metrics_addr);
    assert_eq!(usable(&metrics).as_deref(), Some("1"), "{metrics}");
    assert!(
        metrics.contains("merkle_postgres_replica_lag_seconds{"),
        "{metrics}"
    );
    assert!(
        metrics.contains("merkle_postgres_replica_replay_backlog_bytes{"),
        "{metrics}"
    );
    assert!(
        metrics.contains("merkle_postgres_reads_total{"),
        "{metrics}"
    );

    // The replica stops: every read is still answered, from the primary.
    stack.postgres_replicas[0].stop();
    t.edit("d03/while-down", "y");
    push(&mut c, "docs", &t).await;
    let root = t.tree.root.to_hex();
    for _ in 0..3 {
        assert!(
            names(&mut c, &root, "d03")
                .await
                .contains(&"while-down".to_owned())
        );
        assert_eq!(sequences(&mut c, "docs").await.len(), 4);
        assert_eq!(history_records(&mut c, "docs").await, 4);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while usable(&get_metrics(metrics_addr)).as_deref() != Some("0") {
        assert!(
            Instant::now() < deadline,
            "the stopped replica is shown as skipped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Back: it serves reads again once it has caught up.
    stack.postgres_replicas[0]
        .start_again()
        .await
        .expect("replica restarts");
    caught_up(&primary, &replica_url).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert_eq!(names(&mut c, &root, "d02").await.len(), 3);
        if calls(&replica_url, sql::NODE).await > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica serves node reads again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_url_that_is_not_a_replica_of_the_primary_is_refused_at_start() {
    let mut stack = TestStack::new();
    stack.start_postgres().await;
    stack.start_serving("db-sync").await;
    stack.start_postgres_replica(&[]).await;
    let primary = stack.postgres.as_ref().expect("primary");
    let replica = &stack.postgres_replicas[0];
    let cases = [
        (
            // The primary itself, under another spelling of its address.
            format!("postgres://merkle@localhost:{}/merkle", primary.port()),
            "is a primary",
        ),
        (
            format!("postgres://merkle@127.0.0.1:{}/postgres", replica.port()),
            "has no Merkle Mesh schema",
        ),
        (primary.url(), "names DATABASE_URL itself"),
    ];
    for (url, rule) in cases {
        let identities = integration_tests::credentials().identities_file();
        let out = std::process::Command::new(integration_tests::binary("merkle-db-sync"))
            .env("DATABASE_URL", primary.url())
            .env("DATABASE_READ_URL", &url)
            .env("AUTH_IDENTITIES_FILE", identities)
            .env_remove("CACHE_ADDR")
            .output()
            .expect("run merkle-db-sync");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{url}: {stderr}");
        assert!(
            stderr.contains("DATABASE_READ_URL") && stderr.contains(rule),
            "{url}: {stderr}"
        );
    }
}
