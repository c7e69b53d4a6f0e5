//! Each service, started as its real binary, serves its contract with reflection: the real
//! grpcurl lists it beside health and reflection, and `describe` shows the contract's comments.

use integration_tests::{TestStack, run_grpcurl};

/// (service, an RPC, a phrase of that RPC's comment in the .proto)
const CASES: &[(&str, &str, &str)] = &[
    (
        "tree-builder",
        "BuildTree",
        "Builds the tree of a directory",
    ),
    ("db-sync", "SyncTree", "Stores a built tree"),
    (
        "cache",
        "InvalidatePattern",
        "Deletes every key of a namespace that matches a glob",
    ),
    (
        "scheduler",
        "WatchBuild",
        "The first message is the current state",
    ),
    ("discovery", "ListClients", "only new or changed"),
];

#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_lists_and_describes_every_service() {
    let mut stack = TestStack::new();
    for (name, rpc, phrase) in CASES {
        let service = stack.start_serving(name).await;
        let grpc_name = service.spec.grpc_name;

        let (ok, listed, err) = run_grpcurl(&[], service.addr, &["list"]);
        assert!(ok, "grpcurl list {name} failed: {err}");
        for expected in [
            grpc_name,
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ] {
            assert!(
                listed.lines().any(|line| line.trim() == expected),
                "{name}: `grpcurl list` lacks {expected}:\n{listed}"
            );
        }
        // Only its own service, not the other four.
        assert_eq!(
            listed.lines().filter(|l| l.starts_with("merkle.")).count(),
            1,
            "{listed}"
        );

        let symbol = format!("{grpc_name}.{rpc}");
        let (ok, described, err) = run_grpcurl(&[], service.addr, &["describe", &symbol]);
        assert!(ok, "grpcurl describe {symbol} failed: {err}");
        assert!(
            described.contains(phrase),
            "describe {symbol} does not show its comment ({phrase:?}):\n{described}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_are_described_with_field_comments() {
    let mut stack = TestStack::new();
    let service = stack.start_serving("tree-builder").await;
    let (ok, described, err) = run_grpcurl(
        &[],
        service.addr,
        &["describe", "merkle.treebuilder.v1.BuildTreeRequest"],
    );
    assert!(ok, "{err}");
    assert!(described.contains("gitignore syntax"), "{described}");
    assert!(described.contains("exclude_patterns"), "{described}");
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_sees_errors_that_name_the_field() {
    let mut stack = TestStack::new();
    let service = stack.start_serving("db-sync").await;
    for (body, code, field) in [
        (r#"{"source":"x"}"#, "NotFound", "source"),
        (
            r#"{"source":"x","page_size":20000}"#,
            "InvalidArgument",
            "page_size",
        ),
    ] {
        let (ok, _, err) = run_grpcurl(
            &["-d", body],
            service.addr,
            &["merkle.dbsync.v1.DbSyncService/GetHistoryProof"],
        );
        assert!(!ok);
        assert!(err.contains(code) && err.contains(field), "{body}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn health_check_answers_for_the_server_and_the_service() {
    let mut stack = TestStack::new();
    let service = stack.start_serving("discovery").await;
    for args in [
        r#"{}"#.to_owned(),
        format!(r#"{{"service":"{}"}}"#, service.spec.grpc_name),
    ] {
        let (ok, out, err) = run_grpcurl(
            &["-d", &args],
            service.addr,
            &["grpc.health.v1.Health/Check"],
        );
        assert!(ok, "{err}");
        assert!(out.contains("\"SERVING\""), "{out}");
    }
}
