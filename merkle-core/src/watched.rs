//! A built tree kept in memory and watched (`crate::watch`), so that the next build lists
//! only the directories that had change events and reads only the files named in them: a
//! rebuild costs what changed, not the size of the tree (the stat cache still costs one
//! `lstat` per entry). A long-running builder keeps one per tree it builds often.

use std::{
    ffi::OsStr,
    fs::{self, Metadata},
    os::unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant, SystemTime},
};

use rayon::prelude::*;

use crate::{
    build::{
        BuildError, BuildOptions, BuildOutcome, Builder, Phase, Progress, Run, child_rel, entry_of,
        file_kind, link_count, root_metadata,
    },
    digest::symlink_leaf,
    kept::{KeptDir, KeptEntry},
    node::{EntryKind, Profile},
    statcache::{FileStat, StatCache, epoch_ns},
    watch::{Changes, Dirty, Watch},
};

/// A tree built by [`Builder::build_watched`], kept for the next build of the same root.
pub struct WatchedTree {
    root: PathBuf,
    /// Device and inode of the root: a path that now names another directory is rescanned.
    root_id: (u64, u64),
    profile: Profile,
    exclude: Vec<String>,
    watch: Watch,
    top: KeptDir,
    /// Stats of hard-linked files taken before this are trusted by the next build (the
    /// racy-git rule, as in the stat cache).
    trusted_before_ns: i128,
    full_scan: Instant,
}

impl WatchedTree {
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Time since the tree was last scanned whole.
    pub fn since_full_scan(&self) -> Duration {
        self.full_scan.elapsed()
    }

    /// Entries held in memory (about 250 bytes each, names included, for short names).
    pub fn entries(&self) -> u64 {
        self.top.listed
    }

    /// Whether a build of `root` with `options` builds this tree (same directory, profile and
    /// exclude patterns), so that it can start from it.
    pub fn is_for(&self, root: &Path, options: &BuildOptions) -> bool {
        self.root == root && self.profile == options.profile && self.exclude == options.exclude
    }
}

impl Builder<'_> {
    /// Builds `root` and keeps its tree, watched, for the next build.
    ///
    /// When `previous` is the watched tree of the same root, profile and exclude patterns
    /// and its change events are complete, only the directories with events are listed again
    /// and only the files named in them are read; otherwise the whole tree is scanned (with
    /// the stat cache, if any). The second value is the tree for the next build, or why this
    /// tree cannot be watched (the build itself is complete either way).
    pub fn build_watched(
        &self,
        root: &Path,
        previous: Option<WatchedTree>,
    ) -> Result<(BuildOutcome, Result<WatchedTree, String>), BuildError> {
        let meta = root_metadata(root)?;
        let root_id = (meta.dev(), meta.ino());
        let mut rescan_reason = None;
        if let Some(tree) = previous {
            if !tree.is_for(root, &self.options) {
                // Another tree's: nothing to reuse.
            } else if tree.root_id != root_id {
                rescan_reason = Some("the path now names another directory");
            } else {
                match tree.watch.drain() {
                    Changes::Dirty(dirty) => return self.rebuild(tree, dirty),
                    Changes::Rescan(why) => rescan_reason = Some(why),
                }
            }
        }
        let watch = match Watch::new() {
            Ok(watch) => watch,
            Err(why) => return Ok((self.build(root)?, Err(why))),
        };
        let scan_started = SystemTime::now();
        let (mut outcome, kept) = self.build_full(root, Some(&watch))?;
        outcome.rescan_reason = rescan_reason;
        if let Some(why) = watch.failure() {
            return Ok((outcome, Err(why)));
        }
        let Some(top) = kept else {
            return Ok((outcome, Err(self.too_big())));
        };
        let tree = WatchedTree {
            root: root.to_owned(),
            root_id,
            profile: self.options.profile,
            exclude: self.options.exclude.clone(),
            watch,
            top,
            trusted_before_ns: epoch_ns(scan_started - self.options.racy_margin),
            full_scan: Instant::now(),
        };
        Ok((outcome, Ok(tree)))
    }

    fn too_big(&self) -> String {
        format!(
            "the tree has more than {} entries, the most kept watched",
            self.options.keep_max_entries
        )
    }

    fn rebuild(
        &self,
        mut tree: WatchedTree,
        mut dirty: Dirty,
    ) -> Result<(BuildOutcome, Result<WatchedTree, String>), BuildError> {
        let started = Instant::now();
        let scan_started = SystemTime::now();
        recheck_links(
            &tree.top,
            &tree.root,
            b"",
            tree.trusted_before_ns,
            &mut dirty,
        );
        let pool = self.pool()?;
        let cache = StatCache::default();
        let local_progress = Progress::default();
        let progress = self.progress.unwrap_or(&local_progress);
        let never = AtomicBool::new(false);
        let mut run = Run::new(self, &tree.root, &cache, progress, &never)?;
        run.watch = Some(&tree.watch);
        progress.set_phase(Phase::Hashing);
        progress
            .files_total
            .store(tree.top.stats.file_count, Ordering::Relaxed);
        progress
            .bytes_total
            .store(tree.top.stats.total_bytes, Ordering::Relaxed);

        // The watched tree's only phase: re-listing and hashing what changed.
        tracing::info_span!(
            "hash",
            build.phase = "hash",
            watched = true,
            dirs_changed = dirty.dir_count()
        )
        .in_scope(|| pool.install(|| run.refresh(&mut tree.top, &tree.root, b"", 0, &dirty)))?;
        if tree.top.listed > self.options.max_entries {
            return Err(BuildError::TooManyEntries {
                limit: self.options.max_entries,
            });
        }
        let node_count = if self.sink.wants(tree.top.listed) {
            // The sink gets every node of the tree, as from a full build.
            run.emit_kept(&tree.top)?;
            run.emitted()
        } else {
            let mut seen = std::collections::HashSet::new();
            tree.top.count_nodes(&mut seen);
            seen.len() as u64
        };
        let mut stats = tree.top.stats;
        stats.dir_count += 1;
        stats.skipped_count = tree.top.skipped;
        progress.complete(stats.file_count, stats.total_bytes);
        let outcome = BuildOutcome {
            root: tree.top.hash,
            profile: self.options.profile,
            stats,
            node_count,
            files_hashed: run.files_read.load(Ordering::Relaxed),
            dirs_relisted: Some(dirty.dir_count()),
            rescan_reason: None,
            duration: started.elapsed(),
        };
        drop(run);
        if let Some(why) = tree.watch.failure() {
            return Ok((outcome, Err(why)));
        }
        if tree.top.listed > self.options.keep_max_entries {
            return Ok((outcome, Err(self.too_big())));
        }
        tree.trusted_before_ns = epoch_ns(scan_started - self.options.racy_margin);
        Ok((outcome, Ok(tree)))
    }
}

