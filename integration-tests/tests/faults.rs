//! The fault campaign, against the real binaries: sources built every second while a writer
//! changes their trees (states that last long enough to be recorded, and short ones), one
//! fault injected in the middle, then the invariants once the system settled:
//!
//! - every stored root is a root the directory really had (a recomputation of each state the
//!   writer made), and every stored tree hashes to its root (`verify-history --deep`);
//! - no duplicate snapshot, sequences without gaps;
//! - no build left queued or running;
//! - every service SERVING again, without help beyond restarting what was killed (as a
//!   supervisor does);
//! - every state that lasted two intervals while the system was up is in a snapshot.
//!
//! Faults: Redis killed; PostgreSQL crashed; TreeBuilder killed mid-hash; DbSync killed
//! mid-SyncTree; the Scheduler and the Cache killed; DbSync frozen (SIGSTOP, it
//! accepts connections and never answers) for 12 s; the leading Scheduler killed with a second
//! replica running. `FAULTS_LONG=1` (`scripts/bench.sh faults`) runs the long variants: five
//! sources, DbSync frozen for 30 s.

use std::{
    collections::HashSet,
    fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use integration_tests::{ServingStatus, TestStack, run_merklectl, signal, tail};
use merkle_core::{BuildOptions, Builder};
use merkle_proto::scheduler::v1::{
    BuildState, CreateSourceRequest, GetBuildRequest, ListBuildsRequest, Source,
    UpdateSourceRequest, scheduler_service_client::SchedulerServiceClient, source::Schedule,
};
use merkle_shared::client::Channel;
use nix::sys::signal::Signal;
use parking_lot::Mutex;

/// The sources' schedule.
const INTERVAL: Duration = Duration::from_secs(1);
/// How long a long state lasts: over two intervals, so it must be recorded.
const LONG: Duration = Duration::from_millis(2600);
/// How long a short state lasts: it may be missed.
const SHORT: Duration = Duration::from_millis(300);

type Scheduler = SchedulerServiceClient<Channel>;

/// The long variants (`FAULTS_LONG=1`), too slow for every CI run.
fn long() -> bool {
    std::env::var_os("FAULTS_LONG").is_some()
}

/// One state of a source's tree, as the writer made it.
#[derive(Debug, Clone)]
struct State {
    source: String,
    root: String,
    start: Instant,
    end: Option<Instant>,
}

fn root_of(dir: &Path) -> String {
    Builder::new(BuildOptions::default())
        .build(dir)
        .expect("hash the tree")
        .root
        .to_hex()
}

/// Changes each source's tree, alternating long and short states, and records each state.
fn spawn_writer(
    dirs: Vec<(String, PathBuf)>,
    states: Arc<Mutex<Vec<State>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut n = 0u64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            for (source, dir) in &dirs {
                fs::write(dir.join(format!("f{}", n % 4)), n.to_string()).expect("write");
                let root = root_of(dir);
                let now = Instant::now();
                let mut states = states.lock();
                if let Some(last) = states
                    .iter_mut()
                    .rev()
                    .find(|s| &s.source == source && s.end.is_none())
                {
                    last.end = Some(now);
                }
                states.push(State {
                    source: source.clone(),
                    root,
                    start: now,
                    end: None,
                });
            }
            n += 1;
            std::thread::sleep(if n.is_multiple_of(2) { LONG } else { SHORT });
        }
    })
}

/// The system under the campaign.
struct Campaign {
    stack: TestStack,
    scheduler: Scheduler,
    sources: Vec<(String, PathBuf)>,
    states: Arc<Mutex<Vec<State>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    writer: Option<std::thread::JoinHandle<()>>,
    /// When the system was whole again after the fault.
    healthy_from: Instant,
    /// When the campaign began, on both clocks (for failure messages).
    started: Instant,
    started_wall: std::time::SystemTime,
}

