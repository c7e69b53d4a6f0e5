//! The gRPC face of Discovery. Every RPC is delivered by a later issue (README, RPC status table).

use std::pin::Pin;

use merkle_proto::discovery::v1::{
    GetClientRequest, GetClientResponse, ListClientsRequest, ListClientsResponse,
    WatchClientsRequest, WatchClientsResponse, discovery_service_server::DiscoveryService,
};
use merkle_shared::error::not_yet_implemented;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

pub(crate) struct DiscoveryApi;

#[tonic::async_trait]
impl DiscoveryService for DiscoveryApi {
    type WatchClientsStream = ResponseStream<WatchClientsResponse>;

    async fn list_clients(
        &self,
        _request: Request<ListClientsRequest>,
    ) -> Result<Response<ListClientsResponse>, Status> {
        Err(not_yet_implemented("ListClients"))
    }

    async fn get_client(
        &self,
        _request: Request<GetClientRequest>,
    ) -> Result<Response<GetClientResponse>, Status> {
        Err(not_yet_implemented("GetClient"))
    }

    async fn watch_clients(
        &self,
        _request: Request<WatchClientsRequest>,
    ) -> Result<Response<Self::WatchClientsStream>, Status> {
        Err(not_yet_implemented("WatchClients"))
    }
}
