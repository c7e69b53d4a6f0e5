//! The policy: for every RPC of the contract, the least human role that may call it and the
//! services that call it on their own behalf. This table is the whole of it (docs/security.md
//! prints it); a test checks that every RPC of the contract has a row.
//!
//! Human roles are ordered: an operator may do what a reader may, an admin what an operator
//! may. A service identity may call exactly the RPCs its row names, nothing a human role
//! grants. Health and reflection stay open to everyone (probes, `grpcurl list`).

use super::{Role, ServiceRole};
use ServiceRole::{Cache, DbSync, Discovery, Scheduler, TreeBuilder};

/// Who may call one RPC.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    /// The full service name, `package.Service`.
    pub service: &'static str,
    pub method: &'static str,
    /// The least human role that may call it; `None`: no human role may.
    pub role: Option<Role>,
    /// The services that may call it with their own identity.
    pub services: &'static [ServiceRole],
    /// True when the call changes state: it is logged with the caller's identity.
    pub mutating: bool,
    /// A rule the handler adds on top, in words (for the docs), or empty.
    pub also: &'static str,
}

impl Rule {
    /// The gRPC path, `/package.Service/Method`.
    pub fn path(&self) -> String {
        format!("/{}/{}", self.service, self.method)
    }
}

const fn r(
    service: &'static str,
    method: &'static str,
    role: Option<Role>,
    services: &'static [ServiceRole],
    mutating: bool,
    also: &'static str,
) -> Rule {
    Rule {
        service,
        method,
        role,
        services,
        mutating,
        also,
    }
}

const SCHEDULER: &str = "merkle.scheduler.v1.SchedulerService";
const TREE_BUILDER: &str = "merkle.treebuilder.v1.TreeBuilderService";
const DB_SYNC: &str = "merkle.dbsync.v1.DbSyncService";
const CACHE: &str = "merkle.cache.v1.CacheService";
const DISCOVERY: &str = "merkle.discovery.v1.DiscoveryService";

const READER: Option<Role> = Some(Role::Reader);
const OPERATOR: Option<Role> = Some(Role::Operator);
const ADMIN: Option<Role> = Some(Role::Admin);
const NO_HUMAN: Option<Role> = None;
const NONE: &[ServiceRole] = &[];
const WRITERS: &[ServiceRole] = &[DbSync, Scheduler, Discovery];
const WRITES: bool = true;
const READS: bool = false;

