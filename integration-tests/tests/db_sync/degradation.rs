//! With Redis or the Cache service down, every call is still answered, from PostgreSQL.

use integration_tests::{ServingStatus, TestStack};
use merkle_proto::dbsync::v1::{DiffSnapshotsRequest, GetLatestRootRequest, ListDirectoryRequest};

use super::support::*;

/// Everything a client does, checked against the truth; `label` names the situation.
async fn every_call_is_correct(c: &mut Client, label: &str) {
    let mut t = Tree::new(&[("a/b", "1"), ("c", "2")]);
    let first = push(c, "down", &t).await;
    t.edit("a/b", "changed");
    let second = push(c, "down", &t).await;
    assert!(second.changed, "{label}");
    assert!(
        !push(c, "down", &t).await.changed,
        "{label}: unchanged is still seen"
    );
    let latest = c
        .get_latest_root(GetLatestRootRequest {
            source: "down".into(),
            ..Default::default()
        })
        .await
        .expect(label);
    assert_eq!(
        latest
            .metadata()
            .get("x-cache")
            .and_then(|v| v.to_str().ok()),
        Some("MISS"),
        "{label}"
    );
    assert_eq!(
        latest.into_inner().snapshot.expect("snapshot").root_hash,
        t.tree.root.to_hex(),
        "{label}"
    );
    let dir = c
        .list_directory(ListDirectoryRequest {
            root_hash: t.tree.root.to_hex(),
            path: "a".into(),
            ..Default::default()
        })
        .await
        .expect(label)
        .into_inner();
    assert_eq!(dir.entries.len(), 1, "{label}");
    let mut diff = c
        .diff_snapshots(DiffSnapshotsRequest {
            old_root_hash: first.snapshot.expect("first").root_hash,
            new_root_hash: t.tree.root.to_hex(),
        })
        .await
        .expect(label)
        .into_inner();
    let changes = diff.message().await.expect(label).expect("a batch").changes;
    assert_eq!(changes.len(), 1, "{label}");
    assert_eq!(changes[0].path, "a/b", "{label}");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_redis_down_every_read_and_write_comes_from_postgres() {
    let mut stack = TestStack::new();
    let mut c = start(&mut stack, &[]).await;
    stack.redis.as_mut().expect("redis").stop();
    every_call_is_correct(&mut c, "Redis down").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_cache_service_down_every_read_and_write_comes_from_postgres() {
    let mut stack = TestStack::new();
    stack.start_postgres().await;
    let nowhere = format!(
        "http://127.0.0.1:{}",
        integration_tests::free_port().expect("port")
    );
    let db_sync = stack.start_service("db-sync", &[("CACHE_ADDR", nowhere)]);
    db_sync.wait_for(ServingStatus::Serving).await;
    let mut c = client(&db_sync.uri());
    every_call_is_correct(&mut c, "Cache down").await;
}
