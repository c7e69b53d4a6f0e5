//! Counters per namespace since the service started: what GetStats reports.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use merkle_proto::cache::v1::NamespaceStats;

use crate::keys::Namespace;

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    sets: AtomicU64,
    deletes: AtomicU64,
    errors: AtomicU64,
    skipped: AtomicU64,
}

/// One set of counters per namespace.
#[derive(Default)]
pub struct Stats {
    namespaces: [Counters; 5],
}

/// What one operation did, for counting.
#[derive(Debug, Clone, Copy)]
pub enum Event {
    Hits(u64),
    Misses(u64),
    Sets(u64),
    Deletes(u64),
    /// Redis failed or did not answer in time.
    Error,
    /// Not tried: the circuit breaker is open.
    Skipped,
}

impl Stats {
    pub fn count(&self, ns: Namespace, event: Event) {
        let c = &self.namespaces[ns.index()];
        match event {
            Event::Hits(n) => c.hits.fetch_add(n, Relaxed),
            Event::Misses(n) => c.misses.fetch_add(n, Relaxed),
            Event::Sets(n) => c.sets.fetch_add(n, Relaxed),
            Event::Deletes(n) => c.deletes.fetch_add(n, Relaxed),
            Event::Error => c.errors.fetch_add(1, Relaxed),
            Event::Skipped => c.skipped.fetch_add(1, Relaxed),
        };
    }

    pub fn snapshot(&self) -> Vec<NamespaceStats> {
        Namespace::ALL
            .into_iter()
            .map(|ns| {
                let c = &self.namespaces[ns.index()];
                let hits = c.hits.load(Relaxed);
                let misses = c.misses.load(Relaxed);
                let reads = hits + misses;
                NamespaceStats {
                    namespace: ns.to_proto() as i32,
                    hits,
                    misses,
                    hit_rate: if reads == 0 {
                        0.0
                    } else {
                        hits as f64 / reads as f64
                    },
                    sets: c.sets.load(Relaxed),
                    deletes: c.deletes.load(Relaxed),
                    errors: c.errors.load(Relaxed),
                    skipped: c.skipped.load(Relaxed),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_namespace_with_hit_rate() {
        let stats = Stats::default();
        stats.count(Namespace::TreeMeta, Event::Hits(3));
        stats.count(Namespace::TreeMeta, Event::Misses(1));
        stats.count(Namespace::TreeMeta, Event::Sets(2));
        stats.count(Namespace::LatestRoot, Event::Skipped);
        let snapshot = stats.snapshot();
        let tree = &snapshot[Namespace::TreeMeta.index()];
        assert_eq!((tree.hits, tree.misses, tree.sets), (3, 1, 2));
        assert!((tree.hit_rate - 0.75).abs() < 1e-9);
        let latest = &snapshot[Namespace::LatestRoot.index()];
        assert_eq!((latest.skipped, latest.hit_rate), (1, 0.0));
    }
}
