//! TreeBuilder through real gRPC: the BuildTree stream (progress, node batches under 4 MiB,
//! one result), bad input, symlinked paths, VerifyTree, cancellation, and SIGTERM during a
//! build.

use std::{
    collections::HashMap,
    fs,
    path::Path,
    time::{Duration, Instant},
};

use integration_tests::{ClientAuth, RunningService, ServingStatus, TestStack, tail};
use merkle_core::{BuildOptions, Builder, Digest, DirNode, Profile};
use merkle_proto::{
    common::v1::{BuildPhase, ChangeType, Profile as PbProfile, TreeNode},
    treebuilder::v1::{
        BuildResult, BuildTreeRequest, VerifyTreeRequest, build_tree_response::Event,
        tree_builder_service_client::TreeBuilderServiceClient,
    },
};
use merkle_shared::convert::entry_from_proto;
use nix::sys::signal::Signal;
use tonic::{Code, transport::Channel};

fn write(path: &Path, content: &[u8]) {
    fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    fs::write(path, content).expect("write");
}

fn client(service: &RunningService) -> TreeBuilderServiceClient<ClientAuth<Channel>> {
    // The default 4 MiB decoding limit: a larger message from the server fails the call.
    TreeBuilderServiceClient::new(service.channel())
}

/// Everything a BuildTree stream carried.
#[derive(Default)]
struct Streamed {
    progress: Vec<merkle_proto::common::v1::BuildProgress>,
    parts: Vec<TreeNode>,
    result: Option<BuildResult>,
    after_result: usize,
}

async fn build_tree(
    client: &mut TreeBuilderServiceClient<ClientAuth<Channel>>,
    request: BuildTreeRequest,
) -> Result<Streamed, tonic::Status> {
    let mut stream = client.build_tree(request).await?.into_inner();
    let mut out = Streamed::default();
    while let Some(message) = stream.message().await? {
        if out.result.is_some() {
            out.after_result += 1;
        }
        match message.event.expect("every message has an event") {
            Event::Progress(p) => out.progress.push(p),
            Event::Nodes(batch) => out.parts.extend(batch.nodes),
            Event::Result(r) => out.result = Some(r),
        }
    }
    Ok(out)
}

/// Reassembles split nodes and checks each hashes to its claimed hash.
fn nodes_of(parts: Vec<TreeNode>, profile: Profile) -> HashMap<Digest, DirNode> {
    let mut nodes: HashMap<Digest, DirNode> = HashMap::new();
    let mut open: Option<(Digest, DirNode)> = None;
    for part in parts {
        let hash: Digest = part.hash.parse().expect("hex hash");
        let entries: Vec<_> = part
            .entries
            .iter()
            .map(|e| entry_from_proto(e, profile == Profile::Full).expect("valid entry"))
            .collect();
        let (h, mut node) = open.take().unwrap_or((hash, DirNode::default()));
        assert_eq!(h, hash, "a split node's parts are consecutive");
        node.entries.extend(entries);
        if part.more_entries {
            open = Some((hash, node));
        } else {
            assert_eq!(
                node.hash(profile).expect("valid node"),
                hash,
                "node content matches its hash"
            );
            assert!(nodes.insert(hash, node).is_none(), "each node is sent once");
        }
    }
    assert!(open.is_none(), "no split node is left unfinished");
    nodes
}

