//! Scheduler: runs a build of each registered source on its schedule or on demand, keeps
//! build history and streams build status and progress to watchers.
//!
//! [`run`] serves `merkle.scheduler.v1.SchedulerService`.

mod api;
pub mod config;

pub use config::Config;
use merkle_proto::scheduler::v1::scheduler_service_server::SchedulerServiceServer;
use merkle_shared::{health::Health, server, service::RunError, shutdown::Shutdown};

/// The fully qualified gRPC service name.
pub const SERVICE_NAME: &str = merkle_proto::service_names::SCHEDULER;

/// Serves Scheduler until `shutdown`.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), RunError> {
    let (health, health_service) = Health::new(SERVICE_NAME).await;
    // No dependency is checked yet: its RPCs are delivered by a later issue.
    health.set_serving().await;
    let service = merkle_shared::limit_messages!(
        SchedulerServiceServer::new(api::SchedulerApi),
        config.server
    );
    server::serve(
        SERVICE_NAME,
        &config.server,
        merkle_shared::ports::SCHEDULER,
        tonic::service::Routes::new(service),
        health_service,
        shutdown,
    )
    .await?;
    Ok(())
}
