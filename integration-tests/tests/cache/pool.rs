//! The Redis connection pool (bb8 with bb8-redis): connections Redis dropped are replaced
//! without a caller seeing them, and an exhausted pool answers UNAVAILABLE within the timeout.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use integration_tests::{ServingStatus, TestStack};
use merkle_proto::cache::v1::{CircuitState, DeleteRequest, Namespace};
use tonic::Code;

use super::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_redis_restarted_under_load_costs_no_caller_a_failure_once_the_breaker_closes() {
    let mut stack = TestStack::new();
    let mut c = start_cache(
        &mut stack,
        &[
            ("REDIS_POOL_SIZE", "8".into()),
            ("REDIS_BREAKER_FAILURES", "3".into()),
            ("REDIS_BREAKER_COOLDOWN", "200ms".into()),
        ],
    )
    .await;
    let cache = stack.service("cache");
    // Callers that write and read back all along; they count what failed after `closed`.
    let closed = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let failed_after = Arc::new(AtomicU64::new(0));
    let calls_after = Arc::new(AtomicU64::new(0));
    let mut callers = Vec::new();
    for caller in 0..16 {
        let mut c = client(cache);
        let (closed, stop) = (closed.clone(), stop.clone());
        let (failed_after, calls_after) = (failed_after.clone(), calls_after.clone());
        callers.push(tokio::spawn(async move {
            let key = format!("k{caller}");
            while !stop.load(Ordering::Relaxed) {
                let counted = closed.load(Ordering::Relaxed);
                let ok = set(&mut c, Namespace::DiscoveryNode, &key, b"v").await
                    && get(&mut c, Namespace::DiscoveryNode, &key).await.as_deref()
                        == Some(&b"v"[..]);
                if counted {
                    calls_after.fetch_add(1, Ordering::Relaxed);
                    if !ok {
                        failed_after.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stack.redis.as_mut().expect("redis").stop();
    stack
        .service_mut("cache")
        .wait_for(ServingStatus::NotServing)
        .await;
    stack.restart_redis().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while status(&mut c).await.circuit_state != CircuitState::Closed as i32 {
        assert!(Instant::now() < deadline, "the breaker closes again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    closed.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for caller in callers {
        caller.await.expect("caller");
    }
    let calls = calls_after.load(Ordering::Relaxed);
    assert!(calls > 100, "the callers kept calling: {calls}");
    assert_eq!(
        failed_after.load(Ordering::Relaxed),
        0,
        "of {calls} calls after the breaker closed, none meets a connection Redis dropped"
    );
    assert_eq!(
        status(&mut c).await.circuit_state,
        CircuitState::Closed as i32
    );
}

/// Eight concurrent deletes (which, unlike reads, must report a failure): each answers
/// UNAVAILABLE, saying why, within the timeout.
async fn eight_deletes_fail_within_the_timeout(stack: &TestStack, says: &str) {
    let cache = stack.service("cache");
    let calls: Vec<_> = (0..8)
        .map(|i| {
            let mut c = client(cache);
            tokio::spawn(async move {
                let started = Instant::now();
                let answer = c
                    .owner(Namespace::DiscoveryNode)
                    .delete(DeleteRequest {
                        namespace: Namespace::DiscoveryNode as i32,
                        key: format!("k{i}"),
                    })
                    .await;
                (answer, started.elapsed())
            })
        })
        .collect();
    for call in calls {
        let (answer, took) = call.await.expect("caller");
        let status = answer.expect_err("no delete can succeed");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains(says), "{says}: {status:?}");
        // The 300 ms timeout (and the breaker), never the pause or the outage.
        assert!(
            took < Duration::from_millis(2000),
            "answered after {took:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redis_that_does_not_answer_or_cannot_be_reached_costs_a_call_its_timeout_never_a_hang() {
    let mut stack = TestStack::new();
    start_cache(
        &mut stack,
        &[
            ("REDIS_POOL_SIZE", "1".into()),
            ("REDIS_TIMEOUT", "300ms".into()),
            ("REDIS_BREAKER_FAILURES", "1000".into()),
        ],
    )
    .await;
    // Redis holds every client but this one for 3 s: commands wait on the pool's connection.
    let mut raw = raw_redis(&stack).await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(3000)
        .arg("ALL")
        .query_async(&mut raw)
        .await
        .expect("CLIENT PAUSE");
    eight_deletes_fail_within_the_timeout(&stack, "Redis did not answer within 300ms").await;
    // Redis gone: the retired connection cannot be replaced; callers wait for one at most
    // the timeout.
    stack.redis.as_mut().expect("redis").stop();
    eight_deletes_fail_within_the_timeout(&stack, "no Redis connection").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_slower_than_half_a_second_is_waited_for_up_to_redis_timeout() {
    let mut stack = TestStack::new();
    let mut c = start_cache(
        &mut stack,
        &[
            ("REDIS_POOL_SIZE", "1".into()),
            ("REDIS_TIMEOUT", "5s".into()),
        ],
    )
    .await;
    assert!(set(&mut c, Namespace::TreeMeta, "slow", b"v1").await);
    // Redis holds every client but this one for 1.5 s: longer than the redis crate's own
    // default answer timeout (500 ms), well within REDIS_TIMEOUT.
    let mut raw = raw_redis(&stack).await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(1500)
        .arg("ALL")
        .query_async(&mut raw)
        .await
        .expect("CLIENT PAUSE");
    let (mut reader, mut writer) = (c.clone(), c.clone());
    let started = Instant::now();
    let (read, written) = tokio::join!(
        get(&mut reader, Namespace::TreeMeta, "slow"),
        set(&mut writer, Namespace::TreeMeta, "slow-2", b"v2"),
    );
    let took = started.elapsed();
    assert_eq!(read.as_deref(), Some(&b"v1"[..]), "read after {took:?}");
    assert!(written, "the write waited out the pause too ({took:?})");
    assert!(
        took >= Duration::from_millis(1000),
        "the pause was waited out: {took:?}"
    );
    let stats = stats(&mut c).await;
    let tree_meta = ns_stats(&stats, Namespace::TreeMeta);
    assert_eq!(tree_meta.errors, 0, "{tree_meta:?}");
    assert_eq!(
        status(&mut c).await.circuit_state,
        CircuitState::Closed as i32
    );
}
