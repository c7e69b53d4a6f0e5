//! The one gRPC client-channel builder. Channels connect lazily, so services start in any
//! order; every call has connect and request timeouts and carries the caller's trace context.
//! Idempotent calls are retried with backoff by wrapping them in [`retry_idempotent`]; other
//! calls are never retried.

use std::{future::Future, time::Duration};

use backon::{ExponentialBuilder, Retryable as _};
use tonic::{Code, Status, transport::Endpoint};
use tower::Layer as _;

use crate::{
    auth::token::{ClientAuth, ClientAuthLayer},
    config::{ClientArgs, ConfigError},
    propagation::{ClientTrace, ClientTraceLayer},
};

/// A channel to another service, with trace-context propagation and this process's bearer
/// token (`crate::auth::token`). Generated clients take it: `DbSyncServiceClient::new(channel)`.
pub type Channel = ClientTrace<ClientAuth<tonic::transport::Channel>>;

/// A lazily connecting channel to `uri` (e.g. `http://127.0.0.1:50053`). `variable` names the
/// setting the URI came from, for the error.
pub fn channel(variable: &str, uri: &str, args: &ClientArgs) -> Result<Channel, ConfigError> {
    let endpoint = Endpoint::from_shared(uri.to_owned()).map_err(|e| {
        ConfigError::new(
            variable,
            format!("not a valid URI ({e}); use http://host:port"),
        )
    })?;
    if endpoint.uri().host().is_none() {
        return Err(ConfigError::new(
            variable,
            "must name a host; use http://host:port",
        ));
    }
    let endpoint = endpoint
        .connect_timeout(args.client_connect_timeout)
        .timeout(args.client_request_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    // https://: TLS with the service's own certificate (see `crate::tls`).
    let channel = if endpoint.uri().scheme_str() == Some("https") {
        if crate::tls::client().is_none() {
            return Err(ConfigError::new(
                variable,
                "is https:// but TLS_CA_FILE (the CA that signs the services' certificates) is not set",
            ));
        }
        endpoint.connect_with_connector_lazy(crate::tls::Connector)
    } else {
        endpoint.connect_lazy()
    };
    Ok(ClientTraceLayer.layer(ClientAuthLayer::process().layer(channel)))
}

/// Runs an idempotent call, retrying it with exponential backoff and jitter while it fails
/// with UNAVAILABLE (the peer is down or restarting), up to `args.client_max_attempts` attempts.
pub async fn retry_idempotent<T, F, Fut>(args: &ClientArgs, call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
        .with_max_times(args.client_max_attempts.saturating_sub(1) as usize)
        .with_jitter();
    call.retry(backoff)
        .when(|status: &Status| status.code() == Code::Unavailable)
        .notify(|status: &Status, delay: Duration| {
            tracing::debug!(code = ?status.code(), message = status.message(), ?delay, "retrying idempotent call");
        })
        .await
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn args(attempts: u32) -> ClientArgs {
        ClientArgs {
            client_connect_timeout: Duration::from_secs(1),
            client_request_timeout: Duration::from_secs(1),
            client_max_attempts: attempts,
        }
    }

    #[tokio::test]
    async fn unavailable_is_retried_until_success() {
        let calls = AtomicU32::new(0);
        let result = retry_idempotent(&args(4), || async {
            if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                Err(Status::unavailable("down"))
            } else {
                Ok(7)
            }
        })
        .await;
        assert_eq!(result.expect("third attempt succeeds"), 7);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn other_errors_are_not_retried() {
        let calls = AtomicU32::new(0);
        let result: Result<(), Status> = retry_idempotent(&args(4), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(Status::invalid_argument("bad"))
        })
        .await;
        assert_eq!(result.expect_err("fails").code(), Code::InvalidArgument);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn attempts_are_bounded() {
        let calls = AtomicU32::new(0);
        let result: Result<(), Status> = retry_idempotent(&args(3), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(Status::unavailable("down"))
        })
        .await;
        assert_eq!(result.expect_err("fails").code(), Code::Unavailable);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn bad_uri_names_the_variable() {
        let err =
            channel("DB_SYNC_ADDR (--db-sync-addr)", "not a uri", &args(1)).expect_err("rejected");
        assert!(err.to_string().contains("DB_SYNC_ADDR"), "{err}");
    }
}
