//! W3C trace-context propagation as tower layers, applied once by the server and client
//! builders so that no handler deals with it.
//!
//! [`ServerTraceLayer`] reads `traceparent`/`tracestate` from each incoming request, opens a
//! server span for the call under that parent and runs the handler inside it.
//! [`ClientTraceLayer`] opens a client span under the current span and writes its context
//! into each outgoing request. Both follow the OpenTelemetry RPC conventions (`rpc.system`,
//! `rpc.service`, `rpc.method`, `rpc.grpc.status_code`), keep the span open until the last
//! message of a stream, and record `rpc.server.call.duration` / `rpc.client.call.duration`.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
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

/// The gRPC service and method of a request path `/pkg.Service/Method`.
fn rpc_names(path: &str) -> (String, String) {
    let trimmed = path.trim_start_matches('/');
    match trimmed.split_once('/') {
        Some((service, method)) => (service.to_owned(), method.to_owned()),
        None => (trimmed.to_owned(), String::new()),
    }
}

/// The `grpc-status` of a header or trailer map, if it has one.
fn grpc_status(headers: &HeaderMap) -> Option<i32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Which side of a call a span and its metric describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Server,
    Client,
}

/// One call being observed: its span, its start, its names; finished once, with its status.
struct Call {
    span: tracing::Span,
    side: Side,
    started: Instant,
    service: String,
    method: String,
}

impl Call {
    /// Records the call's status code on its span (an error status where the semantic
    /// conventions call it one) and in the RPC duration histogram.
    fn finish(self, code: i32) {
        self.span
            .set_attribute("rpc.grpc.status_code", i64::from(code));
        // Server spans: only codes that mean the server failed; client spans: any non-OK.
        let failed = match self.side {
            Side::Server => matches!(code, 2 | 4 | 12 | 13 | 14 | 15),
            Side::Client => code != 0,
        };
        if failed {
            self.span
                .set_status(opentelemetry::trace::Status::error(format!(
                    "gRPC status {code}"
                )));
        }
        crate::metrics::rpc_call(
            self.side == Side::Server,
            &self.service,
            &self.method,
            code,
            self.started.elapsed(),
        );
    }
}

/// A response body that finishes its `Call` when it ends: with the `grpc-status` of its
/// trailers, or CANCELLED when dropped before its end (the caller went away).
pub struct ObservedBody<B> {
    inner: B,
    call: Option<Call>,
}

impl<B> ObservedBody<B> {
    fn finish(&mut self, code: i32) {
        if let Some(call) = self.call.take() {
            call.finish(code);
        }
    }
}

impl<B> Drop for ObservedBody<B> {
    fn drop(&mut self) {
        self.finish(1);
    }
}

impl<B> http_body::Body for ObservedBody<B>
where
    B: http_body::Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                    self.finish(code);
                }
            }
            // A body that broke off, or ended without trailers, ended unknown.
            Poll::Ready(Some(Err(_))) | Poll::Ready(None) => self.finish(2),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The response of an observed call: a "trailers-only" answer (an error before any message)
/// carries its status in the headers and finishes the call at once; otherwise the body does.
fn observe<B>(response: http::Response<B>, call: Call) -> http::Response<ObservedBody<B>> {
    let code = grpc_status(response.headers());
    let mut call = Some(call);
    if let Some(code) = code
        && let Some(call) = call.take()
    {
        call.finish(code);
    }
    response.map(|inner| ObservedBody { inner, call })
}

/// Runs a call's future in its span; its response body finishes the call, or a transport
/// error finishes it with `failed_code`.
async fn observed<F, B, E>(
    future: F,
    span: tracing::Span,
    call: Call,
    failed_code: i32,
) -> Result<http::Response<ObservedBody<B>>, E>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    match future.instrument(span).await {
        Ok(response) => Ok(observe(response, call)),
        Err(err) => {
            call.finish(failed_code);
            Err(err)
        }
    }
}

/// Opens a server span per call, parented by the caller's W3C trace context, following the
/// OpenTelemetry RPC conventions, and records the call's duration and status code.
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

impl<S, B, ResBody> Service<Request<B>> for ServerTrace<S>
where
    S: Service<Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    ResBody: 'static,
{
    type Response = http::Response<ObservedBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let parent = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&HeaderExtractor(request.headers()))
        });
        let (service, method) = rpc_names(request.uri().path());
        // Probes and reflection are measured, not traced: a kubelet's probe every few
        // seconds would otherwise start a trace each time.
        let traced =
            !service.starts_with("grpc.health.") && !service.starts_with("grpc.reflection.");
        let span = if !traced {
            tracing::Span::none()
        } else {
            tracing::info_span!(
            "grpc.server",
            otel.name = request.uri().path().trim_start_matches('/'),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            )
        };
        // No parent in the headers leaves the span a new root; that is not an error.
        let _ = span.set_parent(parent);
        let call = Call {
            span: span.clone(),
            side: Side::Server,
            started: Instant::now(),
            service,
            method,
        };
        let future = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        Box::pin(observed(future, span, call, 13))
    }
}

/// Opens a client span per outgoing call (a child of the current span, following the RPC
/// conventions), writes its W3C trace context into the request, and records the call's
/// duration and status code.
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

impl<S, B, ResBody> Service<Request<B>> for ClientTrace<S>
where
    S: Service<Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    ResBody: 'static,
{
    type Response = http::Response<ObservedBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let (service, method) = rpc_names(request.uri().path());
        let span = tracing::info_span!(
            "grpc.client",
            otel.name = request.uri().path().trim_start_matches('/'),
            otel.kind = "client",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
        );
        let context = span.context();
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&context, &mut HeaderInjector(request.headers_mut()))
        });
        let call = Call {
            span: span.clone(),
            side: Side::Client,
            started: Instant::now(),
            service,
            method,
        };
        let future = self.inner.call(request);
        // A call that fails below gRPC never reached the server: UNAVAILABLE.
        Box::pin(observed(future, span, call, 14))
    }
}

#[cfg(test)]
mod tests {
    use parking_lot::Mutex;
    use std::{convert::Infallible, sync::Arc};

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
            .with(crate::telemetry::span_layer(provider.tracer("test")));
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
            *captured.lock() = header;
            async { Ok::<_, Infallible>(http::Response::new(())) }
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
        let header = seen.lock().clone().expect("a traceparent header");
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
