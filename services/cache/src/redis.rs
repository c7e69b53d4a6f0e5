//! Redis: the connections. Only this service talks to Redis; every other service goes
//! through it over gRPC.
//!
//! A [`RedisPool`] reaches either one Redis server or a Redis Cluster, behind one API: a
//! [`checkout`] hands out a [`Handle`] whose [`Conn`] runs commands on either.
//!
//! - Standalone (`REDIS_URL`): a `bb8` pool of `bb8-redis` connections. Each is multiplexed:
//!   a checkout takes a connection's handle and gives the connection straight back, and the
//!   command runs on the handle, pipelined with the other commands on that socket (holding a
//!   connection per command halved the calls per second at 32 callers: one command per socket
//!   per round trip). The connection given back last is taken next, so concurrent commands
//!   gather on one socket while it serves; the others stand by. Checkouts are not tested with a PING (that would double every
//!   round trip): a connection is retired instead when a command on it fails the way a lost
//!   connection does, and the pool opens a new one.
//! - Cluster (`REDIS_CLUSTER_NODES`): the redis crate's cluster client, one multiplexed
//!   connection per node, which routes each command by its key's slot and follows MOVED and
//!   ASK redirects (a failover, a resharding) by itself.
//!
//! A `rediss://` URL connects over TLS (rustls), the server's certificate and name checked
//! against `REDIS_CA_FILE`, else the system's roots.
//!
//! With no connection to be had within `REDIS_TIMEOUT` (Redis unreachable, every connection
//! retired), the call is UNAVAILABLE, never a hang.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use bb8_redis::RedisConnectionManager;
use clap::Args;
use redis::{
    Cmd, RedisFuture, RedisResult, Value,
    aio::MultiplexedConnection,
    cluster::{ClusterClient, ClusterClientBuilder},
    cluster_async::ClusterConnection,
    cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo, SingleNodeRoutingInfo},
};

use merkle_shared::config::{ConfigError, parse_duration, redact_url, require_scheme};

use crate::cluster::Topology;

const URL_VARIABLE: &str = "REDIS_URL (--redis-url)";
const CA_VARIABLE: &str = "REDIS_CA_FILE (--redis-ca-file)";
const CLUSTER_VARIABLE: &str = "REDIS_CLUSTER_NODES (--redis-cluster-nodes)";

/// Redis settings: one server (`REDIS_URL`) or a cluster (`REDIS_CLUSTER_NODES`).
/// `Debug` redacts the passwords in the URLs, so the effective config can be logged.
#[derive(Clone, Args)]
pub struct RedisArgs {
    /// Redis URL of one server, e.g. redis://127.0.0.1:6379/0 or redis://:password@host:6379.
    /// For a Redis Cluster set REDIS_CLUSTER_NODES instead.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// A Redis Cluster instead of REDIS_URL: URLs of some of its nodes, comma-separated, e.g.
    /// redis://10.0.0.1:6379,redis://10.0.0.2:6379 (the other nodes are learnt from them).
    #[arg(long, env = "REDIS_CLUSTER_NODES", value_delimiter = ',')]
    pub redis_cluster_nodes: Vec<String>,
    /// Connections to a standalone Redis, used in turn; each carries many concurrent commands.
    /// (A cluster gets one connection per node.)
    #[arg(long, env = "REDIS_POOL_SIZE", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub redis_pool_size: u32,
    /// Timeout for connecting, for having a connection, and for one Redis command.
    #[arg(long, env = "REDIS_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub redis_timeout: Duration,
    /// Replicas that must hold a NAMESPACE_LATEST_ROOT write (Redis WAIT) before it counts as
    /// done, so that a failover never brings back an older latest root; a write they do not
    /// confirm in time is treated as lost. Default: 1 with REDIS_CLUSTER_NODES, 0 otherwise.
    #[arg(long, env = "REDIS_WAIT_REPLICAS",
          value_parser = clap::value_parser!(u32).range(0..=16))]
    pub redis_wait_replicas: Option<u32>,
    /// CA certificates (PEM) a rediss:// server's certificate is checked against, its name
    /// included. Unset: the system's roots (SSL_CERT_FILE names others).
    #[arg(long, env = "REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,
}

