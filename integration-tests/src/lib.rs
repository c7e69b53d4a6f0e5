//! The integration-test harness: real PostgreSQL and Redis servers in a temporary folder on
//! free ports, and the real service binaries on free ports, all stopped when the [`TestStack`]
//! is dropped, even when a test fails. Nothing is mocked; everything listens on 127.0.0.1.
//!
//! The service binaries must be built first (`cargo build --workspace --bins`); the README's
//! test command does that.
//!
//! Authentication is on, as in production: every service gets the harness's identities file
//! and its own service token ([`credentials`]), and the clients the harness makes present the
//! admin token unless a test asks for another identity ([`RunningService::channel_as`]).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

pub mod raw;
pub mod up;

pub use merkle_shared::auth::token::ClientAuth;
pub use merklectl::credentials::Credentials;
pub use merklectl::stack::{
    self, ManagedProcess, Postgres, Redis, RedisCluster, SERVICES, ServiceSpec, free_port,
    wait_for_status,
};
use tower::Layer as _;

/// The credentials every stack of this test process uses (made once, under the target folder,
/// shared by the test binaries), with the admin token installed for in-process clients.
pub fn credentials() -> &'static Credentials {
    static CREDENTIALS: std::sync::OnceLock<Credentials> = std::sync::OnceLock::new();
    CREDENTIALS.get_or_init(|| {
        let dir = stack::binary_dir()
            .expect("binary folder")
            .join("it-credentials");
        let credentials = Credentials::ensure(&dir).expect("test credentials");
        merkle_shared::auth::token::install(&credentials.token("admin").expect("admin token"))
            .expect("install the admin token");
        credentials
    })
}

/// The token of `identity` (`admin`, `operator`, `reader`, or a service's name).
pub fn token_of(identity: &str) -> String {
    credentials().token(identity).expect("token")
}
pub use tonic_health::pb::health_check_response::ServingStatus;

/// How long a service may take to report a health status in tests.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(30);

/// A running service binary.
pub struct RunningService {
    pub spec: ServiceSpec,
    pub addr: SocketAddr,
    pub log: PathBuf,
    pub process: ManagedProcess,
    /// Its whole environment, to start it again the same way.
    env: Vec<(String, String)>,
}

impl RunningService {
    /// `http://127.0.0.1:PORT`, for gRPC clients.
    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Starts the service again on its address with its environment (after it was killed, as
    /// a supervisor would); the old process is stopped first if it still runs.
    pub fn restart(&mut self) {
        self.process.stop(Duration::from_secs(10));
        let env: Vec<(&str, String)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        self.process = stack::spawn_service(&self.spec, self.addr.port(), &env, &self.log)
            .unwrap_or_else(|e| panic!("restarting {}: {e}", self.spec.name));
    }

    /// Waits until the service reports `status` for its own name.
    pub async fn wait_for(&self, status: ServingStatus) {
        if let Err(err) =
            wait_for_status(self.addr, self.spec.grpc_name, status, HEALTH_TIMEOUT).await
        {
            panic!("{err}\n--- {} ---\n{}", self.log.display(), tail(&self.log));
        }
    }

    /// A gRPC channel to the service, presenting the admin token.
    pub fn channel(&self) -> ClientAuth<tonic::transport::Channel> {
        self.channel_as("admin")
    }

    /// A gRPC channel to the service, presenting `identity`'s token (`admin`, `operator`,
    /// `reader` or a service's name).
    pub fn channel_as(&self, identity: &str) -> ClientAuth<tonic::transport::Channel> {
        let layer = merkle_shared::auth::token::ClientAuthLayer::with_token(&token_of(identity))
            .expect("a valid token");
        layer.layer(self.plain_channel())
    }

    /// A gRPC channel to the service without credentials.
    pub fn plain_channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(self.uri())
            .expect("valid uri")
            .timeout(Duration::from_secs(30))
            .connect_lazy()
    }
}

/// Which Redis a test runs on: one server, or a Redis Cluster of six nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisKind {
    Standalone,
    Cluster,
}

