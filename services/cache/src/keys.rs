//! The key layout in Redis, `<prefix>:v<schema version>:<namespace>:<key>`, and the checked
//! request values it is built from: a [`Namespace`], a key ([`check_key`]), a
//! pattern ([`check_pattern`]).
//!
//! The prefix lets several deployments share one Redis (Clear touches only its own); the schema
//! version lets a release change a value format without ever reading old bytes.

use std::time::Duration;

use merkle_proto::cache::v1 as pb;

use crate::error::Error;

/// The version of the key layout and value format; part of every key. Version 2: every value
/// is sealed by the service that wrote it (`merkle_shared::cache::seal`), so the unsealed
/// values of version 1 are never read (they would only be refused as forged).
pub const SCHEMA_VERSION: u32 = 2;
/// Longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 512;
/// Largest value, in bytes (before compression).
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;
/// Most keys or entries in one GetMany or SetMany.
pub const MAX_BATCH: usize = 1000;
/// Longest TTL a caller may ask for.
pub const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// A namespace of the cache; each has a default TTL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Namespace {
    LatestRoot,
    TreeMeta,
    BuildStatus,
    DiscoveryList,
    DiscoveryNode,
}

impl Namespace {
    pub const ALL: [Namespace; 5] = [
        Namespace::LatestRoot,
        Namespace::TreeMeta,
        Namespace::BuildStatus,
        Namespace::DiscoveryList,
        Namespace::DiscoveryNode,
    ];

    /// Parses the request field `field`; unset and unknown values are rejected.
    pub fn from_proto(field: &str, value: i32) -> Result<Self, Error> {
        match pb::Namespace::try_from(value) {
            Ok(pb::Namespace::LatestRoot) => Ok(Namespace::LatestRoot),
            Ok(pb::Namespace::TreeMeta) => Ok(Namespace::TreeMeta),
            Ok(pb::Namespace::BuildStatus) => Ok(Namespace::BuildStatus),
            Ok(pb::Namespace::DiscoveryList) => Ok(Namespace::DiscoveryList),
            Ok(pb::Namespace::DiscoveryNode) => Ok(Namespace::DiscoveryNode),
            Ok(pb::Namespace::Unspecified) => Err(Error::bad_request(
                field,
                "must be set to a namespace (NAMESPACE_LATEST_ROOT, NAMESPACE_TREE_META, ...)",
            )),
            Err(_) => Err(Error::bad_request(
                field,
                format!("{value} is not a known namespace"),
            )),
        }
    }

    pub fn to_proto(self) -> pb::Namespace {
        match self {
            Namespace::LatestRoot => pb::Namespace::LatestRoot,
            Namespace::TreeMeta => pb::Namespace::TreeMeta,
            Namespace::BuildStatus => pb::Namespace::BuildStatus,
            Namespace::DiscoveryList => pb::Namespace::DiscoveryList,
            Namespace::DiscoveryNode => pb::Namespace::DiscoveryNode,
        }
    }

    /// The namespace's segment in Redis keys.
    pub fn segment(self) -> &'static str {
        match self {
            Namespace::LatestRoot => "latest_root",
            Namespace::TreeMeta => "tree_meta",
            Namespace::BuildStatus => "build_status",
            Namespace::DiscoveryList => "discovery_list",
            Namespace::DiscoveryNode => "discovery_node",
        }
    }

    pub fn from_segment(segment: &str) -> Option<Self> {
        Namespace::ALL
            .into_iter()
            .find(|ns| ns.segment() == segment)
    }

    /// A dense index, for per-namespace tables.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A checked key: 1 to [`MAX_KEY_BYTES`] bytes, any characters (`*`, `?`, `[` and `:` are
/// stored as they are; only patterns interpret globs).
pub fn check_key<'a>(field: &str, key: &'a str) -> Result<&'a str, Error> {
    if key.is_empty() {
        return Err(Error::bad_request(field, "must not be empty"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(Error::bad_request(
            field,
            format!(
                "is {} bytes; at most {MAX_KEY_BYTES} are allowed",
                key.len()
            ),
        ));
    }
    Ok(key)
}

/// Checks a value's size.
pub fn check_value(field: &str, value: &[u8]) -> Result<(), Error> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(Error::bad_request(
            field,
            format!(
                "is {} bytes; at most {MAX_VALUE_BYTES} (1 MiB) are allowed",
                value.len()
            ),
        ));
    }
    Ok(())
}

