//! Commands on the trees DbSync stores: `push` (hash a directory here and store it as a
//! snapshot), `snapshots`, `ls`, and the `--stored` forms of `diff` and `prove`. Tables by
//! default, `--json` for scripts; `--addr` defaults to the local stack's DbSync.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use merkle_core::{Digest, MemTree, TreeStats};
use merkle_proto::{
    dbsync::v1::{
        DiffSnapshotsRequest, FindMissingNodesRequest, GetInclusionProofRequest,
        GetLatestRootRequest, GetSnapshotRequest, ListDirectoryRequest, ListSnapshotsRequest,
        ListSourcesRequest, Snapshot, SyncTreeHeader, SyncTreeRequest, SyncTreeResponse,
        db_sync_service_client::DbSyncServiceClient, sync_tree_request::Content,
    },
    treebuilder::v1::NodeBatch,
};
use merkle_shared::{
    client::Channel,
    convert::{
        change_from_proto, node_to_proto, profile_to_proto, proof_from_proto, stats_to_proto,
    },
};
use serde_json::json;

use crate::remote::DbSyncAddr;

/// Hashes per FindMissingNodes call (the contract's limit).
const FIND_BATCH: usize = 10_000;
/// Bytes of nodes per SyncTree message, well under the 4 MiB message limit.
const MESSAGE_BYTES: usize = 1 << 20;

/// Stores `tree` as the newest snapshot of `source`. When the source's latest root is already
/// `tree`'s, only the header is sent (DbSync then writes nothing); else it asks DbSync which of
/// the tree's nodes it lacks (every node hash, so each node relied on is kept from garbage
/// collection) and streams just those. Returns DbSync's answer.
pub async fn upload(
    client: &mut DbSyncServiceClient<Channel>,
    source: &str,
    build_id: &str,
    tree: &MemTree,
    stats: &TreeStats,
) -> Result<SyncTreeResponse, tonic::Status> {
    // Whether the tree is stored already is PostgreSQL's answer, never the cache's.
    let latest = client
        .get_latest_root(GetLatestRootRequest {
            source: source.to_owned(),
            consistent: true,
        })
        .await;
    let unchanged = match latest {
        Ok(answer) => answer
            .into_inner()
            .snapshot
            .is_some_and(|s| s.root_hash == tree.root.to_hex()),
        Err(status) if status.code() == tonic::Code::NotFound => false,
        Err(status) => return Err(status),
    };
    let hashes: Vec<String> = if unchanged {
        Vec::new()
    } else {
        tree.nodes.keys().map(Digest::to_hex).collect()
    };
    let mut missing = Vec::new();
    for chunk in hashes.chunks(FIND_BATCH) {
        let answer = client
            .find_missing_nodes(FindMissingNodesRequest {
                hashes: chunk.to_vec(),
            })
            .await?
            .into_inner();
        missing.extend(answer.missing_hashes);
    }
    let header = SyncTreeHeader {
        source: source.to_owned(),
        root_hash: tree.root.to_hex(),
        build_id: build_id.to_owned(),
        profile: profile_to_proto(tree.profile) as i32,
        stats: Some(stats_to_proto(stats)),
    };
    let mut messages = vec![SyncTreeRequest {
        content: Some(Content::Header(header)),
    }];
    let mut batch = NodeBatch::default();
    let mut bytes = 0;
    for hex in &missing {
        let hash: Digest = hex
            .parse()
            .map_err(|_| tonic::Status::internal("DbSync named a bad hash"))?;
        let Some(node) = tree.nodes.get(&hash) else {
            continue;
        };
        let message = node_to_proto(hash, node);
        bytes += prost::Message::encoded_len(&message);
        batch.nodes.push(message);
        if bytes >= MESSAGE_BYTES {
            messages.push(SyncTreeRequest {
                content: Some(Content::Nodes(std::mem::take(&mut batch))),
            });
            bytes = 0;
        }
    }
    if !batch.nodes.is_empty() {
        messages.push(SyncTreeRequest {
            content: Some(Content::Nodes(batch)),
        });
    }
    Ok(client
        .sync_tree(tokio_stream::iter(messages))
        .await?
        .into_inner())
}

