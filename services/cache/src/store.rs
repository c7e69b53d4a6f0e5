//! Every Redis operation of Merkle Mesh, behind a circuit breaker.
//!
//! Each command runs with a timeout on one of the pool's multiplexed connections. Failures
//! feed the breaker; while it is open, reads are misses and writes are dropped at once, so
//! callers never wait on a Redis that is gone (they fall back to PostgreSQL).
//!
//! No stale `LATEST_ROOT` after an outage: that namespace is the one mutable one whose
//! staleness matters (a source's latest root). Whenever a write to it may have been lost (a
//! failed or skipped write, or the breaker opening), the namespace is marked untrusted: its reads
//! answer "not found" until a background SCAN + UNLINK has deleted every entry, which starts
//! with the next successful Redis call. Epochs, not a flag, so that a write lost while the
//! deletion runs marks it untrusted again.

use parking_lot::Mutex;
use std::{
    collections::HashMap,
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use merkle_shared::breaker::{BreakerState, CircuitBreaker};
use redis::RedisResult;

use crate::{
    codec,
    keys::{KeySpace, Namespace},
    notices::{Change, Notices},
    redis::{Conn, Node, RedisPool},
    stats::{Event, Stats},
};

/// Keys asked for per SCAN step, and deleted per UNLINK.
const SCAN_BATCH: usize = 1000;

/// Why Redis was not used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Unavailable {
    #[error("Redis is not called while the circuit breaker is open")]
    Skipped,
    #[error("{0}")]
    Failed(String),
}

/// The outcome of a conditional write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Stored,
    /// The key held a value; nothing was written.
    Existed,
    /// Redis was unavailable (or the change could not be announced).
    Dropped,
}

/// A value read from Redis.
#[derive(Debug, PartialEq, Eq)]
pub struct Found {
    pub value: Vec<u8>,
    /// Time left; `None` without expiry.
    pub ttl: Option<Duration>,
}

/// Where a Redis call goes, for choosing its circuit breaker.
#[derive(Debug, Clone, Copy)]
enum Route<'a> {
    /// Several masters, or none in particular.
    Any,
    /// The master of this Redis key's slot.
    Key(&'a str),
    /// This server.
    Node(&'a Node),
}

/// Settings of the store.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    pub keys: KeySpace,
    /// Default TTL per namespace (indexed by [`Namespace::index`]); `None`: no expiry.
    pub ttls: [Option<Duration>; 5],
    pub compress_threshold: usize,
    pub timeout: Duration,
    pub breaker_failures: u32,
    pub breaker_cooldown: Duration,
    /// Replicas a latest-root write waits for (WAIT); 0 for none.
    pub wait_replicas: u32,
}

/// The last health ping.
#[derive(Debug, Clone, Default)]
pub struct Ping {
    pub reachable: bool,
    pub latency: Option<Duration>,
}

/// Redis figures for GetStats.
#[derive(Debug, Default)]
pub struct RedisInfo {
    pub used_memory: u64,
    pub evicted_keys: u64,
    pub version: String,
    pub maxmemory: u64,
    pub maxmemory_policy: String,
    pub deployment_keys: u64,
    /// Each server's own figures (one for a single server, each master of a cluster).
    pub nodes: Vec<NodeInfo>,
}

/// One server's figures.
#[derive(Debug, Default)]
pub struct NodeInfo {
    pub address: String,
    pub used_memory: u64,
    pub deployment_keys: u64,
    pub maxmemory: u64,
    pub evicted_keys: u64,
}

#[derive(Default)]
struct Epochs {
    /// Bumped whenever a `LATEST_ROOT` write may have been lost.
    dirty: AtomicU64,
    /// The `dirty` value the last completed deletion started from.
    clean: AtomicU64,
    running: AtomicBool,
}

impl Epochs {
    fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::Acquire) > self.clean.load(Ordering::Acquire)
    }

    fn mark(&self) {
        self.dirty.fetch_add(1, Ordering::AcqRel);
    }
}

