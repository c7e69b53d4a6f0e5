//! The Kubernetes API, the parts Discovery reads, shaped as a real API server answers:
//!
//! - `GET /api/v1/nodes`, `GET /api/v1/namespaces/{ns}/pods`: lists with `labelSelector`
//!   (`k=v`, `k!=v`, `k`), `limit` and `continue` paging, the list's `resourceVersion`, and
//!   metadata-only answers (`PartialObjectMetadataList`) when the Accept header asks for them;
//!   list items carry no `apiVersion`/`kind`, as the real server's do not;
//! - `GET /api/v1/nodes/{name}`: one object (404 `NotFound` Status otherwise);
//! - `?watch=true&resourceVersion=R&timeoutSeconds=T`: newline-delimited `ADDED`, `MODIFIED`,
//!   `DELETED` events after `R` until `T`; a `resourceVersion` older than the last
//!   [`KubernetesStandIn::compact`] gets the `ERROR` event with the `410 Expired` Status;
//! - a bearer token: a request without it gets `401 Unauthorized` (a Status object).

use parking_lot::Mutex;
use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    path::{Path as FsPath, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::{Value, json};

use crate::Server;

/// A node of the cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct KubeNode {
    pub name: String,
    /// Its InternalIP (a loopback address here).
    pub ip: String,
    pub ready: bool,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

impl KubeNode {
    /// A ready node `n` at a loopback address.
    pub fn numbered(n: usize) -> KubeNode {
        KubeNode {
            name: format!("node-{n}"),
            ip: crate::node_ip(n),
            ready: true,
            labels: BTreeMap::from([
                ("kubernetes.io/hostname".into(), format!("node-{n}")),
                (
                    "topology.kubernetes.io/zone".into(),
                    format!("zone-{}", n % 3),
                ),
            ]),
            annotations: BTreeMap::new(),
        }
    }
}

/// A pod (TreeBuilder's, say).
#[derive(Debug, Clone, PartialEq)]
pub struct KubePod {
    pub namespace: String,
    pub name: String,
    pub node_name: String,
    pub ip: String,
    pub ready: bool,
    pub labels: BTreeMap<String, String>,
}

/// Calls answered, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Calls {
    /// List pages.
    pub list: u64,
    /// Single objects.
    pub get: u64,
    /// Watches started.
    pub watch: u64,
    /// Watches answered `410 Gone` (their version was compacted away).
    pub gone: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Kind {
    Node,
    Pod,
}

/// One stored object: its kind, namespace, name and JSON (with its resourceVersion).
type Key = (Kind, String, String);

struct Event {
    rv: u64,
    kind: &'static str,
    key: Key,
    object: Value,
}

#[derive(Default)]
struct Store {
    objects: BTreeMap<Key, Value>,
    rv: u64,
    /// Watches may start from here on; older versions are 410 Gone.
    oldest: u64,
    history: Vec<Event>,
    token: Option<String>,
    unavailable: bool,
    latency: Duration,
}

struct Shared {
    store: Mutex<Store>,
    changed: tokio::sync::watch::Sender<u64>,
    list: AtomicU64,
    get: AtomicU64,
    watch: AtomicU64,
    gone: AtomicU64,
}

impl Shared {
    fn store(&self) -> parking_lot::MutexGuard<'_, Store> {
        self.store.lock()
    }

    fn put(&self, key: Key, mut object: Value) {
        let mut store = self.store();
        let unchanged = store.objects.get(&key).is_some_and(|old| {
            let mut old = old.clone();
            old["metadata"]["resourceVersion"] = Value::Null;
            old == object
        });
        if unchanged {
            return;
        }
        store.rv += 1;
        let rv = store.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let kind = if store.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        store.objects.insert(key.clone(), object.clone());
        store.history.push(Event {
            rv,
            kind,
            key,
            object,
        });
        self.changed.send_replace(rv);
    }
}

/// A Kubernetes API server on a loopback port; stops when dropped.
pub struct KubernetesStandIn {
    addr: std::net::SocketAddr,
    shared: Arc<Shared>,
    _server: Server,
}

impl KubernetesStandIn {
    pub async fn start() -> std::io::Result<KubernetesStandIn> {
        let shared = Arc::new(Shared {
            store: Mutex::new(Store {
                rv: 100,
                oldest: 100,
                ..Store::default()
            }),
            changed: tokio::sync::watch::channel(100).0,
            list: AtomicU64::new(0),
            get: AtomicU64::new(0),
            watch: AtomicU64::new(0),
            gone: AtomicU64::new(0),
        });
        let router = Router::new()
            .route("/api/v1/nodes", get(list_nodes))
            .route("/api/v1/nodes/{name}", get(get_node))
            .route("/api/v1/namespaces/{namespace}/pods", get(list_pods))
            .with_state(shared.clone());
        let (addr, server) = crate::serve(router, 0).await?;
        Ok(KubernetesStandIn {
            addr,
            shared,
            _server: server,
        })
    }

