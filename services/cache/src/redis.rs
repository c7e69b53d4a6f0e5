//! Redis: the connections. Only this service talks to Redis; every other service goes
//! through it over gRPC.
//!
//! A [`RedisPool`] is a few multiplexed connections used round-robin. Each one carries any
//! number of concurrent commands (pipelined on one socket), so no checkout, and no PING per
//! checkout, sits on the hot path; each reconnects by itself after Redis went away.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use clap::Args;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use merkle_shared::config::{ConfigError, parse_duration, redact_url, require_scheme};

/// Redis settings.
/// `Debug` redacts the password in the URL, so the effective config can be logged.
#[derive(Clone, Args)]
pub struct RedisArgs {
    /// Redis URL, e.g. redis://127.0.0.1:6379/0 or redis://:password@host:6379.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: String,
    /// Multiplexed connections, used in turn; each carries many concurrent commands.
    #[arg(long, env = "REDIS_POOL_SIZE", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub redis_pool_size: u32,
    /// Timeout for connecting and for one Redis command.
    #[arg(long, env = "REDIS_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub redis_timeout: Duration,
}

impl RedisArgs {
    /// Checks the URL, naming `REDIS_URL` when it is malformed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.client().map(drop)
    }

    fn client(&self) -> Result<redis::Client, ConfigError> {
        require_scheme(
            "REDIS_URL (--redis-url)",
            &self.redis_url,
            &["redis", "unix", "redis+unix"],
        )?;
        redis::Client::open(self.redis_url.as_str()).map_err(|e| {
            ConfigError::new(
                "REDIS_URL (--redis-url)",
                format!("not a valid Redis URL: {e}"),
            )
        })
    }
}

/// Multiplexed Redis connections, used round-robin; cheap to clone.
#[derive(Clone)]
pub struct RedisPool {
    connections: Arc<[ConnectionManager]>,
    next: Arc<AtomicUsize>,
}

impl RedisPool {
    /// The next connection (a handle: clone it freely, commands on it run concurrently).
    pub fn connection(&self) -> ConnectionManager {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.connections.len();
        self.connections[i].clone()
    }
}

/// Lazily connecting connections; fails only on a malformed URL, naming `REDIS_URL`. Must be
/// called inside a tokio runtime (reconnection runs on it).
pub fn pool(args: &RedisArgs) -> Result<RedisPool, ConfigError> {
    let client = args.client()?;
    // One attempt per reconnection: callers bound their own waiting (and the Cache service's
    // circuit breaker stops calling a Redis that is down), so no command waits on a long
    // series of reconnection attempts.
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(args.redis_timeout))
        .set_response_timeout(Some(args.redis_timeout))
        .set_number_of_retries(0);
    let connections = (0..args.redis_pool_size)
        .map(|_| ConnectionManager::new_lazy_with_config(client.clone(), config.clone()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            ConfigError::new(
                "REDIS_URL (--redis-url)",
                format!("cannot use this Redis URL: {e}"),
            )
        })?;
    Ok(RedisPool {
        connections: connections.into(),
        next: Arc::new(AtomicUsize::new(0)),
    })
}

/// Pings Redis on every connection of the pool within `timeout`; returns the slowest round
/// trip. Every connection, because each reconnects on its own: a connection whose last
/// reconnection failed (Redis was down) answers that stale error once and only then tries
/// again, so it is asked a second time. A probe therefore sees Redis back as soon as it is.
pub async fn ping(pool: &RedisPool, timeout: Duration) -> Result<Duration, String> {
    async fn once(conn: &mut ConnectionManager) -> Result<(), String> {
        redis::cmd("PING")
            .query_async::<String>(conn)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }
    let started = Instant::now();
    let each = pool.connections.iter().map(|conn| {
        let mut conn = conn.clone();
        async move {
            if once(&mut conn).await.is_err() {
                once(&mut conn).await?;
            }
            Ok::<(), String>(())
        }
    });
    tokio::time::timeout(timeout, futures::future::try_join_all(each))
        .await
        .map_err(|_| format!("Redis did not answer within {timeout:?}"))??;
    Ok(started.elapsed())
}

/// One Redis command waiting on the (multiplexed) connection: counted in
/// `merkle.redis.commands.in_flight` while it lives.
pub struct InFlight(&'static opentelemetry::metrics::UpDownCounter<i64>);

impl InFlight {
    pub fn start() -> InFlight {
        static GAUGE: std::sync::OnceLock<opentelemetry::metrics::UpDownCounter<i64>> =
            std::sync::OnceLock::new();
        let gauge = GAUGE.get_or_init(|| {
            merkle_shared::metrics::meter()
                .i64_up_down_counter("merkle.redis.commands.in_flight")
                .with_description(
                    "Redis commands sent and not yet answered (the connection's waiters)",
                )
                .build()
        });
        gauge.add(1, &[]);
        InFlight(gauge)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.add(-1, &[]);
    }
}

impl std::fmt::Debug for RedisArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisArgs")
            .field("redis_url", &redact_url(&self.redis_url))
            .field("redis_pool_size", &self.redis_pool_size)
            .field("redis_timeout", &self.redis_timeout)
            .finish()
    }
}
