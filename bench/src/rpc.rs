//! Measuring gRPC services as their clients see them: latency percentiles and throughput with
//! N concurrent clients (one HTTP/2 connection each), and the bare tonic echo server that is
//! the floor of any gRPC service on this machine (one hop, no storage).
//!
//! The echo is `grpc.health.v1.Health/Check` answered from memory by a plain tonic server in a
//! process of its own, so it pays what every service pays (HTTP/2, protobuf, the runtime) and
//! nothing else. With `--forward` it calls the next echo before answering: two hops.

use std::{
    future::Future,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use merklectl::stack::{self, ManagedProcess, free_port};
use nix::sys::signal::Signal;
use tonic::{Request, Response, Status};

/// The channel every benchmark client uses: tonic's, with the bearer token (`channel`).
pub type Channel = merkle_shared::auth::token::ClientAuth<tonic::transport::Channel>;
use tonic_health::pb::{
    HealthCheckRequest, HealthCheckResponse,
    health_check_response::ServingStatus as Serving,
    health_check_response::ServingStatus,
    health_client::HealthClient,
    health_server::{Health, HealthServer},
};

/// Options of `merkle-bench echo-server`.
#[derive(Debug, clap::Args)]
pub struct EchoArgs {
    /// Port on 127.0.0.1.
    #[arg(long)]
    port: u16,
    /// Another echo to call before answering, e.g. http://127.0.0.1:PORT.
    #[arg(long)]
    forward: Option<String>,
}

struct Echo {
    next: Option<HealthClient<Channel>>,
}

#[tonic::async_trait]
impl Health for Echo {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        if let Some(next) = &self.next {
            return next.clone().check(request.into_inner()).await;
        }
        Ok(Response::new(HealthCheckResponse {
            status: ServingStatus::Serving as i32,
        }))
    }

    type WatchStream = tokio_stream::Empty<Result<HealthCheckResponse, Status>>;

    async fn watch(
        &self,
        _request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("the echo answers Check only"))
    }
}

/// Serves the echo until killed.
pub fn serve_echo(args: EchoArgs) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(async move {
        let next = match args.forward {
            Some(uri) => Some(HealthClient::new(channel(&uri)?)),
            None => None,
        };
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], args.port));
        let incoming = tonic::transport::server::TcpIncoming::bind(addr)
            .map_err(|e| anyhow::anyhow!("binding {addr}: {e}"))?
            .with_nodelay(Some(true));
        tonic::transport::Server::builder()
            .add_service(HealthServer::new(Echo { next }))
            .serve_with_incoming(incoming)
            .await?;
        anyhow::Ok(())
    })
}

/// A running echo server process (stopped when dropped).
pub struct EchoProcess {
    pub uri: String,
    pub pid: u32,
    _process: ManagedProcess,
}

