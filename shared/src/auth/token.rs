//! The bearer token this process presents on its outgoing calls: a service's own identity
//! (`AUTH_TOKEN_FILE`, read again when it changes) or the token `merklectl` found. The client
//! builder applies [`ClientAuthLayer`] to every channel, so no call site handles it.

use parking_lot::RwLock;
use std::{
    path::Path,
    task::{Context, Poll},
};

use http::{HeaderValue, Request};
use tower::{Layer, Service};

static TOKEN: RwLock<Option<HeaderValue>> = RwLock::new(None);

/// Checks a token's text and makes the header of it.
fn header_of(token: &str) -> Result<HeaderValue, String> {
    let token = token.trim();
    if token.len() < 16 || token.len() > 4096 {
        return Err(format!(
            "a token must be 16-4096 characters (this one has {})",
            token.len()
        ));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("a token must be printable ASCII without spaces".into());
    }
    let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| "a token must be printable ASCII".to_owned())?;
    value.set_sensitive(true);
    Ok(value)
}

/// Presents `token` on every call this process makes from now on.
pub fn install(token: &str) -> Result<(), String> {
    let header = header_of(token)?;
    *TOKEN.write() = Some(header);
    Ok(())
}

/// Presents no token from now on (a client of a stack run with `AUTH_DISABLED`).
pub fn clear() {
    *TOKEN.write() = None;
}

/// Presents the token in `path`, and the file's new token whenever it changes.
pub fn install_file(path: &Path) -> Result<(), String> {
    let read = |path: &Path| -> Result<(), String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        install(&text).map_err(|rule| format!("{}: {rule}", path.display()))
    };
    read(path)?;
    let owned = path.to_owned();
    crate::file_watch::on_change(vec![owned.clone()], move || match read(&owned) {
        Ok(()) => {
            tracing::info!(file = %owned.display(), "bearer token reloaded");
            true
        }
        Err(err) => {
            tracing::warn!(%err, "the token file changed but cannot be used yet; keeping the previous token");
            false
        }
    });
    Ok(())
}

/// The `authorization` header to send, when this process has a token.
pub fn header() -> Option<HeaderValue> {
    TOKEN.read().clone()
}

/// Adds a bearer token to each outgoing request that carries no `authorization` of its own:
/// this process's ([`install`]), or one given to the layer.
#[derive(Debug, Clone, Default)]
pub struct ClientAuthLayer {
    token: Option<HeaderValue>,
}

impl ClientAuthLayer {
    /// A layer presenting this process's token, whichever is installed at the time of a call.
    pub fn process() -> ClientAuthLayer {
        ClientAuthLayer::default()
    }

    /// A layer presenting `token` (for a client that acts as another identity than the
    /// process, as tests of the policy do).
    pub fn with_token(token: &str) -> Result<ClientAuthLayer, String> {
        Ok(ClientAuthLayer {
            token: Some(header_of(token)?),
        })
    }
}

impl<S> Layer<S> for ClientAuthLayer {
    type Service = ClientAuth<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ClientAuth {
            inner,
            token: self.token.clone(),
        }
    }
}

/// The service made by [`ClientAuthLayer`].
#[derive(Debug, Clone)]
pub struct ClientAuth<S> {
    inner: S,
    token: Option<HeaderValue>,
}

impl<S, B> Service<Request<B>> for ClientAuth<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        if !request.headers().contains_key(http::header::AUTHORIZATION)
            && let Some(value) = self.token.clone().or_else(header)
        {
            request
                .headers_mut()
                .insert(http::header::AUTHORIZATION, value);
        }
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked_and_marked_sensitive() {
        assert!(header_of("short").is_err());
        assert!(header_of("has a space in it, sixteen+").is_err());
        let value = header_of("  0123456789abcdef0123\n").expect("a token");
        assert!(value.is_sensitive());
        assert_eq!(
            value.to_str().expect("ascii"),
            "Bearer 0123456789abcdef0123"
        );
    }
}
