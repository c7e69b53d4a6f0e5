//! `merklectl`, the Merkle Mesh command line, as a library: the integration tests reuse
//! [`stack`] to start real PostgreSQL, Redis and service processes the same way `merklectl up`
//! does.

pub mod bundle;
pub mod cache;
pub mod check;
pub mod clients;
pub mod console;
pub mod credentials;
pub mod drift;
pub mod history;
pub mod local;
pub mod log;
pub mod remote;
pub mod sources;
pub mod stack;
pub mod stored;
pub mod supervise;
pub mod traces;
pub mod up;
pub mod watch;

/// A source name for a directory: its last component, lowercased, every character outside
/// `a-z 0-9 - _ .` turned into `-`.
pub fn registry_name(dir: &std::path::Path) -> String {
    let base = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_else(|| "root".into());
    let name: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(128)
        .collect();
    if name.is_empty() { "root".into() } else { name }
}
