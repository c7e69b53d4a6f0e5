//! Property tests of the Merkle core on real directories: random trees are written to disk,
//! built, and checked against an independent model that hashes the same tree in memory.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::unix::fs::PermissionsExt as _,
    path::Path,
    time::Duration,
};

use merkle_core::{
    BuildOptions, Builder, Digest, DirNode, Entry, EntryKind, MemTree, Profile,
    diff::{ChangeType, diff_all, subtrees_visited},
    digest::{file_leaf, symlink_leaf},
    proof::{InclusionProof, prove},
    tree::CollectNodes,
};
use proptest::{collection::btree_map, prelude::*};

/// The model of a tree: what is written to disk.
#[derive(Debug, Clone, PartialEq)]
enum Node {
    File { content: Vec<u8>, exec: bool },
    Link(String),
    Dir(BTreeMap<String, Node>),
}

type Dir = BTreeMap<String, Node>;

fn name() -> impl Strategy<Value = String> {
    // Names that sort interestingly (upper before lower, '.' before letters); never . or ..
    "[aAb][a.b0]{0,2}"
}

fn node() -> impl Strategy<Value = Node> {
    let leaf = prop_oneof![
        4 => (proptest::collection::vec(any::<u8>(), 0..48), any::<bool>())
            .prop_map(|(content, exec)| Node::File { content, exec }),
        1 => "[a-z/.]{1,10}".prop_map(Node::Link),
    ];
    leaf.prop_recursive(3, 40, 5, |inner| {
        btree_map(name(), inner, 0..5).prop_map(Node::Dir)
    })
}

fn tree() -> impl Strategy<Value = Dir> {
    btree_map(name(), node(), 0..6)
}

fn write_dir(path: &Path, dir: &Dir) {
    for (name, node) in dir {
        let p = path.join(name);
        match node {
            Node::File { content, exec } => {
                fs::write(&p, content).expect("write");
                let mode = if *exec { 0o755 } else { 0o644 };
                fs::set_permissions(&p, fs::Permissions::from_mode(mode)).expect("chmod");
            }
            Node::Link(target) => std::os::unix::fs::symlink(target, &p).expect("symlink"),
            Node::Dir(sub) => {
                fs::create_dir(&p).expect("mkdir");
                write_dir(&p, sub);
            }
        }
    }
}

/// An entry's kind and digest by the spec's rules alone (no file system, no builder).
fn model_entry(node: &Node) -> (EntryKind, Digest) {
    match node {
        Node::File { content, exec } => {
            let kind = if *exec {
                EntryKind::Executable
            } else {
                EntryKind::File
            };
            (kind, file_leaf(content))
        }
        Node::Link(target) => (EntryKind::Symlink, symlink_leaf(target.as_bytes())),
        Node::Dir(sub) => (EntryKind::Directory, model_hash(sub)),
    }
}

/// The root by the spec's rules alone, from the model (no file system, no builder).
fn model_hash(dir: &Dir) -> Digest {
    let entries = dir
        .iter()
        .map(|(name, node)| {
            let (kind, hash) = model_entry(node);
            Entry {
                name: name.as_bytes().to_vec(),
                kind,
                hash,
                size: 0,
                meta: None,
            }
        })
        .collect();
    DirNode { entries }
        .hash(Profile::Content)
        .expect("valid model node")
}

fn build(dir: &Path, options: BuildOptions) -> MemTree {
    let sink = CollectNodes::default();
    let outcome = Builder::new(options).sink(&sink).build(dir).expect("build");
    sink.into_tree(outcome.root, outcome.profile)
}

fn on_disk(model: &Dir) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tempdir");
    write_dir(tmp.path(), model);
    tmp
}

/// Every path of the model with its kind group and leaf, for the naive diff.
fn flatten(dir: &Dir, prefix: &str, out: &mut BTreeMap<String, (u8, EntryKind, Digest)>) {
    for (name, node) in dir {
        let path = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}/{name}")
        };
        if let Node::Dir(sub) = node {
            flatten(sub, &path, out);
        }
        let (kind, hash) = model_entry(node);
        out.insert(path, (kind.group(), kind, hash));
    }
}

/// One single change to a tree.
#[derive(Debug, Clone)]
enum Mutation {
    FlipByte(usize),
    ToggleExec,
    Retarget,
    Add(String),
    Remove,
    Rename(String),
    MoveUp,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::FlipByte),
        Just(Mutation::ToggleExec),
        Just(Mutation::Retarget),
        name().prop_map(Mutation::Add),
        Just(Mutation::Remove),
        name().prop_map(Mutation::Rename),
        Just(Mutation::MoveUp),
    ]
}

/// All paths (as component lists) of the model.
fn paths(dir: &Dir, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    for (name, node) in dir {
        prefix.push(name.clone());
        out.push(prefix.clone());
        if let Node::Dir(sub) = node {
            paths(sub, prefix, out);
        }
        prefix.pop();
    }
}

