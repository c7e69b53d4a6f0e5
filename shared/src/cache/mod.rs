//! The typed client of the Cache service, for DbSync, Scheduler and Discovery (no service but
//! Cache talks to Redis).
//!
//! A cache must never be the reason a call fails. With the Cache service or Redis down, `get`
//! is a miss and `set` a no-op, each after at most `CACHE_TIMEOUT`, and a circuit breaker skips
//! a Cache service that keeps failing without waiting at all; the outcome is logged and
//! counted ([`CacheClient::counters`]), never returned as an error.
//!
//! - Values are the caller's protobuf messages, encoded and decoded here.
//! - [`CacheClient::get_or_load`] is single-flight: concurrent misses of one key in this
//!   process share one cache read and one load.
//! - A key whose write or delete could not reach the cache is read as a miss (so from the
//!   database) until a later write of it succeeds, so this process never reads back a value
//!   it failed to replace. Past [`MAX_PENDING`] such keys, the whole namespace is read as a miss
//!   until it has been cleared in the cache.
//! - Every value is sealed ([`seal`]) with a key of the writing service's own, and checked when
//!   read back: a value the service did not write (set in Redis directly, or through the Cache
//!   service with another caller's credentials) is dropped, counted (`merkle.cache.forged`) and
//!   logged as a security event, never returned. Until [`CacheClient::install_seal`] gives the
//!   client its key, every read is a miss and every write is skipped.

pub mod seal;

use parking_lot::Mutex;
use std::{
    collections::HashSet,
    future::Future,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use clap::Args;
use merkle_proto::cache::v1::{
    ClearRequest, DeleteRequest, Entry, GetManyRequest, GetRequest, Namespace, SetManyRequest,
    SetRequest, WatchLatestRootsRequest, WatchLatestRootsResponse,
    cache_service_client::CacheServiceClient,
};
use prost::{Message, bytes::Bytes};
use tonic::{Code, Status};

use crate::{
    breaker::CircuitBreaker,
    client::{Channel, channel},
    config::{ClientArgs, ConfigError, parse_duration, require_service_uri},
    single_flight::SingleFlight,
};
use seal::{Refused, Seal};

/// How long a copy of the latest roots (`WatchLatestRoots`) stays valid past the last lease
/// the Cache service handed out; a writer that could not confirm a change of a latest root
/// waits this long before relying on it, so no copy outlives it.
pub const COPY_LEASE: Duration = Duration::from_millis(500);

/// Keys remembered as not written through, before a whole namespace is distrusted instead.
pub const MAX_PENDING: usize = 10_000;
/// Consecutive failed calls after which the client stops calling the Cache service for a while.
const BREAKER_FAILURES: u32 = 5;
const BREAKER_COOLDOWN: Duration = Duration::from_secs(2);

/// How services reach the Cache service.
#[derive(Debug, Clone, Args)]
pub struct CacheArgs {
    /// The Cache service, e.g. http://127.0.0.1:50054; unset: no cache (every read goes to
    /// the database).
    #[arg(long, env = "CACHE_ADDR")]
    pub cache_addr: Option<String>,
    /// Deadline of one cache call; past it a read is a miss and a write is dropped.
    #[arg(long, env = "CACHE_TIMEOUT", default_value = "250ms", value_parser = parse_duration)]
    pub cache_timeout: Duration,
    /// A file holding a secret (at least 32 bytes) that keys the seal of this service's cache
    /// values; every replica of the service needs the same one. Unset: DbSync and the Scheduler
    /// derive their key from a secret in their PostgreSQL, Discovery uses a key of its own
    /// process (its replicas then do not share cached lists).
    #[arg(long, env = "CACHE_SEAL_KEY_FILE")]
    pub cache_seal_key_file: Option<std::path::PathBuf>,
}

impl CacheArgs {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(addr) = &self.cache_addr {
            require_service_uri("CACHE_ADDR (--cache-addr)", addr)?;
        }
        self.seal_from_file().map(|_| ())
    }

    /// The seal keyed by `CACHE_SEAL_KEY_FILE`, when it is set.
    pub fn seal_from_file(&self) -> Result<Option<Seal>, ConfigError> {
        const VARIABLE: &str = "CACHE_SEAL_KEY_FILE (--cache-seal-key-file)";
        let Some(path) = &self.cache_seal_key_file else {
            return Ok(None);
        };
        let secret = std::fs::read(path)
            .map_err(|e| ConfigError::new(VARIABLE, format!("{}: {e}", path.display())))?;
        let secret = secret.trim_ascii();
        if secret.len() < 32 {
            return Err(ConfigError::new(
                VARIABLE,
                format!(
                    "{} holds {} bytes; a seal key needs at least 32 (e.g. openssl rand -hex 32)",
                    path.display(),
                    secret.len()
                ),
            ));
        }
        Ok(Some(Seal::derived(secret, "cache")))
    }
}

