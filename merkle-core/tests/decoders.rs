//! Property tests of every decoder of untrusted bytes in the Merkle core: stored tree nodes,
//! inclusion-proof files and signed history records. For any input they return an error or a
//! value, never panic; and an altered valid input is never taken for a different valid one.

use ed25519_dalek::SigningKey;
use merkle_core::{
    Digest, DirNode, Entry, EntryKind, Meta, Profile, TreeStats,
    digest::file_leaf,
    history::{Checkpoint, HEAD, Record, StoredCheckpoint, StoredRecord, Trust, seal, verify},
    proof::{InclusionProof, prove},
    tree::MemTree,
};
use proptest::prelude::*;

fn entry() -> impl Strategy<Value = Entry> {
    (
        "[a-z]{1,8}",
        prop_oneof![
            Just(EntryKind::File),
            Just(EntryKind::Directory),
            Just(EntryKind::Symlink)
        ],
        any::<[u8; 32]>(),
        any::<(u32, u32, u32)>(),
    )
        .prop_map(|(name, kind, hash, (perm, uid, gid))| Entry {
            name: name.into_bytes(),
            kind,
            hash: Digest(hash),
            size: 0,
            meta: Some(Meta { perm, uid, gid }),
        })
}

/// A valid node (entries sorted, names unique) and its profile.
fn node() -> impl Strategy<Value = (Profile, DirNode)> {
    (
        prop_oneof![Just(Profile::Content), Just(Profile::Full)],
        prop::collection::vec(entry(), 0..8),
    )
        .prop_map(|(profile, mut entries)| {
            entries.sort_by(|a, b| a.name.cmp(&b.name));
            entries.dedup_by(|a, b| a.name == b.name);
            if profile == Profile::Content {
                for e in &mut entries {
                    e.meta = None;
                }
            }
            (profile, DirNode { entries })
        })
}

