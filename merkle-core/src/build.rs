//! Building the Merkle tree of a directory: parallel, incremental and safe.
//!
//! A build has two phases on a dedicated rayon pool:
//! 1. **scan**: walk the tree (in parallel over subdirectories) with `lstat` only, applying the
//!    exclude patterns and limits, into an in-memory skeleton; this fixes the totals that
//!    progress reports against;
//! 2. **hash**: hash files in parallel, taking a file's digest from the stat cache when its
//!    `lstat` matches and its mtime is safely older than the cached scan (the racy-git rule),
//!    else reading it, then hash directories bottom-up, handing each new node to a
//!    [`NodeSink`] (children before parents, each distinct node once).
//!
//! Files are read through a descriptor opened with `O_NOFOLLOW`, checked with `fstat` before and
//! after the read; a file that changed while read is read again, and after `read_retries` the
//! build fails naming it. Nothing is ever silently wrong. Memory is the skeleton (proportional
//! to the number of entries) plus a 128 KiB read buffer per thread, whatever the file sizes.

use parking_lot::Mutex;
use std::{
    collections::HashSet,
    ffi::OsStr,
    fs::{self, File, Metadata},
    io::{self, Read},
    os::unix::{
        ffi::{OsStrExt as _, OsStringExt as _},
        fs::{MetadataExt as _, OpenOptionsExt as _},
    },
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering},
    time::{Duration, Instant, SystemTime},
};

use ignore::gitignore::{Gitignore, GitignoreBuilder};
use nix::sys::inotify::WatchDescriptor;
use rayon::prelude::*;

use crate::{
    digest::{Digest, ReadBuffer, file_leaf_from_reader, symlink_leaf},
    kept::{KeptDir, KeptEntry},
    node::{DirNode, Entry, EntryKind, Meta, Profile, TreeStats},
    statcache::{CachedFile, FileStat, StatCache, StatCacheWriter},
    watch::Watch,
};

/// How to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub profile: Profile,
    /// Patterns in gitignore syntax, relative to the root.
    pub exclude: Vec<String>,
    /// Hashing threads; 0 means one per core.
    pub threads: usize,
    /// Most entries (files, directories, symlinks, skipped) a tree may have.
    pub max_entries: u64,
    /// Deepest directory nesting below the root.
    pub max_depth: usize,
    /// The stat-cache file of this root; `None` reads every file.
    pub stat_cache: Option<PathBuf>,
    /// Extra reads of a file that changed while it was read, before the build fails.
    pub read_retries: u32,
    /// How much older than a scan a file must be for the stat cache to trust it later (the
    /// racy-git rule); see [`crate::statcache`].
    pub racy_margin: Duration,
    /// Largest tree, in entries, that [`Builder::build_watched`] keeps: a larger one is built
    /// without keeping it, so that its memory stays that of a plain build.
    pub keep_max_entries: u64,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            profile: Profile::Content,
            exclude: Vec::new(),
            threads: 0,
            max_entries: 10_000_000,
            max_depth: crate::MAX_DEPTH,
            stat_cache: None,
            read_retries: 2,
            racy_margin: crate::statcache::RACY_MARGIN,
            keep_max_entries: u64::MAX,
        }
    }
}

/// What can stop a build. Every variant names the path or the limit at fault.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{}: not found", .0.display())]
    NotFound(PathBuf),
    #[error("{}: not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("exclude pattern {pattern:?}: {reason}")]
    BadPattern { pattern: String, reason: String },
    #[error("cannot read {}: {source}", path.display())]
    Unreadable { path: PathBuf, source: io::Error },
    #[error("{} changed while it was read ({attempts} attempts); retry when it is stable", path.display())]
    Changed { path: PathBuf, attempts: u32 },
    #[error("{} vanished during the build", .0.display())]
    Vanished(PathBuf),
    #[error("the tree has more than {limit} entries (the max_entries limit)")]
    TooManyEntries { limit: u64 },
    #[error("{} is nested deeper than {limit} directories (the max_depth limit)", path.display())]
    TooDeep { path: PathBuf, limit: usize },
    #[error("the build was cancelled")]
    Cancelled,
    #[error("starting the hashing threads failed: {0}")]
    Threads(String),
}

