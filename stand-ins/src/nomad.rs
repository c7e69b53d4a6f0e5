//! Nomad's HTTP API, the parts Discovery reads, as Nomad documents them:
//!
//! - `GET /v1/nodes`: node stubs sorted by ID, each with `CreateIndex` and `ModifyIndex`;
//!   `per_page` and `next_token` paging (the token is the ID the next page starts at, sent in
//!   `X-Nomad-NextToken`); `X-Nomad-Index` is the node table's index; a blocking query
//!   (`index`, `wait`, default 5 minutes) answers once that index passed `index`.
//! - `GET /v1/node/:id`: the node in full, 404 `node not found` for an unknown id.
//! - ACL: with a token set, a request without `X-Nomad-Token` equal to it gets
//!   `403 Permission denied`.

use parking_lot::Mutex;
use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    extract::{Path, Query, State},
    http::{HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::{Value, json};

use crate::{Server, parse_duration};

/// A Nomad client node.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub id: String,
    pub name: String,
    pub datacenter: String,
    /// `ready`, `down`, `initializing`, `disconnected`.
    pub status: String,
    /// The agent's HTTP address, `ip:4646`.
    pub http_addr: String,
    pub meta: BTreeMap<String, String>,
}

impl Node {
    /// A ready node `n` at a loopback address, with a UUID-shaped id.
    pub fn numbered(n: usize) -> Node {
        Node {
            id: format!("{n:08x}-0000-4000-8000-{n:012x}"),
            name: format!("client-{n}"),
            datacenter: format!("dc{}", n % 3 + 1),
            status: "ready".into(),
            http_addr: format!("{}:4646", crate::node_ip(n)),
            meta: BTreeMap::new(),
        }
    }
}

/// How the stand-in fails, when asked to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outage {
    /// Every request answers 500 with Nomad's leader error.
    ServerError,
    /// Every request answers 200 with a body that is not JSON (a proxy's error page).
    Garbage,
}

/// Calls answered, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Calls {
    /// `GET /v1/nodes` without `index` (one per page).
    pub list: u64,
    /// `GET /v1/node/:id`.
    pub detail: u64,
    /// `GET /v1/nodes` with `index` (blocking queries).
    pub blocking: u64,
}

#[derive(Default)]
struct Table {
    nodes: BTreeMap<String, (Node, u64, u64)>,
    index: u64,
    token: Option<String>,
    outage: Option<Outage>,
    latency: Duration,
}

struct Shared {
    table: Mutex<Table>,
    /// The table's index, for blocking queries.
    changed: tokio::sync::watch::Sender<u64>,
    list: AtomicU64,
    detail: AtomicU64,
    blocking: AtomicU64,
}

impl Shared {
    fn table(&self) -> parking_lot::MutexGuard<'_, Table> {
        self.table.lock()
    }

    fn bump(&self, table: &mut Table) -> u64 {
        table.index += 1;
        self.changed.send_replace(table.index);
        table.index
    }

    fn upsert(&self, node: Node) {
        let mut table = self.table();
        if table
            .nodes
            .get(&node.id)
            .is_some_and(|(n, _, _)| *n == node)
        {
            return;
        }
        let index = self.bump(&mut table);
        let create = table.nodes.get(&node.id).map_or(index, |(_, c, _)| *c);
        table.nodes.insert(node.id.clone(), (node, create, index));
    }
}

/// A Nomad API on a loopback port; stops when dropped.
pub struct NomadStandIn {
    addr: std::net::SocketAddr,
    tls: bool,
    shared: Arc<Shared>,
    _server: Server,
}

impl NomadStandIn {
    /// Starts on a free port.
    pub async fn start() -> std::io::Result<NomadStandIn> {
        Self::start_on(0).await
    }

    /// Starts on `port` (one a client was already told about).
    pub async fn start_on(port: u16) -> std::io::Result<NomadStandIn> {
        let (shared, router) = Self::parts();
        let (addr, server) = crate::serve(router, port).await?;
        Ok(NomadStandIn {
            addr,
            tls: false,
            shared,
            _server: server,
        })
    }

