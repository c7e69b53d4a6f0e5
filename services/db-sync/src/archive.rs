//! The archive of snapshots: PostgreSQL behind the cache. It decides what is read from where
//! and what is written through: the latest snapshot of each source (mutable, written through on
//! every change, `NAMESPACE_LATEST_ROOT`) and directory nodes (immutable, `nodes.rs`).

use merkle_shared::postgres::Traced as _;
use std::{collections::HashMap, sync::Arc};

use merkle_core::Digest;
use merkle_proto::{cache::v1::Namespace, dbsync::v1 as pb};
use merkle_shared::{
    cache::{CacheClient, Loaded},
    names::SourceName,
    page_token::PageTokens,
    postgres::PgPool,
};
use tokio::sync::OnceCell;
use tonic::{Code, Status};

use crate::{
    error::Error,
    nodes::{CachedNode, NodeRow, NodeStore, decode},
    store::{self, Retention, queries},
    sync::{self, Header, Outcome},
};

/// Settings of the archive.
#[derive(Debug, Clone)]
pub struct ArchiveSettings {
    pub sync_max_bytes: u64,
    pub node_cache_bytes: u64,
    /// Nodes a sync relies on are marked used again when their mark is older than this (half
    /// of GC_GRACE): a newer mark protects them until the sync commits.
    pub touch_after: std::time::Duration,
}

/// Snapshots and nodes, cache-first.
pub struct Archive {
    pub pool: PgPool,
    pub cache: CacheClient,
    pub nodes: NodeStore,
    pub settings: ArchiveSettings,
    /// The history's keys (docs/merkle-spec.md section 10).
    pub signer: Arc<crate::history::Signer>,
    tokens: OnceCell<PageTokens>,
    /// Wakes the garbage collector (after retention deleted snapshots).
    pub collect: tokio::sync::Notify,
}

impl Archive {
    pub fn new(
        pool: PgPool,
        cache: CacheClient,
        settings: ArchiveSettings,
        signer: Arc<crate::history::Signer>,
    ) -> Arc<Self> {
        Arc::new(Archive {
            nodes: NodeStore::new(pool.clone(), cache.clone(), settings.node_cache_bytes),
            pool,
            cache,
            settings,
            signer,
            tokens: OnceCell::new(),
            collect: tokio::sync::Notify::new(),
        })
    }

    /// The page-token signer (its key is read from PostgreSQL once).
    pub async fn tokens(&self) -> Result<&PageTokens, Error> {
        self.tokens
            .get_or_try_init(|| async {
                Ok(PageTokens::new(store::page_token_key(&self.pool).await?))
            })
            .await
    }

    /// The latest snapshot of `source`, cache-first (concurrent misses share one read).
    pub async fn latest(
        self: &Arc<Self>,
        source: &SourceName,
    ) -> Result<Loaded<pb::Snapshot>, Status> {
        let archive = self.clone();
        let name = source.clone();
        self.cache
            .get_or_load(
                Namespace::LatestRoot,
                source.as_str(),
                None,
                move || async move {
                    let conn = archive.pool.get().await.map_err(Error::from)?;
                    match store::latest(&*conn, name.as_str()).await? {
                        Some(snapshot) => Ok(snapshot.to_proto()),
                        None => Err(Error::NotFound(format!("source: {name} has no snapshots"))),
                    }
                },
            )
            .await
    }

    /// The latest snapshot, or `None` for a source without snapshots.
    async fn latest_if_any(
        self: &Arc<Self>,
        source: &SourceName,
    ) -> Result<Option<pb::Snapshot>, Status> {
        match self.latest(source).await {
            Ok(loaded) => Ok(Some(loaded.value)),
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(status),
        }
    }