/// Flips bit `bit` of byte `at` (modulo the length), or truncates, or appends.
fn alter(bytes: &mut Vec<u8>, how: u8, at: usize, bit: u8) {
    if bytes.is_empty() {
        bytes.push(how);
        return;
    }
    let at = at % bytes.len();
    match how % 3 {
        0 => bytes[at] ^= 1 << (bit % 8),
        1 => bytes.truncate(at),
        _ => bytes.push(bit),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn node_decoding_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = DirNode::decode(&bytes);
    }

    #[test]
    fn a_decoded_node_is_exactly_its_bytes((profile, node) in node(), how in any::<u8>(), at in any::<usize>(), bit in any::<u8>()) {
        let mut bytes = node.encode(profile).expect("valid node");
        let (p, decoded) = DirNode::decode(&bytes).expect("round trip");
        prop_assert_eq!((p, &decoded), (profile, &node));
        alter(&mut bytes, how, at, bit);
        // Altered bytes decode to an error, or to a node that encodes back to those bytes: the
        // hash of what is stored is always the hash of what is read.
        if let Ok((p, decoded)) = DirNode::decode(&bytes) {
            prop_assert_eq!(decoded.encode(p).expect("valid"), bytes);
        }
    }

    #[test]
    fn record_decoding_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = Record::decode(&bytes);
    }

    #[test]
    fn a_decoded_record_is_exactly_its_bytes(source in "[a-z@.]{1,12}", sequence in any::<u64>(), previous in any::<Option<[u8; 32]>>(), counts in any::<[u64; 5]>(), how in any::<u8>(), at in any::<usize>(), bit in any::<u8>()) {
        let record = Record {
            source,
            sequence,
            root: Digest([3; 32]),
            profile: Profile::Full,
            build_id: "b-1".into(),
            create_time_micros: 1_764_000_000_000_000,
            stats: TreeStats { file_count: counts[0], dir_count: counts[1], symlink_count: counts[2], skipped_count: counts[3], total_bytes: counts[4] },
            previous: previous.map(Digest),
        };
        let mut bytes = record.encode();
        prop_assert_eq!(Record::decode(&bytes).expect("round trip"), record);
        alter(&mut bytes, how, at, bit);
        // As with nodes: what is read hashes to the hash of the bytes carried.
        if let Ok(decoded) = Record::decode(&bytes) {
            prop_assert_eq!(decoded.encode(), bytes);
        }
    }

    #[test]
    fn proof_files_never_panic(text in ".{0,400}") {
        if let Ok(proof) = InclusionProof::from_json(&text) {
            let _ = proof.verify();
        }
    }

    #[test]
    fn an_altered_proof_never_proves_something_else(pick in 0usize..3, at in any::<usize>(), bit in 0u8..7) {
        let leaf = |name: &str| Entry {
            name: name.as_bytes().to_vec(),
            kind: EntryKind::File,
            hash: file_leaf(name.as_bytes()),
            size: 1,
            meta: None,
        };
        let sub = DirNode { entries: vec![leaf("a"), leaf("b"), leaf("c")] };
        let sub_hash = sub.hash(Profile::Content).expect("hash");
        let top = DirNode {
            entries: vec![Entry { name: b"d".to_vec(), kind: EntryKind::Directory, hash: sub_hash, size: 0, meta: None }],
        };
        let root = top.hash(Profile::Content).expect("hash");
        let tree = MemTree {
            root,
            profile: Profile::Content,
            nodes: [(root, top), (sub_hash, sub)].into_iter().collect(),
        };
        let path = format!("d/{}", ["a", "b", "c"][pick]);
        let proof = prove(&tree, root, Profile::Content, path.as_bytes()).expect("proof");
        let original = proof.verify().expect("verifies").clone();
        let mut text = proof.to_json().into_bytes();
        let at = at % text.len();
        text[at] ^= 1 << bit;
        if let Ok(text) = String::from_utf8(text)
            && let Ok(altered) = InclusionProof::from_json(&text)
            && let Ok(entry) = altered.verify()
        {
            // What still verifies is true of the same root: an alteration can at most turn a
            // proof into another true one (the full directory node also proves its siblings).
            // Sizes are not hashed, so a proof does not carry them.
            let fact = |e: &Entry| Entry { size: 0, ..e.clone() };
            prop_assert_eq!(altered.root, root);
            if altered.path == proof.path {
                prop_assert_eq!(fact(entry), fact(&original));
            } else {
                let path = altered.path.join(&b'/');
                let truth = prove(&tree, root, Profile::Content, &path).expect("what verifies exists");
                prop_assert_eq!(fact(entry), fact(truth.verify().expect("verifies")));
            }
        }
    }

    #[test]
    fn an_altered_signed_history_never_verifies(field in 0usize..6, which in 0usize..4, delta in 1u64..1000) {
        let key = SigningKey::from_bytes(&[7; 32]);
        let mut records: Vec<StoredRecord> = Vec::new();
        for sequence in 1..=4u64 {
            let record = Record {
                source: "docs".into(),
                sequence,
                root: Digest([sequence as u8; 32]),
                profile: Profile::Content,
                build_id: format!("b-{sequence}"),
                create_time_micros: 1_764_000_000_000_000 + sequence as i64,
                stats: TreeStats::default(),
                previous: records.last().map(|r| r.record_hash),
            };
            let record_hash = record.hash();
            records.push(StoredRecord { seal: Some(seal(&key, &record_hash)), record, record_hash });
        }
        let last = records.last().expect("records");
        let checkpoint = Checkpoint {
            kind: HEAD.into(),
            source: "docs".into(),
            sequence: last.record.sequence,
            record_hash: last.record_hash,
            actor: String::new(),
        };
        let head = StoredCheckpoint { seal: Some(seal(&key, &checkpoint.hash())), checkpoint };
        let trust = Trust::new([key.verifying_key()], true);
        prop_assert!(verify(&records, None, Some(&head), true, &trust).is_ok());
        let r = &mut records[which].record;
        match field {
            0 => r.sequence += delta,
            1 => r.root.0[0] ^= delta as u8 | 1,
            2 => r.build_id.push('x'),
            3 => r.create_time_micros += delta as i64,
            4 => r.stats.file_count += delta,
            _ => r.source.push('x'),
        }
        prop_assert!(verify(&records, None, Some(&head), true, &trust).is_err());
    }
}
