//! Observability end to end, with the five real services exporting to a real OTLP/gRPC
//! receiver (the one `merklectl up` runs) on loopback: one triggered fleet build is one trace
//! across all five services with no orphan span and one root, PostgreSQL and Redis spans
//! follow the database conventions, `GetBuild` returns the trace id, a caller's `traceparent`
//! (sent by grpcurl) is continued, a collector that is down does not slow builds, and
//! `/metrics` serves the RPC and cache series.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use integration_tests::{ServingStatus, TestStack, free_port, run_grpcurl, tail};
use merkle_proto::scheduler::v1::{
    Build, BuildState, CreateSourceRequest, FleetMode, Source, TriggerBuildRequest,
    scheduler_service_client::SchedulerServiceClient,
};
use merkle_shared::client::Channel;
use merklectl::traces::{Receiver, TraceSpan};

type Client = SchedulerServiceClient<Channel>;

const SERVICES: [&str; 5] = [
    "merkle-scheduler",
    "merkle-tree-builder",
    "merkle-db-sync",
    "merkle-cache",
    "merkle-discovery",
];

/// The receiver on a free loopback port, and the environment that points a service at it.
async fn receiver() -> (Receiver, Vec<(&'static str, String)>) {
    let port = free_port().expect("port");
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind");
    let receiver = Receiver::default();
    receiver.serve(listener);
    (receiver, otlp_env(port))
}

fn otlp_env(port: u16) -> Vec<(&'static str, String)> {
    vec![
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{port}"),
        ),
        ("OTEL_METRICS_EXPORTER", "none".to_owned()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
    ]
}

/// All five services exporting with `otel`, a fleet of one node (this stack's TreeBuilder)
/// in Discovery's static file, and the Scheduler's client; `metrics` are the admin addresses
/// of Cache and DbSync.
struct System {
    stack: TestStack,
    scheduler: Client,
    scheduler_addr: SocketAddr,
    metrics: HashMap<&'static str, SocketAddr>,
}

async fn system(otel: &[(&'static str, String)]) -> System {
    let mut stack = TestStack::new();
    stack.start_postgres().await;
    stack.start_redis().await;
    let with = |extra: &[(&'static str, String)]| {
        let mut env = otel.to_vec();
        env.extend(extra.iter().cloned());
        env
    };
    let metrics: HashMap<&'static str, SocketAddr> = ["cache", "db-sync"]
        .into_iter()
        .map(|name| {
            let port = free_port().expect("port");
            (name, SocketAddr::from(([127, 0, 0, 1], port)))
        })
        .collect();
    let cache = stack.start_service(
        "cache",
        &with(&[("METRICS_LISTEN_ADDR", metrics["cache"].to_string())]),
    );
    cache.wait_for(ServingStatus::Serving).await;
    let cache = cache.uri();
    let db_sync = stack.start_service(
        "db-sync",
        &with(&[
            ("CACHE_ADDR", cache.clone()),
            ("METRICS_LISTEN_ADDR", metrics["db-sync"].to_string()),
        ]),
    );
    db_sync.wait_for(ServingStatus::Serving).await;
    let db_sync = db_sync.uri();
    let tree_builder = stack.start_service("tree-builder", &with(&[]));
    tree_builder.wait_for(ServingStatus::Serving).await;
    let tree_builder = tree_builder.uri();
    let clients = stack.dir().join("clients.yaml");
    std::fs::write(
        &clients,
        format!(
            "clients:\n- {{id: node-a, tree_builder_address: \"{}\"}}\n",
            tree_builder.trim_start_matches("http://")
        ),
    )
    .expect("write");
    let discovery = stack.start_service(
        "discovery",
        &with(&[
            ("STATIC_FILE", clients.display().to_string()),
            ("CACHE_ADDR", cache.clone()),
        ]),
    );
    discovery.wait_for(ServingStatus::Serving).await;
    let discovery = discovery.uri();
    let scheduler = stack.start_service(
        "scheduler",
        &with(&[
            ("CACHE_ADDR", cache),
            ("DB_SYNC_ADDR", db_sync),
            ("TREE_BUILDER_ADDR", tree_builder),
            ("DISCOVERY_ADDR", discovery),
        ]),
    );
    scheduler.wait_for(ServingStatus::Serving).await;
    let scheduler_addr = scheduler.addr;
    let scheduler =
        SchedulerServiceClient::new(merklectl::remote::connect(&scheduler.uri()).expect("channel"));
    System {
        stack,
        scheduler,
        scheduler_addr,
        metrics,
    }
}

/// A fleet source over a small tree under the stack's folder.
async fn fleet_source(system: &mut System, name: &str) {
    let dir = system.stack.dir().join(name);
    std::fs::create_dir_all(dir.join("sub")).expect("mkdir");
    std::fs::write(dir.join("sub/file"), name).expect("write");
    system
        .scheduler
        .create_source(CreateSourceRequest {
            source: Some(Source {
                name: name.into(),
                path: dir.display().to_string(),
                fleet_mode: FleetMode::AllClients as i32,
                enabled: true,
                ..Default::default()
            }),
        })
        .await
        .expect("create source");
}

async fn wait_end(c: &mut Client, id: &str) -> Build {
    integration_tests::wait_build_end(c, id).await
}

async fn trigger(c: &mut Client, source: &str) -> Build {
    let id = c
        .trigger_build(TriggerBuildRequest {
            source: source.into(),
        })
        .await
        .expect("trigger")
        .into_inner()
        .build_id;
    wait_end(c, &id).await
}

/// The trace's spans once every service has sent its part and nothing more arrives.
async fn settled_trace(receiver: &Receiver, trace_id: &str) -> Vec<TraceSpan> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let spans = receiver.trace(trace_id);
        let services: HashSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
        if services.len() == SERVICES.len() && spans.len() == last {
            return spans;
        }
        if Instant::now() > deadline {
            return spans;
        }
        last = spans.len();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_build_is_one_trace_across_all_five_services() {
    let (receiver, mut otel) = receiver().await;
    // Metrics go over OTLP too, here every half second.
    otel.retain(|(key, _)| *key != "OTEL_METRICS_EXPORTER");
    otel.push(("OTEL_METRIC_EXPORT_INTERVAL", "500".to_owned()));
    let mut system = system(&otel).await;
    fleet_source(&mut system, "site").await;
    let build = trigger(&mut system.scheduler, "site").await;
    assert_eq!(
        BuildState::try_from(build.state),
        Ok(BuildState::SucceededChanged),
        "{build:?}"
    );
    assert_eq!(build.trace_id.len(), 32, "GetBuild returns the trace id");
    let spans = settled_trace(&receiver, &build.trace_id).await;
    let tree = merklectl::traces::render_tree(&spans);

    let services: HashSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
    for service in SERVICES {
        assert!(
            services.contains(service),
            "no span from {service}:\n{tree}"
        );
    }
    // One root, and every other span's parent is in the trace.
    let ids: HashSet<&[u8]> = spans.iter().map(|s| s.span.span_id.as_slice()).collect();
    let roots: Vec<&TraceSpan> = spans
        .iter()
        .filter(|s| s.span.parent_span_id.is_empty())
        .collect();
    assert_eq!(roots.len(), 1, "one root:\n{tree}");
    for s in &spans {
        assert!(
            s.span.parent_span_id.is_empty() || ids.contains(s.span.parent_span_id.as_slice()),
            "{} ({}) is an orphan:\n{tree}",
            s.span.name,
            s.service
        );
    }
    // The database conventions, with the statement and never a value.
    let postgres: Vec<&TraceSpan> = spans
        .iter()
        .filter(|s| s.attribute("db.system").as_deref() == Some("postgresql"))
        .collect();
    assert!(
        postgres.iter().any(|s| s.service == "merkle-db-sync"
            && s.attribute("db.operation").as_deref() == Some("INSERT")),
        "no INSERT span from DbSync:\n{tree}"
    );
    assert!(
        postgres.iter().any(|s| s.service == "merkle-scheduler"),
        "no PostgreSQL span from the Scheduler:\n{tree}"
    );
    for s in &postgres {
        let statement = s.attribute("db.statement").expect("db.statement");
        assert!(!statement.contains("site"), "a value in {statement}");
    }
    let redis: Vec<&TraceSpan> = spans
        .iter()
        .filter(|s| s.attribute("db.system").as_deref() == Some("redis"))
        .collect();
    assert!(
        redis
            .iter()
            .all(|s| s.service == "merkle-cache" && s.attribute("db.operation").is_some()),
        "{tree}"
    );
    assert!(!redis.is_empty(), "no Redis span:\n{tree}");
    // RPC conventions on both sides, with the status code.
    let sync = spans
        .iter()
        .find(|s| {
            s.service == "merkle-db-sync"
                && s.attribute("rpc.method").as_deref() == Some("SyncTree")
        })
        .unwrap_or_else(|| panic!("no SyncTree server span:\n{tree}"));
    assert_eq!(sync.attribute("rpc.system").as_deref(), Some("grpc"));
    assert_eq!(
        sync.attribute("rpc.service").as_deref(),
        Some("merkle.dbsync.v1.DbSyncService")
    );
    assert_eq!(sync.attribute("rpc.grpc.status_code").as_deref(), Some("0"));
    assert!(
        sync.attribute("build.id").is_some_and(|id| !id.is_empty()),
        "SyncTree carries the node build's id:\n{tree}"
    );
    assert!(
        spans.iter().any(|s| s.service == "merkle-discovery"
            && s.attribute("rpc.method").as_deref() == Some("ListClients")),
        "{tree}"
    );
    assert!(
        spans.iter().any(|s| s.span.name == "scan") && spans.iter().any(|s| s.span.name == "hash"),
        "TreeBuilder's phases:\n{tree}"
    );
    assert!(
        spans
            .iter()
            .any(|s| s.attribute("build.id").as_deref() == Some(&build.build_id)),
        "the build's span names it:\n{tree}"
    );

    // The Scheduler's log lines of the build carry its trace id and a span id.
    let log = std::fs::read_to_string(&system.stack.service_mut("scheduler").log).expect("log");
    let line = log
        .lines()
        .find(|l| l.contains("build finished") && l.contains(&build.trace_id))
        .unwrap_or_else(|| panic!("no log line names trace {}:\n{log}", build.trace_id));
    assert!(line.contains("span_id="), "{line}");

    // /metrics after this traffic: RPC durations by method and status, cache lookups.
    let db_sync = integration_tests::get_metrics(system.metrics["db-sync"]);
    assert!(
        db_sync
            .lines()
            .any(|l| l.starts_with("rpc_server_call_duration_seconds_count")
                && l.contains(r#"rpc_method="SyncTree""#)
                && l.contains(r#"rpc_grpc_status_code="0""#)),
        "{db_sync}"
    );
    assert!(db_sync.contains("db_client_connection_count"), "{db_sync}");
    let cache = integration_tests::get_metrics(system.metrics["cache"]);
    assert!(
        cache
            .lines()
            .any(|l| l.starts_with("merkle_cache_lookups_total")
                && l.contains(r#"namespace="NAMESPACE_LATEST_ROOT""#)),
        "{cache}"
    );
    assert!(cache.contains("merkle_cache_breaker_state"), "{cache}");

    // The same instruments reach the collector over OTLP.
    let deadline = Instant::now() + Duration::from_secs(10);
    let wanted = [
        ("merkle-db-sync", "rpc.server.call.duration"),
        ("merkle-cache", "merkle.cache.lookups"),
        ("merkle-scheduler", "merkle.build.duration"),
    ];
    loop {
        let names = receiver.metric_names();
        if wanted
            .iter()
            .all(|(s, m)| names.contains(&(s.to_string(), m.to_string())))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "OTLP metrics received: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The median time of five builds of `docs`, triggered and followed to their end.
async fn median_build(c: &mut Client, label: &str) -> Duration {
    let mut times = Vec::new();
    for n in 0..5 {
        let started = Instant::now();
        let build = trigger(c, "docs").await;
        times.push(started.elapsed());
        assert!(
            build.error_message.is_empty(),
            "{label} build {n}: {build:?}"
        );
    }
    times.sort();
    times[2]
}

#[tokio::test(flavor = "multi_thread")]
async fn a_callers_traceparent_is_continued_and_a_dead_collector_costs_nothing() {
    // The collector: served until it is shut down below.
    let port = free_port().expect("port");
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind");
    let receiver = Receiver::default();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(receiver.router().serve_with_incoming_shutdown(
        tonic::transport::server::TcpIncoming::from(listener),
        async {
            let _ = stopped.await;
        },
    ));
    // Quiet logs do not mean fewer traces: LOG_LEVEL filters log lines only.
    let mut env = otlp_env(port);
    env.push(("LOG_LEVEL", "warn".to_owned()));
    let mut system = system(&env).await;
    fleet_source(&mut system, "docs").await;

    // grpcurl, an independent client, sends a traceparent: the build continues that trace.
    let trace_id = "5bf92f3577b34da6a3ce929d0e0e4736";
    let (ok, out, err) = run_grpcurl(
        &[
            "-H",
            &format!("traceparent: 00-{trace_id}-00f067aa0ba902b7-01"),
            "-d",
            r#"{"source":"docs"}"#,
        ],
        system.scheduler_addr,
        &["merkle.scheduler.v1.SchedulerService/TriggerBuild"],
    );
    assert!(ok, "{err}");
    let answer: serde_json::Value = serde_json::from_str(&out).expect("json");
    let id = answer["buildId"].as_str().expect("buildId").to_owned();
    let build = wait_end(&mut system.scheduler, &id).await;
    assert_eq!(build.trace_id, trace_id, "the caller's trace is continued");
    let spans = settled_trace(&receiver, trace_id).await;
    let services: HashSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(
        services.len(),
        5,
        "{}",
        merklectl::traces::render_tree(&spans)
    );

    // The same build with the collector up, then down: alike in time.
    let up = median_build(&mut system.scheduler, "collector up").await;
    stop.send(()).expect("stop the collector");
    server.await.expect("collector task").expect("collector");
    let down = median_build(&mut system.scheduler, "collector down").await;
    // A build takes tens of milliseconds here; a blocked export would add its timeout
    // (seconds) to every call.
    assert!(
        down < up * 3 + Duration::from_millis(250),
        "builds with the collector down took {down:?} (median), with it up {up:?}\n{}",
        tail(Path::new(&system.stack.service_mut("scheduler").log))
    );
}