/// The result of a build.
#[derive(Debug, Clone)]
pub struct BuildOutcome {
    pub root: Digest,
    pub profile: Profile,
    pub stats: TreeStats,
    /// Distinct directory nodes.
    pub node_count: u64,
    /// Files whose content was read (the rest came from the stat cache or the kept tree).
    pub files_hashed: u64,
    /// Set when the build rebuilt a watched tree from change events: how many directories
    /// were listed again (the rest were not looked at).
    pub dirs_relisted: Option<u64>,
    /// Set when a watched tree had to be scanned whole again: why (its change events were
    /// incomplete, or it now names another directory).
    pub rescan_reason: Option<&'static str>,
    pub duration: Duration,
}

/// Receives each distinct directory node as soon as it is hashed, children before parents.
/// Called from the hashing threads.
pub trait NodeSink: Sync {
    fn node(&self, hash: Digest, node: DirNode) -> Result<(), BuildError>;

    /// Asked before a rebuild hands over the nodes of a kept tree of `entries` entries (the
    /// unchanged ones included): false when the sink would keep none of them, so that they
    /// are not copied out for nothing.
    fn wants(&self, entries: u64) -> bool {
        let _ = entries;
        true
    }
}

/// A sink that keeps nothing (when only the root is wanted).
pub struct DiscardNodes;

impl NodeSink for DiscardNodes {
    fn node(&self, _hash: Digest, _node: DirNode) -> Result<(), BuildError> {
        Ok(())
    }

    fn wants(&self, _entries: u64) -> bool {
        false
    }
}

/// The phase of a build, as `Progress::phase` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Scanning = 1,
    Hashing = 2,
    Done = 3,
}

/// Live progress counters, readable from another thread while the build runs.
#[derive(Debug, Default)]
pub struct Progress {
    phase: AtomicU8,
    pub files_total: AtomicU64,
    pub bytes_total: AtomicU64,
    pub files_done: AtomicU64,
    pub bytes_done: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgressSnapshot {
    pub phase: Phase,
    pub files_total: u64,
    pub bytes_total: u64,
    pub files_done: u64,
    pub bytes_done: u64,
}

impl Progress {
    pub fn snapshot(&self) -> ProgressSnapshot {
        ProgressSnapshot {
            phase: match self.phase.load(Ordering::Relaxed) {
                2 => Phase::Hashing,
                3 => Phase::Done,
                _ => Phase::Scanning,
            },
            files_total: self.files_total.load(Ordering::Relaxed),
            bytes_total: self.bytes_total.load(Ordering::Relaxed),
            files_done: self.files_done.load(Ordering::Relaxed),
            bytes_done: self.bytes_done.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
    }

    /// Done: all of `files` files and `bytes` bytes.
    pub(crate) fn complete(&self, files: u64, bytes: u64) {
        for (counter, value) in [
            (&self.files_total, files),
            (&self.files_done, files),
            (&self.bytes_total, bytes),
            (&self.bytes_done, bytes),
        ] {
            counter.store(value, Ordering::Relaxed);
        }
        self.set_phase(Phase::Done);
    }
}

/// Builds trees; see the module docs.
pub struct Builder<'a> {
    pub(crate) options: BuildOptions,
    pub(crate) sink: &'a dyn NodeSink,
    pub(crate) progress: Option<&'a Progress>,
    pub(crate) cancel: Option<&'a AtomicBool>,
}

impl<'a> Builder<'a> {
    pub fn new(options: BuildOptions) -> Builder<'static> {
        Builder {
            options,
            sink: &DiscardNodes,
            progress: None,
            cancel: None,
        }
    }

