//! Rebuilds of watched trees: only directories with change events are listed again, only
//! the files named in them are read, and whatever the events cannot vouch for (hard links,
//! a replaced root, a queue overflow) is checked or rescanned. Every rebuild is compared with
//! a full build of the same directory.

use std::{fs, path::Path};

use merkle_core::{BuildError, BuildOptions, BuildOutcome, Builder, WatchedTree};

fn write(path: &Path, content: &[u8]) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).expect("mkdir");
    }
    fs::write(path, content).expect("write");
}

/// A watched build that must stay watched.
fn watched(
    dir: &Path,
    options: &BuildOptions,
    previous: Option<WatchedTree>,
) -> (BuildOutcome, WatchedTree) {
    let (outcome, tree) = Builder::new(options.clone())
        .build_watched(dir, previous)
        .expect("build");
    (outcome, tree.expect("the temporary folder can be watched"))
}

fn full(dir: &Path, options: &BuildOptions) -> BuildOutcome {
    Builder::new(options.clone())
        .build(dir)
        .expect("full build")
}

fn tree_of_100() -> tempfile::TempDir {
    let tree = tempfile::tempdir().expect("tempdir");
    for i in 0..100 {
        write(
            &tree.path().join(format!("d{}/f{i}", i % 7)),
            format!("file {i}").as_bytes(),
        );
    }
    tree
}

#[test]
fn rebuild_reads_only_the_files_events_name() {
    let tree = tree_of_100();
    let options = BuildOptions::default();
    let (first, kept) = watched(tree.path(), &options, None);
    assert_eq!(first.files_hashed, 100);
    assert_eq!(first.dirs_relisted, None, "the first build scans");

    let (same, kept) = watched(tree.path(), &options, Some(kept));
    assert_eq!(same.root, first.root);
    assert_eq!(same.files_hashed, 0);
    assert_eq!(same.dirs_relisted, Some(0), "no events, no listing");

    write(&tree.path().join("d1/f1"), b"changed");
    // Opened for writing and closed unchanged: its stat is the same, the event still
    // makes it read (a write within the timestamp granularity looks like this).
    drop(
        fs::OpenOptions::new()
            .write(true)
            .open(tree.path().join("d2/f2"))
            .expect("open"),
    );
    let (second, kept) = watched(tree.path(), &options, Some(kept));
    assert_eq!(second.files_hashed, 2);
    assert_eq!(second.dirs_relisted, Some(2));
    assert_eq!(second.root, full(tree.path(), &options).root);
    assert_ne!(second.root, first.root);

    // New, removed and moved entries, a new directory with files, a symlink.
    write(&tree.path().join("d3/new/deep/g"), b"g");
    fs::remove_file(tree.path().join("d4/f4")).expect("rm");
    fs::rename(tree.path().join("d5"), tree.path().join("d0/d5-moved")).expect("mv");
    std::os::unix::fs::symlink("f6", tree.path().join("d6/link")).expect("symlink");
    let (third, kept) = watched(tree.path(), &options, Some(kept));
    let reference = full(tree.path(), &options);
    assert_eq!(third.root, reference.root);
    assert_eq!(third.stats, reference.stats);
    assert_eq!(third.node_count, reference.node_count);
    assert_eq!(
        third.files_hashed,
        1 + 14,
        "g, and the files of the moved d5"
    );

    // The moved directory is still watched under its new name.
    write(
        &tree.path().join("d0/d5-moved/f5"),
        b"edited after the move",
    );
    let (fourth, _) = watched(tree.path(), &options, Some(kept));
    assert_eq!(fourth.files_hashed, 1);
    assert_eq!(fourth.root, full(tree.path(), &options).root);
}

#[test]
fn a_hard_linked_file_written_through_another_name_is_seen() {
    let tree = tempfile::tempdir().expect("tempdir");
    let outside = tempfile::tempdir().expect("tempdir");
    write(&outside.path().join("original"), b"version 1");
    fs::hard_link(outside.path().join("original"), tree.path().join("link")).expect("link");
    write(&tree.path().join("other"), b"other");
    let options = BuildOptions::default();
    let (first, kept) = watched(tree.path(), &options, None);

    // No event reaches the tree's directory: the rebuild finds it by its stat.
    fs::write(outside.path().join("original"), b"version 2").expect("write");
    let (second, _) = watched(tree.path(), &options, Some(kept));
    assert_ne!(second.root, first.root);
    assert_eq!(second.root, full(tree.path(), &options).root);
    assert!(second.dirs_relisted.is_some());
}

#[test]
fn a_replaced_root_or_other_options_scan_again() {
    let parent = tempfile::tempdir().expect("tempdir");
    let root = parent.path().join("root");
    write(&root.join("a"), b"a");
    let options = BuildOptions::default();
    let (_, kept) = watched(&root, &options, None);

    fs::rename(&root, parent.path().join("old")).expect("mv");
    write(&root.join("b"), b"b");
    let (outcome, kept) = watched(&root, &options, Some(kept));
    assert_eq!(outcome.dirs_relisted, None);
    assert!(outcome.rescan_reason.is_some());
    assert_eq!(outcome.root, full(&root, &options).root);

    // Other exclude patterns: another tree, built whole.
    let excluding = BuildOptions {
        exclude: vec!["b".into()],
        ..BuildOptions::default()
    };
    let (outcome, _) = watched(&root, &excluding, Some(kept));
    assert_eq!(outcome.dirs_relisted, None);
    assert_eq!(outcome.stats.skipped_count, 1);
}

