//! TreeBuilder: hashes directories into SHA-256 Merkle trees (docs/merkle-spec.md).
//!
//! [`run`] serves `merkle.treebuilder.v1.TreeBuilderService` with health and reflection.

mod api;
pub mod config;

pub use config::Config;
use merkle_proto::treebuilder::v1::tree_builder_service_server::TreeBuilderServiceServer;
use merkle_shared::{health::Health, server, service::RunError, shutdown::Shutdown};

/// The fully qualified gRPC service name.
pub const SERVICE_NAME: &str = merkle_proto::service_names::TREE_BUILDER;

/// Serves TreeBuilder until `shutdown`.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), RunError> {
    let (health, health_service) = Health::new(SERVICE_NAME).await;
    let service = merkle_shared::limit_messages!(
        TreeBuilderServiceServer::new(api::TreeBuilderApi::new()),
        config.server
    );
    // TreeBuilder's only dependency is its file system; it serves as soon as it listens.
    health.set_serving().await;
    server::serve(
        SERVICE_NAME,
        &config.server,
        merkle_shared::ports::TREE_BUILDER,
        tonic::service::Routes::new(service),
        health_service,
        shutdown,
    )
    .await?;
    Ok(())
}
