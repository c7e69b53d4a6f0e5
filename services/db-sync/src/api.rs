//! The gRPC face of DbSync: each request is checked and turned into domain values here
//! (source names, digests, paths, page positions), then handed to the [`Archive`] and the
//! browsing functions. The history RPC belongs to the tamper-evident history issue.

use std::{pin::Pin, sync::Arc, time::SystemTime};

use merkle_core::Digest;
use merkle_proto::dbsync::v1::{
    DiffSnapshotsRequest, DiffSnapshotsResponse, DriftGroup, DriftMember, FindMissingNodesRequest,
    FindMissingNodesResponse, GetChangeActivityRequest, GetChangeActivityResponse, GetDriftRequest,
    GetDriftResponse, GetHistoryProofRequest, GetHistoryProofResponse, GetInclusionProofRequest,
    GetInclusionProofResponse, GetLatestRootRequest, GetLatestRootResponse,
    GetLogCheckpointRequest, GetLogCheckpointResponse, GetLogConsistencyProofRequest,
    GetLogConsistencyProofResponse, GetLogInclusionProofRequest, GetLogInclusionProofResponse,
    GetLogTileRequest, GetLogTileResponse, GetRetentionPolicyRequest, GetRetentionPolicyResponse,
    GetSnapshotRequest, GetSnapshotResponse, ListDirectoryRequest, ListDirectoryResponse,
    ListSnapshotsRequest, ListSnapshotsResponse, ListSourcesRequest, ListSourcesResponse,
    SetRetentionPolicyRequest, SetRetentionPolicyResponse, SourceSummary, SyncTreeRequest,
    SyncTreeResponse, WarmCacheRequest, WarmCacheResponse, db_sync_service_server::DbSyncService,
    sync_tree_request::Content,
};
use merkle_shared::{
    cache::CacheSource,
    convert::{
        change_to_proto, duration_from_proto, entry_to_proto, name_from_proto, profile_from_proto,
        profile_to_proto, proof_to_proto, stats_to_store, timestamp_from_proto,
    },
    names::SourceName,
};
use tokio::sync::mpsc;
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming, metadata::MetadataValue};

use crate::{
    activity,
    archive::Archive,
    browse, drift,
    error::Error,
    history,
    store::{self, Retention},
    sync::{Header, Outcome, Received},
    tlog::{self, LeafAt, Log},
};

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Most hashes in one FindMissingNodes call.
const MAX_FIND: usize = 10_000;
/// Changes per DiffSnapshots message.
const DIFF_BATCH: usize = 500;

pub(crate) struct DbSyncApi {
    archive: Arc<Archive>,
    log: Arc<Log>,
    witnesses: Arc<crate::witness::Witnesses>,
}

impl DbSyncApi {
    pub(crate) fn new(
        archive: Arc<Archive>,
        log: Arc<Log>,
        witnesses: Arc<crate::witness::Witnesses>,
    ) -> Self {
        DbSyncApi {
            archive,
            log,
            witnesses,
        }
    }
}

fn hexes(hashes: &[[u8; 32]]) -> Vec<String> {
    hashes.iter().map(|h| merkle_core::digest::hex(h)).collect()
}

/// A requested tree size: 0 means the newest checkpoint's; past the log's is OUT_OF_RANGE.
async fn tree_size(
    client: &(impl tokio_postgres::GenericClient + Sync),
    field: &str,
    requested: u64,
) -> Result<u64, Error> {
    if requested == 0 {
        return tlog::checkpoint(client, None)
            .await?
            .map(|c| c.size)
            .ok_or_else(|| Error::NotFound("the transparency log has no checkpoint yet".into()));
    }
    let size = tlog::log_size(client).await?;
    if requested > size {
        return Err(Error::OutOfRange(format!(
            "{field}: {requested} is past the log's {size} leaves"
        )));
    }
    Ok(requested)
}

fn source(field: &str, name: &str) -> Result<SourceName, Error> {
    SourceName::parse(field, name).map_err(Error::BadRequest)
}

fn digest(field: &str, text: &str) -> Result<Digest, Error> {
    text.parse()
        .map_err(|e| Error::bad_request(field, format!("{text:?}: {e}")))
}

/// Most sources one WarmCache call names.
const MAX_WARM_SOURCES: usize = 1000;

/// The longest `keep_within` a retention policy may have.
const MAX_KEEP_WITHIN: std::time::Duration = std::time::Duration::from_secs(100 * 31_557_600);

/// Most records one GetHistoryProof page may ask for.
const MAX_HISTORY_PAGE: u32 = 10_000;

/// Most sources one GetDrift call names.
const MAX_DRIFT_SOURCES: usize = 1000;
/// Most members listed per drift group.
const MAX_DRIFT_MEMBERS: usize = 1000;

