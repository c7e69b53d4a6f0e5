//! `merklectl up`: the whole system on one machine.
//!
//! Without `DATABASE_URL`/`REDIS_URL` it starts its own PostgreSQL and Redis with their data
//! under `--data-dir` (`.data/` by default, ignored by git), then the five services as separate
//! processes, waits until every one reports SERVING, prints what runs where, and on Ctrl-C or
//! SIGTERM stops everything in reverse order and checks that no process is left. Meanwhile it
//! supervises the services (`crate::supervise`): one that crashes is restarted with backoff,
//! saying why, and the others keep running; only Ctrl-C or SIGTERM ends the stack.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};
use nix::{sys::signal::kill, unistd::Pid};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    stack::{self, Postgres, Redis, RedisCluster, SERVICES, ServiceSpec, StackError},
    supervise::{NotServing, Supervised},
};

/// Options of `merklectl up`.
#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    /// Where the embedded PostgreSQL and Redis keep their data, and where logs go.
    #[arg(long, default_value = ".data")]
    pub data_dir: PathBuf,
    /// Port of the embedded PostgreSQL (when DATABASE_URL is not set).
    #[arg(long, default_value_t = 55432)]
    pub postgres_port: u16,
    /// Port of the embedded Redis (when REDIS_URL is not set).
    #[arg(long, default_value_t = 56379)]
    pub redis_port: u16,
    /// Use this PostgreSQL instead of starting one.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Use this Redis instead of starting one.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// Start a local Redis Cluster instead of one Redis: three masters and three replicas on
    /// --redis-port and the five ports after it (cluster bus on those ports + 10), handed to
    /// the Cache as REDIS_CLUSTER_NODES.
    #[arg(long, conflicts_with = "redis_url")]
    pub redis_cluster: bool,
    /// Port of the Scheduler; the others follow in the documented order (TreeBuilder +1,
    /// DbSync +2, Cache +3, Discovery +4).
    #[arg(long, default_value_t = merkle_shared::ports::SCHEDULER)]
    pub base_port: u16,
    /// A directory TreeBuilder may hash (repeatable; default: the current directory).
    #[arg(long = "allowed-root", value_name = "DIR")]
    pub allowed_roots: Vec<PathBuf>,
    /// Do not run `cargo build` first, even when started by `cargo run`.
    #[arg(long)]
    pub no_build: bool,
    /// Register DIR as a source (and an allowed root) and print each of its builds as it
    /// completes, with the paths that changed.
    #[arg(long, value_name = "DIR")]
    pub watch: Option<PathBuf>,
    /// How often the watched directory is built.
    #[arg(long, default_value = "30s", requires = "watch")]
    pub every: String,
    /// Where Discovery lists the fleet's nodes: `static`, `nomad` or `kubernetes`. The other
    /// backend settings (`NOMAD_TOKEN`, `NOMAD_REGION`, `NOMAD_CACERT`, ..., `KUBECONFIG`,
    /// `KUBERNETES_RESOURCE`, ...) pass from this environment to Discovery as they are.
    #[arg(long, env = "DISCOVERY_BACKEND", default_value = "static")]
    pub discovery_backend: String,
    /// The static backend's file (default: one under --data-dir listing this machine's
    /// TreeBuilder as the client `local`).
    #[arg(long, env = "STATIC_FILE", value_name = "FILE")]
    pub static_file: Option<PathBuf>,
    /// Nomad's HTTP API, for `--discovery-backend nomad`.
    #[arg(long, env = "NOMAD_ADDR", value_name = "URL")]
    pub nomad_addr: Option<String>,
    /// Also run N more TreeBuilders (on the ports after Discovery's), listed with this
    /// machine's as the fleet's clients `node-1` ... `node-N`: a local fleet for sources
    /// added with `--fleet`. Each node's first allowed root is its own folder,
    /// DATA_DIR/nodes/node-N, so a relative fleet path names a different directory on each
    /// node, as on separate machines (absolute paths under the allowed roots are shared).
    /// Only with the default static backend and file.
    #[arg(long, value_name = "N", default_value_t = 0,
          value_parser = clap::value_parser!(u16).range(0..=16))]
    pub fleet_nodes: u16,
    /// Port of the local OTLP trace receiver every service sends its spans to (see
    /// `merklectl trace`); not started when OTEL_EXPORTER_OTLP_ENDPOINT is set, as the
    /// services then export there.
    #[arg(long, default_value_t = 4317)]
    pub otlp_port: u16,
}

