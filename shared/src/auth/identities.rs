//! The identities file (`AUTH_IDENTITIES_FILE`): who may call, by bearer token or by client
//! certificate, and as what. It holds no secret: a token appears only as its SHA-256, so the
//! file can be read by anyone who may read the deployment's config.
//!
//! ```yaml
//! identities:
//!   - name: alice                # who, as logs and history name the caller
//!     role: admin                # reader, operator, admin, or service:<name>
//!     token_sha256: 5e88...      # SHA-256 (hex) of the bearer token she sends
//!   - name: scheduler
//!     role: service:scheduler
//!     san: scheduler.merkle-mesh.svc   # or: a DNS or URI name of a client certificate
//! ```

use std::collections::HashMap;

use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::{Caller, Grant, Role, ServiceRole};

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    identities: Vec<Entry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    role: String,
    #[serde(default)]
    token_sha256: Option<String>,
    #[serde(default)]
    san: Option<String>,
}

/// The identities, ready to look callers up in.
#[derive(Debug, Default)]
pub struct Identities {
    by_token: HashMap<[u8; 32], Caller>,
    by_san: HashMap<String, Caller>,
}

/// A role as the file and the docs spell it.
pub fn parse_grant(text: &str) -> Result<Grant, String> {
    let grant = match text {
        "reader" => Grant::Role(Role::Reader),
        "operator" => Grant::Role(Role::Operator),
        "admin" => Grant::Role(Role::Admin),
        other => match other.strip_prefix("service:") {
            Some(service) => Grant::Service(ServiceRole::parse(service).ok_or_else(|| {
                format!(
                    "unknown service {service:?}; one of {}",
                    ServiceRole::ALL
                        .iter()
                        .map(|s| s.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?),
            None => {
                return Err(format!(
                    "unknown role {other:?}; one of reader, operator, admin, service:<name>"
                ));
            }
        },
    };
    Ok(grant)
}

/// The SHA-256 of a bearer token, as the file holds it.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Identities {
    /// Parses the file's text; the error names the entry and the rule.
    pub fn parse(text: &str) -> Result<Identities, String> {
        let file: File = serde_saphyr::from_str(text).map_err(|e| e.to_string())?;
        let mut identities = Identities::default();
        for (i, entry) in file.identities.into_iter().enumerate() {
            let at = format!("identities[{i}]");
            let name = entry.name.trim();
            if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
                return Err(format!(
                    "{at}.name: must be 1-128 characters without control characters"
                ));
            }
            let grant = parse_grant(&entry.role).map_err(|rule| format!("{at}.role: {rule}"))?;
            let caller = Caller::new(name, grant);
            match (entry.token_sha256, entry.san) {
                (Some(hash), None) => {
                    let bytes: [u8; 32] = hash.trim().to_ascii_lowercase().parse::<merkle_core::Digest>()
                        .map_err(|_| {
                            format!("{at}.token_sha256: must be 64 hex characters (sha256sum of the token)")
                        })?
                        .0;
                    if identities.by_token.insert(bytes, caller).is_some() {
                        return Err(format!("{at}.token_sha256: the same token is listed twice"));
                    }
                }
                (None, Some(san)) if !san.trim().is_empty() => {
                    if identities
                        .by_san
                        .insert(san.trim().to_owned(), caller)
                        .is_some()
                    {
                        return Err(format!("{at}.san: {san:?} is listed twice"));
                    }
                }
                _ => {
                    return Err(format!(
                        "{at}: needs exactly one of token_sha256 (a bearer token) or san (a client certificate's name)"
                    ));
                }
            }
        }
        Ok(identities)
    }

    /// The caller who sends `token`.
    pub fn by_token(&self, token: &str) -> Option<&Caller> {
        self.by_token.get(&token_hash(token))
    }

    /// The caller whose client certificate carries one of `names` (its DNS and URI SANs).
    pub fn by_san<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Option<&Caller> {
        names.into_iter().find_map(|n| self.by_san.get(n))
    }

    /// How many identities there are.
    pub fn len(&self) -> usize {
        self.by_token.len() + self.by_san.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash_hex(token: &str) -> String {
        merkle_core::digest::hex(&token_hash(token))
    }

    #[test]
    fn tokens_and_certificate_names_find_their_callers() {
        let text = format!(
            "identities:\n  - name: alice\n    role: admin\n    token_sha256: {}\n  - name: sched\n    role: service:scheduler\n    san: scheduler.example\n",
            hash_hex("s3cret")
        );
        let ids = Identities::parse(&text).expect("valid");
        assert_eq!(ids.len(), 2);
        let alice = ids.by_token("s3cret").expect("known token");
        assert_eq!(
            (&*alice.name, alice.grant),
            ("alice", Grant::Role(Role::Admin))
        );
        assert!(ids.by_token("S3cret").is_none());
        let sched = ids
            .by_san(["other", "scheduler.example"])
            .expect("known name");
        assert_eq!(sched.grant, Grant::Service(ServiceRole::Scheduler));
    }

    #[test]
    fn bad_entries_name_their_place() {
        for (text, expected) in [
            (
                "identities:\n  - name: a\n    role: root\n    san: x\n",
                "identities[0].role",
            ),
            (
                "identities:\n  - name: a\n    role: service:nope\n    san: x\n",
                "unknown service",
            ),
            (
                "identities:\n  - name: a\n    role: admin\n    token_sha256: abc\n",
                "64 hex",
            ),
            (
                "identities:\n  - name: a\n    role: admin\n",
                "exactly one of",
            ),
            (
                "identities:\n  - name: ''\n    role: admin\n    san: x\n",
                "identities[0].name",
            ),
            (
                "identities:\n  - name: a\n    role: admin\n    san: x\n    extra: 1\n",
                "extra",
            ),
        ] {
            let err = Identities::parse(text).expect_err(text);
            assert!(err.contains(expected), "{text}: {err}");
        }
    }

    #[test]
    fn a_token_listed_twice_is_refused() {
        let h = hash_hex("t");
        let text = format!(
            "identities:\n  - name: a\n    role: admin\n    token_sha256: {h}\n  - name: b\n    role: reader\n    token_sha256: {h}\n"
        );
        assert!(
            Identities::parse(&text)
                .expect_err("twice")
                .contains("twice")
        );
    }
}
