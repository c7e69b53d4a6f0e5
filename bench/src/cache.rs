//! The Cache benchmark: the release Cache service on its own redis-server, measured from a
//! client beside `redis-benchmark` (the same Redis) and the bare tonic echo, all in one run.
//!
//! Targets: a `Get` of a present key with one client within 1.5x of the echo's p50 plus
//! redis-benchmark's p50; at 32 clients at least 60% of the echo's calls/s with the default
//! sampler (the hot-path issue; each Get row also with `OTEL_TRACES_SAMPLER=always_off`);
//! `GetMany` of 100 keys under 3x one `Get`; with Redis stopped and the breaker open, a `Get`
//! (a miss) under 5 ms p99. And the service's Redis pool (bb8 with bb8-redis) beside the
//! multiplexed connections it replaced, GETs from this process, in alternating rounds. And the
//! same service on a Redis Cluster of six real nodes (three masters, three replicas): `Get`
//! and `GetMany` beside the standalone rows of the same run.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use crate::rpc::Channel;
use merkle_proto::cache::v1::{
    CircuitState, Entry, GetManyRequest, GetRequest, GetStatusRequest, Namespace, SetManyRequest,
    cache_service_client::CacheServiceClient,
};
use merklectl::stack::{self, Redis, RedisCluster};
use tonic_health::pb::health_client::HealthClient;

use crate::rpc::{self, Load, Row};

/// Options of `merkle-bench cache`.
#[derive(Debug, clap::Args)]
pub struct CacheBenchArgs {
    /// Seconds each measurement runs (the echo and Get rows: in rounds that add up to it).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent clients of the throughput rows.
    #[arg(long, default_value_t = 32)]
    clients: usize,
}

const VALUE_BYTES: usize = 64;
/// Alternating rounds of the echo and the Get rows.
const ROUNDS: u32 = 5;

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

