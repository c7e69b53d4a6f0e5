//! Calling any RPC with bytes the test chose: the policy walk and the hostile-input suite send
//! messages no typed client would (empty, malformed, oversized) and read whatever comes back.

use std::time::Duration;

use prost::bytes::{Buf as _, BufMut as _};
use tonic::{
    Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::{Body, Bytes, StdError, http::uri::PathAndQuery},
};

/// A codec of raw message bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

/// Calls `path` (`/package.Service/Method`, any kind of RPC) with `messages`; returns the first
/// message of the answer, `None` when the stream stayed open without one for `wait` (a watch),
/// or the status the call ended with.
pub async fn call<T>(
    channel: T,
    path: &str,
    messages: Vec<Vec<u8>>,
    wait: Duration,
) -> Result<Option<Vec<u8>>, Status>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
{
    let mut grpc = tonic::client::Grpc::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let path: PathAndQuery = path.parse().map_err(|_| Status::internal("not a path"))?;
    let request = tonic::Request::new(tokio_stream::iter(messages));
    let answer = async {
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(e.into().to_string()))?;
        let mut stream = grpc.streaming(request, path, Raw).await?.into_inner();
        stream.message().await
    };
    tokio::time::timeout(wait, answer).await.unwrap_or(Ok(None))
}
