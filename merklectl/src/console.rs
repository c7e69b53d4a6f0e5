//! `merklectl console`: the operators' web page. Server-rendered HTML (axum, maud templates),
//! live build progress by server-sent events fed by the Scheduler's `WatchBuild`, a few lines
//! of plain JavaScript, no build chain. It talks to the services over gRPC like any client,
//! with a reader's identity; it offers Trigger build only when given an operator's token, and
//! sends that token on that call alone.

mod views;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use axum::{
    Router,
    extract::{Path, Query, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{
        Html, IntoResponse, Redirect, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::{get, post},
};
use futures::StreamExt as _;
use merkle_proto::{
    cache::v1::{GetStatsRequest, cache_service_client::CacheServiceClient},
    dbsync::v1::{
        DiffSnapshotsRequest, GetChangeActivityRequest, GetChangeActivityResponse, GetDriftRequest,
        GetInclusionProofRequest, GetLogCheckpointRequest, GetSnapshotRequest,
        ListDirectoryRequest, ListSnapshotsRequest, Snapshot,
        db_sync_service_client::DbSyncServiceClient,
    },
    discovery::v1::{ListClientsRequest, discovery_service_client::DiscoveryServiceClient},
    scheduler::v1::{
        BuildState, GetSourceRequest, ListBuildsRequest, ListSourcesRequest, TriggerBuildRequest,
        WatchBuildRequest, scheduler_service_client::SchedulerServiceClient,
    },
};
use merkle_shared::{client::Channel, ports};
use serde::Deserialize;

use crate::remote::{DbSyncAddr, connect};

/// `merklectl console`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConsoleArgs {
    /// Where to serve the page. Loopback by default: the page shows what a reader may see to
    /// anyone who reaches it, so serve it wider only behind the access control you choose.
    #[arg(long, env = "CONSOLE_LISTEN_ADDR", default_value = "127.0.0.1:8088")]
    pub listen: SocketAddr,
    #[arg(long, env = "SCHEDULER_ADDR", default_value_t = format!("http://127.0.0.1:{}", ports::SCHEDULER))]
    pub scheduler_addr: String,
    #[arg(long, env = "DB_SYNC_ADDR", default_value_t = format!("http://127.0.0.1:{}", ports::DB_SYNC))]
    pub db_sync_addr: String,
    #[arg(long, env = "CACHE_ADDR", default_value_t = format!("http://127.0.0.1:{}", ports::CACHE))]
    pub cache_addr: String,
    #[arg(long, env = "DISCOVERY_ADDR", default_value_t = format!("http://127.0.0.1:{}", ports::DISCOVERY))]
    pub discovery_addr: String,
    /// The reader's token the console reads with (default: the local stack's
    /// `.data/auth/reader.token`), read again when the file changes (a rotated Secret).
    #[arg(long, env = "CONSOLE_READER_TOKEN_FILE")]
    pub reader_token_file: Option<PathBuf>,
    /// Read with no token at all: for services run with AUTH_DISABLED, where there is none.
    #[arg(long, env = "CONSOLE_NO_TOKEN", conflicts_with = "reader_token_file")]
    pub no_token: bool,
    /// An operator's token: with it the source page offers Trigger build (that call alone
    /// carries it). Without it the console can only read.
    #[arg(long, env = "CONSOLE_OPERATOR_TOKEN_FILE")]
    pub operator_token_file: Option<PathBuf>,
}

/// What every page handler shares: one client per service (cheap to clone).
#[derive(Clone)]
struct Console {
    scheduler: SchedulerServiceClient<Channel>,
    db_sync: DbSyncServiceClient<Channel>,
    cache: CacheServiceClient<Channel>,
    discovery: DiscoveryServiceClient<Channel>,
    /// DbSync's address, for a proof bundle (fetched as `merklectl prove --bundle` does).
    db_sync_addr: DbSyncAddr,
    operator: Option<HeaderValue>,
}

/// Rows per page of every list.
const PAGE: u32 = 50;

fn token_file(path: &std::path::Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path)
        .map(|t| t.trim().to_owned())
        .with_context(|| format!("reading the token {}", path.display()))
}