/// Starts an echo server (forwarding to `forward`, if given) and waits until it answers.
pub async fn start_echo(work: &Path, forward: Option<&str>) -> anyhow::Result<EchoProcess> {
    let port = free_port()?;
    let mut command = Command::new(std::env::current_exe()?);
    command.args(["echo-server", "--port", &port.to_string()]);
    if let Some(uri) = forward {
        command.args(["--forward", uri]);
    }
    let log = work.join(format!("echo-{port}.log"));
    let process = ManagedProcess::spawn("echo", command, Signal::SIGTERM, &log)?;
    let uri = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut client = HealthClient::new(channel(&uri)?);
        if client.check(HealthCheckRequest::default()).await.is_ok() {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the echo server did not start; see {}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(EchoProcess {
        uri,
        pid: process.pid(),
        _process: process,
    })
}

/// A release service binary the benchmark started (stopped when dropped).
pub struct Service {
    pub uri: String,
    pub pid: u32,
    _process: stack::ManagedProcess,
}

/// Starts the service `name` on a free loopback port with `env` (quiet logs) and waits until
/// it is SERVING.
pub async fn start_service(
    work: &Path,
    name: &str,
    env: &[(&str, String)],
) -> anyhow::Result<Service> {
    start_binary(work, name, None, env).await
}

/// [`start_service`] of another build of the service, `binary` (e.g. one built from an older
/// commit, to measure a change beside it in one run).
pub async fn start_binary(
    work: &Path,
    name: &str,
    binary: Option<&Path>,
    env: &[(&str, String)],
) -> anyhow::Result<Service> {
    let spec = stack::SERVICES
        .iter()
        .find(|s| s.name == name)
        .context("service spec")?;
    let port = stack::free_port()?;
    let mut all = vec![
        ("LOG_LEVEL", "warn".to_owned()),
        ("HEALTH_CHECK_INTERVAL", "200ms".to_owned()),
    ];
    // Authenticated as in production; the benchmark's clients call as the admin.
    let credentials = merklectl::credentials::Credentials::ensure(work)?;
    all.extend(credentials.service_env(name));
    merkle_shared::auth::token::install(&credentials.token("admin")?)
        .map_err(anyhow::Error::msg)?;
    all.extend(env.iter().cloned());
    let log = work.join(format!("{name}-{port}.log"));
    let process = match binary {
        None => stack::spawn_service(spec, port, &all, &log)?,
        Some(binary) => {
            let mut command = std::process::Command::new(binary);
            command.env("LISTEN_ADDR", format!("127.0.0.1:{port}"));
            command.envs(all.iter().map(|(k, v)| (k, v)));
            stack::ManagedProcess::spawn(
                spec.name,
                command,
                nix::sys::signal::Signal::SIGTERM,
                &log,
            )?
        }
    };
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    stack::wait_for_status(
        addr,
        spec.grpc_name,
        Serving::Serving,
        Duration::from_secs(30),
    )
    .await?;
    Ok(Service {
        uri: format!("http://{addr}"),
        pid: process.pid(),
        _process: process,
    })
}

/// The storage half of a release stack in a temporary folder of its own: PostgreSQL, Redis,
/// the Cache and DbSync. Everything stops when dropped, in the order of the fields: the
/// services, then what they use, then the folder.
pub struct Storage {
    pub db_sync: Service,
    pub cache: Service,
    pub redis: stack::Redis,
    pub postgres: stack::Postgres,
    pub work: tempfile::TempDir,
}

impl Storage {
    /// Starts it in a folder named `prefix`..., whose path it prints (the logs are there).
    pub async fn start(prefix: &str) -> anyhow::Result<Storage> {
        let mut work = tempfile::Builder::new().prefix(prefix).tempdir()?;
        // BENCH_KEEP=1 keeps the folder (the services' logs, PostgreSQL's data) for a look.
        work.disable_cleanup(std::env::var_os("BENCH_KEEP").is_some_and(|v| v == "1"));
        let w = work.path();
        eprintln!("logs in {}", w.display());
        {
            // The server user of PostgreSQL (when run as root) must reach its folder.
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(w, std::fs::Permissions::from_mode(0o755))?;
        }
        let postgres = stack::Postgres::start(&w.join("postgres"), free_port()?).await?;
        let redis = stack::Redis::start(&w.join("redis"), free_port()?).await?;
        let cache = start_service(w, "cache", &[("REDIS_URL", redis.url())]).await?;
        let db_sync = start_service(
            w,
            "db-sync",
            &[
                ("DATABASE_URL", postgres.url()),
                ("CACHE_ADDR", cache.uri.clone()),
            ],
        )
        .await?;
        Ok(Storage {
            db_sync,
            cache,
            redis,
            postgres,
            work,
        })
    }

    pub fn dir(&self) -> &Path {
        self.work.path()
    }
}

/// A fresh connection to `uri` (each simulated client has its own, as separate clients would),
/// presenting the benchmark's token as real clients present theirs.
pub fn channel(uri: &str) -> anyhow::Result<Channel> {
    let plain = tonic::transport::Endpoint::from_shared(uri.to_owned())?
        .tcp_nodelay(true)
        .connect_lazy();
    Ok(tower::Layer::layer(
        &merkle_shared::auth::token::ClientAuthLayer::process(),
        plain,
    ))
}

/// A fresh connection to `uri` presenting `identity`'s token (e.g. `db-sync`, to write into a
/// cache namespace only that service owns), from the credentials in `work`.
pub fn channel_as(work: &Path, uri: &str, identity: &str) -> anyhow::Result<Channel> {
    let token = merklectl::credentials::Credentials::ensure(work)?.token(identity)?;
    let plain = tonic::transport::Endpoint::from_shared(uri.to_owned())?
        .tcp_nodelay(true)
        .connect_lazy();
    let layer = merkle_shared::auth::token::ClientAuthLayer::with_token(&token)
        .map_err(anyhow::Error::msg)?;
    Ok(tower::Layer::layer(&layer, plain))
}

/// One echo call.
pub async fn echo_call(mut client: HealthClient<Channel>) -> anyhow::Result<()> {
    client.check(HealthCheckRequest::default()).await?;
    Ok(())
}

/// CPU time a process has used so far (user and system), in seconds.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name in parentheses may hold spaces: the fields after it are fixed
    // (utime and stime are the 14th and 15th of the line, the 12th and 13th after it).
    let after = &stat[stat.rfind(')').context("stat")? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields.get(11).context("utime")?.parse::<u64>()?
        + fields.get(12).context("stime")?.parse::<u64>()?;
    // In clock ticks of USER_HZ, which Linux fixes at 100 for what /proc shows.
    Ok(ticks as f64 / 100.0)
}

/// Peak resident memory of a process (VmHWM), in bytes.
pub fn peak_rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("VmHWM")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmHWM value")?
        .parse::<u64>()?
        * 1024)
}

