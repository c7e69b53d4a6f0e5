//! Where a running build's state goes: watchers here at once, the cache (for the other
//! replicas' watchers) and its record now and then, its heartbeat, and the metrics of builds
//! that ended; and how a cancellation reaches it.

use std::{sync::Arc, time::Duration};

use merkle_proto::{
    cache::v1::Namespace,
    scheduler::v1::{Build, BuildState},
};
use merkle_shared::client::{Backoff, retry};

use crate::{context::Context, registry::Handle, store};

/// How often a running build's progress reaches the cache (other replicas' watchers).
const CACHE_EVERY: Duration = Duration::from_millis(250);
/// How often a build's runner says it is alive (its heartbeat), its progress is saved, and it
/// looks for a cancellation made on another replica.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
/// How long a build's record is retried while PostgreSQL does not take it: 100 ms doubling
/// to 5 s, 8 attempts (about 12 s).
const RECORD_RETRIES: Backoff = Backoff {
    first: Duration::from_millis(100),
    max: Duration::from_secs(5),
    attempts: 8,
};

/// Where a build's state goes.
pub struct Reporter {
    ctx: Arc<Context>,
    handle: Handle,
    epoch: Option<i64>,
    last_cache: std::time::Instant,
    last_save: std::time::Instant,
}

impl Reporter {
    pub fn new(ctx: Arc<Context>, handle: Handle, epoch: Option<i64>) -> Reporter {
        Reporter {
            ctx,
            handle,
            epoch,
            last_cache: std::time::Instant::now(),
            last_save: std::time::Instant::now(),
        }
    }

    /// Publishes progress: watchers at once, the cache and the record now and then.
    pub async fn progress(&mut self, build: &Build) {
        self.handle.publish(build);
        if self.last_cache.elapsed() >= CACHE_EVERY {
            self.last_cache = std::time::Instant::now();
            self.ctx
                .cache
                .set(Namespace::BuildStatus, &build.build_id, build, None)
                .await;
        }
        if self.last_save.elapsed() >= HEARTBEAT_EVERY {
            self.last_save = std::time::Instant::now();
            if let Err(err) =
                store::save_build(&self.ctx.pool, build, &self.ctx.replica, self.epoch).await
            {
                tracing::warn!(build_id = %build.build_id, error = %err, "saving progress failed");
            }
        }
    }

    /// Writes a state change everywhere; false when the record refused it (the build was
    /// cancelled or taken over, or the lease it runs under was lost).
    pub async fn record(&mut self, build: &Build) -> bool {
        // PostgreSQL may be busy or restarting: try for a while (about 12 s). A state is
        // published (to watchers here, and to the cache for the other replicas) only once it
        // is recorded; a build that cannot be recorded at all is failed by the leader when its
        // heartbeat goes silent.
        let saved = retry(RECORD_RETRIES, |_| true, || {
            store::save_build(&self.ctx.pool, build, &self.ctx.replica, self.epoch)
        })
        .await
        .unwrap_or_else(|err| {
            tracing::warn!(build_id = %build.build_id, error = %err, "recording a build failed; giving up");
            false
        });
        if saved {
            self.handle.publish(build);
            self.ctx
                .cache
                .set(Namespace::BuildStatus, &build.build_id, build, None)
                .await;
        }
        saved
    }
}

/// Build duration, files and bytes, and builds by final state.
pub fn record_metrics(build: &Build, took: Duration) {
    use merkle_shared::metrics::{counter, meter, seconds_histogram};
    use opentelemetry::{KeyValue, metrics::Histogram};
    struct Instruments {
        duration: Histogram<f64>,
        files: Histogram<u64>,
        bytes: Histogram<u64>,
        ended: opentelemetry::metrics::Counter<u64>,
    }
    static INSTRUMENTS: std::sync::OnceLock<Instruments> = std::sync::OnceLock::new();
    let i = INSTRUMENTS.get_or_init(|| Instruments {
        duration: seconds_histogram(
            "merkle.build.duration",
            "How long builds took, by final state",
        ),
        files: meter()
            .u64_histogram("merkle.build.files")
            .with_description("Files in each finished build's tree")
            .with_boundaries(vec![10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7])
            .build(),
        bytes: meter()
            .u64_histogram("merkle.build.size")
            .with_unit("By")
            .with_description("Bytes of file content in each finished build's tree")
            .with_boundaries(vec![1e3, 1e6, 1e8, 1e9, 1e10, 1e11, 1e12])
            .build(),
        ended: counter("merkle.builds", "Builds that ended, by final state"),
    });
    let state = BuildState::try_from(build.state)
        .map(|s| s.as_str_name())
        .unwrap_or("BUILD_STATE_UNSPECIFIED");
    let attributes = [KeyValue::new("state", state)];
    i.duration.record(took.as_secs_f64(), &attributes);
    i.ended.add(1, &attributes);
    if let Some(stats) = &build.stats {
        i.files.record(stats.file_count, &attributes);
        i.bytes.record(stats.total_bytes, &attributes);
    }
}

/// Resolves when the build is cancelled: here (CancelBuild on this replica, a deleted
/// source), or on another replica (its record no longer says running).
pub async fn cancellation(
    ctx: &Context,
    id: &str,
    local: &mut tokio::sync::watch::Receiver<Option<String>>,
) -> String {
    // The first look comes a heartbeat in: most builds are over by then.
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + HEARTBEAT_EVERY,
        HEARTBEAT_EVERY,
    );
    loop {
        tokio::select! {
            changed = local.changed() => {
                if changed.is_err() {
                    std::future::pending::<()>().await;
                }
                if let Some(reason) = local.borrow().clone() {
                    return reason;
                }
            }
            _ = tick.tick() => {
                if let Ok(Some(state)) = store::build_state(&ctx.pool, id).await
                    && state != BuildState::Running as i16
                    && state != BuildState::Queued as i16
                {
                    return "cancelled".into();
                }
            }
        }
    }
}

/// A build's heartbeat, going until dropped (when the build ends, however it ends).
pub struct Beating(tokio::task::JoinHandle<()>);

impl Beating {
    pub fn start(ctx: Arc<Context>, id: String) -> Beating {
        Beating(tokio::spawn(heartbeat(ctx, id)))
    }
}

impl Drop for Beating {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Says build `id`'s runner is alive every [`HEARTBEAT_EVERY`], from this replica's own
/// liveness: a build waiting for a slot, a slow PostgreSQL or a paused DbSync is never taken
/// for a dead replica's.
async fn heartbeat(ctx: Arc<Context>, id: String) {
    let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(err) = store::beat(&ctx.pool, &id, &ctx.replica).await {
            tracing::debug!(build_id = %id, error = %err, "a heartbeat was not recorded");
        }
    }
}