pub async fn run(args: ConsoleArgs) -> anyhow::Result<()> {
    let console = Console {
        scheduler: SchedulerServiceClient::new(connect(&args.scheduler_addr)?),
        db_sync: DbSyncServiceClient::new(connect(&args.db_sync_addr)?)
            .max_decoding_message_size(64 << 20),
        cache: CacheServiceClient::new(connect(&args.cache_addr)?),
        discovery: DiscoveryServiceClient::new(connect(&args.discovery_addr)?)
            .max_decoding_message_size(64 << 20),
        db_sync_addr: DbSyncAddr {
            addr: args.db_sync_addr.clone(),
        },
        operator: match &args.operator_token_file {
            None => None,
            Some(path) => Some(
                HeaderValue::from_str(&format!("Bearer {}", token_file(path)?))
                    .context("the operator token is not a valid header")?,
            ),
        },
    };
    // After `connect` (which installs the command line's own token): every call the console
    // makes presents the reader's.
    if args.no_token {
        merkle_shared::auth::token::clear();
    } else {
        let reader = args
            .reader_token_file
            .clone()
            .unwrap_or_else(|| PathBuf::from(".data/auth/reader.token"));
        merkle_shared::auth::token::install_file(&reader).map_err(anyhow::Error::msg)?;
    }
    let app = router(console);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    eprintln!("the console is at http://{}", listener.local_addr()?);
    // SIGTERM (Kubernetes) or Ctrl-C: stop accepting, let pages finish, and give live views
    // (server-sent events, open as long as a build runs) a few seconds before closing them.
    let shutdown = merkle_shared::shutdown::Shutdown::on_signals()?;
    let mut stopping = shutdown.clone();
    let serve = axum::serve(listener, app).with_graceful_shutdown({
        let mut shutdown = shutdown;
        async move { shutdown.wait().await }
    });
    tokio::select! {
        served = serve => served?,
        () = async {
            stopping.wait().await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        } => {}
    }
    Ok(())
}

fn router(console: Console) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/sources/{name}", get(source))
        .route("/sources/{name}/trigger", post(trigger))
        .route("/sources/{name}/diff", get(diff))
        .route("/sources/{name}/tree", get(tree))
        .route("/sources/{name}/proof", get(proof))
        .route("/healthz", get(healthz))
        .route("/builds/{id}/events", get(build_events))
        .route("/drift/{name}", get(drift))
        .route("/log", get(log))
        .with_state(console)
}

/// A failed call as the page shows it: the service's status, never a panic.
struct Failed(StatusCode, String);

impl IntoResponse for Failed {
    fn into_response(self) -> Response {
        (self.0, Html(views::error(&self.1).into_string())).into_response()
    }
}

fn failed(service: &'static str) -> impl FnOnce(tonic::Status) -> Failed {
    move |status| {
        let code = match status.code() {
            tonic::Code::NotFound => StatusCode::NOT_FOUND,
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => StatusCode::BAD_REQUEST,
            tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => StatusCode::FORBIDDEN,
            _ => StatusCode::BAD_GATEWAY,
        };
        Failed(
            code,
            format!("{service}: {:?}: {}", status.code(), status.message()),
        )
    }
}

type Page = Result<Html<String>, Failed>;

#[derive(Deserialize)]
struct Paging {
    #[serde(default)]
    page: String,
}

async fn overview(State(mut c): State<Console>, Query(paging): Query<Paging>) -> Page {
    let page = c
        .scheduler
        .list_sources(ListSourcesRequest {
            page_size: PAGE,
            page_token: paging.page,
        })
        .await
        .map_err(failed("Scheduler"))?
        .into_inner();
    // Each source's last build, all asked at once, and the page's change activity in one call.
    let last_builds = futures::future::join_all(page.sources.iter().map(|s| {
        let mut scheduler = c.scheduler.clone();
        let source = s.name.clone();
        async move {
            scheduler
                .list_builds(ListBuildsRequest {
                    source,
                    page_size: 1,
                    ..Default::default()
                })
                .await
                .ok()
                .and_then(|r| r.into_inner().builds.into_iter().next())
        }
    }));
    let activity = activity(&c, page.sources.iter().map(|s| s.name.clone()).collect());
    let (last_builds, activity) = tokio::join!(last_builds, activity);
    let stats = c.cache.get_stats(GetStatsRequest {}).await.ok();
    let fleet = c
        .discovery
        .list_clients(ListClientsRequest::default())
        .await
        .ok()
        .map(|r| r.into_inner());
    Ok(Html(
        views::overview(
            &page.sources,
            &last_builds,
            &page.next_page_token,
            activity.as_ref(),
            stats.map(|s| s.into_inner()).as_ref(),
            fleet.as_ref(),
        )
        .into_string(),
    ))
}

/// How often each of `sources` changed over the last two weeks (DbSync's change activity);
/// `None` when there are none or DbSync does not answer (the page then says so).
async fn activity(c: &Console, sources: Vec<String>) -> Option<GetChangeActivityResponse> {
    if sources.is_empty() {
        return None;
    }
    c.db_sync
        .clone()
        .get_change_activity(GetChangeActivityRequest { sources, days: 14 })
        .await
        .ok()
        .map(|r| r.into_inner())
}

