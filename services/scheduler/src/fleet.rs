//! Fleet builds (`FLEET_MODE_ALL_CLIENTS`): one build on every ready client node Discovery
//! lists, on that node's TreeBuilder, each stored under `<source>@<node id>`.
//!
//! The fleet build is the parent; each node's build is a build record of its own that names
//! it (`parent_build_id`, `node`), so `ListBuilds` shows the fan-out and `WatchBuild` follows
//! any one node. Nodes run `FLEET_PARALLELISM` at a time; a node that fails fails only its own
//! build. The fleet build succeeds when at least one node did (CHANGED when any node stored a
//! new snapshot, its message naming the nodes that failed), and fails when every node failed
//! or no client is ready.

use std::sync::Arc;

use futures::StreamExt as _;
use merkle_proto::{
    common::v1::{BuildPhase, BuildProgress, TreeStats},
    discovery::v1::{CacheState, Client, ListClientsRequest},
    scheduler::v1::{Build, BuildState},
    treebuilder::v1::CheckPathRequest,
};
use merkle_shared::names::SourceName;
use tracing::Instrument as _;

use crate::{
    context::Context,
    error::Error,
    outcome::{Ending, Settled, call_failed, settle},
    record::{new_build, now},
    report::{HEARTBEAT_EVERY, Reporter, cancellation},
    runner::{self, Target},
    spec::SourceSpec,
    store,
};

/// Discovery's list of clients (idempotent: retried while Discovery is unavailable).
async fn list_clients(
    ctx: &Context,
    discovery: &merkle_proto::discovery::v1::discovery_service_client::DiscoveryServiceClient<
        merkle_shared::client::Channel,
    >,
) -> Result<tonic::Response<merkle_proto::discovery::v1::ListClientsResponse>, tonic::Status> {
    merkle_shared::client::retry_idempotent(ctx.services.client_args(), || {
        let mut discovery = discovery.clone();
        async move { discovery.list_clients(ListClientsRequest::default()).await }
    })
    .await
}

/// Failed nodes named in a fleet build's message; the rest are counted.
const NAMED_FAILURES: usize = 5;
/// Nodes whose TreeBuilder is asked about a new source's path at once.
const PARALLEL_CHECKS: usize = 16;

/// Asks the TreeBuilder of every ready client whether it may build `path` (CreateSource and
/// UpdateSource of a fleet source), once per distinct TreeBuilder address. A node's refusal is passed on, naming it; a node that
/// cannot be reached is skipped (it fails its own builds until it can).
pub(crate) async fn check_path(ctx: &Context, path: &str) -> Result<(), Error> {
    let discovery = ctx.services.discovery().map_err(|reason| {
        Error::FailedPrecondition(format!(
            "source.fleet_mode: FLEET_MODE_ALL_CLIENTS needs Discovery: {reason}"
        ))
    })?;
    let clients = list_clients(ctx, &discovery)
        .await
        .map_err(|s| {
            Error::Unavailable(format!(
                "source.path cannot be checked: Discovery: {}",
                s.message()
            ))
        })?
        .into_inner()
        .clients;
    // One question per TreeBuilder: nodes that share one (its answer is the same for all)
    // cost one call, not one each.
    let mut asked = std::collections::HashSet::new();
    let ready: Vec<Client> = clients
        .into_iter()
        .filter(|c| c.ready && !c.tree_builder_address.is_empty())
        .filter(|c| asked.insert(c.tree_builder_address.clone()))
        .collect();
    let checks = futures::stream::iter(ready)
        .map(|client| async move {
            let answer = match ctx.services.node_tree_builder(&client.tree_builder_address) {
                Ok(mut tree_builder) => tree_builder
                    .check_path(CheckPathRequest {
                        path: path.to_owned(),
                    })
                    .await
                    .map(drop),
                Err(reason) => Err(tonic::Status::unavailable(reason)),
            };
            (client, answer)
        })
        .buffer_unordered(PARALLEL_CHECKS)
        .collect::<Vec<_>>()
        .await;
    for (client, answer) in checks {
        match answer {
            Ok(()) => {}
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                ) =>
            {
                tracing::warn!(node = %client.id, message = status.message(), "a node's TreeBuilder could not check a fleet source's path");
            }
            Err(status) => {
                return Err(Error::Remote(tonic::Status::new(
                    status.code(),
                    format!("source.{} (on node {})", status.message(), client.id),
                )));
            }
        }
    }
    Ok(())
}

