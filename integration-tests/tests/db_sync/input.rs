//! Bad input gets a status naming the field; every hot-path query is served by an index.

use std::{future::Future, pin::Pin};

use integration_tests::TestStack;
use merkle_proto::{
    common::v1::RetentionPolicy,
    dbsync::v1::{
        DiffSnapshotsRequest, FindMissingNodesRequest, GetLatestRootRequest,
        GetRetentionPolicyRequest, GetSnapshotRequest, ListDirectoryRequest, ListSnapshotsRequest,
        SetRetentionPolicyRequest, WarmCacheRequest,
    },
};
use tonic::Code;

use super::support::*;

/// A call that must be refused: which one, the status it must get, how its message starts
/// (the field's name), and its answer.
struct Refusal {
    call: &'static str,
    code: Code,
    start: &'static str,
    answer: Pin<Box<dyn Future<Output = Result<(), tonic::Status>> + Send>>,
}

/// `client.method(request)`, to be refused with `Code::$code` and a message starting `start`.
macro_rules! refused {
    ($client:expr, $method:ident($request:expr) => $code:ident, $start:expr) => {{
        let mut client = $client.clone();
        let request = $request;
        Refusal {
            call: stringify!($method),
            code: Code::$code,
            start: $start,
            answer: Box::pin(async move { client.$method(request).await.map(drop) }),
        }
    }};
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_rejected_naming_the_field() {
    let mut stack = TestStack::new();
    let mut c = start(&mut stack, &[]).await;
    push(&mut c, "docs", &Tree::new(&[("a", "1")])).await;
    let root = c
        .get_latest_root(GetLatestRootRequest {
            source: "docs".into(),
            ..Default::default()
        })
        .await
        .expect("latest")
        .into_inner()
        .snapshot
        .expect("snapshot")
        .root_hash;
    let latest = |source: &str| GetLatestRootRequest {
        source: source.into(),
        ..Default::default()
    };
    let snapshot = |id: &str| GetSnapshotRequest {
        snapshot_id: id.into(),
        ..Default::default()
    };
    let directory = |root_hash: &str, path: &str| ListDirectoryRequest {
        root_hash: root_hash.into(),
        path: path.into(),
        ..Default::default()
    };
    let negative_keep_within = SetRetentionPolicyRequest {
        source: "docs".into(),
        policy: Some(RetentionPolicy {
            keep_last: 0,
            keep_within: Some(prost_types::Duration {
                seconds: -5,
                nanos: 0,
            }),
        }),
    };
    let cases = vec![
        refused!(c, get_latest_root(latest("Bad Name")) => InvalidArgument, "source: "),
        refused!(c, get_latest_root(latest("")) => InvalidArgument, "source: "),
        refused!(c, get_latest_root(latest("web")) => NotFound, "source: web"),
        refused!(c, find_missing_nodes(FindMissingNodesRequest {
            hashes: vec!["0".repeat(64), "xyz".into()],
        }) => InvalidArgument, "hashes[1]: "),
        refused!(c, find_missing_nodes(FindMissingNodesRequest {
            hashes: vec!["0".repeat(64); 10_001],
        }) => InvalidArgument, "hashes: "),
        refused!(c, get_snapshot(snapshot("x1")) => InvalidArgument, "snapshot_id: "),
        refused!(c, get_snapshot(snapshot("999")) => NotFound, "snapshot_id: "),
        refused!(c, get_snapshot(snapshot("")) => InvalidArgument, "snapshot_id: "),
        refused!(c, list_snapshots(ListSnapshotsRequest {
            source: "docs".into(),
            page_token: "abc".into(),
            ..Default::default()
        }) => InvalidArgument, "page_token: "),
        refused!(c, list_snapshots(ListSnapshotsRequest {
            source: "web".into(),
            ..Default::default()
        }) => NotFound, "source: "),
        refused!(c, list_directory(directory(&"0".repeat(64), "")) => NotFound, "root_hash: "),
        refused!(c, list_directory(directory("zz", "")) => InvalidArgument, "root_hash: "),
        refused!(c, list_directory(directory(&root, "a")) => FailedPrecondition, "path: a is a file"),
        refused!(c, list_directory(directory(&root, "nope")) => NotFound, "path: "),
        refused!(c, list_directory(directory(&root, "../etc")) => InvalidArgument, "path: "),
        refused!(c, set_retention_policy(negative_keep_within) => InvalidArgument, "policy.keep_within: "),
        refused!(c, get_retention_policy(GetRetentionPolicyRequest {
            source: "web".into(),
        }) => NotFound, "source: "),
        refused!(c, warm_cache(WarmCacheRequest {
            sources: vec!["web".into()],
        }) => NotFound, "sources: "),
        refused!(c, diff_snapshots(DiffSnapshotsRequest {
            old_root_hash: root.clone(),
            new_root_hash: "1".repeat(64),
        }) => NotFound, "new_root_hash: "),
    ];
    for (i, case) in cases.into_iter().enumerate() {
        let Err(err) = case.answer.await else {
            panic!("case {i} ({}): the call succeeded", case.call);
        };
        assert_eq!(
            err.code(),
            case.code,
            "case {i} ({}): {}",
            case.call,
            err.message()
        );
        assert!(
            err.message().starts_with(case.start),
            "case {i} ({}): {:?} does not start with {:?}",
            case.call,
            err.message(),
            case.start
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_hot_path_query_is_served_by_an_index() {
    let mut stack = TestStack::new();
    let mut c = start(&mut stack, &[]).await;
    push(&mut c, "docs", &wide_tree(3, 3)).await;
    let db = stack.sql().await;
    // With sequential scans priced out, a query still scans a table only if no index serves it.
    db.batch_execute("SET enable_seqscan = off")
        .await
        .expect("set");
    let hashes: Vec<Vec<u8>> = vec![vec![0; 32]];
    let now = std::time::SystemTime::now();
    for (name, query) in merkle_db_sync::sql::ALL {
        let sql = format!("EXPLAIN {query}");
        let plan = match *name {
            "LATEST" | "ALL_OF_SOURCE" | "SOURCE" | "SEQUENCE_RANGE" | "CHECKPOINTS" => {
                db.query(&sql, &[&"docs"]).await
            }
            "HISTORY" => db.query(&sql, &[&"docs", &1i64, &100i64, &100i64]).await,
            "BY_ID" => db.query(&sql, &[&1i64]).await,
            "BY_SEQUENCE" => db.query(&sql, &[&"docs", &1i64]).await,
            "BY_BUILD" => db.query(&sql, &[&"docs", &"b"]).await,
            "PAGE" => {
                db.query(
                    &sql,
                    &[&"docs", &10i64, &std::time::UNIX_EPOCH, &now, &100i64],
                )
                .await
            }
            "SOURCES" => db.query(&sql, &[&"", &100i64]).await,
            "LATEST_IN_RANGE" => db.query(&sql, &[&"docs@", &"docsA", &i64::MAX]).await,
            "LATEST_OF_NAMES" => db.query(&sql, &[&vec!["docs"], &i64::MAX]).await,
            "ACTIVITY_TOTALS" => db.query(&sql, &[&vec!["docs"]]).await,
            "ACTIVITY_DAYS" => db.query(&sql, &[&vec!["docs"], &now]).await,
            "FIND_NODES" => db.query(&sql, &[&hashes, &60.0f64]).await,
            "TOUCH_TREE" => {
                db.query(&sql, &[&hashes, &60.0f64, &vec![0i32], &256i32])
                    .await
            }
            "EXISTING" | "NODE" => db.query(&sql, &[&hashes]).await,
            other => panic!("no sample arguments for {other}"),
        }
        .unwrap_or_else(|e| panic!("EXPLAIN {name}: {e}"));
        let plan: Vec<String> = plan.iter().map(|r| r.get::<_, String>(0)).collect();
        let text = plan.join("\n");
        assert!(
            !text.contains("Seq Scan"),
            "{name} scans a table without an index:\n{text}"
        );
    }
}
