//! `merklectl log`: DbSync's transparency log (docs/merkle-spec.md section 11): its checkpoint,
//! and inclusion and consistency proofs, each checked here against the checkpoint's root with
//! `tlog_tiles` (and its signature against `--verifier-key` when given) before it is printed.

use anyhow::{Context as _, bail};
use merkle_proto::dbsync::v1::{
    GetLogCheckpointRequest, GetLogCheckpointResponse, GetLogConsistencyProofRequest,
    GetLogInclusionProofRequest, db_sync_service_client::DbSyncServiceClient,
};
use merkle_shared::client::Channel;
use serde_json::json;
use signed_note::{Note, StandardVerifier, VerifierList};
use tlog_tiles::{
    Checkpoint, Hash, Tile, check_record, check_tree, record_hash, stored_hashes_for_record_hash,
    tree_hash,
};

use crate::remote::DbSyncAddr;

/// `merklectl log`.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    #[command(subcommand)]
    pub command: LogCommand,
}

/// What every `merklectl log` command takes.
#[derive(Debug, Clone, clap::Args)]
pub struct LogOptions {
    #[command(flatten)]
    pub db_sync: DbSyncAddr,
    /// The checkpoint key you trust (`<origin>+<key id>+<base64 key>`, as GetLogCheckpoint
    /// shows it): every checkpoint's signature is checked against it.
    #[arg(long, env = "LOG_VERIFIER_KEY")]
    pub verifier_key: Option<String>,
    #[command(flatten)]
    pub witnesses: WitnessArgs,
    /// JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The witnesses a checkpoint must be cosigned by.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct WitnessArgs {
    /// A witness whose cosignature (C2SP tlog-cosignature) checkpoints must carry: its
    /// verifier key (`name+id+base64(0x04 || key)`); repeat for several.
    #[arg(long = "witness", value_name = "KEY")]
    pub keys: Vec<String>,
    /// How many of the --witness keys must have cosigned (default: all of them).
    #[arg(long)]
    pub witness_policy: Option<usize>,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum LogCommand {
    /// Print the newest checkpoint (or the one of `--size` leaves), a C2SP signed note.
    Checkpoint {
        #[arg(long)]
        size: Option<u64>,
        #[command(flatten)]
        options: LogOptions,
    },
    /// Prove that a record (`SOURCE@SEQ`, or `--leaf N`) is in the log, checked against the
    /// checkpoint of `--size` leaves (default: the newest).
    Prove {
        /// `SOURCE@SEQ`: a source's record by sequence number.
        record: Option<String>,
        #[arg(long, conflicts_with = "record")]
        leaf: Option<u64>,
        #[arg(long)]
        size: Option<u64>,
        #[command(flatten)]
        options: LogOptions,
    },
    /// Check the newest checkpoint against the last one this machine saw (kept in a state
    /// file): signed by the key trusted (pinned on first use, or --verifier-key), and
    /// consistent with it, so a rewritten log is caught even when it was validly signed again.
    /// Exits 1 when it is not.
    Verify {
        /// The state file (default: $XDG_STATE_HOME or ~/.local/state, merklectl/log-ORIGIN.json).
        #[arg(long)]
        state: Option<std::path::PathBuf>,
        #[command(flatten)]
        options: LogOptions,
    },
    /// Prove that the log of OLD leaves is a prefix of the log of NEW leaves (default: the
    /// newest checkpoint's): nothing was rewritten between the two checkpoints.
    Consistency {
        old: u64,
        new: Option<u64>,
        #[command(flatten)]
        options: LogOptions,
    },
}

/// `merklectl export-log`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExportLogArgs {
    /// The directory to write the log into (`checkpoint`, `tile/...`); full tiles already
    /// there are kept, so exporting again adds only what is new.
    pub dir: std::path::PathBuf,
    #[command(flatten)]
    pub options: LogOptions,
}

type Client = DbSyncServiceClient<Channel>;

/// A checkpoint as fetched and checked: its size and root.
struct Checked {
    response: GetLogCheckpointResponse,
    size: u64,
    root: Hash,
}

