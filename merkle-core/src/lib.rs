//! Merkle Mesh tree hashing, as specified in `docs/merkle-spec.md` (version 1).
//!
//! - [`digest`]: SHA-256 digests and the domain-separated leaf hashes;
//! - [`node`]: directory entries and nodes, their canonical encoding and hash;
//! - [`build`]: a parallel, incremental, safe build of a directory's tree;
//! - [`statcache`]: the persistent stat cache that makes rebuilds incremental;
//! - [`watched`]: a built tree kept and watched (inotify), so a rebuild costs what changed;
//! - [`tree`]: an in-memory tree (all directory nodes by hash);
//! - [`proof`]: inclusion proofs, their JSON file format and verification;
//! - [`diff`]: the changed paths between two trees, skipping equal subtrees;
//! - [`history`]: hash-chained, signed snapshot records and their verification.
//!
//! The crate knows nothing of gRPC, PostgreSQL or Redis: TreeBuilder, DbSync and `merklectl`
//! all build on it.

pub mod build;
pub mod cosignature;
pub mod diff;
pub mod digest;
pub mod history;
mod kept;
pub mod node;
pub mod proof;
pub mod stack;
pub mod statcache;
pub mod tree;
mod watch;
pub mod watched;

/// The deepest a tree may nest: directories below its root (spec section 4.1). Every tree is
/// checked against it where it enters (a build, a sync) and where it is walked (a diff, a
/// proof, a listing, a verification), so no walk recurses without this bound.
pub const MAX_DEPTH: usize = 256;

pub use build::{BuildError, BuildOptions, BuildOutcome, Builder, NodeSink, Progress};
pub use digest::Digest;
pub use node::{DirNode, Entry, EntryKind, Meta, Profile, TreeStats};
pub use tree::MemTree;
pub use watched::WatchedTree;
