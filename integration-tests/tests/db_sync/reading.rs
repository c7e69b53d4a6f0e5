//! Reads: latest roots cache-first, pages with tamper-safe tokens, directories, diffs and
//! proofs equal to `merkle-core`'s, cache warm-up, and merklectl against the running service.

use std::fs;

use integration_tests::{ServingStatus, TestStack, run_grpcurl, run_merklectl};
use merkle_core::{diff::diff_all, proof::prove};
use merkle_proto::dbsync::v1::{
    DiffSnapshotsRequest, GetInclusionProofRequest, GetLatestRootRequest, GetSnapshotRequest,
    ListDirectoryRequest, ListSnapshotsRequest, ListSourcesRequest, WarmCacheRequest,
};
use merkle_shared::convert::{change_from_proto, proof_from_proto};
use tonic::Code;

use super::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn diffs_and_proofs_of_stored_trees_equal_the_merkle_cores() {
    let mut stack = TestStack::new();
    let mut c = start(&mut stack, &[]).await;
    let mut t = wide_tree(6, 12);
    let old = t.tree.clone();
    push(&mut c, "docs", &t).await;
    t.edit("d01/e0/f000", "modified");
    t.edit("d02/new/deep/file", "added");
    fs::remove_dir_all(t.dir.path().join("d03")).expect("rm");
    fs::remove_file(t.dir.path().join("d04/e1/f001")).expect("rm");
    fs::create_dir_all(t.dir.path().join("d04/e1/f001")).expect("file becomes a directory");
    write(t.dir.path(), "d04/e1/f001/inner", "x");
    t.rebuild();
    push(&mut c, "docs", &t).await;

    let mut stream = c
        .diff_snapshots(DiffSnapshotsRequest {
            old_root_hash: old.root.to_hex(),
            new_root_hash: t.tree.root.to_hex(),
        })
        .await
        .expect("diff")
        .into_inner();
    let mut got = Vec::new();
    while let Some(batch) = stream.message().await.expect("batch") {
        got.extend(
            batch
                .changes
                .iter()
                .map(|ch| change_from_proto(ch).expect("change")),
        );
    }
    let expected = diff_all(&old, old.root, &t.tree, t.tree.root).expect("core diff");
    assert!(expected.len() > 10, "a diff with every kind of change");
    assert_eq!(got, expected);

    for path in [
        "d01/e0/f000",
        "d02/new/deep/file",
        "d04/e1/f001/inner",
        "d05",
    ] {
        let proof = c
            .get_inclusion_proof(GetInclusionProofRequest {
                root_hash: t.tree.root.to_hex(),
                path: path.into(),
                ..Default::default()
            })
            .await
            .expect("proof")
            .into_inner()
            .proof
            .expect("proof");
        let proof = proof_from_proto(&proof).expect("decodes");
        let expected =
            prove(&t.tree, t.tree.root, t.tree.profile, path.as_bytes()).expect("core proof");
        assert_eq!(proof, expected, "{path}");
        proof.verify().expect("verifies");
    }
    let err = c
        .get_inclusion_proof(GetInclusionProofRequest {
            root_hash: t.tree.root.to_hex(),
            path: "d03/e0/f000".into(),
            ..Default::default()
        })
        .await
        .expect_err("removed");
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn directories_snapshots_and_sources_come_in_pages_with_tamper_safe_tokens() {
    let mut stack = TestStack::new();
    let mut c = start(&mut stack, &[]).await;
    let files: Vec<(String, String)> = (0..2500)
        .map(|i| (format!("big/f{i:05}"), i.to_string()))
        .collect();
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(p, b)| (p.as_str(), b.as_str()))
        .collect();
    let mut t = Tree::new(&refs);
    push(&mut c, "docs", &t).await;
    let root = t.tree.root.to_hex();

    let mut names = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = c
            .list_directory(ListDirectoryRequest {
                root_hash: root.clone(),
                path: "big".into(),
                page_size: 1000,
                page_token: token,
                ..Default::default()
            })
            .await
            .expect("page")
            .into_inner();
        pages += 1;
        names.extend(page.entries.into_iter().map(|e| e.name));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(
        names,
        files
            .iter()
            .map(|(p, _)| p[4..].to_owned())
            .collect::<Vec<_>>()
    );
    let whole = c
        .list_directory(ListDirectoryRequest {
            root_hash: root.clone(),
            path: "big".into(),
            page_size: 50_000,
            ..Default::default()
        })
        .await
        .expect("clamped")
        .into_inner();
    assert_eq!(
        whole.entries.len(),
        2500,
        "over the maximum is clamped to 10000, more than this has"
    );

    let first = c
        .list_directory(ListDirectoryRequest {
            root_hash: root.clone(),
            path: "big".into(),
            page_size: 10,
            ..Default::default()
        })
        .await
        .expect("page")
        .into_inner();
    let mut tampered = first.next_page_token.clone().into_bytes();
    tampered[4] = if tampered[4] == b'a' { b'b' } else { b'a' };
    let tampered = String::from_utf8(tampered).expect("hex");
    for (path, token) in [
        ("big", tampered.as_str()),
        ("", first.next_page_token.as_str()),
    ] {
        let err = c
            .list_directory(ListDirectoryRequest {
                root_hash: root.clone(),
                path: path.into(),
                page_token: token.into(),
                ..Default::default()
            })
            .await
            .expect_err("not this listing's token");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().starts_with("page_token: "),
            "{}",
            err.message()
        );
    }

    for i in 0..4 {
        t.edit("small", &i.to_string());
        push(&mut c, "docs", &t).await;
    }
    push(&mut c, "web", &Tree::new(&[("i", "1")])).await;
    let page = c
        .list_snapshots(ListSnapshotsRequest {
            source: "docs".into(),
            page_size: 2,
            ..Default::default()
        })
        .await
        .expect("page")
        .into_inner();
    assert_eq!(
        page.snapshots
            .iter()
            .map(|s| s.sequence)
            .collect::<Vec<_>>(),
        [5, 4]
    );
    let next = c
        .list_snapshots(ListSnapshotsRequest {
            source: "docs".into(),
            page_size: 2,
            page_token: page.next_page_token.clone(),
            ..Default::default()
        })
        .await
        .expect("page")
        .into_inner();
    assert_eq!(
        next.snapshots
            .iter()
            .map(|s| s.sequence)
            .collect::<Vec<_>>(),
        [3, 2]
    );
    let err = c
        .list_snapshots(ListSnapshotsRequest {
            source: "web".into(),
            page_token: page.next_page_token,
            ..Default::default()
        })
        .await
        .expect_err("another source's token");
    assert_eq!(err.code(), Code::InvalidArgument);
    let future = c
        .list_snapshots(ListSnapshotsRequest {
            source: "docs".into(),
            start_time: Some(prost_types::Timestamp {
                seconds: 4_000_000_000,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .expect("a range with nothing in it")
        .into_inner();
    assert!(future.snapshots.is_empty());

    let sources = c
        .list_sources(ListSourcesRequest {
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .expect("sources")
        .into_inner();
    assert_eq!(sources.sources[0].source, "docs");
    assert_eq!(sources.sources[0].snapshot_count, 5);
    let rest = c
        .list_sources(ListSourcesRequest {
            page_size: 1,
            page_token: sources.next_page_token,
        })
        .await
        .expect("sources")
        .into_inner();
    assert_eq!(rest.sources[0].source, "web");
    assert!(rest.next_page_token.is_empty());

    let by_sequence = c
        .get_snapshot(GetSnapshotRequest {
            source: "docs".into(),
            sequence: 2,
            ..Default::default()
        })
        .await
        .expect("by sequence")
        .into_inner()
        .snapshot
        .expect("snapshot");
    let by_id = c
        .get_snapshot(GetSnapshotRequest {
            snapshot_id: by_sequence.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .expect("by id")
        .into_inner()
        .snapshot;
    assert_eq!(Some(by_sequence), by_id);
}

#[tokio::test(flavor = "multi_thread")]
async fn latest_roots_are_read_cache_first_with_an_x_cache_header() {
    let mut stack = TestStack::new();
    let mut c = start(&mut stack, &[]).await;
    push(&mut c, "docs", &Tree::new(&[("a", "1")])).await;
    // The sync wrote the latest root through: the first read hits.
    let header = |r: &tonic::Response<_>| -> String {
        r.metadata()
            .get("x-cache")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let hit = c
        .get_latest_root(GetLatestRootRequest {
            source: "docs".into(),
            ..Default::default()
        })
        .await
        .expect("read");
    assert_eq!(header(&hit), "HIT");
    // A fresh DbSync over a cleared cache: MISS, then HIT.
    let cache = stack.service_mut("cache").uri();
    let (code, _, err) = run_merklectl(&["cache", "clear", "--addr", &cache]);
    assert_eq!(code, Some(0), "{err}");
    let miss = c
        .get_latest_root(GetLatestRootRequest {
            source: "docs".into(),
            ..Default::default()
        })
        .await
        .expect("read");
    assert_eq!(header(&miss), "MISS");
    let hit = c
        .get_latest_root(GetLatestRootRequest {
            source: "docs".into(),
            ..Default::default()
        })
        .await
        .expect("read");
    assert_eq!(header(&hit), "HIT");
    assert_eq!(hit.into_inner().snapshot, miss.into_inner().snapshot);

    // As grpcurl -v shows it.
    let addr = stack.service_mut("db-sync").addr;
    let (ok, out, err) = run_grpcurl(
        &["-v", "-d", r#"{"source":"docs"}"#],
        addr,
        &["merkle.dbsync.v1.DbSyncService/GetLatestRoot"],
    );
    assert!(ok, "{err}");
    // Read once more since: from this replica's own copy.
    assert!(out.contains("x-cache: LOCAL"), "{out}");

    let err = c
        .get_latest_root(GetLatestRootRequest {
            source: "nope".into(),
            ..Default::default()
        })
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn cache_warmup_loads_the_latest_roots_through_db_sync() {
    let mut stack = TestStack::new();
    let mut c = start(&mut stack, &[]).await;
    push(&mut c, "docs", &Tree::new(&[("a", "1")])).await;
    push(&mut c, "web", &Tree::new(&[("b", "2")])).await;
    // A Cache that knows DbSync: Warmup goes through DbSync's WarmCache.
    let db_sync = stack.service_mut("db-sync").uri();
    let cache = stack.start_service("cache", &[("DB_SYNC_ADDR", db_sync.clone())]);
    cache.wait_for(ServingStatus::Serving).await;
    let cache = cache.uri();
    let (code, out, err) = run_merklectl(&["cache", "clear", "--addr", &cache]);
    assert_eq!(code, Some(0), "{err}{out}");
    let (code, out, err) = run_merklectl(&["cache", "warmup", "--addr", &cache, "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(json["sources_warmed"], 2);
    assert_eq!(
        json["entries_written"], 4,
        "a latest root and a root node per source"
    );
    let hit = c
        .get_latest_root(GetLatestRootRequest {
            source: "web".into(),
            ..Default::default()
        })
        .await
        .expect("read");
    assert_eq!(
        hit.metadata().get("x-cache").and_then(|v| v.to_str().ok()),
        Some("HIT")
    );
    let warmed = c
        .warm_cache(WarmCacheRequest {
            sources: vec!["docs".into()],
        })
        .await
        .expect("warm")
        .into_inner();
    assert_eq!(
        (
            warmed.sources_warmed,
            warmed.entries_written,
            warmed.cache_available
        ),
        (1, 2, true)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn merklectl_push_snapshots_ls_diff_and_prove_against_the_running_service() {
    let mut stack = TestStack::new();
    start(&mut stack, &[]).await;
    let addr = stack.service_mut("db-sync").uri();
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "etc/passwd", "root:x:0:0");
    write(dir.path(), "readme", "hello");
    let path = dir.path().to_str().expect("utf-8");
    let (code, out, err) = run_merklectl(&["push", "docs", path, "--addr", &addr]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("stored docs@1 root "), "{out}");
    write(dir.path(), "etc/passwd", "root:x:0:0:changed");
    write(dir.path(), "new/file", "n");
    let (code, out, _) = run_merklectl(&["push", "docs", path, "--addr", &addr, "--json"]);
    assert_eq!(code, Some(0));
    let pushed: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(pushed["snapshot"]["sequence"], 2);

    let (code, out, _) = run_merklectl(&["snapshots", "docs", "--addr", &addr]);
    assert_eq!(code, Some(0));
    assert_eq!(out.lines().count(), 3, "a header and two rows:\n{out}");
    let (code, out, _) = run_merklectl(&["snapshots", "--addr", &addr]);
    assert_eq!(code, Some(0));
    assert!(
        out.lines().nth(1).is_some_and(|l| l.starts_with("docs")),
        "{out}"
    );

    let (code, out, _) = run_merklectl(&["ls", "docs@1", "etc", "--addr", &addr]);
    assert_eq!(code, Some(0));
    assert!(out.contains("passwd") && out.starts_with("file"), "{out}");
    let (_, out, _) = run_merklectl(&["ls", "docs", "--addr", &addr, "--json"]);
    let names: Vec<String> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json")["name"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    assert_eq!(names, ["etc", "new", "readme"]);

    let (code, out, _) = run_merklectl(&["diff", "--stored", "docs", "1", "2", "--addr", &addr]);
    assert_eq!(code, Some(1), "differences: exit 1");
    assert_eq!(out, "M etc/passwd\nA new\nA new/file\n");
    let (code, _, _) = run_merklectl(&["diff", "--stored", "docs", "2", "latest", "--addr", &addr]);
    assert_eq!(code, Some(0));

    let (code, proof, err) =
        run_merklectl(&["prove", "--stored", "docs@2", "etc/passwd", "--addr", &addr]);
    assert_eq!(code, Some(0), "{err}");
    let file = dir.path().join("proof.json");
    fs::write(&file, proof).expect("write proof");
    let root = pushed["snapshot"]["root_hash"]
        .as_str()
        .expect("root")
        .to_owned();
    let (code, out, err) = run_merklectl(&[
        "verify-proof",
        file.to_str().expect("utf-8"),
        "--root",
        &root,
        "--content",
        dir.path().join("etc/passwd").to_str().expect("utf-8"),
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("valid: etc/passwd is a file"), "{out}");

    let (code, _, err) = run_merklectl(&["ls", "nope", "--addr", &addr]);
    assert_eq!(code, Some(2));
    assert!(err.contains("NOT_FOUND"), "{err}");
}
