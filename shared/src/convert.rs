//! Conversions between the Merkle core's types and the contract's messages, in one place for
//! every service and the CLI.

use merkle_core::{
    Digest, DirNode, Entry, EntryKind, Meta, Profile, TreeStats,
    diff::{Change, ChangeType},
    history::{Checkpoint, Record, Seal, StoredCheckpoint, StoredRecord},
    node::NodeError,
    proof::InclusionProof,
};
use merkle_proto::{common::v1 as pb, dbsync::v1 as dbsync};

/// A `google.protobuf.Duration` from a request, checked against the type's own rules (nanos
/// within ±999,999,999 and of the seconds' sign) and the caller's: not negative, at most
/// `max` (`max_text` says it in words). The error is the rule broken, for the caller to prefix
/// with the field.
pub fn duration_from_proto(
    d: &prost_types::Duration,
    max: std::time::Duration,
    max_text: &str,
) -> Result<std::time::Duration, String> {
    if !(-999_999_999..=999_999_999).contains(&d.nanos) {
        return Err(format!(
            "nanos is {}; a Duration's nanos must be within -999999999..=999999999",
            d.nanos
        ));
    }
    if (d.seconds > 0 && d.nanos < 0) || (d.seconds < 0 && d.nanos > 0) {
        return Err("seconds and nanos must have the same sign".into());
    }
    if d.seconds < 0 || d.nanos < 0 {
        return Err("must not be negative".into());
    }
    let seconds = u64::try_from(d.seconds).map_err(|_| "must not be negative".to_owned())?;
    if seconds > max.as_secs() {
        return Err(format!("must be at most {max_text}"));
    }
    let value = std::time::Duration::new(seconds, d.nanos as u32);
    if value > max {
        return Err(format!("must be at most {max_text}"));
    }
    Ok(value)
}

/// A `google.protobuf.Timestamp` from a request, checked against the type's rules: nanos within
/// 0..=999,999,999 and a time from 0001-01-01 to 9999-12-31 (UTC).
pub fn timestamp_from_proto(t: &prost_types::Timestamp) -> Result<std::time::SystemTime, String> {
    const MIN_SECONDS: i64 = -62_135_596_800;
    const MAX_SECONDS: i64 = 253_402_300_799;
    if !(0..=999_999_999).contains(&t.nanos) {
        return Err(format!(
            "nanos is {}; a Timestamp's nanos must be within 0..=999999999",
            t.nanos
        ));
    }
    if !(MIN_SECONDS..=MAX_SECONDS).contains(&t.seconds) {
        return Err("must be between 0001-01-01 and 9999-12-31".into());
    }
    std::time::SystemTime::try_from(*t).map_err(|_| "is not a representable time".into())
}

/// The contract's profile; UNSPECIFIED means content.
pub fn profile_from_proto(value: i32) -> Result<Profile, String> {
    match pb::Profile::try_from(value) {
        Ok(pb::Profile::Unspecified | pb::Profile::Content) => Ok(Profile::Content),
        Ok(pb::Profile::Full) => Ok(Profile::Full),
        Err(_) => Err(format!(
            "profile: {value} is not a known profile (use PROFILE_CONTENT or PROFILE_FULL)"
        )),
    }
}

pub fn profile_to_proto(profile: Profile) -> pb::Profile {
    match profile {
        Profile::Content => pb::Profile::Content,
        Profile::Full => pb::Profile::Full,
    }
}

pub fn kind_to_proto(kind: EntryKind) -> pb::EntryKind {
    match kind {
        EntryKind::File => pb::EntryKind::File,
        EntryKind::Executable => pb::EntryKind::Executable,
        EntryKind::Directory => pb::EntryKind::Directory,
        EntryKind::Symlink => pb::EntryKind::Symlink,
    }
}

pub fn kind_from_proto(value: i32) -> Result<EntryKind, String> {
    match pb::EntryKind::try_from(value) {
        Ok(pb::EntryKind::File) => Ok(EntryKind::File),
        Ok(pb::EntryKind::Executable) => Ok(EntryKind::Executable),
        Ok(pb::EntryKind::Directory) => Ok(EntryKind::Directory),
        Ok(pb::EntryKind::Symlink) => Ok(EntryKind::Symlink),
        _ => Err(format!("kind: {value} is not a known entry kind")),
    }
}

