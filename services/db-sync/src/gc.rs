//! Retention and garbage collection of nodes that no snapshot references any more.
//!
//! Mark and sweep: a recursive query walks from every snapshot's root through the stored
//! subdirectory hashes (the mark), and the nodes it does not reach are deleted in batches of
//! `GC_BATCH`, each its own short transaction (the sweep), so the collector never holds locks
//! for long.
//!
//! Safe against syncs running at the same time: a node is deleted only when it was not used
//! within `GC_GRACE`, and a sync marks every stored node it relies on as used: FindMissingNodes
//! marks the nodes it reports present, and SyncTree's transaction marks (and row-locks) the
//! stored nodes its tree refers to. A delete waits for that lock and then sees the fresh
//! `last_used`, so it spares the node; a node reached only through a sync that has not committed
//! yet is recent by construction. The snapshot's foreign key to its root node is a last guard.

use merkle_shared::postgres::Traced as _;
use std::{sync::Arc, time::Duration};

use merkle_shared::shutdown::Shutdown;

use crate::{archive::Archive, error::Error, store};

/// Most candidates one run marks; the next run continues.
const MAX_CANDIDATES: i64 = 200_000;

/// Nodes unreachable from every snapshot and unused within the grace period.
const MARK: &str = "WITH RECURSIVE reach(hash) AS ( \
        SELECT root_hash FROM merkle_roots \
      UNION \
        SELECT substring(d.child_dirs FROM i * 32 + 1 FOR 32) \
        FROM reach r JOIN merkle_tree_data d ON d.hash = r.hash, \
             generate_series(0, octet_length(d.child_dirs) / 32 - 1) AS i \
    ) \
    SELECT d.hash FROM merkle_tree_data d \
    WHERE d.last_used < now() - make_interval(secs => $1) \
      AND NOT EXISTS (SELECT 1 FROM reach r WHERE r.hash = d.hash) \
    LIMIT $2";

/// Deletes one batch, sparing any node used since it was marked.
const SWEEP: &str = "DELETE FROM merkle_tree_data \
    WHERE hash = ANY($1) AND last_used < now() - make_interval(secs => $2)";

/// What one run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Collected {
    pub snapshots_deleted: u64,
    pub nodes_deleted: u64,
}

/// Applies every source's retention policy, then collects unreferenced nodes.
pub async fn run_once(
    archive: &Archive,
    grace: Duration,
    batch: usize,
) -> Result<Collected, Error> {
    let mut collected = Collected::default();
    for source in store::sources_with_policies(&archive.pool).await? {
        let mut conn = archive.pool.get().await?;
        let tx = conn.transaction().await?;
        collected.snapshots_deleted += crate::history::prune(&tx, &archive.signer, &source).await?;
        tx.commit().await?;
    }
    collected.nodes_deleted = collect_nodes(archive, grace, batch).await?;
    Ok(collected)
}

/// The mark and the sweep; returns how many nodes were deleted.
pub async fn collect_nodes(archive: &Archive, grace: Duration, batch: usize) -> Result<u64, Error> {
    let grace = grace.as_secs_f64();
    let candidates: Vec<Vec<u8>> = {
        let conn = archive.pool.get().await?;
        conn.query_traced(MARK, &[&grace, &MAX_CANDIDATES])
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect()
    };
    let mut deleted = 0;
    for chunk in candidates.chunks(batch.max(1)) {
        let conn = archive.pool.get().await?;
        let keys: Vec<&[u8]> = chunk.iter().map(Vec::as_slice).collect();
        deleted += conn.execute_traced(SWEEP, &[&keys, &grace]).await?;
    }
    Ok(deleted)
}

/// Runs retention and collection every `interval` (0: only when woken, after retention
/// deleted snapshots), until shutdown. Several replicas may run it at once: deletes are
/// idempotent.
pub fn spawn(
    archive: Arc<Archive>,
    interval: Duration,
    grace: Duration,
    batch: usize,
    mut shutdown: Shutdown,
) {
    tokio::spawn(async move {
        loop {
            let periodic = async {
                if interval.is_zero() {
                    std::future::pending::<()>().await
                } else {
                    tokio::time::sleep(interval).await
                }
            };
            tokio::select! {
                () = periodic => {}
                () = archive.collect.notified() => {}
                () = shutdown.wait() => return,
            }
            match run_once(&archive, grace, batch).await {
                Ok(done) if done != Collected::default() => tracing::info!(
                    snapshots = done.snapshots_deleted,
                    nodes = done.nodes_deleted,
                    "retention and garbage collection"
                ),
                Ok(_) => {}
                Err(err) => {
                    tracing::warn!(error = %err, "garbage collection failed; retried at the next run")
                }
            }
        }
    });
}
