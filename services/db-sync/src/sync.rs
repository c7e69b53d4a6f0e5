//! Storing a tree: the nodes a SyncTree stream carries are joined (a node too big for one
//! message comes in parts), checked against their hashes and against the claimed root, and
//! written with the snapshot in one transaction.
//!
//! What makes the stored trees trustworthy: every node is stored under the hash of its own
//! bytes, and a snapshot is stored only when its whole tree is present (each node it needs is
//! sent or already stored, and each stored node was checked the same way when it came). So a
//! stored root always stands for a complete tree that hashes to it.
//!
//! Concurrency: the transaction locks the source's row (`FOR UPDATE`), so two syncs of one
//! source run one after the other; the second sees the first's snapshot as the latest, and
//! stores nothing when its root is the same. The nodes a sync relies on without sending them
//! are marked used (and row-locked) in its transaction, so garbage collection never deletes one
//! under it (see `gc.rs`).

use merkle_shared::postgres::Traced as _;
use std::collections::{HashMap, HashSet, VecDeque};

use merkle_core::{Digest, DirNode, Entry, Profile, TreeStats, history::Record};
use merkle_proto::{common::v1::TreeNode, dbsync::v1 as pb};
use merkle_shared::{convert::entry_from_proto, names::SourceName, postgres::PgPool};

use crate::{
    error::Error,
    history::{self, Signer},
    nodes::NodeRow,
    store::{self, Snapshot, queries},
};

/// Nodes per INSERT statement.
const INSERT_BATCH: usize = 1000;

/// What a SyncTree header asks to store.
#[derive(Debug, Clone)]
pub struct Header {
    pub source: SourceName,
    pub root: Digest,
    pub build_id: String,
    pub profile: Profile,
    pub stats: TreeStats,
}

/// What a sync did, with the snapshot to answer.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The root is the source's latest (this snapshot): nothing was written.
    Unchanged(pb::Snapshot),
    /// A new snapshot, with the number of nodes inserted.
    Stored {
        snapshot: pb::Snapshot,
        nodes_written: u64,
    },
    /// A retried sync of a build already stored: its snapshot.
    Replayed(pb::Snapshot),
}

/// The nodes of one SyncTree call, as they arrive.
pub struct Received {
    profile: Profile,
    max_bytes: u64,
    bytes: u64,
    nodes: HashMap<Digest, NodeRow>,
    /// A node whose parts are still arriving: its claimed hash and entries so far.
    partial: Option<(Digest, Vec<Entry>)>,
}

impl Received {
    pub fn new(profile: Profile, max_bytes: u64) -> Self {
        Received {
            profile,
            max_bytes,
            bytes: 0,
            nodes: HashMap::new(),
            partial: None,
        }
    }

    /// Takes one TreeNode message (a whole node, or a part of one).
    pub fn add(&mut self, message: &TreeNode) -> Result<(), Error> {
        let claimed: Digest = message
            .hash
            .parse()
            .map_err(|e| Error::bad_request("nodes.hash", format!("{:?}: {e}", message.hash)))?;
        let full = self.profile == Profile::Full;
        let mut entries = match self.partial.take() {
            Some((hash, entries)) if hash == claimed => entries,
            Some((hash, _)) => {
                return Err(Error::bad_request(
                    "nodes",
                    format!(
                        "node {hash} was split (more_entries) but its next part is node {claimed}"
                    ),
                ));
            }
            None => Vec::new(),
        };
        for (i, entry) in message.entries.iter().enumerate() {
            let entry = entry_from_proto(entry, full).map_err(|rule| {
                Error::bad_request(&format!("nodes[{claimed}].entries[{i}]"), rule)
            })?;
            entries.push(entry);
        }
        if message.more_entries {
            self.partial = Some((claimed, entries));
            return Ok(());
        }
        let row = NodeRow::from_node(self.profile, &DirNode { entries })
            .map_err(|e| Error::bad_request(&format!("nodes[{claimed}]"), e))?;
        if row.hash != claimed {
            return Err(Error::bad_request(
                "nodes",
                format!(
                    "node {claimed}: its entries hash to {} with the {} profile, not to its hash",
                    row.hash,
                    self.profile.name()
                ),
            ));
        }
        self.bytes += (row.encoded.len() + row.sizes.len()) as u64;
        if self.bytes > self.max_bytes {
            return Err(Error::ResourceExhausted(format!(
                "nodes: more than SYNC_MAX_BYTES ({} bytes) of nodes in one SyncTree",
                self.max_bytes
            )));
        }
        self.nodes.insert(claimed, row);
        Ok(())
    }

