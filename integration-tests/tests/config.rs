//! A bad or missing configuration value stops a service at start with a non-zero exit code and
//! one line that names the environment variable and the rule.

use std::process::Command;

use integration_tests::{SERVICES, binary};

/// Runs a service binary with `env`, authenticated by the harness's identities (so that the
/// setting under test is the one at fault); returns (exit code, stderr).
fn run(binary_name: &str, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let identities = integration_tests::credentials().identities_file();
    let identities = identities.to_str().expect("utf-8").to_owned();
    let mut all = vec![("AUTH_IDENTITIES_FILE", identities.as_str())];
    all.extend_from_slice(env);
    run_without_auth(binary_name, &all)
}

fn run_without_auth(binary_name: &str, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut command = Command::new(binary(binary_name));
    command
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .env_remove("AUTH_IDENTITIES_FILE");
    for (key, value) in env {
        command.env(key, value);
    }
    let out = command.output().expect("run service binary");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_one_line_naming(stderr: &str, variable: &str) {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got:\n{stderr}");
    assert!(
        lines[0].contains(variable),
        "{variable} not named in: {}",
        lines[0]
    );
}

#[test]
fn bad_listen_address_is_named_by_every_service() {
    for spec in &SERVICES {
        let (code, stderr) = run(
            spec.binary,
            &[
                ("LISTEN_ADDR", "not-an-address"),
                ("DATABASE_URL", "postgres://merkle@127.0.0.1:1/merkle"),
                ("REDIS_URL", "redis://127.0.0.1:1/0"),
                ("ALLOWED_ROOTS", "/tmp"),
            ],
        );
        assert_eq!(code, Some(2), "{}: {stderr}", spec.binary);
        assert_one_line_naming(&stderr, "LISTEN_ADDR");
        assert!(stderr.contains("not-an-address"), "{stderr}");
    }
}

#[test]
fn authentication_is_required_unless_disabled_on_purpose() {
    for spec in &SERVICES {
        let (code, stderr) = run_without_auth(
            spec.binary,
            &[
                ("DATABASE_URL", "postgres://merkle@127.0.0.1:1/merkle"),
                ("REDIS_URL", "redis://127.0.0.1:1/0"),
                ("ALLOWED_ROOTS", "/tmp"),
            ],
        );
        assert_eq!(code, Some(2), "{}: {stderr}", spec.binary);
        assert_one_line_naming(&stderr, "AUTH_IDENTITIES_FILE");
        assert!(stderr.contains("AUTH_DISABLED=true"), "{stderr}");
    }
}

#[test]
fn a_bad_identities_file_stops_the_service_naming_the_entry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("identities.yaml");
    std::fs::write(
        &file,
        "identities:\n  - name: alice\n    role: superuser\n    san: alice\n",
    )
    .expect("write");
    let (code, stderr) = run(
        "merkle-discovery",
        &[("AUTH_IDENTITIES_FILE", file.to_str().expect("utf-8"))],
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("AUTH_IDENTITIES_FILE"), "{stderr}");
    assert!(stderr.contains("identities[0].role"), "{stderr}");
    let (code, stderr) = run(
        "merkle-discovery",
        &[("AUTH_IDENTITIES_FILE", "/no/such/file")],
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("/no/such/file"), "{stderr}");
}