fn dir_at<'a>(root: &'a mut Dir, components: &[String]) -> &'a mut Dir {
    let mut dir = root;
    for c in components {
        dir = match dir.get_mut(c) {
            Some(Node::Dir(sub)) => sub,
            _ => unreachable!("path of a directory"),
        };
    }
    dir
}

/// Applies `m` to the entry at `target` (an index into all paths); returns false when the
/// mutation does not apply there (e.g. ToggleExec on a directory) and nothing changed.
fn apply(root: &mut Dir, target: usize, m: &Mutation) -> bool {
    let mut all = Vec::new();
    paths(root, &mut Vec::new(), &mut all);
    if let Mutation::Add(name) = m {
        // Add into the root or into the directory at `target`.
        let parent: Vec<String> = all
            .get(target % (all.len() + 1))
            .filter(|p| matches!(lookup(root, p), Some(Node::Dir(_))))
            .cloned()
            .unwrap_or_default();
        let dir = dir_at(root, &parent);
        if dir.contains_key(name) {
            return false;
        }
        dir.insert(
            name.clone(),
            Node::File {
                content: b"new".to_vec(),
                exec: false,
            },
        );
        return true;
    }
    if all.is_empty() {
        return false;
    }
    let path = all[target % all.len()].clone();
    let (parent, leaf) = path.split_at(path.len() - 1);
    let dir = dir_at(root, parent);
    match m {
        Mutation::FlipByte(i) => match dir.get_mut(&leaf[0]) {
            Some(Node::File { content, .. }) => {
                if content.is_empty() {
                    content.push(0);
                } else {
                    let i = i % content.len();
                    content[i] ^= 0x01;
                }
                true
            }
            _ => false,
        },
        Mutation::ToggleExec => match dir.get_mut(&leaf[0]) {
            Some(Node::File { exec, .. }) => {
                *exec = !*exec;
                true
            }
            _ => false,
        },
        Mutation::Retarget => match dir.get_mut(&leaf[0]) {
            Some(Node::Link(t)) => {
                t.push('x');
                true
            }
            _ => false,
        },
        Mutation::Remove => dir.remove(&leaf[0]).is_some(),
        Mutation::Rename(new) => {
            if dir.contains_key(new) {
                return false;
            }
            let node = dir.remove(&leaf[0]).expect("exists");
            dir.insert(new.clone(), node);
            true
        }
        Mutation::MoveUp => {
            if parent.is_empty() {
                return false;
            }
            let node = dir.remove(&leaf[0]).expect("exists");
            let grand = dir_at(root, &parent[..parent.len() - 1]);
            // Move next to its parent under a fresh name.
            let new = format!("{}-moved", leaf[0]);
            if grand.contains_key(&new) {
                return false;
            }
            grand.insert(new, node);
            true
        }
        Mutation::Add(_) => unreachable!("handled above"),
    }
}

