//! Authentication and authorization, on by default on every server.
//!
//! A caller is identified by its client certificate (mutual TLS: a DNS or URI name of the
//! certificate) or by a bearer token (`authorization: Bearer <token>`), looked up in the
//! identities file ([`identities`], `AUTH_IDENTITIES_FILE`, read again when it changes). Its
//! role is one of reader, operator, admin (people and tools) or a service identity (the calls
//! services make to each other). [`policy`] is the one table of what each role may call;
//! [`layer`] applies it to every call before any handler runs, and puts the [`Caller`] into
//! the request for the few rules a handler adds (cache namespaces belong to their writer; a
//! retention policy needs admin).
//!
//! - Missing or unknown credentials: UNAUTHENTICATED. A role that may not: PERMISSION_DENIED
//!   naming the role needed. Health and reflection stay open.
//! - Tokens are never logged; the identities file holds only their SHA-256.
//! - Serving without authentication must be asked for (`AUTH_DISABLED=true`) and is logged as
//!   a warning at start.
//! - [`token`]: the bearer token this process presents when it calls other services.

pub mod identities;
pub mod layer;
pub mod policy;
pub mod token;

use std::{path::PathBuf, sync::Arc};

use clap::Args;
use tonic::Status;

use crate::values::ConfigError;

/// The human roles, least first: each may do what the ones before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Reads sources, builds, snapshots, history, the cache's statistics and the fleet.
    Reader,
    /// Also manages sources and builds, pushes trees, warms the cache.
    Operator,
    /// Also deletes sources, sets retention (which prunes history) and clears the cache.
    Admin,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

/// The identity of one of Merkle Mesh's own services, for the calls it makes to the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServiceRole {
    Scheduler,
    TreeBuilder,
    DbSync,
    Cache,
    Discovery,
}

impl ServiceRole {
    pub const ALL: [ServiceRole; 5] = [
        ServiceRole::Scheduler,
        ServiceRole::TreeBuilder,
        ServiceRole::DbSync,
        ServiceRole::Cache,
        ServiceRole::Discovery,
    ];

    /// The service's name, as in `service:<name>` and the binaries' names.
    pub fn name(self) -> &'static str {
        match self {
            ServiceRole::Scheduler => "scheduler",
            ServiceRole::TreeBuilder => "tree-builder",
            ServiceRole::DbSync => "db-sync",
            ServiceRole::Cache => "cache",
            ServiceRole::Discovery => "discovery",
        }
    }

    pub fn parse(name: &str) -> Option<ServiceRole> {
        ServiceRole::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    Role(Role),
    Service(ServiceRole),
    /// Authentication is disabled (`AUTH_DISABLED`): everything.
    Anything,
}

impl std::fmt::Display for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Grant::Role(role) => f.write_str(role.name()),
            Grant::Service(service) => write!(f, "service:{}", service.name()),
            Grant::Anything => f.write_str("anything (authentication disabled)"),
        }
    }
}

/// Who is calling: put into each authenticated request's extensions by [`layer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The identity's name from the identities file.
    pub name: Arc<str>,
    pub grant: Grant,
}

impl Caller {
    pub fn new(name: &str, grant: Grant) -> Caller {
        Caller {
            name: name.into(),
            grant,
        }
    }

    /// The caller of a server without authentication.
    pub fn anonymous() -> Caller {
        Caller::new("anonymous", Grant::Anything)
    }

    /// True when the caller holds `role` or a higher one.
    pub fn has_role(&self, role: Role) -> bool {
        match self.grant {
            Grant::Role(held) => held >= role,
            Grant::Service(_) => false,
            Grant::Anything => true,
        }
    }

    /// `alice (admin)`, as logs and records name the caller.
    pub fn describe(&self) -> String {
        format!("{} ({})", self.name, self.grant)
    }
}

/// The caller of `request`: the identity [`layer`] authenticated. A request that reached a
/// handler without one (a server built without the layer, as in unit tests) is anonymous.
pub fn caller<T>(request: &tonic::Request<T>) -> Caller {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or_else(Caller::anonymous)
}

/// The request header in which a service names the person whose decision it passes on
/// (the Scheduler passing on a source's retention policy); honoured from services only.
pub const ON_BEHALF_OF: &str = "x-merkle-on-behalf-of";

/// Who made `request`, as records name them: `name (role)`, and for a service passing on a
/// person's decision ` on behalf of name (role)`.
pub fn actor<T>(request: &tonic::Request<T>) -> String {
    let caller = caller(request);
    let behalf = match caller.grant {
        Grant::Service(_) => request
            .metadata()
            .get(ON_BEHALF_OF)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty() && v.len() <= 200),
        _ => None,
    };
    match behalf {
        Some(person) => format!("{} on behalf of {person}", caller.describe()),
        None => caller.describe(),
    }
}

/// PERMISSION_DENIED unless the caller holds `role`; `what` names what needs it.
pub fn require_role(caller: &Caller, role: Role, what: &str) -> Result<(), Status> {
    if caller.has_role(role) {
        return Ok(());
    }
    Err(Status::permission_denied(format!(
        "{what} needs the {} role; {} has {}",
        role.name(),
        caller.name,
        caller.grant
    )))
}

