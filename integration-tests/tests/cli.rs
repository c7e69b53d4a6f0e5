//! `merklectl hash`, `diff`, `prove` and `verify-proof`, run as the real binary.

use std::{fs, path::Path};

use integration_tests::run_merklectl as merklectl;
use merkle_core::{BuildOptions, Builder};

fn write(path: &Path, content: &[u8]) {
    fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    fs::write(path, content).expect("write");
}

#[test]
fn hash_prints_the_root_and_json_when_asked() {
    let tmp = tempfile::tempdir().expect("tempdir");
    write(&tmp.path().join("a/b.txt"), b"b");
    write(&tmp.path().join("c.log"), b"c");
    let dir = tmp.path().to_str().expect("utf-8");
    let expected = Builder::new(BuildOptions::default())
        .build(tmp.path())
        .expect("build")
        .root;

    let (code, out, err) = merklectl(&["hash", dir]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.trim(), expected.to_hex());
    assert!(
        err.is_empty(),
        "no progress bar when not on a terminal: {err:?}"
    );

    let (code, out, _) = merklectl(&["hash", dir, "--json", "--exclude", "*.log"]);
    assert_eq!(code, Some(0));
    let json: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(json["file_count"], 1);
    assert_eq!(json["skipped_count"], 1);
    assert_ne!(json["root_hash"].as_str(), Some(expected.to_hex().as_str()));

    let (code, _, err) = merklectl(&["hash", "/no/such/dir"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("/no/such/dir"), "{err}");
}

#[test]
fn diff_lists_changes_and_exits_1_when_there_are_some() {
    let old = tempfile::tempdir().expect("tempdir");
    let new = tempfile::tempdir().expect("tempdir");
    for dir in [old.path(), new.path()] {
        write(&dir.join("same"), b"s");
        write(&dir.join("edit"), b"1");
    }
    write(&new.path().join("edit"), b"2");
    write(&new.path().join("added/x"), b"x");
    let (o, n) = (
        old.path().to_str().expect("utf-8"),
        new.path().to_str().expect("utf-8"),
    );

    let (code, out, _) = merklectl(&["diff", o, n]);
    assert_eq!(code, Some(1));
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        vec!["A added", "A added/x", "M edit"]
    );
    let (code, out, _) = merklectl(&["diff", o, o]);
    assert_eq!((code, out.as_str()), (Some(0), ""));
}

#[test]
fn a_proof_verifies_offline_and_a_tampered_one_does_not() {
    let tmp = tempfile::tempdir().expect("tempdir");
    write(&tmp.path().join("etc/passwd"), b"root:x:0:0\n");
    write(&tmp.path().join("etc/hosts"), b"127.0.0.1 localhost\n");
    let dir = tmp.path().to_str().expect("utf-8");
    let root = Builder::new(BuildOptions::default())
        .build(tmp.path())
        .expect("build")
        .root
        .to_hex();

    let (code, proof, err) = merklectl(&["prove", dir, "etc/passwd"]);
    assert_eq!(code, Some(0), "{err}");
    let file = tmp.path().join("proof.json");
    fs::write(&file, &proof).expect("write proof");
    let proof_path = file.to_str().expect("utf-8");
    let content = tmp.path().join("etc/passwd");

    let (code, out, err) = merklectl(&[
        "verify-proof",
        proof_path,
        "--root",
        &root,
        "--content",
        content.to_str().expect("utf-8"),
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("valid: etc/passwd is a file"), "{out}");

    // Another root, a changed entry, or a changed file: refused.
    let (code, _, err) = merklectl(&["verify-proof", proof_path, "--root", &"0".repeat(64)]);
    assert_eq!(code, Some(2));
    assert!(err.contains("not the trusted root"), "{err}");

    let hosts_leaf = merkle_core::digest::file_leaf(b"127.0.0.1 localhost\n").to_hex();
    let tampered = proof.replacen(
        &hosts_leaf,
        &merkle_core::digest::file_leaf(b"evil").to_hex(),
        1,
    );
    assert_ne!(tampered, proof);
    fs::write(&file, tampered).expect("write");
    let (code, _, err) = merklectl(&["verify-proof", proof_path]);
    assert_eq!(code, Some(2));
    assert!(err.contains("does not verify"), "{err}");

    fs::write(&file, &proof).expect("write");
    fs::write(&content, b"root:x:0:0:hacked\n").expect("write");
    let (code, _, err) = merklectl(&[
        "verify-proof",
        proof_path,
        "--content",
        content.to_str().expect("utf-8"),
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("hashes to"), "{err}");
}
