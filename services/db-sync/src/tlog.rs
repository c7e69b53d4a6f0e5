//! The transparency log (docs/merkle-spec.md section 11): one append-only RFC 6962 Merkle log
//! per deployment, whose leaf `i` is the `i`th snapshot record's hash in commit order, with
//! C2SP checkpoints signed as C2SP signed notes with DbSync's Ed25519 key.
//!
//! A sync queues its record in `merkle_log_pending` in its own transaction (so nothing is left
//! out and the sync waits for nothing); every `LOG_INTERVAL` one replica at a time (a
//! PostgreSQL advisory lock) takes the queue into the log in commit order, stores the new
//! leaves and hashes in the layout of `golang.org/x/mod/sumdb/tlog` (the `tlog_tiles` crate
//! computes them), and signs one checkpoint for all of them. Proofs are read from the stored
//! hashes, any size up to the log's.

use std::{cell::RefCell, collections::HashMap, sync::Arc, time::Duration};

use ed25519_dalek::{Signer as _, SigningKey};
use merkle_shared::postgres::{PgPool, Traced as _};
use tlog_tiles::{
    Checkpoint, Hash, HashReader, prove_record, prove_tree, stored_hash_count, stored_hash_index,
    stored_hashes_for_record_hash, tree_hash,
};
use tokio_postgres::GenericClient;

use crate::error::Error;

/// The advisory lock one integrating replica holds (any constant unique to DbSync).
const INTEGRATE_LOCK: i64 = 0x6d65_726b_6c65_6c67;
/// Records taken into the log per transaction.
const BATCH: i64 = 10_000;

/// The log's identity and checkpoint key.
pub struct Log {
    origin: String,
    key: Option<NoteKey>,
    /// The note key ids of every key this replica publishes (its own and the retired ones): a
    /// checkpoint signed by one of them may be followed by this replica's.
    known: Vec<u32>,
}

/// DbSync's Ed25519 key as a signed-note key named by the origin.
struct NoteKey {
    name: String,
    id: u32,
    key: SigningKey,
    verifier: String,
}

impl signed_note::Signer for NoteKey {
    fn name(&self) -> &str {
        &self.name
    }

    fn key_id(&self) -> u32 {
        self.id
    }

    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, ed25519_dalek::SignatureError> {
        Ok(self.key.sign(msg).to_bytes().to_vec())
    }
}

/// A stored checkpoint.
pub struct StoredCheckpoint {
    pub size: u64,
    pub root: [u8; 32],
    /// The C2SP signed note.
    pub note: String,
    pub created_at: std::time::SystemTime,
}

/// A leaf of the log.
pub struct Leaf {
    pub index: u64,
    pub source: String,
    pub sequence: u64,
    pub record_hash: [u8; 32],
}

impl Log {
    /// The log of `origin` (a valid note key name: the config checks it), signed with `key`;
    /// `published` are the public keys this replica publishes (its own and retired ones).
    pub fn new(
        origin: &str,
        key: Option<&SigningKey>,
        published: &[ed25519_dalek::VerifyingKey],
    ) -> Log {
        let known = published
            .iter()
            .filter_map(|k| {
                signed_note::StandardVerifier::new(&signed_note::new_ed25519_verifier_key(
                    origin, k,
                ))
                .ok()
                .map(|v| signed_note::Verifier::key_id(&v))
            })
            .collect();
        let key = key.map(|key| {
            let verifier = signed_note::new_ed25519_verifier_key(origin, &key.verifying_key());
            let id = signed_note::StandardVerifier::new(&verifier)
                .map(|v| signed_note::Verifier::key_id(&v))
                .unwrap_or_default();
            NoteKey {
                name: origin.to_owned(),
                id,
                key: key.clone(),
                verifier,
            }
        });
        Log {
            origin: origin.to_owned(),
            key,
            known,
        }
    }

    /// The key ids of the log's own signatures on a stored checkpoint note (witnesses'
    /// cosignatures, under their own names, are not the log's).
    fn signed_by(&self, note: &str) -> Vec<u32> {
        let Some((_, signatures)) = note.split_once("\n\n") else {
            return Vec::new();
        };
        signatures
            .lines()
            .filter_map(|line| signed_note::Signature::from_bytes(line.as_bytes()).ok())
            .filter(|sig| sig.name() == self.origin)
            .map(|sig| sig.id())
            .collect()
    }