async fn checkpoint(args: &LogOptions, c: &mut Client, size: u64) -> anyhow::Result<Checked> {
    let response = c
        .get_log_checkpoint(GetLogCheckpointRequest { size })
        .await
        .map_err(args.db_sync.failed())?
        .into_inner();
    let parsed = checked_note(
        &response.note,
        args.verifier_key.as_deref(),
        &args.witnesses,
    )?;
    if parsed.size() != response.size || hex(parsed.hash()) != response.root_hash {
        bail!("the checkpoint's text does not match its size and root fields");
    }
    Ok(Checked {
        size: parsed.size(),
        root: *parsed.hash(),
        response,
    })
}

/// A checkpoint note checked: its signature against `key` (when given) and the cosignatures
/// `witnesses` asks for; the checkpoint it states.
pub fn checked_note(
    note: &str,
    key: Option<&str>,
    witnesses: &WitnessArgs,
) -> anyhow::Result<Checkpoint> {
    let (policy, witnesses) = (witnesses.witness_policy, &witnesses.keys);
    let text = match key {
        Some(key) => {
            let verifier = StandardVerifier::new(key)
                .map_err(|e| anyhow::anyhow!("--verifier-key {key:?}: {e}"))?;
            let note = Note::from_bytes(note.as_bytes())
                .map_err(|e| anyhow::anyhow!("the checkpoint is not a signed note: {e}"))?;
            note.verify(&VerifierList::new(vec![Box::new(verifier)]))
                .map_err(|e| {
                    anyhow::anyhow!(
                        "the checkpoint's signature does not verify with --verifier-key: {e}"
                    )
                })?;
            note.text().to_vec()
        }
        // Unverified: the text up to the signatures.
        None => match note.split_once("\n\n") {
            Some((text, _)) => format!("{text}\n").into_bytes(),
            None => note.as_bytes().to_vec(),
        },
    };
    let parsed = Checkpoint::from_bytes(&text)
        .map_err(|e| anyhow::anyhow!("the checkpoint text is malformed: {e}"))?;
    if !witnesses.is_empty() {
        let signatures = note.split_once("\n\n").map_or("", |(_, lines)| lines);
        let mut cosigned = Vec::new();
        for key in witnesses {
            let (name, public) = merkle_core::cosignature::parse_verifier_key(key)
                .map_err(|e| anyhow::anyhow!("--witness: {e}"))?;
            if signatures
                .lines()
                .any(|l| merkle_core::cosignature::verify(l, &name, &public, &text).is_ok())
            {
                cosigned.push(name);
            }
        }
        let needed = policy.unwrap_or(witnesses.len());
        if cosigned.len() < needed {
            bail!(
                "the checkpoint of {} leaves is cosigned by {} of the witnesses you require ({needed} of {}): {}",
                parsed.size(),
                cosigned.len(),
                witnesses.len(),
                if cosigned.is_empty() {
                    "none".to_owned()
                } else {
                    cosigned.join(", ")
                }
            );
        }
    }
    Ok(parsed)
}

fn hex(hash: &Hash) -> String {
    merkle_core::digest::hex(&hash.0)
}

fn hashes(list: &[String]) -> anyhow::Result<Vec<Hash>> {
    list.iter()
        .map(|h| {
            let digest: merkle_core::Digest = h.parse().context("a proof hash")?;
            Ok(Hash(digest.0))
        })
        .collect()
}

/// The consistency proof from the log of `old` (size, root) to `new`'s, checked here: its hashes,
/// or why it does not hold.
async fn consistency(
    options: &LogOptions,
    c: &mut Client,
    old: (u64, Hash),
    new: &Checked,
) -> anyhow::Result<Result<Vec<String>, tlog_tiles::Error>> {
    let proof = c
        .get_log_consistency_proof(GetLogConsistencyProofRequest {
            old_size: old.0,
            new_size: new.size,
        })
        .await
        .map_err(options.db_sync.failed())?
        .into_inner();
    Ok(
        check_tree(&hashes(&proof.hashes)?, new.size, new.root, old.0, old.1)
            .map(|()| proof.hashes),
    )
}