/// Where a value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheSource {
    /// From the caller's own coherent copy in memory (one hop fewer than `Hit`).
    Local,
    /// From the cache.
    Hit,
    /// From the loader (the database).
    Miss,
}

impl CacheSource {
    /// `LOCAL`, `HIT` or `MISS`, as in the `x-cache` response header.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheSource::Local => "LOCAL",
            CacheSource::Hit => "HIT",
            CacheSource::Miss => "MISS",
        }
    }
}

/// A value from [`CacheClient::get_or_load`] and where it came from.
#[derive(Debug, Clone)]
pub struct Loaded<M> {
    pub value: M,
    pub source: CacheSource,
}

/// What the client saw since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub hits: u64,
    pub misses: u64,
    /// Reads answered as misses because the cache could not be asked.
    pub failed_reads: u64,
    /// Writes and deletes that did not reach the cache.
    pub dropped_writes: u64,
    /// Cached values that did not decode as the expected message (read as misses).
    pub decode_errors: u64,
    /// Cached values not sealed by this service's key: forged or altered (read as misses).
    pub forged: u64,
    /// Loads run by [`CacheClient::get_or_load`].
    pub loads: u64,
}

#[derive(Default)]
struct AtomicCounters {
    hits: AtomicU64,
    misses: AtomicU64,
    failed_reads: AtomicU64,
    dropped_writes: AtomicU64,
    decode_errors: AtomicU64,
    forged: AtomicU64,
    loads: AtomicU64,
}

/// Keys (and whole namespaces) whose last write did not reach the cache.
#[derive(Default)]
struct Pending {
    keys: HashSet<(i32, String)>,
    namespaces: HashSet<i32>,
    last_clear_attempt: Option<Instant>,
}

type Flight = Result<(Bytes, CacheSource), Status>;

/// What a read of one key found, and so how a value loaded after it is put back.
enum Read {
    Found(Bytes),
    /// No value: put back only into an empty key.
    Absent,
    /// A value that must be overwritten: refused (forged, another key's seal), or one this
    /// process failed to replace.
    Replace,
    /// The cache could not be asked: put back only into an empty key.
    Unknown,
}

struct Inner {
    client: Option<CacheServiceClient<Channel>>,
    timeout: Duration,
    breaker: CircuitBreaker,
    flights: SingleFlight<(i32, String), Flight>,
    pending: Mutex<Pending>,
    counters: AtomicCounters,
    seal: OnceLock<Seal>,
}

/// The Cache service's typed client; cheap to clone.
#[derive(Clone)]
pub struct CacheClient {
    inner: Arc<Inner>,
}

impl CacheClient {
    /// A client of the Cache service at `CACHE_ADDR`, or a disabled one when it is unset.
    pub fn new(args: &CacheArgs, client_args: &ClientArgs) -> Result<Self, ConfigError> {
        let client = match &args.cache_addr {
            Some(addr) => Some(CacheServiceClient::new(channel(
                "CACHE_ADDR (--cache-addr)",
                addr,
                client_args,
            )?)),
            None => None,
        };
        Ok(Self::with(client, args.cache_timeout))
    }

    /// A client over a channel made by the caller: one that presents another identity than
    /// this process's token (as the tests of this client do).
    pub fn over(channel: Channel, timeout: Duration) -> Self {
        Self::with(Some(CacheServiceClient::new(channel)), timeout)
    }

    /// A client that never calls anything: every read is a miss, every write is dropped.
    pub fn disabled() -> Self {
        Self::with(None, Duration::ZERO)
    }

