//! Logging and tracing: `tracing` with JSON (or text) logs, spans bridged to OpenTelemetry, and
//! OTLP export when an endpoint is configured.
//!
//! The OpenTelemetry tracer is installed even without an exporter, so every request still gets
//! a W3C trace id that is propagated to the services it calls (see [`crate::propagation`]).

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::{
    Resource, runtime,
    trace::{SdkTracerProvider, span_processor_with_async_runtime::BatchSpanProcessor},
};
use tracing_subscriber::{EnvFilter, layer::SubscriberExt as _, util::SubscriberInitExt as _};

use crate::config::{ConfigError, TelemetryArgs};

/// Flushes and stops trace export when dropped; keep it alive for the life of `main`.
#[must_use = "dropping the guard stops trace export"]
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Err(err) = self.provider.shutdown() {
            eprintln!("telemetry: flushing traces failed: {err}");
        }
    }
}

/// Installs the global subscriber and propagator. Call once, inside the tokio runtime.
pub fn init(
    service_name: &'static str,
    args: &TelemetryArgs,
) -> Result<TelemetryGuard, ConfigError> {
    let filter = EnvFilter::try_new(&args.log_level).map_err(|e| {
        ConfigError::new(
            "LOG_LEVEL (--log-level)",
            format!("not a valid filter: {e}"),
        )
    })?;

    let mut provider = SdkTracerProvider::builder()
        .with_resource(Resource::builder().with_service_name(service_name).build());
    if let Some(endpoint) = &args.otlp_endpoint {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build()
            .map_err(|e| {
                ConfigError::new(
                    "OTEL_EXPORTER_OTLP_ENDPOINT (--otlp-endpoint)",
                    format!("cannot export traces there: {e}"),
                )
            })?;
        // The tokio-driven processor: the default one exports from a plain thread, where
        // tonic's exporter has no reactor.
        provider = provider
            .with_span_processor(BatchSpanProcessor::builder(exporter, runtime::Tokio).build());
    }
    let provider = provider.build();
    let tracer = provider.tracer(service_name);
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    opentelemetry::global::set_tracer_provider(provider.clone());

    let otel = tracing_opentelemetry::layer().with_tracer(tracer);
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    let result = if args.log_format == "json" {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
            )
            .try_init()
    } else {
        registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init()
    };
    // A second init (tests starting two servers in one process) keeps the first subscriber.
    if let Err(err) = result {
        tracing::debug!(%err, "telemetry already initialised");
    }
    Ok(TelemetryGuard { provider })
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