    /// Starts on a free port, serving HTTPS (`https://127.0.0.1:PORT`) with `tls`.
    pub async fn start_tls(tls: &crate::Tls) -> std::io::Result<NomadStandIn> {
        let (shared, router) = Self::parts();
        let (addr, server) = crate::serve_tls(router, tls).await?;
        Ok(NomadStandIn {
            addr,
            tls: true,
            shared,
            _server: server,
        })
    }

    fn parts() -> (Arc<Shared>, Router) {
        let shared = Arc::new(Shared {
            table: Mutex::new(Table {
                index: 1,
                ..Table::default()
            }),
            changed: tokio::sync::watch::channel(1).0,
            list: AtomicU64::new(0),
            detail: AtomicU64::new(0),
            blocking: AtomicU64::new(0),
        });
        let router = Router::new()
            .route("/v1/nodes", get(nodes))
            .route("/v1/node/{id}", get(node))
            .with_state(shared.clone());
        (shared, router)
    }

    /// The value for `NOMAD_ADDR`.
    pub fn addr(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    fn table(&self) -> parking_lot::MutexGuard<'_, Table> {
        self.shared.table()
    }

    /// Adds a node or replaces one with the same id; its `ModifyIndex` becomes the table's
    /// next index (unchanged when the node is the same).
    pub fn upsert(&self, node: Node) {
        self.shared.upsert(node);
    }

    /// Changes `percent` of the nodes every `per` (one step each sixtieth of it), as a live
    /// fleet's nodes change: each change sets the node's `merkle_churn` metadata, so its
    /// `ModifyIndex` moves. `churn(1.0, Duration::from_secs(60))` is 1% per minute.
    pub fn churn(&self, percent: f64, per: Duration) -> crate::Churn {
        let (counted, changed) = (self.shared.clone(), self.shared.clone());
        crate::Churn::start(
            percent,
            per,
            move || counted.table().nodes.len(),
            move |k| {
                let node = {
                    let table = changed.table();
                    let n = table.nodes.len().max(1);
                    table
                        .nodes
                        .values()
                        .nth(k % n)
                        .map(|(node, _, _)| node.clone())
                };
                if let Some(mut node) = node {
                    node.meta.insert("merkle_churn".into(), k.to_string());
                    changed.upsert(node);
                }
            },
        )
    }

    /// Removes a node; false when there was none.
    pub fn remove(&self, id: &str) -> bool {
        let mut table = self.table();
        let removed = table.nodes.remove(id).is_some();
        if removed {
            self.shared.bump(&mut table);
        }
        removed
    }

    /// Requires this ACL token (`None`: ACLs off).
    pub fn set_token(&self, token: Option<&str>) {
        self.table().token = token.map(str::to_owned);
    }

    pub fn set_outage(&self, outage: Option<Outage>) {
        self.table().outage = outage;
    }

    /// Added to every answer, as a remote agent's round trip would be.
    pub fn set_latency(&self, latency: Duration) {
        self.table().latency = latency;
    }

    pub fn calls(&self) -> Calls {
        Calls {
            list: self.shared.list.load(Ordering::SeqCst),
            detail: self.shared.detail.load(Ordering::SeqCst),
            blocking: self.shared.blocking.load(Ordering::SeqCst),
        }
    }

    pub fn reset_calls(&self) {
        self.shared.list.store(0, Ordering::SeqCst);
        self.shared.detail.store(0, Ordering::SeqCst);
        self.shared.blocking.store(0, Ordering::SeqCst);
    }
}

fn error(status: StatusCode, text: &str) -> Response {
    (status, text.to_owned()).into_response()
}

