//! DbSync: stores snapshots of Merkle trees in PostgreSQL, only when a root changed, and
//! answers history, diff and proof questions; the cache is written through.
//!
//! [`run`] serves `merkle.dbsync.v1.DbSyncService`. PostgreSQL may be down at start: the
//! service then reports NOT_SERVING, applies its migrations once PostgreSQL answers, and
//! reports SERVING, without a restart.

mod api;
pub mod config;
pub mod store;

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

pub use config::Config;
use merkle_proto::dbsync::v1::db_sync_service_server::DbSyncServiceServer;
use merkle_shared::{health::Health, postgres, server, service::RunError, shutdown::Shutdown};

/// The fully qualified gRPC service name.
pub const SERVICE_NAME: &str = merkle_proto::service_names::DB_SYNC;

/// Serves DbSync until `shutdown`.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), RunError> {
    let pool = postgres::pool(&config.postgres)?;
    let (health, health_service) = Health::new(SERVICE_NAME).await;

    // Healthy means: the schema is current and PostgreSQL answers now.
    let migrated = Arc::new(AtomicBool::new(false));
    let probe_timeout = config.postgres.database_connect_timeout;
    let probe_pool = pool;
    health.watch(
        config.server.health_check_interval,
        shutdown.clone(),
        move || {
            let pool = probe_pool.clone();
            let migrated = migrated.clone();
            async move {
                if !migrated.load(Ordering::Acquire) {
                    store::migrate(&pool).await.map_err(|e| e.to_string())?;
                    migrated.store(true, Ordering::Release);
                }
                postgres::ping(&pool, probe_timeout).await
            }
        },
    );

    let api = api::DbSyncApi;
    let service = merkle_shared::limit_messages!(DbSyncServiceServer::new(api), config.server);
    server::serve(
        SERVICE_NAME,
        &config.server,
        merkle_shared::ports::DB_SYNC,
        tonic::service::Routes::new(service),
        health_service,
        shutdown,
    )
    .await?;
    Ok(())
}
