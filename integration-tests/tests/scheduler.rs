//! The Scheduler as its real binary with every other service real: sources and their checks,
//! schedules firing on time, FORBID and REPLACE, coalescing after downtime, deadlines, two
//! replicas (no tick run twice, failover after SIGKILL, a paused leader fenced out), watching
//! builds from the start and late, Redis down, TreeBuilder killed mid-build, a restart, bad
//! input.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use integration_tests::{ServingStatus, TestStack, signal};
use merkle_proto::scheduler::v1::{
    Build, BuildState, BuildTrigger, CancelBuildRequest, ConcurrencyPolicy, CreateSourceRequest,
    CronSchedule, DeleteSourceRequest, GetBuildRequest, GetSourceRequest, ListBuildsRequest,
    Source, TriggerBuildRequest, UpdateSourceRequest, WatchBuildRequest,
    scheduler_service_client::SchedulerServiceClient, source::Schedule,
};
use merkle_shared::client::Channel;
use nix::sys::signal::Signal;
use tonic::Code;

type Client = SchedulerServiceClient<Channel>;

fn client(uri: &str) -> Client {
    SchedulerServiceClient::new(merklectl::remote::connect(uri).expect("channel"))
}

fn write(path: &Path, body: &str) {
    fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    fs::write(path, body).expect("write");
}

/// A directory that takes a few seconds to hash: one sparse file of `gib` GiB (every byte is
/// still read and hashed).
fn slow_dir(stack: &TestStack, name: &str, gib: u64) -> PathBuf {
    let dir = stack.dir().join(name);
    fs::create_dir_all(&dir).expect("mkdir");
    fs::File::create(dir.join("big"))
        .expect("create")
        .set_len(gib << 30)
        .expect("sparse");
    dir
}

/// Everything a build needs, and one Scheduler with `env`.
async fn system(stack: &mut TestStack, env: &[(&str, String)]) -> Client {
    client(&stack.start_system(env).await)
}

async fn start_scheduler(stack: &mut TestStack, env: &[(&str, String)]) -> Client {
    let scheduler = stack.start_service("scheduler", env);
    scheduler.wait_for(ServingStatus::Serving).await;
    client(&scheduler.uri())
}

/// The environment the first Scheduler got, for starting another replica.
fn peer_env(stack: &mut TestStack) -> Vec<(&'static str, String)> {
    let uri = |stack: &mut TestStack, name: &str| stack.service_mut(name).uri();
    vec![
        ("CACHE_ADDR", uri(stack, "cache")),
        ("DB_SYNC_ADDR", uri(stack, "db-sync")),
        ("TREE_BUILDER_ADDR", uri(stack, "tree-builder")),
        ("MIN_INTERVAL", "1s".to_owned()),
        ("LEASE_DURATION", "2s".to_owned()),
    ]
}

fn source(name: &str, path: &Path, every: Option<u64>) -> Source {
    Source {
        name: name.into(),
        path: path.display().to_string(),
        schedule: every.map(|s| {
            Schedule::Interval(prost_types::Duration {
                seconds: s as i64,
                nanos: 0,
            })
        }),
        enabled: true,
        ..Default::default()
    }
}

async fn create(c: &mut Client, s: Source) -> Source {
    c.create_source(CreateSourceRequest { source: Some(s) })
        .await
        .expect("create")
        .into_inner()
        .source
        .expect("source")
}

async fn builds(c: &mut Client, source: &str) -> Vec<Build> {
    c.list_builds(ListBuildsRequest {
        source: source.into(),
        page_size: 1000,
        page_token: String::new(),
        ..Default::default()
    })
    .await
    .expect("list")
    .into_inner()
    .builds
}

fn state(b: &Build) -> BuildState {
    BuildState::try_from(b.state).expect("state")
}

fn ended(b: &Build) -> bool {
    !matches!(state(b), BuildState::Queued | BuildState::Running)
}

