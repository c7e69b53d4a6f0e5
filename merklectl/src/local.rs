//! Commands that work on local directories with the Merkle core, no server needed:
//! `hash`, `diff`, `prove` and `verify-proof`.

use std::{
    io::IsTerminal as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, bail};
use merkle_core::{
    BuildOptions, BuildOutcome, Builder, Digest, MemTree, Profile, Progress,
    build::Phase,
    diff::{Change, ChangeType, diff_all},
    digest::{ReadBuffer, file_leaf_from_reader},
    proof::{InclusionProof, prove},
    tree::CollectNodes,
};

/// What to build: shared by the commands that build trees.
#[derive(Debug, Clone, clap::Args)]
pub struct TreeArgs {
    /// Leave out paths matching this gitignore pattern (repeatable).
    #[arg(long = "exclude", value_name = "PATTERN")]
    pub exclude: Vec<String>,
    /// What the hashes cover: `content` (like git) or `full` (adds mode, uid, gid).
    #[arg(long, default_value = "content", value_parser = ["content", "full"])]
    pub profile: String,
    /// Hashing threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

impl TreeArgs {
    pub fn options(&self) -> BuildOptions {
        BuildOptions {
            profile: Profile::from_name(&self.profile).unwrap_or_default(),
            exclude: self.exclude.clone(),
            threads: self.threads,
            ..BuildOptions::default()
        }
    }
}

/// `merklectl hash`.
#[derive(Debug, Clone, clap::Args)]
pub struct HashArgs {
    /// The directory to hash.
    pub dir: PathBuf,
    #[command(flatten)]
    pub tree: TreeArgs,
    /// Print one JSON object (root, counts, timing, peak memory) instead of the root alone.
    #[arg(long)]
    pub json: bool,
    /// Read every file, ignoring and not updating the stat cache.
    #[arg(long)]
    pub no_cache: bool,
    /// Folder of the stat caches (default: $XDG_CACHE_HOME/merkle-mesh or ~/.cache/merkle-mesh).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
}

fn default_cache_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|d| d.join("merkle-mesh"))
}

/// The resolved directory (a symlinked directory is resolved once, and said so).
fn resolve(dir: &Path) -> anyhow::Result<PathBuf> {
    let resolved = dir
        .canonicalize()
        .with_context(|| format!("{}: cannot resolve", dir.display()))?;
    if !resolved.is_dir() {
        bail!("{}: not a directory", dir.display());
    }
    Ok(resolved)
}

/// Builds the directory `dir` with its nodes (for `push`): the outcome and the tree.
pub fn build_tree(dir: &Path, options: BuildOptions) -> anyhow::Result<(BuildOutcome, MemTree)> {
    let (outcome, tree) = build(&resolve(dir)?, options, true)?;
    Ok((outcome, tree.unwrap_or_default()))
}

/// Builds `dir`, with a progress bar on a terminal; collects the nodes when `collect`.
fn build(
    dir: &Path,
    options: BuildOptions,
    collect: bool,
) -> anyhow::Result<(BuildOutcome, Option<MemTree>)> {
    let progress = Arc::new(Progress::default());
    let bar = std::io::stderr()
        .is_terminal()
        .then(|| spawn_bar(progress.clone()));
    let sink = CollectNodes::default();
    let result = if collect {
        Builder::new(options)
            .sink(&sink)
            .progress(&progress)
            .build(dir)
    } else {
        Builder::new(options).progress(&progress).build(dir)
    };
    if let Some((bar, done)) = bar {
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = bar.join();
    }
    let outcome = result.with_context(|| format!("hashing {}", dir.display()))?;
    let tree = collect.then(|| sink.into_tree(outcome.root, outcome.profile));
    Ok((outcome, tree))
}

fn spawn_bar(
    progress: Arc<Progress>,
) -> (
    std::thread::JoinHandle<()>,
    Arc<std::sync::atomic::AtomicBool>,
) {
    use indicatif::{ProgressBar, ProgressStyle};
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = done.clone();
    let handle = std::thread::spawn(move || {
        let bar = ProgressBar::new(0);
        let style = ProgressStyle::with_template(
            "{spinner} {msg:9} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        )
        .map(|s| s.progress_chars("=> "));
        if let Ok(style) = style {
            bar.set_style(style);
        }
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let s = progress.snapshot();
            bar.set_message(match s.phase {
                Phase::Scanning => format!("scan {}", s.files_total),
                Phase::Hashing => "hashing".to_owned(),
                Phase::Done => "done".to_owned(),
            });
            bar.set_length(s.bytes_total);
            bar.set_position(s.bytes_done);
            std::thread::sleep(Duration::from_millis(100));
        }
        bar.finish_and_clear();
    });
    (handle, done)
}

/// Peak resident memory of this process, from /proc (Linux).
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