/// What `merklectl log verify` remembers of a log between runs.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SeenLog {
    origin: String,
    /// The checkpoint key trusted (pinned on first use or given).
    verifier_key: String,
    size: u64,
    root_hash: String,
    note: String,
    /// When it was seen (seconds since 1970).
    seen_at: u64,
}

fn default_state(origin: &str) -> anyhow::Result<std::path::PathBuf> {
    let base = match std::env::var_os("XDG_STATE_HOME") {
        Some(dir) => std::path::PathBuf::from(dir),
        None => std::path::PathBuf::from(
            std::env::var_os("HOME").context("set --state (no HOME to keep the state under)")?,
        )
        .join(".local/state"),
    };
    let name: String = origin
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    Ok(base.join("merklectl").join(format!("log-{name}.json")))
}

/// The newest checkpoint as [`check_state`] accepted it.
pub struct Accepted {
    pub size: u64,
    pub root: Hash,
    pub root_hash: String,
    /// The size seen before, if this machine had seen the log.
    pub before: Option<u64>,
    pub state: std::path::PathBuf,
}

/// Checks the newest checkpoint against the log state kept in `state` (default: under
/// ~/.local/state): signed by the key trusted (pinned on first use, or --verifier-key), with
/// the witnesses' cosignatures asked for, and consistent with the checkpoint seen before; then
/// keeps it. `Ok(Err(why))` when the log fails.
pub async fn check_state(
    options: &LogOptions,
    state: Option<&std::path::Path>,
) -> anyhow::Result<Result<Accepted, String>> {
    let mut c = options.db_sync.client()?;
    let newest = c
        .get_log_checkpoint(GetLogCheckpointRequest { size: 0 })
        .await
        .map_err(options.db_sync.failed())?
        .into_inner();
    let path = match state {
        Some(path) => path.to_owned(),
        None => default_state(&newest.origin)?,
    };
    let seen: Option<SeenLog> = match std::fs::read(&path) {
        Ok(bytes) => Some(
            serde_json::from_slice(&bytes)
                .with_context(|| format!("{}: not a log state file", path.display()))?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("{}", path.display())),
    };
    let key = match (&options.verifier_key, &seen) {
        (Some(key), _) => key.clone(),
        (None, Some(seen)) => seen.verifier_key.clone(),
        (None, None) if !newest.verifier_key.is_empty() => {
            eprintln!(
                "trusting on first use the checkpoint key {} (pin it with --verifier-key)",
                newest.verifier_key
            );
            newest.verifier_key.clone()
        }
        (None, None) => bail!("the log's checkpoints are unsigned: there is no key to trust"),
    };
    let pinned = LogOptions {
        verifier_key: Some(key.clone()),
        ..options.clone()
    };
    let cp = match checkpoint(&pinned, &mut c, newest.size).await {
        Ok(cp) => cp,
        Err(e) => return Ok(Err(format!("{e:#}"))),
    };
    if let Some(seen) = &seen {
        if seen.origin != cp.response.origin {
            bail!(
                "{}: the state is of the log {:?}, DbSync serves {:?}",
                path.display(),
                seen.origin,
                cp.response.origin
            );
        }
        let rewritten = |why: String| {
            Ok(Err(format!(
                "{why}; the log was rewritten since this machine saw it (state {})",
                path.display()
            )))
        };
        if cp.size < seen.size {
            return rewritten(format!(
                "it has {} leaves, fewer than the {} of the checkpoint seen before",
                cp.size, seen.size
            ));
        }
        let old_root: merkle_core::Digest =
            seen.root_hash.parse().context("the state's root hash")?;
        if cp.size == seen.size {
            if cp.response.root_hash != seen.root_hash {
                return rewritten(format!(
                    "the checkpoint of {} leaves has root {}, the one seen before {}",
                    cp.size, cp.response.root_hash, seen.root_hash
                ));
            }
        } else if let Err(e) =
            consistency(options, &mut c, (seen.size, Hash(old_root.0)), &cp).await?
        {
            return rewritten(format!(
                "the log of {} leaves is not consistent with the one of {} seen before ({e})",
                cp.size, seen.size
            ));
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let kept = SeenLog {
        origin: cp.response.origin.clone(),
        verifier_key: key,
        size: cp.size,
        root_hash: cp.response.root_hash.clone(),
        note: cp.response.note.clone(),
        seen_at: now,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
    }
    // Written whole, then renamed: a crash never leaves half a state.
    let temporary = path.with_extension("json.tmp");
    std::fs::write(&temporary, serde_json::to_vec_pretty(&kept)?)
        .with_context(|| format!("{}", temporary.display()))?;
    std::fs::rename(&temporary, &path).with_context(|| format!("{}", path.display()))?;
    Ok(Ok(Accepted {
        size: cp.size,
        root: cp.root,
        root_hash: cp.response.root_hash,
        before: seen.map(|s| s.size),
        state: path,
    }))
}

/// `merklectl log verify`: true when the log is consistent with what was seen before.
pub async fn verify(args: LogArgs) -> anyhow::Result<bool> {
    let LogCommand::Verify { state, options } = &args.command else {
        bail!("not the verify command");
    };
    match check_state(options, state.as_deref()).await? {
        Err(why) => {
            eprintln!("log verification FAILED: {why}");
            Ok(false)
        }
        Ok(accepted) => {
            match accepted.before {
                Some(before) => println!(
                    "the log is consistent: {before} leaves seen before, {} now (root {}); state {}",
                    accepted.size,
                    accepted.root_hash,
                    accepted.state.display()
                ),
                None => println!(
                    "the log has {} leaves (root {}); first seen, state {}",
                    accepted.size,
                    accepted.root_hash,
                    accepted.state.display()
                ),
            }
            Ok(true)
        }
    }
}

/// Whether `source`'s record `sequence`, whose hash is `expected` (hex), is a leaf of the
/// log's tree `accepted` (the inclusion proof checked here): its leaf index, or why not.
pub async fn record_included(
    db_sync: &DbSyncAddr,
    accepted: &Accepted,
    source: &str,
    sequence: u64,
    expected: &str,
) -> anyhow::Result<Result<u64, String>> {
    let mut c = db_sync.client()?;
    let proof = match c
        .get_log_inclusion_proof(GetLogInclusionProofRequest {
            source: source.to_owned(),
            sequence,
            tree_size: accepted.size,
            ..Default::default()
        })
        .await
    {
        Ok(p) => p.into_inner(),
        Err(status)
            if status.code() == tonic::Code::NotFound
                || status.code() == tonic::Code::OutOfRange =>
        {
            return Ok(Err(format!(
                "it is not in the transparency log's checkpoint of {} leaves ({})",
                accepted.size,
                status.message()
            )));
        }
        Err(status) => return Err(db_sync.failed()(status)),
    };
    if proof.record_hash != expected {
        return Ok(Err(format!(
            "the log's leaf {} holds the record hash {}, not {expected}",
            proof.leaf_index, proof.record_hash
        )));
    }
    let data: merkle_core::Digest = proof.record_hash.parse().context("the record hash")?;
    if let Err(e) = check_record(
        &hashes(&proof.hashes)?,
        accepted.size,
        accepted.root,
        proof.leaf_index,
        record_hash(&data.0),
    ) {
        return Ok(Err(format!(
            "its inclusion proof in the log's checkpoint of {} leaves does not verify ({e})",
            accepted.size
        )));
    }
    Ok(Ok(proof.leaf_index))
}

pub async fn run(args: LogArgs) -> anyhow::Result<()> {
    let command = &args.command;
    // Every command's own options: `args` below.
    let (LogCommand::Checkpoint { options, .. }
    | LogCommand::Prove { options, .. }
    | LogCommand::Verify { options, .. }
    | LogCommand::Consistency { options, .. }) = command;
    let args = options;
    let mut c = args.db_sync.client()?;
    let signed = if args.verifier_key.is_some() {
        "signature verified"
    } else {
        "signature not checked (no --verifier-key)"
    };
    match command {
        LogCommand::Checkpoint { size, .. } => {
            let cp = checkpoint(args, &mut c, size.unwrap_or(0)).await?;
            if args.json {
                println!(
                    "{}",
                    json!({
                        "origin": cp.response.origin,
                        "size": cp.size,
                        "root_hash": cp.response.root_hash,
                        "log_size": cp.response.log_size,
                        "verifier_key": cp.response.verifier_key,
                        "note": cp.response.note,
                    })
                );
            } else {
                print!("{}", cp.response.note);
                eprintln!("{signed}; the log has {} leaves", cp.response.log_size);
            }
        }
        LogCommand::Prove {
            record, leaf, size, ..
        } => {
            let cp = checkpoint(args, &mut c, size.unwrap_or(0)).await?;
            let mut request = GetLogInclusionProofRequest {
                tree_size: cp.size,
                ..Default::default()
            };
            match (record, leaf) {
                (Some(record), _) => {
                    let (source, sequence) = record
                        .rsplit_once('@')
                        .and_then(|(s, n)| Some((s, n.parse::<u64>().ok()?)))
                        .with_context(|| format!("{record}: name a record as SOURCE@SEQ"))?;
                    request.source = source.to_owned();
                    request.sequence = sequence;
                }
                (None, Some(leaf)) => request.leaf_index = *leaf,
                (None, None) => bail!("name a record (SOURCE@SEQ) or --leaf N"),
            }
            let proof = c
                .get_log_inclusion_proof(request)
                .await
                .map_err(args.db_sync.failed())?
                .into_inner();
            let data: merkle_core::Digest = proof.record_hash.parse().context("the record hash")?;
            check_record(
                &hashes(&proof.hashes)?,
                cp.size,
                cp.root,
                proof.leaf_index,
                record_hash(&data.0),
            )
            .map_err(|e| anyhow::anyhow!("the inclusion proof does not verify: {e}"))?;
            if args.json {
                println!(
                    "{}",
                    json!({
                        "source": proof.source,
                        "sequence": proof.sequence,
                        "record_hash": proof.record_hash,
                        "leaf_index": proof.leaf_index,
                        "tree_size": proof.tree_size,
                        "root_hash": cp.response.root_hash,
                        "hashes": proof.hashes,
                        "checkpoint": cp.response.note,
                    })
                );
            } else {
                println!(
                    "{}@{} (record {}) is leaf {} of the log's {} leaves (root {}): proof of {} hashes verified; {signed}",
                    proof.source,
                    proof.sequence,
                    proof.record_hash,
                    proof.leaf_index,
                    cp.size,
                    cp.response.root_hash,
                    proof.hashes.len()
                );
            }
        }
        LogCommand::Verify { .. } => bail!("merklectl log verify runs through verify()"),
        LogCommand::Consistency { old, new, .. } => {
            let newer = checkpoint(args, &mut c, new.unwrap_or(0)).await?;
            let older = checkpoint(args, &mut c, *old).await?;
            let proof = consistency(args, &mut c, (older.size, older.root), &newer)
                .await?
                .map_err(|e| {
                    anyhow::anyhow!(
                        "the log of {} leaves is NOT a prefix of the log of {}: {e}",
                        older.size,
                        newer.size
                    )
                })?;
            if args.json {
                println!(
                    "{}",
                    json!({
                        "old_size": older.size,
                        "old_root_hash": older.response.root_hash,
                        "new_size": newer.size,
                        "new_root_hash": newer.response.root_hash,
                        "hashes": proof,
                    })
                );
            } else {
                println!(
                    "the log of {} leaves (root {}) is a prefix of the log of {} (root {}): proof of {} hashes verified; {signed}",
                    older.size,
                    older.response.root_hash,
                    newer.size,
                    newer.response.root_hash,
                    proof.len()
                );
            }
        }
    }
    Ok(())
}

/// Writes the log as C2SP tlog-tiles into a directory, then checks what is there from scratch:
/// the tree is rebuilt from the entries, its root must be the checkpoint's, and every tile must
/// list the rebuilt hashes. (`TileHashReader` of `tlog_tiles` and of Go's sumdb/tlog does not
/// authenticate every full tile it reads, so the check does not rely on it.)
pub async fn export(args: ExportLogArgs) -> anyhow::Result<()> {
    use merkle_proto::dbsync::v1::GetLogTileRequest;
    use merkle_shared::log_tiles::{HEIGHT, WIDTH, parse, path_of, paths};
    let options = &args.options;
    let mut c = options.db_sync.client()?;
    let cp = checkpoint(options, &mut c, 0).await?;
    let dir = &args.dir;
    let mut fetched = 0;
    let paths = paths(cp.size);
    for path in &paths {
        let file = dir.join(path);
        // A full tile never changes: one exported before is kept (and checked below).
        if !path.contains(".p/") && file.exists() {
            continue;
        }
        let tile = c
            .get_log_tile(GetLogTileRequest { path: path.clone() })
            .await
            .map_err(options.db_sync.failed())?
            .into_inner();
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("{}: cannot create it", parent.display()))?;
        }
        std::fs::write(&file, &tile.data)
            .with_context(|| format!("{}: cannot write it", file.display()))?;
        fetched += 1;
    }
    // The tree again, from the entries alone.
    let mut stored = merkle_shared::log_tiles::MemoryHashes::default();
    let mut leaf = 0u64;
    while leaf < cp.size {
        let end = (leaf + WIDTH).min(cp.size);
        let bundle = Tile::new(HEIGHT, 0, leaf / WIDTH, (end - leaf) as u32, true);
        let path = dir.join(path_of(&bundle));
        let data = std::fs::read(&path).with_context(|| format!("{}", path.display()))?;
        let entries =
            entries(&data).with_context(|| format!("{}: not an entry bundle", path.display()))?;
        if entries.len() as u64 != end - leaf {
            bail!(
                "{}: {} entries, expected {}",
                path.display(),
                entries.len(),
                end - leaf
            );
        }
        for (k, entry) in entries.iter().enumerate() {
            let hashes =
                stored_hashes_for_record_hash(leaf + k as u64, record_hash(entry), &stored)
                    .map_err(|e| anyhow::anyhow!("rebuilding the tree: {e}"))?;
            stored.0.extend(hashes);
        }
        leaf = end;
    }
    let root =
        tree_hash(cp.size, &stored).map_err(|e| anyhow::anyhow!("rebuilding the tree: {e}"))?;
    if root != cp.root {
        bail!(
            "the entries in {} do not hash to the checkpoint's root {}",
            dir.display(),
            cp.response.root_hash
        );
    }
    for path in paths.iter().filter(|p| !p.starts_with("tile/entries/")) {
        let tile = parse(path).with_context(|| format!("{path}: not a tile path"))?;
        let expected = tile
            .read_data(&stored)
            .map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
        let file = dir.join(path);
        let data = std::fs::read(&file).with_context(|| format!("{}", file.display()))?;
        if data != expected {
            bail!("{path}: its hashes are not the entries' (the tile was altered)");
        }
    }
    // The checkpoint last: a reader of the directory never sees one its tiles do not cover.
    std::fs::write(dir.join("checkpoint"), &cp.response.note)
        .with_context(|| format!("{}: cannot write the checkpoint", dir.display()))?;
    println!(
        "{}: the log of {} leaves ({} tiles and bundles, {fetched} fetched now), rebuilt from its entries: root {} as the checkpoint says, every tile as rebuilt",
        dir.display(),
        cp.size,
        paths.len(),
        cp.response.root_hash
    );
    Ok(())
}

/// The entries of an entry bundle (each a big-endian u16 length and the entry).
fn entries(mut data: &[u8]) -> Option<Vec<&[u8]>> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let len = u16::from_be_bytes(data.get(..2)?.try_into().ok()?) as usize;
        out.push(data.get(2..2 + len)?);
        data = &data[2 + len..];
    }
    Some(out)
}