/// Which kind of Redis the settings name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Standalone,
    Cluster,
}

impl RedisArgs {
    /// Checks the URLs, naming the variable at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match (&self.redis_url, self.redis_cluster_nodes.is_empty()) {
            (Some(_), false) => Err(ConfigError::new(
                CLUSTER_VARIABLE,
                "set either it (a Redis Cluster) or REDIS_URL (one server), not both",
            )),
            (None, true) => Err(ConfigError::new(
                URL_VARIABLE,
                "must be set (or REDIS_CLUSTER_NODES, for a Redis Cluster)",
            )),
            (Some(url), true) => {
                self.tls_consistent(URL_VARIABLE, [url.as_str()])?;
                self.client().map(drop)
            }
            (None, false) => {
                let urls = self.redis_cluster_nodes.iter().map(String::as_str);
                self.tls_consistent(CLUSTER_VARIABLE, urls)?;
                self.cluster_client().map(drop)
            }
        }
    }

    /// Refuses TLS asked for by halves: a CA file for plaintext URLs (TLS is the URL's
    /// `rediss://`), or cluster nodes that mix the two.
    fn tls_consistent<'a>(
        &self,
        variable: &str,
        urls: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), ConfigError> {
        let tls: Vec<bool> = urls.into_iter().map(uses_tls).collect();
        if tls.contains(&true) && tls.contains(&false) {
            return Err(ConfigError::new(
                variable,
                "mixes rediss:// (TLS) and redis:// nodes; one cluster speaks one",
            ));
        }
        if self.redis_ca_file.is_some() && !tls.contains(&true) {
            return Err(ConfigError::new(
                CA_VARIABLE,
                format!("is set, but {variable} does not use TLS: write rediss://"),
            ));
        }
        Ok(())
    }

    /// The CA certificates to check a TLS server against, when given; `None` means the
    /// system's.
    fn certificates(&self) -> Result<Option<redis::TlsCertificates>, ConfigError> {
        let Some(path) = &self.redis_ca_file else {
            return Ok(None);
        };
        let pem = std::fs::read(path)
            .map_err(|e| ConfigError::new(CA_VARIABLE, format!("{}: {e}", path.display())))?;
        Ok(Some(redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        }))
    }

    /// A client of `url` (checked already), with the CA file when it speaks TLS.
    fn open(&self, url: &str) -> Result<redis::Client, ConfigError> {
        match self.certificates()? {
            Some(certificates) if uses_tls(url) => redis::Client::build_with_tls(url, certificates)
                .map_err(|e| {
                    ConfigError::new(CA_VARIABLE, format!("not usable CA certificates: {e}"))
                }),
            _ => redis::Client::open(url)
                .map_err(|e| ConfigError::new(URL_VARIABLE, format!("not a valid Redis URL: {e}"))),
        }
    }

    pub fn mode(&self) -> Mode {
        if self.redis_cluster_nodes.is_empty() {
            Mode::Standalone
        } else {
            Mode::Cluster
        }
    }

    /// Replicas a latest-root write waits for.
    pub fn wait_replicas(&self) -> u32 {
        self.redis_wait_replicas
            .unwrap_or(if self.mode() == Mode::Cluster { 1 } else { 0 })
    }

    /// The clients of the servers to subscribe to, in the order to try them: the one server,
    /// or each of the cluster's seed nodes (a cluster relays every PUBLISH to every node).
    pub fn subscribers(&self) -> Result<Vec<redis::Client>, ConfigError> {
        match &self.redis_url {
            Some(_) => Ok(vec![self.client()?]),
            None => self
                .redis_cluster_nodes
                .iter()
                .map(|url| self.node_client(url))
                .collect(),
        }
    }

    pub(crate) fn client(&self) -> Result<redis::Client, ConfigError> {
        let url = self.redis_url.as_deref().unwrap_or_default();
        require_scheme(
            URL_VARIABLE,
            url,
            &["redis", "rediss", "unix", "redis+unix"],
        )?;
        redis::Client::open(url)
            .map_err(|e| ConfigError::new(URL_VARIABLE, format!("not a valid Redis URL: {e}")))?;
        self.open(url)
    }

    fn cluster_client(&self) -> Result<ClusterClient, ConfigError> {
        for url in &self.redis_cluster_nodes {
            self.node_client(url)?;
        }
        let mut builder =
            ClusterClientBuilder::new(self.redis_cluster_nodes.iter().map(String::as_str));
        if let Some(certificates) = self.certificates()? {
            builder = builder.certs(certificates);
        }
        builder
            .connection_timeout(self.redis_timeout)
            .response_timeout(self.redis_timeout)
            // Redirects and reconnections are retried within the caller's timeout, not past it.
            .retries(3)
            .min_retry_wait(10)
            .max_retry_wait(100)
            .build()
            .map_err(|e| ConfigError::new(CLUSTER_VARIABLE, format!("cannot use these nodes: {e}")))
    }

    /// One cluster node's client, its URL checked.
    fn node_client(&self, url: &str) -> Result<redis::Client, ConfigError> {
        require_scheme(CLUSTER_VARIABLE, url, &["redis", "rediss"])?;
        redis::Client::open(url).map_err(|e| {
            ConfigError::new(
                CLUSTER_VARIABLE,
                format!("{} is not a valid Redis URL: {e}", redact_url(url)),
            )
        })?;
        self.open(url)
    }
}

