//! Hostile input, table-driven, against the real five services: every RPC of the contract gets
//! empty, oversized, malformed, out-of-range and hostile values. Each case names the status code
//! and a part of the message it must get (the field and the rule). Afterwards nothing was stored
//! (the rows of every table and the keys in Redis are as before), every process is alive and
//! SERVING, and no answer's message is longer than the 1 KiB the servers cut them to.

use std::time::Duration;

use integration_tests::{ServingStatus, TestStack, raw};
use merkle_proto::{
    cache::v1 as cache,
    common::v1::{DirectoryEntry, EntryKind, RetentionPolicy, TreeNode, TreeStats},
    dbsync::v1 as dbsync,
    discovery::v1 as discovery,
    scheduler::v1 as scheduler,
    treebuilder::v1 as treebuilder,
};
use merkle_shared::auth::policy::RULES;
use prost::Message;
use tonic::Code;

/// One hostile call and what it must get.
struct Case {
    rpc: &'static str,
    /// Who calls: a role, or a service for the calls only services make.
    caller: &'static str,
    messages: Vec<Vec<u8>>,
    code: Code,
    says: &'static str,
}

fn case(rpc: &'static str, message: impl Message, code: Code, says: &'static str) -> Case {
    Case {
        rpc,
        caller: "admin",
        messages: vec![message.encode_to_vec()],
        code,
        says,
    }
}

fn as_caller(mut case: Case, caller: &'static str) -> Case {
    case.caller = caller;
    case
}

fn stream(rpc: &'static str, messages: Vec<Vec<u8>>, code: Code, says: &'static str) -> Case {
    Case {
        rpc,
        caller: "admin",
        messages,
        code,
        says,
    }
}

const HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn d(seconds: i64, nanos: i32) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds, nanos })
}

fn big(n: usize) -> String {
    "x".repeat(n)
}

fn header(h: dbsync::SyncTreeHeader) -> Vec<u8> {
    dbsync::SyncTreeRequest {
        content: Some(dbsync::sync_tree_request::Content::Header(h)),
    }
    .encode_to_vec()
}

fn valid_header() -> dbsync::SyncTreeHeader {
    dbsync::SyncTreeHeader {
        source: "docs".into(),
        root_hash: HASH.into(),
        ..Default::default()
    }
}

/// A node whose one entry is named `name` (its hash made to match, so only the name is wrong).
fn node_named(name: &str) -> Vec<u8> {
    let entry = DirectoryEntry {
        name: name.into(),
        kind: EntryKind::File as i32,
        hash: HASH.into(),
        ..Default::default()
    };
    dbsync::SyncTreeRequest {
        content: Some(dbsync::sync_tree_request::Content::Nodes(
            treebuilder::NodeBatch {
                nodes: vec![TreeNode {
                    hash: HASH.into(),
                    entries: vec![entry],
                    more_entries: false,
                }],
            },
        )),
    }
    .encode_to_vec()
}

fn source(f: impl FnOnce(&mut scheduler::Source)) -> scheduler::CreateSourceRequest {
    let mut s = scheduler::Source {
        name: "hostile".into(),
        path: "/".into(),
        enabled: true,
        ..Default::default()
    };
    f(&mut s);
    scheduler::CreateSourceRequest { source: Some(s) }
}

