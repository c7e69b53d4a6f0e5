//! Bad input gets a status naming the field; every hot-path query is served by an index.

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

/// The call failed with `code` and a message that starts with `start` (the field's name).
fn expect<T>(result: Result<tonic::Response<T>, tonic::Status>, code: Code, start: &str) {
    let Err(err) = result else {
        panic!("{start}: the call succeeded");
    };
    assert_eq!(err.code(), code, "{start}: {}", err.message());
    assert!(
        err.message().starts_with(start),
        "{:?} does not start with {start:?}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_rejected_naming_the_field() {
    let mut stack = TestStack::new();
    let mut c = start(&mut stack, &[]).await;
    push(&mut c, "docs", &Tree::new(&[("a", "1")])).await;
    expect(
        c.get_latest_root(GetLatestRootRequest {
            source: "Bad Name".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "source: ",
    );
    expect(
        c.get_latest_root(GetLatestRootRequest {
            source: String::new(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "source: ",
    );
    expect(
        c.get_latest_root(GetLatestRootRequest {
            source: "web".into(),
            ..Default::default()
        })
        .await,
        Code::NotFound,
        "source: web",
    );
    expect(
        c.find_missing_nodes(FindMissingNodesRequest {
            hashes: vec!["0".repeat(64), "xyz".into()],
        })
        .await,
        Code::InvalidArgument,
        "hashes[1]: ",
    );
    expect(
        c.find_missing_nodes(FindMissingNodesRequest {
            hashes: vec!["0".repeat(64); 10_001],
        })
        .await,
        Code::InvalidArgument,
        "hashes: ",
    );
    expect(
        c.get_snapshot(GetSnapshotRequest {
            snapshot_id: "x1".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "snapshot_id: ",
    );
    expect(
        c.get_snapshot(GetSnapshotRequest {
            snapshot_id: "999".into(),
            ..Default::default()
        })
        .await,
        Code::NotFound,
        "snapshot_id: ",
    );
    expect(
        c.get_snapshot(GetSnapshotRequest::default()).await,
        Code::InvalidArgument,
        "snapshot_id: ",
    );
    expect(
        c.list_snapshots(ListSnapshotsRequest {
            source: "docs".into(),
            page_token: "abc".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "page_token: ",
    );
    expect(
        c.list_snapshots(ListSnapshotsRequest {
            source: "web".into(),
            ..Default::default()
        })
        .await,
        Code::NotFound,
        "source: ",
    );
    expect(
        c.list_directory(ListDirectoryRequest {
            root_hash: "0".repeat(64),
            ..Default::default()
        })
        .await,
        Code::NotFound,
        "root_hash: ",
    );
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
    expect(
        c.list_directory(ListDirectoryRequest {
            root_hash: "zz".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "root_hash: ",
    );
    expect(
        c.list_directory(ListDirectoryRequest {
            root_hash: root.clone(),
            path: "a".into(),
            ..Default::default()
        })
        .await,
        Code::FailedPrecondition,
        "path: a is a file",
    );
    expect(
        c.list_directory(ListDirectoryRequest {
            root_hash: root.clone(),
            path: "nope".into(),
            ..Default::default()
        })
        .await,
        Code::NotFound,
        "path: ",
    );
    expect(
        c.list_directory(ListDirectoryRequest {
            root_hash: root.clone(),
            path: "../etc".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "path: ",
    );
    expect(
        c.set_retention_policy(SetRetentionPolicyRequest {
            source: "docs".into(),
            policy: Some(RetentionPolicy {
                keep_last: 0,
                keep_within: Some(prost_types::Duration {
                    seconds: -5,
                    nanos: 0,
                }),
            }),
        })
        .await,
        Code::InvalidArgument,
        "policy.keep_within: ",
    );
    expect(
        c.get_retention_policy(GetRetentionPolicyRequest {
            source: "web".into(),
        })
        .await,
        Code::NotFound,
        "source: ",
    );
    expect(
        c.warm_cache(WarmCacheRequest {
            sources: vec!["web".into()],
        })
        .await,
        Code::NotFound,
        "sources: ",
    );
    expect(
        c.diff_snapshots(DiffSnapshotsRequest {
            old_root_hash: root.clone(),
            new_root_hash: "1".repeat(64),
        })
        .await,
        Code::NotFound,
        "new_root_hash: ",
    );
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