/// Whether `url` asks for TLS.
fn uses_tls(url: &str) -> bool {
    url.starts_with("rediss://")
}

/// Refuses a Redis of the wrong kind at start, naming the variable: REDIS_URL pointing at a
/// cluster node (its commands would meet MOVED), or REDIS_CLUSTER_NODES at a server that is
/// not in cluster mode. A Redis that does not answer yet is not refused: the service starts
/// NOT_SERVING and connects when it can.
pub async fn check_mode(args: &RedisArgs) -> Result<(), ConfigError> {
    let (client, variable) = match args.mode() {
        Mode::Standalone => (args.client()?, URL_VARIABLE),
        Mode::Cluster => (
            args.node_client(&args.redis_cluster_nodes[0])?,
            CLUSTER_VARIABLE,
        ),
    };
    let asking = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("INFO")
            .arg("cluster")
            .query_async::<String>(&mut conn)
            .await
    };
    let Ok(Ok(info)) = tokio::time::timeout(args.redis_timeout, asking).await else {
        return Ok(());
    };
    let clustered = info
        .lines()
        .any(|line| line.trim_end() == "cluster_enabled:1");
    match (args.mode(), clustered) {
        (Mode::Standalone, true) => Err(ConfigError::new(
            variable,
            "this Redis is a Redis Cluster node; name the cluster's nodes in REDIS_CLUSTER_NODES instead",
        )),
        (Mode::Cluster, false) => Err(ConfigError::new(
            variable,
            format!(
                "{} is not a Redis Cluster node (cluster_enabled:0); use REDIS_URL for one server",
                redact_url(&args.redis_cluster_nodes[0])
            ),
        )),
        _ => Ok(()),
    }
}

/// `bb8-redis`'s manager, told which connections broke. Its own `has_broken` is always
/// false and we do not PING on checkout, so without this a connection Redis closed (a
/// restart) would stay in the pool and fail every command sent on it.
///
/// Connections are opened with `REDIS_TIMEOUT` as their connect timeout and no response
/// timeout of the redis crate's own: its defaults (1 s to connect, 500 ms per answer) would
/// otherwise cut every command at 500 ms whatever `REDIS_TIMEOUT` says; each command here has
/// `REDIS_TIMEOUT` already, around it.
pub struct Manager {
    manager: RedisConnectionManager,
    client: redis::Client,
    config: redis::AsyncConnectionConfig,
}

