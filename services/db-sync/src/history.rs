//! The tamper-evident history (docs/merkle-spec.md section 10): every snapshot record is
//! hash-chained to its source's previous record and signed with DbSync's Ed25519 key, in the
//! transaction that stores it (the source row is locked, so two syncs can never fork a chain);
//! the `head` checkpoint is rewritten in that transaction, and retention writes a `pruned`
//! checkpoint in the transaction that removes records.
//!
//! Keys: `SIGNING_KEY_FILE` (PKCS#8 PEM) signs; `PREVIOUS_PUBLIC_KEYS` lists retired keys'
//! public halves, published by GetHistoryProof so old records stay verifiable after a
//! rotation. With no key, records are still chained and left unsigned.

use merkle_shared::postgres::Traced as _;
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ed25519_dalek::{
    SigningKey, VerifyingKey,
    pkcs8::{DecodePrivateKey as _, DecodePublicKey as _},
};
use merkle_core::{
    Digest,
    history::{Checkpoint, HEAD, PRUNED, Record, Seal, key_id, seal},
};
use merkle_proto::dbsync::v1 as pb;
use merkle_shared::{config::ConfigError, postgres::PgPool};
use tokio_postgres::{GenericClient, Transaction};

use crate::{
    error::Error,
    store::{self, Snapshot, queries},
};

/// DbSync's keys: the one that signs now, and every public key it publishes.
#[derive(Default)]
pub struct Signer {
    key: Option<SigningKey>,
    published: Vec<VerifyingKey>,
}

fn read_key_file(variable: &str, path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(variable, format!("{}: cannot be read: {e}", path.display())))
}

/// Whether users other than the key's owner can read it. A group-readable file of the
/// process's own group passes: that is how Kubernetes mounts a Secret for a pod with an
/// `fsGroup` (mode 0440 at least).
fn readable_by_others(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let mode = meta.permissions().mode();
    let own_group = meta.gid() == nix::unistd::getegid().as_raw();
    mode & 0o007 != 0 || (mode & 0o070 != 0 && !own_group)
}

impl Signer {
    /// Loads the signing key and the retired public keys; an error names the setting.
    pub fn load(signing_key: Option<&Path>, previous: &[PathBuf]) -> Result<Signer, ConfigError> {
        let mut signer = Signer::default();
        if let Some(path) = signing_key {
            let variable = "SIGNING_KEY_FILE (--signing-key-file)";
            let key = SigningKey::from_pkcs8_pem(&read_key_file(variable, path)?).map_err(|e| {
                ConfigError::new(
                    variable,
                    format!(
                        "{} is not an Ed25519 private key in PKCS#8 PEM (BEGIN PRIVATE KEY): {e}",
                        path.display()
                    ),
                )
            })?;
            if let Ok(meta) = std::fs::metadata(path)
                && readable_by_others(&meta)
            {
                tracing::warn!(
                    file = %path.display(),
                    mode = format!("{:o}", std::os::unix::fs::MetadataExt::mode(&meta) & 0o777),
                    "SIGNING_KEY_FILE is readable by others than its owner; chmod 600 it"
                );
            }
            signer.published.push(key.verifying_key());
            signer.key = Some(key);
        }
        for path in previous {
            let variable = "PREVIOUS_PUBLIC_KEYS (--previous-public-keys)";
            let key = VerifyingKey::from_public_key_pem(&read_key_file(variable, path)?).map_err(
                |e| {
                    ConfigError::new(
                        variable,
                        format!(
                            "{} is not an Ed25519 public key in PEM (BEGIN PUBLIC KEY): {e}",
                            path.display()
                        ),
                    )
                },
            )?;
            signer.published.push(key);
        }
        Ok(signer)
    }

    fn seal(&self, hash: &Digest) -> Option<Seal> {
        self.key.as_ref().map(|key| seal(key, hash))
    }

    /// The key id that signs now.
    pub fn key_id(&self) -> Option<String> {
        self.key.as_ref().map(|k| key_id(&k.verifying_key()))
    }

    /// The key that signs now, if any (the transparency log signs its checkpoints with it).
    pub fn signing_key(&self) -> Option<&SigningKey> {
        self.key.as_ref()
    }

    /// The current public key, hex; empty without one.
    pub fn public_key(&self) -> String {
        self.key
            .as_ref()
            .map(|k| merkle_core::digest::hex(k.verifying_key().as_bytes()))
            .unwrap_or_default()
    }

    /// Every published public key: the signing one (if any) and the retired ones.
    pub fn published_keys(&self) -> &[VerifyingKey] {
        &self.published
    }

    /// Every published public key, hex, by key id.
    pub fn public_keys(&self) -> HashMap<String, String> {
        self.published
            .iter()
            .map(|k| (key_id(k), merkle_core::digest::hex(k.as_bytes())))
            .collect()
    }

    pub fn is_signing(&self) -> bool {
        self.key.is_some()
    }
}

/// A time as stored: microseconds since the epoch (PostgreSQL's precision), so the hashed time
/// and the stored one are the same.
pub fn micros(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_micros() as i64,
        Err(e) => -(e.duration().as_micros() as i64),
    }
}