    /// The API server's URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig for this server (with the token, if any, and `namespace` as the
    /// context's default) into `dir`, for `KUBECONFIG`.
    pub fn write_kubeconfig(
        &self,
        dir: &FsPath,
        token: Option<&str>,
        namespace: &str,
    ) -> std::io::Result<PathBuf> {
        let path = dir.join("kubeconfig");
        let user = match token {
            Some(token) => format!("    token: {token}\n"),
            None => "    {}\n".to_owned(),
        };
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: {}\ncontexts:\n- name: stand-in\n  context:\n    cluster: stand-in\n    user: stand-in\n    namespace: {namespace}\ncurrent-context: stand-in\nusers:\n- name: stand-in\n  user:\n{user}",
                self.url()
            ),
        )?;
        Ok(path)
    }

    fn store(&self) -> parking_lot::MutexGuard<'_, Store> {
        self.shared.store()
    }

    fn put(&self, key: Key, object: Value) {
        self.shared.put(key, object);
    }

    /// Changes `percent` of the nodes every `per` (one step each sixtieth of it), as a live
    /// cluster's nodes change: each change sets the node's `merkle-mesh/churn` label, a
    /// MODIFIED event with a new resourceVersion. `churn(1.0, Duration::from_secs(60))` is 1%
    /// per minute.
    pub fn churn(&self, percent: f64, per: Duration) -> crate::Churn {
        let (counted, changed) = (self.shared.clone(), self.shared.clone());
        let nodes = |store: &Store| -> Vec<Key> {
            store
                .objects
                .keys()
                .filter(|(kind, _, _)| *kind == Kind::Node)
                .cloned()
                .collect()
        };
        crate::Churn::start(
            percent,
            per,
            move || nodes(&counted.store()).len(),
            move |k| {
                let found = {
                    let store = changed.store();
                    let keys = nodes(&store);
                    keys.get(k % keys.len().max(1))
                        .and_then(|key| Some((key.clone(), store.objects.get(key)?.clone())))
                };
                if let Some((key, mut object)) = found {
                    object["metadata"]["labels"]["merkle-mesh/churn"] = json!(k.to_string());
                    object["metadata"]["resourceVersion"] = Value::Null;
                    changed.put(key, object);
                }
            },
        )
    }

    fn delete(&self, key: Key) -> bool {
        let mut store = self.store();
        let Some(mut object) = store.objects.remove(&key) else {
            return false;
        };
        store.rv += 1;
        let rv = store.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        store.history.push(Event {
            rv,
            kind: "DELETED",
            key,
            object,
        });
        self.shared.changed.send_replace(rv);
        true
    }

    /// Adds or replaces a node (a new resourceVersion only when it changed).
    pub fn upsert_node(&self, node: &KubeNode) {
        let object = json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": node.name,
                "uid": format!("00000000-0000-4000-8000-{:012x}", fnv(&node.name)),
                "creationTimestamp": "2026-11-01T00:00:00Z",
                "labels": node.labels,
                "annotations": node.annotations,
                "resourceVersion": null,
            },
            "spec": {"podCIDR": "10.244.0.0/24"},
            "status": {
                "addresses": [
                    {"type": "InternalIP", "address": node.ip},
                    {"type": "Hostname", "address": node.name},
                ],
                "conditions": [{
                    "type": "Ready",
                    "status": if node.ready { "True" } else { "False" },
                    "reason": if node.ready { "KubeletReady" } else { "KubeletNotReady" },
                    "message": "",
                    "lastHeartbeatTime": "2026-11-01T00:00:00Z",
                    "lastTransitionTime": "2026-11-01T00:00:00Z",
                }],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
                "nodeInfo": {
                    "architecture": "amd64",
                    "bootID": "b",
                    "containerRuntimeVersion": "containerd://1.7.0",
                    "kernelVersion": "6.1.0",
                    "kubeProxyVersion": "v1.33.0",
                    "kubeletVersion": "v1.33.0",
                    "machineID": "m",
                    "operatingSystem": "linux",
                    "osImage": "Debian GNU/Linux 12 (bookworm)",
                    "systemUUID": "s",
                },
            },
        });
        self.put((Kind::Node, String::new(), node.name.clone()), object);
    }

    pub fn remove_node(&self, name: &str) -> bool {
        self.delete((Kind::Node, String::new(), name.to_owned()))
    }

    /// Adds or replaces a pod.
    pub fn upsert_pod(&self, pod: &KubePod) {
        let object = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod.name,
                "namespace": pod.namespace,
                "uid": format!("00000000-0000-4000-9000-{:012x}", fnv(&pod.name)),
                "creationTimestamp": "2026-11-01T00:00:00Z",
                "labels": pod.labels,
                "resourceVersion": null,
            },
            "spec": {
                "nodeName": pod.node_name,
                "containers": [{"name": "tree-builder", "image": "merkle-mesh:0.1.0"}],
            },
            "status": {
                "phase": "Running",
                "podIP": pod.ip,
                "conditions": [{"type": "Ready", "status": if pod.ready { "True" } else { "False" }}],
            },
        });
        self.put((Kind::Pod, pod.namespace.clone(), pod.name.clone()), object);
    }

    pub fn remove_pod(&self, namespace: &str, name: &str) -> bool {
        self.delete((Kind::Pod, namespace.to_owned(), name.to_owned()))
    }

    /// Advances the cluster's version past what clients have seen (in a real cluster, writes
    /// to other objects do) and forgets the event history, as etcd's compaction does: a watch
    /// from any version before now gets 410 Gone. Open watches carry on.
    pub fn compact(&self) {
        let mut store = self.store();
        store.rv += 10;
        store.oldest = store.rv;
        store.history.clear();
        self.shared.changed.send_replace(store.rv);
    }

    /// Requires this bearer token (`None`: any request is let in).
    pub fn set_token(&self, token: Option<&str>) {
        self.store().token = token.map(str::to_owned);
    }

    /// Answers every request 503 while set.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.store().unavailable = unavailable;
    }

    pub fn set_latency(&self, latency: Duration) {
        self.store().latency = latency;
    }

    pub fn calls(&self) -> Calls {
        Calls {
            list: self.shared.list.load(Ordering::SeqCst),
            get: self.shared.get.load(Ordering::SeqCst),
            watch: self.shared.watch.load(Ordering::SeqCst),
            gone: self.shared.gone.load(Ordering::SeqCst),
        }
    }

    pub fn reset_calls(&self) {
        self.shared.list.store(0, Ordering::SeqCst);
        self.shared.get.store(0, Ordering::SeqCst);
        self.shared.watch.store(0, Ordering::SeqCst);
        self.shared.gone.store(0, Ordering::SeqCst);
    }
}

