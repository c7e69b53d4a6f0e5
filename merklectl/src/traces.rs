//! Traces for a person: the OTLP receiver `merklectl up` runs (a tonic `TraceService` that
//! keeps every span it is sent, in memory and as OTLP JSON lines in a file; it also takes
//! metrics, keeping the names each service sent), and
//! `merklectl trace BUILD_ID`, which prints one build's spans as an indented tree, or writes
//! them as OTLP JSON for other tools (`--json`).

use parking_lot::Mutex;
use std::{
    collections::HashMap,
    io::{BufRead as _, Write as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, bail};
use merkle_proto::scheduler::v1::{
    GetBuildRequest, scheduler_service_client::SchedulerServiceClient,
};
use opentelemetry_proto::tonic::{
    collector::metrics::v1::{
        ExportMetricsServiceRequest, ExportMetricsServiceResponse,
        metrics_service_server::{MetricsService, MetricsServiceServer},
    },
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{KeyValue, any_value},
    trace::v1::{ResourceSpans, Span, status::StatusCode},
};
use tonic::{Request, Response, Status};

use crate::remote::{call_failed, connect};

/// The file under the data directory where the local receiver writes spans.
pub const TRACES_FILE: &str = "traces.jsonl";

/// An OTLP/gRPC trace receiver: keeps every export request, and appends each to a file as
/// one line of OTLP JSON when it has one.
#[derive(Clone, Default)]
pub struct Receiver {
    received: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    file: Option<Arc<Mutex<std::fs::File>>>,
    /// (service.name, metric name) of every metric received.
    metrics: Arc<Mutex<std::collections::BTreeSet<(String, String)>>>,
}

#[tonic::async_trait]
impl MetricsService for Receiver {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        let mut metrics = self.metrics.lock();
        for resource in request.into_inner().resource_metrics {
            let service = resource
                .resource
                .as_ref()
                .and_then(|r| attribute(&r.attributes, "service.name"))
                .unwrap_or_default();
            for metric in resource.scope_metrics.iter().flat_map(|s| &s.metrics) {
                metrics.insert((service.clone(), metric.name.clone()));
            }
        }
        Ok(Response::new(ExportMetricsServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let request = request.into_inner();
        if let Some(file) = &self.file {
            let line = serde_json::to_string(&request)
                .map_err(|e| Status::internal(format!("encoding the spans: {e}")))?;
            let mut file = file.lock();
            writeln!(file, "{line}").map_err(|e| Status::internal(e.to_string()))?;
        }
        self.received.lock().push(request);
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    /// A receiver that also appends to `file`.
    pub fn to_file(file: &Path) -> anyhow::Result<Receiver> {
        let opened = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(file)
            .with_context(|| format!("opening {}", file.display()))?;
        Ok(Receiver {
            received: Arc::default(),
            file: Some(Arc::new(Mutex::new(opened))),
            metrics: Arc::default(),
        })
    }

    /// Serves OTLP/gRPC (traces and metrics) on `listener` in the background.
    pub fn serve(&self, listener: tokio::net::TcpListener) {
        tokio::spawn(
            self.router()
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
    }

    /// The receiver's gRPC services, to serve as the caller likes.
    pub fn router(&self) -> tonic::transport::server::Router {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(self.clone()))
            .add_service(MetricsServiceServer::new(self.clone()))
    }

    /// The (service.name, metric name) pairs received over OTLP so far.
    pub fn metric_names(&self) -> std::collections::BTreeSet<(String, String)> {
        self.metrics.lock().clone()
    }

    /// The spans of `trace_id` received so far, each with its service's name.
    pub fn trace(&self, trace_id: &str) -> Vec<TraceSpan> {
        let received = self.received.lock();
        spans_of(received.iter(), trace_id)
    }

    /// Every export request received so far.
    pub fn requests(&self) -> Vec<ExportTraceServiceRequest> {
        self.received.lock().clone()
    }
}

/// One span with the `service.name` of the process that sent it.
#[derive(Debug, Clone)]
pub struct TraceSpan {
    pub service: String,
    pub span: Span,
}

impl TraceSpan {
    /// The value of a span attribute, as text.
    pub fn attribute(&self, key: &str) -> Option<String> {
        attribute(&self.span.attributes, key)
    }
}

fn attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    let value = attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?;
    Some(match value.value.as_ref()? {
        any_value::Value::StringValue(s) => s.clone(),
        any_value::Value::IntValue(i) => i.to_string(),
        any_value::Value::BoolValue(b) => b.to_string(),
        any_value::Value::DoubleValue(d) => d.to_string(),
        other => format!("{other:?}"),
    })
}

/// The `service.name` of a batch of spans.
fn service_name(resource: &ResourceSpans) -> String {
    resource
        .resource
        .as_ref()
        .and_then(|r| attribute(&r.attributes, "service.name"))
        .unwrap_or_else(|| "?".into())
}

fn spans_of<'a>(
    requests: impl Iterator<Item = &'a ExportTraceServiceRequest>,
    trace_id: &str,
) -> Vec<TraceSpan> {
    let want = merkle_core::digest::unhex(trace_id).unwrap_or_default();
    let mut out = Vec::new();
    for resource in requests.flat_map(|r| &r.resource_spans) {
        let service = service_name(resource);
        for span in resource.scope_spans.iter().flat_map(|s| &s.spans) {
            if span.trace_id == want {
                out.push(TraceSpan {
                    service: service.clone(),
                    span: span.clone(),
                });
            }
        }
    }
    out.sort_by_key(|s| s.span.start_time_unix_nano);
    out
}

/// Every export request in a receiver's file.
fn read_file(path: &Path) -> anyhow::Result<Vec<ExportTraceServiceRequest>> {
    let file = std::fs::File::open(path).with_context(|| {
        format!(
            "{}: no spans received yet (is `merklectl up` running, with its own receiver?)",
            path.display()
        )
    })?;
    let mut out = Vec::new();
    for line in std::io::BufReader::new(file).lines() {
        let line = line?;
        // A line still being written is skipped; the next look reads it whole.
        if let Ok(request) = serde_json::from_str(&line) {
            out.push(request);
        }
    }
    Ok(out)
}

/// The spans as an indented tree, parents before children, siblings by start time: service,
/// span name, duration, status.
pub fn render_tree(spans: &[TraceSpan]) -> String {
    let ids: std::collections::HashSet<&[u8]> =
        spans.iter().map(|s| s.span.span_id.as_slice()).collect();
    let mut children: HashMap<&[u8], Vec<&TraceSpan>> = HashMap::new();
    let mut roots = Vec::new();
    for s in spans {
        if s.span.parent_span_id.is_empty() || !ids.contains(s.span.parent_span_id.as_slice()) {
            roots.push(s);
        } else {
            children
                .entry(s.span.parent_span_id.as_slice())
                .or_default()
                .push(s);
        }
    }
    let mut out = String::new();
    fn walk<'a>(
        s: &'a TraceSpan,
        depth: usize,
        children: &HashMap<&[u8], Vec<&'a TraceSpan>>,
        out: &mut String,
    ) {
        let ms = s
            .span
            .end_time_unix_nano
            .saturating_sub(s.span.start_time_unix_nano) as f64
            / 1e6;
        let status = match s.span.status.as_ref().map(|st| st.code()) {
            Some(StatusCode::Error) => {
                let message = s
                    .span
                    .status
                    .as_ref()
                    .map(|st| st.message.clone())
                    .unwrap_or_default();
                format!("ERROR {message}")
            }
            _ => "ok".into(),
        };
        let label = format!("{}{}", "  ".repeat(depth), s.span.name);
        out.push_str(&format!(
            "{label:<64} {:<22} {ms:>10.2} ms  {status}\n",
            s.service
        ));
        for child in children
            .get(s.span.span_id.as_slice())
            .into_iter()
            .flatten()
        {
            walk(child, depth + 1, children, out);
        }
    }
    for root in roots {
        walk(root, 0, &children, &mut out);
    }
    out
}

