//! The authentication layer every server applies (`crate::server::serve`): it identifies the
//! caller of each call, checks [`super::policy`], and either refuses the call before any
//! handler runs or passes it on with the [`Caller`] in its extensions.

use parking_lot::RwLock;
use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
};

use http::Request;
use tonic::Status;
use tower::{Layer, Service};

use super::{
    AuthArgs, Caller, Grant,
    identities::Identities,
    policy::{self, Rule},
};
use crate::{tls::PeerInfo, values::ConfigError};

/// What the layer checks against.
enum State {
    /// `AUTH_DISABLED`: every caller is anonymous and may do anything.
    Disabled,
    /// The identities file as last read.
    Enabled(RwLock<Arc<Identities>>),
}

static STATE: OnceLock<State> = OnceLock::new();

const VARIABLE: &str = "AUTH_IDENTITIES_FILE (--auth-identities-file)";

fn read(path: &std::path::Path) -> Result<Identities, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Identities::parse(&text).map_err(|rule| format!("{}: {rule}", path.display()))
}

/// Reads the identities file (watched from now on), or records that authentication is off.
pub(super) fn install(args: &AuthArgs) -> Result<(), ConfigError> {
    let state = match &args.auth_identities_file {
        None => {
            tracing::warn!(
                "AUTH_DISABLED is true: this service serves WITHOUT AUTHENTICATION; anyone who reaches its port may call anything"
            );
            State::Disabled
        }
        Some(path) => {
            let identities = read(path).map_err(|rule| ConfigError::new(VARIABLE, rule))?;
            tracing::info!(file = %path.display(), identities = identities.len(), "callers are authenticated");
            let owned = path.clone();
            crate::file_watch::on_change(vec![path.clone()], move || match read(&owned) {
                Ok(identities) => {
                    if let Some(State::Enabled(current)) = STATE.get() {
                        tracing::info!(identities = identities.len(), "identities reloaded");
                        *current.write() = Arc::new(identities);
                    }
                    true
                }
                Err(err) => {
                    tracing::warn!(%err, "the identities file changed but cannot be used; keeping the previous identities");
                    false
                }
            });
            State::Enabled(RwLock::new(Arc::new(identities)))
        }
    };
    // A second call (tests running several servers in one process) keeps the first.
    let _ = STATE.set(state);
    Ok(())
}

fn unauthenticated(message: impl Into<String>) -> Status {
    Status::unauthenticated(message)
}

/// The caller of `request`, from its bearer token or else its client certificate.
fn authenticate<B>(request: &Request<B>, identities: &Identities) -> Result<Caller, Status> {
    if let Some(value) = request.headers().get(http::header::AUTHORIZATION) {
        let text = value
            .to_str()
            .map_err(|_| unauthenticated("authorization: must be `Bearer <token>` in ASCII"))?;
        let token = text
            .strip_prefix("Bearer ")
            .or_else(|| text.strip_prefix("bearer "))
            .ok_or_else(|| unauthenticated("authorization: must be `Bearer <token>`"))?;
        return identities.by_token(token.trim()).cloned().ok_or_else(|| {
            unauthenticated(
                "authorization: the bearer token is not known (mistyped, or rotated away)",
            )
        });
    }
    if let Some(peer) = request.extensions().get::<PeerInfo>()
        && !peer.names.is_empty()
    {
        return identities
            .by_san(peer.names.iter().map(String::as_str))
            .cloned()
            .ok_or_else(|| {
                let mut names = peer.names.join(", ");
                names.truncate(200);
                unauthenticated(format!(
                    "the client certificate's names ({names}) are not among the identities"
                ))
            });
    }
    Err(unauthenticated(
        "this call needs credentials: a bearer token (authorization: Bearer <token>) or a client certificate (docs/security.md)",
    ))
}

