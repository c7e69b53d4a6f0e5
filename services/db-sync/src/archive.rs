//! The archive of snapshots: PostgreSQL behind the cache. It decides what is read from where
//! and what is written through: the latest snapshot of each source (mutable, written through on
//! every change, `NAMESPACE_LATEST_ROOT`) and directory nodes (immutable, `nodes.rs`).
//!
//! The cache serves readers; it never decides whether a tree changed. Whether a sync stores is
//! decided from PostgreSQL ([`Archive::answer_early`], then `sync::store` under the source's
//! lock), and the read a client makes before deciding ([`Archive::latest_confirmed`]) goes to
//! PostgreSQL too, with the cached copy checked beside it.

use merkle_shared::postgres::Traced as _;
use std::{collections::HashMap, sync::Arc};

use merkle_core::Digest;
use merkle_proto::{cache::v1::Namespace, dbsync::v1 as pb};
use merkle_shared::{
    cache::{COPY_LEASE, CacheClient, CacheSource, Loaded},
    error::ErrorCode,
    names::SourceName,
    page_token::PageTokens,
    postgres::PgPool,
    read_replicas::{ReadOn, ReadReplicas, Replica},
};
use tokio::sync::OnceCell;
use tonic::Status;

use crate::{
    error::Error,
    latest_copy::LatestCopy,
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

/// Where one read goes: [`Archive::read_target`].
pub struct ReadTarget<'a> {
    pub pool: &'a PgPool,
    replica: Option<&'a Replica>,
}

/// How often a sync's transaction is run when PostgreSQL rolls it back for a lost race.
const STORE_ATTEMPTS: u64 = 4;

/// Snapshots and nodes, cache-first.
pub struct Archive {
    /// The primary: every write, and every read that decides one.
    pub pool: PgPool,
    /// Streaming replicas for heavy reads (DATABASE_READ_URL), when configured.
    pub replicas: Option<Arc<ReadReplicas>>,
    pub cache: CacheClient,
    /// The latest snapshots in this process's memory, when kept (LATEST_COPY_ENTRIES).
    pub copy: Option<Arc<LatestCopy>>,
    pub nodes: NodeStore,
    pub settings: ArchiveSettings,
    /// The history's keys (docs/merkle-spec.md section 10).
    pub signer: Arc<crate::history::Signer>,
    tokens: OnceCell<PageTokens>,
    /// Wakes the garbage collector (after retention deleted snapshots).
    pub collect: tokio::sync::Notify,
}

/// `merkle.cache.stale`: cached latest snapshots found to differ from PostgreSQL's.
fn stale_counter() -> &'static opentelemetry::metrics::Counter<u64> {
    static COUNTER: std::sync::OnceLock<opentelemetry::metrics::Counter<u64>> =
        std::sync::OnceLock::new();
    COUNTER.get_or_init(|| {
        merkle_shared::metrics::counter(
            "merkle.cache.stale",
            "Cached latest snapshots that differed from PostgreSQL's when checked (replaced)",
        )
    })
}

impl Archive {
    pub fn new(
        pool: PgPool,
        replicas: Option<Arc<ReadReplicas>>,
        cache: CacheClient,
        copy: Option<Arc<LatestCopy>>,
        settings: ArchiveSettings,
        signer: Arc<crate::history::Signer>,
    ) -> Arc<Self> {
        Arc::new(Archive {
            nodes: NodeStore::new(
                pool.clone(),
                replicas.clone(),
                cache.clone(),
                settings.node_cache_bytes,
            ),
            pool,
            replicas,
            cache,
            copy,
            settings,
            signer,
            tokens: OnceCell::new(),
            collect: tokio::sync::Notify::new(),
        })
    }

