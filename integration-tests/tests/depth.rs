//! The spec's depth limit (256 directories, section 4.1) through the real services: TreeBuilder
//! builds a tree at the limit and refuses one past it; DbSync stores a tree at the limit (sent
//! whole, or partly taken from a stored subtree) and refuses one past it; a tree 2,000 levels
//! deep stored before the limit existed is refused by every walk, quickly, and no process dies.

use std::{collections::HashMap, path::Path, time::Instant};

use integration_tests::{ServingStatus, TestStack};
use merkle_core::{DirNode, Entry, EntryKind, MAX_DEPTH, MemTree, Profile, digest::file_leaf};
use merkle_db_sync::sql::{self as queries, NodeRow};
use merkle_proto::{
    dbsync::v1::{
        DiffSnapshotsRequest, GetInclusionProofRequest, ListDirectoryRequest,
        db_sync_service_client::DbSyncServiceClient,
    },
    treebuilder::v1::{
        BuildTreeRequest, build_tree_response::Event,
        tree_builder_service_client::TreeBuilderServiceClient,
    },
};
use merkle_shared::client::Channel;
use merklectl::stored::upload;
use tonic::Code;

/// A file `f` holding `content`, below `depth` directories named `d`.
fn chain(depth: usize, content: &[u8]) -> MemTree {
    let leaf = DirNode {
        entries: vec![Entry {
            name: b"f".to_vec(),
            kind: EntryKind::File,
            hash: file_leaf(content),
            size: content.len() as u64,
            meta: None,
        }],
    };
    let root = leaf.hash(Profile::Content).expect("hash");
    let mut tree = MemTree {
        root,
        profile: Profile::Content,
        nodes: HashMap::from([(root, leaf)]),
    };
    wrap(&mut tree, depth);
    tree
}

/// Puts `levels` more directories named `d` above the tree's root.
fn wrap(tree: &mut MemTree, levels: usize) {
    for _ in 0..levels {
        let node = DirNode {
            entries: vec![Entry {
                name: b"d".to_vec(),
                kind: EntryKind::Directory,
                hash: tree.root,
                size: 0,
                meta: None,
            }],
        };
        tree.root = node.hash(Profile::Content).expect("hash");
        tree.nodes.insert(tree.root, node);
    }
}

fn path(depth: usize) -> String {
    format!("{}f", "d/".repeat(depth))
}

async fn sync(
    c: &mut DbSyncServiceClient<Channel>,
    source: &str,
    tree: &MemTree,
) -> Result<u64, tonic::Status> {
    let answer = upload(c, source, "", tree, &Default::default()).await?;
    Ok(answer.snapshot.expect("snapshot").sequence)
}

