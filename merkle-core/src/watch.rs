//! Change notification for rebuilds of a kept tree (Linux inotify), the way git's fsmonitor
//! spares `git status` a stat of every file.
//!
//! Every directory of a watched tree is watched *before* it is listed, so any change made after
//! its listing is queued as an event; a rebuild drains the queue and re-lists only the
//! directories that had events (re-reading the files named in them). What inotify cannot
//! report makes the caller fall back to a full scan: a queue overflow, the root moved or
//! deleted, a file system unmounted, a file system that does not deliver events for every
//! change (network and FUSE file systems are never watched), or the watch limit
//! (`fs.inotify.max_user_watches`) reached. Two gaps remain, as for every inotify user:
//! writes through a shared `mmap` and a file system mounted inside the tree after it was
//! scanned; the owner of a kept tree rescans it fully from time to time to bound them. Files
//! with more than one hard link are written to unseen through their other names: rebuilds
//! re-check them with `lstat` (see [`crate::build`]).

use parking_lot::Mutex;
use std::{
    collections::{HashMap, HashSet},
    path::Path,
};

use nix::{
    errno::Errno,
    sys::{
        inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor},
        statfs::{self, FsType},
    },
};

/// The events that can change a directory's tree.
fn mask() -> AddWatchFlags {
    AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_ONLYDIR
        | AddWatchFlags::IN_DONT_FOLLOW
}

/// Local file systems that report every change made through the kernel. Anything else (NFS,
/// SMB, FUSE, 9p, overlay, ...) can change without an event and is scanned instead.
fn reliable(fs: FsType) -> bool {
    const ZFS_SUPER_MAGIC: FsType = FsType(0x2fc1_2fc1);
    [
        statfs::EXT4_SUPER_MAGIC,
        statfs::XFS_SUPER_MAGIC,
        statfs::BTRFS_SUPER_MAGIC,
        statfs::TMPFS_MAGIC,
        statfs::F2FS_SUPER_MAGIC,
        ZFS_SUPER_MAGIC,
    ]
    .contains(&fs)
}

/// The watches of one tree: which directory (relative path) each watch descriptor stands for.
pub(crate) struct Watch {
    inotify: Inotify,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    dirs: HashMap<WatchDescriptor, Box<[u8]>>,
    /// Devices already checked with `statfs`, and whether they are reliable.
    devices: HashMap<u64, bool>,
    /// Why watching stopped; once set, the kept tree cannot be trusted and is dropped.
    failed: Option<String>,
}

/// What changed since the last drain.
pub(crate) enum Changes {
    /// Nothing can be trusted: rebuild from a full scan.
    Rescan(&'static str),
    Dirty(Dirty),
}

/// The names in one directory that events were about, each with whether it was created,
/// deleted or moved (rather than only written to or changed in metadata).
pub(crate) type Names = HashMap<Box<[u8]>, bool>;

/// The directories with events, and in each the names the events were about.
#[derive(Default)]
pub(crate) struct Dirty {
    /// Relative directory → its names with events.
    pub dirs: HashMap<Box<[u8]>, Names>,
    /// Every dirty directory and all its ancestors: where a rebuild has to look.
    pub touched: HashSet<Box<[u8]>>,
}

impl Dirty {
    pub fn mark(&mut self, dir: &[u8], name: &[u8], replaced: bool) {
        let flag = self
            .dirs
            .entry(dir.into())
            .or_default()
            .entry(name.into())
            .or_insert(false);
        *flag |= replaced;
        let mut prefix = dir;
        loop {
            if !self.touched.insert(prefix.into()) {
                break;
            }
            match prefix.iter().rposition(|&b| b == b'/') {
                Some(i) => prefix = &prefix[..i],
                None if prefix.is_empty() => break,
                None => prefix = b"",
            }
        }
    }