    /// Whether this replica may sign the checkpoint after `newest`: never downgrade a signed
    /// log to unsigned, and never alternate with a replica whose key this one does not know
    /// (two keys signing one log by turns). Rotating forward is allowed: a checkpoint signed by
    /// a key this replica lists as retired (PREVIOUS_PUBLIC_KEYS) may be followed by its own.
    fn may_follow(&self, newest: &str) -> Result<(), String> {
        let previous = self.signed_by(newest);
        let Some(first) = previous.first() else {
            return Ok(());
        };
        match &self.key {
            None => Err(format!(
                "the log's newest checkpoint is signed (key id {first:08x}) and this DbSync has no \
                 SIGNING_KEY_FILE: it does not extend a signed log unsigned"
            )),
            Some(_) if previous.iter().any(|id| self.known.contains(id)) => Ok(()),
            Some(key) => Err(format!(
                "the log's newest checkpoint is signed by key id {first:08x}, which is neither this \
                 DbSync's key ({:08x}) nor one of its PREVIOUS_PUBLIC_KEYS: replicas with \
                 different keys would sign the log by turns; give every replica the same key",
                key.id
            )),
        }
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The checkpoint key as a note verifier key (`name+id+base64`), what a verifier pins; `None`
    /// without a signing key.
    pub fn verifier_key(&self) -> Option<&str> {
        self.key.as_ref().map(|k| k.verifier.as_str())
    }

    /// The signed note of the checkpoint of a tree of `size` leaves with `root`.
    pub fn checkpoint_note(&self, size: u64, root: Hash) -> Result<String, Error> {
        let text = Checkpoint::new(&self.origin, size, root, "")
            .map_err(|e| Error::Internal(format!("checkpoint: {e}")))?
            .to_bytes();
        let mut note = signed_note::Note::new(&text, &[])
            .map_err(|e| Error::Internal(format!("checkpoint note: {e}")))?;
        match &self.key {
            Some(key) => {
                note.add_sigs(&[key])
                    .map_err(|e| Error::Internal(format!("signing the checkpoint: {e}")))?;
                Ok(String::from_utf8_lossy(&note.to_bytes()).into_owned())
            }
            // Unsigned: the checkpoint text alone (a verifier that needs a signature refuses it).
            None => Ok(String::from_utf8_lossy(&text).into_owned()),
        }
    }

    /// Takes every queued record into the log, a batch per transaction, each batch ending with
    /// a checkpoint; returns the log's size when it grew. Another replica integrating now
    /// makes this a no-op.
    pub async fn integrate(&self, pool: &PgPool) -> Result<Option<u64>, Error> {
        let mut grew = None;
        loop {
            let (size, taken) = self.integrate_batch(pool).await?;
            if taken > 0 {
                grew = Some(size);
            }
            if taken < BATCH as usize {
                return Ok(grew);
            }
        }
    }

    async fn integrate_batch(&self, pool: &PgPool) -> Result<(u64, usize), Error> {
        let mut conn = pool.get().await?;
        let tx = conn.transaction().await?;
        let locked: bool = tx
            .query_one_traced("SELECT pg_try_advisory_xact_lock($1)", &[&INTEGRATE_LOCK])
            .await?
            .get(0);
        if !locked {
            return Ok((0, 0));
        }
        let size = log_size(&tx).await?;
        let pending = tx
            .query_traced(
                "SELECT snapshot_id, source, sequence, record_hash FROM merkle_log_pending \
                 ORDER BY snapshot_id LIMIT $1",
                &[&BATCH],
            )
            .await?;
        if pending.is_empty() {
            return Ok((size, 0));
        }
        if let Some(newest) = checkpoint(&tx, None).await? {
            self.may_follow(&newest.note)
                .map_err(Error::FailedPrecondition)?;
        }
        let records: Vec<Hash> = pending
            .iter()
            .map(|row| hash_of(row.get(3)))
            .collect::<Result<_, _>>()?;
        let new_size = size + records.len() as u64;
        // The new stored hashes (each leaf's, then the subtrees it completes) and the root.
        let (hashes, root) = with_hashes(&tx, |reader| {
            let mut hashes = Vec::new();
            for (k, record) in records.iter().enumerate() {
                let n = size + k as u64;
                let stored =
                    stored_hashes_for_record_hash(n, tlog_tiles::record_hash(&record.0), reader)?;
                reader.add(stored_hash_index(0, n), &stored);
                hashes.extend(stored);
            }
            Ok((hashes, tree_hash(new_size, reader)?))
        })
        .await?;
        let first_hash = stored_hash_index(0, size) as i64;
        debug_assert_eq!(
            first_hash as u64 + hashes.len() as u64,
            stored_hash_count(new_size)
        );
        let indexes: Vec<i64> = (0..pending.len() as i64).map(|k| size as i64 + k).collect();
        let ids: Vec<i64> = pending.iter().map(|r| r.get(0)).collect();
        let sources: Vec<String> = pending.iter().map(|r| r.get(1)).collect();
        let sequences: Vec<i64> = pending.iter().map(|r| r.get(2)).collect();
        let record_bytes: Vec<Vec<u8>> = records.iter().map(|h| h.0.to_vec()).collect();
        tx.execute_traced(
            "INSERT INTO merkle_log_leaves (index, snapshot_id, source, sequence, record_hash) \
             SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::bigint[], $5::bytea[])",
            &[&indexes, &ids, &sources, &sequences, &record_bytes],
        )
        .await?;
        let hash_indexes: Vec<i64> = (0..hashes.len() as i64).map(|k| first_hash + k).collect();
        let hash_bytes: Vec<Vec<u8>> = hashes.iter().map(|h| h.0.to_vec()).collect();
        tx.execute_traced(
            "INSERT INTO merkle_log_hashes (index, hash) \
             SELECT * FROM unnest($1::bigint[], $2::bytea[])",
            &[&hash_indexes, &hash_bytes],
        )
        .await?;
        tx.execute_traced(
            "DELETE FROM merkle_log_pending WHERE snapshot_id = ANY($1)",
            &[&ids],
        )
        .await?;
        let note = self.checkpoint_note(new_size, root)?;
        tx.execute_traced(
            "INSERT INTO merkle_log_checkpoints (size, root, note) VALUES ($1, $2, $3)",
            &[&(new_size as i64), &root.0.as_slice(), &note],
        )
        .await?;
        tx.commit().await?;
        Ok((new_size, pending.len()))
    }
}

/// Integrates the queue every `interval` until `shutdown`; errors (PostgreSQL down, the
/// schema not migrated yet) are logged and the next round tries again.
pub fn spawn(
    log: Arc<Log>,
    pool: PgPool,
    interval: Duration,
    shutdown: merkle_shared::shutdown::Shutdown,
) {
    // The same failure every round is logged once, until it changes or the log grows again.
    let last_error = Arc::new(parking_lot::Mutex::new(String::new()));
    merkle_shared::shutdown::spawn_every(interval, shutdown, move || {
        let (log, pool, last_error) = (log.clone(), pool.clone(), last_error.clone());
        async move {
            let outcome = log.integrate(&pool).await;
            let mut last = last_error.lock();
            match outcome {
                Ok(Some(size)) => {
                    last.clear();
                    tracing::debug!(size, "transparency log checkpoint signed");
                }
                Ok(None) => {}
                Err(err) => {
                    let text = err.to_string();
                    if *last != text {
                        tracing::warn!(error = %text, "transparency log: integrating records failed; retrying");
                        *last = text;
                    }
                }
            }
        }
    });
}

fn hash_of(bytes: &[u8]) -> Result<Hash, Error> {
    <[u8; 32]>::try_from(bytes)
        .map(Hash)
        .map_err(|_| Error::DataLoss("a stored log hash is not 32 bytes".into()))
}

/// How many leaves the log has.
pub async fn log_size(client: &(impl GenericClient + Sync)) -> Result<u64, Error> {
    let size: i64 = client
        .query_one_traced(
            "SELECT coalesce(max(index) + 1, 0) FROM merkle_log_leaves",
            &[],
        )
        .await?
        .get(0);
    Ok(size as u64)
}

/// The newest checkpoint, or that of exactly `size` leaves.
pub async fn checkpoint(
    client: &(impl GenericClient + Sync),
    size: Option<u64>,
) -> Result<Option<StoredCheckpoint>, Error> {
    let row = match size {
        None => {
            client
                .query_opt_traced(
                    "SELECT size, root, note, created_at FROM merkle_log_checkpoints \
                     ORDER BY size DESC LIMIT 1",
                    &[],
                )
                .await?
        }
        Some(size) => client
            .query_opt_traced(
                "SELECT size, root, note, created_at FROM merkle_log_checkpoints WHERE size = $1",
                &[&(size as i64)],
            )
            .await?,
    };
    row.map(|row| {
        Ok(StoredCheckpoint {
            size: row.get::<_, i64>(0) as u64,
            root: hash_of(row.get(1))?.0,
            note: row.get(2),
            created_at: row.get(3),
        })
    })
    .transpose()
}

/// The leaf at `index`, or that of `source`'s record `sequence`.
pub async fn leaf(
    client: &(impl GenericClient + Sync),
    at: LeafAt<'_>,
) -> Result<Option<Leaf>, Error> {
    const COLUMNS: &str = "SELECT index, source, sequence, record_hash FROM merkle_log_leaves";
    let row = match at {
        LeafAt::Index(index) => {
            client
                .query_opt_traced(&format!("{COLUMNS} WHERE index = $1"), &[&(index as i64)])
                .await?
        }
        LeafAt::Record(source, sequence) => {
            client
                .query_opt_traced(
                    &format!("{COLUMNS} WHERE source = $1 AND sequence = $2"),
                    &[&source, &(sequence as i64)],
                )
                .await?
        }
    };
    row.map(|row| {
        Ok(Leaf {
            index: row.get::<_, i64>(0) as u64,
            source: row.get(1),
            sequence: row.get::<_, i64>(2) as u64,
            record_hash: hash_of(row.get(3))?.0,
        })
    })
    .transpose()
}

/// Which leaf.
#[derive(Debug, Clone, Copy)]
pub enum LeafAt<'a> {
    Index(u64),
    Record(&'a str, u64),
}

/// The proof that leaf `index` is in the tree of `size` leaves (RFC 6962 audit path, in the
/// order of `tlog.CheckRecord`).
pub async fn inclusion_proof(
    client: &(impl GenericClient + Sync),
    size: u64,
    index: u64,
) -> Result<Vec<[u8; 32]>, Error> {
    let proof = with_hashes(client, |reader| Ok(prove_record(size, index, reader)?)).await?;
    Ok(proof.into_iter().map(|h| h.0).collect())
}

/// The proof that the tree of `old` leaves is a prefix of the tree of `new` leaves (in the
/// order of `tlog.CheckTree`).
pub async fn consistency_proof(
    client: &(impl GenericClient + Sync),
    old: u64,
    new: u64,
) -> Result<Vec<[u8; 32]>, Error> {
    let proof = with_hashes(client, |reader| Ok(prove_tree(new, old, reader)?)).await?;
    Ok(proof.into_iter().map(|h| h.0).collect())
}

/// The hashes a tile lists (C2SP tlog-tiles), read in one query.
pub async fn tile_data(
    client: &(impl GenericClient + Sync),
    tile: &tlog_tiles::Tile,
) -> Result<Vec<u8>, Error> {
    with_hashes(client, |reader| Ok(tile.read_data(reader)?)).await
}

/// Stored hashes for one of `tlog_tiles`' computations. Each of them reads its stored hashes in
/// one call whose indexes depend only on the sizes involved, never on hash values, so
/// [`with_hashes`] runs the computation once recording the indexes it reads, fetches those in
/// one query, and runs it again on them.
#[derive(Default)]
struct Hashes {
    known: RefCell<HashMap<u64, Hash>>,
    /// Recording: indexes not known yet, answered with zero hashes.
    asked: Option<RefCell<Vec<u64>>>,
}

impl Hashes {
    /// Hashes computed meanwhile, at `start` onward.
    fn add(&self, start: u64, hashes: &[Hash]) {
        let mut known = self.known.borrow_mut();
        for (k, h) in hashes.iter().enumerate() {
            known.insert(start + k as u64, *h);
        }
    }
}

impl HashReader for Hashes {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error> {
        let known = self.known.borrow();
        indexes
            .iter()
            .map(|i| match (known.get(i), &self.asked) {
                (Some(h), _) => Ok(*h),
                (None, Some(asked)) => {
                    asked.borrow_mut().push(*i);
                    Ok(Hash([0; 32]))
                }
                (None, None) => Err(tlog_tiles::Error::IndexesNotInTree),
            })
            .collect()
    }
}

async fn with_hashes<T>(
    client: &(impl GenericClient + Sync),
    compute: impl Fn(&Hashes) -> Result<T, Error>,
) -> Result<T, Error> {
    let recording = Hashes {
        asked: Some(RefCell::new(Vec::new())),
        ..Default::default()
    };
    compute(&recording)?;
    let asked: Vec<i64> = recording
        .asked
        .map(RefCell::into_inner)
        .unwrap_or_default()
        .into_iter()
        .map(|i| i as i64)
        .collect();
    let reader = Hashes::default();
    if !asked.is_empty() {
        let rows = client
            .query_traced(
                "SELECT index, hash FROM merkle_log_hashes WHERE index = ANY($1)",
                &[&asked],
            )
            .await?;
        let mut known = reader.known.borrow_mut();
        for row in &rows {
            known.insert(row.get::<_, i64>(0) as u64, hash_of(row.get(1))?);
        }
    }
    compute(&reader)
}

impl From<tlog_tiles::Error> for Error {
    fn from(err: tlog_tiles::Error) -> Self {
        match err {
            tlog_tiles::Error::IndexesNotInTree => {
                Error::DataLoss("a stored hash of the transparency log is missing".into())
            }
            other => Error::Internal(format!("transparency log: {other}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGIN: &str = "example.com/log";

    fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    /// A replica's log signing with `own` and knowing `retired` too.
    fn replica(own: Option<&SigningKey>, retired: &[&SigningKey]) -> Log {
        let published: Vec<_> = own
            .into_iter()
            .chain(retired.iter().copied())
            .map(SigningKey::verifying_key)
            .collect();
        Log::new(ORIGIN, own, &published)
    }

    fn note_of(log: &Log) -> String {
        log.checkpoint_note(3, Hash([7; 32])).expect("note")
    }

    #[test]
    fn a_replica_extends_only_a_log_whose_newest_signer_it_knows() {
        let (a, b) = (key(1), key(2));
        let signed_by_a = note_of(&replica(Some(&a), &[]));
        let unsigned = note_of(&replica(None, &[]));
        // An unsigned log may be extended by anyone, signing turned on included.
        for follower in [
            replica(None, &[]),
            replica(Some(&a), &[]),
            replica(Some(&b), &[]),
        ] {
            assert_eq!(follower.may_follow(&unsigned), Ok(()));
        }
        assert_eq!(replica(Some(&a), &[]).may_follow(&signed_by_a), Ok(()));
        // Rotating forward: b lists a as retired.
        assert_eq!(replica(Some(&b), &[&a]).may_follow(&signed_by_a), Ok(()));
        let unknown = replica(Some(&b), &[])
            .may_follow(&signed_by_a)
            .expect_err("refused");
        assert!(unknown.contains("neither this DbSync's key"), "{unknown}");
        let downgrade = replica(None, &[&a])
            .may_follow(&signed_by_a)
            .expect_err("refused");
        assert!(downgrade.contains("no SIGNING_KEY_FILE"), "{downgrade}");
        // The replica with the old key does not follow the new one's checkpoint.
        let signed_by_b = note_of(&replica(Some(&b), &[&a]));
        assert!(replica(Some(&a), &[]).may_follow(&signed_by_b).is_err());
    }

    #[test]
    fn a_witness_cosignature_is_not_the_logs_signature() {
        let a = key(1);
        let witness = key(9);
        let log = replica(Some(&a), &[]);
        let text = note_of(&replica(None, &[]));
        // The unsigned checkpoint with only a witness's line under another name.
        let id = signed_note::StandardVerifier::new(&signed_note::new_ed25519_verifier_key(
            "witness.example",
            &witness.verifying_key(),
        ))
        .map(|v| signed_note::Verifier::key_id(&v))
        .expect("verifier");
        let line = signed_note::Signature::new("witness.example".into(), id, vec![0; 72])
            .expect("signature")
            .to_bytes();
        let line = String::from_utf8(line).expect("utf-8");
        let cosigned = format!("{text}\n{line}");
        assert!(log.signed_by(&cosigned).is_empty());
        assert_eq!(replica(None, &[]).may_follow(&cosigned), Ok(()));
        // The log's own signature is still found beside a witness's.
        let both = format!("{}{line}", note_of(&log));
        assert_eq!(log.signed_by(&both), [log.key.as_ref().expect("key").id]);
    }
}
