//! The tamper-evident history (docs/merkle-spec.md section 10): each source's snapshot
//! records are hash-chained (a record's hash covers the previous record's hash) and signed
//! with Ed25519; signed checkpoints name the latest record (the head) and the last record
//! retention pruned, so a truncated tail or a pruned start is still verifiable.
//!
//! [`verify`] checks a range of records as a verifier with no access to the database would:
//! continuity, every link, every hash, every signature against the trusted keys, and the
//! checkpoints. It names the first bad record and why.

use std::collections::HashMap;

use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use sha2::{Digest as _, Sha256};

use crate::{Digest, Profile, TreeStats};

/// The record encoding's domain tag and version.
pub const RECORD_DOMAIN: &[u8] = b"merkle-record-v1";
/// The checkpoint encoding's domain tag and version.
pub const CHECKPOINT_DOMAIN: &[u8] = b"merkle-checkpoint-v1";
/// The domain tag of a checkpoint that names who caused it (version 2).
pub const CHECKPOINT_DOMAIN_V2: &[u8] = b"merkle-checkpoint-v2";
/// A checkpoint naming a source's latest record.
pub const HEAD: &str = "head";
/// A checkpoint naming the last record retention pruned; the kept records follow it.
pub const PRUNED: &str = "pruned";

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// One snapshot record: what the chain covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub source: String,
    pub sequence: u64,
    pub root: Digest,
    pub profile: Profile,
    pub build_id: String,
    /// When it was stored, in microseconds since the Unix epoch (PostgreSQL's precision).
    pub create_time_micros: i64,
    pub stats: TreeStats,
    /// The previous record's hash; `None` for a source's first record.
    pub previous: Option<Digest>,
}

impl Record {
    /// The record's canonical encoding (spec section 10.1).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(160 + self.source.len() + self.build_id.len());
        out.extend_from_slice(RECORD_DOMAIN);
        put_str(&mut out, &self.source);
        out.extend_from_slice(&self.sequence.to_be_bytes());
        out.extend_from_slice(&self.root.0);
        out.push(self.profile.byte());
        put_str(&mut out, &self.build_id);
        out.extend_from_slice(&self.create_time_micros.to_be_bytes());
        for n in [
            self.stats.file_count,
            self.stats.dir_count,
            self.stats.symlink_count,
            self.stats.skipped_count,
            self.stats.total_bytes,
        ] {
            out.extend_from_slice(&n.to_be_bytes());
        }
        match &self.previous {
            None => out.push(0),
            Some(previous) => {
                out.push(1);
                out.extend_from_slice(&previous.0);
            }
        }
        out
    }

    /// Parses bytes made by [`Record::encode`]; `decode(b)` then `encode` gives `b` again,
    /// so a record carried in its encoding is checked by hashing those bytes.
    pub fn decode(bytes: &[u8]) -> Result<Record, &'static str> {
        struct Reader<'a>(&'a [u8]);
        impl<'a> Reader<'a> {
            fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
                if self.0.len() < n {
                    return Err("the record ends early");
                }
                let (head, tail) = self.0.split_at(n);
                self.0 = tail;
                Ok(head)
            }
            fn u64(&mut self) -> Result<u64, &'static str> {
                Ok(u64::from_be_bytes(
                    self.take(8)?.try_into().unwrap_or_default(),
                ))
            }
            fn digest(&mut self) -> Result<Digest, &'static str> {
                Ok(Digest(self.take(32)?.try_into().unwrap_or_default()))
            }
            fn string(&mut self) -> Result<String, &'static str> {
                let len = u32::from_be_bytes(self.take(4)?.try_into().unwrap_or_default());
                String::from_utf8(self.take(len as usize)?.to_vec())
                    .map_err(|_| "a string is not UTF-8")
            }
        }
        let mut r = Reader(bytes);
        if r.take(RECORD_DOMAIN.len())? != RECORD_DOMAIN {
            return Err("not a record (wrong domain tag)");
        }
        let source = r.string()?;
        let sequence = r.u64()?;
        let root = r.digest()?;
        let profile = Profile::from_byte(r.take(1)?[0]).ok_or("unknown profile")?;
        let build_id = r.string()?;
        let create_time_micros = r.u64()? as i64;
        let mut counts = [0u64; 5];
        for n in &mut counts {
            *n = r.u64()?;
        }
        let [
            file_count,
            dir_count,
            symlink_count,
            skipped_count,
            total_bytes,
        ] = counts;
        let previous = match r.take(1)?[0] {
            0 => None,
            1 => Some(r.digest()?),
            _ => return Err("bad previous-record marker"),
        };
        if !r.0.is_empty() {
            return Err("bytes after the record");
        }
        Ok(Record {
            source,
            sequence,
            root,
            profile,
            build_id,
            create_time_micros,
            stats: TreeStats {
                file_count,
                dir_count,
                symlink_count,
                skipped_count,
                total_bytes,
            },
            previous,
        })
    }

    /// The record hash: SHA-256 of [`Record::encode`].
    pub fn hash(&self) -> Digest {
        Digest(Sha256::digest(self.encode()).into())
    }
}

