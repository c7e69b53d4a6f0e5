//! One setting's value: the error that names the setting and the rule it broke, and the
//! checks every service's settings share (durations, URL schemes, service addresses). Below
//! everything else in this crate, so the argument groups that live beside their subsystems
//! (`crate::tls`, `crate::auth`) use it without going through `crate::config`.

use std::time::Duration;

/// A configuration value that failed a rule checked after parsing.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {variable}: {rule}")]
pub struct ConfigError {
    /// The environment variable (and flag) at fault, e.g. `DATABASE_URL (--database-url)`.
    pub variable: String,
    /// The rule it broke, in words.
    pub rule: String,
}

impl ConfigError {
    pub fn new(variable: impl Into<String>, rule: impl Into<String>) -> Self {
        Self {
            variable: variable.into(),
            rule: rule.into(),
        }
    }
}

/// Parses a human duration such as `250ms`, `30s` or `5m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (use a duration such as 500ms, 30s, 5m)"))
}

/// Checks that `uri` is an `http://host:port` (or, with TLS, `https://host:port`) address of
/// another service.
pub fn require_service_uri(variable: &str, uri: &str) -> Result<(), ConfigError> {
    require_scheme(variable, uri, &["http", "https"])?;
    match uri.parse::<http::Uri>() {
        Ok(parsed) if parsed.host().is_some() => Ok(()),
        _ => Err(ConfigError::new(variable, "must be http://host:port")),
    }
}

/// Checks that a URL names one of the given schemes; returns the error naming `variable`.
pub fn require_scheme(variable: &str, url: &str, schemes: &[&str]) -> Result<(), ConfigError> {
    let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or("");
    if schemes.contains(&scheme) {
        Ok(())
    } else {
        Err(ConfigError::new(
            variable,
            format!(
                "must be a URL starting with {}",
                schemes
                    .iter()
                    .map(|s| format!("{s}://"))
                    .collect::<Vec<_>>()
                    .join(" or ")
            ),
        ))
    }
}

/// Replaces the password of a `scheme://user:password@host/...` URL with `***`, for logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map(|(u, _)| u).unwrap_or(userinfo);
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}{tail}")
            } else {
                format!("{scheme}://{userinfo}@{host}{tail}")
            }
        }
        None => url.to_owned(),
    }
}
