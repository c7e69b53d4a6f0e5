//! The Cache benchmark: the release Cache service on its own redis-server, measured from a
//! client beside `redis-benchmark` (the same Redis) and the bare tonic echo, all in one run.
//!
//! Targets (the Cache issue): a `Get` of a present key with one client within 1.5x of the echo's
//! p50 plus redis-benchmark's p50; at 32 clients at least half the echo's calls/s; `GetMany` of
//! 100 keys under 3x one `Get`; with Redis stopped and the breaker open, a `Get` (a miss) under
//! 5 ms p99.

use std::time::Duration;

use crate::rpc::Channel;
use merkle_proto::cache::v1::{
    CircuitState, Entry, GetManyRequest, GetRequest, GetStatusRequest, Namespace, SetManyRequest,
    cache_service_client::CacheServiceClient,
};
use merklectl::stack::{self, Redis};
use tonic_health::pb::health_client::HealthClient;

use crate::rpc::{self, Load, Row};

/// Options of `merkle-bench cache`.
#[derive(Debug, clap::Args)]
pub struct CacheBenchArgs {
    /// Seconds each measurement runs.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Concurrent clients of the throughput rows.
    #[arg(long, default_value_t = 32)]
    clients: usize,
}

const VALUE_BYTES: usize = 64;

type Cache = CacheServiceClient<Channel>;

/// One `Get` of the benchmark's key; `present` says whether it must be found.
async fn get_key(mut c: Cache, present: bool) -> anyhow::Result<()> {
    let answer = c
        .get(GetRequest {
            namespace: Namespace::TreeMeta as i32,
            key: "bench-0".into(),
        })
        .await?
        .into_inner();
    anyhow::ensure!(
        answer.found == present && (!present || answer.value.len() == VALUE_BYTES),
        "Get found {}, expected {present}",
        answer.found
    );
    Ok(())
}

async fn get_hundred(mut c: Cache) -> anyhow::Result<()> {
    let keys = (0..100).map(|i| format!("bench-{i}")).collect();
    let answer = c
        .get_many(GetManyRequest {
            namespace: Namespace::TreeMeta as i32,
            keys,
        })
        .await?
        .into_inner();
    anyhow::ensure!(answer.entries.iter().all(|e| e.found), "GetMany missed");
    Ok(())
}

/// Runs the benchmark and prints its table.
pub fn run(args: CacheBenchArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: CacheBenchArgs) -> anyhow::Result<()> {
    let work = tempfile::Builder::new()
        .prefix("merkle-bench-cache-")
        .tempdir()?;
    let duration = Duration::from_secs(args.seconds);
    let mut redis = Redis::start(&work.path().join("redis"), stack::free_port()?).await?;
    let cache = rpc::start_service(work.path(), "cache", &[("REDIS_URL", redis.url())]).await?;
    let uri = cache.uri.clone();
    let connect_cache = || rpc::channel(&uri).map(CacheServiceClient::new);
    let entries = (0..100)
        .map(|i| Entry {
            key: format!("bench-{i}"),
            found: true,
            value: vec![b'v'; VALUE_BYTES],
        })
        .collect();
    connect_cache()?
        .set_many(SetManyRequest {
            namespace: Namespace::TreeMeta as i32,
            entries,
            ttl: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
        })
        .await?;

    let echo = rpc::start_echo(work.path(), None).await?;
    let connect_echo = || rpc::channel(&echo.uri).map(HealthClient::new);
    eprintln!("measuring (about {} s) ...", 8 * args.seconds + 15);

    let echo_1 = rpc::measure(1, duration, connect_echo, rpc::echo_call).await?;
    let echo_n = rpc::measure(args.clients, duration, connect_echo, rpc::echo_call).await?;
    let redis_1 = rpc::redis_benchmark(redis.port(), 1, 20_000)?;
    let redis_n = rpc::redis_benchmark(redis.port(), args.clients, 200_000)?;
    let get_1 = rpc::measure(1, duration, connect_cache, |c| get_key(c, true)).await?;
    let get_n = rpc::measure(args.clients, duration, connect_cache, |c| get_key(c, true)).await?;
    let many_1 = rpc::measure(1, duration, connect_cache, get_hundred).await?;

    // Redis stopped: wait until the breaker is open, then time the misses.
    redis.stop();
    let mut status_client = connect_cache()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let _ = get_key(connect_cache()?, false).await;
        let status = status_client
            .get_status(GetStatusRequest {})
            .await?
            .into_inner();
        if status.circuit_state == CircuitState::Open as i32 {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the breaker did not open"
        );
    }
    // Within the breaker's 5 s cooldown, so no probe falls into the window.
    let down = rpc::measure(1, Duration::from_secs(2), connect_cache, |c| {
        get_key(c, false)
    })
    .await?;

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let floor = echo_1.p50 + redis_1.p50;
    let targets = vec![
        (
            format!(
                "Get, 1 client: p50 <= 1.5 x (echo p50 + redis-benchmark p50) = {:.3} ms (is {:.3} ms, {:.2}x)",
                ms(floor) * 1.5,
                ms(get_1.p50),
                get_1.p50.as_secs_f64() / floor.as_secs_f64()
            ),
            get_1.p50.as_secs_f64() <= 1.5 * floor.as_secs_f64(),
        ),
        (
            format!(
                "Get, {} clients: >= 50% of the echo's calls/s (is {:.0}%)",
                args.clients,
                100.0 * get_n.calls_per_sec / echo_n.calls_per_sec
            ),
            get_n.calls_per_sec >= 0.5 * echo_n.calls_per_sec,
        ),
        (
            format!(
                "GetMany of 100 keys: p50 < 3x one Get (is {:.2}x)",
                many_1.p50.as_secs_f64() / get_1.p50.as_secs_f64()
            ),
            many_1.p50 < get_1.p50 * 3,
        ),
        (
            format!(
                "Redis stopped, breaker open: Get p99 < 5 ms (is {:.3} ms)",
                ms(down.p99)
            ),
            down.p99 < Duration::from_millis(5),
        ),
    ];
    let row = |what: &str, load: Load| Row {
        what: what.to_owned(),
        load,
    };
    let rows = vec![
        row("bare tonic echo (Health/Check, no storage)", echo_1),
        row("bare tonic echo", echo_n),
        row("redis-benchmark GET (64-byte values)", redis_1),
        row("redis-benchmark GET", redis_n),
        row("Cache Get, present key (64 bytes)", get_1),
        row("Cache Get", get_n),
        row("Cache GetMany, 100 keys", many_1),
        row("Cache Get, Redis stopped, breaker open (a miss)", down),
    ];
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    rpc::print(
        &format!(
            "merkle-bench cache: {cores} cores, {} s per row, client and servers on this machine",
            args.seconds
        ),
        &rows,
        &targets,
    );
    Ok(())
}
