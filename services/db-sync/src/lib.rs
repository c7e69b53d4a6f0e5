//! DbSync: stores snapshots of Merkle trees in PostgreSQL, only when a root changed, and
//! answers history, diff and proof questions; reads are cache-first and the cache is written
//! through.
//!
//! [`run`] serves `merkle.dbsync.v1.DbSyncService`. PostgreSQL may be down at start: the
//! service then reports NOT_SERVING, applies its migrations once PostgreSQL answers, and
//! reports SERVING, without a restart. The Cache service may be down at any time: every read
//! then comes from PostgreSQL and every write-through is skipped, never failing a call.
//!
//! - `sync`: receiving, checking and storing a tree (one transaction);
//! - `archive`: what is read from the cache, what from PostgreSQL, what is written through;
//! - `latest_copy`: the latest snapshots in this process, kept coherent by the Cache service;
//! - `nodes`: the node store (process memory, the cache, PostgreSQL);
//! - `browse`: directories, diffs and proofs of stored trees;
//! - `drift`: sources grouped by their latest root, each group diffed against the most common;
//! - `gc`: retention and garbage collection;
//! - `history`: the hash-chained, signed snapshot records;
//! - `tlog`: the transparency log of every record, its checkpoints and proofs;
//! - `tiles`: the log as C2SP tlog-tiles, over HTTP and GetLogTile;
//! - `witness`: submitting checkpoints to witnesses, keeping their cosignatures;
//! - `store`: the schema and the SQL.

mod activity;
mod api;
mod archive;
mod browse;
pub mod config;
mod drift;
mod error;
mod gc;
mod history;
mod latest_copy;
mod nodes;
mod store;
mod sync;
mod tiles;
mod tlog;
mod witness;

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

pub use config::Config;
use merkle_proto::dbsync::v1::db_sync_service_server::DbSyncServiceServer;
use merkle_shared::{
    cache::{CacheClient, seal::Seal},
    health::Health,
    postgres,
    read_replicas::ReadReplicas,
    server,
    service::RunError,
    shutdown::Shutdown,
};
/// The log's checkpoint signing, for tools that make checkpoints as DbSync does (benchmarks).
pub use tlog::Log;

/// What tools outside DbSync may rely on: the SQL it runs (benchmarks count it in
/// `pg_stat_statements`, tests plan every statement) and the row form of a directory node
/// (fixtures that write a tree as DbSync does). Everything else is DbSync's own.
pub mod sql {
    pub use crate::{nodes::NodeRow, store::queries::*};
}

/// The fully qualified gRPC service name.
pub const SERVICE_NAME: &str = merkle_proto::service_names::DB_SYNC;

