//! Discovery's configuration. The orchestrators' own variables are read under their own names
//! (`NOMAD_ADDR`, `NOMAD_TOKEN`, ..., `KUBECONFIG`), so a deployment sets them once for every
//! tool.

use std::{path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};
use merkle_shared::{
    cache::CacheArgs,
    config::{CommonArgs, ConfigError, Validate, parse_duration},
    service::ServiceConfig,
};

/// Where the fleet's nodes are listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// A YAML or JSON file (STATIC_FILE), re-read when it changes.
    Static,
    /// Nomad's HTTP API (NOMAD_ADDR and the other NOMAD_* variables).
    Nomad,
    /// The Kubernetes API (in-cluster, or KUBECONFIG).
    Kubernetes,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Static => "static",
            BackendKind::Nomad => "nomad",
            BackendKind::Kubernetes => "kubernetes",
        }
    }
}

/// Which Kubernetes objects are the fleet's clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KubernetesResource {
    /// The cluster's nodes (the kubelet's address; TreeBuilder on the node's IP).
    Nodes,
    /// Pods selected by KUBERNETES_LABEL_SELECTOR, e.g. TreeBuilder's DaemonSet; a client's
    /// id is the node the pod runs on, so its snapshots outlive the pod.
    Pods,
}

/// Nomad's settings, under the names Nomad's own CLI reads.
#[derive(Debug, Clone, clap::Args)]
pub struct NomadArgs {
    /// Nomad's HTTP API.
    #[arg(long, env = "NOMAD_ADDR", default_value = "http://127.0.0.1:4646")]
    pub nomad_addr: String,
    /// An ACL token, sent as `X-Nomad-Token`.
    #[arg(long, env = "NOMAD_TOKEN", hide_env_values = true)]
    pub nomad_token: Option<String>,
    /// The region asked (`?region=`); unset: the agent's own.
    #[arg(long, env = "NOMAD_REGION")]
    pub nomad_region: Option<String>,
    /// The namespace sent with each request (`?namespace=`); nodes themselves belong to none.
    #[arg(long, env = "NOMAD_NAMESPACE")]
    pub nomad_namespace: Option<String>,
    /// A PEM file of the CA that signed Nomad's certificate.
    #[arg(long, env = "NOMAD_CACERT")]
    pub nomad_cacert: Option<PathBuf>,
    /// A PEM client certificate for mutual TLS (with NOMAD_CLIENT_KEY).
    #[arg(long, env = "NOMAD_CLIENT_CERT")]
    pub nomad_client_cert: Option<PathBuf>,
    /// The PEM key of NOMAD_CLIENT_CERT.
    #[arg(long, env = "NOMAD_CLIENT_KEY")]
    pub nomad_client_key: Option<PathBuf>,
    /// Accept any server certificate (testing only).
    #[arg(long, env = "NOMAD_SKIP_VERIFY", default_value_t = false)]
    pub nomad_skip_verify: bool,
}

/// Kubernetes' settings (the cluster itself comes from the pod's service account, or
/// KUBECONFIG and its current context).
#[derive(Debug, Clone, clap::Args)]
pub struct KubernetesArgs {
    /// The objects listed.
    #[arg(long, env = "KUBERNETES_RESOURCE", value_enum, default_value = "nodes")]
    pub kubernetes_resource: KubernetesResource,
    /// A label selector, e.g. `app.kubernetes.io/name=merkle-tree-builder`.
    #[arg(long, env = "KUBERNETES_LABEL_SELECTOR", default_value = "")]
    pub kubernetes_label_selector: String,
    /// The namespace of the pods (KUBERNETES_RESOURCE=pods); unset: the configuration's
    /// default namespace.
    #[arg(long, env = "KUBERNETES_NAMESPACE")]
    pub kubernetes_namespace: Option<String>,
}

/// Discovery's settings, from flags or environment variables.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "merkle-discovery",
    version,
    about = "Merkle Mesh Discovery: the fleet client nodes"
)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// Where the fleet's nodes are listed.
    #[arg(long, env = "DISCOVERY_BACKEND", value_enum, default_value = "static")]
    pub backend: BackendKind,
    /// The static backend's file (YAML, or JSON when it ends in `.json`); unset: an empty
    /// fleet.
    #[arg(long, env = "STATIC_FILE")]
    pub static_file: Option<PathBuf>,
    #[command(flatten)]
    pub nomad: NomadArgs,
    #[command(flatten)]
    pub kubernetes: KubernetesArgs,
    /// How long a list read from the backend is answered without reading it again.
    #[arg(long, env = "LIST_TTL", default_value = "60s", value_parser = parse_duration)]
    pub list_ttl: Duration,
    /// How long a node's details are reused while its version is unchanged.
    #[arg(long, env = "NODE_TTL", default_value = "5m", value_parser = parse_duration)]
    pub node_ttl: Duration,
    /// Deadline of one backend call.
    #[arg(long, env = "BACKEND_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub backend_timeout: Duration,
    /// Node detail fetches in flight at once.
    #[arg(long, env = "FETCH_CONCURRENCY", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub fetch_concurrency: u32,
    /// Nodes per page of the backend's node list (Nomad `per_page`, Kubernetes `limit`).
    #[arg(long, env = "PAGE_SIZE", default_value_t = 500,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub page_size: u32,
    /// How long one wait for a backend change lasts (a Nomad blocking query's `wait`, a
    /// Kubernetes watch's timeout) before it is asked again.
    #[arg(long, env = "WATCH_WAIT", default_value = "60s", value_parser = parse_duration)]
    pub watch_wait: Duration,
    /// TreeBuilder's port on each node, for nodes without `merkle_tree_builder` metadata.
    #[arg(long, env = "TREE_BUILDER_PORT", default_value_t = merkle_shared::ports::TREE_BUILDER)]
    pub tree_builder_port: u16,
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        // The backend's own settings are not checked here: a backend that is misconfigured
        // or unreachable leaves Discovery running, NOT_SERVING, naming the setting in its log
        // until it answers (see `backend::Backend::connect`).
        self.cache.validate()?;
        for (variable, value, least) in [
            (
                "LIST_TTL (--list-ttl)",
                self.list_ttl,
                Duration::from_secs(1),
            ),
            (
                "NODE_TTL (--node-ttl)",
                self.node_ttl,
                Duration::from_secs(1),
            ),
            (
                "BACKEND_TIMEOUT (--backend-timeout)",
                self.backend_timeout,
                Duration::from_millis(10),
            ),
            (
                "WATCH_WAIT (--watch-wait)",
                self.watch_wait,
                Duration::from_secs(1),
            ),
        ] {
            if value < least {
                return Err(ConfigError::new(
                    variable,
                    format!("must be at least {}", humantime::format_duration(least)),
                ));
            }
        }
        if self.tree_builder_port == 0 {
            return Err(ConfigError::new(
                "TREE_BUILDER_PORT (--tree-builder-port)",
                "must be a port number from 1 to 65535",
            ));
        }
        Ok(())
    }
}

impl ServiceConfig for Config {
    fn common(&self) -> &CommonArgs {
        &self.common
    }
}