    /// The nodes received, once the stream has ended.
    pub fn finish(self) -> Result<HashMap<Digest, NodeRow>, Error> {
        if let Some((hash, _)) = self.partial {
            return Err(Error::bad_request(
                "nodes",
                format!("the stream ended inside node {hash} (its last part had more_entries set)"),
            ));
        }
        Ok(self.nodes)
    }
}

/// Walks the tree from `root` through the sent nodes. Every sent node must be part of the
/// tree; returns the hashes the tree needs that were not sent (they must be stored), each with
/// the node that refers to it (for the error message).
pub fn needed_from_store(
    root: Digest,
    sent: &HashMap<Digest, NodeRow>,
) -> Result<Vec<(Digest, Option<Digest>)>, Error> {
    let mut needed = Vec::new();
    let mut seen: HashSet<Digest> = HashSet::new();
    let mut queue = VecDeque::from([(root, None)]);
    while let Some((hash, parent)) = queue.pop_front() {
        if !seen.insert(hash) {
            continue;
        }
        match sent.get(&hash) {
            Some(row) => queue.extend(row.children().map(|child| (child, Some(hash)))),
            None => needed.push((hash, parent)),
        }
    }
    if let Some(stray) = sent.keys().find(|h| !seen.contains(h)) {
        return Err(Error::bad_request(
            "nodes",
            format!("node {stray} is not part of the tree with root {root}"),
        ));
    }
    Ok(needed)
}

fn too_deep() -> Error {
    Error::bad_request(
        "nodes",
        format!(
            "the tree nests deeper than {} directories, the limit of docs/merkle-spec.md section 4.1",
            merkle_core::MAX_DEPTH
        ),
    )
}

/// The depth of every node the tree reaches through the sent nodes: the longest path from the
/// root (a subtree may hang at several depths; the deepest counts), for the sent nodes and for
/// the stored subtrees they refer to. INVALID_ARGUMENT when the sent part alone nests deeper
/// than the spec allows. A topological walk (Kahn's): no recursion, whatever the input.
pub fn longest_depths(
    root: Digest,
    sent: &HashMap<Digest, NodeRow>,
) -> Result<HashMap<Digest, usize>, Error> {
    let mut parents: HashMap<Digest, usize> = HashMap::new();
    let mut reached = VecDeque::from([root]);
    let mut seen: HashSet<Digest> = HashSet::from([root]);
    while let Some(hash) = reached.pop_front() {
        let Some(row) = sent.get(&hash) else { continue };
        for child in row.children() {
            *parents.entry(child).or_default() += 1;
            if seen.insert(child) {
                reached.push_back(child);
            }
        }
    }
    let mut depth: HashMap<Digest, usize> = HashMap::from([(root, 0)]);
    let mut ready = VecDeque::from([root]);
    while let Some(hash) = ready.pop_front() {
        let here = depth[&hash];
        let Some(row) = sent.get(&hash) else { continue };
        for child in row.children() {
            let d = depth.entry(child).or_default();
            *d = (*d).max(here + 1);
            if *d > merkle_core::MAX_DEPTH {
                return Err(too_deep());
            }
            let left = parents.get_mut(&child).expect("counted above");
            *left -= 1;
            if *left == 0 {
                ready.push_back(child);
            }
        }
    }
    Ok(depth)
}