    /// Hands every distinct directory node to `sink`.
    pub fn sink<'b>(self, sink: &'b dyn NodeSink) -> Builder<'b>
    where
        'a: 'b,
    {
        Builder {
            options: self.options,
            sink,
            progress: self.progress,
            cancel: self.cancel,
        }
    }

    /// Updates `progress` as the build goes.
    pub fn progress<'b>(self, progress: &'b Progress) -> Builder<'b>
    where
        'a: 'b,
    {
        Builder {
            options: self.options,
            sink: self.sink,
            progress: Some(progress),
            cancel: self.cancel,
        }
    }

    /// Stops the build (with [`BuildError::Cancelled`]) once `cancel` is set.
    pub fn cancel<'b>(self, cancel: &'b AtomicBool) -> Builder<'b>
    where
        'a: 'b,
    {
        Builder {
            options: self.options,
            sink: self.sink,
            progress: self.progress,
            cancel: Some(cancel),
        }
    }

    /// Builds the tree of the directory `root` (already resolved and checked by the caller).
    pub fn build(&self, root: &Path) -> Result<BuildOutcome, BuildError> {
        self.build_full(root, None).map(|(outcome, _)| outcome)
    }

    /// A build that scans the whole tree (taking unchanged files from the stat cache). With
    /// `watch`, every directory is watched before it is listed and the hashed tree is kept.
    pub(crate) fn build_full(
        &self,
        root: &Path,
        watch: Option<&Watch>,
    ) -> Result<(BuildOutcome, Option<KeptDir>), BuildError> {
        let started = Instant::now();
        let meta = root_metadata(root)?;
        let pool = self.pool()?;
        let local_progress = Progress::default();
        let progress = self.progress.unwrap_or(&local_progress);
        let never = AtomicBool::new(false);
        // Taken before any lstat: entries whose mtime is not safely older are re-read next time.
        let scan_started = SystemTime::now();
        let cache = match &self.options.stat_cache {
            Some(path) => StatCache::load(path),
            None => StatCache::default(),
        };
        let mut run = Run::new(self, root, &cache, progress, &never)?;
        run.writer = self.options.stat_cache.as_ref().map(|_| {
            Mutex::new(StatCacheWriter::new(
                scan_started - self.options.racy_margin,
            ))
        });
        run.watch = watch;

        progress.set_phase(Phase::Scanning);
        // One span per phase, children of the caller's (a BuildTree call's) span.
        let skeleton = tracing::info_span!("scan", build.phase = "scan")
            .in_scope(|| pool.install(|| run.scan_dir(root, b"", 0, meta.dev())))?;
        if run.entries.load(Ordering::Relaxed) > self.options.keep_max_entries {
            // Too big to keep: hashed as a plain build, and the caller is told so.
            run.watch = None;
        }
        progress.set_phase(Phase::Hashing);
        let (root_digest, mut stats, kept) = tracing::info_span!("hash", build.phase = "hash")
            .in_scope(|| pool.install(|| run.hash_dir(skeleton, root, b"")))?;
        stats.dir_count += 1;
        stats.skipped_count = run.skipped.load(Ordering::Relaxed);
        progress.set_phase(Phase::Done);

        if let (Some(path), Some(writer)) = (&self.options.stat_cache, run.writer) {
            let writer = writer.into_inner();
            // A cache that cannot be written only costs speed next time.
            let _ = writer.finish(path);
        }
        let outcome = BuildOutcome {
            root: root_digest,
            profile: self.options.profile,
            stats,
            node_count: run.emitted.into_inner().len() as u64,
            files_hashed: run.files_read.load(Ordering::Relaxed),
            dirs_relisted: None,
            rescan_reason: None,
            duration: started.elapsed(),
        };
        Ok((outcome, kept))
    }

    /// The build's own thread pool, sized by [`BuildOptions::threads`].
    pub(crate) fn pool(&self) -> Result<rayon::ThreadPool, BuildError> {
        let threads = if self.options.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            self.options.threads
        };
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("merkle-hash-{i}"))
            .build()
            .map_err(|e| BuildError::Threads(e.to_string()))
    }
}