/// What GetDrift compares.
enum Drifting {
    /// Every `<name>@<node>` history of a fleet source.
    Fleet(SourceName),
    /// Named sources.
    Sources(Vec<SourceName>),
}

impl Drifting {
    fn from_request(request: &GetDriftRequest) -> Result<Drifting, Error> {
        match (request.fleet_source.is_empty(), request.sources.is_empty()) {
            (false, true) => {
                let name = source("fleet_source", &request.fleet_source)?;
                if name.as_str().contains('@') {
                    return Err(Error::bad_request(
                        "fleet_source",
                        format!(
                            "{:?} names one node's history; name the fleet source, without @ and a node id",
                            request.fleet_source
                        ),
                    ));
                }
                Ok(Drifting::Fleet(name))
            }
            (true, false) => {
                let count = request.sources.len();
                if !(2..=MAX_DRIFT_SOURCES).contains(&count) {
                    return Err(Error::bad_request(
                        "sources",
                        format!("has {count} names; compare 2 to {MAX_DRIFT_SOURCES}"),
                    ));
                }
                let mut seen = std::collections::HashSet::new();
                let mut names = Vec::with_capacity(count);
                for (i, name) in request.sources.iter().enumerate() {
                    let field = format!("sources[{i}]");
                    if !seen.insert(name.as_str()) {
                        return Err(Error::bad_request(&field, format!("names {name:?} twice")));
                    }
                    names.push(source(&field, name)?);
                }
                Ok(Drifting::Sources(names))
            }
            (true, true) => Err(Error::bad_request(
                "fleet_source",
                "set fleet_source, or sources (2 to 1000 names)",
            )),
            (false, false) => Err(Error::bad_request(
                "sources",
                "must be empty when fleet_source is set",
            )),
        }
    }

    /// What page tokens of this call are bound to.
    fn binding(&self) -> Vec<u8> {
        let mut binding = b"drift\0".to_vec();
        match self {
            Drifting::Fleet(name) => binding.extend_from_slice(name.as_str().as_bytes()),
            Drifting::Sources(names) => {
                for name in names {
                    binding.push(0);
                    binding.extend_from_slice(name.as_str().as_bytes());
                }
            }
        }
        binding
    }

    /// The latest snapshot of each source compared, as of the snapshot id `as_of`; NOT_FOUND
    /// when one named has none.
    async fn latest(
        &self,
        pool: &merkle_shared::postgres::PgPool,
        as_of: i64,
    ) -> Result<Vec<store::Snapshot>, Error> {
        let conn = pool.get().await?;
        match self {
            Drifting::Fleet(name) => {
                let latest = store::latest_of_fleet(&*conn, name.as_str(), as_of).await?;
                if latest.is_empty() {
                    return Err(Error::NotFound(format!(
                        "fleet_source: no node of {name} has a snapshot"
                    )));
                }
                Ok(latest)
            }
            Drifting::Sources(names) => {
                let wanted: Vec<&str> = names.iter().map(SourceName::as_str).collect();
                let latest = store::latest_of_names(&*conn, &wanted, as_of).await?;
                if latest.len() < names.len() {
                    let found: std::collections::HashSet<&str> =
                        latest.iter().map(|s| s.source.as_str()).collect();
                    if let Some((i, name)) =
                        wanted.iter().enumerate().find(|(_, n)| !found.contains(*n))
                    {
                        return Err(Error::NotFound(format!(
                            "sources[{i}]: {name} has no snapshots"
                        )));
                    }
                }
                Ok(latest)
            }
        }
    }

    fn member(&self, snapshot: &store::Snapshot) -> DriftMember {
        let node = match self {
            Drifting::Fleet(_) => snapshot
                .source
                .split_once('@')
                .map(|(_, node)| node.to_owned())
                .unwrap_or_default(),
            Drifting::Sources(_) => String::new(),
        };
        DriftMember {
            source: snapshot.source.clone(),
            node,
            sequence: snapshot.sequence as u64,
            create_time: Some(prost_types::Timestamp::from(snapshot.created_at)),
            snapshot_id: snapshot.id.to_string(),
        }
    }

    fn group_to_proto(&self, group: &drift::Group) -> DriftGroup {
        DriftGroup {
            root_hash: group.root.to_hex(),
            profile: profile_to_proto(group.profile) as i32,
            member_count: group.members.len() as u64,
            members: group
                .members
                .iter()
                .take(MAX_DRIFT_MEMBERS)
                .map(|m| self.member(m))
                .collect(),
            ..Default::default()
        }
    }
}

/// A GetDrift page position: the view's newest snapshot id, then the last group's member
/// count and root.
fn drift_position(as_of: i64, last: &drift::Group) -> Vec<u8> {
    let mut position = as_of.to_be_bytes().to_vec();
    position.extend_from_slice(&(last.members.len() as u64).to_be_bytes());
    position.extend_from_slice(&last.root.0);
    position
}