/// A signed statement about a source's chain: its record `sequence` has `record_hash`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// [`HEAD`] or [`PRUNED`].
    pub kind: String,
    pub source: String,
    pub sequence: u64,
    pub record_hash: Digest,
    /// Who caused it (a pruning checkpoint: the identity that set the retention policy);
    /// empty when not recorded. Covered by the hash (encoding version 2) when set.
    pub actor: String,
}

impl Checkpoint {
    /// The checkpoint hash (spec section 10.2), which is what is signed: version 1 without
    /// an actor, version 2 (the actor appended) with one.
    pub fn hash(&self) -> Digest {
        let mut out = Vec::with_capacity(80 + self.source.len() + self.actor.len());
        let v2 = !self.actor.is_empty();
        out.extend_from_slice(if v2 {
            CHECKPOINT_DOMAIN_V2
        } else {
            CHECKPOINT_DOMAIN
        });
        put_str(&mut out, &self.kind);
        put_str(&mut out, &self.source);
        out.extend_from_slice(&self.sequence.to_be_bytes());
        out.extend_from_slice(&self.record_hash.0);
        if v2 {
            put_str(&mut out, &self.actor);
        }
        Digest(Sha256::digest(out).into())
    }
}

/// An Ed25519 signature and the id of the key that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seal {
    pub key_id: String,
    pub signature: [u8; 64],
}

/// A key's id: the first 8 bytes of SHA-256 of its 32-byte public key, in hex.
pub fn key_id(key: &VerifyingKey) -> String {
    crate::digest::hex(&Sha256::digest(key.as_bytes())[..8])
}

/// Signs a record or checkpoint hash.
pub fn seal(key: &SigningKey, hash: &Digest) -> Seal {
    Seal {
        key_id: key_id(&key.verifying_key()),
        signature: key.sign(&hash.0).to_bytes(),
    }
}

/// A record as stored: its fields, the hash stored with it, and its signature if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    pub record: Record,
    pub record_hash: Digest,
    pub seal: Option<Seal>,
}

/// A checkpoint as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCheckpoint {
    pub checkpoint: Checkpoint,
    pub seal: Option<Seal>,
}

/// What a verification is given besides the records.
#[derive(Debug, Default)]
pub struct Trust {
    /// The trusted public keys, by key id.
    pub keys: HashMap<String, VerifyingKey>,
    /// Every record and checkpoint must be signed by a trusted key (else unsigned ones pass,
    /// their chain still checked).
    pub require_signatures: bool,
    /// The records' own signatures are not checked, one by one or at all: the caller proves
    /// the last record a leaf of a signed transparency log (section 11), which through the
    /// chain fixes every record before it. Checkpoints are still checked.
    pub records_in_log: bool,
}

impl Trust {
    pub fn new(keys: impl IntoIterator<Item = VerifyingKey>, require_signatures: bool) -> Trust {
        Trust {
            keys: keys.into_iter().map(|k| (key_id(&k), k)).collect(),
            require_signatures,
            records_in_log: false,
        }
    }

    /// The trusted key a seal names: `None` for an unsigned one that may pass.
    fn key_for(&self, seal: &Option<Seal>) -> Result<Option<&VerifyingKey>, String> {
        match seal {
            None if self.require_signatures => Err("it is not signed".into()),
            None => Ok(None),
            Some(seal) => self.keys.get(&seal.key_id).map(Some).ok_or_else(|| {
                format!("it is signed by key {}, which is not trusted", seal.key_id)
            }),
        }
    }

    fn check(&self, seal: &Option<Seal>, hash: &Digest) -> Result<(), String> {
        match (self.key_for(seal)?, seal) {
            (Some(key), Some(seal)) => key
                .verify(&hash.0, &Signature::from_bytes(&seal.signature))
                .map_err(|_| bad_signature(seal)),
            _ => Ok(()),
        }
    }
}

