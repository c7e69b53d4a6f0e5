//! Retention and garbage collection, and what they spare: a running sync's nodes.

use std::{fs, time::Duration};

use integration_tests::TestStack;
use merkle_core::Digest;
use merkle_proto::{
    common::v1::RetentionPolicy,
    dbsync::v1::{
        FindMissingNodesRequest, GetRetentionPolicyRequest, ListDirectoryRequest,
        ListSnapshotsRequest, SetRetentionPolicyRequest,
    },
};

use super::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn retention_and_garbage_collection_spare_what_a_running_sync_relies_on() {
    let mut stack = TestStack::new();
    let mut c = start(
        &mut stack,
        &[
            ("REQUEST_TIMEOUT", "5s".into()),
            ("GC_GRACE", "10s".into()),
            ("GC_INTERVAL", "0s".into()),
        ],
    )
    .await;
    let db = stack.sql().await;
    // Snapshot 1 has subtree `old/` that snapshots 2 and 3 lack, and `gone/` that no later tree has.
    let mut t = Tree::new(&[("old/keep", "k"), ("gone/x", "g"), ("live", "1")]);
    let with_old = t.tree.clone();
    push(&mut c, "docs", &t).await;
    fs::remove_dir_all(t.dir.path().join("old")).expect("rm");
    fs::remove_dir_all(t.dir.path().join("gone")).expect("rm");
    t.edit("live", "2");
    push(&mut c, "docs", &t).await;
    t.edit("live", "3");
    push(&mut c, "docs", &t).await;
    // Everything is old now (as if stored hours ago).
    db.execute(
        "UPDATE merkle_tree_data SET last_used = now() - interval '2 hours'",
        &[],
    )
    .await
    .expect("backdate");

    // A sync begins: its tree brings `old/` back, and FindMissingNodes finds it stored.
    let mut next = Tree::new(&[("old/keep", "k"), ("live", "4")]);
    let old_dir = next.tree.nodes[&next.tree.root]
        .get(b"old")
        .expect("old/")
        .hash;
    assert_eq!(
        with_old.nodes[&with_old.root]
            .get(b"old")
            .expect("old/")
            .hash,
        old_dir
    );
    let hashes: Vec<String> = next.tree.nodes.keys().map(Digest::to_hex).collect();
    let missing = c
        .find_missing_nodes(FindMissingNodesRequest { hashes })
        .await
        .expect("find")
        .into_inner()
        .missing_hashes;
    assert!(!missing.contains(&old_dir.to_hex()), "old/ is stored");

    // Meanwhile retention drops snapshots 1 and 2, and the collector runs.
    let nodes_before = count(&db, "merkle_tree_data").await;
    let set = c
        .set_retention_policy(SetRetentionPolicyRequest {
            source: "docs".into(),
            policy: Some(RetentionPolicy {
                keep_last: 1,
                keep_within: None,
            }),
        })
        .await
        .expect("retention")
        .into_inner();
    assert_eq!(set.snapshots_deleted, 2);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while count(&db, "merkle_tree_data").await == nodes_before {
        assert!(std::time::Instant::now() < deadline, "the collector ran");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gone = with_old.nodes[&with_old.root]
        .get(b"gone")
        .expect("gone/")
        .hash;
    let stored = |h: Digest| {
        let db = &db;
        async move {
            db.query_one(
                "SELECT count(*) FROM merkle_tree_data WHERE hash = $1",
                &[&h.0.as_slice()],
            )
            .await
            .expect("query")
            .get::<_, i64>(0)
                == 1
        }
    };
    assert!(!stored(gone).await, "unreferenced and unused: collected");
    assert!(
        !stored(with_old.root).await,
        "the pruned snapshot's root: collected"
    );
    assert!(
        stored(old_dir).await,
        "relied on by the running sync: spared"
    );
    assert!(
        stored(t.tree.root).await,
        "the latest snapshot's tree: kept"
    );

    // The sync completes, and its whole tree reads back.
    next.rebuild();
    let done = push(&mut c, "docs", &next).await;
    assert!(done.changed);
    let listed = c
        .list_directory(ListDirectoryRequest {
            root_hash: next.tree.root.to_hex(),
            path: "old".into(),
            ..Default::default()
        })
        .await
        .expect("old/ is whole")
        .into_inner();
    assert_eq!(listed.entries[0].name, "keep");
    let policy = c
        .get_retention_policy(GetRetentionPolicyRequest {
            source: "docs".into(),
        })
        .await
        .expect("policy")
        .into_inner()
        .policy
        .expect("policy");
    assert_eq!(policy.keep_last, 1);
    // Retention after a sync runs in the background, once the sync has answered.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let snapshots = c
            .list_snapshots(ListSnapshotsRequest {
                source: "docs".into(),
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner()
            .snapshots;
        let sequences: Vec<u64> = snapshots.iter().map(|s| s.sequence).collect();
        if sequences == [4] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "keep_last 1 after the new sync: {sequences:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