/// The root's metadata, which must be a directory's.
pub(crate) fn root_metadata(root: &Path) -> Result<Metadata, BuildError> {
    let meta = match fs::metadata(root) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(BuildError::NotFound(root.to_owned()));
        }
        Err(source) => {
            return Err(BuildError::Unreadable {
                path: root.to_owned(),
                source,
            });
        }
    };
    if !meta.is_dir() {
        return Err(BuildError::NotADirectory(root.to_owned()));
    }
    Ok(meta)
}

/// Most exclude patterns one build takes, and the longest one, in bytes.
pub const MAX_EXCLUDE_PATTERNS: usize = 1000;
pub const MAX_EXCLUDE_PATTERN_BYTES: usize = 4096;

/// Checks exclude patterns as a build will read them (gitignore syntax, spec section 6), so a
/// bad one is refused when it is given, not when a build runs. The error is
/// `"[index]: rule"` for the caller to prefix with the field.
pub fn check_excludes(patterns: &[String]) -> Result<(), String> {
    if patterns.len() > MAX_EXCLUDE_PATTERNS {
        return Err(format!(
            ": has {} patterns; at most {MAX_EXCLUDE_PATTERNS}",
            patterns.len()
        ));
    }
    for (i, pattern) in patterns.iter().enumerate() {
        let rule = if pattern.trim().is_empty() {
            Some("must be a non-empty gitignore pattern".to_owned())
        } else if pattern.len() > MAX_EXCLUDE_PATTERN_BYTES {
            Some(format!(
                "is {} bytes; at most {MAX_EXCLUDE_PATTERN_BYTES}",
                pattern.len()
            ))
        } else if pattern.chars().any(char::is_control) {
            Some("must not contain control characters (NUL, newline, ...)".to_owned())
        } else if has_unclosed_class(pattern) {
            Some(
                "has a '[' class without its ']' (git matches such a pattern against nothing, \
                 other readers take it literally: write \\[ for a literal '[')"
                    .to_owned(),
            )
        } else {
            exclude_matcher(Path::new("/"), std::slice::from_ref(pattern))
                .err()
                .map(|e| match e {
                    BuildError::BadPattern { reason, .. } => {
                        format!("is not a valid gitignore pattern: {reason}")
                    }
                    other => other.to_string(),
                })
        };
        if let Some(rule) = rule {
            return Err(format!("[{i}]: {rule}"));
        }
    }
    Ok(())
}

/// True when a gitignore pattern opens a `[...]` class it never closes (`\` escapes the next
/// character; a `]` right after `[`, `[!` or `[^` belongs to the class).
fn has_unclosed_class(pattern: &str) -> bool {
    let mut chars = pattern.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                chars.next();
            }
            '[' => {
                if matches!(chars.peek(), Some('!' | '^')) {
                    chars.next();
                }
                if chars.peek() == Some(&']') {
                    chars.next();
                }
                let mut closed = false;
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        ']' => {
                            closed = true;
                            break;
                        }
                        _ => {}
                    }
                }
                if !closed {
                    return true;
                }
            }
            _ => {}
        }
    }
    false
}

fn exclude_matcher(root: &Path, patterns: &[String]) -> Result<Gitignore, BuildError> {
    let mut builder = GitignoreBuilder::new(root);
    for pattern in patterns {
        builder
            .add_line(None, pattern)
            .map_err(|e| BuildError::BadPattern {
                pattern: pattern.clone(),
                reason: e.to_string(),
            })?;
    }
    builder.build().map_err(|e| BuildError::BadPattern {
        pattern: patterns.join(" "),
        reason: e.to_string(),
    })
}

/// The scanned skeleton of one directory, entries sorted by name. Kept compact: it is the
/// build's memory, about 100 bytes per entry plus the name.
pub(crate) struct ScanDir {
    entries: Box<[ScanEntry]>,
    /// Entries left out (special files and excluded names).
    skipped: u32,
    /// Its watch, when the tree is watched.
    wd: Option<WatchDescriptor>,
}

