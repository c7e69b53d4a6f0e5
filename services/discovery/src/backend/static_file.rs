//! The static backend: a YAML or JSON file listing the clients, for small or test fleets. It is
//! parsed again only when it changed (its modification time, size or inode), and watched by
//! polling those.
//!
//! ```yaml
//! clients:
//!   - id: node-1                                # required, unique
//!     name: node-1                              # default: the id
//!     address: 127.1.0.1:4646
//!     tree_builder_address: 127.1.0.1:50052     # default: the address's host, TREE_BUILDER_PORT
//!     datacenter: dc1
//!     status: ready                             # default: ready
//!     labels: {rack: r1}
//! ```

use parking_lot::Mutex;
use std::{
    collections::{BTreeMap, HashSet},
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use merkle_proto::discovery::v1::Client;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::{Listing, Stub, host_of, timestamp, tree_builder_address};
use crate::{config::Config, error::BackendError};

/// How often a watched file's metadata is looked at.
const POLL_EVERY: Duration = Duration::from_millis(250);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    clients: Vec<Entry>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    id: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    address: String,
    #[serde(default)]
    tree_builder_address: String,
    #[serde(default)]
    datacenter: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// What identifies one version of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: SystemTime,
    len: u64,
    inode: u64,
}

impl Stamp {
    fn index(&self) -> String {
        let nanos = self
            .modified
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        format!("{nanos}:{}:{}", self.len, self.inode)
    }
}

pub struct StaticFile {
    path: Option<PathBuf>,
    port: u16,
    wait: Duration,
    /// The file as last parsed.
    parsed: Mutex<Option<(Stamp, Vec<Stub>)>>,
}

impl StaticFile {
    pub fn new(config: &Config) -> Self {
        StaticFile {
            path: config.static_file.clone(),
            port: config.tree_builder_port,
            wait: config.watch_wait,
            parsed: Mutex::new(None),
        }
    }

    pub fn identity(&self) -> String {
        match &self.path {
            Some(path) => format!("static:{}", path.display()),
            None => "static:".into(),
        }
    }

    fn stamp(&self) -> Result<Option<Stamp>, BackendError> {
        let Some(path) = &self.path else {
            return Ok(None);
        };
        let meta = std::fs::metadata(path).map_err(|e| {
            BackendError::Config(format!(
                "STATIC_FILE={}: cannot be read: {e}",
                path.display()
            ))
        })?;
        Ok(Some(Stamp {
            modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            len: meta.len(),
            inode: meta.ino(),
        }))
    }

    pub async fn list(&self) -> Result<Listing, BackendError> {
        let Some(stamp) = self.stamp()? else {
            // No file: an empty fleet, so the local stack serves out of the box.
            return Ok(Listing::default());
        };
        {
            let parsed = self.parsed.lock();
            if let Some((seen, stubs)) = &*parsed
                && *seen == stamp
            {
                return Ok(Listing {
                    stubs: stubs.clone(),
                    index: stamp.index(),
                    calls: 0,
                });
            }
        }
        let path = self.path.clone().unwrap_or_default();
        let port = self.port;
        let stubs = tokio::task::spawn_blocking(move || read(&path, port))
            .await
            .map_err(|e| BackendError::BadAnswer(format!("reading STATIC_FILE: {e}")))??;
        *self.parsed.lock() = Some((stamp.clone(), stubs.clone()));
        Ok(Listing {
            stubs,
            index: stamp.index(),
            calls: 1,
        })
    }