/// `merklectl push`.
#[derive(Debug, Clone, clap::Args)]
pub struct PushArgs {
    /// The source to store the snapshot under.
    pub source: String,
    /// The directory to hash.
    pub dir: PathBuf,
    #[command(flatten)]
    pub tree: crate::local::TreeArgs,
    /// An id for this build: a retried push with the same id stores nothing twice.
    #[arg(long, default_value = "")]
    pub build_id: String,
    #[command(flatten)]
    pub db_sync: DbSyncAddr,
    #[arg(long)]
    pub json: bool,
}

pub async fn push(args: PushArgs) -> anyhow::Result<()> {
    let dir = args.dir.clone();
    let options = args.tree.options();
    let (outcome, tree) =
        tokio::task::spawn_blocking(move || crate::local::build_tree(&dir, options))
            .await
            .context("hashing")??;
    let mut client = args.db_sync.client()?;
    let answer = upload(
        &mut client,
        &args.source,
        &args.build_id,
        &tree,
        &outcome.stats,
    )
    .await
    .map_err(args.db_sync.failed())?;
    let snapshot = answer.snapshot.unwrap_or_default();
    if args.json {
        println!(
            "{}",
            json!({
                "changed": answer.changed,
                "nodes_written": answer.nodes_written,
                "snapshot": snapshot_json(&snapshot),
            })
        );
    } else {
        println!(
            "{} {}@{} root {} ({} nodes written)",
            if answer.changed {
                "stored"
            } else {
                "unchanged"
            },
            snapshot.source,
            snapshot.sequence,
            snapshot.root_hash,
            answer.nodes_written
        );
    }
    Ok(())
}

fn time(snapshot: &Snapshot) -> String {
    snapshot
        .create_time
        .and_then(|t| std::time::SystemTime::try_from(t).ok())
        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
        .unwrap_or_default()
}

fn snapshot_json(s: &Snapshot) -> serde_json::Value {
    let stats = s.stats.unwrap_or_default();
    json!({
        "snapshot_id": s.snapshot_id,
        "source": s.source,
        "sequence": s.sequence,
        "root_hash": s.root_hash,
        "build_id": s.build_id,
        "create_time": time(s),
        "file_count": stats.file_count,
        "dir_count": stats.dir_count,
        "total_bytes": stats.total_bytes,
    })
}

/// `merklectl snapshots`.
#[derive(Debug, Clone, clap::Args)]
pub struct SnapshotsArgs {
    /// The source whose snapshots to list, newest first; without it, the stored sources.
    pub source: Option<String>,
    /// Most rows to print.
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    #[command(flatten)]
    pub db_sync: DbSyncAddr,
    #[arg(long)]
    pub json: bool,
}

