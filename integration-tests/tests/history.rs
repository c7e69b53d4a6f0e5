//! The tamper-evident history end to end: DbSync (the real binary, real PostgreSQL) chains and
//! signs each snapshot record; the real `merklectl verify-history` checks it. The database is
//! then tampered with directly, in each way the issue lists, and the verifier must name the
//! first bad record; key rotation, export and offline verification, pruning, records stored
//! before the history existed, and bad input.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ed25519_dalek::SigningKey;
use integration_tests::{ServingStatus, TestStack, run_merklectl};
use merkle_core::{
    Digest, Profile, TreeStats,
    history::{Record, key_id, seal},
};
use merkle_proto::{
    common::v1::RetentionPolicy,
    dbsync::v1::{
        GetHistoryProofRequest, GetLogCheckpointRequest, GetLogCheckpointResponse,
        GetLogConsistencyProofRequest, GetLogInclusionProofRequest, GetLogTileRequest,
        SetRetentionPolicyRequest, db_sync_service_client::DbSyncServiceClient,
    },
};
use merkle_shared::client::Channel;
use tonic::Code;

type Client = DbSyncServiceClient<Channel>;

/// A key pair as `merklectl up` makes it; returns (private, public) paths.
fn key_pair(dir: &Path) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let private = merklectl::history::ensure_signing_key(dir).expect("key");
    (private, dir.join(merklectl::history::PUBLIC_KEY_FILE))
}

async fn start_db_sync(stack: &mut TestStack, env: &[(&str, String)]) -> (String, Client) {
    if stack.postgres.is_none() {
        stack.start_postgres().await;
    }
    let db_sync = stack.start_service("db-sync", env);
    db_sync.wait_for(ServingStatus::Serving).await;
    let uri = db_sync.uri();
    let client = DbSyncServiceClient::new(merklectl::remote::connect(&uri).expect("channel"));
    (uri, client)
}

/// Stores `count` snapshots of `source`, each a different tree, with the real CLI.
fn push_versions(stack: &TestStack, uri: &str, source: &str, versions: std::ops::Range<u32>) {
    let dir = stack.dir().join(format!("tree-{source}"));
    std::fs::create_dir_all(dir.join("sub")).expect("mkdir");
    for n in versions {
        std::fs::write(dir.join("sub/version"), n.to_string()).expect("write");
        let (code, out, err) =
            run_merklectl(&["push", source, dir.to_str().expect("utf-8"), "--addr", uri]);
        assert_eq!(code, Some(0), "push {n}: {out}{err}");
    }
}

/// `merklectl verify-history` against DbSync at `uri`: (exit code, stdout, stderr).
fn verify(uri: &str, source: &str, extra: &[&str]) -> (Option<i32>, String, String) {
    let mut args = vec!["verify-history", source, "--addr", uri];
    args.extend_from_slice(extra);
    run_merklectl(&args)
}

/// Verification fails, naming `record` and a reason containing `why`.
fn assert_fails_at(uri: &str, trusted: &str, record: u64, why: &str) {
    let (code, out, err) = verify(uri, "docs", &["--trusted-key", trusted]);
    assert_eq!(code, Some(1), "verification must fail: {out}{err}");
    assert!(
        err.contains(&format!("FAILED at record {record}:")) && err.contains(why),
        "expected record {record} ({why}), got: {err}"
    );
}

async fn exec(db: &tokio_postgres::Client, statement: &str) {
    db.batch_execute(statement)
        .await
        .unwrap_or_else(|e| panic!("{statement}: {e}"));
}

/// A record appended at the tail by someone with database access but not the key: correctly
/// chained and hashed, signed with `key`.
async fn forge_record(db: &tokio_postgres::Client, key: &SigningKey) -> u64 {
    let row = db
        .query_one(
            "SELECT sequence, root_hash, record_hash FROM merkle_roots WHERE source = 'docs' \
             ORDER BY sequence DESC LIMIT 1",
            &[],
        )
        .await
        .expect("latest");
    let sequence = row.get::<_, i64>(0) + 1;
    let root: Vec<u8> = row.get(1);
    let previous: Vec<u8> = row.get(2);
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_micros() as i64;
    let record = Record {
        source: "docs".into(),
        sequence: sequence as u64,
        root: Digest(root.clone().try_into().expect("32 bytes")),
        profile: Profile::Content,
        build_id: "forged".into(),
        create_time_micros: micros,
        stats: TreeStats::default(),
        previous: Some(Digest(previous.clone().try_into().expect("32 bytes"))),
    };
    let hash = record.hash();
    let sealed = seal(key, &hash);
    db.execute(
        "INSERT INTO merkle_roots (source, sequence, root_hash, profile, build_id, created_at, \
         file_count, dir_count, symlink_count, skipped_count, total_bytes, \
         previous_record_hash, record_hash, signature, key_id) \
         VALUES ('docs', $1, $2, 1, 'forged', $3, 0, 0, 0, 0, 0, $4, $5, $6, $7)",
        &[
            &sequence,
            &root,
            &(UNIX_EPOCH + Duration::from_micros(micros as u64)),
            &previous,
            &hash.0.as_slice(),
            &sealed.signature.as_slice(),
            &sealed.key_id,
        ],
    )
    .await
    .expect("insert forged record");
    sequence as u64
}

