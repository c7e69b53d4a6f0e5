//! Proof bundles (docs/merkle-spec.md section 12): one file proving one fact, "the entry at
//! PATH had hash H in source S's snapshot k, stored at time T", checkable offline with only
//! the transparency log's public key: the entry's node path (section 7), the snapshot's record
//! (section 10.1), that record's inclusion proof in the log (section 11) and the log's signed,
//! possibly cosigned, checkpoint.

use anyhow::{Context as _, bail};
use base64::{Engine as _, engine::general_purpose::STANDARD};
use merkle_core::{
    Digest, DirNode, EntryKind,
    history::Record,
    proof::{InclusionProof, split_path},
};
use merkle_proto::dbsync::v1::{
    GetLogCheckpointRequest, GetLogInclusionProofRequest,
    db_sync_service_client::DbSyncServiceClient,
};
use merkle_shared::{client::Channel, convert::record_from_proto};
use serde::{Deserialize, Serialize};
use tlog_tiles::{Hash, check_record, record_hash};

use crate::remote::DbSyncAddr;

/// The `format` field of a bundle file.
pub const FORMAT: &str = "merkle-mesh-proof-bundle";

/// What a bundle states, in words a reader checks by eye; the verifier derives every field
/// from the proofs and requires them equal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub source: String,
    pub sequence: u64,
    /// When the snapshot was stored (RFC 3339, microseconds, UTC).
    pub time: String,
    /// The entry's path, `/`-separated (`path_hex` instead when not UTF-8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_hex: Option<String>,
    /// file, executable, directory or symlink.
    pub kind: String,
    /// The entry's hash (a file's leaf: SHA-256(0x00 || content)), hex.
    pub hash: String,
    /// The snapshot's root hash, hex.
    pub root_hash: String,
}

/// A bundle file: compact JSON, the binary parts in base64.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bundle {
    pub format: String,
    pub version: u32,
    pub claim: Claim,
    /// The directory nodes from the root to the entry's parent, root first, each its section 4
    /// encoding.
    pub nodes: Vec<String>,
    /// The snapshot record's canonical encoding (section 10.1); its SHA-256 is the log leaf.
    pub record: String,
    /// The record's leaf index in the log.
    pub leaf_index: u64,
    /// The inclusion proof's hashes, from the leaf's sibling up.
    pub log_proof: Vec<String>,
    /// The log's checkpoint the proof is for: a C2SP signed note with the log's signature
    /// and any witnesses' cosignatures.
    pub checkpoint: String,
}

fn b64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

fn unb64(what: &str, text: &str) -> anyhow::Result<Vec<u8>> {
    STANDARD
        .decode(text)
        .map_err(|e| anyhow::anyhow!("{what}: not base64 ({e})"))
}

fn time(micros: i64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_micros(micros.max(0) as u64);
    humantime::format_rfc3339_micros(at).to_string()
}

impl Bundle {
    /// The bundle of `proof` (an entry in `record`'s tree), `record`'s leaf `leaf_index` with
    /// its log proof `log_proof` in the tree of `checkpoint`.
    pub fn new(
        record: &Record,
        proof: &InclusionProof,
        leaf_index: u64,
        log_proof: &[Hash],
        checkpoint: &str,
    ) -> anyhow::Result<Bundle> {
        let entry = proof.verify().context("the node proof does not verify")?;
        let joined = proof.path.join(&b'/');
        let (path, path_hex) = match String::from_utf8(joined) {
            Ok(path) => (Some(path), None),
            Err(e) => (None, Some(merkle_core::digest::hex(e.as_bytes()))),
        };
        Ok(Bundle {
            format: FORMAT.to_owned(),
            version: 1,
            claim: Claim {
                source: record.source.clone(),
                sequence: record.sequence,
                time: time(record.create_time_micros),
                path,
                path_hex,
                kind: entry.kind.name().to_owned(),
                hash: entry.hash.to_hex(),
                root_hash: record.root.to_hex(),
            },
            nodes: proof
                .nodes
                .iter()
                .map(|n| n.encode(proof.profile).map(|b| b64(&b)))
                .collect::<Result<_, _>>()?,
            record: b64(&record.encode()),
            leaf_index,
            log_proof: log_proof.iter().map(|h| b64(&h.0)).collect(),
            checkpoint: checkpoint.to_owned(),
        })
    }