pub async fn snapshots(args: SnapshotsArgs) -> anyhow::Result<()> {
    let mut client = args.db_sync.client()?;
    let Some(source) = args.source.clone() else {
        return sources(&mut client, &args).await;
    };
    let mut rows = Vec::new();
    let mut token = String::new();
    while rows.len() < args.limit {
        let page = client
            .list_snapshots(ListSnapshotsRequest {
                source: source.clone(),
                page_size: (args.limit - rows.len()).min(1000) as u32,
                page_token: token,
                ..Default::default()
            })
            .await
            .map_err(args.db_sync.failed())?
            .into_inner();
        rows.extend(page.snapshots);
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    if args.json {
        for s in &rows {
            println!("{}", snapshot_json(s));
        }
        return Ok(());
    }
    println!(
        "{:>6}  {:<20}  {:<16}  {:>9}  {:>12}  BUILD",
        "SEQ", "STORED", "ROOT", "FILES", "BYTES"
    );
    for s in &rows {
        let stats = s.stats.unwrap_or_default();
        println!(
            "{:>6}  {:<20}  {:<16}  {:>9}  {:>12}  {}",
            s.sequence,
            time(s),
            &s.root_hash[..16.min(s.root_hash.len())],
            stats.file_count,
            stats.total_bytes,
            s.build_id
        );
    }
    Ok(())
}

async fn sources(
    client: &mut DbSyncServiceClient<Channel>,
    args: &SnapshotsArgs,
) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_sources(ListSourcesRequest {
                page_size: 1000,
                page_token: token,
            })
            .await
            .map_err(args.db_sync.failed())?
            .into_inner();
        rows.extend(page.sources);
        token = page.next_page_token;
        if token.is_empty() || rows.len() >= args.limit {
            break;
        }
    }
    rows.truncate(args.limit);
    if args.json {
        for s in &rows {
            let latest = s.latest.clone().unwrap_or_default();
            println!(
                "{}",
                json!({ "source": s.source, "snapshot_count": s.snapshot_count, "latest": snapshot_json(&latest) })
            );
        }
        return Ok(());
    }
    println!(
        "{:<30}  {:>9}  {:>6}  {:<20}  LATEST ROOT",
        "SOURCE", "SNAPSHOTS", "SEQ", "STORED"
    );
    for s in &rows {
        let latest = s.latest.clone().unwrap_or_default();
        println!(
            "{:<30}  {:>9}  {:>6}  {:<20}  {}",
            s.source,
            s.snapshot_count,
            latest.sequence,
            time(&latest),
            latest.root_hash
        );
    }
    Ok(())
}

/// `SOURCE` or `SOURCE@SEQ` (a sequence is all digits; a fleet source such as `docs@node-7`
/// keeps its `@`).
fn source_and_sequence(spec: &str) -> (String, Option<u64>) {
    if let Some((source, seq)) = spec.rsplit_once('@')
        && let Ok(seq) = seq.parse::<u64>()
        && !source.is_empty()
    {
        return (source.to_owned(), Some(seq));
    }
    (spec.to_owned(), None)
}

/// The snapshot `sequence` of `source`, or its latest.
async fn snapshot(
    client: &mut DbSyncServiceClient<Channel>,
    db_sync: &DbSyncAddr,
    source: &str,
    sequence: Option<u64>,
) -> anyhow::Result<Snapshot> {
    let snapshot = match sequence {
        Some(sequence) => {
            client
                .get_snapshot(GetSnapshotRequest {
                    source: source.to_owned(),
                    sequence,
                    ..Default::default()
                })
                .await
                .map_err(db_sync.failed())?
                .into_inner()
                .snapshot
        }
        None => {
            client
                .get_latest_root(GetLatestRootRequest {
                    source: source.to_owned(),
                    ..Default::default()
                })
                .await
                .map_err(db_sync.failed())?
                .into_inner()
                .snapshot
        }
    };
    snapshot.context("DbSync answered without a snapshot")
}

/// `merklectl ls`.
#[derive(Debug, Clone, clap::Args)]
pub struct LsArgs {
    /// The source, and optionally a snapshot's sequence: `docs` (the latest) or `docs@3`.
    pub source: String,
    /// A directory of the tree, `/`-separated (default: the root).
    #[arg(default_value = "")]
    pub path: String,
    #[command(flatten)]
    pub db_sync: DbSyncAddr,
    #[arg(long)]
    pub json: bool,
}

pub async fn ls(args: LsArgs) -> anyhow::Result<()> {
    let mut client = args.db_sync.client()?;
    let (source, sequence) = source_and_sequence(&args.source);
    let snap = snapshot(&mut client, &args.db_sync, &source, sequence).await?;
    let mut token = String::new();
    loop {
        let page = client
            .list_directory(ListDirectoryRequest {
                root_hash: snap.root_hash.clone(),
                path: args.path.trim_matches('/').to_owned(),
                page_size: 10_000,
                page_token: token,
                ..Default::default()
            })
            .await
            .map_err(args.db_sync.failed())?
            .into_inner();
        for e in &page.entries {
            let kind = merkle_shared::convert::kind_from_proto(e.kind)
                .map(|k| k.name())
                .unwrap_or("?");
            if args.json {
                println!(
                    "{}",
                    json!({ "name": e.name, "kind": kind, "size": e.size, "hash": e.hash })
                );
            } else {
                let suffix = if kind == "directory" { "/" } else { "" };
                println!(
                    "{:<10} {:>12}  {}  {}{suffix}",
                    kind,
                    e.size,
                    &e.hash[..16],
                    e.name
                );
            }
        }
        token = page.next_page_token;
        if token.is_empty() {
            return Ok(());
        }
    }
}

