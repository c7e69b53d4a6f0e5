//! Warm-up: DbSync reads the latest snapshot of every source from PostgreSQL and writes
//! `LATEST_ROOT` and `TREE_META` through this service (its WarmCache RPC). Cache only asks; it
//! never reads PostgreSQL itself.
//!
//! At start the warm-up runs in the background, retried with backoff until it succeeds, so it
//! never delays SERVING; a DbSync that is not there yet only postpones it.

use std::time::Duration;

use merkle_proto::{
    cache::v1::WarmupResponse,
    dbsync::v1::{WarmCacheRequest, db_sync_service_client::DbSyncServiceClient},
};
use merkle_shared::{
    client::{Channel, channel},
    config::{ClientArgs, ConfigError},
    shutdown::Shutdown,
};
use tonic::Code;

use crate::error::Error;

/// The way to DbSync, if one is configured.
#[derive(Clone)]
pub struct Warmer {
    db_sync: Option<(String, DbSyncServiceClient<Channel>)>,
}

impl Warmer {
    /// A warmer calling DbSync at `addr` (`DB_SYNC_ADDR`), or one that explains it has none.
    pub fn new(addr: Option<&str>, args: &ClientArgs) -> Result<Self, ConfigError> {
        let db_sync = match addr {
            Some(addr) => Some((
                addr.to_owned(),
                DbSyncServiceClient::new(channel("DB_SYNC_ADDR (--db-sync-addr)", addr, args)?),
            )),
            None => None,
        };
        Ok(Warmer { db_sync })
    }

    /// Asks DbSync to warm the cache with the latest snapshots of `sources` (all when empty).
    pub async fn warm(&self, sources: Vec<String>) -> Result<WarmupResponse, Error> {
        let Some((addr, client)) = &self.db_sync else {
            return Err(Error::FailedPrecondition(
                "warm-up reads the latest snapshots from DbSync, and DB_SYNC_ADDR is not set"
                    .into(),
            ));
        };
        let answer = client
            .clone()
            .warm_cache(WarmCacheRequest { sources })
            .await
            .map_err(|status| match status.code() {
                Code::Unimplemented => Error::FailedPrecondition(format!(
                    "warm-up needs DbSync's WarmCache, which DbSync at {addr} does not serve yet \
                     (UNIMPLEMENTED: {})",
                    status.message()
                )),
                Code::Unavailable | Code::DeadlineExceeded => Error::Unavailable(format!(
                    "DbSync at {addr} is unavailable: {}",
                    status.message()
                )),
                Code::InvalidArgument => Error::BadRequest(status.message().to_owned()),
                Code::NotFound => Error::NotFound(status.message().to_owned()),
                Code::FailedPrecondition => Error::FailedPrecondition(status.message().to_owned()),
                _ => Error::Internal(format!(
                    "DbSync's WarmCache failed ({:?}): {}",
                    status.code(),
                    status.message()
                )),
            })?
            .into_inner();
        if !answer.cache_available {
            return Err(Error::Unavailable(
                "DbSync could not write to the cache: Redis is unavailable".into(),
            ));
        }
        Ok(WarmupResponse {
            sources_warmed: answer.sources_warmed,
            entries_written: answer.entries_written,
        })
    }

    /// Warms the cache in the background until it succeeds once (or shutdown), backing off from
    /// 1 s to 60 s between attempts. The first failure is logged as a warning, later ones at debug.
    pub fn warm_in_background(self, mut shutdown: Shutdown) {
        if self.db_sync.is_none() {
            tracing::info!("no warm-up at start: DB_SYNC_ADDR is not set");
            return;
        }
        tokio::spawn(async move {
            let mut delay = Duration::from_secs(1);
            for attempt in 1u32.. {
                match self.warm(Vec::new()).await {
                    Ok(done) => {
                        tracing::info!(
                            sources = done.sources_warmed,
                            entries = done.entries_written,
                            attempt,
                            "cache warmed from DbSync"
                        );
                        return;
                    }
                    Err(err) if attempt == 1 => {
                        tracing::warn!(error = %err, "warm-up at start failed; retrying in the background")
                    }
                    Err(err) => {
                        tracing::debug!(error = %err, attempt, "warm-up at start failed again")
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.wait() => return,
                }
                delay = (delay * 2).min(Duration::from_secs(60));
            }
        });
    }
}