    /// The file's text: one line of JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(text: &str) -> anyhow::Result<Bundle> {
        let bundle: Bundle =
            serde_json::from_str(text).map_err(|e| anyhow::anyhow!("not a proof bundle: {e}"))?;
        if bundle.format != FORMAT || bundle.version != 1 {
            bail!(
                "expected format {FORMAT:?} version 1, found {:?} version {}",
                bundle.format,
                bundle.version
            );
        }
        Ok(bundle)
    }

    /// Checks every part against `verifier_key` (the log's, as `<origin>+<id>+<base64>`) and
    /// the cosignatures `witnesses` asks for: the node path proves
    /// the entry in the record's root, the record is the log leaf, the leaf is in the signed
    /// checkpoint, and the claim is what they prove. Returns the proven entry's hash.
    pub fn verify(
        &self,
        verifier_key: &str,
        witnesses: &crate::log::WitnessArgs,
    ) -> anyhow::Result<Digest> {
        let record_bytes = unb64("record", &self.record)?;
        let record = Record::decode(&record_bytes).map_err(|e| anyhow::anyhow!("record: {e}"))?;
        let mut nodes = Vec::with_capacity(self.nodes.len());
        for (level, text) in self.nodes.iter().enumerate() {
            let (profile, node) = DirNode::decode(&unb64("nodes", text)?)
                .map_err(|e| anyhow::anyhow!("node {level}: {e}"))?;
            if profile != record.profile {
                bail!(
                    "node {level} is of the {} profile, the snapshot's tree of the {}",
                    profile.name(),
                    record.profile.name()
                );
            }
            nodes.push(node);
        }
        let path = match (&self.claim.path, &self.claim.path_hex) {
            (Some(path), None) => path.as_bytes().to_vec(),
            (None, Some(hex)) => merkle_core::digest::unhex(hex)
                .ok_or_else(|| anyhow::anyhow!("claim.path_hex: not hex"))?,
            _ => bail!("claim: give exactly one of path and path_hex"),
        };
        let proof = InclusionProof {
            profile: record.profile,
            root: record.root,
            path: split_path(&path).map_err(|e| anyhow::anyhow!("claim.{e}"))?,
            nodes,
        };
        let entry = proof
            .verify()
            .context("the node path does not prove the entry in the snapshot's root")?;
        let derived = Claim {
            source: record.source.clone(),
            sequence: record.sequence,
            time: time(record.create_time_micros),
            path: self.claim.path.clone(),
            path_hex: self.claim.path_hex.clone(),
            kind: entry.kind.name().to_owned(),
            hash: entry.hash.to_hex(),
            root_hash: record.root.to_hex(),
        };
        if derived != self.claim {
            bail!(
                "the claim is not what the proofs prove: they prove {}",
                serde_json::to_string(&derived).unwrap_or_default()
            );
        }
        let checkpoint = crate::log::checked_note(&self.checkpoint, Some(verifier_key), witnesses)?;
        let log_proof = self
            .log_proof
            .iter()
            .map(|h| {
                let bytes = unb64("log_proof", h)?;
                Ok(Hash(bytes.try_into().map_err(|_| {
                    anyhow::anyhow!("log_proof: a hash is not 32 bytes")
                })?))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let leaf = merkle_core::digest::sha256(&record_bytes);
        check_record(
            &log_proof,
            checkpoint.size(),
            *checkpoint.hash(),
            self.leaf_index,
            record_hash(&leaf.0),
        )
        .map_err(|e| {
            anyhow::anyhow!(
                "the record is not leaf {} of the log's checkpoint of {} leaves: {e}",
                self.leaf_index,
                checkpoint.size()
            )
        })?;
        Ok(entry.hash)
    }

    /// The proven entry's kind, from the claim (valid once [`Bundle::verify`] passed).
    pub fn kind(&self) -> Option<EntryKind> {
        EntryKind::from_name(&self.claim.kind)
    }
}

/// Fetches from DbSync (`c`, at `db_sync`, which errors name) the rest of the bundle of
/// `proof` (an entry in `snapshot`'s tree): the record's inclusion proof in the log's newest
/// checkpoint, and that checkpoint. A record is in the log within LOG_INTERVAL of its commit:
/// a snapshot stored a moment ago is waited for, up to `wait`.
pub async fn fetch(
    c: &mut DbSyncServiceClient<Channel>,
    db_sync: &DbSyncAddr,
    snapshot: &merkle_proto::dbsync::v1::Snapshot,
    proof: &InclusionProof,
    wait: std::time::Duration,
) -> anyhow::Result<Bundle> {
    if proof.root.to_hex() != snapshot.root_hash {
        bail!(
            "DbSync's proof is for root {}, not {}@{}'s {}",
            proof.root,
            snapshot.source,
            snapshot.sequence,
            snapshot.root_hash
        );
    }
    let stored = record_from_proto(snapshot)
        .map_err(|e| anyhow::anyhow!("DbSync sent a bad snapshot: {e}"))?;
    if stored.record.hash() != stored.record_hash {
        bail!(
            "DbSync's snapshot {}@{} does not hash to its record_hash",
            snapshot.source,
            snapshot.sequence
        );
    }
    let deadline = std::time::Instant::now() + wait;
    let leaf = loop {
        match c
            .get_log_inclusion_proof(GetLogInclusionProofRequest {
                source: snapshot.source.clone(),
                sequence: snapshot.sequence,
                ..Default::default()
            })
            .await
        {
            Ok(leaf) => break leaf.into_inner(),
            Err(status)
                if status.code() == tonic::Code::NotFound
                    && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(status) => return Err(db_sync.failed()(status)),
        }
    };
    let checkpoint = c
        .get_log_checkpoint(GetLogCheckpointRequest {
            size: leaf.tree_size,
        })
        .await
        .map_err(db_sync.failed())?
        .into_inner();
    let log_proof = leaf
        .hashes
        .iter()
        .map(|h| {
            let d: Digest = h.parse().context("DbSync sent a bad log proof hash")?;
            Ok(Hash(d.0))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Bundle::new(
        &stored.record,
        proof,
        leaf.leaf_index,
        &log_proof,
        &checkpoint.note,
    )
}
