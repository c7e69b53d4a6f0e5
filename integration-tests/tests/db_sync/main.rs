//! DbSync as its real binary on real PostgreSQL, with the real Cache service and Redis in
//! front: the write path (exact writes, concurrency, idempotency, corrupted uploads), reads
//! (cache-first, from each replica's own coherent copy, pages, directories, diffs and proofs equal to `merkle-core`'s), degradation
//! with Redis or the Cache service down, retention and garbage collection while a sync runs,
//! PostgreSQL restarting mid-sync, bad input, and the indexes behind every hot-path query.

mod activity;
mod degradation;
mod drift;
mod input;
mod read_replicas;
mod reading;
mod replicas;
mod retention;
mod support;
mod writing;