/// Waits until `pred` holds for the source's builds (newest first).
async fn wait_builds(
    c: &mut Client,
    source: &str,
    within: Duration,
    pred: impl Fn(&[Build]) -> bool,
) -> Vec<Build> {
    let deadline = Instant::now() + within;
    loop {
        let list = builds(c, source).await;
        if pred(&list) {
            return list;
        }
        assert!(Instant::now() < deadline, "timed out; builds: {list:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_end(c: &mut Client, id: &str) -> Build {
    integration_tests::wait_build_end(c, id).await
}

async fn trigger(c: &mut Client, source: &str) -> Build {
    c.trigger_build(TriggerBuildRequest {
        source: source.into(),
    })
    .await
    .expect("trigger")
    .into_inner()
    .build
    .expect("build")
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64()
}

fn seconds(t: Option<prost_types::Timestamp>) -> f64 {
    let t = t.expect("timestamp");
    t.seconds as f64 + f64::from(t.nanos) / 1e9
}

#[tokio::test(flavor = "multi_thread")]
async fn a_source_is_built_on_schedule_stored_only_when_changed_and_watched_live() {
    let mut stack = TestStack::new();
    let mut c = system(&mut stack, &[]).await;
    let dir = stack.dir().join("docs");
    write(&dir.join("a/f.txt"), "one");
    let created = create(&mut c, source("docs", &dir, Some(1))).await;
    assert!(created.next_build_time.is_some());

    // The first tick builds at once; then one a second, unchanged.
    let list = wait_builds(&mut c, "docs", Duration::from_secs(20), |l| {
        l.iter().filter(|b| ended(b)).count() >= 3
    })
    .await;
    let done: Vec<&Build> = list.iter().filter(|b| ended(b)).collect();
    let oldest = done.last().expect("a build");
    assert_eq!(state(oldest), BuildState::SucceededChanged, "{oldest:?}");
    assert!(!oldest.snapshot_id.is_empty() && oldest.previous_root_hash.is_empty());
    assert_eq!(
        state(done[0]),
        BuildState::SucceededUnchanged,
        "{:?}",
        done[0]
    );
    assert_eq!(done[0].previous_root_hash, done[0].root_hash);
    for b in &done {
        assert_eq!(b.trigger, BuildTrigger::Schedule as i32);
        // Started at its tick, not an interval late (how late exactly is the benchmark's).
        let late = seconds(b.start_time) - seconds(b.scheduled_time);
        assert!(
            (0.0..5.0).contains(&late),
            "started {late:.3}s after its tick: {b:?}"
        );
        assert_eq!(b.trace_id.len(), 32);
    }
    let ticks: Vec<f64> = done.iter().map(|b| seconds(b.scheduled_time)).collect();
    for pair in ticks.windows(2) {
        let gap = pair[0] - pair[1];
        assert!(
            gap >= 0.99 && (gap - gap.round()).abs() < 0.01,
            "ticks whole seconds apart: {ticks:?}"
        );
    }

    // A change shows up at the next tick, with its previous root.
    write(&dir.join("a/f.txt"), "two");
    let before = done[0].root_hash.clone();
    let list = wait_builds(&mut c, "docs", Duration::from_secs(10), |l| {
        l.iter()
            .any(|b| state(b) == BuildState::SucceededChanged && b.previous_root_hash == before)
    })
    .await;
    assert!(list.iter().any(|b| b.root_hash != before));

    // Watched from the start and late: the first message is the current state, the last the end.
    c.update_source(UpdateSourceRequest {
        source: Some(Source {
            name: "docs".into(),
            enabled: false,
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["enabled".into()],
        }),
    })
    .await
    .expect("disable");
    // A scheduled build may still be running: FORBID refuses a trigger until it ends.
    wait_builds(&mut c, "docs", Duration::from_secs(10), |l| {
        l.iter().all(ended)
    })
    .await;
    let build = trigger(&mut c, "docs").await;
    let mut early = c
        .watch_build(WatchBuildRequest {
            build_id: build.build_id.clone(),
        })
        .await
        .expect("watch")
        .into_inner();
    let mut seen = Vec::new();
    while let Some(m) = early.message().await.expect("message") {
        seen.push(m.build.expect("build"));
    }
    assert!(!ended(&seen[0]) || seen.len() == 1, "{seen:?}");
    assert!(ended(seen.last().expect("last")));
    let mut late = c
        .watch_build(WatchBuildRequest {
            build_id: build.build_id.clone(),
        })
        .await
        .expect("watch")
        .into_inner();
    let only = late.message().await.expect("message").expect("one");
    assert_eq!(only.build, seen.last().cloned());
    assert!(
        late.message().await.expect("end").is_none(),
        "a late watcher gets the end, then EOF"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn forbid_skips_due_ticks_and_replace_cancels_the_running_build() {
    let mut stack = TestStack::new();
    let mut c = system(&mut stack, &[]).await;
    let slow = slow_dir(&stack, "slow", 3);
    create(&mut c, source("forbid", &slow, Some(1))).await;
    let list = wait_builds(&mut c, "forbid", Duration::from_secs(30), |l| {
        l.iter().filter(|b| state(b) == BuildState::Skipped).count() >= 2
    })
    .await;
    let skipped = list
        .iter()
        .find(|b| state(b) == BuildState::Skipped)
        .expect("skipped");
    assert!(skipped.error_message.contains("FORBID"), "{skipped:?}");
    assert!(
        list.iter().filter(|b| !ended(b)).count() <= 1,
        "one build at a time: {list:?}"
    );
    let err = c
        .trigger_build(TriggerBuildRequest {
            source: "forbid".into(),
        })
        .await
        .expect_err("one is running");
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    c.delete_source(DeleteSourceRequest {
        name: "forbid".into(),
    })
    .await
    .expect("delete");

    let mut replace = source("replace", &slow, None);
    replace.concurrency_policy = ConcurrencyPolicy::Replace as i32;
    create(&mut c, replace).await;
    let first = trigger(&mut c, "replace").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second = trigger(&mut c, "replace").await;
    let first = wait_end(&mut c, &first.build_id).await;
    assert_eq!(state(&first), BuildState::Cancelled, "{first:?}");
    assert!(first.error_message.contains("REPLACE"), "{first:?}");
    let second = wait_end(&mut c, &second.build_id).await;
    assert_eq!(state(&second), BuildState::SucceededChanged, "{second:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_build_past_its_deadline_and_a_cancelled_one_end_cancelled() {
    let mut stack = TestStack::new();
    let mut c = system(&mut stack, &[]).await;
    let slow = slow_dir(&stack, "slow", 3);
    let mut s = source("slow", &slow, None);
    s.deadline = Some(prost_types::Duration {
        seconds: 1,
        nanos: 0,
    });
    create(&mut c, s).await;
    let id = trigger(&mut c, "slow").await.build_id;
    let b = wait_end(&mut c, &id).await;
    assert_eq!(state(&b), BuildState::Cancelled);
    assert!(b.error_message.contains("deadline"), "{b:?}");

    c.update_source(UpdateSourceRequest {
        source: Some(Source {
            name: "slow".into(),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["deadline".into()],
        }),
    })
    .await
    .expect("default deadline");
    let b = trigger(&mut c, "slow").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cancelled = c
        .cancel_build(CancelBuildRequest {
            build_id: b.build_id.clone(),
        })
        .await
        .expect("cancel")
        .into_inner()
        .build
        .expect("build");
    assert_eq!(state(&cancelled), BuildState::Cancelled);
    let again = c
        .cancel_build(CancelBuildRequest {
            build_id: b.build_id.clone(),
        })
        .await
        .expect_err("already ended");
    assert_eq!(again.code(), Code::FailedPrecondition);
    // The next build can start: the cancelled one no longer counts as running.
    tokio::time::sleep(Duration::from_millis(500)).await;
    trigger(&mut c, "slow").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ticks_missed_while_no_scheduler_ran_are_coalesced_into_one_build() {
    let mut stack = TestStack::new();
    let mut c = system(&mut stack, &[]).await;
    let dir = stack.dir().join("docs");
    write(&dir.join("f"), "x");
    create(&mut c, source("docs", &dir, Some(1))).await;
    wait_builds(&mut c, "docs", Duration::from_secs(20), |l| {
        l.iter().any(ended)
    })
    .await;
    let env = peer_env(&mut stack);
    stack
        .service_mut("scheduler")
        .process
        .stop(Duration::from_secs(20));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut c = start_scheduler(&mut stack, &env).await;
    let list = wait_builds(&mut c, "docs", Duration::from_secs(20), |l| {
        l.iter().any(|b| b.missed_ticks >= 3)
    })
    .await;
    let coalesced = list
        .iter()
        .find(|b| b.missed_ticks >= 3)
        .expect("coalesced");
    assert!(coalesced.missed_ticks <= 7, "{coalesced:?}");
    // One build for those ticks, not one each: none is scheduled for the ticks it covers.
    let tick = seconds(coalesced.scheduled_time);
    let covered = tick + f64::from(coalesced.missed_ticks) + 0.5;
    let during: Vec<&Build> = list
        .iter()
        .filter(|b| {
            b.scheduled_time.is_some()
                && seconds(b.scheduled_time) > tick
                && seconds(b.scheduled_time) < covered
        })
        .collect();
    assert!(
        during.is_empty(),
        "no build for the coalesced ticks themselves: {during:?}"
    );
    let got = c
        .get_source(GetSourceRequest {
            name: "docs".into(),
        })
        .await
        .expect("get")
        .into_inner();
    assert!(
        got.source.expect("source").enabled,
        "missed ticks never disable a source"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_run_each_tick_once_and_fail_over_within_a_lease() {
    let mut stack = TestStack::new();
    let mut c = system(&mut stack, &[]).await;
    let env = peer_env(&mut stack);
    let mut other = start_scheduler(&mut stack, &env).await;
    for i in 0..3 {
        let dir = stack.dir().join(format!("s{i}"));
        write(&dir.join("f"), "x");
        create(&mut c, source(&format!("s{i}"), &dir, Some(1))).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;

    // SIGKILL whichever replica leads (the one whose log says so).
    let leader = stack
        .services()
        .iter()
        .position(|s| {
            s.spec.name == "scheduler"
                && fs::read_to_string(&s.log)
                    .unwrap_or_default()
                    .contains("this replica leads")
        })
        .expect("a leader");
    let killed_at = Instant::now();
    let pid = stack.services()[leader].process.pid();
    signal(pid, Signal::SIGKILL);
    // `other` is the most recently started replica.
    let leader_was_other = stack.services()[leader].uri() == stack.service_mut("scheduler").uri();
    let survivor = if leader_was_other { &mut c } else { &mut other };
    // The survivor takes over within about a lease (2 s) and ticks go on.
    let after_kill = unix_now() + 0.5;
    wait_builds(survivor, "s0", Duration::from_secs(15), |l| {
        l.iter().any(|b| {
            b.scheduled_time.is_some() && seconds(b.scheduled_time) > after_kill + 1.0 && ended(b)
        })
    })
    .await;
    assert!(killed_at.elapsed() < Duration::from_secs(15));
    tokio::time::sleep(Duration::from_secs(2)).await;

    for i in 0..3 {
        let list = builds(survivor, &format!("s{i}")).await;
        let mut per_tick: HashMap<i64, usize> = HashMap::new();
        for b in list.iter().filter(|b| b.scheduled_time.is_some()) {
            *per_tick
                .entry(
                    b.scheduled_time.expect("tick").seconds * 1000
                        + i64::from(b.scheduled_time.expect("tick").nanos / 1_000_000),
                )
                .or_default() += 1;
        }
        assert!(
            per_tick.values().all(|n| *n == 1),
            "a tick ran twice: {per_tick:?}"
        );
        assert!(per_tick.len() >= 5, "s{i}: {} ticks", per_tick.len());
        // The killed leader's running build (if any) is failed once its heartbeat is missed.
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_leader_cannot_record_a_build_after_losing_its_lease() {
    let mut stack = TestStack::new();
    let first = system(&mut stack, &[]).await;
    let env = peer_env(&mut stack);
    let second = start_scheduler(&mut stack, &env).await;
    let slow = slow_dir(&stack, "slow", 3);
    let mut c = first.clone();
    create(&mut c, source("slow", &slow, Some(60))).await;
    let running = wait_builds(&mut c, "slow", Duration::from_secs(10), |l| {
        l.iter().any(|b| state(b) == BuildState::Running)
    })
    .await;
    let build = running
        .into_iter()
        .find(|b| state(b) == BuildState::Running)
        .expect("running");
    // The leader runs scheduled builds: the replica that logged this one's start.
    let schedulers: Vec<(u32, PathBuf)> = stack
        .services()
        .iter()
        .filter(|s| s.spec.name == "scheduler")
        .map(|s| (s.process.pid(), s.log.clone()))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    let leader = loop {
        if let Some(i) = schedulers.iter().position(|(_, log)| {
            fs::read_to_string(log)
                .unwrap_or_default()
                .contains("build started")
        }) {
            break i;
        }
        assert!(
            Instant::now() < deadline,
            "no replica logged the build's start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (leader_pid, leader_log) = schedulers[leader].clone();
    let mut other = if leader == 0 { second } else { first };

    signal(leader_pid, Signal::SIGSTOP);
    tokio::time::sleep(Duration::from_secs(5)).await; // past the 2 s lease: the other leads
    signal(leader_pid, Signal::SIGCONT);
    // The old leader finishes its build, but may not record it.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !fs::read_to_string(&leader_log)
        .unwrap_or_default()
        .contains("build finished")
    {
        assert!(
            Instant::now() < deadline,
            "the paused leader's build did not finish:\n{}",
            fs::read_to_string(&leader_log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = fs::read_to_string(&leader_log).unwrap_or_default();
    assert!(log.contains("was not recorded"), "{log}");
    let recorded = other
        .get_build(GetBuildRequest {
            build_id: build.build_id.clone(),
        })
        .await
        .expect("get")
        .into_inner()
        .build
        .expect("build");
    assert!(
        !matches!(
            state(&recorded),
            BuildState::SucceededChanged | BuildState::SucceededUnchanged
        ),
        "the fenced-out leader's outcome was recorded: {recorded:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_are_recorded_with_their_reason_and_retried_with_backoff() {
    let mut stack = TestStack::new();
    let mut c = system(&mut stack, &[]).await;
    let slow = slow_dir(&stack, "slow", 3);
    create(&mut c, source("slow", &slow, None)).await;
    // A scheduled source, registered while TreeBuilder can still check its path.
    let dir = stack.dir().join("docs");
    write(&dir.join("f"), "x");
    let mut docs = source("docs", &dir, Some(1));
    docs.enabled = false;
    create(&mut c, docs).await;
    let b = trigger(&mut c, "slow").await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    stack
        .service_mut("tree-builder")
        .process
        .signal(Signal::SIGKILL);
    let b = wait_end(&mut c, &b.build_id).await;
    assert_eq!(state(&b), BuildState::Failed, "{b:?}");
    assert!(b.error_message.contains("TreeBuilder"), "{b:?}");

    // While TreeBuilder is down the system itself is: builds fail naming it, but the source
    // is not backed off as a failing one; it is built again at the next tick.
    enable(&mut c, "docs").await;
    let list = wait_builds(&mut c, "docs", Duration::from_secs(15), |l| {
        l.iter().any(|b| state(b) == BuildState::Failed)
    })
    .await;
    let failed = list
        .iter()
        .find(|b| state(b) == BuildState::Failed)
        .expect("a failed build");
    assert!(failed.error_message.contains("TreeBuilder"), "{failed:?}");
    let s = get_source(&mut c, "docs").await;
    assert_eq!(
        s.consecutive_failures, 0,
        "an outage is not the source's failure: {s:?}"
    );
    assert!(
        seconds(s.next_build_time) - unix_now() <= 1.5,
        "not backed off: {s:?}"
    );
    let tree_builder = stack.service_mut("tree-builder");
    tree_builder.restart();
    tree_builder.wait_for(ServingStatus::Serving).await;
    wait_builds(&mut c, "docs", Duration::from_secs(15), |l| {
        l.iter().any(|b| state(b) == BuildState::SucceededChanged)
    })
    .await;

    // A source that fails by itself (its folder is gone) is backed off, and stays enabled.
    std::fs::remove_dir_all(&dir).expect("remove the source's folder");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = get_source(&mut c, "docs").await;
        if s.consecutive_failures >= 1 {
            let next = seconds(s.next_build_time);
            assert!(
                next - unix_now() > 3.0,
                "backed off beyond the 1 s interval: {s:?}"
            );
            assert!(s.enabled);
            break;
        }
        assert!(Instant::now() < deadline, "no failure counted: {s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let builds = builds(&mut c, "docs").await;
    let last = builds
        .iter()
        .find(|b| state(b) == BuildState::Failed)
        .expect("a failed build");
    assert!(!last.error_message.is_empty(), "{last:?}");
}

async fn enable(c: &mut Client, name: &str) {
    c.update_source(UpdateSourceRequest {
        source: Some(Source {
            name: name.into(),
            enabled: true,
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["enabled".into()],
        }),
    })
    .await
    .expect("enable");
}

async fn get_source(c: &mut Client, name: &str) -> Source {
    c.get_source(GetSourceRequest { name: name.into() })
        .await
        .expect("GetSource")
        .into_inner()
        .source
        .expect("source")
}

#[tokio::test(flavor = "multi_thread")]
async fn with_redis_down_builds_run_and_are_answered_from_postgres() {
    let mut stack = TestStack::new();
    let mut c = system(&mut stack, &[]).await;
    stack.redis.as_mut().expect("redis").stop();
    let dir = stack.dir().join("docs");
    write(&dir.join("f"), "x");
    create(&mut c, source("docs", &dir, None)).await;
    let id = trigger(&mut c, "docs").await.build_id;
    let b = wait_end(&mut c, &id).await;
    assert_eq!(state(&b), BuildState::SucceededChanged, "{b:?}");
    let listed = builds(&mut c, "docs").await;
    assert_eq!(listed[0].build_id, b.build_id);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_scheduler_fails_the_builds_it_left_running() {
    let mut stack = TestStack::new();
    let mut c = system(&mut stack, &[("REPLICA_ID", "replica-a".into())]).await;
    let slow = slow_dir(&stack, "slow", 3);
    create(&mut c, source("slow", &slow, None)).await;
    let b = trigger(&mut c, "slow").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut env = peer_env(&mut stack);
    env.push(("REPLICA_ID", "replica-a".into()));
    stack
        .service_mut("scheduler")
        .process
        .signal(Signal::SIGKILL);
    let mut c = start_scheduler(&mut stack, &env).await;
    let b = wait_end(&mut c, &b.build_id).await;
    assert_eq!(state(&b), BuildState::Failed);
    assert_eq!(b.error_message, "scheduler restarted");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_sources_are_refused_naming_the_field_and_nothing_is_stored() {
    let mut stack = TestStack::new();
    let mut c = system(&mut stack, &[("MIN_INTERVAL", "10s".into())]).await;
    let dir = stack.dir().join("docs");
    write(&dir.join("f"), "x");
    create(&mut c, source("docs", &dir, Some(60))).await;
    let cron = |expression: &str, time_zone: &str| Source {
        schedule: Some(Schedule::Cron(CronSchedule {
            expression: expression.into(),
            time_zone: time_zone.into(),
        })),
        ..source("other", &dir, None)
    };
    let cases: Vec<(Source, Code, &str)> = vec![
        (
            source("other", &dir, Some(5)),
            Code::InvalidArgument,
            "source.interval: must be at least 10s",
        ),
        (
            cron("not cron", ""),
            Code::InvalidArgument,
            "source.cron.expression: ",
        ),
        (
            cron("0 3 * * *", "Atlantis/Nowhere"),
            Code::InvalidArgument,
            "source.cron.time_zone: ",
        ),
        (
            source("docs", &dir, None),
            Code::AlreadyExists,
            "source.name: ",
        ),
        (
            source("Bad Name", &dir, None),
            Code::InvalidArgument,
            "source.name: ",
        ),
        (
            source("other", Path::new("/"), None),
            Code::PermissionDenied,
            "source.path: ",
        ),
        (
            source("other", &dir.join("missing"), None),
            Code::NotFound,
            "source.path: ",
        ),
    ];
    for (s, code, start) in cases {
        let err = c
            .create_source(CreateSourceRequest { source: Some(s) })
            .await
            .expect_err(start);
        assert_eq!(err.code(), code, "{start}: {}", err.message());
        assert!(
            err.message().starts_with(start),
            "{:?} vs {start:?}",
            err.message()
        );
    }
    let err = c
        .update_source(UpdateSourceRequest {
            source: Some(Source {
                name: "docs".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["name".into()],
            }),
        })
        .await
        .expect_err("name is fixed");
    assert!(
        err.message()
            .starts_with("update_mask: \"name\" cannot be changed"),
        "{}",
        err.message()
    );
    let err = c
        .get_source(GetSourceRequest {
            name: "nope".into(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
    let err = c
        .trigger_build(TriggerBuildRequest {
            source: "nope".into(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
    let err = c
        .get_build(GetBuildRequest {
            build_id: "nope".into(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
    let listed = c
        .list_sources(merkle_proto::scheduler::v1::ListSourcesRequest::default())
        .await
        .expect("list")
        .into_inner()
        .sources;
    assert_eq!(
        listed.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["docs"],
        "nothing else stored"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn merklectl_sources_source_build_and_builds_against_the_running_scheduler() {
    use integration_tests::run_merklectl;
    let mut stack = TestStack::new();
    system(&mut stack, &[]).await;
    let addr = stack.service_mut("scheduler").uri();
    let dir = stack.dir().join("docs");
    write(&dir.join("f"), "x");
    let path = dir.to_str().expect("utf-8");
    let (code, out, err) = run_merklectl(&["source", "add", "docs", path, "--addr", &addr]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("source docs added: "), "{out}");
    let (code, _, err) = run_merklectl(&[
        "source",
        "add",
        "docs",
        path,
        "--every",
        "1s",
        "--cron",
        "* * * * *",
        "--addr",
        &addr,
    ]);
    assert_eq!(code, Some(2), "--every and --cron conflict: {err}");
    let (code, _, err) = run_merklectl(&["source", "add", "docs", path, "--addr", &addr]);
    assert_eq!(code, Some(2));
    assert!(err.contains("ALREADY_EXISTS"), "{err}");

    let (code, out, _) = run_merklectl(&["sources", "--addr", &addr]);
    assert_eq!(code, Some(0));
    assert!(
        out.lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("docs") && l.contains("on demand")),
        "{out}"
    );
    let (code, out, err) = run_merklectl(&["build", "docs", "--addr", &addr]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("  docs  ") && out.contains("changed"), "{out}");
    let (code, out, _) = run_merklectl(&["build", "docs", "--json", "--addr", &addr]);
    assert_eq!(code, Some(0));
    let json: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(json["state"], "SUCCEEDED_UNCHANGED");
    let (code, out, _) = run_merklectl(&["builds", "docs", "--addr", &addr]);
    assert_eq!(code, Some(0));
    assert_eq!(out.lines().count(), 3, "a header and two builds:\n{out}");
    let (code, _, _) = run_merklectl(&["source", "rm", "docs", "--addr", &addr]);
    assert_eq!(code, Some(0));
    let (code, _, err) = run_merklectl(&["build", "docs", "--addr", &addr]);
    assert_eq!(code, Some(2));
    assert!(err.contains("NOT_FOUND"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fleet_source_is_built_on_every_ready_client_and_a_failing_node_fails_alone() {
    use merkle_proto::{
        dbsync::v1::{GetLatestRootRequest, db_sync_service_client::DbSyncServiceClient},
        scheduler::v1::FleetMode,
    };

    let mut stack = TestStack::new();
    // Without DISCOVERY_ADDR a fleet source is refused, naming what is missing.
    let mut c = system(&mut stack, &[]).await;
    let site = stack.dir().join("site");
    write(&site.join("index.html"), "v1");
    write(&site.join("css/main.css"), "body {}");
    let fleet_source = |name: &str, path: &Path| Source {
        fleet_mode: FleetMode::AllClients as i32,
        ..source(name, path, None)
    };
    let err = c
        .create_source(CreateSourceRequest {
            source: Some(fleet_source("site", &site)),
        })
        .await
        .expect_err("no Discovery");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("DISCOVERY_ADDR"),
        "{}",
        err.message()
    );

    // Two nodes with a TreeBuilder each, one whose TreeBuilder is gone, one not ready. Each is
    // waited for: the Scheduler's calls are not retried here (CLIENT_MAX_ATTEMPTS=1).
    let mut serving = Vec::new();
    for _ in 0..2 {
        let node = stack.start_service("tree-builder", &[]);
        node.wait_for(ServingStatus::Serving).await;
        serving.push(node.uri());
    }
    let [node_a, node_b] = <[String; 2]>::try_from(serving).expect("two nodes");
    let gone = merklectl::stack::free_port().expect("free port");
    let clients = stack.dir().join("clients.yaml");
    let address = |uri: &str| uri.trim_start_matches("http://").to_owned();
    write(
        &clients,
        &format!(
            "clients:\n\
             - {{id: node-a, tree_builder_address: \"{}\"}}\n\
             - {{id: node-b, tree_builder_address: \"{}\"}}\n\
             - {{id: node-c, tree_builder_address: \"127.0.0.1:{gone}\"}}\n\
             - {{id: node-d, status: down, tree_builder_address: \"{}\"}}\n",
            address(&node_a),
            address(&node_b),
            address(&node_a),
        ),
    );
    let discovery = stack.start_service(
        "discovery",
        &[("STATIC_FILE", clients.display().to_string())],
    );
    discovery.wait_for(ServingStatus::Serving).await;
    let discovery = discovery.uri();
    let mut env = peer_env(&mut stack);
    env.push(("DISCOVERY_ADDR", discovery));
    env.push(("CLIENT_CONNECT_TIMEOUT", "1s".to_owned()));
    env.push(("CLIENT_MAX_ATTEMPTS", "1".to_owned()));
    let mut c = start_scheduler(&mut stack, &env).await;

    // A path the nodes' TreeBuilders refuse is refused at CreateSource, naming a node.
    let err = c
        .create_source(CreateSourceRequest {
            source: Some(fleet_source("etc", Path::new("/etc"))),
        })
        .await
        .expect_err("outside the nodes' allowed roots");
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    assert!(
        err.message().starts_with("source.path") && err.message().contains("on node node-"),
        "{}",
        err.message()
    );

    create(&mut c, fleet_source("site", &site)).await;
    let fleet = trigger(&mut c, "site").await;
    let fleet = wait_end(&mut c, &fleet.build_id).await;
    assert_eq!(state(&fleet), BuildState::SucceededChanged, "{fleet:?}");
    assert!(
        fleet
            .error_message
            .starts_with("1 of 3 nodes failed: node-c:"),
        "{}",
        fleet.error_message
    );
    let stats = fleet.stats.expect("stats");
    assert_eq!(stats.file_count, 4, "two files on each of two nodes");

    // The fan-out: one build per ready node, each naming the fleet build.
    let all = builds(&mut c, "site").await;
    let nodes: HashMap<String, Build> = all
        .iter()
        .filter(|b| b.parent_build_id == fleet.build_id)
        .map(|b| (b.node.clone(), b.clone()))
        .collect();
    assert_eq!(nodes.len(), 3, "{all:?}");
    for node in ["node-a", "node-b"] {
        assert_eq!(state(&nodes[node]), BuildState::SucceededChanged);
        assert!(!nodes[node].snapshot_id.is_empty());
    }
    assert_eq!(state(&nodes["node-c"]), BuildState::Failed);
    assert!(
        nodes["node-c"]
            .error_message
            .contains("node node-c's TreeBuilder"),
        "{}",
        nodes["node-c"].error_message
    );

    // One fleet build's nodes, and only its failed ones, paged; the filters are checked.
    let filtered = |parent: &str, states: Vec<i32>, page_size: u32, page_token: String| {
        let mut c = c.clone();
        let parent = parent.to_owned();
        async move {
            c.list_builds(ListBuildsRequest {
                source: "site".into(),
                page_size,
                page_token,
                parent_build_id: parent,
                states,
            })
            .await
            .map(|r| r.into_inner())
        }
    };
    let first_page = filtered(&fleet.build_id, vec![], 2, String::new())
        .await
        .expect("the fleet build's nodes");
    assert_eq!(first_page.builds.len(), 2);
    assert!(
        first_page
            .builds
            .iter()
            .all(|b| b.parent_build_id == fleet.build_id)
    );
    let rest = filtered(
        &fleet.build_id,
        vec![],
        2,
        first_page.next_page_token.clone(),
    )
    .await
    .expect("the next page");
    assert_eq!(rest.builds.len(), 1);
    assert!(rest.next_page_token.is_empty());
    let failed = filtered(
        &fleet.build_id,
        vec![BuildState::Failed as i32],
        100,
        String::new(),
    )
    .await
    .expect("failed nodes");
    let failed: Vec<&str> = failed.builds.iter().map(|b| b.node.as_str()).collect();
    assert_eq!(failed, ["node-c"]);
    let err = filtered(
        &fleet.build_id,
        vec![BuildState::Failed as i32],
        2,
        first_page.next_page_token,
    )
    .await
    .expect_err("a token of other filters");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("page_token"), "{}", err.message());
    let err = filtered("", vec![BuildState::Failed as i32, 0], 2, String::new())
        .await
        .expect_err("BUILD_STATE_UNSPECIFIED");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .starts_with("states[1]: 0 is not a build state"),
        "{}",
        err.message()
    );
    let addr = stack.service("scheduler").uri();
    let (code, out, err) = integration_tests::run_merklectl(&[
        "builds",
        "site",
        "--parent",
        &fleet.build_id,
        "--state",
        "failed",
        "--addr",
        &addr,
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("site@node-c") && !out.contains("site@node-a"),
        "{out}"
    );
    let (code, _, err) =
        integration_tests::run_merklectl(&["builds", "--state", "done", "--addr", &addr]);
    assert_eq!(code, Some(2));
    assert!(err.contains("\"done\" is not a build state"), "{err}");

    // Each node's snapshots are stored under `<source>@<node id>`.
    let mut db_sync = DbSyncServiceClient::new(stack.service_mut("db-sync").channel());
    for node in ["node-a", "node-b"] {
        let latest = db_sync
            .get_latest_root(GetLatestRootRequest {
                source: format!("site@{node}"),
                ..Default::default()
            })
            .await
            .expect("latest root")
            .into_inner()
            .snapshot
            .expect("snapshot");
        assert_eq!(latest.root_hash, nodes[node].root_hash);
    }
    let missing = db_sync
        .get_latest_root(GetLatestRootRequest {
            source: "site@node-d".into(),
            ..Default::default()
        })
        .await
        .expect_err("node-d is not ready");
    assert_eq!(missing.code(), Code::NotFound);

    // Built again unchanged; then a changed file shows as a changed fleet build.
    let again = trigger(&mut c, "site").await;
    let again = wait_end(&mut c, &again.build_id).await;
    assert_eq!(state(&again), BuildState::SucceededUnchanged, "{again:?}");
    write(&site.join("index.html"), "v2");
    let changed = trigger(&mut c, "site").await;
    let changed = wait_end(&mut c, &changed.build_id).await;
    assert_eq!(state(&changed), BuildState::SucceededChanged, "{changed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn reads_answer_unavailable_while_postgres_is_down() {
    let mut stack = TestStack::new();
    let mut c = system(&mut stack, &[("DATABASE_CONNECT_TIMEOUT", "2s".into())]).await;
    let dir = stack.dir().join("docs");
    write(&dir.join("f"), "x");
    create(&mut c, source("docs", &dir, None)).await;
    let id = trigger(&mut c, "docs").await.build_id;
    wait_end(&mut c, &id).await;

    // Frozen (accepting connections, answering nothing), then crashed: each read, with a
    // deadline well past the pool's connect timeout, is answered UNAVAILABLE (worth a retry)
    // before it.
    stack.postgres.as_mut().expect("postgres").freeze(true);
    reads_are_unavailable(&mut c, &id).await;
    stack.postgres.as_mut().expect("postgres").freeze(false);
    stack.postgres.as_mut().expect("postgres").crash();
    reads_are_unavailable(&mut c, &id).await;
}

async fn reads_are_unavailable(c: &mut Client, id: &str) {
    let started = Instant::now();
    let listed = c
        .list_builds(deadline(ListBuildsRequest {
            source: "docs".into(),
            ..Default::default()
        }))
        .await
        .expect_err("no PostgreSQL");
    let got = c
        .get_source(deadline(GetSourceRequest {
            name: "docs".into(),
        }))
        .await
        .expect_err("no PostgreSQL");
    let build = c
        .get_build(deadline(GetBuildRequest {
            build_id: id.into(),
        }))
        .await
        .expect_err("no PostgreSQL");
    for status in [&listed, &got, &build] {
        assert_eq!(
            status.code(),
            Code::Unavailable,
            "{status:?} after {:?}",
            started.elapsed()
        );
        assert!(status.message().contains("PostgreSQL"), "{status:?}");
    }
}

/// `message` with a deadline well past the pool's connect timeout.
fn deadline<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(Duration::from_secs(8));
    request
}
