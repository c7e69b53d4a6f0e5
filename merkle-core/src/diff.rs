//! The changed paths between two trees of one profile (spec section 8): a top-down walk that
//! never visits a subtree whose digest is equal on both sides.

use crate::{
    digest::Digest,
    node::{DirNode, Entry, EntryKind},
    tree::NodeSource,
};

/// How a path changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ChangeType {
    Added,
    Removed,
    Modified,
    KindChanged,
}

/// One side of a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Side {
    pub kind: EntryKind,
    pub hash: Digest,
}

/// One changed path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// `/`-separated, relative to the root, raw bytes.
    pub path: Vec<u8>,
    pub change: ChangeType,
    /// The old entry; `None` when added.
    pub old: Option<Side>,
    /// The new entry; `None` when removed.
    pub new: Option<Side>,
}

/// Why a diff could not be completed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiffError {
    /// A directory node a tree refers to is not available.
    #[error("directory node {0} is not stored")]
    MissingNode(Digest),
    /// A tree nests deeper than the spec allows (`crate::MAX_DEPTH`): it is not walked.
    #[error(
        "the tree nests deeper than {} directories below {}, the limit of docs/merkle-spec.md section 4.1",
        crate::MAX_DEPTH,
        String::from_utf8_lossy(.0)
    )]
    TooDeep(Vec<u8>),
}

/// Calls `emit` for each changed path, in depth-first order of sorted names, until it returns
/// false. Returns whether every change was emitted.
pub fn diff(
    old: &dyn NodeSource,
    old_root: Digest,
    new: &dyn NodeSource,
    new_root: Digest,
    emit: &mut dyn FnMut(Change) -> bool,
) -> Result<bool, DiffError> {
    if old_root == new_root {
        return Ok(true);
    }
    let walk = Walk { old, new };
    walk.dirs(old_root, new_root, &[], emit)
}

/// All changes as a vector.
pub fn diff_all(
    old: &dyn NodeSource,
    old_root: Digest,
    new: &dyn NodeSource,
    new_root: Digest,
) -> Result<Vec<Change>, DiffError> {
    let mut out = Vec::new();
    diff(old, old_root, new, new_root, &mut |c| {
        out.push(c);
        true
    })?;
    Ok(out)
}

/// A pair of subtrees a diff descends into: both sides with different hashes, or a
/// directory on one side only (added or removed, walked whole).
pub type SubtreePair = (Option<Digest>, Option<Digest>);

/// The subdirectory pairs that [`diff`] descends into below the directories `old` and `new`
/// (either may be absent: a subtree added or removed whole). Fetching the nodes of these pairs,
/// level by level, gives exactly the nodes a diff reads, so a caller whose nodes live elsewhere
/// (a database, another service) can fetch them in batches first and diff in memory.
pub fn subtrees_visited(old: Option<&DirNode>, new: Option<&DirNode>, out: &mut Vec<SubtreePair>) {
    let dir = |e: &Entry| (e.kind == EntryKind::Directory).then_some(e.hash);
    match (old, new) {
        (Some(o), Some(n)) => {
            let (mut i, mut j) = (0, 0);
            while i < o.entries.len() || j < n.entries.len() {
                match (o.entries.get(i), n.entries.get(j)) {
                    (Some(a), Some(b)) if a.name == b.name => {
                        i += 1;
                        j += 1;
                        match (dir(a), dir(b)) {
                            (Some(x), Some(y)) if x != y => out.push((Some(x), Some(y))),
                            (Some(_), Some(_)) => {}
                            (x, y) => {
                                out.extend(x.map(|h| (Some(h), None)));
                                out.extend(y.map(|h| (None, Some(h))));
                            }
                        }
                    }
                    (Some(a), Some(b)) if a.name < b.name => {
                        i += 1;
                        out.extend(dir(a).map(|h| (Some(h), None)));
                    }
                    (Some(a), None) => {
                        i += 1;
                        out.extend(dir(a).map(|h| (Some(h), None)));
                    }
                    (_, Some(b)) => {
                        j += 1;
                        out.extend(dir(b).map(|h| (None, Some(h))));
                    }
                    (None, None) => break,
                }
            }
        }
        (Some(o), None) => out.extend(o.entries.iter().filter_map(dir).map(|h| (Some(h), None))),
        (None, Some(n)) => out.extend(n.entries.iter().filter_map(dir).map(|h| (None, Some(h)))),
        (None, None) => {}
    }
}

struct Walk<'a> {
    old: &'a dyn NodeSource,
    new: &'a dyn NodeSource,
}