/// Every RPC of the contract.
#[rustfmt::skip]
pub const RULES: &[Rule] = &[
    r(SCHEDULER, "CreateSource",   OPERATOR, NONE, WRITES, "a retention policy needs admin"),
    r(SCHEDULER, "GetSource",      READER,   NONE, READS,  ""),
    r(SCHEDULER, "ListSources",    READER,   NONE, READS,  ""),
    r(SCHEDULER, "UpdateSource",   OPERATOR, NONE, WRITES, "changing the retention policy needs admin"),
    r(SCHEDULER, "DeleteSource",   ADMIN,    NONE, WRITES, ""),
    r(SCHEDULER, "TriggerBuild",   OPERATOR, NONE, WRITES, ""),
    r(SCHEDULER, "GetBuild",       READER,   NONE, READS,  ""),
    r(SCHEDULER, "ListBuilds",     READER,   NONE, READS,  ""),
    r(SCHEDULER, "CancelBuild",    OPERATOR, NONE, WRITES, ""),
    r(SCHEDULER, "WatchBuild",     READER,   NONE, READS,  ""),

    r(TREE_BUILDER, "BuildTree",   OPERATOR, &[Scheduler], READS, ""),
    r(TREE_BUILDER, "VerifyTree",  OPERATOR, NONE,         READS, ""),
    r(TREE_BUILDER, "CheckPath",   OPERATOR, &[Scheduler], READS, ""),

    r(DB_SYNC, "FindMissingNodes",   OPERATOR, &[Scheduler],   READS,  ""),
    r(DB_SYNC, "SyncTree",           OPERATOR, &[Scheduler],   WRITES, ""),
    r(DB_SYNC, "GetLatestRoot",      READER,   &[Scheduler],   READS,  ""),
    r(DB_SYNC, "GetSnapshot",        READER,   NONE,           READS,  ""),
    r(DB_SYNC, "ListSnapshots",      READER,   NONE,           READS,  ""),
    r(DB_SYNC, "ListSources",        READER,   NONE,           READS,  ""),
    r(DB_SYNC, "ListDirectory",      READER,   &[TreeBuilder], READS,  ""),
    r(DB_SYNC, "DiffSnapshots",      READER,   NONE,           READS,  ""),
    r(DB_SYNC, "GetInclusionProof",  READER,   NONE,           READS,  ""),
    r(DB_SYNC, "GetDrift",           READER,   NONE,           READS,  ""),
    r(DB_SYNC, "GetChangeActivity",  READER,   NONE,           READS,  ""),
    r(DB_SYNC, "WarmCache",          OPERATOR, &[Cache],       READS,  ""),
    r(DB_SYNC, "GetHistoryProof",    READER,   NONE,           READS,  ""),
    r(DB_SYNC, "GetLogCheckpoint",       READER, NONE, READS, ""),
    r(DB_SYNC, "GetLogInclusionProof",   READER, NONE, READS, ""),
    r(DB_SYNC, "GetLogConsistencyProof", READER, NONE, READS, ""),
    r(DB_SYNC, "GetLogTile",             READER, NONE, READS, "the same read-only resources LOG_LISTEN_ADDR serves without credentials, when set"),
    r(DB_SYNC, "GetRetentionPolicy", READER,   NONE,           READS,  ""),
    r(DB_SYNC, "SetRetentionPolicy", ADMIN,    &[Scheduler],   WRITES, "the Scheduler passes on the policy an admin set on the source"),

    r(CACHE, "Get",               READER,   WRITERS, READS,  ""),
    r(CACHE, "GetMany",           READER,   WRITERS, READS,  ""),
    r(CACHE, "Set",               NO_HUMAN, WRITERS, WRITES, "only into the namespaces the service owns"),
    r(CACHE, "SetMany",           NO_HUMAN, WRITERS, WRITES, "only into the namespaces the service owns"),
    r(CACHE, "Delete",            ADMIN,    WRITERS, WRITES, "a service only in the namespaces it owns"),
    r(CACHE, "InvalidatePattern", ADMIN,    WRITERS, WRITES, "a service only in the namespaces it owns"),
    r(CACHE, "Clear",             ADMIN,    WRITERS, WRITES, "a service only one namespace it owns"),
    r(CACHE, "Warmup",            OPERATOR, NONE,    WRITES, ""),
    r(CACHE, "GetStats",          READER,   NONE,    READS,  ""),
    r(CACHE, "GetStatus",         READER,   NONE,    READS,  ""),
    r(CACHE, "WatchLatestRoots",  NO_HUMAN, &[DbSync], READS, "its acknowledgements hold back writes of latest roots"),

    r(DISCOVERY, "ListClients",  READER, &[Scheduler], READS, ""),
    r(DISCOVERY, "GetClient",    READER, &[Scheduler], READS, ""),
    r(DISCOVERY, "WatchClients", READER, &[Scheduler], READS, ""),
];

/// The rule of `path` (`/package.Service/Method`), when it is an RPC of the contract.
pub fn rule_of(path: &str) -> Option<&'static Rule> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    RULES
        .iter()
        .find(|r| r.service == service && r.method == method)
}

