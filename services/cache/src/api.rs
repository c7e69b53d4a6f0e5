//! The gRPC face of Cache. Every RPC is delivered by a later issue (README, RPC status table).

use merkle_proto::cache::v1::{
    ClearRequest, ClearResponse, DeleteRequest, DeleteResponse, GetManyRequest, GetManyResponse,
    GetRequest, GetResponse, GetStatsRequest, GetStatsResponse, GetStatusRequest,
    GetStatusResponse, InvalidatePatternRequest, InvalidatePatternResponse, SetManyRequest,
    SetManyResponse, SetRequest, SetResponse, WarmupRequest, WarmupResponse,
    cache_service_server::CacheService,
};
use merkle_shared::error::not_yet_implemented;
use tonic::{Request, Response, Status};

pub(crate) struct CacheApi;

#[tonic::async_trait]
impl CacheService for CacheApi {
    async fn get(&self, _request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        Err(not_yet_implemented("Get"))
    }

    async fn set(&self, _request: Request<SetRequest>) -> Result<Response<SetResponse>, Status> {
        Err(not_yet_implemented("Set"))
    }

    async fn delete(
        &self,
        _request: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        Err(not_yet_implemented("Delete"))
    }

    async fn get_many(
        &self,
        _request: Request<GetManyRequest>,
    ) -> Result<Response<GetManyResponse>, Status> {
        Err(not_yet_implemented("GetMany"))
    }

    async fn set_many(
        &self,
        _request: Request<SetManyRequest>,
    ) -> Result<Response<SetManyResponse>, Status> {
        Err(not_yet_implemented("SetMany"))
    }

    async fn invalidate_pattern(
        &self,
        _request: Request<InvalidatePatternRequest>,
    ) -> Result<Response<InvalidatePatternResponse>, Status> {
        Err(not_yet_implemented("InvalidatePattern"))
    }

    async fn clear(
        &self,
        _request: Request<ClearRequest>,
    ) -> Result<Response<ClearResponse>, Status> {
        Err(not_yet_implemented("Clear"))
    }

    async fn warmup(
        &self,
        _request: Request<WarmupRequest>,
    ) -> Result<Response<WarmupResponse>, Status> {
        Err(not_yet_implemented("Warmup"))
    }

    async fn get_stats(
        &self,
        _request: Request<GetStatsRequest>,
    ) -> Result<Response<GetStatsResponse>, Status> {
        Err(not_yet_implemented("GetStats"))
    }

    async fn get_status(
        &self,
        _request: Request<GetStatusRequest>,
    ) -> Result<Response<GetStatusResponse>, Status> {
        Err(not_yet_implemented("GetStatus"))
    }
}
