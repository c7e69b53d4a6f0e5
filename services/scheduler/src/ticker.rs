//! The leader: one replica holds a lease row in PostgreSQL, renews it, and is the only one that
//! starts scheduled builds. Every write it makes is fenced by the lease's epoch (see
//! `store.rs`), so a leader paused past its lease (a long GC pause, SIGSTOP, a partition)
//! records nothing once it wakes up; another replica has taken over within one lease period.
//!
//! Session advisory locks are not used: they vanish when a pooled connection is recycled, do
//! not work behind a transaction pooler, and leak when a task is cancelled.

use std::{sync::Arc, time::Duration};

use chrono::Utc;
use merkle_proto::scheduler::v1::{Build, BuildState, BuildTrigger};
use merkle_shared::shutdown::Shutdown;

use crate::{
    calendar::{coalesce, next_run},
    context::Context,
    job::{self, Job},
    record::{new_build, timestamp},
    report::HEARTBEAT_EVERY,
    spec::SourceSpec,
    store::{self, Lease, StoredSource, TickOutcome},
};

/// How often the leader looks for due sources.
const SCAN_EVERY: Duration = Duration::from_millis(100);
/// Due sources taken per scan.
const SCAN_LIMIT: i64 = 500;
/// Due sources whose ticks are recorded at once.
const PARALLEL_TICKS: usize = 8;
/// A runner silent this long (five heartbeats) is gone: its builds are failed.
pub const SILENT_FOR: Duration = Duration::from_secs(HEARTBEAT_EVERY.as_secs() * 5);

/// Runs the lease and, while it is held, the schedule, until shutdown.
pub fn spawn(ctx: Arc<Context>, lease_duration: Duration, mut shutdown: Shutdown) {
    tokio::spawn(async move {
        let renew_every = lease_duration / 3;
        let mut lease: Option<Lease> = None;
        let mut last_renew = std::time::Instant::now();
        let mut last_sweep = std::time::Instant::now();
        loop {
            if lease.is_none() || last_renew.elapsed() >= renew_every {
                last_renew = std::time::Instant::now();
                lease = match &lease {
                    None => {
                        match store::acquire_lease(&ctx.pool, &ctx.replica, lease_duration).await {
                            Ok(Some(got)) => {
                                tracing::info!(
                                    epoch = got.epoch,
                                    "this replica leads: it runs the schedule"
                                );
                                Some(got)
                            }
                            Ok(None) => None,
                            Err(err) => {
                                tracing::debug!(error = %err, "cannot reach PostgreSQL for the lease");
                                None
                            }
                        }
                    }
                    Some(held) => match store::renew_lease(&ctx.pool, held, lease_duration).await {
                        Ok(true) => lease,
                        Ok(false) => {
                            // Say what happened: another replica took over, or the lease
                            // lapsed while PostgreSQL could not be reached.
                            match store::lease_holder(&ctx.pool).await {
                                Ok(Some((holder, epoch))) if holder != held.holder => {
                                    tracing::warn!(epoch = held.epoch, leader = %holder, leader_epoch = epoch, "lost the lease: another replica leads now");
                                }
                                _ => tracing::warn!(
                                    epoch = held.epoch,
                                    "the lease lapsed: it could not be renewed in time (PostgreSQL was unreachable or slow); taking it again"
                                ),
                            }
                            None
                        }
                        Err(err) => {
                            tracing::warn!(error = %err, "cannot renew the lease; it lapses if this goes on");
                            lease
                        }
                    },
                };
            }
            if let Some(held) = &lease {
                if let Err(err) = schedule_due(&ctx, held).await {
                    tracing::warn!(error = %err, "scheduling failed; retrying");
                }
                if last_sweep.elapsed() >= HEARTBEAT_EVERY * 2 {
                    last_sweep = std::time::Instant::now();
                    sweep_silent(&ctx, held).await;
                }
            }
            tokio::select! {
                () = tokio::time::sleep(SCAN_EVERY) => {}
                () = shutdown.wait() => break,
            }
        }
        if let Some(held) = lease {
            // Hand over at once rather than after the lease lapses.
            let _ = store::release_lease(&ctx.pool, &held).await;
        }
    });
}

/// Starts the build of every due source, a few sources at a time (each source's tick is its
/// own transaction on its own row).
async fn schedule_due(ctx: &Arc<Context>, lease: &Lease) -> Result<(), crate::error::Error> {
    use futures::StreamExt as _;
    let due = store::due_sources(&ctx.pool, SCAN_LIMIT).await?;
    futures::stream::iter(due)
        .for_each_concurrent(PARALLEL_TICKS, |stored| async move {
            if let Err(err) = schedule_one(ctx, lease, stored).await {
                tracing::warn!(error = %err, "scheduling a source failed");
            }
        })
        .await;
    Ok(())
}

