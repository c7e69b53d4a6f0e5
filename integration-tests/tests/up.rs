//! `merklectl up` brings the whole system up on free ports and, on Ctrl-C (SIGINT), stops it
//! leaving no postgres, redis-server or service process behind.

use std::{
    io::{BufRead as _, BufReader},
    net::TcpListener,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use integration_tests::{
    SERVICES, ServingStatus, free_port, process_exists, run_merklectl_with_token, stack,
    up::{StopOnDrop, free_port_block},
};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// The pids of every descendant of `root` (PostgreSQL's workers included), from /proc.
fn descendants(root: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // The command name in parentheses may hold spaces: the fields after it are fixed.
            let after = &stat[stat.rfind(')')? + 2..];
            let ppid: u32 = after.split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect();
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    found.remove(0);
    found
}

/// `merklectl up` with its data under `data/stack`, its services from port `base`, its own
/// PostgreSQL, Redis and OTLP ports, and its stderr in `data/merklectl.stderr`; nothing of the
/// caller's environment picked up.
fn up(data: &Path, base: u16) -> Command {
    integration_tests::up::command(data, base, free_port().expect("port"))
}

#[tokio::test(flavor = "multi_thread")]
async fn up_serves_everything_and_ctrl_c_leaves_nothing_running() {
    let data = tempfile::tempdir().expect("temporary folder");
    let data_dir = data.path().join("stack");
    let base = free_port_block(10_000, 6);
    let mut child = up(data.path(), base)
        .args(["--fleet-nodes", "1"])
        .spawn()
        .expect("start merklectl up");
    let pid = child.id();
    // The stack's own credentials, which merklectl up made.
    let admin = data_dir.join("auth/admin.token");
    let run_merklectl = |args: &[&str]| run_merklectl_with_token(&admin, args);

    // Read the table; it is printed once every service reports SERVING.
    let stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            lines.push(line);
        }
        lines
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    for spec in &SERVICES {
        let addr = ([127, 0, 0, 1], base + (spec.port - SERVICES[4].port)).into();
        let remaining = deadline.saturating_duration_since(Instant::now());
        stack::wait_for_status(addr, spec.grpc_name, ServingStatus::Serving, remaining)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let mut child = StopOnDrop(child);
    // Discovery's default fleet: this machine's TreeBuilder, the client `local`.
    let discovery = format!("http://127.0.0.1:{}", base + 4);
    let (code, out, err) = run_merklectl(&["clients", "--addr", &discovery, "--json"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains(r#""id":"local""#)
            && out.contains(&format!(
                r#""tree_builder_address":"127.0.0.1:{}""#,
                base + 1
            )),
        "{out}"
    );
    // `merklectl check` (the chart's helm test): every service's health and a read call.
    let addr = |offset: u16| format!("http://127.0.0.1:{}", base + offset);
    let cwd = std::env::current_dir().expect("cwd");
    let check = |discovery: &str| {
        run_merklectl(&[
            "check",
            "--scheduler",
            &addr(0),
            "--tree-builder",
            &addr(1),
            "--db-sync",
            &addr(2),
            "--cache",
            &addr(3),
            "--discovery",
            discovery,
            "--tree-builder-path",
            cwd.to_str().expect("utf-8"),
        ])
    };
    let (code, out, err) = check(&addr(4));
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(out.matches("SERVING").count(), 5, "{out}");
    let closed = format!("http://127.0.0.1:{}", free_port().expect("port"));
    let (code, out, _) = check(&closed);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("discovery") && l.contains("FAILED")),
        "{out}"
    );

    // The stack signs its history with a key it made in its data directory, owner-only, and
    // verify-history trusts that key's public half by default.
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(data_dir.join("signing-key.pem"))
            .expect("signing key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let db_sync = format!("http://127.0.0.1:{}", base + 2);
    let tree = data.path().join("tree");
    std::fs::create_dir_all(&tree).expect("mkdir");
    std::fs::write(tree.join("a"), "1").expect("write");
    let tree = tree.to_str().expect("utf-8");
    let (code, out, err) = run_merklectl(&["push", "docs", tree, "--addr", &db_sync]);
    assert_eq!(code, Some(0), "{out}{err}");
    let data_arg = data_dir.to_str().expect("utf-8");
    let (code, out, err) = run_merklectl(&[
        "verify-history",
        "docs",
        "--addr",
        &db_sync,
        "--data-dir",
        data_arg,
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("records 1..1 (1) verified"), "{out}");
    assert!(out.contains("1 signed by key"), "{out}");

    let running = descendants(pid);
    // Five services, redis-server, and postgres with its workers.
    assert!(
        running.len() >= SERVICES.len() + 3,
        "too few processes: {running:?}"
    );

    kill(Pid::from_raw(pid as i32), Signal::SIGINT).expect("send SIGINT");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("wait") {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "merklectl up did not stop"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = reader.join().expect("reader");
    assert!(
        status.success(),
        "merklectl up exited with {status}:\n{}",
        output.join("\n")
    );
    assert!(
        output.iter().any(|l| l.contains("all processes stopped")),
        "{}",
        output.join("\n")
    );

    // The table named every component's pid; none of them, nor any process it started, runs.
    let table_pids: Vec<u32> = output
        .iter()
        .filter(|l| {
            SERVICES.iter().any(|s| l.starts_with(s.name))
                || l.starts_with("postgres ")
                || l.starts_with("redis ")
        })
        .filter_map(|l| l.split_whitespace().nth(2)?.parse().ok())
        .collect();
    assert_eq!(
        table_pids.len(),
        SERVICES.len() + 2,
        "{}",
        output.join("\n")
    );
    for pid in table_pids.iter().chain(&running) {
        assert!(
            !process_exists(*pid),
            "process {pid} still runs after merklectl up stopped"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn up_watch_prints_each_build_and_names_the_edited_path() {
    let data = tempfile::tempdir().expect("temporary folder");
    let watched = data.path().join("site");
    std::fs::create_dir_all(watched.join("a")).expect("mkdir");
    std::fs::write(watched.join("a/page.html"), "v1").expect("write");
    let base = free_port_block(13_000, 6);
    let mut child = up(data.path(), base)
        .arg("--watch")
        .arg(&watched)
        .args(["--every", "1s"])
        .spawn()
        .expect("start merklectl up");
    let stdout = child.stdout.take().expect("stdout");
    let child = StopOnDrop(child);
    let admin = data.path().join("stack/auth/admin.token");
    let run_merklectl = |args: &[&str]| run_merklectl_with_token(&admin, args);
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let wait_for = |what: &dyn Fn(&str) -> bool, within: Duration, seen: &mut Vec<String>| {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
                let hit = what(&line);
                seen.push(line);
                if hit {
                    return;
                }
            }
        }
        let stderr =
            std::fs::read_to_string(data.path().join("merklectl.stderr")).unwrap_or_default();
        panic!(
            "not seen within {within:?}:\n{}\n--- stderr ---\n{stderr}",
            seen.join("\n")
        );
    };
    let mut seen = Vec::new();
    wait_for(
        &|l| l.contains("watching") && l.contains("as source site"),
        Duration::from_secs(120),
        &mut seen,
    );
    wait_for(
        &|l| l.contains("  site  ") && l.contains("changed"),
        Duration::from_secs(30),
        &mut seen,
    );
    std::fs::write(watched.join("a/page.html"), "v2").expect("edit");
    std::fs::write(watched.join("new.txt"), "new").expect("add");
    wait_for(
        &|l| l.trim() == "M a/page.html",
        Duration::from_secs(30),
        &mut seen,
    );
    wait_for(
        &|l| l.trim() == "A new.txt",
        Duration::from_secs(5),
        &mut seen,
    );
    // Builds that find nothing new are printed too.
    wait_for(
        &|l| l.contains("  site  ") && l.contains("unchanged"),
        Duration::from_secs(30),
        &mut seen,
    );

    // The local receiver got every build's spans: `merklectl trace` shows one as a tree.
    let scheduler = format!("http://127.0.0.1:{base}");
    let (code, out, err) = run_merklectl(&[
        "builds", "site", "--addr", &scheduler, "--json", "--limit", "50",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let build_id = out
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|b| b["state"] == "SUCCEEDED_CHANGED")
        .find_map(|b| b["build_id"].as_str().map(str::to_owned))
        .expect("a succeeded build");
    let stack_dir = data.path().join("stack");
    let stack_arg = stack_dir.to_str().expect("utf-8");
    let trace = |extra: &[&str]| {
        let mut args = vec![
            "trace",
            build_id.as_str(),
            "--addr",
            scheduler.as_str(),
            "--data-dir",
            stack_arg,
        ];
        args.extend_from_slice(extra);
        run_merklectl(&args)
    };
    let (code, out, err) = trace(&[]);
    assert_eq!(code, Some(0), "{out}{err}");
    for service in ["merkle-scheduler", "merkle-tree-builder", "merkle-db-sync"] {
        assert!(
            out.contains(service),
            "{service} missing from the trace:\n{out}"
        );
    }
    assert!(out.contains("TreeBuilderService/BuildTree"), "{out}");
    let (code, json, err) = trace(&["--json"]);
    assert_eq!(code, Some(0), "{err}");
    let otlp: serde_json::Value = serde_json::from_str(&json).expect("OTLP JSON");
    assert!(
        otlp["resourceSpans"]
            .as_array()
            .is_some_and(|r| r.len() >= 3),
        "{json}"
    );
    drop(child);
}

/// The address of service `name` of a stack on `base`.
fn service_addr(base: u16, name: &str) -> std::net::SocketAddr {
    let spec = SERVICES.iter().find(|s| s.name == name).expect("a service");
    ([127, 0, 0, 1], base + (spec.port - SERVICES[4].port)).into()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crashed_service_is_restarted_saying_why_and_the_others_keep_running() {
    let data = tempfile::tempdir().expect("temporary folder");
    let base = free_port_block(16_000, 6);
    let mut child = up(data.path(), base).spawn().expect("start merklectl up");
    let stdout = child.stdout.take().expect("stdout");
    let child = StopOnDrop(child);
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The table: each service's pid.
    let mut pids = std::collections::HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while pids.len() < SERVICES.len() {
        assert!(Instant::now() < deadline, "no table; pids so far {pids:?}");
        let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) else {
            continue;
        };
        let fields: Vec<&str> = line.split_whitespace().collect();
        if let (Some(name), Some(pid)) = (fields.first(), fields.get(2))
            && SERVICES.iter().any(|s| s.name == *name)
            && let Ok(pid) = pid.parse::<u32>()
        {
            pids.insert(name.to_string(), pid);
        }
    }
    let cache = pids["cache"];
    kill(Pid::from_raw(cache as i32), Signal::SIGKILL).expect("kill the cache");

    // Said at once, with the exit status, and restarted after the first backoff.
    let stderr = data.path().join("merklectl.stderr");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&stderr).unwrap_or_default();
        if text.contains("cache restarted") {
            assert!(
                text.contains("cache exited signal: 9 (SIGKILL)"),
                "the reason: {text}"
            );
            assert!(text.contains("cache.log"), "the log's tail: {text}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cache was not restarted:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    stack::wait_for_status(
        service_addr(base, "cache"),
        "merkle.cache.v1.CacheService",
        ServingStatus::Serving,
        Duration::from_secs(30),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    for (name, pid) in &pids {
        if name != "cache" {
            assert!(process_exists(*pid), "{name} was stopped with the cache");
        }
    }
    let mut child = child;
    kill(Pid::from_raw(child.0.id() as i32), Signal::SIGINT).expect("send SIGINT");
    let status = child.0.wait().expect("wait");
    assert!(status.success(), "merklectl up exited with {status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_that_cannot_start_is_reported_at_once_with_why() {
    let data = tempfile::tempdir().expect("temporary folder");
    let base = free_port_block(19_000, 6);
    // Someone else holds DbSync's port.
    let _taken = TcpListener::bind(service_addr(base, "db-sync")).expect("take the port");
    let started = Instant::now();
    let child = up(data.path(), base).spawn().expect("start merklectl up");
    let mut child = StopOnDrop(child);
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("wait") {
            break status;
        }
        // Well before the 60 s a health wait would take.
        assert!(
            started.elapsed() < Duration::from_secs(45),
            "merklectl up still waits"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    let text = std::fs::read_to_string(data.path().join("merklectl.stderr")).expect("stderr");
    assert!(text.contains("db-sync could not start"), "{text}");
    assert!(text.contains("in use"), "names the taken address: {text}");
    // What it had started is stopped: the other services' ports are free again, and no
    // process names the stack's folder (PostgreSQL's and Redis' command lines do).
    for spec in SERVICES.iter().filter(|s| s.name != "db-sync") {
        assert!(
            TcpListener::bind(service_addr(base, spec.name)).is_ok(),
            "{} still holds its port",
            spec.name
        );
    }
    let folder = data.path().display().to_string();
    let left: Vec<String> = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&folder))
        .collect();
    assert!(left.is_empty(), "left running: {left:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn up_with_a_redis_cluster_serves_on_it_and_stops_all_six_nodes() {
    let data = tempfile::tempdir().expect("temporary folder");
    let base = free_port_block(22_000, 6);
    // Six node ports and their six bus ports (+10): sixteen in a row, below the ephemeral
    // ports (which any test's connections take) and apart from the other tests' blocks.
    let redis_port = (26_000..30_000)
        .step_by(41)
        .find(|&p| (p..p + 16).all(|q| TcpListener::bind(("127.0.0.1", q)).is_ok()))
        .expect("sixteen free ports");
    let child = integration_tests::up::command(data.path(), base, redis_port)
        .arg("--redis-cluster")
        .spawn()
        .expect("start merklectl up --redis-cluster");
    let pid = child.id();
    let mut child = StopOnDrop(child);
    let admin = data.path().join("stack/auth/admin.token");
    let stdout = child.0.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let cache = ([127, 0, 0, 1], base + 3).into();
    stack::wait_for_status(
        cache,
        "merkle.cache.v1.CacheService",
        ServingStatus::Serving,
        Duration::from_secs(120),
    )
    .await
    .unwrap_or_else(|e| {
        let stderr = std::fs::read_to_string(data.path().join("merklectl.stderr"));
        panic!("{e}\nmerklectl up said: {}", stderr.unwrap_or_default())
    });
    let addr = format!("http://127.0.0.1:{}", base + 3);
    let (code, out, err) =
        run_merklectl_with_token(&admin, &["cache", "stats", "--json", "--addr", &addr]);
    assert_eq!(code, Some(0), "{err}");
    let stats: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(stats["redis"]["cluster"], true, "{out}");
    assert_eq!(
        stats["redis"]["nodes"].as_array().map(Vec::len),
        Some(3),
        "{out}"
    );
    let servers: Vec<u32> = descendants(pid)
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| c.trim() == "redis-server")
        })
        .collect();
    assert_eq!(servers.len(), 6, "six redis-server nodes: {servers:?}");

    kill(Pid::from_raw(pid as i32), Signal::SIGINT).expect("send SIGINT");
    let started = Instant::now();
    while child.0.try_wait().expect("wait").is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "merklectl up did not stop"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = reader.join().expect("reader");
    assert_eq!(
        output
            .iter()
            .filter(|l| l.starts_with("redis-cluster "))
            .count(),
        6,
        "{}",
        output.join("\n")
    );
    for server in servers {
        assert!(!process_exists(server), "redis-server {server} still runs");
    }
}
