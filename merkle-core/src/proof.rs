//! Inclusion proofs (spec section 7): the directory nodes from the root to an entry's parent,
//! their verification, and the JSON proof file `merklectl prove` writes and `verify-proof`
//! reads.

use serde::{Deserialize, Serialize};

use crate::{
    digest::{Digest, hex, unhex},
    node::{DirNode, Entry, EntryKind, Meta, NodeError, Profile},
    tree::NodeSource,
};

/// The `format` field of a proof file.
pub const FORMAT: &str = "merkle-mesh-inclusion-proof";

/// A proof that the entry at `path` is in the tree with root `root`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InclusionProof {
    pub profile: Profile,
    pub root: Digest,
    /// The path's components, raw bytes.
    pub path: Vec<Vec<u8>>,
    /// The directory nodes from the root to the entry's parent, root first.
    pub nodes: Vec<DirNode>,
}

/// Why a proof could not be made or does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("path: {0}")]
    BadPath(&'static str),
    #[error("{0}: no such entry in the tree")]
    NotFound(String),
    #[error("{0}: not a directory, but the path continues beneath it")]
    NotADirectory(String),
    #[error("directory node {0} is not stored")]
    MissingNode(Digest),
    #[error("the proof has {got} nodes but the path has {expected} components")]
    NodeCount { expected: usize, got: usize },
    #[error("node {level} hashes to {actual}, but {expected} was expected")]
    HashMismatch {
        level: usize,
        expected: Digest,
        actual: Digest,
    },
    #[error("node {level}: {source}")]
    BadNode { level: usize, source: NodeError },
    #[error("not a valid proof file: {0}")]
    Format(String),
}

/// Splits a `/`-separated relative path into components; refuses empty paths, empty
/// components (`a//b`, a leading or trailing `/`), `.` and `..`, NUL bytes, and more
/// components than a tree may nest (spec section 4.1).
pub fn split_path(path: &[u8]) -> Result<Vec<Vec<u8>>, ProofError> {
    if path.is_empty() {
        return Err(ProofError::BadPath("must name an entry below the root"));
    }
    if path.iter().filter(|&&b| b == b'/').count() > crate::MAX_DEPTH {
        return Err(ProofError::BadPath(
            "has more than 257 components: a tree nests at most 256 directories (docs/merkle-spec.md section 4.1)",
        ));
    }
    path.split(|b| *b == b'/')
        .map(|c| match c {
            b"" => Err(ProofError::BadPath(
                "empty component (leading, trailing or double '/')",
            )),
            b"." | b".." => Err(ProofError::BadPath(
                "'.' and '..' components are not allowed",
            )),
            c if c.contains(&0) => Err(ProofError::BadPath("a component holds a NUL byte")),
            c => Ok(c.to_vec()),
        })
        .collect()
}

fn display(components: &[Vec<u8>]) -> String {
    String::from_utf8_lossy(&components.join(&b'/')).into_owned()
}

/// Makes the proof of `path` in the tree with `root`.
pub fn prove(
    src: &dyn NodeSource,
    root: Digest,
    profile: Profile,
    path: &[u8],
) -> Result<InclusionProof, ProofError> {
    let components = split_path(path)?;
    let mut nodes = Vec::with_capacity(components.len());
    let mut current = root;
    for (i, name) in components.iter().enumerate() {
        let node = src.node(&current).ok_or(ProofError::MissingNode(current))?;
        let entry = node
            .get(name)
            .ok_or_else(|| ProofError::NotFound(display(&components[..=i])))?;
        nodes.push(node.clone());
        if i + 1 < components.len() {
            if entry.kind != EntryKind::Directory {
                return Err(ProofError::NotADirectory(display(&components[..=i])));
            }
            current = entry.hash;
        }
    }
    Ok(InclusionProof {
        profile,
        root,
        path: components,
        nodes,
    })
}

impl InclusionProof {
    /// Verifies the proof against its own root; returns the proven entry. The caller must
    /// still check that `self.root` is a root it trusts.
    pub fn verify(&self) -> Result<&Entry, ProofError> {
        if self.path.is_empty() {
            return Err(ProofError::BadPath("must name an entry below the root"));
        }
        if self.nodes.len() != self.path.len() {
            return Err(ProofError::NodeCount {
                expected: self.path.len(),
                got: self.nodes.len(),
            });
        }
        let mut expected = self.root;
        let mut proven = None;
        for (level, (node, name)) in self.nodes.iter().zip(&self.path).enumerate() {
            let actual = node
                .hash(self.profile)
                .map_err(|source| ProofError::BadNode { level, source })?;
            if actual != expected {
                return Err(ProofError::HashMismatch {
                    level,
                    expected,
                    actual,
                });
            }
            let entry = node
                .get(name)
                .ok_or_else(|| ProofError::NotFound(display(&self.path[..=level])))?;
            if level + 1 < self.path.len() {
                if entry.kind != EntryKind::Directory {
                    return Err(ProofError::NotADirectory(display(&self.path[..=level])));
                }
                expected = entry.hash;
            }
            proven = Some(entry);
        }
        proven.ok_or(ProofError::BadPath("must name an entry below the root"))
    }

