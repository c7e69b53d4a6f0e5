//! Cache: owns every Redis operation of Merkle Mesh: namespaces with TTLs, invalidation,
//! statistics, warm-up, and graceful degradation when Redis is down.
//!
//! [`run`] serves `merkle.cache.v1.CacheService`. Its health follows Redis: NOT_SERVING while
//! Redis does not answer, SERVING once it does, without a restart. Independently of health, a
//! circuit breaker ([`store`]) keeps calls fast while Redis is away: reads are misses and
//! writes are dropped, so the other services carry on with PostgreSQL alone.

mod api;
pub mod codec;
pub mod config;
pub mod error;
pub mod keys;
pub mod stats;
pub mod store;
pub mod warmup;

pub use config::Config;
use merkle_proto::cache::v1::cache_service_server::CacheServiceServer;
use merkle_shared::{health::Health, redis, server, service::RunError, shutdown::Shutdown};

/// The fully qualified gRPC service name.
pub const SERVICE_NAME: &str = merkle_proto::service_names::CACHE;

/// Serves Cache until `shutdown`.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), RunError> {
    let (health, health_service) = Health::new(SERVICE_NAME).await;
    let pool = redis::pool(&config.redis)?;
    let settings = store::StoreSettings {
        keys: keys::KeySpace::new(&config.key_prefix),
        ttls: keys::Namespace::ALL.map(|ns| config.ttl(ns)),
        compress_threshold: config.compress_threshold,
        timeout: config.redis.redis_timeout,
        breaker_failures: config.redis_breaker_failures,
        breaker_cooldown: config.redis_breaker_cooldown,
    };
    let store = store::Store::new(pool, settings);
    let probe = store.clone();
    health.watch(
        config.server.health_check_interval,
        shutdown.clone(),
        move || {
            let store = probe.clone();
            async move { store.ping().await }
        },
    );
    let warmer = warmup::Warmer::new(config.db_sync_addr.as_deref(), &config.client)?;
    if config.warmup_on_start {
        warmer.clone().warm_in_background(shutdown.clone());
    }
    let service = merkle_shared::limit_messages!(
        CacheServiceServer::new(api::CacheApi::new(store, warmer)),
        config.server
    );
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
