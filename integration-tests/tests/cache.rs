//! The Cache service as its real binary on a real redis-server: namespaces and TTLs, the key
//! layout, invalidation, statistics, compression, bad input, the circuit breaker through Redis
//! outages, warm-up, the shared typed client, and `merklectl cache`.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use integration_tests::{
    ClientAuth, RunningService, ServingStatus, TestStack, run_merklectl, signal, token_of,
};
use merkle_proto::cache::v1::{
    CircuitState, ClearRequest, DeleteRequest, Entry, GetManyRequest, GetRequest, GetStatsRequest,
    GetStatsResponse, GetStatusRequest, GetStatusResponse, InvalidatePatternRequest, Namespace,
    SetManyRequest, SetRequest, WarmupRequest, cache_service_client::CacheServiceClient,
};
use merkle_shared::{
    auth::token::ClientAuthLayer,
    cache::{CacheClient, CacheSource, seal::Seal},
    client,
};
use nix::sys::signal::Signal;
use tonic::{Code, transport::Channel};

type Client = CacheServiceClient<ClientAuth<Channel>>;

/// Clients of one Cache service, one per identity: a namespace is written only by the service
/// that owns it, so writes go as the owner ([`Clients::owner`]); everything else goes as the
/// admin (the `Deref`).
struct Clients {
    admin: Client,
    db_sync: Client,
    scheduler: Client,
    discovery: Client,
}

impl Clients {
    /// The client of `ns`'s owner.
    fn owner(&mut self, ns: Namespace) -> &mut Client {
        match ns {
            Namespace::LatestRoot | Namespace::TreeMeta => &mut self.db_sync,
            Namespace::BuildStatus => &mut self.scheduler,
            _ => &mut self.discovery,
        }
    }
}

impl std::ops::Deref for Clients {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.admin
    }
}

impl std::ops::DerefMut for Clients {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.admin
    }
}

fn client(service: &RunningService) -> Clients {
    let as_ = |identity: &str| CacheServiceClient::new(service.channel_as(identity));
    Clients {
        admin: as_("admin"),
        db_sync: as_("db-sync"),
        scheduler: as_("scheduler"),
        discovery: as_("discovery"),
    }
}

/// A raw connection to the test's Redis, to look at what the service stored.
async fn raw_redis(stack: &TestStack) -> redis::aio::MultiplexedConnection {
    let url = stack.redis.as_ref().expect("redis started").url();
    redis::Client::open(url)
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis")
}

async fn redis_keys(conn: &mut redis::aio::MultiplexedConnection) -> Vec<String> {
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(conn)
        .await
        .expect("KEYS");
    keys.sort();
    keys
}

async fn set(c: &mut Clients, ns: Namespace, key: &str, value: &[u8]) -> bool {
    c.owner(ns)
        .set(SetRequest {
            namespace: ns as i32,
            key: key.to_owned(),
            value: value.to_vec(),
            ttl: None,
        })
        .await
        .expect("Set")
        .into_inner()
        .stored
}

async fn get(c: &mut Clients, ns: Namespace, key: &str) -> Option<Vec<u8>> {
    let answer = c
        .get(GetRequest {
            namespace: ns as i32,
            key: key.to_owned(),
        })
        .await
        .expect("Get")
        .into_inner();
    answer.found.then_some(answer.value)
}

async fn status(c: &mut Clients) -> GetStatusResponse {
    c.get_status(GetStatusRequest {})
        .await
        .expect("GetStatus")
        .into_inner()
}

async fn stats(c: &mut Clients) -> GetStatsResponse {
    c.get_stats(GetStatsRequest {})
        .await
        .expect("GetStats")
        .into_inner()
}

fn ns_stats(stats: &GetStatsResponse, ns: Namespace) -> merkle_proto::cache::v1::NamespaceStats {
    stats
        .namespaces
        .iter()
        .find(|n| n.namespace == ns as i32)
        .cloned()
        .expect("namespace in stats")
}

async fn start_cache(stack: &mut TestStack, env: &[(&str, String)]) -> Clients {
    if stack.redis.is_none() {
        stack.start_redis().await;
    }
    let cache = stack.start_service("cache", env);
    cache.wait_for(ServingStatus::Serving).await;
    client(cache)
}

