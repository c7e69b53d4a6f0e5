//! Trees DbSync stores, for VerifyTree: when the expected root is not one of this TreeBuilder's
//! recent builds, the nodes a diff needs are fetched from DbSync (ListDirectory of a node by
//! its hash), a level at a time and only where the two trees differ, then diffed in memory.

use std::collections::HashMap;

use futures::{StreamExt as _, TryStreamExt as _};
use merkle_core::{
    Digest, DirNode, MemTree, Profile,
    diff::{SubtreePair, subtrees_visited},
};
use merkle_proto::dbsync::v1::db_sync_service_client::DbSyncServiceClient;
use merkle_shared::{
    client::{Channel, channel},
    config::{ClientArgs, ConfigError},
    stored_tree::fetch_node,
};
use tonic::Code;

/// Nodes fetched from DbSync at once.
const PARALLEL_FETCHES: usize = 16;

/// The way to DbSync, if one is configured.
#[derive(Clone)]
pub struct StoredTrees {
    db_sync: Option<DbSyncServiceClient<Channel>>,
}

impl StoredTrees {
    pub fn new(addr: Option<&str>, args: &ClientArgs) -> Result<Self, ConfigError> {
        let db_sync = match addr {
            Some(addr) => Some(
                DbSyncServiceClient::new(channel("DB_SYNC_ADDR (--db-sync-addr)", addr, args)?)
                    .max_decoding_message_size(64 << 20),
            ),
            None => None,
        };
        Ok(StoredTrees { db_sync })
    }

    /// The nodes of the stored tree `expected` that a diff against `actual` reads, or `None`
    /// when there is no DbSync, it does not store that root, or it cannot be asked now (the
    /// caller then compares roots only).
    pub async fn for_diff(
        &self,
        expected: Digest,
        profile: Profile,
        actual: &MemTree,
    ) -> Option<MemTree> {
        let client = self.db_sync.as_ref()?;
        match fetch_for_diff(client, expected, profile, actual).await {
            Ok(tree) => Some(tree),
            Err(status) if status.code() == Code::NotFound => None,
            Err(status) => {
                tracing::warn!(code = ?status.code(), message = status.message(), root = %expected, "cannot read the expected tree from DbSync; comparing roots only");
                None
            }
        }
    }
}

async fn fetch_for_diff(
    client: &DbSyncServiceClient<Channel>,
    expected: Digest,
    profile: Profile,
    actual: &MemTree,
) -> Result<MemTree, tonic::Status> {
    let mut nodes: HashMap<Digest, DirNode> = HashMap::new();
    nodes.insert(expected, fetch_node(client, expected, profile).await?);
    let mut level: Vec<SubtreePair> = Vec::new();
    subtrees_visited(
        nodes.get(&expected),
        actual.nodes.get(&actual.root),
        &mut level,
    );
    // `level` holds the directories at `depth`: never past the spec's limit.
    let mut depth = 1;
    while !level.is_empty() {
        if depth > merkle_core::MAX_DEPTH {
            return Err(tonic::Status::failed_precondition(format!(
                "the stored tree {expected} nests deeper than {} directories, the limit of docs/merkle-spec.md section 4.1",
                merkle_core::MAX_DEPTH
            )));
        }
        depth += 1;
        let wanted: Vec<Digest> = level
            .iter()
            .filter_map(|(o, _)| *o)
            .filter(|h| !nodes.contains_key(h))
            .collect();
        let fetched: Vec<(Digest, DirNode)> = futures::stream::iter(wanted)
            .map(|hash| async move { fetch_node(client, hash, profile).await.map(|n| (hash, n)) })
            .buffer_unordered(PARALLEL_FETCHES)
            .try_collect()
            .await?;
        nodes.extend(fetched);
        let mut next = Vec::new();
        for (o, n) in &level {
            subtrees_visited(
                o.and_then(|h| nodes.get(&h)),
                n.and_then(|h| actual.nodes.get(&h)),
                &mut next,
            );
        }
        level = next;
    }
    Ok(MemTree {
        root: expected,
        profile,
        nodes,
    })
}
