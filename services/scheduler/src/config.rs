//! Scheduler's configuration.

use std::{path::PathBuf, time::Duration};

use clap::Parser;
use merkle_shared::{
    cache::CacheArgs,
    config::{CommonArgs, ConfigError, Validate, parse_duration, require_service_uri},
    postgres::PostgresArgs,
    service::ServiceConfig,
};

/// Scheduler's settings, from flags or environment variables.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "merkle-scheduler",
    version,
    about = "Merkle Mesh Scheduler: sources and builds"
)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub postgres: PostgresArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// TreeBuilder, which hashes the sources' directories.
    #[arg(long, env = "TREE_BUILDER_ADDR")]
    pub tree_builder_addr: Option<String>,
    /// DbSync, which stores the snapshots.
    #[arg(long, env = "DB_SYNC_ADDR")]
    pub db_sync_addr: Option<String>,
    /// Discovery, which lists the client nodes fleet sources are built on.
    #[arg(long, env = "DISCOVERY_ADDR")]
    pub discovery_addr: Option<String>,
    /// Nodes a fleet build builds at once.
    #[arg(long, env = "FLEET_PARALLELISM", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub fleet_parallelism: u32,
    /// Shortest interval a source may be built at.
    #[arg(long, env = "MIN_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub min_interval: Duration,
    /// How long the leader's lease lasts without renewal; another replica takes over within
    /// this long after the leader dies. Renewed every third of it.
    #[arg(long, env = "LEASE_DURATION", default_value = "10s", value_parser = parse_duration)]
    pub lease_duration: Duration,
    /// This replica's name in the lease and on the builds it runs; default `<hostname>:<port>`,
    /// stable across restarts so a restarted replica can fail the builds it left running.
    #[arg(long, env = "REPLICA_ID")]
    pub replica_id: Option<String>,
    /// Builds this replica runs at once; more wait (QUEUED).
    #[arg(long, env = "MAX_RUNNING_BUILDS", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_running_builds: u32,
    /// A JSON file of sources to create or update at start (an array of Source messages in
    /// proto3 JSON form); sources not in the file are left alone.
    #[arg(long, env = "SOURCES_FILE")]
    pub sources_file: Option<PathBuf>,
}

impl Config {
    /// This replica's id.
    pub fn replica(&self) -> String {
        self.replica_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "scheduler".into());
            let port = self
                .common
                .server
                .listen_addr_or(merkle_shared::ports::SCHEDULER)
                .port();
            format!("{host}:{port}")
        })
    }
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        self.postgres.validate()?;
        self.cache.validate()?;
        for (variable, addr) in [
            (
                "TREE_BUILDER_ADDR (--tree-builder-addr)",
                &self.tree_builder_addr,
            ),
            ("DB_SYNC_ADDR (--db-sync-addr)", &self.db_sync_addr),
            ("DISCOVERY_ADDR (--discovery-addr)", &self.discovery_addr),
        ] {
            if let Some(addr) = addr {
                require_service_uri(variable, addr)?;
            }
        }
        if self.min_interval < Duration::from_secs(1) {
            return Err(ConfigError::new(
                "MIN_INTERVAL (--min-interval)",
                "must be at least 1s",
            ));
        }
        if self.lease_duration < Duration::from_secs(1) {
            return Err(ConfigError::new(
                "LEASE_DURATION (--lease-duration)",
                "must be at least 1s",
            ));
        }
        Ok(())
    }
}

impl ServiceConfig for Config {
    fn common(&self) -> &CommonArgs {
        &self.common
    }
}
