//! Reading stored trees: a directory's entries, the diff of two trees, an inclusion proof.
//!
//! The diff and the proof are `merkle-core`'s own (so they equal what the CLI computes on
//! directories); this module fetches just the nodes they will visit, a level at a time in one
//! batch each (memory, then the cache, then one PostgreSQL query), and hands them over in
//! memory. For two trees that differ in one file that is O(depth) nodes.

use std::{collections::HashMap, sync::Arc};

use merkle_core::{
    Digest, EntryKind, MemTree,
    diff::{Change, DiffError, SubtreePair, subtrees_visited},
    proof::{InclusionProof, ProofError, prove, split_path},
};

use crate::{
    error::Error,
    nodes::{NodeStore, StoredNode},
};

/// Most nodes one diff may load (what two trees differ in, not their size).
const MAX_DIFF_NODES: usize = 2_000_000;

/// The stored node `root`, or NOT_FOUND naming `field`.
pub async fn root_node(
    nodes: &NodeStore,
    field: &str,
    root: Digest,
) -> Result<Arc<StoredNode>, Error> {
    nodes
        .get(root)
        .await?
        .ok_or_else(|| Error::NotFound(format!("{field}: no stored tree has root {root}")))
}

fn display(components: &[Vec<u8>]) -> String {
    String::from_utf8_lossy(&components.join(&b'/')).into_owned()
}

/// A child node the tree refers to; its absence means the store lost part of a tree.
async fn child(nodes: &NodeStore, hash: Digest) -> Result<Arc<StoredNode>, Error> {
    nodes.get(hash).await?.ok_or_else(|| {
        Error::Internal(format!("directory node {hash} of a stored tree is missing"))
    })
}

/// The directory at `path` (raw, `/`-separated; empty for the root) of the tree `root`:
/// its hash and node.
pub async fn directory(
    nodes: &NodeStore,
    root: Digest,
    path: &[u8],
) -> Result<(Digest, Arc<StoredNode>), Error> {
    let mut hash = root;
    let mut node = root_node(nodes, "root_hash", root).await?;
    if path.is_empty() {
        return Ok((hash, node));
    }
    let components = split_path(path).map_err(|e| Error::BadRequest(e.to_string()))?;
    for (i, name) in components.iter().enumerate() {
        let here = display(&components[..=i]);
        let entry = node
            .node
            .get(name)
            .ok_or_else(|| Error::NotFound(format!("path: {here} is not in the tree {root}")))?;
        if entry.kind != EntryKind::Directory {
            return Err(Error::FailedPrecondition(format!(
                "path: {here} is a {}, not a directory",
                entry.kind.name()
            )));
        }
        hash = entry.hash;
        node = child(nodes, hash).await?;
    }
    Ok((hash, node))
}

/// An inclusion proof of `path` in the tree `root` (spec section 7).
pub async fn proof(nodes: &NodeStore, root: Digest, path: &[u8]) -> Result<InclusionProof, Error> {
    let top = root_node(nodes, "root_hash", root).await?;
    let profile = top.profile;
    let components = split_path(path).map_err(|e| Error::BadRequest(e.to_string()))?;
    // Fetch the directories down to the entry's parent; `prove` then checks the path on them.
    let mut tree = MemTree {
        root,
        profile,
        nodes: HashMap::new(),
    };
    let mut current = (root, top);
    for name in &components[..components.len() - 1] {
        let next = current
            .1
            .node
            .get(name)
            .filter(|e| e.kind == EntryKind::Directory)
            .map(|e| e.hash);
        tree.nodes.insert(current.0, current.1.node.clone());
        match next {
            Some(hash) => current = (hash, child(nodes, hash).await?),
            None => break,
        }
    }
    tree.nodes.insert(current.0, current.1.node.clone());
    prove(&tree, root, profile, path).map_err(|e| match e {
        ProofError::BadPath(_) => Error::BadRequest(e.to_string()),
        ProofError::NotFound(_) => Error::NotFound(format!("path: {e}")),
        ProofError::NotADirectory(_) => Error::FailedPrecondition(format!("path: {e}")),
        other => Error::Internal(other.to_string()),
    })
}

/// Loads every node the diff of `old` and `new` visits (both must be stored, of one profile),
/// a level at a time; [`changes`] then walks them.
pub async fn diff(nodes: &NodeStore, old: Digest, new: Digest) -> Result<MemTree, Error> {
    let old_top = root_node(nodes, "old_root_hash", old).await?;
    let new_top = root_node(nodes, "new_root_hash", new).await?;
    if old_top.profile != new_top.profile {
        return Err(Error::bad_request(
            "new_root_hash",
            format!(
                "the trees were hashed with different profiles ({} and {}) and cannot be compared",
                old_top.profile.name(),
                new_top.profile.name()
            ),
        ));
    }
    let mut tree = MemTree {
        root: new,
        profile: new_top.profile,
        nodes: HashMap::from([(old, old_top.node.clone()), (new, new_top.node.clone())]),
    };
    let mut level: Vec<SubtreePair> = Vec::new();
    if old != new {
        subtrees_visited(Some(&old_top.node), Some(&new_top.node), &mut level);
    }
    // `level` holds the directories at `depth`: never past the spec's limit.
    let mut depth = 1;
    while !level.is_empty() {
        if depth > merkle_core::MAX_DEPTH {
            return Err(too_deep());
        }
        depth += 1;
        let wanted: Vec<Digest> = level
            .iter()
            .flat_map(|(o, n)| o.iter().chain(n.iter()).copied())
            .filter(|h| !tree.nodes.contains_key(h))
            .collect();
        let fetched = nodes.get_many(&wanted).await?;
        for hash in &wanted {
            let node = fetched.get(hash).ok_or_else(|| {
                Error::Internal(format!("directory node {hash} of a stored tree is missing"))
            })?;
            tree.nodes.insert(*hash, node.node.clone());
        }
        if tree.nodes.len() > MAX_DIFF_NODES {
            return Err(Error::ResourceExhausted(format!(
                "the trees differ in more than {MAX_DIFF_NODES} directories; diff smaller subtrees"
            )));
        }
        let mut next = Vec::new();
        for (o, n) in &level {
            subtrees_visited(
                o.and_then(|h| tree.nodes.get(&h)),
                n.and_then(|h| tree.nodes.get(&h)),
                &mut next,
            );
        }
        level = next;
    }
    Ok(tree)
}

/// Runs `merkle-core`'s diff on the loaded nodes, calling `emit` with each change in path
/// order until it returns false.
pub fn changes(
    tree: &MemTree,
    old: Digest,
    new: Digest,
    emit: &mut dyn FnMut(Change) -> bool,
) -> Result<bool, Error> {
    merkle_core::diff::diff(tree, old, tree, new, emit).map_err(|e| match e {
        DiffError::TooDeep(_) => too_deep(),
        DiffError::MissingNode(_) => Error::Internal(e.to_string()),
    })
}

/// A stored tree nests deeper than the spec allows (stored before the limit was enforced on
/// SyncTree): it is never walked.
fn too_deep() -> Error {
    Error::FailedPrecondition(format!(
        "the stored tree nests deeper than {} directories, the limit of docs/merkle-spec.md section 4.1; it cannot be walked",
        merkle_core::MAX_DEPTH
    ))
}
