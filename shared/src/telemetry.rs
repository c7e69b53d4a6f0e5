//! Logging, tracing and metrics: `tracing` with JSON (or text) logs whose lines carry the
//! W3C `trace_id` and `span_id`, spans bridged to OpenTelemetry, and OpenTelemetry metrics
//! served as Prometheus text (always, see [`crate::metrics`]) and exported over OTLP when an
//! endpoint is configured.
//!
//! The standard variables are honoured: `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`
//! (the chart passes `k8s.pod.name`, `k8s.namespace.name` and `k8s.node.name` this way),
//! `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`, `OTEL_EXPORTER_OTLP_ENDPOINT` and its
//! per-signal, header, timeout and compression forms, `OTEL_TRACES_EXPORTER` and
//! `OTEL_METRICS_EXPORTER` (`otlp` or `none`), `OTEL_BSP_*` and `OTEL_METRIC_EXPORT_INTERVAL`.
//!
//! The tracer is installed even without an exporter, so every request still gets a W3C trace
//! id that is propagated to the services it calls (see [`crate::propagation`]). Spans are
//! exported in batches from a bounded queue: a collector that is slow or down costs dropped
//! spans, never a blocked call.

use std::sync::OnceLock;

use opentelemetry::{KeyValue, trace::TracerProvider as _};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::{
    Resource,
    metrics::{SdkMeterProvider, periodic_reader_with_async_runtime::PeriodicReader},
    runtime,
    trace::{SdkTracer, SdkTracerProvider, span_processor_with_async_runtime::BatchSpanProcessor},
};
use tracing::{Subscriber, span};
use tracing_subscriber::{
    EnvFilter, Layer,
    fmt::{FmtContext, FormatEvent, FormatFields, format::Writer},
    layer::{Context, SubscriberExt as _},
    registry::LookupSpan,
    util::SubscriberInitExt as _,
};

use crate::config::{ConfigError, TelemetryArgs};

/// The Prometheus registry every instrument reports to; `/metrics` renders it.
static REGISTRY: OnceLock<prometheus::Registry> = OnceLock::new();

/// The registry behind `/metrics` (empty until [`init`] ran).
pub fn registry() -> &'static prometheus::Registry {
    REGISTRY.get_or_init(prometheus::Registry::new)
}

/// Flushes and stops trace and metric export when dropped; keep it alive for the life of
/// `main`.
#[must_use = "dropping the guard stops trace export"]
pub struct TelemetryGuard {
    traces: SdkTracerProvider,
    metrics: SdkMeterProvider,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Err(err) = self.traces.shutdown() {
            eprintln!("telemetry: flushing traces failed: {err}");
        }
        if let Err(err) = self.metrics.shutdown() {
            eprintln!("telemetry: flushing metrics failed: {err}");
        }
    }
}

/// `service.name` when neither `OTEL_SERVICE_NAME` nor `OTEL_RESOURCE_ATTRIBUTES` names one:
/// the binary's name (`merkle-db-sync`, ...).
fn default_service_name(fallback: &str) -> String {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| fallback.to_owned())
}

/// The process's resource: the standard detectors (the `OTEL_*` variables), then
/// `service.version` and a `service.instance.id` unique to this process.
fn resource(service_name: &str) -> Resource {
    let detected = Resource::builder().build();
    let named = detected
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .is_some_and(|name| !name.as_str().starts_with("unknown_service"));
    let mut builder = Resource::builder().with_attributes([
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        KeyValue::new("service.instance.id", uuid::Uuid::now_v7().to_string()),
    ]);
    if !named {
        builder = builder.with_service_name(default_service_name(service_name));
    }
    builder.build()
}

/// Whether `OTEL_<SIGNAL>_EXPORTER` allows OTLP export (unset or `otlp`).
fn exporter_enabled(signal: &str) -> Result<bool, ConfigError> {
    let variable = format!("OTEL_{signal}_EXPORTER");
    match std::env::var(&variable).as_deref() {
        Err(_) | Ok("") | Ok("otlp") => Ok(true),
        Ok("none") => Ok(false),
        Ok(other) => Err(ConfigError::new(
            &variable,
            format!("{other:?} is not supported; use otlp or none"),
        )),
    }
}

/// The OTLP endpoint for `signal`, if export is configured: the signal's own variable, else
/// `OTEL_EXPORTER_OTLP_ENDPOINT` (`--otlp-endpoint`). `Some(None)`: the exporter reads the
/// signal's variable itself.
fn endpoint(args: &TelemetryArgs, signal: &str) -> Option<Option<String>> {
    let own = format!("OTEL_EXPORTER_OTLP_{signal}_ENDPOINT");
    if std::env::var(&own).is_ok_and(|v| !v.is_empty()) {
        return Some(None);
    }
    args.otlp_endpoint.clone().map(Some)
}