fn cases(root: &str) -> Vec<Case> {
    use Code::{
        Internal, InvalidArgument, NotFound, OutOfRange, PermissionDenied, ResourceExhausted,
    };
    let sched = |m: &str| -> &'static str {
        Box::leak(format!("/merkle.scheduler.v1.SchedulerService/{m}").into_boxed_str())
    };
    let tb = |m: &str| -> &'static str {
        Box::leak(format!("/merkle.treebuilder.v1.TreeBuilderService/{m}").into_boxed_str())
    };
    let db = |m: &str| -> &'static str {
        Box::leak(format!("/merkle.dbsync.v1.DbSyncService/{m}").into_boxed_str())
    };
    let ca = |m: &str| -> &'static str {
        Box::leak(format!("/merkle.cache.v1.CacheService/{m}").into_boxed_str())
    };
    let di = |m: &str| -> &'static str {
        Box::leak(format!("/merkle.discovery.v1.DiscoveryService/{m}").into_boxed_str())
    };
    let root = root.to_owned();
    let path_in = move |p: &str| format!("{root}/{p}");
    let five_mib = vec![b'x'; 5 << 20];
    vec![
        // Scheduler
        case(
            sched("CreateSource"),
            scheduler::CreateSourceRequest::default(),
            InvalidArgument,
            "source: must be set",
        ),
        case(
            sched("CreateSource"),
            source(|s| s.name = "Bad Name".into()),
            InvalidArgument,
            "source.name",
        ),
        case(
            sched("CreateSource"),
            source(|s| s.name = big(10_000)),
            InvalidArgument,
            "source.name",
        ),
        case(
            sched("CreateSource"),
            source(|s| s.path = String::new()),
            InvalidArgument,
            "source.path: must not be empty",
        ),
        case(
            sched("CreateSource"),
            source(|s| s.exclude_patterns = vec!["[".into()]),
            InvalidArgument,
            "source.exclude_patterns[0]: has a '[' class",
        ),
        case(
            sched("CreateSource"),
            source(|s| s.exclude_patterns = vec!["a\0b".into()]),
            InvalidArgument,
            "source.exclude_patterns[0]: must not contain control",
        ),
        case(
            sched("CreateSource"),
            source(|s| {
                s.schedule = Some(scheduler::source::Schedule::Interval(
                    d(60, 2_000_000_000).expect("d"),
                ))
            }),
            InvalidArgument,
            "source.interval: nanos is 2000000000",
        ),
        case(
            sched("CreateSource"),
            source(|s| {
                s.schedule = Some(scheduler::source::Schedule::Interval(d(-60, 0).expect("d")))
            }),
            InvalidArgument,
            "source.interval: must not be negative",
        ),
        case(
            sched("CreateSource"),
            source(|s| s.jitter = d(i64::MAX, 0)),
            InvalidArgument,
            "source.jitter: must be at most 366 days",
        ),
        case(
            sched("CreateSource"),
            source(|s| s.deadline = d(1, -1)),
            InvalidArgument,
            "source.deadline: seconds and nanos must have the same sign",
        ),
        case(
            sched("CreateSource"),
            source(|s| {
                s.schedule = Some(scheduler::source::Schedule::Cron(scheduler::CronSchedule {
                    expression: "61 * * * *".into(),
                    time_zone: String::new(),
                }))
            }),
            InvalidArgument,
            "source.cron",
        ),
        case(
            sched("CreateSource"),
            source(|s| {
                s.schedule = Some(scheduler::source::Schedule::Cron(scheduler::CronSchedule {
                    expression: "0 3 * * *".into(),
                    time_zone: "Mars/Olympus".into(),
                }))
            }),
            InvalidArgument,
            "time_zone",
        ),
        case(
            sched("CreateSource"),
            source(|s| {
                s.retention = Some(RetentionPolicy {
                    keep_last: 0,
                    keep_within: d(1, 2_000_000_000),
                })
            }),
            InvalidArgument,
            "source.retention.keep_within: nanos",
        ),
        case(
            sched("CreateSource"),
            source(|s| s.profile = 99),
            InvalidArgument,
            "profile",
        ),
        case(
            sched("GetSource"),
            scheduler::GetSourceRequest::default(),
            InvalidArgument,
            "name",
        ),
        case(
            sched("GetSource"),
            scheduler::GetSourceRequest { name: big(10_000) },
            InvalidArgument,
            "name: ",
        ),
        case(
            sched("GetSource"),
            scheduler::GetSourceRequest {
                name: "nothing-here".into(),
            },
            NotFound,
            "name: no source named nothing-here",
        ),
        case(
            sched("ListSources"),
            scheduler::ListSourcesRequest {
                page_size: 10,
                page_token: "forged".into(),
            },
            InvalidArgument,
            "page_token",
        ),
        case(
            sched("UpdateSource"),
            scheduler::UpdateSourceRequest::default(),
            InvalidArgument,
            "source: must be set",
        ),
        case(
            sched("UpdateSource"),
            scheduler::UpdateSourceRequest {
                source: Some(scheduler::Source {
                    name: "hostile".into(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["name".into()],
                }),
            },
            InvalidArgument,
            "update_mask",
        ),
        case(
            sched("DeleteSource"),
            scheduler::DeleteSourceRequest::default(),
            InvalidArgument,
            "name",
        ),
        case(
            sched("DeleteSource"),
            scheduler::DeleteSourceRequest {
                name: "nothing-here".into(),
            },
            NotFound,
            "name: no source named",
        ),
        case(
            sched("TriggerBuild"),
            scheduler::TriggerBuildRequest::default(),
            InvalidArgument,
            "source",
        ),
        case(
            sched("TriggerBuild"),
            scheduler::TriggerBuildRequest {
                source: "nothing-here".into(),
            },
            NotFound,
            "nothing-here",
        ),
        case(
            sched("GetBuild"),
            scheduler::GetBuildRequest::default(),
            InvalidArgument,
            "build_id: must not be empty",
        ),
        case(
            sched("GetBuild"),
            scheduler::GetBuildRequest {
                build_id: "b\0".into(),
            },
            InvalidArgument,
            "build_id: must not contain control characters",
        ),
        case(
            sched("GetBuild"),
            scheduler::GetBuildRequest { build_id: big(300) },
            InvalidArgument,
            "build_id: is 300 bytes; at most 256",
        ),
        case(
            sched("ListBuilds"),
            scheduler::ListBuildsRequest {
                source: "Bad Name".into(),
                ..Default::default()
            },
            InvalidArgument,
            "source",
        ),
        case(
            sched("ListBuilds"),
            scheduler::ListBuildsRequest {
                page_token: "forged".into(),
                ..Default::default()
            },
            InvalidArgument,
            "page_token",
        ),
        case(
            sched("CancelBuild"),
            scheduler::CancelBuildRequest {
                build_id: "\n".into(),
            },
            InvalidArgument,
            "build_id: must not contain control characters",
        ),
        case(
            sched("WatchBuild"),
            scheduler::WatchBuildRequest {
                build_id: "\0".into(),
            },
            InvalidArgument,
            "build_id: must not contain control characters",
        ),
        // TreeBuilder
        as_caller(
            case(
                tb("BuildTree"),
                treebuilder::BuildTreeRequest::default(),
                InvalidArgument,
                "path: must not be empty",
            ),
            "operator",
        ),
        as_caller(
            case(
                tb("BuildTree"),
                treebuilder::BuildTreeRequest {
                    path: path_in("a\0b"),
                    ..Default::default()
                },
                InvalidArgument,
                "path: must not contain a NUL byte",
            ),
            "operator",
        ),
        as_caller(
            case(
                tb("BuildTree"),
                treebuilder::BuildTreeRequest {
                    path: path_in(&big(300)),
                    ..Default::default()
                },
                InvalidArgument,
                "path: a component is 300 bytes; at most 255",
            ),
            "operator",
        ),
        as_caller(
            case(
                tb("BuildTree"),
                treebuilder::BuildTreeRequest {
                    path: "d/".repeat(3000),
                    ..Default::default()
                },
                InvalidArgument,
                "path: is 6000 bytes; at most 4095",
            ),
            "operator",
        ),
        as_caller(
            case(
                tb("BuildTree"),
                treebuilder::BuildTreeRequest {
                    path: path_in("../.."),
                    ..Default::default()
                },
                PermissionDenied,
                "'..' component",
            ),
            "operator",
        ),
        as_caller(
            case(
                tb("BuildTree"),
                treebuilder::BuildTreeRequest {
                    path: "/etc".into(),
                    ..Default::default()
                },
                PermissionDenied,
                "outside the allowed roots",
            ),
            "operator",
        ),
        as_caller(
            case(
                tb("BuildTree"),
                treebuilder::BuildTreeRequest {
                    path: path_in(""),
                    exclude_patterns: vec!["[".into()],
                    ..Default::default()
                },
                InvalidArgument,
                "exclude_patterns[0]: has a '[' class",
            ),
            "operator",
        ),
        as_caller(
            case(
                tb("BuildTree"),
                treebuilder::BuildTreeRequest {
                    path: path_in(""),
                    profile: 42,
                    ..Default::default()
                },
                InvalidArgument,
                "profile",
            ),
            "operator",
        ),
        as_caller(
            case(
                tb("BuildTree"),
                treebuilder::BuildTreeRequest {
                    path: path_in(""),
                    build_id: "\0".into(),
                    ..Default::default()
                },
                InvalidArgument,
                "build_id: must not contain control",
            ),
            "operator",
        ),
        as_caller(
            case(
                tb("VerifyTree"),
                treebuilder::VerifyTreeRequest {
                    path: path_in(""),
                    expected_root_hash: "xyz".into(),
                    ..Default::default()
                },
                InvalidArgument,
                "expected_root_hash",
            ),
            "operator",
        ),
        as_caller(
            case(
                tb("VerifyTree"),
                treebuilder::VerifyTreeRequest {
                    path: "a\0".into(),
                    expected_root_hash: HASH.into(),
                    ..Default::default()
                },
                InvalidArgument,
                "path: must not contain a NUL byte",
            ),
            "operator",
        ),
        as_caller(
            case(
                tb("CheckPath"),
                treebuilder::CheckPathRequest {
                    path: path_in(&big(10_000)),
                },
                InvalidArgument,
                "path: ",
            ),
            "operator",
        ),
        as_caller(
            case(
                tb("CheckPath"),
                treebuilder::CheckPathRequest { path: "\0".into() },
                InvalidArgument,
                "path: must not contain a NUL byte",
            ),
            "operator",
        ),
        // DbSync
        case(
            db("FindMissingNodes"),
            dbsync::FindMissingNodesRequest {
                hashes: vec![HASH.into(); 10_001],
            },
            InvalidArgument,
            "hashes: has 10001 hashes; at most 10000",
        ),
        case(
            db("FindMissingNodes"),
            dbsync::FindMissingNodesRequest {
                hashes: vec!["XYZ".into()],
            },
            InvalidArgument,
            "hashes[0]",
        ),
        stream(
            db("SyncTree"),
            vec![],
            InvalidArgument,
            "header: the first message must be the header",
        ),
        stream(
            db("SyncTree"),
            vec![header(dbsync::SyncTreeHeader {
                root_hash: "nothex".into(),
                ..valid_header()
            })],
            InvalidArgument,
            "header.root_hash",
        ),
        stream(
            db("SyncTree"),
            vec![header(dbsync::SyncTreeHeader {
                source: "../etc".into(),
                ..valid_header()
            })],
            InvalidArgument,
            "header.source",
        ),
        stream(
            db("SyncTree"),
            vec![header(dbsync::SyncTreeHeader {
                build_id: "b\0".into(),
                ..valid_header()
            })],
            InvalidArgument,
            "header.build_id: must not contain control",
        ),
        stream(
            db("SyncTree"),
            vec![header(dbsync::SyncTreeHeader {
                stats: Some(TreeStats {
                    file_count: u64::MAX,
                    ..Default::default()
                }),
                ..valid_header()
            })],
            InvalidArgument,
            "header.stats.file_count: is 18446744073709551615; at most 9223372036854775807",
        ),
        stream(
            db("SyncTree"),
            vec![header(valid_header()), node_named("..")],
            InvalidArgument,
            "\"..\"",
        ),
        stream(
            db("SyncTree"),
            vec![header(valid_header()), node_named(".")],
            InvalidArgument,
            "\".\"",
        ),
        stream(
            db("SyncTree"),
            vec![header(valid_header()), node_named("a/b")],
            InvalidArgument,
            "'/'",
        ),
        stream(
            db("SyncTree"),
            vec![header(valid_header()), five_mib.clone()],
            ResourceExhausted,
            "the request message is too large",
        ),
        case(
            db("GetLatestRoot"),
            dbsync::GetLatestRootRequest::default(),
            InvalidArgument,
            "source",
        ),
        case(
            db("GetLatestRoot"),
            dbsync::GetLatestRootRequest {
                source: big(10_000),
                consistent: true,
            },
            InvalidArgument,
            "source: ",
        ),
        case(
            db("GetLatestRoot"),
            dbsync::GetLatestRootRequest {
                source: "none-stored".into(),
                consistent: true,
            },
            NotFound,
            "source: none-stored has no snapshots",
        ),
        case(
            db("GetSnapshot"),
            dbsync::GetSnapshotRequest::default(),
            InvalidArgument,
            "snapshot_id: set snapshot_id, or source and sequence",
        ),
        case(
            db("GetSnapshot"),
            dbsync::GetSnapshotRequest {
                snapshot_id: "abc".into(),
                ..Default::default()
            },
            InvalidArgument,
            "snapshot_id: must be a positive decimal number",
        ),
        case(
            db("GetSnapshot"),
            dbsync::GetSnapshotRequest {
                source: "docs".into(),
                sequence: u64::MAX,
                ..Default::default()
            },
            InvalidArgument,
            "sequence",
        ),
        case(
            db("ListSnapshots"),
            dbsync::ListSnapshotsRequest {
                source: "docs".into(),
                start_time: Some(prost_types::Timestamp {
                    seconds: 1,
                    nanos: -1,
                }),
                ..Default::default()
            },
            InvalidArgument,
            "start_time: nanos is -1",
        ),
        case(
            db("ListSnapshots"),
            dbsync::ListSnapshotsRequest {
                source: "docs".into(),
                end_time: Some(prost_types::Timestamp {
                    seconds: i64::MAX,
                    nanos: 0,
                }),
                ..Default::default()
            },
            InvalidArgument,
            "end_time: must be between",
        ),
        case(
            db("ListSnapshots"),
            dbsync::ListSnapshotsRequest {
                source: "docs".into(),
                page_token: "forged".into(),
                ..Default::default()
            },
            InvalidArgument,
            "page_token",
        ),
        case(
            db("ListSources"),
            dbsync::ListSourcesRequest {
                page_token: big(10_000),
                ..Default::default()
            },
            InvalidArgument,
            "page_token",
        ),
        case(
            db("ListDirectory"),
            dbsync::ListDirectoryRequest {
                root_hash: "bad".into(),
                ..Default::default()
            },
            InvalidArgument,
            "root_hash",
        ),
        case(
            db("ListDirectory"),
            dbsync::ListDirectoryRequest {
                root_hash: HASH.into(),
                ..Default::default()
            },
            NotFound,
            "root_hash: no stored tree has root",
        ),
        case(
            db("DiffSnapshots"),
            dbsync::DiffSnapshotsRequest {
                old_root_hash: big(10_000),
                new_root_hash: HASH.into(),
            },
            InvalidArgument,
            "old_root_hash",
        ),
        case(
            db("GetInclusionProof"),
            dbsync::GetInclusionProofRequest {
                root_hash: HASH.into(),
                ..Default::default()
            },
            InvalidArgument,
            "path: must name an entry below the root",
        ),
        case(
            db("GetDrift"),
            dbsync::GetDriftRequest {
                sources: vec!["a".into(); 100_000],
                ..Default::default()
            },
            InvalidArgument,
            "sources: has 100000 names; compare 2 to 1000",
        ),
        case(
            db("GetChangeActivity"),
            dbsync::GetChangeActivityRequest {
                sources: vec!["a".into(); 100_000],
                days: 0,
            },
            InvalidArgument,
            "sources: has 100000 names; name 1 to 100",
        ),
        case(
            db("GetLogCheckpoint"),
            dbsync::GetLogCheckpointRequest { size: u64::MAX },
            OutOfRange,
            "size: past the log's leaves",
        ),
        case(
            db("GetLogInclusionProof"),
            dbsync::GetLogInclusionProofRequest {
                leaf_index: u64::MAX,
                ..Default::default()
            },
            OutOfRange,
            "leaf_index: past the log's leaves",
        ),
        case(
            db("GetLogInclusionProof"),
            dbsync::GetLogInclusionProofRequest {
                source: "docs".into(),
                sequence: 0,
                ..Default::default()
            },
            InvalidArgument,
            "sequence: must be 1 or more with source",
        ),
        case(
            db("GetLogConsistencyProof"),
            dbsync::GetLogConsistencyProofRequest {
                old_size: 0,
                new_size: u64::MAX,
            },
            InvalidArgument,
            "old_size: must be at least 1",
        ),
        case(
            db("GetLogConsistencyProof"),
            dbsync::GetLogConsistencyProofRequest {
                old_size: 1,
                new_size: u64::MAX,
            },
            OutOfRange,
            "new_size: past the log's leaves",
        ),
        case(
            db("GetLogTile"),
            dbsync::GetLogTileRequest { path: big(10_000) },
            InvalidArgument,
            "path: is not a tlog-tiles path (too long)",
        ),
        case(
            db("GetLogTile"),
            dbsync::GetLogTileRequest {
                path: "tile/0/../../../etc/passwd".into(),
            },
            InvalidArgument,
            "path: \"tile/0/../../../etc/passwd\" is not a tlog-tiles path",
        ),
        case(
            db("WarmCache"),
            dbsync::WarmCacheRequest {
                sources: vec!["a".into(); 100_000],
            },
            InvalidArgument,
            "sources: has 100000 names; at most 1000",
        ),
        case(
            db("GetHistoryProof"),
            dbsync::GetHistoryProofRequest {
                source: "docs".into(),
                page_size: 20_000,
                ..Default::default()
            },
            InvalidArgument,
            "page_size: must be at most 10000",
        ),
        case(
            db("GetRetentionPolicy"),
            dbsync::GetRetentionPolicyRequest {
                source: "a b".into(),
            },
            InvalidArgument,
            "source",
        ),
        case(
            db("SetRetentionPolicy"),
            dbsync::SetRetentionPolicyRequest {
                source: "docs".into(),
                policy: Some(RetentionPolicy {
                    keep_last: 0,
                    keep_within: d(1, 2_000_000_000),
                }),
            },
            InvalidArgument,
            "policy.keep_within: nanos is 2000000000",
        ),
        case(
            db("SetRetentionPolicy"),
            dbsync::SetRetentionPolicyRequest {
                source: "docs".into(),
                policy: Some(RetentionPolicy {
                    keep_last: 0,
                    keep_within: d(1_000_000_000_000, 0),
                }),
            },
            InvalidArgument,
            "policy.keep_within: must be at most 100 years",
        ),
        case(
            db("SetRetentionPolicy"),
            dbsync::SetRetentionPolicyRequest {
                source: "docs".into(),
                policy: Some(RetentionPolicy {
                    keep_last: u32::MAX,
                    keep_within: None,
                }),
            },
            InvalidArgument,
            "policy.keep_last",
        ),
        // Cache
        case(
            ca("Get"),
            cache::GetRequest::default(),
            InvalidArgument,
            "namespace: must be set",
        ),
        case(
            ca("Get"),
            cache::GetRequest {
                namespace: 1,
                key: big(513),
            },
            InvalidArgument,
            "key: is 513 bytes; at most 512",
        ),
        as_caller(
            case(
                ca("Set"),
                cache::SetRequest {
                    namespace: 1,
                    key: "k".into(),
                    value: vec![1],
                    ttl: d(1, 2_000_000_000),
                    if_absent: false,
                },
                InvalidArgument,
                "ttl: nanos is 2000000000",
            ),
            "db-sync",
        ),
        as_caller(
            case(
                ca("Set"),
                cache::SetRequest {
                    namespace: 99,
                    key: "k".into(),
                    value: vec![1],
                    ttl: None,
                    if_absent: false,
                },
                InvalidArgument,
                "namespace: 99 is not a known namespace",
            ),
            "db-sync",
        ),
        as_caller(
            case(
                ca("Set"),
                cache::SetRequest {
                    namespace: 1,
                    key: "k".into(),
                    value: vec![1; (1 << 20) + 1],
                    ttl: None,
                    if_absent: false,
                },
                InvalidArgument,
                "value: is 1048577 bytes",
            ),
            "db-sync",
        ),
        as_caller(
            case(
                ca("Set"),
                cache::SetRequest {
                    namespace: 3,
                    key: "k".into(),
                    value: vec![1],
                    ttl: None,
                    if_absent: false,
                },
                PermissionDenied,
                "NAMESPACE_BUILD_STATUS is written only by scheduler",
            ),
            "db-sync",
        ),
        case(
            ca("Delete"),
            cache::DeleteRequest {
                namespace: 0,
                key: "k".into(),
            },
            InvalidArgument,
            "namespace: must be set",
        ),
        case(
            ca("GetMany"),
            cache::GetManyRequest {
                namespace: 1,
                keys: vec!["k".into(); 1001],
            },
            InvalidArgument,
            "keys: has 1001 items; at most 1000",
        ),
        as_caller(
            case(
                ca("SetMany"),
                cache::SetManyRequest {
                    namespace: 2,
                    entries: vec![cache::Entry {
                        key: String::new(),
                        found: true,
                        value: vec![1],
                    }],
                    ttl: None,
                },
                InvalidArgument,
                "entries[0].key: must not be empty",
            ),
            "db-sync",
        ),
        case(
            ca("InvalidatePattern"),
            cache::InvalidatePatternRequest {
                namespace: 2,
                pattern: "[abc".into(),
            },
            InvalidArgument,
            "pattern: ",
        ),
        case(
            ca("Clear"),
            cache::ClearRequest { namespace: 99 },
            InvalidArgument,
            "namespace: 99 is not a known namespace",
        ),
        case(
            ca("Warmup"),
            cache::WarmupRequest {
                sources: vec!["a".into(); 1001],
            },
            InvalidArgument,
            "sources: has 1001 items; at most 1000",
        ),
        stream(
            ca("GetStats"),
            vec![vec![0xff, 0xff, 0xff]],
            Internal,
            "failed to decode Protobuf message",
        ),
        stream(
            ca("GetStatus"),
            vec![five_mib.clone()],
            ResourceExhausted,
            "the request message is too large",
        ),
        as_caller(
            stream(
                ca("WatchLatestRoots"),
                vec![five_mib.clone()],
                ResourceExhausted,
                "the request message is too large",
            ),
            "db-sync",
        ),
        as_caller(
            case(
                ca("WatchLatestRoots"),
                cache::WatchLatestRootsRequest { ack: 5 },
                InvalidArgument,
                "ack: must be 0 in the first message",
            ),
            "db-sync",
        ),
        as_caller(
            stream(
                ca("WatchLatestRoots"),
                vec![],
                InvalidArgument,
                "the stream ended before its first message",
            ),
            "db-sync",
        ),
        // Discovery
        case(
            di("GetClient"),
            discovery::GetClientRequest::default(),
            InvalidArgument,
            "id",
        ),
        case(
            di("GetClient"),
            discovery::GetClientRequest { id: big(10_000) },
            InvalidArgument,
            "id",
        ),
        case(
            di("GetClient"),
            discovery::GetClientRequest {
                id: "no-such-node".into(),
            },
            NotFound,
            "no-such-node",
        ),
        stream(
            di("ListClients"),
            vec![vec![0x08]],
            Internal,
            "failed to decode Protobuf message",
        ),
        stream(
            di("WatchClients"),
            vec![five_mib],
            ResourceExhausted,
            "the request message is too large",
        ),
        // A retention policy needs an admin, even at creation.
        as_caller(
            case(
                sched("CreateSource"),
                source(|s| {
                    s.retention = Some(RetentionPolicy {
                        keep_last: 1,
                        keep_within: None,
                    })
                }),
                PermissionDenied,
                "source.retention (a retention policy) needs the admin role",
            ),
            "operator",
        ),
    ]
}