/// The checks every request passes first: the latency, the outage, the token.
async fn admit(shared: &Shared, headers: &HeaderMap) -> Result<(), Response> {
    let (latency, outage, token) = {
        let table = shared.table.lock();
        (table.latency, table.outage.clone(), table.token.clone())
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    match outage {
        Some(Outage::ServerError) => {
            return Err(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "rpc error: No cluster leader",
            ));
        }
        Some(Outage::Garbage) => {
            return Err((
                StatusCode::OK,
                "<html><body>502 Bad Gateway</body></html>".to_owned(),
            )
                .into_response());
        }
        None => {}
    }
    if let Some(token) = token {
        let sent = headers.get("X-Nomad-Token").and_then(|v| v.to_str().ok());
        if sent != Some(token.as_str()) {
            return Err(error(StatusCode::FORBIDDEN, "Permission denied"));
        }
    }
    Ok(())
}

fn with_index(index: u64, body: Value, next_token: Option<String>) -> Response {
    let mut response = axum::Json(body).into_response();
    let headers = response.headers_mut();
    headers.insert("X-Nomad-Index", HeaderValue::from(index));
    headers.insert("X-Nomad-KnownLeader", HeaderValue::from_static("true"));
    headers.insert("X-Nomad-LastContact", HeaderValue::from_static("0"));
    if let Some(token) = next_token
        && let Ok(value) = HeaderValue::from_str(&token)
    {
        headers.insert("X-Nomad-NextToken", value);
    }
    response
}

async fn nodes(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = admit(&shared, &headers).await {
        return refused;
    }
    if let Some(index) = query.get("index") {
        shared.blocking.fetch_add(1, Ordering::SeqCst);
        let Ok(index) = index.parse::<u64>() else {
            return error(StatusCode::BAD_REQUEST, "Invalid index");
        };
        let wait = query
            .get("wait")
            .and_then(|w| parse_duration(w))
            .unwrap_or(Duration::from_secs(300))
            .min(Duration::from_secs(600));
        let mut changed = shared.changed.subscribe();
        let _ = tokio::time::timeout(wait, changed.wait_for(|now| *now > index)).await;
    } else {
        shared.list.fetch_add(1, Ordering::SeqCst);
    }
    let per_page: usize = query
        .get("per_page")
        .and_then(|p| p.parse().ok())
        .filter(|&p| p > 0)
        .unwrap_or(usize::MAX);
    let start = query.get("next_token").cloned().unwrap_or_default();
    let table = shared.table.lock();
    let mut page: Vec<Value> = Vec::new();
    let mut next_token = None;
    for (id, (node, create, modify)) in table.nodes.range(start..) {
        if page.len() == per_page {
            next_token = Some(id.clone());
            break;
        }
        page.push(json!({
            "Address": node.http_addr.split(':').next().unwrap_or_default(),
            "ID": node.id,
            "Datacenter": node.datacenter,
            "Name": node.name,
            "NodeClass": "",
            "NodePool": "default",
            "Version": "1.9.7",
            "Drain": false,
            "SchedulingEligibility": "eligible",
            "Status": node.status,
            "StatusDescription": "",
            "Drivers": {},
            "LastDrain": null,
            "CreateIndex": create,
            "ModifyIndex": modify,
        }));
    }
    with_index(table.index, Value::Array(page), next_token)
}

async fn node(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = admit(&shared, &headers).await {
        return refused;
    }
    shared.detail.fetch_add(1, Ordering::SeqCst);
    let table = shared.table.lock();
    let Some((node, create, modify)) = table.nodes.get(&id) else {
        return error(StatusCode::NOT_FOUND, "node not found");
    };
    let ip = node.http_addr.split(':').next().unwrap_or_default();
    let body = json!({
        "ID": node.id,
        "SecretID": "",
        "Datacenter": node.datacenter,
        "Name": node.name,
        "HTTPAddr": node.http_addr,
        "TLSEnabled": false,
        "Attributes": {
            "unique.network.ip-address": ip,
            "kernel.name": "linux",
            "nomad.version": "1.9.7",
        },
        "Meta": node.meta,
        "NodeClass": "",
        "NodePool": "default",
        "Drain": false,
        "SchedulingEligibility": "eligible",
        "Status": node.status,
        "StatusDescription": "",
        "CreateIndex": create,
        "ModifyIndex": modify,
    });
    with_index(table.index, body, None)
}