fn lookup<'a>(root: &'a Dir, path: &[String]) -> Option<&'a Node> {
    let (first, rest) = path.split_first()?;
    let node = root.get(first)?;
    if rest.is_empty() {
        return Some(node);
    }
    match node {
        Node::Dir(sub) => lookup(sub, rest),
        _ => None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn root_matches_the_model_for_any_thread_count(model in tree(), threads in 1usize..5) {
        let disk = on_disk(&model);
        let one = build(disk.path(), BuildOptions { threads: 1, ..BuildOptions::default() });
        let many = build(disk.path(), BuildOptions { threads, ..BuildOptions::default() });
        prop_assert_eq!(one.root, model_hash(&model));
        prop_assert_eq!(many.root, one.root);
        prop_assert_eq!(many.nodes.len(), one.nodes.len());
    }

    #[test]
    fn root_does_not_depend_on_creation_order(model in tree()) {
        // Write the same tree twice, entries created in opposite orders.
        let a = on_disk(&model);
        let b = tempfile::tempdir().expect("tempdir");
        let reversed: Vec<_> = model.iter().rev().collect();
        for (name, node) in reversed {
            let single: Dir = [(name.clone(), node.clone())].into_iter().collect();
            write_dir(b.path(), &single);
        }
        prop_assert_eq!(build(a.path(), BuildOptions::default()).root,
                        build(b.path(), BuildOptions::default()).root);
    }

    #[test]
    fn any_single_change_changes_the_root(model in tree(), target in any::<usize>(), m in mutation()) {
        let mut changed = model.clone();
        prop_assume!(apply(&mut changed, target, &m));
        let before = build(on_disk(&model).path(), BuildOptions::default()).root;
        let after = build(on_disk(&changed).path(), BuildOptions::default()).root;
        prop_assert_ne!(before, after, "{:?} did not change the root", m);
    }

    #[test]
    fn diff_lists_exactly_the_changed_paths(
        model in tree(),
        edits in proptest::collection::vec((any::<usize>(), mutation()), 1..4),
    ) {
        let mut changed = model.clone();
        for (target, m) in &edits {
            apply(&mut changed, *target, m);
        }
        let old = build(on_disk(&model).path(), BuildOptions::default());
        let new = build(on_disk(&changed).path(), BuildOptions::default());
        let changes = diff_all(&old, old.root, &new, new.root).expect("all nodes present");
        // The nodes `subtrees_visited` leads to, level by level, are all a diff reads.
        let mut all = old.nodes.clone();
        all.extend(new.nodes.clone());
        let mut visited = MemTree { root: new.root, profile: Profile::Content, nodes: Default::default() };
        visited.nodes.insert(old.root, all[&old.root].clone());
        visited.nodes.insert(new.root, all[&new.root].clone());
        let mut level = Vec::new();
        if old.root != new.root {
            subtrees_visited(Some(&all[&old.root]), Some(&all[&new.root]), &mut level);
        }
        while !level.is_empty() {
            let mut next = Vec::new();
            for (o, n) in &level {
                for h in o.iter().chain(n.iter()) {
                    visited.nodes.insert(*h, all[h].clone());
                }
                subtrees_visited(o.map(|h| &all[&h]), n.map(|h| &all[&h]), &mut next);
            }
            level = next;
        }
        prop_assert_eq!(&diff_all(&visited, old.root, &visited, new.root).expect("enough nodes"), &changes);
        let got: BTreeSet<(String, ChangeType)> = changes
            .into_iter()
            .map(|c| (String::from_utf8(c.path).expect("utf-8"), c.change))
            .collect();

        let (mut before, mut after) = (BTreeMap::new(), BTreeMap::new());
        flatten(&model, "", &mut before);
        flatten(&changed, "", &mut after);
        let mut want = BTreeSet::new();
        for (path, (group, kind, hash)) in &before {
            match after.get(path) {
                None => { want.insert((path.clone(), ChangeType::Removed)); }
                Some((g, _, _)) if g != group => { want.insert((path.clone(), ChangeType::KindChanged)); }
                Some((_, k, h)) if *kind != EntryKind::Directory && (k != kind || h != hash) => {
                    want.insert((path.clone(), ChangeType::Modified));
                }
                Some(_) => {}
            }
        }
        for path in after.keys().filter(|p| !before.contains_key(*p)) {
            want.insert((path.clone(), ChangeType::Added));
        }
        prop_assert_eq!(got, want);
    }

    #[test]
    fn proofs_verify_and_any_tampering_fails(model in tree(), pick in any::<usize>(), bit in 0u8..8) {
        let disk = on_disk(&model);
        let tree = build(disk.path(), BuildOptions::default());
        let mut all = Vec::new();
        paths(&model, &mut Vec::new(), &mut all);
        prop_assume!(!all.is_empty());
        for path in &all {
            let joined = path.join("/");
            let proof = prove(&tree, tree.root, Profile::Content, joined.as_bytes()).expect("prove");
            let parsed = InclusionProof::from_json(&proof.to_json()).expect("round trip");
            // Sizes are informational and not part of the proof file.
            let mut unsized_proof = proof.clone();
            unsized_proof.nodes.iter_mut().flat_map(|n| &mut n.entries).for_each(|e| e.size = 0);
            prop_assert_eq!(&parsed, &unsized_proof);
            let entry = proof.verify().expect("valid proof");
            prop_assert_eq!(entry.name.as_slice(), path.last().expect("non-empty").as_bytes());
        }

        // Tamper with one bit of one node's entry (name, or hash), or of the root.
        let path = all[pick % all.len()].join("/");
        let proof = prove(&tree, tree.root, Profile::Content, path.as_bytes()).expect("prove");
        let mut tampered = proof.clone();
        let level = pick % tampered.nodes.len();
        let node = &mut tampered.nodes[level];
        if node.entries.is_empty() || pick % 5 == 0 {
            tampered.root.0[(pick / 5) % 32] ^= 1 << bit;
        } else {
            let index = (pick / 7) % node.entries.len();
            let entry = &mut node.entries[index];
            if pick % 2 == 0 {
                entry.hash.0[(pick / 3) % 32] ^= 1 << bit;
            } else {
                let i = (pick / 3) % entry.name.len();
                entry.name[i] ^= 1 << (bit % 7);
            }
        }
        prop_assert!(tampered.verify().is_err(), "tampered proof verified: {:?}", tampered);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn incremental_root_equals_full_root_after_random_edits(
        model in tree(),
        rounds in proptest::collection::vec(proptest::collection::vec((any::<usize>(), mutation()), 1..4), 1..4),
    ) {
        let disk = on_disk(&model);
        let cache_dir = tempfile::tempdir().expect("tempdir");
        let incremental = BuildOptions {
            stat_cache: Some(cache_dir.path().join("stat.cache")),
            racy_margin: Duration::from_millis(20),
            ..BuildOptions::default()
        };
        std::thread::sleep(Duration::from_millis(30));
        build(disk.path(), incremental.clone());
        let mut current = model;
        for edits in rounds {
            for (target, m) in &edits {
                let mut next = current.clone();
                if apply(&mut next, *target, m) {
                    // Rewrite the tree in place: changed files get new content and ctimes.
                    sync_disk(disk.path(), &current, &next);
                    current = next;
                }
            }
            let inc = build(disk.path(), incremental.clone());
            let full = build(disk.path(), BuildOptions::default());
            prop_assert_eq!(inc.root, full.root);
            prop_assert_eq!(full.root, model_hash(&current));
            std::thread::sleep(Duration::from_millis(30));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    /// Rebuilds of a watched tree, right after the edits (no time for timestamps to tell),
    /// give the root of a full build; renames and moves are real renames on disk, so moved
    /// directories keep their watches.
    #[test]
    fn watched_rebuild_equals_full_build_after_random_edits(
        model in tree(),
        rounds in proptest::collection::vec(proptest::collection::vec((any::<usize>(), mutation()), 1..4), 1..5),
        profile in prop_oneof![Just(Profile::Content), Just(Profile::Full)],
    ) {
        let disk = on_disk(&model);
        let options = BuildOptions { profile, ..BuildOptions::default() };
        let (_, watched) = Builder::new(options.clone()).build_watched(disk.path(), None).expect("build");
        let mut watched = Some(watched.expect("the temporary folder can be watched"));
        let mut current = model;
        for edits in rounds {
            for (target, m) in &edits {
                let mut next = current.clone();
                let moved = move_paths(&current, *target, m);
                if apply(&mut next, *target, m) {
                    match moved {
                        Some((from, to)) => fs::rename(disk.path().join(from), disk.path().join(to)).expect("rename"),
                        None => sync_disk(disk.path(), &current, &next),
                    }
                    current = next;
                }
            }
            let sink = CollectNodes::default();
            let (outcome, next) = Builder::new(options.clone())
                .sink(&sink)
                .build_watched(disk.path(), watched.take())
                .expect("rebuild");
            prop_assert!(outcome.dirs_relisted.is_some(), "rebuilt from events, not rescanned: {:?}", outcome.rescan_reason);
            watched = Some(next.expect("still watched"));
            let full_sink = CollectNodes::default();
            let full = Builder::new(options.clone()).sink(&full_sink).build(disk.path()).expect("full build");
            prop_assert_eq!(outcome.root, full.root);
            prop_assert_eq!(outcome.stats, full.stats);
            prop_assert_eq!(outcome.node_count, full.node_count);
            let nodes = sink.into_tree(outcome.root, profile).nodes;
            prop_assert_eq!(nodes, full_sink.into_tree(full.root, profile).nodes);
            if profile == Profile::Content {
                prop_assert_eq!(full.root, model_hash(&current));
            }
        }
    }
}

/// For a rename or a move, the paths it moves between (as `apply` would do it).
fn move_paths(root: &Dir, target: usize, m: &Mutation) -> Option<(String, String)> {
    let mut all = Vec::new();
    paths(root, &mut Vec::new(), &mut all);
    if all.is_empty() {
        return None;
    }
    let path = &all[target % all.len()];
    let (parent, leaf) = path.split_at(path.len() - 1);
    let to = match m {
        Mutation::Rename(new) => [parent, std::slice::from_ref(new)].concat(),
        Mutation::MoveUp if !parent.is_empty() => {
            [&parent[..parent.len() - 1], &[format!("{}-moved", leaf[0])]].concat()
        }
        _ => return None,
    };
    Some((path.join("/"), to.join("/")))
}

/// Makes the directory at `path` go from `old` to `new`, touching only what differs.
fn sync_disk(path: &Path, old: &Dir, new: &Dir) {
    for (name, node) in old {
        if new.get(name) != Some(node) {
            let p = path.join(name);
            match (node, new.get(name)) {
                (Node::Dir(a), Some(Node::Dir(b))) => sync_disk(&p, a, b),
                (Node::Dir(_), _) => fs::remove_dir_all(&p).expect("rm -r"),
                _ => fs::remove_file(&p).expect("rm"),
            }
        }
    }
    for (name, node) in new {
        match (old.get(name), node) {
            (Some(a), b) if a == b => {}
            (Some(Node::Dir(_)), Node::Dir(_)) => {}
            _ => write_dir(path, &[(name.clone(), node.clone())].into_iter().collect()),
        }
    }
}
