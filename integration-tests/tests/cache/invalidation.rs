//! Invalidation by pattern (SCAN, never KEYS) and warm-up from DbSync.

use integration_tests::{RedisKind, TestStack};
use merkle_proto::cache::v1::{
    Entry, InvalidatePatternRequest, Namespace, SetManyRequest, WarmupRequest,
};
use tonic::Code;

use super::support::*;

integration_tests::on_both_redis_kinds!(invalidate_pattern_deletes_10000_keys_with_scan_never_keys);

async fn invalidate_pattern_deletes_10000_keys_with_scan_never_keys(kind: RedisKind) {
    let mut stack = TestStack::new();
    let mut c = start_cache_on(&mut stack, kind, &[]).await;
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
    let info = info_of_every_master(&mut raw, "commandstats").await;
    assert_eq!(
        info.len(),
        if kind == RedisKind::Cluster { 3 } else { 1 },
        "INFO of each master"
    );
    let info = info.join("\n");
    assert!(info.contains("cmdstat_scan:"), "SCAN was used:\n{info}");
    assert!(
        !info.contains("cmdstat_keys:"),
        "KEYS was never used:\n{info}"
    );
    assert!(!info.contains("cmdstat_flushdb:") && !info.contains("cmdstat_flushall:"));
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