/// Stores the snapshot `header` names with the `sent` nodes, in one transaction. Nothing is
/// written when the build was stored already, the root is the latest, or a needed node is
/// missing.
pub async fn store(
    pool: &PgPool,
    signer: &Signer,
    header: &Header,
    sent: &HashMap<Digest, NodeRow>,
    touch_after: std::time::Duration,
) -> Result<Outcome, Error> {
    let needed = needed_from_store(header.root, sent)?;
    let depths = longest_depths(header.root, sent)?;
    let source = header.source.as_str();
    let mut conn = pool.get().await?;
    let tx = conn.transaction().await?;
    // One sync of a source at a time: the row lock is held until commit.
    tx.execute_traced(
        "INSERT INTO merkle_sources (name) VALUES ($1) ON CONFLICT (name) DO NOTHING",
        &[&source],
    )
    .await?;
    tx.execute_traced(
        "SELECT 1 FROM merkle_sources WHERE name = $1 FOR UPDATE",
        &[&source],
    )
    .await?;
    if let Some(done) = store::by_build(&tx, source, &header.build_id).await? {
        tx.rollback().await?;
        return replay(header, done);
    }
    let latest = store::latest(&tx, source).await?;
    if let Some(latest) = latest.as_ref().filter(|l| l.root == header.root) {
        // Another sync stored this root meanwhile.
        tx.rollback().await?;
        return Ok(Outcome::Unchanged(latest.to_proto()));
    }

    // The subtrees the tree takes from the store must be there whole. Walking them marks
    // them used (and row-locks the old ones), so garbage collection cannot take them before
    // this commits; then every hash walked must exist, checked after the locks are held. The
    // walk starts each subtree at its depth in this tree, so the whole tree's depth is known
    // (a stored subtree too deep to hang here is refused, and the walk stops past the limit).
    let roots: Vec<&[u8]> = needed.iter().map(|(h, _)| h.0.as_slice()).collect();
    let starts: Vec<i32> = needed.iter().map(|(h, _)| depths[h] as i32).collect();
    let limit = merkle_core::MAX_DEPTH as i32;
    let rows = if roots.is_empty() {
        Vec::new()
    } else {
        tx.query_traced(
            queries::TOUCH_TREE,
            &[&roots, &touch_after.as_secs_f64(), &starts, &limit],
        )
        .await?
    };
    if rows.iter().any(|row| row.get::<_, i32>(1) > limit) {
        tx.rollback().await?;
        return Err(too_deep());
    }
    let walked: Vec<Vec<u8>> = {
        let unique: HashSet<Vec<u8>> = rows.iter().map(|row| row.get(0)).collect();
        unique.into_iter().collect()
    };
    let walked_refs: Vec<&[u8]> = walked.iter().map(Vec::as_slice).collect();
    let present: HashSet<Vec<u8>> = if walked.is_empty() {
        HashSet::new()
    } else {
        tx.query_traced(queries::EXISTING, &[&walked_refs])
            .await?
            .iter()
            .map(|row| row.get::<_, Vec<u8>>(0))
            .collect()
    };
    let mut missing: Vec<Vec<u8>> = walked
        .iter()
        .filter(|h| !present.contains(*h))
        .cloned()
        .collect();
    missing.sort();
    if let Some(first) = missing.first() {
        tx.rollback().await?;
        let first = merkle_core::digest::hex(first);
        let place = match needed.iter().find(|(h, _)| h.to_hex() == first) {
            Some((_, Some(parent))) => format!(", a subdirectory of node {parent}"),
            Some((_, None)) => ", the root".to_owned(),
            None => ", inside a stored subtree the tree refers to".to_owned(),
        };
        return Err(Error::FailedPrecondition(format!(
            "nodes: {} node(s) the tree needs were neither sent nor stored, e.g. {first}{place}; \
             call FindMissingNodes with every node hash of the tree and send each it reports missing",
            missing.len()
        )));
    }

    // In hash order: syncs of trees that share new nodes (a fleet's nodes on a fresh
    // database) then lock those rows in one order and cannot deadlock on them.
    let mut rows: Vec<&NodeRow> = sent.values().collect();
    rows.sort_unstable_by_key(|r| r.hash);
    let mut nodes_written = 0;
    for chunk in rows.chunks(INSERT_BATCH) {
        let hashes: Vec<&[u8]> = chunk.iter().map(|r| r.hash.0.as_slice()).collect();
        let encoded: Vec<&[u8]> = chunk.iter().map(|r| r.encoded.as_slice()).collect();
        let sizes: Vec<&[u8]> = chunk.iter().map(|r| r.sizes.as_slice()).collect();
        let children: Vec<&[u8]> = chunk.iter().map(|r| r.child_dirs.as_slice()).collect();
        let inserted = tx
            .query_traced(
                queries::INSERT_NODES,
                &[&hashes, &encoded, &sizes, &children],
            )
            .await?;
        nodes_written += inserted.iter().filter(|row| row.get::<_, bool>(0)).count() as u64;
    }

    let sequence = latest.as_ref().map_or(1, |l| l.sequence + 1);
    // The record is chained to the latest one (and signed) here, under the source's lock.
    let created_at = history::now_micros();
    let mut record = Record {
        source: source.to_owned(),
        sequence: sequence as u64,
        root: header.root,
        profile: header.profile,
        build_id: header.build_id.clone(),
        create_time_micros: history::micros(created_at),
        stats: header.stats,
        previous: None,
    };
    let chained = history::chain(&tx, signer, latest.as_ref(), &mut record).await?;
    let count = |n: u64| n as i64;
    let row = tx
        .query_one_traced(
            queries::INSERT_SNAPSHOT,
            &[
                &source,
                &sequence,
                &header.root.0.as_slice(),
                &(header.profile.byte() as i16),
                &header.build_id,
                &created_at,
                &count(header.stats.file_count),
                &count(header.stats.dir_count),
                &count(header.stats.symlink_count),
                &count(header.stats.skipped_count),
                &count(header.stats.total_bytes),
                &chained.previous,
                &chained.hash.0.as_slice(),
                &chained.signature,
                &chained.key_id,
            ],
        )
        .await?;
    history::set_head(&tx, signer, source, sequence, chained.hash).await?;
    tx.execute_traced(
        "UPDATE merkle_sources SET snapshot_count = snapshot_count + 1 WHERE name = $1",
        &[&source],
    )
    .await?;
    let snapshot = store::snapshot_from_row(&row)?.to_proto();
    tx.commit().await?;
    Ok(Outcome::Stored {
        snapshot,
        nodes_written,
    })
}