/// The spans as one OTLP JSON export request, grouped by service.
pub fn to_otlp_json(spans: &[TraceSpan], requests: &[ExportTraceServiceRequest]) -> String {
    let wanted: std::collections::HashSet<&[u8]> =
        spans.iter().map(|s| s.span.span_id.as_slice()).collect();
    let mut resource_spans = Vec::new();
    for resource in requests.iter().flat_map(|r| &r.resource_spans) {
        let mut kept = resource.clone();
        for scope in &mut kept.scope_spans {
            scope
                .spans
                .retain(|s| wanted.contains(s.span_id.as_slice()) && spans_contain(spans, s));
        }
        kept.scope_spans.retain(|s| !s.spans.is_empty());
        if !kept.scope_spans.is_empty() {
            resource_spans.push(kept);
        }
    }
    serde_json::to_string_pretty(&ExportTraceServiceRequest { resource_spans }).unwrap_or_default()
}

fn spans_contain(spans: &[TraceSpan], span: &Span) -> bool {
    spans
        .iter()
        .any(|s| s.span.span_id == span.span_id && s.span.trace_id == span.trace_id)
}

#[derive(Debug, clap::Args)]
pub struct TraceArgs {
    /// The build whose trace to show (its id, as `merklectl builds` lists it).
    pub build_id: String,
    /// The Scheduler, which knows the build's trace id.
    #[arg(
        long = "addr",
        env = "SCHEDULER_ADDR",
        default_value = "http://127.0.0.1:50051"
    )]
    pub addr: String,
    /// The local stack's data directory, where its receiver writes spans.
    #[arg(long, default_value = ".data")]
    pub data_dir: PathBuf,
    /// Write the spans as OTLP JSON (one ExportTraceServiceRequest) instead of a tree.
    #[arg(long)]
    pub json: bool,
    /// How long to wait for the build's spans to arrive (they are exported in batches).
    #[arg(long, default_value = "5s")]
    pub wait: humantime::Duration,
}

