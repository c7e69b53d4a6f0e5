//! TreeBuilder: hashes directories into SHA-256 Merkle trees (docs/merkle-spec.md) with the
//! `merkle-core` library: parallel, incremental (a persistent stat cache per directory), and
//! only under the configured allowed roots.
//!
//! [`run`] serves `merkle.treebuilder.v1.TreeBuilderService` with health and reflection.

mod api;
pub mod builds;
pub mod config;
pub mod error;
pub mod paths;
pub mod stored;

pub use config::Config;
use merkle_proto::treebuilder::v1::tree_builder_service_server::TreeBuilderServiceServer;
use merkle_shared::{
    config::ConfigError, health::Health, server, service::RunError, shutdown::Shutdown,
};

/// The fully qualified gRPC service name.
pub const SERVICE_NAME: &str = merkle_proto::service_names::TREE_BUILDER;

/// Serves TreeBuilder until `shutdown`.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), RunError> {
    let roots = paths::AllowedRoots::resolve(&config.allowed_roots)
        .map_err(|e| ConfigError::new("ALLOWED_ROOTS (--allowed-roots)", e.to_string()))?;
    let (health, health_service) = Health::new(SERVICE_NAME).await;
    let stored = stored::StoredTrees::new(config.db_sync_addr.as_deref(), &config.common.client)?;
    let api = api::TreeBuilderApi::new(
        roots,
        builds::BuildSettings::from_config(&config),
        builds::RecentTrees::new(config.recent_entries),
        stored,
    );
    let service =
        merkle_shared::limit_messages!(TreeBuilderServiceServer::new(api), config.common.server);
    // TreeBuilder's only dependency is its file system; it serves as soon as it listens.
    health.set_serving().await;
    server::serve(
        SERVICE_NAME,
        &config.common.server,
        merkle_shared::ports::TREE_BUILDER,
        tonic::service::Routes::new(service),
        health_service,
        shutdown,
    )
    .await?;
    Ok(())
}
