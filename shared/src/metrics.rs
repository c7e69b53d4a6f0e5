//! Metrics: OpenTelemetry instruments (exported over OTLP when configured, see
//! [`crate::telemetry`]) and the Prometheus text endpoint every service serves on its admin
//! port (`/metrics`, by default its gRPC port + 1000) for clusters without a collector.
//!
//! Instruments are made once, on first use, from the global meter provider that
//! [`crate::telemetry::init`] installs.

use std::{net::SocketAddr, sync::OnceLock, time::Duration};

use opentelemetry::{
    KeyValue,
    metrics::{Counter, Histogram, Meter},
};

use crate::shutdown::Shutdown;

/// The meter of every Merkle Mesh instrument.
pub fn meter() -> Meter {
    opentelemetry::global::meter("merkle-mesh")
}

/// Bucket bounds for durations in seconds, from 100 µs to 60 s.
const SECONDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// A histogram of seconds with `SECONDS` buckets.
pub fn seconds_histogram(name: &'static str, description: &'static str) -> Histogram<f64> {
    meter()
        .f64_histogram(name)
        .with_unit("s")
        .with_description(description)
        .with_boundaries(SECONDS.to_vec())
        .build()
}

/// A counter.
pub fn counter(name: &'static str, description: &'static str) -> Counter<u64> {
    meter()
        .u64_counter(name)
        .with_description(description)
        .build()
}

struct RpcInstruments {
    server: Histogram<f64>,
    client: Histogram<f64>,
}

/// Records one finished gRPC call (RPC semantic conventions): its duration by service,
/// method and status code; the histogram's count is the number of calls.
pub fn rpc_call(server: bool, service: &str, method: &str, code: i32, took: Duration) {
    static RPC: OnceLock<RpcInstruments> = OnceLock::new();
    let rpc = RPC.get_or_init(|| RpcInstruments {
        server: seconds_histogram(
            "rpc.server.call.duration",
            "Duration of gRPC calls served, by method and status code",
        ),
        client: seconds_histogram(
            "rpc.client.call.duration",
            "Duration of gRPC calls made to other services, by method and status code",
        ),
    });
    let attributes = [
        KeyValue::new("rpc.system", "grpc"),
        KeyValue::new("rpc.service", service.to_owned()),
        KeyValue::new("rpc.method", method.to_owned()),
        KeyValue::new("rpc.grpc.status_code", i64::from(code)),
    ];
    let histogram = if server { &rpc.server } else { &rpc.client };
    histogram.record(took.as_secs_f64(), &attributes);
}

/// Reports a bb8 pool's connections (`idle`, `used`) and its gets that had to wait, as
/// `db.client.connection.count` and `db.client.connection.wait_count`, under `pool_name`.
pub fn observe_pool<M: bb8::ManageConnection>(pool_name: String, pool: bb8::Pool<M>) {
    let connections = pool.clone();
    let waits_of = pool_name.clone();
    meter()
        .i64_observable_up_down_counter("db.client.connection.count")
        .with_description("Connections of the pool, by state (idle, used)")
        .with_callback(move |observer| {
            let state = connections.state();
            let idle = i64::from(state.idle_connections);
            let used = i64::from(state.connections) - idle;
            for (name, value) in [("idle", idle), ("used", used)] {
                observer.observe(
                    value,
                    &[
                        KeyValue::new("db.client.connection.pool.name", pool_name.clone()),
                        KeyValue::new("db.client.connection.state", name),
                    ],
                );
            }
        })
        .build();
    meter()
        .u64_observable_counter("db.client.connection.wait_count")
        .with_description("Times a call had to wait for a free connection of the pool")
        .with_callback(move |observer| {
            observer.observe(
                pool.state().statistics.get_waited,
                &[KeyValue::new(
                    "db.client.connection.pool.name",
                    waits_of.clone(),
                )],
            );
        })
        .build();
}

/// Where `/metrics` is served: `METRICS_LISTEN_ADDR`, else the gRPC address with its port
/// + 1000; `None` when turned off (`METRICS_LISTEN_ADDR=off`).
pub fn admin_addr(configured: Option<&str>, grpc: SocketAddr) -> Option<SocketAddr> {
    match configured {
        Some("off") => None,
        Some(addr) => addr.parse().ok(),
        None => Some(SocketAddr::new(grpc.ip(), grpc.port().checked_add(1000)?)),
    }
}

/// The registry as Prometheus text.
fn render() -> String {
    use prometheus::Encoder as _;
    let mut out = Vec::new();
    if let Err(err) =
        prometheus::TextEncoder::new().encode(&crate::telemetry::registry().gather(), &mut out)
    {
        tracing::warn!(%err, "rendering metrics failed");
    }
    String::from_utf8(out).unwrap_or_default()
}

/// Serves `GET /metrics` (Prometheus text format 0.0.4) on `listener` until `shutdown`.
pub async fn serve_admin(listener: tokio::net::TcpListener, shutdown: Shutdown) {
    use crate::http_get::{Reply, serve};
    serve(listener, shutdown, |path: String| async move {
        if path == "/metrics" {
            Reply::ok(prometheus::TEXT_FORMAT, render().into_bytes())
        } else {
            Reply::status(http::StatusCode::NOT_FOUND, "only /metrics is served here")
        }
    })
    .await;
}