fn parse_drift_position(position: &[u8]) -> Option<(i64, (std::cmp::Reverse<usize>, Digest))> {
    let as_of = i64::from_be_bytes(position.get(..8)?.try_into().ok()?);
    let count = u64::from_be_bytes(position.get(8..16)?.try_into().ok()?);
    let root: [u8; 32] = position.get(16..)?.try_into().ok()?;
    Some((as_of, (std::cmp::Reverse(count as usize), Digest(root))))
}

/// The page size: 0 means `default`, above `max` means `max`.
fn page_size(requested: u32, default: u32, max: u32) -> u32 {
    match requested {
        0 => default,
        n => n.min(max),
    }
}

fn position_u64(position: Option<Vec<u8>>) -> Option<u64> {
    position
        .and_then(|p| p.try_into().ok())
        .map(u64::from_be_bytes)
}

#[tonic::async_trait]
impl DbSyncService for DbSyncApi {
    type DiffSnapshotsStream = ResponseStream<DiffSnapshotsResponse>;

    async fn find_missing_nodes(
        &self,
        request: Request<FindMissingNodesRequest>,
    ) -> Result<Response<FindMissingNodesResponse>, Status> {
        let request = request.into_inner();
        if request.hashes.len() > MAX_FIND {
            return Err(Error::bad_request(
                "hashes",
                format!(
                    "has {} hashes; at most {MAX_FIND} per call",
                    request.hashes.len()
                ),
            )
            .into());
        }
        let hashes = request
            .hashes
            .iter()
            .enumerate()
            .map(|(i, h)| digest(&format!("hashes[{i}]"), h))
            .collect::<Result<Vec<_>, _>>()?;
        let missing = self.archive.find_missing(&hashes).await?;
        Ok(Response::new(FindMissingNodesResponse {
            missing_hashes: missing.iter().map(Digest::to_hex).collect(),
        }))
    }

    async fn sync_tree(
        &self,
        request: Request<Streaming<SyncTreeRequest>>,
    ) -> Result<Response<SyncTreeResponse>, Status> {
        let mut stream = request.into_inner();
        let first = stream.message().await?;
        let Some(Content::Header(h)) = first.and_then(|m| m.content) else {
            return Err(
                Error::bad_request("header", "the first message must be the header").into(),
            );
        };
        let header = Header {
            source: source("header.source", &h.source)?,
            root: digest("header.root_hash", &h.root_hash)?,
            build_id: h.build_id,
            profile: profile_from_proto(h.profile).map_err(|e| Error::bad_request("header", e))?,
            stats: h
                .stats
                .as_ref()
                .map(stats_to_store)
                .transpose()
                .map_err(|rule| Error::BadRequest(format!("header.stats.{rule}")))?
                .unwrap_or_default(),
        };
        merkle_shared::names::check_build_id("header.build_id", &header.build_id, false)
            .map_err(Error::BadRequest)?;
        merkle_shared::telemetry::tag_build(&header.build_id, header.source.as_str());
        let outcome = match self.archive.answer_early(&header).await? {
            Some(outcome) => outcome,
            None => {
                let mut received =
                    Received::new(header.profile, self.archive.settings.sync_max_bytes);
                while let Some(message) = stream.message().await? {
                    match message.content {
                        Some(Content::Nodes(batch)) => {
                            for node in &batch.nodes {
                                received.add(node)?;
                            }
                        }
                        Some(Content::Header(_)) => {
                            return Err(Error::bad_request(
                                "header",
                                "only the first message may be a header",
                            )
                            .into());
                        }
                        None => {}
                    }
                }
                self.archive.store(&header, received.finish()?).await?
            }
        };
        let response = match outcome {
            Outcome::Unchanged(snapshot) => SyncTreeResponse {
                changed: false,
                snapshot: Some(snapshot),
                nodes_written: 0,
            },
            Outcome::Replayed(snapshot) => SyncTreeResponse {
                changed: true,
                snapshot: Some(snapshot),
                nodes_written: 0,
            },
            Outcome::Stored {
                snapshot,
                nodes_written,
            } => {
                tracing::info!(
                    source = %header.source,
                    root = %header.root,
                    sequence = snapshot.sequence,
                    nodes_written,
                    build_id = %header.build_id,
                    "snapshot stored"
                );
                SyncTreeResponse {
                    changed: true,
                    snapshot: Some(snapshot),
                    nodes_written,
                }
            }
        };
        Ok(Response::new(response))
    }

    async fn get_latest_root(
        &self,
        request: Request<GetLatestRootRequest>,
    ) -> Result<Response<GetLatestRootResponse>, Status> {
        let request = request.into_inner();
        let name = source("source", &request.source)?;
        let (snapshot, from) = if request.consistent {
            let latest = self
                .archive
                .latest_confirmed(&name)
                .await?
                .ok_or_else(|| Error::NotFound(format!("source: {name} has no snapshots")))?;
            (latest, CacheSource::Miss)
        } else {
            let loaded = self.archive.latest(&name).await?;
            (loaded.value, loaded.source)
        };
        let mut response = Response::new(GetLatestRootResponse {
            snapshot: Some(snapshot),
        });
        response
            .metadata_mut()
            .insert("x-cache", MetadataValue::from_static(from.as_str()));
        Ok(response)
    }