struct ScanEntry {
    name: Box<[u8]>,
    stat: FileStat,
    item: ScanItem,
}

// The link count lives in the file variant and the directory is boxed, so the enum is no
// larger than a symlink's target with its tag, and an entry about 96 bytes.
enum ScanItem {
    File { nlink: u32 },
    Dir(Box<ScanDir>),
    Symlink(Box<[u8]>),
}

/// One listed directory: its entries (lstat, sorted by name, excludes applied) and how many
/// were skipped.
pub(crate) struct Listing {
    pub entries: Vec<(Vec<u8>, Metadata)>,
    pub skipped: u32,
}

/// The state shared by the threads of one build.
pub(crate) struct Run<'a> {
    pub options: &'a BuildOptions,
    excludes: Gitignore,
    pub sink: &'a dyn NodeSink,
    pub progress: &'a Progress,
    cancel: &'a AtomicBool,
    cache: &'a StatCache,
    entries: AtomicU64,
    pub skipped: AtomicU64,
    emitted: Mutex<HashSet<Digest>>,
    pub files_read: AtomicU64,
    /// The next stat cache, filled a directory at a time as files are hashed.
    writer: Option<Mutex<StatCacheWriter>>,
    /// Set when the tree is watched: directories are watched before they are listed, and
    /// the hashed tree is kept.
    pub watch: Option<&'a Watch>,
}

pub(crate) fn child_rel(rel: &[u8], name: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(rel.len() + 1 + name.len());
    if !rel.is_empty() {
        out.extend_from_slice(rel);
        out.push(b'/');
    }
    out.extend_from_slice(name);
    out
}

/// The entry of a file, directory or symlink as hashed with `profile`.
pub(crate) fn entry_of(
    name: Vec<u8>,
    kind: EntryKind,
    hash: Digest,
    stat: &FileStat,
    profile: Profile,
) -> Entry {
    Entry {
        name,
        kind,
        hash,
        size: if kind.group() == 0 { stat.size } else { 0 },
        meta: (profile == Profile::Full).then_some(Meta {
            perm: stat.mode & 0o7777,
            uid: stat.uid,
            gid: stat.gid,
        }),
    }
}

/// The link count, saturated to 32 bits.
pub(crate) fn link_count(meta: &Metadata) -> u32 {
    meta.nlink().min(u32::MAX as u64) as u32
}

/// A file's kind from its mode: the owner's execute bit makes it executable.
pub(crate) fn file_kind(stat: &FileStat) -> EntryKind {
    if stat.mode & 0o100 != 0 {
        EntryKind::Executable
    } else {
        EntryKind::File
    }
}

impl<'a> Run<'a> {
    pub fn new(
        builder: &'a Builder<'a>,
        root: &Path,
        cache: &'a StatCache,
        progress: &'a Progress,
        never: &'a AtomicBool,
    ) -> Result<Run<'a>, BuildError> {
        Ok(Run {
            options: &builder.options,
            excludes: exclude_matcher(root, &builder.options.exclude)?,
            sink: builder.sink,
            progress,
            cancel: builder.cancel.unwrap_or(never),
            cache,
            entries: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            emitted: Mutex::new(HashSet::new()),
            files_read: AtomicU64::new(0),
            writer: None,
            watch: None,
        })
    }
}