/// Builds `spec` on every ready client; `parent` is the fleet build, running.
pub(crate) async fn execute(
    ctx: &Arc<Context>,
    spec: &SourceSpec,
    parent: &mut Build,
    reporter: &mut Reporter,
    epoch: Option<i64>,
) -> Result<BuildState, Ending> {
    let discovery = ctx.services.discovery().map_err(Ending::Failed)?;
    let answer = list_clients(ctx, &discovery)
        .await
        .map_err(|s| call_failed("Discovery", true, &s))?
        .into_inner();
    if answer.cache_state == CacheState::Stale as i32 {
        tracing::warn!(error = %answer.error, "Discovery answered its last known list (STALE)");
    }
    let clients: Vec<Client> = answer
        .clients
        .into_iter()
        .filter(|c| c.ready && !c.tree_builder_address.is_empty())
        .collect();
    if clients.is_empty() {
        return Err(Ending::Failed(format!(
            "Discovery ({} backend) lists no ready client with a TreeBuilder address",
            answer.backend
        )));
    }
    tracing::info!(nodes = clients.len(), "fleet build started");
    let total = clients.len();
    let (spec_view, parent_view) = (Arc::new(spec.clone()), Arc::new(parent.clone()));
    // Each node build is a task of its own: while the loop below awaits its own reporting it
    // does not poll this stream, and a node build polled only by it would stall there holding
    // what it holds (a pooled PostgreSQL connection, starving every other build and the lease).
    // The tasks stay in the fleet build's trace.
    let fleet_span = tracing::Span::current();
    let mut builds = futures::stream::iter(clients)
        .map(|client| {
            let (ctx, spec, parent) = (ctx.clone(), spec_view.clone(), parent_view.clone());
            NodeTask(tokio::spawn(
                async move { run_node(&ctx, &spec, &parent, &client, epoch).await }
                    .instrument(fleet_span.clone()),
            ))
        })
        .buffer_unordered(ctx.fleet_parallelism);

    // The fleet build's own heartbeat and progress: nodes done, their files and bytes.
    let mut heartbeat = tokio::time::interval(HEARTBEAT_EVERY);
    let (mut changed, mut succeeded) = (false, 0usize);
    let mut failures: Vec<String> = Vec::new();
    let mut outages = 0usize;
    let mut stats = TreeStats::default();
    let mut done = 0usize;
    loop {
        tokio::select! {
            next = builds.next() => {
                let Some(ended) = next else { break };
                let (node, outage) = ended.unwrap_or_else(|panicked| {
                    tracing::error!(error = %panicked, "a node build's task failed");
                    let mut node = new_build(&parent.source, parent.trigger(), BuildState::Failed);
                    node.node = "(a node)".into();
                    node.error_message = format!("its build stopped: {panicked}");
                    (node, false)
                });
                done += 1;
                outages += usize::from(outage);
                match BuildState::try_from(node.state) {
                    Ok(BuildState::SucceededChanged) => {
                        changed = true;
                        succeeded += 1;
                    }
                    Ok(BuildState::SucceededUnchanged) => succeeded += 1,
                    _ => failures.push(format!("{}: {}", node.node, node.error_message)),
                }
                if let Some(s) = node.stats {
                    stats.file_count += s.file_count;
                    stats.dir_count += s.dir_count;
                    stats.symlink_count += s.symlink_count;
                    stats.skipped_count += s.skipped_count;
                    stats.total_bytes += s.total_bytes;
                }
                parent.progress = Some(BuildProgress {
                    phase: BuildPhase::Hashing as i32,
                    files_done: stats.file_count,
                    bytes_done: stats.total_bytes,
                    ..Default::default()
                });
                reporter.progress(parent).await;
            }
            _ = heartbeat.tick() => reporter.progress(parent).await,
        }
    }
    parent.stats = Some(stats);
    let failed = failures.len();
    if failed > 0 {
        let named: Vec<&str> = failures
            .iter()
            .take(NAMED_FAILURES)
            .map(String::as_str)
            .collect();
        let more = if failed > NAMED_FAILURES {
            format!("; and {} more", failed - NAMED_FAILURES)
        } else {
            String::new()
        };
        parent.error_message = format!(
            "{failed} of {total} nodes failed: {}{more}",
            named.join("; ")
        );
    }
    tracing::info!(
        nodes = total,
        succeeded,
        failed = done - succeeded,
        changed,
        "fleet build finished"
    );
    if succeeded == 0 {
        let message = std::mem::take(&mut parent.error_message);
        // Every node failed because the system's own services were away: an outage.
        return Err(if outages == failed {
            Ending::Outage(message)
        } else {
            Ending::Failed(message)
        });
    }
    Ok(if changed {
        BuildState::SucceededChanged
    } else {
        BuildState::SucceededUnchanged
    })
}

