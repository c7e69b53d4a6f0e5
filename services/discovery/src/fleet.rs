//! The known fleet and the incremental refresh of the original design.
//!
//! - Without a refresh, a list read within LIST_TTL is answered as it is (HOT): from memory,
//!   or from the cache when another replica (or this one before a restart) read it.
//! - A refresh reads the backend's node list (one call per page), takes every node whose
//!   version is unchanged from memory or the per-node cache (NODE_TTL), fetches only the new
//!   and changed ones in detail (FETCH_CONCURRENCY at once), drops the removed ones, and
//!   stores both the nodes and the list. Concurrent refreshes share one backend round.
//! - When the backend cannot be read, the last known list is answered STALE with the error;
//!   with none, UNAVAILABLE naming the backend.
//!
//! Every change of the known list is broadcast as ADDED, CHANGED and REMOVED events for
//! WatchClients; while anyone watches, `Fleet::follow` waits on the backend's changes and
//! refreshes on each.

use parking_lot::RwLock;
use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use futures::StreamExt as _;
use merkle_proto::{
    cache::v1::Namespace,
    discovery::v1::{
        CacheState, Client, ClientEventType, ListClientsResponse, RefreshSummary,
        WatchClientsResponse,
    },
};
use merkle_shared::{cache::CacheClient, shutdown::Shutdown, single_flight::SingleFlight};
use sha2::{Digest as _, Sha256};
use tokio::sync::{OnceCell, broadcast};

use crate::{
    backend::{Backend, timestamp},
    config::Config,
    error::{BackendError, Error},
};

/// How long the last list stays in the cache: long past LIST_TTL, so that a restarted
/// Discovery whose backend is down still has a list to answer STALE.
const LIST_KEEP: Duration = Duration::from_secs(24 * 3600);
/// Changes buffered per watcher before it falls behind (it then catches up from the list).
const EVENT_BUFFER: usize = 256;
/// Longest pause between attempts while the backend cannot be followed.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How a list is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A list within LIST_TTL as it is; else an incremental refresh.
    Cached,
    /// An incremental refresh.
    Refresh,
    /// Every node fetched in detail.
    Force,
}

/// The clients as last read.
#[derive(Debug, Clone, Default)]
struct Known {
    /// Bumped at each change; events carry it.
    generation: u64,
    /// By id.
    clients: Arc<BTreeMap<String, Client>>,
    /// When they were read from the backend; `None` until they have been.
    refresh_time: Option<SystemTime>,
    /// Where a wait for the backend's next change starts.
    index: String,
}

/// A batch of changes, in the order they happened.
#[derive(Debug)]
pub struct Change {
    pub generation: u64,
    pub events: Vec<WatchClientsResponse>,
}

pub struct Fleet {
    config: Config,
    backend: OnceCell<Backend>,
    cache: CacheClient,
    known: RwLock<Known>,
    changes: broadcast::Sender<Arc<Change>>,
    flights: SingleFlight<bool, Result<RefreshSummary, BackendError>>,
    following: AtomicBool,
    shutdown: Shutdown,
}

impl Fleet {
    pub fn new(config: Config, cache: CacheClient, shutdown: Shutdown) -> Arc<Self> {
        Arc::new(Fleet {
            config,
            backend: OnceCell::new(),
            cache,
            known: RwLock::new(Known::default()),
            changes: broadcast::channel(EVENT_BUFFER).0,
            flights: SingleFlight::default(),
            following: AtomicBool::new(false),
            shutdown,
        })
    }

