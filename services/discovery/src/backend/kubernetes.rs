//! The Kubernetes backend, through the `kube` client: in-cluster (the pod's service account) or
//! from KUBECONFIG and its current context.
//!
//! - Nodes (KUBERNETES_RESOURCE=nodes): the list asks for metadata only
//!   (`PartialObjectMetadataList`, page by page with `limit` and `continue`), whose
//!   `resourceVersion`s say which nodes changed; those are fetched in full.
//! - Pods (KUBERNETES_RESOURCE=pods): a pod is small, so the list carries every detail; a
//!   client's id is the node the pod runs on (stable across the pod's restarts).
//!
//! A watch from the list's `resourceVersion` says when to refresh; `410 Gone` (the version
//! is too old) means a fresh list, which the refresh makes anyway.

use std::{collections::BTreeMap, time::Duration};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api,
    api::{ListParams, WatchEvent, WatchParams},
};
use merkle_proto::discovery::v1::Client;

use super::{Listing, Stub, TREE_BUILDER_KEY, timestamp, tree_builder_address};
use crate::{
    config::{Config, KubernetesResource},
    error::BackendError,
};

pub struct Kubernetes {
    nodes: Api<Node>,
    pods: Api<Pod>,
    resource: KubernetesResource,
    selector: String,
    cluster: String,
    namespace: String,
    page_size: u32,
    port: u16,
    timeout: Duration,
    wait: Duration,
}

impl Kubernetes {
    pub async fn connect(config: &Config) -> Result<Self, BackendError> {
        let kube_config = tokio::time::timeout(config.backend_timeout, kube::Config::infer())
            .await
            .map_err(|_| {
                BackendError::Config(
                    "no Kubernetes configuration within BACKEND_TIMEOUT (in-cluster service \
                     account or KUBECONFIG)"
                        .into(),
                )
            })?
            .map_err(|e| {
                BackendError::Config(format!(
                    "no Kubernetes configuration (in-cluster service account or KUBECONFIG): {e}"
                ))
            })?;
        let cluster = kube_config.cluster_url.to_string();
        let namespace = config
            .kubernetes
            .kubernetes_namespace
            .clone()
            .unwrap_or_else(|| kube_config.default_namespace.clone());
        let client = kube::Client::try_from(kube_config).map_err(|e| {
            BackendError::Config(format!("the Kubernetes configuration (KUBECONFIG): {e}"))
        })?;
        Ok(Kubernetes {
            nodes: Api::all(client.clone()),
            pods: Api::namespaced(client, &namespace),
            resource: config.kubernetes.kubernetes_resource,
            selector: config.kubernetes.kubernetes_label_selector.clone(),
            cluster,
            namespace,
            page_size: config.page_size,
            port: config.tree_builder_port,
            timeout: config.backend_timeout,
            wait: config.watch_wait,
        })
    }

    pub fn identity(&self) -> String {
        match self.resource {
            KubernetesResource::Nodes => {
                format!("kubernetes:{}:nodes:{}", self.cluster, self.selector)
            }
            KubernetesResource::Pods => format!(
                "kubernetes:{}:pods:{}:{}",
                self.cluster, self.namespace, self.selector
            ),
        }
    }

    fn error(&self, what: &str, err: kube::Error) -> BackendError {
        let text = format!("Kubernetes API at {} ({what}): {err}", self.cluster);
        match &err {
            kube::Error::Api(status) => match status.code {
                401 | 403 => BackendError::Denied(text),
                404 => BackendError::Gone(text),
                _ => BackendError::BadAnswer(text),
            },
            kube::Error::SerdeError(_) => BackendError::BadAnswer(text),
            _ => BackendError::Unreachable(text),
        }
    }

