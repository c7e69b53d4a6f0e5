//! DbSync as its real binary on real PostgreSQL, with the real Cache service and Redis in
//! front: the write path (exact writes, concurrency, idempotency, corrupted uploads), reads
//! (cache-first, pages, directories, diffs and proofs equal to `merkle-core`'s), degradation
//! with Redis or the Cache service down, retention and garbage collection while a sync runs,
//! PostgreSQL restarting mid-sync, bad input, and the indexes behind every hot-path query.

use std::{collections::HashSet, fs, path::Path, time::Duration};

use integration_tests::{ServingStatus, TestStack, run_grpcurl, run_merklectl};
use merkle_core::{Digest, DirNode, MemTree, diff::diff_all, proof::prove};
use merkle_proto::{
    common::v1::RetentionPolicy,
    dbsync::v1::{
        DiffSnapshotsRequest, FindMissingNodesRequest, GetInclusionProofRequest,
        GetLatestRootRequest, GetRetentionPolicyRequest, GetSnapshotRequest, ListDirectoryRequest,
        ListSnapshotsRequest, ListSourcesRequest, SetRetentionPolicyRequest, SyncTreeHeader,
        SyncTreeRequest, SyncTreeResponse, WarmCacheRequest,
        db_sync_service_client::DbSyncServiceClient, sync_tree_request::Content,
    },
    treebuilder::v1::NodeBatch,
};
use merkle_shared::client::Channel;
use merkle_shared::convert::{change_from_proto, node_to_proto, proof_from_proto};
use merklectl::stored::upload;
use tonic::Code;

type Client = DbSyncServiceClient<Channel>;

/// A directory and its tree, built with the Merkle core as TreeBuilder would.
struct Tree {
    dir: tempfile::TempDir,
    tree: MemTree,
    stats: merkle_core::TreeStats,
}

fn write(root: &Path, path: &str, body: &str) {
    let p = root.join(path);
    fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    fs::write(p, body).expect("write");
}

impl Tree {
    fn new(files: &[(&str, &str)]) -> Tree {
        let dir = tempfile::tempdir().expect("tempdir");
        for (path, body) in files {
            write(dir.path(), path, body);
        }
        let mut t = Tree {
            dir,
            tree: MemTree::default(),
            stats: Default::default(),
        };
        t.rebuild();
        t
    }

    fn rebuild(&mut self) {
        let (outcome, tree) =
            merklectl::local::build_tree(self.dir.path(), Default::default()).expect("build");
        self.tree = tree;
        self.stats = outcome.stats;
    }

    fn edit(&mut self, path: &str, body: &str) {
        write(self.dir.path(), path, body);
        self.rebuild();
    }
}

/// A tree of `dirs` x `files` files with a few levels: d00/e0/f000 ...
fn wide_tree(dirs: usize, files: usize) -> Tree {
    let names: Vec<(String, String)> = (0..dirs)
        .flat_map(|d| {
            (0..files).map(move |f| (format!("d{d:02}/e{}/f{f:03}", f % 3), format!("{d}-{f}")))
        })
        .collect();
    let refs: Vec<(&str, &str)> = names
        .iter()
        .map(|(p, b)| (p.as_str(), b.as_str()))
        .collect();
    Tree::new(&refs)
}

/// PostgreSQL, Redis, Cache and DbSync (pointed at the Cache), all SERVING.
async fn start(stack: &mut TestStack, env: &[(&str, String)]) -> Client {
    stack.start_postgres().await;
    stack.start_redis().await;
    let cache = stack.start_serving("cache").await.uri();
    let mut all = vec![("CACHE_ADDR", cache)];
    all.extend(env.iter().cloned());
    let db_sync = stack.start_service("db-sync", &all);
    db_sync.wait_for(ServingStatus::Serving).await;
    client(&db_sync.uri())
}

/// A client through the services' own channel builder (trace propagation included).
fn client(uri: &str) -> Client {
    DbSyncServiceClient::new(merklectl::remote::connect(uri).expect("channel"))
}

async fn count(db: &tokio_postgres::Client, table: &str) -> i64 {
    db.query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .expect("count")
        .get(0)
}

/// The next transaction id: it moves only when a transaction writes.
async fn next_xid(db: &tokio_postgres::Client) -> String {
    db.query_one("SELECT pg_snapshot_xmax(pg_current_snapshot())::text", &[])
        .await
        .expect("xmax")
        .get(0)
}

