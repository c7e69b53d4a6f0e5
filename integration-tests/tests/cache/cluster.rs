//! On a Redis Cluster: a master killed and its replica promoted by the cluster. The Cache keeps
//! answering (misses at worst while the slots move), follows the redirects, reports the
//! cluster's state in its health, and never serves a latest root older than one it confirmed.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use integration_tests::{RedisKind, ServingStatus, TestStack};
use merkle_proto::cache::v1::{GetRequest, Namespace, SetRequest};

use super::support::*;

/// Writes `docs` = 1, 2, 3, ... through the Cache; `confirmed` is the highest one the Cache
/// reported stored.
async fn write_counter(mut c: Clients, confirmed: Arc<AtomicU64>, stop: Arc<AtomicBool>) {
    let mut next = confirmed.load(Ordering::SeqCst) + 1;
    while !stop.load(Ordering::SeqCst) {
        let stored = c
            .owner(Namespace::LatestRoot)
            .set(SetRequest {
                namespace: Namespace::LatestRoot as i32,
                key: "docs".into(),
                value: next.to_string().into_bytes(),
                ttl: None,
                if_absent: false,
            })
            .await
            .expect("Set answers, stored or not")
            .into_inner()
            .stored;
        if stored {
            confirmed.fetch_max(next, Ordering::SeqCst);
        }
        next += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads `docs` until `stop`: every value found is at least the one confirmed before the
/// read began. Returns (reads, found).
async fn read_counter(
    mut c: Clients,
    confirmed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> (u32, u32) {
    let (mut reads, mut found) = (0, 0);
    while !stop.load(Ordering::SeqCst) {
        let before = confirmed.load(Ordering::SeqCst);
        let answer = c
            .get(GetRequest {
                namespace: Namespace::LatestRoot as i32,
                key: "docs".into(),
            })
            .await
            .expect("Get answers, found or not")
            .into_inner();
        reads += 1;
        if answer.found {
            found += 1;
            let value: u64 = String::from_utf8(answer.value)
                .expect("utf-8")
                .parse()
                .expect("a counter");
            assert!(
                value >= before,
                "an older latest root came back: {value}, after {before} was confirmed"
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (reads, found)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_master_is_failed_over_and_no_older_latest_root_comes_back() {
    let mut stack = TestStack::new();
    let c = start_cache_on(&mut stack, RedisKind::Cluster, &[]).await;
    let confirmed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_counter(c.clone(), confirmed.clone(), stop.clone()));
    let reader = tokio::spawn(read_counter(c.clone(), confirmed.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before_kill = confirmed.load(Ordering::SeqCst);
    assert!(
        before_kill > 0,
        "writes are confirmed while the cluster is whole"
    );

    let cluster = stack.redis_cluster.as_mut().expect("cluster");
    let victim = cluster
        .master_of("merkle:v2:latest_root:docs")
        .expect("a master serves the key");
    let victim_port = cluster.nodes()[victim].port();
    cluster.nodes_mut()[victim].kill();
    let killed = Instant::now();

    // The cluster promotes the replica; the Cache answers throughout and serves again.
    let cache = stack.service("cache");
    cache.wait_for(ServingStatus::NotServing).await;
    stack
        .redis_cluster
        .as_ref()
        .expect("cluster")
        .wait_ok(Duration::from_secs(30))
        .await
        .expect("the cluster promotes the replica");
    stack
        .service("cache")
        .wait_for(ServingStatus::Serving)
        .await;
    let promoted = stack
        .redis_cluster
        .as_ref()
        .expect("cluster")
        .master_of("merkle:v2:latest_root:docs")
        .expect("a master serves the key again");
    assert_ne!(
        stack.redis_cluster.as_ref().expect("cluster").nodes()[promoted].port(),
        victim_port,
        "the replica took over"
    );
    let at_promotion = confirmed.load(Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(20);
    while confirmed.load(Ordering::SeqCst) <= at_promotion {
        assert!(
            Instant::now() < deadline,
            "writes are confirmed again after the failover"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    writer.await.expect("writer");
    let (reads, found) = reader.await.expect("no older root was read");
    assert!(
        found > 0 && reads > found / 2,
        "{found} of {reads} reads found a value"
    );
    println!(
        "failover: {reads} reads, {found} found, {} writes confirmed, serving again {:?} after the kill",
        confirmed.load(Ordering::SeqCst),
        killed.elapsed()
    );

    // Every slot is served again: keys on every master are written and read.
    let mut c = c;
    for i in 0..30 {
        let key = format!("k{i}");
        assert!(
            set(&mut c, Namespace::TreeMeta, &key, b"v").await,
            "{key} written"
        );
        assert_eq!(
            get(&mut c, Namespace::TreeMeta, &key).await.as_deref(),
            Some(&b"v"[..])
        );
    }
}

/// The Cache binary's exit code and stderr, started with `env` and the harness's identities.
fn cache_exits_with(env: &[(&str, String)]) -> (Option<i32>, String) {
    let identities = integration_tests::credentials().identities_file();
    let out = std::process::Command::new(integration_tests::binary("merkle-cache"))
        .env_remove("REDIS_URL")
        .env_remove("REDIS_CLUSTER_NODES")
        .env("AUTH_IDENTITIES_FILE", identities)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run merkle-cache");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redis_of_the_wrong_kind_is_refused_at_start_naming_the_variable() {
    let mut stack = TestStack::new();
    stack.start_redis().await;
    stack.start_redis_cluster().await;
    let server = stack.redis.as_ref().expect("redis").url();
    let cluster = stack.redis_cluster.as_ref().expect("cluster").urls();
    let first_node = cluster.split(',').next().expect("a node").to_owned();

    // Found once Redis answers, so the refusal is logged after the start line.
    let refused = |stderr: &str, variable: &str, rule: &str| {
        stderr.lines().any(|l| {
            l.contains("invalid configuration") && l.contains(variable) && l.contains(rule)
        })
    };
    let (code, stderr) = cache_exits_with(&[("REDIS_CLUSTER_NODES", server.clone())]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        refused(
            &stderr,
            "REDIS_CLUSTER_NODES",
            "is not a Redis Cluster node"
        ),
        "{stderr}"
    );

    let (code, stderr) = cache_exits_with(&[("REDIS_URL", first_node)]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        refused(&stderr, "REDIS_URL", "REDIS_CLUSTER_NODES instead"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_master_that_does_not_answer_is_skipped_by_its_own_breaker_while_the_others_serve() {
    let mut stack = TestStack::new();
    let mut c = start_cache_on(
        &mut stack,
        RedisKind::Cluster,
        &[
            ("REDIS_TIMEOUT", "300ms".into()),
            ("REDIS_BREAKER_FAILURES", "2".into()),
            ("REDIS_BREAKER_COOLDOWN", "1s".into()),
        ],
    )
    .await;
    let cluster = stack.redis_cluster.as_ref().expect("cluster");
    // The other masters serve their slots while one is gone (no failover below).
    cluster
        .config_set("cluster-require-full-coverage", "no")
        .expect("config");
    let keys: Vec<String> = (0..30).map(|i| format!("k{i}")).collect();
    for key in &keys {
        assert!(set(&mut c, Namespace::TreeMeta, key, b"v").await);
    }
    let victim = cluster
        .master_of("merkle:v2:tree_meta:k0")
        .expect("a master");
    let replica = cluster.replica_of(victim).expect("its replica");
    let (on_victim, elsewhere): (Vec<&String>, Vec<&String>) = keys
        .iter()
        .partition(|k| cluster.master_of(&format!("merkle:v2:tree_meta:{k}")) == Some(victim));
    assert!(!on_victim.is_empty() && !elsewhere.is_empty());
    // The health probe has read the cluster's shape by now (every 200 ms in tests).
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The master and its replica frozen: nothing answers for its slots, and no replica can
    // take over.
    let pids = [victim, replica].map(|i| cluster.nodes()[i].pid().expect("running"));
    for pid in pids {
        integration_tests::signal(pid, nix::sys::signal::Signal::SIGSTOP);
    }
    let mut slow = 0;
    for round in 0..4 {
        for key in &on_victim {
            let started = Instant::now();
            assert_eq!(get(&mut c, Namespace::TreeMeta, key).await, None, "a miss");
            if started.elapsed() >= Duration::from_millis(250) {
                slow += 1;
            }
        }
        for key in &elsewhere {
            let started = Instant::now();
            assert_eq!(
                get(&mut c, Namespace::TreeMeta, key).await.as_deref(),
                Some(&b"v"[..]),
                "round {round}: {key} on another master is served"
            );
            assert!(
                started.elapsed() < Duration::from_millis(250),
                "not held up"
            );
        }
    }
    assert!(
        slow <= 3,
        "after two timeouts the master's breaker skips it: {slow} slow misses"
    );
    let status = status(&mut c).await;
    assert_eq!(
        status.circuit_state,
        merkle_proto::cache::v1::CircuitState::Open as i32,
        "GetStatus shows the open one"
    );

    for pid in pids {
        integration_tests::signal(pid, nix::sys::signal::Signal::SIGCONT);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while get(&mut c, Namespace::TreeMeta, on_victim[0])
        .await
        .is_none()
    {
        assert!(
            Instant::now() < deadline,
            "the master serves again after the cooldown"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