/// A node build's task; aborted when dropped, so a fleet build that ends (cancelled, past
/// its deadline) takes its nodes' builds with it.
struct NodeTask(tokio::task::JoinHandle<(Build, bool)>);

impl std::future::Future for NodeTask {
    type Output = Result<(Build, bool), tokio::task::JoinError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}

impl Drop for NodeTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One node's build, recorded under the fleet build; returns it as it ended, and whether it
/// failed for an outage of the system's own services.
async fn run_node(
    ctx: &Arc<Context>,
    spec: &SourceSpec,
    parent: &Build,
    client: &Client,
    epoch: Option<i64>,
) -> (Build, bool) {
    let mut build = new_build(&parent.source, parent.trigger(), BuildState::Running);
    build.parent_build_id = parent.build_id.clone();
    build.node = client.id.clone();
    build.trace_id = parent.trace_id.clone();
    build.start_time = Some(now());
    build.progress = Some(BuildProgress {
        phase: BuildPhase::Scanning as i32,
        ..Default::default()
    });
    let span = tracing::info_span!("node build", build.id = %build.build_id, node = %client.id);
    run_node_in(ctx, spec, parent, client, epoch, build)
        .instrument(span)
        .await
}

async fn run_node_in(
    ctx: &Arc<Context>,
    spec: &SourceSpec,
    parent: &Build,
    client: &Client,
    epoch: Option<i64>,
    mut build: Build,
) -> (Build, bool) {
    match store::insert_child(&ctx.pool, &build, &ctx.replica, epoch).await {
        Ok(true) => {}
        Ok(false) => {
            build.state = BuildState::Cancelled as i32;
            build.error_message = "this replica lost the lease the fleet build ran under".into();
            return (build, false);
        }
        Err(err) => {
            build.state = BuildState::Failed as i32;
            build.error_message = format!("recording the node's build failed: {err}");
            return (build, true);
        }
    }
    let handle = ctx.registry.register(build.clone());
    let mut cancelled = handle.cancelled.clone();
    let mut reporter = Reporter::new(ctx.clone(), handle, epoch);
    let store_as = format!("{}@{}", parent.source, client.id);
    let target = match (
        SourceName::parse("node id", &store_as),
        ctx.services.node_tree_builder(&client.tree_builder_address),
    ) {
        (Err(rule), _) => Err(Ending::Failed(format!(
            "its snapshots cannot be stored as {store_as:?}: {rule}"
        ))),
        (_, Err(reason)) => Err(Ending::Failed(reason)),
        (Ok(_), Ok(tree_builder)) => Ok(Target {
            tree_builder,
            store_as,
            builder_name: format!(
                "node {}'s TreeBuilder at {}",
                client.id, client.tree_builder_address
            ),
            ours: false,
        }),
    };
    let id = build.build_id.clone();
    let outcome = match target {
        Ok(target) => tokio::select! {
            outcome = runner::execute(ctx, spec, &mut build, &mut reporter, &target) => outcome,
            reason = cancellation(ctx, &id, &mut cancelled) => Err(Ending::Cancelled(reason)),
        },
        Err(ending) => Err(ending),
    };
    build.end_time = Some(now());
    let Settled { outage, .. } = settle(&mut build, outcome);
    if let Some(progress) = build.progress.as_mut() {
        progress.phase = BuildPhase::Done as i32;
    }
    if !reporter.record(&build).await {
        tracing::warn!("the node build's outcome was not recorded");
    }
    (build, outage)
}