/// A stable small hash for made-up uids.
fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3) & 0xffff_ffff_ffff
    })
}

/// A Status object, as the API server sends for errors.
fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    (
        code,
        axum::Json(json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code.as_u16(),
        })),
    )
        .into_response()
}

async fn admit(shared: &Shared, headers: &HeaderMap) -> Result<(), Response> {
    let (latency, unavailable, token) = {
        let store = shared.store.lock();
        (store.latency, store.unavailable, store.token.clone())
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if unavailable {
        return Err(status(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "the server is currently unable to handle the request",
        ));
    }
    if let Some(token) = token {
        let sent = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if sent != Some(token.as_str()) {
            return Err(status(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "Unauthorized",
            ));
        }
    }
    Ok(())
}

/// Whether the Accept header asks for metadata only.
fn wants_metadata(headers: &HeaderMap) -> bool {
    headers
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("as=PartialObjectMetadata"))
}

/// Whether `labels` match a selector of `k=v`, `k==v`, `k!=v` and `k` terms.
fn matches(selector: &str, labels: &Value) -> bool {
    selector
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .all(|term| {
            if let Some((k, v)) = term.split_once("!=") {
                labels.get(k.trim()).and_then(Value::as_str) != Some(v.trim())
            } else if let Some((k, v)) = term.split_once('=') {
                let v = v.trim_start_matches('=');
                labels.get(k.trim()).and_then(Value::as_str) == Some(v.trim())
            } else {
                labels.get(term).is_some()
            }
        })
}

fn metadata_only(object: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": object["metadata"],
    })
}

async fn list_nodes(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    list(shared, query, headers, Kind::Node, String::new()).await
}

async fn list_pods(
    State(shared): State<Arc<Shared>>,
    Path(namespace): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    list(shared, query, headers, Kind::Pod, namespace).await
}