pub fn hash(args: HashArgs) -> anyhow::Result<()> {
    let dir = resolve(&args.dir)?;
    let mut options = args.tree.options();
    if !args.no_cache
        && let Some(cache_dir) = args.cache_dir.clone().or_else(default_cache_dir)
    {
        let key = merkle_core::digest::file_leaf(dir.as_os_str().as_encoded_bytes());
        options.stat_cache = Some(cache_dir.join(format!("{}.stat", &key.to_hex()[..24])));
    }
    let (outcome, _) = build(&dir, options, false)?;
    if args.json {
        let value = serde_json::json!({
            "root_hash": outcome.root.to_hex(),
            "profile": outcome.profile.name(),
            "path": dir.to_string_lossy(),
            "file_count": outcome.stats.file_count,
            "dir_count": outcome.stats.dir_count,
            "symlink_count": outcome.stats.symlink_count,
            "skipped_count": outcome.stats.skipped_count,
            "total_bytes": outcome.stats.total_bytes,
            "node_count": outcome.node_count,
            "files_hashed": outcome.files_hashed,
            "duration_ms": outcome.duration.as_secs_f64() * 1000.0,
            "peak_rss_bytes": peak_rss_bytes(),
        });
        println!("{value}");
    } else {
        println!("{}", outcome.root);
    }
    Ok(())
}

/// `merklectl diff`.
#[derive(Debug, Clone, clap::Args)]
pub struct DiffArgs {
    /// The old directory; with `--stored`, the old snapshot's sequence (or `latest`).
    pub old: String,
    /// The new directory; with `--stored`, the new snapshot's sequence (or `latest`).
    pub new: String,
    /// Compare two snapshots of this source stored in DbSync instead of two directories.
    #[arg(long, value_name = "SOURCE")]
    pub stored: Option<String>,
    #[command(flatten)]
    pub db_sync: crate::remote::DbSyncAddr,
    #[command(flatten)]
    pub tree: TreeArgs,
    /// One JSON object per changed path instead of `A|D|M|T path` lines.
    #[arg(long)]
    pub json: bool,
}

/// A change's letter (`A|D|M|T`) and word (`added`, ...), as `diff` prints them.
pub fn change_names(change: ChangeType) -> (&'static str, &'static str) {
    match change {
        ChangeType::Added => ("A", "added"),
        ChangeType::Removed => ("D", "removed"),
        ChangeType::Modified => ("M", "modified"),
        ChangeType::KindChanged => ("T", "kind_changed"),
    }
}

/// One changed path as a JSON object.
pub fn change_json(c: &Change) -> serde_json::Value {
    serde_json::json!({
        "path": String::from_utf8_lossy(&c.path),
        "change": change_names(c.change).1,
        "old_kind": c.old.map(|s| s.kind.name()),
        "new_kind": c.new.map(|s| s.kind.name()),
        "old_hash": c.old.map(|s| s.hash.to_hex()),
        "new_hash": c.new.map(|s| s.hash.to_hex()),
    })
}

/// Prints one changed path: `A|D|M|T path`, or a JSON object.
pub fn print_change(c: &Change, json: bool) {
    if json {
        println!("{}", change_json(c));
    } else {
        let (letter, _) = change_names(c.change);
        println!("{letter} {}", String::from_utf8_lossy(&c.path));
    }
}

/// Prints the changed paths between two directories; returns whether there were any.
pub fn diff(args: DiffArgs) -> anyhow::Result<bool> {
    let (_, old) = build(&resolve(Path::new(&args.old))?, args.tree.options(), true)?;
    let (_, new) = build(&resolve(Path::new(&args.new))?, args.tree.options(), true)?;
    let (old, new) = (old.unwrap_or_default(), new.unwrap_or_default());
    let changes = diff_all(&old, old.root, &new, new.root)?;
    for c in &changes {
        print_change(c, args.json);
    }
    Ok(!changes.is_empty())
}

/// `merklectl prove`.
#[derive(Debug, Clone, clap::Args)]
pub struct ProveArgs {
    /// `DIR PATH`: the directory (the tree's root) and the entry to prove, relative to it,
    /// `/`-separated; with `--stored SOURCE[@SEQ]`, just `PATH`.
    #[arg(num_args = 1..=2, required = true, value_name = "DIR PATH")]
    pub args: Vec<String>,
    /// Prove the entry in a snapshot stored in DbSync (the latest, or `SOURCE@SEQ`).
    #[arg(long, value_name = "SOURCE")]
    pub stored: Option<String>,
    /// With --stored: write a proof bundle (docs/merkle-spec.md section 12) instead: the
    /// entry's node path, the snapshot's record, its inclusion proof in the transparency log
    /// and the log's signed checkpoint, so `verify-proof` checks it offline with only the
    /// log's public key.
    #[arg(long, requires = "stored")]
    pub bundle: bool,
    #[command(flatten)]
    pub db_sync: crate::remote::DbSyncAddr,
    #[command(flatten)]
    pub tree: TreeArgs,
}