    /// Which of `hashes` are not stored (in request order). The found ones are marked used.
    pub async fn find_missing(&self, hashes: &[Digest]) -> Result<Vec<Digest>, Error> {
        let conn = self.pool.get().await?;
        let keys: Vec<&[u8]> = hashes.iter().map(|h| h.0.as_slice()).collect();
        let found: std::collections::HashSet<Vec<u8>> = conn
            .query_traced(
                queries::FIND_NODES,
                &[&keys, &self.settings.touch_after.as_secs_f64()],
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        Ok(hashes
            .iter()
            .filter(|h| !found.contains(h.0.as_slice()))
            .copied()
            .collect())
    }

    /// Before any node is received: a retry of a stored build, or an unchanged root, is
    /// answered here without a write. `None`: the nodes are needed.
    pub async fn answer_early(
        self: &Arc<Self>,
        header: &Header,
    ) -> Result<Option<Outcome>, Status> {
        if !header.build_id.is_empty() {
            let conn = self.pool.get().await.map_err(Error::from)?;
            if let Some(done) =
                store::by_build(&*conn, header.source.as_str(), &header.build_id).await?
            {
                return Ok(Some(sync::replay(header, done)?));
            }
        }
        let latest = self.latest_if_any(&header.source).await?;
        if let Some(latest) = latest.filter(|l| l.root_hash == header.root.to_hex()) {
            return Ok(Some(Outcome::Unchanged(latest)));
        }
        Ok(None)
    }

    /// Stores a snapshot with the nodes received, then writes the cache through.
    pub async fn store(
        self: &Arc<Self>,
        header: &Header,
        sent: HashMap<Digest, NodeRow>,
    ) -> Result<Outcome, Error> {
        let root_row = sent.get(&header.root).cloned();
        let new_nodes: Vec<(String, CachedNode)> = sent
            .values()
            .map(|r| {
                (
                    r.hash.to_hex(),
                    CachedNode {
                        encoded: r.encoded.clone(),
                        sizes: r.sizes.clone(),
                    },
                )
            })
            .collect();
        let outcome = sync::store(
            &self.pool,
            &self.signer,
            header,
            sent,
            self.settings.touch_after,
        )
        .await?;
        if let Outcome::Stored { snapshot, .. } = &outcome {
            // Written through before answering, so the next read of the latest root sees it;
            // a cache that is down costs nothing here (the client counts and logs it).
            self.cache
                .set(Namespace::LatestRoot, &snapshot.source, snapshot, None)
                .await;
            if let Some(row) = root_row
                && let Some(node) = decode(&row.hash, &row.encoded, &row.sizes)
            {
                self.nodes.remember(row.hash, Arc::new(node));
            }
            let archive = self.clone();
            let source = snapshot.source.clone();
            tokio::spawn(async move {
                for chunk in new_nodes.chunks(1000) {
                    archive
                        .cache
                        .set_many(Namespace::TreeMeta, chunk, None)
                        .await;
                }
                archive.apply_retention(&source).await;
            });
        }
        Ok(outcome)
    }

    /// Deletes the snapshots `source`'s policy no longer keeps (after a new one was stored).
    pub async fn apply_retention(&self, source: &str) {
        let result = async {
            let mut conn = self.pool.get().await?;
            // Most sources keep everything: look before taking a lock (which writes).
            match store::source(&*conn, source).await? {
                Some((policy, _)) if policy != Retention::default() => {}
                _ => return Ok(0),
            }
            let tx = conn.transaction().await?;
            let deleted = crate::history::prune(&tx, &self.signer, source).await?;
            tx.commit().await?;
            Ok::<_, Error>(deleted)
        }
        .await;
        match result {
            Ok(0) => {}
            Ok(deleted) => {
                tracing::info!(source, deleted, "retention deleted snapshots");
                self.collect.notify_one();
            }
            Err(err) => {
                tracing::warn!(source, error = %err, "applying retention failed; retried at the next GC run")
            }
        }
    }

    /// Writes the latest snapshot of each source (all when `sources` is empty) and its root
    /// node into the cache. Returns (sources, entries written, whether the cache took them).
    pub async fn warm(&self, sources: &[SourceName]) -> Result<(u64, u64, bool), Error> {
        if !self.cache.is_enabled() {
            return Err(Error::FailedPrecondition(
                "DbSync writes the warm-up through the Cache service, and DbSync's CACHE_ADDR is not set".into(),
            ));
        }
        let conn = self.pool.get().await?;
        let mut snapshots = Vec::new();
        if sources.is_empty() {
            let mut after = String::new();
            loop {
                let page = store::sources(&*conn, &after, 1000).await?;
                let Some(last) = page.last() else { break };
                after = last.name.clone();
                snapshots.extend(page.into_iter().map(|s| s.latest));
            }
        } else {
            for source in sources {
                let latest = store::latest(&*conn, source.as_str())
                    .await?
                    .ok_or_else(|| {
                        Error::NotFound(format!("sources: {source} has no snapshots"))
                    })?;
                snapshots.push(latest);
            }
        }
        drop(conn);
        let mut attempted = 0;
        let mut written = 0;
        for chunk in snapshots.chunks(1000) {
            let entries: Vec<(String, pb::Snapshot)> = chunk
                .iter()
                .map(|s| (s.source.clone(), s.to_proto()))
                .collect();
            attempted += entries.len() as u64;
            written += self
                .cache
                .set_many(Namespace::LatestRoot, &entries, None)
                .await;
            let roots: Vec<Digest> = chunk.iter().map(|s| s.root).collect();
            let (tried, stored) = self.nodes.warm(&roots).await?;
            attempted += tried;
            written += stored;
        }
        Ok((snapshots.len() as u64, written, written == attempted))
    }
}
