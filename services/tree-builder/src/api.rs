//! The gRPC face of TreeBuilder.

use std::pin::Pin;

use merkle_proto::treebuilder::v1::{
    BuildTreeRequest, BuildTreeResponse, VerifyTreeRequest, VerifyTreeResponse,
    tree_builder_service_server::TreeBuilderService,
};
use merkle_shared::error::not_yet_implemented;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

pub(crate) struct TreeBuilderApi;

impl TreeBuilderApi {
    pub(crate) fn new() -> Self {
        TreeBuilderApi
    }
}

type BuildTreeStream = Pin<Box<dyn Stream<Item = Result<BuildTreeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl TreeBuilderService for TreeBuilderApi {
    type BuildTreeStream = BuildTreeStream;

    async fn build_tree(
        &self,
        _request: Request<BuildTreeRequest>,
    ) -> Result<Response<Self::BuildTreeStream>, Status> {
        Err(not_yet_implemented("BuildTree"))
    }

    async fn verify_tree(
        &self,
        _request: Request<VerifyTreeRequest>,
    ) -> Result<Response<VerifyTreeResponse>, Status> {
        Err(not_yet_implemented("VerifyTree"))
    }
}
