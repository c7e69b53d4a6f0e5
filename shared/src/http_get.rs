//! The one small read-only HTTP/1.1 server: each GET (or HEAD) answered by a handler from the
//! request path. It serves the admin port's `/metrics` and DbSync's transparency-log tiles.
//! And its one-call client, [`status_of`], for probes of such a page.

use std::future::Future;

use http::Method;
pub use http::StatusCode;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, service::service_fn};

use crate::shutdown::Shutdown;

/// What a handler answers.
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    /// `Cache-Control`, when the answer may be cached (e.g. an immutable tile).
    pub cache_control: Option<&'static str>,
    pub body: Vec<u8>,
}

impl Reply {
    /// 200 with `body`.
    pub fn ok(content_type: &'static str, body: Vec<u8>) -> Reply {
        Reply {
            status: StatusCode::OK,
            content_type,
            cache_control: None,
            body,
        }
    }

    /// An error status with a one-line text body.
    pub fn status(status: StatusCode, message: impl Into<String>) -> Reply {
        let mut body = message.into().into_bytes();
        body.push(b'\n');
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            cache_control: None,
            body,
        }
    }
}

/// Serves GET and HEAD on `listener` with `handler(path)` until `shutdown`; other methods get
/// 405.
pub async fn serve<F, Fut>(listener: tokio::net::TcpListener, mut shutdown: Shutdown, handler: F)
where
    F: Fn(String) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send,
{
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.wait() => return,
        };
        let Ok((stream, _)) = accepted else {
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let handler = handler.clone();
                async move {
                    let head = request.method() == Method::HEAD;
                    let reply = if request.method() == Method::GET || head {
                        handler(request.uri().path().to_owned()).await
                    } else {
                        Reply::status(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here")
                    };
                    let mut response = Response::builder()
                        .status(reply.status)
                        .header("content-type", reply.content_type);
                    if let Some(cache) = reply.cache_control {
                        response = response.header("cache-control", cache);
                    }
                    let body = if head { Vec::new() } else { reply.body };
                    response.body(Full::new(bytes_of(body)))
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}

/// The status a plain `http://host:port/path` URL answers a GET with, within `timeout`: a
/// probe of a loopback page (`merklectl health --http`, the console's). The body is not read.
pub async fn status_of(url: &str, timeout: std::time::Duration) -> Result<StatusCode, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("{url:?}: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("{url:?}: only http:// URLs are probed"));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("{url:?} names no host"))?
        .clone();
    let port = authority.port_u16().unwrap_or(80);
    let exchange = async {
        let stream = tokio::net::TcpStream::connect((authority.host(), port))
            .await
            .map_err(|e| format!("connecting to {authority}: {e}"))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let request = Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
            .header("host", authority.as_str())
            .body(http_body_util::Empty::<hyper::body::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        Ok(response.status())
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("no answer in {timeout:?}"))?
}

fn bytes_of(body: Vec<u8>) -> hyper::body::Bytes {
    hyper::body::Bytes::from(body)
}