/// `merklectl trace BUILD_ID`.
pub async fn trace(args: TraceArgs) -> anyhow::Result<()> {
    let mut scheduler = SchedulerServiceClient::new(connect(&args.addr)?);
    let build = scheduler
        .get_build(GetBuildRequest {
            build_id: args.build_id.clone(),
        })
        .await
        .map_err(call_failed("Scheduler", &args.addr))?
        .into_inner()
        .build
        .context("the Scheduler answered without a build")?;
    if build.trace_id.is_empty() {
        bail!("build {} has no trace id", args.build_id);
    }
    let file = args.data_dir.join(TRACES_FILE);
    let deadline = tokio::time::Instant::now() + Duration::from(args.wait);
    // Spans arrive in batches; wait until the trace has its root and stops growing.
    let (spans, requests) = loop {
        let requests = read_file(&file)?;
        let spans = spans_of(requests.iter(), &build.trace_id);
        let complete = spans.iter().any(|s| s.span.parent_span_id.is_empty());
        if complete || tokio::time::Instant::now() >= deadline {
            if complete {
                // One more batch may be on its way.
                tokio::time::sleep(Duration::from_millis(600)).await;
                let requests = read_file(&file)?;
                break (spans_of(requests.iter(), &build.trace_id), requests);
            }
            break (spans, requests);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    if spans.is_empty() {
        bail!(
            "no spans of trace {} (build {}) in {}: were the services sending spans here \
             (OTEL_EXPORTER_OTLP_ENDPOINT set elsewhere sends them to that collector)?",
            build.trace_id,
            args.build_id,
            file.display()
        );
    }
    if args.json {
        println!("{}", to_otlp_json(&spans, &requests));
    } else {
        println!(
            "trace {} (build {}, {} spans)\n",
            build.trace_id,
            args.build_id,
            spans.len()
        );
        print!("{}", render_tree(&spans));
    }
    Ok(())
}
