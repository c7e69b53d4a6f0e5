//! The one gRPC client-channel builder. Channels connect lazily, so services start in any
//! order; every call has connect and request timeouts and carries the caller's trace context.
//! Idempotent calls are retried with backoff by wrapping them in [`retry_idempotent`]; other
//! calls are never retried. [`retry`] is the one retry loop: other transient failures (a
//! record PostgreSQL could not take) use it with a [`Backoff`] of their own.

use std::{future::Future, time::Duration};

use backon::{ExponentialBuilder, Retryable as _};
use tonic::{Code, Status, transport::Endpoint};
use tower::Layer as _;

use crate::{
    auth::token::{ClientAuth, ClientAuthLayer},
    config::{ClientArgs, ConfigError},
    peer_loss::{PeerLoss, PeerLossLayer},
    propagation::{ClientTrace, ClientTraceLayer},
};

/// A channel to another service, with trace-context propagation and this process's bearer
/// token (`crate::auth::token`). Generated clients take it: `DbSyncServiceClient::new(channel)`.
pub type Channel = ClientTrace<ClientAuth<PeerLoss<tonic::transport::Channel>>>;

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
    Ok(wrap(channel, ClientAuthLayer::process()))
}

/// The layers every channel carries, around a transport channel built elsewhere (tests that
/// need their own timeouts or a token other than this process's).
pub fn wrap(channel: tonic::transport::Channel, auth: ClientAuthLayer) -> Channel {
    ClientTraceLayer.layer(auth.layer(PeerLossLayer.layer(channel)))
}

/// How a transient failure is retried: `attempts` in all, waiting `first` and doubling up to
/// `max` between them, with jitter.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
    pub attempts: u32,
}

impl Backoff {
    /// An idempotent call to another service: `CLIENT_MAX_ATTEMPTS` attempts, 50 ms doubling
    /// to 2 s.
    pub fn idempotent(args: &ClientArgs) -> Backoff {
        Backoff {
            first: Duration::from_millis(50),
            max: Duration::from_secs(2),
            attempts: args.client_max_attempts,
        }
    }
}

/// Runs `call`, retrying it while it fails with an error `transient` says may pass.
pub async fn retry<T, E, F, Fut>(
    backoff: Backoff,
    transient: impl Fn(&E) -> bool,
    call: F,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let policy = ExponentialBuilder::default()
        .with_min_delay(backoff.first)
        .with_max_delay(backoff.max)
        .with_max_times(backoff.attempts.saturating_sub(1) as usize)
        .with_jitter();
    call.retry(policy)
        .when(transient)
        .notify(|err: &E, delay: Duration| {
            tracing::debug!(error = %err, ?delay, "retrying after a transient failure");
        })
        .await
}

/// Runs an idempotent call, retrying it with [`Backoff::idempotent`] while it fails with
/// UNAVAILABLE (the peer is down, restarting, or went away during the call).
pub async fn retry_idempotent<T, F, Fut>(args: &ClientArgs, call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    retry(
        Backoff::idempotent(args),
        |status: &Status| status.code() == Code::Unavailable,
        call,
    )
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