/// Checks the number of keys or entries of a batch.
pub fn check_batch(field: &str, len: usize) -> Result<(), Error> {
    if len > MAX_BATCH {
        return Err(Error::bad_request(
            field,
            format!("has {len} items; at most {MAX_BATCH} are allowed"),
        ));
    }
    Ok(())
}

/// A requested TTL: `None` when unset or zero (the namespace's default applies).
pub fn check_ttl(
    field: &str,
    ttl: Option<&prost_types::Duration>,
) -> Result<Option<Duration>, Error> {
    let Some(ttl) = ttl else { return Ok(None) };
    let ttl = merkle_shared::convert::duration_from_proto(ttl, MAX_TTL, "365 days")
        .map_err(|rule| Error::bad_request(field, rule))?;
    Ok((!ttl.is_zero()).then_some(ttl))
}

/// A checked glob over keys, in Redis' MATCH syntax: `*`, `?`, `[set]` (with `^` and ranges)
/// and `\` escaping the next character. Empty patterns, unclosed sets and a trailing `\` are
/// rejected rather than left to Redis' lenient reading.
pub fn check_pattern<'a>(field: &str, pattern: &'a str) -> Result<&'a str, Error> {
    if pattern.is_empty() {
        return Err(Error::bad_request(
            field,
            "must not be empty (use * for every key)",
        ));
    }
    if pattern.len() > MAX_KEY_BYTES {
        return Err(Error::bad_request(
            field,
            format!("is over {MAX_KEY_BYTES} bytes"),
        ));
    }
    let bytes = pattern.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if i + 1 == bytes.len() => {
                return Err(Error::bad_request(
                    field,
                    "ends with an unfinished escape `\\`",
                ));
            }
            b'\\' => i += 2,
            b'[' => {
                // A set: `[`, an optional `^`, members, `]` (as in Redis, `]` always closes
                // it; `\` escapes a member); an empty set would match nothing.
                let start = i;
                i += 1;
                if bytes.get(i) == Some(&b'^') {
                    i += 1;
                }
                let first = i;
                loop {
                    match bytes.get(i) {
                        None => {
                            return Err(Error::bad_request(
                                field,
                                format!("the set opened at byte {start} has no closing `]`"),
                            ));
                        }
                        Some(b']') if i == first => {
                            return Err(Error::bad_request(
                                field,
                                format!("the set opened at byte {start} is empty"),
                            ));
                        }
                        Some(b']') => break,
                        Some(b'\\') => i += 2,
                        Some(_) => i += 1,
                    }
                }
                i += 1;
            }
            _ => i += 1,
        }
    }
    Ok(pattern)
}

/// Where this deployment's keys live in Redis.
#[derive(Debug, Clone)]
pub struct KeySpace {
    prefix: String,
}

