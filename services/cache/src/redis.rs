//! Redis: the connections. Only this service talks to Redis; every other service goes
//! through it over gRPC.
//!
//! A [`RedisPool`] is a `bb8` pool of `bb8-redis` connections. Each is multiplexed: a
//! checkout takes the next connection's handle and gives the connection straight back, and
//! the command runs on the handle, pipelined with the other commands on that socket (holding a
//! connection per command halved the calls per second at 32 callers: one command per socket
//! per round trip). Checkouts are not tested with a PING (that would double every round trip):
//! a connection is retired instead when a command on it fails the way a lost connection does,
//! and the pool opens a new one. With no connection to be had within `REDIS_TIMEOUT` (Redis
//! unreachable, every connection retired), the call is UNAVAILABLE, never a hang.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use bb8_redis::RedisConnectionManager;
use clap::Args;
use redis::aio::MultiplexedConnection;

use merkle_shared::config::{ConfigError, parse_duration, redact_url, require_scheme};

/// Redis settings.
/// `Debug` redacts the password in the URL, so the effective config can be logged.
#[derive(Clone, Args)]
pub struct RedisArgs {
    /// Redis URL, e.g. redis://127.0.0.1:6379/0 or redis://:password@host:6379.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: String,
    /// Connections to Redis, used in turn; each carries many concurrent commands.
    #[arg(long, env = "REDIS_POOL_SIZE", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub redis_pool_size: u32,
    /// Timeout for connecting, for having a connection, and for one Redis command.
    #[arg(long, env = "REDIS_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub redis_timeout: Duration,
}

