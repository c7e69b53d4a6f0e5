//! The one gRPC server builder. Every service serves through [`serve`], which adds what every
//! server needs: `grpc.health.v1.Health`, reflection (v1 and v1alpha, for grpcurl), trace-context
//! propagation, a per-call timeout, a global concurrency limit, HTTP/2 keepalive, and graceful
//! shutdown on SIGTERM/SIGINT that drains in-flight calls for up to `SHUTDOWN_GRACE`.
//!
//! Message size limits are set on each generated server with [`limit_messages!`], since they
//! are methods of the generated types rather than of the transport.

use std::{net::SocketAddr, time::Duration};

use tokio::net::TcpListener;
use tonic::{service::Routes, transport::server::TcpIncoming};
use tower::limit::GlobalConcurrencyLimitLayer;

use crate::{
    config::ServerArgs, health::HealthService, propagation::ServerTraceLayer, shutdown::Shutdown,
};

/// Sets the decoding and encoding size limits of a generated tonic server from [`ServerArgs`].
#[macro_export]
macro_rules! limit_messages {
    ($server:expr, $args:expr) => {
        $server
            .max_decoding_message_size($args.max_message_bytes as usize)
            .max_encoding_message_size($args.max_message_bytes as usize)
    };
}

/// Why a server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("building the reflection service failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("the gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves `routes` plus health and reflection on `LISTEN_ADDR` (by default 0.0.0.0 and
/// `default_port`) until `shutdown`, then drains in-flight calls for at most `SHUTDOWN_GRACE`.
pub async fn serve(
    service_name: &'static str,
    args: &ServerArgs,
    default_port: u16,
    routes: Routes,
    health: HealthService,
    mut shutdown: Shutdown,
) -> Result<(), ServeError> {
    // Both reflection versions advertise the same names: the service, health and reflection.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(merkle_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
            .with_service_name(service_name)
            .with_service_name("grpc.health.v1.Health")
            .with_service_name("grpc.reflection.v1.ServerReflection")
            .with_service_name("grpc.reflection.v1alpha.ServerReflection")
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let routes = routes
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);

    let addr = args.listen_addr_or(default_port);
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| ServeError::Bind { addr, source })?;
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut drain_signal = shutdown.clone();
    let server = tonic::transport::Server::builder()
        .timeout(args.request_timeout)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .layer(ServerTraceLayer)
        .layer(GlobalConcurrencyLimitLayer::new(
            args.concurrency_limit as usize,
        ))
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, async move { drain_signal.wait().await });

    tracing::info!(service = service_name, addr = %local_addr, "serving gRPC");
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => return result.map_err(ServeError::from),
        () = shutdown.wait() => {}
    }
    // Shutdown began: tonic stops accepting and waits for open calls; bound that wait.
    match tokio::time::timeout(args.shutdown_grace, server).await {
        Ok(result) => {
            tracing::info!(service = service_name, "drained; exiting");
            result.map_err(ServeError::from)
        }
        Err(_) => {
            tracing::warn!(
                service = service_name,
                grace = ?args.shutdown_grace,
                "calls still open after the shutdown grace period; exiting anyway"
            );
            Ok(())
        }
    }
}
