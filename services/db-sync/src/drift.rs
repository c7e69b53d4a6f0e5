//! Drift: sources (a fleet source's node histories, or named sources) grouped by their latest
//! root, the most common root the baseline, and each other group's tree diffed against the
//! baseline's once, with the stored-tree diff of [`browse`]: the cost follows what differs,
//! not how many nodes share a tree or how large it is.

use std::collections::HashMap;

use merkle_core::{Digest, Profile, diff::Change};

use crate::{browse, error::Error, nodes::NodeStore, store::Snapshot};

/// Sources whose latest snapshots share one root; members sorted by source name.
pub struct Group {
    pub root: Digest,
    pub profile: Profile,
    pub members: Vec<Snapshot>,
}

/// Groups `latest` by root, in drift order: most members first, then by root hash. The first
/// group is the baseline.
pub fn group(latest: Vec<Snapshot>) -> Vec<Group> {
    let mut by_root: HashMap<Digest, Group> = HashMap::new();
    for snapshot in latest {
        by_root
            .entry(snapshot.root)
            .or_insert_with(|| Group {
                root: snapshot.root,
                profile: snapshot.profile,
                members: Vec::new(),
            })
            .members
            .push(snapshot);
    }
    let mut groups: Vec<Group> = by_root.into_values().collect();
    for group in &mut groups {
        group.members.sort_by(|a, b| a.source.cmp(&b.source));
    }
    groups.sort_by_key(order);
    groups
}

/// A group's place in drift order (what page tokens hold): fewer members sort later.
pub fn order(group: &Group) -> (std::cmp::Reverse<usize>, Digest) {
    (std::cmp::Reverse(group.members.len()), group.root)
}

/// How one tree differs from the baseline's.
pub struct Compared {
    /// The first `max` changed paths, in path order.
    pub changes: Vec<Change>,
    /// How many paths differ in all.
    pub count: u64,
    /// Why the trees could not be compared; then there are no changes.
    pub incomparable: Option<String>,
}

/// Diffs the stored tree `root` against the stored tree `baseline` (from the baseline to it).
pub async fn compare(
    nodes: &NodeStore,
    baseline: (Digest, Profile),
    root: (Digest, Profile),
    max: usize,
) -> Result<Compared, Error> {
    if baseline.1 != root.1 {
        return Ok(Compared {
            changes: Vec::new(),
            count: 0,
            incomparable: Some(format!(
                "hashed with the {} profile, the baseline with {}",
                root.1.name(),
                baseline.1.name()
            )),
        });
    }
    let (old, new) = (baseline.0, root.0);
    let tree = browse::diff(nodes, old, new).await?;
    // The walk is in memory and synchronous: off the async workers, like DiffSnapshots.
    tokio::task::spawn_blocking(move || {
        let mut changes = Vec::new();
        let mut count = 0u64;
        browse::changes(&tree, old, new, &mut |change| {
            count += 1;
            if changes.len() < max {
                changes.push(change);
            }
            true
        })?;
        Ok(Compared {
            changes,
            count,
            incomparable: None,
        })
    })
    .await
    .map_err(|e| Error::Internal(format!("the drift diff stopped: {e}")))?
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    fn snapshot(source: &str, root: u8) -> Snapshot {
        Snapshot {
            id: 1,
            source: source.into(),
            sequence: 1,
            root: Digest([root; 32]),
            profile: Profile::default(),
            build_id: String::new(),
            created_at: SystemTime::UNIX_EPOCH,
            stats: Default::default(),
            previous_record_hash: None,
            record_hash: None,
            signature: None,
            key_id: None,
        }
    }

    #[test]
    fn groups_come_most_members_first_then_by_root_with_members_by_name() {
        let groups = group(vec![
            snapshot("f@c", 9),
            snapshot("f@a", 2),
            snapshot("f@b", 9),
            snapshot("f@d", 1),
            snapshot("f@e", 9),
        ]);
        let shape: Vec<(u8, Vec<&str>)> = groups
            .iter()
            .map(|g| {
                (
                    g.root.0[0],
                    g.members.iter().map(|m| m.source.as_str()).collect(),
                )
            })
            .collect();
        assert_eq!(
            shape,
            vec![
                (9, vec!["f@b", "f@c", "f@e"]),
                (1, vec!["f@d"]),
                (2, vec!["f@a"]),
            ]
        );
    }
}
