//! Cache's configuration.

use std::time::Duration;

use clap::Parser;
use merkle_shared::{
    config::{CommonArgs, ConfigError, Validate, parse_duration, require_service_uri},
    service::ServiceConfig,
};

use crate::{
    keys::{MAX_TTL, MAX_VALUE_BYTES, Namespace, check_prefix},
    redis::RedisArgs,
};

/// Cache's settings, from flags or environment variables.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "merkle-cache",
    version,
    about = "Merkle Mesh Cache: the Redis cache"
)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub redis: RedisArgs,
    /// The first part of every Redis key of this deployment; Clear deletes only keys under it.
    #[arg(long, env = "CACHE_KEY_PREFIX", default_value = "merkle")]
    pub key_prefix: String,
    /// Default TTL of NAMESPACE_LATEST_ROOT; 0 means no expiry (it is written through).
    #[arg(long, env = "CACHE_TTL_LATEST_ROOT", default_value = "0s", value_parser = parse_duration)]
    pub ttl_latest_root: Duration,
    /// Default TTL of NAMESPACE_TREE_META; 0 means no expiry.
    #[arg(long, env = "CACHE_TTL_TREE_META", default_value = "10m", value_parser = parse_duration)]
    pub ttl_tree_meta: Duration,
    /// Default TTL of NAMESPACE_BUILD_STATUS; 0 means no expiry.
    #[arg(long, env = "CACHE_TTL_BUILD_STATUS", default_value = "24h", value_parser = parse_duration)]
    pub ttl_build_status: Duration,
    /// Default TTL of NAMESPACE_DISCOVERY_LIST; 0 means no expiry.
    #[arg(long, env = "CACHE_TTL_DISCOVERY_LIST", default_value = "60s", value_parser = parse_duration)]
    pub ttl_discovery_list: Duration,
    /// Default TTL of NAMESPACE_DISCOVERY_NODE; 0 means no expiry.
    #[arg(long, env = "CACHE_TTL_DISCOVERY_NODE", default_value = "5m", value_parser = parse_duration)]
    pub ttl_discovery_node: Duration,
    /// Values over this many bytes are stored compressed (LZ4); 0 never compresses.
    #[arg(long, env = "CACHE_COMPRESS_THRESHOLD", default_value_t = 1024)]
    pub compress_threshold: usize,
    /// Consecutive Redis failures after which the circuit breaker opens.
    #[arg(long, env = "REDIS_BREAKER_FAILURES", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub redis_breaker_failures: u32,
    /// How long an open circuit breaker skips Redis before one probe call tries it again.
    #[arg(long, env = "REDIS_BREAKER_COOLDOWN", default_value = "5s", value_parser = parse_duration)]
    pub redis_breaker_cooldown: Duration,
    /// DbSync, which Warmup (and the warm-up at start) asks for the latest snapshots.
    #[arg(long, env = "DB_SYNC_ADDR")]
    pub db_sync_addr: Option<String>,
    /// Warm the cache from DbSync at start, in the background (retried until it succeeds).
    #[arg(long, env = "CACHE_WARMUP_ON_START", default_value_t = true, action = clap::ArgAction::Set)]
    pub warmup_on_start: bool,
}

impl Config {
    /// The default TTL of a namespace; `None` means no expiry.
    pub fn ttl(&self, ns: Namespace) -> Option<Duration> {
        let ttl = match ns {
            Namespace::LatestRoot => self.ttl_latest_root,
            Namespace::TreeMeta => self.ttl_tree_meta,
            Namespace::BuildStatus => self.ttl_build_status,
            Namespace::DiscoveryList => self.ttl_discovery_list,
            Namespace::DiscoveryNode => self.ttl_discovery_node,
        };
        (!ttl.is_zero()).then_some(ttl)
    }
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        self.redis.validate()?;
        check_prefix(&self.key_prefix)
            .map_err(|rule| ConfigError::new("CACHE_KEY_PREFIX (--key-prefix)", rule))?;
        for (variable, ttl) in [
            (
                "CACHE_TTL_LATEST_ROOT (--ttl-latest-root)",
                self.ttl_latest_root,
            ),
            ("CACHE_TTL_TREE_META (--ttl-tree-meta)", self.ttl_tree_meta),
            (
                "CACHE_TTL_BUILD_STATUS (--ttl-build-status)",
                self.ttl_build_status,
            ),
            (
                "CACHE_TTL_DISCOVERY_LIST (--ttl-discovery-list)",
                self.ttl_discovery_list,
            ),
            (
                "CACHE_TTL_DISCOVERY_NODE (--ttl-discovery-node)",
                self.ttl_discovery_node,
            ),
        ] {
            if ttl > MAX_TTL {
                return Err(ConfigError::new(variable, "must be at most 365 days"));
            }
            if !ttl.is_zero() && ttl < Duration::from_millis(1) {
                return Err(ConfigError::new(variable, "must be 0 or at least 1ms"));
            }
        }
        if self.compress_threshold > MAX_VALUE_BYTES {
            return Err(ConfigError::new(
                "CACHE_COMPRESS_THRESHOLD (--compress-threshold)",
                "must be at most 1048576 (the largest value)",
            ));
        }
        if let Some(addr) = &self.db_sync_addr {
            require_service_uri("DB_SYNC_ADDR (--db-sync-addr)", addr)?;
        }
        Ok(())
    }
}

impl ServiceConfig for Config {
    fn common(&self) -> &CommonArgs {
        &self.common
    }
}
