//! The proof-bundle benchmark (the transparency-log issue): the size of `merklectl prove
//! --bundle`'s file for one file of a 1,000,000-file tree, and its offline verification time,
//! beside the plain node proof (spec section 7) of the same file.
//!
//! A bundle's size is set by the directories on the file's path (a node carries every entry of
//! its directory) and by the log's size (one hash per level), not by the tree's total size; so
//! the bench builds real 1,000,000-file trees of several directory widths in memory with the
//! Merkle core, a real 1,000,000-leaf log with `tlog_tiles`, signs its checkpoint with DbSync's
//! own code and has two witnesses cosign it, then makes and verifies each bundle with
//! merklectl's code.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use ed25519_dalek::SigningKey;
use merkle_core::{
    Digest, DirNode, Entry, EntryKind, MemTree, Profile, TreeStats, digest::file_leaf,
    history::Record, proof::prove,
};
use merklectl::{bundle::Bundle, log::WitnessArgs};
use tlog_tiles::{prove_record, record_hash, stored_hashes_for_record_hash};

/// Options of `merkle-bench bundle`.
#[derive(Debug, clap::Args)]
pub struct BundleBenchArgs {
    /// Files in each tree.
    #[arg(long, default_value_t = 1_000_000)]
    files: u64,
    /// Leaves in the log.
    #[arg(long, default_value_t = 1_000_000)]
    leaves: u64,
    /// Directory widths (entries per directory) to build a tree of.
    #[arg(long, value_delimiter = ',', default_value = "10,32,100,1000")]
    widths: Vec<u64>,
}

/// A tree of `files` files, `width` entries per directory, and the path of file `target`.
fn tree(files: u64, width: u64, target: u64) -> anyhow::Result<(MemTree, String)> {
    let mut nodes = std::collections::HashMap::new();
    // The current level's entries, in order; `at` is the one holding the target.
    let mut level: Vec<Entry> = (0..files)
        .map(|i| Entry {
            name: format!("file-{i:07}.txt").into_bytes(),
            kind: EntryKind::File,
            hash: file_leaf(&i.to_be_bytes()),
            size: 0,
            meta: None,
        })
        .collect();
    let mut at = target as usize;
    let mut path = vec![format!("file-{target:07}.txt")];
    let mut depth = 0;
    loop {
        let groups: Vec<DirNode> = level
            .chunks(width as usize)
            .map(|c| DirNode {
                entries: c.to_vec(),
            })
            .collect();
        if groups.len() == 1 {
            let root = groups[0].hash(Profile::Content)?;
            nodes.insert(root, groups.into_iter().next().context("a root")?);
            path.reverse();
            let tree = MemTree {
                root,
                profile: Profile::Content,
                nodes,
            };
            return Ok((tree, path.join("/")));
        }
        depth += 1;
        at /= width as usize;
        path.push(format!("dir{depth}-{at:06}"));
        level = groups
            .into_iter()
            .enumerate()
            .map(|(i, node)| {
                let hash = node.hash(Profile::Content)?;
                nodes.insert(hash, node);
                Ok(Entry {
                    name: format!("dir{depth}-{i:06}").into_bytes(),
                    kind: EntryKind::Directory,
                    hash,
                    size: 0,
                    meta: None,
                })
            })
            .collect::<anyhow::Result<_>>()?;
    }
}

/// The median of `runs` timings of `f`.
fn median_time(runs: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<Duration> {
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed());
    }
    times.sort();
    Ok(times[runs / 2])
}

