//! Redis: the connection pool. Only the Cache service talks to Redis; every other service goes
//! through it over gRPC.

use std::time::{Duration, Instant};

use bb8_redis::RedisConnectionManager;
use clap::Args;

use crate::config::{ConfigError, parse_duration};

/// A pool of multiplexed Redis connections.
pub type RedisPool = bb8::Pool<RedisConnectionManager>;

/// Redis settings.
/// `Debug` redacts the password in the URL, so the effective config can be logged.
#[derive(Clone, Args)]
pub struct RedisArgs {
    /// Redis URL, e.g. redis://127.0.0.1:6379/0 or redis://:password@host:6379.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: String,
    /// Most connections kept open.
    #[arg(long, env = "REDIS_POOL_SIZE", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub redis_pool_size: u32,
    /// Timeout for connecting and for one Redis command.
    #[arg(long, env = "REDIS_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub redis_timeout: Duration,
}

impl RedisArgs {
    /// Checks the URL, naming `REDIS_URL` when it is malformed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.manager().map(drop)
    }

    fn manager(&self) -> Result<RedisConnectionManager, ConfigError> {
        crate::config::require_scheme(
            "REDIS_URL (--redis-url)",
            &self.redis_url,
            &["redis", "unix", "redis+unix"],
        )?;
        RedisConnectionManager::new(self.redis_url.as_str()).map_err(|e| {
            ConfigError::new(
                "REDIS_URL (--redis-url)",
                format!("not a valid Redis URL: {e}"),
            )
        })
    }
}

/// A lazily connecting pool; fails only on a malformed URL, naming `REDIS_URL`.
pub fn pool(args: &RedisArgs) -> Result<RedisPool, ConfigError> {
    let manager = args.manager()?;
    Ok(bb8::Pool::builder()
        .max_size(args.redis_pool_size)
        .connection_timeout(args.redis_timeout)
        .build_unchecked(manager))
}

/// Pings Redis within `timeout`; returns the round-trip time.
pub async fn ping(pool: &RedisPool, timeout: Duration) -> Result<Duration, String> {
    let check = async {
        let started = Instant::now();
        let mut conn = pool.get().await.map_err(|e| e.to_string())?;
        let _: String = redis::cmd("PING")
            .query_async(&mut *conn)
            .await
            .map_err(|e| e.to_string())?;
        Ok(started.elapsed())
    };
    tokio::time::timeout(timeout, check)
        .await
        .map_err(|_| format!("Redis did not answer within {timeout:?}"))?
}

impl std::fmt::Debug for RedisArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisArgs")
            .field("redis_url", &crate::config::redact_url(&self.redis_url))
            .field("redis_pool_size", &self.redis_pool_size)
            .field("redis_timeout", &self.redis_timeout)
            .finish()
    }
}