impl Campaign {
    async fn start() -> Campaign {
        let mut stack = TestStack::new();
        let uri = stack.start_system(&[]).await;
        let mut scheduler =
            SchedulerServiceClient::new(merklectl::remote::connect(&uri).expect("channel"));
        let mut sources = Vec::new();
        let mut first = Vec::new();
        let names: &[&str] = if long() {
            &["alpha", "beta", "gamma", "delta", "epsilon"]
        } else {
            &["alpha", "beta"]
        };
        for &name in names {
            let dir = stack.dir().join(name);
            fs::create_dir_all(&dir).expect("mkdir");
            fs::write(dir.join("f0"), "start").expect("write");
            first.push(State {
                source: name.to_owned(),
                root: root_of(&dir),
                start: Instant::now(),
                end: None,
            });
            create(&mut scheduler, name, &dir).await;
            sources.push((name.to_owned(), dir));
        }
        let states = Arc::new(Mutex::new(first));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = spawn_writer(sources.clone(), states.clone(), stop.clone());
        Campaign {
            stack,
            scheduler,
            sources,
            states,
            stop,
            writer: Some(writer),
            healthy_from: Instant::now(),
            started: Instant::now(),
            started_wall: std::time::SystemTime::now(),
        }
    }

    /// Another source, built every interval; the writer leaves it alone.
    async fn add_source(&mut self, name: &str, dir: &Path) {
        create(&mut self.scheduler, name, dir).await;
    }

    /// The system is whole again (after a restart, once SERVING): from now on, every long
    /// state must be recorded.
    async fn healthy(&mut self) {
        for service in self.stack.services() {
            service.wait_for(ServingStatus::Serving).await;
        }
        self.healthy_from = Instant::now();
    }

