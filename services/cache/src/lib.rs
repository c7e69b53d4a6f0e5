//! Cache: owns every Redis operation of Merkle Mesh: namespaces with TTLs, invalidation,
//! statistics, warm-up, and graceful degradation when Redis is down.
//!
//! [`run`] serves `merkle.cache.v1.CacheService`. Its health follows Redis: NOT_SERVING while
//! Redis does not answer, SERVING once it does, without a restart. Independently of health, a
//! circuit breaker ([`store`]) keeps calls fast while Redis is away: reads are misses and
//! writes are dropped, so the other services carry on with PostgreSQL alone.

mod api;
pub mod cluster;
pub mod codec;
pub mod config;
pub mod error;
pub mod keys;
pub mod notices;
pub mod redis;
pub mod stats;
pub mod store;
pub mod warmup;

pub use config::Config;
use merkle_proto::cache::v1::cache_service_server::CacheServiceServer;
use merkle_shared::{health::Health, server, service::RunError, shutdown::Shutdown};

/// The fully qualified gRPC service name.
pub const SERVICE_NAME: &str = merkle_proto::service_names::CACHE;

/// Reports the cache's counters and its breaker as metrics, read when they are collected.
fn observe(store: &std::sync::Arc<store::Store>) {
    use opentelemetry::KeyValue;
    let meter = merkle_shared::metrics::meter();
    let counted = store.clone();
    meter
        .u64_observable_counter("merkle.cache.lookups")
        .with_description("Cache reads by namespace and result (hit, miss)")
        .with_callback(move |observer| {
            for ns in counted.stats().snapshot() {
                let namespace = merkle_proto::cache::v1::Namespace::try_from(ns.namespace)
                    .map(|n| n.as_str_name())
                    .unwrap_or("NAMESPACE_UNSPECIFIED");
                for (result, value) in [("hit", ns.hits), ("miss", ns.misses)] {
                    observer.observe(
                        value,
                        &[
                            KeyValue::new("namespace", namespace),
                            KeyValue::new("result", result),
                        ],
                    );
                }
                observer.observe(
                    ns.errors + ns.skipped,
                    &[
                        KeyValue::new("namespace", namespace),
                        KeyValue::new("result", "unavailable"),
                    ],
                );
            }
        })
        .build();
    let breaker = store.clone();
    meter
        .i64_observable_gauge("merkle.cache.breaker.state")
        .with_description("The circuit breaker around Redis: 0 closed, 1 half-open, 2 open")
        .with_callback(move |observer| {
            let state = match breaker.breaker_state() {
                merkle_shared::breaker::BreakerState::Closed => 0,
                merkle_shared::breaker::BreakerState::HalfOpen => 1,
                merkle_shared::breaker::BreakerState::Open => 2,
            };
            observer.observe(state, &[KeyValue::new("dependency", "redis")]);
        })
        .build();
}

/// Serves Cache until `shutdown`.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), RunError> {
    // The redis crate's TLS (rediss://) takes the process's rustls provider.
    merkle_shared::tls::install_crypto_provider();
    redis::check_mode(&config.redis).await?;
    let (health, health_service) = Health::new(SERVICE_NAME).await;
    let pool = redis::pool(&config.redis)?;
    let settings = store::StoreSettings {
        keys: keys::KeySpace::new(&config.key_prefix),
        ttls: keys::Namespace::ALL.map(|ns| config.ttl(ns)),
        compress_threshold: config.compress_threshold,
        timeout: config.redis.redis_timeout,
        breaker_failures: config.redis_breaker_failures,
        breaker_cooldown: config.redis_breaker_cooldown,
        wait_replicas: config.redis.wait_replicas(),
    };
    let notices = notices::Notices::new(
        config.redis.subscribers()?,
        pool.clone(),
        settings.keys.channels(),
        config.redis.redis_timeout,
    );
    tokio::spawn(notices.clone().run(shutdown.clone()));
    let store = store::Store::new(pool, settings, notices.clone());
    observe(&store);
    let probe = store.clone();
    health.watch(
        config.common.server.health_check_interval,
        shutdown.clone(),
        move || {
            let store = probe.clone();
            async move { store.ping().await }
        },
    );
    let warmer = warmup::Warmer::new(config.db_sync_addr.as_deref(), &config.common.client)?;
    if config.warmup_on_start {
        warmer.clone().warm_in_background(shutdown.clone());
    }
    let service = merkle_shared::limit_messages!(
        CacheServiceServer::new(api::CacheApi::new(store, notices, warmer)),
        config.common.server
    );
    server::serve(
        SERVICE_NAME,
        &config.common.server,
        merkle_shared::ports::CACHE,
        tonic::service::Routes::new(service),
        health_service,
        shutdown,
    )
    .await?;
    Ok(())
}