#[tokio::test(flavor = "multi_thread")]
async fn each_namespace_has_its_default_ttl_and_a_request_ttl_overrides_it() {
    let mut stack = TestStack::new();
    let mut c = start_cache(
        &mut stack,
        &[
            ("CACHE_TTL_TREE_META", "1s".into()),
            ("CACHE_TTL_DISCOVERY_LIST", "30s".into()),
        ],
    )
    .await;
    assert!(set(&mut c, Namespace::LatestRoot, "docs", b"root").await);
    assert!(set(&mut c, Namespace::TreeMeta, "abc", b"meta").await);
    assert!(set(&mut c, Namespace::DiscoveryList, "nomad", b"list").await);
    assert!(
        c.owner(Namespace::BuildStatus)
            .set(SetRequest {
                namespace: Namespace::BuildStatus as i32,
                key: "b1".into(),
                value: b"running".to_vec(),
                ttl: Some(prost_types::Duration {
                    seconds: 120,
                    nanos: 0
                }),
            })
            .await
            .expect("Set")
            .into_inner()
            .stored
    );

    let ttl = |ns: Namespace, key: &'static str| {
        let mut c = c.clone();
        async move {
            let answer = c
                .get(GetRequest {
                    namespace: ns as i32,
                    key: key.into(),
                })
                .await
                .expect("Get")
                .into_inner();
            assert!(answer.found, "{key} found");
            answer
                .ttl_remaining
                .map(|d| d.seconds as f64 + f64::from(d.nanos) / 1e9)
        }
    };
    assert_eq!(
        ttl(Namespace::LatestRoot, "docs").await,
        None,
        "LATEST_ROOT has no expiry"
    );
    let meta = ttl(Namespace::TreeMeta, "abc")
        .await
        .expect("TREE_META expires");
    assert!(meta > 0.0 && meta <= 1.0, "{meta}");
    let list = ttl(Namespace::DiscoveryList, "nomad")
        .await
        .expect("expires");
    assert!(list > 25.0 && list <= 30.0, "{list}");
    let build = ttl(Namespace::BuildStatus, "b1").await.expect("expires");
    assert!(
        build > 115.0 && build <= 120.0,
        "the request's TTL wins: {build}"
    );

    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(
        get(&mut c, Namespace::TreeMeta, "abc").await,
        None,
        "expired"
    );
    assert_eq!(
        get(&mut c, Namespace::LatestRoot, "docs").await.as_deref(),
        Some(&b"root"[..])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_follow_the_layout_and_clear_leaves_other_deployments_alone() {
    let mut stack = TestStack::new();
    let mut c = start_cache(&mut stack, &[("CACHE_KEY_PREFIX", "team-a".into())]).await;
    let mut raw = raw_redis(&stack).await;
    // Keys of others: another prefix, a prefix that merely starts the same, no prefix at all.
    for key in [
        "team-b:v1:latest_root:docs",
        "team-a2:v1:latest_root:docs",
        "plain",
    ] {
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg("theirs")
            .query_async(&mut raw)
            .await
            .expect("SET");
    }
    // Ours, of an older schema version: Clear takes it too.
    let _: () = redis::cmd("SET")
        .arg("team-a:v0:latest_root:old")
        .arg("x")
        .query_async(&mut raw)
        .await
        .expect("SET");

    let odd = "a:b*c?[d]\\e";
    assert!(
        set(
            &mut c,
            Namespace::TreeMeta,
            odd,
            b"glob characters are literal"
        )
        .await
    );
    assert!(set(&mut c, Namespace::LatestRoot, "docs", b"ours").await);
    assert!(set(&mut c, Namespace::BuildStatus, "b-1", b"ours").await);
    assert_eq!(
        get(&mut c, Namespace::TreeMeta, odd).await.as_deref(),
        Some(&b"glob characters are literal"[..])
    );
    assert_eq!(
        get(&mut c, Namespace::TreeMeta, "a:bXc?[d]\\e").await,
        None,
        "no glob reading"
    );
    let keys = redis_keys(&mut raw).await;
    for key in [
        "team-a:v2:tree_meta:a:b*c?[d]\\e",
        "team-a:v2:latest_root:docs",
        "team-a:v2:build_status:b-1",
    ] {
        assert!(keys.contains(&key.to_owned()), "{key} in {keys:?}");
    }
    assert_eq!(status(&mut c).await.key_prefix, "team-a");

    // One namespace.
    let cleared = c
        .clear(ClearRequest {
            namespace: Namespace::BuildStatus as i32,
        })
        .await
        .expect("Clear")
        .into_inner();
    assert_eq!(cleared.deleted, 1);
    assert_eq!(
        get(&mut c, Namespace::LatestRoot, "docs").await.as_deref(),
        Some(&b"ours"[..])
    );

    // Everything of this deployment, nothing else.
    let cleared = c
        .clear(ClearRequest::default())
        .await
        .expect("Clear")
        .into_inner();
    assert_eq!(cleared.deleted, 3, "two of v2 and the old v0 key");
    assert_eq!(
        redis_keys(&mut raw).await,
        vec![
            "plain",
            "team-a2:v1:latest_root:docs",
            "team-b:v1:latest_root:docs"
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn invalidate_pattern_deletes_10000_keys_with_scan_never_keys() {
    let mut stack = TestStack::new();
    let mut c = start_cache(&mut stack, &[]).await;
    for batch in 0..10 {
        let entries = (0..1000)
            .map(|i| Entry {
                key: format!("build-{:05}", batch * 1000 + i),
                found: true,
                value: b"s".to_vec(),
            })
            .collect();
        let stored = c
            .owner(Namespace::BuildStatus)
            .set_many(SetManyRequest {
                namespace: Namespace::BuildStatus as i32,
                entries,
                ttl: None,
            })
            .await
            .expect("SetMany")
            .into_inner()
            .stored;
        assert_eq!(stored, 1000);
    }
    for key in ["keep-1", "keep-2", "builds"] {
        assert!(set(&mut c, Namespace::BuildStatus, key, b"k").await);
    }
    // The same glob in another namespace is not touched.
    assert!(
        set(
            &mut c,
            Namespace::TreeMeta,
            "build-00001",
            b"other namespace"
        )
        .await
    );

    let deleted = c
        .invalidate_pattern(InvalidatePatternRequest {
            namespace: Namespace::BuildStatus as i32,
            pattern: "build-*".into(),
        })
        .await
        .expect("InvalidatePattern")
        .into_inner()
        .deleted;
    assert_eq!(deleted, 10_000);
    for key in ["keep-1", "keep-2", "builds"] {
        assert!(
            get(&mut c, Namespace::BuildStatus, key).await.is_some(),
            "{key} kept"
        );
    }
    assert!(
        get(&mut c, Namespace::TreeMeta, "build-00001")
            .await
            .is_some()
    );
    assert!(
        get(&mut c, Namespace::BuildStatus, "build-04242")
            .await
            .is_none()
    );

    let mut raw = raw_redis(&stack).await;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut raw)
        .await
        .expect("INFO");
    assert!(info.contains("cmdstat_scan:"), "SCAN was used:\n{info}");
    assert!(
        !info.contains("cmdstat_keys:"),
        "KEYS was never used:\n{info}"
    );
    assert!(!info.contains("cmdstat_flushdb:") && !info.contains("cmdstat_flushall:"));
}

#[tokio::test(flavor = "multi_thread")]
async fn statistics_are_counted_exactly() {
    let mut stack = TestStack::new();
    let mut c = start_cache(&mut stack, &[]).await;
    assert!(set(&mut c, Namespace::TreeMeta, "a", b"1").await);
    assert!(set(&mut c, Namespace::TreeMeta, "b", b"2").await);
    assert!(get(&mut c, Namespace::TreeMeta, "a").await.is_some());
    assert!(get(&mut c, Namespace::TreeMeta, "zzz").await.is_none());
    let many = c
        .get_many(GetManyRequest {
            namespace: Namespace::TreeMeta as i32,
            keys: vec!["a".into(), "b".into(), "c".into()],
        })
        .await
        .expect("GetMany")
        .into_inner();
    let found: Vec<bool> = many.entries.iter().map(|e| e.found).collect();
    assert_eq!(found, [true, true, false], "in request order");
    assert_eq!(many.entries[1].value, b"2");
    let deleted = c
        .delete(DeleteRequest {
            namespace: Namespace::TreeMeta as i32,
            key: "a".into(),
        })
        .await
        .expect("Delete")
        .into_inner()
        .deleted;
    assert!(deleted);
    let again = c
        .delete(DeleteRequest {
            namespace: Namespace::TreeMeta as i32,
            key: "a".into(),
        })
        .await
        .expect("Delete")
        .into_inner()
        .deleted;
    assert!(!again, "a second delete finds nothing");
    assert!(get(&mut c, Namespace::LatestRoot, "src").await.is_none());

    let s = stats(&mut c).await;
    let tree = ns_stats(&s, Namespace::TreeMeta);
    assert_eq!(
        (
            tree.hits,
            tree.misses,
            tree.sets,
            tree.deletes,
            tree.errors,
            tree.skipped
        ),
        (3, 2, 2, 1, 0, 0)
    );
    assert!((tree.hit_rate - 0.6).abs() < 1e-9, "{}", tree.hit_rate);
    let latest = ns_stats(&s, Namespace::LatestRoot);
    assert_eq!((latest.hits, latest.misses, latest.hit_rate), (0, 1, 0.0));
    assert!(s.redis_available);
    assert_eq!(s.redis_keys, 1, "only b is left");
    assert!(s.redis_used_memory_bytes > 0);
    assert!(!s.redis_version.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn values_over_the_threshold_are_stored_compressed_and_read_back_whole() {
    let mut stack = TestStack::new();
    let mut c = start_cache(&mut stack, &[("CACHE_COMPRESS_THRESHOLD", "1024".into())]).await;
    let mut raw = raw_redis(&stack).await;
    let text = |len: usize| -> Vec<u8> { (0..len).map(|i| b"merkle mesh "[i % 12]).collect() };
    for (len, compressed) in [
        (1023, false),
        (1024, false),
        (1025, true),
        (1024 * 1024, true),
    ] {
        let key = format!("v{len}");
        let value = text(len);
        assert!(set(&mut c, Namespace::TreeMeta, &key, &value).await);
        let stored: Vec<u8> = redis::cmd("GET")
            .arg(format!("merkle:v2:tree_meta:{key}"))
            .query_async(&mut raw)
            .await
            .expect("GET");
        assert_eq!(
            stored[0],
            u8::from(compressed),
            "header byte of a {len}-byte value"
        );
        if compressed {
            assert!(
                stored.len() < len / 2,
                "{len} bytes stored in {}",
                stored.len()
            );
        } else {
            assert_eq!(&stored[1..], &value[..]);
        }
        assert_eq!(
            get(&mut c, Namespace::TreeMeta, &key).await,
            Some(value.clone())
        );
        let many = c
            .get_many(GetManyRequest {
                namespace: Namespace::TreeMeta as i32,
                keys: vec![key],
            })
            .await
            .expect("GetMany")
            .into_inner();
        assert_eq!(many.entries[0].value, value);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_rejected_naming_the_field_and_nothing_is_written() {
    let mut stack = TestStack::new();
    let mut c = start_cache(&mut stack, &[]).await;
    let ns = Namespace::TreeMeta as i32;
    let set_req = |key: &str, value: Vec<u8>, ttl: Option<(i64, i32)>| SetRequest {
        namespace: ns,
        key: key.into(),
        value,
        ttl: ttl.map(|(seconds, nanos)| prost_types::Duration { seconds, nanos }),
    };
    let cases: Vec<(SetRequest, &str)> = vec![
        (
            SetRequest {
                namespace: 0,
                ..set_req("k", vec![1], None)
            },
            "namespace: must be set",
        ),
        (
            SetRequest {
                namespace: 99,
                ..set_req("k", vec![1], None)
            },
            "namespace: 99 is not a known namespace",
        ),
        (set_req("", vec![1], None), "key: must not be empty"),
        (
            set_req(&"k".repeat(513), vec![1], None),
            "key: is 513 bytes; at most 512",
        ),
        (
            set_req("k", vec![0; 1024 * 1024 + 1], None),
            "value: is 1048577 bytes",
        ),
        (
            set_req("k", vec![1], Some((-1, 0))),
            "ttl: must not be negative",
        ),
        (
            set_req("k", vec![1], Some((366 * 24 * 3600, 0))),
            "ttl: must be at most 365 days",
        ),
    ];
    for (request, expected) in cases {
        let status = c
            .owner(Namespace::TreeMeta)
            .set(request)
            .await
            .expect_err("rejected");
        assert_eq!(status.code(), Code::InvalidArgument, "{expected}");
        assert!(
            status.message().starts_with(expected),
            "{:?} vs {expected:?}",
            status.message()
        );
    }
    let status = c
        .get_many(GetManyRequest {
            namespace: ns,
            keys: (0..1001).map(|i| i.to_string()).collect(),
        })
        .await
        .expect_err("too many keys");
    assert_eq!(
        status.message(),
        "keys: has 1001 items; at most 1000 are allowed"
    );
    let mut entries: Vec<Entry> = (0..3)
        .map(|i| Entry {
            key: format!("ok{i}"),
            found: true,
            value: vec![1],
        })
        .collect();
    entries.push(Entry {
        key: String::new(),
        found: true,
        value: vec![1],
    });
    let status = c
        .owner(Namespace::TreeMeta)
        .set_many(SetManyRequest {
            namespace: ns,
            entries,
            ttl: None,
        })
        .await
        .expect_err("one bad entry rejects the call");
    assert_eq!(status.message(), "entries[3].key: must not be empty");
    for pattern in ["", "[abc", "abc\\"] {
        let status = c
            .invalidate_pattern(InvalidatePatternRequest {
                namespace: ns,
                pattern: pattern.into(),
            })
            .await
            .expect_err("bad pattern");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().starts_with("pattern: "),
            "{}",
            status.message()
        );
    }
    let status = c
        .get(GetRequest {
            namespace: 0,
            key: "k".into(),
        })
        .await
        .expect_err("unset namespace");
    assert_eq!(status.code(), Code::InvalidArgument);

    let mut raw = raw_redis(&stack).await;
    assert!(redis_keys(&mut raw).await.is_empty(), "nothing was written");
    let s = stats(&mut c).await;
    assert!(s.namespaces.iter().all(|n| n.sets == 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_redis_opens_the_breaker_and_no_pre_outage_latest_root_is_served() {
    let mut stack = TestStack::new();
    let mut c = start_cache(
        &mut stack,
        &[
            ("REDIS_TIMEOUT", "1500ms".into()),
            ("REDIS_BREAKER_FAILURES", "3".into()),
            ("REDIS_BREAKER_COOLDOWN", "300ms".into()),
        ],
    )
    .await;
    assert!(set(&mut c, Namespace::LatestRoot, "docs", b"root-before-outage").await);
    assert!(set(&mut c, Namespace::TreeMeta, "n1", b"immutable").await);

    // SIGSTOP keeps Redis' data: after SIGCONT the old value is still in it.
    let pid = stack
        .redis
        .as_ref()
        .and_then(|r| r.pid())
        .expect("redis pid");
    signal(pid, Signal::SIGSTOP);
    let mut waited = 0;
    while status(&mut c).await.circuit_state != CircuitState::Open as i32 {
        assert!(
            get(&mut c, Namespace::TreeMeta, "n1").await.is_none(),
            "a miss while down"
        );
        waited += 1;
        assert!(waited <= 3, "the breaker opens after 3 failures");
    }
    // Open: calls skip Redis instead of waiting for its timeout.
    for _ in 0..20 {
        let started = Instant::now();
        assert!(get(&mut c, Namespace::TreeMeta, "n1").await.is_none());
        assert!(
            !set(&mut c, Namespace::BuildStatus, "b", b"x").await,
            "writes are dropped"
        );
        assert!(
            started.elapsed() < Duration::from_millis(1000),
            "skipped, not timed out"
        );
    }
    let s = stats(&mut c).await;
    assert!(ns_stats(&s, Namespace::TreeMeta).skipped > 0);
    assert!(!s.redis_available);
    let frozen = status(&mut c).await;
    assert!(frozen.latest_root_invalidating);
    assert_eq!(frozen.circuit_opened_count, 1);
    stack
        .service_mut("cache")
        .wait_for(ServingStatus::NotServing)
        .await;

    signal(pid, Signal::SIGCONT);
    stack
        .service_mut("cache")
        .wait_for(ServingStatus::Serving)
        .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // The pre-outage latest root is never served, while recovering or after.
        assert_eq!(get(&mut c, Namespace::LatestRoot, "docs").await, None);
        let now = status(&mut c).await;
        if now.circuit_state == CircuitState::Closed as i32 && !now.latest_root_invalidating {
            break;
        }
        assert!(Instant::now() < deadline, "recovery: {now:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut raw = raw_redis(&stack).await;
    let keys = redis_keys(&mut raw).await;
    assert!(!keys.iter().any(|k| k.contains("latest_root")), "{keys:?}");
    assert_eq!(
        get(&mut c, Namespace::TreeMeta, "n1").await.as_deref(),
        Some(&b"immutable"[..]),
        "immutable namespaces are kept"
    );
    assert!(set(&mut c, Namespace::LatestRoot, "docs", b"root-after").await);
    assert_eq!(
        get(&mut c, Namespace::LatestRoot, "docs").await.as_deref(),
        Some(&b"root-after"[..])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_redis_degrades_every_call_and_a_restarted_one_serves_again() {
    let mut stack = TestStack::new();
    let mut c = start_cache(
        &mut stack,
        &[
            ("REDIS_BREAKER_FAILURES", "2".into()),
            ("REDIS_BREAKER_COOLDOWN", "200ms".into()),
            ("HEALTH_CHECK_INTERVAL", "1s".into()),
        ],
    )
    .await;
    assert!(set(&mut c, Namespace::DiscoveryNode, "n1", b"node").await);
    stack.redis.as_mut().expect("redis").stop();
    stack
        .service_mut("cache")
        .wait_for(ServingStatus::NotServing)
        .await;

    for _ in 0..5 {
        assert!(get(&mut c, Namespace::DiscoveryNode, "n1").await.is_none());
        assert!(!set(&mut c, Namespace::DiscoveryNode, "n2", b"x").await);
    }
    let stored = c
        .owner(Namespace::DiscoveryNode)
        .set_many(SetManyRequest {
            namespace: Namespace::DiscoveryNode as i32,
            entries: vec![Entry {
                key: "n3".into(),
                found: true,
                value: vec![1],
            }],
            ttl: None,
        })
        .await
        .expect("SetMany")
        .into_inner()
        .stored;
    assert_eq!(stored, 0);
    let delete = c
        .delete(DeleteRequest {
            namespace: Namespace::DiscoveryNode as i32,
            key: "n1".into(),
        })
        .await
        .expect_err("a delete cannot be dropped silently");
    assert_eq!(delete.code(), Code::Unavailable);
    let clear = c
        .clear(ClearRequest::default())
        .await
        .expect_err("nor a clear");
    assert_eq!(clear.code(), Code::Unavailable);
    let down = status(&mut c).await;
    assert!(!down.redis_reachable);
    assert!(!down.last_error.is_empty());

    stack
        .redis
        .as_mut()
        .expect("redis")
        .start_again()
        .await
        .expect("restart redis");
    let back = Instant::now();
    stack
        .service_mut("cache")
        .wait_for(ServingStatus::Serving)
        .await;
    // Within one probe (1 s) and its Redis timeout: each of the pool's connections is asked,
    // so none answers a stale error from while Redis was down.
    assert!(
        back.elapsed() < Duration::from_millis(2500),
        "SERVING only {:?} after Redis answered",
        back.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !set(&mut c, Namespace::DiscoveryNode, "n4", b"back").await {
        assert!(Instant::now() < deadline, "writes resume");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        get(&mut c, Namespace::DiscoveryNode, "n4").await.as_deref(),
        Some(&b"back"[..])
    );
    assert_eq!(
        status(&mut c).await.circuit_state,
        CircuitState::Closed as i32
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn warmup_names_what_is_missing_and_never_blocks_serving() {
    let mut stack = TestStack::new();
    // No DbSync configured.
    let mut alone = start_cache(&mut stack, &[]).await;
    let status = alone
        .warmup(WarmupRequest::default())
        .await
        .expect_err("no DbSync");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("DB_SYNC_ADDR"),
        "{}",
        status.message()
    );

    // A DbSync that cannot write the cache (no CACHE_ADDR): the warm-up at start fails in the
    // background while the service is SERVING, and Warmup says what is missing.
    let db_sync = stack.start_serving("db-sync").await.uri();
    let mut with = start_cache(&mut stack, &[("DB_SYNC_ADDR", db_sync)]).await;
    let status = with
        .warmup(WarmupRequest::default())
        .await
        .expect_err("DbSync has no cache");
    assert_eq!(
        status.code(),
        Code::FailedPrecondition,
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("CACHE_ADDR"),
        "{}",
        status.message()
    );

    // A DbSync that is down: UNAVAILABLE, naming it.
    let port = integration_tests::free_port().expect("port");
    let mut gone = start_cache(
        &mut stack,
        &[("DB_SYNC_ADDR", format!("http://127.0.0.1:{port}"))],
    )
    .await;
    let status = gone
        .warmup(WarmupRequest::default())
        .await
        .expect_err("down");
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("DbSync"), "{}", status.message());
}

/// The services' own cache client, acting as DbSync (the owner of the namespaces these tests
/// write), with a seal key of its own.
fn cache_client(addr: String) -> CacheClient {
    let channel = tonic::transport::Endpoint::from_shared(addr)
        .expect("uri")
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(5))
        .connect_lazy();
    let auth = ClientAuthLayer::with_token(&token_of("db-sync")).expect("token");
    let cache = CacheClient::over(client::wrap(channel, auth), Duration::from_millis(500));
    cache.install_seal(Seal::derived(b"the shared client's test secret", "cache"));
    cache
}

#[tokio::test(flavor = "multi_thread")]
async fn the_shared_client_loads_once_for_100_concurrent_misses() {
    let mut stack = TestStack::new();
    start_cache(&mut stack, &[]).await;
    let cache = cache_client(stack.service_mut("cache").uri());
    let loads = Arc::new(AtomicU32::new(0));
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let cache = cache.clone();
        let loads = loads.clone();
        tasks.push(tokio::spawn(async move {
            cache
                .get_or_load(Namespace::LatestRoot, "docs", None, move || async move {
                    loads.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Ok::<_, tonic::Status>(prost_types::Duration {
                        seconds: 42,
                        nanos: 0,
                    })
                })
                .await
        }));
    }
    for task in tasks {
        let loaded = task.await.expect("task").expect("loaded");
        assert_eq!(
            (loaded.value.seconds, loaded.source),
            (42, CacheSource::Miss)
        );
    }
    assert_eq!(
        loads.load(Ordering::SeqCst),
        1,
        "one load for 100 concurrent misses"
    );

    let again = cache
        .get_or_load(Namespace::LatestRoot, "docs", None, || async {
            Err::<prost_types::Duration, _>(tonic::Status::internal("not called on a hit"))
        })
        .await
        .expect("hit");
    assert_eq!((again.value.seconds, again.source), (42, CacheSource::Hit));
    let typed: Option<prost_types::Duration> = cache.get(Namespace::LatestRoot, "docs").await;
    assert_eq!(typed.map(|d| d.seconds), Some(42));

    // A loader's error reaches every caller, and nothing is cached.
    let failed = cache
        .get_or_load(Namespace::LatestRoot, "missing", None, || async {
            Err::<prost_types::Duration, _>(tonic::Status::not_found("source: missing"))
        })
        .await
        .expect_err("loader error");
    assert_eq!(failed.code(), Code::NotFound);
    assert!(
        cache
            .get::<prost_types::Duration>(Namespace::LatestRoot, "missing")
            .await
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_shared_client_never_fails_its_caller_when_the_cache_is_down() {
    let mut stack = TestStack::new();
    // No Cache service at all.
    let port = integration_tests::free_port().expect("port");
    let cache = cache_client(format!("http://127.0.0.1:{port}"));
    for _ in 0..10 {
        let started = Instant::now();
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
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "bounded by CACHE_TIMEOUT"
        );
    }
    let loaded = cache
        .get_or_load(Namespace::LatestRoot, "src", None, || async {
            Ok::<_, tonic::Status>(prost_types::Duration {
                seconds: 7,
                nanos: 0,
            })
        })
        .await
        .expect("loaded from the database alone");
    assert_eq!(
        (loaded.value.seconds, loaded.source),
        (7, CacheSource::Miss)
    );
    let counters = cache.counters();
    assert!(
        counters.failed_reads > 0 && counters.dropped_writes > 0,
        "{counters:?}"
    );

    // A Cache service whose Redis is down: the same, through the service.
    start_cache(&mut stack, &[]).await;
    let cache = cache_client(stack.service_mut("cache").uri());
    assert!(
        cache
            .set(
                Namespace::LatestRoot,
                "src",
                &prost_types::Duration {
                    seconds: 1,
                    nanos: 0
                },
                None
            )
            .await
    );
    stack.redis.as_mut().expect("redis").stop();
    assert!(
        !cache
            .set(
                Namespace::LatestRoot,
                "src",
                &prost_types::Duration {
                    seconds: 2,
                    nanos: 0
                },
                None
            )
            .await
    );
    let value: Option<prost_types::Duration> = cache.get(Namespace::LatestRoot, "src").await;
    assert!(
        value.is_none(),
        "a key whose write was dropped is not read back"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn merklectl_cache_commands_talk_to_the_running_service() {
    let mut stack = TestStack::new();
    let mut c = start_cache(&mut stack, &[]).await;
    assert!(set(&mut c, Namespace::TreeMeta, "a", b"1").await);
    assert!(get(&mut c, Namespace::TreeMeta, "a").await.is_some());
    let addr = stack.service_mut("cache").uri();

    let (code, out, err) = run_merklectl(&["cache", "stats", "--addr", &addr]);
    assert_eq!(code, Some(0), "{err}");
    let tree = out
        .lines()
        .find(|l| l.starts_with("tree_meta"))
        .expect("tree_meta row");
    assert!(tree.contains("100.0%"), "{out}");
    assert!(out.contains("keys of this deployment"), "{out}");

    let (code, out, _) = run_merklectl(&["cache", "stats", "--addr", &addr, "--json"]);
    assert_eq!(code, Some(0));
    let json: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(json["namespaces"][1]["namespace"], "tree_meta");
    assert_eq!(json["namespaces"][1]["hits"], 1);
    assert_eq!(json["redis"]["keys"], 1);

    let (code, out, _) = run_merklectl(&["cache", "status", "--addr", &addr]);
    assert_eq!(code, Some(0));
    assert!(out.contains("circuit breaker  CLOSED"), "{out}");
    assert!(out.contains("merkle:v2:<namespace>:<key>"), "{out}");
    let (_, out, _) = run_merklectl(&["cache", "status", "--json", "--addr", &addr]);
    let json: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(json["redis_reachable"], true);

    let (code, out, _) = run_merklectl(&[
        "cache",
        "clear",
        "--namespace",
        "tree-meta",
        "--addr",
        &addr,
    ]);
    assert_eq!(code, Some(0));
    assert_eq!(out.trim(), "deleted 1 keys (tree_meta)");
    assert!(get(&mut c, Namespace::TreeMeta, "a").await.is_none());
    let (code, out, _) = run_merklectl(&["cache", "clear", "--json", "--addr", &addr]);
    assert_eq!(code, Some(0));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).expect("JSON")["deleted"],
        0
    );

    let (code, _, err) = run_merklectl(&["cache", "warmup", "--addr", &addr]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("FAILED_PRECONDITION") && err.contains("DB_SYNC_ADDR"),
        "{err}"
    );
}