fn bad_signature(seal: &Seal) -> String {
    format!("its signature by key {} does not verify", seal.key_id)
}

/// Records whose signatures are checked together: a batch verification costs about a third
/// of one-by-one checks, and batches run on every core.
const SIGNATURE_BATCH: usize = 256;

/// The index of the first record whose seal names a trusted key but whose signature does not
/// verify (unsigned and untrusted seals are the sequential pass's to report).
fn first_bad_signature(records: &[StoredRecord], trust: &Trust) -> Option<usize> {
    use rayon::prelude::*;
    records
        .par_chunks(SIGNATURE_BATCH)
        .enumerate()
        .filter_map(|(chunk, batch)| {
            let signed: Vec<(usize, &VerifyingKey, &Seal, &Digest)> = batch
                .iter()
                .enumerate()
                .filter_map(|(i, r)| {
                    let seal = r.seal.as_ref()?;
                    let key = trust.keys.get(&seal.key_id)?;
                    Some((chunk * SIGNATURE_BATCH + i, key, seal, &r.record_hash))
                })
                .collect();
            let messages: Vec<&[u8]> = signed.iter().map(|s| &s.3.0[..]).collect();
            let signatures: Vec<Signature> = signed
                .iter()
                .map(|s| Signature::from_bytes(&s.2.signature))
                .collect();
            let keys: Vec<VerifyingKey> = signed.iter().map(|s| *s.1).collect();
            if ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_ok() {
                return None;
            }
            // Some signature in the batch is bad: find the first one by itself.
            signed
                .iter()
                .zip(&signatures)
                .find(|((_, key, _, hash), signature)| key.verify(&hash.0, signature).is_err())
                .map(|((index, ..), _)| *index)
        })
        .min()
}

/// The first bad record (or checkpoint) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {why}")]
pub struct Failure {
    /// `record 17`, `the head checkpoint`, ...
    pub what: String,
    pub why: String,
    /// The sequence number concerned, when there is one.
    pub sequence: Option<u64>,
}

fn fail(what: impl Into<String>, sequence: Option<u64>, why: impl Into<String>) -> Failure {
    Failure {
        what: what.into(),
        why: why.into(),
        sequence,
    }
}

/// What a successful verification covered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verified {
    pub records: u64,
    pub first: u64,
    pub last: u64,
    /// Records by signing key id.
    pub signed_by: HashMap<String, u64>,
    pub unsigned: u64,
}

