//! Cache: owns every Redis operation of Merkle Mesh: namespaces with TTLs, invalidation,
//! statistics, and graceful degradation when Redis is down.
//!
//! [`run`] serves `merkle.cache.v1.CacheService`. Its health follows Redis: NOT_SERVING while
//! Redis does not answer, SERVING once it does, without a restart.

mod api;
pub mod config;

pub use config::Config;
use merkle_proto::cache::v1::cache_service_server::CacheServiceServer;
use merkle_shared::{health::Health, redis, server, service::RunError, shutdown::Shutdown};

/// The fully qualified gRPC service name.
pub const SERVICE_NAME: &str = merkle_proto::service_names::CACHE;

/// Serves Cache until `shutdown`.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), RunError> {
    let (health, health_service) = Health::new(SERVICE_NAME).await;
    let pool = redis::pool(&config.redis)?;
    let timeout = config.redis.redis_timeout;
    health.watch(
        config.server.health_check_interval,
        shutdown.clone(),
        move || {
            let pool = pool.clone();
            async move { redis::ping(&pool, timeout).await.map(drop) }
        },
    );
    let service =
        merkle_shared::limit_messages!(CacheServiceServer::new(api::CacheApi), config.server);
    server::serve(
        SERVICE_NAME,
        &config.server,
        merkle_shared::ports::CACHE,
        tonic::service::Routes::new(service),
        health_service,
        shutdown,
    )
    .await?;
    Ok(())
}
