//! Two DbSync replicas, each with its own Cache replica, over one PostgreSQL and one Redis:
//! latest roots answered from each replica's own copy (`x-cache: LOCAL`), and never a stale
//! one, whatever happens between a write through one and a read through the other.

use std::time::{Duration, Instant};

use integration_tests::{RedisKind, RoundRobin, ServingStatus, TestStack, signal};
use merkle_proto::dbsync::v1::GetLatestRootRequest;
use nix::sys::signal::Signal;

use super::support::*;

/// The latest root of `source` and where it came from (`x-cache`).
async fn latest(c: &mut Client, source: &str) -> (String, String) {
    let answer = c
        .get_latest_root(GetLatestRootRequest {
            source: source.into(),
            ..Default::default()
        })
        .await
        .expect("GetLatestRoot");
    let from = answer
        .metadata()
        .get("x-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let root = answer.into_inner().snapshot.expect("snapshot").root_hash;
    (root, from)
}

/// PostgreSQL, Redis, two Cache replicas and a DbSync on each; returns the clients of the
/// two DbSyncs (A, B).
async fn two_replicas(stack: &mut TestStack) -> (Client, Client) {
    two_replicas_on(stack, RedisKind::Standalone).await
}

/// [`two_replicas`] on a Redis of `kind`.
async fn two_replicas_on(stack: &mut TestStack, kind: RedisKind) -> (Client, Client) {
    stack.start_postgres().await;
    stack.start_redis_of(kind).await;
    let mut dbs = Vec::new();
    for _ in 0..2 {
        let cache = stack.start_serving("cache").await.uri();
        let db_sync = stack.start_service("db-sync", &[("CACHE_ADDR", cache)]);
        db_sync.wait_for(ServingStatus::Serving).await;
        dbs.push(client(&db_sync.uri()));
    }
    let b = dbs.pop().expect("B");
    let a = dbs.pop().expect("A");
    (a, b)
}

/// Reads `source` through `c` until it is answered from the copy (the copy fills on the first
/// read after its stream opened), checking every answer is `root`.
async fn until_local(c: &mut Client, source: &str, root: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (got, from) = latest(c, source).await;
        assert_eq!(got, root, "never a stale root (answered {from})");
        if from == "LOCAL" {
            return;
        }
        assert!(Instant::now() < deadline, "the copy serves again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

integration_tests::on_both_redis_kinds!(
    a_write_through_one_replica_is_read_at_once_through_the_other
);

async fn a_write_through_one_replica_is_read_at_once_through_the_other(kind: RedisKind) {
    let mut stack = TestStack::new();
    let (mut a, mut b) = two_replicas_on(&mut stack, kind).await;
    let mut t = Tree::new(&[("f", "0")]);
    push(&mut a, "docs", &t).await;
    until_local(&mut b, "docs", &t.tree.root.to_hex()).await;
    until_local(&mut a, "docs", &t.tree.root.to_hex()).await;
    let mut local = 0;
    for i in 1..=40 {
        t.edit("f", &i.to_string());
        // Alternate the writer: each replica's copy must hear the other's writes.
        let (writer, reader) = if i % 2 == 0 {
            (&mut a, &mut b)
        } else {
            (&mut b, &mut a)
        };
        assert!(push(writer, "docs", &t).await.changed);
        let root = t.tree.root.to_hex();
        for _ in 0..3 {
            let (got, from) = latest(reader, "docs").await;
            assert_eq!(
                got, root,
                "write {i}: the other replica answered a stale root ({from})"
            );
            local += usize::from(from == "LOCAL");
        }
    }
    assert!(
        local >= 40,
        "between writes reads come from the copy: {local} of 120"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cut_stream_never_leaves_a_stale_root_behind() {
    let mut stack = TestStack::new();
    let (mut a, mut b) = two_replicas(&mut stack).await;
    let mut t = Tree::new(&[("f", "0")]);
    push(&mut a, "docs", &t).await;
    until_local(&mut b, "docs", &t.tree.root.to_hex()).await;

    // B's Cache replica frozen: B's stream stalls without an error. A's write waits until
    // B's lease has run out, so B's copy is not served once A has answered.
    // The newest Cache replica is B's.
    let frozen = stack.service("cache").process.pid();
    signal(frozen, Signal::SIGSTOP);
    t.edit("f", "frozen");
    assert!(push(&mut a, "docs", &t).await.changed);
    let (got, from) = latest(&mut b, "docs").await;
    assert_eq!(
        got,
        t.tree.root.to_hex(),
        "stale after a frozen stream ({from})"
    );
    assert_ne!(from, "LOCAL");
    signal(frozen, Signal::SIGCONT);
    until_local(&mut b, "docs", &t.tree.root.to_hex()).await;

    // B's Cache replica killed: B's stream ends; B reads from PostgreSQL meanwhile.
    stack.service_mut("cache").process.signal(Signal::SIGKILL);
    t.edit("f", "killed");
    assert!(push(&mut a, "docs", &t).await.changed);
    let (got, from) = latest(&mut b, "docs").await;
    assert_eq!(
        got,
        t.tree.root.to_hex(),
        "stale after a killed stream ({from})"
    );
    assert_eq!(from, "MISS");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_redis_down_the_copies_are_dropped_and_they_serve_again_once_it_is_back() {
    let mut stack = TestStack::new();
    let (mut a, mut b) = two_replicas(&mut stack).await;
    let mut t = Tree::new(&[("f", "0")]);
    push(&mut a, "docs", &t).await;
    until_local(&mut b, "docs", &t.tree.root.to_hex()).await;

    stack.redis.as_mut().expect("redis").stop();
    t.edit("f", "while Redis is down");
    assert!(push(&mut a, "docs", &t).await.changed);
    for _ in 0..5 {
        let (got, from) = latest(&mut b, "docs").await;
        assert_eq!(got, t.tree.root.to_hex(), "stale with Redis down ({from})");
        assert_eq!(from, "MISS", "from PostgreSQL");
    }
    stack.restart_redis().await;
    for c in [&mut a, &mut b] {
        until_local(c, "docs", &t.tree.root.to_hex()).await;
    }
    t.edit("f", "after");
    assert!(push(&mut b, "docs", &t).await.changed);
    let (got, _) = latest(&mut a, "docs").await;
    assert_eq!(got, t.tree.root.to_hex());
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_redis_masters_never_bring_an_older_root_back() {
    let mut stack = TestStack::new();
    let (mut a, mut b) = two_replicas_on(&mut stack, RedisKind::Cluster).await;
    let mut t = Tree::new(&[("f", "0")]);
    push(&mut a, "docs", &t).await;
    until_local(&mut b, "docs", &t.tree.root.to_hex()).await;
    let mut local = 0;
    let mut killed = Vec::new();
    for i in 1..=30 {
        // The master of the notices (every copy's lease), then the master of the latest root
        // itself (if it is another one and still has its replica to promote).
        let victim = match i {
            5 => Some("merkle:v2:{notices}:holders"),
            15 => Some("merkle:v2:latest_root:docs"),
            _ => None,
        };
        if let Some(key) = victim {
            let cluster = stack.redis_cluster.as_mut().expect("cluster");
            let master = cluster.master_of(key).expect("a master serves the key");
            if !killed.contains(&master) && cluster.has_online_replica(master) {
                cluster.nodes_mut()[master].kill();
                killed.push(master);
            }
        }
        t.edit("f", &i.to_string());
        let (writer, reader) = if i % 2 == 0 {
            (&mut a, &mut b)
        } else {
            (&mut b, &mut a)
        };
        assert!(
            push(writer, "docs", &t).await.changed,
            "write {i} is stored"
        );
        let root = t.tree.root.to_hex();
        for _ in 0..3 {
            let (got, from) = latest(reader, "docs").await;
            assert_eq!(
                got, root,
                "write {i}: a stale root through the other replica ({from})"
            );
            local += usize::from(from == "LOCAL");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!killed.is_empty(), "a master was killed");
    stack
        .redis_cluster
        .as_ref()
        .expect("cluster")
        .wait_ok(Duration::from_secs(30))
        .await
        .expect("the cluster serves every slot again");
    for c in [&mut a, &mut b] {
        until_local(c, "docs", &t.tree.root.to_hex()).await;
    }
    println!("{local} of 90 reads from the copies; masters killed: {killed:?}");
}

/// The latest root of `source` through a new connection to `addr` (a new backend behind a
/// balancer).
async fn latest_via(addr: &str, source: &str) -> String {
    latest(&mut client(addr), source).await.0
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_of_each_behind_one_address_answer_as_one() {
    let mut stack = TestStack::new();
    stack.start_postgres().await;
    stack.start_redis().await;
    let mut caches = Vec::new();
    for _ in 0..2 {
        caches.push(stack.start_serving("cache").await.addr);
    }
    let cache = RoundRobin::start(caches).await;
    let mut dbs = Vec::new();
    for _ in 0..2 {
        let db_sync = stack.start_service("db-sync", &[("CACHE_ADDR", cache.uri())]);
        db_sync.wait_for(ServingStatus::Serving).await;
        dbs.push(db_sync.addr);
    }
    let db_sync = RoundRobin::start(dbs).await;
    let addr = db_sync.uri();

    let mut t = Tree::new(&[("f", "0")]);
    let mut stored = 1;
    assert!(push(&mut client(&addr), "docs", &t).await.changed);
    for i in 1..=20 {
        t.edit("f", &i.to_string());
        // The same tree pushed twice at once, through different replicas: stored once.
        let (a, b) = tokio::join!(
            async { push(&mut client(&addr), "docs", &t).await },
            async { push(&mut client(&addr), "docs", &t).await },
        );
        assert_eq!(
            u32::from(a.changed) + u32::from(b.changed),
            1,
            "write {i}: one of two equal pushes stores"
        );
        stored += 1;
        let root = t.tree.root.to_hex();
        for _ in 0..4 {
            assert_eq!(
                latest_via(&addr, "docs").await,
                root,
                "write {i}: a stale root"
            );
        }
    }
    let listed = client(&addr)
        .list_snapshots(merkle_proto::dbsync::v1::ListSnapshotsRequest {
            source: "docs".into(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("ListSnapshots")
        .into_inner()
        .snapshots;
    let sequences: Vec<u64> = listed.iter().rev().map(|s| s.sequence).collect();
    assert_eq!(
        sequences,
        (1..=stored).collect::<Vec<_>>(),
        "no duplicate, no gap"
    );
    let (code, out, err) = integration_tests::run_merklectl(&[
        "verify-history",
        "docs",
        "--allow-unsigned",
        "--addr",
        &addr,
    ]);
    assert_eq!(code, Some(0), "one history chain: {out}{err}");
}