fn export_error(e: impl std::fmt::Display) -> ConfigError {
    ConfigError::new(
        "OTEL_EXPORTER_OTLP_ENDPOINT (--otlp-endpoint)",
        format!("cannot export there: {e}"),
    )
}

/// The log lines' filter (`LOG_LEVEL`).
fn log_filter(args: &TelemetryArgs) -> Result<EnvFilter, ConfigError> {
    EnvFilter::try_new(&args.log_level).map_err(|e| {
        ConfigError::new(
            "LOG_LEVEL (--log-level)",
            format!("not a valid filter: {e}"),
        )
    })
}

/// Installs the global subscriber, propagator, tracer and meter providers. Call once, inside
/// the tokio runtime.
pub fn init(
    service_name: &'static str,
    args: &TelemetryArgs,
) -> Result<TelemetryGuard, ConfigError> {
    let filter = log_filter(args)?;
    let resource = resource(service_name);

    let mut traces = SdkTracerProvider::builder().with_resource(resource.clone());
    if exporter_enabled("TRACES")?
        && let Some(endpoint) = endpoint(args, "TRACES")
    {
        let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic();
        if let Some(endpoint) = endpoint {
            exporter = exporter.with_endpoint(endpoint);
        }
        // The tokio-driven processor: the default one exports from a plain thread, where
        // tonic's exporter has no reactor.
        traces = traces.with_span_processor(
            BatchSpanProcessor::builder(exporter.build().map_err(export_error)?, runtime::Tokio)
                .build(),
        );
    }
    let traces = traces.build();

    let prometheus = opentelemetry_prometheus::exporter()
        .with_registry(registry().clone())
        .build()
        .map_err(|e| ConfigError::new("metrics", format!("cannot start: {e}")))?;
    let mut metrics = SdkMeterProvider::builder()
        .with_resource(resource)
        .with_reader(prometheus);
    if exporter_enabled("METRICS")?
        && let Some(endpoint) = endpoint(args, "METRICS")
    {
        let mut exporter = opentelemetry_otlp::MetricExporter::builder().with_tonic();
        if let Some(endpoint) = endpoint {
            exporter = exporter.with_endpoint(endpoint);
        }
        metrics = metrics.with_reader(
            PeriodicReader::builder(exporter.build().map_err(export_error)?, runtime::Tokio)
                .build(),
        );
    }
    let metrics = metrics.build();
    opentelemetry::global::set_meter_provider(metrics.clone());

    let tracer = traces.tracer(service_name);
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    opentelemetry::global::set_tracer_provider(traces.clone());

    // LOG_LEVEL filters the log lines only: spans (info and above) are traced whatever it
    // says, so `LOG_LEVEL=warn` keeps every trace.
    let otel = span_layer(tracer).with_filter(tracing_subscriber::filter::LevelFilter::INFO);
    let registry = tracing_subscriber::registry()
        .with(otel)
        .with(TraceIdsLayer::default().with_filter(log_filter(args)?));
    let result = if args.log_format == "json" {
        let format = tracing_subscriber::fmt::format()
            .json()
            .with_current_span(true)
            .with_span_list(false);
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .event_format(WithTraceIds::json(format))
                    .with_writer(std::io::stderr)
                    .with_filter(filter),
            )
            .try_init()
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .event_format(WithTraceIds::text(tracing_subscriber::fmt::format()))
                    .with_writer(std::io::stderr)
                    .with_filter(filter),
            )
            .try_init()
    };
    // A second init (tests starting two servers in one process) keeps the first subscriber.
    if let Err(err) = result {
        tracing::debug!(%err, "telemetry already initialised");
    }
    Ok(TelemetryGuard { traces, metrics })
}

/// A span's W3C ids, kept in its extensions for the log formatter.
#[derive(Debug, Clone)]
struct TraceIds {
    trace_id: String,
    span_id: String,
}

/// Finds the OpenTelemetry ids of the span an event happens in (once per span), so that
/// every log line can name them. Runs after the OpenTelemetry layer.
#[derive(Default)]
struct TraceIdsLayer {
    dispatch: OnceLock<tracing::dispatcher::WeakDispatch>,
}