#[derive(Deserialize)]
struct SourceQuery {
    /// A build to follow live (the one just triggered).
    #[serde(default)]
    build: String,
}

async fn source(
    State(mut c): State<Console>,
    Path(name): Path<String>,
    Query(q): Query<SourceQuery>,
) -> Page {
    let source = c
        .scheduler
        .get_source(GetSourceRequest { name: name.clone() })
        .await
        .map_err(failed("Scheduler"))?
        .into_inner()
        .source
        .unwrap_or_default();
    let builds = c
        .scheduler
        .list_builds(ListBuildsRequest {
            source: name.clone(),
            page_size: 20,
            ..Default::default()
        })
        .await
        .map_err(failed("Scheduler"))?
        .into_inner()
        .builds;
    let snapshots = match c
        .db_sync
        .list_snapshots(ListSnapshotsRequest {
            source: name.clone(),
            page_size: PAGE,
            ..Default::default()
        })
        .await
    {
        Ok(r) => r.into_inner().snapshots,
        // No snapshot stored yet.
        Err(status) if status.code() == tonic::Code::NotFound => Vec::new(),
        Err(status) => return Err(failed("DbSync")(status)),
    };
    let activity = activity(&c, vec![name.clone()]).await;
    // Follow the build asked for, else one queued or running.
    let live = if q.build.is_empty() {
        builds
            .iter()
            .find(|b| b.state == BuildState::Queued as i32 || b.state == BuildState::Running as i32)
            .map(|b| b.build_id.clone())
    } else {
        Some(q.build)
    };
    Ok(Html(
        views::source(
            &source,
            &builds,
            &snapshots,
            activity.as_ref(),
            live.as_deref(),
            c.operator.is_some(),
        )
        .into_string(),
    ))
}

