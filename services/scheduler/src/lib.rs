//! Scheduler: runs a build of each registered source on its schedule or on demand, keeps
//! build history, and streams build status and progress to watchers.
//!
//! From the top down (each module uses only those below it):
//!
//! - the API (`api`) and [`ticker`] (the leader's lease and the schedule, exactly once with
//!   several replicas) start a [`job`]; [`seed`] applies sources declared in a file;
//! - a [`job`] runs one build to its end: on the Scheduler's own TreeBuilder or, for a fleet
//!   source, on every ready node ([`fleet`]); both run the one pipeline of [`runner`] on a
//!   target: TreeBuilder, then DbSync, without holding the tree;
//! - [`report`] (progress, records, heartbeats, cancellation) and [`outcome`] (failure or
//!   outage) serve them; [`context`] holds what every build shares; [`registry`] the builds
//!   running here;
//! - [`calendar`] (next runs, missed ticks), [`spec`] (a source checked once), [`record`] (a
//!   build record) and [`store`] (the schema and every query, leader writes fenced by the
//!   lease's epoch) sit at the bottom.
//!
//! [`run`] serves `merkle.scheduler.v1.SchedulerService`. Its health follows PostgreSQL (its
//! sources and builds live there); TreeBuilder or DbSync being down fails builds, with the
//! reason, and never the Scheduler itself.

mod api;
pub mod calendar;
pub mod config;
pub mod context;
pub mod error;
pub mod fleet;
pub mod job;
pub mod outcome;
pub mod record;
pub mod registry;
pub mod report;
pub mod runner;
pub mod seed;
pub mod spec;
pub mod store;
pub mod ticker;

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

pub use config::Config;
use merkle_proto::scheduler::v1::{BuildState, scheduler_service_server::SchedulerServiceServer};
use merkle_shared::{
    cache::{CacheClient, seal::Seal},
    config::ConfigError,
    health::Health,
    postgres, server,
    service::RunError,
    shutdown::Shutdown,
};

/// The fully qualified gRPC service name.
pub const SERVICE_NAME: &str = merkle_proto::service_names::SCHEDULER;

/// Serves the Scheduler until `shutdown`.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), RunError> {
    let pool = postgres::pool(&config.postgres)?;
    let replica = config.replica();
    let ctx = Arc::new(context::Context {
        pool: pool.clone(),
        cache: CacheClient::new(&config.cache, &config.common.client)?,
        services: context::Services::new(
            config.tree_builder_addr.as_deref(),
            config.db_sync_addr.as_deref(),
            config.discovery_addr.as_deref(),
            &config.common.client,
        )?,
        fleet_parallelism: config.fleet_parallelism as usize,
        registry: registry::Registry::default(),
        replica: replica.clone(),
        slots: tokio::sync::Semaphore::new(config.max_running_builds as usize),
    });
    tracing::info!(replica = %replica, "scheduler replica");
    let (health, health_service) = Health::new(SERVICE_NAME).await;

    // Healthy: the schema is current and PostgreSQL answers. Once, after the first migration:
    // builds this replica left queued or running when it stopped are failed, and the sources
    // file is applied.
    let ready = Arc::new(AtomicBool::new(false));
    let probe_timeout = config.postgres.database_connect_timeout;
    let sources_file = config.sources_file.clone();
    let min_interval = config.min_interval;
    let seal_file = config.cache.seal_from_file()?;
    let probe_ctx = ctx.clone();
    health.watch(config.common.server.health_check_interval, shutdown.clone(), move || {
        let ctx = probe_ctx.clone();
        let ready = ready.clone();
        let sources_file = sources_file.clone();
        let seal_file = seal_file.clone();
        async move {
            if !ready.load(Ordering::Acquire) {
                store::migrate(&ctx.pool).await.map_err(|e| e.to_string())?;
                if let Some(seal) = seal_file.clone() {
                    ctx.cache.install_seal(seal);
                } else {
                    let secret = store::page_token_key(&ctx.pool).await.map_err(|e| e.to_string())?;
                    ctx.cache.install_seal(Seal::derived(&secret, "cache"));
                }
                let left = store::orphaned_builds(&ctx.pool, Some(&ctx.replica), std::time::Duration::ZERO)
                    .await
                    .map_err(|e| e.to_string())?;
                for id in left {
                    store::end_build(&ctx.pool, &id, BuildState::Failed, "scheduler restarted")
                        .await
                        .map_err(|e| e.to_string())?;
                    tracing::warn!(build_id = %id, "failed a build this replica left running when it stopped");
                }
                if let Some(file) = &sources_file {
                    let changed = seed::seed(&ctx.pool, file, min_interval).await.map_err(|e| e.to_string())?;
                    tracing::info!(file = %file.display(), changed, "sources file applied");
                }
                ready.store(true, Ordering::Release);
            }
            postgres::ping(&ctx.pool, probe_timeout).await
        }
    });
    if let Some(file) = &config.sources_file
        && !file.is_file()
    {
        return Err(ConfigError::new(
            "SOURCES_FILE (--sources-file)",
            format!("{} is not a readable file", file.display()),
        )
        .into());
    }

    ticker::spawn(ctx.clone(), config.lease_duration, shutdown.clone());
    let service = merkle_shared::limit_messages!(
        SchedulerServiceServer::new(api::SchedulerApi::new(ctx, config.min_interval)),
        config.common.server
    );
    server::serve(
        SERVICE_NAME,
        &config.common.server,
        merkle_shared::ports::SCHEDULER,
        tonic::service::Routes::new(service),
        health_service,
        shutdown,
    )
    .await?;
    Ok(())
}
