//! The gRPC face of Cache: each request is checked whole (nothing is written on a rejected
//! call), then handed to the [`Store`] or the [`Warmer`].

use std::sync::Arc;

use merkle_proto::cache::v1::{
    CircuitState, ClearRequest, ClearResponse, DeleteRequest, DeleteResponse, Entry,
    GetManyRequest, GetManyResponse, GetRequest, GetResponse, GetStatsRequest, GetStatsResponse,
    GetStatusRequest, GetStatusResponse, InvalidatePatternRequest, InvalidatePatternResponse,
    RedisNodeStats, SetManyRequest, SetManyResponse, SetRequest, SetResponse, WarmupRequest,
    WarmupResponse, WatchLatestRootsRequest, WatchLatestRootsResponse,
    cache_service_server::CacheService,
};
use merkle_shared::{
    auth::{self, Role},
    breaker::BreakerState,
};
use tonic::{Request, Response, Status};

use crate::{
    error::Error,
    keys::{
        Namespace, SCHEMA_VERSION, check_batch, check_key, check_pattern, check_ttl, check_value,
    },
    notices::Notices,
    store::{Store, Unavailable, Written},
    warmup::Warmer,
};

pub(crate) struct CacheApi {
    store: Arc<Store>,
    notices: Arc<Notices>,
    warmer: Warmer,
}

impl CacheApi {
    pub(crate) fn new(store: Arc<Store>, notices: Arc<Notices>, warmer: Warmer) -> Self {
        CacheApi {
            store,
            notices,
            warmer,
        }
    }
}

fn proto_duration(d: std::time::Duration) -> Option<prost_types::Duration> {
    prost_types::Duration::try_from(d).ok()
}

/// Deletions cannot be dropped silently: the caller must know the key may still be there.
fn unavailable(err: Unavailable) -> Error {
    Error::Unavailable(format!("Redis is unavailable: {err}"))
}

#[tonic::async_trait]
impl CacheService for CacheApi {
    type WatchLatestRootsStream =
        tokio_stream::wrappers::ReceiverStream<Result<WatchLatestRootsResponse, Status>>;