/// A pooled connection and whether a command on it failed as a lost connection does.
pub struct Connection {
    redis: MultiplexedConnection,
    broken: Arc<AtomicBool>,
}

impl bb8::ManageConnection for Manager {
    type Connection = Connection;
    type Error = redis::RedisError;

    async fn connect(&self) -> Result<Connection, redis::RedisError> {
        Ok(Connection {
            redis: self
                .client
                .get_multiplexed_async_connection_with_config(&self.config)
                .await?,
            broken: Arc::new(AtomicBool::new(false)),
        })
    }

    async fn is_valid(&self, conn: &mut Connection) -> Result<(), redis::RedisError> {
        self.manager.is_valid(&mut conn.redis).await
    }

    fn has_broken(&self, conn: &mut Connection) -> bool {
        conn.broken.load(Ordering::Relaxed)
    }
}

/// The connections to Redis; cheap to clone.
#[derive(Clone)]
pub enum RedisPool {
    Standalone(bb8::Pool<Manager>),
    /// The cluster client, and the cluster's shape as the last health probe saw it.
    Cluster(ClusterConnection, Arc<Topology>),
}

/// A connection for commands: to the one server, or to the cluster (routed by key).
#[derive(Clone)]
pub enum Conn {
    Standalone(MultiplexedConnection),
    Cluster(ClusterConnection),
}

/// A server that holds keys: the one server, or a cluster master (`host:port`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Only,
    Master { host: String, port: u16 },
}

impl std::fmt::Display for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Node::Only => f.write_str("redis"),
            Node::Master { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl Conn {
    /// The servers holding keys: the one server, or every master of the cluster.
    pub async fn masters(&mut self) -> RedisResult<Vec<Node>> {
        Ok(self
            .on_masters(redis::cmd("PING"))
            .await?
            .into_iter()
            .map(|(node, _)| node)
            .collect())
    }

    /// Runs `cmd` on every server holding keys; each answer beside its server.
    pub async fn on_masters(&mut self, cmd: Cmd) -> RedisResult<Vec<(Node, Value)>> {
        match self {
            Conn::Standalone(c) => Ok(vec![(Node::Only, cmd.query_async(c).await?)]),
            Conn::Cluster(c) => {
                let answers = c
                    .route_command(
                        cmd,
                        RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None)),
                    )
                    .await?;
                let Value::Map(answers) = answers else {
                    return Err(unexpected("a map of the masters' answers", &answers));
                };
                answers
                    .into_iter()
                    .map(|(address, answer)| {
                        let address: String = redis::from_redis_value(address)?;
                        if let Value::ServerError(e) = answer {
                            return Err(e.into());
                        }
                        Ok((master(&address)?, answer))
                    })
                    .collect()
            }
        }
    }

    /// Runs `cmd` on one server holding keys (a SCAN step, say).
    pub async fn on<T: redis::FromRedisValue>(&mut self, node: &Node, cmd: Cmd) -> RedisResult<T> {
        match (self, node) {
            (Conn::Cluster(c), Node::Master { host, port }) => {
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                });
                Ok(redis::from_redis_value(
                    c.route_command(cmd, routing).await?,
                )?)
            }
            (conn, _) => cmd.query_async(conn).await,
        }
    }
}

/// A master's address as the cluster client reports it, `host:port`.
fn master(address: &str) -> RedisResult<Node> {
    address
        .rsplit_once(':')
        .and_then(|(host, port)| {
            Some(Node::Master {
                host: host.to_owned(),
                port: port.parse().ok()?,
            })
        })
        .ok_or_else(|| {
            redis::RedisError::from((
                redis::ErrorKind::Client,
                "the cluster client named a node without a port",
                address.to_owned(),
            ))
        })
}

