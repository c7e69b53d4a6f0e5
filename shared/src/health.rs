//! Health status that follows real dependency checks.
//!
//! A service creates one [`Health`] for its gRPC service name. With no dependencies it reports
//! SERVING once started; with dependencies it runs [`Health::watch`], which probes them on an
//! interval and reports SERVING or NOT_SERVING as they come and go, without a restart. Both the
//! service's own name and the empty name (the whole server, which Kubernetes probes) are set.

use std::{future::Future, time::Duration};

use tonic_health::{ServingStatus, server::HealthReporter};

use crate::shutdown::Shutdown;

/// The health of one gRPC service and of its server.
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    service_name: &'static str,
}

/// The `grpc.health.v1.Health` service to add to the server.
pub type HealthService =
    tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>;

impl Health {
    /// Starts NOT_SERVING until [`Health::set_serving`] or a probe says otherwise.
    pub async fn new(service_name: &'static str) -> (Health, HealthService) {
        let reporter = HealthReporter::new();
        let service = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(reporter.clone()),
        );
        let health = Health {
            reporter,
            service_name,
        };
        health.set(false).await;
        (health, service)
    }

    pub async fn set_serving(&self) {
        self.set(true).await;
    }

    pub async fn set_not_serving(&self) {
        self.set(false).await;
    }

    async fn set(&self, serving: bool) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter.set_service_status("", status).await;
        self.reporter
            .set_service_status(self.service_name, status)
            .await;
    }

    /// Spawns a task that runs `probe` every `interval` and reports its outcome, logging each
    /// change; on shutdown it reports NOT_SERVING so load balancers drain the server.
    pub fn watch<P, F>(self, interval: Duration, mut shutdown: Shutdown, probe: P)
    where
        P: Fn() -> F + Send + 'static,
        F: Future<Output = Result<(), String>> + Send,
    {
        tokio::spawn(async move {
            let mut last: Option<bool> = None;
            loop {
                let outcome = tokio::select! {
                    outcome = probe() => outcome,
                    () = shutdown.wait() => break,
                };
                let serving = outcome.is_ok();
                if last != Some(serving) {
                    match &outcome {
                        Ok(()) => tracing::info!(
                            service = self.service_name,
                            "dependencies healthy: SERVING"
                        ),
                        Err(reason) => {
                            tracing::warn!(service = self.service_name, %reason, "dependency unhealthy: NOT_SERVING")
                        }
                    }
                    self.set(serving).await;
                    last = Some(serving);
                }
                tokio::select! {
                    () = tokio::time::sleep(interval) => {}
                    () = shutdown.wait() => break,
                }
            }
            self.set_not_serving().await;
        });
    }
}
