//! A copy of the latest snapshot of each source in this process, so that a read of a latest
//! root costs one hop (the caller's), not three. It is kept coherent by the Cache service's
//! `WatchLatestRoots` stream: every change of a latest root, written through any DbSync
//! replica, is applied here before the write that made it returns.
//!
//! Readers only: whether a sync stores is decided from PostgreSQL, never from this copy.
//! The copy is served only while its lease from the Cache service runs (minus a margin for
//! clock skew); a lease that lapsed, a stream that ended or failed, each drops the whole copy,
//! and reads go through the cache to PostgreSQL until a new stream is open. A value read
//! while a change was being applied is not kept (an epoch counts the changes).

use parking_lot::Mutex;
use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use merkle_proto::{
    cache::v1::{WatchLatestRootsRequest, WatchLatestRootsResponse},
    dbsync::v1 as pb,
};
use merkle_shared::{cache::CacheClient, shutdown::Shutdown};
use tokio::sync::mpsc;

/// Taken off every lease: the clocks of the Cache replicas and this one may differ this much.
const CLOCK_MARGIN_MS: i64 = 100;

/// The copy; shared by the readers and the task that follows the stream.
pub struct LatestCopy {
    entries: quick_cache::sync::Cache<String, pb::Snapshot>,
    /// Bumped by every change applied and every loss.
    epoch: AtomicU64,
    /// Unix ms until which the copy may be served; 0 while there is no stream.
    valid_until: AtomicI64,
    /// Orders keeping a read value against applying a change.
    changing: Mutex<()>,
    hits: AtomicU64,
    dropped: AtomicU64,
}

impl LatestCopy {
    /// A copy of at most `capacity` sources (the least recently used go first).
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(LatestCopy {
            entries: quick_cache::sync::Cache::new(capacity.max(1)),
            epoch: AtomicU64::new(0),
            valid_until: AtomicI64::new(0),
            changing: Mutex::new(()),
            hits: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        })
    }

    fn live(&self) -> bool {
        now_ms() < self.valid_until.load(Ordering::Acquire)
    }

    /// The latest snapshot of `source`, when the copy holds it and may be served.
    pub fn get(&self, source: &str) -> Option<pb::Snapshot> {
        if !self.live() {
            return None;
        }
        let found = self.entries.get(source);
        if found.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    /// The epoch to pass to [`LatestCopy::offer`] with a value read after this call.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Keeps `snapshot`, read after [`LatestCopy::epoch`] returned `epoch`, unless a change was
    /// applied since (it may be older than that change) or the copy is not live.
    pub fn offer(&self, source: &str, snapshot: &pb::Snapshot, epoch: u64) {
        let _changing = self.changing.lock();
        if self.epoch.load(Ordering::Acquire) == epoch && self.live() {
            self.entries.insert(source.to_owned(), snapshot.clone());
        }
    }

    /// Drops `source` before this process writes its latest root.
    pub fn forget(&self, source: &str) {
        let _changing = self.changing.lock();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.entries.remove(source);
    }

    /// Applies one message of the stream: a lease, a change, or both.
    fn apply(&self, message: &WatchLatestRootsResponse) {
        let _changing = self.changing.lock();
        if !self.live() && !self.entries.is_empty() {
            // The lease lapsed: changes may have been missed meanwhile.
            self.epoch.fetch_add(1, Ordering::AcqRel);
            self.entries.clear();
        }
        if message.id != 0 {
            self.epoch.fetch_add(1, Ordering::AcqRel);
            if message.all {
                self.entries.clear();
            } else {
                for key in &message.keys {
                    self.entries.remove(key.as_str());
                }
            }
        }
        if let Some(until) = &message.valid_until {
            let until = until.seconds * 1000 + i64::from(until.nanos) / 1_000_000;
            self.valid_until
                .store(until - CLOCK_MARGIN_MS, Ordering::Release);
        }
    }

    /// The stream is gone: nothing in the copy may be served any more.
    fn drop_all(&self) {
        let _changing = self.changing.lock();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.valid_until.store(0, Ordering::Release);
        if !self.entries.is_empty() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        self.entries.clear();
    }

    /// Reports the copy as metrics, read when they are collected: `merkle.latest_copy.hits`,
    /// `.dropped` (times it was dropped whole: a stream lost, a lease lapsed) and `.entries`.
    pub fn observe(self: &Arc<Self>) {
        let meter = merkle_shared::metrics::meter();
        let copy = self.clone();
        meter
            .u64_observable_counter("merkle.latest_copy.hits")
            .with_description(
                "GetLatestRoot reads answered from DbSync's own copy (x-cache: LOCAL)",
            )
            .with_callback(move |o| o.observe(copy.hits.load(Ordering::Relaxed), &[]))
            .build();
        let copy = self.clone();
        meter
            .u64_observable_counter("merkle.latest_copy.dropped")
            .with_description("Times the copy of the latest roots was dropped whole (its stream ended or its lease lapsed)")
            .with_callback(move |o| o.observe(copy.dropped.load(Ordering::Relaxed), &[]))
            .build();
        let copy = self.clone();
        meter
            .u64_observable_gauge("merkle.latest_copy.entries")
            .with_description("Sources whose latest snapshot is in DbSync's copy")
            .with_callback(move |o| o.observe(copy.entries.len() as u64, &[]))
            .build();
    }
}