    async fn get_snapshot(
        &self,
        request: Request<GetSnapshotRequest>,
    ) -> Result<Response<GetSnapshotResponse>, Status> {
        let request = request.into_inner();
        let conn = self.archive.pool.get().await.map_err(Error::from)?;
        let found = if !request.snapshot_id.is_empty() {
            let id: i64 = request
                .snapshot_id
                .parse()
                .ok()
                .filter(|id| *id > 0)
                .ok_or_else(|| {
                    Error::bad_request("snapshot_id", "must be a positive decimal number")
                })?;
            store::by_id(&*conn, id)
                .await?
                .ok_or_else(|| Error::NotFound(format!("snapshot_id: no snapshot {id}")))?
        } else if !request.source.is_empty() {
            let name = source("source", &request.source)?;
            if request.sequence == 0 || request.sequence > i64::MAX as u64 {
                return Err(Error::bad_request("sequence", "must be 1 or more with source").into());
            }
            store::by_sequence(&*conn, name.as_str(), request.sequence as i64)
                .await?
                .ok_or_else(|| {
                    Error::NotFound(format!(
                        "sequence: {name} has no snapshot {}",
                        request.sequence
                    ))
                })?
        } else {
            return Err(Error::bad_request(
                "snapshot_id",
                "set snapshot_id, or source and sequence",
            )
            .into());
        };
        Ok(Response::new(GetSnapshotResponse {
            snapshot: Some(found.to_proto()),
        }))
    }

    async fn list_snapshots(
        &self,
        request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        let request = request.into_inner();
        let name = source("source", &request.source)?;
        let time = |field: &str, t: Option<prost_types::Timestamp>, default: SystemTime| match t {
            None => Ok(default),
            Some(t) => timestamp_from_proto(&t).map_err(|rule| Error::bad_request(field, rule)),
        };
        let start = time("start_time", request.start_time, SystemTime::UNIX_EPOCH)?;
        let far = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(253_402_300_799);
        let end = time("end_time", request.end_time, far)?;
        if end < start {
            return Err(Error::bad_request("end_time", "must not be before start_time").into());
        }
        let size = page_size(request.page_size, 100, 1000);
        let binding = format!(
            "snapshots\0{name}\0{:?}\0{:?}",
            request.start_time.map(|t| (t.seconds, t.nanos)),
            request.end_time.map(|t| (t.seconds, t.nanos))
        );
        let tokens = self.archive.tokens().await?;
        let before =
            position_u64(tokens.check("page_token", binding.as_bytes(), &request.page_token)?)
                .map_or(i64::MAX, |s| s as i64);
        let page = async |pool: &merkle_shared::postgres::PgPool| {
            let conn = pool.get().await?;
            if before == i64::MAX && store::source(&*conn, name.as_str()).await?.is_none() {
                return Err(Error::NotFound(format!("source: {name} has no snapshots")));
            }
            store::page(
                &*conn,
                name.as_str(),
                before,
                start,
                end,
                i64::from(size) + 1,
            )
            .await
        };
        let target = self.archive.read_target().await;
        let mut snapshots = match page(target.pool).await {
            failed if self.archive.read_again(&target, &failed) => page(&self.archive.pool).await,
            outcome => outcome,
        }?;
        let next_page_token = if snapshots.len() > size as usize {
            snapshots.truncate(size as usize);
            let last = snapshots.last().map_or(0, |s| s.sequence as u64);
            tokens.issue(binding.as_bytes(), &last.to_be_bytes())
        } else {
            String::new()
        };
        Ok(Response::new(ListSnapshotsResponse {
            snapshots: snapshots.iter().map(store::Snapshot::to_proto).collect(),
            next_page_token,
        }))
    }

    async fn list_sources(
        &self,
        request: Request<ListSourcesRequest>,
    ) -> Result<Response<ListSourcesResponse>, Status> {
        let request = request.into_inner();
        let size = page_size(request.page_size, 100, 1000);
        let tokens = self.archive.tokens().await?;
        let after = tokens
            .check("page_token", b"sources", &request.page_token)?
            .map(|p| String::from_utf8_lossy(&p).into_owned())
            .unwrap_or_default();
        let conn = self.archive.pool.get().await.map_err(Error::from)?;
        let mut sources = store::sources(&*conn, &after, i64::from(size) + 1).await?;
        let next_page_token = if sources.len() > size as usize {
            sources.truncate(size as usize);
            let last = sources.last().map(|s| s.name.clone()).unwrap_or_default();
            tokens.issue(b"sources", last.as_bytes())
        } else {
            String::new()
        };
        Ok(Response::new(ListSourcesResponse {
            sources: sources
                .into_iter()
                .map(|s| SourceSummary {
                    source: s.name,
                    latest: Some(s.latest.to_proto()),
                    snapshot_count: s.snapshot_count,
                    retention: Some(s.retention.to_proto()),
                })
                .collect(),
            next_page_token,
        }))
    }