fn unexpected(wanted: &str, got: &Value) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::Client,
        "unexpected answer",
        format!("wanted {wanted}, got {got:?}"),
    ))
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Standalone(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Standalone(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Standalone(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// A connection's handle for one command (the connection stays in the pool).
pub struct Handle {
    pub redis: Conn,
    /// The pooled connection's flag; `None` for the cluster client, which reconnects itself.
    broken: Option<Arc<AtomicBool>>,
}

impl Handle {
    /// Records the outcome of a command: a connection-level failure retires the connection.
    pub fn observe<T>(&self, outcome: &Result<T, Failure>) {
        if let Err(failure) = outcome
            && failure.retires_connection()
            && let Some(broken) = &self.broken
        {
            broken.store(true, Ordering::Relaxed);
        }
    }
}

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

/// Connections that are opened in the background; fails only on malformed settings, naming
/// the variable. Must be called inside a tokio runtime.
pub fn pool(args: &RedisArgs) -> Result<RedisPool, ConfigError> {
    if args.mode() == Mode::Cluster {
        let client = args.cluster_client()?;
        return Ok(RedisPool::Cluster(
            client.get_pending_async_connection_with_config(redis::cluster::ClusterConfig::new()),
            Arc::default(),
        ));
    }
    let client = args.client()?;
    let manager = RedisConnectionManager::new(client.get_connection_info().clone())
        .map_err(|e| ConfigError::new(URL_VARIABLE, format!("cannot use this Redis URL: {e}")))?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(args.redis_timeout))
        .set_response_timeout(None);
    Ok(RedisPool::Standalone(
        bb8::Pool::builder()
            .max_size(args.redis_pool_size)
            .min_idle(Some(args.redis_pool_size.min(4)))
            .test_on_check_out(false)
            // The connection given back last is handed out next: a checkout holds it only
            // while taking its handle, so the commands of concurrent callers gather on one
            // socket, pipelined (fewer writes and wake-ups than spread over all); the others
            // stand by for when it is retired.
            .queue_strategy(bb8::QueueStrategy::Lifo)
            .connection_timeout(args.redis_timeout)
            // Reconnection failures are the breaker's and the health probe's to report.
            .error_sink(Box::new(bb8::NopErrorSink))
            .build_unchecked(Manager {
                manager,
                client,
                config,
            }),
    ))
}

/// A connection's handle within `timeout`. A pooled connection found retired is dropped from
/// the pool (bb8 drops it when it is given back) and the next one taken.
pub async fn checkout(pool: &RedisPool, timeout: Duration) -> Result<Handle, Failure> {
    let pool = match pool {
        RedisPool::Cluster(cluster, _) => {
            return Ok(Handle {
                redis: Conn::Cluster(cluster.clone()),
                broken: None,
            });
        }
        RedisPool::Standalone(pool) => pool,
    };
    let getting = async {
        loop {
            let conn = pool.get().await?;
            if conn.broken.load(Ordering::Relaxed) {
                continue;
            }
            return Ok::<_, bb8::RunError<redis::RedisError>>(Handle {
                redis: Conn::Standalone(conn.redis.clone()),
                broken: Some(conn.broken.clone()),
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

/// Asks whether Redis serves within `timeout`; returns the slowest round trip. A cluster
/// serves while it reports `cluster_state:ok` and every master answers a PING; its shape
/// (`CLUSTER SLOTS`) is recorded on the way.
pub async fn ping(pool: &RedisPool, timeout: Duration) -> Result<Duration, String> {
    match pool {
        RedisPool::Standalone(pool) => ping_pooled(pool, timeout).await,
        RedisPool::Cluster(cluster, topology) => {
            let started = Instant::now();
            let mut conn = Conn::Cluster(cluster.clone());
            let asking = async {
                let state: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(&mut conn)
                    .await?;
                let pings = conn.on_masters(redis::cmd("PING")).await?;
                let slots: Value = redis::cmd("CLUSTER")
                    .arg("SLOTS")
                    .query_async(&mut conn)
                    .await?;
                if let Err(reason) = topology.update(&slots) {
                    tracing::warn!(error = %reason, "an unreadable CLUSTER SLOTS answer");
                }
                Ok::<_, redis::RedisError>((state, pings.len()))
            };
            match tokio::time::timeout(timeout, asking).await {
                Err(_) => Err(format!("the cluster did not answer within {timeout:?}")),
                Ok(Err(e)) => Err(format!("the cluster did not answer: {e}")),
                Ok(Ok((state, _)))
                    if !state.lines().any(|l| l.trim_end() == "cluster_state:ok") =>
                {
                    let state = state
                        .lines()
                        .find(|l| l.starts_with("cluster_state:"))
                        .unwrap_or("cluster_state missing")
                        .trim_end()
                        .to_owned();
                    Err(format!("the Redis Cluster reports {state}"))
                }
                Ok(Ok(_)) => Ok(started.elapsed()),
            }
        }
    }
}

/// Pings Redis on every idle connection of the pool (at least one). Every idle one, because a
/// connection Redis closed while nobody used it is found only by using it: the probe retires
/// it, so that no caller meets it after Redis is back.
async fn ping_pooled(pool: &bb8::Pool<Manager>, timeout: Duration) -> Result<Duration, String> {
    async fn once(pool: &bb8::Pool<Manager>, timeout: Duration) -> Result<(), String> {
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
        let nodes: Vec<String> = self
            .redis_cluster_nodes
            .iter()
            .map(|url| redact_url(url))
            .collect();
        f.debug_struct("RedisArgs")
            .field("redis_url", &self.redis_url.as_deref().map(redact_url))
            .field("redis_cluster_nodes", &nodes)
            .field("redis_pool_size", &self.redis_pool_size)
            .field("redis_timeout", &self.redis_timeout)
            .field("redis_wait_replicas", &self.wait_replicas())
            .field("redis_ca_file", &self.redis_ca_file)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(url: Option<&str>, nodes: &[&str], ca: Option<&str>) -> RedisArgs {
        RedisArgs {
            redis_url: url.map(str::to_owned),
            redis_cluster_nodes: nodes.iter().map(|n| (*n).to_owned()).collect(),
            redis_pool_size: 4,
            redis_timeout: Duration::from_secs(1),
            redis_wait_replicas: None,
            redis_ca_file: ca.map(PathBuf::from),
        }
    }

    fn refusal(args: &RedisArgs) -> String {
        args.validate().expect_err("refused").to_string()
    }

    #[test]
    fn tls_is_asked_for_by_the_url_and_never_by_halves() {
        assert!(
            args(Some("rediss://127.0.0.1:6380/0"), &[], None)
                .validate()
                .is_ok()
        );
        assert!(
            args(
                None,
                &["rediss://127.0.0.1:7000", "rediss://127.0.0.1:7001"],
                None
            )
            .validate()
            .is_ok()
        );
        let mixed = refusal(&args(
            None,
            &["rediss://127.0.0.1:7000", "redis://127.0.0.1:7001"],
            None,
        ));
        assert!(
            mixed.contains("REDIS_CLUSTER_NODES") && mixed.contains("mixes"),
            "{mixed}"
        );
        let plaintext = refusal(&args(
            Some("redis://127.0.0.1:6379/0"),
            &[],
            Some("/nonexistent/ca.pem"),
        ));
        assert!(
            plaintext.contains("REDIS_CA_FILE") && plaintext.contains("rediss://"),
            "{plaintext}"
        );
        let missing = refusal(&args(
            Some("rediss://127.0.0.1:6380/0"),
            &[],
            Some("/nonexistent/ca.pem"),
        ));
        assert!(
            missing.contains("REDIS_CA_FILE") && missing.contains("/nonexistent/ca.pem"),
            "{missing}"
        );
        let scheme = refusal(&args(Some("https://127.0.0.1:6379"), &[], None));
        assert!(scheme.contains("REDIS_URL"), "{scheme}");
    }
}