    /// A build of `source` running in `phase` (or any running one when `None`), within 30 s.
    async fn running(&mut self, source: &str, phases: &[i32]) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let builds = self
                .scheduler
                .list_builds(ListBuildsRequest {
                    source: source.into(),
                    page_size: 5,
                    ..Default::default()
                })
                .await
                .expect("ListBuilds")
                .into_inner()
                .builds;
            for b in builds {
                if b.state == BuildState::Running as i32 {
                    let live = self
                        .scheduler
                        .get_build(GetBuildRequest {
                            build_id: b.build_id.clone(),
                        })
                        .await
                        .expect("GetBuild")
                        .into_inner()
                        .build
                        .expect("build");
                    let phase = live.progress.map(|p| p.phase).unwrap_or_default();
                    if phases.is_empty() || phases.contains(&phase) {
                        return b.build_id;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "no build of {source} reached {phases:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the writer, waits until every source stored its last state, stops the schedule,
    /// waits for the builds to end, and checks every invariant.
    async fn settle_and_check(mut self) {
        tokio::time::sleep(LONG * 2).await;
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.writer
            .take()
            .expect("writer")
            .join()
            .expect("writer thread");
        let db = self.stack.sql().await;
        let deadline = Instant::now() + Duration::from_secs(60);
        for (name, dir) in &self.sources {
            let current = root_of(dir);
            loop {
                let latest: Option<Vec<u8>> = db
                    .query_opt(
                        "SELECT root_hash FROM merkle_roots WHERE source = $1 ORDER BY sequence DESC LIMIT 1",
                        &[name],
                    )
                    .await
                    .expect("latest")
                    .map(|r| r.get(0));
                if latest.as_deref().map(merkle_core::digest::hex) == Some(current.clone()) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{name}'s last state {current} was never stored:\n{}",
                    tail(&self.stack.service_mut("scheduler").log)
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        // A fault of the system is no failure of the sources the writer changes: none was
        // backed off once the system was whole: every tick made a build (or a SKIPPED one
        // beside a running build), so no gap between two is near the 10 s first backoff.
        let healthy_wall = self.started_wall + self.healthy_from.duration_since(self.started);
        for (name, _) in &self.sources {
            let gap: f64 = db
                .query_one(
                    "SELECT coalesce(max(gap), 0)::float8 FROM (SELECT extract(epoch FROM \
                     created_at - lag(created_at) OVER (ORDER BY created_at)) AS gap \
                     FROM scheduler_builds WHERE source = $1 AND created_at >= $2) g",
                    &[name, &healthy_wall],
                )
                .await
                .expect("gaps")
                .get(0);
            assert!(
                gap < 5.0,
                "{name}: no build for {gap:.1}s after the fault (backed off?):\n{}",
                builds_of(&db, name).await.join("\n")
            );
        }
        let names: Vec<String> = db
            .query("SELECT name FROM scheduler_sources", &[])
            .await
            .expect("sources")
            .iter()
            .map(|r| r.get(0))
            .collect();
        for name in &names {
            self.scheduler
                .update_source(UpdateSourceRequest {
                    source: Some(Source {
                        name: name.clone(),
                        enabled: false,
                        ..Default::default()
                    }),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["enabled".into()],
                    }),
                })
                .await
                .expect("disable");
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let active: i64 = db
                .query_one(
                    "SELECT count(*) FROM scheduler_builds WHERE state IN (1, 2)",
                    &[],
                )
                .await
                .expect("count")
                .get(0);
            if active == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{active} builds still queued or running"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let states = self.states.lock().clone();
        for (name, _) in &self.sources {
            let stored: Vec<(i64, String)> = db
                .query(
                    "SELECT sequence, root_hash FROM merkle_roots WHERE source = $1 ORDER BY sequence",
                    &[name],
                )
                .await
                .expect("snapshots")
                .iter()
                .map(|r| (r.get(0), merkle_core::digest::hex(&r.get::<_, Vec<u8>>(1))))
                .collect();
            // Sequences without gaps, and no snapshot repeating the one before.
            for (i, (sequence, root)) in stored.iter().enumerate() {
                assert_eq!(*sequence, i as i64 + 1, "{name}: a gap before {sequence}");
                if i > 0 {
                    assert_ne!(
                        &stored[i - 1].1,
                        root,
                        "{name}: snapshot {sequence} repeats the one before"
                    );
                }
            }
            // Every stored root is a root the directory had.
            let had: HashSet<&str> = states
                .iter()
                .filter(|s| &s.source == name)
                .map(|s| s.root.as_str())
                .collect();
            let roots: HashSet<&str> = stored.iter().map(|(_, r)| r.as_str()).collect();
            for root in &roots {
                assert!(
                    had.contains(root),
                    "{name}: stored root {root} is no state the tree had"
                );
            }
            // Every state that lasted two intervals while the system was whole is stored.
            for s in states.iter().filter(|s| &s.source == name) {
                let from = s.start.max(self.healthy_from);
                let until = s.end.unwrap_or_else(Instant::now);
                if until > from && until - from >= INTERVAL * 2 && !roots.contains(s.root.as_str())
                {
                    let builds = builds_of(&db, name).await;
                    // As the builds' times: Unix seconds, modulo 1000.
                    let at = |t: Instant| {
                        let wall = self.started_wall + t.saturating_duration_since(self.started);
                        let unix = wall
                            .duration_since(std::time::UNIX_EPOCH)
                            .unwrap_or_default()
                            .as_secs_f64();
                        unix % 1000.0
                    };
                    panic!(
                        "{name}: the state {} ({:.3} to {:.3}, {:.2}s after the fault) was never \
                         stored; its builds (Unix seconds modulo 1000):\n{}",
                        s.root,
                        at(s.start),
                        at(until),
                        (until - from).as_secs_f64(),
                        builds.join("\n")
                    );
                }
            }
            let (code, out, err) = run_merklectl(&[
                "verify-history",
                name,
                "--deep",
                "--allow-unsigned",
                "--addr",
                &self.stack.service_mut("db-sync").uri(),
            ]);
            assert_eq!(code, Some(0), "{name}: verify-history --deep: {out}{err}");
        }
        for service in self.stack.services() {
            assert!(
                service.process.pid() > 0
                    && integration_tests::process_exists(service.process.pid()),
                "{} is not running",
                service.spec.name
            );
            service.wait_for(ServingStatus::Serving).await;
        }
    }
}

/// `source`'s builds, oldest first, one line each, for a failure's message.
async fn builds_of(db: &tokio_postgres::Client, source: &str) -> Vec<String> {
    use prost::Message as _;
    let rows = db
        .query(
            "SELECT record FROM scheduler_builds WHERE source = $1 ORDER BY created_at",
            &[&source],
        )
        .await
        .expect("builds");
    let seconds = |t: Option<prost_types::Timestamp>| {
        t.map_or("-".to_owned(), |t| {
            format!("{}.{:03}", t.seconds % 1000, t.nanos / 1_000_000)
        })
    };
    rows.iter()
        .filter_map(|r| merkle_proto::scheduler::v1::Build::decode(r.get::<_, &[u8]>(0)).ok())
        .map(|b| {
            format!(
                "  {:?} queued {} started {} ended {} missed {} {}",
                b.state(),
                seconds(b.create_time),
                seconds(b.start_time),
                seconds(b.end_time),
                b.missed_ticks,
                b.error_message
            )
        })
        .collect()
}

async fn create(scheduler: &mut Scheduler, name: &str, dir: &Path) {
    scheduler
        .create_source(CreateSourceRequest {
            source: Some(Source {
                name: name.into(),
                path: dir.display().to_string(),
                schedule: Some(Schedule::Interval(prost_types::Duration {
                    seconds: INTERVAL.as_secs() as i64,
                    nanos: 0,
                })),
                enabled: true,
                ..Default::default()
            }),
        })
        .await
        .expect("CreateSource");
}

/// A tree whose build takes seconds: one sparse file of 4 GiB (every byte is read).
fn slow_tree(stack: &TestStack) -> PathBuf {
    let dir = stack.dir().join("slow");
    fs::create_dir_all(&dir).expect("mkdir");
    fs::File::create(dir.join("big"))
        .expect("create")
        .set_len(4 << 30)
        .expect("sparse");
    dir
}

/// A tree with many directories: its first sync sends thousands of nodes.
fn wide_tree(stack: &TestStack) -> PathBuf {
    let dir = stack.dir().join("wide");
    for d in 0..4000 {
        let sub = dir.join(format!("d{:02}/e{d}", d % 50));
        fs::create_dir_all(&sub).expect("mkdir");
        fs::write(sub.join("f"), d.to_string()).expect("write");
    }
    dir
}

fn kill(stack: &mut TestStack, name: &str) {
    let pid = stack.service_mut(name).process.pid();
    signal(pid, Signal::SIGKILL);
    stack
        .service_mut(name)
        .process
        .wait_timeout(Duration::from_secs(10));
}

async fn restart(stack: &mut TestStack, name: &str) {
    let service = stack.service_mut(name);
    service.restart();
    service.wait_for(ServingStatus::Serving).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_killed_and_restarted() {
    let mut c = Campaign::start().await;
    tokio::time::sleep(LONG * 2).await;
    c.stack.redis.as_mut().expect("redis").kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.stack
        .redis
        .as_mut()
        .expect("redis")
        .start_again()
        .await
        .expect("redis again");
    c.healthy().await;
    c.settle_and_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_crashed_and_restarted() {
    let mut c = Campaign::start().await;
    tokio::time::sleep(LONG * 2).await;
    c.stack.postgres.as_mut().expect("postgres").crash();
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.stack
        .postgres
        .as_mut()
        .expect("postgres")
        .start_again()
        .await
        .expect("postgres again");
    c.healthy().await;
    c.settle_and_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tree_builder_killed_mid_hash() {
    let mut c = Campaign::start().await;
    let slow = slow_tree(&c.stack);
    c.add_source("slow", &slow).await;
    c.running(
        "slow",
        &[merkle_proto::common::v1::BuildPhase::Hashing as i32],
    )
    .await;
    kill(&mut c.stack, "tree-builder");
    restart(&mut c.stack, "tree-builder").await;
    c.healthy().await;
    c.settle_and_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn db_sync_killed_mid_sync_tree() {
    let mut c = Campaign::start().await;
    let wide = wide_tree(&c.stack);
    c.add_source("wide", &wide).await;
    c.running(
        "wide",
        &[merkle_proto::common::v1::BuildPhase::Syncing as i32],
    )
    .await;
    kill(&mut c.stack, "db-sync");
    restart(&mut c.stack, "db-sync").await;
    c.healthy().await;
    c.settle_and_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_scheduler_and_the_cache_killed_and_restarted() {
    let mut c = Campaign::start().await;
    tokio::time::sleep(LONG).await;
    c.running("alpha", &[]).await;
    kill(&mut c.stack, "scheduler");
    restart(&mut c.stack, "scheduler").await;
    let uri = c.stack.service_mut("scheduler").uri();
    c.scheduler = SchedulerServiceClient::new(merklectl::remote::connect(&uri).expect("channel"));
    tokio::time::sleep(LONG).await;
    kill(&mut c.stack, "cache");
    restart(&mut c.stack, "cache").await;
    c.healthy().await;
    c.settle_and_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn db_sync_frozen() {
    let mut c = Campaign::start().await;
    tokio::time::sleep(LONG * 2).await;
    let pid = c.stack.service_mut("db-sync").process.pid();
    signal(pid, Signal::SIGSTOP);
    tokio::time::sleep(Duration::from_secs(if long() { 30 } else { 12 })).await;
    signal(pid, Signal::SIGCONT);
    c.healthy().await;
    // A build waiting on the frozen DbSync is alive: its runner's heartbeat went on, so it
    // was never failed as a stopped replica's (and its source never got a second runner).
    let db = c.stack.sql().await;
    let taken: i64 = db
        .query_one(
            "SELECT count(*) FROM scheduler_builds WHERE position(convert_to('no heartbeat', 'UTF8') in record) > 0",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(taken, 0, "a live build was taken for a dead replica's");
    c.settle_and_check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_leading_scheduler_killed_with_a_second_replica_running() {
    let mut c = Campaign::start().await;
    let env: Vec<(&str, String)> = ["CACHE_ADDR", "DB_SYNC_ADDR", "TREE_BUILDER_ADDR"]
        .into_iter()
        .map(|k| {
            let name = match k {
                "CACHE_ADDR" => "cache",
                "DB_SYNC_ADDR" => "db-sync",
                _ => "tree-builder",
            };
            (k, c.stack.service_mut(name).uri())
        })
        .chain([
            ("MIN_INTERVAL", "1s".to_owned()),
            ("LEASE_DURATION", "2s".to_owned()),
        ])
        .collect();
    let second = c.stack.start_service("scheduler", &env);
    second.wait_for(ServingStatus::Serving).await;
    let second_uri = second.uri();
    tokio::time::sleep(LONG).await;
    // The first replica has led since it started: kill it while it runs a build.
    c.running("alpha", &[]).await;
    let first = c
        .stack
        .services()
        .iter()
        .position(|s| s.spec.name == "scheduler")
        .expect("first");
    let pid = c.stack.services()[first].process.pid();
    signal(pid, Signal::SIGKILL);
    c.scheduler =
        SchedulerServiceClient::new(merklectl::remote::connect(&second_uri).expect("channel"));
    // No restart: the second replica takes over alone; the dead one stays dead.
    c.stack.remove_service(first);
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.healthy().await;
    c.settle_and_check().await;
}