    async fn list_directory(
        &self,
        request: Request<ListDirectoryRequest>,
    ) -> Result<Response<ListDirectoryResponse>, Status> {
        let request = request.into_inner();
        let root = digest("root_hash", &request.root_hash)?;
        let path = name_from_proto(&request.path, &request.raw_path);
        let size = page_size(request.page_size, 1000, 10_000) as usize;
        let mut binding = format!("directory\0{root}\0").into_bytes();
        binding.extend_from_slice(&path);
        let tokens = self.archive.tokens().await?;
        let offset = position_u64(tokens.check("page_token", &binding, &request.page_token)?)
            .unwrap_or(0) as usize;
        let (hash, node) = browse::directory(&self.archive.nodes, root, &path).await?;
        let entries = &node.node.entries;
        let end = (offset + size).min(entries.len());
        let page = entries.get(offset.min(end)..end).unwrap_or_default();
        let next_page_token = if end < entries.len() {
            tokens.issue(&binding, &(end as u64).to_be_bytes())
        } else {
            String::new()
        };
        Ok(Response::new(ListDirectoryResponse {
            directory_hash: hash.to_hex(),
            entries: page.iter().map(entry_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn diff_snapshots(
        &self,
        request: Request<DiffSnapshotsRequest>,
    ) -> Result<Response<Self::DiffSnapshotsStream>, Status> {
        let request = request.into_inner();
        let old = digest("old_root_hash", &request.old_root_hash)?;
        let new = digest("new_root_hash", &request.new_root_hash)?;
        let tree = browse::diff(&self.archive.nodes, old, new).await?;
        let (tx, rx) = mpsc::channel(4);
        // The walk is in memory and synchronous; it hands batches over as it goes and stops
        // when the caller goes away.
        tokio::task::spawn_blocking(move || {
            let mut batch = Vec::with_capacity(DIFF_BATCH);
            let complete = browse::changes(&tree, old, new, &mut |change| {
                batch.push(change_to_proto(&change));
                if batch.len() < DIFF_BATCH {
                    return true;
                }
                let changes = std::mem::replace(&mut batch, Vec::with_capacity(DIFF_BATCH));
                tx.blocking_send(Ok(DiffSnapshotsResponse { changes }))
                    .is_ok()
            });
            match complete {
                Ok(true) if !batch.is_empty() => {
                    let _ = tx.blocking_send(Ok(DiffSnapshotsResponse { changes: batch }));
                }
                Ok(_) => {}
                Err(err) => {
                    let _ = tx.blocking_send(Err(Status::from(err)));
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_inclusion_proof(
        &self,
        request: Request<GetInclusionProofRequest>,
    ) -> Result<Response<GetInclusionProofResponse>, Status> {
        let request = request.into_inner();
        let root = digest("root_hash", &request.root_hash)?;
        let path = name_from_proto(&request.path, &request.raw_path);
        if path.is_empty() {
            return Err(Error::bad_request("path", "must name an entry below the root").into());
        }
        let proof = browse::proof(&self.archive.nodes, root, &path).await?;
        let proof = proof_to_proto(&proof).map_err(|e| Error::Internal(e.to_string()))?;
        Ok(Response::new(GetInclusionProofResponse {
            proof: Some(proof),
        }))
    }

    async fn warm_cache(
        &self,
        request: Request<WarmCacheRequest>,
    ) -> Result<Response<WarmCacheResponse>, Status> {
        let request = request.into_inner();
        if request.sources.len() > MAX_WARM_SOURCES {
            return Err(Error::bad_request(
                "sources",
                format!(
                    "has {} names; at most {MAX_WARM_SOURCES} per call (empty warms every source)",
                    request.sources.len()
                ),
            )
            .into());
        }
        let sources = request
            .sources
            .iter()
            .enumerate()
            .map(|(i, s)| source(&format!("sources[{i}]"), s))
            .collect::<Result<Vec<_>, _>>()?;
        let (sources_warmed, entries_written, cache_available) =
            self.archive.warm(&sources).await?;
        Ok(Response::new(WarmCacheResponse {
            sources_warmed,
            entries_written,
            cache_available,
        }))
    }

    async fn get_history_proof(
        &self,
        request: Request<GetHistoryProofRequest>,
    ) -> Result<Response<GetHistoryProofResponse>, Status> {
        let request = request.into_inner();
        let name = source("source", &request.source)?;
        if request.page_size > MAX_HISTORY_PAGE {
            return Err(Error::bad_request(
                "page_size",
                format!("must be at most {MAX_HISTORY_PAGE}"),
            )
            .into());
        }
        let size = page_size(request.page_size, 1000, MAX_HISTORY_PAGE);
        let binding = format!(
            "history\0{name}\0{}\0{}",
            request.from_sequence, request.to_sequence
        );
        let tokens = self.archive.tokens().await?;
        // A later page keeps the range of the first (records stored meanwhile are not added).
        let (from, to) =
            match tokens.check("page_token", binding.as_bytes(), &request.page_token)? {
                Some(position) => {
                    let position: [u8; 16] = position.try_into().map_err(|_| {
                        Error::bad_request("page_token", "is not a token of this call")
                    })?;
                    let (next, last) = position.split_at(8);
                    let number = |b: &[u8]| u64::from_be_bytes(b.try_into().unwrap_or_default());
                    (number(next), number(last))
                }
                None => (request.from_sequence, request.to_sequence),
            };
        let target = self.archive.read_target().await;
        let page = match history::page(target.pool, name.as_str(), from, to, size).await {
            failed if self.archive.read_again(&target, &failed) => {
                history::page(&self.archive.pool, name.as_str(), from, to, size).await
            }
            outcome => outcome,
        }?;
        let signer = &self.archive.signer;
        let next_page_token = match page.next {
            Some(next) => {
                let mut position = next.to_be_bytes().to_vec();
                position.extend_from_slice(&page.last.to_be_bytes());
                tokens.issue(binding.as_bytes(), &position)
            }
            None => String::new(),
        };
        Ok(Response::new(GetHistoryProofResponse {
            records: page.records,
            public_key: signer.public_key(),
            public_keys: signer.public_keys(),
            pruned: page.pruned,
            head: page.head,
            next_page_token,
            signing: signer.is_signing(),
        }))
    }

    async fn get_change_activity(
        &self,
        request: Request<GetChangeActivityRequest>,
    ) -> Result<Response<GetChangeActivityResponse>, Status> {
        let request = request.into_inner();
        let count = request.sources.len();
        if !(1..=activity::MAX_SOURCES).contains(&count) {
            return Err(Error::bad_request(
                "sources",
                format!("has {count} names; name 1 to {}", activity::MAX_SOURCES),
            )
            .into());
        }
        let mut seen = std::collections::HashSet::new();
        let mut names = Vec::with_capacity(count);
        for (i, name) in request.sources.iter().enumerate() {
            let field = format!("sources[{i}]");
            if !seen.insert(name.as_str()) {
                return Err(Error::bad_request(&field, format!("names {name:?} twice")).into());
            }
            names.push(source(&field, name)?);
        }
        let days = match request.days {
            0 => activity::DEFAULT_DAYS,
            d if d <= activity::MAX_DAYS => d,
            d => {
                return Err(Error::bad_request(
                    "days",
                    format!(
                        "is {d}; count 1 to {} days (0 means 14)",
                        activity::MAX_DAYS
                    ),
                )
                .into());
            }
        };
        let first_day = activity::first_day(SystemTime::now(), days);
        let wanted: Vec<&str> = names.iter().map(SourceName::as_str).collect();
        let read = async |pool: &merkle_shared::postgres::PgPool| {
            let conn = pool.get().await?;
            activity::read(&*conn, &wanted, first_day, days).await
        };
        let target = self.archive.read_target().await;
        let found = match read(target.pool).await {
            failed if self.archive.read_again(&target, &failed) => read(&self.archive.pool).await,
            outcome => outcome,
        }?;
        Ok(Response::new(GetChangeActivityResponse {
            sources: found.iter().map(activity::Activity::to_proto).collect(),
            first_day: Some(first_day.into()),
        }))
    }

    async fn get_drift(
        &self,
        request: Request<GetDriftRequest>,
    ) -> Result<Response<GetDriftResponse>, Status> {
        let request = request.into_inner();
        let drifting = Drifting::from_request(&request)?;
        let size = page_size(request.page_size, 20, 100) as usize;
        let max_changes = page_size(request.max_changes, 100, 10_000) as usize;
        let binding = drifting.binding();
        let tokens = self.archive.tokens().await?;
        let position = tokens
            .check("page_token", &binding, &request.page_token)?
            .map(|p| {
                parse_drift_position(&p)
                    .ok_or_else(|| Error::bad_request("page_token", "is not a token of this call"))
            })
            .transpose()?;
        // Later pages see the sources as the first page did: no snapshot stored since.
        let (as_of, after) = match position {
            Some((as_of, after)) => (as_of, Some(after)),
            None => (i64::MAX, None),
        };
        let target = self.archive.read_target().await;
        let latest = match drifting.latest(target.pool, as_of).await {
            failed if self.archive.read_again(&target, &failed) => {
                drifting.latest(&self.archive.pool, as_of).await
            }
            outcome => outcome,
        }?;
        let as_of = latest.iter().map(|s| s.id).max().unwrap_or(as_of);
        let source_count = latest.len() as u64;
        let groups = drift::group(latest);
        let Some(first) = groups.first() else {
            return Err(Error::Internal("drift of no sources".into()).into());
        };
        let (baseline_root, baseline_profile) = (first.root, first.profile);
        let baseline = drifting.group_to_proto(first);
        let outliers: Vec<&drift::Group> =
            groups.iter().filter(|g| g.root != baseline_root).collect();
        let outlier_count = outliers.iter().map(|g| g.members.len() as u64).sum();
        let outlier_group_count = outliers.len() as u64;
        let mut page: Vec<&drift::Group> = outliers
            .into_iter()
            .filter(|g| after.is_none_or(|after| drift::order(g) > after))
            .take(size + 1)
            .collect();
        let next_page_token = if page.len() > size {
            page.truncate(size);
            page.last()
                .map(|last| tokens.issue(&binding, &drift_position(as_of, last)))
                .unwrap_or_default()
        } else {
            String::new()
        };
        let mut out = Vec::with_capacity(page.len());
        for group in page {
            let compared = drift::compare(
                &self.archive.nodes,
                (baseline_root, baseline_profile),
                (group.root, group.profile),
                max_changes,
            )
            .await?;
            let mut proto = drifting.group_to_proto(group);
            proto.changes = compared.changes.iter().map(change_to_proto).collect();
            proto.change_count = compared.count;
            proto.incomparable = compared.incomparable.unwrap_or_default();
            out.push(proto);
        }
        Ok(Response::new(GetDriftResponse {
            baseline: Some(baseline),
            outliers: out,
            source_count,
            outlier_count,
            outlier_group_count,
            next_page_token,
        }))
    }

    async fn get_log_checkpoint(
        &self,
        request: Request<GetLogCheckpointRequest>,
    ) -> Result<Response<GetLogCheckpointResponse>, Status> {
        let size = request.into_inner().size;
        if size > i64::MAX as u64 {
            return Err(Error::OutOfRange("size: past the log's leaves".into()).into());
        }
        let conn = self.archive.pool.get().await.map_err(Error::from)?;
        let found = tlog::checkpoint(&*conn, (size > 0).then_some(size))
            .await?
            .ok_or_else(|| match size {
                0 => Error::NotFound("the transparency log has no checkpoint yet".into()),
                n => Error::NotFound(format!("size: no checkpoint has {n} leaves")),
            })?;
        let log_size = tlog::log_size(&*conn).await?;
        // The witnesses' cosignature lines follow the log's own signature.
        let cosignatures = crate::witness::cosignatures(&*conn, found.size).await?;
        let mut note = found.note;
        for line in &cosignatures {
            note.push_str(line);
        }
        Ok(Response::new(GetLogCheckpointResponse {
            cosignatures: cosignatures.len() as u32,
            witnessed: cosignatures.len() >= self.witnesses.policy,
            note,
            origin: self.log.origin().to_owned(),
            size: found.size,
            root_hash: merkle_core::digest::hex(&found.root),
            verifier_key: self.log.verifier_key().unwrap_or_default().to_owned(),
            create_time: Some(prost_types::Timestamp::from(found.created_at)),
            log_size,
        }))
    }

    async fn get_log_inclusion_proof(
        &self,
        request: Request<GetLogInclusionProofRequest>,
    ) -> Result<Response<GetLogInclusionProofResponse>, Status> {
        let request = request.into_inner();
        let at = if request.source.is_empty() {
            LeafAt::Index(request.leaf_index)
        } else {
            source("source", &request.source)?;
            if request.sequence == 0 || request.sequence > i64::MAX as u64 {
                return Err(Error::bad_request("sequence", "must be 1 or more with source").into());
            }
            if request.leaf_index != 0 {
                return Err(Error::bad_request(
                    "leaf_index",
                    "set leaf_index, or source and sequence, not both",
                )
                .into());
            }
            LeafAt::Record(&request.source, request.sequence)
        };
        if request.leaf_index > i64::MAX as u64 || request.tree_size > i64::MAX as u64 {
            return Err(Error::OutOfRange("leaf_index: past the log's leaves".into()).into());
        }
        let conn = self.archive.pool.get().await.map_err(Error::from)?;
        let size = tree_size(&*conn, "tree_size", request.tree_size).await?;
        let leaf = tlog::leaf(&*conn, at).await?.ok_or_else(|| match at {
            LeafAt::Index(i) => {
                Error::OutOfRange(format!("leaf_index: {i} is past the log's leaves"))
            }
            LeafAt::Record(s, n) => Error::NotFound(format!(
                "sequence: {s}'s record {n} is not in the transparency log (yet)"
            )),
        })?;
        if leaf.index >= size {
            return Err(Error::OutOfRange(format!(
                "tree_size: the leaf {} is not in a tree of {size} leaves",
                leaf.index
            ))
            .into());
        }
        let proof = tlog::inclusion_proof(&*conn, size, leaf.index).await?;
        Ok(Response::new(GetLogInclusionProofResponse {
            leaf_index: leaf.index,
            tree_size: size,
            record_hash: merkle_core::digest::hex(&leaf.record_hash),
            source: leaf.source,
            sequence: leaf.sequence,
            hashes: hexes(&proof),
        }))
    }

    async fn get_log_consistency_proof(
        &self,
        request: Request<GetLogConsistencyProofRequest>,
    ) -> Result<Response<GetLogConsistencyProofResponse>, Status> {
        let request = request.into_inner();
        if request.old_size == 0 {
            return Err(Error::bad_request("old_size", "must be at least 1").into());
        }
        if request.new_size > i64::MAX as u64 {
            return Err(Error::OutOfRange("new_size: past the log's leaves".into()).into());
        }
        let conn = self.archive.pool.get().await.map_err(Error::from)?;
        let new = tree_size(&*conn, "new_size", request.new_size).await?;
        if request.old_size > new {
            return Err(Error::bad_request(
                "old_size",
                format!("{} is more than new_size ({new})", request.old_size),
            )
            .into());
        }
        let proof = tlog::consistency_proof(&*conn, request.old_size, new).await?;
        Ok(Response::new(GetLogConsistencyProofResponse {
            old_size: request.old_size,
            new_size: new,
            hashes: hexes(&proof),
        }))
    }

    async fn get_log_tile(
        &self,
        request: Request<GetLogTileRequest>,
    ) -> Result<Response<GetLogTileResponse>, Status> {
        let path = request.into_inner().path;
        if path.len() > 64 {
            return Err(Error::bad_request("path", "is not a tlog-tiles path (too long)").into());
        }
        let conn = self.archive.pool.get().await.map_err(Error::from)?;
        let found = crate::tiles::resource(&*conn, &path)
            .await?
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "path: {path} is not in the log's newest checkpoint"
                ))
            })?;
        Ok(Response::new(GetLogTileResponse {
            data: found.body,
            immutable: found.immutable,
        }))
    }

    async fn get_retention_policy(
        &self,
        request: Request<GetRetentionPolicyRequest>,
    ) -> Result<Response<GetRetentionPolicyResponse>, Status> {
        let name = source("source", &request.into_inner().source)?;
        let conn = self.archive.pool.get().await.map_err(Error::from)?;
        let row = store::source(&*conn, name.as_str())
            .await?
            .ok_or_else(|| Error::NotFound(format!("source: {name} has no snapshots")))?;
        Ok(Response::new(GetRetentionPolicyResponse {
            policy: Some(row.retention.to_proto()),
            set_by: row.retention_set_by,
        }))
    }

    async fn set_retention_policy(
        &self,
        request: Request<SetRetentionPolicyRequest>,
    ) -> Result<Response<SetRetentionPolicyResponse>, Status> {
        let actor = merkle_shared::auth::actor(&request);
        let request = request.into_inner();
        let name = source("source", &request.source)?;
        let policy = request.policy.unwrap_or_default();
        let keep_within = match &policy.keep_within {
            None => None,
            Some(d) => {
                let d = duration_from_proto(d, MAX_KEEP_WITHIN, "100 years")
                    .map_err(|rule| Error::bad_request("policy.keep_within", rule))?;
                // Whole seconds, rounded up: a part of a second keeps a little longer.
                (!d.is_zero()).then(|| {
                    std::time::Duration::from_secs(d.as_secs() + u64::from(d.subsec_nanos() > 0))
                })
            }
        };
        if policy.keep_last > i32::MAX as u32 {
            return Err(Error::bad_request("policy.keep_last", "is too large").into());
        }
        let retention = Retention {
            keep_last: (policy.keep_last > 0).then_some(policy.keep_last),
            keep_within,
        };
        {
            let conn = self.archive.pool.get().await.map_err(Error::from)?;
            if store::source(&*conn, name.as_str()).await?.is_none() {
                return Err(Error::NotFound(format!("source: {name} has no snapshots")).into());
            }
        }
        let deleted = self
            .archive
            .set_retention(name.as_str(), retention, &actor)
            .await?;
        tracing::info!(source = %name, ?retention, deleted, %actor, "retention policy set");
        if deleted > 0 {
            self.archive.collect.notify_one();
        }
        Ok(Response::new(SetRetentionPolicyResponse {
            policy: Some(retention.to_proto()),
            snapshots_deleted: deleted,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_sizes_default_and_clamp() {
        assert_eq!(page_size(0, 100, 1000), 100);
        assert_eq!(page_size(7, 100, 1000), 7);
        assert_eq!(page_size(5000, 100, 1000), 1000);
    }
}
