//! Notices of changed latest roots, for the copies DbSync replicas keep in memory
//! (`WatchLatestRoots`), kept coherent across every replica of both services through Redis.
//!
//! - Every holder of a copy (one open stream) is a member of a sorted set in Redis, scored by
//!   the end of its lease (unix ms). The replica serving the stream renews it every
//!   [`HEARTBEAT`], then publishes a tick on the notice channel; when the tick comes back
//!   through its own subscription it hands the new lease to its holders. So a holder's lease
//!   is renewed only while the whole loop through Redis works, and never past its score.
//! - A change of `NAMESPACE_LATEST_ROOT` ([`Notices::announce`]) reads the holders whose
//!   lease is running and publishes a notice in one pipeline, then waits until each of them
//!   has acknowledged it (on the ack channel, relayed by the replica serving it) or its lease
//!   has ended. Only then does the write return: no copy outlives a write that returned.
//! - A holder drops its whole copy when its stream ends or its lease lapses; it reads through
//!   until it has a new stream.

use parking_lot::Mutex;
use std::{
    collections::{HashMap, HashSet},
    hash::{BuildHasher, RandomState},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::StreamExt;
use merkle_proto::cache::v1::WatchLatestRootsResponse;
use prost::Message;
use tokio::sync::{Notify, mpsc};
use tonic::Status;

use crate::redis::RedisPool;

pub use merkle_shared::cache::COPY_LEASE as LEASE;
/// How often a replica renews its holders' leases.
pub const HEARTBEAT: Duration = Duration::from_millis(100);
/// Messages a holder may fall behind before its stream is closed (it then reads through).
const HOLDER_BACKLOG: usize = 1024;

/// What changed.
#[derive(Debug, Clone)]
pub enum Change {
    Keys(Vec<String>),
    All,
}

/// The Redis names the notices use, under the deployment's prefix.
#[derive(Debug, Clone)]
pub struct Channels {
    pub notices: String,
    pub acks: String,
    pub holders: String,
}

type Outbound = mpsc::Sender<Result<WatchLatestRootsResponse, Status>>;

/// A write waiting for acknowledgements: the holders still to answer, with their lease ends
/// (`None` until the list is read), and the holders that answered before it was.
struct Waiter {
    pending: Option<HashMap<u64, i64>>,
    early: HashSet<u64>,
    answered: Arc<Notify>,
}

/// This replica's side of the notices.
pub struct Notices {
    /// Servers to subscribe to, tried in turn (any node of a cluster hears every PUBLISH).
    subscribers: Vec<redis::Client>,
    next_subscriber: AtomicU64,
    pool: RedisPool,
    channels: Channels,
    timeout: Duration,
    /// Tells this replica's ticks from other replicas'.
    replica: u64,
    holders: Mutex<HashMap<u64, Outbound>>,
    waiters: Mutex<HashMap<u64, Waiter>>,
    subscribed: AtomicBool,
    /// The lease of the last tick that came back (unix ms); 0 before the first.
    lease: AtomicI64,
    ids: AtomicU64,
    hasher: RandomState,
}

impl Notices {
    pub fn new(
        subscribers: Vec<redis::Client>,
        pool: RedisPool,
        channels: Channels,
        timeout: Duration,
    ) -> Arc<Self> {
        let hasher = RandomState::new();
        Arc::new(Notices {
            subscribers,
            next_subscriber: AtomicU64::new(0),
            pool,
            channels,
            timeout,
            replica: hasher.hash_one("replica") | 1,
            holders: Mutex::new(HashMap::new()),
            waiters: Mutex::new(HashMap::new()),
            subscribed: AtomicBool::new(false),
            lease: AtomicI64::new(0),
            ids: AtomicU64::new(0),
            hasher,
        })
    }

    /// A fresh non-zero id, unique across replicas with overwhelming odds.
    fn id(&self) -> u64 {
        self.hasher
            .hash_one(self.ids.fetch_add(1, Ordering::Relaxed))
            .max(1)
    }

    pub fn holders(&self) -> usize {
        self.holders.lock().len()
    }

    /// Subscribes to the channels and relays what arrives, resubscribing after a loss, until
    /// `shutdown`. While not subscribed, no stream is served and every open one is closed.
    pub async fn run(self: Arc<Self>, mut shutdown: merkle_shared::shutdown::Shutdown) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let subscribed = tokio::select! {
                s = self.subscribe() => s,
                () = shutdown.wait() => return,
            };
            match subscribed {
                Ok(pubsub) => {
                    backoff = Duration::from_millis(100);
                    self.subscribed.store(true, Ordering::Release);
                    tracing::debug!("subscribed to the latest-root notices");
                    let mut messages = pubsub.into_on_message();
                    let mut ticks = tokio::time::interval(HEARTBEAT);
                    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    loop {
                        tokio::select! {
                            message = messages.next() => match message {
                                Some(message) => self.receive(&message),
                                None => break,
                            },
                            _ = ticks.tick() => self.tick().await,
                            () = shutdown.wait() => {
                                self.lost("this Cache replica is shutting down");
                                return;
                            }
                        }
                    }
                    self.lost("this Cache replica lost its subscription to Redis");
                }
                Err(reason) => {
                    tracing::debug!(error = %reason, "cannot subscribe to the latest-root notices yet");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = shutdown.wait() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    async fn subscribe(&self) -> Result<redis::aio::PubSub, String> {
        // After a loss, the next server: the one that went away may not come back.
        let turn = self.next_subscriber.fetch_add(1, Ordering::Relaxed) as usize;
        let client = &self.subscribers[turn % self.subscribers.len()];
        let subscribing = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub
                .subscribe(&[&self.channels.notices, &self.channels.acks])
                .await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        match tokio::time::timeout(self.timeout, subscribing).await {
            Ok(Ok(pubsub)) => Ok(pubsub),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
        }
    }

    /// The subscription is gone: every holder is told to drop its copy (its stream ends).
    fn lost(&self, why: &str) {
        self.subscribed.store(false, Ordering::Release);
        self.lease.store(0, Ordering::Release);
        for (_, holder) in self.holders.lock().drain() {
            let _ = holder.try_send(Err(Status::unavailable(format!(
                "{why}; drop the copy and read through until a new stream is open"
            ))));
        }
    }

    /// Renews the leases of this replica's holders, then publishes the tick that hands them
    /// out when it comes back. A failure only means no tick: leases then run out by themselves.
    async fn tick(&self) {
        let until = now_ms() + LEASE.as_millis() as i64;
        let holders: Vec<u64> = self.holders.lock().keys().copied().collect();
        let mut pipe = redis::pipe();
        if !holders.is_empty() {
            let cmd = pipe.cmd("ZADD").arg(&self.channels.holders).arg("GT");
            for holder in &holders {
                cmd.arg(until).arg(*holder);
            }
            cmd.ignore();
        }
        pipe.cmd("ZREMRANGEBYSCORE")
            .arg(&self.channels.holders)
            .arg("-inf")
            .arg(now_ms() - 60_000)
            .ignore();
        pipe.cmd("PUBLISH")
            .arg(&self.channels.notices)
            .arg(format!("t{}:{until}", self.replica))
            .ignore();
        if let Err(reason) = self.run_pipe::<()>(pipe).await {
            tracing::debug!(error = %reason, "a latest-root lease tick failed");
        }
    }

    async fn run_pipe<T: redis::FromRedisValue>(&self, pipe: redis::Pipeline) -> Result<T, String> {
        let conn = crate::redis::checkout(&self.pool, self.timeout)
            .await
            .map_err(|e| e.to_string())?;
        let mut redis = conn.redis.clone();
        let outcome = tokio::time::timeout(self.timeout, pipe.query_async::<T>(&mut redis))
            .await
            .map_err(|_| crate::redis::Failure::TimedOut(self.timeout))
            .and_then(|r| r.map_err(crate::redis::Failure::Redis));
        conn.observe(&outcome);
        outcome.map_err(|e| e.to_string())
    }

    fn receive(&self, message: &redis::Msg) {
        let payload = message.get_payload_bytes();
        if message.get_channel_name() == self.channels.acks {
            self.acknowledged(payload);
        } else if let Some(tick) = payload.strip_prefix(b"t") {
            self.ticked(tick);
        } else if let Some(notice) = payload.strip_prefix(b"n") {
            match WatchLatestRootsResponse::decode(notice) {
                Ok(notice) => self.relay(notice),
                Err(e) => tracing::warn!(error = %e, "an unreadable latest-root notice; ignored"),
            }
        }
    }

    /// A tick came back: if it is this replica's, its lease goes to every holder.
    fn ticked(&self, tick: &[u8]) {
        let Some((replica, until)) = std::str::from_utf8(tick).ok().and_then(|t| {
            let (r, u) = t.split_once(':')?;
            Some((r.parse::<u64>().ok()?, u.parse::<i64>().ok()?))
        }) else {
            return;
        };
        if replica != self.replica {
            return;
        }
        self.lease.store(until, Ordering::Release);
        self.relay(WatchLatestRootsResponse {
            valid_until: Some(timestamp(until)),
            ..Default::default()
        });
    }

    /// Sends a message to every holder; one that cannot keep up is closed (and reads through).
    fn relay(&self, message: WatchLatestRootsResponse) {
        self.holders
            .lock()
            .retain(|holder, out| match out.try_send(Ok(message.clone())) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!(
                        holder,
                        "a latest-root copy fell behind its notices; its stream is closed"
                    );
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
    }

    fn acknowledged(&self, payload: &[u8]) {
        let Some((id, holder)) = std::str::from_utf8(payload).ok().and_then(|a| {
            let (i, h) = a.split_once(':')?;
            Some((i.parse::<u64>().ok()?, h.parse::<u64>().ok()?))
        }) else {
            return;
        };
        let mut waiters = self.waiters.lock();
        let Some(waiter) = waiters.get_mut(&id) else {
            return;
        };
        match &mut waiter.pending {
            None => {
                waiter.early.insert(holder);
            }
            Some(pending) => {
                if pending.remove(&holder).is_some() && pending.is_empty() {
                    waiter.answered.notify_one();
                }
            }
        }
    }

    /// Opens a holder's stream: `acks` are the holder's acknowledgements. UNAVAILABLE while
    /// this replica is not subscribed, or its lease cannot be recorded.
    pub async fn open(
        self: &Arc<Self>,
        mut acks: tonic::Streaming<merkle_proto::cache::v1::WatchLatestRootsRequest>,
    ) -> Result<mpsc::Receiver<Result<WatchLatestRootsResponse, Status>>, Status> {
        // The opening message first: a stream that cannot even send it is refused whole.
        match acks.message().await? {
            None => {
                return Err(Status::invalid_argument(
                    "the stream ended before its first message; send an empty WatchLatestRootsRequest to open it",
                ));
            }
            Some(first) if first.ack != 0 => {
                return Err(Status::invalid_argument(format!(
                    "ack: must be 0 in the first message (nothing was announced on this stream yet), not {}",
                    first.ack
                )));
            }
            Some(_) => {}
        }
        let lease = self.lease.load(Ordering::Acquire);
        if !self.subscribed.load(Ordering::Acquire) || lease <= now_ms() {
            return Err(Status::unavailable(
                "this Cache replica does not hear Redis' latest-root notices now; read through",
            ));
        }
        let holder = self.id();
        let (out, inbound) = mpsc::channel(HOLDER_BACKLOG);
        // Listed before its lease is recorded: a notice published once it is recorded reaches
        // it. Its first lease is the last tick's, which that tick recorded for every holder
        // listed then; this one's own record below is at least as long.
        self.holders.lock().insert(holder, out.clone());
        let mut pipe = redis::pipe();
        pipe.cmd("ZADD")
            .arg(&self.channels.holders)
            .arg("GT")
            .arg(now_ms() + LEASE.as_millis() as i64)
            .arg(holder)
            .ignore();
        if let Err(reason) = self.run_pipe::<()>(pipe).await {
            self.holders.lock().remove(&holder);
            return Err(Status::unavailable(format!(
                "cannot record this copy's lease in Redis: {reason}"
            )));
        }
        let _ = out
            .send(Ok(WatchLatestRootsResponse {
                valid_until: Some(timestamp(lease)),
                ..Default::default()
            }))
            .await;
        let this = self.clone();
        tokio::spawn(async move {
            while let Some(Ok(request)) = acks.next().await {
                if request.ack == 0 {
                    continue;
                }
                let mut pipe = redis::pipe();
                pipe.cmd("PUBLISH")
                    .arg(&this.channels.acks)
                    .arg(format!("{}:{holder}", request.ack))
                    .ignore();
                // A lost acknowledgement only makes the writer wait out this lease.
                let _ = this.run_pipe::<()>(pipe).await;
            }
            this.holders.lock().remove(&holder);
            let mut pipe = redis::pipe();
            pipe.cmd("ZREM")
                .arg(&this.channels.holders)
                .arg(holder)
                .ignore();
            let _ = this.run_pipe::<()>(pipe).await;
        });
        Ok(inbound)
    }

    /// Tells every holder of a copy that `change` happened, and returns once each has
    /// acknowledged it or its lease has ended. An error means the notice may not have
    /// reached them: the writer must wait out [`LEASE`] before relying on the change.
    pub async fn announce(&self, change: Change) -> Result<(), String> {
        if !self.subscribed.load(Ordering::Acquire) {
            return Err("this Cache replica cannot hear acknowledgements now".into());
        }
        let id = self.id();
        let answered = Arc::new(Notify::new());
        self.waiters.lock().insert(
            id,
            Waiter {
                pending: None,
                early: HashSet::new(),
                answered: answered.clone(),
            },
        );
        let outcome = self.publish(id, change, &answered).await;
        self.waiters.lock().remove(&id);
        outcome
    }

    async fn publish(&self, id: u64, change: Change, answered: &Notify) -> Result<(), String> {
        let notice = match change {
            Change::Keys(keys) => WatchLatestRootsResponse {
                id,
                keys,
                ..Default::default()
            },
            Change::All => WatchLatestRootsResponse {
                id,
                all: true,
                ..Default::default()
            },
        };
        let mut payload = b"n".to_vec();
        notice.encode(&mut payload).map_err(|e| e.to_string())?;
        let mut pipe = redis::pipe();
        pipe.cmd("ZRANGE")
            .arg(&self.channels.holders)
            .arg(now_ms())
            .arg("+inf")
            .arg("BYSCORE")
            .arg("WITHSCORES");
        pipe.cmd("PUBLISH")
            .arg(&self.channels.notices)
            .arg(payload)
            .ignore();
        // Scores are doubles in Redis; leases are whole milliseconds.
        let (holders,): (Vec<(u64, f64)>,) = self.run_pipe(pipe).await?;
        if holders.is_empty() {
            return Ok(());
        }
        {
            // Acknowledgements that came before the list count: they answer this id alone.
            let mut waiters = self.waiters.lock();
            let waiter = waiters.get_mut(&id).ok_or("the waiter vanished")?;
            let early = std::mem::take(&mut waiter.early);
            waiter.pending = Some(
                holders
                    .into_iter()
                    .filter(|(holder, _)| !early.contains(holder))
                    .map(|(holder, end)| (holder, end as i64))
                    .collect(),
            );
        }
        loop {
            let next_end = {
                let waiters = self.waiters.lock();
                let waiter = waiters.get(&id).ok_or("the waiter vanished")?;
                let now = now_ms();
                waiter
                    .pending
                    .iter()
                    .flat_map(|p| p.values())
                    .copied()
                    .filter(|&end| end > now)
                    .max()
            };
            let Some(end) = next_end else {
                return Ok(());
            };
            let left = Duration::from_millis((end - now_ms()).max(0) as u64);
            let _ = tokio::time::timeout(left, answered.notified()).await;
        }
    }
}

/// Unix time in milliseconds, the unit of leases (shared by every replica's clock).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn timestamp(unix_ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: unix_ms.div_euclid(1000),
        nanos: (unix_ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}
