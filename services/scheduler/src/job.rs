//! One build from queued to its end: it waits for a slot, then runs on the Scheduler's own
//! TreeBuilder ([`runner`]) or on every node of the fleet ([`fleet`]), within its deadline and
//! until cancelled; its outcome is recorded on the build and on its source.

use std::sync::Arc;

use merkle_proto::{
    common::v1::{BuildPhase, BuildProgress},
    scheduler::v1::{Build, BuildState, FleetMode},
};
use tracing::Instrument as _;

use crate::{
    context::Context,
    fleet,
    outcome::{Ending, Settled, settle},
    record::now,
    report::{Beating, Reporter, cancellation, record_metrics},
    runner::{self, Target},
    spec::SourceSpec,
    store::{self, Lease},
};

/// A build to run: its record as queued, its source, and (for a scheduled build) the lease it
/// was queued under.
pub struct Job {
    pub build: Build,
    pub spec: SourceSpec,
    pub lease: Option<Lease>,
    /// The source's failures in a row when the build was queued (a success after none writes
    /// nothing more on the source).
    pub failures: i32,
}

/// Runs a queued build to its end. Never fails: every outcome is recorded on the build.
pub async fn run(ctx: Arc<Context>, job: Job) {
    let Job {
        mut build,
        spec,
        lease,
        failures,
    } = job;
    let span = tracing::info_span!("build", build.id = %build.build_id, source = %build.source);
    async move {
        build.trace_id = merkle_shared::telemetry::current_trace_id().unwrap_or_default();
        let handle = ctx.registry.register(build.clone());
        // From here to its end, the build's runner beats, whatever the build waits for.
        let _beating = Beating::start(ctx.clone(), build.build_id.clone());
        let mut cancelled = handle.cancelled.clone();
        let epoch = lease.as_ref().map(|l| l.epoch);
        let mut reporter = Reporter::new(ctx.clone(), handle, epoch);
        let _permit = tokio::select! {
            permit = ctx.slots.acquire() => permit.ok(),
            _ = cancelled.changed() => None,
        };
        build.state = BuildState::Running as i32;
        build.start_time = Some(now());
        build.progress = Some(BuildProgress {
            phase: BuildPhase::Scanning as i32,
            ..Default::default()
        });
        if !reporter.record(&build).await {
            tracing::info!("the build was cancelled or taken over before it started");
            return;
        }
        tracing::info!(path = %spec.path, "build started");
        let started = std::time::Instant::now();
        let id = build.build_id.clone();
        let fleet = spec.fleet == FleetMode::AllClients;
        let work = async {
            if fleet {
                fleet::execute(&ctx, &spec, &mut build, &mut reporter, epoch).await
            } else {
                let target = Target::local(&ctx, &build.source)?;
                runner::execute(&ctx, &spec, &mut build, &mut reporter, &target).await
            }
        };
        let outcome = tokio::select! {
            outcome = work => outcome,
            () = tokio::time::sleep(spec.deadline) => Err(Ending::Cancelled(format!(
                "the deadline of {} passed", humantime::format_duration(spec.deadline)
            ))),
            reason = cancellation(&ctx, &id, &mut cancelled) => Err(Ending::Cancelled(reason)),
        };
        if fleet {
            // Node builds the fleet build did not see end (it was cancelled or timed out).
            let why = match &outcome {
                Err(Ending::Cancelled(reason)) => format!("the fleet build ended: {reason}"),
                _ => "the fleet build ended".to_owned(),
            };
            if let Err(err) =
                store::end_children(&ctx.pool, &id, BuildState::Cancelled, &why).await
            {
                tracing::warn!(error = %err, "ending the fleet build's node builds failed");
            }
        }
        build.end_time = Some(now());
        // An outage of the system's own services fails the build but is not the source's
        // failure: it is built again at its next tick, not backed off.
        let Settled { failed, outage } = settle(&mut build, outcome);
        if let Some(progress) = build.progress.as_mut() {
            progress.phase = BuildPhase::Done as i32;
        }
        let recorded = reporter.record(&build).await;
        record_metrics(&build, started.elapsed());
        if failed || outage {
            tracing_opentelemetry::OpenTelemetrySpanExt::set_status(
                &tracing::Span::current(),
                opentelemetry::trace::Status::error(build.error_message.clone()),
            );
        }
        tracing::info!(
            state = BuildState::try_from(build.state).map(|s| s.as_str_name()).unwrap_or("?"),
            root = %build.root_hash,
            error = %build.error_message,
            ms = started.elapsed().as_millis() as u64,
            recorded,
            "build finished"
        );
        if !recorded {
            tracing::warn!("the build's outcome was not recorded: it was cancelled or taken over, or this replica lost the lease it ran under");
        }
        if let Some(lease) = &lease
            && !outage
            && (failed || failures > 0)
            && let Err(err) = store::record_outcome(&ctx.pool, lease, &build.source, failed).await
        {
            tracing::warn!(error = %err, "recording the outcome on the source failed");
        }
    }
    .instrument(span)
    .await
}