/// Marks the files with other hard links whose stat changed, or is too recent to trust: a
/// write through another name is reported to that name's directory, which may lie outside
/// the tree.
fn recheck_links(
    dir: &KeptDir,
    path: &Path,
    rel: &[u8],
    trusted_before_ns: i128,
    dirty: &mut Dirty,
) {
    for e in &dir.entries {
        let name = OsStr::from_bytes(&e.entry.name);
        match &e.sub {
            Some(sub) => recheck_links(
                sub,
                &path.join(name),
                &child_rel(rel, &e.entry.name),
                trusted_before_ns,
                dirty,
            ),
            None if e.nlink > 1 && e.entry.kind != EntryKind::Symlink => {
                let now =
                    fs::symlink_metadata(path.join(name)).map(|m| FileStat::from_metadata(&m));
                let trusted = now.is_ok_and(|s| s == e.stat && s.newest_ns() < trusted_before_ns);
                if !trusted {
                    dirty.mark(rel, &e.entry.name, false);
                }
            }
            None => {}
        }
    }
}

/// An entry of a directory listed again, with what was kept of it.
struct Listed {
    name: Vec<u8>,
    meta: Metadata,
    previous: Option<KeptEntry>,
    /// `Some(replaced)` when an event named it.
    event: Option<bool>,
}

