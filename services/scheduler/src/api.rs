//! The gRPC face of the Scheduler: sources (checked into a [`SourceSpec`] once, here) and
//! builds (run by [`runner`], watched through the [`crate::registry`], the cache or the
//! record, whichever replica runs them).

use std::{pin::Pin, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use merkle_proto::{
    cache::v1::Namespace,
    common::v1::RetentionPolicy,
    scheduler::v1::{
        Build, BuildState, BuildTrigger, CancelBuildRequest, CancelBuildResponse,
        CreateSourceRequest, CreateSourceResponse, DeleteSourceRequest, DeleteSourceResponse,
        FleetMode, GetBuildRequest, GetBuildResponse, GetSourceRequest, GetSourceResponse,
        ListBuildsRequest, ListBuildsResponse, ListSourcesRequest, ListSourcesResponse,
        TriggerBuildRequest, TriggerBuildResponse, UpdateSourceRequest, UpdateSourceResponse,
        WatchBuildRequest, WatchBuildResponse, scheduler_service_server::SchedulerService,
    },
    treebuilder::v1::CheckPathRequest,
};
use merkle_shared::{
    auth::{self, Role},
    names::check_build_id,
    page_token::PageTokens,
};
use tokio::sync::OnceCell;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::{
    calendar::next_run,
    context::Context,
    error::Error,
    fleet,
    job::{self, Job},
    record::new_build,
    registry::is_final,
    spec::{Policy, Schedule, SourceSpec, source_name},
    store,
};

/// How often a watcher of a build running on another replica looks again.
const WATCH_POLL: Duration = Duration::from_millis(250);

/// The fields UpdateSource can change (the `update_mask` paths).
const UPDATABLE: &[&str] = &[
    "path",
    "exclude_patterns",
    "interval",
    "cron",
    "jitter",
    "enabled",
    "deadline",
    "concurrency_policy",
    "profile",
    "fleet_mode",
    "retention",
];

pub(crate) struct SchedulerApi {
    ctx: Arc<Context>,
    min_interval: Duration,
    tokens: OnceCell<PageTokens>,
}

impl SchedulerApi {
    pub(crate) fn new(ctx: Arc<Context>, min_interval: Duration) -> Self {
        SchedulerApi {
            ctx,
            min_interval,
            tokens: OnceCell::new(),
        }
    }

    async fn tokens(&self) -> Result<&PageTokens, Error> {
        self.tokens
            .get_or_try_init(|| async {
                Ok(PageTokens::new(
                    store::page_token_key(&self.ctx.pool).await?,
                ))
            })
            .await
    }

    /// Asks where the source is built whether it may build its path: the Scheduler's
    /// TreeBuilder, or for a fleet source every ready client's.
    async fn check_source(&self, spec: &SourceSpec) -> Result<(), Error> {
        if spec.fleet == FleetMode::AllClients {
            fleet::check_path(&self.ctx, &spec.path).await
        } else {
            self.check_path(&spec.path).await
        }
    }

    /// Asks TreeBuilder whether it may build `path`; its refusal is passed on, naming the field.
    async fn check_path(&self, path: &str) -> Result<(), Error> {
        let tree_builder = self.ctx.services.tree_builder().map_err(|reason| {
            Error::FailedPrecondition(format!("source.path cannot be checked: {reason}"))
        })?;
        let checked =
            merkle_shared::client::retry_idempotent(self.ctx.services.client_args(), || {
                let mut tree_builder = tree_builder.clone();
                let request = CheckPathRequest {
                    path: path.to_owned(),
                };
                async move { tree_builder.check_path(request).await }
            });
        match checked.await {
            Ok(_) => Ok(()),
            Err(status) if status.code() == tonic::Code::Unavailable => {
                Err(Error::Unavailable(format!(
                    "source.path cannot be checked: TreeBuilder is unavailable: {}",
                    status.message()
                )))
            }
            Err(status) => Err(Error::Remote(Status::new(
                status.code(),
                format!("source.{}", status.message()),
            ))),
        }
    }
}

/// The first tick of a schedule from now: intervals build at once, cron at its next time.
fn first_tick(spec: &SourceSpec, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    match &spec.schedule {
        Schedule::Never => None,
        Schedule::Every(_) => Some(now),
        cron => cron.next_after(now),
    }
}

fn page_size(requested: u32) -> usize {
    match requested {
        0 => 100,
        n => n.min(1000) as usize,
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchBuildResponse, Status>> + Send>>;

#[tonic::async_trait]
impl SchedulerService for SchedulerApi {
    type WatchBuildStream = WatchStream;

    async fn create_source(
        &self,
        request: Request<CreateSourceRequest>,
    ) -> Result<Response<CreateSourceResponse>, Status> {
        let caller = auth::caller(&request);
        let source = request
            .into_inner()
            .source
            .ok_or_else(|| Error::bad_request("source", "must be set"))?;
        let spec = SourceSpec::from_proto(&source, self.min_interval)?;
        // Retention deletes history: it is an admin's decision, even on a new source.
        if spec
            .retention
            .is_some_and(|r| r != RetentionPolicy::default())
        {
            auth::require_role(
                &caller,
                Role::Admin,
                "source.retention (a retention policy)",
            )?;
        }
        self.check_source(&spec).await?;
        let next = next_run(&spec, first_tick(&spec, Utc::now()));
        let stored = store::insert_source(&self.ctx.pool, &spec.message, next).await?;
        if spec.retention.is_some() {
            store::set_retention_set_by(&self.ctx.pool, spec.name.as_str(), &caller.describe())
                .await?;
        }
        tracing::info!(source = %spec.name, path = %spec.path, caller = %caller.describe(), "source created");
        Ok(Response::new(CreateSourceResponse {
            source: Some(stored.source),
        }))
    }

    async fn get_source(
        &self,
        request: Request<GetSourceRequest>,
    ) -> Result<Response<GetSourceResponse>, Status> {
        let name = source_name("name", &request.into_inner().name)?;
        let conn = self.ctx.pool.get().await.map_err(Error::from)?;
        let stored = store::get_source(&*conn, name.as_str())
            .await?
            .ok_or_else(|| Error::NotFound(format!("name: no source named {name}")))?;
        Ok(Response::new(GetSourceResponse {
            source: Some(stored.source),
        }))
    }

    async fn list_sources(
        &self,
        request: Request<ListSourcesRequest>,
    ) -> Result<Response<ListSourcesResponse>, Status> {
        let request = request.into_inner();
        let size = page_size(request.page_size);
        let tokens = self.tokens().await?;
        let after = tokens
            .check("page_token", b"sources", &request.page_token)?
            .map(|p| String::from_utf8_lossy(&p).into_owned())
            .unwrap_or_default();
        let conn = self.ctx.pool.get().await.map_err(Error::from)?;
        let mut sources = store::list_sources(&*conn, &after, size as i64 + 1).await?;
        let next_page_token = if sources.len() > size {
            sources.truncate(size);
            let last = sources
                .last()
                .map(|s| s.source.name.clone())
                .unwrap_or_default();
            tokens.issue(b"sources", last.as_bytes())
        } else {
            String::new()
        };
        Ok(Response::new(ListSourcesResponse {
            sources: sources.into_iter().map(|s| s.source).collect(),
            next_page_token,
        }))
    }

    async fn update_source(
        &self,
        request: Request<UpdateSourceRequest>,
    ) -> Result<Response<UpdateSourceResponse>, Status> {
        let caller = auth::caller(&request);
        let request = request.into_inner();
        let update = request
            .source
            .ok_or_else(|| Error::bad_request("source", "must be set"))?;
        let name = source_name("source.name", &update.name)?;
        let paths: Vec<String> = match request.update_mask {
            Some(mask) if !mask.paths.is_empty() => mask.paths,
            _ => UPDATABLE.iter().map(|p| (*p).to_owned()).collect(),
        };
        for path in &paths {
            if !UPDATABLE.contains(&path.as_str()) {
                return Err(Error::bad_request(
                    "update_mask",
                    format!(
                        "{path:?} cannot be changed (the fields that can: {})",
                        UPDATABLE.join(", ")
                    ),
                )
                .into());
            }
        }
        let conn = self.ctx.pool.get().await.map_err(Error::from)?;
        let current = store::get_source(&*conn, name.as_str())
            .await?
            .ok_or_else(|| Error::NotFound(format!("source.name: no source named {name}")))?;
        drop(conn);
        let mut merged = current.source.clone();
        for path in &paths {
            match path.as_str() {
                "path" => merged.path = update.path.clone(),
                "exclude_patterns" => merged.exclude_patterns = update.exclude_patterns.clone(),
                "interval" | "cron" => merged.schedule = update.schedule.clone(),
                "jitter" => merged.jitter = update.jitter,
                "enabled" => merged.enabled = update.enabled,
                "deadline" => merged.deadline = update.deadline,
                "concurrency_policy" => merged.concurrency_policy = update.concurrency_policy,
                "profile" => merged.profile = update.profile,
                "fleet_mode" => merged.fleet_mode = update.fleet_mode,
                "retention" => merged.retention = update.retention,
                _ => unreachable!("checked against UPDATABLE"),
            }
        }
        let spec = SourceSpec::from_proto(&merged, self.min_interval)?;
        let retention_changed =
            merged.retention.unwrap_or_default() != current.source.retention.unwrap_or_default();
        if retention_changed {
            auth::require_role(
                &caller,
                Role::Admin,
                "changing source.retention (the retention policy)",
            )?;
        }
        if spec.path != current.source.path || spec.message.fleet_mode != current.source.fleet_mode
        {
            self.check_source(&spec).await?;
        }
        let reschedule = spec.message.schedule != current.source.schedule
            || spec.message.jitter != current.source.jitter
            || spec.enabled != current.source.enabled;
        let next = reschedule.then(|| {
            let now = Utc::now();
            let tick = match &spec.schedule {
                Schedule::Every(interval) => Some(now + *interval),
                other => other.next_after(now),
            };
            next_run(&spec, tick)
        });
        let stored = store::update_source(&self.ctx.pool, &spec.message, next)
            .await?
            .ok_or_else(|| Error::NotFound(format!("source.name: no source named {name}")))?;
        if retention_changed {
            store::set_retention_set_by(&self.ctx.pool, name.as_str(), &caller.describe()).await?;
        }
        tracing::info!(source = %name, fields = ?paths, caller = %caller.describe(), "source updated");
        Ok(Response::new(UpdateSourceResponse {
            source: Some(stored.source),
        }))
    }

    async fn delete_source(
        &self,
        request: Request<DeleteSourceRequest>,
    ) -> Result<Response<DeleteSourceResponse>, Status> {
        let caller = auth::caller(&request);
        let name = source_name("name", &request.into_inner().name)?;
        let conn = self.ctx.pool.get().await.map_err(Error::from)?;
        let running = store::BuildFilter {
            source: Some(name.as_str()),
            parent: None,
            states: vec![BuildState::Queued as i16, BuildState::Running as i16],
        };
        let active = store::list_builds(&*conn, &running, None, 1000).await?;
        drop(conn);
        if !store::delete_source(&self.ctx.pool, name.as_str()).await? {
            return Err(Error::NotFound(format!("name: no source named {name}")).into());
        }
        for (build, _) in active.iter().filter(|(b, _)| !is_final(b)) {
            let reason = "its source was deleted";
            store::end_build(
                &self.ctx.pool,
                &build.build_id,
                BuildState::Cancelled,
                reason,
            )
            .await?;
            self.ctx.registry.cancel(&build.build_id, reason);
        }
        tracing::info!(source = %name, caller = %caller.describe(), "source deleted; its snapshots stay in DbSync");
        Ok(Response::new(DeleteSourceResponse {}))
    }

    async fn trigger_build(
        &self,
        request: Request<TriggerBuildRequest>,
    ) -> Result<Response<TriggerBuildResponse>, Status> {
        let name = source_name("source", &request.into_inner().source)?;
        let conn = self.ctx.pool.get().await.map_err(Error::from)?;
        let stored = store::get_source(&*conn, name.as_str())
            .await?
            .ok_or_else(|| Error::NotFound(format!("source: no source named {name}")))?;
        drop(conn);
        let spec = SourceSpec::from_proto(&stored.source, Duration::ZERO)?;
        let build = new_build(name.as_str(), BuildTrigger::Manual, BuildState::Queued);
        let replaced = store::queue_manual(
            &self.ctx.pool,
            &build,
            &self.ctx.replica,
            spec.policy == Policy::Replace,
        )
        .await?;
        if let Some(id) = replaced {
            self.ctx.registry.cancel(
                &id,
                "replaced by a triggered build (CONCURRENCY_POLICY_REPLACE)",
            );
        }
        tracing::info!(source = %name, build_id = %build.build_id, "build triggered");
        let job = Job {
            build: build.clone(),
            spec,
            lease: None,
            failures: 0,
        };
        // The build stays in the call's trace: a traceparent sent with TriggerBuild continues.
        tokio::spawn(tracing::Instrument::instrument(
            job::run(self.ctx.clone(), job),
            tracing::Span::current(),
        ));
        Ok(Response::new(TriggerBuildResponse {
            build_id: build.build_id.clone(),
            build: Some(build),
        }))
    }

    async fn get_build(
        &self,
        request: Request<GetBuildRequest>,
    ) -> Result<Response<GetBuildResponse>, Status> {
        let id = request.into_inner().build_id;
        check_build_id("build_id", &id, true).map_err(Error::BadRequest)?;
        let build = current(&self.ctx, &id).await?;
        Ok(Response::new(GetBuildResponse { build: Some(build) }))
    }

    async fn list_builds(
        &self,
        request: Request<ListBuildsRequest>,
    ) -> Result<Response<ListBuildsResponse>, Status> {
        let request = request.into_inner();
        let source = match request.source.as_str() {
            "" => None,
            s => Some(source_name("source", s)?),
        };
        check_build_id("parent_build_id", &request.parent_build_id, false)
            .map_err(Error::BadRequest)?;
        let mut states = Vec::with_capacity(request.states.len());
        for (i, state) in request.states.iter().enumerate() {
            match BuildState::try_from(*state) {
                Ok(BuildState::Unspecified) | Err(_) => {
                    return Err(Error::bad_request(
                        &format!("states[{i}]"),
                        format!("{state} is not a build state (BUILD_STATE_QUEUED ... BUILD_STATE_CANCELLED)"),
                    )
                    .into());
                }
                Ok(known) => states.push(known as i16),
            }
        }
        states.sort_unstable();
        states.dedup();
        let filter = store::BuildFilter {
            source: source.as_ref().map(|s| s.as_str()),
            parent: Some(request.parent_build_id.as_str()).filter(|p| !p.is_empty()),
            states,
        };
        let size = page_size(request.page_size);
        // A token holds only with the filters it was issued with.
        let binding = format!(
            "builds\0{}\0{}\0{:?}",
            filter.source.unwrap_or(""),
            filter.parent.unwrap_or(""),
            filter.states
        );
        let tokens = self.tokens().await?;
        let before = match tokens.check("page_token", binding.as_bytes(), &request.page_token)? {
            Some(position) => {
                let (micros, id) = position.split_at(8.min(position.len()));
                let micros = i64::from_be_bytes(
                    micros
                        .try_into()
                        .map_err(|_| Error::bad_request("page_token", "is malformed"))?,
                );
                let time = DateTime::<Utc>::from_timestamp_micros(micros)
                    .ok_or_else(|| Error::bad_request("page_token", "is malformed"))?;
                Some((time, String::from_utf8_lossy(id).into_owned()))
            }
            None => None,
        };
        let conn = self.ctx.pool.get().await.map_err(Error::from)?;
        let mut builds = store::list_builds(&*conn, &filter, before, size as i64 + 1).await?;
        let next_page_token = if builds.len() > size {
            builds.truncate(size);
            let (last, time) = builds.last().expect("a full page");
            let mut position = time.timestamp_micros().to_be_bytes().to_vec();
            position.extend_from_slice(last.build_id.as_bytes());
            tokens.issue(binding.as_bytes(), &position)
        } else {
            String::new()
        };
        // Builds running here show their live progress.
        let builds = builds
            .into_iter()
            .map(|(b, _)| self.ctx.registry.get(&b.build_id).unwrap_or(b))
            .collect();
        Ok(Response::new(ListBuildsResponse {
            builds,
            next_page_token,
        }))
    }

    async fn cancel_build(
        &self,
        request: Request<CancelBuildRequest>,
    ) -> Result<Response<CancelBuildResponse>, Status> {
        let id = request.into_inner().build_id;
        check_build_id("build_id", &id, true).map_err(Error::BadRequest)?;
        match store::end_build(
            &self.ctx.pool,
            &id,
            BuildState::Cancelled,
            "cancelled by CancelBuild",
        )
        .await?
        {
            Some(build) => {
                self.ctx.registry.cancel(&id, "cancelled by CancelBuild");
                self.ctx
                    .cache
                    .set(Namespace::BuildStatus, &id, &build, None)
                    .await;
                tracing::info!(build_id = %id, "build cancelled");
                Ok(Response::new(CancelBuildResponse { build: Some(build) }))
            }
            None => {
                let conn = self.ctx.pool.get().await.map_err(Error::from)?;
                match store::get_build(&*conn, &id).await? {
                    Some(_) => Err(Error::FailedPrecondition(format!(
                        "build_id: build {id} has already ended"
                    ))
                    .into()),
                    None => Err(Error::NotFound(format!("build_id: no build {id}")).into()),
                }
            }
        }
    }

    async fn watch_build(
        &self,
        request: Request<WatchBuildRequest>,
    ) -> Result<Response<Self::WatchBuildStream>, Status> {
        let id = request.into_inner().build_id;
        check_build_id("build_id", &id, true).map_err(Error::BadRequest)?;
        let first = current(&self.ctx, &id).await?;
        let ctx = self.ctx.clone();
        let stream = async_stream(ctx, id, first);
        Ok(Response::new(Box::pin(stream)))
    }
}

/// A build's state now: live here, else as the cache has it (progress from the replica running
/// it), else its record.
async fn current(ctx: &Context, id: &str) -> Result<Build, Error> {
    if id.is_empty() {
        return Err(Error::bad_request("build_id", "must not be empty"));
    }
    if let Some(build) = ctx.registry.get(id) {
        return Ok(build);
    }
    let conn = ctx.pool.get().await?;
    let recorded = store::get_build(&*conn, id).await?;
    drop(conn);
    let Some(recorded) = recorded else {
        return Err(Error::NotFound(format!("build_id: no build {id}")));
    };
    if is_final(&recorded) {
        return Ok(recorded);
    }
    // The cache adds the live progress of a build running elsewhere; an end is only ever
    // taken from the record.
    let cached: Option<Build> = ctx.cache.get(Namespace::BuildStatus, id).await;
    Ok(cached
        .filter(|c| !is_final(c) && c.state >= recorded.state)
        .unwrap_or(recorded))
}

/// A WatchBuild stream's sending end: each state once, until the build ends.
struct Watcher {
    tx: tokio::sync::mpsc::Sender<Result<WatchBuildResponse, Status>>,
    last: Option<Build>,
}

impl Watcher {
    /// Sends `build` when it differs from the last state sent; false once the watcher has all
    /// it will get (the build ended) or went away.
    async fn offer(&mut self, build: Build) -> bool {
        if self.last.as_ref() != Some(&build) {
            let response = WatchBuildResponse {
                build: Some(build.clone()),
            };
            if self.tx.send(Ok(response)).await.is_err() {
                return false;
            }
            self.last = Some(build);
        }
        !self.last.as_ref().is_some_and(is_final)
    }
}

/// The states of a build from `first` until it ends: pushed when it runs here, polled when
/// another replica runs it.
fn async_stream(
    ctx: Arc<Context>,
    id: String,
    first: Build,
) -> impl Stream<Item = Result<WatchBuildResponse, Status>> + Send {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        let mut watcher = Watcher { tx, last: None };
        if !watcher.offer(first).await {
            return;
        }
        if let Some(mut watch) = ctx.registry.subscribe(&id) {
            loop {
                let changed = watch.changed().await;
                let build = watch.borrow_and_update().clone();
                if !watcher.offer(build).await {
                    return;
                }
                if changed.is_err() {
                    // The build left this process: its end is in the record.
                    break;
                }
            }
        }
        loop {
            tokio::time::sleep(WATCH_POLL).await;
            match current(&ctx, &id).await {
                Ok(build) => {
                    if !watcher.offer(build).await {
                        return;
                    }
                }
                Err(err) => {
                    let _ = watcher.tx.send(Err(Status::from(err))).await;
                    return;
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