    /// The proof file (spec section 7), pretty-printed JSON.
    pub fn to_json(&self) -> String {
        let joined = self.path.join(&b'/');
        let (path, path_hex) = utf8_or_hex(&joined);
        let file = ProofFile {
            format: FORMAT.to_owned(),
            version: 1,
            profile: self.profile.name().to_owned(),
            root_hash: self.root.to_hex(),
            path,
            path_hex,
            nodes: self
                .nodes
                .iter()
                .map(|n| NodeFile {
                    entries: n
                        .entries
                        .iter()
                        .map(|e| {
                            let (name, name_hex) = utf8_or_hex(&e.name);
                            EntryFile {
                                name,
                                name_hex,
                                kind: e.kind.name().to_owned(),
                                hash: e.hash.to_hex(),
                                mode: e.meta.map(|m| m.perm),
                                uid: e.meta.map(|m| m.uid),
                                gid: e.meta.map(|m| m.gid),
                            }
                        })
                        .collect(),
                })
                .collect(),
        };
        serde_json::to_string_pretty(&file).unwrap_or_default()
    }

    /// Reads a proof file.
    pub fn from_json(text: &str) -> Result<InclusionProof, ProofError> {
        let bad = |m: String| ProofError::Format(m);
        let file: ProofFile = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        if file.format != FORMAT || file.version != 1 {
            return Err(bad(format!(
                "expected format {FORMAT:?} version 1, found {:?} version {}",
                file.format, file.version
            )));
        }
        let profile = Profile::from_name(&file.profile)
            .ok_or_else(|| bad(format!("unknown profile {:?}", file.profile)))?;
        let root = file
            .root_hash
            .parse()
            .map_err(|e| bad(format!("root_hash: {e}")))?;
        let path = bytes_of(file.path, file.path_hex, "path")?;
        let nodes = file
            .nodes
            .into_iter()
            .map(|n| {
                n.entries
                    .into_iter()
                    .map(|e| {
                        let meta = match (e.mode, e.uid, e.gid) {
                            (Some(perm), Some(uid), Some(gid)) => Some(Meta { perm, uid, gid }),
                            (None, None, None) => None,
                            _ => {
                                return Err(bad("an entry has only some of mode, uid, gid".into()));
                            }
                        };
                        Ok(Entry {
                            name: bytes_of(e.name, e.name_hex, "name")?,
                            kind: EntryKind::from_name(&e.kind)
                                .ok_or_else(|| bad(format!("unknown kind {:?}", e.kind)))?,
                            hash: e.hash.parse().map_err(|err| bad(format!("hash: {err}")))?,
                            size: 0,
                            meta,
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map(|entries| DirNode { entries })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(InclusionProof {
            profile,
            root,
            path: split_path(&path)?,
            nodes,
        })
    }
}

fn utf8_or_hex(bytes: &[u8]) -> (Option<String>, Option<String>) {
    match std::str::from_utf8(bytes) {
        Ok(s) => (Some(s.to_owned()), None),
        Err(_) => (None, Some(hex(bytes))),
    }
}

fn bytes_of(
    text: Option<String>,
    hex_text: Option<String>,
    field: &str,
) -> Result<Vec<u8>, ProofError> {
    match (text, hex_text) {
        (Some(t), None) => Ok(t.into_bytes()),
        (None, Some(h)) => {
            unhex(&h).ok_or_else(|| ProofError::Format(format!("{field}_hex: not hex")))
        }
        _ => Err(ProofError::Format(format!(
            "exactly one of {field} and {field}_hex is required"
        ))),
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProofFile {
    format: String,
    version: u32,
    profile: String,
    root_hash: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path_hex: Option<String>,
    nodes: Vec<NodeFile>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeFile {
    entries: Vec<EntryFile>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name_hex: Option<String>,
    kind: String,
    hash: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mode: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gid: Option<u32>,
}
