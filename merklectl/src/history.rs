//! `verify-history` and `export-history`: the tamper-evident history (docs/merkle-spec.md
//! section 10) checked the way an auditor with no access to the database would, from
//! DbSync's GetHistoryProof answer or from an exported file, against public keys the auditor
//! trusts on their own.

use std::{
    collections::{BTreeMap, HashSet},
    io::{BufRead as _, Write as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use ed25519_dalek::{VerifyingKey, pkcs8::DecodePublicKey as _};
use futures::{StreamExt as _, TryStreamExt as _};
use merkle_core::{
    Digest, EntryKind, Profile,
    history::{Failure, StoredRecord, Trust, Verified, verify},
};
use merkle_proto::{
    common::v1::TreeStats,
    dbsync::v1::{GetHistoryProofRequest, HistoryCheckpoint, Snapshot},
};
use merkle_shared::{
    convert::{checkpoint_from_proto, profile_from_proto, profile_to_proto, record_from_proto},
    stored_tree::fetch_node,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::remote::DbSyncAddr;

/// The first line of an export names its format.
const FORMAT: &str = "merkle-history/1";
/// The local stack's signing key, under its data directory.
pub const SIGNING_KEY_FILE: &str = "signing-key.pem";
/// Its public half.
pub const PUBLIC_KEY_FILE: &str = "signing-key.pub.pem";
/// Records per GetHistoryProof page.
const PAGE_SIZE: u32 = 10_000;
/// Stored nodes fetched at once by `--deep`.
const PARALLEL_FETCHES: usize = 16;

/// The local stack's signing key in `data_dir`, made at first start (32 bytes from the
/// operating system's random source, PKCS#8 PEM, readable by its owner only) beside its
/// public half; returns the private key's path.
pub fn ensure_signing_key(data_dir: &Path) -> anyhow::Result<PathBuf> {
    use ed25519_dalek::{
        SigningKey,
        pkcs8::{EncodePrivateKey as _, EncodePublicKey as _, spki::der::pem::LineEnding},
    };
    use std::{io::Read as _, os::unix::fs::OpenOptionsExt as _};
    let private = data_dir.join(SIGNING_KEY_FILE);
    let public = data_dir.join(PUBLIC_KEY_FILE);
    if private.exists() {
        return Ok(private);
    }
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut seed)?;
    let key = SigningKey::from_bytes(&seed);
    let pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| anyhow::anyhow!("encoding the signing key: {e}"))?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&private)
        .and_then(|mut f| f.write_all(pem.as_bytes()))
        .with_context(|| format!("writing {}", private.display()))?;
    let public_pem = key
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| anyhow::anyhow!("encoding the public key: {e}"))?;
    std::fs::write(&public, public_pem).with_context(|| format!("writing {}", public.display()))?;
    Ok(private)
}

/// Which records.
#[derive(Debug, Clone, clap::Args)]
pub struct Range {
    /// The first sequence number (default: the oldest kept record).
    #[arg(long, default_value_t = 0)]
    pub from: u64,
    /// The last sequence number (default: the latest record, which must then reach the
    /// signed head).
    #[arg(long, default_value_t = 0)]
    pub to: u64,
}

#[derive(Debug, clap::Args)]
pub struct VerifyHistoryArgs {
    /// The source whose history to check (optional with --file).
    #[arg(required_unless_present = "file")]
    pub source: Option<String>,
    #[command(flatten)]
    pub range: Range,
    /// A public key (PEM, BEGIN PUBLIC KEY) whose signatures to accept; repeat for several,
    /// e.g. the keys before and after a rotation. Default: the local stack's,
    /// DATA_DIR/signing-key.pub.pem.
    #[arg(long = "trusted-key", value_name = "FILE")]
    pub trusted_keys: Vec<PathBuf>,
    /// Accept unsigned records (written while DbSync had no signing key); their chain is
    /// still checked.
    #[arg(long)]
    pub allow_unsigned: bool,
    /// Also read each record's stored tree from DbSync and check that it hashes to the
    /// record's root.
    #[arg(long, conflicts_with = "file")]
    pub deep: bool,
    /// Also check the history against the transparency log: its last record must be a leaf of
    /// the log's newest checkpoint (the inclusion proof is checked here), and that checkpoint
    /// must pass `merklectl log verify`'s checks against the log state (signed by the pinned
    /// key, consistent with the checkpoint seen before). Each record is chained to the one
    /// before, so the whole range is then fixed in the log every verifier and witness sees:
    /// the records' own signatures are not checked (the log's proofs stand for them; the
    /// hashes and links of every record are).
    #[arg(long, conflicts_with = "file")]
    pub log: bool,
    /// The log state file (`merklectl log verify --state`), with --log.
    #[arg(long, value_name = "FILE", requires = "log")]
    pub log_state: Option<PathBuf>,
    /// With --log: a witness whose cosignature the checkpoint must carry (its cosignature
    /// verifier key); repeat for several.
    #[arg(long = "witness", value_name = "KEY", requires = "log")]
    pub witnesses: Vec<String>,
    /// With --log: how many of the --witness keys must have cosigned (default: all).
    #[arg(long, requires = "log")]
    pub witness_policy: Option<usize>,
    /// Check a file `export-history` wrote, with no server.
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// The local stack's data directory, where the default trusted key is.
    #[arg(long, default_value = ".data")]
    pub data_dir: PathBuf,
    /// Print the outcome as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub db_sync: DbSyncAddr,
}

