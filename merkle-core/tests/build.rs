//! Builds of real directories: the stat cache, excludes, special files, limits, profiles, and
//! files that change while they are read.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use merkle_core::{BuildError, BuildOptions, Builder, Profile};

fn write(path: &Path, content: &[u8]) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).expect("mkdir");
    }
    fs::write(path, content).expect("write");
}

fn root(dir: &Path, options: BuildOptions) -> merkle_core::BuildOutcome {
    Builder::new(options).build(dir).expect("build")
}

fn cached(cache: &Path) -> BuildOptions {
    BuildOptions {
        stat_cache: Some(cache.to_owned()),
        racy_margin: Duration::from_millis(100),
        ..BuildOptions::default()
    }
}

#[test]
fn incremental_rebuild_reads_only_changed_files() {
    let tree = tempfile::tempdir().expect("tempdir");
    for i in 0..100 {
        write(
            &tree.path().join(format!("d{}/f{i}", i % 7)),
            format!("file {i}").as_bytes(),
        );
    }
    let cache = tempfile::tempdir().expect("tempdir");
    let cache = cache.path().join("stat.cache");
    std::thread::sleep(Duration::from_millis(150));

    let first = root(tree.path(), cached(&cache));
    assert_eq!(first.files_hashed, 100);
    let unchanged = root(tree.path(), cached(&cache));
    assert_eq!(
        unchanged.files_hashed, 0,
        "nothing changed, nothing is read"
    );
    assert_eq!(unchanged.root, first.root);

    write(&tree.path().join("d1/f1"), b"changed");
    write(&tree.path().join("d2/f2"), b"FILE 2"); // same size as before
    fs::set_permissions(tree.path().join("d3/f3"), fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let second = root(tree.path(), cached(&cache));
    assert_eq!(second.files_hashed, 3);
    assert_eq!(second.root, root(tree.path(), BuildOptions::default()).root);
    assert_ne!(second.root, first.root);
}

#[test]
fn files_written_just_before_a_build_are_read_again_next_time() {
    // The racy-git case: a file modified within the timestamp granularity of the scan that
    // cached it might keep an identical stat, so its digest is never trusted from that scan.
    let tree = tempfile::tempdir().expect("tempdir");
    write(&tree.path().join("racy"), b"one");
    let cache = tempfile::tempdir().expect("tempdir");
    let options = BuildOptions {
        stat_cache: Some(cache.path().join("stat.cache")),
        ..BuildOptions::default() // the real 2 s margin
    };
    let first = root(tree.path(), options.clone());
    let second = root(tree.path(), options);
    assert_eq!(first.files_hashed, 1);
    assert_eq!(second.files_hashed, 1, "a racy file is read again");
    assert_eq!(first.root, second.root);
}

#[test]
fn excludes_follow_gitignore_rules_and_count_as_skipped() {
    let tree = tempfile::tempdir().expect("tempdir");
    write(&tree.path().join("keep.txt"), b"k");
    write(&tree.path().join("debug.log"), b"l");
    write(&tree.path().join("important.log"), b"i");
    write(&tree.path().join("target/out.bin"), b"o");
    write(&tree.path().join("src/target"), b"a file named target");
    let all = root(tree.path(), BuildOptions::default());
    let excluded = root(
        tree.path(),
        BuildOptions {
            exclude: vec!["*.log".into(), "!important.log".into(), "target/".into()],
            ..BuildOptions::default()
        },
    );
    assert_ne!(all.root, excluded.root);
    // debug.log and the target/ directory; src/target is a file, which `target/` spares.
    assert_eq!(excluded.stats.skipped_count, 2);
    assert_eq!(excluded.stats.file_count, 3);

    // The same tree without the excluded paths has the same root.
    fs::remove_file(tree.path().join("debug.log")).expect("rm");
    fs::remove_dir_all(tree.path().join("target")).expect("rm -r");
    assert_eq!(
        root(tree.path(), BuildOptions::default()).root,
        excluded.root
    );
}

#[test]
fn bad_pattern_is_named() {
    let tree = tempfile::tempdir().expect("tempdir");
    let err = Builder::new(BuildOptions {
        exclude: vec!["[z-a]".into()],
        ..BuildOptions::default()
    })
    .build(tree.path())
    .expect_err("bad pattern");
    assert!(
        matches!(err, BuildError::BadPattern { ref pattern, .. } if pattern == "[z-a]"),
        "{err}"
    );
}

#[test]
fn sockets_and_fifos_are_skipped_and_counted() {
    let tree = tempfile::tempdir().expect("tempdir");
    write(&tree.path().join("file"), b"x");
    let before = root(tree.path(), BuildOptions::default()).root;
    let _socket = std::os::unix::net::UnixListener::bind(tree.path().join("sock")).expect("socket");
    let status = std::process::Command::new("mkfifo")
        .arg(tree.path().join("fifo"))
        .status()
        .expect("mkfifo");
    assert!(status.success());
    let after = root(tree.path(), BuildOptions::default());
    assert_eq!(after.root, before);
    assert_eq!(after.stats.skipped_count, 2);
}

#[test]
fn limits_on_entries_and_depth_are_enforced() {
    let tree = tempfile::tempdir().expect("tempdir");
    for i in 0..10 {
        write(&tree.path().join(format!("f{i}")), b"x");
    }
    write(&tree.path().join("a/b/c/d/e"), b"deep");
    let err = Builder::new(BuildOptions {
        max_entries: 5,
        ..BuildOptions::default()
    })
    .build(tree.path())
    .expect_err("too many");
    assert!(
        matches!(err, BuildError::TooManyEntries { limit: 5 }),
        "{err}"
    );
    let err = Builder::new(BuildOptions {
        max_depth: 2,
        ..BuildOptions::default()
    })
    .build(tree.path())
    .expect_err("too deep");
    assert!(matches!(err, BuildError::TooDeep { limit: 2, .. }), "{err}");
}

#[test]
fn full_profile_sees_mode_changes_content_profile_does_not() {
    let tree = tempfile::tempdir().expect("tempdir");
    write(&tree.path().join("secret"), b"s");
    fs::set_permissions(
        tree.path().join("secret"),
        fs::Permissions::from_mode(0o600),
    )
    .expect("chmod");
    let full = BuildOptions {
        profile: Profile::Full,
        ..BuildOptions::default()
    };
    let (content_before, full_before) = (
        root(tree.path(), BuildOptions::default()).root,
        root(tree.path(), full.clone()).root,
    );
    assert_ne!(content_before, full_before);
    fs::set_permissions(
        tree.path().join("secret"),
        fs::Permissions::from_mode(0o644),
    )
    .expect("chmod");
    assert_eq!(
        root(tree.path(), BuildOptions::default()).root,
        content_before
    );
    assert_ne!(root(tree.path(), full).root, full_before);
}

#[test]
fn a_file_that_keeps_changing_fails_the_build_naming_it() {
    let tree = tempfile::tempdir().expect("tempdir");
    let hot = tree.path().join("hot.log");
    write(&hot, &vec![b'x'; 32 << 20]);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut f = fs::OpenOptions::new()
                .append(true)
                .open(&hot)
                .expect("open");
            while !stop.load(Ordering::Relaxed) {
                std::io::Write::write_all(&mut f, b"more\n").expect("append");
            }
        });
        // One hashing thread leaves a core to the writer, so it appends during every read.
        let err = Builder::new(BuildOptions {
            threads: 1,
            ..BuildOptions::default()
        })
        .build(tree.path())
        .expect_err("a file changing throughout cannot be hashed consistently");
        stop.store(true, Ordering::Relaxed);
        match err {
            BuildError::Changed { path, attempts } => {
                assert_eq!(path, hot);
                assert_eq!(attempts, 3);
            }
            other => panic!("expected Changed, got {other}"),
        }
    });
}

#[test]
fn a_cancelled_build_stops() {
    let tree = tempfile::tempdir().expect("tempdir");
    write(&tree.path().join("f"), b"x");
    let cancel = AtomicBool::new(true);
    let err = Builder::new(BuildOptions::default())
        .cancel(&cancel)
        .build(tree.path())
        .expect_err("cancelled");
    assert!(matches!(err, BuildError::Cancelled));
}

#[test]
fn missing_path_and_file_path_are_refused() {
    let tree = tempfile::tempdir().expect("tempdir");
    let missing = tree.path().join("nope");
    assert!(matches!(
        Builder::new(BuildOptions::default()).build(&missing),
        Err(BuildError::NotFound(_))
    ));
    write(&tree.path().join("file"), b"x");
    assert!(matches!(
        Builder::new(BuildOptions::default()).build(&tree.path().join("file")),
        Err(BuildError::NotADirectory(_))
    ));
}
