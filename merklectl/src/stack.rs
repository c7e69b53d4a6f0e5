//! A local Merkle Mesh stack: its own PostgreSQL and Redis servers, and the five service
//! binaries, each a child process that is stopped (and waited for) when dropped.
//!
//! `merklectl up` and the integration-test harness both use this module, so the way servers
//! are started, checked and stopped is written once. Everything listens on 127.0.0.1 only.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::{Pid, User, chown, geteuid},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// What can go wrong starting or stopping the stack.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error(
        "{binary} not found; install the Debian package `{package}` (apt-get install -y {package})"
    )]
    Missing {
        binary: &'static str,
        package: &'static str,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Failed(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StackError {
    let what = what.into();
    move |source| StackError::Io { what, source }
}

/// A free TCP port on 127.0.0.1 (the OS picks one; it is free when this returns).
pub fn free_port() -> Result<u16, StackError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io_err("finding a free port"))?;
    Ok(listener
        .local_addr()
        .map_err(io_err("finding a free port"))?
        .port())
}

/// A child process that is stopped with `stop_signal` (then SIGKILL after a grace period) when
/// dropped, so no server outlives its owner, even when a test fails.
pub struct ManagedProcess {
    name: String,
    child: Child,
    stop_signal: Signal,
    exited: Option<ExitStatus>,
}

