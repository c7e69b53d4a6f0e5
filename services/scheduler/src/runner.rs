//! Running one build: TreeBuilder hashes the directory, DbSync says whether the root changed,
//! and only then are the nodes streamed into DbSync.
//!
//! The Scheduler never holds a tree: the first BuildTree asks for no nodes (on a watched tree it
//! costs milliseconds); only when the root differs from the source's latest does a second
//! BuildTree stream the nodes, and each batch goes straight on: its hashes to FindMissingNodes,
//! the nodes DbSync lacks into the open SyncTree call. Memory is one batch, whatever the tree's
//! size. If the directory changed between the two builds (the second root differs), that sync
//! is abandoned and done again with the new root.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::Utc;
use merkle_proto::{
    cache::v1::Namespace,
    common::v1::{BuildPhase, BuildProgress},
    dbsync::v1::{
        FindMissingNodesRequest, GetLatestRootRequest, SetRetentionPolicyRequest, SyncTreeHeader,
        SyncTreeRequest, db_sync_service_client::DbSyncServiceClient, sync_tree_request::Content,
    },
    discovery::v1::discovery_service_client::DiscoveryServiceClient,
    scheduler::v1::{Build, BuildState, FleetMode},
    treebuilder::v1::{
        BuildResult, BuildTreeRequest, NodeBatch, build_tree_response::Event,
        tree_builder_service_client::TreeBuilderServiceClient,
    },
};
use merkle_shared::{
    cache::CacheClient,
    client::{Backoff, Channel, channel, retry, retry_idempotent},
    config::{ClientArgs, ConfigError},
    postgres::PgPool,
};
use tokio::sync::{Semaphore, mpsc};
use tonic::{Code, Status};
use tracing::Instrument as _;

use crate::{
    registry::{Handle, Registry},
    spec::SourceSpec,
    store::{self, Lease},
};

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

/// Hashes per FindMissingNodes call (the contract's limit).
const FIND_BATCH: usize = 10_000;

/// Node TreeBuilders whose channels are kept; past this many the set starts again.
const MAX_NODE_CHANNELS: usize = 10_000;

/// The services a build uses.
#[derive(Clone)]
pub struct Services {
    tree_builder: Option<TreeBuilderServiceClient<Channel>>,
    db_sync: Option<DbSyncServiceClient<Channel>>,
    discovery: Option<DiscoveryServiceClient<Channel>>,
    /// Fleet nodes' TreeBuilders, by address (channels connect lazily and are reused).
    nodes: Arc<Mutex<HashMap<String, TreeBuilderServiceClient<Channel>>>>,
    args: ClientArgs,
}

fn tree_builder_client(channel: Channel) -> TreeBuilderServiceClient<Channel> {
    TreeBuilderServiceClient::new(channel).max_decoding_message_size(64 << 20)
}

impl Services {
    pub fn new(
        tree_builder: Option<&str>,
        db_sync: Option<&str>,
        discovery: Option<&str>,
        args: &ClientArgs,
    ) -> Result<Self, ConfigError> {
        Ok(Services {
            tree_builder: tree_builder
                .map(|a| channel("TREE_BUILDER_ADDR (--tree-builder-addr)", a, args))
                .transpose()?
                .map(tree_builder_client),
            db_sync: db_sync
                .map(|a| channel("DB_SYNC_ADDR (--db-sync-addr)", a, args))
                .transpose()?
                .map(DbSyncServiceClient::new),
            discovery: discovery
                .map(|a| channel("DISCOVERY_ADDR (--discovery-addr)", a, args))
                .transpose()?
                .map(DiscoveryServiceClient::new),
            nodes: Arc::default(),
            args: args.clone(),
        })
    }

    pub fn discovery(&self) -> Result<DiscoveryServiceClient<Channel>, String> {
        self.discovery.clone().ok_or_else(|| {
            "DISCOVERY_ADDR is not set: fleet sources cannot list their nodes".to_owned()
        })
    }

    /// The TreeBuilder of a fleet node at `address` (`host:port`).
    pub fn node_tree_builder(
        &self,
        address: &str,
    ) -> Result<TreeBuilderServiceClient<Channel>, String> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(client) = nodes.get(address) {
            return Ok(client.clone());
        }
        let client = channel(
            "the node's tree_builder_address",
            &format!("http://{address}"),
            &self.args,
        )
        .map(tree_builder_client)
        .map_err(|e| e.to_string())?;
        if nodes.len() >= MAX_NODE_CHANNELS {
            nodes.clear();
        }
        nodes.insert(address.to_owned(), client.clone());
        Ok(client)
    }

    pub fn tree_builder(&self) -> Result<TreeBuilderServiceClient<Channel>, String> {
        self.tree_builder
            .clone()
            .ok_or_else(|| "TREE_BUILDER_ADDR is not set: nothing can be built".to_owned())
    }

    /// The settings of the calls to the other services (their retries, `CLIENT_MAX_ATTEMPTS`).
    pub fn client_args(&self) -> &ClientArgs {
        &self.args
    }

    pub fn db_sync(&self) -> Result<DbSyncServiceClient<Channel>, String> {
        self.db_sync
            .clone()
            .ok_or_else(|| "DB_SYNC_ADDR is not set: nothing can be stored".to_owned())
    }
}