fn join(prefix: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(prefix.len() + 1 + name.len());
    if !prefix.is_empty() {
        p.extend_from_slice(prefix);
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

fn side(e: &Entry) -> Option<Side> {
    Some(Side {
        kind: e.kind,
        hash: e.hash,
    })
}

fn fetch(src: &dyn NodeSource, hash: Digest) -> Result<&DirNode, DiffError> {
    src.node(&hash).ok_or(DiffError::MissingNode(hash))
}

/// The depth of the directory at `path` (`/`-separated below the root, the root empty).
fn depth_of(path: &[u8]) -> usize {
    if path.is_empty() {
        0
    } else {
        1 + path.iter().filter(|&&b| b == b'/').count()
    }
}

/// Checked before a walk enters the directory at `path`.
fn check_depth(path: &[u8]) -> Result<(), DiffError> {
    if depth_of(path) > crate::MAX_DEPTH {
        return Err(DiffError::TooDeep(path.to_vec()));
    }
    Ok(())
}

impl Walk<'_> {
    fn dirs(
        &self,
        old_hash: Digest,
        new_hash: Digest,
        prefix: &[u8],
        emit: &mut dyn FnMut(Change) -> bool,
    ) -> Result<bool, DiffError> {
        check_depth(prefix)?;
        let old = fetch(self.old, old_hash)?;
        let new = fetch(self.new, new_hash)?;
        let (mut i, mut j) = (0, 0);
        while i < old.entries.len() || j < new.entries.len() {
            let o = old.entries.get(i);
            let n = new.entries.get(j);
            let order = match (o, n) {
                (Some(o), Some(n)) => o.name.cmp(&n.name),
                (Some(_), None) => std::cmp::Ordering::Less,
                _ => std::cmp::Ordering::Greater,
            };
            let go_on = match (order, o, n) {
                (std::cmp::Ordering::Less, Some(o), _) => {
                    i += 1;
                    self.whole(self.old, o, prefix, ChangeType::Removed, emit)?
                }
                (std::cmp::Ordering::Greater, _, Some(n)) => {
                    j += 1;
                    self.whole(self.new, n, prefix, ChangeType::Added, emit)?
                }
                (_, Some(o), Some(n)) => {
                    i += 1;
                    j += 1;
                    self.pair(o, n, prefix, emit)?
                }
                _ => unreachable!("at least one side has an entry"),
            };
            if !go_on {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn pair(
        &self,
        o: &Entry,
        n: &Entry,
        prefix: &[u8],
        emit: &mut dyn FnMut(Change) -> bool,
    ) -> Result<bool, DiffError> {
        let path = join(prefix, &o.name);
        if o.kind.group() != n.kind.group() {
            let go_on = emit(Change {
                path: path.clone(),
                change: ChangeType::KindChanged,
                old: side(o),
                new: side(n),
            });
            if !go_on {
                return Ok(false);
            }
            if o.kind == EntryKind::Directory
                && !self.beneath(self.old, o.hash, &path, ChangeType::Removed, emit)?
            {
                return Ok(false);
            }
            if n.kind == EntryKind::Directory
                && !self.beneath(self.new, n.hash, &path, ChangeType::Added, emit)?
            {
                return Ok(false);
            }
            return Ok(true);
        }
        let modified = Change {
            path: path.clone(),
            change: ChangeType::Modified,
            old: side(o),
            new: side(n),
        };
        if o.kind == EntryKind::Directory {
            if o.meta != n.meta && !emit(modified) {
                return Ok(false);
            }
            if o.hash != n.hash {
                return crate::stack::deeper(|| self.dirs(o.hash, n.hash, &path, emit));
            }
            return Ok(true);
        }
        if o.kind != n.kind || o.hash != n.hash || o.meta != n.meta {
            return Ok(emit(modified));
        }
        Ok(true)
    }

    /// An entry present on one side only: it and, for a directory, everything beneath it.
    fn whole(
        &self,
        src: &dyn NodeSource,
        e: &Entry,
        prefix: &[u8],
        change: ChangeType,
        emit: &mut dyn FnMut(Change) -> bool,
    ) -> Result<bool, DiffError> {
        let path = join(prefix, &e.name);
        let (old, new) = match change {
            ChangeType::Removed => (side(e), None),
            _ => (None, side(e)),
        };
        if !emit(Change {
            path: path.clone(),
            change,
            old,
            new,
        }) {
            return Ok(false);
        }
        if e.kind == EntryKind::Directory {
            return crate::stack::deeper(|| self.beneath(src, e.hash, &path, change, emit));
        }
        Ok(true)
    }

    fn beneath(
        &self,
        src: &dyn NodeSource,
        dir: Digest,
        prefix: &[u8],
        change: ChangeType,
        emit: &mut dyn FnMut(Change) -> bool,
    ) -> Result<bool, DiffError> {
        check_depth(prefix)?;
        for e in &fetch(src, dir)?.entries {
            if !self.whole(src, e, prefix, change, emit)? {
                return Ok(false);
            }
        }
        Ok(true)
    }
}
