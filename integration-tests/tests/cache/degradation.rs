//! Redis frozen or killed: the circuit breaker, every call degraded, and serving again.

use std::time::{Duration, Instant};

use integration_tests::{ServingStatus, TestStack, signal};
use merkle_proto::cache::v1::{
    CircuitState, ClearRequest, DeleteRequest, Entry, Namespace, SetManyRequest,
};
use nix::sys::signal::Signal;
use tonic::Code;

use super::support::*;

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

    stack.restart_redis().await;
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
