//! Property tests of the decoders of untrusted bytes in `shared`: page tokens (from any
//! client), sealed cache values (from Redis, which anyone with its address may write) and the
//! contract's history and proof messages (from a server, or a file). For any input they return
//! an error or a value, never panic; an altered token or seal is never accepted.

use merkle_proto::{common::v1 as pb, dbsync::v1 as dbsync};
use merkle_shared::{
    cache::seal::Seal,
    convert::{checkpoint_from_proto, proof_from_proto, record_from_proto},
    page_token::PageTokens,
};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn page_tokens_never_panic_and_altered_ones_are_refused(
        position in prop::collection::vec(any::<u8>(), 0..32),
        text in ".{0,200}",
        at in any::<usize>(),
        bit in 0u8..4,
    ) {
        let tokens = PageTokens::new(b"a key of this deployment".to_vec());
        let _ = tokens.check("page_token", b"listing", &text);
        let token = tokens.issue(b"listing", &position);
        prop_assert_eq!(
            tokens.check("page_token", b"listing", &token).expect("issued here"),
            Some(position.clone())
        );
        // Another listing's token, or one character changed: refused, naming the field.
        let err = tokens.check("page_token", b"another", &token).expect_err("other listing");
        prop_assert!(err.message().starts_with("page_token: "));
        let mut bytes = token.into_bytes();
        let at = at % bytes.len();
        let hex = b"0123456789abcdef";
        let i = hex.iter().position(|&c| c == bytes[at]).unwrap_or(0);
        bytes[at] = hex[(i + 1 + bit as usize) % 16];
        let altered = String::from_utf8(bytes).expect("hex");
        prop_assert!(tokens.check("page_token", b"listing", &altered).is_err());
    }

    #[test]
    fn sealed_values_never_panic_and_altered_ones_are_refused(
        value in prop::collection::vec(any::<u8>(), 0..256),
        noise in prop::collection::vec(any::<u8>(), 0..256),
        at in any::<usize>(),
        bit in 0u8..8,
    ) {
        let seal = Seal::derived(b"a secret of this deployment", "cache");
        prop_assert!(seal.open(1, "k", &noise).is_err(), "random bytes are never a seal");
        let sealed = seal.seal(1, "k", &value);
        prop_assert_eq!(seal.open(1, "k", &sealed).expect("sealed here"), &value[..]);
        let mut altered = sealed.clone();
        let at = at % altered.len();
        altered[at] ^= 1 << bit;
        prop_assert!(seal.open(1, "k", &altered).is_err());
        prop_assert!(seal.open(1, "k", &sealed[..at]).is_err());
    }

    #[test]
    fn history_and_proof_messages_never_panic(
        hash in "[0-9a-fA-Fx]{0,70}",
        signature in "[0-9a-f]{0,130}",
        key_id in ".{0,20}",
        sequence in any::<u64>(),
        profile in any::<i32>(),
        names in prop::collection::vec(".{0,12}", 0..4),
    ) {
        let snapshot = dbsync::Snapshot {
            root_hash: hash.clone(),
            record_hash: hash.clone(),
            previous_record_hash: hash.clone(),
            signature: signature.clone(),
            key_id: key_id.clone(),
            sequence,
            profile,
            create_time: Some(prost_types::Timestamp { seconds: sequence as i64, nanos: profile }),
            ..Default::default()
        };
        let _ = record_from_proto(&snapshot);
        let _ = checkpoint_from_proto(&dbsync::HistoryCheckpoint {
            record_hash: hash.clone(),
            signature,
            key_id,
            sequence,
            ..Default::default()
        });
        let entry = |name: &String| pb::DirectoryEntry {
            name: name.clone(),
            kind: profile % 6,
            hash: hash.clone(),
            ..Default::default()
        };
        let _ = proof_from_proto(&pb::InclusionProof {
            root_hash: hash.clone(),
            path: names.join("/"),
            nodes: vec![pb::TreeNode { hash: hash.clone(), entries: names.iter().map(entry).collect(), more_entries: false }],
            entry: names.first().map(entry),
            profile,
            ..Default::default()
        });
    }
}
