//! Directory nodes: how they are stored, and reading them through three layers.
//!
//! A node is stored as its canonical encoding (spec section 4; its SHA-256 is its key), the
//! entries' sizes (not hashed, so not in the encoding) and the hashes of its subdirectories
//! (for garbage collection). Nodes never change, so they are cached without invalidation:
//! first in this process (an LRU sized in bytes, `NODE_CACHE_BYTES`), then in the cache's
//! `NAMESPACE_TREE_META`, then PostgreSQL. Whatever layer a node comes from, its bytes are
//! hashed again before use, so a corrupted cache entry is a miss, never a wrong answer.

use merkle_shared::postgres::Traced as _;
use std::{collections::HashMap, sync::Arc};

use merkle_core::{Digest, DirNode, EntryKind, Profile, digest::sha256};
use merkle_proto::cache::v1::Namespace;
use merkle_shared::{
    cache::CacheClient,
    postgres::PgPool,
    read_replicas::{ReadOn, ReadReplicas},
};

use crate::error::Error;

/// A node as its row holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRow {
    pub hash: Digest,
    pub encoded: Vec<u8>,
    pub sizes: Vec<u8>,
    pub child_dirs: Vec<u8>,
}

/// A node ready to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredNode {
    pub profile: Profile,
    /// Entries with their sizes.
    pub node: DirNode,
    /// Bytes it takes in the in-process cache (about).
    pub weight: u64,
}

impl NodeRow {
    /// The row of `node` under `profile`; its hash is computed here.
    pub fn from_node(
        profile: Profile,
        node: &DirNode,
    ) -> Result<NodeRow, merkle_core::node::NodeError> {
        let encoded = node.encode(profile)?;
        let hash = sha256(&encoded);
        let sizes = node
            .entries
            .iter()
            .flat_map(|e| e.size.to_be_bytes())
            .collect();
        let child_dirs = node
            .entries
            .iter()
            .filter(|e| e.kind == EntryKind::Directory)
            .flat_map(|e| e.hash.0)
            .collect();
        Ok(NodeRow {
            hash,
            encoded,
            sizes,
            child_dirs,
        })
    }

    /// The hashes of the node's subdirectories.
    pub fn children(&self) -> impl Iterator<Item = Digest> + '_ {
        self.child_dirs
            .chunks_exact(32)
            .map(|c| Digest(c.try_into().expect("32-byte chunks")))
    }
}

/// Decodes stored bytes, checking they hash to `hash`: `None` when they do not decode or do
/// not match (the caller treats that as not found in this layer).
pub fn decode(hash: &Digest, encoded: &[u8], sizes: &[u8]) -> Option<StoredNode> {
    if sha256(encoded) != *hash {
        return None;
    }
    let (profile, mut node) = DirNode::decode(encoded).ok()?;
    if sizes.len() != node.entries.len() * 8 {
        return None;
    }
    for (entry, size) in node.entries.iter_mut().zip(sizes.chunks_exact(8)) {
        entry.size = u64::from_be_bytes(size.try_into().ok()?);
    }
    let weight = (encoded.len() + sizes.len() + node.entries.len() * 48 + 64) as u64;
    Some(StoredNode {
        profile,
        node,
        weight,
    })
}

/// The form of a node in the cache's `NAMESPACE_TREE_META`: private to DbSync (the bytes of
/// its row), so it is declared here rather than in the public contract.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CachedNode {
    #[prost(bytes = "vec", tag = "1")]
    pub encoded: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub sizes: Vec<u8>,
}

#[derive(Clone)]
struct Weight;

impl quick_cache::Weighter<Digest, Arc<StoredNode>> for Weight {
    fn weight(&self, _key: &Digest, node: &Arc<StoredNode>) -> u64 {
        node.weight
    }
}

/// Reads nodes: process memory, then the Cache service, then PostgreSQL (a read replica
/// first when there is one: a node is there or not yet, never different; what it lacks is
/// read from the primary).
pub struct NodeStore {
    pool: PgPool,
    replicas: Option<Arc<ReadReplicas>>,
    cache: CacheClient,
    memory: Option<quick_cache::sync::Cache<Digest, Arc<StoredNode>, Weight>>,
}

