//! The policy, walked: every RPC of the contract, called on the real five services with no
//! credentials, with a token nobody issued, as each person role and as each service identity.
//! The answer is UNAUTHENTICATED without valid credentials, PERMISSION_DENIED (naming the role
//! needed) where `shared::auth::policy` says no, and otherwise whatever the handler says of the
//! (deliberately empty or invalid) request, never a refusal. Health and reflection stay open.

use std::time::Duration;

use integration_tests::{ServingStatus, TestStack, raw, run_grpcurl};
use merkle_shared::auth::{
    Grant, ServiceRole,
    identities::parse_grant,
    policy::{RULES, Rule},
    token::ClientAuthLayer,
};
use tonic::{
    Code,
    codegen::{Body, Bytes, StdError},
};
use tower::Layer as _;

/// The request sent to each RPC: harmless whoever is let through. The Cache's RPCs get
/// `namespace = 99` (unknown: INVALID_ARGUMENT, so nothing is written or cleared); every
/// other RPC gets an empty message (a missing source, root or path: INVALID_ARGUMENT).
fn request_for(rule: &Rule) -> Vec<u8> {
    if rule.service == "merkle.cache.v1.CacheService"
        && !matches!(rule.method, "Warmup" | "GetStats" | "GetStatus")
    {
        vec![0x08, 99]
    } else {
        Vec::new()
    }
}