#[derive(Debug, clap::Args)]
pub struct ExportHistoryArgs {
    /// The source whose history to write.
    pub source: String,
    #[command(flatten)]
    pub range: Range,
    #[command(flatten)]
    pub db_sync: DbSyncAddr,
}

/// A history as a verifier receives it.
struct History {
    source: String,
    to_latest: bool,
    signing: bool,
    public_keys: BTreeMap<String, String>,
    pruned: Option<HistoryCheckpoint>,
    head: Option<HistoryCheckpoint>,
    records: Vec<Snapshot>,
}

/// Every page of GetHistoryProof for `source` and `range`. The checkpoints and keys are the
/// first page's, read in one transaction with the range it pinned.
async fn fetch(db_sync: &DbSyncAddr, source: &str, range: &Range) -> anyhow::Result<History> {
    let mut client = db_sync.client()?;
    let mut history: Option<History> = None;
    let mut page_token = String::new();
    loop {
        let page = client
            .get_history_proof(GetHistoryProofRequest {
                source: source.to_owned(),
                from_sequence: range.from,
                to_sequence: range.to,
                page_size: PAGE_SIZE,
                page_token,
            })
            .await
            .map_err(db_sync.failed())?
            .into_inner();
        let h = history.get_or_insert_with(|| History {
            source: source.to_owned(),
            to_latest: range.to == 0,
            signing: page.signing,
            public_keys: page.public_keys.into_iter().collect(),
            pruned: page.pruned,
            head: page.head,
            records: Vec::new(),
        });
        h.records.extend(page.records);
        page_token = page.next_page_token;
        if page_token.is_empty() {
            break;
        }
    }
    history.context("DbSync answered no page")
}

/// One record line of an export: the contract's Snapshot fields, the time in the
/// microseconds the record hash covers.
#[derive(Serialize, Deserialize)]
struct RecordLine {
    source: String,
    sequence: u64,
    root_hash: String,
    profile: String,
    build_id: String,
    create_time_micros: i64,
    stats: [u64; 5],
    previous_record_hash: String,
    record_hash: String,
    signature: String,
    key_id: String,
}

impl RecordLine {
    fn from_proto(s: &Snapshot) -> anyhow::Result<RecordLine> {
        let t = s.create_time.unwrap_or_default();
        let st = s.stats.unwrap_or_default();
        Ok(RecordLine {
            source: s.source.clone(),
            sequence: s.sequence,
            root_hash: s.root_hash.clone(),
            profile: profile_from_proto(s.profile)
                .map_err(anyhow::Error::msg)?
                .name()
                .to_owned(),
            build_id: s.build_id.clone(),
            create_time_micros: t.seconds * 1_000_000 + i64::from(t.nanos) / 1_000,
            stats: [
                st.file_count,
                st.dir_count,
                st.symlink_count,
                st.skipped_count,
                st.total_bytes,
            ],
            previous_record_hash: s.previous_record_hash.clone(),
            record_hash: s.record_hash.clone(),
            signature: s.signature.clone(),
            key_id: s.key_id.clone(),
        })
    }

    fn to_proto(&self) -> anyhow::Result<Snapshot> {
        let profile = Profile::from_name(&self.profile)
            .with_context(|| format!("profile: {:?} is not a profile", self.profile))?;
        let [
            file_count,
            dir_count,
            symlink_count,
            skipped_count,
            total_bytes,
        ] = self.stats;
        Ok(Snapshot {
            source: self.source.clone(),
            sequence: self.sequence,
            root_hash: self.root_hash.clone(),
            profile: profile_to_proto(profile) as i32,
            build_id: self.build_id.clone(),
            create_time: Some(prost_types::Timestamp {
                seconds: self.create_time_micros.div_euclid(1_000_000),
                nanos: (self.create_time_micros.rem_euclid(1_000_000) * 1_000) as i32,
            }),
            stats: Some(TreeStats {
                file_count,
                dir_count,
                symlink_count,
                skipped_count,
                total_bytes,
            }),
            previous_record_hash: self.previous_record_hash.clone(),
            record_hash: self.record_hash.clone(),
            signature: self.signature.clone(),
            key_id: self.key_id.clone(),
            ..Default::default()
        })
    }
}

