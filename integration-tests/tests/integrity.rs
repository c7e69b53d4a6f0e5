//! The cache never decides that nothing changed: a latest root forged through the Cache service
//! (with a stolen service token), written into Redis directly, a genuine older snapshot replayed
//! after the tree reverted, and a snapshot seeded before a source's first build; each time the
//! change is stored, and the forgery is reported in DbSync's log.

use std::{fs, path::Path, time::Duration};

use integration_tests::{ServingStatus, TestStack, run_merklectl, tail, wait_build_end};
use merkle_core::{BuildOptions, Builder, Digest};
use merkle_proto::{
    cache::v1::{Namespace, SetRequest, cache_service_client::CacheServiceClient},
    dbsync::v1::{GetLatestRootRequest, Snapshot, db_sync_service_client::DbSyncServiceClient},
    scheduler::v1::{
        Build, BuildState, CreateSourceRequest, Source, TriggerBuildRequest,
        scheduler_service_client::SchedulerServiceClient,
    },
};
use merkle_shared::client::Channel;
use prost::Message as _;
use tonic::Code;

type Scheduler = SchedulerServiceClient<Channel>;

/// The Redis key of a source's cached latest snapshot (the layout of `merkle.cache.v1`).
fn latest_key(source: &str) -> String {
    format!("merkle:v2:latest_root:{source}")
}

/// The root a build of `dir` will have (the Scheduler's default: content profile, no excludes).
fn root_of(dir: &Path) -> Digest {
    Builder::new(BuildOptions::default())
        .build(dir)
        .expect("hash")
        .root
}

struct System {
    stack: TestStack,
    scheduler: Scheduler,
    dir: std::path::PathBuf,
}

impl System {
    /// The whole system, and a source `docs` over a folder holding `a.txt` = `one`.
    async fn start() -> System {
        let mut stack = TestStack::new();
        let scheduler = stack.start_system(&[]).await;
        let mut scheduler =
            SchedulerServiceClient::new(merklectl::remote::connect(&scheduler).expect("channel"));
        let dir = stack.dir().join("docs");
        fs::create_dir_all(&dir).expect("mkdir");
        fs::write(dir.join("a.txt"), "one").expect("write");
        scheduler
            .create_source(CreateSourceRequest {
                source: Some(Source {
                    name: "docs".into(),
                    path: dir.display().to_string(),
                    enabled: true,
                    ..Default::default()
                }),
            })
            .await
            .expect("CreateSource");
        System {
            stack,
            scheduler,
            dir,
        }
    }

    async fn build(&mut self) -> Build {
        let build = self
            .scheduler
            .trigger_build(TriggerBuildRequest {
                source: "docs".into(),
            })
            .await
            .expect("TriggerBuild")
            .into_inner()
            .build
            .expect("build");
        wait_build_end(&mut self.scheduler, &build.build_id).await
    }

    fn db_sync(
        &mut self,
        identity: &str,
    ) -> DbSyncServiceClient<integration_tests::ClientAuth<tonic::transport::Channel>> {
        DbSyncServiceClient::new(self.stack.service_mut("db-sync").channel_as(identity))
    }

    /// The latest snapshot as PostgreSQL has it.
    async fn stored_latest(&mut self) -> Snapshot {
        self.db_sync("reader")
            .get_latest_root(GetLatestRootRequest {
                source: "docs".into(),
                consistent: true,
            })
            .await
            .expect("GetLatestRoot")
            .into_inner()
            .snapshot
            .expect("snapshot")
    }

    async fn redis(&self) -> redis::aio::MultiplexedConnection {
        let url = self.stack.redis.as_ref().expect("redis").url();
        redis::Client::open(url)
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect")
    }

    /// Writes `value` as the cached latest snapshot of `docs`, straight into Redis.
    async fn put_in_redis(&self, value: Vec<u8>) {
        let _: () = redis::cmd("SET")
            .arg(latest_key("docs"))
            .arg(value)
            .query_async(&mut self.redis().await)
            .await
            .expect("SET");
    }

