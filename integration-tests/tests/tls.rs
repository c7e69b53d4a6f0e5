//! In-app TLS and mutual TLS (for clusters without a service mesh), with the real Cache and
//! DbSync binaries and certificates made by the openssl command line: both serve TLS and
//! refuse a caller without a certificate (and a plaintext one); DbSync reaches Cache over
//! mutual TLS with its own certificate; a renewed certificate is served without a restart; a
//! bad TLS setting stops a service at start, naming it. DbSync reaches a real PostgreSQL over
//! TLS when its URL says `sslmode=require`, and the Cache a real Redis (one server, and a
//! Redis Cluster of six) at `rediss://` URLs, each checking the server's certificate.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use integration_tests::{
    SERVICE_EXTENSIONS, ServingStatus, TestStack, issue_certificate, make_certificates,
    run_grpcurl, tail,
};

/// grpcurl's flags for a caller with the client certificate (or without one).
fn tls_flags(pki: &Path, with_certificate: bool) -> Vec<String> {
    let file = |name: &str| pki.join(name).display().to_string();
    let mut flags = vec!["-cacert".to_owned(), file("ca.pem")];
    if with_certificate {
        flags.extend(["-cert".to_owned(), file("client.pem")]);
        flags.extend(["-key".to_owned(), file("client.key")]);
    }
    flags
}

fn grpcurl(flags: &[String], addr: SocketAddr, args: &[&str]) -> (bool, String, String) {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    run_grpcurl(&flags, addr, args)
}