impl UpArgs {
    fn port_of(&self, spec: &ServiceSpec) -> u16 {
        self.base_port + (spec.port - merkle_shared::ports::SCHEDULER)
    }

    /// The port of the `n`th extra fleet node (from 1), after the five services'.
    fn node_port(&self, n: u16) -> u16 {
        self.base_port + SERVICES.len() as u16 - 1 + n
    }
}

/// The folder the local fleet's node `n` resolves relative paths in: its own "machine".
pub fn node_root(data_dir: &std::path::Path, n: u16) -> PathBuf {
    data_dir.join("nodes").join(format!("node-{n}"))
}

/// Runs the stack until Ctrl-C or SIGTERM.
pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;

    if args.fleet_nodes > 0 && (args.discovery_backend != "static" || args.static_file.is_some()) {
        bail!(
            "--fleet-nodes lists its nodes in the static file merklectl up writes: it cannot be \
             used with --discovery-backend {} or --static-file",
            args.discovery_backend
        );
    }
    build_services_if_under_cargo(&args)?;
    for spec in &SERVICES {
        stack::service_binary(spec)?;
    }
    std::fs::create_dir_all(args.data_dir.join("logs"))
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let data_dir = std::fs::canonicalize(&args.data_dir)?;
    // PostgreSQL may run as another user, who must be able to reach its folder inside.
    set_mode(&data_dir, 0o755)?;

    let mut postgres = None;
    let database_url = match &args.database_url {
        Some(url) => url.clone(),
        None => {
            ensure_installed(stack::postgres_bindir().map(drop), "postgresql")?;
            let pg = Postgres::start(&data_dir.join("postgres"), args.postgres_port).await?;
            let url = pg.url();
            postgres = Some(pg);
            url
        }
    };
    let mut redis = None;
    let mut redis_cluster = None;
    let redis_url = match &args.redis_url {
        Some(url) => RedisAt::Url(url.clone()),
        None if args.redis_cluster => {
            ensure_installed(stack::redis_cli_path().map(drop), "redis-server")?;
            let port = |i: u16| args.redis_port.saturating_add(i);
            let ports = [0, 1, 2, 3, 4, 5].map(port);
            let bus_ports = [10, 11, 12, 13, 14, 15].map(port);
            // A cluster's nodes keep their identity in nodes.conf: a new one each time.
            let dir = data_dir.join("redis-cluster");
            let _ = std::fs::remove_dir_all(&dir);
            let cluster = RedisCluster::start(&dir, ports, bus_ports).await?;
            let urls = cluster.urls();
            redis_cluster = Some(cluster);
            RedisAt::Cluster(urls)
        }
        None => {
            ensure_installed(stack::redis_server_path().map(drop), "redis-server")?;
            let r = Redis::start(&data_dir.join("redis"), args.redis_port).await?;
            let url = r.url();
            redis = Some(r);
            RedisAt::Url(url)
        }
    };

    let watched = args
        .watch
        .as_ref()
        .map(|dir| std::fs::canonicalize(dir).with_context(|| format!("--watch {}", dir.display())))
        .transpose()?;
    let every = humantime::parse_duration(&args.every)
        .with_context(|| format!("--every {}", args.every))?;
    let mut allowed_roots: Vec<PathBuf> = if args.allowed_roots.is_empty() {
        vec![std::env::current_dir()?]
    } else {
        args.allowed_roots
            .iter()
            .map(|p| {
                std::fs::canonicalize(p).with_context(|| format!("--allowed-root {}", p.display()))
            })
            .collect::<anyhow::Result<_>>()?
    };
    if let Some(dir) = &watched
        && !allowed_roots.iter().any(|root| dir.starts_with(root))
    {
        allowed_roots.push(dir.clone());
    }
    // Traces: a collector of the person's own (OTEL_EXPORTER_OTLP_ENDPOINT, inherited by
    // every service), else the local receiver.
    let mut telemetry_env: Vec<(&'static str, String)> = Vec::new();
    let traces = if std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").is_ok_and(|v| !v.is_empty()) {
        None
    } else {
        let addr = SocketAddr::from(([127, 0, 0, 1], args.otlp_port));
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("the OTLP receiver cannot listen on {addr}; pass --otlp-port")
        })?;
        let receiver =
            crate::traces::Receiver::to_file(&data_dir.join(crate::traces::TRACES_FILE))?;
        receiver.serve(listener);
        telemetry_env.extend([
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}")),
            // The receiver takes traces; metrics are on each service's /metrics.
            ("OTEL_METRICS_EXPORTER", "none".to_owned()),
            ("OTEL_BSP_SCHEDULE_DELAY", "500".to_owned()),
        ]);
        Some(addr)
    };
    let discovery_env = discovery_env(&args, &data_dir)?;
    // DbSync signs the history with the stack's own key; `verify-history` trusts its public
    // half by default.
    let signing_key = crate::history::ensure_signing_key(&data_dir)?;
    // Every call is authenticated: the stack's services and this process use the tokens made
    // here (other commands find the admin token in the data folder).
    let credentials = crate::credentials::Credentials::ensure(&data_dir)?;
    merkle_shared::auth::token::install(&credentials.token("admin")?)
        .map_err(anyhow::Error::msg)?;
    let mut services: Vec<Supervised> = Vec::new();
    for spec in SERVICES {
        let port = args.port_of(&spec);
        let mut env = service_env(&spec, &args, &database_url, &redis_url);
        env.extend(telemetry_env.iter().cloned());
        env.extend(credentials.service_env(spec.name));
        if spec.name == "tree-builder" {
            let roots: Vec<String> = allowed_roots
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            env.push(("ALLOWED_ROOTS", roots.join(",")));
            env.push((
                "STAT_CACHE_DIR",
                data_dir.join("stat-cache").display().to_string(),
            ));
        }
        // A person who asks to watch every few seconds gets it, below the usual floor.
        if spec.name == "scheduler" && watched.is_some() && every < Duration::from_secs(10) {
            env.push((
                "MIN_INTERVAL",
                humantime::format_duration(every).to_string(),
            ));
        }
        if spec.name == "discovery" {
            env.extend(discovery_env.iter().cloned());
        }
        if spec.name == "db-sync" {
            env.push(("SIGNING_KEY_FILE", signing_key.display().to_string()));
        }
        let log = data_dir.join("logs").join(format!("{}.log", spec.name));
        services.push(Supervised::start(spec.name, spec, port, env, log)?);
    }
    // The local fleet's extra TreeBuilders, as `node-1` ... `node-N`.
    let tree_builder_spec = *SERVICES
        .iter()
        .find(|s| s.name == "tree-builder")
        .context("the tree-builder service")?;
    let mut nodes: Vec<Supervised> = Vec::new();
    for n in 1..=args.fleet_nodes {
        let name = format!("node-{n}");
        let port = args.node_port(n);
        let mut env = service_env(&tree_builder_spec, &args, &database_url, &redis_url);
        env.extend(telemetry_env.iter().cloned());
        env.extend(credentials.service_env(tree_builder_spec.name));
        let own = node_root(&data_dir, n);
        std::fs::create_dir_all(&own).with_context(|| format!("creating {}", own.display()))?;
        let roots: Vec<String> = std::iter::once(&own)
            .chain(&allowed_roots)
            .map(|p| p.display().to_string())
            .collect();
        env.push(("ALLOWED_ROOTS", roots.join(",")));
        let log = data_dir.join("logs").join(format!("{name}.log"));
        nodes.push(Supervised::start(&name, tree_builder_spec, port, env, log)?);
    }
    for node in &mut nodes {
        node.wait_serving(Duration::from_secs(60)).await?;
    }

    let mut statuses = Vec::new();
    for service in &mut services {
        // An external orchestrator that does not answer yet leaves Discovery NOT_SERVING,
        // not the stack down: it serves once the backend answers.
        let external = service.name == "discovery" && args.discovery_backend != "static";
        let wait = if external { 15 } else { 60 };
        match service.wait_serving(Duration::from_secs(wait)).await {
            Ok(()) => statuses.push("SERVING"),
            Err(NotServing::Late(err)) if external => {
                eprintln!(
                    "warning: discovery is not serving yet: its {} backend has not answered \
                     ({err})",
                    args.discovery_backend,
                );
                statuses.push("NOT_SERVING");
            }
            Err(err) => return Err(err.into()),
        }
    }

    print_table(
        &services,
        &statuses,
        postgres.as_ref(),
        redis.as_ref(),
        redis_cluster.as_ref(),
        &database_url,
        &redis_url,
    );
    for (node, n) in nodes.iter().zip(1..) {
        println!(
            "{:<14} {:<18} {:>8}  SERVING  {} (a fleet node; relative paths in {})",
            node.name,
            node.addr.to_string(),
            node.pid(),
            tree_builder_spec.grpc_name,
            node_root(&data_dir, n).display()
        );
    }
    let tree_builder = SERVICES
        .iter()
        .find(|s| s.name == "tree-builder")
        .map_or(0, |s| args.port_of(s));
    let roots: Vec<String> = allowed_roots
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    println!("\nTreeBuilder may hash under: {}", roots.join(", "));
    let operator_token = credentials.token_file("operator");
    println!(
        "try: grpcurl -plaintext -H \"authorization: Bearer $(cat {})\" -d '{{\"path\":\"{}\"}}' \
         127.0.0.1:{tree_builder} merkle.treebuilder.v1.TreeBuilderService/BuildTree",
        operator_token.display(),
        roots[0]
    );
    println!(
        "credentials: {} (tokens for admin, operator, reader and each service; merklectl \
         commands run here use admin.token, elsewhere set {}=<token file>)",
        data_dir.join(crate::credentials::DIR).display(),
        crate::credentials::TOKEN_FILE_VARIABLE
    );
    match traces {
        Some(addr) => println!(
            "traces: OTLP receiver on {addr}, spans in {}; see one build with `merklectl trace BUILD_ID`",
            data_dir.join(crate::traces::TRACES_FILE).display()
        ),
        None => println!("traces: sent to OTEL_EXPORTER_OTLP_ENDPOINT (no local receiver)"),
    }
    println!("logs: {}/logs   stop: Ctrl-C", data_dir.display());

    let address = |name: &str| {
        SERVICES
            .iter()
            .find(|s| s.name == name)
            .map(|s| format!("http://127.0.0.1:{}", args.port_of(s)))
            .unwrap_or_default()
    };
    let mut follow = match &watched {
        Some(dir) => Some(
            crate::watch::Follow::start(&address("scheduler"), &address("db-sync"), dir, every)
                .await?,
        ),
        None => None,
    };
    let reason = loop {
        tokio::select! {
            _ = interrupt.recv() => break "interrupted".to_owned(),
            _ = terminate.recv() => break "terminated".to_owned(),
            () = tokio::time::sleep(Duration::from_millis(250)) => {
                // A crashed service is restarted with backoff; the others keep running.
                for service in services.iter_mut().chain(nodes.iter_mut()) {
                    if let Some(news) = service.tend() {
                        eprintln!("{news}");
                    }
                }
                if let Some(follow) = follow.as_mut() {
                    follow.print_new().await;
                }
            }
        }
    };
    println!("\n{reason}: stopping ...");

    let mut pids: Vec<(String, u32)> = Vec::new();
    for mut service in nodes.into_iter().rev().chain(services.into_iter().rev()) {
        pids.push((service.name.clone(), service.pid()));
        let status = service.stop(Duration::from_secs(25));
        println!("  {:<13} stopped ({})", service.name, describe(status));
    }
    let cluster_nodes = redis_cluster
        .as_mut()
        .map(|c| c.nodes_mut().iter_mut().collect::<Vec<_>>())
        .unwrap_or_default();
    for r in redis.iter_mut().chain(cluster_nodes) {
        if let Some(pid) = r.pid() {
            pids.push(("redis-server".into(), pid));
        }
        r.stop();
        println!("  {:<13} stopped (port {})", "redis-server", r.port());
    }
    if let Some(mut pg) = postgres {
        if let Some(pid) = pg.pid() {
            pids.push(("postgres".into(), pid));
        }
        pg.stop();
        println!("  {:<13} stopped", "postgres");
    }
    let left: Vec<String> = pids
        .iter()
        .filter(|(_, pid)| kill(Pid::from_raw(*pid as i32), None).is_ok())
        .map(|(name, pid)| format!("{name} ({pid})"))
        .collect();
    if left.is_empty() {
        println!("all processes stopped");
        Ok(())
    } else {
        bail!("still running: {}", left.join(", "))
    }
}