fn request(path: &Path) -> BuildTreeRequest {
    BuildTreeRequest {
        path: path.display().to_string(),
        include_nodes: true,
        ..BuildTreeRequest::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn build_tree_streams_progress_nodes_and_one_final_result() {
    let mut stack = TestStack::new();
    let tree = stack.dir().join("tree");
    for i in 0..300 {
        write(
            &tree.join(format!("d{}/e{}/f{i}.txt", i % 5, i % 3)),
            format!("content {i}").as_bytes(),
        );
    }
    std::os::unix::fs::symlink("d0", tree.join("link")).expect("symlink");
    let service = stack.start_serving("tree-builder").await;
    let streamed = build_tree(&mut client(service), request(&tree))
        .await
        .expect("build");

    let result = streamed.result.expect("a final result");
    assert_eq!(streamed.after_result, 0, "the result is the last message");
    let local = Builder::new(BuildOptions::default())
        .build(&tree)
        .expect("local build");
    assert_eq!(
        result.root_hash,
        local.root.to_hex(),
        "the service's root equals the library's"
    );
    let stats = result.stats.expect("stats");
    assert_eq!(
        (stats.file_count, stats.symlink_count, stats.dir_count),
        (300, 1, 1 + 5 + 15)
    );
    assert_eq!(
        result.resolved_path,
        tree.canonicalize()
            .expect("canonical")
            .display()
            .to_string()
    );
    assert_eq!(result.profile, PbProfile::Content as i32);

    let last = streamed.progress.last().expect("progress was reported");
    assert_eq!(last.phase, BuildPhase::Done as i32);
    assert_eq!((last.files_done, last.files_total), (300, 300));

    let nodes = nodes_of(streamed.parts, Profile::Content);
    assert_eq!(nodes.len() as u64, result.node_count);
    assert!(nodes.contains_key(&local.root), "the root node is sent");
}

#[tokio::test(flavor = "multi_thread")]
async fn no_message_exceeds_4_mib_however_large_a_directory() {
    let mut stack = TestStack::new();
    let tree = stack.dir().join("wide");
    fs::create_dir_all(&tree).expect("mkdir");
    // One directory whose node alone is about 8 MiB in the contract's encoding.
    for i in 0..60_000 {
        fs::write(
            tree.join(format!(
                "a-rather-long-file-name-to-make-entries-big-{i:06}"
            )),
            b"",
        )
        .expect("write");
    }
    let service = stack.start_serving("tree-builder").await;
    let streamed = build_tree(&mut client(service), request(&tree))
        .await
        .expect("every message fits in 4 MiB");
    assert!(
        streamed.parts.iter().any(|p| p.more_entries),
        "the big node was split"
    );
    let result = streamed.result.expect("result");
    let nodes = nodes_of(streamed.parts, Profile::Content);
    assert_eq!(nodes.len(), 1);
    assert_eq!(
        nodes.keys().next().map(Digest::to_hex),
        Some(result.root_hash)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_a_clear_status_naming_the_field() {
    let mut stack = TestStack::new();
    let inside = stack.dir().join("inside");
    write(&inside.join("file"), b"x");
    let outside = tempfile::tempdir().expect("another tempdir");
    std::os::unix::fs::symlink(outside.path(), inside.join("escape")).expect("symlink");
    let service = stack.start_serving("tree-builder").await;
    let mut client = client(service);

    let cases: Vec<(BuildTreeRequest, Code, &str)> = vec![
        (BuildTreeRequest::default(), Code::InvalidArgument, "path"),
        (
            request(outside.path()),
            Code::PermissionDenied,
            "outside the allowed roots",
        ),
        (
            request(&inside.join("escape")),
            Code::PermissionDenied,
            "outside the allowed roots",
        ),
        (
            request(&inside.join("../inside")),
            Code::PermissionDenied,
            "'..'",
        ),
        (
            request(&inside.join("missing")),
            Code::NotFound,
            "does not exist",
        ),
        (
            request(&inside.join("file")),
            Code::InvalidArgument,
            "not a directory",
        ),
        (
            BuildTreeRequest {
                exclude_patterns: vec!["[z-a]".into()],
                ..request(&inside)
            },
            Code::InvalidArgument,
            "exclude_patterns[0]: is not a valid gitignore pattern",
        ),
        (
            BuildTreeRequest {
                profile: 42,
                ..request(&inside)
            },
            Code::InvalidArgument,
            "profile",
        ),
    ];
    for (req, code, words) in cases {
        let path = req.path.clone();
        let status = match build_tree(&mut client, req).await {
            Err(status) => status,
            Ok(_) => panic!("{path:?} should fail"),
        };
        assert_eq!(status.code(), code, "{path:?}: {}", status.message());
        assert!(
            status.message().contains(words),
            "{path:?}: {:?} lacks {words:?}",
            status.message()
        );
    }

    let status = client
        .verify_tree(VerifyTreeRequest {
            path: inside.display().to_string(),
            expected_root_hash: "not-a-hash".into(),
            ..VerifyTreeRequest::default()
        })
        .await
        .expect_err("bad hash");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("expected_root_hash:"),
        "{}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_symlinked_path_is_resolved_once_and_reported() {
    let mut stack = TestStack::new();
    let real = stack.dir().join("real");
    write(&real.join("f"), b"x");
    let link = stack.dir().join("link-to-real");
    std::os::unix::fs::symlink(&real, &link).expect("symlink");
    let service = stack.start_serving("tree-builder").await;
    let streamed = build_tree(&mut client(service), request(&link))
        .await
        .expect("build");
    let result = streamed.result.expect("result");
    assert_eq!(
        result.resolved_path,
        real.canonicalize()
            .expect("canonical")
            .display()
            .to_string()
    );
    assert_eq!(result.stats.expect("stats").file_count, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_tree_lists_the_paths_that_differ_from_a_tree_db_sync_stores() {
    let mut stack = TestStack::new();
    let tree = stack.dir().join("tree");
    write(&tree.join("a/keep.txt"), b"same");
    write(&tree.join("a/deep/edit.txt"), b"before");
    write(&tree.join("gone/x"), b"bye");
    // The snapshot is made here and stored in DbSync: TreeBuilder never built it.
    let db_sync = stack.start_serving("db-sync").await.uri();
    let (outcome, stored) =
        merklectl::local::build_tree(&tree, BuildOptions::default()).expect("build");
    let mut store = merkle_proto::dbsync::v1::db_sync_service_client::DbSyncServiceClient::new(
        merklectl::remote::connect(&db_sync).expect("channel"),
    );
    merklectl::stored::upload(&mut store, "tree", "", &stored, &outcome.stats)
        .await
        .expect("stored");

    write(&tree.join("a/deep/edit.txt"), b"after!");
    fs::remove_dir_all(tree.join("gone")).expect("rm");
    let service = stack.start_service("tree-builder", &[("DB_SYNC_ADDR", db_sync)]);
    service.wait_for(ServingStatus::Serving).await;
    let verify = client(service)
        .verify_tree(VerifyTreeRequest {
            path: tree.display().to_string(),
            expected_root_hash: stored.root.to_hex(),
            ..VerifyTreeRequest::default()
        })
        .await
        .expect("verify")
        .into_inner();
    assert!(!verify.matches);
    assert!(
        verify.differences_complete,
        "the stored tree was read from DbSync"
    );
    let got: Vec<(String, i32)> = verify
        .differences
        .iter()
        .map(|d| (d.path.clone(), d.change_type))
        .collect();
    assert_eq!(
        got,
        vec![
            ("a/deep/edit.txt".to_owned(), ChangeType::Modified as i32),
            ("gone".to_owned(), ChangeType::Removed as i32),
            ("gone/x".to_owned(), ChangeType::Removed as i32),
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_tree_lists_the_paths_that_differ_from_a_previous_build() {
    let mut stack = TestStack::new();
    let tree = stack.dir().join("tree");
    write(&tree.join("a/keep.txt"), b"same");
    write(&tree.join("a/edit.txt"), b"before");
    write(&tree.join("gone.txt"), b"bye");
    let service = stack.start_serving("tree-builder").await;
    let mut client = client(service);
    let before = build_tree(
        &mut client,
        BuildTreeRequest {
            include_nodes: false,
            ..request(&tree)
        },
    )
    .await
    .expect("build")
    .result
    .expect("result");

    write(&tree.join("a/edit.txt"), b"after!");
    fs::remove_file(tree.join("gone.txt")).expect("rm");
    write(&tree.join("new/file"), b"hello");

    let mut verify_against = async |expected: &str| {
        client
            .verify_tree(VerifyTreeRequest {
                path: tree.display().to_string(),
                expected_root_hash: expected.to_owned(),
                ..VerifyTreeRequest::default()
            })
            .await
            .expect("verify")
            .into_inner()
    };
    let verify = verify_against(&before.root_hash).await;
    assert!(!verify.matches);
    assert!(verify.differences_complete);
    let got: Vec<(String, i32)> = verify
        .differences
        .iter()
        .map(|d| (d.path.clone(), d.change_type))
        .collect();
    assert_eq!(
        got,
        vec![
            ("a/edit.txt".to_owned(), ChangeType::Modified as i32),
            ("gone.txt".to_owned(), ChangeType::Removed as i32),
            ("new".to_owned(), ChangeType::Added as i32),
            ("new/file".to_owned(), ChangeType::Added as i32),
        ]
    );

    let same = verify_against(&verify.actual_root_hash).await;
    assert!(same.matches && same.differences.is_empty());

    // A root TreeBuilder never built: the roots are compared, no paths can be listed.
    let unknown = verify_against(&"0".repeat(64)).await;
    assert!(!unknown.matches && !unknown.differences_complete && unknown.differences.is_empty());
}

/// Sparse files: large to hash (seconds), cheap to make.
fn big_sparse_tree(dir: &Path, files: u32, mib_each: u64) {
    fs::create_dir_all(dir).expect("mkdir");
    for i in 0..files {
        let f = fs::File::create(dir.join(format!("big{i}"))).expect("create");
        f.set_len(mib_each << 20).expect("set_len");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_call_stops_the_build() {
    let mut stack = TestStack::new();
    let tree = stack.dir().join("big");
    big_sparse_tree(&tree, 8, 2048);
    let service = stack.start_serving("tree-builder").await;
    let log = service.log.clone();
    let mut stream = client(service)
        .build_tree(BuildTreeRequest {
            disable_stat_cache: true,
            ..request(&tree)
        })
        .await
        .expect("started")
        .into_inner();
    let first = stream
        .message()
        .await
        .expect("stream")
        .expect("a first message");
    assert!(matches!(first.event, Some(Event::Progress(_))));
    drop(stream);

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = fs::read_to_string(&log).unwrap_or_default();
        if text.contains("build failed") && text.contains("cancelled") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the build did not stop:\n{}",
            tail(&log)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_an_in_flight_build_finish_then_exits_zero() {
    let mut stack = TestStack::new();
    let tree = stack.dir().join("big");
    big_sparse_tree(&tree, 2, 512);
    stack.start_serving("tree-builder").await;
    let service = stack.service_mut("tree-builder");
    let mut stream = client(service)
        .build_tree(BuildTreeRequest {
            disable_stat_cache: true,
            ..request(&tree)
        })
        .await
        .expect("started")
        .into_inner();
    stream
        .message()
        .await
        .expect("stream")
        .expect("first message");

    service.process.signal(Signal::SIGTERM);
    let signalled = Instant::now();
    let mut result = None;
    while let Some(message) = stream
        .message()
        .await
        .expect("the call completes despite SIGTERM")
    {
        if let Some(Event::Result(r)) = message.event {
            result = Some(r);
        }
    }
    let result = result.expect("the in-flight build delivered its result");
    assert_eq!(result.stats.expect("stats").total_bytes, 1 << 30);

    let status = service
        .process
        .wait_timeout(Duration::from_secs(10).saturating_sub(signalled.elapsed()))
        .unwrap_or_else(|| panic!("still running 10 s after SIGTERM:\n{}", tail(&service.log)));
    assert_eq!(status.code(), Some(0), "{}", tail(&service.log));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_independent_python_grpcio_client_gets_the_same_root() {
    let mut stack = TestStack::new();
    let tree = stack.dir().join("tree");
    write(&tree.join("a/b.txt"), b"from python");
    write(&tree.join("c"), b"c");
    let expected = Builder::new(BuildOptions::default())
        .build(&tree)
        .expect("build")
        .root;
    let service = stack.start_serving("tree-builder").await;
    let python = integration_tests::workspace_root().join(".tools/venv/bin/python");
    let script = integration_tests::workspace_root().join("integration-tests/python/interop.py");
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(service.addr.to_string())
        .arg(&tree)
        .arg(expected.to_hex())
        .env(
            "MERKLE_TOKEN_FILE",
            integration_tests::credentials().token_file("operator"),
        )
        .output()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "running {} (scripts/install-tools.sh installs it): {e}",
                python.display()
            )
        });
    assert!(
        out.status.success(),
        "python client failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn trees_over_the_recent_entries_budget_are_compared_by_root_only() {
    let mut stack = TestStack::new();
    let tree = stack.dir().join("tree");
    for i in 0..5 {
        write(&tree.join(format!("f{i}")), b"x");
    }
    stack.start_service("tree-builder", &[("RECENT_ENTRIES", "3".to_owned())]);
    let service = stack.service_mut("tree-builder");
    service
        .wait_for(integration_tests::ServingStatus::Serving)
        .await;
    let mut client = client(service);
    let before = build_tree(&mut client, request(&tree))
        .await
        .expect("build")
        .result
        .expect("result");
    write(&tree.join("f0"), b"changed");
    let verify = client
        .verify_tree(VerifyTreeRequest {
            path: tree.display().to_string(),
            expected_root_hash: before.root_hash,
            ..VerifyTreeRequest::default()
        })
        .await
        .expect("verify")
        .into_inner();
    assert!(!verify.matches);
    assert!(!verify.differences_complete && verify.differences.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn builds_beyond_the_limit_wait_in_the_queued_phase() {
    let mut stack = TestStack::new();
    let big = stack.dir().join("big");
    big_sparse_tree(&big, 4, 1024);
    let small = stack.dir().join("small");
    write(&small.join("f"), b"x");
    stack.start_service("tree-builder", &[("MAX_CONCURRENT_BUILDS", "1".to_owned())]);
    let service = stack.service_mut("tree-builder");
    service
        .wait_for(integration_tests::ServingStatus::Serving)
        .await;

    let mut first = client(service)
        .build_tree(BuildTreeRequest {
            disable_stat_cache: true,
            ..request(&big)
        })
        .await
        .expect("first build")
        .into_inner();
    first
        .message()
        .await
        .expect("stream")
        .expect("the first build runs");

    let mut second = client(service)
        .build_tree(request(&small))
        .await
        .expect("second")
        .into_inner();
    let message = second.message().await.expect("stream").expect("a message");
    match message.event {
        Some(Event::Progress(p)) => assert_eq!(p.phase, BuildPhase::Queued as i32),
        other => panic!("expected a QUEUED progress event, got {other:?}"),
    }
    // Cancelling the first frees its slot: the second then runs to its result.
    drop(first);
    let mut result = None;
    while let Some(message) = second.message().await.expect("stream") {
        if let Some(Event::Result(r)) = message.event {
            result = Some(r);
        }
    }
    assert_eq!(result.expect("result").stats.expect("stats").file_count, 1);
}

/// Builds `tree` and returns the result and its nodes.
async fn built(
    client: &mut TreeBuilderServiceClient<ClientAuth<Channel>>,
    request: BuildTreeRequest,
) -> (BuildResult, HashMap<Digest, DirNode>) {
    let streamed = build_tree(client, request).await.expect("build");
    let nodes = nodes_of(streamed.parts, Profile::Content);
    (streamed.result.expect("a final result"), nodes)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rebuild_reads_only_what_changed_since_the_last_build() {
    let mut stack = TestStack::new();
    let tree = stack.dir().join("tree");
    let watching = stack.start_serving("tree-builder").await;
    let mut watching = client(watching);
    let unwatched = stack.start_service("tree-builder", &[("WATCH_TREES", "0".to_owned())]);
    unwatched.wait_for(ServingStatus::Serving).await;
    let mut unwatched = client(unwatched);
    // Written just before the builds, so that the stat cache cannot trust them yet.
    for i in 0..200 {
        write(
            &tree.join(format!("d{}/f{i}", i % 10)),
            format!("content {i}").as_bytes(),
        );
    }

    let (first, _) = built(&mut watching, request(&tree)).await;
    assert_eq!(first.files_hashed, 200);
    built(&mut unwatched, request(&tree)).await;
    // Right away: every file is too new for the stat cache to trust (the racy-git rule), so
    // only the change events can tell that 199 of them are unchanged.
    write(&tree.join("d3/f3"), b"changed");
    let (second, nodes) = built(&mut watching, request(&tree)).await;
    assert_eq!(second.files_hashed, 1, "only the changed file is read");
    let (by_stat, _) = built(&mut unwatched, request(&tree)).await;
    assert_eq!(
        by_stat.files_hashed, 200,
        "the stat cache trusts no new file"
    );

    let fresh = BuildTreeRequest {
        disable_stat_cache: true,
        ..request(&tree)
    };
    let (reread, reread_nodes) = built(&mut watching, fresh).await;
    assert_eq!(
        reread.files_hashed, 200,
        "disable_stat_cache reads every file"
    );
    assert_eq!(second.root_hash, reread.root_hash);
    assert_eq!(second.root_hash, by_stat.root_hash);
    assert_eq!(second.stats, reread.stats);
    assert_eq!(second.node_count, reread.node_count);
    assert_eq!(nodes, reread_nodes, "a rebuild streams the whole tree");
    assert_ne!(second.root_hash, first.root_hash);
}

#[tokio::test(flavor = "multi_thread")]
async fn check_path_says_whether_a_directory_may_be_built() {
    let mut stack = TestStack::new();
    let dir = stack.dir().join("docs");
    write(&dir.join("readme"), b"hi");
    let service = stack.start_serving("tree-builder").await;
    let client = client(service);
    let check = |path: String| {
        let mut client = client.clone();
        async move {
            client
                .check_path(merkle_proto::treebuilder::v1::CheckPathRequest { path })
                .await
                .map(|r| r.into_inner().resolved_path)
        }
    };
    let resolved = check(dir.display().to_string()).await.expect("allowed");
    assert_eq!(
        resolved,
        dir.canonicalize().expect("canonical").display().to_string()
    );
    assert_eq!(check("docs".into()).await.expect("relative"), resolved);
    for (path, code) in [
        ("/".to_owned(), Code::PermissionDenied),
        (format!("{}/../..", dir.display()), Code::PermissionDenied),
        (dir.join("missing").display().to_string(), Code::NotFound),
        (
            dir.join("readme").display().to_string(),
            Code::InvalidArgument,
        ),
        (String::new(), Code::InvalidArgument),
    ] {
        let err = check(path.clone()).await.expect_err(&path);
        assert_eq!(err.code(), code, "{path}: {}", err.message());
        assert!(err.message().starts_with("path: "), "{}", err.message());
    }
}
