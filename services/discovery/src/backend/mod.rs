//! The orchestrators Discovery lists nodes from, behind one small interface: a cheap list of
//! every node's key and version (one call per page), a detail fetch of one node, and a wait
//! for the next change.

mod kubernetes;
mod nomad;
mod static_file;

use std::{collections::BTreeMap, time::SystemTime};

use tracing::Instrument as _;

use merkle_proto::discovery::v1::Client;

use crate::{
    config::{BackendKind, Config},
    error::BackendError,
};

/// The annotation, label or metadata key naming a node's TreeBuilder (`host:port`).
pub const TREE_BUILDER_KEY: &str = "merkle_tree_builder";

/// One node as the backend's list shows it.
#[derive(Debug, Clone)]
pub struct Stub {
    /// The node's key in the backend (Nomad node ID, Kubernetes object name, static id).
    pub key: String,
    /// Its version (Nomad ModifyIndex, Kubernetes resourceVersion, a static entry's hash).
    pub version: String,
    /// Its details when the list carries them (static file, Kubernetes pods); otherwise they
    /// are fetched with [`Backend::fetch`].
    pub detail: Option<Client>,
}

/// The backend's node list.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub stubs: Vec<Stub>,
    /// Where a wait for the next change starts (Nomad's index, Kubernetes' resourceVersion).
    pub index: String,
    /// Calls made (one per page).
    pub calls: u64,
}

/// A configured backend.
pub enum Backend {
    Static(static_file::StaticFile),
    Nomad(nomad::Nomad),
    // Boxed: the kube client is large, and the enum is made once.
    Kubernetes(Box<kubernetes::Kubernetes>),
}

impl Backend {
    /// The backend the configuration names; an error names the setting that is wrong.
    pub async fn connect(config: &Config) -> Result<Backend, BackendError> {
        Ok(match config.backend {
            BackendKind::Static => Backend::Static(static_file::StaticFile::new(config)),
            BackendKind::Nomad => Backend::Nomad(nomad::Nomad::new(config)?),
            BackendKind::Kubernetes => {
                Backend::Kubernetes(Box::new(kubernetes::Kubernetes::connect(config).await?))
            }
        })
    }

    /// What the backend reads, for cache keys: two Discoveries of different fleets never
    /// share entries.
    pub fn identity(&self) -> String {
        match self {
            Backend::Static(b) => b.identity(),
            Backend::Nomad(b) => b.identity(),
            Backend::Kubernetes(b) => b.identity(),
        }
    }

    /// Every node's key and version.
    pub async fn list(&self) -> Result<Listing, BackendError> {
        let listing = async {
            match self {
                Backend::Static(b) => b.list().await,
                Backend::Nomad(b) => b.list().await,
                Backend::Kubernetes(b) => b.list().await,
            }
        }
        .instrument(self.span("list"))
        .await;
        if let Ok(l) = &listing {
            self.count("list", l.calls);
        }
        listing
    }

    fn name(&self) -> &'static str {
        match self {
            Backend::Static(_) => "static",
            Backend::Nomad(_) => "nomad",
            Backend::Kubernetes(_) => "kubernetes",
        }
    }

    /// A client span for one backend operation.
    fn span(&self, operation: &'static str) -> tracing::Span {
        merkle_shared::telemetry::child_span(|| {
            tracing::info_span!(
                "discovery.backend",
                otel.name = %format!("{} {operation}", self.name()),
                otel.kind = "client",
                backend = self.name(),
                operation,
            )
        })
    }

    /// Counts calls to the orchestrator (`merkle.discovery.backend.calls`), by backend and
    /// kind: `list` (one per page), `detail`, `watch`.
    fn count(&self, kind: &'static str, calls: u64) {
        static CALLS: std::sync::OnceLock<opentelemetry::metrics::Counter<u64>> =
            std::sync::OnceLock::new();
        CALLS
            .get_or_init(|| {
                merkle_shared::metrics::counter(
                    "merkle.discovery.backend.calls",
                    "Calls Discovery made to its orchestrator, by backend and kind",
                )
            })
            .add(
                calls,
                &[
                    opentelemetry::KeyValue::new("backend", self.name()),
                    opentelemetry::KeyValue::new("kind", kind),
                ],
            );
    }

    /// One node's details; [`BackendError::Gone`] when it no longer exists.
    pub async fn fetch(&self, key: &str) -> Result<Client, BackendError> {
        match self {
            Backend::Static(_) => Err(BackendError::Gone(format!(
                "{key}: the static file lists it no more"
            ))),
            Backend::Nomad(b) => {
                self.count("detail", 1);
                b.fetch(key).instrument(self.span("detail")).await
            }
            Backend::Kubernetes(b) => {
                self.count("detail", 1);
                b.fetch(key).instrument(self.span("detail")).await
            }
        }
    }

    /// Waits until the node list may have changed since `index` (true), or for at most about
    /// WATCH_WAIT (false).
    pub async fn wait_change(&self, index: &str) -> Result<bool, BackendError> {
        if !matches!(self, Backend::Static(_)) {
            self.count("watch", 1);
        }
        match self {
            Backend::Static(b) => b.wait_change(index).await,
            Backend::Nomad(b) => b.wait_change(index).await,
            Backend::Kubernetes(b) => b.wait_change(index).await,
        }
    }
}

/// A node's TreeBuilder: its `merkle_tree_builder` metadata when set, else `host` with `port`.
pub fn tree_builder_address(metadata: &BTreeMap<String, String>, host: &str, port: u16) -> String {
    if let Some(address) = metadata.get(TREE_BUILDER_KEY).filter(|a| !a.is_empty()) {
        return address.clone();
    }
    if host.is_empty() {
        return String::new();
    }
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The host of `http://host:port`, `host:port` or `[v6]:port`.
pub fn host_of(address: &str) -> &str {
    let rest = address.split_once("://").map_or(address, |(_, r)| r);
    let rest = rest.split('/').next().unwrap_or(rest);
    if let Some(v6) = rest.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6);
    }
    match rest.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
        _ => rest,
    }
}

pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_builder_address_prefers_metadata_then_host_and_port() {
        let mut meta = BTreeMap::new();
        assert_eq!(
            tree_builder_address(&meta, "127.1.0.5", 50052),
            "127.1.0.5:50052"
        );
        assert_eq!(tree_builder_address(&meta, "::1", 50052), "[::1]:50052");
        assert_eq!(tree_builder_address(&meta, "", 50052), "");
        meta.insert(TREE_BUILDER_KEY.into(), "127.1.0.9:7000".into());
        assert_eq!(
            tree_builder_address(&meta, "127.1.0.5", 50052),
            "127.1.0.9:7000"
        );
    }

    #[test]
    fn host_of_strips_scheme_port_and_brackets() {
        assert_eq!(host_of("http://127.1.0.5:4646"), "127.1.0.5");
        assert_eq!(host_of("127.1.0.5:4646"), "127.1.0.5");
        assert_eq!(host_of("[::1]:4646"), "::1");
        assert_eq!(host_of("node-1"), "node-1");
        assert_eq!(host_of("https://nomad.example:4646/ui"), "nomad.example");
    }
}
