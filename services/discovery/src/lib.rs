//! Discovery: lists the fleet's client nodes from an orchestrator API (Nomad, Kubernetes or a
//! static file), refreshing incrementally.
//!
//! [`run`] serves `merkle.discovery.v1.DiscoveryService`.

mod api;
pub mod config;

pub use config::Config;
use merkle_proto::discovery::v1::discovery_service_server::DiscoveryServiceServer;
use merkle_shared::{health::Health, server, service::RunError, shutdown::Shutdown};

/// The fully qualified gRPC service name.
pub const SERVICE_NAME: &str = merkle_proto::service_names::DISCOVERY;

/// Serves Discovery until `shutdown`.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), RunError> {
    let (health, health_service) = Health::new(SERVICE_NAME).await;
    // No dependency is checked yet: its RPCs are delivered by a later issue.
    health.set_serving().await;
    let service = merkle_shared::limit_messages!(
        DiscoveryServiceServer::new(api::DiscoveryApi),
        config.server
    );
    server::serve(
        SERVICE_NAME,
        &config.server,
        merkle_shared::ports::DISCOVERY,
        tonic::service::Routes::new(service),
        health_service,
        shutdown,
    )
    .await?;
    Ok(())
}
