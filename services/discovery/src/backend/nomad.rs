//! The Nomad backend: Nomad's HTTP API, configured with Nomad's own variables.
//!
//! - `GET /v1/nodes?per_page=N&next_token=T`: the node stubs, each with its `ModifyIndex`,
//!   page by page (`X-Nomad-NextToken`);
//! - `GET /v1/node/:id`: one node in full (address, metadata);
//! - `GET /v1/nodes?index=I&wait=Ws`: a blocking query that returns once the node table's index
//!   passed `I` (`X-Nomad-Index`), or after `W`.

use std::{collections::BTreeMap, time::Duration};

use merkle_proto::discovery::v1::Client;
use reqwest::{StatusCode, header::HeaderMap};
use serde::Deserialize;

use super::{Listing, Stub, host_of, timestamp, tree_builder_address};
use crate::{
    config::Config,
    error::{BackendError, snippet},
};

/// Characters of a bad answer quoted in an error.
const SNIPPET: usize = 200;

pub struct Nomad {
    http: reqwest::Client,
    addr: String,
    token: Option<String>,
    region: Option<String>,
    namespace: Option<String>,
    page_size: u32,
    port: u16,
    timeout: Duration,
    wait: Duration,
}

/// A node as `GET /v1/nodes` lists it.
#[derive(Debug, Deserialize)]
struct NodeStub {
    #[serde(rename = "ID")]
    id: String,
    #[serde(rename = "ModifyIndex")]
    modify_index: u64,
}

/// A node as `GET /v1/node/:id` shows it (the fields Discovery uses).
#[derive(Debug, Deserialize)]
struct Node {
    #[serde(rename = "ID")]
    id: String,
    #[serde(rename = "Name", default)]
    name: String,
    #[serde(rename = "Datacenter", default)]
    datacenter: String,
    #[serde(rename = "Status", default)]
    status: String,
    #[serde(rename = "HTTPAddr", default)]
    http_addr: String,
    #[serde(rename = "Meta", default)]
    meta: Option<BTreeMap<String, String>>,
    #[serde(rename = "Attributes", default)]
    attributes: Option<BTreeMap<String, String>>,
    #[serde(rename = "ModifyIndex")]
    modify_index: u64,
}