    fn with(client: Option<CacheServiceClient<Channel>>, timeout: Duration) -> Self {
        CacheClient {
            inner: Arc::new(Inner {
                client,
                timeout,
                breaker: CircuitBreaker::new("cache-service", BREAKER_FAILURES, BREAKER_COOLDOWN),
                flights: SingleFlight::default(),
                pending: Mutex::new(Pending::default()),
                counters: AtomicCounters::default(),
                seal: OnceLock::new(),
            }),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.client.is_some()
    }

    /// Gives the client the key it seals and checks values with (once; later calls are
    /// ignored). Before it, reads are misses and writes are skipped.
    pub fn install_seal(&self, seal: Seal) {
        if self.inner.seal.set(seal).is_ok() {
            tracing::debug!("cache values are sealed from now on");
        }
    }

    pub fn counters(&self) -> Counters {
        let c = &self.inner.counters;
        Counters {
            hits: c.hits.load(Relaxed),
            misses: c.misses.load(Relaxed),
            failed_reads: c.failed_reads.load(Relaxed),
            dropped_writes: c.dropped_writes.load(Relaxed),
            decode_errors: c.decode_errors.load(Relaxed),
            forged: c.forged.load(Relaxed),
            loads: c.loads.load(Relaxed),
        }
    }

    /// Opens the stream that keeps a copy of the latest roots coherent (`WatchLatestRoots`);
    /// `acks` must begin with an empty message. Not bounded by the call timeout: it lasts
    /// until either side ends it. An error when the cache is disabled or refuses.
    pub async fn watch_latest_roots(
        &self,
        acks: impl tokio_stream::Stream<Item = WatchLatestRootsRequest> + Send + 'static,
    ) -> Result<tonic::Streaming<WatchLatestRootsResponse>, Status> {
        let mut client = self
            .inner
            .client
            .clone()
            .ok_or_else(|| Status::failed_precondition("CACHE_ADDR is not set"))?;
        let opened = tokio::time::timeout(self.inner.timeout, client.watch_latest_roots(acks))
            .await
            .map_err(|_| Status::deadline_exceeded("the Cache service did not open the stream"))?;
        Ok(opened?.into_inner())
    }

    /// Reads and decodes one value; a miss when absent, undecodable or unreachable.
    pub async fn get<M: Message + Default>(&self, ns: Namespace, key: &str) -> Option<M> {
        let bytes = self.get_bytes(ns, key).await?;
        self.decode(ns, key, &bytes)
    }

    /// Reads many values of one namespace in one call; `None` for each miss.
    pub async fn get_many<M: Message + Default>(
        &self,
        ns: Namespace,
        keys: &[String],
    ) -> Vec<Option<M>> {
        let mut values: Vec<Option<M>> = (0..keys.len()).map(|_| None).collect();
        let asked: Vec<usize> = (0..keys.len())
            .filter(|&i| !self.is_pending(ns, &keys[i]))
            .collect();
        if asked.is_empty() || self.inner.seal.get().is_none() {
            self.count_misses(keys.len() as u64);
            return values;
        }
        let request = GetManyRequest {
            namespace: ns as i32,
            keys: asked.iter().map(|&i| keys[i].clone()).collect(),
        };
        let answer = self
            .call("GetMany", |mut c| async move { c.get_many(request).await })
            .await;
        match answer {
            Some(answer) if answer.entries.len() == asked.len() => {
                for (&i, entry) in asked.iter().zip(answer.entries) {
                    if entry.found
                        && let Some(message) = self.unseal(ns, &keys[i], &entry.value)
                    {
                        values[i] = self.decode(ns, &keys[i], message);
                    }
                }
            }
            _ => {
                self.inner
                    .counters
                    .failed_reads
                    .fetch_add(asked.len() as u64, Relaxed);
            }
        }
        let hits = values.iter().filter(|v| v.is_some()).count() as u64;
        self.inner.counters.hits.fetch_add(hits, Relaxed);
        self.count_misses(keys.len() as u64 - hits);
        values
    }

    /// Writes one value (`ttl` `None`: the namespace's default). False when it did not reach
    /// the cache; the key is then read as a miss until a later write succeeds.
    pub async fn set<M: Message>(
        &self,
        ns: Namespace,
        key: &str,
        value: &M,
        ttl: Option<Duration>,
    ) -> bool {
        self.set_bytes(ns, key, Bytes::from(value.encode_to_vec()), ttl, false)
            .await
    }

    /// Writes many values of one namespace in one call; returns how many were stored.
    pub async fn set_many<M: Message>(
        &self,
        ns: Namespace,
        entries: &[(String, M)],
        ttl: Option<Duration>,
    ) -> u64 {
        if entries.is_empty() {
            return 0;
        }
        let Some(seal) = self.inner.seal.get() else {
            for (key, _) in entries {
                self.settle(ns, key, false);
            }
            return 0;
        };
        let request = SetManyRequest {
            namespace: ns as i32,
            entries: entries
                .iter()
                .map(|(key, value)| Entry {
                    key: key.clone(),
                    found: true,
                    value: seal.seal(ns as i32, key, &value.encode_to_vec()),
                })
                .collect(),
            ttl: ttl.and_then(|t| prost_types::Duration::try_from(t).ok()),
        };
        let stored = self
            .call_within("SetMany", self.write_timeout(ns), |mut c| async move {
                c.set_many(request).await
            })
            .await
            .map_or(0, |r| r.stored);
        let all = stored == entries.len() as u64;
        for (key, _) in entries {
            self.settle(ns, key, all);
        }
        stored
    }

    /// Deletes one key. False when the cache could not be reached (the key is then read as a
    /// miss until a later write of it succeeds).
    pub async fn delete(&self, ns: Namespace, key: &str) -> bool {
        let request = DeleteRequest {
            namespace: ns as i32,
            key: key.to_owned(),
        };
        let ok = self
            .call_within("Delete", self.write_timeout(ns), |mut c| async move {
                c.delete(request).await
            })
            .await
            .is_some();
        self.settle(ns, key, ok);
        ok
    }

    /// The cached value of `key`, or else the one `load` returns, which is then cached.
    /// Concurrent misses of the same key share one load; an error of `load` is returned to
    /// each of them and nothing is cached.
    pub async fn get_or_load<M, F, Fut, E>(
        &self,
        ns: Namespace,
        key: &str,
        ttl: Option<Duration>,
        load: F,
    ) -> Result<Loaded<M>, Status>
    where
        M: Message + Default + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<M, E>> + Send + 'static,
        E: Into<Status> + 'static,
    {
        // A hit needs no flight: only misses are shared (the flight reads the cache once more,
        // in case another caller filled it meanwhile, then loads once for all of them).
        if let Some(bytes) = self.get_bytes(ns, key).await
            && let Some(value) = self.decode::<M>(ns, key, &bytes)
        {
            return Ok(Loaded {
                value,
                source: CacheSource::Hit,
            });
        }
        let this = self.clone();
        let owned_key = key.to_owned();
        let (bytes, source) = self
            .inner
            .flights
            .run((ns as i32, key.to_owned()), move || async move {
                let replace = match this.read(ns, &owned_key).await {
                    Read::Found(bytes) if this.decode::<M>(ns, &owned_key, &bytes).is_some() => {
                        return Ok((bytes, CacheSource::Hit));
                    }
                    Read::Found(_) | Read::Replace => true,
                    Read::Absent | Read::Unknown => false,
                };
                this.inner.counters.loads.fetch_add(1, Relaxed);
                let value = load().await.map_err(Into::into)?;
                let bytes = Bytes::from(value.encode_to_vec());
                // Put back only into an empty key: a writer may have stored a newer value
                // since this one was loaded, and must not be overwritten by it. A value that
                // was refused, or that this process failed to replace, is overwritten.
                this.set_bytes(ns, &owned_key, bytes.clone(), ttl, !replace)
                    .await;
                Ok((bytes, CacheSource::Miss))
            })
            .await?;
        let value = M::decode(bytes)
            .map_err(|e| Status::internal(format!("decoding a loaded value: {e}")))?;
        Ok(Loaded { value, source })
    }

    async fn get_bytes(&self, ns: Namespace, key: &str) -> Option<Bytes> {
        match self.read(ns, key).await {
            Read::Found(bytes) => Some(bytes),
            _ => None,
        }
    }

    async fn read(&self, ns: Namespace, key: &str) -> Read {
        if self.inner.seal.get().is_none() {
            self.count_misses(1);
            return Read::Unknown;
        }
        if self.is_pending(ns, key) {
            self.count_misses(1);
            return Read::Replace;
        }
        let request = GetRequest {
            namespace: ns as i32,
            key: key.to_owned(),
        };
        match self
            .call("Get", |mut c| async move { c.get(request).await })
            .await
        {
            Some(answer) if answer.found => match self.unseal(ns, key, &answer.value) {
                Some(message) => {
                    self.inner.counters.hits.fetch_add(1, Relaxed);
                    Read::Found(Bytes::copy_from_slice(message))
                }
                None => {
                    self.count_misses(1);
                    Read::Replace
                }
            },
            Some(_) => {
                self.count_misses(1);
                Read::Absent
            }
            None => {
                self.inner.counters.failed_reads.fetch_add(1, Relaxed);
                self.count_misses(1);
                Read::Unknown
            }
        }
    }

    /// `if_absent`: only into a key without a value; one that had a value counts as written
    /// (nothing of this process's was lost).
    async fn set_bytes(
        &self,
        ns: Namespace,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
        if_absent: bool,
    ) -> bool {
        let Some(seal) = self.inner.seal.get() else {
            self.settle(ns, key, false);
            return false;
        };
        let request = SetRequest {
            namespace: ns as i32,
            key: key.to_owned(),
            value: seal.seal(ns as i32, key, &value),
            ttl: ttl.and_then(|t| prost_types::Duration::try_from(t).ok()),
            if_absent,
        };
        let stored = self
            .call_within("Set", self.write_timeout(ns), |mut c| async move {
                c.set(request).await
            })
            .await
            .is_some_and(|r| r.stored || r.existed);
        self.settle(ns, key, stored);
        stored
    }

    /// The message inside a cached value this service sealed; `None` (counted, and logged as a
    /// security event when forged) for any other value.
    fn unseal<'a>(&self, ns: Namespace, key: &str, value: &'a [u8]) -> Option<&'a [u8]> {
        let seal = self.inner.seal.get()?;
        match seal.open(ns as i32, key, value) {
            Ok(message) => Some(message),
            Err(Refused::ForeignKey) => {
                tracing::debug!(
                    namespace = ns.as_str_name(),
                    key,
                    "cached value sealed by another replica's key; read as a miss"
                );
                None
            }
            Err(Refused::Forged) => {
                self.inner.counters.forged.fetch_add(1, Relaxed);
                forged_counter().add(
                    1,
                    &[opentelemetry::KeyValue::new("namespace", ns.as_str_name())],
                );
                tracing::error!(
                    security_event = "forged_cache_value",
                    namespace = ns.as_str_name(),
                    key,
                    "SECURITY: a cached value was not written by this service (not sealed by its key): dropped, never served"
                );
                None
            }
        }
    }

    fn decode<M: Message + Default>(&self, ns: Namespace, key: &str, bytes: &[u8]) -> Option<M> {
        match M::decode(bytes) {
            Ok(value) => Some(value),
            Err(err) => {
                self.inner.counters.decode_errors.fetch_add(1, Relaxed);
                tracing::warn!(namespace = ns.as_str_name(), key, error = %err, "cached value does not decode; read as a miss");
                None
            }
        }
    }

    fn count_misses(&self, n: u64) {
        self.inner.counters.misses.fetch_add(n, Relaxed);
    }

    /// Records whether a write of `key` reached the cache.
    fn settle(&self, ns: Namespace, key: &str, written: bool) {
        let mut pending = self.inner.pending.lock();
        if written {
            pending.keys.remove(&(ns as i32, key.to_owned()));
            return;
        }
        self.inner.counters.dropped_writes.fetch_add(1, Relaxed);
        if pending.namespaces.contains(&(ns as i32)) {
            return;
        }
        if pending.keys.len() >= MAX_PENDING {
            pending.keys.retain(|(n, _)| *n != ns as i32);
            pending.namespaces.insert(ns as i32);
            tracing::warn!(
                namespace = ns.as_str_name(),
                "too many writes missed the cache: the whole namespace is read as a miss until it is cleared"
            );
        } else {
            pending.keys.insert((ns as i32, key.to_owned()));
        }
    }

    /// True when `key` must not be read from the cache. A distrusted namespace is cleared in
    /// the cache (at most once a second) to trust it again.
    fn is_pending(&self, ns: Namespace, key: &str) -> bool {
        let mut pending = self.inner.pending.lock();
        if pending.keys.is_empty() && pending.namespaces.is_empty() {
            return false;
        }
        if pending.namespaces.contains(&(ns as i32)) {
            let due = pending
                .last_clear_attempt
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
            if due {
                pending.last_clear_attempt = Some(Instant::now());
                let this = self.clone();
                tokio::spawn(async move {
                    let request = ClearRequest {
                        namespace: ns as i32,
                    };
                    if this
                        .call_within("Clear", this.write_timeout(ns), |mut c| async move {
                            c.clear(request).await
                        })
                        .await
                        .is_some()
                    {
                        this.inner.pending.lock().namespaces.remove(&(ns as i32));
                    }
                });
            }
            return true;
        }
        pending.keys.contains(&(ns as i32, key.to_owned()))
    }

    /// One call to the Cache service, bounded by the timeout and skipped while the breaker is
    /// open. `None` when it did not succeed (logged; never an error for the caller).
    async fn call<T, F, Fut>(&self, rpc: &'static str, f: F) -> Option<T>
    where
        F: FnOnce(CacheServiceClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call_within(rpc, self.inner.timeout, f).await
    }

    /// The deadline of a write to `ns`: a change of a latest root returns only once every
    /// copy of it has been told (or its lease ran out), which may take up to [`COPY_LEASE`].
    fn write_timeout(&self, ns: Namespace) -> Duration {
        match ns {
            Namespace::LatestRoot => self.inner.timeout + COPY_LEASE,
            _ => self.inner.timeout,
        }
    }

    async fn call_within<T, F, Fut>(&self, rpc: &'static str, timeout: Duration, f: F) -> Option<T>
    where
        F: FnOnce(CacheServiceClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let client = self.inner.client.clone()?;
        let permit = self.inner.breaker.acquire()?;
        match tokio::time::timeout(timeout, f(client)).await {
            Ok(Ok(response)) => {
                permit.success();
                Some(response.into_inner())
            }
            Ok(Err(status)) => {
                // A refused request is this caller's bug (or its credentials'), not the cache
                // being away.
                let refused = matches!(
                    status.code(),
                    Code::InvalidArgument
                        | Code::NotFound
                        | Code::FailedPrecondition
                        | Code::PermissionDenied
                        | Code::Unauthenticated
                );
                permit.record(refused);
                if matches!(
                    status.code(),
                    Code::PermissionDenied | Code::Unauthenticated
                ) {
                    tracing::error!(rpc, code = ?status.code(), message = status.message(), "the Cache service refused this service's credentials; carrying on without the cache");
                } else {
                    tracing::warn!(rpc, code = ?status.code(), message = status.message(), "cache call failed; carrying on without the cache");
                }
                None
            }
            Err(_) => {
                permit.failure();
                tracing::warn!(
                    rpc,
                    ?timeout,
                    "cache call timed out; carrying on without the cache"
                );
                None
            }
        }
    }
}

/// `merkle.cache.forged`: cached values refused because this service did not seal them.
fn forged_counter() -> &'static opentelemetry::metrics::Counter<u64> {
    static COUNTER: OnceLock<opentelemetry::metrics::Counter<u64>> = OnceLock::new();
    COUNTER.get_or_init(|| {
        crate::metrics::counter(
            "merkle.cache.forged",
            "Cached values refused because this service did not write them (forged or altered), by namespace",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_disabled_client_misses_and_drops_without_failing() {
        let cache = CacheClient::disabled();
        assert!(!cache.is_enabled());
        let value: Option<prost_types::Duration> = cache.get(Namespace::TreeMeta, "k").await;
        assert!(value.is_none());
        assert!(
            !cache
                .set(
                    Namespace::TreeMeta,
                    "k",
                    &prost_types::Duration::default(),
                    None
                )
                .await
        );
        let loaded = cache
            .get_or_load(Namespace::TreeMeta, "k", None, || async {
                Ok::<_, Status>(prost_types::Duration {
                    seconds: 3,
                    nanos: 0,
                })
            })
            .await
            .expect("loads");
        assert_eq!(
            (loaded.value.seconds, loaded.source),
            (3, CacheSource::Miss)
        );
    }

    #[tokio::test]
    async fn a_key_whose_write_was_dropped_is_read_as_a_miss_until_written() {
        let cache = CacheClient::disabled();
        cache.settle(Namespace::LatestRoot, "docs", false);
        assert!(cache.is_pending(Namespace::LatestRoot, "docs"));
        assert!(!cache.is_pending(Namespace::LatestRoot, "other"));
        cache.settle(Namespace::LatestRoot, "docs", true);
        assert!(!cache.is_pending(Namespace::LatestRoot, "docs"));
    }

    #[tokio::test]
    async fn too_many_dropped_writes_distrust_the_namespace() {
        let cache = CacheClient::disabled();
        for i in 0..=MAX_PENDING {
            cache.settle(Namespace::BuildStatus, &format!("b{i}"), false);
        }
        assert!(cache.is_pending(Namespace::BuildStatus, "never-written"));
        assert!(!cache.is_pending(Namespace::LatestRoot, "never-written"));
        assert_eq!(cache.inner.pending.lock().keys.len(), 0);
    }

    #[test]
    fn cache_addr_must_be_a_service_uri() {
        let args = CacheArgs {
            cache_addr: Some("127.0.0.1:50054".into()),
            cache_timeout: Duration::from_millis(250),
            cache_seal_key_file: None,
        };
        let err = args.validate().expect_err("no scheme");
        assert!(err.to_string().contains("CACHE_ADDR"), "{err}");
    }
}