/// Now, cut to whole microseconds.
pub fn now_micros() -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(micros(SystemTime::now()).max(0) as u64)
}

fn digest_of(bytes: &[u8]) -> Result<Digest, Error> {
    <[u8; 32]>::try_from(bytes)
        .map(Digest)
        .map_err(|_| Error::DataLoss("a stored record hash is not 32 bytes".into()))
}

/// The record a stored snapshot is (what its hash covers).
pub fn record_of(s: &Snapshot) -> Result<Record, Error> {
    Ok(Record {
        source: s.source.clone(),
        sequence: s.sequence as u64,
        root: s.root,
        profile: s.profile,
        build_id: s.build_id.clone(),
        create_time_micros: micros(s.created_at),
        stats: s.stats,
        previous: s
            .previous_record_hash
            .as_deref()
            .map(digest_of)
            .transpose()?,
    })
}

/// What a new record stores besides its fields: previous hash, hash, signature, key id.
pub struct Chained {
    pub previous: Option<Vec<u8>>,
    pub hash: Digest,
    pub signature: Option<Vec<u8>>,
    pub key_id: Option<String>,
}

/// Chains (and signs) the record that follows `latest`. A latest record stored before the
/// history existed is chained first.
pub async fn chain(
    tx: &Transaction<'_>,
    signer: &Signer,
    latest: Option<&Snapshot>,
    record: &mut Record,
) -> Result<Chained, Error> {
    let previous = match latest {
        None => None,
        Some(l) => Some(match &l.record_hash {
            Some(hash) => hash.clone(),
            None => chain_unchained(tx, signer, &l.source)
                .await?
                .ok_or_else(|| Error::Internal("the latest record could not be chained".into()))?
                .0
                .to_vec(),
        }),
    };
    record.previous = previous.as_deref().map(digest_of).transpose()?;
    let hash = record.hash();
    let sealed = signer.seal(&hash);
    Ok(Chained {
        previous,
        hash,
        signature: sealed.as_ref().map(|s| s.signature.to_vec()),
        key_id: sealed.map(|s| s.key_id),
    })
}

/// Writes a checkpoint (signed when there is a key).
async fn checkpoint(
    tx: &(impl GenericClient + Sync),
    signer: &Signer,
    kind: &str,
    source: &str,
    sequence: i64,
    record_hash: Digest,
    actor: &str,
) -> Result<(), Error> {
    let statement = Checkpoint {
        kind: kind.to_owned(),
        source: source.to_owned(),
        sequence: sequence as u64,
        record_hash,
        actor: actor.to_owned(),
    };
    let sealed = signer.seal(&statement.hash());
    tx.execute_traced(
        queries::UPSERT_CHECKPOINT,
        &[
            &source,
            &kind,
            &sequence,
            &record_hash.0.as_slice(),
            &sealed.as_ref().map(|s| s.signature.to_vec()),
            &sealed.as_ref().map(|s| s.key_id.clone()),
            &actor,
        ],
    )
    .await?;
    Ok(())
}

/// The new head of `source`: its record `sequence` with `hash`.
pub async fn set_head(
    tx: &Transaction<'_>,
    signer: &Signer,
    source: &str,
    sequence: i64,
    hash: Digest,
) -> Result<(), Error> {
    checkpoint(tx, signer, HEAD, source, sequence, hash, "").await
}

/// Applies `source`'s retention, leaving a `pruned` checkpoint of the last removed record;
/// returns how many records were removed.
pub async fn prune(tx: &Transaction<'_>, signer: &Signer, source: &str) -> Result<u64, Error> {
    let pruned = store::prune(tx, source).await?;
    if let Some((sequence, Some(hash))) = pruned.last {
        checkpoint(
            tx,
            signer,
            PRUNED,
            source,
            sequence,
            digest_of(&hash)?,
            &pruned.actor,
        )
        .await?;
    }
    Ok(pruned.deleted)
}

/// Chains (and signs) `source`'s records stored before the history existed, oldest first,
/// and sets its head; returns the latest record's hash. The caller holds the source's lock.
async fn chain_unchained(
    tx: &Transaction<'_>,
    signer: &Signer,
    source: &str,
) -> Result<Option<Digest>, Error> {
    let rows = tx.query_traced(queries::ALL_OF_SOURCE, &[&source]).await?;
    let mut previous: Option<Digest> = None;
    let mut latest = None;
    for row in &rows {
        let s = store::snapshot_from_row(row)?;
        let hash = match &s.record_hash {
            Some(hash) => digest_of(hash)?,
            None => {
                let mut record = record_of(&s)?;
                record.previous = previous;
                let hash = record.hash();
                let sealed = signer.seal(&hash);
                tx.execute_traced(
                    "UPDATE merkle_roots SET previous_record_hash = $2, record_hash = $3, \
                     signature = $4, key_id = $5 WHERE id = $1",
                    &[
                        &s.id,
                        &previous.map(|p| p.0.to_vec()),
                        &hash.0.as_slice(),
                        &sealed.as_ref().map(|x| x.signature.to_vec()),
                        &sealed.as_ref().map(|x| x.key_id.clone()),
                    ],
                )
                .await?;
                // It joins the transparency log like any new record (once: a record whose
                // chain columns were emptied may be in the log already).
                tx.execute_traced(
                    "INSERT INTO merkle_log_pending (snapshot_id, source, sequence, record_hash) \
                     SELECT $1, $2, $3, $4 WHERE NOT EXISTS \
                     (SELECT 1 FROM merkle_log_leaves WHERE snapshot_id = $1) \
                     ON CONFLICT (snapshot_id) DO NOTHING",
                    &[&s.id, &s.source, &s.sequence, &hash.0.as_slice()],
                )
                .await?;
                hash
            }
        };
        previous = Some(hash);
        latest = Some((s.sequence, hash));
    }
    if let Some((sequence, hash)) = latest {
        set_head(tx, signer, source, sequence, hash).await?;
    }
    Ok(latest.map(|(_, h)| h))
}

