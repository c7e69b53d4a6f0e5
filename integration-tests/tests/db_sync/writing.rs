//! The write path: a tree is written only when its root changed, at the cost of what changed;
//! concurrent and retried syncs; corrupted uploads; PostgreSQL restarting mid-sync.

use std::{collections::HashSet, time::Duration};

use integration_tests::{ServingStatus, TestStack};
use merkle_core::DirNode;
use merkle_proto::dbsync::v1::GetLatestRootRequest;
use merkle_shared::convert::node_to_proto;
use merklectl::stored::upload;
use tonic::Code;

use super::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_tree_is_written_only_when_its_root_changed_and_one_file_costs_depth_rows() {
    let mut stack = TestStack::new();
    let mut c = start(&mut stack, &[]).await;
    let db = stack.sql().await;
    let mut t = wide_tree(20, 30);

    let first = push(&mut c, "docs", &t).await;
    assert!(first.changed);
    assert_eq!(first.nodes_written, t.tree.nodes.len() as u64);
    assert_eq!(
        count(&db, "merkle_tree_data").await,
        t.tree.nodes.len() as i64
    );
    let snapshot = first.snapshot.expect("snapshot");
    assert_eq!((snapshot.sequence, snapshot.source.as_str()), (1, "docs"));
    assert_eq!(snapshot.root_hash, t.tree.root.to_hex());

    // Unchanged: no transaction at all (the transaction id does not move), no row.
    log_settled(&db).await;
    let xid = next_xid(&db).await;
    let again = sync_raw(&mut c, vec![header("docs", t.tree.root)])
        .await
        .expect("sync");
    assert!(!again.changed);
    assert_eq!(again.snapshot.expect("latest").sequence, 1);
    let again = push(&mut c, "docs", &t).await;
    assert!(!again.changed);
    assert_eq!(next_xid(&db).await, xid, "an unchanged sync writes nothing");
    assert_eq!(count(&db, "merkle_roots").await, 1);

    // One file changed at depth 3 (root/d07/e1/f004): that directory, its two parents and
    // the root are new nodes, plus one snapshot row: depth + 2 rows.
    let nodes_before = count(&db, "merkle_tree_data").await;
    t.edit("d07/e1/f004", "changed");
    let changed = push(&mut c, "docs", &t).await;
    assert!(changed.changed);
    assert_eq!(changed.nodes_written, 3);
    assert_eq!(count(&db, "merkle_tree_data").await - nodes_before, 3);
    assert_eq!(count(&db, "merkle_roots").await, 2);
    assert_eq!(changed.snapshot.expect("snapshot").sequence, 2);
    let latest = c
        .get_latest_root(GetLatestRootRequest {
            source: "docs".into(),
            ..Default::default()
        })
        .await
        .expect("latest")
        .into_inner()
        .snapshot
        .expect("snapshot");
    assert_eq!(latest.root_hash, t.tree.root.to_hex(), "written through");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_syncs_of_one_source_never_duplicate_or_lose_a_snapshot() {
    let mut stack = TestStack::new();
    let c = start(&mut stack, &[]).await;
    // Eight different trees at once: eight snapshots, sequences 1..=8, each root once.
    let trees: Vec<Tree> = (0..8)
        .map(|i| Tree::new(&[("a", &i.to_string()), ("sub/b", "same")]))
        .collect();
    let mut tasks = Vec::new();
    for t in &trees {
        let mut c = c.clone();
        let (tree, stats) = (t.tree.clone(), t.stats);
        tasks.push(tokio::spawn(async move {
            upload(&mut c, "busy", "", &tree, &stats).await
        }));
    }
    for task in tasks {
        assert!(task.await.expect("task").expect("sync").changed);
    }
    let db = stack.sql().await;
    let rows = db
        .query(
            "SELECT sequence, root_hash FROM merkle_roots WHERE source = 'busy' ORDER BY sequence",
            &[],
        )
        .await
        .expect("rows");
    let sequences: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(sequences, (1..=8).collect::<Vec<i64>>());
    let roots: HashSet<Vec<u8>> = rows.iter().map(|r| r.get(1)).collect();
    assert_eq!(roots.len(), 8);

    // One tree sent eight times at once (a new root each round): stored once.
    let same = Tree::new(&[("only", "once")]);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut c = c.clone();
        let (tree, stats) = (same.tree.clone(), same.stats);
        tasks.push(tokio::spawn(async move {
            // Straight to SyncTree (no early look at the latest root), to race inside DbSync.
            let all: Vec<_> = tree
                .nodes
                .iter()
                .map(|(h, n)| node_to_proto(*h, n))
                .collect();
            sync_raw(&mut c, vec![header("twice", tree.root), nodes(all)])
                .await
                .map(|r| (r, stats))
        }));
    }
    let mut changed = 0;
    for task in tasks {
        let (answer, _) = task.await.expect("task").expect("sync");
        changed += usize::from(answer.changed);
    }
    assert_eq!(changed, 1, "one stores, the others find it unchanged");
    assert_eq!(count(&db, "merkle_roots WHERE source = 'twice'").await, 1);
}