/// PERMISSION_DENIED unless the caller may write (or delete in) cache namespace `namespace`:
/// its owning service, or for deletions an admin.
pub fn require_namespace_writer(
    caller: &Caller,
    namespace: merkle_proto::cache::v1::Namespace,
    deleting: bool,
) -> Result<(), Status> {
    let owner = policy::namespace_owner(namespace);
    let allowed = match caller.grant {
        Grant::Anything => true,
        Grant::Service(service) => Some(service) == owner,
        Grant::Role(role) => deleting && role >= Role::Admin,
    };
    if allowed {
        return Ok(());
    }
    let owner = owner.map_or("no service", ServiceRole::name);
    Err(Status::permission_denied(format!(
        "namespace: {} is written only by {owner}{}; {} has {}",
        namespace.as_str_name(),
        if deleting {
            " (deleted also by an admin)"
        } else {
            ""
        },
        caller.name,
        caller.grant
    )))
}

/// The authentication settings every service has.
#[derive(Debug, Clone, Default, Args)]
pub struct AuthArgs {
    /// Who may call this service, and as what: a YAML file of identities (bearer-token hashes
    /// and client-certificate names with their roles; docs/security.md), read again when it
    /// changes. Required unless AUTH_DISABLED is true.
    #[arg(long, env = "AUTH_IDENTITIES_FILE")]
    pub auth_identities_file: Option<PathBuf>,
    /// Serve without authentication: every caller may call everything. Only for a network that
    /// is its own access control; logged as a warning at start.
    #[arg(long, env = "AUTH_DISABLED", default_value_t = false, action = clap::ArgAction::Set)]
    pub auth_disabled: bool,
    /// The bearer token (a file holding it) this service presents when it calls other
    /// services: its service identity. Unset with mutual TLS, where its certificate is.
    #[arg(long, env = "AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,
}

impl AuthArgs {
    /// The rules clap cannot check.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match (&self.auth_identities_file, self.auth_disabled) {
            (None, false) => Err(ConfigError::new(
                "AUTH_IDENTITIES_FILE (--auth-identities-file)",
                "is required: the identities that may call this service (docs/security.md); \
                 set AUTH_DISABLED=true to serve without authentication",
            )),
            (Some(_), true) => Err(ConfigError::new(
                "AUTH_DISABLED (--auth-disabled)",
                "is true while AUTH_IDENTITIES_FILE is set; choose one",
            )),
            _ => Ok(()),
        }
    }
}

/// Reads the identities file and this service's token; call once at start, inside the
/// runtime (both files are then watched). The server's layer comes from
/// [`layer::AuthLayer`].
pub fn init(args: &AuthArgs) -> Result<(), ConfigError> {
    args.validate()?;
    layer::install(args)?;
    if let Some(path) = &args.auth_token_file {
        token::install_file(path)
            .map_err(|rule| ConfigError::new("AUTH_TOKEN_FILE (--auth-token-file)", rule))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use merkle_proto::cache::v1::Namespace;

    #[test]
    fn roles_are_ordered_and_services_hold_no_human_role() {
        let operator = Caller::new("op", Grant::Role(Role::Operator));
        assert!(operator.has_role(Role::Reader));
        assert!(operator.has_role(Role::Operator));
        assert!(!operator.has_role(Role::Admin));
        let service = Caller::new("s", Grant::Service(ServiceRole::Scheduler));
        assert!(!service.has_role(Role::Reader));
        let err = require_role(&operator, Role::Admin, "DeleteSource").expect_err("denied");
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(
            err.message().contains("needs the admin role"),
            "{}",
            err.message()
        );
    }

    #[test]
    fn a_namespace_is_written_by_its_owner_alone() {
        let db_sync = Caller::new("db-sync", Grant::Service(ServiceRole::DbSync));
        let scheduler = Caller::new("scheduler", Grant::Service(ServiceRole::Scheduler));
        let admin = Caller::new("root", Grant::Role(Role::Admin));
        assert!(require_namespace_writer(&db_sync, Namespace::LatestRoot, false).is_ok());
        let err = require_namespace_writer(&scheduler, Namespace::LatestRoot, false)
            .expect_err("not the owner");
        assert!(
            err.message().contains("written only by db-sync"),
            "{}",
            err.message()
        );
        assert!(require_namespace_writer(&admin, Namespace::LatestRoot, false).is_err());
        assert!(require_namespace_writer(&admin, Namespace::LatestRoot, true).is_ok());
        assert!(require_namespace_writer(&scheduler, Namespace::BuildStatus, false).is_ok());
    }

    #[test]
    fn authentication_must_be_configured_or_disabled_on_purpose() {
        let err = AuthArgs::default().validate().expect_err("neither");
        assert!(err.to_string().contains("AUTH_IDENTITIES_FILE"), "{err}");
        let disabled = AuthArgs {
            auth_disabled: true,
            ..AuthArgs::default()
        };
        assert!(disabled.validate().is_ok());
    }
}