impl RedisArgs {
    /// Checks the URL, naming `REDIS_URL` when it is malformed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.client().map(drop)
    }

    pub(crate) fn client(&self) -> Result<redis::Client, ConfigError> {
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

/// `bb8-redis`'s manager, told which connections broke. Its own `has_broken` is always
/// false and we do not PING on checkout, so without this a connection Redis closed (a
/// restart) would stay in the pool and fail every command sent on it.
pub struct Manager(RedisConnectionManager);

/// A pooled connection and whether a command on it failed as a lost connection does.
pub struct Connection {
    redis: MultiplexedConnection,
    broken: Arc<AtomicBool>,
}

/// A connection's handle for one command (the connection stays in the pool).
pub struct Handle {
    pub redis: MultiplexedConnection,
    broken: Arc<AtomicBool>,
}

impl Handle {
    /// Records the outcome of a command: a connection-level failure retires the connection.
    pub fn observe<T>(&self, outcome: &Result<T, Failure>) {
        if let Err(failure) = outcome
            && failure.retires_connection()
        {
            self.broken.store(true, Ordering::Relaxed);
        }
    }
}

impl bb8::ManageConnection for Manager {
    type Connection = Connection;
    type Error = redis::RedisError;

    async fn connect(&self) -> Result<Connection, redis::RedisError> {
        Ok(Connection {
            redis: self.0.connect().await?,
            broken: Arc::new(AtomicBool::new(false)),
        })
    }

    async fn is_valid(&self, conn: &mut Connection) -> Result<(), redis::RedisError> {
        self.0.is_valid(&mut conn.redis).await
    }

    fn has_broken(&self, conn: &mut Connection) -> bool {
        conn.broken.load(Ordering::Relaxed)
    }
}

/// The pool; cheap to clone.
pub type RedisPool = bb8::Pool<Manager>;

/// Why a command did not succeed.
#[derive(Debug)]
pub enum Failure {
    /// No connection could be had within the timeout (all busy, or Redis unreachable).
    NoConnection(String),
    /// Redis answered with an error, or the connection failed.
    Redis(redis::RedisError),
    /// No answer within the timeout.
    TimedOut(Duration),
}

impl Failure {
    /// True when the connection cannot be trusted with another command.
    fn retires_connection(&self) -> bool {
        match self {
            Failure::NoConnection(_) => false,
            // A late answer would arrive for a command nobody waits for any more.
            Failure::TimedOut(_) => true,
            Failure::Redis(e) => {
                e.is_unrecoverable_error() || e.is_connection_dropped() || e.is_io_error()
            }
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::NoConnection(reason) => write!(f, "no Redis connection: {reason}"),
            Failure::Redis(e) => write!(f, "{e}"),
            Failure::TimedOut(t) => write!(f, "Redis did not answer within {t:?}"),
        }
    }
}

impl std::error::Error for Failure {}

/// A pool that connects in the background; fails only on a malformed URL, naming
/// `REDIS_URL`. Must be called inside a tokio runtime.
pub fn pool(args: &RedisArgs) -> Result<RedisPool, ConfigError> {
    let client = args.client()?;
    let manager =
        RedisConnectionManager::new(client.get_connection_info().clone()).map_err(|e| {
            ConfigError::new(
                "REDIS_URL (--redis-url)",
                format!("cannot use this Redis URL: {e}"),
            )
        })?;
    Ok(bb8::Pool::builder()
        .max_size(args.redis_pool_size)
        .min_idle(Some(args.redis_pool_size.min(4)))
        .test_on_check_out(false)
        .connection_timeout(args.redis_timeout)
        // Reconnection failures are the breaker's and the health probe's to report.
        .error_sink(Box::new(bb8::NopErrorSink))
        .build_unchecked(Manager(manager)))
}

/// A connection's handle within `timeout`. A connection found retired is dropped from the pool
/// (bb8 drops it when it is given back) and the next one taken.
pub async fn checkout(pool: &RedisPool, timeout: Duration) -> Result<Handle, Failure> {
    let getting = async {
        loop {
            let conn = pool.get().await?;
            if conn.broken.load(Ordering::Relaxed) {
                continue;
            }
            return Ok::<_, bb8::RunError<redis::RedisError>>(Handle {
                redis: conn.redis.clone(),
                broken: conn.broken.clone(),
            });
        }
    };
    match tokio::time::timeout(timeout, getting).await {
        Ok(Ok(handle)) => Ok(handle),
        Ok(Err(bb8::RunError::User(e))) => Err(Failure::NoConnection(e.to_string())),
        Ok(Err(bb8::RunError::TimedOut)) | Err(_) => Err(Failure::NoConnection(format!(
            "none could be opened within {timeout:?} ({} open)",
            pool.state().connections,
        ))),
    }
}

/// Pings Redis on every idle connection of the pool (at least one) within `timeout`; returns
/// the slowest round trip. Every idle one, because a connection Redis closed while nobody used
/// it is found only by using it: the probe retires it, so that no caller meets it after Redis
/// is back.
pub async fn ping(pool: &RedisPool, timeout: Duration) -> Result<Duration, String> {
    async fn once(pool: &RedisPool, timeout: Duration) -> Result<(), String> {
        // Held during the PING, so that the probes of one round ask distinct connections.
        let conn = tokio::time::timeout(timeout, pool.get())
            .await
            .map_err(|_| format!("no Redis connection within {timeout:?}"))?
            .map_err(|e| format!("no Redis connection: {e}"))?;
        let mut redis = conn.redis.clone();
        let outcome = tokio::time::timeout(
            timeout,
            redis::cmd("PING").query_async::<String>(&mut redis),
        )
        .await
        .map_err(|_| Failure::TimedOut(timeout))
        .and_then(|r| r.map_err(Failure::Redis));
        if let Err(failure) = &outcome
            && failure.retires_connection()
        {
            conn.broken.store(true, Ordering::Relaxed);
        }
        outcome.map(drop).map_err(|e| e.to_string())
    }
    let started = Instant::now();
    let count = pool.state().idle_connections.max(1);
    // A retired connection is replaced by a new one, asked at once: a Redis that is back
    // is seen in this probe, not the next.
    let each = (0..count).map(|_| async {
        match once(pool, timeout).await {
            Ok(()) => Ok(()),
            Err(_) => once(pool, timeout).await,
        }
    });
    let outcomes = futures::future::join_all(each).await;
    // One good answer shows Redis is there; the failed connections are already retired.
    if outcomes.iter().any(Result::is_ok) {
        return Ok(started.elapsed());
    }
    Err(outcomes
        .into_iter()
        .find_map(Result::err)
        .unwrap_or_else(|| "no connection was pinged".to_owned()))
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