/// What is stored: rows of every table of both schemas, and the keys of this deployment.
async fn stored(stack: &TestStack) -> Vec<(String, i64)> {
    let db = stack.sql().await;
    let tables: Vec<String> = db
        .query(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename",
            &[],
        )
        .await
        .expect("tables")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut counts = Vec::new();
    for table in tables {
        let n: i64 = db
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .expect("count")
            .get(0);
        counts.push((table, n));
    }
    let url = stack.redis.as_ref().expect("redis").url();
    let mut redis = redis::Client::open(url)
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let keys: i64 = redis::cmd("DBSIZE")
        .query_async(&mut redis)
        .await
        .expect("DBSIZE");
    counts.push(("redis keys".into(), keys));
    counts
}

#[tokio::test(flavor = "multi_thread")]
async fn every_rpc_refuses_hostile_input_with_the_field_and_the_rule_and_stores_nothing() {
    let mut stack = TestStack::new();
    stack.start_all().await;
    let root = stack.dir().display().to_string();
    let cases = cases(&root);
    // Every RPC of the contract is in the table.
    for rule in RULES {
        assert!(
            cases.iter().any(|c| c.rpc == rule.path()),
            "no hostile case for {}",
            rule.path()
        );
    }
    // Settle the start-up writes (the Cache's warm-up, Discovery's list) before counting.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = stored(&stack).await;
    let mut failures = Vec::new();
    for case in &cases {
        let service = stack.serving(
            case.rpc
                .trim_start_matches('/')
                .split('/')
                .next()
                .expect("service"),
        );
        let answer = raw::call(
            service.channel_as(case.caller),
            case.rpc,
            case.messages.clone(),
            Duration::from_secs(10),
        )
        .await;
        match answer {
            Err(status) if status.code() == case.code && status.message().contains(case.says) => {
                if status.message().len() > 1024 {
                    failures.push(format!(
                        "{}: a {}-byte message",
                        case.rpc,
                        status.message().len()
                    ));
                }
            }
            Err(status) => failures.push(format!(
                "{} (wants {:?} saying {:?}): {:?} {:.300}",
                case.rpc,
                case.code,
                case.says,
                status.code(),
                status.message()
            )),
            Ok(_) => failures.push(format!(
                "{} (wants {:?} saying {:?}): accepted",
                case.rpc, case.code, case.says
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} hostile calls got the wrong answer:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    assert_eq!(
        stored(&stack).await,
        before,
        "a hostile call stored something"
    );
    for service in stack.services() {
        assert!(
            !process_exited(service),
            "{} exited during the hostile calls",
            service.spec.name
        );
        service.wait_for(ServingStatus::Serving).await;
    }
}

fn process_exited(service: &integration_tests::RunningService) -> bool {
    !integration_tests::process_exists(service.process.pid())
}
