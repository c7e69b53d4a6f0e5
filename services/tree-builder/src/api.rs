//! The gRPC face of TreeBuilder: requests are checked and turned into build options here, the
//! builds themselves run in [`crate::builds`].

use std::{
    pin::Pin,
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use merkle_core::{Digest, MemTree, Profile, diff};
use merkle_proto::treebuilder::v1::{
    BuildResult, BuildTreeRequest, BuildTreeResponse, CheckPathRequest, CheckPathResponse,
    VerifyTreeRequest, VerifyTreeResponse, build_tree_response::Event,
    tree_builder_service_server::TreeBuilderService,
};
use merkle_shared::convert::{
    change_to_proto, profile_from_proto, profile_to_proto, stats_to_proto,
};
use tokio::sync::mpsc;
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};

use crate::{
    builds::{self, BuildJob, BuildSettings, RecentTrees, StreamSink},
    error::Error,
    paths::AllowedRoots,
    stored::StoredTrees,
};

/// How often a build reports progress.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);
/// Default and maximum of VerifyTreeRequest.max_differences.
const DEFAULT_DIFFERENCES: usize = 1000;
const MAX_DIFFERENCES: usize = 100_000;

pub(crate) struct TreeBuilderApi {
    roots: AllowedRoots,
    settings: BuildSettings,
    recent: Arc<RecentTrees>,
    stored: StoredTrees,
}

impl TreeBuilderApi {
    pub(crate) fn new(
        roots: AllowedRoots,
        settings: BuildSettings,
        recent: RecentTrees,
        stored: StoredTrees,
    ) -> Self {
        TreeBuilderApi {
            roots,
            settings,
            recent: Arc::new(recent),
            stored,
        }
    }
}

type BuildTreeStream = Pin<Box<dyn Stream<Item = Result<BuildTreeResponse, Status>> + Send>>;

fn result_message(outcome: &merkle_core::BuildOutcome, resolved: &std::path::Path) -> BuildResult {
    BuildResult {
        root_hash: outcome.root.to_hex(),
        stats: Some(stats_to_proto(&outcome.stats)),
        duration: prost_types::Duration::try_from(outcome.duration).ok(),
        resolved_path: resolved.to_string_lossy().into_owned(),
        profile: profile_to_proto(outcome.profile) as i32,
        node_count: outcome.node_count,
        files_hashed: outcome.files_hashed,
    }
}

fn check_patterns(patterns: &[String]) -> Result<(), Error> {
    merkle_core::build::check_excludes(patterns)
        .map_err(|rule| Error::BadRequest(format!("exclude_patterns{rule}")))
}

#[tonic::async_trait]
impl TreeBuilderService for TreeBuilderApi {
    type BuildTreeStream = BuildTreeStream;

