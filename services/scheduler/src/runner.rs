//! Running one build: TreeBuilder hashes the directory, DbSync says whether the root changed,
//! and only then are the nodes streamed into DbSync.
//!
//! The Scheduler never holds a tree: the first BuildTree asks for no nodes (on a watched tree it
//! costs milliseconds); only when the root differs from the source's latest does a second
//! BuildTree stream the nodes, and each batch goes straight on: its hashes to FindMissingNodes,
//! the nodes DbSync lacks into the open SyncTree call. Memory is one batch, whatever the tree's
//! size. If the directory changed between the two builds (the second root differs), that sync
//! is abandoned and done again with the new root.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use merkle_proto::{
    common::v1::{BuildPhase, BuildProgress},
    dbsync::v1::{
        FindMissingNodesRequest, GetLatestRootRequest, SetRetentionPolicyRequest, SyncTreeHeader,
        SyncTreeRequest, db_sync_service_client::DbSyncServiceClient, sync_tree_request::Content,
    },
    scheduler::v1::{Build, BuildState},
    treebuilder::v1::{
        BuildResult, BuildTreeRequest, NodeBatch, build_tree_response::Event,
        tree_builder_service_client::TreeBuilderServiceClient,
    },
};
use merkle_shared::{
    client::{Channel, retry_idempotent},
    config::ClientArgs,
};
use tokio::sync::mpsc;
use tonic::Code;
use tracing::Instrument as _;

use crate::{
    context::Context,
    outcome::{Ending, call_failed, db_sync_failed},
    report::Reporter,
    spec::SourceSpec,
    store,
};

/// Hashes per FindMissingNodes call (the contract's limit).
const FIND_BATCH: usize = 10_000;

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
    pub fn local(ctx: &Context, source: &str) -> Result<Target, Ending> {
        Ok(Target {
            tree_builder: ctx.services.tree_builder().map_err(Ending::Failed)?,
            store_as: source.to_owned(),
            builder_name: "TreeBuilder".into(),
            ours: true,
        })
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
pub async fn execute(
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
    // Set when DbSync ended the call while nodes were still being sent: the call's own status
    // then says why (DbSync went away: an outage, not the source's failure).
    let call_ended = Arc::new(AtomicBool::new(false));
    let ended = call_ended.clone();
    let mut forward = move |batch: NodeBatch| -> BatchFuture {
        let db_sync = db_sync.clone();
        let tx = forward_tx.clone();
        let args = args.clone();
        let ended = ended.clone();
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
                .map_err(|_| {
                    ended.store(true, Ordering::Relaxed);
                    Ending::Failed("DbSync ended the SyncTree call early".into())
                })?;
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
            if !call_ended.load(Ordering::Relaxed) {
                call.abort();
            } else if let Ok(Err(status)) = call.await {
                return Err(db_sync_failed(&status));
            }
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
