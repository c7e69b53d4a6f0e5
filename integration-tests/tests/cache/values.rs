//! Values: namespaces and their TTLs, the key layout, statistics, compression, bad input,
//! and `merklectl cache`.

use std::time::Duration;

use integration_tests::{RedisKind, TestStack, run_merklectl};
use merkle_proto::cache::v1::{
    ClearRequest, DeleteRequest, Entry, GetManyRequest, GetRequest, InvalidatePatternRequest,
    Namespace, SetManyRequest, SetRequest,
};
use tonic::Code;

use super::support::*;

integration_tests::on_both_redis_kinds!(
    each_namespace_has_its_default_ttl_and_a_request_ttl_overrides_it,
    keys_follow_the_layout_and_clear_leaves_other_deployments_alone,
    statistics_are_counted_exactly,
    values_over_the_threshold_are_stored_compressed_and_read_back_whole,
    bad_input_is_rejected_naming_the_field_and_nothing_is_written,
    merklectl_cache_commands_talk_to_the_running_service,
    an_if_absent_write_never_replaces_a_value
);

async fn each_namespace_has_its_default_ttl_and_a_request_ttl_overrides_it(kind: RedisKind) {
    let mut stack = TestStack::new();
    let mut c = start_cache_on(
        &mut stack,
        kind,
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
                if_absent: false,
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

async fn keys_follow_the_layout_and_clear_leaves_other_deployments_alone(kind: RedisKind) {
    let mut stack = TestStack::new();
    let mut c = start_cache_on(&mut stack, kind, &[("CACHE_KEY_PREFIX", "team-a".into())]).await;
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

async fn statistics_are_counted_exactly(kind: RedisKind) {
    let mut stack = TestStack::new();
    let mut c = start_cache_on(&mut stack, kind, &[]).await;
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
    // Each server's own figures: the one server, or each of the cluster's three masters.
    assert_eq!(s.redis_cluster, kind == RedisKind::Cluster);
    let masters = if kind == RedisKind::Cluster { 3 } else { 1 };
    assert_eq!(s.redis_nodes.len(), masters, "{:?}", s.redis_nodes);
    assert_eq!(s.redis_nodes.iter().map(|n| n.keys).sum::<u64>(), 1);
    assert_eq!(
        s.redis_nodes
            .iter()
            .map(|n| n.used_memory_bytes)
            .sum::<u64>(),
        s.redis_used_memory_bytes
    );
    assert!(s.redis_nodes.iter().all(|n| n.used_memory_bytes > 0));
}

async fn values_over_the_threshold_are_stored_compressed_and_read_back_whole(kind: RedisKind) {
    let mut stack = TestStack::new();
    let mut c = start_cache_on(
        &mut stack,
        kind,
        &[("CACHE_COMPRESS_THRESHOLD", "1024".into())],
    )
    .await;
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

async fn bad_input_is_rejected_naming_the_field_and_nothing_is_written(kind: RedisKind) {
    let mut stack = TestStack::new();
    let mut c = start_cache_on(&mut stack, kind, &[]).await;
    let ns = Namespace::TreeMeta as i32;
    let set_req = |key: &str, value: Vec<u8>, ttl: Option<(i64, i32)>| SetRequest {
        namespace: ns,
        key: key.into(),
        value,
        ttl: ttl.map(|(seconds, nanos)| prost_types::Duration { seconds, nanos }),
        if_absent: false,
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

async fn merklectl_cache_commands_talk_to_the_running_service(kind: RedisKind) {
    let mut stack = TestStack::new();
    let mut c = start_cache_on(&mut stack, kind, &[]).await;
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
    if kind == RedisKind::Cluster {
        assert!(out.contains("cluster of 3 masters"), "{out}");
        assert_eq!(
            out.lines().filter(|l| l.starts_with("127.0.0.1:")).count(),
            3,
            "{out}"
        );
    }

    let (code, out, _) = run_merklectl(&["cache", "stats", "--addr", &addr, "--json"]);
    assert_eq!(code, Some(0));
    let json: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(json["namespaces"][1]["namespace"], "tree_meta");
    assert_eq!(json["namespaces"][1]["hits"], 1);
    assert_eq!(json["redis"]["keys"], 1);
    assert_eq!(json["redis"]["cluster"], kind == RedisKind::Cluster);
    let masters = if kind == RedisKind::Cluster { 3 } else { 1 };
    assert_eq!(
        json["redis"]["nodes"].as_array().map(Vec::len),
        Some(masters)
    );

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

async fn an_if_absent_write_never_replaces_a_value(kind: RedisKind) {
    let mut stack = TestStack::new();
    let mut c = start_cache_on(&mut stack, kind, &[]).await;
    let put = |value: &'static [u8]| SetRequest {
        namespace: Namespace::LatestRoot as i32,
        key: "docs".into(),
        value: value.to_vec(),
        ttl: None,
        if_absent: true,
    };
    let first = c
        .owner(Namespace::LatestRoot)
        .set(put(b"loaded"))
        .await
        .expect("Set")
        .into_inner();
    assert!(first.stored && !first.existed, "{first:?}");
    // A writer's newer value, then a late put-back of an older load: the newer one stays.
    assert!(set(&mut c, Namespace::LatestRoot, "docs", b"newer").await);
    let late = c
        .owner(Namespace::LatestRoot)
        .set(put(b"older"))
        .await
        .expect("Set")
        .into_inner();
    assert!(!late.stored && late.existed, "{late:?}");
    assert_eq!(
        get(&mut c, Namespace::LatestRoot, "docs").await.as_deref(),
        Some(&b"newer"[..])
    );
}