/// Waits until the service at `addr` answers its health check over mutual TLS.
async fn wait_serving(pki: &Path, addr: SocketAddr, service: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let body = format!(r#"{{"service":"{service}"}}"#);
        let (ok, out, _) = grpcurl(
            &[tls_flags(pki, true), vec!["-d".into(), body]].concat(),
            addr,
            &["grpc.health.v1.Health/Check"],
        );
        if ok && out.contains("\"SERVING\"") {
            return;
        }
        assert!(Instant::now() < deadline, "not serving:\n{}", tail(log));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The TLS environment of a service with certificate `name`.
fn tls_env(pki: &Path, name: &str) -> Vec<(&'static str, String)> {
    let file = |f: String| pki.join(f).display().to_string();
    vec![
        ("TLS_CERT_FILE", file(format!("{name}.pem"))),
        ("TLS_KEY_FILE", file(format!("{name}.key"))),
        ("TLS_CLIENT_CA_FILE", file("ca.pem".into())),
        ("TLS_CA_FILE", file("ca.pem".into())),
    ]
}

/// The subject of the certificate the server at `addr` presents, as openssl shows it.
fn served_subject(pki: &Path, addr: SocketAddr) -> String {
    let file = |name: &str| pki.join(name).display().to_string();
    let out = std::process::Command::new("openssl")
        .args(["s_client", "-connect", &addr.to_string(), "-CAfile"])
        .arg(file("ca.pem"))
        .args(["-cert", &file("client.pem"), "-key", &file("client.key")])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl s_client");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.trim_start().starts_with("subject="))
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn services_serve_mutual_tls_refuse_callers_without_a_certificate_and_reload() {
    let mut stack = TestStack::new();
    let pki = make_certificates(stack.dir());
    issue_certificate(&pki, "cache", "cache", SERVICE_EXTENSIONS);
    issue_certificate(&pki, "db-sync", "db-sync", SERVICE_EXTENSIONS);
    stack.start_postgres().await;
    stack.start_redis().await;

    let cache = stack.start_service("cache", &tls_env(&pki, "cache"));
    let (cache_addr, cache_log) = (cache.addr, cache.log.clone());
    wait_serving(&pki, cache_addr, "merkle.cache.v1.CacheService", &cache_log).await;
    let mut env = tls_env(&pki, "db-sync");
    env.push((
        "CACHE_ADDR",
        format!("https://127.0.0.1:{}", cache_addr.port()),
    ));
    let db_sync = stack.start_service("db-sync", &env);
    let (db_sync_addr, db_sync_log) = (db_sync.addr, db_sync.log.clone());
    wait_serving(
        &pki,
        db_sync_addr,
        "merkle.dbsync.v1.DbSyncService",
        &db_sync_log,
    )
    .await;

    // A caller without a certificate is refused, and so is a plaintext one.
    for addr in [cache_addr, db_sync_addr] {
        // (TLS 1.3 refuses the certificate after the client's side of the handshake: the
        // caller sees the connection closed.)
        let (ok, out, _) = grpcurl(&tls_flags(&pki, false), addr, &["list"]);
        assert!(!ok, "a caller without a certificate was served: {out}");
        let (ok, _, _) = run_grpcurl(&["-plaintext"], addr, &["list"]);
        assert!(!ok, "a plaintext caller was served");
    }
    assert!(
        std::fs::read_to_string(&cache_log)
            .expect("log")
            .contains("TLS handshake refused"),
        "{}",
        tail(&cache_log)
    );

    // DbSync reads the cache first: its call reaches Cache over mutual TLS, as a miss.
    let (ok, _, err) = grpcurl(
        &[
            tls_flags(&pki, true),
            vec!["-d".into(), r#"{"source":"docs"}"#.into()],
        ]
        .concat(),
        db_sync_addr,
        &["merkle.dbsync.v1.DbSyncService/GetLatestRoot"],
    );
    assert!(!ok && err.contains("NotFound"), "{err}");
    let (ok, stats, err) = grpcurl(
        &tls_flags(&pki, true),
        cache_addr,
        &["merkle.cache.v1.CacheService/GetStats"],
    );
    assert!(ok, "{err}");
    let stats: serde_json::Value = serde_json::from_str(&stats).expect("json");
    let latest = stats["namespaces"]
        .as_array()
        .expect("namespaces")
        .iter()
        .find(|n| n["namespace"] == "NAMESPACE_LATEST_ROOT")
        .cloned()
        .unwrap_or_default();
    assert!(
        latest["misses"].as_str().is_some_and(|m| m != "0"),
        "DbSync's cache read did not reach Cache: {stats}\n{}",
        tail(&db_sync_log)
    );

    // The command line speaks TLS with the services' variables: the exec probe the chart
    // uses when TLS is on.
    let probe = |with_certificate: bool| {
        let file = |name: &str| pki.join(name).display().to_string();
        let mut command = std::process::Command::new(integration_tests::binary("merklectl"));
        command
            .args([
                "health",
                "--addr",
                &format!("https://127.0.0.1:{}", cache_addr.port()),
            ])
            .args(["--service", "merkle.cache.v1.CacheService"])
            .env("TLS_CA_FILE", file("ca.pem"));
        if with_certificate {
            command
                .env("TLS_CERT_FILE", file("client.pem"))
                .env("TLS_KEY_FILE", file("client.key"));
        }
        command.output().expect("merklectl health")
    };
    let out = probe(true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !probe(false).status.success(),
        "served without a certificate"
    );

    // A renewed certificate is served to new connections without a restart.
    let subject = served_subject(&pki, cache_addr);
    assert!(subject.ends_with("CN = cache"), "{subject}");
    issue_certificate(&pki, "cache", "cache-renewed", SERVICE_EXTENSIONS);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !served_subject(&pki, cache_addr).contains("cache-renewed") {
        assert!(
            Instant::now() < deadline,
            "the renewed certificate was not served:\n{}",
            tail(&cache_log)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    wait_serving(&pki, cache_addr, "merkle.cache.v1.CacheService", &cache_log).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_certificate_is_an_identity_by_its_names() {
    let mut stack = TestStack::new();
    let pki = make_certificates(stack.dir());
    issue_certificate(&pki, "db-sync", "db-sync", SERVICE_EXTENSIONS);
    issue_certificate(
        &pki,
        "alice",
        "alice",
        "subjectAltName=URI:spiffe://test/alice\nextendedKeyUsage=clientAuth\n",
    );
    issue_certificate(
        &pki,
        "mallory",
        "mallory",
        "subjectAltName=DNS:mallory.example\nextendedKeyUsage=clientAuth\n",
    );
    // Only alice is an identity, a reader, by her certificate's URI name.
    let identities = stack.dir().join("identities.yaml");
    std::fs::write(
        &identities,
        "identities:\n  - name: alice\n    role: reader\n    san: spiffe://test/alice\n",
    )
    .expect("write");
    stack.start_postgres().await;
    let mut env = tls_env(&pki, "db-sync");
    env.push(("AUTH_IDENTITIES_FILE", identities.display().to_string()));
    let db_sync = stack.start_service("db-sync", &env);
    let (addr, log) = (db_sync.addr, db_sync.log.clone());
    // No bearer token on any of these calls: the certificate is the credential.
    let call = |who: &str, flags: &[&str], method: &str| {
        let file = |f: String| pki.join(f).display().to_string();
        let out = std::process::Command::new(integration_tests::grpcurl())
            .args(["-max-time", "20", "-cacert", &file("ca.pem".into())])
            .args(["-cert", &file(format!("{who}.pem"))])
            .args(["-key", &file(format!("{who}.key"))])
            .args(flags)
            .arg(addr.to_string())
            .arg(method)
            .output()
            .expect("grpcurl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, out, _) = call("alice", &[], "grpc.health.v1.Health/Check");
        if ok && out.contains("\"SERVING\"") {
            break;
        }
        assert!(Instant::now() < deadline, "not serving:\n{}", tail(&log));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (ok, out, err) = call("alice", &[], "merkle.dbsync.v1.DbSyncService/ListSources");
    assert!(ok, "alice reads: {out}{err}");
    let (ok, _, err) = call(
        "alice",
        &["-d", r#"{"source":"docs","policy":{"keepLast":1}}"#],
        "merkle.dbsync.v1.DbSyncService/SetRetentionPolicy",
    );
    assert!(!ok && err.contains("PermissionDenied"), "{err}");
    assert!(
        err.contains("needs the admin role; alice has reader"),
        "{err}"
    );
    // A certificate the CA signed, whose names are no identity's: unauthenticated.
    let (ok, _, err) = call("mallory", &[], "merkle.dbsync.v1.DbSyncService/ListSources");
    assert!(!ok && err.contains("Unauthenticated"), "{err}");
    assert!(err.contains("mallory.example"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_tls_setting_stops_the_service_naming_it() {
    let mut stack = TestStack::new();
    let pki = make_certificates(stack.dir());
    let file = |name: &str| pki.join(name).display().to_string();
    for (env, named) in [
        (
            // The client's key with the server's certificate.
            vec![
                ("TLS_CERT_FILE", file("server.pem")),
                ("TLS_KEY_FILE", file("client.key")),
            ],
            "TLS_KEY_FILE",
        ),
        (
            vec![
                ("TLS_CERT_FILE", file("server.pem")),
                ("TLS_KEY_FILE", file("server.key")),
                ("TLS_CLIENT_CA_FILE", file("missing.pem")),
            ],
            "TLS_CLIENT_CA_FILE",
        ),
        (
            vec![("DB_SYNC_ADDR", "https://127.0.0.1:1".to_owned())],
            "TLS_CA_FILE",
        ),
    ] {
        let text = stack.start_refused("tree-builder", &env);
        assert!(text.contains(named), "{named} is not named: {text}");
    }
}

/// A copy of the server's key PostgreSQL accepts: owned by the user it runs as (`postgres`
/// when the tests run as root), readable by that user alone.
fn postgres_key(pki: &Path) -> String {
    use std::os::unix::fs::PermissionsExt as _;
    let key = pki.join("postgres.key");
    std::fs::copy(pki.join("server.key"), &key).expect("copy the key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    if nix::unistd::geteuid().is_root() {
        let user = nix::unistd::User::from_name("postgres")
            .expect("users")
            .expect("a postgres user");
        nix::unistd::chown(&key, Some(user.uid), Some(user.gid)).expect("chown");
    }
    key.display().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn db_sync_reaches_postgres_over_tls_and_checks_its_certificate() {
    let mut stack = TestStack::new();
    let pki = make_certificates(stack.dir());
    let other = make_certificates(&stack.dir().join("other"));
    let file = |pki: &Path, name: &str| pki.join(name).display().to_string();
    let key = postgres_key(&pki);
    let cert = file(&pki, "server.pem");
    stack
        .start_postgres_with(&[
            ("ssl", "on"),
            ("ssl_cert_file", &cert),
            ("ssl_key_file", &key),
        ])
        .await;
    let plain_url = stack.postgres.as_ref().expect("started").url();
    let url = format!("{plain_url}?sslmode=require");

    // The server's certificate checked against its CA: serving, every connection encrypted.
    let db_sync = stack.start_service(
        "db-sync",
        &[
            ("DATABASE_URL", url.clone()),
            ("PGSSLROOTCERT", file(&pki, "ca.pem")),
        ],
    );
    db_sync.wait_for(ServingStatus::Serving).await;
    let sql = stack.sql().await;
    let row = sql
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
             FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.backend_type = 'client backend' AND a.pid <> pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl");
    let (encrypted, plain): (i64, i64) = (row.get(0), row.get(1));
    assert!(encrypted >= 1, "DbSync has no TLS connection");
    assert_eq!(plain, 0, "DbSync has a plaintext connection");

    // libpq's verify-full means the same here.
    let verify_full = stack.start_service(
        "db-sync",
        &[
            ("DATABASE_URL", format!("{plain_url}?sslmode=verify-full")),
            ("PGSSLROOTCERT", file(&pki, "ca.pem")),
        ],
    );
    verify_full.wait_for(ServingStatus::Serving).await;

    // A certificate from a CA DbSync was not given is refused: never serving, the reason logged.
    let refused = stack.start_service(
        "db-sync",
        &[
            ("DATABASE_URL", url.clone()),
            ("PGSSLROOTCERT", file(&other, "ca.pem")),
        ],
    );
    refused.wait_for(ServingStatus::NotServing).await;
    let log = refused.log.clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("certificate") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no certificate error logged:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Asking for TLS without saying whom to trust stops it at start, naming both settings;
    // so do a CA file that is not there and an sslmode nobody knows.
    for (env, named) in [
        (
            vec![("DATABASE_URL", url.clone())],
            ["DATABASE_URL", "PGSSLROOTCERT"],
        ),
        (
            vec![
                ("DATABASE_URL", url.clone()),
                ("PGSSLROOTCERT", file(&pki, "missing.pem")),
            ],
            ["PGSSLROOTCERT", "missing.pem"],
        ),
        (
            vec![("DATABASE_URL", format!("{plain_url}?sslmode=allow"))],
            ["DATABASE_URL", "sslmode"],
        ),
    ] {
        let text = stack.start_refused("db-sync", &env);
        for name in named {
            assert!(text.contains(name), "{name} is not named: {text}");
        }
    }
}

/// `CLIENT LIST` of the Redis at `url` (plaintext): one line per connection, with the local
/// address (`laddr=`) it came in on.
async fn client_list(url: &str) -> String {
    let client = redis::Client::open(url).expect("url");
    let mut redis = client
        .get_multiplexed_async_connection()
        .await
        .expect("plain connection");
    redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut redis)
        .await
        .expect("CLIENT LIST")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cache_reaches_redis_over_tls_and_checks_its_certificate() {
    let mut stack = TestStack::new();
    let pki = make_certificates(stack.dir());
    let other = make_certificates(&stack.dir().join("other"));
    let file = |pki: &Path, name: &str| pki.join(name).display().to_string();
    let tls_port = integration_tests::free_port().expect("free port");
    let mut extra = vec!["--tls-port".to_owned(), tls_port.to_string()];
    for (flag, name) in [
        ("--tls-cert-file", "server.pem"),
        ("--tls-key-file", "server.key"),
        ("--tls-ca-cert-file", "ca.pem"),
    ] {
        extra.extend([flag.to_owned(), file(&pki, name)]);
    }
    extra.extend(["--tls-auth-clients".to_owned(), "no".to_owned()]);
    let plain_url = stack.start_redis_with(extra).await.url();
    let url = format!("rediss://127.0.0.1:{tls_port}/0");

    // Checked against its CA: serving, with connections on the TLS port (which speaks nothing
    // else) and none on the plain one.
    let cache = stack.start_service(
        "cache",
        &[
            ("REDIS_URL", url.clone()),
            ("REDIS_CA_FILE", file(&pki, "ca.pem")),
        ],
    );
    cache.wait_for(ServingStatus::Serving).await;
    let clients = client_list(&plain_url).await;
    let on_tls = format!("laddr=127.0.0.1:{tls_port} ");
    let on_tls_port = clients.lines().filter(|l| l.contains(&on_tls)).count();
    assert!(
        on_tls_port >= 1,
        "no connection on the TLS port:\n{clients}"
    );
    assert_eq!(
        clients.lines().count(),
        on_tls_port + 1,
        "a connection besides this one on the plain port:\n{clients}"
    );

    // A certificate from a CA it was not given is refused: never serving.
    let refused = stack.start_service(
        "cache",
        &[
            ("REDIS_URL", url.clone()),
            ("REDIS_CA_FILE", file(&other, "ca.pem")),
        ],
    );
    refused.wait_for(ServingStatus::NotServing).await;

    // TLS asked for by halves, or a CA file that is not there, stops it at start, naming it.
    for (env, named) in [
        (
            vec![
                ("REDIS_URL", plain_url.clone()),
                ("REDIS_CA_FILE", file(&pki, "ca.pem")),
            ],
            ["REDIS_CA_FILE", "rediss://"],
        ),
        (
            vec![
                ("REDIS_URL", url.clone()),
                ("REDIS_CA_FILE", file(&pki, "missing.pem")),
            ],
            ["REDIS_CA_FILE", "missing.pem"],
        ),
    ] {
        let text = stack.start_refused("cache", &env);
        for name in named {
            assert!(text.contains(name), "{name} is not named: {text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cache_reaches_a_redis_cluster_over_tls() {
    let mut stack = TestStack::new();
    let pki = make_certificates(stack.dir());
    let (cert, key, ca) = (
        pki.join("server.pem"),
        pki.join("server.key"),
        pki.join("ca.pem"),
    );
    let tls = integration_tests::stack::RedisTls {
        cert: &cert,
        key: &key,
        ca: &ca,
    };
    let cluster = stack.start_redis_cluster_tls(&tls).await;
    let urls = cluster.urls();
    assert!(urls.starts_with("rediss://"), "{urls}");
    let plain_port = cluster.nodes()[0].port();
    let cache = stack.start_service("cache", &[("REDIS_CA_FILE", ca.display().to_string())]);
    cache.wait_for(ServingStatus::Serving).await;

    // A value written (as DbSync, which owns the namespace) and read back through the Cache,
    // over TLS to whichever master holds it.
    let mut client = merkle_proto::cache::v1::cache_service_client::CacheServiceClient::new(
        stack.service_mut("cache").channel_as("db-sync"),
    );
    let ns = merkle_proto::cache::v1::Namespace::TreeMeta as i32;
    client
        .set(merkle_proto::cache::v1::SetRequest {
            namespace: ns,
            key: "over-tls".into(),
            value: b"hello".to_vec(),
            ..Default::default()
        })
        .await
        .expect("Set");
    let got = client
        .get(merkle_proto::cache::v1::GetRequest {
            namespace: ns,
            key: "over-tls".into(),
        })
        .await
        .expect("Get")
        .into_inner();
    assert!(got.found && got.value == b"hello", "{got:?}");

    // The first node's plain port sees no connection from the Cache: only this one.
    let clients = client_list(&format!("redis://127.0.0.1:{plain_port}")).await;
    let on_plain = format!("laddr=127.0.0.1:{plain_port} ");
    assert_eq!(
        clients.lines().filter(|l| l.contains(&on_plain)).count(),
        1,
        "a connection besides this one on the plain port:\n{clients}"
    );
}
