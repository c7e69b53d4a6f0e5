//! The gRPC face of DbSync. Every RPC is delivered by a later issue (README, RPC status table).

use std::pin::Pin;

use merkle_proto::dbsync::v1::{
    DiffSnapshotsRequest, DiffSnapshotsResponse, FindMissingNodesRequest, FindMissingNodesResponse,
    GetHistoryProofRequest, GetHistoryProofResponse, GetInclusionProofRequest,
    GetInclusionProofResponse, GetLatestRootRequest, GetLatestRootResponse,
    GetRetentionPolicyRequest, GetRetentionPolicyResponse, GetSnapshotRequest, GetSnapshotResponse,
    ListDirectoryRequest, ListDirectoryResponse, ListSnapshotsRequest, ListSnapshotsResponse,
    ListSourcesRequest, ListSourcesResponse, SetRetentionPolicyRequest, SetRetentionPolicyResponse,
    SyncTreeRequest, SyncTreeResponse, WarmCacheRequest, WarmCacheResponse,
    db_sync_service_server::DbSyncService,
};
use merkle_shared::error::not_yet_implemented;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

pub(crate) struct DbSyncApi;

#[tonic::async_trait]
impl DbSyncService for DbSyncApi {
    type DiffSnapshotsStream = ResponseStream<DiffSnapshotsResponse>;

    async fn find_missing_nodes(
        &self,
        _request: Request<FindMissingNodesRequest>,
    ) -> Result<Response<FindMissingNodesResponse>, Status> {
        Err(not_yet_implemented("FindMissingNodes"))
    }

    async fn sync_tree(
        &self,
        _request: Request<tonic::Streaming<SyncTreeRequest>>,
    ) -> Result<Response<SyncTreeResponse>, Status> {
        Err(not_yet_implemented("SyncTree"))
    }

    async fn get_latest_root(
        &self,
        _request: Request<GetLatestRootRequest>,
    ) -> Result<Response<GetLatestRootResponse>, Status> {
        Err(not_yet_implemented("GetLatestRoot"))
    }

    async fn get_snapshot(
        &self,
        _request: Request<GetSnapshotRequest>,
    ) -> Result<Response<GetSnapshotResponse>, Status> {
        Err(not_yet_implemented("GetSnapshot"))
    }

    async fn list_snapshots(
        &self,
        _request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        Err(not_yet_implemented("ListSnapshots"))
    }

    async fn list_sources(
        &self,
        _request: Request<ListSourcesRequest>,
    ) -> Result<Response<ListSourcesResponse>, Status> {
        Err(not_yet_implemented("ListSources"))
    }

    async fn list_directory(
        &self,
        _request: Request<ListDirectoryRequest>,
    ) -> Result<Response<ListDirectoryResponse>, Status> {
        Err(not_yet_implemented("ListDirectory"))
    }

    async fn diff_snapshots(
        &self,
        _request: Request<DiffSnapshotsRequest>,
    ) -> Result<Response<Self::DiffSnapshotsStream>, Status> {
        Err(not_yet_implemented("DiffSnapshots"))
    }

    async fn get_inclusion_proof(
        &self,
        _request: Request<GetInclusionProofRequest>,
    ) -> Result<Response<GetInclusionProofResponse>, Status> {
        Err(not_yet_implemented("GetInclusionProof"))
    }

    async fn warm_cache(
        &self,
        _request: Request<WarmCacheRequest>,
    ) -> Result<Response<WarmCacheResponse>, Status> {
        Err(not_yet_implemented("WarmCache"))
    }

    async fn get_history_proof(
        &self,
        _request: Request<GetHistoryProofRequest>,
    ) -> Result<Response<GetHistoryProofResponse>, Status> {
        Err(not_yet_implemented("GetHistoryProof"))
    }

    async fn get_retention_policy(
        &self,
        _request: Request<GetRetentionPolicyRequest>,
    ) -> Result<Response<GetRetentionPolicyResponse>, Status> {
        Err(not_yet_implemented("GetRetentionPolicy"))
    }

    async fn set_retention_policy(
        &self,
        _request: Request<SetRetentionPolicyRequest>,
    ) -> Result<Response<SetRetentionPolicyResponse>, Status> {
        Err(not_yet_implemented("SetRetentionPolicy"))
    }
}