/// Prints the changes between two stored snapshots; returns whether there were any.
pub async fn diff(
    db_sync: &DbSyncAddr,
    source: &str,
    old: &str,
    new: &str,
    json: bool,
) -> anyhow::Result<bool> {
    let mut client = db_sync.client()?;
    let sequence = |s: &str| -> anyhow::Result<Option<u64>> {
        match s {
            "latest" => Ok(None),
            s => Ok(Some(s.parse().with_context(|| {
                format!("{s}: a snapshot is its sequence number or `latest`")
            })?)),
        }
    };
    let old = snapshot(&mut client, db_sync, source, sequence(old)?).await?;
    let new = snapshot(&mut client, db_sync, source, sequence(new)?).await?;
    let mut stream = client
        .diff_snapshots(DiffSnapshotsRequest {
            old_root_hash: old.root_hash,
            new_root_hash: new.root_hash,
        })
        .await
        .map_err(db_sync.failed())?
        .into_inner();
    let mut any = false;
    while let Some(batch) = stream.message().await.map_err(db_sync.failed())? {
        for change in &batch.changes {
            let change = change_from_proto(change)
                .map_err(|e| anyhow::anyhow!("DbSync sent a bad change: {e}"))?;
            crate::local::print_change(&change, json);
            any = true;
        }
    }
    Ok(any)
}

/// Writes the inclusion proof of `path` in a stored snapshot (the same file format as the
/// local `prove`, so `verify-proof` checks it offline).
/// With `bundle`, the proof bundle instead (see [`crate::bundle`]).
pub async fn prove(
    db_sync: &DbSyncAddr,
    spec: &str,
    path: &str,
    bundle: bool,
) -> anyhow::Result<()> {
    let mut client = db_sync.client()?;
    let (source, sequence) = source_and_sequence(spec);
    let snap = snapshot(&mut client, db_sync, &source, sequence).await?;
    let proof = client
        .get_inclusion_proof(GetInclusionProofRequest {
            root_hash: snap.root_hash.clone(),
            path: path.trim_matches('/').to_owned(),
            ..Default::default()
        })
        .await
        .map_err(db_sync.failed())?
        .into_inner()
        .proof
        .context("DbSync answered without a proof")?;
    let proof =
        proof_from_proto(&proof).map_err(|e| anyhow::anyhow!("DbSync sent a bad proof: {e}"))?;
    if proof.root.to_hex() != snap.root_hash {
        bail!(
            "DbSync's proof is for root {}, not {}",
            proof.root,
            snap.root_hash
        );
    }
    if bundle {
        let bundle = crate::bundle::fetch(
            &mut client,
            db_sync,
            &snap,
            &proof,
            std::time::Duration::from_secs(5),
        )
        .await?;
        let text = bundle.to_json();
        println!("{text}");
        eprintln!(
            "proof bundle of {path} in {}@{} (leaf {} of the log, {} bytes); check it with: merklectl verify-proof FILE --verifier-key KEY",
            snap.source,
            snap.sequence,
            bundle.leaf_index,
            text.len() + 1
        );
        return Ok(());
    }
    println!("{}", proof.to_json());
    eprintln!(
        "proof of {path} in {}@{} (root {}); check it with: merklectl verify-proof FILE --root {}",
        snap.source, snap.sequence, snap.root_hash, snap.root_hash
    );
    Ok(())
}