/// Nodes kept in memory are rarely over a few KiB; the estimate only sizes the table.
const TYPICAL_NODE_BYTES: u64 = 4096;

impl NodeStore {
    pub fn new(
        pool: PgPool,
        replicas: Option<Arc<ReadReplicas>>,
        cache: CacheClient,
        memory_bytes: u64,
    ) -> Self {
        let memory = (memory_bytes > 0).then(|| {
            quick_cache::sync::Cache::with_weighter(
                (memory_bytes / TYPICAL_NODE_BYTES).max(16) as usize,
                memory_bytes,
                Weight,
            )
        });
        NodeStore {
            pool,
            replicas,
            cache,
            memory,
        }
    }

    /// Keeps a node just stored or read in process memory.
    pub fn remember(&self, hash: Digest, node: Arc<StoredNode>) {
        if let Some(memory) = &self.memory {
            memory.insert(hash, node);
        }
    }

    /// One node, or `None` when it is not stored.
    pub async fn get(&self, hash: Digest) -> Result<Option<Arc<StoredNode>>, Error> {
        Ok(self.get_many(&[hash]).await?.remove(&hash))
    }

    /// The stored ones of `hashes`, each layer asked once for what the one before lacked.
    pub async fn get_many(
        &self,
        hashes: &[Digest],
    ) -> Result<HashMap<Digest, Arc<StoredNode>>, Error> {
        let mut found = HashMap::with_capacity(hashes.len());
        let mut wanted: Vec<Digest> = Vec::new();
        for hash in hashes {
            if found.contains_key(hash) || wanted.contains(hash) {
                continue;
            }
            match self.memory.as_ref().and_then(|m| m.get(hash)) {
                Some(node) => {
                    found.insert(*hash, node);
                }
                None => wanted.push(*hash),
            }
        }
        if wanted.is_empty() {
            return Ok(found);
        }

        // The cache, in batches of its limit.
        let mut still: Vec<Digest> = Vec::new();
        for chunk in wanted.chunks(1000) {
            let keys: Vec<String> = chunk.iter().map(Digest::to_hex).collect();
            let cached: Vec<Option<CachedNode>> =
                self.cache.get_many(Namespace::TreeMeta, &keys).await;
            for (hash, value) in chunk.iter().zip(cached) {
                match value.and_then(|c| decode(hash, &c.encoded, &c.sizes)) {
                    Some(node) => {
                        let node = Arc::new(node);
                        self.remember(*hash, node.clone());
                        found.insert(*hash, node);
                    }
                    None => still.push(*hash),
                }
            }
        }
        if still.is_empty() {
            return Ok(found);
        }

        // PostgreSQL, then fill the layers above.
        let rows = self.load(&still).await?;
        let mut fill = Vec::with_capacity(rows.len());
        for row in rows {
            let hash_bytes: &[u8] = row.get(0);
            let Ok(hash) = <[u8; 32]>::try_from(hash_bytes).map(Digest) else {
                continue;
            };
            let encoded: Vec<u8> = row.get(1);
            let sizes: Vec<u8> = row.get(2);
            let node = decode(&hash, &encoded, &sizes).ok_or_else(|| {
                Error::DataLoss(format!("stored node {hash} does not match its hash"))
            })?;
            let node = Arc::new(node);
            self.remember(hash, node.clone());
            found.insert(hash, node);
            fill.push((hash.to_hex(), CachedNode { encoded, sizes }));
        }
        for chunk in fill.chunks(1000) {
            self.cache.set_many(Namespace::TreeMeta, chunk, None).await;
        }
        Ok(found)
    }
}