async fn push(c: &mut Client, source: &str, t: &Tree) -> SyncTreeResponse {
    upload(c, source, "", &t.tree, &t.stats)
        .await
        .expect("upload")
}

/// SyncTree with exactly these messages.
async fn sync_raw(
    c: &mut Client,
    messages: Vec<SyncTreeRequest>,
) -> Result<SyncTreeResponse, tonic::Status> {
    c.sync_tree(tokio_stream::iter(messages))
        .await
        .map(|r| r.into_inner())
}

fn header(source: &str, root: Digest) -> SyncTreeRequest {
    SyncTreeRequest {
        content: Some(Content::Header(SyncTreeHeader {
            source: source.into(),
            root_hash: root.to_hex(),
            ..Default::default()
        })),
    }
}

fn nodes(list: Vec<merkle_proto::common::v1::TreeNode>) -> SyncTreeRequest {
    SyncTreeRequest {
        content: Some(Content::Nodes(NodeBatch { nodes: list })),
    }
}

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
async fn diffs_and_proofs_of_stored_trees_equal_the_merkle_cores() {
    let mut stack = TestStack::new();
    let mut c = start(&mut stack, &[]).await;
    let mut t = wide_tree(6, 12);
    let old = t.tree.clone();
    push(&mut c, "docs", &t).await;
    t.edit("d01/e0/f000", "modified");
    t.edit("d02/new/deep/file", "added");
    fs::remove_dir_all(t.dir.path().join("d03")).expect("rm");
    fs::remove_file(t.dir.path().join("d04/e1/f001")).expect("rm");
    fs::create_dir_all(t.dir.path().join("d04/e1/f001")).expect("file becomes a directory");
    write(t.dir.path(), "d04/e1/f001/inner", "x");
    t.rebuild();
    push(&mut c, "docs", &t).await;

    let mut stream = c
        .diff_snapshots(DiffSnapshotsRequest {
            old_root_hash: old.root.to_hex(),
            new_root_hash: t.tree.root.to_hex(),
        })
        .await
        .expect("diff")
        .into_inner();
    let mut got = Vec::new();
    while let Some(batch) = stream.message().await.expect("batch") {
        got.extend(
            batch
                .changes
                .iter()
                .map(|ch| change_from_proto(ch).expect("change")),
        );
    }
    let expected = diff_all(&old, old.root, &t.tree, t.tree.root).expect("core diff");
    assert!(expected.len() > 10, "a diff with every kind of change");
    assert_eq!(got, expected);

    for path in [
        "d01/e0/f000",
        "d02/new/deep/file",
        "d04/e1/f001/inner",
        "d05",
    ] {
        let proof = c
            .get_inclusion_proof(GetInclusionProofRequest {
                root_hash: t.tree.root.to_hex(),
                path: path.into(),
                ..Default::default()
            })
            .await
            .expect("proof")
            .into_inner()
            .proof
            .expect("proof");
        let proof = proof_from_proto(&proof).expect("decodes");
        let expected =
            prove(&t.tree, t.tree.root, t.tree.profile, path.as_bytes()).expect("core proof");
        assert_eq!(proof, expected, "{path}");
        proof.verify().expect("verifies");
    }
    let err = c
        .get_inclusion_proof(GetInclusionProofRequest {
            root_hash: t.tree.root.to_hex(),
            path: "d03/e0/f000".into(),
            ..Default::default()
        })
        .await
        .expect_err("removed");
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn directories_snapshots_and_sources_come_in_pages_with_tamper_safe_tokens() {
    let mut stack = TestStack::new();
    let mut c = start(&mut stack, &[]).await;
    let files: Vec<(String, String)> = (0..2500)
        .map(|i| (format!("big/f{i:05}"), i.to_string()))
        .collect();
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(p, b)| (p.as_str(), b.as_str()))
        .collect();
    let mut t = Tree::new(&refs);
    push(&mut c, "docs", &t).await;
    let root = t.tree.root.to_hex();

    let mut names = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = c
            .list_directory(ListDirectoryRequest {
                root_hash: root.clone(),
                path: "big".into(),
                page_size: 1000,
                page_token: token,
                ..Default::default()
            })
            .await
            .expect("page")
            .into_inner();
        pages += 1;
        names.extend(page.entries.into_iter().map(|e| e.name));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(
        names,
        files
            .iter()
            .map(|(p, _)| p[4..].to_owned())
            .collect::<Vec<_>>()
    );
    let whole = c
        .list_directory(ListDirectoryRequest {
            root_hash: root.clone(),
            path: "big".into(),
            page_size: 50_000,
            ..Default::default()
        })
        .await
        .expect("clamped")
        .into_inner();
    assert_eq!(
        whole.entries.len(),
        2500,
        "over the maximum is clamped to 10000, more than this has"
    );

    let first = c
        .list_directory(ListDirectoryRequest {
            root_hash: root.clone(),
            path: "big".into(),
            page_size: 10,
            ..Default::default()
        })
        .await
        .expect("page")
        .into_inner();
    let mut tampered = first.next_page_token.clone().into_bytes();
    tampered[4] = if tampered[4] == b'a' { b'b' } else { b'a' };
    let tampered = String::from_utf8(tampered).expect("hex");
    for (path, token) in [
        ("big", tampered.as_str()),
        ("", first.next_page_token.as_str()),
    ] {
        let err = c
            .list_directory(ListDirectoryRequest {
                root_hash: root.clone(),
                path: path.into(),
                page_token: token.into(),
                ..Default::default()
            })
            .await
            .expect_err("not this listing's token");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().starts_with("page_token: "),
            "{}",
            err.message()
        );
    }

    for i in 0..4 {
        t.edit("small", &i.to_string());
        push(&mut c, "docs", &t).await;
    }
    push(&mut c, "web", &Tree::new(&[("i", "1")])).await;
    let page = c
        .list_snapshots(ListSnapshotsRequest {
            source: "docs".into(),
            page_size: 2,
            ..Default::default()
        })
        .await
        .expect("page")
        .into_inner();
    assert_eq!(
        page.snapshots
            .iter()
            .map(|s| s.sequence)
            .collect::<Vec<_>>(),
        [5, 4]
    );
    let next = c
        .list_snapshots(ListSnapshotsRequest {
            source: "docs".into(),
            page_size: 2,
            page_token: page.next_page_token.clone(),
            ..Default::default()
        })
        .await
        .expect("page")
        .into_inner();
    assert_eq!(
        next.snapshots
            .iter()
            .map(|s| s.sequence)
            .collect::<Vec<_>>(),
        [3, 2]
    );
    let err = c
        .list_snapshots(ListSnapshotsRequest {
            source: "web".into(),
            page_token: page.next_page_token,
            ..Default::default()
        })
        .await
        .expect_err("another source's token");
    assert_eq!(err.code(), Code::InvalidArgument);
    let future = c
        .list_snapshots(ListSnapshotsRequest {
            source: "docs".into(),
            start_time: Some(prost_types::Timestamp {
                seconds: 4_000_000_000,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .expect("a range with nothing in it")
        .into_inner();
    assert!(future.snapshots.is_empty());

    let sources = c
        .list_sources(ListSourcesRequest {
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .expect("sources")
        .into_inner();
    assert_eq!(sources.sources[0].source, "docs");
    assert_eq!(sources.sources[0].snapshot_count, 5);
    let rest = c
        .list_sources(ListSourcesRequest {
            page_size: 1,
            page_token: sources.next_page_token,
        })
        .await
        .expect("sources")
        .into_inner();
    assert_eq!(rest.sources[0].source, "web");
    assert!(rest.next_page_token.is_empty());

    let by_sequence = c
        .get_snapshot(GetSnapshotRequest {
            source: "docs".into(),
            sequence: 2,
            ..Default::default()
        })
        .await
        .expect("by sequence")
        .into_inner()
        .snapshot
        .expect("snapshot");
    let by_id = c
        .get_snapshot(GetSnapshotRequest {
            snapshot_id: by_sequence.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .expect("by id")
        .into_inner()
        .snapshot;
    assert_eq!(Some(by_sequence), by_id);
}

#[tokio::test(flavor = "multi_thread")]
async fn latest_roots_are_read_cache_first_with_an_x_cache_header() {
    let mut stack = TestStack::new();
    let mut c = start(&mut stack, &[]).await;
    push(&mut c, "docs", &Tree::new(&[("a", "1")])).await;
    // The sync wrote the latest root through: the first read hits.
    let header = |r: &tonic::Response<_>| -> String {
        r.metadata()
            .get("x-cache")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let hit = c
        .get_latest_root(GetLatestRootRequest {
            source: "docs".into(),
            ..Default::default()
        })
        .await
        .expect("read");
    assert_eq!(header(&hit), "HIT");
    // A fresh DbSync over a cleared cache: MISS, then HIT.
    let cache = stack.service_mut("cache").uri();
    let (code, _, err) = run_merklectl(&["cache", "clear", "--addr", &cache]);
    assert_eq!(code, Some(0), "{err}");
    let miss = c
        .get_latest_root(GetLatestRootRequest {
            source: "docs".into(),
            ..Default::default()
        })
        .await
        .expect("read");
    assert_eq!(header(&miss), "MISS");
    let hit = c
        .get_latest_root(GetLatestRootRequest {
            source: "docs".into(),
            ..Default::default()
        })
        .await
        .expect("read");
    assert_eq!(header(&hit), "HIT");
    assert_eq!(hit.into_inner().snapshot, miss.into_inner().snapshot);

    // As grpcurl -v shows it.
    let addr = stack.service_mut("db-sync").addr;
    let (ok, out, err) = run_grpcurl(
        &["-v", "-d", r#"{"source":"docs"}"#],
        addr,
        &["merkle.dbsync.v1.DbSyncService/GetLatestRoot"],
    );
    assert!(ok, "{err}");
    assert!(out.contains("x-cache: HIT"), "{out}");

    let err = c
        .get_latest_root(GetLatestRootRequest {
            source: "nope".into(),
            ..Default::default()
        })
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
}

/// Everything a client does, checked against the truth; `label` names the situation.
async fn every_call_is_correct(c: &mut Client, label: &str) {
    let mut t = Tree::new(&[("a/b", "1"), ("c", "2")]);
    let first = push(c, "down", &t).await;
    t.edit("a/b", "changed");
    let second = push(c, "down", &t).await;
    assert!(second.changed, "{label}");
    assert!(
        !push(c, "down", &t).await.changed,
        "{label}: unchanged is still seen"
    );
    let latest = c
        .get_latest_root(GetLatestRootRequest {
            source: "down".into(),
            ..Default::default()
        })
        .await
        .expect(label);
    assert_eq!(
        latest
            .metadata()
            .get("x-cache")
            .and_then(|v| v.to_str().ok()),
        Some("MISS"),
        "{label}"
    );
    assert_eq!(
        latest.into_inner().snapshot.expect("snapshot").root_hash,
        t.tree.root.to_hex(),
        "{label}"
    );
    let dir = c
        .list_directory(ListDirectoryRequest {
            root_hash: t.tree.root.to_hex(),
            path: "a".into(),
            ..Default::default()
        })
        .await
        .expect(label)
        .into_inner();
    assert_eq!(dir.entries.len(), 1, "{label}");
    let mut diff = c
        .diff_snapshots(DiffSnapshotsRequest {
            old_root_hash: first.snapshot.expect("first").root_hash,
            new_root_hash: t.tree.root.to_hex(),
        })
        .await
        .expect(label)
        .into_inner();
    let changes = diff.message().await.expect(label).expect("a batch").changes;
    assert_eq!(changes.len(), 1, "{label}");
    assert_eq!(changes[0].path, "a/b", "{label}");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_redis_down_every_read_and_write_comes_from_postgres() {
    let mut stack = TestStack::new();
    let mut c = start(&mut stack, &[]).await;
    stack.redis.as_mut().expect("redis").stop();
    every_call_is_correct(&mut c, "Redis down").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_cache_service_down_every_read_and_write_comes_from_postgres() {
    let mut stack = TestStack::new();
    stack.start_postgres().await;
    let nowhere = format!(
        "http://127.0.0.1:{}",
        integration_tests::free_port().expect("port")
    );
    let db_sync = stack.start_service("db-sync", &[("CACHE_ADDR", nowhere)]);
    db_sync.wait_for(ServingStatus::Serving).await;
    let mut c = client(&db_sync.uri());
    every_call_is_correct(&mut c, "Cache down").await;
}

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

#[tokio::test(flavor = "multi_thread")]
async fn cache_warmup_loads_the_latest_roots_through_db_sync() {
    let mut stack = TestStack::new();
    let mut c = start(&mut stack, &[]).await;
    push(&mut c, "docs", &Tree::new(&[("a", "1")])).await;
    push(&mut c, "web", &Tree::new(&[("b", "2")])).await;
    // A Cache that knows DbSync: Warmup goes through DbSync's WarmCache.
    let db_sync = stack.service_mut("db-sync").uri();
    let cache = stack.start_service("cache", &[("DB_SYNC_ADDR", db_sync.clone())]);
    cache.wait_for(ServingStatus::Serving).await;
    let cache = cache.uri();
    let (code, out, err) = run_merklectl(&["cache", "clear", "--addr", &cache]);
    assert_eq!(code, Some(0), "{err}{out}");
    let (code, out, err) = run_merklectl(&["cache", "warmup", "--addr", &cache, "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(json["sources_warmed"], 2);
    assert_eq!(
        json["entries_written"], 4,
        "a latest root and a root node per source"
    );
    let hit = c
        .get_latest_root(GetLatestRootRequest {
            source: "web".into(),
            ..Default::default()
        })
        .await
        .expect("read");
    assert_eq!(
        hit.metadata().get("x-cache").and_then(|v| v.to_str().ok()),
        Some("HIT")
    );
    let warmed = c
        .warm_cache(WarmCacheRequest {
            sources: vec!["docs".into()],
        })
        .await
        .expect("warm")
        .into_inner();
    assert_eq!(
        (
            warmed.sources_warmed,
            warmed.entries_written,
            warmed.cache_available
        ),
        (1, 2, true)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn merklectl_push_snapshots_ls_diff_and_prove_against_the_running_service() {
    let mut stack = TestStack::new();
    start(&mut stack, &[]).await;
    let addr = stack.service_mut("db-sync").uri();
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "etc/passwd", "root:x:0:0");
    write(dir.path(), "readme", "hello");
    let path = dir.path().to_str().expect("utf-8");
    let (code, out, err) = run_merklectl(&["push", "docs", path, "--addr", &addr]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("stored docs@1 root "), "{out}");
    write(dir.path(), "etc/passwd", "root:x:0:0:changed");
    write(dir.path(), "new/file", "n");
    let (code, out, _) = run_merklectl(&["push", "docs", path, "--addr", &addr, "--json"]);
    assert_eq!(code, Some(0));
    let pushed: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(pushed["snapshot"]["sequence"], 2);

    let (code, out, _) = run_merklectl(&["snapshots", "docs", "--addr", &addr]);
    assert_eq!(code, Some(0));
    assert_eq!(out.lines().count(), 3, "a header and two rows:\n{out}");
    let (code, out, _) = run_merklectl(&["snapshots", "--addr", &addr]);
    assert_eq!(code, Some(0));
    assert!(
        out.lines().nth(1).is_some_and(|l| l.starts_with("docs")),
        "{out}"
    );

    let (code, out, _) = run_merklectl(&["ls", "docs@1", "etc", "--addr", &addr]);
    assert_eq!(code, Some(0));
    assert!(out.contains("passwd") && out.starts_with("file"), "{out}");
    let (_, out, _) = run_merklectl(&["ls", "docs", "--addr", &addr, "--json"]);
    let names: Vec<String> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json")["name"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    assert_eq!(names, ["etc", "new", "readme"]);

    let (code, out, _) = run_merklectl(&["diff", "--stored", "docs", "1", "2", "--addr", &addr]);
    assert_eq!(code, Some(1), "differences: exit 1");
    assert_eq!(out, "M etc/passwd\nA new\nA new/file\n");
    let (code, _, _) = run_merklectl(&["diff", "--stored", "docs", "2", "latest", "--addr", &addr]);
    assert_eq!(code, Some(0));

    let (code, proof, err) =
        run_merklectl(&["prove", "--stored", "docs@2", "etc/passwd", "--addr", &addr]);
    assert_eq!(code, Some(0), "{err}");
    let file = dir.path().join("proof.json");
    fs::write(&file, proof).expect("write proof");
    let root = pushed["snapshot"]["root_hash"]
        .as_str()
        .expect("root")
        .to_owned();
    let (code, out, err) = run_merklectl(&[
        "verify-proof",
        file.to_str().expect("utf-8"),
        "--root",
        &root,
        "--content",
        dir.path().join("etc/passwd").to_str().expect("utf-8"),
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("valid: etc/passwd is a file"), "{out}");

    let (code, _, err) = run_merklectl(&["ls", "nope", "--addr", &addr]);
    assert_eq!(code, Some(2));
    assert!(err.contains("NOT_FOUND"), "{err}");
}