fn checkpoint_json(c: &Option<HistoryCheckpoint>) -> serde_json::Value {
    match c {
        None => serde_json::Value::Null,
        Some(c) => json!({
            "kind": c.kind,
            "source": c.source,
            "sequence": c.sequence,
            "record_hash": c.record_hash,
            "signature": c.signature,
            "key_id": c.key_id,
            "actor": c.actor,
        }),
    }
}

fn checkpoint_from_json(value: &serde_json::Value) -> anyhow::Result<Option<HistoryCheckpoint>> {
    if value.is_null() {
        return Ok(None);
    }
    let text = |field: &str| value[field].as_str().unwrap_or_default().to_owned();
    Ok(Some(HistoryCheckpoint {
        kind: text("kind"),
        source: text("source"),
        sequence: value["sequence"]
            .as_u64()
            .context("a checkpoint's sequence is not a number")?,
        record_hash: text("record_hash"),
        signature: text("signature"),
        key_id: text("key_id"),
        create_time: None,
        actor: text("actor"),
    }))
}

/// `merklectl export-history SOURCE`: a header line (format, source, range, keys,
/// checkpoints), then one JSON line per record, oldest first.
pub async fn export(args: ExportHistoryArgs) -> anyhow::Result<()> {
    let history = fetch(&args.db_sync, &args.source, &args.range).await?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let header = json!({
        "format": FORMAT,
        "source": history.source,
        "to_latest": history.to_latest,
        "signing": history.signing,
        "public_keys": history.public_keys,
        "pruned": checkpoint_json(&history.pruned),
        "head": checkpoint_json(&history.head),
        "records": history.records.len(),
    });
    writeln!(out, "{header}")?;
    for record in &history.records {
        serde_json::to_writer(&mut out, &RecordLine::from_proto(record)?)?;
        writeln!(out)?;
    }
    out.flush()?;
    Ok(())
}

/// An export file, read back.
fn read_file(path: &Path) -> anyhow::Result<History> {
    let file = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let mut lines = std::io::BufReader::new(file).lines();
    let first = lines
        .next()
        .transpose()?
        .with_context(|| format!("{}: the file is empty", path.display()))?;
    let header: serde_json::Value = serde_json::from_str(&first)
        .with_context(|| format!("{}: line 1 is not a JSON header", path.display()))?;
    if header["format"] != FORMAT {
        bail!(
            "{}: line 1 names format {}, not {FORMAT}",
            path.display(),
            header["format"]
        );
    }
    let mut records = Vec::new();
    for (number, line) in lines.enumerate() {
        let line = line?;
        let parsed: RecordLine = serde_json::from_str(&line)
            .with_context(|| format!("{}: line {}", path.display(), number + 2))?;
        records.push(
            parsed
                .to_proto()
                .with_context(|| format!("{}: line {}", path.display(), number + 2))?,
        );
    }
    Ok(History {
        source: header["source"].as_str().unwrap_or_default().to_owned(),
        to_latest: header["to_latest"].as_bool().unwrap_or(false),
        signing: header["signing"].as_bool().unwrap_or(false),
        public_keys: serde_json::from_value(header["public_keys"].clone()).unwrap_or_default(),
        pruned: checkpoint_from_json(&header["pruned"])?,
        head: checkpoint_from_json(&header["head"])?,
        records,
    })
}

/// The public keys the verifier trusts: `--trusted-key` files, or the local stack's.
fn trusted_keys(args: &VerifyHistoryArgs) -> anyhow::Result<Vec<VerifyingKey>> {
    let files = if args.trusted_keys.is_empty() {
        let local = args.data_dir.join(PUBLIC_KEY_FILE);
        if !local.exists() {
            if args.allow_unsigned {
                return Ok(Vec::new());
            }
            bail!(
                "no trusted key: pass --trusted-key FILE (the local stack's key, {}, does not exist)",
                local.display()
            );
        }
        vec![local]
    } else {
        args.trusted_keys.clone()
    };
    files
        .iter()
        .map(|path| {
            let pem = std::fs::read_to_string(path)
                .with_context(|| format!("--trusted-key {}", path.display()))?;
            VerifyingKey::from_public_key_pem(&pem).map_err(|e| {
                anyhow::anyhow!(
                    "--trusted-key {}: not an Ed25519 public key in PEM (BEGIN PUBLIC KEY): {e}",
                    path.display()
                )
            })
        })
        .collect()
}

