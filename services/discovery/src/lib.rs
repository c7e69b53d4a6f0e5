//! Discovery: lists the fleet's client nodes from an orchestrator API (Nomad, Kubernetes or a
//! static file), refreshing incrementally.
//!
//! - [`backend`]: the orchestrators behind one interface (list with versions, fetch one
//!   node, wait for a change);
//! - [`fleet`]: the known list, the incremental refresh through the cache, and the change
//!   events that WatchClients streams.
//!
//! [`run`] serves `merkle.discovery.v1.DiscoveryService`. It starts even when the backend is
//! misconfigured or unreachable, and reports NOT_SERVING (its log naming the setting) until
//! the backend has answered once; after that a backend outage is answered with the last
//! known list, marked STALE.

mod api;
pub mod backend;
pub mod config;
pub mod error;
pub mod fleet;

pub use config::Config;
use merkle_proto::discovery::v1::discovery_service_server::DiscoveryServiceServer;
use merkle_shared::{
    cache::CacheClient, health::Health, server, service::RunError, shutdown::Shutdown,
};

/// The fully qualified gRPC service name.
pub const SERVICE_NAME: &str = merkle_proto::service_names::DISCOVERY;

/// Serves Discovery until `shutdown`.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), RunError> {
    // reqwest (Nomad) and kube (Kubernetes) share rustls; whichever asks first must find it.
    merkle_shared::tls::install_crypto_provider();
    let cache = CacheClient::new(&config.cache, &config.common.client)?;
    // Discovery has no database to share a key through: replicas share one only when given a
    // key file.
    cache.install_seal(match config.cache.seal_from_file()? {
        Some(seal) => seal,
        None => merkle_shared::cache::seal::Seal::random(),
    });
    let (health, health_service) = Health::new(SERVICE_NAME).await;
    let server_args = config.common.server.clone();
    let fleet = fleet::Fleet::new(config, cache, shutdown.clone());

    // SERVING once the backend has answered; the first probe reads the list.
    let probe_fleet = fleet.clone();
    health.watch(
        server_args.health_check_interval,
        shutdown.clone(),
        move || {
            let fleet = probe_fleet.clone();
            async move {
                if fleet.has_list() {
                    return Ok(());
                }
                fleet
                    .refresh(false)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        },
    );

    let service = merkle_shared::limit_messages!(
        DiscoveryServiceServer::new(api::DiscoveryApi::new(fleet, shutdown.clone())),
        server_args
    );
    server::serve(
        SERVICE_NAME,
        &server_args,
        merkle_shared::ports::DISCOVERY,
        tonic::service::Routes::new(service),
        health_service,
        shutdown,
    )
    .await?;
    Ok(())
}
