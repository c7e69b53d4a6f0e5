//! What every server's error statuses look like, whatever produced them (a handler, tonic):
//! applied by `crate::server::serve` to every server, in a trailers-only answer's headers and in
//! the trailers of a stream.
//!
//! - A message over `MAX_MESSAGE_BYTES` is RESOURCE_EXHAUSTED, as gRPC's own implementations
//!   answer it (its status-code guide: "a message larger than the configured limit"); tonic
//!   answers OUT_OF_RANGE for a request it cannot decode for size and for a response it cannot
//!   encode, and exactly those statuses are rewritten.
//! - A status message is at most [`MAX_STATUS_MESSAGE`] bytes: one that quotes a huge input is
//!   cut, so no reply exceeds a client's or a proxy's header limits.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use http::{HeaderMap, Request};
use tonic::{Code, Status};
use tower::{Layer, Service};

/// The starts of tonic's messages for a message over the limit.
const TONIC_MESSAGES: [&str; 2] = [
    "Error, decoded message length too large",
    "Error, encoded message length too large",
];

/// The longest status message sent, in bytes.
pub const MAX_STATUS_MESSAGE: usize = 1024;

/// Applies the rules to the status in `headers`, if they hold one.
fn rewrite(headers: &mut HeaderMap) {
    let Some(status) = Status::from_header_map(headers) else {
        return;
    };
    let replaced = if status.code() == Code::OutOfRange
        && TONIC_MESSAGES
            .iter()
            .any(|m| status.message().starts_with(m))
    {
        oversize(&status)
    } else if status.message().len() > MAX_STATUS_MESSAGE {
        Status::new(status.code(), cut(status.message()))
    } else {
        return;
    };
    headers.remove("grpc-status");
    headers.remove("grpc-message");
    headers.remove("grpc-status-details-bin");
    let _ = replaced.add_header(headers);
}

/// `message` cut to [`MAX_STATUS_MESSAGE`] bytes (at a character boundary), saying so.
fn cut(message: &str) -> String {
    let mut end = MAX_STATUS_MESSAGE - 40;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{} ... ({} bytes cut)",
        &message[..end],
        message.len() - end
    )
}

/// tonic's OUT_OF_RANGE for a message over the limit, as RESOURCE_EXHAUSTED naming the setting.
fn oversize(status: &Status) -> Status {
    // "found N bytes, the limit is: M bytes" becomes a sentence naming the setting.
    let detail = status
        .message()
        .split_once(": ")
        .map_or("", |(_, rest)| rest)
        .replace("the limit is: ", "the limit (MAX_MESSAGE_BYTES) is ");
    let direction = if status.message().contains("decoded") {
        "the request message is too large"
    } else {
        "the response message is too large"
    };
    Status::resource_exhausted(format!("{direction}: {detail}"))
}

/// The layer; see the module docs.
#[derive(Debug, Clone, Copy, Default)]
pub struct StatusLayer;

impl<S> Layer<S> for StatusLayer {
    type Service = Statuses<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Statuses { inner }
    }
}

/// The service made by [`StatusLayer`].
#[derive(Debug, Clone)]
pub struct Statuses<S> {
    inner: S,
}

impl<S, B, ResBody> Service<Request<B>> for Statuses<S>
where
    S: Service<Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: 'static,
{
    type Response = http::Response<StatusBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let future = self.inner.call(request);
        Box::pin(async move {
            let mut response = future.await?;
            rewrite(response.headers_mut());
            Ok(response.map(|inner| StatusBody { inner }))
        })
    }
}

/// A response body whose trailers are rewritten like the headers.
pub struct StatusBody<B> {
    inner: B,
}

impl<B> http_body::Body for StatusBody<B>
where
    B: http_body::Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let mut polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &mut polled
            && let Some(trailers) = frame.trailers_mut()
        {
            rewrite(trailers);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers_of(status: Status) -> HeaderMap {
        let mut headers = HeaderMap::new();
        status.add_header(&mut headers).expect("headers");
        headers
    }

    #[test]
    fn a_message_over_the_limit_becomes_resource_exhausted() {
        let mut headers = headers_of(Status::out_of_range(
            "Error, decoded message length too large: found 5000000 bytes, the limit is: 4194304 bytes",
        ));
        rewrite(&mut headers);
        let status = Status::from_header_map(&headers).expect("status");
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            "the request message is too large: found 5000000 bytes, the limit (MAX_MESSAGE_BYTES) is 4194304 bytes"
        );
    }

    #[test]
    fn a_long_message_is_cut() {
        let long = format!("path: {:?} does not exist", "é".repeat(5000));
        let mut headers = headers_of(Status::not_found(long));
        rewrite(&mut headers);
        let status = Status::from_header_map(&headers).expect("status");
        assert_eq!(status.code(), Code::NotFound);
        assert!(
            status.message().len() <= MAX_STATUS_MESSAGE,
            "{}",
            status.message().len()
        );
        assert!(status.message().starts_with("path: "));
        assert!(status.message().ends_with("bytes cut)"));
    }

    #[test]
    fn other_statuses_are_left_alone() {
        for status in [
            Status::out_of_range("page_token: past the end"),
            Status::invalid_argument("Error, decoded message length too large"),
        ] {
            let mut headers = headers_of(status.clone());
            rewrite(&mut headers);
            let after = Status::from_header_map(&headers).expect("status");
            assert_eq!(
                (after.code(), after.message()),
                (status.code(), status.message())
            );
        }
    }
}