    async fn build_tree(
        &self,
        request: Request<BuildTreeRequest>,
    ) -> Result<Response<Self::BuildTreeStream>, Status> {
        let request = request.into_inner();
        let root = self.roots.check(&request.path)?;
        let profile = profile_from_proto(request.profile).map_err(Error::BadRequest)?;
        check_patterns(&request.exclude_patterns)?;
        merkle_shared::names::check_build_id("build_id", &request.build_id, false)
            .map_err(Error::BadRequest)?;
        let mut options = self
            .settings
            .options(&root, profile, request.exclude_patterns);
        if request.disable_stat_cache {
            options.stat_cache = None;
        }
        let job = BuildJob {
            root: root.clone(),
            options,
            fresh: request.disable_stat_cache,
        };
        merkle_shared::telemetry::tag_build(&request.build_id, "");
        tracing::info!(path = %root.display(), build_id = %request.build_id, profile = profile.name(), "build started");

        let (tx, rx) = mpsc::channel(16);
        let cancel = Arc::new(AtomicBool::new(false));
        let keep = self.recent.budget();
        let sink = Arc::new(StreamSink::new(
            request.include_nodes.then(|| tx.clone()),
            self.settings.batch_bytes,
            cancel.clone(),
            keep,
        ));
        let recent = self.recent.clone();
        let settings = self.settings.clone();
        // The build outlives this handler: it stays in the call's span (and trace).
        let span = tracing::Span::current();
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let result = builds::run(
                    job,
                    &settings,
                    sink.clone(),
                    Some(tx.clone()),
                    cancel,
                    PROGRESS_INTERVAL,
                )
                .await;
                let message = match result {
                    Ok((outcome, progress)) => {
                        tracing::info!(
                            root = %outcome.root,
                            files = outcome.stats.file_count,
                            read = outcome.files_hashed,
                            relisted_dirs = outcome.dirs_relisted,
                            rescan_reason = outcome.rescan_reason,
                            ms = outcome.duration.as_millis() as u64,
                            "build finished"
                        );
                        let _ = tx.send(Ok(builds::progress_event(&progress))).await;
                        if let Some(nodes) = Arc::into_inner(sink).and_then(StreamSink::into_kept) {
                            recent.insert(MemTree {
                                root: outcome.root,
                                profile: outcome.profile,
                                nodes,
                            });
                        }
                        Ok(BuildTreeResponse {
                            event: Some(Event::Result(result_message(&outcome, &root))),
                        })
                    }
                    Err(err) => {
                        tracing::warn!(path = %root.display(), error = %err, "build failed");
                        Err(Status::from(err))
                    }
                };
                // The caller may be gone; then there is no one to tell.
                let _ = tx.send(message).await;
            },
            span,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn verify_tree(
        &self,
        request: Request<VerifyTreeRequest>,
    ) -> Result<Response<VerifyTreeResponse>, Status> {
        let request = request.into_inner();
        let expected: Digest = request
            .expected_root_hash
            .parse()
            .map_err(|e| Error::BadRequest(format!("expected_root_hash: {e}")))?;
        let root = self.roots.check(&request.path)?;
        let profile: Profile = profile_from_proto(request.profile).map_err(Error::BadRequest)?;
        check_patterns(&request.exclude_patterns)?;
        let max = match request.max_differences as usize {
            0 => DEFAULT_DIFFERENCES,
            n if n > MAX_DIFFERENCES => {
                return Err(Error::BadRequest(format!(
                    "max_differences: must be at most {MAX_DIFFERENCES}"
                ))
                .into());
            }
            n => n,
        };
        let options = self
            .settings
            .options(&root, profile, request.exclude_patterns);
        let cancel = Arc::new(AtomicBool::new(false));
        // The rebuilt tree is needed whole to list differences, within the same budget.
        let sink = Arc::new(StreamSink::new(
            None,
            self.settings.batch_bytes,
            cancel.clone(),
            self.recent.budget(),
        ));
        let job = BuildJob {
            root: root.clone(),
            options,
            fresh: false,
        };
        let (outcome, _) = builds::run(
            job,
            &self.settings,
            sink.clone(),
            None,
            cancel,
            PROGRESS_INTERVAL,
        )
        .await?;
        let actual = Arc::into_inner(sink)
            .and_then(StreamSink::into_kept)
            .map(|nodes| MemTree {
                root: outcome.root,
                profile,
                nodes,
            });
        let matches = outcome.root == expected;
        // The expected tree: one of the recent builds, else the one DbSync stores.
        let expected_tree = match (matches, self.recent.get(expected, profile), &actual) {
            (true, _, _) => None,
            (false, Some(recent), _) => Some(recent),
            (false, None, Some(actual)) => self
                .stored
                .for_diff(expected, profile, actual)
                .await
                .map(Arc::new),
            (false, None, None) => None,
        };
        let (differences, complete) = if matches {
            (Vec::new(), true)
        } else if let (Some(expected_tree), Some(actual)) = (expected_tree, actual) {
            let mut changes = Vec::new();
            let complete = diff::diff(&*expected_tree, expected, &actual, actual.root, &mut |c| {
                if changes.len() == max {
                    return false;
                }
                changes.push(change_to_proto(&c));
                true
            })
            .map_err(|e| Error::Internal(e.to_string()))?;
            (changes, complete)
        } else {
            // The expected tree is neither a recent build nor stored in a DbSync this
            // TreeBuilder knows (or a tree is over RECENT_ENTRIES): only the roots compare.
            (Vec::new(), false)
        };
        Ok(Response::new(VerifyTreeResponse {
            matches,
            actual_root_hash: outcome.root.to_hex(),
            expected_root_hash: expected.to_hex(),
            differences,
            differences_complete: complete,
            result: Some(result_message(&outcome, &root)),
        }))
    }

    async fn check_path(
        &self,
        request: Request<CheckPathRequest>,
    ) -> Result<Response<CheckPathResponse>, Status> {
        let resolved = self.roots.check(&request.into_inner().path)?;
        Ok(Response::new(CheckPathResponse {
            resolved_path: resolved.to_string_lossy().into_owned(),
        }))
    }
}
