//! What the Cache tests share: the service's clients, raw Redis, and small calls.

use integration_tests::{ClientAuth, RedisKind, RunningService, ServingStatus, TestStack};
use merkle_proto::cache::v1::{
    GetRequest, GetStatsRequest, GetStatsResponse, GetStatusRequest, GetStatusResponse, Namespace,
    SetRequest, cache_service_client::CacheServiceClient,
};
use tonic::transport::Channel;

pub(crate) type Client = CacheServiceClient<ClientAuth<Channel>>;

/// Clients of one Cache service, one per identity: a namespace is written only by the service
/// that owns it, so writes go as the owner ([`Clients::owner`]); everything else goes as the
/// admin (the `Deref`).
#[derive(Clone)]
pub(crate) struct Clients {
    admin: Client,
    db_sync: Client,
    scheduler: Client,
    discovery: Client,
}

impl Clients {
    /// The client of `ns`'s owner.
    pub(crate) fn owner(&mut self, ns: Namespace) -> &mut Client {
        match ns {
            Namespace::LatestRoot | Namespace::TreeMeta => &mut self.db_sync,
            Namespace::BuildStatus => &mut self.scheduler,
            _ => &mut self.discovery,
        }
    }
}

impl std::ops::Deref for Clients {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.admin
    }
}

impl std::ops::DerefMut for Clients {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.admin
    }
}

pub(crate) fn client(service: &RunningService) -> Clients {
    let as_ = |identity: &str| CacheServiceClient::new(service.channel_as(identity));
    Clients {
        admin: as_("admin"),
        db_sync: as_("db-sync"),
        scheduler: as_("scheduler"),
        discovery: as_("discovery"),
    }
}

/// A raw connection to the test's Redis (either kind), to look at what the service stored.
pub(crate) async fn raw_redis(stack: &TestStack) -> Raw {
    stack.raw_redis().await
}

pub(crate) type Raw = merkle_cache::redis::Conn;

/// Every key in Redis (of a cluster: on every master), sorted.
pub(crate) async fn redis_keys(conn: &mut Raw) -> Vec<String> {
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(conn)
        .await
        .expect("KEYS");
    keys.sort();
    keys
}

/// `INFO <section>` of every server holding keys (each master of a cluster).
pub(crate) async fn info_of_every_master(conn: &mut Raw, section: &str) -> Vec<String> {
    conn.on_masters(redis::cmd("INFO").arg(section).clone())
        .await
        .expect("INFO")
        .into_iter()
        .map(|(_, answer)| redis::from_redis_value(answer).expect("INFO text"))
        .collect()
}

pub(crate) async fn set(c: &mut Clients, ns: Namespace, key: &str, value: &[u8]) -> bool {
    c.owner(ns)
        .set(SetRequest {
            namespace: ns as i32,
            key: key.to_owned(),
            value: value.to_vec(),
            ttl: None,
            if_absent: false,
        })
        .await
        .expect("Set")
        .into_inner()
        .stored
}

pub(crate) async fn get(c: &mut Clients, ns: Namespace, key: &str) -> Option<Vec<u8>> {
    let answer = c
        .get(GetRequest {
            namespace: ns as i32,
            key: key.to_owned(),
        })
        .await
        .expect("Get")
        .into_inner();
    answer.found.then_some(answer.value)
}

pub(crate) async fn status(c: &mut Clients) -> GetStatusResponse {
    c.get_status(GetStatusRequest {})
        .await
        .expect("GetStatus")
        .into_inner()
}

pub(crate) async fn stats(c: &mut Clients) -> GetStatsResponse {
    c.get_stats(GetStatsRequest {})
        .await
        .expect("GetStats")
        .into_inner()
}

pub(crate) fn ns_stats(
    stats: &GetStatsResponse,
    ns: Namespace,
) -> merkle_proto::cache::v1::NamespaceStats {
    stats
        .namespaces
        .iter()
        .find(|n| n.namespace == ns as i32)
        .cloned()
        .expect("namespace in stats")
}

pub(crate) async fn start_cache(stack: &mut TestStack, env: &[(&str, String)]) -> Clients {
    start_cache_on(stack, RedisKind::Standalone, env).await
}

/// The Cache service on a Redis of `kind` (started unless one runs).
pub(crate) async fn start_cache_on(
    stack: &mut TestStack,
    kind: RedisKind,
    env: &[(&str, String)],
) -> Clients {
    stack.start_redis_of(kind).await;
    let cache = stack.start_service("cache", env);
    cache.wait_for(ServingStatus::Serving).await;
    client(cache)
}
