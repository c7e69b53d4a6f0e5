//! The one gRPC server builder. Every service serves through [`serve`], which adds what every
//! server needs: `grpc.health.v1.Health`, reflection (v1 and v1alpha, for grpcurl), trace-context
//! propagation, authentication and authorization (`crate::auth`), a per-call timeout, a global concurrency limit, HTTP/2 keepalive, and graceful
//! shutdown on SIGTERM/SIGINT that drains in-flight calls for up to `SHUTDOWN_GRACE`.
//!
//! Message size limits are set on each generated server with [`limit_messages!`](crate::limit_messages), since they
//! are methods of the generated types rather than of the transport.

use std::{net::SocketAddr, time::Duration};

use tokio::net::TcpListener;
use tonic::{service::Routes, transport::server::TcpIncoming};
use tower::limit::GlobalConcurrencyLimitLayer;

use tonic_health::pb::health_server::{Health, HealthServer};

use crate::{config::ServerArgs, propagation::ServerTraceLayer, shutdown::Shutdown};

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
    health: HealthServer<impl Health>,
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
    // The admin port: /metrics. A default port already taken is not worth failing for; a
    // configured one is.
    if let Some(admin) = crate::metrics::admin_addr(args.metrics_listen_addr.as_deref(), local_addr)
    {
        match TcpListener::bind(admin).await {
            Ok(admin_listener) => {
                tracing::info!(addr = %admin, "serving /metrics");
                tokio::spawn(crate::metrics::serve_admin(
                    admin_listener,
                    shutdown.clone(),
                ));
            }
            Err(source) if args.metrics_listen_addr.is_some() => {
                return Err(ServeError::Bind {
                    addr: admin,
                    source,
                });
            }
            Err(err) => {
                tracing::warn!(addr = %admin, %err, "cannot serve /metrics there; set METRICS_LISTEN_ADDR");
            }
        }
    }
    let mut drain_signal = shutdown.clone();
    let builder = tonic::transport::Server::builder()
        .timeout(args.request_timeout)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .layer(ServerTraceLayer)
        .layer(crate::statuses::StatusLayer)
        // Before the concurrency limit: a refused call takes no slot.
        .layer(crate::auth::layer::AuthLayer)
        .layer(GlobalConcurrencyLimitLayer::new(
            args.concurrency_limit as usize,
        ))
        .add_routes(routes);
    let drained = async move { drain_signal.wait().await };
    // TLS when TLS_CERT_FILE is set (see `crate::tls`), else plain h2c.
    let tls = crate::tls::server().is_some();
    let server: std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<(), tonic::transport::Error>> + Send>,
    > = if tls {
        Box::pin(builder.serve_with_incoming_shutdown(crate::tls::incoming(listener), drained))
    } else {
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        Box::pin(builder.serve_with_incoming_shutdown(incoming, drained))
    };

    tracing::info!(service = service_name, addr = %local_addr, tls, "serving gRPC");
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

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tonic::{Request, Response, Status};
    use tonic_health::pb::{
        HealthCheckRequest, HealthCheckResponse, health_check_response::ServingStatus,
        health_client::HealthClient,
    };

    use super::*;

    /// A health service whose Check takes a while: an in-flight call to drain.
    struct SlowHealth;

    #[tonic::async_trait]
    impl Health for SlowHealth {
        async fn check(
            &self,
            _request: Request<HealthCheckRequest>,
        ) -> Result<Response<HealthCheckResponse>, Status> {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            Ok(Response::new(HealthCheckResponse {
                status: ServingStatus::Serving as i32,
            }))
        }

        type WatchStream = tokio_stream::Empty<Result<HealthCheckResponse, Status>>;

        async fn watch(
            &self,
            _request: Request<HealthCheckRequest>,
        ) -> Result<Response<Self::WatchStream>, Status> {
            Ok(Response::new(tokio_stream::empty()))
        }
    }

    fn args(port: u16, grace: Duration) -> ServerArgs {
        ServerArgs {
            listen_addr: Some(SocketAddr::from(([127, 0, 0, 1], port))),
            request_timeout: Duration::from_secs(10),
            max_message_bytes: 4 * 1024 * 1024,
            concurrency_limit: 16,
            shutdown_grace: grace,
            health_check_interval: Duration::from_secs(1),
            metrics_listen_addr: Some("off".into()),
            tls: Default::default(),
            auth: Default::default(),
        }
    }

    #[tokio::test]
    async fn shutdown_drains_an_in_flight_call_then_returns() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let (shutdown, trigger) = Shutdown::new();
        let server = tokio::spawn(async move {
            let args = args(port, Duration::from_secs(10));
            let routes = Routes::default();
            serve(
                "test.Service",
                &args,
                0,
                routes,
                HealthServer::new(SlowHealth),
                shutdown,
            )
            .await
        });

        let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .expect("uri")
            .connect_lazy();
        let mut client = HealthClient::new(channel);
        let call = tokio::spawn(async move {
            // The server may still be binding: retry until it answers.
            loop {
                match client.check(HealthCheckRequest::default()).await {
                    Err(status) if status.code() == tonic::Code::Unavailable => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    other => return other,
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        let stopping = Instant::now();
        trigger.trigger();

        let response = call
            .await
            .expect("call task")
            .expect("in-flight call completes");
        assert_eq!(response.into_inner().status, ServingStatus::Serving as i32);
        server
            .await
            .expect("server task")
            .expect("server stops cleanly");
        assert!(stopping.elapsed() < Duration::from_secs(10));
    }
}