/// The cache's Redis side.
pub struct Store {
    pool: RedisPool,
    notices: Arc<Notices>,
    settings: StoreSettings,
    /// The breaker of a standalone Redis, and of a cluster's calls that no single master
    /// serves.
    breaker: Arc<CircuitBreaker>,
    /// A cluster's breakers, one per master (by address), so a master that is down is
    /// skipped while the others serve.
    master_breakers: Mutex<HashMap<(String, u16), Arc<CircuitBreaker>>>,
    stats: Stats,
    latest_root: Epochs,
    ping: Mutex<Ping>,
    last_error: Mutex<String>,
    started: Instant,
}

impl Store {
    pub fn new(pool: RedisPool, settings: StoreSettings, notices: Arc<Notices>) -> Arc<Self> {
        Arc::new(Store {
            pool,
            notices,
            breaker: Arc::new(CircuitBreaker::new(
                "redis",
                settings.breaker_failures,
                settings.breaker_cooldown,
            )),
            master_breakers: Mutex::new(HashMap::new()),
            settings,
            stats: Stats::default(),
            latest_root: Epochs::default(),
            ping: Mutex::new(Ping::default()),
            last_error: Mutex::new(String::new()),
            started: Instant::now(),
        })
    }

    pub fn keys(&self) -> &KeySpace {
        &self.settings.keys
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The worst state of the breakers (of a cluster: any master's).
    pub fn breaker_state(&self) -> BreakerState {
        let rank = |state: BreakerState| match state {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        };
        let masters = self.master_breakers.lock();
        std::iter::once(&self.breaker)
            .chain(masters.values())
            .map(|b| b.state())
            .max_by_key(|s| rank(*s))
            .unwrap_or(BreakerState::Closed)
    }

    /// How often the breakers opened, all together.
    pub fn breaker_opened(&self) -> u64 {
        let masters = self.master_breakers.lock();
        self.breaker.times_opened() + masters.values().map(|b| b.times_opened()).sum::<u64>()
    }

    /// The breaker of a call to `route`: of a cluster, that of the master serving it when the
    /// last health probe's `CLUSTER SLOTS` tells which; else the one breaker.
    fn breaker_for(&self, route: Route<'_>) -> Arc<CircuitBreaker> {
        let RedisPool::Cluster(_, topology) = &self.pool else {
            return self.breaker.clone();
        };
        let master = match route {
            Route::Key(key) => topology.master_of_slot(crate::cluster::slot_of(key.as_bytes())),
            Route::Node(Node::Master { host, port }) => Some((host.clone(), *port)),
            Route::Node(Node::Only) | Route::Any => None,
        };
        let Some(master) = master else {
            return self.breaker.clone();
        };
        self.master_breakers
            .lock()
            .entry(master)
            .or_insert_with_key(|(host, port)| {
                Arc::new(CircuitBreaker::new(
                    format!("redis {host}:{port}"),
                    self.settings.breaker_failures,
                    self.settings.breaker_cooldown,
                ))
            })
            .clone()
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn last_ping(&self) -> Ping {
        self.ping.lock().clone()
    }

    pub fn last_error(&self) -> String {
        self.last_error.lock().clone()
    }

    /// True while `LATEST_ROOT` entries from before an outage may still be in Redis.
    pub fn latest_root_untrusted(&self) -> bool {
        self.latest_root.is_dirty()
    }

    /// Runs one Redis operation through the breaker of `route`'s master (the one breaker for
    /// [`Route::Any`]), with the timeout. `ns` is charged with the error or skip. `always`: tried
    /// even while the breaker is open (writes of latest roots: a skipped one would leave another
    /// replica's copy of the old root standing).
    async fn redis_at<T, F, Fut>(
        self: &Arc<Self>,
        route: Route<'_>,
        operation: &'static str,
        ns: Option<Namespace>,
        always: bool,
        op: F,
    ) -> Result<T, Unavailable>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let breaker = self.breaker_for(route);
        let permit = if always {
            breaker.force()
        } else {
            let Some(permit) = breaker.acquire() else {
                if let Some(ns) = ns {
                    self.stats.count(ns, Event::Skipped);
                }
                return Err(Unavailable::Skipped);
            };
            permit
        };
        let timeout = self.settings.timeout;
        // A client span per command (database semantic conventions; keys and values stay
        // out of it), and the commands waiting on the multiplexed connection.
        let span = merkle_shared::telemetry::child_span(|| {
            tracing::info_span!(
                "redis",
                otel.name = operation,
                otel.kind = "client",
                db.system = "redis",
                db.operation = operation,
                db.statement = operation,
                db.namespace = ns.map(|n| n.to_proto().as_str_name()).unwrap_or_default(),
            )
        });
        let _in_flight = crate::redis::InFlight::start();
        let started = Instant::now();
        let outcome = match crate::redis::checkout(&self.pool, timeout).await {
            Ok(conn) => {
                let command = op(conn.redis.clone());
                let left = timeout.saturating_sub(started.elapsed());
                let outcome = match tokio::time::timeout(
                    left,
                    tracing::Instrument::instrument(command, span.clone()),
                )
                .await
                {
                    Ok(Ok(value)) => Ok(value),
                    Ok(Err(err)) => Err(crate::redis::Failure::Redis(err)),
                    Err(_) => Err(crate::redis::Failure::TimedOut(timeout)),
                };
                conn.observe(&outcome);
                outcome
            }
            Err(failure) => Err(failure),
        }
        .map_err(|failure| failure.to_string());
        match outcome {
            Ok(value) => {
                permit.success();
                self.resume_invalidation();
                Ok(value)
            }
            Err(reason) => {
                tracing_opentelemetry::OpenTelemetrySpanExt::set_status(
                    &span,
                    opentelemetry::trace::Status::error(reason.clone()),
                );
                permit.failure();
                if breaker.state() == BreakerState::Open {
                    // Writes may have been lost by this outage: trust no latest root from before.
                    self.latest_root.mark();
                }
                if let Some(ns) = ns {
                    self.stats.count(ns, Event::Error);
                }
                tracing::debug!(error = %reason, "Redis operation failed");
                *self.last_error.lock() = reason.clone();
                Err(Unavailable::Failed(reason))
            }
        }
    }

    /// Marks `LATEST_ROOT` untrusted when a write to it failed.
    fn write_failed(&self, ns: Namespace) {
        if ns == Namespace::LatestRoot {
            self.latest_root.mark();
        }
    }

    /// Starts deleting untrusted `LATEST_ROOT` entries, once at a time, in the background.
    fn resume_invalidation(self: &Arc<Self>) {
        if !self.latest_root.is_dirty() || self.latest_root.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let store = self.clone();
        tokio::spawn(async move {
            let epoch = store.latest_root.dirty.load(Ordering::Acquire);
            let pattern = store.keys().pattern(Namespace::LatestRoot, "*");
            match store
                .delete_matching(&pattern, Some(Namespace::LatestRoot))
                .await
            {
                Ok(deleted) => {
                    store.latest_root.clean.fetch_max(epoch, Ordering::AcqRel);
                    // A write this replica lost may have left other replicas' copies with an
                    // old root: they drop everything (a failure here is retried with the next
                    // lost write; the copies' leases bound it meanwhile).
                    store.announce(Namespace::LatestRoot, Change::All).await;
                    tracing::info!(
                        deleted,
                        "deleted the LATEST_ROOT entries written before a Redis outage; serving them again"
                    );
                }
                Err(err) => {
                    tracing::debug!(error = %err, "LATEST_ROOT invalidation interrupted; retried on the next call")
                }
            }
            store.latest_root.running.store(false, Ordering::Release);
        });
    }

    /// Reads one key: GET and PTTL in one round trip. Unavailable Redis reads as a miss.
    pub async fn get(self: &Arc<Self>, ns: Namespace, key: &str) -> Option<Found> {
        if ns == Namespace::LatestRoot && self.latest_root.is_dirty() {
            self.stats.count(ns, Event::Misses(1));
            // A read is as good a moment as any to (re)start the deletion.
            self.resume_invalidation();
            return None;
        }
        let redis_key = self.keys().key(ns, key);
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(&redis_key).cmd("PTTL").arg(&redis_key);
        let read = self
            .redis_at(
                Route::Key(&redis_key),
                "GET",
                Some(ns),
                false,
                |mut c| async move { pipe.query_async::<(Option<Vec<u8>>, i64)>(&mut c).await },
            )
            .await;
        let (stored, pttl) = match read {
            Ok((Some(stored), pttl)) => (stored, pttl),
            Ok((None, _)) | Err(_) => {
                self.stats.count(ns, Event::Misses(1));
                return None;
            }
        };
        match self.decode(ns, key, &stored) {
            Some(value) => {
                self.stats.count(ns, Event::Hits(1));
                Some(Found {
                    value,
                    ttl: (pttl > 0).then(|| Duration::from_millis(pttl as u64)),
                })
            }
            None => {
                self.stats.count(ns, Event::Misses(1));
                None
            }
        }
    }

    /// Reads many keys with one MGET; `None` for each missing (or unreadable) one.
    pub async fn get_many(
        self: &Arc<Self>,
        ns: Namespace,
        keys: &[String],
    ) -> Vec<Option<Vec<u8>>> {
        if keys.is_empty() {
            return Vec::new();
        }
        let untrusted = ns == Namespace::LatestRoot && self.latest_root.is_dirty();
        let read = if untrusted {
            self.resume_invalidation();
            Err(Unavailable::Skipped)
        } else {
            let redis_keys: Vec<String> = keys.iter().map(|k| self.keys().key(ns, k)).collect();
            self.redis_at(Route::Any, "MGET", Some(ns), false, |mut c| async move {
                redis::cmd("MGET")
                    .arg(&redis_keys)
                    .query_async::<Vec<Option<Vec<u8>>>>(&mut c)
                    .await
            })
            .await
        };
        let values: Vec<Option<Vec<u8>>> = match read {
            Ok(stored) if stored.len() == keys.len() => stored
                .iter()
                .zip(keys)
                .map(|(s, k)| s.as_deref().and_then(|s| self.decode(ns, k, s)))
                .collect(),
            _ => vec![None; keys.len()],
        };
        let hits = values.iter().filter(|v| v.is_some()).count() as u64;
        self.stats.count(ns, Event::Hits(hits));
        self.stats
            .count(ns, Event::Misses(keys.len() as u64 - hits));
        values
    }

    fn decode(&self, ns: Namespace, key: &str, stored: &[u8]) -> Option<Vec<u8>> {
        match codec::decode(stored) {
            Ok(value) => Some(value),
            Err(err) => {
                // Not the caller's bytes: a miss, so the caller reloads and overwrites it.
                self.stats.count(ns, Event::Error);
                tracing::warn!(namespace = ns.segment(), key, error = %err, "unreadable cached value; treated as a miss");
                None
            }
        }
    }

    fn ttl_for(&self, ns: Namespace, ttl: Option<Duration>) -> Option<Duration> {
        ttl.or(self.settings.ttls[ns.index()])
    }

    /// Writes one key (plain SET without expiry clears an old TTL). False when dropped.
    pub async fn set(
        self: &Arc<Self>,
        ns: Namespace,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> bool {
        self.set_many(ns, &[(key, value)], ttl).await == 1
    }

    /// Writes one key only when it holds no value (SET NX). `Written::Existed` when it did.
    pub async fn set_if_absent(
        self: &Arc<Self>,
        ns: Namespace,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Written {
        let redis_key = self.keys().key(ns, key);
        let wanted = self.replicas_for_key(&redis_key);
        let mut pipe = redis::pipe();
        let cmd = pipe
            .cmd("SET")
            .arg(&redis_key)
            .arg(codec::encode(value, self.settings.compress_threshold))
            .arg("NX");
        if let Some(ttl) = self.ttl_for(ns, ttl) {
            cmd.arg("PX").arg(ttl.as_millis().max(1) as u64);
        }
        let waits = self.add_wait(ns, wanted, &mut pipe);
        let written = self
            .redis_at(
                Route::Key(&redis_key),
                "SET",
                Some(ns),
                ns == Namespace::LatestRoot,
                |mut c| async move {
                    let answers: Vec<redis::Value> = pipe.query_async(&mut c).await?;
                    let stored = !matches!(answers.first(), Some(redis::Value::Nil) | None);
                    if waits && stored {
                        replicated(answers.last(), wanted)?;
                    }
                    Ok(stored)
                },
            )
            .await;
        match written {
            Ok(true) => {
                self.stats.count(ns, Event::Sets(1));
                if self.announce(ns, Change::Keys(vec![key.to_owned()])).await {
                    Written::Stored
                } else {
                    Written::Dropped
                }
            }
            Ok(false) => Written::Existed,
            Err(_) => {
                self.write_failed(ns);
                Written::Dropped
            }
        }
    }

    /// Writes many keys; returns how many were stored (all or none). One pipeline per slot of
    /// a cluster (one in all for a single server), sent at once: the cluster client writes
    /// those bound for one node together on that node's connection, so a batch costs a round
    /// trip per node, and never meets CROSSSLOT.
    pub async fn set_many(
        self: &Arc<Self>,
        ns: Namespace,
        entries: &[(&str, &[u8])],
        ttl: Option<Duration>,
    ) -> u64 {
        if entries.is_empty() {
            return 0;
        }
        let ttl = self.ttl_for(ns, ttl);
        // Each pipeline with the replicas its writes wait for.
        let mut pipes: Vec<(redis::Pipeline, u32)> = Vec::new();
        let mut slots: HashMap<u16, usize> = HashMap::new();
        for (key, value) in entries {
            let redis_key = self.keys().key(ns, key);
            let index = if self.clustered() {
                let slot = crate::cluster::slot_of(redis_key.as_bytes());
                *slots.entry(slot).or_insert_with(|| {
                    pipes.push((redis::pipe(), self.replicas_for_key(&redis_key)));
                    pipes.len() - 1
                })
            } else {
                if pipes.is_empty() {
                    pipes.push((redis::pipe(), self.settings.wait_replicas));
                }
                0
            };
            let cmd = pipes[index]
                .0
                .cmd("SET")
                .arg(redis_key)
                .arg(codec::encode(value, self.settings.compress_threshold));
            if let Some(ttl) = ttl {
                // PX takes whole milliseconds; round a sub-millisecond TTL up, never to 0.
                cmd.arg("PX").arg(ttl.as_millis().max(1) as u64);
            }
            cmd.ignore();
        }
        let pipes: Vec<(redis::Pipeline, u32, bool)> = pipes
            .into_iter()
            .map(|(mut pipe, wanted)| {
                let waits = self.add_wait(ns, wanted, &mut pipe);
                (pipe, wanted, waits)
            })
            .collect();
        let written = self
            .redis_at(
                Route::Any,
                "SET",
                Some(ns),
                ns == Namespace::LatestRoot,
                |c| async move {
                    let each = pipes.into_iter().map(|(pipe, wanted, waits)| {
                        let mut c = c.clone();
                        async move {
                            let answers: Vec<redis::Value> = pipe.query_async(&mut c).await?;
                            if waits {
                                replicated(answers.last(), wanted)?;
                            }
                            Ok::<_, redis::RedisError>(())
                        }
                    });
                    futures::future::try_join_all(each).await.map(drop)
                },
            )
            .await;
        match written {
            Ok(()) => {
                let n = entries.len() as u64;
                self.stats.count(ns, Event::Sets(n));
                if ns != Namespace::LatestRoot {
                    return n;
                }
                let keys = entries.iter().map(|(key, _)| (*key).to_owned()).collect();
                if self.announce(ns, Change::Keys(keys)).await {
                    n
                } else {
                    0
                }
            }
            Err(_) => {
                self.write_failed(ns);
                0
            }
        }
    }

    /// True when the keys live in a Redis Cluster.
    pub fn clustered(&self) -> bool {
        matches!(self.pool, RedisPool::Cluster(..))
    }

    /// The replicas a latest-root write to `redis_key` waits for: REDIS_WAIT_REPLICAS, but in
    /// a cluster no more than its master has online (after a failover the new master has
    /// none until one comes back: waiting would fail every write to it, and with no replica
    /// there is nothing an older value could be promoted from).
    fn replicas_for_key(&self, redis_key: &str) -> u32 {
        let wanted = self.settings.wait_replicas;
        match &self.pool {
            RedisPool::Cluster(_, topology) => topology
                .replicas_of_slot(crate::cluster::slot_of(redis_key.as_bytes()))
                .map_or(wanted, |online| online.min(wanted)),
            RedisPool::Standalone(_) => wanted,
        }
    }

    /// [`Store::replicas_for_key`] for the keys of one master.
    fn replicas_for_node(&self, node: &Node) -> u32 {
        let wanted = self.settings.wait_replicas;
        match (&self.pool, node) {
            (RedisPool::Cluster(_, topology), Node::Master { host, port }) => topology
                .replicas_of_master(host, *port)
                .map_or(wanted, |online| online.min(wanted)),
            _ => wanted,
        }
    }

    /// Ends a write of `ns` with the WAIT that confirms it reached the replicas, for latest
    /// roots when REDIS_WAIT_REPLICAS asks for it: a failover then never brings an older root
    /// back. True when one was added (its answer is the pipeline's last).
    fn add_wait(&self, ns: Namespace, replicas: u32, pipe: &mut redis::Pipeline) -> bool {
        if ns != Namespace::LatestRoot || replicas == 0 {
            return false;
        }
        pipe.add_command(self.wait_command(replicas));
        true
    }

    fn wait_command(&self, replicas: u32) -> redis::Cmd {
        // Half the command timeout, so that a missing replica is reported, not timed out.
        let millis = (self.settings.timeout.as_millis() / 2).max(1) as u64;
        redis::cmd("WAIT").arg(replicas).arg(millis).clone()
    }

    /// Tells the holders of latest-root copies about a change of `ns` (a no-op for the other
    /// namespaces). False when they may not have heard: the write is then reported as failed,
    /// so the writer waits out the copies' lease before relying on it.
    async fn announce(&self, ns: Namespace, change: Change) -> bool {
        if ns != Namespace::LatestRoot {
            return true;
        }
        match self.notices.announce(change).await {
            Ok(()) => true,
            Err(reason) => {
                tracing::warn!(error = %reason, "a latest-root change could not be announced to the copies");
                *self.last_error.lock() = reason;
                false
            }
        }
    }

    /// Deletes one key; true when it existed.
    pub async fn delete(self: &Arc<Self>, ns: Namespace, key: &str) -> Result<bool, Unavailable> {
        let redis_key = self.keys().key(ns, key);
        let wanted = self.replicas_for_key(&redis_key);
        let mut pipe = redis::pipe();
        pipe.cmd("UNLINK").arg(&redis_key);
        let waits = self.add_wait(ns, wanted, &mut pipe);
        let deleted = self
            .redis_at(
                Route::Key(&redis_key),
                "UNLINK",
                Some(ns),
                ns == Namespace::LatestRoot,
                |mut c| async move {
                    let answers: Vec<redis::Value> = pipe.query_async(&mut c).await?;
                    if waits {
                        replicated(answers.last(), wanted)?;
                    }
                    match answers.first() {
                        Some(redis::Value::Int(n)) => Ok(*n as u64),
                        other => Err(redis::RedisError::from((
                            redis::ErrorKind::UnexpectedReturnType,
                            "UNLINK answered",
                            format!("{other:?}"),
                        ))),
                    }
                },
            )
            .await;
        match deleted {
            Ok(n) => {
                self.stats.count(ns, Event::Deletes(n));
                if !self.announce(ns, Change::Keys(vec![key.to_owned()])).await {
                    return Err(Unavailable::Failed(
                        "deleted, but the copies of latest roots did not confirm it".into(),
                    ));
                }
                Ok(n > 0)
            }
            Err(err) => {
                self.write_failed(ns);
                Err(err)
            }
        }
    }

    /// Deletes the keys of `ns` matching `glob`.
    pub async fn invalidate(
        self: &Arc<Self>,
        ns: Namespace,
        glob: &str,
    ) -> Result<u64, Unavailable> {
        let pattern = self.keys().pattern(ns, glob);
        let deleted = self
            .delete_matching(&pattern, Some(ns))
            .await
            .inspect_err(|_| self.write_failed(ns))?;
        if !self.announce(ns, Change::All).await {
            return Err(Unavailable::Failed(
                "deleted, but the copies of latest roots did not confirm it".into(),
            ));
        }
        Ok(deleted)
    }

    /// Deletes this deployment's keys: of one namespace, or all (older schema versions too).
    pub async fn clear(self: &Arc<Self>, ns: Option<Namespace>) -> Result<u64, Unavailable> {
        match ns {
            Some(ns) => self.invalidate(ns, "*").await,
            None => {
                let epoch = self.latest_root.dirty.load(Ordering::Acquire);
                let pattern = self.keys().deployment_pattern();
                let deleted = self
                    .delete_matching(&pattern, None)
                    .await
                    .inspect_err(|_| self.write_failed(Namespace::LatestRoot))?;
                // Every entry is gone: none from before an outage is left to distrust.
                self.latest_root.clean.fetch_max(epoch, Ordering::AcqRel);
                if !self.announce(Namespace::LatestRoot, Change::All).await {
                    return Err(Unavailable::Failed(
                        "deleted, but the copies of latest roots did not confirm it".into(),
                    ));
                }
                Ok(deleted)
            }
        }
    }

    /// SCANs for `pattern` and UNLINKs what it finds, a batch at a time (never KEYS, so Redis
    /// never blocks on a large keyspace), on every server holding keys (each master of a
    /// cluster). Deletions are counted under `ns`, or under each key's own namespace when `ns`
    /// is `None`.
    async fn delete_matching(
        self: &Arc<Self>,
        pattern: &str,
        ns: Option<Namespace>,
    ) -> Result<u64, Unavailable> {
        let holders = self.keys().channels().holders;
        let latest = ns == Some(Namespace::LatestRoot);
        let mut deleted = 0;
        for node in self.masters(ns).await? {
            let mut cursor = 0;
            loop {
                let (next, mut batch) = self.scan_step(&node, pattern, cursor, ns).await?;
                // The holders of latest-root copies are not cached values: a Clear keeps
                // them, or a writer would stop waiting for copies that still exist.
                batch.retain(|key| key.as_slice() != holders.as_bytes());
                if !batch.is_empty() {
                    let unlink = redis::cmd("UNLINK").arg(&batch).clone();
                    // Latest roots deleted must stay deleted through a failover.
                    let wanted = self.replicas_for_node(&node);
                    let wait = (latest && wanted > 0).then(|| self.wait_command(wanted));
                    let target = node.clone();
                    let n = self
                        .redis_at(
                            Route::Node(&node),
                            "UNLINK",
                            ns,
                            latest,
                            |mut c| async move {
                                let n: u64 = unlink.query_async(&mut c).await?;
                                if let Some(wait) = wait {
                                    let replicas: redis::Value = c.on(&target, wait).await?;
                                    replicated(Some(&replicas), wanted)?;
                                }
                                Ok(n)
                            },
                        )
                        .await?;
                    deleted += n;
                    match ns {
                        Some(ns) => self.stats.count(ns, Event::Deletes(n)),
                        None => {
                            for key in &batch {
                                if let Some(ns) = self.keys().namespace_of(key) {
                                    self.stats.count(ns, Event::Deletes(1));
                                }
                            }
                        }
                    }
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(deleted)
    }

    /// The servers holding keys: the one server, or every master of the cluster.
    async fn masters(self: &Arc<Self>, ns: Option<Namespace>) -> Result<Vec<Node>, Unavailable> {
        self.redis_at(
            Route::Any,
            "PING",
            ns,
            ns == Some(Namespace::LatestRoot),
            |mut c| async move { c.masters().await },
        )
        .await
    }

    /// One SCAN step on `node` from `cursor`: the next cursor (0 at the end) and the keys.
    async fn scan_step(
        self: &Arc<Self>,
        node: &Node,
        pattern: &str,
        cursor: u64,
        ns: Option<Namespace>,
    ) -> Result<(u64, Vec<Vec<u8>>), Unavailable> {
        let scan = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(SCAN_BATCH)
            .clone();
        self.redis_at(
            Route::Node(node),
            "SCAN",
            ns,
            ns == Some(Namespace::LatestRoot),
            |mut c| async move { c.on(node, scan).await },
        )
        .await
    }

    /// Pings Redis (the health probe): records reachability and latency.
    pub async fn ping(self: &Arc<Self>) -> Result<(), String> {
        let result = crate::redis::ping(&self.pool, self.settings.timeout).await;
        if result.is_ok() {
            // Redis is back: entries a lost write left untrusted are deleted now, not at the
            // next call that happens to come.
            self.resume_invalidation();
        }
        *self.ping.lock() = Ping {
            reachable: result.is_ok(),
            latency: result.as_ref().ok().copied(),
        };
        if let Err(reason) = &result {
            *self.last_error.lock() = reason.clone();
        }
        result.map(drop)
    }

    /// Redis' own figures and this deployment's key count: per server (each master of a
    /// cluster) and in total.
    pub async fn info(self: &Arc<Self>) -> Result<RedisInfo, Unavailable> {
        let answers = self
            .redis_at(Route::Any, "INFO", None, false, |mut c| async move {
                c.on_masters(redis::cmd("INFO")).await
            })
            .await?;
        let pattern = self.keys().deployment_pattern();
        let mut total = RedisInfo::default();
        for (node, answer) in answers {
            let text: String = redis::from_redis_value(answer)
                .map_err(|e| Unavailable::Failed(format!("INFO of {node}: {e}")))?;
            let mut info = parse_info(&text);
            let mut cursor = 0;
            loop {
                let (next, batch) = self.scan_step(&node, &pattern, cursor, None).await?;
                info.deployment_keys += batch.len() as u64;
                if next == 0 {
                    break;
                }
                cursor = next;
            }
            total.used_memory += info.used_memory;
            total.evicted_keys += info.evicted_keys;
            total.maxmemory += info.maxmemory;
            total.deployment_keys += info.deployment_keys;
            if total.version.is_empty() {
                total.version = info.version.clone();
                total.maxmemory_policy = info.maxmemory_policy.clone();
            }
            total.nodes.push(NodeInfo {
                address: node.to_string(),
                used_memory: info.used_memory,
                deployment_keys: info.deployment_keys,
                maxmemory: info.maxmemory,
                evicted_keys: info.evicted_keys,
            });
        }
        total.nodes.sort_by(|a, b| a.address.cmp(&b.address));
        Ok(total)
    }
}

/// Checks a WAIT's answer: at least `wanted` replicas hold the write.
fn replicated(answer: Option<&redis::Value>, wanted: u32) -> RedisResult<()> {
    match answer {
        Some(redis::Value::Int(n)) if *n >= i64::from(wanted) => Ok(()),
        other => Err(redis::RedisError::from((
            redis::ErrorKind::Client,
            "the write did not reach the replicas REDIS_WAIT_REPLICAS asks for",
            format!("wanted {wanted}, WAIT answered {other:?}"),
        ))),
    }
}

/// Picks the figures GetStats reports out of INFO's `field:value` lines.
fn parse_info(text: &str) -> RedisInfo {
    let mut info = RedisInfo::default();
    for line in text.lines() {
        let Some((field, value)) = line.trim_end().split_once(':') else {
            continue;
        };
        match field {
            "used_memory" => info.used_memory = value.parse().unwrap_or(0),
            "evicted_keys" => info.evicted_keys = value.parse().unwrap_or(0),
            "maxmemory" => info.maxmemory = value.parse().unwrap_or(0),
            "maxmemory_policy" => info.maxmemory_policy = value.to_owned(),
            "redis_version" => info.version = value.to_owned(),
            _ => {}
        }
    }
    info
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_figures_are_parsed() {
        let text = "# Server\r\nredis_version:7.0.15\r\n# Memory\r\nused_memory:1048576\r\n\
                    maxmemory:0\r\nmaxmemory_policy:noeviction\r\n# Stats\r\nevicted_keys:3\r\n";
        let info = parse_info(text);
        assert_eq!(info.version, "7.0.15");
        assert_eq!(info.used_memory, 1_048_576);
        assert_eq!(info.maxmemory, 0);
        assert_eq!(info.maxmemory_policy, "noeviction");
        assert_eq!(info.evicted_keys, 3);
    }
}
