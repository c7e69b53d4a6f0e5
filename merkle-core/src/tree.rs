//! An in-memory tree: every directory node by hash, as a build's [`NodeSink`] collects them.
//! Diffs and proofs read nodes through [`NodeSource`], which DbSync implements on PostgreSQL.

use parking_lot::Mutex;
use std::collections::HashMap;

use crate::{
    build::{BuildError, NodeSink},
    digest::Digest,
    node::{DirNode, Profile},
};

/// Where diffs and proofs get directory nodes from.
pub trait NodeSource {
    /// The node with this hash, or `None` when it is not stored.
    fn node(&self, hash: &Digest) -> Option<&DirNode>;
}

/// A whole tree in memory.
#[derive(Debug, Clone, Default)]
pub struct MemTree {
    pub root: Digest,
    pub profile: Profile,
    pub nodes: HashMap<Digest, DirNode>,
}

impl NodeSource for MemTree {
    fn node(&self, hash: &Digest) -> Option<&DirNode> {
        self.nodes.get(hash)
    }
}

/// A [`NodeSink`] that collects a build's nodes into a [`MemTree`].
#[derive(Default)]
pub struct CollectNodes(Mutex<HashMap<Digest, DirNode>>);

impl CollectNodes {
    /// The collected tree, given the build's root and profile.
    pub fn into_tree(self, root: Digest, profile: Profile) -> MemTree {
        MemTree {
            root,
            profile,
            nodes: self.0.into_inner(),
        }
    }
}

impl NodeSink for CollectNodes {
    fn node(&self, hash: Digest, node: DirNode) -> Result<(), BuildError> {
        self.0.lock().insert(hash, node);
        Ok(())
    }
}