async fn list(
    shared: Arc<Shared>,
    query: HashMap<String, String>,
    headers: HeaderMap,
    kind: Kind,
    namespace: String,
) -> Response {
    if let Err(refused) = admit(&shared, &headers).await {
        return refused;
    }
    let selector = query.get("labelSelector").cloned().unwrap_or_default();
    let metadata = wants_metadata(&headers);
    if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
        shared.watch.fetch_add(1, Ordering::SeqCst);
        return watch(shared, query, kind, namespace, selector, metadata);
    }
    shared.list.fetch_add(1, Ordering::SeqCst);
    let limit: usize = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|&l| l > 0)
        .unwrap_or(usize::MAX);
    let start = query.get("continue").cloned().unwrap_or_default();
    let store = shared.store.lock();
    let from = (kind, namespace.clone(), start);
    let mut items = Vec::new();
    let mut next = None;
    for ((k, ns, name), object) in store.objects.range(from..) {
        if *k != kind || *ns != namespace {
            break;
        }
        if !matches(&selector, &object["metadata"]["labels"]) {
            continue;
        }
        if items.len() == limit {
            next = Some(name.clone());
            break;
        }
        let mut item = if metadata {
            metadata_only(object)
        } else {
            object.clone()
        };
        // Items of a real list carry no type fields.
        if let Some(map) = item.as_object_mut() {
            map.remove("apiVersion");
            map.remove("kind");
        }
        items.push(item);
    }
    let (api_version, list_kind) = match (metadata, kind) {
        (true, _) => ("meta.k8s.io/v1", "PartialObjectMetadataList"),
        (false, Kind::Node) => ("v1", "NodeList"),
        (false, Kind::Pod) => ("v1", "PodList"),
    };
    let mut list_meta = json!({"resourceVersion": store.rv.to_string()});
    if let Some(next) = next {
        list_meta["continue"] = json!(next);
    }
    axum::Json(json!({
        "apiVersion": api_version,
        "kind": list_kind,
        "metadata": list_meta,
        "items": items,
    }))
    .into_response()
}

async fn get_node(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = admit(&shared, &headers).await {
        return refused;
    }
    shared.get.fetch_add(1, Ordering::SeqCst);
    let store = shared.store.lock();
    match store
        .objects
        .get(&(Kind::Node, String::new(), name.clone()))
    {
        Some(object) => axum::Json(object.clone()).into_response(),
        None => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("nodes \"{name}\" not found"),
        ),
    }
}

/// A watch: the events after `resourceVersion`, one JSON object per line, until the timeout.
fn watch(
    shared: Arc<Shared>,
    query: HashMap<String, String>,
    kind: Kind,
    namespace: String,
    selector: String,
    metadata: bool,
) -> Response {
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(64);
    let line = |value: Value| {
        let mut bytes = serde_json::to_vec(&value).unwrap_or_default();
        bytes.push(b'\n');
        Ok(Bytes::from(bytes))
    };
    tokio::spawn(async move {
        let until = tokio::time::Instant::now() + timeout;
        let mut at = from;
        let mut changed = shared.changed.subscribe();
        let mut first = true;
        loop {
            let events: Vec<Value> = {
                let store = shared.store.lock();
                let events = if first && at == 0 {
                    // resourceVersion 0 or none: every current object as ADDED, then changes.
                    store
                        .objects
                        .iter()
                        .filter(|((k, ns, _), o)| {
                            *k == kind
                                && *ns == namespace
                                && matches(&selector, &o["metadata"]["labels"])
                        })
                        .map(|(_, o)| {
                            let object = if metadata {
                                metadata_only(o)
                            } else {
                                o.clone()
                            };
                            json!({"type": "ADDED", "object": object})
                        })
                        .collect()
                } else {
                    if at < store.oldest {
                        let gone = json!({
                            "type": "ERROR",
                            "object": {
                                "kind": "Status",
                                "apiVersion": "v1",
                                "metadata": {},
                                "status": "Failure",
                                "message": format!("too old resource version: {at} ({})", store.oldest),
                                "reason": "Expired",
                                "code": 410,
                            },
                        });
                        shared.gone.fetch_add(1, Ordering::SeqCst);
                        let _ = tx.try_send(line(gone));
                        return;
                    }
                    store
                        .history
                        .iter()
                        .filter(|e| e.rv > at && e.key.0 == kind && e.key.1 == namespace)
                        .filter(|e| matches(&selector, &e.object["metadata"]["labels"]))
                        .map(|e| {
                            let object = if metadata {
                                metadata_only(&e.object)
                            } else {
                                e.object.clone()
                            };
                            json!({"type": e.kind, "object": object})
                        })
                        .collect()
                };
                at = store.rv;
                first = false;
                events
            };
            for event in events {
                if tx.send(line(event)).await.is_err() {
                    return;
                }
            }
            let seen = at;
            let wait = changed.wait_for(|rv| *rv > seen);
            if tokio::time::timeout_at(until, wait).await.is_err() {
                return;
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_selectors_match_like_the_api_server() {
        let labels = json!({"app": "tb", "tier": "x"});
        assert!(matches("", &labels));
        assert!(matches("app=tb", &labels));
        assert!(matches("app==tb,tier", &labels));
        assert!(matches("app!=other", &labels));
        assert!(!matches("app=other", &labels));
        assert!(!matches("missing", &labels));
    }
}