/// Runs an `async fn(RedisKind)` test once on a standalone Redis and once on a Redis Cluster:
/// `on_both_redis_kinds!(name)` makes the tests `name::standalone` and `name::cluster`.
#[macro_export]
macro_rules! on_both_redis_kinds {
    ($($test:ident),+ $(,)?) => {$(
        mod $test {
            #[tokio::test(flavor = "multi_thread")]
            async fn standalone() {
                super::$test($crate::RedisKind::Standalone).await
            }
            #[tokio::test(flavor = "multi_thread")]
            async fn cluster() {
                super::$test($crate::RedisKind::Cluster).await
            }
        }
    )+};
}

/// PostgreSQL, Redis and services of one test, in one temporary folder.
pub struct TestStack {
    // Field order is drop order: services stop before the servers they use.
    services: Vec<RunningService>,
    pub redis: Option<Redis>,
    pub redis_cluster: Option<RedisCluster>,
    /// Streaming replicas of `postgres`; stopped before it.
    pub postgres_replicas: Vec<Postgres>,
    pub postgres: Option<Postgres>,
    /// Settings every later start of a service gets: (service, variable, value).
    service_env: Vec<(String, &'static str, String)>,
    dir: tempfile::TempDir,
}

impl TestStack {
    pub fn new() -> Self {
        credentials();
        let dir = tempfile::Builder::new()
            .prefix("merkle-it-")
            .tempdir()
            .expect("temporary folder");
        // PostgreSQL may run as another user (when tests run as root): let it in.
        set_mode(dir.path(), 0o755);
        TestStack {
            services: Vec::new(),
            redis: None,
            redis_cluster: None,
            postgres_replicas: Vec::new(),
            postgres: None,
            service_env: Vec::new(),
            dir,
        }
    }