impl Nomad {
    pub fn new(config: &Config) -> Result<Self, BackendError> {
        let args = &config.nomad;
        let addr = args.nomad_addr.trim_end_matches('/').to_owned();
        merkle_shared::config::require_scheme("NOMAD_ADDR", &addr, &["http", "https"])
            .map_err(|e| BackendError::Config(format!("NOMAD_ADDR={addr}: {}", e.rule)))?;
        let mut builder = reqwest::Client::builder()
            .connect_timeout(config.backend_timeout)
            .pool_max_idle_per_host(config.fetch_concurrency as usize);
        if let Some(path) = &args.nomad_cacert {
            let pem = read_pem("NOMAD_CACERT", path)?;
            let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| {
                BackendError::Config(format!("NOMAD_CACERT={}: {e}", path.display()))
            })?;
            builder = builder.tls_certs_merge([cert]);
        }
        match (&args.nomad_client_cert, &args.nomad_client_key) {
            (Some(cert), Some(key)) => {
                let mut pem = read_pem("NOMAD_CLIENT_CERT", cert)?;
                pem.extend(read_pem("NOMAD_CLIENT_KEY", key)?);
                let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
                    BackendError::Config(format!(
                        "NOMAD_CLIENT_CERT={} with NOMAD_CLIENT_KEY={}: {e}",
                        cert.display(),
                        key.display()
                    ))
                })?;
                builder = builder.identity(identity);
            }
            (None, None) => {}
            _ => {
                return Err(BackendError::Config(
                    "NOMAD_CLIENT_CERT and NOMAD_CLIENT_KEY: must be set together".into(),
                ));
            }
        }
        if args.nomad_skip_verify {
            builder = builder.tls_danger_accept_invalid_certs(true);
        }
        let http = builder
            .build()
            .map_err(|e| BackendError::Config(format!("NOMAD_ADDR={addr}: {e}")))?;
        Ok(Nomad {
            http,
            addr,
            token: args.nomad_token.clone().filter(|t| !t.is_empty()),
            region: args.nomad_region.clone().filter(|r| !r.is_empty()),
            namespace: args.nomad_namespace.clone().filter(|n| !n.is_empty()),
            page_size: config.page_size,
            port: config.tree_builder_port,
            timeout: config.backend_timeout,
            wait: config.watch_wait,
        })
    }

    pub fn identity(&self) -> String {
        format!(
            "nomad:{}:{}",
            self.addr,
            self.region.as_deref().unwrap_or_default()
        )
    }

    /// One GET: the answer's body and headers when it is 200, else an error saying what Nomad
    /// answered.
    async fn get(
        &self,
        path: &str,
        query: &[(&str, String)],
        timeout: Duration,
    ) -> Result<(HeaderMap, prost::bytes::Bytes), BackendError> {
        let mut request = self
            .http
            .get(format!("{}{path}", self.addr))
            .query(query)
            .timeout(timeout);
        if let Some(region) = &self.region {
            request = request.query(&[("region", region)]);
        }
        if let Some(namespace) = &self.namespace {
            request = request.query(&[("namespace", namespace)]);
        }
        if let Some(token) = &self.token {
            request = request.header("X-Nomad-Token", token);
        }
        let response = request.send().await.map_err(|e| {
            BackendError::Unreachable(format!(
                "Nomad at NOMAD_ADDR={} could not be reached: {}",
                self.addr,
                error_chain(&e)
            ))
        })?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await.map_err(|e| {
            BackendError::Unreachable(format!(
                "Nomad at NOMAD_ADDR={}: reading GET {path}: {}",
                self.addr,
                error_chain(&e)
            ))
        })?;
        match status {
            StatusCode::OK => Ok((headers, body)),
            StatusCode::NOT_FOUND => Err(BackendError::Gone(format!(
                "Nomad answered GET {path} with 404: {}",
                snippet(&body, SNIPPET)
            ))),
            StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => Err(BackendError::Denied(format!(
                "Nomad refused NOMAD_TOKEN ({}) for GET {path}: {} {}",
                if self.token.is_some() { "set" } else { "unset" },
                status.as_u16(),
                snippet(&body, SNIPPET)
            ))),
            _ => Err(BackendError::BadAnswer(format!(
                "Nomad at NOMAD_ADDR={} answered GET {path} with {}: {}",
                self.addr,
                status.as_u16(),
                snippet(&body, SNIPPET)
            ))),
        }
    }

    fn parse<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &[u8],
    ) -> Result<T, BackendError> {
        serde_json::from_slice(body).map_err(|e| {
            BackendError::BadAnswer(format!(
                "Nomad's answer to GET {path} does not parse ({e}): {}",
                snippet(body, SNIPPET)
            ))
        })
    }

    pub async fn list(&self) -> Result<Listing, BackendError> {
        let mut listing = Listing::default();
        let mut next_token = String::new();
        loop {
            let mut query = vec![("per_page", self.page_size.to_string())];
            if !next_token.is_empty() {
                query.push(("next_token", next_token.clone()));
            }
            let (headers, body) = self.get("/v1/nodes", &query, self.timeout).await?;
            listing.calls += 1;
            let stubs: Vec<NodeStub> = self.parse("/v1/nodes", &body)?;
            if listing.index.is_empty() {
                listing.index = header(&headers, "X-Nomad-Index");
            }
            listing.stubs.extend(stubs.into_iter().map(|s| Stub {
                key: s.id,
                version: s.modify_index.to_string(),
                detail: None,
            }));
            next_token = header(&headers, "X-Nomad-NextToken");
            if next_token.is_empty() {
                return Ok(listing);
            }
        }
    }

    pub async fn fetch(&self, id: &str) -> Result<Client, BackendError> {
        let path = format!("/v1/node/{}", urlencode(id));
        let (_, body) = self.get(&path, &[], self.timeout).await?;
        let node: Node = self.parse(&path, &body)?;
        let meta = node.meta.unwrap_or_default();
        // The node's IP: its HTTP address's host, else the fingerprinted address.
        let mut host = host_of(&node.http_addr).to_owned();
        if host.is_empty()
            && let Some(ip) = node
                .attributes
                .as_ref()
                .and_then(|a| a.get("unique.network.ip-address"))
        {
            host = ip.clone();
        }
        Ok(Client {
            tree_builder_address: tree_builder_address(&meta, &host, self.port),
            ready: node.status == "ready",
            id: node.id,
            name: node.name,
            address: node.http_addr,
            datacenter: node.datacenter,
            status: node.status,
            labels: meta.into_iter().collect(),
            version: node.modify_index.to_string(),
            fetch_time: Some(timestamp(std::time::SystemTime::now())),
        })
    }

    pub async fn wait_change(&self, index: &str) -> Result<bool, BackendError> {
        let wait = self.wait.as_secs().max(1);
        // One stub per answer: only the index matters here; the refresh that follows lists.
        let query = [
            ("index", index.to_owned()),
            ("wait", format!("{wait}s")),
            ("per_page", "1".to_owned()),
        ];
        // Nomad adds up to wait/16 of jitter to a blocking query.
        let timeout = self.wait + self.wait / 16 + self.timeout;
        let (headers, _) = self.get("/v1/nodes", &query, timeout).await?;
        Ok(header(&headers, "X-Nomad-Index") != index)
    }
}

fn header(headers: &HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

fn read_pem(variable: &str, path: &std::path::Path) -> Result<Vec<u8>, BackendError> {
    std::fs::read(path)
        .map_err(|e| BackendError::Config(format!("{variable}={}: {e}", path.display())))
}

/// A node id in a URL path (Nomad's ids are UUIDs; anything else is escaped).
fn urlencode(id: &str) -> String {
    id.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An error with its causes, which reqwest keeps apart ("error sending request" alone says
/// little).
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