/// The policy as the Markdown table docs/security.md shows (a test keeps the two equal).
pub fn markdown_table() -> String {
    let mut out = String::from(
        "| service | RPC | least role | services | logged | also |\n|---|---|---|---|---|---|\n",
    );
    for rule in RULES {
        let short = rule.service.rsplit('.').next().unwrap_or(rule.service);
        let role = rule.role.map_or("none (services only)", Role::name);
        let services = if rule.services.is_empty() {
            "-".to_owned()
        } else {
            rule.services
                .iter()
                .map(|s| s.name())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let logged = if rule.mutating { "yes" } else { "" };
        out.push_str(&format!(
            "| {short} | `{}` | {role} | {services} | {logged} | {} |\n",
            rule.method, rule.also
        ));
    }
    out
}

/// True for the calls anyone may make: gRPC health and reflection.
pub fn is_open(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/")
        || path.starts_with("/grpc.reflection.v1.ServerReflection/")
        || path.starts_with("/grpc.reflection.v1alpha.ServerReflection/")
}

/// The service that owns (alone writes) a cache namespace, by the namespace's number in
/// `merkle.cache.v1.Namespace`.
pub fn namespace_owner(namespace: merkle_proto::cache::v1::Namespace) -> Option<ServiceRole> {
    use merkle_proto::cache::v1::Namespace as N;
    match namespace {
        N::LatestRoot | N::TreeMeta => Some(DbSync),
        N::BuildStatus => Some(Scheduler),
        N::DiscoveryList | N::DiscoveryNode => Some(Discovery),
        N::Unspecified => None,
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    /// Every method of every `merkle.*` service in the compiled contract.
    fn contract_rpcs() -> Vec<String> {
        let set = prost_types::FileDescriptorSet::decode(merkle_proto::FILE_DESCRIPTOR_SET)
            .expect("the contract's descriptors");
        let mut rpcs = Vec::new();
        for file in set.file {
            let package = file.package().to_owned();
            if !package.starts_with("merkle.") {
                continue;
            }
            for service in &file.service {
                for method in &service.method {
                    rpcs.push(format!("/{package}.{}/{}", service.name(), method.name()));
                }
            }
        }
        rpcs
    }

    #[test]
    fn every_rpc_of_the_contract_has_exactly_one_rule() {
        let rpcs = contract_rpcs();
        assert_eq!(rpcs.len(), 46, "the contract's RPCs: {rpcs:?}");
        for rpc in &rpcs {
            let rows = RULES.iter().filter(|r| &r.path() == rpc).count();
            assert_eq!(rows, 1, "{rpc} has {rows} rules");
        }
        for rule in RULES {
            assert!(rpcs.contains(&rule.path()), "{} is no RPC", rule.path());
        }
    }

    #[test]
    fn what_destroys_or_hides_history_needs_admin_and_cache_writes_need_a_service() {
        for (path, role) in [
            (
                "/merkle.scheduler.v1.SchedulerService/DeleteSource",
                Some(Role::Admin),
            ),
            (
                "/merkle.dbsync.v1.DbSyncService/SetRetentionPolicy",
                Some(Role::Admin),
            ),
            ("/merkle.cache.v1.CacheService/Clear", Some(Role::Admin)),
            ("/merkle.cache.v1.CacheService/Set", None),
            ("/merkle.cache.v1.CacheService/SetMany", None),
            (
                "/merkle.scheduler.v1.SchedulerService/UpdateSource",
                Some(Role::Operator),
            ),
            (
                "/merkle.dbsync.v1.DbSyncService/GetHistoryProof",
                Some(Role::Reader),
            ),
        ] {
            let rule = rule_of(path).expect("a rule");
            assert_eq!(rule.role, role, "{path}");
        }
        assert!(rule_of("/merkle.cache.v1.CacheService/Set").is_some_and(|r| r.mutating));
        assert!(rule_of("/nope/Nope").is_none());
    }

    #[test]
    fn every_rule_lets_someone_call() {
        for rule in RULES {
            assert!(
                rule.role.is_some() || !rule.services.is_empty(),
                "{} is callable by nobody",
                rule.path()
            );
        }
    }

    #[test]
    fn the_docs_show_this_table() {
        let docs =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/security.md"))
                .expect("docs/security.md");
        let table = markdown_table();
        assert!(
            docs.contains(&table),
            "docs/security.md must hold the policy table as the code has it:\n{table}"
        );
    }

    #[test]
    fn health_and_reflection_are_open_and_nothing_else_is() {
        assert!(is_open("/grpc.health.v1.Health/Check"));
        assert!(is_open(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        ));
        assert!(!is_open("/merkle.cache.v1.CacheService/Get"));
        assert!(!is_open("/grpc.health.v1.HealthX/Check"));
    }
}