impl KeySpace {
    /// `prefix` must already be checked ([`check_prefix`]).
    pub fn new(prefix: &str) -> Self {
        KeySpace {
            prefix: prefix.to_owned(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The Redis key of `key` in `ns`.
    pub fn key(&self, ns: Namespace, key: &str) -> String {
        format!("{}:v{SCHEMA_VERSION}:{}:{key}", self.prefix, ns.segment())
    }

    /// The MATCH pattern for keys of `ns` matching `glob`.
    pub fn pattern(&self, ns: Namespace, glob: &str) -> String {
        self.key(ns, glob)
    }

    /// The MATCH pattern of every key of this deployment, whatever its schema version.
    pub fn deployment_pattern(&self) -> String {
        format!("{}:*", self.prefix)
    }

    /// The channels and the set of holders of the latest-root notices (`notices`). The hash
    /// tag `{notices}` puts the three in one slot of a Redis Cluster, so that one pipeline
    /// reads the holders and publishes a notice (a cluster routes PUBLISH by its channel).
    pub fn channels(&self) -> crate::notices::Channels {
        let base = format!("{}:v{SCHEMA_VERSION}:{{notices}}", self.prefix);
        crate::notices::Channels {
            notices: format!("{base}:latest_root"),
            acks: format!("{base}:acks"),
            holders: format!("{base}:holders"),
        }
    }

    /// The namespace of one of this deployment's Redis keys of the current schema version.
    pub fn namespace_of(&self, redis_key: &[u8]) -> Option<Namespace> {
        let rest = redis_key.strip_prefix(self.prefix.as_bytes())?;
        let rest = rest.strip_prefix(format!(":v{SCHEMA_VERSION}:").as_bytes())?;
        let end = rest.iter().position(|&b| b == b':')?;
        Namespace::from_segment(std::str::from_utf8(&rest[..end]).ok()?)
    }
}

/// The rule for key prefixes: 1-64 characters of `A-Z a-z 0-9 _ . -`, so the prefix is never
/// read as a glob or a separator.
pub fn check_prefix(prefix: &str) -> Result<(), String> {
    let ok = !prefix.is_empty()
        && prefix.len() <= 64
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err("must be 1-64 characters of A-Z, a-z, 0-9, _, . and -".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_documented_layout() {
        let keys = KeySpace::new("merkle");
        assert_eq!(
            keys.key(Namespace::LatestRoot, "docs"),
            "merkle:v2:latest_root:docs"
        );
        assert_eq!(
            keys.key(Namespace::TreeMeta, "a:b*[c]?"),
            "merkle:v2:tree_meta:a:b*[c]?"
        );
        assert_eq!(keys.deployment_pattern(), "merkle:*");
        assert_eq!(
            keys.namespace_of(b"merkle:v2:discovery_node:n1:x"),
            Some(Namespace::DiscoveryNode)
        );
        assert_eq!(keys.namespace_of(b"merkle:v0:tree_meta:x"), None);
        assert_eq!(keys.namespace_of(b"merkle2:v1:tree_meta:x"), None);
    }

    #[test]
    fn every_namespace_round_trips() {
        for ns in Namespace::ALL {
            assert_eq!(
                Namespace::from_proto("namespace", ns.to_proto() as i32).expect("valid"),
                ns
            );
            assert_eq!(Namespace::from_segment(ns.segment()), Some(ns));
        }
        let unset = Namespace::from_proto("namespace", 0).expect_err("unset");
        assert!(
            unset.to_string().starts_with("namespace: must be set"),
            "{unset}"
        );
        let unknown = Namespace::from_proto("namespace", 42).expect_err("unknown");
        assert!(unknown.to_string().contains("42"), "{unknown}");
    }

    #[test]
    fn keys_values_and_batches_have_limits() {
        assert!(check_key("key", "").is_err());
        assert!(check_key("key", &"k".repeat(512)).is_ok());
        let long = check_key("key", &"k".repeat(513)).expect_err("too long");
        assert!(long.to_string().contains("at most 512"), "{long}");
        assert!(check_value("value", &vec![0; MAX_VALUE_BYTES]).is_ok());
        assert!(check_value("value", &vec![0; MAX_VALUE_BYTES + 1]).is_err());
        assert!(check_batch("keys", 1000).is_ok());
        assert!(check_batch("keys", 1001).is_err());
    }

    #[test]
    fn ttls_are_checked() {
        let d = |seconds, nanos| prost_types::Duration { seconds, nanos };
        assert_eq!(check_ttl("ttl", None).expect("unset"), None);
        assert_eq!(check_ttl("ttl", Some(&d(0, 0))).expect("zero"), None);
        assert_eq!(
            check_ttl("ttl", Some(&d(5, 0))).expect("5 s"),
            Some(Duration::from_secs(5))
        );
        assert!(check_ttl("ttl", Some(&d(-1, 0))).is_err());
        assert!(check_ttl("ttl", Some(&d(0, -5))).is_err());
        assert!(check_ttl("ttl", Some(&d(365 * 24 * 3600, 0))).is_ok());
        let long = check_ttl("ttl", Some(&d(365 * 24 * 3600 + 1, 0))).expect_err("over a year");
        assert_eq!(long.to_string(), "ttl: must be at most 365 days");
    }

    #[test]
    fn patterns_are_checked() {
        for good in [
            "*", "a*", "build-?", "[abc]*", "[^a-z]x", "a\\*b", "[\\]]", "]x",
        ] {
            assert!(check_pattern("pattern", good).is_ok(), "{good}");
        }
        for bad in ["", "a\\", "[abc", "x[", "[^", "a[\\]", "x[]y", "[^]"] {
            assert!(check_pattern("pattern", bad).is_err(), "{bad}");
        }
        let err = check_pattern("pattern", "ab[cd").expect_err("unclosed");
        assert!(err.to_string().contains("no closing `]`"), "{err}");
    }

    #[test]
    fn prefixes_are_checked() {
        assert!(check_prefix("merkle").is_ok());
        assert!(check_prefix("prod-eu.1_a").is_ok());
        for bad in ["", "a:b", "a*", "a b", &"p".repeat(65)] {
            assert!(check_prefix(bad).is_err(), "{bad}");
        }
    }
}