impl Run<'_> {
    pub fn check_cancel(&self) -> Result<(), BuildError> {
        if self.cancel.load(Ordering::Relaxed) {
            Err(BuildError::Cancelled)
        } else {
            Ok(())
        }
    }

    pub fn unreadable(path: &Path) -> impl FnOnce(io::Error) -> BuildError + '_ {
        move |source| match source.kind() {
            io::ErrorKind::NotFound => BuildError::Vanished(path.to_owned()),
            _ => BuildError::Unreadable {
                path: path.to_owned(),
                source,
            },
        }
    }

    /// Lists a directory with `lstat`, applying the limits and the exclude patterns.
    pub fn list_dir(&self, dir: &Path, rel: &[u8], depth: usize) -> Result<Listing, BuildError> {
        self.check_cancel()?;
        // Checked before the walk goes one level deeper; never past the spec's limit.
        let limit = self.options.max_depth.min(crate::MAX_DEPTH);
        if depth > limit {
            return Err(BuildError::TooDeep {
                path: dir.to_owned(),
                limit,
            });
        }
        let mut entries: Vec<(Vec<u8>, Metadata)> = Vec::new();
        let mut skipped = 0;
        for item in fs::read_dir(dir).map_err(Self::unreadable(dir))? {
            let item = item.map_err(Self::unreadable(dir))?;
            let name = item.file_name().as_bytes().to_vec();
            // DirEntry::metadata is lstat: symlinks are never followed.
            let meta = item.metadata().map_err(Self::unreadable(&item.path()))?;
            if self.entries.fetch_add(1, Ordering::Relaxed) >= self.options.max_entries {
                return Err(BuildError::TooManyEntries {
                    limit: self.options.max_entries,
                });
            }
            let ft = meta.file_type();
            let special = !(ft.is_file() || ft.is_dir() || ft.is_symlink());
            let excluded = !self.options.exclude.is_empty()
                && self
                    .excludes
                    .matched(
                        Path::new(OsStr::from_bytes(&child_rel(rel, &name))),
                        ft.is_dir(),
                    )
                    .is_ignore();
            if special || excluded {
                self.skipped.fetch_add(1, Ordering::Relaxed);
                skipped += 1;
                continue;
            }
            entries.push((name, meta));
        }
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Ok(Listing { entries, skipped })
    }

    /// Scans a directory tree (`dev`: the directory's device) into its skeleton.
    pub fn scan_dir(
        &self,
        dir: &Path,
        rel: &[u8],
        depth: usize,
        dev: u64,
    ) -> Result<ScanDir, BuildError> {
        // Watched before it is listed: a change after the listing is an event.
        let wd = self.watch.and_then(|w| w.add(dir, rel, dev));
        let listing = self.list_dir(dir, rel, depth)?;
        let entries = listing
            .entries
            .into_par_iter()
            .map(|(name, meta)| {
                let path = dir.join(OsStr::from_bytes(&name));
                let ft = meta.file_type();
                let item = if ft.is_dir() {
                    ScanItem::Dir(Box::new(crate::stack::deeper(|| {
                        self.scan_dir(&path, &child_rel(rel, &name), depth + 1, meta.dev())
                    })?))
                } else if ft.is_symlink() {
                    ScanItem::Symlink(self.read_link(&path)?)
                } else {
                    self.progress.files_total.fetch_add(1, Ordering::Relaxed);
                    self.progress
                        .bytes_total
                        .fetch_add(meta.len(), Ordering::Relaxed);
                    ScanItem::File {
                        nlink: link_count(&meta),
                    }
                };
                Ok(ScanEntry {
                    name: name.into_boxed_slice(),
                    stat: FileStat::from_metadata(&meta),
                    item,
                })
            })
            .collect::<Result<Vec<_>, BuildError>>()?;
        Ok(ScanDir {
            entries: entries.into_boxed_slice(),
            skipped: listing.skipped,
            wd,
        })
    }

    pub fn read_link(&self, path: &Path) -> Result<Box<[u8]>, BuildError> {
        let target = fs::read_link(path).map_err(Self::unreadable(path))?;
        Ok(target.into_os_string().into_vec().into_boxed_slice())
    }

    /// Hashes a scanned directory, consuming its skeleton as it goes; returns the directory
    /// kept whole when the tree is watched.
    pub fn hash_dir(
        &self,
        dir: ScanDir,
        path: &Path,
        rel: &[u8],
    ) -> Result<(Digest, TreeStats, Option<KeptDir>), BuildError> {
        self.check_cancel()?;
        let profile = self.options.profile;
        let keep = self.watch.is_some();
        let results = dir
            .entries
            .into_vec()
            .into_par_iter()
            .map(|e| {
                let mut cached = None;
                let mut sub = None;
                let mut nlink = 1;
                let (kind, hash, stat, stats) = match e.item {
                    ScanItem::File { nlink: links } => {
                        nlink = links;
                        let (hash, stat) = self.hash_file(path, rel, &e.name, &e.stat)?;
                        let stats = TreeStats {
                            file_count: 1,
                            total_bytes: stat.size,
                            ..TreeStats::default()
                        };
                        cached = Some(CachedFile { stat, digest: hash });
                        (file_kind(&stat), hash, stat, stats)
                    }
                    ScanItem::Dir(scanned) => {
                        let child = path.join(OsStr::from_bytes(&e.name));
                        let (hash, mut stats, kept) = crate::stack::deeper(|| {
                            self.hash_dir(*scanned, &child, &child_rel(rel, &e.name))
                        })?;
                        stats.dir_count += 1;
                        sub = kept.map(Box::new);
                        (EntryKind::Directory, hash, e.stat, stats)
                    }
                    ScanItem::Symlink(target) => {
                        let stats = TreeStats {
                            symlink_count: 1,
                            ..TreeStats::default()
                        };
                        (EntryKind::Symlink, symlink_leaf(&target), e.stat, stats)
                    }
                };
                let entry = entry_of(e.name.into_vec(), kind, hash, &stat, profile);
                let kept = keep.then(|| KeptEntry {
                    entry: entry.clone(),
                    stat,
                    nlink,
                    sub,
                });
                Ok((entry, stats, cached, kept))
            })
            .collect::<Result<Vec<_>, BuildError>>()?;

        if let Some(writer) = &self.writer {
            let mut writer = writer.lock();
            for (entry, _, cached, _) in &results {
                if let Some(cached) = cached {
                    writer.push_child(rel, &entry.name, cached);
                }
            }
        }
        let mut stats = TreeStats::default();
        let mut entries = Vec::with_capacity(results.len());
        let mut kept_entries = Vec::with_capacity(if keep { results.len() } else { 0 });
        for (entry, s, _, kept) in results {
            stats.file_count += s.file_count;
            stats.dir_count += s.dir_count;
            stats.symlink_count += s.symlink_count;
            stats.total_bytes += s.total_bytes;
            entries.push(entry);
            kept_entries.extend(kept);
        }
        let node = DirNode { entries };
        let hash = node
            .hash(profile)
            .expect("entries are sorted, named and carry metadata by construction");
        self.emit_with(hash, || node)?;
        let kept = keep.then(|| KeptDir::new(hash, kept_entries, dir.skipped, dir.wd));
        Ok((hash, stats, kept))
    }

    /// Hands a node to the sink, the first time it is seen in this build.
    pub fn emit_with(
        &self,
        hash: Digest,
        node: impl FnOnce() -> DirNode,
    ) -> Result<(), BuildError> {
        let first = self.emitted.lock().insert(hash);
        if first {
            self.sink.node(hash, node())?;
        }
        Ok(())
    }

    /// The number of distinct nodes handed to the sink so far.
    pub fn emitted(&self) -> u64 {
        self.emitted.lock().len() as u64
    }

    /// The file's leaf and the stat it was read under (or cached with).
    fn hash_file(
        &self,
        dir: &Path,
        rel: &[u8],
        name: &[u8],
        scanned: &FileStat,
    ) -> Result<(Digest, FileStat), BuildError> {
        self.check_cancel()?;
        let cached = if self.cache.is_empty() {
            None
        } else {
            self.cache.lookup(&child_rel(rel, name), scanned)
        };
        let result = match cached {
            Some(digest) => {
                self.progress
                    .bytes_done
                    .fetch_add(scanned.size, Ordering::Relaxed);
                (digest, *scanned)
            }
            None => {
                self.files_read.fetch_add(1, Ordering::Relaxed);
                self.read_file(&dir.join(OsStr::from_bytes(name)))?
            }
        };
        self.progress.files_done.fetch_add(1, Ordering::Relaxed);
        Ok(result)
    }

    /// Reads and hashes a file, re-reading it while it changes under us.
    pub fn read_file(&self, path: &Path) -> Result<(Digest, FileStat), BuildError> {
        thread_local! {
            static BUFFER: std::cell::RefCell<ReadBuffer> = std::cell::RefCell::new(ReadBuffer::new());
        }
        let attempts = self.options.read_retries + 1;
        for _ in 0..attempts {
            // O_NOFOLLOW: a file swapped for a symlink is refused, never followed out of the
            // tree; O_NONBLOCK: a file swapped for a FIFO cannot hang the build.
            let file = File::options()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(path)
                .map_err(|e| match e.raw_os_error() {
                    Some(libc::ELOOP) => BuildError::Changed {
                        path: path.to_owned(),
                        attempts: 1,
                    },
                    _ => Self::unreadable(path)(e),
                })?;
            let before = FileStat::from_metadata(&file.metadata().map_err(Self::unreadable(path))?);
            if before.mode & libc::S_IFMT != libc::S_IFREG {
                return Err(BuildError::Changed {
                    path: path.to_owned(),
                    attempts: 1,
                });
            }
            let (digest, read) =
                BUFFER.with(|buf| self.hash_reader(&file, path, buf.borrow_mut().get()))?;
            let after = FileStat::from_metadata(&file.metadata().map_err(Self::unreadable(path))?);
            if before == after && read == after.size {
                return Ok((digest, after));
            }
            // Changed while read: undo its bytes in the progress and read it again.
            self.progress.bytes_done.fetch_sub(read, Ordering::Relaxed);
        }
        Err(BuildError::Changed {
            path: path.to_owned(),
            attempts,
        })
    }

    fn hash_reader(
        &self,
        file: &File,
        path: &Path,
        buf: &mut [u8],
    ) -> Result<(Digest, u64), BuildError> {
        let mut reader = Counted { file, run: self };
        file_leaf_from_reader(&mut reader, buf).map_err(|e| {
            if self.cancel.load(Ordering::Relaxed) {
                BuildError::Cancelled
            } else {
                Self::unreadable(path)(e)
            }
        })
    }
}

