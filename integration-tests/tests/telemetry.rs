//! One trace across services: a caller's W3C `traceparent` is honoured by the server, and its
//! spans reach the OTLP collector configured with OTEL_EXPORTER_OTLP_ENDPOINT (here a real
//! OTLP/gRPC receiver in the test, on loopback).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use integration_tests::{TestStack, free_port, tail};
use merkle_proto::treebuilder::v1::{
    BuildTreeRequest, tree_builder_service_client::TreeBuilderServiceClient,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};
use tonic::{Request, Response, Status};

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        self.0.lock().expect("lock").push(request.into_inner());
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    /// Names of the spans received with this trace id.
    fn spans_of(&self, trace_id: &[u8]) -> Vec<String> {
        let requests = self.0.lock().expect("lock");
        requests
            .iter()
            .flat_map(|r| &r.resource_spans)
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
            .filter(|s| s.trace_id == trace_id)
            .map(|s| s.name.clone())
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_callers_trace_reaches_the_otlp_collector() {
    let collector = Collector::default();
    let port = free_port().expect("port");
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(collector.clone()))
        .serve(([127, 0, 0, 1], port).into());
    tokio::spawn(server);

    let mut stack = TestStack::new();
    let tree = stack.dir().join("tree");
    std::fs::create_dir_all(&tree).expect("mkdir");
    std::fs::write(tree.join("f"), b"x").expect("write");
    stack.start_service(
        "tree-builder",
        &[
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://127.0.0.1:{port}"),
            ),
            ("OTEL_BSP_SCHEDULE_DELAY", "200".to_owned()),
        ],
    );
    let service = stack.service_mut("tree-builder");
    service
        .wait_for(integration_tests::ServingStatus::Serving)
        .await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut request = Request::new(BuildTreeRequest {
        path: tree.display().to_string(),
        ..BuildTreeRequest::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01")
            .parse()
            .expect("header"),
    );
    let mut stream = TreeBuilderServiceClient::new(service.channel())
        .build_tree(request)
        .await
        .expect("build")
        .into_inner();
    while stream.message().await.expect("stream").is_some() {}

    // The call's log lines carry the caller's trace id, to find the trace from the logs.
    let log = std::fs::read_to_string(&service.log).expect("log");
    assert!(
        log.lines()
            .any(|l| l.contains("build started") && l.contains(trace_id)),
        "no log line of the call names trace {trace_id}:\n{}",
        tail(&service.log)
    );

    let want: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&trace_id[2 * i..2 * i + 2], 16).expect("hex"))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let names = collector.spans_of(&want);
        if names
            .iter()
            .any(|n| n == "merkle.treebuilder.v1.TreeBuilderService/BuildTree")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no BuildTree span with the caller's trace id reached the collector (got {names:?})\n{}",
            tail(&service.log)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