/// Resets a process's peak resident memory (VmHWM) to what it uses now, so that the next
/// reading is the peak of what ran in between.
pub fn reset_peak_rss(pid: u32) -> anyhow::Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .with_context(|| format!("resetting the peak RSS of process {pid}"))
}

/// Runs `measuring` and records the peak RSS of process `pid` (the server measured) during it.
pub async fn on(
    pid: u32,
    measuring: impl Future<Output = anyhow::Result<Load>>,
) -> anyhow::Result<Load> {
    reset_peak_rss(pid)?;
    let mut load = measuring.await?;
    load.peak_rss = Some(peak_rss(pid)?);
    Ok(load)
}

/// What a load run measured.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub clients: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub calls_per_sec: f64,
    /// The peak RSS of the process that served it, during the run (see [`on`]).
    pub peak_rss: Option<u64>,
}

/// Runs `clients` concurrent clients, each calling `call` back to back on its own connection
/// (made by `connect`) for `duration`, after 100 warm-up calls each.
pub async fn measure<C, F, Fut>(
    clients: usize,
    duration: Duration,
    connect: impl Fn() -> anyhow::Result<C>,
    call: F,
) -> anyhow::Result<Load>
where
    C: Clone + Send + 'static,
    F: Fn(C) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let mut tasks = Vec::new();
    let start = tokio::sync::Barrier::new(clients + 1);
    let start = std::sync::Arc::new(start);
    for _ in 0..clients {
        let client = connect()?;
        let call = call.clone();
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..100 {
                call(client.clone()).await?;
            }
            start.wait().await;
            let deadline = Instant::now() + duration;
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                call(client.clone()).await?;
                latencies.push(t.elapsed());
            }
            anyhow::Ok(latencies)
        }));
    }
    start.wait().await;
    let began = Instant::now();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.context("client task")??);
    }
    let elapsed = began.elapsed();
    all.sort_unstable();
    anyhow::ensure!(!all.is_empty(), "no call completed");
    let at = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
    Ok(Load {
        clients,
        p50: at(0.50),
        p99: at(0.99),
        calls_per_sec: all.len() as f64 / elapsed.as_secs_f64(),
        peak_rss: None,
    })
}

/// The load of the median round, by p50.
pub fn median(mut loads: Vec<Load>) -> Load {
    loads.sort_by_key(|l| l.p50);
    loads[loads.len() / 2]
}

/// `redis-benchmark -t set,get` against `port` with `clients` connections; returns its GET row.
pub fn redis_benchmark(port: u16, clients: usize, requests: usize) -> anyhow::Result<Load> {
    let out = Command::new("redis-benchmark")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            "set,get",
            "-d",
            "64",
            "--csv",
        ])
        .args(["-c", &clients.to_string(), "-n", &requests.to_string()])
        .output()
        .context("running redis-benchmark (Debian package redis-tools)")?;
    anyhow::ensure!(
        out.status.success(),
        "redis-benchmark failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<Vec<String>> = text
        .lines()
        .map(|l| {
            l.split(',')
                .map(|f| f.trim_matches('"').to_owned())
                .collect()
        })
        .collect();
    let header = rows.first().context("redis-benchmark printed nothing")?;
    let column = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .with_context(|| format!("redis-benchmark --csv has no {name} column"))
    };
    let (rps, p50, p99) = (
        column("rps")?,
        column("p50_latency_ms")?,
        column("p99_latency_ms")?,
    );
    let get = rows
        .iter()
        .find(|r| r.first().is_some_and(|t| t == "GET"))
        .context("redis-benchmark printed no GET row")?;
    let ms = |i: usize| -> anyhow::Result<Duration> {
        Ok(Duration::from_secs_f64(get[i].parse::<f64>()? / 1000.0))
    };
    Ok(Load {
        clients,
        p50: ms(p50)?,
        p99: ms(p99)?,
        calls_per_sec: get[rps].parse()?,
        peak_rss: None,
    })
}

/// A table row: what was measured and how.
pub struct Row {
    pub what: String,
    pub load: Load,
}

/// Prints the rows and the targets as Markdown tables.
pub fn print(title: &str, rows: &[Row], targets: &[(String, bool)]) {
    println!("\n{title}\n");
    println!("| call | clients | p50 (ms) | p99 (ms) | calls/s | server peak RSS (MiB) |");
    println!("|---|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {:.3} | {:.3} | {:.0} | {} |",
            r.what,
            r.load.clients,
            r.load.p50.as_secs_f64() * 1000.0,
            r.load.p99.as_secs_f64() * 1000.0,
            r.load.calls_per_sec,
            r.load
                .peak_rss
                .map_or("-".to_owned(), |b| format!("{:.1}", b as f64 / 1048576.0))
        );
    }
    if targets.is_empty() {
        return;
    }
    println!("\n| target | met |\n|---|---|");
    for (what, met) in targets {
        println!("| {what} | {} |", if *met { "yes" } else { "NO" });
    }
}