/// Checks the history: `Ok(Err(failure))` names the first bad record.
fn check(history: &History, trust: &Trust) -> anyhow::Result<Result<Verified, Failure>> {
    let mut records = Vec::with_capacity(history.records.len());
    for snapshot in &history.records {
        match record_from_proto(snapshot) {
            Ok(record) => records.push(record),
            // A record that cannot even be read is the first bad one, when none before is.
            Err(why) => {
                let sequence = snapshot.sequence;
                let pruned = history
                    .pruned
                    .as_ref()
                    .and_then(|c| checkpoint_from_proto(c).ok());
                return Ok(
                    verify(&records, pruned.as_ref(), None, false, trust).and_then(|_| {
                        Err(Failure {
                            what: format!("record {sequence}"),
                            why: format!("it cannot be read: {why}"),
                            sequence: Some(sequence),
                        })
                    }),
                );
            }
        }
    }
    let checkpoint = |c: &Option<HistoryCheckpoint>, name: &str| -> anyhow::Result<_> {
        c.as_ref()
            .map(checkpoint_from_proto)
            .transpose()
            .map_err(|why| anyhow::anyhow!("the {name} checkpoint cannot be read: {why}"))
    };
    let pruned = checkpoint(&history.pruned, "pruning")?;
    let head = checkpoint(&history.head, "head")?;
    Ok(verify(
        &records,
        pruned.as_ref(),
        head.as_ref(),
        history.to_latest,
        trust,
    ))
}

/// With `--deep`: every record's stored tree, fetched node by node, hashes to its root
/// (a node shared by several records is checked once). Returns the nodes checked.
async fn check_trees(
    db_sync: &DbSyncAddr,
    records: &[StoredRecord],
) -> anyhow::Result<Result<u64, Failure>> {
    let client = db_sync.client()?;
    let mut seen: HashSet<Digest> = HashSet::new();
    for stored in records {
        let record = &stored.record;
        let mut level = vec![record.root];
        seen.insert(record.root);
        let mut depth = 0;
        while !level.is_empty() {
            if depth > merkle_core::MAX_DEPTH {
                return Ok(Err(Failure {
                    what: format!("record {}", record.sequence),
                    why: format!(
                        "its stored tree (root {}) nests deeper than {} directories, the limit of docs/merkle-spec.md section 4.1",
                        record.root,
                        merkle_core::MAX_DEPTH
                    ),
                    sequence: Some(record.sequence),
                }));
            }
            depth += 1;
            let fetched: Result<Vec<_>, tonic::Status> = futures::stream::iter(level)
                .map(|hash| fetch_node(&client, hash, record.profile))
                .buffer_unordered(PARALLEL_FETCHES)
                .try_collect()
                .await;
            let nodes = match fetched {
                Ok(nodes) => nodes,
                Err(status) => {
                    return Ok(Err(Failure {
                        what: format!("record {}", record.sequence),
                        why: format!(
                            "its stored tree (root {}) does not hash to its root: {:?}: {}",
                            record.root,
                            status.code(),
                            status.message()
                        ),
                        sequence: Some(record.sequence),
                    }));
                }
            };
            level = nodes
                .iter()
                .flat_map(|n| &n.entries)
                .filter(|e| e.kind == EntryKind::Directory)
                .map(|e| e.hash)
                .filter(|h| seen.insert(*h))
                .collect();
        }
    }
    Ok(Ok(seen.len() as u64))
}

/// `merklectl verify-history`: true when the history verified.
/// The history's last record in the transparency log (see `--log`): (sequence, leaf, size).
async fn check_log(
    args: &VerifyHistoryArgs,
    history: &History,
) -> anyhow::Result<Result<(u64, u64, u64), Failure>> {
    let failure = |what: String, why: String, sequence: Option<u64>| Failure {
        what,
        why,
        sequence,
    };
    let Some(last) = history.records.last() else {
        return Ok(Ok((0, 0, 0)));
    };
    let options = crate::log::LogOptions {
        db_sync: args.db_sync.clone(),
        verifier_key: None,
        witnesses: crate::log::WitnessArgs {
            keys: args.witnesses.clone(),
            witness_policy: args.witness_policy,
        },
        json: false,
    };
    let accepted = match crate::log::check_state(&options, args.log_state.as_deref()).await? {
        Ok(accepted) => accepted,
        Err(why) => {
            return Ok(Err(failure("the transparency log".into(), why, None)));
        }
    };
    Ok(
        match crate::log::record_included(
            &args.db_sync,
            &accepted,
            &history.source,
            last.sequence,
            &last.record_hash,
        )
        .await?
        {
            Ok(leaf) => Ok((last.sequence, leaf, accepted.size)),
            Err(why) => Err(failure(
                format!("record {}", last.sequence),
                why,
                Some(last.sequence),
            )),
        },
    )
}