/// The status one call ends with: OK once a first message arrived (or the stream stayed open:
/// a watch). The layer answers a refusal at once.
async fn call<T>(channel: T, rule: &Rule) -> Code
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
{
    let path = rule.path();
    let answer = raw::call(
        channel,
        &path,
        vec![request_for(rule)],
        Duration::from_secs(5),
    );
    match answer.await {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// Whether the policy lets `grant` call what `rule` covers.
fn allowed(rule: &Rule, grant: Grant) -> bool {
    match grant {
        Grant::Role(role) => rule.role.is_some_and(|needed| role >= needed),
        Grant::Service(service) => rule.services.contains(&service),
        Grant::Anything => true,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_rpc_answers_each_identity_as_the_policy_says() {
    let mut stack = TestStack::new();
    stack.start_all().await;
    let identities: Vec<(&str, Grant)> = ["reader", "operator", "admin"]
        .into_iter()
        .chain(ServiceRole::ALL.iter().map(|s| s.name()))
        .map(|name| {
            let grant = match ServiceRole::parse(name) {
                Some(service) => Grant::Service(service),
                None => parse_grant(name).expect("a role"),
            };
            (name, grant)
        })
        .collect();
    let mut failures = Vec::new();
    let mut calls = 0;
    for rule in RULES {
        let service = stack.serving(rule.service);
        // No credentials, and a token nobody issued.
        let code = call(service.plain_channel(), rule).await;
        calls += 1;
        if code != Code::Unauthenticated {
            failures.push(format!("{} without credentials: {code:?}", rule.path()));
        }
        let stranger = ClientAuthLayer::with_token("0123456789abcdef-not-issued").expect("token");
        let code = call(stranger.layer(service.plain_channel()), rule).await;
        calls += 1;
        if code != Code::Unauthenticated {
            failures.push(format!("{} with an unknown token: {code:?}", rule.path()));
        }
        for (name, grant) in &identities {
            let code = call(service.channel_as(name), rule).await;
            calls += 1;
            let expected_refusal = !allowed(rule, *grant);
            let refused = matches!(code, Code::PermissionDenied | Code::Unauthenticated);
            if expected_refusal != refused || (expected_refusal && code != Code::PermissionDenied) {
                failures.push(format!(
                    "{} as {name}: {code:?}, the policy says {}",
                    rule.path(),
                    if expected_refusal {
                        "PERMISSION_DENIED"
                    } else {
                        "allowed"
                    }
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {calls} calls broke the policy:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(calls, RULES.len() * (2 + identities.len()));
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_name_the_role_needed_and_health_and_reflection_stay_open() {
    let mut stack = TestStack::new();
    stack.start_postgres().await;
    let db_sync = stack.start_serving("db-sync").await;
    let addr = db_sync.addr;
    let token = |who: &str| format!("authorization: Bearer {}", integration_tests::token_of(who));
    let (ok, out, err) = run_grpcurl(
        &[
            "-H",
            &token("reader"),
            "-d",
            r#"{"source":"docs","policy":{"keepLast":1}}"#,
        ],
        addr,
        &["merkle.dbsync.v1.DbSyncService/SetRetentionPolicy"],
    );
    assert!(!ok, "{out}");
    assert!(err.contains("PermissionDenied"), "{err}");
    assert!(
        err.contains("SetRetentionPolicy needs the admin role; reader has reader"),
        "{err}"
    );
    let (ok, _, err) = run_grpcurl(
        &["-H", "authorization: Bearer not-a-token-of-ours-0123"],
        addr,
        &["merkle.dbsync.v1.DbSyncService/ListSources"],
    );
    assert!(!ok);
    assert!(
        err.contains("Unauthenticated") && err.contains("not known"),
        "{err}"
    );
    // Without any credentials: health and reflection answer, the service does not.
    let plain = |args: &[&str]| {
        let mut command = std::process::Command::new(integration_tests::grpcurl());
        command
            .args(["-plaintext", "-max-time", "20"])
            .arg(addr.to_string())
            .args(args);
        let out = command.output().expect("grpcurl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = plain(&["list"]);
    assert!(
        ok && out.contains("merkle.dbsync.v1.DbSyncService"),
        "{out}{err}"
    );
    let (ok, out, err) = plain(&["grpc.health.v1.Health/Check"]);
    assert!(ok && out.contains("\"SERVING\""), "{out}{err}");
    let (ok, _, err) = plain(&["merkle.dbsync.v1.DbSyncService/ListSources"]);
    assert!(
        !ok && err.contains("Unauthenticated") && err.contains("needs credentials"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_names_who_set_it_in_the_signed_pruning_checkpoint() {
    use merkle_proto::{
        common::v1::RetentionPolicy,
        dbsync::v1::{
            GetHistoryProofRequest, GetRetentionPolicyRequest, SetRetentionPolicyRequest,
            db_sync_service_client::DbSyncServiceClient,
        },
    };
    let mut stack = TestStack::new();
    stack.start_postgres().await;
    let key = stack.dir().join("signing-key.pem");
    let out = std::process::Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(&key)
        .output()
        .expect("openssl");
    assert!(out.status.success());
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    let db_sync = stack.start_service(
        "db-sync",
        &[("SIGNING_KEY_FILE", key.display().to_string())],
    );
    db_sync.wait_for(ServingStatus::Serving).await;
    let addr = db_sync.uri();
    let dir = stack.dir().join("tree");
    for i in 0..3 {
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("f"), format!("{i}")).expect("write");
        let (code, _, err) = integration_tests::run_merklectl(&[
            "push",
            "docs",
            dir.to_str().expect("utf-8"),
            "--addr",
            &addr,
        ]);
        assert_eq!(code, Some(0), "{err}");
    }
    let db_sync = stack.service_mut("db-sync");
    let policy = Some(RetentionPolicy {
        keep_last: 1,
        keep_within: None,
    });
    // An operator may not; an admin may, and is named.
    let err = DbSyncServiceClient::new(db_sync.channel_as("operator"))
        .set_retention_policy(SetRetentionPolicyRequest {
            source: "docs".into(),
            policy,
        })
        .await
        .expect_err("operator");
    assert_eq!(err.code(), Code::PermissionDenied);
    let mut admin = DbSyncServiceClient::new(db_sync.channel_as("admin"));
    let set = admin
        .set_retention_policy(SetRetentionPolicyRequest {
            source: "docs".into(),
            policy,
        })
        .await
        .expect("admin")
        .into_inner();
    assert_eq!(set.snapshots_deleted, 2);
    let got = admin
        .get_retention_policy(GetRetentionPolicyRequest {
            source: "docs".into(),
        })
        .await
        .expect("policy")
        .into_inner();
    assert_eq!(got.set_by, "admin (admin)");
    let proof = admin
        .get_history_proof(GetHistoryProofRequest {
            source: "docs".into(),
            ..Default::default()
        })
        .await
        .expect("history")
        .into_inner();
    let pruned = proof.pruned.expect("a pruning checkpoint");
    assert_eq!(
        (pruned.sequence, pruned.actor.as_str()),
        (2, "admin (admin)")
    );
    assert!(!pruned.signature.is_empty());
    // verify-history checks the signature over the actor: it passes, and fails once the
    // actor is rewritten in PostgreSQL.
    let public = stack.dir().join("public.pem");
    let out = std::process::Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&key)
        .arg("-out")
        .arg(&public)
        .output()
        .expect("openssl");
    assert!(out.status.success());
    let public = public.to_str().expect("utf-8");
    let (code, out, err) = integration_tests::run_merklectl(&[
        "verify-history",
        "docs",
        "--addr",
        &addr,
        "--trusted-key",
        public,
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    stack
        .sql()
        .await
        .execute(
            "UPDATE merkle_history_checkpoints SET actor = 'nobody (admin)' WHERE kind = 'pruned'",
            &[],
        )
        .await
        .expect("tamper");
    let (code, out, err) = integration_tests::run_merklectl(&[
        "verify-history",
        "docs",
        "--addr",
        &addr,
        "--trusted-key",
        public,
    ]);
    assert_ne!(
        code,
        Some(0),
        "a rewritten actor must not verify: {out}{err}"
    );
    assert!(
        format!("{out}{err}").contains("pruning checkpoint"),
        "{out}{err}"
    );
}