/// A file read that reports its bytes to the progress and stops once the build is cancelled.
struct Counted<'a> {
    file: &'a File,
    run: &'a Run<'a>,
}

impl Read for Counted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.run.cancel.load(Ordering::Relaxed) {
            return Err(io::Error::other("cancelled"));
        }
        let mut file = self.file;
        let n = file.read(buf)?;
        self.run
            .progress
            .bytes_done
            .fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclude_patterns_are_checked_when_given() {
        let ok: Vec<String> = [
            "*.log",
            "target/",
            "!keep.log",
            "[abc]?",
            "[]x]",
            "\\[",
            "[!a]",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(check_excludes(&ok), Ok(()));
        for (bad, rule) in [
            ("[", "[0]: has a '[' class without its ']'"),
            ("a[b", "without its ']'"),
            ("[]", "without its ']'"),
            ("", "[0]: must be a non-empty"),
            ("a\0b", "control characters"),
        ] {
            let err = check_excludes(&[bad.to_owned()]).expect_err(bad);
            assert!(err.contains(rule), "{bad:?}: {err}");
        }
        let many = vec!["*.log".to_owned(); MAX_EXCLUDE_PATTERNS + 1];
        assert!(
            check_excludes(&many)
                .expect_err("too many")
                .contains("at most 1000")
        );
    }

    #[test]
    fn the_skeleton_stays_compact() {
        // The skeleton is a build's memory: a million files cost about 100 MB.
        assert!(std::mem::size_of::<ScanEntry>() <= 96);
        assert!(std::mem::size_of::<ScanItem>() <= 24);
    }
}