    async fn timed<T>(
        &self,
        what: &str,
        call: impl std::future::Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, BackendError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result.map_err(|e| self.error(what, e)),
            Err(_) => Err(BackendError::Unreachable(format!(
                "Kubernetes API at {} ({what}): no answer within BACKEND_TIMEOUT",
                self.cluster
            ))),
        }
    }

    fn params(&self, continue_token: &str) -> ListParams {
        let mut params = ListParams::default().limit(self.page_size);
        if !self.selector.is_empty() {
            params = params.labels(&self.selector);
        }
        if !continue_token.is_empty() {
            params = params.continue_token(continue_token);
        }
        params
    }

    pub async fn list(&self) -> Result<Listing, BackendError> {
        let mut listing = Listing::default();
        let mut continue_token = String::new();
        loop {
            let params = self.params(&continue_token);
            let (index, next) = match self.resource {
                KubernetesResource::Nodes => {
                    let page = self
                        .timed("list nodes", self.nodes.list_metadata(&params))
                        .await?;
                    for node in page.items {
                        listing.stubs.push(Stub {
                            key: node.metadata.name.unwrap_or_default(),
                            version: node.metadata.resource_version.unwrap_or_default(),
                            detail: None,
                        });
                    }
                    (page.metadata.resource_version, page.metadata.continue_)
                }
                KubernetesResource::Pods => {
                    let page = self.timed("list pods", self.pods.list(&params)).await?;
                    for pod in &page.items {
                        if let Some(client) = self.pod_client(pod) {
                            // One client per node: a second pod on it (a rollout) is the
                            // newer, ready one when there is one.
                            if let Some(seen) =
                                listing.stubs.iter_mut().find(|s| s.key == client.id)
                            {
                                if client.ready || !seen.detail.as_ref().is_some_and(|c| c.ready) {
                                    seen.version = client.version.clone();
                                    seen.detail = Some(client);
                                }
                                continue;
                            }
                            listing.stubs.push(Stub {
                                key: client.id.clone(),
                                version: client.version.clone(),
                                detail: Some(client),
                            });
                        }
                    }
                    (page.metadata.resource_version, page.metadata.continue_)
                }
            };
            listing.calls += 1;
            if listing.index.is_empty() {
                listing.index = index.unwrap_or_default();
            }
            match next.filter(|t| !t.is_empty()) {
                Some(token) => continue_token = token,
                None => return Ok(listing),
            }
        }
    }

    pub async fn fetch(&self, name: &str) -> Result<Client, BackendError> {
        match self.resource {
            KubernetesResource::Nodes => {
                let node = self.timed("get node", self.nodes.get(name)).await?;
                Ok(self.node_client(&node))
            }
            KubernetesResource::Pods => Err(BackendError::Gone(format!(
                "{name}: no pod of the list runs there now"
            ))),
        }
    }

    pub async fn wait_change(&self, index: &str) -> Result<bool, BackendError> {
        let mut params = WatchParams::default().timeout(self.wait.as_secs().clamp(1, 3600) as u32);
        if !self.selector.is_empty() {
            params = params.labels(&self.selector);
        }
        // The server ends the watch after its timeout; the client waits a little longer.
        let deadline = self.wait + self.timeout;
        let outcome = tokio::time::timeout(deadline, async {
            match self.resource {
                KubernetesResource::Nodes => {
                    let events = self
                        .nodes
                        .watch_metadata(&params, index)
                        .await
                        .map_err(|e| self.error("watch nodes", e))?;
                    self.first_change(events.boxed()).await
                }
                KubernetesResource::Pods => {
                    let events = self
                        .pods
                        .watch_metadata(&params, index)
                        .await
                        .map_err(|e| self.error("watch pods", e))?;
                    self.first_change(events.boxed()).await
                }
            }
        })
        .await;
        outcome.unwrap_or(Ok(false))
    }

    /// True at the first event that changes the list (or says the version is too old).
    async fn first_change<T>(
        &self,
        mut events: futures::stream::BoxStream<'_, Result<WatchEvent<T>, kube::Error>>,
    ) -> Result<bool, BackendError> {
        while let Some(event) = events.next().await {
            match event.map_err(|e| self.error("watch", e))? {
                WatchEvent::Added(_) | WatchEvent::Modified(_) | WatchEvent::Deleted(_) => {
                    return Ok(true);
                }
                WatchEvent::Bookmark(_) => {}
                WatchEvent::Error(status) if status.code == 410 => return Ok(true),
                WatchEvent::Error(status) => {
                    return Err(BackendError::BadAnswer(format!(
                        "Kubernetes API at {} (watch): {} {}",
                        self.cluster, status.code, status.message
                    )));
                }
            }
        }
        Ok(false)
    }

    fn node_client(&self, node: &Node) -> Client {
        let meta = &node.metadata;
        let status = node.status.as_ref();
        let addresses = status.and_then(|s| s.addresses.as_ref());
        let ip = ["InternalIP", "ExternalIP", "Hostname"]
            .iter()
            .find_map(|kind| {
                addresses?
                    .iter()
                    .find(|a| a.type_ == *kind)
                    .map(|a| a.address.clone())
            })
            .unwrap_or_default();
        let kubelet_port = status
            .and_then(|s| s.daemon_endpoints.as_ref())
            .and_then(|d| d.kubelet_endpoint.as_ref())
            .map_or(10250, |e| e.port);
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let labels = meta.labels.clone().unwrap_or_default();
        let name = meta.name.clone().unwrap_or_default();
        Client {
            tree_builder_address: tree_builder_address(&marked(meta), &ip, self.port),
            address: if ip.is_empty() {
                String::new()
            } else {
                format!("{ip}:{kubelet_port}")
            },
            datacenter: labels
                .get("topology.kubernetes.io/zone")
                .or_else(|| labels.get("topology.kubernetes.io/region"))
                .cloned()
                .unwrap_or_default(),
            status: if ready { "ready" } else { "not-ready" }.into(),
            ready,
            id: name.clone(),
            name,
            labels: labels.into_iter().collect(),
            version: meta.resource_version.clone().unwrap_or_default(),
            fetch_time: Some(timestamp(std::time::SystemTime::now())),
        }
    }

    /// A pod's client, unless it is not on a node yet.
    fn pod_client(&self, pod: &Pod) -> Option<Client> {
        let meta = &pod.metadata;
        let node = pod
            .spec
            .as_ref()?
            .node_name
            .clone()
            .filter(|n| !n.is_empty())?;
        let status = pod.status.as_ref();
        let ip = status.and_then(|s| s.pod_ip.clone()).unwrap_or_default();
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let tree_builder = tree_builder_address(&marked(meta), &ip, self.port);
        Some(Client {
            id: node,
            name: meta.name.clone().unwrap_or_default(),
            address: tree_builder.clone(),
            tree_builder_address: tree_builder,
            datacenter: String::new(),
            status: status
                .and_then(|s| s.phase.clone())
                .unwrap_or_default()
                .to_lowercase(),
            ready,
            labels: meta
                .labels
                .clone()
                .unwrap_or_default()
                .into_iter()
                .collect(),
            version: meta.resource_version.clone().unwrap_or_default(),
            fetch_time: Some(timestamp(std::time::SystemTime::now())),
        })
    }
}

/// The object's `merkle_tree_builder` annotation, or label.
fn marked(meta: &kube::api::ObjectMeta) -> BTreeMap<String, String> {
    let mut found = BTreeMap::new();
    for map in [&meta.labels, &meta.annotations].into_iter().flatten() {
        if let Some(address) = map.get(TREE_BUILDER_KEY) {
            found.insert(TREE_BUILDER_KEY.to_owned(), address.clone());
        }
    }
    found
}