/// A name or path as the contract carries it: the UTF-8 text (lossy when not UTF-8) and the
/// exact bytes only when they are not UTF-8.
pub fn name_to_proto(bytes: &[u8]) -> (String, Vec<u8>) {
    match std::str::from_utf8(bytes) {
        Ok(s) => (s.to_owned(), Vec::new()),
        Err(_) => (String::from_utf8_lossy(bytes).into_owned(), bytes.to_vec()),
    }
}

/// The exact bytes of a name or path from its text and raw forms (raw wins when set).
pub fn name_from_proto(text: &str, raw: &[u8]) -> Vec<u8> {
    if raw.is_empty() {
        text.as_bytes().to_vec()
    } else {
        raw.to_vec()
    }
}

pub fn entry_to_proto(entry: &Entry) -> pb::DirectoryEntry {
    let (name, raw_name) = name_to_proto(&entry.name);
    let meta = entry.meta.unwrap_or_default();
    pb::DirectoryEntry {
        name,
        raw_name,
        kind: kind_to_proto(entry.kind) as i32,
        hash: entry.hash.to_hex(),
        size: entry.size,
        mode: meta.perm,
        uid: meta.uid,
        gid: meta.gid,
    }
}

/// An entry from the contract; `full` says whether mode, uid and gid are part of it.
pub fn entry_from_proto(entry: &pb::DirectoryEntry, full: bool) -> Result<Entry, String> {
    Ok(Entry {
        name: name_from_proto(&entry.name, &entry.raw_name),
        kind: kind_from_proto(entry.kind)?,
        hash: entry
            .hash
            .parse::<Digest>()
            .map_err(|e| format!("hash: {e}"))?,
        size: entry.size,
        meta: full.then_some(Meta {
            perm: entry.mode,
            uid: entry.uid,
            gid: entry.gid,
        }),
    })
}

pub fn node_to_proto(hash: Digest, node: &DirNode) -> pb::TreeNode {
    pb::TreeNode {
        hash: hash.to_hex(),
        entries: node.entries.iter().map(entry_to_proto).collect(),
        more_entries: false,
    }
}

pub fn stats_to_proto(stats: &TreeStats) -> pb::TreeStats {
    pb::TreeStats {
        file_count: stats.file_count,
        dir_count: stats.dir_count,
        symlink_count: stats.symlink_count,
        skipped_count: stats.skipped_count,
        total_bytes: stats.total_bytes,
    }
}

/// Tree statistics from a request that will be stored: each count at most `i64::MAX` (what
/// PostgreSQL's `bigint` holds). The error names the counter and the rule.
pub fn stats_to_store(stats: &pb::TreeStats) -> Result<TreeStats, String> {
    for (name, value) in [
        ("file_count", stats.file_count),
        ("dir_count", stats.dir_count),
        ("symlink_count", stats.symlink_count),
        ("skipped_count", stats.skipped_count),
        ("total_bytes", stats.total_bytes),
    ] {
        if value > i64::MAX as u64 {
            return Err(format!("{name}: is {value}; at most {}", i64::MAX));
        }
    }
    Ok(stats_from_proto(stats))
}

pub fn stats_from_proto(stats: &pb::TreeStats) -> TreeStats {
    TreeStats {
        file_count: stats.file_count,
        dir_count: stats.dir_count,
        symlink_count: stats.symlink_count,
        skipped_count: stats.skipped_count,
        total_bytes: stats.total_bytes,
    }
}

/// A hex digest field; empty is `None`.
fn optional_digest(field: &str, hex: &str) -> Result<Option<Digest>, String> {
    if hex.is_empty() {
        return Ok(None);
    }
    hex.parse()
        .map(Some)
        .map_err(|_| format!("{field}: {hex:?} is not 64 hex digits"))
}