async fn schedule_one(
    ctx: &Arc<Context>,
    lease: &Lease,
    stored: StoredSource,
) -> Result<(), crate::error::Error> {
    // Stored sources were checked when stored; the interval floor of today's config does not
    // apply to them again.
    let spec = SourceSpec::from_proto(&stored.source, Duration::ZERO)?;
    let Some(tick) = stored.next_tick else {
        return Ok(());
    };
    let now = Utc::now();
    let (missed, next_tick) = coalesce(&spec.schedule, tick, now);
    let next = next_run(&spec, next_tick);
    let name = spec.name.to_string();
    let replace = spec.policy == crate::spec::Policy::Replace;
    let due = stored.next_due.unwrap_or(tick);
    let runs_here = |id: &str| ctx.registry.get(id).is_some();
    let live = store::Liveness {
        silent_for: SILENT_FOR,
        runs_here: &runs_here,
    };
    let outcome = store::record_tick(
        &ctx.pool,
        lease,
        &live,
        &name,
        tick,
        next,
        replace,
        |state| {
            let mut build = new_build(&name, BuildTrigger::Schedule, state);
            build.scheduled_time = Some(timestamp(tick));
            build.due_time = Some(timestamp(due));
            build.missed_ticks = missed;
            if state == BuildState::Skipped {
                build.error_message =
                    "a build of the source was still running (CONCURRENCY_POLICY_FORBID)".into();
                build.end_time = build.create_time;
            }
            build
        },
    )
    .await?;
    match outcome {
        TickOutcome::Queued {
            build,
            replaced,
            left,
        } => {
            if let Some(id) = replaced {
                ctx.registry.cancel(
                    &id,
                    "replaced by a newer scheduled build (CONCURRENCY_POLICY_REPLACE)",
                );
            }
            if let Some(id) = left {
                tracing::warn!(source = %name, build_id = %id, "failed a build its runner had left; the tick runs now");
            }
            if missed > 0 {
                tracing::info!(source = %name, missed, "ticks missed while no scheduler ran: coalesced into one build");
            }
            let lateness = (Utc::now() - tick).num_milliseconds();
            tracing::debug!(source = %name, build_id = %build.build_id, lateness_ms = lateness, "scheduled build queued");
            start(ctx, build, spec, lease, stored.failures);
        }
        TickOutcome::Skipped(build) => {
            tracing::info!(source = %name, build_id = %build.build_id, "tick skipped: a build is still running");
        }
        TickOutcome::Lost => {}
    }
    Ok(())
}

/// Runs a scheduled build (a trace of its own).
fn start(ctx: &Arc<Context>, build: Build, spec: SourceSpec, lease: &Lease, failures: i32) {
    let job = Job {
        build,
        spec,
        lease: Some(lease.clone()),
        failures,
    };
    let span = tracing::info_span!(parent: None, "scheduled build");
    tokio::spawn(tracing::Instrument::instrument(
        job::run(ctx.clone(), job),
        span,
    ));
}

/// Fails the queued and running builds whose runner stopped sending heartbeats (a replica
/// that died or was partitioned away), then runs at once the ticks they made be skipped.
async fn sweep_silent(ctx: &Arc<Context>, lease: &Lease) {
    let ids = match store::orphaned_builds(&ctx.pool, None, SILENT_FOR).await {
        Ok(ids) => ids,
        Err(err) => {
            tracing::debug!(error = %err, "looking for silent builds failed");
            return;
        }
    };
    for id in ids {
        let message = format!(
            "its scheduler replica stopped: no heartbeat for {}",
            humantime::format_duration(SILENT_FOR)
        );
        if !matches!(
            store::end_build(&ctx.pool, &id, BuildState::Failed, &message).await,
            Ok(Some(_))
        ) {
            continue;
        }
        tracing::warn!(build_id = %id, "failed a build whose runner went silent");
        let caught_up = store::catch_up(&ctx.pool, lease, &id, |source, missed| {
            let mut build = new_build(source, BuildTrigger::Schedule, BuildState::Queued);
            build.missed_ticks = missed;
            build
        })
        .await;
        let build = match caught_up {
            Ok(Some(build)) => build,
            Ok(None) => continue,
            Err(err) => {
                tracing::warn!(error = %err, build_id = %id, "queueing the skipped ticks failed");
                continue;
            }
        };
        let conn = ctx.pool.get().await;
        let stored = match conn {
            Ok(conn) => store::get_source(&*conn, &build.source)
                .await
                .ok()
                .flatten(),
            Err(_) => None,
        };
        let Some(stored) = stored else { continue };
        let Ok(spec) = SourceSpec::from_proto(&stored.source, Duration::ZERO) else {
            continue;
        };
        tracing::info!(source = %build.source, missed = build.missed_ticks, "ticks skipped while a dead runner held the source: coalesced into one build now");
        start(ctx, build, spec, lease, stored.failures);
    }
}