/// What every build shares.
pub struct Context {
    pub pool: PgPool,
    pub cache: CacheClient,
    pub services: Services,
    /// Nodes a fleet build builds at once.
    pub fleet_parallelism: usize,
    pub registry: Registry,
    pub replica: String,
    pub slots: Semaphore,
}

/// Where a build runs and what its snapshots are stored as.
pub struct Target {
    pub tree_builder: TreeBuilderServiceClient<Channel>,
    /// DbSync's source name: the source's, or `<source>@<node>` for a fleet node.
    pub store_as: String,
    /// The TreeBuilder, as failure messages name it.
    pub builder_name: String,
    /// True for the Scheduler's own TreeBuilder (part of the system), false for a fleet node's.
    pub ours: bool,
}

impl Target {
    /// The Scheduler's own TreeBuilder, storing under the source's name.
    fn local(ctx: &Context, source: &str) -> Result<Target, Ending> {
        Ok(Target {
            tree_builder: ctx.services.tree_builder().map_err(Ending::Failed)?,
            store_as: source.to_owned(),
            builder_name: "TreeBuilder".into(),
            ours: true,
        })
    }
}

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

pub(crate) fn now() -> prost_types::Timestamp {
    let t = Utc::now();
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// Where a build's state goes.
pub(crate) struct Reporter {
    ctx: Arc<Context>,
    handle: Handle,
    epoch: Option<i64>,
    last_cache: std::time::Instant,
    last_save: std::time::Instant,
}

impl Reporter {
    pub(crate) fn new(ctx: Arc<Context>, handle: Handle, epoch: Option<i64>) -> Reporter {
        Reporter {
            ctx,
            handle,
            epoch,
            last_cache: std::time::Instant::now(),
            last_save: std::time::Instant::now(),
        }
    }

    /// Publishes progress: watchers at once, the cache and the record now and then.
    pub(crate) async fn progress(&mut self, build: &Build) {
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
    pub(crate) async fn record(&mut self, build: &Build) -> bool {
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
fn record_metrics(build: &Build, took: Duration) {
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
        let _beating = Beating(tokio::spawn(heartbeat(ctx.clone(), build.build_id.clone())));
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
                crate::fleet::execute(&ctx, &spec, &mut build, &mut reporter, epoch).await
            } else {
                let target = Target::local(&ctx, &build.source)?;
                execute(&ctx, &spec, &mut build, &mut reporter, &target).await
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
        let (failed, outage) = match outcome {
            Ok(state) => {
                build.state = state as i32;
                (false, false)
            }
            Err(Ending::Failed(reason)) => {
                build.state = BuildState::Failed as i32;
                build.error_message = reason;
                (true, false)
            }
            Err(Ending::Outage(reason)) => {
                build.state = BuildState::Failed as i32;
                build.error_message = reason;
                (false, true)
            }
            Err(Ending::Cancelled(reason)) => {
                build.state = BuildState::Cancelled as i32;
                build.error_message = reason;
                (false, false)
            }
        };
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

/// Resolves when the build is cancelled: here (CancelBuild on this replica, a deleted
/// source), or on another replica (its record no longer says running).
pub(crate) async fn cancellation(
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

/// How a build ended other than successfully.
pub(crate) enum Ending {
    /// The source's build failed (its directory, its node, its tree).
    Failed(String),
    /// A service of the system itself (DbSync, the Scheduler's own TreeBuilder) could not be
    /// reached: the build failed, the source did not.
    Outage(String),
    Cancelled(String),
}

/// The ending of a call to `service` that failed; `ours`: a service of the system itself,
/// whose being unavailable is an outage, not the source's failure.
pub(crate) fn call_failed(service: &str, ours: bool, status: &Status) -> Ending {
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded if ours => {
            Ending::Outage(format!("{service} is unavailable: {}", status.message()))
        }
        Code::Unavailable => {
            Ending::Failed(format!("{service} is unavailable: {}", status.message()))
        }
        code => Ending::Failed(format!("{service}: {code:?}: {}", status.message())),
    }
}

/// A call to DbSync failed.
fn db_sync_failed(status: &Status) -> Ending {
    call_failed("DbSync", true, status)
}

/// Stops a build's heartbeat when the build ends, however it ends.
struct Beating(tokio::task::JoinHandle<()>);

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

/// One BuildTree call: progress goes to the reporter, node batches to `nodes`; returns the
/// result.
async fn build_tree(
    target: &Target,
    spec: &SourceSpec,
    build: &mut Build,
    reporter: &mut Reporter,
    mut nodes: Option<&mut (dyn FnMut(NodeBatch) -> BatchFuture + Send)>,
) -> Result<BuildResult, Ending> {
    let mut tree_builder = target.tree_builder.clone();
    let request = BuildTreeRequest {
        path: spec.path.clone(),
        exclude_patterns: spec.exclude.clone(),
        profile: spec.profile as i32,
        include_nodes: nodes.is_some(),
        build_id: build.build_id.clone(),
        ..Default::default()
    };
    let mut stream = tree_builder
        .build_tree(request)
        .await
        .map_err(|s| call_failed(&target.builder_name, target.ours, &s))?
        .into_inner();
    while let Some(message) = stream
        .message()
        .await
        .map_err(|s| call_failed(&target.builder_name, target.ours, &s))?
    {
        match message.event {
            Some(Event::Progress(p)) => {
                // TreeBuilder's DONE is not the build's: DbSync comes next.
                let phase = match (nodes.is_some(), BuildPhase::try_from(p.phase)) {
                    (true, _) => BuildPhase::Syncing as i32,
                    (false, Ok(BuildPhase::Done)) => BuildPhase::Hashing as i32,
                    (false, _) => p.phase,
                };
                build.progress = Some(BuildProgress { phase, ..p });
                reporter.progress(build).await;
            }
            Some(Event::Nodes(batch)) => {
                if let Some(forward) = nodes.as_mut() {
                    forward(batch).await?;
                }
            }
            Some(Event::Result(result)) => {
                // The result is the last message: reading on takes the call's status (OK),
                // so the call ends as a completed one, not a cancelled one.
                while let Ok(Some(_)) = stream.message().await {}
                return Ok(result);
            }
            None => {}
        }
    }
    Err(Ending::Failed(format!(
        "{} ended the build without a result",
        target.builder_name
    )))
}

type BatchFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), Ending>> + Send>>;

/// One build on `target`: hash, compare with the latest stored root, store when changed.
pub(crate) async fn execute(
    ctx: &Context,
    spec: &SourceSpec,
    build: &mut Build,
    reporter: &mut Reporter,
    target: &Target,
) -> Result<BuildState, Ending> {
    let mut db_sync = ctx.services.db_sync().map_err(Ending::Failed)?;
    let phase = std::time::Instant::now();
    let first = build_tree(target, spec, build, reporter, None).await?;
    let hashed = phase.elapsed();
    // PostgreSQL's answer, never the cache's: a cached root must not decide that nothing
    // changed.
    let latest = retry_idempotent(ctx.services.client_args(), || {
        let mut db_sync = db_sync.clone();
        let request = GetLatestRootRequest {
            source: target.store_as.clone(),
            consistent: true,
        };
        async move { db_sync.get_latest_root(request).await }
    });
    let previous = match latest.await {
        Ok(answer) => answer.into_inner().snapshot.map(|s| s.root_hash),
        Err(status) if status.code() == Code::NotFound => None,
        Err(status) => return Err(db_sync_failed(&status)),
    };
    build.previous_root_hash = previous.clone().unwrap_or_default();
    tracing::debug!(
        hash_ms = hashed.as_secs_f64() * 1000.0,
        latest_ms = (phase.elapsed() - hashed).as_secs_f64() * 1000.0,
        "built and compared"
    );
    let mut result = first;
    for _attempt in 0..3 {
        build.root_hash = result.root_hash.clone();
        build.stats = result.stats;
        if previous.as_deref() == Some(result.root_hash.as_str()) {
            return Ok(BuildState::SucceededUnchanged);
        }
        let args = ctx.services.client_args();
        match sync(
            target,
            spec,
            build,
            reporter,
            &result,
            db_sync.clone(),
            args,
        )
        .await?
        {
            Synced::Stored(snapshot_id) => {
                build.snapshot_id = snapshot_id;
                apply_retention(ctx, &mut db_sync, spec, &target.store_as).await;
                return Ok(BuildState::SucceededChanged);
            }
            Synced::Unchanged => return Ok(BuildState::SucceededUnchanged),
            // The directory changed while its nodes were sent: store what it is now.
            Synced::Moved(newer) => result = newer,
        }
    }
    Err(Ending::Failed(
        "the directory kept changing while its nodes were sent; try again".into(),
    ))
}

enum Synced {
    Stored(String),
    Unchanged,
    Moved(BuildResult),
}

/// The second BuildTree, its nodes forwarded into SyncTree as they come.
async fn sync(
    target: &Target,
    spec: &SourceSpec,
    build: &mut Build,
    reporter: &mut Reporter,
    result: &BuildResult,
    db_sync: DbSyncServiceClient<Channel>,
    args: &ClientArgs,
) -> Result<Synced, Ending> {
    let (tx, rx) = mpsc::channel::<SyncTreeRequest>(4);
    let header = SyncTreeRequest {
        content: Some(Content::Header(SyncTreeHeader {
            source: target.store_as.clone(),
            root_hash: result.root_hash.clone(),
            build_id: build.build_id.clone(),
            profile: spec.profile as i32,
            stats: result.stats,
        })),
    };
    tx.send(header)
        .await
        .map_err(|_| Ending::Failed("SyncTree ended early".into()))?;
    let mut call_client = db_sync.clone();
    let call = tokio::spawn(
        async move {
            call_client
                .sync_tree(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        }
        .in_current_span(),
    );
    let forward_tx = tx.clone();
    let args = args.clone();
    let mut forward = move |batch: NodeBatch| -> BatchFuture {
        let db_sync = db_sync.clone();
        let tx = forward_tx.clone();
        let args = args.clone();
        Box::pin(async move {
            let hashes: Vec<String> = batch.nodes.iter().map(|n| n.hash.clone()).collect();
            let mut missing = std::collections::HashSet::new();
            for chunk in hashes.chunks(FIND_BATCH) {
                let answer = retry_idempotent(&args, || {
                    let mut db_sync = db_sync.clone();
                    let request = FindMissingNodesRequest {
                        hashes: chunk.to_vec(),
                    };
                    async move { db_sync.find_missing_nodes(request).await }
                })
                .await
                .map_err(|s| db_sync_failed(&s))?;
                missing.extend(answer.into_inner().missing_hashes);
            }
            let nodes: Vec<_> = batch
                .nodes
                .into_iter()
                .filter(|n| missing.contains(&n.hash))
                .collect();
            if !nodes.is_empty() {
                tx.send(SyncTreeRequest {
                    content: Some(Content::Nodes(NodeBatch { nodes })),
                })
                .await
                .map_err(|_| Ending::Failed("DbSync ended the SyncTree call early".into()))?;
            }
            Ok(())
        })
    };
    let second = build_tree(target, spec, build, reporter, Some(&mut forward)).await;
    drop(forward);
    drop(tx);
    let second = match second {
        Ok(second) => second,
        Err(ending) => {
            call.abort();
            return Err(ending);
        }
    };
    if second.root_hash != result.root_hash {
        // Abandon the call: DbSync stores nothing of an interrupted SyncTree.
        call.abort();
        return Ok(Synced::Moved(second));
    }
    let answer = match call.await {
        Ok(Ok(answer)) => answer.into_inner(),
        Ok(Err(status)) => return Err(db_sync_failed(&status)),
        Err(_) => return Err(Ending::Failed("the SyncTree call stopped".into())),
    };
    Ok(match answer.snapshot {
        Some(snapshot) if answer.changed => Synced::Stored(snapshot.snapshot_id),
        _ => Synced::Unchanged,
    })
}

/// Passes the source's retention policy on to DbSync after a new snapshot, on behalf of whoever
/// set it (a failure is only logged: the snapshot is stored either way).
async fn apply_retention(
    ctx: &Context,
    db_sync: &mut DbSyncServiceClient<Channel>,
    spec: &SourceSpec,
    source: &str,
) {
    let Some(policy) = spec.retention else { return };
    let mut request = tonic::Request::new(SetRetentionPolicyRequest {
        source: source.to_owned(),
        policy: Some(policy),
    });
    match store::retention_set_by(&ctx.pool, spec.name.as_str()).await {
        Ok(actor) if !actor.is_empty() => {
            if let Ok(value) = actor.parse() {
                request
                    .metadata_mut()
                    .insert(merkle_shared::auth::ON_BEHALF_OF, value);
            }
        }
        Ok(_) => {}
        Err(err) => tracing::warn!(error = %err, "reading who set the retention policy failed"),
    }
    if let Err(status) = db_sync.set_retention_policy(request).await {
        tracing::warn!(source, code = ?status.code(), message = status.message(), "passing the retention policy to DbSync failed");
    }
}