/// A fleet's first build on a fresh database: many sources store one new tree at once, each
/// sync inserting the same new nodes. Every one succeeds: the nodes are written in one order
/// (no deadlock between them), and a transaction that still loses a race is run again.
#[tokio::test(flavor = "multi_thread")]
async fn many_sources_storing_one_new_tree_at_once_all_succeed() {
    let mut stack = TestStack::new();
    let c = start(&mut stack, &[]).await;
    for round in 0..3 {
        let t = wide_tree(8, 20 + round);
        let mut tasks = Vec::new();
        for node in 0..16 {
            let mut c = c.clone();
            let tree = t.tree.clone();
            tasks.push(tokio::spawn(async move {
                // Every node straight to SyncTree, as syncs that asked FindMissingNodes at the
                // same moment would send them.
                let all: Vec<_> = tree
                    .nodes
                    .iter()
                    .map(|(h, n)| node_to_proto(*h, n))
                    .collect();
                let source = format!("fleet@n{node}");
                sync_raw(&mut c, vec![header(&source, tree.root), nodes(all)]).await
            }));
        }
        for task in tasks {
            let answer = task.await.expect("task").expect("every sync succeeds");
            assert!(answer.changed);
        }
    }
    let db = stack.sql().await;
    assert_eq!(count(&db, "merkle_roots").await, 48);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_sync_with_the_same_build_id_returns_the_same_snapshot() {
    let mut stack = TestStack::new();
    let mut c = start(&mut stack, &[]).await;
    let mut t = Tree::new(&[("a", "1")]);
    let first = upload(&mut c, "src", "build-7", &t.tree, &t.stats)
        .await
        .expect("sync");
    let retry = upload(&mut c, "src", "build-7", &t.tree, &t.stats)
        .await
        .expect("retry");
    assert!(
        first.changed && retry.changed,
        "the retry answers as the first did"
    );
    assert_eq!(first.snapshot, retry.snapshot);
    assert_eq!(retry.nodes_written, 0);

    t.edit("a", "2");
    let other = upload(&mut c, "src", "build-7", &t.tree, &t.stats)
        .await
        .expect_err("another root under the same build");
    assert_eq!(other.code(), Code::AlreadyExists);
    assert!(
        other.message().starts_with("build_id: "),
        "{}",
        other.message()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupted_uploads_are_rejected_and_nothing_is_stored() {
    let mut stack = TestStack::new();
    let mut c = start(&mut stack, &[]).await;
    let db = stack.sql().await;
    let t = Tree::new(&[("a.txt", "a"), ("sub/b.txt", "b")]);
    let root = t.tree.root;
    let root_node = t.tree.nodes[&root].clone();
    let (sub_hash, sub_node) = t
        .tree
        .nodes
        .iter()
        .find(|(h, _)| **h != root)
        .map(|(h, n)| (*h, n.clone()))
        .expect("sub");

    // A node whose entries do not hash to its key.
    let mut bad = node_to_proto(sub_hash, &sub_node);
    bad.entries[0].hash = merkle_core::digest::file_leaf(b"other").to_hex();
    let err = sync_raw(
        &mut c,
        vec![
            header("x", root),
            nodes(vec![bad, node_to_proto(root, &root_node)]),
        ],
    )
    .await
    .expect_err("bad node");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("hash to"), "{}", err.message());

    // A missing node: the root refers to `sub`, which is neither sent nor stored.
    let err = sync_raw(
        &mut c,
        vec![
            header("x", root),
            nodes(vec![node_to_proto(root, &root_node)]),
        ],
    )
    .await
    .expect_err("missing node");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains(&sub_hash.to_hex()),
        "{}",
        err.message()
    );

    // A tree that does not hash to the claimed root (the root is neither sent nor stored).
    let wrong = merkle_core::digest::file_leaf(b"not a root");
    let all: Vec<_> = t
        .tree
        .nodes
        .iter()
        .map(|(h, n)| node_to_proto(*h, n))
        .collect();
    let err = sync_raw(&mut c, vec![header("x", wrong), nodes(all.clone())])
        .await
        .expect_err("wrong root");
    assert!(
        matches!(err.code(), Code::InvalidArgument | Code::FailedPrecondition),
        "{err:?}"
    );

    // A node that is not part of the tree.
    let stray = DirNode::default();
    let mut with_stray = all.clone();
    with_stray.push(node_to_proto(
        stray.hash(merkle_core::Profile::Content).expect("hash"),
        &stray,
    ));
    let err = sync_raw(&mut c, vec![header("x", root), nodes(with_stray)])
        .await
        .expect_err("stray");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("not part of the tree"),
        "{}",
        err.message()
    );

    // Nodes before the header; a second header.
    let err = sync_raw(&mut c, vec![nodes(all.clone())])
        .await
        .expect_err("no header");
    assert_eq!(
        err.message(),
        "header: the first message must be the header"
    );
    let err = sync_raw(&mut c, vec![header("x", root), header("x", root)])
        .await
        .expect_err("two headers");
    assert_eq!(err.code(), Code::InvalidArgument);

    for table in ["merkle_roots", "merkle_tree_data", "merkle_sources"] {
        assert_eq!(count(&db, table).await, 0, "{table}: nothing stored");
    }
    // The honest upload is then stored.
    assert!(push(&mut c, "x", &t).await.changed);
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_restarting_mid_sync_leaves_no_partial_snapshot() {
    let mut stack = TestStack::new();
    let mut c = start(&mut stack, &[("DATABASE_CONNECT_TIMEOUT", "1s".into())]).await;
    let t = wide_tree(4, 10);
    let all: Vec<_> = t
        .tree
        .nodes
        .iter()
        .map(|(h, n)| node_to_proto(*h, n))
        .collect();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut call_client = c.clone();
    let call = tokio::spawn(async move {
        call_client
            .sync_tree(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    tx.send(header("docs", t.tree.root)).await.expect("send");
    tx.send(nodes(all[..all.len() / 2].to_vec()))
        .await
        .expect("send");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stack.postgres.as_mut().expect("postgres").stop();
    tx.send(nodes(all[all.len() / 2..].to_vec()))
        .await
        .expect("send");
    drop(tx);
    let err = call.await.expect("task").expect_err("PostgreSQL is down");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    stack
        .postgres
        .as_mut()
        .expect("postgres")
        .start_again()
        .await
        .expect("restart");
    stack
        .service_mut("db-sync")
        .wait_for(ServingStatus::Serving)
        .await;
    let db = stack.sql().await;
    for table in ["merkle_roots", "merkle_tree_data"] {
        assert_eq!(count(&db, table).await, 0, "{table}: no partial snapshot");
    }
    let stored = push(&mut c, "docs", &t).await;
    assert!(stored.changed);
    assert_eq!(
        count(&db, "merkle_tree_data").await,
        t.tree.nodes.len() as i64
    );
}
