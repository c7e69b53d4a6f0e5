//! What the DbSync tests share: trees built with the Merkle core, the stack, raw SyncTree calls.

use std::{fs, path::Path};

use integration_tests::{ServingStatus, TestStack};
use merkle_core::{Digest, MemTree};
use merkle_proto::{
    dbsync::v1::{
        SyncTreeHeader, SyncTreeRequest, SyncTreeResponse,
        db_sync_service_client::DbSyncServiceClient, sync_tree_request::Content,
    },
    treebuilder::v1::NodeBatch,
};
use merkle_shared::client::Channel;
use merklectl::stored::upload;

pub(crate) type Client = DbSyncServiceClient<Channel>;

/// A directory and its tree, built with the Merkle core as TreeBuilder would.
pub(crate) struct Tree {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) tree: MemTree,
    pub(crate) stats: merkle_core::TreeStats,
}

pub(crate) fn write(root: &Path, path: &str, body: &str) {
    let p = root.join(path);
    fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    fs::write(p, body).expect("write");
}

impl Tree {
    pub(crate) fn new(files: &[(&str, &str)]) -> Tree {
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

    pub(crate) fn rebuild(&mut self) {
        let (outcome, tree) =
            merklectl::local::build_tree(self.dir.path(), Default::default()).expect("build");
        self.tree = tree;
        self.stats = outcome.stats;
    }

    pub(crate) fn edit(&mut self, path: &str, body: &str) {
        write(self.dir.path(), path, body);
        self.rebuild();
    }
}

/// A tree of `dirs` x `files` files with a few levels: d00/e0/f000 ...
pub(crate) fn wide_tree(dirs: usize, files: usize) -> Tree {
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
pub(crate) async fn start(stack: &mut TestStack, env: &[(&str, String)]) -> Client {
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
pub(crate) fn client(uri: &str) -> Client {
    DbSyncServiceClient::new(merklectl::remote::connect(uri).expect("channel"))
}

pub(crate) async fn count(db: &tokio_postgres::Client, table: &str) -> i64 {
    db.query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .expect("count")
        .get(0)
}

/// Waits (up to 10 s) until the transparency log took in every stored record: its own
/// transaction writes, so a test that watches transaction ids waits for it first.
pub(crate) async fn log_settled(db: &tokio_postgres::Client) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while count(db, "merkle_log_pending").await > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the log did not take in the records"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The next transaction id: it moves only when a transaction writes.
pub(crate) async fn next_xid(db: &tokio_postgres::Client) -> String {
    db.query_one("SELECT pg_snapshot_xmax(pg_current_snapshot())::text", &[])
        .await
        .expect("xmax")
        .get(0)
}

pub(crate) async fn push(c: &mut Client, source: &str, t: &Tree) -> SyncTreeResponse {
    upload(c, source, "", &t.tree, &t.stats)
        .await
        .expect("upload")
}

/// SyncTree with exactly these messages.
pub(crate) async fn sync_raw(
    c: &mut Client,
    messages: Vec<SyncTreeRequest>,
) -> Result<SyncTreeResponse, tonic::Status> {
    c.sync_tree(tokio_stream::iter(messages))
        .await
        .map(|r| r.into_inner())
}

pub(crate) fn header(source: &str, root: Digest) -> SyncTreeRequest {
    SyncTreeRequest {
        content: Some(Content::Header(SyncTreeHeader {
            source: source.into(),
            root_hash: root.to_hex(),
            ..Default::default()
        })),
    }
}

pub(crate) fn nodes(list: Vec<merkle_proto::common::v1::TreeNode>) -> SyncTreeRequest {
    SyncTreeRequest {
        content: Some(Content::Nodes(NodeBatch { nodes: list })),
    }
}