#[tokio::test(flavor = "multi_thread")]
async fn tree_builder_builds_at_the_limit_and_refuses_one_past_it() {
    let mut stack = TestStack::new();
    let nest = |root: &Path, depth: usize| {
        let dir = root.join(path(depth));
        std::fs::create_dir_all(dir.parent().expect("parent")).expect("mkdir");
        std::fs::write(&dir, "x").expect("write");
    };
    let (at, past) = (stack.dir().join("at"), stack.dir().join("past"));
    nest(&at, MAX_DEPTH);
    nest(&past, MAX_DEPTH + 1);
    let service = stack.start_serving("tree-builder").await;
    let mut c = TreeBuilderServiceClient::new(service.channel_as("operator"));
    let build = |path: &Path| BuildTreeRequest {
        path: path.display().to_string(),
        include_nodes: true,
        ..Default::default()
    };
    let mut stream = c
        .build_tree(build(&at))
        .await
        .expect("BuildTree")
        .into_inner();
    let mut root = None;
    while let Some(message) = stream.message().await.expect("stream") {
        if let Some(Event::Result(result)) = message.event {
            root = Some(result.root_hash);
        }
    }
    assert_eq!(root, Some(chain(MAX_DEPTH, b"x").root.to_hex()));
    let mut stream = c
        .build_tree(build(&past))
        .await
        .expect("BuildTree")
        .into_inner();
    let err = loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("a tree past the limit was built"),
            Err(status) => break status,
        }
    };
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    assert!(err.message().contains("256"), "{}", err.message());
    stack
        .service_mut("tree-builder")
        .wait_for(ServingStatus::Serving)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn db_sync_stores_at_the_limit_refuses_past_it_and_never_walks_a_deeper_stored_tree() {
    let mut stack = TestStack::new();
    stack.start_postgres().await;
    let db_sync = stack.start_serving("db-sync").await;
    let mut c =
        DbSyncServiceClient::new(merklectl::remote::connect(&db_sync.uri()).expect("channel"));

    // Sent whole: 256 deep is stored, 257 is refused and stores nothing.
    let at = chain(MAX_DEPTH, b"a");
    assert_eq!(sync(&mut c, "at", &at).await.expect("at the limit"), 1);
    let err = sync(&mut c, "past", &chain(MAX_DEPTH + 1, b"a"))
        .await
        .expect_err("past");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(
        err.message().contains("deeper than 256"),
        "{}",
        err.message()
    );

    // A stored subtree 200 deep, under 56 new levels: 256 in all; under 57: refused.
    let base = chain(200, b"b");
    sync(&mut c, "base", &base).await.expect("base");
    let mut on_top = base.clone();
    wrap(&mut on_top, MAX_DEPTH - 200);
    assert_eq!(
        sync(&mut c, "on-top", &on_top).await.expect("256 in all"),
        1
    );
    wrap(&mut on_top, 1);
    let err = sync(&mut c, "too-high", &on_top)
        .await
        .expect_err("257 in all");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());

    // The walks work at the limit.
    let other = chain(MAX_DEPTH, b"z");
    sync(&mut c, "other", &other).await.expect("other");
    let mut diff = c
        .diff_snapshots(DiffSnapshotsRequest {
            old_root_hash: at.root.to_hex(),
            new_root_hash: other.root.to_hex(),
        })
        .await
        .expect("diff")
        .into_inner();
    let batch = diff.message().await.expect("batch").expect("changes");
    assert_eq!(batch.changes[0].path, path(MAX_DEPTH));
    c.get_inclusion_proof(GetInclusionProofRequest {
        root_hash: at.root.to_hex(),
        path: path(MAX_DEPTH),
        ..Default::default()
    })
    .await
    .expect("a proof at the limit");

    // A tree 2,000 deep, stored before the limit existed (written into PostgreSQL directly).
    let legacy = chain(2000, b"old");
    let db = stack.sql().await;
    for chunk in legacy.nodes.iter().collect::<Vec<_>>().chunks(500) {
        let rows: Vec<NodeRow> = chunk
            .iter()
            .map(|(_, node)| NodeRow::from_node(Profile::Content, node).expect("row"))
            .collect();
        let col = |f: fn(&NodeRow) -> &[u8]| rows.iter().map(f).collect::<Vec<&[u8]>>();
        db.query(
            queries::INSERT_NODES,
            &[
                &col(|r| r.hash.0.as_slice()),
                &col(|r| &r.encoded),
                &col(|r| &r.sizes),
                &col(|r| &r.child_dirs),
            ],
        )
        .await
        .expect("insert legacy nodes");
    }
    let started = Instant::now();
    let err = c
        .diff_snapshots(DiffSnapshotsRequest {
            old_root_hash: legacy.root.to_hex(),
            new_root_hash: at.root.to_hex(),
        })
        .await
        .map(|r| r.into_inner());
    let err = match err {
        Err(status) => status,
        Ok(mut stream) => stream.message().await.expect_err("refused"),
    };
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(
        err.message().contains("deeper than 256"),
        "{}",
        err.message()
    );
    for result in [
        c.get_inclusion_proof(GetInclusionProofRequest {
            root_hash: legacy.root.to_hex(),
            path: path(2000),
            ..Default::default()
        })
        .await
        .map(|_| ()),
        c.list_directory(ListDirectoryRequest {
            root_hash: legacy.root.to_hex(),
            path: "d/".repeat(1999) + "d",
            ..Default::default()
        })
        .await
        .map(|_| ()),
    ] {
        let err = result.expect_err("a path past the limit");
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        assert!(
            err.message().contains("257 components"),
            "{}",
            err.message()
        );
    }
    // Building on it is refused too.
    let err = sync(&mut c, "legacy", &legacy).await.expect_err("too deep");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(
        started.elapsed().as_secs() < 10,
        "took {:?}",
        started.elapsed()
    );
    stack
        .service_mut("db-sync")
        .wait_for(ServingStatus::Serving)
        .await;
    assert!(
        stack
            .service_mut("db-sync")
            .process
            .try_exit_status()
            .is_none(),
        "DbSync died"
    );
}