    /// Sets `variable` for every later start of `service` (before a call's own settings).
    pub fn set_service_env(&mut self, service: &str, variable: &'static str, value: String) {
        self.service_env.push((service.to_owned(), variable, value));
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts PostgreSQL on a free port.
    pub async fn start_postgres(&mut self) -> &mut Postgres {
        let port = free_port().expect("free port");
        self.start_postgres_on(port).await
    }

    /// Starts PostgreSQL on a free port with extra server settings (`-c name=value`).
    pub async fn start_postgres_with(&mut self, settings: &[(&str, &str)]) -> &mut Postgres {
        let port = free_port().expect("free port");
        let pg = Postgres::start_with(&self.dir.path().join("postgres"), port, settings)
            .await
            .unwrap_or_else(|e| panic!("starting PostgreSQL: {e}"));
        self.postgres.insert(pg)
    }

    /// Starts PostgreSQL on `port` (e.g. one a service was already told about).
    pub async fn start_postgres_on(&mut self, port: u16) -> &mut Postgres {
        let pg = Postgres::start(&self.dir.path().join("postgres"), port)
            .await
            .unwrap_or_else(|e| panic!("starting PostgreSQL: {e}"));
        self.postgres.insert(pg)
    }

    /// Starts a streaming replica of this stack's PostgreSQL (`pg_basebackup -R -X stream`)
    /// on a free port, with `settings`; returns its index in [`TestStack::postgres_replicas`].
    pub async fn start_postgres_replica(&mut self, settings: &[(&str, &str)]) -> usize {
        let primary = self.postgres.as_ref().expect("postgres started").port();
        let port = free_port().expect("free port");
        let index = self.postgres_replicas.len();
        let dir = self.dir.path().join(format!("postgres-replica-{index}"));
        let replica = Postgres::start_replica(&dir, primary, port, settings)
            .await
            .unwrap_or_else(|e| panic!("starting a PostgreSQL replica: {e}"));
        self.postgres_replicas.push(replica);
        index
    }

    /// Starts Redis on a free port with more `redis-server` arguments.
    pub async fn start_redis_with(&mut self, extra: Vec<String>) -> &mut Redis {
        let port = free_port().expect("free port");
        let redis = Redis::start_with(&self.dir.path().join("redis"), port, extra)
            .await
            .unwrap_or_else(|e| panic!("starting Redis: {e}"));
        self.redis.insert(redis)
    }

    /// Starts Redis on a free port.
    pub async fn start_redis(&mut self) -> &mut Redis {
        let port = free_port().expect("free port");
        let redis = Redis::start(&self.dir.path().join("redis"), port)
            .await
            .unwrap_or_else(|e| panic!("starting Redis: {e}"));
        self.redis.insert(redis)
    }

    /// Starts a Redis Cluster (three masters, three replicas) on free ports; the services of
    /// this stack then get `REDIS_CLUSTER_NODES` instead of `REDIS_URL`.
    pub async fn start_redis_cluster(&mut self) -> &mut RedisCluster {
        self.start_redis_cluster_inner(None).await
    }

    /// [`TestStack::start_redis_cluster`] whose nodes also serve TLS with `tls`'s files (and
    /// talk among themselves over TLS); its `urls()` are then `rediss://` ones.
    pub async fn start_redis_cluster_tls(
        &mut self,
        tls: &merklectl::stack::RedisTls<'_>,
    ) -> &mut RedisCluster {
        self.start_redis_cluster_inner(Some(tls)).await
    }

    async fn start_redis_cluster_inner(
        &mut self,
        tls: Option<&merklectl::stack::RedisTls<'_>>,
    ) -> &mut RedisCluster {
        // The ports found free may be taken by a test running beside this one before the
        // nodes bind them: then again, on others.
        for attempt in 1.. {
            let mut ports: Vec<u16> = Vec::new();
            while ports.len() < 18 {
                let port = free_port().expect("free port");
                if !ports.contains(&port) {
                    ports.push(port);
                }
            }
            let node_ports: [u16; 6] = ports[..6].try_into().expect("six");
            let bus_ports: [u16; 6] = ports[6..12].try_into().expect("six");
            let tls_ports: [u16; 6] = ports[12..].try_into().expect("six");
            let dir = self.dir.path().join(format!("redis-cluster-{attempt}"));
            let started = match tls {
                Some(tls) => {
                    RedisCluster::start_tls(&dir, node_ports, bus_ports, tls_ports, tls).await
                }
                None => RedisCluster::start(&dir, node_ports, bus_ports).await,
            };
            match started {
                Ok(cluster) => return self.redis_cluster.insert(cluster),
                Err(e) if attempt < 3 => eprintln!("a Redis Cluster did not start ({e}); again"),
                Err(e) => panic!("starting a Redis Cluster: {e}"),
            }
        }
        unreachable!("the loop returns or panics")
    }

    /// Starts the Redis of `kind`, unless one is running.
    pub async fn start_redis_of(&mut self, kind: RedisKind) {
        match kind {
            RedisKind::Standalone if self.redis.is_none() => {
                self.start_redis().await;
            }
            RedisKind::Cluster if self.redis_cluster.is_none() => {
                self.start_redis_cluster().await;
            }
            _ => {}
        }
    }

    /// A raw connection to this stack's Redis (either kind), to look at what was stored.
    pub async fn raw_redis(&self) -> merkle_cache::redis::Conn {
        use merkle_cache::redis::Conn;
        if let Some(redis) = &self.redis {
            let conn = redis::Client::open(redis.url())
                .expect("url")
                .get_multiplexed_async_connection()
                .await
                .expect("connect to redis");
            return Conn::Standalone(conn);
        }
        let cluster = self.redis_cluster.as_ref().expect("a Redis started");
        let urls: Vec<String> = cluster.urls().split(',').map(str::to_owned).collect();
        let conn = redis::cluster::ClusterClient::new(urls)
            .expect("cluster urls")
            .get_async_connection()
            .await
            .expect("connect to the cluster");
        Conn::Cluster(conn)
    }

    /// Starts this stack's Redis again after it was stopped, on its port and data.
    pub async fn restart_redis(&mut self) {
        self.redis
            .as_mut()
            .expect("redis started")
            .start_again()
            .await
            .unwrap_or_else(|e| panic!("restarting Redis: {e}"));
    }

    /// A connection to this stack's PostgreSQL, for looking at (or tampering with) the
    /// database directly.
    pub async fn sql(&self) -> tokio_postgres::Client {
        let url = self.postgres.as_ref().expect("postgres started").url();
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(connection);
        client
    }

    /// Starts the service `name` (`tree-builder`, `db-sync`, ...) on a free port, pointed at
    /// this stack's PostgreSQL and Redis, with `env` added. Does not wait for it.
    pub fn start_service(&mut self, name: &str, env: &[(&str, String)]) -> &RunningService {
        let spec = *SERVICES
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no service named {name}"));
        let mut all_env: Vec<(&str, String)> = vec![
            ("LOG_FORMAT", "text".to_owned()),
            ("HEALTH_CHECK_INTERVAL", "200ms".to_owned()),
            ("DATABASE_CONNECT_TIMEOUT", "1s".to_owned()),
            ("REDIS_TIMEOUT", "500ms".to_owned()),
        ];
        if name == "tree-builder" {
            all_env.push(("ALLOWED_ROOTS", self.dir.path().display().to_string()));
            all_env.push((
                "STAT_CACHE_DIR",
                self.dir.path().join("stat-cache").display().to_string(),
            ));
        }
        all_env.extend(credentials().service_env(name));
        if let Some(pg) = &self.postgres {
            all_env.push(("DATABASE_URL", pg.url()));
        }
        if let Some(redis) = &self.redis {
            all_env.push(("REDIS_URL", redis.url()));
        } else if let Some(cluster) = &self.redis_cluster {
            all_env.push(("REDIS_CLUSTER_NODES", cluster.urls()));
        }
        all_env.extend(
            self.service_env
                .iter()
                .filter(|(service, _, _)| service == name)
                .map(|(_, k, v)| (*k, v.clone())),
        );
        all_env.extend(env.iter().cloned());
        let port = free_port().expect("free port");
        let log = self.dir.path().join(format!("{name}-{port}.log"));
        let process = stack::spawn_service(&spec, port, &all_env, &log)
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let env = all_env
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        self.services.push(RunningService {
            spec,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            log,
            process,
            env,
        });
        self.services.last().expect("just pushed")
    }

    /// Starts the service `name` with `env` expecting it to refuse its configuration: waits for
    /// it to exit (30 s at most), requires exit code 2, and returns its log.
    pub fn start_refused(&mut self, name: &str, env: &[(&str, String)]) -> String {
        let log = self.start_service(name, env).log.clone();
        let status = self
            .service_mut(name)
            .process
            .wait_timeout(Duration::from_secs(30))
            .unwrap_or_else(|| panic!("{name} did not exit:\n{}", tail(&log)));
        let text = std::fs::read_to_string(&log).expect("log");
        assert_eq!(status.code(), Some(2), "{name} exited otherwise:\n{text}");
        text
    }

    /// Starts a service with its dependencies running and waits until it is SERVING.
    pub async fn start_serving(&mut self, name: &str) -> &RunningService {
        let spec = SERVICES
            .iter()
            .find(|s| s.name == name)
            .expect("known service");
        if spec.needs_postgres && self.postgres.is_none() {
            self.start_postgres().await;
        }
        if spec.needs_redis && self.redis.is_none() && self.redis_cluster.is_none() {
            self.start_redis().await;
        }
        self.start_service(name, &[]);
        let service = self.services.last().expect("just started");
        service.wait_for(ServingStatus::Serving).await;
        service
    }

    /// Everything a build needs (PostgreSQL, Redis, Cache, DbSync writing through the cache,
    /// TreeBuilder) and one Scheduler with `env` added; returns the Scheduler's address.
    pub async fn start_system(&mut self, env: &[(&str, String)]) -> String {
        if self.postgres.is_none() {
            self.start_postgres().await;
        }
        if self.redis.is_none() && self.redis_cluster.is_none() {
            self.start_redis().await;
        }
        let cache = self.start_serving("cache").await.uri();
        let db_sync = self.start_service("db-sync", &[("CACHE_ADDR", cache.clone())]);
        db_sync.wait_for(ServingStatus::Serving).await;
        let db_sync = db_sync.uri();
        let tree_builder = self.start_serving("tree-builder").await.uri();
        let mut all = vec![
            ("CACHE_ADDR", cache),
            ("DB_SYNC_ADDR", db_sync),
            ("TREE_BUILDER_ADDR", tree_builder),
            ("MIN_INTERVAL", "1s".to_owned()),
            ("LEASE_DURATION", "2s".to_owned()),
        ];
        all.extend(env.iter().cloned());
        let scheduler = self.start_service("scheduler", &all);
        scheduler.wait_for(ServingStatus::Serving).await;
        scheduler.uri()
    }

    /// All five services, wired as in production: [`TestStack::start_system`], and Discovery
    /// listing this stack's TreeBuilder as the client `node-a` (a static file).
    pub async fn start_all(&mut self) {
        self.start_system(&[]).await;
        let tree_builder = self.service_mut("tree-builder").uri();
        let clients = self.dir().join("clients.yaml");
        std::fs::write(
            &clients,
            format!(
                "clients:\n- {{id: node-a, tree_builder_address: \"{}\"}}\n",
                tree_builder.trim_start_matches("http://")
            ),
        )
        .expect("write the static fleet");
        let cache = self.service_mut("cache").uri();
        let discovery = self.start_service(
            "discovery",
            &[
                ("STATIC_FILE", clients.display().to_string()),
                ("CACHE_ADDR", cache),
            ],
        );
        discovery.wait_for(ServingStatus::Serving).await;
    }

    /// The running service that serves `service` (`merkle.dbsync.v1.DbSyncService`, ...).
    pub fn serving(&mut self, service: &str) -> &RunningService {
        let name = SERVICES
            .iter()
            .find(|s| s.grpc_name == service)
            .unwrap_or_else(|| panic!("no service serves {service}"))
            .name;
        self.service_mut(name)
    }

    /// Forgets the `index`th service started (its process is stopped if it still runs).
    pub fn remove_service(&mut self, index: usize) -> RunningService {
        self.services.remove(index)
    }

    /// Every service started so far, in start order.
    pub fn services(&self) -> &[RunningService] {
        &self.services
    }

    /// The most recently started service named `name`.
    pub fn service(&self, name: &str) -> &RunningService {
        self.services
            .iter()
            .rev()
            .find(|s| s.spec.name == name)
            .unwrap_or_else(|| panic!("{name} was not started"))
    }

    /// The most recently started service named `name`, to stop or restart it.
    pub fn service_mut(&mut self, name: &str) -> &mut RunningService {
        self.services
            .iter_mut()
            .rev()
            .find(|s| s.spec.name == name)
            .unwrap_or_else(|| panic!("{name} was not started"))
    }
}

impl Default for TestStack {
    fn default() -> Self {
        Self::new()
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// The last lines of a log, for failure messages.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// The workspace's root folder.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The real grpcurl binary: `$GRPCURL`, else `.tools/bin/grpcurl` (installed by
/// `scripts/install-tools.sh`), else `grpcurl` on the PATH.
pub fn grpcurl() -> PathBuf {
    if let Some(path) = std::env::var_os("GRPCURL") {
        return PathBuf::from(path);
    }
    let local = workspace_root().join(".tools/bin/grpcurl");
    if local.is_file() {
        return local;
    }
    PathBuf::from("grpcurl")
}

/// Runs `grpcurl -plaintext FLAGS ADDR ARGS`; returns (success, stdout, stderr).
pub fn run_grpcurl(flags: &[&str], addr: SocketAddr, args: &[&str]) -> (bool, String, String) {
    let mut command = Command::new(grpcurl());
    command.args(["-max-time", "20"]);
    // Plaintext unless the flags ask for TLS.
    if !flags
        .iter()
        .any(|f| matches!(*f, "-cacert" | "-cert" | "-insecure" | "-plaintext"))
    {
        command.arg("-plaintext");
    }
    // As the admin, unless the test sends credentials of its own.
    let header = format!("authorization: Bearer {}", token_of("admin"));
    if !flags
        .iter()
        .any(|f| f.to_ascii_lowercase().starts_with("authorization:"))
    {
        command.args(["-H", &header]);
    }
    command.args(flags).arg(addr.to_string()).args(args);
    let out = command.output().unwrap_or_else(|e| {
        panic!(
            "running {} (scripts/install-tools.sh installs it): {e}",
            grpcurl().display()
        )
    });
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The path of a binary of this workspace (built next to the test executables).
pub fn binary(name: &str) -> PathBuf {
    let path = stack::binary_dir().expect("binary folder").join(name);
    assert!(
        path.is_file(),
        "{} not found: run cargo build --workspace --bins first",
        path.display()
    );
    path
}

/// Runs the real `merklectl` with `args` (its stat caches in a temporary folder) as the
/// harness's admin; returns (exit code, stdout, stderr).
pub fn run_merklectl(args: &[&str]) -> (Option<i32>, String, String) {
    run_merklectl_with_token(&credentials().token_file("admin"), args)
}

/// [`run_merklectl`] presenting the token in `token_file` (e.g. the one `merklectl up` made).
pub fn run_merklectl_with_token(token_file: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(binary("merklectl"))
        .args(args)
        .env(
            "XDG_CACHE_HOME",
            std::env::temp_dir().join("merklectl-test-cache"),
        )
        .env_remove("CACHE_ADDR")
        .env(merklectl::credentials::TOKEN_FILE_VARIABLE, token_file)
        .output()
        .expect("run merklectl");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Sends `signal` to a process (e.g. SIGSTOP to freeze a server while it keeps its data).
pub fn signal(pid: u32, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).expect("kill");
}

/// True while a process with this pid exists.
pub fn process_exists(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

/// Runs the openssl command line in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An EC P-256 key in a new request: openssl's arguments.
const EC_KEY: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

/// Issues `<name>.pem` and `<name>.key` in `pki`, signed by its CA, with subject `CN=<cn>` and
/// the X.509 extensions `extensions` (one per line).
pub fn issue_certificate(pki: &Path, name: &str, cn: &str, extensions: &str) {
    let ext = format!("{name}.ext");
    std::fs::write(pki.join(&ext), extensions).expect("write extensions");
    let (key, csr, pem) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
    );
    let subject = format!("/CN={cn}");
    let request = [
        &["req"][..],
        &EC_KEY,
        &["-keyout", &key, "-out", &csr, "-subj", &subject],
    ]
    .concat();
    openssl(pki, &request);
    openssl(
        pki,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            &ext,
        ],
    );
}

/// The extensions of a service's certificate: it serves 127.0.0.1 and localhost, and
/// presents itself to the services it calls.
pub const SERVICE_EXTENSIONS: &str =
    "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n";

/// A CA (`ca.pem`), a server certificate for 127.0.0.1 (`server.pem`, also good as a client
/// certificate) and a client certificate (`client.pem`), with their keys, made with the
/// openssl command line in `dir/pki`; returns that folder.
pub fn make_certificates(dir: &Path) -> PathBuf {
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki).expect("mkdir");
    let ca = [
        &["req", "-x509"][..],
        &EC_KEY,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=merkle test CA",
        ],
    ]
    .concat();
    openssl(&pki, &ca);
    issue_certificate(&pki, "server", "server", SERVICE_EXTENSIONS);
    issue_certificate(&pki, "client", "client", "extendedKeyUsage=clientAuth\n");
    pki
}

/// Follows a Scheduler build until it ends (neither queued nor running), for at most a minute.
pub async fn wait_build_end(
    scheduler: &mut merkle_proto::scheduler::v1::scheduler_service_client::SchedulerServiceClient<
        merkle_shared::client::Channel,
    >,
    id: &str,
) -> merkle_proto::scheduler::v1::Build {
    use merkle_proto::scheduler::v1::{BuildState, GetBuildRequest};
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let build = scheduler
            .get_build(GetBuildRequest {
                build_id: id.into(),
            })
            .await
            .expect("GetBuild")
            .into_inner()
            .build
            .expect("a build");
        let state = BuildState::try_from(build.state).expect("state");
        if !matches!(state, BuildState::Queued | BuildState::Running) {
            return build;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "build {id} did not end: {build:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET /metrics` of a service's admin listener (`METRICS_LISTEN_ADDR`) over plain HTTP/1.1.
pub fn get_metrics(addr: SocketAddr) -> String {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to /metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// A TCP balancer on a free loopback port in front of `backends`, as a Kubernetes Service is:
/// each new connection goes to the next backend in turn (a gRPC channel, one HTTP/2
/// connection, stays on one). Stops when dropped.
pub struct RoundRobin {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl RoundRobin {
    pub async fn start(backends: Vec<SocketAddr>) -> RoundRobin {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind the balancer");
        let addr = listener.local_addr().expect("address");
        let task = tokio::spawn(async move {
            let mut next = 0;
            while let Ok((mut inbound, _)) = listener.accept().await {
                let backend = backends[next % backends.len()];
                next += 1;
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(backend).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        RoundRobin { addr, task }
    }

    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for RoundRobin {
    fn drop(&mut self) {
        self.task.abort();
    }
}