/// At start: chains the records of every source stored before the history existed.
pub async fn chain_legacy(pool: &PgPool, signer: &Signer) -> Result<usize, Error> {
    let sources: Vec<String> = pool
        .get()
        .await?
        .query_traced(
            "SELECT DISTINCT source FROM merkle_roots WHERE record_hash IS NULL",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for source in &sources {
        let mut conn = pool.get().await?;
        let tx = conn.transaction().await?;
        tx.execute_traced(
            "SELECT 1 FROM merkle_sources WHERE name = $1 FOR UPDATE",
            &[source],
        )
        .await?;
        chain_unchained(&tx, signer, source).await?;
        tx.commit().await?;
    }
    Ok(sources.len())
}

/// One stored checkpoint as the contract shows it.
fn checkpoint_from_row(row: &tokio_postgres::Row) -> pb::HistoryCheckpoint {
    let hex = |b: Option<Vec<u8>>| {
        b.as_deref()
            .map(merkle_core::digest::hex)
            .unwrap_or_default()
    };
    let created: SystemTime = row.get(6);
    pb::HistoryCheckpoint {
        kind: row.get(0),
        source: row.get(1),
        sequence: row.get::<_, i64>(2) as u64,
        record_hash: hex(Some(row.get(3))),
        signature: hex(row.get(4)),
        key_id: row.get::<_, Option<String>>(5).unwrap_or_default(),
        create_time: Some(prost_types::Timestamp::from(created)),
        actor: row.get(7),
    }
}

/// A page of a source's history.
pub struct Page {
    pub records: Vec<pb::Snapshot>,
    pub pruned: Option<pb::HistoryCheckpoint>,
    pub head: Option<pb::HistoryCheckpoint>,
    /// Where the next page starts, when there is one.
    pub next: Option<u64>,
    /// The last sequence number of the whole range.
    pub last: u64,
}

/// The records of `source` from `from` to `to` (0: its oldest kept / latest), at most
/// `limit`; errors name the field.
pub async fn page(
    pool: &PgPool,
    source: &str,
    from: u64,
    to: u64,
    limit: u32,
) -> Result<Page, Error> {
    // One snapshot of the database: the range, the records and the checkpoints agree.
    let mut conn = pool.get().await?;
    let conn = conn
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let row = conn
        .query_one_traced(queries::SEQUENCE_RANGE, &[&source])
        .await?;
    let (Some(oldest), Some(latest)) = (row.get::<_, Option<i64>>(0), row.get::<_, Option<i64>>(1))
    else {
        return Err(Error::NotFound(format!(
            "source: no snapshot of {source:?} is stored"
        )));
    };
    let first = if from == 0 { oldest as u64 } else { from };
    let last = if to == 0 { latest as u64 } else { to };
    if last > latest as u64 {
        return Err(Error::bad_request(
            "to_sequence",
            format!("{to} is past {source}'s latest record, {latest}"),
        ));
    }
    if first > last {
        return Err(Error::bad_request(
            "from_sequence",
            format!("{first} must not be greater than to_sequence ({last})"),
        ));
    }
    let rows = conn
        .query_traced(
            queries::HISTORY,
            &[
                &source,
                &(first as i64),
                &(last as i64),
                &(i64::from(limit) + 1),
            ],
        )
        .await?;
    let mut records = Vec::with_capacity(rows.len());
    for row in rows.iter().take(limit as usize) {
        records.push(store::snapshot_from_row(row)?.to_proto());
    }
    let next = (rows.len() > limit as usize)
        .then(|| rows.get(limit as usize).map(|r| r.get::<_, i64>(2) as u64))
        .flatten();
    let mut page = Page {
        records,
        pruned: None,
        head: None,
        next,
        last,
    };
    for row in conn.query_traced(queries::CHECKPOINTS, &[&source]).await? {
        let c = checkpoint_from_row(&row);
        match c.kind.as_str() {
            HEAD => page.head = Some(c),
            PRUNED => page.pruned = Some(c),
            _ => {}
        }
    }
    conn.commit().await?;
    Ok(page)
}