impl<S> Layer<S> for TraceIdsLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_register_dispatch(&self, subscriber: &tracing::Dispatch) {
        let _ = self.dispatch.set(subscriber.downgrade());
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.event_span(event) else {
            return;
        };
        if span.extensions().get::<TraceIds>().is_some() {
            return;
        }
        let Some(dispatch) = self.dispatch.get().and_then(|d| d.upgrade()) else {
            return;
        };
        let id: span::Id = span.id();
        let Some(context) = tracing_opentelemetry::get_otel_context(&id, &dispatch) else {
            return;
        };
        use opentelemetry::trace::TraceContextExt as _;
        let otel = context.span();
        let span_context = otel.span_context();
        if span_context.is_valid() {
            span.extensions_mut().insert(TraceIds {
                trace_id: span_context.trace_id().to_string(),
                span_id: span_context.span_id().to_string(),
            });
        }
    }
}

/// A log format with the event's `trace_id` and `span_id` added: top-level JSON fields, or
/// `trace_id=… span_id=…` at the end of a text line.
struct WithTraceIds<F> {
    inner: F,
    json: bool,
}

impl<F> WithTraceIds<F> {
    fn json(inner: F) -> Self {
        WithTraceIds { inner, json: true }
    }
    fn text(inner: F) -> Self {
        WithTraceIds { inner, json: false }
    }
}

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        let ids = ctx
            .parent_span()
            .and_then(|span| span.extensions().get::<TraceIds>().cloned());
        if let Some(ids) = ids {
            let end = if self.json {
                line.rfind('}')
            } else {
                Some(line.trim_end_matches('\n').len())
            };
            if let Some(at) = end {
                let added = if self.json {
                    format!(
                        r#","trace_id":"{}","span_id":"{}""#,
                        ids.trace_id, ids.span_id
                    )
                } else {
                    format!(" trace_id={} span_id={}", ids.trace_id, ids.span_id)
                };
                line.insert_str(at, &added);
            }
        }
        writer.write_str(&line)
    }
}

/// The layer that turns tracing spans into OpenTelemetry spans, one configuration for the
/// services and the tests.
///
/// Each span carries what a trace reader uses (its name, kind, attributes, events, status,
/// times); the layer's extras are left off, as they cost every call (the Cache's Get most):
/// source locations, the Rust module path (`target`), the thread's name and id (meaningless
/// where tasks move between threads) and busy/idle times (a clock read at every enter and
/// exit). Nor is a span's OpenTelemetry context made current on entry: nothing here reads
/// `Context::current()` (parents and propagation go by the tracing span), and activation
/// clones the context and pushes a guard at every poll of every traced future.
pub(crate) fn span_layer<S>(
    tracer: SdkTracer,
) -> tracing_opentelemetry::OpenTelemetryLayer<S, SdkTracer>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_target(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_context_activation(false)
}

/// A span that only exists inside a sampled trace: `make()` when the current span is sampled,
/// else no span. Database and backend calls made by background work (leases, heartbeats,
/// garbage collection) would otherwise each start a trace of their own, and inside a trace the
/// sampler dropped a child would be built only to be thrown away (a Redis command per cache
/// read).
pub fn child_span(make: impl FnOnce() -> tracing::Span) -> tracing::Span {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let current = tracing::Span::current();
    if current.is_none() || !current.context().span().span_context().is_sampled() {
        tracing::Span::none()
    } else {
        make()
    }
}

/// Marks the current span (a call's server span) with the build it serves: `build.id` and
/// `source` attributes, when known.
pub fn tag_build(build_id: &str, source: &str) {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let span = tracing::Span::current();
    if !build_id.is_empty() {
        span.set_attribute("build.id", build_id.to_owned());
    }
    if !source.is_empty() {
        span.set_attribute("source", source.to_owned());
    }
}

/// The W3C trace id (32 hex characters) of the current span, or `None` outside any trace.
pub fn current_trace_id() -> Option<String> {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let context = tracing::Span::current().context();
    let span = context.span();
    let span_context = span.span_context();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::child_span;

    /// Whether `child_span` made a span inside a server span, under `sampler`.
    fn child_made(sampler: Sampler) -> bool {
        let provider = SdkTracerProvider::builder().with_sampler(sampler).build();
        let subscriber =
            tracing_subscriber::registry().with(super::span_layer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let outside = child_span(|| tracing::info_span!("redis"));
            assert!(outside.is_none(), "no span outside a trace");
            let server = tracing::info_span!("grpc.server");
            let _entered = server.enter();
            !child_span(|| tracing::info_span!("redis")).is_none()
        })
    }

    #[test]
    fn a_child_span_exists_only_inside_a_sampled_trace() {
        assert!(child_made(Sampler::AlwaysOn));
        assert!(!child_made(Sampler::AlwaysOff));
        assert!(!child_made(Sampler::ParentBased(Box::new(
            Sampler::AlwaysOff
        ))));
    }
}