    async fn watch_latest_roots(
        &self,
        request: Request<tonic::Streaming<WatchLatestRootsRequest>>,
    ) -> Result<Response<Self::WatchLatestRootsStream>, Status> {
        let messages = self.notices.open(request.into_inner()).await?;
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            messages,
        )))
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let request = request.into_inner();
        let ns = Namespace::from_proto("namespace", request.namespace)?;
        let key = check_key("key", &request.key)?;
        let response = match self.store.get(ns, key).await {
            Some(found) => GetResponse {
                found: true,
                value: found.value,
                ttl_remaining: found.ttl.and_then(proto_duration),
            },
            None => GetResponse::default(),
        };
        Ok(Response::new(response))
    }

    async fn set(&self, request: Request<SetRequest>) -> Result<Response<SetResponse>, Status> {
        let caller = auth::caller(&request);
        let request = request.into_inner();
        let ns = Namespace::from_proto("namespace", request.namespace)?;
        auth::require_namespace_writer(&caller, ns.to_proto(), false)?;
        let key = check_key("key", &request.key)?;
        check_value("value", &request.value)?;
        let ttl = check_ttl("ttl", request.ttl.as_ref())?;
        if request.if_absent {
            let written = self.store.set_if_absent(ns, key, &request.value, ttl).await;
            return Ok(Response::new(SetResponse {
                stored: written == Written::Stored,
                existed: written == Written::Existed,
            }));
        }
        let stored = self.store.set(ns, key, &request.value, ttl).await;
        Ok(Response::new(SetResponse {
            stored,
            existed: false,
        }))
    }

    async fn delete(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let caller = auth::caller(&request);
        let request = request.into_inner();
        let ns = Namespace::from_proto("namespace", request.namespace)?;
        auth::require_namespace_writer(&caller, ns.to_proto(), true)?;
        let key = check_key("key", &request.key)?;
        let deleted = self.store.delete(ns, key).await.map_err(unavailable)?;
        Ok(Response::new(DeleteResponse { deleted }))
    }

    async fn get_many(
        &self,
        request: Request<GetManyRequest>,
    ) -> Result<Response<GetManyResponse>, Status> {
        let request = request.into_inner();
        let ns = Namespace::from_proto("namespace", request.namespace)?;
        check_batch("keys", request.keys.len())?;
        for (i, key) in request.keys.iter().enumerate() {
            check_key(&format!("keys[{i}]"), key)?;
        }
        let values = self.store.get_many(ns, &request.keys).await;
        let entries = request
            .keys
            .into_iter()
            .zip(values)
            .map(|(key, value)| Entry {
                key,
                found: value.is_some(),
                value: value.unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(GetManyResponse { entries }))
    }

    async fn set_many(
        &self,
        request: Request<SetManyRequest>,
    ) -> Result<Response<SetManyResponse>, Status> {
        let caller = auth::caller(&request);
        let request = request.into_inner();
        let ns = Namespace::from_proto("namespace", request.namespace)?;
        auth::require_namespace_writer(&caller, ns.to_proto(), false)?;
        check_batch("entries", request.entries.len())?;
        for (i, entry) in request.entries.iter().enumerate() {
            check_key(&format!("entries[{i}].key"), &entry.key)?;
            check_value(&format!("entries[{i}].value"), &entry.value)?;
        }
        let ttl = check_ttl("ttl", request.ttl.as_ref())?;
        let entries: Vec<(&str, &[u8])> = request
            .entries
            .iter()
            .map(|e| (e.key.as_str(), e.value.as_slice()))
            .collect();
        let stored = self.store.set_many(ns, &entries, ttl).await;
        Ok(Response::new(SetManyResponse { stored }))
    }

    async fn invalidate_pattern(
        &self,
        request: Request<InvalidatePatternRequest>,
    ) -> Result<Response<InvalidatePatternResponse>, Status> {
        let caller = auth::caller(&request);
        let request = request.into_inner();
        let ns = Namespace::from_proto("namespace", request.namespace)?;
        auth::require_namespace_writer(&caller, ns.to_proto(), true)?;
        let pattern = check_pattern("pattern", &request.pattern)?;
        let deleted = self
            .store
            .invalidate(ns, pattern)
            .await
            .map_err(unavailable)?;
        Ok(Response::new(InvalidatePatternResponse { deleted }))
    }

    async fn clear(
        &self,
        request: Request<ClearRequest>,
    ) -> Result<Response<ClearResponse>, Status> {
        let caller = auth::caller(&request);
        let request = request.into_inner();
        let ns = match request.namespace {
            0 => None,
            n => Some(Namespace::from_proto("namespace", n)?),
        };
        match ns {
            Some(ns) => auth::require_namespace_writer(&caller, ns.to_proto(), true)?,
            None => auth::require_role(&caller, Role::Admin, "clearing every namespace")?,
        }
        let deleted = self.store.clear(ns).await.map_err(unavailable)?;
        tracing::info!(
            namespace = ns.map_or("all", Namespace::segment),
            deleted,
            caller = %caller.describe(),
            "cache cleared"
        );
        Ok(Response::new(ClearResponse { deleted }))
    }

    async fn warmup(
        &self,
        request: Request<WarmupRequest>,
    ) -> Result<Response<WarmupResponse>, Status> {
        let request = request.into_inner();
        check_batch("sources", request.sources.len())?;
        Ok(Response::new(self.warmer.warm(request.sources).await?))
    }

    async fn get_stats(
        &self,
        _request: Request<GetStatsRequest>,
    ) -> Result<Response<GetStatsResponse>, Status> {
        let mut response = GetStatsResponse {
            namespaces: self.store.stats().snapshot(),
            redis_cluster: self.store.clustered(),
            ..Default::default()
        };
        if let Ok(info) = self.store.info().await {
            response.redis_available = true;
            response.redis_used_memory_bytes = info.used_memory;
            response.redis_keys = info.deployment_keys;
            response.redis_evicted_keys = info.evicted_keys;
            response.redis_version = info.version;
            response.redis_maxmemory_bytes = info.maxmemory;
            response.redis_maxmemory_policy = info.maxmemory_policy;
            response.redis_nodes = info
                .nodes
                .into_iter()
                .map(|node| RedisNodeStats {
                    address: node.address,
                    used_memory_bytes: node.used_memory,
                    keys: node.deployment_keys,
                    maxmemory_bytes: node.maxmemory,
                    evicted_keys: node.evicted_keys,
                })
                .collect();
        }
        Ok(Response::new(response))
    }

    async fn get_status(
        &self,
        _request: Request<GetStatusRequest>,
    ) -> Result<Response<GetStatusResponse>, Status> {
        let ping = self.store.last_ping();
        let circuit_state = match self.store.breaker_state() {
            BreakerState::Closed => CircuitState::Closed,
            BreakerState::Open => CircuitState::Open,
            BreakerState::HalfOpen => CircuitState::HalfOpen,
        };
        Ok(Response::new(GetStatusResponse {
            circuit_state: circuit_state as i32,
            redis_reachable: ping.reachable,
            redis_latency: ping.latency.and_then(proto_duration),
            uptime: proto_duration(self.store.uptime()),
            key_prefix: self.store.keys().prefix().to_owned(),
            schema_version: SCHEMA_VERSION,
            latest_root_invalidating: self.store.latest_root_untrusted(),
            circuit_opened_count: self.store.breaker_opened(),
            last_error: self.store.last_error(),
        }))
    }
}
