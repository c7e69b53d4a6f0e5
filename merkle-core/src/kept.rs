//! A built tree kept in memory: each directory's entries, the stats they were hashed under,
//! and the totals below it. [`crate::build`] makes one while it builds; [`crate::watched`]
//! keeps it between builds and refreshes what changed.

use nix::sys::inotify::WatchDescriptor;

use crate::{
    digest::Digest,
    node::{DirNode, Entry, EntryKind, TreeStats},
    statcache::FileStat,
};

/// One directory of a kept tree, with the totals of everything below it.
pub(crate) struct KeptDir {
    pub(crate) hash: Digest,
    pub(crate) entries: Vec<KeptEntry>,
    /// Entries of this directory that were left out (special files, excluded names).
    pub(crate) own_skipped: u32,
    /// What lies below this directory (itself not counted).
    pub(crate) stats: TreeStats,
    pub(crate) skipped: u64,
    /// Entries listed below, skipped ones included: what the max_entries limit counts.
    pub(crate) listed: u64,
    pub(crate) wd: Option<WatchDescriptor>,
}

/// One entry of a kept directory: its hashed form, the stat it was hashed under, and the
/// directory below it.
pub(crate) struct KeptEntry {
    pub entry: Entry,
    pub stat: FileStat,
    pub nlink: u32,
    pub sub: Option<Box<KeptDir>>,
}

impl KeptDir {
    pub(crate) fn new(
        hash: Digest,
        entries: Vec<KeptEntry>,
        own_skipped: u32,
        wd: Option<WatchDescriptor>,
    ) -> KeptDir {
        let mut dir = KeptDir {
            hash,
            entries,
            own_skipped,
            stats: TreeStats::default(),
            skipped: 0,
            listed: 0,
            wd,
        };
        dir.summarize();
        dir
    }

    /// Recomputes the totals from the entries.
    pub(crate) fn summarize(&mut self) {
        let mut stats = TreeStats::default();
        let mut skipped = self.own_skipped as u64;
        let mut listed = self.entries.len() as u64 + self.own_skipped as u64;
        for e in &self.entries {
            match &e.sub {
                Some(sub) => {
                    stats.dir_count += 1 + sub.stats.dir_count;
                    stats.file_count += sub.stats.file_count;
                    stats.symlink_count += sub.stats.symlink_count;
                    stats.total_bytes += sub.stats.total_bytes;
                    skipped += sub.skipped;
                    listed += sub.listed;
                }
                None if e.entry.kind == EntryKind::Symlink => stats.symlink_count += 1,
                None => {
                    stats.file_count += 1;
                    stats.total_bytes += e.stat.size;
                }
            }
        }
        self.stats = stats;
        self.skipped = skipped;
        self.listed = listed;
    }

    pub(crate) fn node(&self) -> DirNode {
        DirNode {
            entries: self.entries.iter().map(|e| e.entry.clone()).collect(),
        }
    }

    pub(crate) fn count_nodes(&self, seen: &mut std::collections::HashSet<Digest>) {
        if seen.insert(self.hash) {
            for sub in self.entries.iter().filter_map(|e| e.sub.as_deref()) {
                crate::stack::deeper(|| sub.count_nodes(seen));
            }
        }
    }
}