fn describe(status: Option<std::process::ExitStatus>) -> String {
    match status {
        Some(s) => s.to_string(),
        None => "did not exit".to_owned(),
    }
}

/// Under `cargo run` (which sets `CARGO`), builds every service binary first so that none is
/// stale; the build uses the same profile as this program.
fn build_services_if_under_cargo(args: &UpArgs) -> anyhow::Result<()> {
    let Some(cargo) = std::env::var_os("CARGO") else {
        return Ok(());
    };
    if args.no_build {
        return Ok(());
    }
    let mut command = Command::new(cargo);
    command.args(["build", "--workspace", "--bins"]);
    if stack::binary_dir()?.ends_with("release") {
        command.arg("--release");
    }
    let status = command.status().context("running cargo build")?;
    if !status.success() {
        bail!("cargo build --workspace --bins failed ({status})");
    }
    Ok(())
}

/// Installs a missing server package when possible (root with apt), else fails naming it.
fn ensure_installed(found: Result<(), StackError>, package: &str) -> anyhow::Result<()> {
    match found {
        Ok(()) => Ok(()),
        Err(StackError::Missing { .. }) => {
            stack::install_package(package)?;
            Ok(())
        }
        Err(err) => Err(err.into()),
    }
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

/// Discovery's backend settings. With the static backend and no file, one is written listing
/// this machine's TreeBuilder, so `merklectl clients` and fleet builds work out of the box.
fn discovery_env(args: &UpArgs, data_dir: &Path) -> anyhow::Result<Vec<(&'static str, String)>> {
    let mut env = vec![("DISCOVERY_BACKEND", args.discovery_backend.clone())];
    if let Some(addr) = &args.nomad_addr {
        env.push(("NOMAD_ADDR", addr.clone()));
    }
    if args.discovery_backend == "static" {
        let file = match &args.static_file {
            Some(file) => std::fs::canonicalize(file)
                .with_context(|| format!("--static-file {}", file.display()))?,
            None => {
                let port = SERVICES
                    .iter()
                    .find(|s| s.name == "tree-builder")
                    .map_or(0, |s| args.port_of(s));
                let file = data_dir.join("clients.yaml");
                let mut text = format!(
                    "# Written by merklectl up: this machine's TreeBuilders as the clients.\n\
                     clients:\n  - id: local\n    address: 127.0.0.1:{port}\n    \
                     tree_builder_address: 127.0.0.1:{port}\n"
                );
                for n in 1..=args.fleet_nodes {
                    let port = args.node_port(n);
                    text.push_str(&format!(
                        "  - id: node-{n}\n    address: 127.0.0.1:{port}\n    \
                         tree_builder_address: 127.0.0.1:{port}\n"
                    ));
                }
                std::fs::write(&file, text)
                    .with_context(|| format!("writing {}", file.display()))?;
                file
            }
        };
        env.push(("STATIC_FILE", file.display().to_string()));
    }
    Ok(env)
}

/// The environment of one service: where its dependencies and peers are.
fn service_env(
    spec: &ServiceSpec,
    args: &UpArgs,
    database_url: &str,
    redis_url: &RedisAt,
) -> Vec<(&'static str, String)> {
    let mut env = vec![("LOG_FORMAT", "json".to_owned())];
    if spec.needs_postgres {
        env.push(("DATABASE_URL", database_url.to_owned()));
    }
    if spec.needs_redis {
        env.push(match redis_url {
            RedisAt::Url(url) => ("REDIS_URL", url.clone()),
            RedisAt::Cluster(urls) => ("REDIS_CLUSTER_NODES", urls.clone()),
        });
    }
    for peer in &SERVICES {
        env.push((
            peer.addr_var,
            format!("http://127.0.0.1:{}", args.port_of(peer)),
        ));
    }
    env
}

fn print_table(
    services: &[Supervised],
    statuses: &[&str],
    postgres: Option<&Postgres>,
    redis: Option<&Redis>,
    redis_cluster: Option<&RedisCluster>,
    database_url: &str,
    redis_url: &RedisAt,
) {
    println!(
        "\n{:<14} {:<18} {:>8}  {:<11} {:<34} SERVICE",
        "COMPONENT", "ADDRESS", "PID", "STATUS", "METRICS"
    );
    for (service, status) in services.iter().zip(statuses) {
        let metrics = merkle_shared::metrics::admin_addr(None, service.addr)
            .map(|a| format!("http://{a}/metrics"))
            .unwrap_or_default();
        println!(
            "{:<14} {:<18} {:>8}  {status:<11} {metrics:<34} {}",
            service.name,
            service.addr.to_string(),
            service.pid(),
            service.spec.grpc_name
        );
    }
    dependency_row(
        "postgres",
        postgres.map(|pg| (pg.port(), pg.pid(), pg.url())),
        database_url,
    );
    match (redis_cluster, redis_url) {
        (Some(cluster), _) => {
            for node in cluster.nodes() {
                dependency_row(
                    "redis-cluster",
                    Some((node.port(), node.pid(), node.url())),
                    "",
                );
            }
        }
        (None, RedisAt::Url(url) | RedisAt::Cluster(url)) => {
            dependency_row("redis", redis.map(|r| (r.port(), r.pid(), r.url())), url)
        }
    }
}

/// Where the Cache finds Redis.
enum RedisAt {
    /// One server (`REDIS_URL`).
    Url(String),
    /// A cluster's nodes, comma-separated (`REDIS_CLUSTER_NODES`).
    Cluster(String),
}

/// One table row for PostgreSQL or Redis: ours (port, pid, URL) or an external one.
fn dependency_row(name: &str, ours: Option<(u16, Option<u32>, String)>, external_url: &str) {
    match ours {
        Some((port, pid, url)) => println!(
            "{name:<14} {:<18} {:>8}  running  {url}",
            format!("127.0.0.1:{port}"),
            pid.unwrap_or(0)
        ),
        None => println!(
            "{name:<14} {:<18} {:>8}  external {}",
            "-",
            "-",
            merkle_shared::config::redact_url(external_url)
        ),
    }
}
