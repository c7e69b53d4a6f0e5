//! The test vectors of docs/merkle-spec.md section 9, built on disk and checked against the
//! roots the document gives (the document is read, so the two cannot drift apart).

use std::{
    ffi::OsStr,
    fs,
    os::unix::{ffi::OsStrExt as _, fs::PermissionsExt as _},
    path::Path,
};

use merkle_core::{
    BuildOptions, Builder, DirNode, Entry, EntryKind, Meta, Profile,
    digest::{file_leaf, symlink_leaf},
};

fn write(path: &Path, content: &[u8], mode: u32) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).expect("mkdir");
    }
    fs::write(path, content).expect("write");
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Builds vector `n` (1-6) in `dir`.
fn make_vector(n: usize, dir: &Path) {
    match n {
        1 => {}
        2 => write(&dir.join("hello.txt"), b"hello\n", 0o644),
        3 => write(&dir.join("run.sh"), b"#!/bin/sh\necho hi\n", 0o755),
        4 => std::os::unix::fs::symlink("target/file.txt", dir.join("link")).expect("symlink"),
        5 => {
            write(&dir.join("A"), b"1", 0o644);
            write(&dir.join("a/b/c.txt"), b"c\n", 0o644);
            write(&dir.join("a/d.txt"), b"d\n", 0o644);
            write(&dir.join("b"), b"", 0o644);
            fs::create_dir(dir.join("e")).expect("mkdir e");
        }
        6 => write(&dir.join(OsStr::from_bytes(b"f\xffo")), b"x", 0o644),
        _ => unreachable!(),
    }
}

fn root_of(n: usize) -> String {
    let tmp = tempfile::tempdir().expect("tempdir");
    make_vector(n, tmp.path());
    Builder::new(BuildOptions::default())
        .build(tmp.path())
        .expect("build")
        .root
        .to_hex()
}

/// Vector 7 is `full` profile with uid and gid 1000, which only root could chown on disk: its
/// node is written down directly from the spec.
fn vector_7() -> String {
    DirNode {
        entries: vec![Entry {
            name: b"hello.txt".to_vec(),
            kind: EntryKind::File,
            hash: file_leaf(b"hello\n"),
            size: 6,
            meta: Some(Meta {
                perm: 0o640,
                uid: 1000,
                gid: 1000,
            }),
        }],
    }
    .hash(Profile::Full)
    .expect("valid node")
    .to_hex()
}

/// The value of a `| n | ... | `hash` |` row, or of a "- name: `hash`" line, in the spec.
fn spec_value(key: &str) -> String {
    let spec = fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/merkle-spec.md"
    ))
    .expect("read docs/merkle-spec.md");
    let section = &spec[spec.find("## 9. Test vectors").expect("section 9")..];
    for line in section.lines() {
        let hit = line.starts_with(&format!("| {key} |")) || line.starts_with(&format!("- {key}"));
        if hit {
            let hash = line.rsplit('`').nth(1).expect("a `hash` on the line");
            return hash.to_owned();
        }
    }
    panic!("no test vector {key} in docs/merkle-spec.md");
}

#[test]
fn spec_vectors_match_the_document() {
    let computed: Vec<String> = (1..=6).map(root_of).chain([vector_7()]).collect();
    for (i, root) in computed.iter().enumerate() {
        println!("vector {}: {root}", i + 1);
    }
    for (i, root) in computed.iter().enumerate() {
        assert_eq!(&spec_value(&(i + 1).to_string()), root, "vector {}", i + 1);
    }
}

#[test]
fn intermediate_values_match_the_document() {
    let leaf = file_leaf(b"hello\n").to_hex();
    let link = symlink_leaf(b"target/file.txt").to_hex();
    let ab = DirNode {
        entries: vec![Entry {
            name: b"c.txt".to_vec(),
            kind: EntryKind::File,
            hash: file_leaf(b"c\n"),
            size: 2,
            meta: None,
        }],
    }
    .hash(Profile::Content)
    .expect("valid")
    .to_hex();
    println!("LEAF_HELLO {leaf}\nLEAF_LINK {link}\nNODE_AB {ab}");
    assert_eq!(spec_value("file leaf of"), leaf);
    assert_eq!(spec_value("symlink leaf of"), link);
    assert_eq!(spec_value("node of directory"), ab);
}

#[test]
fn history_vectors_match_the_document() {
    use merkle_core::{
        TreeStats,
        history::{Checkpoint, HEAD, PRUNED, Record, key_id, seal},
    };
    let root = DirNode {
        entries: vec![Entry {
            name: b"hello.txt".to_vec(),
            kind: EntryKind::File,
            hash: file_leaf(b"hello\n"),
            size: 6,
            meta: None,
        }],
    }
    .hash(Profile::Content)
    .expect("valid");
    let stats = TreeStats {
        file_count: 1,
        dir_count: 1,
        symlink_count: 0,
        skipped_count: 0,
        total_bytes: 6,
    };
    let first = Record {
        source: "docs".into(),
        sequence: 1,
        root,
        profile: Profile::Content,
        build_id: "b-1".into(),
        create_time_micros: 1_764_000_000_000_000,
        stats,
        previous: None,
    };
    let second = Record {
        sequence: 2,
        build_id: "b-2".into(),
        create_time_micros: 1_764_000_060_000_000,
        previous: Some(first.hash()),
        ..first.clone()
    };
    let head = Checkpoint {
        kind: HEAD.into(),
        source: "docs".into(),
        sequence: 2,
        record_hash: second.hash(),
        actor: String::new(),
    };
    let pruned = Checkpoint {
        kind: PRUNED.into(),
        source: "docs".into(),
        sequence: 1,
        record_hash: first.hash(),
        actor: "alice (admin)".into(),
    };
    let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
    let signed = seal(&key, &second.hash());
    let signature: String = signed
        .signature
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    println!(
        "record 1 {}\nrecord 2 {}\nhead {}\nkey id {}\nsignature {signature}",
        first.hash(),
        second.hash(),
        head.hash(),
        key_id(&key.verifying_key())
    );
    assert_eq!(spec_value("record 1"), first.hash().to_hex());
    assert_eq!(spec_value("record 2"), second.hash().to_hex());
    assert_eq!(spec_value("head checkpoint"), head.hash().to_hex());
    assert_eq!(spec_value("pruned checkpoint"), pruned.hash().to_hex());
    assert_eq!(spec_value("key id"), key_id(&key.verifying_key()));
    assert_eq!(spec_value("signature of record 2"), signature);
}