pub fn run(args: BundleBenchArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    // The log: `leaves` record hashes; the bundle's record is leaf `leaf`.
    let leaf = args.leaves * 2 / 3;
    let key = SigningKey::from_bytes(&[42; 32]);
    let origin = "bench.merkle-mesh.local/log";
    let record = |root: Digest| Record {
        source: "fleet@node-0042".into(),
        sequence: 1234,
        root,
        profile: Profile::Content,
        build_id: "0193a4f2-5c1e-7b3d-9a8f-2e4d6c8b0a1f".into(),
        create_time_micros: 1_764_700_000_123_456,
        stats: TreeStats {
            file_count: args.files,
            ..TreeStats::default()
        },
        previous: Some(Digest([7; 32])),
    };
    let witnesses: Vec<(String, SigningKey)> = (1..=2)
        .map(|n| {
            (
                format!("w{n}.witness.test"),
                SigningKey::from_bytes(&[n; 32]),
            )
        })
        .collect();
    let witness_args = WitnessArgs {
        keys: witnesses
            .iter()
            .map(|(name, k)| merkle_core::cosignature::verifier_key(name, &k.verifying_key()))
            .collect(),
        witness_policy: None,
    };
    let verifier = signed_note::new_ed25519_verifier_key(origin, &key.verifying_key());
    let log = merkle_db_sync::Log::new(origin, Some(&key), &[key.verifying_key()]);

    println!(
        "\nProof bundles: one file of a {}-file tree, its snapshot's record leaf {leaf} of a {}-leaf log, checkpoint cosigned by 2 witnesses\n",
        args.files, args.leaves
    );
    println!(
        "| directory width | depth | bundle (bytes) | of which nodes / log proof / checkpoint / record | plain node proof, spec section 7 JSON (bytes) | verify bundle (ms) | verify plain proof (ms) | under 4 KiB |"
    );
    println!("|---:|---:|---:|---|---:|---:|---:|---|");
    let mut targets = Vec::new();
    for &width in &args.widths {
        let (tree, path) = tree(args.files, width, args.files * 7 / 9)?;
        let proof = prove(&tree, tree.root, tree.profile, path.as_bytes())?;
        let record = record(tree.root);
        // The log, its leaf `leaf` this record (rebuilt per tree: the record names the root).
        let mut stored =
            merkle_shared::log_tiles::MemoryHashes(Vec::with_capacity((args.leaves * 2) as usize));
        for i in 0..args.leaves {
            let data = if i == leaf {
                record.hash()
            } else {
                merkle_core::digest::sha256(&i.to_be_bytes())
            };
            let hashes = stored_hashes_for_record_hash(i, record_hash(&data.0), &stored)?;
            stored.0.extend(hashes);
        }
        let root = tlog_tiles::tree_hash(args.leaves, &stored)?;
        let mut note = log
            .checkpoint_note(args.leaves, root)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let text = note
            .split_once("\n\n")
            .map(|(t, _)| format!("{t}\n"))
            .context("a signed note")?;
        for (name, k) in &witnesses {
            note.push_str(&merkle_core::cosignature::sign(
                name,
                k,
                1_764_700_001,
                text.as_bytes(),
            ));
        }
        let log_proof = prove_record(args.leaves, leaf, &stored)?;
        let bundle = Bundle::new(&record, &proof, leaf, &log_proof, &note)?;
        let file = bundle.to_json();
        let plain = proof.to_json();
        let nodes: usize = bundle.nodes.iter().map(|n| n.len() + 3).sum();
        let hashes: usize = bundle.log_proof.iter().map(|h| h.len() + 3).sum();
        let verify_bundle = median_time(101, || {
            Bundle::from_json(&file)?.verify(&verifier, &witness_args)?;
            Ok(())
        })?;
        let verify_plain = median_time(101, || {
            merkle_core::proof::InclusionProof::from_json(&plain)?.verify()?;
            Ok(())
        })?;
        let under = file.len() < 4096;
        println!(
            "| {width} | {} | {} | {nodes} / {hashes} / {} / {} | {} | {:.3} | {:.3} | {} |",
            proof.nodes.len(),
            file.len(),
            bundle.checkpoint.len(),
            bundle.record.len(),
            plain.len(),
            verify_bundle.as_secs_f64() * 1000.0,
            verify_plain.as_secs_f64() * 1000.0,
            if under { "yes" } else { "NO" }
        );
        targets.push((width, under, file.len()));
    }
    println!("\n| target | met |\n|---|---|");
    for (width, under, len) in targets {
        println!(
            "| a bundle for a file in a {}-file tree under 4 KiB, directories of {width} entries (is {len} bytes) | {} |",
            args.files,
            if under { "yes" } else { "NO" }
        );
    }
    println!("\n(bench took {:.1} s)", started.elapsed().as_secs_f64());
    Ok(())
}