    pub fn dir_count(&self) -> u64 {
        self.dirs.len() as u64
    }
}

impl Watch {
    pub fn new() -> Result<Watch, String> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| format!("inotify is not available: {e}"))?;
        Ok(Watch {
            inotify,
            state: Mutex::new(State::default()),
        })
    }

    fn state(&self) -> parking_lot::MutexGuard<'_, State> {
        self.state.lock()
    }

    /// Watches the directory `path` (relative path `rel`, on device `dev`). Returns `None`
    /// once watching has failed; the failure is kept for [`Watch::failure`].
    pub fn add(&self, path: &Path, rel: &[u8], dev: u64) -> Option<WatchDescriptor> {
        // One lock around the system call and the map: a watch taken over by another path (a
        // directory moved within the tree keeps its descriptor) is never removed by mistake.
        let mut state = self.state();
        if state.failed.is_some() {
            return None;
        }
        let reliable = *state
            .devices
            .entry(dev)
            .or_insert_with(|| statfs::statfs(path).is_ok_and(|s| reliable(s.filesystem_type())));
        if !reliable {
            state.failed = Some(format!(
                "{} is on a file system that does not report every change",
                path.display()
            ));
            return None;
        }
        match self.inotify.add_watch(path, mask()) {
            Ok(wd) => {
                state.dirs.insert(wd, rel.into());
                Some(wd)
            }
            Err(Errno::ENOSPC) => {
                state.failed = Some(
                    "the inotify watch limit is reached (sysctl fs.inotify.max_user_watches)"
                        .to_owned(),
                );
                None
            }
            Err(e) => {
                state.failed = Some(format!("cannot watch {}: {e}", path.display()));
                None
            }
        }
    }

    /// Stops watching the directory that was at `rel`, unless its watch now stands for
    /// another path (it was moved within the tree).
    pub fn forget(&self, wd: WatchDescriptor, rel: &[u8]) {
        let mut state = self.state();
        if state.dirs.get(&wd).is_some_and(|r| **r == *rel) {
            state.dirs.remove(&wd);
            // Fails only when the directory is gone, which removed the watch already.
            let _ = self.inotify.rm_watch(wd);
        }
    }

    /// Why watching failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.state().failed.clone()
    }

    /// Takes the queued events.
    pub fn drain(&self) -> Changes {
        let state = self.state();
        let mut dirty = Dirty::default();
        loop {
            let events = match self.inotify.read_events() {
                Ok(events) if !events.is_empty() => events,
                Ok(_) | Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => continue,
                Err(_) => return Changes::Rescan("reading the change events failed"),
            };
            for event in events {
                let mask = event.mask;
                if mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                    return Changes::Rescan("the change event queue overflowed");
                }
                if mask.contains(AddWatchFlags::IN_UNMOUNT) {
                    return Changes::Rescan("a file system in the tree was unmounted");
                }
                let Some(rel) = state.dirs.get(&event.wd) else {
                    // A watch already forgotten (IN_IGNORED after rm_watch, late events).
                    continue;
                };
                match event.name {
                    Some(name) => {
                        let replaced = mask.intersects(
                            AddWatchFlags::IN_CREATE
                                | AddWatchFlags::IN_DELETE
                                | AddWatchFlags::IN_MOVED_FROM
                                | AddWatchFlags::IN_MOVED_TO,
                        );
                        use std::os::unix::ffi::OsStrExt as _;
                        dirty.mark(rel, name.as_bytes(), replaced);
                    }
                    // Events on a directory itself are also reported, with its name, to its
                    // parent; only the root has no parent to hear of it.
                    None if rel.is_empty()
                        && mask.intersects(
                            AddWatchFlags::IN_DELETE_SELF
                                | AddWatchFlags::IN_MOVE_SELF
                                | AddWatchFlags::IN_IGNORED,
                        ) =>
                    {
                        return Changes::Rescan("the directory was moved or deleted");
                    }
                    None => {}
                }
            }
        }
        if state.failed.is_some() {
            // Some directory went unwatched: events are not complete.
            return Changes::Rescan("watching failed");
        }
        Changes::Dirty(dirty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_marks_every_ancestor() {
        let mut dirty = Dirty::default();
        dirty.mark(b"a/b/c", b"f", false);
        dirty.mark(b"a/b/c", b"g", true);
        dirty.mark(b"", b"top", false);
        let touched: HashSet<&[u8]> = dirty.touched.iter().map(|t| &**t).collect();
        assert_eq!(touched, HashSet::from([&b"a/b/c"[..], b"a/b", b"a", b""]));
        assert_eq!(dirty.dir_count(), 2);
        assert!(dirty.dirs[&b"a/b/c"[..]][&b"g"[..]]);
        assert!(!dirty.dirs[&b"a/b/c"[..]][&b"f"[..]]);
    }

    #[test]
    fn events_name_the_changed_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        let watch = Watch::new().expect("inotify");
        let dev = {
            use std::os::unix::fs::MetadataExt as _;
            std::fs::metadata(dir.path()).expect("stat").dev()
        };
        watch
            .add(dir.path(), b"", dev)
            .expect("the temporary folder can be watched");
        watch
            .add(&dir.path().join("sub"), b"sub", dev)
            .expect("watch sub");
        std::fs::write(dir.path().join("sub/new"), b"x").expect("write");
        std::fs::write(dir.path().join("top"), b"x").expect("write");
        let Changes::Dirty(dirty) = watch.drain() else {
            panic!("expected dirty directories");
        };
        assert!(dirty.dirs[&b"sub"[..]][&b"new"[..]]);
        assert!(dirty.dirs[&b""[..]][&b"top"[..]]);
        assert!(matches!(watch.drain(), Changes::Dirty(d) if d.dirs.is_empty()));
        std::fs::remove_file(dir.path().join("sub/new")).expect("rm");
        std::fs::remove_dir(dir.path().join("sub")).expect("rmdir");
        let Changes::Dirty(dirty) = watch.drain() else {
            panic!("expected dirty directories");
        };
        assert!(dirty.dirs[&b""[..]][&b"sub"[..]]);
    }
}