    /// Waits until DbSync's log names `event`.
    async fn reported(&mut self, event: &str) {
        let log = self.stack.service_mut("db-sync").log.clone();
        for _ in 0..100 {
            if fs::read_to_string(&log).unwrap_or_default().contains(event) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("DbSync never reported {event}:\n{}", tail(&log));
    }
}

fn changed(build: &Build) {
    assert_eq!(
        BuildState::try_from(build.state),
        Ok(BuildState::SucceededChanged),
        "{build:?}"
    );
}

/// A snapshot that claims `root` is the latest of `docs`, built from a genuine one.
fn forged(genuine: &Snapshot, root: Digest) -> Snapshot {
    Snapshot {
        root_hash: root.to_hex(),
        ..genuine.clone()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_root_forged_through_the_cache_service_hides_no_change() {
    let mut system = System::start().await;
    changed(&system.build().await);
    let first = system.stored_latest().await;
    fs::write(system.dir.join("a.txt"), "two").expect("write");
    let lie = forged(&first, root_of(&system.dir)).encode_to_vec();
    let set = |value: Vec<u8>| SetRequest {
        namespace: Namespace::LatestRoot as i32,
        key: "docs".into(),
        value,
        ttl: None,
        if_absent: false,
    };
    let cache = system.stack.service_mut("cache");
    // Without credentials, and as people: refused.
    let err = CacheServiceClient::new(cache.plain_channel())
        .set(set(lie.clone()))
        .await
        .expect_err("no credentials");
    assert_eq!(err.code(), Code::Unauthenticated, "{}", err.message());
    for identity in ["reader", "admin", "scheduler"] {
        let err = CacheServiceClient::new(cache.channel_as(identity))
            .set(set(lie.clone()))
            .await
            .expect_err("not the owner");
        assert_eq!(
            err.code(),
            Code::PermissionDenied,
            "{identity}: {}",
            err.message()
        );
    }
    // With DbSync's own (stolen) token the Cache takes it; DbSync does not.
    let mut thief = CacheServiceClient::new(cache.channel_as("db-sync"));
    assert!(
        thief
            .set(set(lie.clone()))
            .await
            .expect("Set")
            .into_inner()
            .stored
    );
    let read = system
        .db_sync("reader")
        .get_latest_root(GetLatestRootRequest {
            source: "docs".into(),
            consistent: false,
        })
        .await
        .expect("GetLatestRoot");
    assert_eq!(
        read.metadata().get("x-cache").and_then(|v| v.to_str().ok()),
        Some("MISS"),
        "a forged value is never a hit"
    );
    assert_eq!(
        read.into_inner().snapshot.expect("snapshot").root_hash,
        first.root_hash
    );
    system.reported("forged_cache_value").await;

    // Forged again (the read replaced it): the build still stores the change.
    assert!(thief.set(set(lie)).await.expect("Set").into_inner().stored);
    let build = system.build().await;
    changed(&build);
    let second = system.stored_latest().await;
    assert_eq!(second.sequence, 2);
    assert_eq!(second.root_hash, root_of(&system.dir).to_hex());
    assert_eq!(build.root_hash, second.root_hash);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_root_written_into_redis_directly_hides_no_change() {
    let mut system = System::start().await;
    changed(&system.build().await);
    // The Cache's plain header byte, then: the message alone; a seal-shaped value whose tag
    // is made up.
    for fake_tag in [false, true] {
        let latest = system.stored_latest().await;
        fs::write(
            system.dir.join("a.txt"),
            format!("after {}", latest.sequence),
        )
        .expect("write");
        let lie = forged(&latest, root_of(&system.dir)).encode_to_vec();
        let mut value = vec![0u8];
        if fake_tag {
            value.push(1);
            value.extend_from_slice(&[7; 40]);
        }
        value.extend_from_slice(&lie);
        system.put_in_redis(value).await;
        let build = system.build().await;
        changed(&build);
        let latest = system.stored_latest().await;
        assert_eq!(latest.root_hash, root_of(&system.dir).to_hex());
    }
    let stored = system.stored_latest().await;
    assert_eq!(stored.sequence, 3);
    // Readers are never served a forgery either.
    let lie = forged(&stored, Digest([9; 32]));
    let mut value = vec![0u8];
    value.extend_from_slice(&lie.encode_to_vec());
    system.put_in_redis(value).await;
    let read = system
        .db_sync("reader")
        .get_latest_root(GetLatestRootRequest {
            source: "docs".into(),
            consistent: false,
        })
        .await
        .expect("GetLatestRoot")
        .into_inner()
        .snapshot
        .expect("snapshot");
    assert_eq!(read.root_hash, stored.root_hash);
    system.reported("forged_cache_value").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replayed_genuine_older_snapshot_hides_no_reverted_tree() {
    let mut system = System::start().await;
    changed(&system.build().await);
    let mut redis = system.redis().await;
    // What DbSync itself wrote for snapshot 1: genuine, sealed.
    let genuine: Vec<u8> = redis::cmd("GET")
        .arg(latest_key("docs"))
        .query_async(&mut redis)
        .await
        .expect("GET the genuine value");
    assert!(!genuine.is_empty());
    let first = system.stored_latest().await;
    fs::write(system.dir.join("a.txt"), "two").expect("write");
    changed(&system.build().await);
    // The tree goes back to what snapshot 1 was, and snapshot 1's cached value is replayed.
    fs::write(system.dir.join("a.txt"), "one").expect("write");
    assert_eq!(root_of(&system.dir).to_hex(), first.root_hash);
    system.put_in_redis(genuine).await;
    let build = system.build().await;
    changed(&build);
    let third = system.stored_latest().await;
    assert_eq!(
        third.sequence, 3,
        "the reverted tree is a change after snapshot 2"
    );
    assert_eq!(third.root_hash, first.root_hash);
    system.reported("stale_cache_value").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_seeded_before_the_first_build_is_not_taken_for_it() {
    let mut system = System::start().await;
    let seeded = Snapshot {
        snapshot_id: "1".into(),
        source: "docs".into(),
        sequence: 1,
        root_hash: root_of(&system.dir).to_hex(),
        ..Default::default()
    };
    let mut thief =
        CacheServiceClient::new(system.stack.service_mut("cache").channel_as("db-sync"));
    assert!(
        thief
            .set(SetRequest {
                namespace: Namespace::LatestRoot as i32,
                key: "docs".into(),
                value: seeded.encode_to_vec(),
                ttl: None,
                if_absent: false,
            })
            .await
            .expect("Set")
            .into_inner()
            .stored
    );
    let build = system.build().await;
    changed(&build);
    let first = system.stored_latest().await;
    assert_eq!((first.sequence, first.root_hash), (1, seeded.root_hash));
}

#[tokio::test(flavor = "multi_thread")]
async fn merklectl_push_stores_a_change_the_cache_claims_is_stored() {
    let mut stack = TestStack::new();
    stack.start_postgres().await;
    stack.start_redis().await;
    let cache = stack.start_serving("cache").await.uri();
    let db_sync = stack.start_service("db-sync", &[("CACHE_ADDR", cache)]);
    db_sync.wait_for(ServingStatus::Serving).await;
    let addr = db_sync.uri();
    let dir = stack.dir().join("pushed");
    fs::create_dir_all(&dir).expect("mkdir");
    fs::write(dir.join("a.txt"), "one").expect("write");
    let path = dir.to_str().expect("utf-8");
    let (code, _, err) = run_merklectl(&["push", "pushed", path, "--addr", &addr]);
    assert_eq!(code, Some(0), "{err}");
    fs::write(dir.join("a.txt"), "two").expect("write");
    let lie = Snapshot {
        source: "pushed".into(),
        sequence: 1,
        root_hash: root_of(&dir).to_hex(),
        ..Default::default()
    };
    let mut thief = CacheServiceClient::new(stack.service_mut("cache").channel_as("db-sync"));
    thief
        .set(SetRequest {
            namespace: Namespace::LatestRoot as i32,
            key: "pushed".into(),
            value: lie.encode_to_vec(),
            ttl: None,
            if_absent: false,
        })
        .await
        .expect("Set");
    let (code, out, err) = run_merklectl(&["push", "pushed", path, "--addr", &addr, "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let pushed: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(pushed["changed"], true, "{out}");
    assert_eq!(pushed["snapshot"]["sequence"], 2, "{out}");
}