pub async fn verify_history(args: VerifyHistoryArgs) -> anyhow::Result<bool> {
    let history = match (&args.file, &args.source) {
        (Some(file), source) => {
            let history = read_file(file)?;
            if let Some(source) = source
                && *source != history.source
            {
                bail!(
                    "{} holds the history of {:?}, not of {source:?}",
                    file.display(),
                    history.source
                );
            }
            history
        }
        (None, Some(source)) => fetch(&args.db_sync, source, &args.range).await?,
        (None, None) => bail!("name a SOURCE or pass --file"),
    };
    let mut trust = Trust::new(trusted_keys(&args)?, !args.allow_unsigned);
    // The log's proof of the last record, checked below, stands for every record's signature.
    trust.records_in_log = args.log;
    let mut outcome = check(&history, &trust)?;
    let mut nodes = None;
    if args.deep && outcome.is_ok() {
        let records: Vec<StoredRecord> = history
            .records
            .iter()
            .filter_map(|s| record_from_proto(s).ok())
            .collect();
        match check_trees(&args.db_sync, &records).await? {
            Ok(n) => nodes = Some(n),
            Err(failure) => outcome = Err(failure),
        }
    }
    let mut in_log = None;
    if args.log && outcome.is_ok() {
        match check_log(&args, &history).await? {
            Ok(found) => in_log = Some(found),
            Err(failure) => outcome = Err(failure),
        }
    }
    let untrusted: Vec<&String> = history
        .public_keys
        .keys()
        .filter(|id| !trust.keys.contains_key(*id))
        .collect();
    match &outcome {
        Ok(v) => {
            if args.json {
                println!(
                    "{}",
                    json!({
                        "ok": true,
                        "source": history.source,
                        "records": v.records,
                        "first": v.first,
                        "last": v.last,
                        "signed_by": v.signed_by,
                        "unsigned": v.unsigned,
                        "pruned_through": history.pruned.as_ref().map(|c| c.sequence),
                        "head": history.head.as_ref().map(|c| c.sequence),
                        "nodes_checked": nodes,
                    })
                );
            } else {
                let signed: Vec<String> = v
                    .signed_by
                    .iter()
                    .map(|(id, n)| format!("{n} signed by key {id}"))
                    .collect();
                println!(
                    "{}: records {}..{} ({}) verified: every hash and link{}{}",
                    history.source,
                    v.first,
                    v.last,
                    v.records,
                    if args.log {
                        ", the last in the transparency log (which stands for their signatures)"
                            .to_owned()
                    } else if signed.is_empty() {
                        String::new()
                    } else {
                        format!(", {}", signed.join(", "))
                    },
                    if v.unsigned > 0 {
                        format!(", {} unsigned", v.unsigned)
                    } else {
                        String::new()
                    }
                );
                if let Some(p) = &history.pruned {
                    println!(
                        "  starts after record {}, which retention pruned (signed checkpoint)",
                        p.sequence
                    );
                }
                if history.to_latest
                    && let Some(h) = &history.head
                {
                    println!("  reaches the signed head, record {}", h.sequence);
                }
                if let Some(n) = nodes {
                    println!("  every stored tree hashes to its root ({n} nodes checked)");
                }
                if let Some((sequence, leaf, size)) = in_log {
                    println!(
                        "  record {sequence} is leaf {leaf} of the transparency log's checkpoint of {size} leaves, consistent with the one this machine saw before"
                    );
                }
                if !untrusted.is_empty() {
                    println!(
                        "  DbSync also publishes keys you did not trust: {}",
                        untrusted
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
            }
        }
        Err(failure) => {
            if args.json {
                println!(
                    "{}",
                    json!({
                        "ok": false,
                        "source": history.source,
                        "sequence": failure.sequence,
                        "what": failure.what,
                        "why": failure.why,
                    })
                );
            } else {
                eprintln!(
                    "{}: verification FAILED at {}: {}",
                    history.source, failure.what, failure.why
                );
                if !history.signing && failure.why.contains("not signed") {
                    eprintln!(
                        "  DbSync has no signing key (SIGNING_KEY_FILE); --allow-unsigned checks the chain alone"
                    );
                }
            }
        }
    }
    Ok(outcome.is_ok())
}
