//! The gRPC face of Scheduler. Every RPC is delivered by a later issue (README, RPC status table).

use std::pin::Pin;

use merkle_proto::scheduler::v1::{
    CancelBuildRequest, CancelBuildResponse, CreateSourceRequest, CreateSourceResponse,
    DeleteSourceRequest, DeleteSourceResponse, GetBuildRequest, GetBuildResponse, GetSourceRequest,
    GetSourceResponse, ListBuildsRequest, ListBuildsResponse, ListSourcesRequest,
    ListSourcesResponse, TriggerBuildRequest, TriggerBuildResponse, UpdateSourceRequest,
    UpdateSourceResponse, WatchBuildRequest, WatchBuildResponse,
    scheduler_service_server::SchedulerService,
};
use merkle_shared::error::not_yet_implemented;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

pub(crate) struct SchedulerApi;

#[tonic::async_trait]
impl SchedulerService for SchedulerApi {
    type WatchBuildStream = ResponseStream<WatchBuildResponse>;

    async fn create_source(
        &self,
        _request: Request<CreateSourceRequest>,
    ) -> Result<Response<CreateSourceResponse>, Status> {
        Err(not_yet_implemented("CreateSource"))
    }

    async fn get_source(
        &self,
        _request: Request<GetSourceRequest>,
    ) -> Result<Response<GetSourceResponse>, Status> {
        Err(not_yet_implemented("GetSource"))
    }

    async fn list_sources(
        &self,
        _request: Request<ListSourcesRequest>,
    ) -> Result<Response<ListSourcesResponse>, Status> {
        Err(not_yet_implemented("ListSources"))
    }

    async fn update_source(
        &self,
        _request: Request<UpdateSourceRequest>,
    ) -> Result<Response<UpdateSourceResponse>, Status> {
        Err(not_yet_implemented("UpdateSource"))
    }

    async fn delete_source(
        &self,
        _request: Request<DeleteSourceRequest>,
    ) -> Result<Response<DeleteSourceResponse>, Status> {
        Err(not_yet_implemented("DeleteSource"))
    }

    async fn trigger_build(
        &self,
        _request: Request<TriggerBuildRequest>,
    ) -> Result<Response<TriggerBuildResponse>, Status> {
        Err(not_yet_implemented("TriggerBuild"))
    }

    async fn get_build(
        &self,
        _request: Request<GetBuildRequest>,
    ) -> Result<Response<GetBuildResponse>, Status> {
        Err(not_yet_implemented("GetBuild"))
    }

    async fn list_builds(
        &self,
        _request: Request<ListBuildsRequest>,
    ) -> Result<Response<ListBuildsResponse>, Status> {
        Err(not_yet_implemented("ListBuilds"))
    }

    async fn cancel_build(
        &self,
        _request: Request<CancelBuildRequest>,
    ) -> Result<Response<CancelBuildResponse>, Status> {
        Err(not_yet_implemented("CancelBuild"))
    }

    async fn watch_build(
        &self,
        _request: Request<WatchBuildRequest>,
    ) -> Result<Response<Self::WatchBuildStream>, Status> {
        Err(not_yet_implemented("WatchBuild"))
    }
}