pub fn prove_cmd(args: ProveArgs) -> anyhow::Result<()> {
    let [dir, path] = args.args.as_slice() else {
        bail!("prove takes DIR PATH (or --stored SOURCE PATH)");
    };
    let (outcome, tree) = build(&resolve(Path::new(dir))?, args.tree.options(), true)?;
    let tree = tree.unwrap_or_default();
    let proof = prove(&tree, outcome.root, outcome.profile, path.as_bytes())?;
    println!("{}", proof.to_json());
    Ok(())
}

/// `merklectl verify-proof`.
#[derive(Debug, Clone, clap::Args)]
pub struct VerifyProofArgs {
    /// The proof file (JSON, docs/merkle-spec.md section 7); `-` reads standard input.
    pub proof: PathBuf,
    /// The root you trust (e.g. from a signed snapshot); the proof must be for it.
    #[arg(long)]
    pub root: Option<String>,
    /// A local copy of the proven file: its content must hash to the proven leaf.
    #[arg(long)]
    pub content: Option<PathBuf>,
    /// For a proof bundle: the transparency log's key you trust (`<origin>+<key id>+<base64
    /// key>`, GetLogCheckpoint's verifier_key, pinned out of band); a bundle is checked
    /// against it, never against a key it carries.
    #[arg(long, env = "LOG_VERIFIER_KEY")]
    pub verifier_key: Option<String>,
    /// For a proof bundle: the witnesses its checkpoint must be cosigned by.
    #[command(flatten)]
    pub witnesses: crate::log::WitnessArgs,
}

pub fn verify_proof(args: VerifyProofArgs) -> anyhow::Result<()> {
    let text = if args.proof.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading the proof from stdin")?
    } else {
        std::fs::read_to_string(&args.proof)
            .with_context(|| format!("reading {}", args.proof.display()))?
    };
    let format = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("format")?.as_str().map(str::to_owned));
    if format.as_deref() == Some(crate::bundle::FORMAT) {
        return verify_bundle(&args, &text);
    }
    let proof = InclusionProof::from_json(&text)?;
    let entry = proof.verify().context("the proof does not verify")?;
    if let Some(root) = &args.root {
        let trusted: Digest = root.parse().context("--root")?;
        if trusted != proof.root {
            bail!(
                "the proof is for root {}, not the trusted root {trusted}",
                proof.root
            );
        }
    }
    check_content(args.content.as_deref(), &entry.hash)?;
    let joined = proof.path.join(&b'/');
    println!(
        "valid: {} is a {} with hash {} in root {} ({} profile){}",
        String::from_utf8_lossy(&joined),
        entry.kind.name(),
        entry.hash,
        proof.root,
        proof.profile.name(),
        if args.root.is_some() {
            ", the trusted root"
        } else {
            "; pass --root to check it is a root you trust"
        }
    );
    Ok(())
}

/// Checks that the file at `path` (when given) hashes to the proven leaf `proven`.
fn check_content(path: Option<&Path>, proven: &Digest) -> anyhow::Result<()> {
    let Some(path) = path else { return Ok(()) };
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let (leaf, _) = file_leaf_from_reader(&mut file, ReadBuffer::new().get())?;
    if leaf != *proven {
        bail!(
            "{} hashes to {leaf}, but the proof says {proven}",
            path.display()
        );
    }
    Ok(())
}

/// `verify-proof` of a proof bundle: everything checked against the log key given.
fn verify_bundle(args: &VerifyProofArgs, text: &str) -> anyhow::Result<()> {
    let bundle = crate::bundle::Bundle::from_json(text)?;
    let key = args.verifier_key.as_deref().context(
        "a proof bundle is checked against the transparency log's key: pass --verifier-key \
         (GetLogCheckpoint's verifier_key, pinned out of band) or set LOG_VERIFIER_KEY",
    )?;
    if args.root.is_some() {
        bail!("--root: a bundle proves its root by the log; give --verifier-key instead");
    }
    let hash = bundle
        .verify(key, &args.witnesses)
        .context("the proof bundle does not verify")?;
    check_content(args.content.as_deref(), &hash)?;
    let c = &bundle.claim;
    println!(
        "valid: {} was a {} with hash {} in {}@{} (root {}), stored {}; the record is leaf {} of the log's checkpoint signed by {}{}",
        c.path.clone().or(c.path_hex.clone()).unwrap_or_default(),
        c.kind,
        c.hash,
        c.source,
        c.sequence,
        c.root_hash,
        c.time,
        bundle.leaf_index,
        key.split('+').next().unwrap_or(key),
        match (args.witnesses.keys.len(), args.witnesses.witness_policy) {
            (0, _) => String::new(),
            (n, k) => format!(
                ", cosigned by {} of {n} witnesses asked for",
                k.unwrap_or(n)
            ),
        }
    );
    Ok(())
}