/// A signature and key id; both empty is unsigned.
fn seal_from_proto(signature: &str, key_id: &str) -> Result<Option<Seal>, String> {
    if signature.is_empty() && key_id.is_empty() {
        return Ok(None);
    }
    let signature = merkle_core::digest::unhex(signature)
        .and_then(|b| <[u8; 64]>::try_from(b).ok())
        .ok_or_else(|| format!("signature: {signature:?} is not 128 hex digits"))?;
    Ok(Some(Seal {
        key_id: key_id.to_owned(),
        signature,
    }))
}

/// A history record as GetHistoryProof returns it, as the verifier checks it. The create time
/// counts in whole microseconds, as stored and hashed.
pub fn record_from_proto(s: &dbsync::Snapshot) -> Result<StoredRecord, String> {
    let time = s.create_time.unwrap_or_default();
    let record = Record {
        source: s.source.clone(),
        sequence: s.sequence,
        root: s
            .root_hash
            .parse()
            .map_err(|_| format!("root_hash: {:?} is not 64 hex digits", s.root_hash))?,
        profile: profile_from_proto(s.profile)?,
        build_id: s.build_id.clone(),
        create_time_micros: time.seconds * 1_000_000 + i64::from(time.nanos) / 1_000,
        stats: s.stats.as_ref().map(stats_from_proto).unwrap_or_default(),
        previous: optional_digest("previous_record_hash", &s.previous_record_hash)?,
    };
    Ok(StoredRecord {
        record,
        record_hash: optional_digest("record_hash", &s.record_hash)?
            .ok_or("record_hash: the record is not chained")?,
        seal: seal_from_proto(&s.signature, &s.key_id)?,
    })
}

pub fn checkpoint_from_proto(c: &dbsync::HistoryCheckpoint) -> Result<StoredCheckpoint, String> {
    Ok(StoredCheckpoint {
        checkpoint: Checkpoint {
            kind: c.kind.clone(),
            source: c.source.clone(),
            sequence: c.sequence,
            record_hash: optional_digest("record_hash", &c.record_hash)?
                .ok_or("record_hash: the checkpoint names no record hash")?,
            actor: c.actor.clone(),
        },
        seal: seal_from_proto(&c.signature, &c.key_id)?,
    })
}

pub fn change_to_proto(change: &Change) -> pb::PathChange {
    let (path, raw_path) = name_to_proto(&change.path);
    let change_type = match change.change {
        ChangeType::Added => pb::ChangeType::Added,
        ChangeType::Removed => pb::ChangeType::Removed,
        ChangeType::Modified => pb::ChangeType::Modified,
        ChangeType::KindChanged => pb::ChangeType::KindChanged,
    };
    pb::PathChange {
        path,
        raw_path,
        change_type: change_type as i32,
        old_kind: change.old.map_or(0, |s| kind_to_proto(s.kind) as i32),
        new_kind: change.new.map_or(0, |s| kind_to_proto(s.kind) as i32),
        old_hash: change.old.map(|s| s.hash.to_hex()).unwrap_or_default(),
        new_hash: change.new.map(|s| s.hash.to_hex()).unwrap_or_default(),
    }
}

/// A changed path from the contract.
pub fn change_from_proto(change: &pb::PathChange) -> Result<Change, String> {
    let change_type = match pb::ChangeType::try_from(change.change_type) {
        Ok(pb::ChangeType::Added) => ChangeType::Added,
        Ok(pb::ChangeType::Removed) => ChangeType::Removed,
        Ok(pb::ChangeType::Modified) => ChangeType::Modified,
        Ok(pb::ChangeType::KindChanged) => ChangeType::KindChanged,
        _ => {
            return Err(format!(
                "change_type: {} is not a known change",
                change.change_type
            ));
        }
    };
    let side = |kind: i32, hash: &str| -> Result<Option<merkle_core::diff::Side>, String> {
        if kind == 0 && hash.is_empty() {
            return Ok(None);
        }
        Ok(Some(merkle_core::diff::Side {
            kind: kind_from_proto(kind)?,
            hash: hash.parse().map_err(|e| format!("hash: {e}"))?,
        }))
    };
    Ok(Change {
        path: name_from_proto(&change.path, &change.raw_path),
        change: change_type,
        old: side(change.old_kind, &change.old_hash)?,
        new: side(change.new_kind, &change.new_hash)?,
    })
}