/// Trigger build, for an operator's console only; refused unless the form came from this
/// page's own origin (a page elsewhere cannot make the browser trigger builds).
async fn trigger(
    State(mut c): State<Console>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Redirect, Failed> {
    let Some(operator) = c.operator.clone() else {
        return Err(Failed(
            StatusCode::FORBIDDEN,
            "this console reads only: start it with --operator-token-file to trigger builds".into(),
        ));
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin = headers.get(header::ORIGIN).and_then(|h| h.to_str().ok());
    if host.is_none() || origin != host.map(|h| format!("http://{h}")).as_deref() {
        return Err(Failed(
            StatusCode::FORBIDDEN,
            "Origin: a build is triggered only from the console's own page".into(),
        ));
    }
    let mut request = tonic::Request::new(TriggerBuildRequest {
        source: name.clone(),
    });
    request.metadata_mut().insert(
        "authorization",
        tonic::metadata::MetadataValue::try_from(operator.as_bytes())
            .map_err(|e| Failed(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?,
    );
    let build = c
        .scheduler
        .trigger_build(request)
        .await
        .map_err(failed("Scheduler"))?
        .into_inner();
    Ok(Redirect::to(&format!(
        "/sources/{}?build={}",
        views::encode(&name),
        views::encode(&build.build_id)
    )))
}

/// The build's progress as server-sent events: one `build` event (JSON) per change, until it
/// ends.
async fn build_events(State(mut c): State<Console>, Path(id): Path<String>) -> Response {
    let stream = match c
        .scheduler
        .watch_build(WatchBuildRequest { build_id: id })
        .await
    {
        Ok(r) => r.into_inner(),
        Err(status) => return failed("Scheduler")(status).into_response(),
    };
    let events = stream.map(|item| {
        let event = match item {
            Ok(update) => {
                let build = update.build.unwrap_or_default();
                Event::default()
                    .event("build")
                    .data(views::build_event_json(&build).to_string())
            }
            Err(status) => Event::default().event("failed").data(status.message()),
        };
        Ok::<_, std::convert::Infallible>(event)
    });
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

#[derive(Deserialize)]
struct DiffQuery {
    from: String,
    to: String,
}

async fn diff(
    State(mut c): State<Console>,
    Path(name): Path<String>,
    Query(q): Query<DiffQuery>,
) -> Page {
    let for_field = |field: &str, value: &str| {
        if value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(value.to_owned())
        } else {
            Err(Failed(
                StatusCode::BAD_REQUEST,
                format!("{field}: must be a root hash, 64 hex digits"),
            ))
        }
    };
    let (from, to) = (for_field("from", &q.from)?, for_field("to", &q.to)?);
    let mut stream = c
        .db_sync
        .diff_snapshots(DiffSnapshotsRequest {
            old_root_hash: from.clone(),
            new_root_hash: to.clone(),
        })
        .await
        .map_err(failed("DbSync"))?
        .into_inner();
    let mut changes = Vec::new();
    // A page shows at most this many paths.
    const SHOWN: usize = 1000;
    let mut more = false;
    while let Some(batch) = stream.message().await.map_err(failed("DbSync"))? {
        for change in batch.changes {
            if changes.len() == SHOWN {
                more = true;
                break;
            }
            changes.push(change);
        }
        if more {
            break;
        }
    }
    Ok(Html(
        views::diff(&name, &from, &to, &changes, more).into_string(),
    ))
}

async fn drift(
    State(mut c): State<Console>,
    Path(name): Path<String>,
    Query(paging): Query<Paging>,
) -> Page {
    let drift = c
        .db_sync
        .get_drift(GetDriftRequest {
            fleet_source: name.clone(),
            page_token: paging.page,
            ..Default::default()
        })
        .await
        .map_err(failed("DbSync"))?
        .into_inner();
    Ok(Html(views::drift(&name, &drift).into_string()))
}

async fn log(State(mut c): State<Console>) -> Page {
    let checkpoint = c
        .db_sync
        .get_log_checkpoint(GetLogCheckpointRequest { size: 0 })
        .await
        .map_err(failed("DbSync"))?
        .into_inner();
    Ok(Html(views::log(&checkpoint).into_string()))
}

#[derive(Deserialize)]
struct TreeQuery {
    /// The snapshot's sequence in the source's history.
    sequence: u64,
    /// The directory, `/`-separated; empty for the root.
    #[serde(default)]
    path: String,
    #[serde(default)]
    page: String,
}

/// Snapshot `sequence` of `source`.
async fn snapshot(c: &mut Console, source: &str, sequence: u64) -> Result<Snapshot, Failed> {
    c.db_sync
        .get_snapshot(GetSnapshotRequest {
            source: source.to_owned(),
            sequence,
            ..Default::default()
        })
        .await
        .map_err(failed("DbSync"))?
        .into_inner()
        .snapshot
        .ok_or_else(|| Failed(StatusCode::BAD_GATEWAY, "DbSync sent no snapshot".into()))
}

/// One directory of a stored snapshot's tree, a page at a time.
async fn tree(
    State(mut c): State<Console>,
    Path(name): Path<String>,
    Query(q): Query<TreeQuery>,
) -> Page {
    let snapshot = snapshot(&mut c, &name, q.sequence).await?;
    let path = q.path.trim_matches('/').to_owned();
    let dir = c
        .db_sync
        .list_directory(ListDirectoryRequest {
            root_hash: snapshot.root_hash.clone(),
            path: path.clone(),
            page_size: 500,
            page_token: q.page,
            ..Default::default()
        })
        .await
        .map_err(failed("DbSync"))?
        .into_inner();
    Ok(Html(views::tree(&snapshot, &path, &dir).into_string()))
}

#[derive(Deserialize)]
struct ProofQuery {
    sequence: u64,
    path: String,
}

/// A proof bundle (docs/merkle-spec.md section 12) of one entry of a stored snapshot, as a
/// file download: `merklectl verify-proof FILE --verifier-key KEY` checks it offline.
async fn proof(
    State(mut c): State<Console>,
    Path(name): Path<String>,
    Query(q): Query<ProofQuery>,
) -> Result<Response, Failed> {
    let snapshot = snapshot(&mut c, &name, q.sequence).await?;
    let path = q.path.trim_matches('/').to_owned();
    let proof = c
        .db_sync
        .get_inclusion_proof(GetInclusionProofRequest {
            root_hash: snapshot.root_hash.clone(),
            path: path.clone(),
            ..Default::default()
        })
        .await
        .map_err(failed("DbSync"))?
        .into_inner()
        .proof
        .ok_or_else(|| Failed(StatusCode::BAD_GATEWAY, "DbSync sent no proof".into()))?;
    let bad = |e: anyhow::Error| Failed(StatusCode::BAD_GATEWAY, format!("{e:#}"));
    let proof = merkle_shared::convert::proof_from_proto(&proof)
        .map_err(|e| bad(anyhow::anyhow!("DbSync sent a bad proof: {e}")))?;
    let bundle = crate::bundle::fetch(
        &mut c.db_sync,
        &c.db_sync_addr,
        &snapshot,
        &proof,
        Duration::from_secs(5),
    )
    .await
    .map_err(bad)?;
    let file = views::proof_file_name(&name, snapshot.sequence, &path);
    Ok((
        [
            (header::CONTENT_TYPE, "application/json".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{file}\""),
            ),
        ],
        format!("{}\n", bundle.to_json()),
    )
        .into_response())
}

/// Serving: the console's own liveness (it calls no service, so an outage of one never
/// restarts the console).
async fn healthz() -> &'static str {
    "ok\n"
}