/// PERMISSION_DENIED unless `caller` may call what `rule` covers.
fn authorize(caller: &Caller, rule: &Rule) -> Result<(), Status> {
    let allowed = match caller.grant {
        Grant::Anything => true,
        Grant::Role(role) => rule.role.is_some_and(|needed| role >= needed),
        Grant::Service(service) => rule.services.contains(&service),
    };
    if allowed {
        return Ok(());
    }
    let method = rule.method;
    let needed = match (rule.role, rule.services) {
        (Some(role), _) => format!("the {} role", role.name()),
        (None, services) => format!(
            "a service identity ({})",
            services
                .iter()
                .map(|s| format!("service:{}", s.name()))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    Err(Status::permission_denied(format!(
        "{method} needs {needed}; {} has {}",
        caller.name, caller.grant
    )))
}

/// The decision for one call: `Ok` with the caller to pass on (`None` for open calls), or the
/// refusal.
fn decide<B>(request: &Request<B>) -> Result<Option<Caller>, Status> {
    let path = request.uri().path();
    if policy::is_open(path) {
        return Ok(None);
    }
    let caller = match STATE.get() {
        Some(State::Disabled) => return Ok(Some(Caller::anonymous())),
        Some(State::Enabled(identities)) => {
            let identities = identities.read().clone();
            authenticate(request, &identities)?
        }
        None => {
            return Err(unauthenticated(
                "authentication is not configured on this server",
            ));
        }
    };
    // A path outside the contract passes on: the server answers UNIMPLEMENTED for it.
    if let Some(rule) = policy::rule_of(path) {
        authorize(&caller, rule)?;
        if rule.mutating {
            match caller.grant {
                // The services' own writes are the system's data flow (traced, not logged).
                Grant::Service(_) => {
                    tracing::debug!(caller = %caller.name, role = %caller.grant, rpc = path, "call")
                }
                _ => {
                    tracing::info!(caller = %caller.name, role = %caller.grant, rpc = path, "call")
                }
            }
        }
    }
    Ok(Some(caller))
}

/// Authenticates and authorizes every call (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct AuthLayer;

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Auth { inner }
    }
}

/// The service made by [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct Auth<S> {
    inner: S,
}

impl<S, B, ResBody> Service<Request<B>> for Auth<S>
where
    S: Service<Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        match decide(&request) {
            Ok(caller) => {
                if let Some(caller) = caller {
                    tracing_opentelemetry::OpenTelemetrySpanExt::set_attribute(
                        &tracing::Span::current(),
                        "enduser.id",
                        caller.name.to_string(),
                    );
                    request.extensions_mut().insert(caller);
                }
                Box::pin(self.inner.call(request))
            }
            Err(status) => {
                let response = status.into_http::<ResBody>();
                Box::pin(async move { Ok(response) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Role, ServiceRole, identities::token_hash};

    fn identities() -> Identities {
        let hash = merkle_core::digest::hex(&token_hash("reader-token-0123456789"));
        Identities::parse(&format!(
            "identities:\n  - name: rita\n    role: reader\n    token_sha256: {hash}\n  - name: sched\n    role: service:scheduler\n    san: spiffe://mesh/scheduler\n"
        ))
        .expect("valid")
    }

    fn request(token: Option<&str>, names: &[&str]) -> Request<()> {
        let mut request = Request::builder()
            .uri("/merkle.dbsync.v1.DbSyncService/ListSources")
            .body(())
            .expect("request");
        if let Some(token) = token {
            request.headers_mut().insert(
                http::header::AUTHORIZATION,
                format!("Bearer {token}").parse().expect("header"),
            );
        }
        if !names.is_empty() {
            request.extensions_mut().insert(PeerInfo {
                tcp: tonic::transport::server::TcpConnectInfo {
                    local_addr: None,
                    remote_addr: None,
                },
                names: names.iter().map(|n| n.to_string()).collect(),
            });
        }
        request
    }

    #[test]
    fn callers_are_found_by_token_or_certificate() {
        let ids = identities();
        let rita = authenticate(&request(Some("reader-token-0123456789"), &[]), &ids)
            .expect("known token");
        assert_eq!(rita.grant, Grant::Role(Role::Reader));
        let sched =
            authenticate(&request(None, &["spiffe://mesh/scheduler"]), &ids).expect("known name");
        assert_eq!(sched.grant, Grant::Service(ServiceRole::Scheduler));
        for (token, names) in [
            (Some("wrong-token-0123456789"), &[][..]),
            (None, &[][..]),
            (None, &["x"][..]),
        ] {
            let err = authenticate(&request(token, names), &ids).expect_err("refused");
            assert_eq!(
                err.code(),
                tonic::Code::Unauthenticated,
                "{}",
                err.message()
            );
        }
    }

    #[test]
    fn refusals_name_the_role_needed() {
        let reader = Caller::new("rita", Grant::Role(Role::Reader));
        let delete =
            policy::rule_of("/merkle.scheduler.v1.SchedulerService/DeleteSource").expect("rule");
        let err = authorize(&reader, delete).expect_err("denied");
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            err.message(),
            "DeleteSource needs the admin role; rita has reader"
        );
        let set = policy::rule_of("/merkle.cache.v1.CacheService/Set").expect("rule");
        let admin = Caller::new("root", Grant::Role(Role::Admin));
        let err = authorize(&admin, set).expect_err("services only");
        assert!(
            err.message().contains("service:db-sync"),
            "{}",
            err.message()
        );
        let sched = Caller::new("s", Grant::Service(ServiceRole::Scheduler));
        assert!(authorize(&sched, set).is_ok());
        assert!(authorize(&sched, delete).is_err());
    }
}