#[test]
fn missing_database_url_is_named() {
    let (code, stderr) = run("merkle-db-sync", &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert_one_line_naming(&stderr, "DATABASE_URL");
}

#[test]
fn wrong_database_scheme_is_named_with_the_rule() {
    let (code, stderr) = run("merkle-db-sync", &[("DATABASE_URL", "mysql://127.0.0.1/x")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert_one_line_naming(&stderr, "DATABASE_URL");
    assert!(stderr.contains("postgres://"), "{stderr}");
}

#[test]
fn bad_redis_url_is_named() {
    let (code, stderr) = run("merkle-cache", &[("REDIS_URL", "http://127.0.0.1:6379")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert_one_line_naming(&stderr, "REDIS_URL");
}

#[test]
fn redis_is_named_once_either_as_a_server_or_as_a_cluster() {
    let (code, stderr) = run("merkle-cache", &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert_one_line_naming(&stderr, "REDIS_URL");
    assert!(stderr.contains("REDIS_CLUSTER_NODES"), "{stderr}");
    let (code, stderr) = run(
        "merkle-cache",
        &[
            ("REDIS_URL", "redis://127.0.0.1:1/0"),
            ("REDIS_CLUSTER_NODES", "redis://127.0.0.1:2"),
        ],
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert_one_line_naming(&stderr, "REDIS_CLUSTER_NODES");
    assert!(stderr.contains("not both"), "{stderr}");
    let (code, stderr) = run(
        "merkle-cache",
        &[(
            "REDIS_CLUSTER_NODES",
            "redis://127.0.0.1:2,http://127.0.0.1:3",
        )],
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert_one_line_naming(&stderr, "REDIS_CLUSTER_NODES");
    assert!(stderr.contains("redis://"), "{stderr}");
    let (code, stderr) = run(
        "merkle-cache",
        &[
            ("REDIS_CLUSTER_NODES", "redis://127.0.0.1:2"),
            ("REDIS_WAIT_REPLICAS", "99"),
        ],
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert_one_line_naming(&stderr, "REDIS_WAIT_REPLICAS");
}

#[test]
fn bad_cache_settings_are_named() {
    let redis = ("REDIS_URL", "redis://127.0.0.1:1/0");
    for (variable, value, rule) in [
        ("CACHE_KEY_PREFIX", "team:a", "1-64 characters"),
        ("CACHE_TTL_TREE_META", "400d", "at most 365 days"),
        ("CACHE_COMPRESS_THRESHOLD", "2000000", "at most 1048576"),
        ("REDIS_BREAKER_FAILURES", "0", "1..=1000"),
        ("DB_SYNC_ADDR", "db-sync:50053", "http://"),
        ("CACHE_WARMUP_ON_START", "maybe", "maybe"),
    ] {
        let (code, stderr) = run("merkle-cache", &[redis, (variable, value)]);
        assert_eq!(code, Some(2), "{variable}: {stderr}");
        assert_one_line_naming(&stderr, variable);
        assert!(stderr.contains(rule), "{variable}: {stderr}");
    }
}

#[test]
fn bad_duration_and_range_are_named() {
    let (code, stderr) = run(
        "merkle-tree-builder",
        &[("REQUEST_TIMEOUT", "soon"), ("ALLOWED_ROOTS", "/tmp")],
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert_one_line_naming(&stderr, "REQUEST_TIMEOUT");

    let (code, stderr) = run("merkle-scheduler", &[("MAX_MESSAGE_BYTES", "10")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert_one_line_naming(&stderr, "MAX_MESSAGE_BYTES");

    let (code, stderr) = run("merkle-discovery", &[("LOG_FORMAT", "xml")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert_one_line_naming(&stderr, "LOG_FORMAT");

    for (variable, value) in [("WATCH_RESCAN_INTERVAL", "often"), ("WATCH_TREES", "1000")] {
        let (code, stderr) = run(
            "merkle-tree-builder",
            &[(variable, value), ("ALLOWED_ROOTS", "/tmp")],
        );
        assert_eq!(code, Some(2), "{stderr}");
        assert_one_line_naming(&stderr, variable);
    }
}

#[test]
fn missing_or_bad_allowed_roots_are_named() {
    let (code, stderr) = run("merkle-tree-builder", &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert_one_line_naming(&stderr, "ALLOWED_ROOTS");

    let (code, stderr) = run("merkle-tree-builder", &[("ALLOWED_ROOTS", "/no/such/dir")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert_one_line_naming(&stderr, "ALLOWED_ROOTS");

    let (code, stderr) = run("merkle-tree-builder", &[("ALLOWED_ROOTS", "relative/dir")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert_one_line_naming(&stderr, "absolute");
}

#[test]
fn bad_log_filter_is_named() {
    let (code, stderr) = run("merkle-discovery", &[("LOG_LEVEL", "info,[=")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert_one_line_naming(&stderr, "LOG_LEVEL");
}

#[test]
fn the_effective_config_is_logged_with_the_password_redacted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("db-sync.log");
    let mut command = Command::new(binary("merkle-db-sync"));
    command
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .env(
            "DATABASE_URL",
            "postgres://merkle:hunter2secret@127.0.0.1:1/merkle",
        )
        .env(
            "AUTH_IDENTITIES_FILE",
            integration_tests::credentials().identities_file(),
        );
    let mut process = integration_tests::ManagedProcess::spawn(
        "db-sync",
        command,
        nix::sys::signal::Signal::SIGTERM,
        &log,
    )
    .expect("start");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("serving gRPC") {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no start-up log:\n{text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    process.stop(std::time::Duration::from_secs(10));
    assert!(
        text.contains("postgres://merkle:***@127.0.0.1:1/merkle"),
        "{text}"
    );
    assert!(
        !text.contains("hunter2secret"),
        "the password leaked into the log:\n{text}"
    );
}