/// Serves DbSync until `shutdown`.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), RunError> {
    let pool = postgres::pool(&config.postgres)?;
    let replicas = ReadReplicas::new(&config.read_replicas, &config.postgres)?;
    if let Some(replicas) = &replicas {
        replicas.refuse_wrong(&pool, "merkle_roots").await?;
        replicas.measure(&pool).await;
        replicas.monitor(pool.clone(), shutdown.clone());
    }
    let signer = Arc::new(history::Signer::load(
        config.signing_key_file.as_deref(),
        &config.previous_public_keys,
    )?);
    match signer.key_id() {
        Some(id) => tracing::info!(key_id = %id, "snapshot records are signed"),
        None => {
            tracing::warn!("SIGNING_KEY_FILE is not set: snapshot records are chained but unsigned")
        }
    }
    let cache = CacheClient::new(&config.cache, &config.common.client)?;
    if !cache.is_enabled() {
        tracing::warn!("CACHE_ADDR is not set: every read goes to PostgreSQL");
    }
    let (health, health_service) = Health::new(SERVICE_NAME).await;

    // Healthy means: the schema is current and PostgreSQL answers now.
    let migrated = Arc::new(AtomicBool::new(false));
    let probe_timeout = config.postgres.database_connect_timeout;
    let probe_pool = pool.clone();
    let probe_signer = signer.clone();
    let probe_cache = cache.clone();
    let seal_file = config.cache.seal_from_file()?;
    health.watch(
        config.common.server.health_check_interval,
        shutdown.clone(),
        move || {
            let pool = probe_pool.clone();
            let migrated = migrated.clone();
            let signer = probe_signer.clone();
            let cache = probe_cache.clone();
            let seal_file = seal_file.clone();
            async move {
                if !migrated.load(Ordering::Acquire) {
                    store::migrate(&pool).await.map_err(|e| e.to_string())?;
                    // Cache values are sealed with a key every replica derives from one secret.
                    let seal = match seal_file {
                        Some(seal) => seal,
                        None => Seal::derived(
                            &store::page_token_key(&pool)
                                .await
                                .map_err(|e| e.to_string())?,
                            "cache",
                        ),
                    };
                    cache.install_seal(seal);
                    // Records stored before the history existed join their chains.
                    let chained = history::chain_legacy(&pool, &signer)
                        .await
                        .map_err(|e| e.to_string())?;
                    if chained > 0 {
                        tracing::info!(
                            sources = chained,
                            "chained records stored before the history existed"
                        );
                    }
                    migrated.store(true, Ordering::Release);
                }
                postgres::ping(&pool, probe_timeout).await
            }
        },
    );

    // The copy of the latest roots needs the Cache service's notices to stay coherent.
    let copy = (cache.is_enabled() && config.latest_copy_entries > 0).then(|| {
        let copy = latest_copy::LatestCopy::new(config.latest_copy_entries as usize);
        copy.observe();
        tokio::spawn(latest_copy::follow(
            copy.clone(),
            cache.clone(),
            shutdown.clone(),
        ));
        copy
    });
    let archive = archive::Archive::new(
        pool,
        replicas,
        cache,
        copy,
        archive::ArchiveSettings {
            sync_max_bytes: config.sync_max_bytes,
            node_cache_bytes: config.node_cache_bytes,
            touch_after: config.gc_grace / 2,
        },
        signer,
    );
    gc::spawn(
        archive.clone(),
        config.gc_interval,
        config.gc_grace,
        config.gc_batch as usize,
        shutdown.clone(),
    );
    let log = Arc::new(tlog::Log::new(
        &config.log_origin,
        archive.signer.signing_key(),
        archive.signer.published_keys(),
    ));
    let listed = witness::parse(&config.witnesses)?;
    let policy = match config.witness_policy {
        0 => listed.len(),
        k => k as usize,
    };
    let witnesses = Arc::new(witness::Witnesses::new(
        listed,
        policy,
        config.witness_timeout,
    )?);
    if !witnesses.list.is_empty() {
        tracing::info!(
            witnesses = witnesses.list.len(),
            policy,
            "checkpoints are submitted to witnesses"
        );
        witness::spawn(
            witnesses.clone(),
            archive.pool.clone(),
            config.log_interval,
            shutdown.clone(),
        );
    }
    tlog::spawn(
        log.clone(),
        archive.pool.clone(),
        config.log_interval,
        shutdown.clone(),
    );
    if let Some(addr) = config.log_listen_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| merkle_shared::server::ServeError::Bind { addr, source })?;
        tracing::info!(%addr, "serving the transparency log's tiles over HTTP");
        tiles::spawn_http(listener, archive.pool.clone(), shutdown.clone());
    }
    let service = merkle_shared::limit_messages!(
        DbSyncServiceServer::new(api::DbSyncApi::new(archive, log, witnesses)),
        config.common.server
    );
    server::serve(
        SERVICE_NAME,
        &config.common.server,
        merkle_shared::ports::DB_SYNC,
        tonic::service::Routes::new(service),
        health_service,
        shutdown,
    )
    .await?;
    Ok(())
}