#[tokio::test(flavor = "multi_thread")]
async fn each_kind_of_tampering_is_named_by_verify_history() {
    let mut stack = TestStack::new();
    let (private, public) = key_pair(&stack.dir().join("keys"));
    let trusted = public.to_str().expect("utf-8").to_owned();
    let (uri, _) = start_db_sync(
        &mut stack,
        &[("SIGNING_KEY_FILE", private.display().to_string())],
    )
    .await;
    push_versions(&stack, &uri, "docs", 1..6);

    let (code, out, err) = verify(&uri, "docs", &["--trusted-key", &trusted, "--deep"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("docs: records 1..5 (5) verified"), "{out}");
    assert!(out.contains("reaches the signed head, record 5"), "{out}");
    assert!(
        out.contains("every stored tree hashes to its root"),
        "{out}"
    );
    let (code, out, _) = verify(&uri, "docs", &["--trusted-key", &trusted, "--json"]);
    assert_eq!(code, Some(0));
    let json: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(json["records"], 5);
    assert_eq!(json["unsigned"], 0);

    // Concurrent syncs of one source never fork its chain.
    let pushes: Vec<_> = (0..4)
        .map(|n| {
            let dir = stack.dir().join(format!("race-{n}"));
            std::fs::create_dir_all(&dir).expect("mkdir");
            std::fs::write(dir.join("n"), n.to_string()).expect("write");
            let uri = uri.clone();
            std::thread::spawn(move || {
                run_merklectl(&["push", "race", dir.to_str().expect("utf-8"), "--addr", &uri])
            })
        })
        .collect();
    for push in pushes {
        let (code, out, err) = push.join().expect("push thread");
        assert_eq!(code, Some(0), "{out}{err}");
    }
    let (code, out, err) = verify(&uri, "race", &["--trusted-key", &trusted]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("race: records 1..4 (4) verified"), "{out}");

    // The tampering below edits rows by sequence number: only `docs` stays.
    let db = stack.sql().await;
    exec(
        &db,
        "DELETE FROM merkle_roots WHERE source = 'race'; \
         CREATE TEMP TABLE saved AS SELECT * FROM merkle_roots",
    )
    .await;
    let swap = "UPDATE merkle_roots SET sequence = 1000 WHERE sequence = 2; \
                UPDATE merkle_roots SET sequence = 2 WHERE sequence = 3; \
                UPDATE merkle_roots SET sequence = 3 WHERE sequence = 1000";
    // (what, tampering, its undoing, the record named, why)
    let cases = [
        (
            "a changed root (an existing tree's, so the database accepts it)",
            "UPDATE merkle_roots SET root_hash = \
             (SELECT root_hash FROM merkle_roots WHERE sequence = 1) WHERE sequence = 3",
            "UPDATE merkle_roots r SET root_hash = s.root_hash FROM saved s WHERE r.id = s.id",
            3,
            "a field was changed",
        ),
        (
            "a changed timestamp",
            "UPDATE merkle_roots SET created_at = created_at - interval '1 day' WHERE sequence = 2",
            "UPDATE merkle_roots r SET created_at = s.created_at FROM saved s WHERE r.id = s.id",
            2,
            "a field was changed",
        ),
        (
            "two records swapped",
            swap,
            swap,
            2,
            "it does not link to record 1",
        ),
    ];
    for (what, tamper, undo, record, why) in cases {
        exec(&db, tamper).await;
        eprintln!("tampered: {what}");
        assert_fails_at(&uri, &trusted, record, why);
        exec(&db, undo).await;
    }
    let (code, out, err) = verify(&uri, "docs", &["--trusted-key", &trusted]);
    assert_eq!(code, Some(0), "restored: {out}{err}");

    // A record inserted with a forged signature (the real key's id, a signature by another).
    let mut forger = SigningKey::from_bytes(&[9; 32]);
    let sequence = forge_record(&db, &forger).await;
    let real_id = key_id(&signing_key(&private).verifying_key());
    exec(
        &db,
        &format!("UPDATE merkle_roots SET key_id = '{real_id}' WHERE sequence = {sequence}"),
    )
    .await;
    assert_fails_at(&uri, &trusted, sequence, "does not verify");
    exec(
        &db,
        &format!("DELETE FROM merkle_roots WHERE sequence = {sequence}"),
    )
    .await;
    // A record signed by a key the verifier does not trust.
    forger = SigningKey::from_bytes(&[10; 32]);
    let sequence = forge_record(&db, &forger).await;
    assert_fails_at(
        &uri,
        &trusted,
        sequence,
        &format!(
            "signed by key {}, which is not trusted",
            key_id(&forger.verifying_key())
        ),
    );
    exec(
        &db,
        &format!("DELETE FROM merkle_roots WHERE sequence = {sequence}"),
    )
    .await;

    // --deep: a stored tree that no longer hashes to its root (read by a DbSync that keeps no
    // nodes in memory, so it reads the corrupted rows).
    exec(
        &db,
        "UPDATE merkle_tree_data SET encoded = encoded || '\\x00'::bytea \
         WHERE hash NOT IN (SELECT root_hash FROM merkle_roots)",
    )
    .await;
    let (cold, _) = start_db_sync(&mut stack, &[("NODE_CACHE_BYTES", "0".into())]).await;
    let (code, _, err) = verify(&cold, "docs", &["--trusted-key", &trusted, "--deep"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("FAILED at record 1: its stored tree") && err.contains("DataLoss"),
        "{err}"
    );

    // A truncated tail: the signed head names a newer record than the records reach.
    exec(&db, "DELETE FROM merkle_roots WHERE sequence = 5").await;
    assert_fails_at(&uri, &trusted, 5, "the tail was truncated");
    // A deleted record.
    exec(&db, "DELETE FROM merkle_roots WHERE sequence = 3").await;
    assert_fails_at(&uri, &trusted, 4, "record 3 is missing");
}

#[tokio::test(flavor = "multi_thread")]
async fn rotated_keys_exports_pruning_and_records_older_than_the_history_verify() {
    let mut stack = TestStack::new();
    let (old_private, old_public) = key_pair(&stack.dir().join("old"));
    let (new_private, new_public) = key_pair(&stack.dir().join("new"));
    let (uri, _) = start_db_sync(
        &mut stack,
        &[("SIGNING_KEY_FILE", old_private.display().to_string())],
    )
    .await;
    push_versions(&stack, &uri, "docs", 1..3);
    // Records stored before the history existed: their chain columns are empty.
    let db = stack.sql().await;
    exec(
        &db,
        "UPDATE merkle_roots SET previous_record_hash = NULL, record_hash = NULL, \
         signature = NULL, key_id = NULL; DELETE FROM merkle_history_checkpoints",
    )
    .await;

    // Rotation: the new key signs, the old one is still published.
    stack
        .service_mut("db-sync")
        .process
        .stop(Duration::from_secs(10));
    let (uri, mut client) = start_db_sync(
        &mut stack,
        &[
            ("SIGNING_KEY_FILE", new_private.display().to_string()),
            ("PREVIOUS_PUBLIC_KEYS", old_public.display().to_string()),
        ],
    )
    .await;
    push_versions(&stack, &uri, "docs", 3..5);
    let (old, new) = (
        old_public.to_str().expect("p"),
        new_public.to_str().expect("p"),
    );
    let (code, out, err) = verify(&uri, "docs", &["--trusted-key", old, "--trusted-key", new]);
    assert_eq!(code, Some(0), "{out}{err}");
    let new_id = key_id(&signing_key(&new_private).verifying_key());
    assert!(
        out.contains(&format!("4 signed by key {new_id}")),
        "the older records were chained and signed at start by the new key: {out}"
    );
    let answer = client
        .get_history_proof(GetHistoryProofRequest {
            source: "docs".into(),
            ..Default::default()
        })
        .await
        .expect("proof")
        .into_inner();
    assert_eq!(answer.public_keys.len(), 2, "current and previous keys");
    assert!(answer.signing);
    assert_eq!(answer.head.expect("head").sequence, 4);
    // A record under the old key only: sign record 1 again with it, as before the rotation.
    let old_key = signing_key(&old_private);
    let row = db
        .query_one(
            "SELECT record_hash FROM merkle_roots WHERE sequence = 1",
            &[],
        )
        .await
        .expect("record 1");
    let hash = Digest(row.get::<_, Vec<u8>>(0).try_into().expect("32 bytes"));
    let sealed = seal(&old_key, &hash);
    db.execute(
        "UPDATE merkle_roots SET signature = $1, key_id = $2 WHERE sequence = 1",
        &[&sealed.signature.as_slice(), &sealed.key_id],
    )
    .await
    .expect("re-sign");
    let (code, out, err) = verify(&uri, "docs", &["--trusted-key", old, "--trusted-key", new]);
    assert_eq!(code, Some(0), "both keys trusted: {out}{err}");
    let (code, _, err) = verify(&uri, "docs", &["--trusted-key", new]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("record 1:") && err.contains("not trusted"),
        "{err}"
    );

    // Export, then verify with no server at all.
    let (code, exported, err) = run_merklectl(&["export-history", "docs", "--addr", &uri]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(exported.lines().count(), 5, "a header and four records");
    let file = stack.dir().join("docs.jsonl");
    std::fs::write(&file, &exported).expect("write");
    stack
        .service_mut("db-sync")
        .process
        .stop(Duration::from_secs(10));
    let file_arg = file.to_str().expect("utf-8");
    let verify_file = || {
        run_merklectl(&[
            "verify-history",
            "--file",
            file_arg,
            "--trusted-key",
            old,
            "--trusted-key",
            new,
        ])
    };
    let (code, out, err) = verify_file();
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("records 1..4 (4) verified"), "{out}");
    // Record 2's build id changed in the file.
    let mut lines: Vec<String> = exported.lines().map(str::to_owned).collect();
    lines[2] = lines[2].replacen("\"build_id\":\"", "\"build_id\":\"x", 1);
    std::fs::write(&file, lines.join("\n")).expect("write");
    let (code, _, err) = verify_file();
    assert_eq!(code, Some(1));
    assert!(err.contains("FAILED at record 2:"), "{err}");

    // Pruning leaves a signed checkpoint that verification starts from.
    let (uri, mut client) = start_db_sync(
        &mut stack,
        &[("SIGNING_KEY_FILE", new_private.display().to_string())],
    )
    .await;
    client
        .set_retention_policy(SetRetentionPolicyRequest {
            source: "docs".into(),
            policy: Some(RetentionPolicy {
                keep_last: 2,
                ..Default::default()
            }),
        })
        .await
        .expect("retention");
    let (code, out, err) = verify(&uri, "docs", &["--trusted-key", new]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("records 3..4 (2) verified"), "{out}");
    assert!(out.contains("starts after record 2"), "{out}");
    // A forged start: the pruning checkpoint's record hash changed.
    exec(
        &db,
        "UPDATE merkle_history_checkpoints SET record_hash = sha256(record_hash) WHERE kind = 'pruned'",
    )
    .await;
    let (code, _, err) = verify(&uri, "docs", &["--trusted-key", new]);
    assert_eq!(code, Some(1));
    assert!(err.contains("FAILED at the pruning checkpoint"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn unsigned_history_bad_ranges_and_bad_keys() {
    let mut stack = TestStack::new();
    let (uri, mut client) = start_db_sync(&mut stack, &[]).await;
    push_versions(&stack, &uri, "docs", 1..4);
    // No key: the records are chained, the answer says unsigned.
    let empty = stack.dir().join("no-keys");
    let data_dir = empty.to_str().expect("utf-8");
    let (code, _, err) = verify(&uri, "docs", &["--data-dir", data_dir]);
    assert_eq!(code, Some(2));
    assert!(err.contains("no trusted key"), "{err}");
    let (code, out, err) = verify(&uri, "docs", &["--data-dir", data_dir, "--allow-unsigned"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("3 unsigned"), "{out}");
    let (_, public) = key_pair(&stack.dir().join("k"));
    let (code, _, err) = verify(
        &uri,
        "docs",
        &["--trusted-key", public.to_str().expect("p")],
    );
    assert_eq!(code, Some(1));
    assert!(
        err.contains("record 1: it is not signed") && err.contains("--allow-unsigned"),
        "{err}"
    );

    let call = |from: u64, to: u64, page_size: u32, source: &str| GetHistoryProofRequest {
        source: source.into(),
        from_sequence: from,
        to_sequence: to,
        page_size,
        page_token: String::new(),
    };
    let status = client
        .get_history_proof(call(0, 0, 0, "nothing"))
        .await
        .expect_err("unknown source");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    for (request, field) in [
        (call(3, 2, 0, "docs"), "from_sequence"),
        (call(1, 9, 0, "docs"), "to_sequence"),
        (call(0, 0, 10_001, "docs"), "page_size"),
        (call(0, 0, 0, "Bad Name"), "source"),
    ] {
        let status = client
            .get_history_proof(request)
            .await
            .expect_err("bad request");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(field), "{field}: {status:?}");
    }
    // Pages: one record each, the range pinned by the token.
    let mut token = String::new();
    let mut sequences = Vec::new();
    loop {
        let page = client
            .get_history_proof(GetHistoryProofRequest {
                page_size: 1,
                page_token: token,
                ..call(0, 0, 1, "docs")
            })
            .await
            .expect("page")
            .into_inner();
        sequences.extend(page.records.iter().map(|r| r.sequence));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(sequences, [1, 2, 3]);

    // A key file that is not an Ed25519 key: DbSync refuses to start, naming the setting.
    let bad = stack.dir().join("bad.pem");
    std::fs::write(
        &bad,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .expect("write");
    let text = stack.start_refused(
        "db-sync",
        &[("SIGNING_KEY_FILE", bad.display().to_string())],
    );
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("SIGNING_KEY_FILE"))
        .collect();
    assert_eq!(errors.len(), 1, "one line naming the setting: {text}");
    assert!(errors[0].contains("not an Ed25519 private key"), "{text}");

    // A key readable by others: a warning, and DbSync serves.
    let (private, _) = key_pair(&stack.dir().join("open"));
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    start_db_sync(
        &mut stack,
        &[("SIGNING_KEY_FILE", private.display().to_string())],
    )
    .await;
    let log = stack.service_mut("db-sync").log.clone();
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(
        text.contains("readable by others than its owner") && text.contains("644"),
        "{text}"
    );
}

/// The signing key in the PKCS#8 file `merklectl up` writes.
fn signing_key(path: &Path) -> SigningKey {
    use ed25519_dalek::pkcs8::DecodePrivateKey as _;
    SigningKey::from_pkcs8_pem(&std::fs::read_to_string(path).expect("key")).expect("pem")
}

/// The newest log checkpoint once it covers `size` leaves (within 10 s).
async fn checkpoint_of(c: &mut Client, size: u64) -> GetLogCheckpointResponse {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match c
            .get_log_checkpoint(GetLogCheckpointRequest::default())
            .await
        {
            Ok(r) if r.get_ref().size >= size => return r.into_inner(),
            Ok(_) | Err(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("no checkpoint of {size} leaves: {other:?}"),
        }
    }
}

/// Runs `integration-tests/go/tlog-check` (built once per test folder with Debian's Go and
/// golang.org/x/mod, offline): (success, what it printed).
fn tlog_check(dir: &Path, args: &[&str]) -> (bool, String) {
    let source = integration_tests::workspace_root().join("integration-tests/go/tlog-check");
    let binary = dir.join("tlog-check");
    if !binary.exists() {
        let built = std::process::Command::new("go")
            .args(["build", "-o"])
            .arg(&binary)
            .arg(".")
            .current_dir(&source)
            .env("GO111MODULE", "off")
            .env("GOPATH", "/usr/share/gocode")
            .env("GOCACHE", dir.join("go-cache"))
            .env("GOFLAGS", "")
            .output()
            .expect("go (scripts/install-deps.sh installs golang-go)");
        assert!(
            built.status.success(),
            "go build: {}",
            String::from_utf8_lossy(&built.stderr)
        );
    }
    let out = std::process::Command::new(&binary)
        .args(args)
        .output()
        .expect("tlog-check");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// A plain HTTP/1.1 GET on loopback: (status, body).
async fn http_get(addr: &str, path: &str) -> (u16, Vec<u8>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("send");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.expect("read");
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("headers");
    let head = String::from_utf8_lossy(&answer[..split]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (status, answer[split + 4..].to_vec())
}

/// An implementation of the formats that is not ours checks our log: Go's sumdb/note verifies
/// the checkpoints' signatures and sumdb/tlog an inclusion and a consistency proof (built from
/// Debian's golang-go and golang-golang-x-mod-dev, offline).
#[tokio::test(flavor = "multi_thread")]
async fn the_transparency_log_verifies_with_gos_sumdb_note_and_tlog() {
    let mut stack = TestStack::new();
    let (private, _) = key_pair(&stack.dir().join("keys"));
    let tiles_addr = format!(
        "127.0.0.1:{}",
        merklectl::stack::free_port().expect("a free port")
    );
    let (uri, mut c) = start_db_sync(
        &mut stack,
        &[
            ("SIGNING_KEY_FILE", private.display().to_string()),
            ("LOG_ORIGIN", "merkle-mesh.test/log".into()),
            ("LOG_INTERVAL", "100ms".into()),
            ("LOG_LISTEN_ADDR", tiles_addr.clone()),
        ],
    )
    .await;
    push_versions(&stack, &uri, "docs", 0..3);
    let old = checkpoint_of(&mut c, 3).await;
    assert_eq!((old.size, old.log_size), (3, 3));
    assert!(
        old.note.starts_with("merkle-mesh.test/log\n3\n"),
        "{}",
        old.note
    );
    assert!(
        old.verifier_key.starts_with("merkle-mesh.test/log+"),
        "{}",
        old.verifier_key
    );
    push_versions(&stack, &uri, "site", 0..4);
    let new = checkpoint_of(&mut c, 7).await;
    assert_eq!(new.size, 7);

    // Leaf 1 is docs' second record: the record hash its snapshot carries.
    let inclusion = c
        .get_log_inclusion_proof(GetLogInclusionProofRequest {
            source: "docs".into(),
            sequence: 2,
            ..Default::default()
        })
        .await
        .expect("inclusion")
        .into_inner();
    let history = c
        .get_history_proof(GetHistoryProofRequest {
            source: "docs".into(),
            ..Default::default()
        })
        .await
        .expect("history")
        .into_inner();
    assert_eq!(
        (
            inclusion.leaf_index,
            inclusion.tree_size,
            &inclusion.record_hash
        ),
        (1, 7, &history.records[1].record_hash)
    );
    let consistency = c
        .get_log_consistency_proof(GetLogConsistencyProofRequest {
            old_size: 3,
            new_size: 0,
        })
        .await
        .expect("consistency")
        .into_inner();
    assert_eq!((consistency.old_size, consistency.new_size), (3, 7));

    let go_check = |input: &serde_json::Value| {
        let file = stack.dir().join("tlog-check.json");
        std::fs::write(&file, input.to_string()).expect("write");
        tlog_check(stack.dir(), &["proofs", file.to_str().expect("utf-8")])
    };
    let input = serde_json::json!({
        "verifier_key": old.verifier_key,
        "origin": "merkle-mesh.test/log",
        "old_note": old.note,
        "note": new.note,
        "leaf_index": inclusion.leaf_index,
        "record_hash": inclusion.record_hash,
        "inclusion": inclusion.hashes,
        "consistency": consistency.hashes,
    });
    let (ok, said) = go_check(&input);
    assert!(
        ok && said.starts_with("ok: checkpoints of 3 and 7 leaves"),
        "{said}"
    );
    // And Go refuses what does not hold: another record at that leaf, another key of the name.
    let mut wrong = input.clone();
    wrong["record_hash"] = serde_json::json!(history.records[0].record_hash);
    let (ok, said) = go_check(&wrong);
    assert!(!ok && said.contains("inclusion of leaf 1"), "{said}");
    let mut wrong = input.clone();
    let impostor = SigningKey::from_bytes(&[7; 32]).verifying_key();
    wrong["verifier_key"] = serde_json::json!(signed_note::new_ed25519_verifier_key(
        "merkle-mesh.test/log",
        &impostor
    ));
    let (ok, said) = go_check(&wrong);
    assert!(!ok && said.contains("older checkpoint"), "{said}");

    // merklectl checks the same proofs, and the checkpoints' signatures with the pinned key.
    let key = old.verifier_key.as_str();
    let (code, out, err) = run_merklectl(&[
        "log",
        "prove",
        "docs@2",
        "--addr",
        &uri,
        "--verifier-key",
        key,
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("docs@2")
            && out.contains("is leaf 1 of the log's 7 leaves")
            && out.contains("signature verified"),
        "{out}"
    );
    let (code, out, err) = run_merklectl(&[
        "log",
        "consistency",
        "3",
        "--addr",
        &uri,
        "--verifier-key",
        key,
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.starts_with("the log of 3 leaves"), "{out}");
    let impostor_key = wrong["verifier_key"].as_str().expect("a key").to_owned();
    let (code, _, err) = run_merklectl(&[
        "log",
        "checkpoint",
        "--addr",
        &uri,
        "--verifier-key",
        &impostor_key,
    ]);
    assert!(
        code == Some(2) && err.contains("does not verify with --verifier-key"),
        "{err}"
    );

    // Retention never rewrites the log: docs' pruned records keep their leaves and proofs.
    c.set_retention_policy(SetRetentionPolicyRequest {
        source: "docs".into(),
        policy: Some(RetentionPolicy {
            keep_last: 1,
            ..Default::default()
        }),
    })
    .await
    .expect("retention");
    let again = c
        .get_log_inclusion_proof(GetLogInclusionProofRequest {
            source: "docs".into(),
            sequence: 2,
            tree_size: 7,
            ..Default::default()
        })
        .await
        .expect("a pruned record's leaf")
        .into_inner();
    assert_eq!(again.hashes, inclusion.hashes);
    let same = c
        .get_log_checkpoint(GetLogCheckpointRequest { size: 7 })
        .await
        .expect("checkpoint 7")
        .into_inner();
    assert_eq!(same.root_hash, new.root_hash);

    // Bad positions name the field and the rule.
    for (result, code, start) in [
        (
            c.get_log_inclusion_proof(GetLogInclusionProofRequest {
                leaf_index: 2,
                tree_size: 100,
                ..Default::default()
            })
            .await,
            Code::OutOfRange,
            "tree_size: 100 is past the log's 7 leaves",
        ),
        (
            c.get_log_inclusion_proof(GetLogInclusionProofRequest {
                leaf_index: 7,
                ..Default::default()
            })
            .await,
            Code::OutOfRange,
            "leaf_index: 7 is past the log's leaves",
        ),
        (
            c.get_log_inclusion_proof(GetLogInclusionProofRequest {
                leaf_index: 5,
                tree_size: 3,
                ..Default::default()
            })
            .await,
            Code::OutOfRange,
            "tree_size: the leaf 5 is not in a tree of 3 leaves",
        ),
        (
            c.get_log_inclusion_proof(GetLogInclusionProofRequest {
                source: "docs".into(),
                sequence: 99,
                ..Default::default()
            })
            .await,
            Code::NotFound,
            "sequence: docs's record 99 is not in the transparency log",
        ),
    ] {
        let err = result.expect_err(start);
        assert_eq!(err.code(), code, "{}", err.message());
        assert!(err.message().starts_with(start), "{}", err.message());
    }
    for (result, code, start) in [
        (
            c.get_log_consistency_proof(GetLogConsistencyProofRequest {
                old_size: 0,
                new_size: 7,
            })
            .await,
            Code::InvalidArgument,
            "old_size: must be at least 1",
        ),
        (
            c.get_log_consistency_proof(GetLogConsistencyProofRequest {
                old_size: 5,
                new_size: 3,
            })
            .await,
            Code::InvalidArgument,
            "old_size: 5 is more than new_size (3)",
        ),
        (
            c.get_log_consistency_proof(GetLogConsistencyProofRequest {
                old_size: 1,
                new_size: 100,
            })
            .await,
            Code::OutOfRange,
            "new_size: 100 is past the log's 7 leaves",
        ),
    ] {
        let err = result.expect_err(start);
        assert_eq!(err.code(), code, "{}", err.message());
        assert!(err.message().starts_with(start), "{}", err.message());
    }
    let err = c
        .get_log_checkpoint(GetLogCheckpointRequest { size: 1000 })
        .await
        .expect_err("no such checkpoint");
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message()
            .starts_with("size: no checkpoint has 1000 leaves")
    );

    // Tiles: more leaves than a tile holds (600 more records, queued as a sync would).
    let db = stack.sql().await;
    exec(
        &db,
        "INSERT INTO merkle_log_pending (snapshot_id, source, sequence, record_hash) \
         SELECT 10000000 + i, 'bulk', i + 1, sha256(int8send(i)) FROM generate_series(0, 599) i",
    )
    .await;
    let big = checkpoint_of(&mut c, 607).await;
    assert_eq!(big.size, 607);
    let (status, body) = http_get(&tiles_addr, "/checkpoint").await;
    assert_eq!(
        (status, String::from_utf8_lossy(&body)),
        (200, big.note.clone().into())
    );
    let (status, body) = http_get(&tiles_addr, "/tile/0/001").await;
    assert_eq!((status, body.len()), (200, 256 * 32));
    let (status, body) = http_get(&tiles_addr, "/tile/entries/002.p/95").await;
    assert_eq!((status, body.len()), (200, 95 * 34));
    let (status, _) = http_get(&tiles_addr, "/tile/0/003").await;
    assert_eq!(status, 404, "a tile past the checkpoint");
    let (status, _) = http_get(&tiles_addr, "/tile/0/../../etc").await;
    assert_eq!(status, 404);
    let tile = c
        .get_log_tile(GetLogTileRequest {
            path: "tile/1/000.p/2".into(),
        })
        .await
        .expect("a level-1 tile")
        .into_inner();
    assert_eq!((tile.data.len(), tile.immutable), (64, false));
    let err = c
        .get_log_tile(GetLogTileRequest {
            path: "tile/x".into(),
        })
        .await
        .expect_err("not a tile path");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .starts_with("path: \"tile/x\" is not a tlog-tiles path")
    );

    // Exported to a directory, Go's TileHashReader checks every tile against the checkpoint.
    let export = stack.dir().join("exported-log");
    let export_arg = export.to_str().expect("utf-8").to_owned();
    let (code, out, err) = run_merklectl(&[
        "export-log",
        &export_arg,
        "--addr",
        &uri,
        "--verifier-key",
        key,
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("the log of 607 leaves"), "{out}");
    let (ok, said) = tlog_check(stack.dir(), &["tiles", &export_arg, key]);
    assert!(ok && said.starts_with("ok: 607 leaves in tiles"), "{said}");
    // An altered exported tile is caught, by Go and by the next export (full tiles are kept).
    let tile_file = export.join("tile/0/001");
    let mut bytes = std::fs::read(&tile_file).expect("tile");
    bytes[5] ^= 1;
    std::fs::write(&tile_file, &bytes).expect("tamper");
    let (ok, said) = tlog_check(stack.dir(), &["tiles", &export_arg, key]);
    assert!(!ok, "an altered tile passed: {said}");
    let (code, _, err) = run_merklectl(&["export-log", &export_arg, "--addr", &uri]);
    assert!(
        code == Some(2) && err.contains("tile/0/001: its hashes are not the entries'"),
        "{err}"
    );
    // A leaf altered in PostgreSQL no longer matches the signed tree.
    exec(
        &db,
        "UPDATE merkle_log_leaves SET record_hash = sha256('forged') WHERE index = 3",
    )
    .await;
    let fresh = stack.dir().join("exported-again");
    let (code, _, err) =
        run_merklectl(&["export-log", fresh.to_str().expect("utf-8"), "--addr", &uri]);
    assert!(
        code == Some(2) && err.contains("do not hash to the checkpoint's root"),
        "{err}"
    );
}

/// DbSync with a signing key, taking records into its log every 100 ms.
async fn start_logged(stack: &mut TestStack) -> (String, Client) {
    let (private, _) = key_pair(&stack.dir().join("keys"));
    start_db_sync(
        stack,
        &[
            ("SIGNING_KEY_FILE", private.display().to_string()),
            ("LOG_INTERVAL", "100ms".into()),
        ],
    )
    .await
}

/// `merklectl log verify` keeps the last checkpoint it saw: a log rewritten and signed again
/// with DbSync's real key, or cut short, is caught on the next run (trust on first use).
#[tokio::test(flavor = "multi_thread")]
async fn the_log_client_state_catches_a_rewritten_log_even_when_validly_signed() {
    let mut stack = TestStack::new();
    let (uri, mut c) = start_logged(&mut stack).await;
    let state = stack.dir().join("log-state.json");
    let state_arg = state.to_str().expect("utf-8").to_owned();
    let verify = || run_merklectl(&["log", "verify", "--state", &state_arg, "--addr", &uri]);
    push_versions(&stack, &uri, "docs", 0..3);
    let first = checkpoint_of(&mut c, 3).await;
    let (code, out, err) = verify();
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        err.contains("trusting on first use") && out.contains("the log has 3 leaves"),
        "{out}{err}"
    );
    push_versions(&stack, &uri, "docs", 3..5);
    checkpoint_of(&mut c, 5).await;
    let (code, out, err) = verify();
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("3 leaves seen before, 5 now"), "{out}");
    // verify-history --log: the chain, and its last record in the log seen before.
    let public = key_pair(&stack.dir().join("keys")).1;
    let public = public.to_str().expect("utf-8").to_owned();
    let history_with_log = || {
        run_merklectl(&[
            "verify-history",
            "docs",
            "--addr",
            &uri,
            "--trusted-key",
            &public,
            "--log",
            "--log-state",
            &state_arg,
        ])
    };
    let (code, out, err) = history_with_log();
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("record 5 is leaf 4 of the transparency log's checkpoint of 5 leaves")
            && out.contains("the last in the transparency log (which stands for their signatures)"),
        "{out}"
    );
    // The log stands for the records' signatures, not for their hashes and links: a field
    // altered in an earlier record is still caught, while a signature altered need not be
    // (the log's proof of record 5 fixes record 3 through the chain).
    let db = stack.sql().await;
    let original = db
        .query_one(
            "SELECT build_id, signature FROM merkle_roots WHERE source = 'docs' AND sequence = 3",
            &[],
        )
        .await
        .expect("record 3");
    let (build_id, signature): (String, Vec<u8>) = (original.get(0), original.get(1));
    exec(
        &db,
        "UPDATE merkle_roots SET signature = set_byte(signature, 0, get_byte(signature, 0) # 1) \
         WHERE source = 'docs' AND sequence = 3",
    )
    .await;
    let (code, out, err) = history_with_log();
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, _, err) = self::verify(&uri, "docs", &["--trusted-key", &public]);
    assert_eq!(
        code,
        Some(1),
        "without --log the signature is checked: {err}"
    );
    exec(
        &db,
        "UPDATE merkle_roots SET build_id = 'forged' WHERE source = 'docs' AND sequence = 3",
    )
    .await;
    let (code, out, err) = history_with_log();
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        err.contains("FAILED at record 3:") && err.contains("a field was changed"),
        "{err}"
    );
    db.execute(
        "UPDATE merkle_roots SET build_id = $1, signature = $2 WHERE source = 'docs' AND sequence = 3",
        &[&build_id, &signature],
    )
    .await
    .expect("restore record 3");

    // Someone with the database rewrites the log (the same records in another order) and
    // DbSync signs it again with its real key: the checkpoint verifies, the history does not.
    let db = stack.sql().await;
    exec(&db, &rewrite_log(5)).await;
    let forged = checkpoint_of(&mut c, 5).await;
    assert_ne!(forged.root_hash, first.root_hash);
    let (code, out, err) = history_with_log();
    assert_eq!(
        code,
        Some(1),
        "the history checks out, the log does not: {out}{err}"
    );
    assert!(
        err.contains("verification FAILED at the transparency log: the checkpoint of 5 leaves"),
        "{err}"
    );
    let (code, out, err) = verify();
    assert_eq!(code, Some(1), "a rewritten log must fail: {out}{err}");
    assert!(
        err.contains("log verification FAILED: the checkpoint of 5 leaves has root")
            && err.contains("rewritten"),
        "{err}"
    );
    // Cut short: fewer leaves than seen.
    exec(&db, &rewrite_log(3)).await;
    checkpoint_of(&mut c, 3).await;
    let (code, _, err) = verify();
    assert_eq!(code, Some(1));
    assert!(err.contains("fewer than the 5"), "{err}");
    // A key the log was never signed with.
    let impostor = signed_note::new_ed25519_verifier_key(
        &first.origin,
        &SigningKey::from_bytes(&[9; 32]).verifying_key(),
    );
    let (code, _, err) = run_merklectl(&[
        "log",
        "verify",
        "--state",
        stack.dir().join("other.json").to_str().expect("utf-8"),
        "--addr",
        &uri,
        "--verifier-key",
        &impostor,
    ]);
    assert_eq!(code, Some(1));
    assert!(err.contains("does not verify with --verifier-key"), "{err}");
}

/// A plain HTTP/1.1 POST on loopback: (status, body).
async fn http_post(url: &str, path: &str, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let addr = url.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.expect("read");
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, rest) = answer.split_once("\r\n\r\n").expect("headers");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (status, rest.to_owned())
}

/// The C2SP tlog-witness request: `old`, the proof (hex from DbSync, base64 on the wire), the note.
fn add_checkpoint_body(old: u64, proof: &[String], note: &str) -> String {
    use base64::Engine as _;
    let mut body = format!("old {old}\n");
    for hash in proof {
        let digest: Digest = hash.parse().expect("hex");
        body.push_str(&base64::engine::general_purpose::STANDARD.encode(digest.0));
        body.push('\n');
    }
    body.push('\n');
    body.push_str(note);
    body
}

/// Asks DbSync for the consistency proof from `old` to `checkpoint`'s size (none from 0) and
/// submits both to the witness at `url`: (status, body).
async fn submit(
    c: &mut Client,
    url: &str,
    old: u64,
    checkpoint: &GetLogCheckpointResponse,
) -> (u16, String) {
    let proof = if old == 0 || old == checkpoint.size {
        Vec::new()
    } else {
        c.get_log_consistency_proof(GetLogConsistencyProofRequest {
            old_size: old,
            new_size: checkpoint.size,
        })
        .await
        .expect("proof")
        .into_inner()
        .hashes
    };
    http_post(
        url,
        "/add-checkpoint",
        &add_checkpoint_body(old, &proof, &checkpoint.note),
    )
    .await
}

/// Someone with the database rewrites the log: the first `keep` records again, in the
/// opposite order; DbSync then signs it with its real key.
fn rewrite_log(keep: i64) -> String {
    format!(
        "DELETE FROM merkle_log_checkpoints; DELETE FROM merkle_log_hashes; \
         DELETE FROM merkle_log_leaves; \
         INSERT INTO merkle_log_pending (snapshot_id, source, sequence, record_hash) \
         SELECT 1000 - id, source, sequence, record_hash FROM merkle_roots \
         ORDER BY id LIMIT {keep}"
    )
}

/// The witness stand-in against DbSync's real checkpoints and proofs: it cosigns each
/// checkpoint that extends what it cosigned before, tells its size when asked from another,
/// and refuses a rewritten log (even one signed with the log's real key) and a forged note.
#[tokio::test(flavor = "multi_thread")]
async fn a_witness_cosigns_what_extends_its_tree_and_refuses_a_fork() {
    use merkle_stand_ins::witness::WitnessStandIn;
    let mut stack = TestStack::new();
    let (uri, mut c) = start_logged(&mut stack).await;
    push_versions(&stack, &uri, "docs", 0..3);
    let three = checkpoint_of(&mut c, 3).await;
    let witness = WitnessStandIn::start("witness.test", [5; 32], &[&three.verifier_key])
        .await
        .expect("witness");
    let (status, line) = http_post(
        &witness.url(),
        "/add-checkpoint",
        &add_checkpoint_body(0, &[], &three.note),
    )
    .await;
    assert_eq!(status, 200, "{line}");
    let text = format!(
        "{}\n",
        three.note.split_once("\n\n").expect("a signed note").0
    );
    let (name, key) =
        merkle_core::cosignature::parse_verifier_key(&witness.verifier_key()).expect("key");
    merkle_core::cosignature::verify(&line, &name, &key, text.as_bytes())
        .expect("the witness's cosignature verifies");

    push_versions(&stack, &uri, "docs", 3..7);
    let seven = checkpoint_of(&mut c, 7).await;
    let (status, size) = http_post(
        &witness.url(),
        "/add-checkpoint",
        &add_checkpoint_body(0, &[], &seven.note),
    )
    .await;
    assert_eq!(
        (status, size.as_str()),
        (409, "3\n"),
        "it tells the size it has"
    );
    let (status, line) = submit(&mut c, &witness.url(), 3, &seven).await;
    assert_eq!(status, 200, "{line}");
    assert_eq!(witness.size(&seven.origin), Some(7));

    // The log rewritten in the database and signed again by DbSync's real key: refused.
    let db = stack.sql().await;
    exec(&db, &rewrite_log(7)).await;
    let forged = checkpoint_of(&mut c, 7).await;
    assert_ne!(forged.root_hash, seven.root_hash);
    let (status, _) = submit(&mut c, &witness.url(), 7, &forged).await;
    assert_eq!(status, 422, "a fork at the same size");
    push_versions(&stack, &uri, "docs", 7..8);
    let grown = checkpoint_of(&mut c, 8).await;
    let (status, _) = submit(&mut c, &witness.url(), 7, &grown).await;
    assert_eq!(
        status, 422,
        "the forged log grown on: its proof does not start from the tree the witness has"
    );
    assert_eq!(witness.size(&seven.origin), Some(7));
    // A note whose text was altered after signing, and a log the witness does not know.
    let altered = seven.note.replacen("\n7\n", "\n9\n", 1);
    let (status, _) = http_post(
        &witness.url(),
        "/add-checkpoint",
        &add_checkpoint_body(7, &[], &altered),
    )
    .await;
    assert_eq!(status, 403);
    let stranger = WitnessStandIn::start("other.test", [6; 32], &[])
        .await
        .expect("witness");
    let (status, _) = http_post(
        &stranger.url(),
        "/add-checkpoint",
        &add_checkpoint_body(0, &[], &seven.note),
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!((witness.answered(200), witness.answered(422)), (2, 2));
}

/// The newest checkpoint once it covers `size` leaves with `cosignatures` (within 10 s).
async fn cosigned_checkpoint(
    c: &mut Client,
    size: u64,
    cosignatures: u32,
) -> GetLogCheckpointResponse {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = checkpoint_of(c, size).await;
        if now.size >= size && now.cosignatures >= cosignatures {
            return now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint of {size} leaves with {cosignatures} cosignatures: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// DbSync submits each checkpoint to its witnesses and serves their cosignatures with it;
/// `merklectl log verify --witness` requires them; a witness that is down never blocks a sync;
/// a witness that refuses a rewritten log is a loud alarm in DbSync's log.
#[tokio::test(flavor = "multi_thread")]
async fn checkpoints_are_cosigned_by_the_witnesses_and_a_fork_raises_the_alarm() {
    use merkle_stand_ins::witness::WitnessStandIn;
    let mut stack = TestStack::new();
    let (private, _) = key_pair(&stack.dir().join("keys"));
    // The log's key is known before DbSync starts: witnesses are configured with it.
    let log_key = signed_note::new_ed25519_verifier_key(
        "merkle-mesh.local/log",
        &signing_key(&private).verifying_key(),
    );
    let one = WitnessStandIn::start("one.witness.test", [11; 32], &[&log_key])
        .await
        .expect("witness");
    let two = WitnessStandIn::start("two.witness.test", [12; 32], &[&log_key])
        .await
        .expect("witness");
    let witnesses = format!(
        "{}@{},{}@{}",
        one.verifier_key(),
        one.url(),
        two.verifier_key(),
        two.url()
    );
    let metrics = std::net::SocketAddr::from((
        [127, 0, 0, 1],
        integration_tests::free_port().expect("port"),
    ));
    let (uri, mut c) = start_db_sync(
        &mut stack,
        &[
            ("SIGNING_KEY_FILE", private.display().to_string()),
            ("LOG_INTERVAL", "100ms".into()),
            ("WITNESSES", witnesses),
            ("WITNESS_TIMEOUT", "1s".into()),
            ("METRICS_LISTEN_ADDR", metrics.to_string()),
        ],
    )
    .await;
    push_versions(&stack, &uri, "docs", 0..3);
    let three = cosigned_checkpoint(&mut c, 3, 2).await;
    assert!(three.witnessed, "{three:?}");
    assert_eq!(
        three.note.matches('\u{2014}').count(),
        3,
        "the log's line and two cosignatures"
    );
    let (k1, k2) = (one.verifier_key(), two.verifier_key());
    let (code, out, err) = run_merklectl(&[
        "log",
        "checkpoint",
        "--addr",
        &uri,
        "--verifier-key",
        &three.verifier_key,
        "--witness",
        &k1,
        "--witness",
        &k2,
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    // verify-history --log asks the same of the checkpoint its last record is in.
    let public = key_pair(&stack.dir().join("keys")).1;
    let state = stack.dir().join("log-state.json");
    let (code, out, err) = run_merklectl(&[
        "verify-history",
        "docs",
        "--addr",
        &uri,
        "--trusted-key",
        public.to_str().expect("utf-8"),
        "--log",
        "--log-state",
        state.to_str().expect("utf-8"),
        "--witness",
        &k1,
        "--witness",
        &k2,
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("record 3 is leaf 2"), "{out}");
    // A witness that never cosigned this log does not count.
    let stranger = WitnessStandIn::start("three.witness.test", [13; 32], &[])
        .await
        .expect("witness");
    let k3 = stranger.verifier_key();
    let (code, _, err) = run_merklectl(&[
        "log",
        "checkpoint",
        "--addr",
        &uri,
        "--witness",
        &k1,
        "--witness",
        &k2,
        "--witness",
        &k3,
    ]);
    assert!(
        code == Some(2) && err.contains("cosigned by 2 of the witnesses you require (3 of 3)"),
        "{err}"
    );

    // A witness down: syncs go on, the checkpoint is served with the cosignature it has.
    drop(two);
    push_versions(&stack, &uri, "docs", 3..5);
    let five = cosigned_checkpoint(&mut c, 5, 1).await;
    assert_eq!(five.size, 5);
    assert!(!five.witnessed, "one of two: {five:?}");
    assert_eq!(one.size(&five.origin), Some(5));
    // ... and the metrics show which witness did not answer.
    assert!(
        counter(
            metrics,
            "merkle_log_witness_failures_total",
            "two.witness.test"
        ) >= 1,
        "{}",
        integration_tests::get_metrics(metrics)
    );
    assert_eq!(
        counter(
            metrics,
            "merkle_log_witness_alarms_total",
            "one.witness.test"
        ),
        0
    );

    // The log rewritten in the database and signed again with the real key: the witness
    // that cosigned the real one refuses it, and DbSync says so loudly.
    let db = stack.sql().await;
    exec(&db, &rewrite_log(5)).await;
    push_versions(&stack, &uri, "docs", 5..6);
    let log = stack.service("db-sync").log.clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("A WITNESS REFUSED THE TRANSPARENCY LOG") {
            assert!(
                text.contains("one.witness.test") && text.contains("a fork"),
                "{text}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no alarm in {}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(one.answered(422) >= 1);
    assert_eq!(
        one.size(&five.origin),
        Some(5),
        "it never cosigned the fork"
    );
    assert!(
        counter(
            metrics,
            "merkle_log_witness_alarms_total",
            "one.witness.test"
        ) >= 1
    );
}

/// The value of the counter `name` for `witness` on DbSync's /metrics (0 when absent).
fn counter(metrics: std::net::SocketAddr, name: &str, witness: &str) -> u64 {
    let text = integration_tests::get_metrics(metrics);
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(&format!(r#"witness="{witness}""#)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// `merklectl prove --stored ... --bundle` writes one file proving "this file had this hash in
/// this snapshot at this time"; `verify-proof` checks it offline with only the log's key (and
/// a witness's), and refuses each part altered, a consistent lie about the snapshot, a key it
/// was not signed with and a witness that did not cosign it.
#[tokio::test(flavor = "multi_thread")]
async fn a_proof_bundle_proves_a_file_offline_with_only_the_log_key() {
    use base64::{Engine as _, engine::general_purpose::STANDARD};
    use merkle_stand_ins::witness::WitnessStandIn;
    let mut stack = TestStack::new();
    let (private, _) = key_pair(&stack.dir().join("keys"));
    let log_key = signed_note::new_ed25519_verifier_key(
        "merkle-mesh.local/log",
        &signing_key(&private).verifying_key(),
    );
    let witness = WitnessStandIn::start("one.witness.test", [11; 32], &[&log_key])
        .await
        .expect("witness");
    let (uri, mut c) = start_db_sync(
        &mut stack,
        &[
            ("SIGNING_KEY_FILE", private.display().to_string()),
            ("LOG_INTERVAL", "100ms".into()),
            (
                "WITNESSES",
                format!("{}@{}", witness.verifier_key(), witness.url()),
            ),
        ],
    )
    .await;
    push_versions(&stack, &uri, "docs", 0..3);
    cosigned_checkpoint(&mut c, 3, 1).await;
    let (code, bundle, err) = run_merklectl(&[
        "prove",
        "--stored",
        "docs@2",
        "sub/version",
        "--bundle",
        "--addr",
        &uri,
    ]);
    assert_eq!(code, Some(0), "{bundle}{err}");
    assert!(err.contains("leaf 1 of the log"), "{err}");
    let dir = stack.dir().to_owned();
    let file = dir.join("version.proof");
    std::fs::write(&file, &bundle).expect("write");
    // The file's content as it was in snapshot 2.
    let content = dir.join("version-then");
    std::fs::write(&content, "1").expect("write");
    let w = witness.verifier_key();
    let check = |file: &Path, extra: &[&str]| {
        let mut args = vec!["verify-proof", file.to_str().expect("utf-8")];
        args.extend_from_slice(extra);
        run_merklectl(&args)
    };
    let (code, out, err) = check(
        &file,
        &[
            "--verifier-key",
            &log_key,
            "--witness",
            &w,
            "--content",
            content.to_str().expect("utf-8"),
        ],
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("valid: sub/version was a file with hash")
            && out.contains("in docs@2")
            && out.contains("leaf 1 of the log's checkpoint signed by merkle-mesh.local/log")
            && out.contains("cosigned by 1 of 1 witnesses"),
        "{out}"
    );
    // Today's content is not what snapshot 2 held.
    let today = dir.join("tree-docs/sub/version");
    let (code, _, err) = check(
        &file,
        &[
            "--verifier-key",
            &log_key,
            "--content",
            today.to_str().expect("utf-8"),
        ],
    );
    assert!(
        code != Some(0) && err.contains("but the proof says"),
        "{err}"
    );
    // No key: refused, naming the flag.
    let (code, _, err) = check(&file, &[]);
    assert!(code != Some(0) && err.contains("--verifier-key"), "{err}");
    // Another log's key, a witness that never cosigned it.
    let impostor = signed_note::new_ed25519_verifier_key(
        "merkle-mesh.local/log",
        &SigningKey::from_bytes(&[9; 32]).verifying_key(),
    );
    let (code, _, err) = check(&file, &["--verifier-key", &impostor]);
    assert!(
        code != Some(0) && err.contains("does not verify with --verifier-key"),
        "{err}"
    );
    let stranger = WitnessStandIn::start("two.witness.test", [12; 32], &[])
        .await
        .expect("witness");
    let (code, _, err) = check(
        &file,
        &[
            "--verifier-key",
            &log_key,
            "--witness",
            &stranger.verifier_key(),
        ],
    );
    assert!(
        code != Some(0) && err.contains("cosigned by 0 of the witnesses"),
        "{err}"
    );

    // Each part altered.
    let original: serde_json::Value = serde_json::from_str(&bundle).expect("json");
    let record = |v: &serde_json::Value| {
        Record::decode(
            &STANDARD
                .decode(v["record"].as_str().expect("record"))
                .expect("b64"),
        )
        .expect("record")
    };
    let flip = |text: &str| {
        let mut bytes = STANDARD.decode(text).expect("b64");
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        serde_json::Value::String(STANDARD.encode(bytes))
    };
    type Alter = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, Alter, &str)> = vec![
        (
            "the claimed hash",
            Box::new(|v| v["claim"]["hash"] = "00".repeat(32).into()),
            "the claim is not what the proofs prove",
        ),
        (
            "the claimed sequence",
            Box::new(|v| v["claim"]["sequence"] = 3.into()),
            "the claim is not what the proofs prove",
        ),
        (
            "a consistent lie: record and claim say snapshot 3",
            Box::new(move |v| {
                let mut r = record(v);
                r.sequence = 3;
                v["record"] = STANDARD.encode(r.encode()).into();
                v["claim"]["sequence"] = 3.into();
            }),
            "the record is not leaf 1",
        ),
        (
            "a directory node",
            Box::new(move |v| v["nodes"][0] = flip(v["nodes"][0].as_str().expect("node"))),
            "does not prove the entry",
        ),
        (
            "a log proof hash",
            Box::new(move |v| v["log_proof"][0] = flip(v["log_proof"][0].as_str().expect("hash"))),
            "the record is not leaf 1",
        ),
        (
            "the leaf index",
            Box::new(|v| v["leaf_index"] = 0.into()),
            "the record is not leaf 0",
        ),
        (
            "the checkpoint's size",
            Box::new(|v| {
                let note = v["checkpoint"]
                    .as_str()
                    .expect("note")
                    .replacen("\n3\n", "\n4\n", 1);
                v["checkpoint"] = note.into();
            }),
            "does not verify with --verifier-key",
        ),
    ];
    for (what, alter, why) in cases {
        let mut altered = original.clone();
        alter(&mut altered);
        let path = dir.join("altered.proof");
        std::fs::write(&path, altered.to_string()).expect("write");
        let (code, out, err) = check(&path, &["--verifier-key", &log_key]);
        assert!(code != Some(0), "{what}: must fail: {out}");
        assert!(err.contains(why), "{what}: expected {why:?} in: {err}");
    }
}

/// Three DbSync replicas on one PostgreSQL, one log: A signs with key a, B with another key b
/// it was not told is a's successor, C with none. While A is down the log stands still: B
/// would make two keys sign it by turns, C would extend a signed log unsigned, and each says
/// so once. Back up, A takes every replica's records in, and every checkpoint is signed by a.
#[tokio::test(flavor = "multi_thread")]
async fn replicas_with_another_key_or_none_never_sign_a_shared_log() {
    let mut stack = TestStack::new();
    let (a_key, _) = key_pair(&stack.dir().join("keys-a"));
    let (b_key, _) = key_pair(&stack.dir().join("keys-b"));
    let logged = |key: Option<&Path>| {
        let mut env = vec![("LOG_INTERVAL", "100ms".to_owned())];
        if let Some(key) = key {
            env.push(("SIGNING_KEY_FILE", key.display().to_string()));
        }
        env
    };
    let (a_uri, mut a) = start_db_sync(&mut stack, &logged(Some(&a_key))).await;
    push_versions(&stack, &a_uri, "docs", 0..2);
    checkpoint_of(&mut a, 2).await;
    let (b_uri, _) = start_db_sync(&mut stack, &logged(Some(&b_key))).await;
    let (c_uri, mut c) = start_db_sync(&mut stack, &logged(None)).await;
    let at = |uri: &str, stack: &TestStack| {
        stack
            .services()
            .iter()
            .position(|s| s.uri() == uri)
            .expect("the replica")
    };
    let mut a_service = stack.remove_service(at(&a_uri, &stack));
    a_service.process.stop(Duration::from_secs(10));
    push_versions(&stack, &b_uri, "site", 0..3);
    push_versions(&stack, &c_uri, "notes", 0..3);
    // Many integration rounds of B and C (100 ms each): the log does not grow.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let standing = c
        .get_log_checkpoint(GetLogCheckpointRequest::default())
        .await
        .expect("checkpoint")
        .into_inner();
    assert_eq!(standing.size, 2);
    for (uri, why) in [
        (&b_uri, "neither this DbSync's key"),
        (&c_uri, "no SIGNING_KEY_FILE"),
    ] {
        let log = std::fs::read_to_string(&stack.services()[at(uri, &stack)].log).expect("log");
        assert_eq!(log.matches(why).count(), 1, "said once: {uri}: {log}");
    }
    // A again: every record is taken in, under a's signature.
    a_service.restart();
    a_service.wait_for(ServingStatus::Serving).await;
    let newest = checkpoint_of(&mut a, 8).await;
    assert_eq!(newest.size, 8);
    let verifier = signed_note::new_ed25519_verifier_key(
        "merkle-mesh.local/log",
        &signing_key(&a_key).verifying_key(),
    );
    let known = signed_note::VerifierList::new(vec![Box::new(
        signed_note::StandardVerifier::new(&verifier).expect("verifier"),
    )]);
    let db = stack.sql().await;
    let notes: Vec<String> = db
        .query("SELECT note FROM merkle_log_checkpoints ORDER BY size", &[])
        .await
        .expect("checkpoints")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(notes.len() >= 2, "{notes:?}");
    for note in &notes {
        let parsed = signed_note::Note::from_bytes(note.as_bytes())
            .unwrap_or_else(|e| panic!("an unsigned checkpoint: {e:?}\n{note}"));
        let (verified, unverified) = parsed
            .verify(&known)
            .unwrap_or_else(|e| panic!("not signed by a: {e:?}\n{note}"));
        assert_eq!((verified.len(), unverified.len()), (1, 0), "{note}");
    }
}
