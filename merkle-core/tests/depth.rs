//! The spec's depth limit (section 4.1) at the limit and one past it: a build, a watched
//! rebuild, a diff and a proof of a tree 256 directories deep work on any thread; 257 is refused
//! with an error naming the limit, never a stack overflow. `scripts/test.sh` runs this file in
//! a release build too, where frames are smaller but inlining differs.

use std::{fs, path::Path};

use merkle_core::{
    BuildError, BuildOptions, Builder, DirNode, Entry, EntryKind, MAX_DEPTH, MemTree, Profile,
    diff::{DiffError, diff_all},
    digest::file_leaf,
    proof::{ProofError, prove, split_path},
};

/// `root/d/d/.../d/f`, `depth` directories below `root`.
fn nest(root: &Path, depth: usize, content: &str) {
    let mut dir = root.to_path_buf();
    for _ in 0..depth {
        dir.push("d");
    }
    fs::create_dir_all(&dir).expect("mkdir");
    fs::write(dir.join("f"), content).expect("write");
}

/// A chain of `depth` directories in memory, the file `f` at the bottom.
fn chain(depth: usize, content: &[u8]) -> MemTree {
    let mut nodes = std::collections::HashMap::new();
    let mut node = DirNode {
        entries: vec![Entry {
            name: b"f".to_vec(),
            kind: EntryKind::File,
            hash: file_leaf(content),
            size: content.len() as u64,
            meta: None,
        }],
    };
    let mut hash = node.hash(Profile::Content).expect("hash");
    nodes.insert(hash, node);
    for _ in 0..depth {
        node = DirNode {
            entries: vec![Entry {
                name: b"d".to_vec(),
                kind: EntryKind::Directory,
                hash,
                size: 0,
                meta: None,
            }],
        };
        hash = node.hash(Profile::Content).expect("hash");
        nodes.insert(hash, node);
    }
    MemTree {
        root: hash,
        profile: Profile::Content,
        nodes,
    }
}

fn deep_path(depth: usize) -> Vec<u8> {
    let mut path = b"d/".repeat(depth);
    path.extend_from_slice(b"f");
    path
}

#[test]
fn a_build_at_the_limit_works_on_a_small_stack_and_one_past_it_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let at = dir.path().join("at");
    let past = dir.path().join("past");
    nest(&at, MAX_DEPTH, "x");
    nest(&past, MAX_DEPTH + 1, "x");
    // The hashing threads of a build, and a caller's thread with a small stack.
    let small = std::thread::Builder::new().stack_size(256 * 1024);
    let (at_result, past_result) = small
        .spawn(move || {
            let builder = Builder::new(BuildOptions {
                threads: 2,
                ..BuildOptions::default()
            });
            (
                builder.build(&at).map(|o| o.root),
                builder.build(&past).map(|o| o.root),
            )
        })
        .expect("thread")
        .join()
        .expect("no overflow");
    let root = at_result.expect("256 directories deep is a valid tree");
    assert_eq!(
        root,
        chain(MAX_DEPTH, b"x").root,
        "the root of the spec's tree"
    );
    match past_result {
        Err(BuildError::TooDeep { limit, .. }) => assert_eq!(limit, MAX_DEPTH),
        other => panic!("257 directories deep must be refused, got {other:?}"),
    }
    // A larger max_depth is held to the spec's limit.
    let lax = Builder::new(BuildOptions {
        max_depth: 100_000,
        ..BuildOptions::default()
    });
    assert!(matches!(
        lax.build(&dir.path().join("past")),
        Err(BuildError::TooDeep {
            limit: MAX_DEPTH,
            ..
        })
    ));
}

#[test]
fn a_watched_rebuild_at_the_limit_works() {
    let dir = tempfile::tempdir().expect("tempdir");
    nest(dir.path(), MAX_DEPTH, "one");
    let builder = Builder::new(BuildOptions::default());
    let (_, watched) = builder.build_watched(dir.path(), None).expect("build");
    let watched = watched.expect("watched");
    nest(dir.path(), MAX_DEPTH, "two");
    // Let the events of the write arrive, then rebuild from them.
    std::thread::sleep(std::time::Duration::from_millis(100));
    let (outcome, again) = builder
        .build_watched(dir.path(), Some(watched))
        .expect("rebuild");
    assert_eq!(outcome.root, chain(MAX_DEPTH, b"two").root);
    assert!(again.is_ok(), "still watched: {:?}", again.err());
}

#[test]
fn diffs_and_proofs_stop_at_the_limit() {
    let old = chain(MAX_DEPTH, b"a");
    let new = chain(MAX_DEPTH, b"b");
    let changes = std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(move || diff_all(&old, old.root, &new, new.root))
        .expect("thread")
        .join()
        .expect("no overflow")
        .expect("a diff at the limit");
    assert_eq!(changes.len(), 1, "the file at the bottom: {changes:?}");
    assert_eq!(changes[0].path, deep_path(MAX_DEPTH));

    let (old, new) = (chain(MAX_DEPTH + 1, b"a"), chain(MAX_DEPTH + 1, b"b"));
    match diff_all(&old, old.root, &new, new.root) {
        Err(DiffError::TooDeep(_)) => {}
        other => panic!("a diff past the limit must be refused, got {other:?}"),
    }
    // Added whole: the walk below an added directory stops too.
    let empty = chain(0, b"a");
    assert!(matches!(
        diff_all(&empty, empty.root, &new, new.root),
        Err(DiffError::TooDeep(_))
    ));

    let tree = chain(MAX_DEPTH, b"a");
    let proof = prove(&tree, tree.root, Profile::Content, &deep_path(MAX_DEPTH)).expect("proof");
    assert_eq!(proof.verify().expect("verifies").name, b"f");
    assert!(matches!(
        split_path(&deep_path(MAX_DEPTH + 1)),
        Err(ProofError::BadPath(_))
    ));
    assert!(matches!(split_path(b"a/\0b"), Err(ProofError::BadPath(_))));
}
