//! Names that several services check the same way.

use std::fmt;

/// Longest source name (the part before a fleet node's `@`).
pub const MAX_SOURCE_NAME: usize = 128;
/// Longest node id after `@`.
pub const MAX_NODE_ID: usize = 253;

/// True for a node id: 1-253 characters of `A-Z a-z 0-9 - _ . :` (what fleet builds put after
/// the `@` of a source name).
pub fn is_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_NODE_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// Longest build id.
pub const MAX_BUILD_ID: usize = 256;

/// Checks a build id of a request (`required`: it must not be empty): at most 256 bytes, with
/// no control character (a NUL or a newline cannot be stored, logged or shown faithfully).
pub fn check_build_id(field: &str, id: &str, required: bool) -> Result<(), String> {
    if required && id.is_empty() {
        return Err(format!("{field}: must not be empty"));
    }
    if id.len() > MAX_BUILD_ID {
        return Err(format!(
            "{field}: is {} bytes; at most {MAX_BUILD_ID}",
            id.len()
        ));
    }
    if id.chars().any(char::is_control) {
        return Err(format!(
            "{field}: must not contain control characters (NUL, newline, ...)"
        ));
    }
    Ok(())
}

/// A source's name: 1-128 characters of `a-z 0-9 - _ .`, optionally followed by `@` and a
/// node id (1-253 characters of `A-Z a-z 0-9 - _ . :`), the form fleet builds store each
/// node's snapshots under (`docs@node-7`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceName(String);

impl SourceName {
    /// Parses the request field `field`; the error names the field and the rule.
    pub fn parse(field: &str, name: &str) -> Result<SourceName, String> {
        let (base, node) = match name.split_once('@') {
            Some((base, node)) => (base, Some(node)),
            None => (name, None),
        };
        let base_ok = !base.is_empty()
            && base.len() <= MAX_SOURCE_NAME
            && base
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
        if !base_ok {
            return Err(format!(
                "{field}: {name:?} is not a source name: 1-{MAX_SOURCE_NAME} characters of a-z, 0-9, -, _ and ., \
                 optionally followed by @ and a node id"
            ));
        }
        if let Some(node) = node
            && !is_node_id(node)
        {
            return Err(format!(
                "{field}: the node id after @ in {name:?} must be 1-{MAX_NODE_ID} characters of \
                 A-Z, a-z, 0-9, -, _, . and :"
            ));
        }
        Ok(SourceName(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SourceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_names_follow_the_contract_rule() {
        for good in [
            "docs",
            "a",
            "etc.d",
            "web_1-x",
            "docs@node-7",
            "docs@ip-10.0.0.1",
            "d@5f2c:9",
        ] {
            assert!(SourceName::parse("source", good).is_ok(), "{good}");
        }
        let long = "a".repeat(129);
        for bad in [
            "",
            "Docs",
            "a b",
            "a/b",
            "@node",
            "docs@",
            "docs@a b",
            "a@b@c",
            long.as_str(),
        ] {
            let err = SourceName::parse("source", bad).expect_err(bad);
            assert!(err.starts_with("source: "), "{err}");
        }
        assert!(SourceName::parse("source", &"a".repeat(128)).is_ok());
    }
}