/// Follows the Cache service's stream until `shutdown`, reopening it after a loss (the copy
/// is dropped meanwhile).
pub async fn follow(copy: Arc<LatestCopy>, cache: CacheClient, mut shutdown: Shutdown) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let (acks, outbound) = mpsc::unbounded_channel();
        let _ = acks.send(WatchLatestRootsRequest { ack: 0 });
        let opened = tokio::select! {
            opened = cache.watch_latest_roots(
                tokio_stream::wrappers::UnboundedReceiverStream::new(outbound),
            ) => opened,
            () = shutdown.wait() => return,
        };
        match opened {
            Ok(mut stream) => {
                tracing::debug!("following the latest-root notices");
                loop {
                    let message = tokio::select! {
                        message = stream.message() => message,
                        () = shutdown.wait() => {
                            copy.drop_all();
                            return;
                        }
                    };
                    match message {
                        Ok(Some(message)) => {
                            copy.apply(&message);
                            backoff = Duration::from_millis(100);
                            if message.id != 0 {
                                let _ = acks.send(WatchLatestRootsRequest { ack: message.id });
                            }
                        }
                        Ok(None) => break,
                        Err(status) => {
                            tracing::debug!(code = ?status.code(), message = status.message(), "the latest-root notices stopped");
                            break;
                        }
                    }
                }
            }
            Err(status) => {
                tracing::debug!(code = ?status.code(), message = status.message(), "cannot follow the latest-root notices yet");
            }
        }
        copy.drop_all();
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = shutdown.wait() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(sequence: u64) -> pb::Snapshot {
        pb::Snapshot {
            sequence,
            ..Default::default()
        }
    }

    fn lease(copy: &LatestCopy, ms: i64) {
        copy.apply(&WatchLatestRootsResponse {
            valid_until: Some(prost_types::Timestamp {
                seconds: (now_ms() + ms) / 1000,
                nanos: (((now_ms() + ms) % 1000) * 1_000_000) as i32,
            }),
            ..Default::default()
        });
    }

    #[test]
    fn nothing_is_served_without_a_lease() {
        let copy = LatestCopy::new(10);
        copy.offer("docs", &snapshot(1), copy.epoch());
        assert!(copy.get("docs").is_none(), "not live: not even kept");
        lease(&copy, 500);
        copy.offer("docs", &snapshot(1), copy.epoch());
        assert_eq!(copy.get("docs").map(|s| s.sequence), Some(1));
        copy.drop_all();
        assert!(copy.get("docs").is_none());
        lease(&copy, 500);
        assert!(copy.get("docs").is_none(), "a new stream starts empty");
    }

    #[test]
    fn a_value_read_across_a_change_is_not_kept() {
        let copy = LatestCopy::new(10);
        lease(&copy, 500);
        let before = copy.epoch();
        copy.apply(&WatchLatestRootsResponse {
            id: 7,
            keys: vec!["docs".into()],
            ..Default::default()
        });
        copy.offer("docs", &snapshot(1), before);
        assert!(copy.get("docs").is_none());
        copy.offer("docs", &snapshot(2), copy.epoch());
        assert_eq!(copy.get("docs").map(|s| s.sequence), Some(2));
    }

    #[test]
    fn a_notice_drops_its_keys_or_everything() {
        let copy = LatestCopy::new(10);
        lease(&copy, 500);
        for name in ["a", "b", "c"] {
            copy.offer(name, &snapshot(1), copy.epoch());
        }
        copy.apply(&WatchLatestRootsResponse {
            id: 1,
            keys: vec!["a".into()],
            ..Default::default()
        });
        assert!(copy.get("a").is_none());
        assert!(copy.get("b").is_some());
        copy.apply(&WatchLatestRootsResponse {
            id: 2,
            all: true,
            ..Default::default()
        });
        assert!(copy.get("b").is_none() && copy.get("c").is_none());
    }

    #[test]
    fn a_lapsed_lease_drops_the_copy_even_when_renewed() {
        let copy = LatestCopy::new(10);
        // Valid for a moment only (the margin eats 100 ms of it).
        lease(&copy, CLOCK_MARGIN_MS + 30);
        copy.offer("docs", &snapshot(1), copy.epoch());
        assert!(copy.get("docs").is_some());
        std::thread::sleep(Duration::from_millis(60));
        assert!(copy.get("docs").is_none(), "lapsed");
        lease(&copy, 500);
        assert!(
            copy.get("docs").is_none(),
            "changes may have been missed while it lapsed"
        );
    }

    #[test]
    fn the_copy_is_bounded() {
        let copy = LatestCopy::new(100);
        lease(&copy, 5000);
        for i in 0..10_000 {
            copy.offer(&format!("s{i}"), &snapshot(i), copy.epoch());
        }
        assert!(copy.entries.len() <= 100, "{}", copy.entries.len());
    }
}