/// A retry of a stored build: the same root gets the same snapshot; another root is refused.
pub fn replay(header: &Header, done: Snapshot) -> Result<Outcome, Error> {
    if done.root != header.root {
        return Err(Error::AlreadyExists(format!(
            "build_id: build {:?} of source {} was stored with root {}, not {}",
            header.build_id, header.source, done.root, header.root
        )));
    }
    Ok(Outcome::Replayed(done.to_proto()))
}

#[cfg(test)]
mod tests {
    use merkle_core::{EntryKind, digest::file_leaf};
    use merkle_shared::convert::node_to_proto;

    use super::*;

    fn file(name: &str) -> Entry {
        Entry {
            name: name.as_bytes().to_vec(),
            kind: EntryKind::File,
            hash: file_leaf(name.as_bytes()),
            size: name.len() as u64,
            meta: None,
        }
    }

    fn dir(name: &str, hash: Digest) -> Entry {
        Entry {
            name: name.as_bytes().to_vec(),
            kind: EntryKind::Directory,
            hash,
            size: 0,
            meta: None,
        }
    }

    /// root/{a.txt, sub/{b.txt}}: (root hash, sub hash, the nodes as messages)
    fn tree() -> (Digest, Digest, Vec<TreeNode>) {
        let sub = DirNode {
            entries: vec![file("b.txt")],
        };
        let sub_hash = sub.hash(Profile::Content).expect("hash");
        let root = DirNode {
            entries: vec![file("a.txt"), dir("sub", sub_hash)],
        };
        let root_hash = root.hash(Profile::Content).expect("hash");
        (
            root_hash,
            sub_hash,
            vec![
                node_to_proto(sub_hash, &sub),
                node_to_proto(root_hash, &root),
            ],
        )
    }

    #[test]
    fn a_whole_tree_needs_nothing_from_the_store() {
        let (root, _, messages) = tree();
        let mut received = Received::new(Profile::Content, 1 << 20);
        for m in &messages {
            received.add(m).expect("valid node");
        }
        let sent = received.finish().expect("complete");
        assert!(needed_from_store(root, &sent).expect("a tree").is_empty());
    }

    #[test]
    fn a_node_left_out_must_come_from_the_store() {
        let (root, sub, messages) = tree();
        let mut received = Received::new(Profile::Content, 1 << 20);
        received.add(&messages[1]).expect("root only");
        let needed =
            needed_from_store(root, &received.finish().expect("complete")).expect("a tree");
        assert_eq!(needed, vec![(sub, Some(root))]);
    }

    #[test]
    fn nodes_are_checked_against_their_hash_and_the_root() {
        let (root, _, mut messages) = tree();
        let mut tampered = messages[0].clone();
        tampered.entries[0].size += 1; // sizes are not hashed: still valid
        Received::new(Profile::Content, 1 << 20)
            .add(&tampered)
            .expect("sizes are informational");
        tampered.entries[0].name = "c.txt".into();
        let err = Received::new(Profile::Content, 1 << 20)
            .add(&tampered)
            .expect_err("bad hash");
        assert!(err.to_string().contains("hash to"), "{err}");

        // A node that is not part of the tree.
        let stray = DirNode {
            entries: vec![file("stray")],
        };
        messages.push(node_to_proto(
            stray.hash(Profile::Content).expect("hash"),
            &stray,
        ));
        let mut received = Received::new(Profile::Content, 1 << 20);
        for m in &messages {
            received.add(m).expect("valid node");
        }
        let err =
            needed_from_store(root, &received.finish().expect("complete")).expect_err("stray");
        assert!(err.to_string().contains("is not part of the tree"), "{err}");
    }

    #[test]
    fn split_nodes_are_joined_and_bytes_are_bounded() {
        let (_, _, messages) = tree();
        let root = &messages[1];
        let mut first = root.clone();
        first.entries.truncate(1);
        first.more_entries = true;
        let mut second = root.clone();
        second.entries.remove(0);
        let mut received = Received::new(Profile::Content, 1 << 20);
        received.add(&first).expect("first part");
        received.add(&second).expect("second part");
        assert_eq!(received.finish().expect("complete").len(), 1);

        let mut unfinished = Received::new(Profile::Content, 1 << 20);
        unfinished.add(&first).expect("first part");
        assert!(unfinished.finish().is_err());

        let mut small = Received::new(Profile::Content, 10);
        let err = small.add(&messages[0]).expect_err("over the limit");
        assert!(matches!(err, Error::ResourceExhausted(_)), "{err}");
    }
}
