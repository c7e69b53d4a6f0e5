//! The services' typed cache client: one load for many concurrent misses, and never an
//! error for its caller when the cache is down.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use integration_tests::{TestStack, token_of};
use merkle_proto::cache::v1::Namespace;
use merkle_shared::{
    auth::token::ClientAuthLayer,
    cache::{CacheClient, CacheSource, seal::Seal},
    client,
};
use tonic::Code;

use super::support::*;

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