#[test]
fn an_overflowing_event_queue_scans_again() {
    let tree = tempfile::tempdir().expect("tempdir");
    write(&tree.path().join("a"), b"a");
    let options = BuildOptions::default();
    let (_, kept) = watched(tree.path(), &options, None);
    let queue: usize = fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
        .expect("max_queued_events")
        .trim()
        .parse()
        .expect("a number");
    // Each new file queues at least two events (created, closed after writing).
    for i in 0..queue / 2 + 1 {
        fs::write(tree.path().join(format!("n{i}")), b"x").expect("write");
    }
    let (outcome, _) = watched(tree.path(), &options, Some(kept));
    assert_eq!(outcome.dirs_relisted, None);
    assert_eq!(
        outcome.rescan_reason,
        Some("the change event queue overflowed")
    );
    assert_eq!(outcome.root, full(tree.path(), &options).root);
}

#[test]
fn excludes_and_limits_hold_on_rebuilds() {
    let tree = tree_of_100();
    let options = BuildOptions {
        exclude: vec!["*.log".into()],
        max_entries: 110,
        ..BuildOptions::default()
    };
    let (_, kept) = watched(tree.path(), &options, None);
    write(&tree.path().join("d1/debug.log"), b"excluded");
    write(&tree.path().join("d1/kept"), b"kept");
    let (outcome, kept) = watched(tree.path(), &options, Some(kept));
    let reference = full(tree.path(), &options);
    assert_eq!(outcome.root, reference.root);
    assert_eq!(outcome.stats, reference.stats);
    assert_eq!(outcome.stats.skipped_count, 1);

    // 109 entries now (the excluded one counts); four more are over the limit of 110.
    for i in 0..4 {
        write(&tree.path().join(format!("d2/extra{i}")), b"x");
    }
    let err = Builder::new(options.clone())
        .build_watched(tree.path(), Some(kept))
        .err()
        .expect("over the limit");
    assert!(
        matches!(err, BuildError::TooManyEntries { limit: 110 }),
        "{err}"
    );
}

#[test]
fn rebuilds_during_constant_changes_end_equal_to_a_full_build() {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };
    let tree = tree_of_100();
    let options = BuildOptions::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (root, stop) = (tree.path().to_owned(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Rewrites, creations, removals and directory moves, as fast as they go.
                let d = i % 7;
                match i % 5 {
                    0 | 1 => write(&root.join(format!("d{d}/f{}", i % 100)), &i.to_le_bytes()),
                    2 => write(&root.join(format!("d{d}/new/n{}", i % 13)), b"n"),
                    3 => {
                        let _ = fs::remove_file(root.join(format!("d{d}/new/n{}", (i + 5) % 13)));
                    }
                    _ => {
                        let _ = fs::rename(
                            root.join(format!("d{d}/new")),
                            root.join(format!("d{}/new", (d + 1) % 7)),
                        );
                    }
                }
                i += 1;
            }
        })
    };
    let mut kept = None;
    let mut rebuilt = 0;
    let started = std::time::Instant::now();
    while started.elapsed() < std::time::Duration::from_millis(1500) {
        // A build may fail on a file that vanishes under it; the next one starts afresh.
        match Builder::new(options.clone()).build_watched(tree.path(), kept.take()) {
            Ok((outcome, tree)) => {
                rebuilt += u32::from(outcome.dirs_relisted.is_some());
                kept = tree.ok();
            }
            Err(BuildError::Vanished(_) | BuildError::Changed { .. }) => {}
            Err(e) => panic!("unexpected build error: {e}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    assert!(rebuilt > 0, "some builds were watched rebuilds");
    let kept = kept.or_else(|| watched(tree.path(), &options, None).1.into());
    let (last, _) = watched(tree.path(), &options, kept);
    assert_eq!(last.root, full(tree.path(), &options).root);
}

#[test]
fn trees_over_the_keep_limit_are_built_but_not_kept() {
    let tree = tree_of_100(); // 100 files in 7 directories: 107 entries
    let small = BuildOptions {
        keep_max_entries: 50,
        ..BuildOptions::default()
    };
    let (outcome, kept) = Builder::new(small)
        .build_watched(tree.path(), None)
        .expect("build");
    assert_eq!(
        outcome.root,
        full(tree.path(), &BuildOptions::default()).root
    );
    let why = kept.err().expect("not kept");
    assert!(why.contains("more than 50 entries"), "{why}");

    let roomy = BuildOptions {
        keep_max_entries: 110,
        ..BuildOptions::default()
    };
    let (_, kept) = watched(tree.path(), &roomy, None);
    assert_eq!(kept.entries(), 107);
    for i in 0..5 {
        write(&tree.path().join(format!("d0/more{i}")), b"x");
    }
    let (outcome, kept) = Builder::new(roomy.clone())
        .build_watched(tree.path(), Some(kept))
        .expect("rebuild");
    assert!(outcome.dirs_relisted.is_some());
    assert_eq!(outcome.root, full(tree.path(), &roomy).root);
    assert!(kept.is_err(), "grown past the limit, no longer kept");
}