/// Verifies `records` (one source, oldest first): every record's hash, its link to the one
/// before, continuity, and signatures under `trust`. `pruned` is the checkpoint the records
/// start after when older records were pruned; `head` is the latest record's checkpoint, and
/// with `to_latest` (the range runs to the newest record) the records must reach it.
pub fn verify(
    records: &[StoredRecord],
    pruned: Option<&StoredCheckpoint>,
    head: Option<&StoredCheckpoint>,
    to_latest: bool,
    trust: &Trust,
) -> Result<Verified, Failure> {
    // In chain order: the start, the records, the head.
    let check_checkpoint = |checkpoint: Option<&StoredCheckpoint>, name: &str| {
        checkpoint.map_or(Ok(()), |c| {
            trust
                .check(&c.seal, &c.checkpoint.hash())
                .map_err(|why| fail(name, Some(c.checkpoint.sequence), why))
        })
    };
    check_checkpoint(pruned, "the pruning checkpoint")?;
    let bad_signature_at = if trust.records_in_log {
        None
    } else {
        first_bad_signature(records, trust)
    };
    let mut verified = Verified::default();
    let mut previous: Option<&StoredRecord> = None;
    for (index, stored) in records.iter().enumerate() {
        let r = &stored.record;
        let what = format!("record {}", r.sequence);
        let here = Some(r.sequence);
        match previous {
            Some(p) => {
                if r.sequence != p.record.sequence + 1 {
                    return Err(fail(
                        what,
                        here,
                        format!(
                            "it follows record {}: record {} is missing or out of order",
                            p.record.sequence,
                            p.record.sequence + 1
                        ),
                    ));
                }
                if r.previous != Some(p.record_hash) {
                    return Err(fail(
                        what,
                        here,
                        format!(
                            "it does not link to record {}: its previous hash is {}, that record's hash is {}",
                            p.record.sequence,
                            r.previous
                                .map(|d| d.to_hex())
                                .unwrap_or_else(|| "none".into()),
                            p.record_hash
                        ),
                    ));
                }
            }
            None => match pruned {
                Some(c)
                    if r.sequence == c.checkpoint.sequence + 1
                        && r.previous != Some(c.checkpoint.record_hash) =>
                {
                    return Err(fail(
                        what,
                        here,
                        format!(
                            "it does not link to the pruning checkpoint (record {}, hash {})",
                            c.checkpoint.sequence, c.checkpoint.record_hash
                        ),
                    ));
                }
                Some(c) if r.sequence == c.checkpoint.sequence + 1 => {}
                Some(c) if r.sequence <= c.checkpoint.sequence => {
                    return Err(fail(
                        what,
                        here,
                        format!(
                            "records up to {} were pruned, yet it is still listed",
                            c.checkpoint.sequence
                        ),
                    ));
                }
                _ if r.sequence == 1 && r.previous.is_some() => {
                    return Err(fail(what, here, "the first record names a previous record"));
                }
                _ => {}
            },
        }
        if r.sequence > 1 && r.previous.is_none() {
            return Err(fail(what, here, "it names no previous record"));
        }
        let computed = r.hash();
        if computed != stored.record_hash {
            return Err(fail(
                what,
                here,
                format!(
                    "its fields hash to {computed}, not to its stored record hash {}: a field was changed",
                    stored.record_hash
                ),
            ));
        }
        if !trust.records_in_log {
            trust
                .key_for(&stored.seal)
                .map_err(|why| fail(what.clone(), here, why))?;
            if let (Some(seal), Some(true)) = (&stored.seal, bad_signature_at.map(|at| at == index))
            {
                return Err(fail(what, here, bad_signature(seal)));
            }
            match &stored.seal {
                Some(seal) => *verified.signed_by.entry(seal.key_id.clone()).or_insert(0) += 1,
                None => verified.unsigned += 1,
            }
        }
        if verified.records == 0 {
            verified.first = r.sequence;
        }
        verified.records += 1;
        verified.last = r.sequence;
        previous = Some(stored);
    }
    check_checkpoint(head, "the head checkpoint")?;
    if let Some(h) = head {
        let c = &h.checkpoint;
        if let Some(at) = records.iter().find(|s| s.record.sequence == c.sequence)
            && at.record_hash != c.record_hash
        {
            return Err(fail(
                format!("record {}", c.sequence),
                Some(c.sequence),
                format!(
                    "the signed head names hash {} for it, the record has {}",
                    c.record_hash, at.record_hash
                ),
            ));
        }
        if to_latest && c.sequence > verified.last {
            return Err(fail(
                format!("record {}", verified.last + 1),
                Some(verified.last + 1),
                format!(
                    "the records end at {}, but the signed head names record {} (hash {}): the tail was truncated",
                    verified.last, c.sequence, c.record_hash
                ),
            ));
        }
    }
    Ok(verified)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> SigningKey {
        SigningKey::from_bytes(&[byte; 32])
    }

    fn chain(n: u64, key: Option<&SigningKey>) -> Vec<StoredRecord> {
        let mut out: Vec<StoredRecord> = Vec::new();
        for sequence in 1..=n {
            let record = Record {
                source: "docs".into(),
                sequence,
                root: Digest([sequence as u8; 32]),
                profile: Profile::Content,
                build_id: format!("b-{sequence}"),
                create_time_micros: 1_764_000_000_000_000 + sequence as i64,
                stats: TreeStats {
                    file_count: sequence,
                    ..TreeStats::default()
                },
                previous: out.last().map(|p| p.record_hash),
            };
            let record_hash = record.hash();
            out.push(StoredRecord {
                seal: key.map(|k| seal(k, &record_hash)),
                record,
                record_hash,
            });
        }
        out
    }

    fn head(records: &[StoredRecord], key: &SigningKey) -> StoredCheckpoint {
        let last = records.last().expect("a record");
        let checkpoint = Checkpoint {
            kind: HEAD.into(),
            source: "docs".into(),
            sequence: last.record.sequence,
            record_hash: last.record_hash,
            actor: String::new(),
        };
        StoredCheckpoint {
            seal: Some(seal(key, &checkpoint.hash())),
            checkpoint,
        }
    }

    fn why(result: Result<Verified, Failure>) -> (Option<u64>, String) {
        let failure = result.expect_err("tampering is found");
        (failure.sequence, failure.why)
    }

    #[test]
    fn an_intact_chain_verifies_and_counts_signatures() {
        let k = key(1);
        let records = chain(5, Some(&k));
        let trust = Trust::new([k.verifying_key()], true);
        let verified =
            verify(&records, None, Some(&head(&records, &k)), true, &trust).expect("intact");
        assert_eq!((verified.first, verified.last, verified.records), (1, 5, 5));
        assert_eq!(verified.signed_by[&key_id(&k.verifying_key())], 5);
    }

    #[test]
    fn each_kind_of_tampering_names_the_first_bad_record() {
        let k = key(1);
        let trust = Trust::new([k.verifying_key()], true);
        let good = chain(6, Some(&k));
        let h = head(&good, &k);

        let mut changed_root = good.clone();
        changed_root[2].record.root = Digest([9; 32]);
        let (at, reason) = why(verify(&changed_root, None, Some(&h), true, &trust));
        assert_eq!(at, Some(3));
        assert!(reason.contains("a field was changed"), "{reason}");

        let mut changed_time = good.clone();
        changed_time[3].record.create_time_micros += 1;
        assert_eq!(
            why(verify(&changed_time, None, Some(&h), true, &trust)).0,
            Some(4)
        );

        let mut deleted = good.clone();
        deleted.remove(2);
        let (at, reason) = why(verify(&deleted, None, Some(&h), true, &trust));
        assert_eq!(at, Some(4));
        assert!(reason.contains("record 3 is missing"), "{reason}");

        let mut swapped = good.clone();
        swapped.swap(1, 2);
        assert_eq!(
            why(verify(&swapped, None, Some(&h), true, &trust)).0,
            Some(3)
        );

        // A record inserted with a forged signature: its links and hash are right, the
        // signature is not the key's.
        let mut forged = good.clone();
        let mut seal5 = forged[4].seal.clone().expect("sealed");
        seal5.signature[0] ^= 1;
        forged[4].seal = Some(seal5);
        let (at, reason) = why(verify(&forged, None, Some(&h), true, &trust));
        assert_eq!(at, Some(5));
        assert!(reason.contains("does not verify"), "{reason}");

        let mut untrusted = good.clone();
        untrusted[1].seal = Some(seal(&key(2), &untrusted[1].record_hash));
        let (at, reason) = why(verify(&untrusted, None, Some(&h), true, &trust));
        assert_eq!(at, Some(2));
        assert!(reason.contains("not trusted"), "{reason}");

        let truncated = &good[..4];
        let (at, reason) = why(verify(truncated, None, Some(&h), true, &trust));
        assert_eq!(at, Some(5));
        assert!(reason.contains("truncated"), "{reason}");

        let mut unsigned = good.clone();
        unsigned[0].seal = None;
        assert_eq!(
            why(verify(&unsigned, None, Some(&h), true, &trust)).0,
            Some(1)
        );
        assert!(
            verify(
                &unsigned,
                None,
                Some(&h),
                true,
                &Trust::new([k.verifying_key()], false)
            )
            .is_ok()
        );
    }

    #[test]
    fn rotated_keys_and_a_pruned_start_verify() {
        let (old, new) = (key(1), key(2));
        let mut records = chain(3, Some(&old));
        // Records 2 and 3 re-signed as if the key had rotated after record 1.
        for r in &mut records[1..] {
            r.seal = Some(seal(&new, &r.record_hash));
        }
        let trust = Trust::new([old.verifying_key(), new.verifying_key()], true);
        let h = head(&records, &new);
        assert!(verify(&records, None, Some(&h), true, &trust).is_ok());
        let only_new = Trust::new([new.verifying_key()], true);
        assert_eq!(
            why(verify(&records, None, Some(&h), true, &only_new)).0,
            Some(1)
        );

        // Records 1 and 2 pruned: the kept record 3 links to the pruning checkpoint.
        let checkpoint = Checkpoint {
            kind: PRUNED.into(),
            source: "docs".into(),
            sequence: 2,
            record_hash: records[1].record_hash,
            actor: "alice (admin)".into(),
        };
        let pruned = StoredCheckpoint {
            seal: Some(seal(&new, &checkpoint.hash())),
            checkpoint,
        };
        assert!(verify(&records[2..], Some(&pruned), Some(&h), true, &trust).is_ok());
        let mut wrong = pruned.clone();
        wrong.checkpoint.record_hash = Digest([7; 32]);
        assert!(verify(&records[2..], Some(&wrong), Some(&h), true, &trust).is_err());
    }
}
