//! The Cache service as its real binary on a real redis-server: namespaces and TTLs, the key
//! layout, invalidation, statistics, compression, bad input, the circuit breaker through Redis
//! outages, the connection pool, warm-up, the shared typed client, and `merklectl cache`.

mod cluster;
mod degradation;
mod invalidation;
mod pool;
mod shared_client;
mod support;
mod values;