/// An inclusion proof as the contract carries it (each node with its hash, and the proven
/// entry).
pub fn proof_to_proto(proof: &InclusionProof) -> Result<pb::InclusionProof, NodeError> {
    let (path, raw_path) = name_to_proto(&proof.path.join(&b'/'));
    let nodes = proof
        .nodes
        .iter()
        .map(|n| Ok(node_to_proto(n.hash(proof.profile)?, n)))
        .collect::<Result<Vec<_>, NodeError>>()?;
    let entry = proof
        .nodes
        .last()
        .zip(proof.path.last())
        .and_then(|(node, name)| node.get(name))
        .map(entry_to_proto);
    Ok(pb::InclusionProof {
        root_hash: proof.root.to_hex(),
        path,
        raw_path,
        nodes,
        entry,
        profile: profile_to_proto(proof.profile) as i32,
    })
}

/// The proof in a contract message, ready to verify (`InclusionProof::verify`) or to write
/// as a proof file.
pub fn proof_from_proto(proof: &pb::InclusionProof) -> Result<InclusionProof, String> {
    let profile = profile_from_proto(proof.profile)?;
    let full = profile == Profile::Full;
    let nodes = proof
        .nodes
        .iter()
        .map(|n| {
            Ok(DirNode {
                entries: n
                    .entries
                    .iter()
                    .map(|e| entry_from_proto(e, full))
                    .collect::<Result<_, String>>()?,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let path = name_from_proto(&proof.path, &proof.raw_path);
    Ok(InclusionProof {
        profile,
        root: proof
            .root_hash
            .parse()
            .map_err(|e| format!("root_hash: {e}"))?,
        path: path.split(|b| *b == b'/').map(<[u8]>::to_vec).collect(),
        nodes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_timestamps_follow_the_types_rules() {
        let d = |seconds, nanos| prost_types::Duration { seconds, nanos };
        let max = std::time::Duration::from_secs(3600);
        assert_eq!(
            duration_from_proto(&d(1, 500), max, "1h"),
            Ok(std::time::Duration::new(1, 500))
        );
        for (bad, rule) in [
            (d(1, 2_000_000_000), "nanos is 2000000000"),
            (d(1, -5), "same sign"),
            (d(-1, 0), "negative"),
            (d(3601, 0), "at most 1h"),
            (d(3600, 1), "at most 1h"),
            (d(i64::MAX, 0), "at most 1h"),
        ] {
            let err = duration_from_proto(&bad, max, "1h").expect_err("refused");
            assert!(err.contains(rule), "{bad:?}: {err}");
        }
        let t = |seconds, nanos| prost_types::Timestamp { seconds, nanos };
        assert!(timestamp_from_proto(&t(1_764_000_000, 0)).is_ok());
        assert!(timestamp_from_proto(&t(1, -1)).is_err());
        assert!(timestamp_from_proto(&t(1, 1_000_000_000)).is_err());
        assert!(timestamp_from_proto(&t(i64::MAX, 0)).is_err());
    }
    use merkle_core::digest::file_leaf;

    #[test]
    fn entries_round_trip_including_non_utf8_names() {
        let entry = Entry {
            name: b"f\xffo".to_vec(),
            kind: EntryKind::Executable,
            hash: file_leaf(b"x"),
            size: 1,
            meta: Some(Meta {
                perm: 0o755,
                uid: 1,
                gid: 2,
            }),
        };
        let pb = entry_to_proto(&entry);
        assert_eq!(pb.raw_name, b"f\xffo");
        assert_eq!(entry_from_proto(&pb, true), Ok(entry));
    }

    #[test]
    fn unknown_enum_values_are_named() {
        assert!(profile_from_proto(9).unwrap_err().starts_with("profile:"));
        assert!(kind_from_proto(0).unwrap_err().starts_with("kind:"));
        assert_eq!(profile_from_proto(0), Ok(Profile::Content));
    }
}
