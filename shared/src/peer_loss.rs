//! A call whose peer could not be reached, or went away in the middle of it (a crash, a
//! restart, a reset connection), ends UNAVAILABLE, the code a caller retries on. tonic reports
//! a connection lost mid-stream as UNKNOWN ("h2 protocol error: error reading a body from
//! connection"); this layer, applied by the client builder to every channel, turns a transport
//! failure of the request or of the response body into an UNAVAILABLE status naming it.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use http::{HeaderMap, Request};
use tonic::Status;
use tower::{Layer, Service};

fn lost(what: &str, err: &dyn std::fmt::Display) -> Status {
    Status::unavailable(format!("{what}: {err}"))
}

/// The status of a call the transport failed: DEADLINE_EXCEEDED when the channel's own
/// request timeout (`CLIENT_REQUEST_TIMEOUT`) expired (the peer may still do the work, so
/// this is not UNAVAILABLE, which idempotent calls retry), UNAVAILABLE otherwise.
fn failed_call(err: &(dyn std::error::Error + 'static)) -> Status {
    let mut source = Some(err);
    while let Some(err) = source {
        if err.is::<tonic::TimeoutExpired>() {
            return Status::deadline_exceeded(format!(
                "no answer within the call timeout (CLIENT_REQUEST_TIMEOUT): {err}"
            ));
        }
        source = err.source();
    }
    lost("the service could not be reached", &err)
}

/// The layer; see the module docs.
#[derive(Debug, Clone, Copy, Default)]
pub struct PeerLossLayer;

impl<S> Layer<S> for PeerLossLayer {
    type Service = PeerLoss<S>;
    fn layer(&self, inner: S) -> Self::Service {
        PeerLoss { inner }
    }
}

/// The service made by [`PeerLossLayer`].
#[derive(Debug, Clone)]
pub struct PeerLoss<S> {
    inner: S,
}

impl<S, B, ResBody> Service<Request<B>> for PeerLoss<S>
where
    S: Service<Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: std::error::Error + Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<PeerLossBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let future = self.inner.call(request);
        Box::pin(async move {
            match future.await {
                Ok(response) => Ok(response.map(PeerLossBody::new)),
                // The status in the headers, as a server's trailers-only answer carries it.
                Err(err) => Ok(failed_call(&err)
                    .into_http::<ResBody>()
                    .map(PeerLossBody::new)),
            }
        })
    }
}

/// A response body whose transport error ends the stream with UNAVAILABLE trailers.
pub struct PeerLossBody<B> {
    inner: B,
    ended: bool,
}

impl<B> PeerLossBody<B> {
    fn new(inner: B) -> Self {
        PeerLossBody {
            inner,
            ended: false,
        }
    }
}

impl<B> http_body::Body for PeerLossBody<B>
where
    B: http_body::Body + Unpin,
    B::Error: std::fmt::Display,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(err))) => {
                self.ended = true;
                let mut trailers = HeaderMap::new();
                let status = lost("the service went away during the call", &err);
                if status.add_header(&mut trailers).is_err() {
                    return Poll::Ready(Some(Err(err)));
                }
                Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::VecDeque, future::poll_fn};

    use tonic::{Code, codegen::Bytes};
    use tower::{Service as _, ServiceExt as _};

    use super::*;

    /// A body that yields its frames, then fails as a reset connection does.
    #[derive(Default)]
    struct Breaking {
        frames: VecDeque<&'static str>,
    }

    impl http_body::Body for Breaking {
        type Data = Bytes;
        type Error = &'static str;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
            Poll::Ready(Some(match self.frames.pop_front() {
                Some(data) => Ok(http_body::Frame::data(Bytes::from_static(data.as_bytes()))),
                None => Err("connection reset"),
            }))
        }
    }

    #[tokio::test]
    async fn a_peer_that_cannot_be_reached_is_unavailable() {
        let mut service = PeerLossLayer.layer(tower::service_fn(|_: Request<()>| async {
            Err::<http::Response<Breaking>, _>(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "connection refused",
            ))
        }));
        let response = service
            .ready()
            .await
            .expect("ready")
            .call(Request::new(()))
            .await
            .expect("a status, not an error");
        let status = Status::from_header_map(response.headers()).expect("a grpc-status");
        assert_eq!(status.code(), Code::Unavailable);
        assert!(
            status.message().contains("connection refused"),
            "{status:?}"
        );
    }

    #[tokio::test]
    async fn a_call_timeout_is_deadline_exceeded() {
        #[derive(Debug, thiserror::Error)]
        #[error("transport error")]
        struct Transport(#[source] tonic::TimeoutExpired);
        let mut service = PeerLossLayer.layer(tower::service_fn(|_: Request<()>| async {
            Err::<http::Response<Breaking>, _>(Transport(tonic::TimeoutExpired(())))
        }));
        let response = service
            .ready()
            .await
            .expect("ready")
            .call(Request::new(()))
            .await
            .expect("a status, not an error");
        let status = Status::from_header_map(response.headers()).expect("a grpc-status");
        assert_eq!(status.code(), Code::DeadlineExceeded);
        assert!(
            status.message().contains("CLIENT_REQUEST_TIMEOUT"),
            "{status:?}"
        );
    }

    async fn next<B: http_body::Body + Unpin>(
        body: &mut B,
    ) -> Option<Result<http_body::Frame<B::Data>, B::Error>> {
        poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await
    }

    #[tokio::test]
    async fn a_stream_cut_in_the_middle_ends_unavailable() {
        let mut body = PeerLossBody::new(Breaking {
            frames: VecDeque::from(["first message"]),
        });
        let first = next(&mut body).await.expect("a frame").expect("data");
        assert!(first.is_data());
        let last = next(&mut body)
            .await
            .expect("a frame")
            .expect("trailers, not an error");
        let status =
            Status::from_header_map(last.trailers_ref().expect("trailers")).expect("a grpc-status");
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().contains("connection reset"), "{status:?}");
        assert!(
            next(&mut body).await.is_none(),
            "the stream ends after the trailers"
        );
    }
}