    fn kind(&self) -> &'static str {
        self.config.backend.as_str()
    }

    /// The backend, connected on first use; an error names the setting at fault.
    async fn backend(&self) -> Result<&Backend, BackendError> {
        self.backend
            .get_or_try_init(|| Backend::connect(&self.config))
            .await
    }

    fn known(&self) -> Known {
        self.known.read().clone()
    }

    /// Cache keys are scoped by what the backend reads (hashed: a URL makes a poor key).
    fn scope(backend: &Backend) -> String {
        let digest = Sha256::digest(backend.identity().as_bytes());
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    fn answer(&self, known: &Known, state: CacheState) -> ListClientsResponse {
        ListClientsResponse {
            clients: known.clients.values().cloned().collect(),
            cache_state: state as i32,
            summary: Some(RefreshSummary::default()),
            backend: self.kind().to_owned(),
            refresh_time: known.refresh_time.map(timestamp),
            error: String::new(),
        }
    }

    fn is_fresh(&self, refresh_time: Option<SystemTime>) -> bool {
        refresh_time
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age < self.config.list_ttl)
    }

    /// True once a list has been read (here or by another replica, through the cache).
    pub fn has_list(&self) -> bool {
        self.known().refresh_time.is_some()
    }

    /// The clients, as `mode` asks.
    pub async fn list(self: &Arc<Self>, mode: Mode) -> Result<ListClientsResponse, Error> {
        if mode == Mode::Cached {
            let known = self.known();
            if self.is_fresh(known.refresh_time) {
                return Ok(self.answer(&known, CacheState::Hot));
            }
            if let Some(cached) = self.cached_list().await
                && self.is_fresh(
                    cached
                        .refresh_time
                        .and_then(|t| SystemTime::try_from(t).ok()),
                )
            {
                self.adopt(cached);
                return Ok(self.answer(&self.known(), CacheState::Hot));
            }
        }
        match self.refresh(mode == Mode::Force).await {
            Ok(summary) => {
                let state = match mode {
                    Mode::Cached => CacheState::Cold,
                    Mode::Refresh => CacheState::Refreshed,
                    Mode::Force => CacheState::Bypass,
                };
                let mut answer = self.answer(&self.known(), state);
                answer.summary = Some(summary);
                Ok(answer)
            }
            Err(err) => {
                // The backend's status and a snippet of its answer are in the error.
                tracing::warn!(backend = self.kind(), error = %err, "reading the backend failed; the list is not replaced");
                self.stale(err).await
            }
        }
    }

    /// The last known list marked STALE with `err`; UNAVAILABLE when there is none.
    async fn stale(&self, err: BackendError) -> Result<ListClientsResponse, Error> {
        if !self.has_list()
            && let Some(cached) = self.cached_list().await
        {
            self.adopt(cached);
        }
        let known = self.known();
        if known.refresh_time.is_none() {
            return Err(Error::Unavailable(format!(
                "the {} backend could not be read and no client list is known yet: {err}",
                self.kind()
            )));
        }
        let mut answer = self.answer(&known, CacheState::Stale);
        answer.error = err.to_string();
        Ok(answer)
    }

    /// The list in the cache, if the backend is configured well enough to name it.
    async fn cached_list(&self) -> Option<ListClientsResponse> {
        let backend = self.backend().await.ok()?;
        self.cache
            .get(
                Namespace::DiscoveryList,
                &format!("{}:list", Self::scope(backend)),
            )
            .await
    }

    /// Takes a list read elsewhere (another replica, or before a restart) when it is newer.
    fn adopt(&self, cached: ListClientsResponse) {
        let time = cached
            .refresh_time
            .and_then(|t| SystemTime::try_from(t).ok())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        if self.known().refresh_time.is_some_and(|t| t >= time) {
            return;
        }
        let clients = cached
            .clients
            .into_iter()
            .map(|c| (c.id.clone(), c))
            .collect();
        self.replace(clients, time, None);
    }

    /// One refresh, shared by every concurrent caller asking for the same kind.
    pub async fn refresh(self: &Arc<Self>, force: bool) -> Result<RefreshSummary, BackendError> {
        let this = self.clone();
        self.flights
            .run(force, move || async move { this.refresh_now(force).await })
            .await
    }

    async fn refresh_now(&self, force: bool) -> Result<RefreshSummary, BackendError> {
        let backend = self.backend().await?;
        let scope = Self::scope(backend);
        let started = SystemTime::now();
        let listing = backend.list().await?;
        let mut summary = RefreshSummary {
            backend_calls: listing.calls,
            ..RefreshSummary::default()
        };

        // What was known before: this replica's list, else the cached one.
        let mut before = self.known();
        if before.refresh_time.is_none()
            && let Some(cached) = self.cached_list().await
        {
            before.clients = Arc::new(
                cached
                    .clients
                    .into_iter()
                    .map(|c| (c.id.clone(), c))
                    .collect(),
            );
        }
        let previous: HashMap<&str, &str> = before
            .clients
            .values()
            .map(|c| (c.id.as_str(), c.version.as_str()))
            .collect();
        let classify =
            |summary: &mut RefreshSummary, id: &str, version: &str| match previous.get(id) {
                None => summary.new_count += 1,
                Some(v) if *v != version => summary.changed_count += 1,
                Some(_) => summary.unchanged_count += 1,
            };

        let mut next: BTreeMap<String, Client> = BTreeMap::new();
        let mut pending = Vec::new();
        for stub in listing.stubs {
            if let Some(detail) = stub.detail {
                classify(&mut summary, &stub.key, &stub.version);
                next.insert(stub.key, detail);
                continue;
            }
            let reusable = before
                .clients
                .get(&stub.key)
                .filter(|c| !force && c.version == stub.version && self.node_is_fresh(c));
            match reusable {
                Some(client) => {
                    summary.unchanged_count += 1;
                    next.insert(stub.key, client.clone());
                }
                None => pending.push(stub),
            }
        }

        // Unchanged nodes another replica (or an earlier run) fetched: from the node cache.
        let mut to_fetch = Vec::new();
        if !force && !pending.is_empty() {
            let keys: Vec<String> = pending
                .iter()
                .map(|s| format!("{scope}:{}", s.key))
                .collect();
            let cached = self
                .cache
                .get_many::<Client>(Namespace::DiscoveryNode, &keys)
                .await;
            for (stub, cached) in pending.into_iter().zip(cached) {
                match cached {
                    Some(client) if client.version == stub.version && client.id == stub.key => {
                        summary.unchanged_count += 1;
                        next.insert(stub.key, client);
                    }
                    _ => to_fetch.push(stub),
                }
            }
        } else {
            to_fetch = pending;
        }

        // The new and changed nodes, in detail.
        let fetches = futures::stream::iter(to_fetch)
            .map(|stub| async move {
                let result = backend.fetch(&stub.key).await;
                (stub, result)
            })
            .buffer_unordered(self.config.fetch_concurrency as usize)
            .collect::<Vec<_>>()
            .await;
        let mut fetched = Vec::with_capacity(fetches.len());
        for (stub, result) in fetches {
            summary.backend_calls += 1;
            match result {
                Ok(client) => {
                    classify(&mut summary, &stub.key, &client.version);
                    fetched.push((format!("{scope}:{}", stub.key), client.clone()));
                    next.insert(stub.key, client);
                }
                // Removed between the list and the fetch: the next list will not show it.
                Err(BackendError::Gone(_)) => {}
                Err(err) => return Err(err),
            }
        }
        summary.removed_count = previous
            .keys()
            .filter(|id| !next.contains_key(**id))
            .count() as u64;

        self.cache
            .set_many(
                Namespace::DiscoveryNode,
                &fetched,
                Some(self.config.node_ttl),
            )
            .await;
        let list = ListClientsResponse {
            clients: next.values().cloned().collect(),
            backend: self.kind().to_owned(),
            refresh_time: Some(timestamp(started)),
            ..ListClientsResponse::default()
        };
        self.cache
            .set(
                Namespace::DiscoveryList,
                &format!("{scope}:list"),
                &list,
                Some(LIST_KEEP),
            )
            .await;
        self.replace(next, started, Some(listing.index));
        tracing::debug!(
            new = summary.new_count,
            changed = summary.changed_count,
            unchanged = summary.unchanged_count,
            removed = summary.removed_count,
            backend_calls = summary.backend_calls,
            force,
            "refreshed the client list"
        );
        Ok(summary)
    }

    fn node_is_fresh(&self, client: &Client) -> bool {
        client
            .fetch_time
            .and_then(|t| SystemTime::try_from(t).ok())
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age < self.config.node_ttl)
    }

    /// Makes `clients` the known list and broadcasts what changed.
    fn replace(
        &self,
        clients: BTreeMap<String, Client>,
        refresh_time: SystemTime,
        index: Option<String>,
    ) {
        let mut known = self.known.write();
        let events = diff(&known.clients, &clients);
        known.clients = Arc::new(clients);
        known.refresh_time = Some(refresh_time);
        if let Some(index) = index {
            known.index = index;
        }
        if !events.is_empty() {
            known.generation += 1;
            // Sent under the lock, so a watcher's snapshot and the events after it agree.
            let _ = self.changes.send(Arc::new(Change {
                generation: known.generation,
                events,
            }));
        }
    }

    /// The known clients with their generation, and the changes after it. Reads the list
    /// first when none is known.
    pub async fn subscribe(
        self: &Arc<Self>,
    ) -> Result<
        (
            u64,
            Arc<BTreeMap<String, Client>>,
            broadcast::Receiver<Arc<Change>>,
        ),
        Error,
    > {
        if !self.has_list() {
            self.list(Mode::Cached).await?;
        }
        let (generation, clients, changes) = {
            let known = self.known.read();
            (
                known.generation,
                known.clients.clone(),
                self.changes.subscribe(),
            )
        };
        self.follow();
        Ok((generation, clients, changes))
    }

    /// The known clients now (for a watcher that fell behind).
    pub fn current(&self) -> (u64, Arc<BTreeMap<String, Client>>) {
        let known = self.known();
        (known.generation, known.clients)
    }

    /// Follows the backend's changes while anyone watches: waits for the next change and
    /// refreshes on each.
    fn follow(self: &Arc<Self>) {
        if self.following.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let mut shutdown = this.shutdown.clone();
            let mut backoff = Duration::from_secs(1);
            loop {
                if this.changes.receiver_count() == 0 {
                    this.following.store(false, Ordering::Release);
                    // A watcher that subscribed just now saw `following` still set.
                    if this.changes.receiver_count() == 0
                        || this.following.swap(true, Ordering::AcqRel)
                    {
                        return;
                    }
                }
                let step = async {
                    let index = this.known().index;
                    if index.is_empty() {
                        return this.refresh(false).await.map(|_| ());
                    }
                    let backend = this.backend().await?;
                    if backend.wait_change(&index).await? {
                        this.refresh(false).await?;
                    }
                    Ok(())
                };
                let outcome = tokio::select! {
                    outcome = step => outcome,
                    () = shutdown.wait() => return,
                };
                match outcome {
                    Ok(()) => backoff = Duration::from_secs(1),
                    Err(err) => {
                        tracing::warn!(backend = this.kind(), error = %err, retry_in = ?backoff, "following the backend's changes failed");
                        tokio::select! {
                            () = tokio::time::sleep(backoff) => {}
                            () = shutdown.wait() => return,
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        });
    }
}

/// The events that turn `old` into `new`: ADDED, CHANGED (any field but the fetch time),
/// REMOVED.
pub fn diff(
    old: &BTreeMap<String, Client>,
    new: &BTreeMap<String, Client>,
) -> Vec<WatchClientsResponse> {
    let same = |a: &Client, b: &Client| {
        Client {
            fetch_time: None,
            ..a.clone()
        } == Client {
            fetch_time: None,
            ..b.clone()
        }
    };
    let event = |event_type: ClientEventType, client: &Client| WatchClientsResponse {
        event_type: event_type as i32,
        client: Some(client.clone()),
    };
    let mut events = Vec::new();
    for (id, client) in new {
        match old.get(id) {
            None => events.push(event(ClientEventType::Added, client)),
            Some(before) if !same(before, client) => {
                events.push(event(ClientEventType::Changed, client))
            }
            Some(_) => {}
        }
    }
    for (id, client) in old {
        if !new.contains_key(id) {
            events.push(event(ClientEventType::Removed, client));
        }
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(id: &str, version: &str) -> Client {
        Client {
            id: id.into(),
            version: version.into(),
            fetch_time: Some(timestamp(SystemTime::now())),
            ..Client::default()
        }
    }

    #[test]
    fn diff_names_added_changed_and_removed_clients_only() {
        let old: BTreeMap<_, _> = [("a", "1"), ("b", "1"), ("c", "1")]
            .into_iter()
            .map(|(id, v)| (id.to_owned(), client(id, v)))
            .collect();
        let mut new = old.clone();
        new.remove("a");
        new.insert("b".into(), client("b", "2"));
        new.insert("c".into(), client("c", "1")); // only the fetch time differs
        new.insert("d".into(), client("d", "1"));
        let events: Vec<(i32, String)> = diff(&old, &new)
            .into_iter()
            .map(|e| (e.event_type, e.client.expect("client").id))
            .collect();
        assert_eq!(
            events,
            vec![
                (ClientEventType::Changed as i32, "b".to_owned()),
                (ClientEventType::Added as i32, "d".to_owned()),
                (ClientEventType::Removed as i32, "a".to_owned()),
            ]
        );
    }
}
