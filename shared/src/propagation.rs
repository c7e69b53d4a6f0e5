//! W3C trace-context propagation as tower layers, applied once by the server and client
//! builders so that no handler deals with it.
//!
//! [`ServerTraceLayer`] reads `traceparent`/`tracestate` from each incoming request, opens a
//! server span for the call under that parent and runs the handler inside it.
//! [`ClientTraceLayer`] writes the current span's context into each outgoing request.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use http::{HeaderMap, HeaderName, HeaderValue, Request};
use opentelemetry::propagation::{Extractor, Injector};
use tower::{Layer, Service};
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// Opens a server span per call, parented by the caller's W3C trace context.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerTraceLayer;

impl<S> Layer<S> for ServerTraceLayer {
    type Service = ServerTrace<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ServerTrace { inner }
    }
}

/// The service made by [`ServerTraceLayer`].
#[derive(Debug, Clone)]
pub struct ServerTrace<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for ServerTrace<S>
where
    S: Service<Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let parent = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&HeaderExtractor(request.headers()))
        });
        let path = request.uri().path();
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or((path, ""));
        let span = tracing::info_span!(
            "grpc.server",
            otel.name = %path.trim_start_matches('/'),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            trace_id = tracing::field::Empty,
        );
        // No parent in the headers leaves the span a new root; that is not an error.
        let _ = span.set_parent(parent);
        // The trace id in every log line of the call, to find its trace from the logs.
        {
            use opentelemetry::trace::TraceContextExt as _;
            let context = span.context();
            let trace_id = context.span().span_context().trace_id();
            if trace_id != opentelemetry::trace::TraceId::INVALID {
                span.record("trace_id", tracing::field::display(trace_id));
            }
        }
        let future = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        Box::pin(future.instrument(span))
    }
}

/// Writes the current span's W3C trace context into each outgoing request.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClientTraceLayer;

impl<S> Layer<S> for ClientTraceLayer {
    type Service = ClientTrace<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ClientTrace { inner }
    }
}

/// The service made by [`ClientTraceLayer`].
#[derive(Debug, Clone)]
pub struct ClientTrace<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for ClientTrace<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let context = tracing::Span::current().context();
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&context, &mut HeaderInjector(request.headers_mut()))
        });
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        convert::Infallible,
        sync::{Arc, Mutex},
    };

    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
        TracerProvider as _,
    };
    use tower::ServiceExt as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

    fn with_tracing<T>(f: impl FnOnce() -> T) -> T {
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, f)
    }

    #[test]
    fn the_client_layer_sends_the_current_trace() {
        let seen = Arc::new(Mutex::new(None::<String>));
        let captured = seen.clone();
        let inner = tower::service_fn(move |req: Request<()>| {
            let header = req
                .headers()
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            *captured.lock().expect("lock") = header;
            async { Ok::<_, Infallible>(()) }
        });
        with_tracing(|| {
            let parent = opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
                TraceId::from_hex(TRACE_ID).expect("hex"),
                SpanId::from_hex("00f067aa0ba902b7").expect("hex"),
                TraceFlags::SAMPLED,
                true,
                TraceState::default(),
            ));
            let span = tracing::info_span!("caller");
            span.set_parent(parent).expect("parent");
            let _entered = span.enter();
            let call = ClientTraceLayer.layer(inner).oneshot(Request::new(()));
            poll_once(call).expect("call");
        });
        let header = seen
            .lock()
            .expect("lock")
            .clone()
            .expect("a traceparent header");
        assert!(header.starts_with(&format!("00-{TRACE_ID}-")), "{header}");
    }

    /// Polls a future that is ready at once (the inner service answers immediately).
    fn poll_once<F: Future>(future: F) -> F::Output {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut future = std::pin::pin!(future);
        match future.as_mut().poll(&mut cx) {
            Poll::Ready(output) => output,
            Poll::Pending => panic!("the test service should answer at once"),
        }
    }
}