impl Run<'_> {
    /// Brings a kept directory up to date with the change events; true when it changed.
    fn refresh(
        &self,
        dir: &mut KeptDir,
        path: &Path,
        rel: &[u8],
        depth: usize,
        dirty: &Dirty,
    ) -> Result<bool, BuildError> {
        self.check_cancel()?;
        let changed = if dirty.dirs.contains_key(rel) {
            self.relist(dir, path, rel, depth, dirty)?;
            true
        } else {
            let changed = dir
                .entries
                .par_iter_mut()
                .map(|e| self.refresh_below(e, path, rel, depth, dirty))
                .collect::<Result<Vec<bool>, BuildError>>()?;
            changed.contains(&true)
        };
        if changed {
            dir.summarize();
            dir.hash = dir
                .node()
                .hash(self.options.profile)
                .expect("entries are sorted, named and carry metadata by construction");
        }
        Ok(changed)
    }

    /// Refreshes the directory below a kept entry, if events lie below it.
    fn refresh_below(
        &self,
        e: &mut KeptEntry,
        path: &Path,
        rel: &[u8],
        depth: usize,
        dirty: &Dirty,
    ) -> Result<bool, BuildError> {
        let Some(sub) = e.sub.as_deref_mut() else {
            return Ok(false);
        };
        let crel = child_rel(rel, &e.entry.name);
        if !dirty.touched.contains(crel.as_slice()) {
            return Ok(false);
        }
        let child = path.join(OsStr::from_bytes(&e.entry.name));
        let changed = crate::stack::deeper(|| self.refresh(sub, &child, &crel, depth + 1, dirty))?;
        e.entry.hash = sub.hash;
        Ok(changed)
    }

    /// Lists a directory with events again, keeping what did not change.
    fn relist(
        &self,
        dir: &mut KeptDir,
        path: &Path,
        rel: &[u8],
        depth: usize,
        dirty: &Dirty,
    ) -> Result<(), BuildError> {
        let events = &dirty.dirs[rel];
        let listing = self.list_dir(path, rel, depth)?;
        let mut old = std::mem::take(&mut dir.entries).into_iter().peekable();
        let mut jobs = Vec::with_capacity(listing.entries.len());
        for (name, meta) in listing.entries {
            while let Some(gone) = old.next_if(|o| o.entry.name < name) {
                self.release(gone, rel);
            }
            let previous = old.next_if(|o| o.entry.name == name);
            let event = events.get(name.as_slice()).copied();
            jobs.push(Listed {
                name,
                meta,
                previous,
                event,
            });
        }
        for gone in old {
            self.release(gone, rel);
        }
        dir.entries = jobs
            .into_par_iter()
            .map(|listed| self.refresh_entry(path, rel, depth, listed, dirty))
            .collect::<Result<Vec<_>, BuildError>>()?;
        dir.own_skipped = listing.skipped;
        Ok(())
    }

    /// One entry of a listed directory: kept when nothing says it changed, else hashed again.
    fn refresh_entry(
        &self,
        path: &Path,
        rel: &[u8],
        depth: usize,
        listed: Listed,
        dirty: &Dirty,
    ) -> Result<KeptEntry, BuildError> {
        let Listed {
            name,
            meta,
            previous,
            event,
        } = listed;
        let meta = &meta;
        let stat = FileStat::from_metadata(meta);
        let nlink = link_count(meta);
        let ft = meta.file_type();
        let profile = self.options.profile;
        if let Some(mut old) = previous {
            if ft.is_dir() && old.sub.is_some() && event != Some(true) && old.stat.ino == stat.ino {
                // The same directory, still watched: only its own metadata may have changed.
                self.refresh_below(&mut old, path, rel, depth, dirty)?;
                old.entry = entry_of(name, EntryKind::Directory, old.entry.hash, &stat, profile);
                old.stat = stat;
                old.nlink = nlink;
                return Ok(old);
            }
            let same_kind = old.sub.is_none()
                && (old.entry.kind == EntryKind::Symlink) == ft.is_symlink()
                && !ft.is_dir();
            if same_kind && event.is_none() && old.stat == stat {
                return Ok(old);
            }
            self.release(old, rel);
        }
        let child = path.join(OsStr::from_bytes(&name));
        if ft.is_dir() {
            let crel = child_rel(rel, &name);
            let scanned =
                crate::stack::deeper(|| self.scan_dir(&child, &crel, depth + 1, meta.dev()))?;
            let (hash, _, kept) = self.hash_dir(scanned, &child, &crel)?;
            Ok(KeptEntry {
                entry: entry_of(name, EntryKind::Directory, hash, &stat, profile),
                stat,
                nlink,
                sub: kept.map(Box::new),
            })
        } else if ft.is_symlink() {
            let target = self.read_link(&child)?;
            Ok(KeptEntry {
                entry: entry_of(
                    name,
                    EntryKind::Symlink,
                    symlink_leaf(&target),
                    &stat,
                    profile,
                ),
                stat,
                nlink,
                sub: None,
            })
        } else {
            self.check_cancel()?;
            self.files_read.fetch_add(1, Ordering::Relaxed);
            let (digest, stat) = self.read_file(&child)?;
            Ok(KeptEntry {
                entry: entry_of(name, file_kind(&stat), digest, &stat, profile),
                stat,
                nlink,
                sub: None,
            })
        }
    }

    /// Stops watching the directories below an entry that left the tree.
    fn release(&self, gone: KeptEntry, rel: &[u8]) {
        fn forget(watch: &Watch, dir: &KeptDir, rel: &[u8]) {
            if let Some(wd) = dir.wd {
                watch.forget(wd, rel);
            }
            for e in &dir.entries {
                if let Some(sub) = &e.sub {
                    crate::stack::deeper(|| forget(watch, sub, &child_rel(rel, &e.entry.name)));
                }
            }
        }
        if let (Some(watch), Some(sub)) = (self.watch, &gone.sub) {
            forget(watch, sub, &child_rel(rel, &gone.entry.name));
        }
    }

    /// Hands every node of a kept tree to the sink, children before parents, each once.
    fn emit_kept(&self, dir: &KeptDir) -> Result<(), BuildError> {
        for sub in dir.entries.iter().filter_map(|e| e.sub.as_deref()) {
            crate::stack::deeper(|| self.emit_kept(sub))?;
        }
        self.emit_with(dir.hash, || dir.node())
    }
}