/// Writes the benchmark's 100 keys through the Cache service at `uri`.
async fn fill(work: &std::path::Path, uri: &str) -> anyhow::Result<()> {
    let entries = (0..100)
        .map(|i| Entry {
            key: format!("bench-{i}"),
            found: true,
            value: vec![b'v'; VALUE_BYTES],
        })
        .collect();
    // TREE_META is DbSync's namespace: only its identity may write it.
    let stored = CacheServiceClient::new(rpc::channel_as(work, uri, "db-sync")?)
        .set_many(SetManyRequest {
            namespace: Namespace::TreeMeta as i32,
            entries,
            ttl: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
        })
        .await?
        .into_inner()
        .stored;
    anyhow::ensure!(stored == 100, "SetMany stored {stored} of 100");
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
    fill(work.path(), &uri).await?;

    // The same service with the tracer's sampler off, on the same Redis.
    let quiet = rpc::start_service(
        work.path(),
        "cache",
        &[
            ("REDIS_URL", redis.url()),
            ("OTEL_TRACES_SAMPLER", "always_off".into()),
        ],
    )
    .await?;
    let quiet_uri = quiet.uri.clone();
    let connect_quiet = || rpc::channel(&quiet_uri).map(CacheServiceClient::new);

    // The same service on one runtime worker thread: on two cores shared with the callers,
    // fewer hand-offs between threads per call against less parallelism.
    let single = rpc::start_service(
        work.path(),
        "cache",
        &[
            ("REDIS_URL", redis.url()),
            ("TOKIO_WORKER_THREADS", "1".into()),
        ],
    )
    .await?;
    let single_uri = single.uri.clone();
    let connect_single = || rpc::channel(&single_uri).map(CacheServiceClient::new);

    // The same service on a Redis Cluster of three masters and three replicas.
    let ports = [(); 6].map(|()| stack::free_port().unwrap_or_default());
    let bus_ports = [(); 6].map(|()| stack::free_port().unwrap_or_default());
    let cluster = RedisCluster::start(&work.path().join("cluster"), ports, bus_ports).await?;
    let clustered = rpc::start_service(
        work.path(),
        "cache",
        &[("REDIS_CLUSTER_NODES", cluster.urls())],
    )
    .await?;
    let clustered_uri = clustered.uri.clone();
    let connect_clustered = || rpc::channel(&clustered_uri).map(CacheServiceClient::new);
    fill(work.path(), &clustered_uri).await?;

    let echo = rpc::start_echo(work.path(), None).await?;
    let connect_echo = || rpc::channel(&echo.uri).map(HealthClient::new);
    eprintln!("measuring (about {} s) ...", 17 * args.seconds + 15);

    let redis_pid = redis.pid().unwrap_or_default();
    rpc::reset_peak_rss(redis_pid)?;
    let redis_1 = rpc::redis_benchmark(redis.port(), 1, 20_000)?;
    let redis_n = Load {
        peak_rss: Some(rpc::peak_rss(redis_pid)?),
        ..rpc::redis_benchmark(redis.port(), args.clients, 200_000)?
    };
    // The echo and the Get paths in alternating rounds, so that this machine's drifts in speed
    // fall on all alike; each is reported by its median round.
    let get = |c| get_key(c, true);
    let round = duration / ROUNDS;
    let mut rounds: [Vec<Load>; 10] = Default::default();
    for _ in 0..ROUNDS {
        for (i, clients) in [(0, 1), (5, args.clients)] {
            let echo_run = rpc::measure(clients, round, connect_echo, rpc::echo_call);
            rounds[i].push(rpc::on(echo.pid, echo_run).await?);
            let get_run = rpc::measure(clients, round, connect_cache, get);
            rounds[i + 1].push(rpc::on(cache.pid, get_run).await?);
            let quiet_run = rpc::measure(clients, round, connect_quiet, get);
            rounds[i + 2].push(rpc::on(quiet.pid, quiet_run).await?);
            let cluster_run = rpc::measure(clients, round, connect_clustered, get);
            rounds[i + 3].push(rpc::on(clustered.pid, cluster_run).await?);
            let single_run = rpc::measure(clients, round, connect_single, get);
            rounds[i + 4].push(rpc::on(single.pid, single_run).await?);
        }
    }
    // The 32-client target by round (each Get round beside the echo round just before it), so
    // that a drift of the machine between rounds does not pass for a difference.
    let by_round = |get: &[Load], echo: &[Load]| {
        let mut ratios: Vec<f64> = get
            .iter()
            .zip(echo)
            .map(|(g, e)| g.calls_per_sec / e.calls_per_sec)
            .collect();
        ratios.sort_by(f64::total_cmp);
        (
            ratios[ratios.len() / 2],
            ratios[0],
            ratios[ratios.len() - 1],
        )
    };
    let (share_n, share_low, share_high) = by_round(&rounds[6], &rounds[5]);
    let (share_quiet, _, _) = by_round(&rounds[7], &rounds[5]);
    let [
        echo_1,
        get_1,
        get_1_quiet,
        get_1_cluster,
        get_1_single,
        echo_n,
        get_n,
        get_n_quiet,
        get_n_cluster,
        get_n_single,
    ] = rounds.map(rpc::median);
    let many_1 = rpc::on(
        cache.pid,
        rpc::measure(1, duration, connect_cache, get_hundred),
    )
    .await?;
    // 100 keys in about 100 slots over three masters: one MGET split by slot.
    let many_1_cluster = rpc::on(
        clustered.pid,
        rpc::measure(1, duration, connect_clustered, get_hundred),
    )
    .await?;
    drop(cluster);
    let (pooled, multiplexed) = pools(&redis, args.clients, duration).await?;

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
                "Get, {} clients, default sampler: >= 60% of the echo's calls/s, median of {ROUNDS} rounds each beside its echo round (is {:.0}%, rounds {:.0}-{:.0}%; {:.0}% with the sampler off)",
                args.clients,
                100.0 * share_n,
                100.0 * share_low,
                100.0 * share_high,
                100.0 * share_quiet
            ),
            share_n >= 0.6,
        ),
        (
            format!(
                "Redis GET through the bb8 pool, {} tasks: no slower than the multiplexed connections it replaced, within 10% (is {:.0}% of their calls/s)",
                args.clients,
                100.0 * pooled.calls_per_sec / multiplexed.calls_per_sec
            ),
            pooled.calls_per_sec >= 0.9 * multiplexed.calls_per_sec,
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
        row("Cache Get, OTEL_TRACES_SAMPLER=always_off", get_1_quiet),
        row("Cache Get", get_n),
        row("Cache Get, OTEL_TRACES_SAMPLER=always_off", get_n_quiet),
        row(
            "Cache Get, one runtime worker thread (TOKIO_WORKER_THREADS=1)",
            get_1_single,
        ),
        row(
            "Cache Get, one runtime worker thread (TOKIO_WORKER_THREADS=1)",
            get_n_single,
        ),
        row(
            "Redis GET from this process: bb8 pool of 4 bb8-redis connections (the service's default)",
            pooled,
        ),
        row(
            "Redis GET from this process: 4 multiplexed ConnectionManagers, round-robin (the old design)",
            multiplexed,
        ),
        row(
            "Cache Get on a Redis Cluster (3 masters, 3 replicas)",
            get_1_cluster,
        ),
        row("Cache Get on the Redis Cluster", get_n_cluster),
        row("Cache GetMany, 100 keys", many_1),
        row(
            "Cache GetMany, 100 keys on the Redis Cluster (spread over 3 masters)",
            many_1_cluster,
        ),
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

/// The Cache service's Redis pool (bb8 with bb8-redis, as the service builds it) beside the
/// design it replaced (four multiplexed `ConnectionManager`s used round-robin), `clients` tasks
/// of GETs each, in alternating rounds; each reported by its median round.
async fn pools(redis: &Redis, clients: usize, duration: Duration) -> anyhow::Result<(Load, Load)> {
    const ROUNDS: u32 = 3;
    let timeout = Duration::from_secs(1);
    let args = merkle_cache::redis::RedisArgs {
        redis_url: Some(redis.url()),
        redis_cluster_nodes: Vec::new(),
        redis_pool_size: 4,
        redis_timeout: timeout,
        redis_wait_replicas: None,
        redis_ca_file: None,
    };
    let pool = merkle_cache::redis::pool(&args).map_err(|e| anyhow::anyhow!("{e}"))?;
    let client = redis::Client::open(redis.url())?;
    let mut managers = Vec::new();
    for _ in 0..4 {
        managers.push(redis::aio::ConnectionManager::new(client.clone()).await?);
    }
    let managers = Arc::new((managers, AtomicUsize::new(0)));
    let key = "bench-redis-key";
    let mut conn = client.get_multiplexed_async_connection().await?;
    redis::cmd("SET")
        .arg(key)
        .arg(vec![b'v'; VALUE_BYTES])
        .query_async::<()>(&mut conn)
        .await?;
    let pooled_get = move |pool: merkle_cache::redis::RedisPool| async move {
        let conn = merkle_cache::redis::checkout(&pool, timeout)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut redis = conn.redis.clone();
        let outcome = redis::cmd("GET")
            .arg(key)
            .query_async::<Option<Vec<u8>>>(&mut redis)
            .await
            .map_err(merkle_cache::redis::Failure::Redis);
        conn.observe(&outcome);
        anyhow::ensure!(outcome?.is_some(), "GET missed");
        anyhow::Ok(())
    };
    let multiplexed_get = move |m: Arc<(Vec<redis::aio::ConnectionManager>, AtomicUsize)>| async move {
        let i = m.1.fetch_add(1, Ordering::Relaxed) % m.0.len();
        let mut conn = m.0[i].clone();
        let found = redis::cmd("GET")
            .arg(key)
            .query_async::<Option<Vec<u8>>>(&mut conn)
            .await?;
        anyhow::ensure!(found.is_some(), "GET missed");
        anyhow::Ok(())
    };
    let round = duration / ROUNDS;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let p = pool.clone();
        a.push(rpc::measure(clients, round, move || Ok(p.clone()), pooled_get).await?);
        let m = managers.clone();
        b.push(rpc::measure(clients, round, move || Ok(m.clone()), multiplexed_get).await?);
    }
    Ok((rpc::median(a), rpc::median(b)))
}
