//! Running builds for the API: on a blocking thread, streaming progress and node batches to the
//! caller, stopping when the caller goes away, keeping the trees built most recently watched
//! for fast rebuilds, and recent trees' nodes for VerifyTree.

use parking_lot::Mutex;
use std::{
    collections::{HashMap, VecDeque},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use merkle_core::{
    BuildError, BuildOptions, BuildOutcome, Builder, Digest, DirNode, MemTree, NodeSink, Profile,
    Progress, WatchedTree, build::Phase,
};
use merkle_proto::{
    common::v1::{BuildPhase, BuildProgress, TreeNode},
    treebuilder::v1::{BuildTreeResponse, NodeBatch, build_tree_response::Event},
};
use merkle_shared::convert::node_to_proto;
use prost::Message as _;
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use tonic::Status;

use crate::{config::Config, error::Error};

/// What one build needs to know besides the request.
#[derive(Clone)]
pub struct BuildSettings {
    pub stat_cache_dir: Option<PathBuf>,
    pub threads: usize,
    pub max_entries: u64,
    pub max_depth: usize,
    /// Largest tree kept watched, in entries.
    pub watch_max_entries: u64,
    /// Largest encoded size of one NodeBatch message.
    pub batch_bytes: usize,
    /// Builds that may run at once; more wait in the QUEUED phase.
    pub slots: Arc<tokio::sync::Semaphore>,
    /// The trees kept watched between builds.
    pub watched: Arc<WatchedTrees>,
}

impl BuildSettings {
    pub fn from_config(config: &Config) -> Self {
        BuildSettings {
            stat_cache_dir: config.stat_cache_dir.clone(),
            threads: config.hash_threads,
            max_entries: config.max_entries,
            max_depth: config.max_depth as usize,
            watch_max_entries: config.watch_max_entries,
            // Headroom for the message envelope: a batch stays well under the limit.
            batch_bytes: (config.common.server.max_message_bytes as usize) * 3 / 4,
            slots: Arc::new(tokio::sync::Semaphore::new(
                config.max_concurrent_builds as usize,
            )),
            watched: Arc::new(WatchedTrees {
                max_trees: config.watch_trees as usize,
                rescan_interval: config.watch_rescan_interval,
                trees: Mutex::new(VecDeque::new()),
            }),
        }
    }

    /// The options of a build of `root`, with the stat cache file of that directory.
    pub fn options(
        &self,
        root: &std::path::Path,
        profile: Profile,
        exclude: Vec<String>,
    ) -> BuildOptions {
        let stat_cache = self.stat_cache_dir.as_ref().map(|dir| {
            let key = Sha256::digest(root.as_os_str().as_encoded_bytes());
            dir.join(format!("{}.stat", merkle_core::digest::hex(&key[..12])))
        });
        BuildOptions {
            profile,
            exclude,
            threads: self.threads,
            max_entries: self.max_entries,
            max_depth: self.max_depth,
            stat_cache,
            keep_max_entries: self.watch_max_entries,
            ..BuildOptions::default()
        }
    }
}

pub type EventSender = mpsc::Sender<Result<BuildTreeResponse, Status>>;

/// One build: the directory (resolved and checked) and how to hash it.
pub struct BuildJob {
    pub root: PathBuf,
    pub options: BuildOptions,
    /// Read every file: neither the stat cache nor a watched tree is trusted (the tree is
    /// still kept watched for the next build).
    pub fresh: bool,
}

/// The trees built most recently, kept in memory and watched, so that the next build of one
/// lists only the directories with changes ([`merkle_core::watched`]).
pub struct WatchedTrees {
    max_trees: usize,
    rescan_interval: Duration,
    /// Most recently built first.
    trees: Mutex<VecDeque<WatchedTree>>,
}

impl WatchedTrees {
    /// Takes the watched tree a build of `root` with `options` can start from, unless it is
    /// due for a full scan.
    fn take(&self, root: &std::path::Path, options: &BuildOptions) -> Option<WatchedTree> {
        let tree = {
            let mut trees = self.trees.lock();
            let i = trees.iter().position(|t| t.is_for(root, options))?;
            trees.remove(i)?
        };
        // Dropped (a full scan is due) outside the lock, like in `put`.
        (tree.since_full_scan() < self.rescan_interval).then_some(tree)
    }

    /// Keeps a tree built with `options` watched, forgetting the least recently built beyond
    /// `max_trees`.
    fn put(&self, options: &BuildOptions, tree: WatchedTree) {
        let forgotten: Vec<WatchedTree> = {
            let mut trees = self.trees.lock();
            let mut forgotten = Vec::new();
            let mut i = 0;
            while i < trees.len() {
                if trees[i].is_for(tree.root(), options) {
                    forgotten.extend(trees.remove(i));
                } else {
                    i += 1;
                }
            }
            trees.push_front(tree);
            let keep = self.max_trees.min(trees.len());
            forgotten.extend(trees.drain(keep..));
            forgotten
        };
        // Closing a tree's inotify instance waits for the kernel (an RCU grace period, tens of
        // milliseconds): never under the lock, and not on the build's path either.
        if !forgotten.is_empty() {
            std::thread::spawn(move || drop(forgotten));
        }
    }

    /// Builds `job`, from its watched tree when there is one, and keeps the result watched.
    fn build(&self, builder: &Builder<'_>, job: &BuildJob) -> Result<BuildOutcome, BuildError> {
        if self.max_trees == 0 {
            return builder.build(&job.root);
        }
        let previous = self.take(&job.root, &job.options);
        let previous = if job.fresh { None } else { previous };
        let (outcome, tree) = builder.build_watched(&job.root, previous)?;
        match tree {
            Ok(tree) => self.put(&job.options, tree),
            Err(why) => {
                tracing::info!(reason = %why, "tree not kept watched; rebuilds use the stat cache")
            }
        }
        Ok(outcome)
    }
}

/// Streams nodes to the caller in batches under `batch_bytes`, splitting a node too large for
/// one message, and keeps a copy of each node when the tree is to be remembered.
pub struct StreamSink {
    tx: Option<EventSender>,
    batch_bytes: usize,
    pending: Mutex<(Vec<TreeNode>, usize)>,
    cancel: Arc<AtomicBool>,
    keep: Option<Mutex<Kept>>,
}

/// Nodes kept for [`RecentTrees`], up to a budget of entries; beyond it nothing is kept.
struct Kept {
    nodes: HashMap<Digest, DirNode>,
    entries: usize,
    budget: usize,
    over: bool,
}

impl StreamSink {
    /// `tx` is `None` when the caller does not want nodes; the nodes are also kept locally
    /// while they fit in `keep_entries` entries (0: never).
    pub fn new(
        tx: Option<EventSender>,
        batch_bytes: usize,
        cancel: Arc<AtomicBool>,
        keep_entries: usize,
    ) -> Self {
        StreamSink {
            tx,
            batch_bytes,
            pending: Mutex::new((Vec::new(), 0)),
            cancel,
            keep: (keep_entries > 0).then(|| {
                Mutex::new(Kept {
                    nodes: HashMap::new(),
                    entries: 0,
                    budget: keep_entries,
                    over: false,
                })
            }),
        }
    }

    fn send(&self, nodes: Vec<TreeNode>) -> Result<(), BuildError> {
        let Some(tx) = &self.tx else { return Ok(()) };
        let event = BuildTreeResponse {
            event: Some(Event::Nodes(NodeBatch { nodes })),
        };
        // Blocking here is backpressure: hashing waits while the caller is slow to read.
        tx.blocking_send(Ok(event)).map_err(|_| {
            self.cancel.store(true, Ordering::Relaxed);
            BuildError::Cancelled
        })
    }

    /// Sends what is still pending.
    pub fn flush(&self) -> Result<(), BuildError> {
        let nodes = {
            let mut pending = self.pending.lock();
            pending.1 = 0;
            std::mem::take(&mut pending.0)
        };
        if nodes.is_empty() {
            Ok(())
        } else {
            self.send(nodes)
        }
    }

    /// The nodes kept, unless the tree was over the budget.
    pub fn into_kept(self) -> Option<HashMap<Digest, DirNode>> {
        let kept = self.keep?.into_inner();
        (!kept.over).then_some(kept.nodes)
    }

    /// Splits a node whose encoding exceeds the batch size into consecutive parts.
    fn parts(&self, node: TreeNode) -> Vec<TreeNode> {
        if node.encoded_len() <= self.batch_bytes {
            return vec![node];
        }
        let mut parts = Vec::new();
        let mut current = Vec::new();
        let mut size = 0;
        for entry in node.entries {
            let len = entry.encoded_len() + 8;
            if size + len > self.batch_bytes && !current.is_empty() {
                parts.push(TreeNode {
                    hash: node.hash.clone(),
                    entries: std::mem::take(&mut current),
                    more_entries: true,
                });
                size = 0;
            }
            size += len;
            current.push(entry);
        }
        parts.push(TreeNode {
            hash: node.hash,
            entries: current,
            more_entries: false,
        });
        parts
    }
}

impl NodeSink for StreamSink {
    fn node(&self, hash: Digest, node: DirNode) -> Result<(), BuildError> {
        if self.tx.is_some() {
            for part in self.parts(node_to_proto(hash, &node)) {
                let len = part.encoded_len() + 8;
                let full = {
                    let mut pending = self.pending.lock();
                    if pending.1 + len > self.batch_bytes && !pending.0.is_empty() {
                        pending.1 = len;
                        Some(std::mem::replace(&mut pending.0, vec![part]))
                    } else {
                        pending.1 += len;
                        pending.0.push(part);
                        None
                    }
                };
                if let Some(nodes) = full {
                    self.send(nodes)?;
                }
            }
        }
        if let Some(keep) = &self.keep {
            let mut kept = keep.lock();
            kept.entries += node.entries.len();
            if kept.entries > kept.budget {
                // Too big to remember: free what was kept and keep nothing more.
                kept.over = true;
                kept.nodes = HashMap::new();
            } else if !kept.over {
                kept.nodes.insert(hash, node);
            }
        }
        Ok(())
    }

    fn wants(&self, entries: u64) -> bool {
        let Some(keep) = &self.keep else {
            return self.tx.is_some();
        };
        let mut kept = keep.lock();
        if entries > kept.budget as u64 {
            // Known too big to remember: keep nothing, as if the budget had been reached.
            kept.over = true;
            kept.nodes = HashMap::new();
        }
        self.tx.is_some() || !kept.over
    }
}

/// The progress message of a build waiting for a slot.
fn queued_event() -> BuildTreeResponse {
    BuildTreeResponse {
        event: Some(Event::Progress(BuildProgress {
            phase: BuildPhase::Queued as i32,
            ..BuildProgress::default()
        })),
    }
}

/// The progress message of a snapshot of the counters.
pub fn progress_event(progress: &Progress) -> BuildTreeResponse {
    let s = progress.snapshot();
    let phase = match s.phase {
        Phase::Scanning => BuildPhase::Scanning,
        Phase::Hashing => BuildPhase::Hashing,
        Phase::Done => BuildPhase::Done,
    };
    BuildTreeResponse {
        event: Some(Event::Progress(BuildProgress {
            phase: phase as i32,
            files_done: s.files_done,
            files_total: s.files_total,
            bytes_done: s.bytes_done,
            bytes_total: s.bytes_total,
        })),
    }
}

/// Runs a build on a blocking thread; while it runs, sends progress to `tx` every
/// `interval` and cancels the build if the caller goes away.
pub async fn run(
    job: BuildJob,
    settings: &BuildSettings,
    sink: Arc<StreamSink>,
    tx: Option<EventSender>,
    cancel: Arc<AtomicBool>,
    interval: Duration,
) -> Result<(BuildOutcome, Arc<Progress>), Error> {
    let slots = &settings.slots;
    // Hashing uses every core: builds beyond the slots wait their turn, saying so.
    let _slot = match slots.try_acquire() {
        Ok(permit) => permit,
        Err(_) => {
            if let Some(tx) = &tx {
                let _ = tx.send(Ok(queued_event())).await;
            }
            let closed = async {
                match &tx {
                    Some(tx) => tx.closed().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                permit = slots.acquire() => permit.map_err(|e| Error::Internal(e.to_string()))?,
                () = closed => return Err(Error::Build(BuildError::Cancelled)),
            }
        }
    };
    let progress = Arc::new(Progress::default());
    let job = {
        let (progress, cancel, sink) = (progress.clone(), cancel.clone(), sink.clone());
        let watched = settings.watched.clone();
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || {
            let _span = span.enter();
            let builder = Builder::new(job.options.clone())
                .sink(&*sink)
                .progress(&progress)
                .cancel(&cancel);
            let outcome = watched.build(&builder, &job)?;
            sink.flush()?;
            Ok::<_, BuildError>(outcome)
        })
    };
    tokio::pin!(job);
    let mut ticker = tokio::time::interval(interval);
    ticker.tick().await;
    let outcome = loop {
        tokio::select! {
            joined = &mut job => break joined,
            _ = ticker.tick() => {
                if let Some(tx) = &tx
                    && tx.send(Ok(progress_event(&progress))).await.is_err()
                {
                    cancel.store(true, Ordering::Relaxed);
                }
            }
        }
    };
    let outcome = outcome.map_err(|e| Error::Internal(e.to_string()))??;
    Ok((outcome, progress))
}

/// Recent trees by root, for VerifyTree's list of differing paths; bounded by the number of
/// directory entries they hold (about 100 bytes each).
pub struct RecentTrees {
    max_entries: usize,
    trees: Mutex<VecDeque<Arc<MemTree>>>,
}

impl RecentTrees {
    pub fn new(max_entries: usize) -> Self {
        RecentTrees {
            max_entries,
            trees: Mutex::new(VecDeque::new()),
        }
    }

    /// The entry budget of one tree (0: trees are not kept).
    pub fn budget(&self) -> usize {
        self.max_entries
    }

    /// Remembers a tree, forgetting the oldest ones beyond the node budget.
    pub fn insert(&self, tree: MemTree) {
        let size = |t: &MemTree| t.nodes.values().map(|n| n.entries.len()).sum::<usize>();
        if size(&tree) > self.max_entries {
            return;
        }
        let mut trees = self.trees.lock();
        trees.retain(|t| !(t.root == tree.root && t.profile == tree.profile));
        trees.push_front(Arc::new(tree));
        let mut total = 0;
        trees.retain(|t| {
            total += size(t);
            total <= self.max_entries
        });
    }

    pub fn get(&self, root: Digest, profile: Profile) -> Option<Arc<MemTree>> {
        self.trees
            .lock()
            .iter()
            .find(|t| t.root == root && t.profile == profile)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sink_declines_a_rebuilt_tree_it_could_not_keep() {
        let cancel = Arc::new(AtomicBool::new(false));
        let keeping = StreamSink::new(None, 1 << 20, cancel.clone(), 10);
        assert!(keeping.wants(10));
        assert!(!keeping.wants(11), "over the budget, nothing to keep");
        assert!(keeping.into_kept().is_none());

        let (tx, _rx) = mpsc::channel(1);
        let streaming = StreamSink::new(Some(tx), 1 << 20, cancel.clone(), 10);
        assert!(streaming.wants(11), "the caller asked for the nodes");
        assert!(streaming.into_kept().is_none());

        let neither = StreamSink::new(None, 1 << 20, cancel, 0);
        assert!(!neither.wants(1));
    }
}