impl ManagedProcess {
    /// Spawns `command` with stdout and stderr appended to `log`.
    pub fn spawn(
        name: impl Into<String>,
        mut command: Command,
        stop_signal: Signal,
        log: &Path,
    ) -> Result<Self, StackError> {
        let name = name.into();
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io_err(format!("opening {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(io_err(format!("opening {}", log.display())))?;
        // A process group of its own: a Ctrl-C at the terminal reaches only the owner, which
        // then stops its children in order.
        let child = command
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(io_err(format!("starting {name}")))?;
        Ok(ManagedProcess {
            name,
            child,
            stop_signal,
            exited: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has ended.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Sends a signal (if the process still runs).
    pub fn signal(&mut self, signal: Signal) {
        if self.try_exit_status().is_none() {
            // ESRCH means it exited meanwhile: nothing to do.
            let _ = kill(Pid::from_raw(self.child.id() as i32), signal);
        }
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the process: its stop signal, then SIGKILL after `grace`. Returns its exit status.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        self.signal(self.stop_signal);
        if let Some(status) = self.wait_timeout(grace) {
            return Some(status);
        }
        self.signal(Signal::SIGKILL);
        self.wait_timeout(Duration::from_secs(5))
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
    }
}

/// The uid and gid to run PostgreSQL as: PostgreSQL refuses to run as root, so root runs it as
/// the `postgres` system user; anyone else runs it as themselves.
fn postgres_identity() -> Result<Option<(u32, u32)>, StackError> {
    if !geteuid().is_root() {
        return Ok(None);
    }
    match User::from_name("postgres") {
        Ok(Some(user)) => Ok(Some((user.uid.as_raw(), user.gid.as_raw()))),
        _ => Err(StackError::Failed(
            "PostgreSQL cannot run as root and there is no `postgres` user; install the Debian \
             package `postgresql` (it creates the user) or run as an unprivileged user"
                .into(),
        )),
    }
}

/// The folder of PostgreSQL's server binaries: `pg_config --bindir`, else the newest
/// `/usr/lib/postgresql/*/bin`.
pub fn postgres_bindir() -> Result<PathBuf, StackError> {
    let has_initdb = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_initdb(&dir) {
            return Ok(dir);
        }
    }
    let mut candidates: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("bin"))
        .filter(|dir| has_initdb(dir))
        .collect();
    candidates.sort_by_key(|dir| {
        dir.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    candidates.pop().ok_or(StackError::Missing {
        binary: "PostgreSQL server (initdb, postgres)",
        package: "postgresql",
    })
}

/// The path of `redis-server`, if installed.
pub fn redis_server_path() -> Result<PathBuf, StackError> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("redis-server"))
        .find(|path| path.is_file())
        .ok_or(StackError::Missing {
            binary: "redis-server",
            package: "redis-server",
        })
}

/// Installs a Debian package when that is possible here (root with apt-get); else says how.
pub fn install_package(package: &str) -> Result<(), StackError> {
    if !geteuid().is_root() || !Path::new("/usr/bin/apt-get").exists() {
        return Err(StackError::Failed(format!(
            "the Debian package `{package}` is needed: run `sudo apt-get install -y {package}`"
        )));
    }
    eprintln!("installing {package} with apt-get ...");
    let run = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .map_err(io_err("running apt-get"))
    };
    run(&["update", "-qq"])?;
    let status = run(&["install", "-y", "-qq", package])?;
    if status.success() {
        Ok(())
    } else {
        Err(StackError::Failed(format!(
            "apt-get install {package} failed ({status})"
        )))
    }
}

/// A PostgreSQL server of our own, listening on 127.0.0.1 only, with a `merkle` database.
pub struct Postgres {
    data_dir: PathBuf,
    port: u16,
    settings: Vec<(String, String)>,
    process: Option<ManagedProcess>,
}

impl Postgres {
    /// The database the services use.
    pub const DATABASE: &'static str = "merkle";
    /// The role the services connect as (trust authentication on 127.0.0.1).
    pub const USER: &'static str = "merkle";

    /// Starts PostgreSQL on `port` with its data in `data_dir`, running initdb first when the
    /// folder holds no cluster yet. `data_dir`'s parent must be reachable by the server's user.
    pub async fn start(data_dir: &Path, port: u16) -> Result<Self, StackError> {
        Self::start_with(data_dir, port, &[]).await
    }

    /// [`Postgres::start`] with extra server settings (`-c name=value`), e.g. a preloaded
    /// library for the benchmarks.
    pub async fn start_with(
        data_dir: &Path,
        port: u16,
        settings: &[(&str, &str)],
    ) -> Result<Self, StackError> {
        let mut postgres = Postgres {
            data_dir: data_dir.to_owned(),
            port,
            settings: settings
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            process: None,
        };
        postgres.start_again().await?;
        Ok(postgres)
    }

    /// Starts a streaming replica of the server on `primary_port`: its data copied by
    /// `pg_basebackup -R -X stream` into `data_dir` (run as the server's user), then served
    /// read-only on `port` with `settings`, following the primary.
    pub async fn start_replica(
        data_dir: &Path,
        primary_port: u16,
        port: u16,
        settings: &[(&str, &str)],
    ) -> Result<Self, StackError> {
        let bindir = postgres_bindir()?;
        let identity = postgres_identity()?;
        // An empty folder of the server's user, private as PostgreSQL requires: pg_basebackup
        // fills it.
        fs::create_dir_all(data_dir).map_err(io_err(format!("creating {}", data_dir.display())))?;
        fs::set_permissions(
            data_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .map_err(io_err(format!("chmod 0700 {}", data_dir.display())))?;
        if let Some((uid, gid)) = identity {
            chown(data_dir, Some(uid.into()), Some(gid.into())).map_err(|e| {
                StackError::Failed(format!("chown {} to postgres: {e}", data_dir.display()))
            })?;
        }
        let mut backup = Command::new(bindir.join("pg_basebackup"));
        backup
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &primary_port.to_string(),
                "-U",
                Self::USER,
            ])
            .arg("-D")
            .arg(data_dir)
            // A fast checkpoint: the copy starts at once, not at the next spread checkpoint.
            .args(["-R", "-X", "stream", "--no-sync", "--checkpoint=fast"])
            .current_dir("/")
            .stdout(Stdio::null());
        if let Some((uid, gid)) = identity {
            backup.uid(uid).gid(gid);
        }
        let out = backup.output().map_err(io_err("running pg_basebackup"))?;
        if !out.status.success() {
            return Err(StackError::Failed(format!(
                "pg_basebackup of port {primary_port} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Self::start_with(data_dir, port, settings).await
    }

    /// Starts the server again after [`Postgres::stop`], on the same port and data.
    pub async fn start_again(&mut self) -> Result<(), StackError> {
        let bindir = postgres_bindir()?;
        let identity = postgres_identity()?;
        let as_server_user = |command: &mut Command| {
            if let Some((uid, gid)) = identity {
                command.uid(uid).gid(gid);
            }
            command.current_dir("/");
        };
        let dir = &self.data_dir;
        if !dir.join("PG_VERSION").exists() {
            fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
            if let Some((uid, gid)) = identity {
                chown(dir, Some(uid.into()), Some(gid.into())).map_err(|e| {
                    StackError::Failed(format!("chown {} to postgres: {e}", dir.display()))
                })?;
            }
            let mut initdb = Command::new(bindir.join("initdb"));
            initdb
                .arg("-D")
                .arg(dir)
                .args(["-U", Self::USER, "--auth=trust", "-E", "UTF8", "--no-sync"])
                .stdout(Stdio::null());
            as_server_user(&mut initdb);
            let out = initdb.output().map_err(io_err("running initdb"))?;
            if !out.status.success() {
                return Err(StackError::Failed(format!(
                    "initdb {} failed: {}",
                    dir.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
        }
        let mut server = Command::new(bindir.join("postgres"));
        server
            .arg("-D")
            .arg(dir)
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", &format!("unix_socket_directories={}", dir.display())])
            .args(["-c", "fsync=off", "-c", "full_page_writes=off"]);
        for (name, value) in &self.settings {
            server.arg("-c").arg(format!("{name}={value}"));
        }
        as_server_user(&mut server);
        let log = dir.with_extension("log");
        // SIGINT is PostgreSQL's "fast shutdown": clients are disconnected, data is flushed.
        self.process = Some(ManagedProcess::spawn(
            "postgres",
            server,
            Signal::SIGINT,
            &log,
        )?);
        self.wait_ready(&log).await?;
        self.create_database().await
    }

    async fn wait_ready(&mut self, log: &Path) -> Result<(), StackError> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let url = format!("postgres://{}@127.0.0.1:{}/postgres", Self::USER, self.port);
            if tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .is_ok()
            {
                return Ok(());
            }
            let exited = self.process.as_mut().and_then(|p| p.try_exit_status());
            if exited.is_some() || Instant::now() > deadline {
                let tail = fs::read_to_string(log).unwrap_or_default();
                let tail: Vec<&str> = tail.lines().rev().take(5).collect();
                return Err(StackError::Failed(format!(
                    "PostgreSQL did not start on port {}: {}",
                    self.port,
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn create_database(&self) -> Result<(), StackError> {
        let url = format!("postgres://{}@127.0.0.1:{}/postgres", Self::USER, self.port);
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .map_err(|e| StackError::Failed(format!("connecting to PostgreSQL: {e}")))?;
        let driver = tokio::spawn(connection);
        // A replica has the primary's databases and takes no writes.
        let replica: bool = client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .map_err(|e| StackError::Failed(format!("querying PostgreSQL: {e}")))?
            .get(0);
        if replica {
            return Ok(());
        }
        let exists = client
            .query_opt(
                "SELECT 1 FROM pg_database WHERE datname = $1",
                &[&Self::DATABASE],
            )
            .await
            .map_err(|e| StackError::Failed(format!("querying PostgreSQL: {e}")))?
            .is_some();
        if !exists {
            client
                .batch_execute(&format!("CREATE DATABASE {}", Self::DATABASE))
                .await
                .map_err(|e| StackError::Failed(format!("creating the database: {e}")))?;
        }
        drop(client);
        let _ = driver.await;
        Ok(())
    }

    /// The URL services connect with.
    pub fn url(&self) -> String {
        format!(
            "postgres://{}@127.0.0.1:{}/{}",
            Self::USER,
            self.port,
            Self::DATABASE
        )
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(ManagedProcess::pid)
    }

    /// Stops the server (fast shutdown) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.stop(Duration::from_secs(30));
        }
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) the server and every backend: it keeps accepting
    /// connections (the kernel does) and answers nothing, as a hung host does.
    pub fn freeze(&mut self, frozen: bool) {
        let Some(postmaster) = self.pid() else {
            return;
        };
        let signal = if frozen {
            Signal::SIGSTOP
        } else {
            Signal::SIGCONT
        };
        for pid in std::iter::once(postmaster).chain(children_of(postmaster)) {
            let _ = kill(Pid::from_raw(pid as i32), signal);
        }
    }

    /// Stops the server as a crash would: an immediate shutdown (SIGQUIT to the postmaster:
    /// no checkpoint, every connection dropped, crash recovery at the next start).
    pub fn crash(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.signal(Signal::SIGQUIT);
            if process.wait_timeout(Duration::from_secs(30)).is_none() {
                process.signal(Signal::SIGKILL);
                process.wait_timeout(Duration::from_secs(10));
            }
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Redis server of our own, on 127.0.0.1 only, without persistence.
pub struct Redis {
    dir: PathBuf,
    port: u16,
    /// Arguments beyond the defaults (cluster mode).
    extra: Vec<String>,
    process: Option<ManagedProcess>,
}

impl Redis {
    /// Starts `redis-server` on `port`, working in `dir`.
    pub async fn start(dir: &Path, port: u16) -> Result<Self, StackError> {
        Self::start_with(dir, port, Vec::new()).await
    }

    /// [`Redis::start`] with more `redis-server` arguments (e.g. a TLS port beside the plain
    /// one, which stays for the readiness check).
    pub async fn start_with(dir: &Path, port: u16, extra: Vec<String>) -> Result<Self, StackError> {
        let mut redis = Redis {
            dir: dir.to_owned(),
            port,
            extra,
            process: None,
        };
        redis.start_again().await?;
        Ok(redis)
    }

    /// Starts the server again after [`Redis::stop`], on the same port.
    pub async fn start_again(&mut self) -> Result<(), StackError> {
        let binary = redis_server_path()?;
        let dir = &self.dir;
        fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let mut command = Command::new(binary);
        command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(&self.extra)
            .arg("--dir")
            .arg(dir);
        let log = dir.join("redis.log");
        let mut process = ManagedProcess::spawn("redis-server", command, Signal::SIGTERM, &log)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !redis_answers(self.port) {
            if process.try_exit_status().is_some() || Instant::now() > deadline {
                return Err(StackError::Failed(format!(
                    "redis-server did not start on port {}; see {}",
                    self.port,
                    log.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.process = Some(process);
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(ManagedProcess::pid)
    }

    /// Stops the server and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.stop(Duration::from_secs(10));
        }
    }

    /// Kills the server (SIGKILL, as a crash or an OOM kill would): what it held is lost.
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.signal(Signal::SIGKILL);
            process.wait_timeout(Duration::from_secs(10));
        }
    }
}

/// A Redis Cluster of our own: three masters and three replicas of `redis-server` in cluster
/// mode on 127.0.0.1, formed by `redis-cli --cluster create`. The node timeout is short
/// (1 s), so a killed master's replica takes over within a few seconds.
pub struct RedisCluster {
    nodes: Vec<Redis>,
    /// Each node's TLS port, when the cluster speaks TLS (see [`RedisCluster::start_tls`]).
    tls_ports: Option<[u16; 6]>,
}

/// What a cluster of TLS Redis nodes serves with: PEM files, the certificate valid for
/// 127.0.0.1.
pub struct RedisTls<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
    pub ca: &'a Path,
}

impl RedisCluster {
    /// How long a node may be unreachable before the cluster fails it over.
    pub const NODE_TIMEOUT: Duration = Duration::from_millis(1000);

    /// Starts six nodes on `ports` (and their cluster bus on `bus_ports`), working in `dir`,
    /// forms the cluster and waits until every node reports `cluster_state:ok`.
    pub async fn start(
        dir: &Path,
        ports: [u16; 6],
        bus_ports: [u16; 6],
    ) -> Result<Self, StackError> {
        Self::start_inner(dir, ports, bus_ports, None).await
    }

    /// [`RedisCluster::start`] with each node also serving TLS on its port of `tls_ports`, and
    /// the cluster's bus and replication over TLS: its clients find the nodes' TLS ports in
    /// `CLUSTER SLOTS` when they ask over TLS. The plain ports stay for the readiness checks.
    pub async fn start_tls(
        dir: &Path,
        ports: [u16; 6],
        bus_ports: [u16; 6],
        tls_ports: [u16; 6],
        tls: &RedisTls<'_>,
    ) -> Result<Self, StackError> {
        Self::start_inner(dir, ports, bus_ports, Some((tls_ports, tls))).await
    }

    async fn start_inner(
        dir: &Path,
        ports: [u16; 6],
        bus_ports: [u16; 6],
        tls: Option<([u16; 6], &RedisTls<'_>)>,
    ) -> Result<Self, StackError> {
        let mut nodes = Vec::new();
        for (i, (port, bus_port)) in ports.into_iter().zip(bus_ports).enumerate() {
            let mut extra = [
                "--cluster-enabled",
                "yes",
                // Not port + 10000, the default, which may be taken or past 65535.
                "--cluster-port",
                &bus_port.to_string(),
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                &Self::NODE_TIMEOUT.as_millis().to_string(),
                // A replica takes over however long its master was gone.
                "--cluster-replica-validity-factor",
                "0",
            ]
            .map(str::to_owned)
            .to_vec();
            if let Some((tls_ports, files)) = &tls {
                let file = |path: &Path| path.display().to_string();
                extra.extend([
                    "--tls-port".to_owned(),
                    tls_ports[i].to_string(),
                    "--tls-cert-file".to_owned(),
                    file(files.cert),
                    "--tls-key-file".to_owned(),
                    file(files.key),
                    "--tls-ca-cert-file".to_owned(),
                    file(files.ca),
                    // Clients are checked by the services' own credentials, not certificates.
                    "--tls-auth-clients".to_owned(),
                    "no".to_owned(),
                    "--tls-cluster".to_owned(),
                    "yes".to_owned(),
                    "--tls-replication".to_owned(),
                    "yes".to_owned(),
                ]);
            }
            nodes.push(Redis::start_with(&dir.join(port.to_string()), port, extra).await?);
        }
        let cluster = RedisCluster {
            nodes,
            tls_ports: tls.as_ref().map(|(tls_ports, _)| *tls_ports),
        };
        let create_ports = tls.as_ref().map_or(ports, |(tls_ports, _)| *tls_ports);
        let addresses: Vec<String> = create_ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let mut create = Command::new(redis_cli_path()?);
        if let Some((_, files)) = &tls {
            create.arg("--tls").arg("--cacert").arg(files.ca);
        }
        let out = create
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .map_err(io_err("running redis-cli --cluster create".to_owned()))?;
        if !out.status.success() {
            return Err(StackError::Failed(format!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        cluster.wait_ok(Duration::from_secs(30)).await?;
        cluster.wait_replicated(Duration::from_secs(30)).await?;
        Ok(cluster)
    }

    /// Waits until every master has a replica that finished its first sync (the cluster reports
    /// `cluster_state:ok` before that, and a WAIT would count no replica).
    async fn wait_replicated(&self, within: Duration) -> Result<(), StackError> {
        let deadline = Instant::now() + within;
        loop {
            let masters = self
                .nodes
                .iter()
                .filter_map(|n| cli(n.port(), &["info", "replication"]))
                .filter(|info| info.lines().any(|l| l.trim_end() == "role:master"))
                .collect::<Vec<_>>();
            let online = masters.iter().all(|info| {
                info.lines()
                    .any(|l| l.starts_with("slave0:") && l.contains("state=online"))
            });
            if masters.len() == 3 && online {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(StackError::Failed(format!(
                    "the Redis Cluster's replicas did not come online within {within:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The nodes' URLs, comma-separated: the value of `REDIS_CLUSTER_NODES` (`rediss://` at
    /// the TLS ports of a TLS cluster).
    pub fn urls(&self) -> String {
        match self.tls_ports {
            Some(tls_ports) => tls_ports
                .iter()
                .map(|port| format!("rediss://127.0.0.1:{port}"))
                .collect::<Vec<_>>()
                .join(","),
            None => self
                .nodes
                .iter()
                .map(|n| format!("redis://127.0.0.1:{}", n.port()))
                .collect::<Vec<_>>()
                .join(","),
        }
    }

    pub fn nodes(&self) -> &[Redis] {
        &self.nodes
    }

    pub fn nodes_mut(&mut self) -> &mut [Redis] {
        &mut self.nodes
    }

    /// Waits until every running node reports `cluster_state:ok` and knows the same masters.
    pub async fn wait_ok(&self, within: Duration) -> Result<(), StackError> {
        let deadline = Instant::now() + within;
        loop {
            let running: Vec<&Redis> = self.nodes.iter().filter(|n| n.pid().is_some()).collect();
            let ok = running.iter().all(|n| {
                cli(n.port(), &["cluster", "info"])
                    .is_some_and(|info| info.lines().any(|l| l.trim_end() == "cluster_state:ok"))
            });
            let masters: Vec<Vec<u16>> = running.iter().map(|n| self.masters_seen_by(n)).collect();
            if ok && masters.windows(2).all(|w| w[0] == w[1]) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(StackError::Failed(format!(
                    "the Redis Cluster did not report cluster_state:ok within {within:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The ports of the masters that serve slots, as `node` sees them (sorted).
    fn masters_seen_by(&self, node: &Redis) -> Vec<u16> {
        let nodes = cli(node.port(), &["cluster", "nodes"]).unwrap_or_default();
        let mut ports: Vec<u16> = nodes
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let serving =
                    fields.len() > 8 && fields[2].contains("master") && !fields[2].contains("fail");
                let port = fields.get(1)?.split(['@', ':']).nth(1)?.parse().ok()?;
                serving.then_some(port)
            })
            .collect();
        ports.sort_unstable();
        ports
    }

    /// True when the master `index` has a replica that finished its sync (one that a failover
    /// can promote).
    pub fn has_online_replica(&self, index: usize) -> bool {
        cli(self.nodes[index].port(), &["info", "replication"]).is_some_and(|info| {
            info.lines()
                .any(|l| l.starts_with("slave0:") && l.contains("state=online"))
        })
    }

    /// The index in [`RedisCluster::nodes`] of the first replica of the master `index`.
    pub fn replica_of(&self, index: usize) -> Option<usize> {
        let info = cli(self.nodes[index].port(), &["info", "replication"])?;
        let port: u16 = info.lines().find_map(|l| {
            let fields = l.strip_prefix("slave0:")?;
            fields
                .split(',')
                .find_map(|f| f.strip_prefix("port="))?
                .parse()
                .ok()
        })?;
        self.nodes.iter().position(|n| n.port() == port)
    }

    /// Runs `CONFIG SET name value` on every running node.
    pub fn config_set(&self, name: &str, value: &str) -> Result<(), StackError> {
        for node in self.nodes.iter().filter(|n| n.pid().is_some()) {
            cli(node.port(), &["config", "set", name, value]).ok_or_else(|| {
                StackError::Failed(format!("CONFIG SET {name} on port {}", node.port()))
            })?;
        }
        Ok(())
    }

    /// The index in [`RedisCluster::nodes`] of the master serving `key` now.
    pub fn master_of(&self, key: &str) -> Option<usize> {
        let asker = self.nodes.iter().find(|n| n.pid().is_some())?;
        let slot: u16 = cli(asker.port(), &["cluster", "keyslot", key])?
            .trim()
            .parse()
            .ok()?;
        let slots = cli(asker.port(), &["cluster", "nodes"])?;
        let port: u16 = slots.lines().find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if !fields.get(2)?.contains("master") || fields[2].contains("fail") {
                return None;
            }
            let serves = fields.iter().skip(8).any(|range| {
                let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                matches!((lo.parse::<u16>(), hi.parse::<u16>()), (Ok(lo), Ok(hi)) if (lo..=hi).contains(&slot))
            });
            serves.then(|| fields[1].split(['@', ':']).nth(1)?.parse().ok())?
        })?;
        self.nodes.iter().position(|n| n.port() == port)
    }
}

/// `redis-cli -p port args...`'s output, or `None` when it failed.
fn cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new(redis_cli_path().ok()?)
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `redis-cli`, installed beside `redis-server` (Debian's redis-tools).
pub fn redis_cli_path() -> Result<PathBuf, StackError> {
    let server = redis_server_path()?;
    let cli = server.with_file_name("redis-cli");
    if cli.is_file() {
        Ok(cli)
    } else {
        Err(StackError::Missing {
            binary: "redis-cli",
            package: "redis-tools",
        })
    }
}

/// The pids whose parent is `parent`, from /proc.
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(entry.path().join("stat")).ok()?;
            // The command name in parentheses may hold spaces: the fields after it are fixed.
            let ppid: u32 = stat[stat.rfind(')')? + 2..]
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            (ppid == parent).then_some(pid)
        })
        .collect()
}

/// True when a Redis server on 127.0.0.1:`port` answers PING.
fn redis_answers(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut reply = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}

/// One of the five services: its binary, default port and gRPC service name.
#[derive(Debug, Clone, Copy)]
pub struct ServiceSpec {
    /// A short name for people: `scheduler`, `tree-builder`, ...
    pub name: &'static str,
    /// The binary's file name.
    pub binary: &'static str,
    /// The documented default port.
    pub port: u16,
    /// The fully qualified gRPC service name.
    pub grpc_name: &'static str,
    /// The variable through which other services are told its address, e.g. `CACHE_ADDR`.
    pub addr_var: &'static str,
    /// Whether it needs `DATABASE_URL`.
    pub needs_postgres: bool,
    /// Whether it needs `REDIS_URL`.
    pub needs_redis: bool,
}

/// The five services, in the order they are started.
pub const SERVICES: [ServiceSpec; 5] = {
    use merkle_proto::service_names as names;
    use merkle_shared::ports;
    [
        ServiceSpec {
            name: "cache",
            addr_var: "CACHE_ADDR",
            binary: "merkle-cache",
            port: ports::CACHE,
            grpc_name: names::CACHE,
            needs_postgres: false,
            needs_redis: true,
        },
        ServiceSpec {
            name: "db-sync",
            addr_var: "DB_SYNC_ADDR",
            binary: "merkle-db-sync",
            port: ports::DB_SYNC,
            grpc_name: names::DB_SYNC,
            needs_postgres: true,
            needs_redis: false,
        },
        ServiceSpec {
            name: "tree-builder",
            addr_var: "TREE_BUILDER_ADDR",
            binary: "merkle-tree-builder",
            port: ports::TREE_BUILDER,
            grpc_name: names::TREE_BUILDER,
            needs_postgres: false,
            needs_redis: false,
        },
        ServiceSpec {
            name: "discovery",
            addr_var: "DISCOVERY_ADDR",
            binary: "merkle-discovery",
            port: ports::DISCOVERY,
            grpc_name: names::DISCOVERY,
            needs_postgres: false,
            needs_redis: false,
        },
        ServiceSpec {
            name: "scheduler",
            addr_var: "SCHEDULER_ADDR",
            binary: "merkle-scheduler",
            port: ports::SCHEDULER,
            grpc_name: names::SCHEDULER,
            needs_postgres: true,
            needs_redis: false,
        },
    ]
};

/// The folder holding the service binaries: the one this program runs from (cargo puts every
/// binary of the workspace there), or its parent for test executables in `deps/`.
pub fn binary_dir() -> Result<PathBuf, StackError> {
    let exe = std::env::current_exe().map_err(io_err("locating this program"))?;
    let mut dir = exe
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| StackError::Failed("this program has no folder".into()))?;
    if dir.ends_with("deps") {
        dir.pop();
    }
    Ok(dir)
}

/// The path of a service binary, or an error saying how to build it.
pub fn service_binary(spec: &ServiceSpec) -> Result<PathBuf, StackError> {
    let path = binary_dir()?.join(spec.binary);
    if path.is_file() {
        Ok(path)
    } else {
        Err(StackError::Failed(format!(
            "{} not found; build the services first: cargo build --workspace --bins",
            path.display()
        )))
    }
}

/// Starts one service binary listening on 127.0.0.1:`port`, with the given extra environment.
pub fn spawn_service(
    spec: &ServiceSpec,
    port: u16,
    env: &[(&str, String)],
    log: &Path,
) -> Result<ManagedProcess, StackError> {
    let mut command = Command::new(service_binary(spec)?);
    command.env("LISTEN_ADDR", format!("127.0.0.1:{port}"));
    for (key, value) in env {
        command.env(key, value);
    }
    ManagedProcess::spawn(spec.name, command, Signal::SIGTERM, log)
}

/// The health status of a gRPC service at `addr` (`None` when it cannot be asked).
pub async fn health_status(addr: SocketAddr, service: &str) -> Option<ServingStatus> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(2));
    let channel = endpoint.connect().await.ok()?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .ok()?;
    ServingStatus::try_from(response.into_inner().status).ok()
}

/// Waits until the service at `addr` reports `want`, for at most `timeout`.
pub async fn wait_for_status(
    addr: SocketAddr,
    service: &str,
    want: ServingStatus,
    timeout: Duration,
) -> Result<(), StackError> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    while Instant::now() < deadline {
        last = health_status(addr, service).await;
        if last == Some(want) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(StackError::Failed(format!(
        "{service} at {addr} did not report {} within {timeout:?} (last: {})",
        want.as_str_name(),
        last.map(|s| s.as_str_name()).unwrap_or("no answer")
    )))
}