impl NodeStore {
    /// The rows of `hashes` that are stored: from a replica, then from the primary for those
    /// the replica lacks (or all of them, when it fails).
    async fn load(&self, hashes: &[Digest]) -> Result<Vec<tokio_postgres::Row>, Error> {
        async fn rows(pool: &PgPool, hashes: &[Digest]) -> Result<Vec<tokio_postgres::Row>, Error> {
            let conn = pool.get().await?;
            let keys: Vec<&[u8]> = hashes.iter().map(|h| h.0.as_slice()).collect();
            Ok(conn
                .query_traced(crate::store::queries::NODE, &[&keys])
                .await?)
        }
        let Some((replicas, replica)) = self.replicas.as_ref().and_then(|r| Some((r, r.pick()?)))
        else {
            if let Some(replicas) = &self.replicas {
                replicas.count(ReadOn::Primary);
            }
            return rows(&self.pool, hashes).await;
        };
        let mut found = match rows(&replica.pool, hashes).await {
            Ok(found) => found,
            Err(e) => {
                replicas.failed(replica, &e);
                replicas.count(ReadOn::Primary);
                return rows(&self.pool, hashes).await;
            }
        };
        replicas.count(ReadOn::Replica);
        if found.len() < hashes.len() {
            let have: std::collections::HashSet<&[u8]> =
                found.iter().map(|row| row.get::<_, &[u8]>(0)).collect();
            let lacking: Vec<Digest> = hashes
                .iter()
                .filter(|h| !have.contains(h.0.as_slice()))
                .copied()
                .collect();
            // Too new for the replica (or not stored at all): the primary decides.
            found.extend(rows(&self.pool, &lacking).await?);
        }
        Ok(found)
    }

    /// Copies `hashes` from PostgreSQL into the cache; returns (entries tried, entries stored).
    pub async fn warm(&self, hashes: &[Digest]) -> Result<(u64, u64), Error> {
        let conn = self.pool.get().await?;
        let keys: Vec<&[u8]> = hashes.iter().map(|h| h.0.as_slice()).collect();
        let rows = conn
            .query_traced(crate::store::queries::NODE, &[&keys])
            .await?;
        drop(conn);
        let entries: Vec<(String, CachedNode)> = rows
            .iter()
            .map(|row| {
                let hash: &[u8] = row.get(0);
                (
                    merkle_core::digest::hex(hash),
                    CachedNode {
                        encoded: row.get(1),
                        sizes: row.get(2),
                    },
                )
            })
            .collect();
        let stored = self
            .cache
            .set_many(Namespace::TreeMeta, &entries, None)
            .await;
        Ok((entries.len() as u64, stored))
    }
}

#[cfg(test)]
mod tests {
    use merkle_core::{Entry, digest::file_leaf};

    use super::*;

    fn node() -> DirNode {
        DirNode {
            entries: vec![
                Entry {
                    name: b"a".to_vec(),
                    kind: EntryKind::File,
                    hash: file_leaf(b"a"),
                    size: 1,
                    meta: None,
                },
                Entry {
                    name: b"sub".to_vec(),
                    kind: EntryKind::Directory,
                    hash: file_leaf(b"pretend"),
                    size: 0,
                    meta: None,
                },
            ],
        }
    }

    #[test]
    fn rows_keep_sizes_and_children_and_decode_back() {
        let row = NodeRow::from_node(Profile::Content, &node()).expect("row");
        assert_eq!(row.hash, node().hash(Profile::Content).expect("hash"));
        assert_eq!(
            row.children().collect::<Vec<_>>(),
            vec![file_leaf(b"pretend")]
        );
        let stored = decode(&row.hash, &row.encoded, &row.sizes).expect("decodes");
        assert_eq!(stored.node, node());
        assert_eq!(stored.profile, Profile::Content);
    }

    #[test]
    fn bytes_that_do_not_match_their_hash_are_not_used() {
        let row = NodeRow::from_node(Profile::Content, &node()).expect("row");
        let mut tampered = row.encoded.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(decode(&row.hash, &tampered, &row.sizes).is_none());
        assert!(decode(&row.hash, &row.encoded, &row.sizes[..8]).is_none());
    }
}