    /// Where a read of rows that change (snapshots, history) goes: a replica that has caught up
    /// with the primary, else the primary.
    pub async fn read_target(&self) -> ReadTarget<'_> {
        if let Some(replicas) = &self.replicas {
            if let Some(replica) = replicas.caught_up(&self.pool).await {
                return ReadTarget {
                    pool: &replica.pool,
                    replica: Some(replica),
                };
            }
            replicas.count(ReadOn::Primary);
        }
        ReadTarget {
            pool: &self.pool,
            replica: None,
        }
    }

    /// Records how a read on `target` went; true when it failed on a replica the way a lost
    /// server does, so the caller runs it again on the primary (a replica going away costs
    /// no caller an error).
    pub fn read_again<T>(&self, target: &ReadTarget<'_>, outcome: &Result<T, Error>) -> bool {
        let (Some(replicas), Some(replica)) = (&self.replicas, target.replica) else {
            return false;
        };
        match outcome {
            Err(Error::Postgres(e)) if e.error_code() == ErrorCode::Unavailable => {
                replicas.failed(replica, e);
                replicas.count(ReadOn::Primary);
                true
            }
            _ => {
                replicas.count(ReadOn::Replica);
                false
            }
        }
    }

    /// The page-token signer (its key is read from PostgreSQL once).
    pub async fn tokens(&self) -> Result<&PageTokens, Error> {
        self.tokens
            .get_or_try_init(|| async {
                Ok(PageTokens::new(store::page_token_key(&self.pool).await?))
            })
            .await
    }

    /// The latest snapshot of `source`: from this process's copy, else cache-first
    /// (concurrent misses share one read).
    pub async fn latest(
        self: &Arc<Self>,
        source: &SourceName,
    ) -> Result<Loaded<pb::Snapshot>, Status> {
        let Some(copy) = &self.copy else {
            return self.latest_shared(source).await;
        };
        if let Some(value) = copy.get(source.as_str()) {
            return Ok(Loaded {
                value,
                source: CacheSource::Local,
            });
        }
        let epoch = copy.epoch();
        let loaded = self.latest_shared(source).await?;
        copy.offer(source.as_str(), &loaded.value, epoch);
        Ok(loaded)
    }

    /// The latest snapshot of `source` from the cache, else PostgreSQL.
    async fn latest_shared(
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

    /// The latest snapshot as PostgreSQL has it (one indexed read), never the cache's copy: the
    /// answer a decision to store relies on. The cached copy is compared with it afterwards, off
    /// the caller's path; one that differs is reported and replaced.
    pub async fn latest_confirmed(
        self: &Arc<Self>,
        source: &SourceName,
    ) -> Result<Option<pb::Snapshot>, Error> {
        let latest = {
            let conn = self.pool.get().await?;
            store::latest(&*conn, source.as_str())
                .await?
                .map(|s| s.to_proto())
        };
        let archive = self.clone();
        let name = source.clone();
        let confirmed = latest.clone();
        tokio::spawn(async move { archive.check_cached(&name, confirmed).await });
        Ok(latest)
    }

    /// Compares the cached latest snapshot of `source` with PostgreSQL's (`latest`). A copy
    /// older than PostgreSQL's is a lost write-through or a replayed value: it is reported and
    /// replaced. A copy for a source without snapshots, or one that names another record at
    /// the same position, cannot come from DbSync's writes at all. A newer copy is a sync that
    /// committed after the read, and is left alone.
    async fn check_cached(&self, source: &SourceName, latest: Option<pb::Snapshot>) {
        let cached: Option<pb::Snapshot> =
            self.cache.get(Namespace::LatestRoot, source.as_str()).await;
        let Some(cached) = cached else { return };
        let verdict = match &latest {
            None => Some("PostgreSQL has no snapshot of it"),
            Some(l) if cached.sequence < l.sequence => Some("older than PostgreSQL's"),
            Some(l) if cached.sequence == l.sequence && cached.record_hash != l.record_hash => {
                Some("a different record than PostgreSQL's at the same sequence")
            }
            Some(_) => None,
        };
        let Some(verdict) = verdict else { return };
        stale_counter().add(1, &[]);
        tracing::warn!(
            security_event = "stale_cache_value",
            source = %source,
            cached_sequence = cached.sequence,
            cached_root = %cached.root_hash,
            stored_sequence = latest.as_ref().map_or(0, |l| l.sequence),
            "SECURITY: the cached latest snapshot is {verdict} (a lost write-through, or a replayed value); replaced"
        );
        self.write_latest(source.as_str(), latest.as_ref()).await;
    }

    /// Writes the latest snapshot of `source` through to the cache (deletes it for `None`).
    /// The Cache service confirms a change once every replica's copy has dropped the old one;
    /// without that confirmation this waits out the copies' lease, so that no replica serves
    /// the old root once this returns.
    async fn write_latest(&self, source: &str, latest: Option<&pb::Snapshot>) {
        if let Some(copy) = &self.copy {
            copy.forget(source);
        }
        let confirmed = match latest {
            Some(l) => self.cache.set(Namespace::LatestRoot, source, l, None).await,
            None => self.cache.delete(Namespace::LatestRoot, source).await,
        };
        if !confirmed && self.cache.is_enabled() {
            tokio::time::sleep(COPY_LEASE).await;
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

    /// Before any node is received: a retry of a stored build, or a root equal to the latest
    /// one PostgreSQL stores, is answered here without a write. `None`: the nodes are needed.
    /// Never from the cache: a cached "same root" must not hide a change.
    pub async fn answer_early(self: &Arc<Self>, header: &Header) -> Result<Option<Outcome>, Error> {
        let conn = self.pool.get().await?;
        if let Some(done) =
            store::by_build(&*conn, header.source.as_str(), &header.build_id).await?
        {
            return Ok(Some(sync::replay(header, done)?));
        }
        let latest = store::latest(&*conn, header.source.as_str()).await?;
        Ok(latest
            .filter(|l| l.root == header.root)
            .map(|l| Outcome::Unchanged(l.to_proto())))
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
        // A transaction that lost a race (a deadlock or a serialization failure) did nothing:
        // it is run again, a few times, before the caller hears of it.
        let mut attempt = 1;
        let outcome = loop {
            match sync::store(
                &self.pool,
                &self.signer,
                header,
                &sent,
                self.settings.touch_after,
            )
            .await
            {
                Err(Error::Postgres(e)) if e.lost_race() && attempt < STORE_ATTEMPTS => {
                    tracing::info!(error = %e, attempt, source = %header.source, "sync lost a race in PostgreSQL; running it again");
                    tokio::time::sleep(std::time::Duration::from_millis(5 * attempt)).await;
                    attempt += 1;
                }
                outcome => break outcome?,
            }
        };
        if let Outcome::Stored { snapshot, .. } = &outcome {
            // Written through before answering, so the next read of the latest root sees it;
            // a cache that is down costs nothing here (the client counts and logs it).
            self.write_latest(&snapshot.source, Some(snapshot)).await;
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

    /// Saves `name`'s retention policy and deletes the snapshots it no longer keeps (never the
    /// latest), leaving a signed `pruned` checkpoint, in one transaction; returns how many were
    /// deleted.
    pub async fn set_retention(
        &self,
        name: &str,
        policy: Retention,
        actor: &str,
    ) -> Result<u64, Error> {
        let mut conn = self.pool.get().await?;
        let tx = conn.transaction().await?;
        store::save_retention(&tx, name, policy, actor).await?;
        let deleted = crate::history::prune(&tx, &self.signer, name).await?;
        tx.commit().await?;
        Ok(deleted)
    }

    /// Deletes the snapshots `source`'s policy no longer keeps (after a new one was stored).
    pub async fn apply_retention(&self, source: &str) {
        let result = async {
            let mut conn = self.pool.get().await?;
            // Most sources keep everything: look before taking a lock (which writes).
            match store::source(&*conn, source).await? {
                Some(row) if row.retention != Retention::default() => {}
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
            if let Some(copy) = &self.copy {
                for (source, _) in &entries {
                    copy.forget(source);
                }
            }
            let stored = self
                .cache
                .set_many(Namespace::LatestRoot, &entries, None)
                .await;
            if stored < entries.len() as u64 {
                // As in `write_latest`: no copy may outlive what this wrote.
                tokio::time::sleep(COPY_LEASE).await;
            }
            written += stored;
            let roots: Vec<Digest> = chunk.iter().map(|s| s.root).collect();
            let (tried, stored) = self.nodes.warm(&roots).await?;
            attempted += tried;
            written += stored;
        }
        Ok((snapshots.len() as u64, written, written == attempted))
    }
}