    pub async fn wait_change(&self, index: &str) -> Result<bool, BackendError> {
        let until = Instant::now() + self.wait;
        while Instant::now() < until {
            let now = self.stamp()?.map(|s| s.index()).unwrap_or_default();
            if now != index {
                return Ok(true);
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
        Ok(false)
    }
}

/// Reads and checks the file; an error names the file and the entry.
fn read(path: &std::path::Path, port: u16) -> Result<Vec<Stub>, BackendError> {
    let bytes = std::fs::read(path).map_err(|e| {
        BackendError::Config(format!(
            "STATIC_FILE={}: cannot be read: {e}",
            path.display()
        ))
    })?;
    let text = String::from_utf8_lossy(&bytes);
    let parsed: Result<File, String> = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).map_err(|e| e.to_string())
    } else {
        serde_saphyr::from_str(&text).map_err(|e| e.to_string())
    };
    let file = parsed.map_err(|e| {
        BackendError::BadAnswer(format!(
            "STATIC_FILE={} does not parse: {e}",
            path.display()
        ))
    })?;
    let fetched = timestamp(SystemTime::now());
    let mut seen = HashSet::new();
    let mut stubs = Vec::with_capacity(file.clients.len());
    for (i, entry) in file.clients.into_iter().enumerate() {
        let bad = |rule: &str| {
            BackendError::BadAnswer(format!(
                "STATIC_FILE={}: clients[{i}].{rule}",
                path.display()
            ))
        };
        if entry.id.is_empty() {
            return Err(bad("id: must not be empty"));
        }
        // Fleet builds store each node's snapshots as `<source>@<id>`.
        if !merkle_shared::names::is_node_id(&entry.id) {
            return Err(bad(&format!(
                "id: {:?} must be 1-253 characters of A-Z, a-z, 0-9, -, _, . and :",
                entry.id
            )));
        }
        if !seen.insert(entry.id.clone()) {
            return Err(bad(&format!("id: {} is listed twice", entry.id)));
        }
        let version = {
            let canonical = serde_json::to_vec(&entry).unwrap_or_default();
            let digest = Sha256::digest(&canonical);
            digest[..8]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        let mut metadata = entry.labels.clone();
        if !entry.tree_builder_address.is_empty() {
            metadata.insert(
                super::TREE_BUILDER_KEY.into(),
                entry.tree_builder_address.clone(),
            );
        }
        let status = if entry.status.is_empty() {
            "ready".to_owned()
        } else {
            entry.status.clone()
        };
        let client = Client {
            name: if entry.name.is_empty() {
                entry.id.clone()
            } else {
                entry.name
            },
            tree_builder_address: tree_builder_address(&metadata, host_of(&entry.address), port),
            ready: status == "ready",
            id: entry.id.clone(),
            address: entry.address,
            datacenter: entry.datacenter,
            status,
            labels: entry.labels.into_iter().collect(),
            version: version.clone(),
            fetch_time: Some(fetched),
        };
        stubs.push(Stub {
            key: entry.id,
            version,
            detail: Some(client),
        });
    }
    Ok(stubs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path
    }

    #[test]
    fn yaml_and_json_files_give_the_same_clients() {
        let dir = tempfile::tempdir().expect("tempdir");
        let yaml = write(
            &dir,
            "c.yaml",
            "clients:\n  - id: a\n    address: 127.1.0.1:4646\n    labels: {rack: r1}\n  - id: b\n    status: down\n    tree_builder_address: 127.1.0.2:7000\n",
        );
        let json = write(
            &dir,
            "c.json",
            r#"{"clients": [{"id": "a", "address": "127.1.0.1:4646", "labels": {"rack": "r1"}},
                {"id": "b", "status": "down", "tree_builder_address": "127.1.0.2:7000"}]}"#,
        );
        let from_yaml = read(&yaml, 50052).expect("yaml");
        let from_json = read(&json, 50052).expect("json");
        for stubs in [&from_yaml, &from_json] {
            let a = stubs[0].detail.as_ref().expect("detail");
            assert_eq!(a.name, "a");
            assert_eq!(a.tree_builder_address, "127.1.0.1:50052");
            assert!(a.ready);
            assert_eq!(a.labels.get("rack").map(String::as_str), Some("r1"));
            let b = stubs[1].detail.as_ref().expect("detail");
            assert_eq!(b.tree_builder_address, "127.1.0.2:7000");
            assert!(!b.ready);
        }
        assert_eq!(from_yaml[0].version, from_json[0].version);
        assert_ne!(from_yaml[0].version, from_yaml[1].version);
    }

    #[test]
    fn bad_files_are_refused_naming_the_entry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let twice = write(&dir, "t.yaml", "clients:\n  - id: a\n  - id: a\n");
        let err = read(&twice, 1).expect_err("duplicate").to_string();
        assert!(err.contains("clients[1].id: a is listed twice"), "{err}");
        let unknown = write(&dir, "u.yaml", "clients:\n  - id: a\n    adress: x\n");
        let err = read(&unknown, 1).expect_err("unknown field").to_string();
        assert!(
            err.contains("does not parse") && err.contains("adress"),
            "{err}"
        );
        let empty = write(&dir, "e.json", r#"{"clients": [{"id": ""}]}"#);
        let err = read(&empty, 1).expect_err("empty id").to_string();
        assert!(err.contains("clients[0].id: must not be empty"), "{err}");
    }
}
