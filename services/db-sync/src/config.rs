//! DbSync's configuration.

use std::{path::PathBuf, time::Duration};

use clap::Parser;
use merkle_shared::{
    cache::CacheArgs,
    config::{CommonArgs, ConfigError, Validate, parse_duration},
    postgres::PostgresArgs,
    read_replicas::ReadReplicaArgs,
    service::ServiceConfig,
};

/// DbSync's settings, from flags or environment variables.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "merkle-db-sync",
    version,
    about = "Merkle Mesh DbSync: snapshots in PostgreSQL"
)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub postgres: PostgresArgs,
    #[command(flatten)]
    pub read_replicas: ReadReplicaArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// Memory for directory nodes kept in this process (they never change, so they are never
    /// invalidated), in bytes; 0 keeps none.
    #[arg(long, env = "NODE_CACHE_BYTES", default_value_t = 64 << 20)]
    pub node_cache_bytes: u64,
    /// Sources whose latest snapshot is kept in this process's memory (a few hundred bytes each),
    /// kept coherent across replicas by the Cache service; 0 keeps none (every read asks the
    /// cache). Needs CACHE_ADDR.
    #[arg(long, env = "LATEST_COPY_ENTRIES", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(0..=10_000_000))]
    pub latest_copy_entries: u32,
    /// Most bytes of nodes one SyncTree may send (their canonical encodings).
    #[arg(long, env = "SYNC_MAX_BYTES", default_value_t = 256 << 20,
          value_parser = clap::value_parser!(u64).range(1024..))]
    pub sync_max_bytes: u64,
    /// How often retention is applied and unreferenced nodes are collected; 0 turns the
    /// periodic run off (SetRetentionPolicy still applies its policy at once).
    #[arg(long, env = "GC_INTERVAL", default_value = "10m", value_parser = parse_duration)]
    pub gc_interval: Duration,
    /// A node found by FindMissingNodes, stored or referenced by a sync within this long is
    /// never collected, so a sync in progress never loses a node it relies on.
    #[arg(long, env = "GC_GRACE", default_value = "1h", value_parser = parse_duration)]
    pub gc_grace: Duration,
    /// Nodes deleted per garbage-collection transaction.
    #[arg(long, env = "GC_BATCH", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub gc_batch: u32,
    /// The Ed25519 private key (PKCS#8 PEM) that signs each snapshot record and checkpoint of
    /// the history; unset: records are hash-chained but unsigned. Readable by DbSync's user
    /// only.
    #[arg(long, env = "SIGNING_KEY_FILE")]
    pub signing_key_file: Option<PathBuf>,
    /// Public keys (PEM) of earlier signing keys, comma-separated files: published with the
    /// history so records signed before a key rotation stay verifiable.
    #[arg(long, env = "PREVIOUS_PUBLIC_KEYS", value_delimiter = ',')]
    pub previous_public_keys: Vec<PathBuf>,
    /// The transparency log's origin: the first line of its checkpoints and the name of its
    /// checkpoint key (C2SP tlog-checkpoint, signed-note). Witnesses and verifiers know a log by
    /// it, so give each deployment its own, e.g. `example.com/merkle-mesh`; never change it.
    #[arg(long, env = "LOG_ORIGIN", default_value = "merkle-mesh.local/log")]
    pub log_origin: String,
    /// How often records stored meanwhile are taken into the transparency log and a new
    /// checkpoint is signed (one for all of them); a record's checkpoint comes within about
    /// this long of its commit.
    #[arg(long, env = "LOG_INTERVAL", default_value = "500ms", value_parser = parse_duration)]
    pub log_interval: Duration,
    /// Where the transparency log is served read-only over HTTP as C2SP tlog-tiles
    /// (`/checkpoint`, `/tile/...`), host:port, without credentials (a transparency log is
    /// public by design; its entries are record hashes only). Unset: not served (GetLogTile
    /// and `merklectl export-log` still read it).
    #[arg(long, env = "LOG_LISTEN_ADDR")]
    pub log_listen_addr: Option<std::net::SocketAddr>,
    /// Witnesses each new checkpoint is submitted to (C2SP tlog-witness), comma-separated
    /// `<cosignature verifier key>@<URL>`, e.g.
    /// `witness.example+1a2b3c4d+BASE64KEY@https://witness.example/`. Unset: none.
    #[arg(long, env = "WITNESSES", value_delimiter = ',')]
    pub witnesses: Vec<String>,
    /// Cosignatures a checkpoint needs to count as witnessed; 0 means every witness's.
    #[arg(long, env = "WITNESS_POLICY", default_value_t = 0)]
    pub witness_policy: u32,
    /// How long a witness may take to answer one submission.
    #[arg(long, env = "WITNESS_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub witness_timeout: Duration,
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        self.postgres.validate()?;
        self.read_replicas.validate(&self.postgres)?;
        self.cache.validate()?;
        if !signed_note::is_key_name_valid(&self.log_origin) {
            return Err(ConfigError::new(
                "LOG_ORIGIN (--log-origin)",
                "must be non-empty, without spaces or `+` (it names the checkpoint key)",
            ));
        }
        let witnesses = crate::witness::parse(&self.witnesses)?;
        if self.witness_policy as usize > witnesses.len() {
            return Err(ConfigError::new(
                "WITNESS_POLICY (--witness-policy)",
                format!(
                    "is {} but only {} witnesses are configured (WITNESSES)",
                    self.witness_policy,
                    witnesses.len()
                ),
            ));
        }
        if self.log_interval.is_zero() {
            return Err(ConfigError::new(
                "LOG_INTERVAL (--log-interval)",
                "must be more than 0",
            ));
        }
        if self.gc_grace < self.common.server.request_timeout * 2 {
            return Err(ConfigError::new(
                "GC_GRACE (--gc-grace)",
                format!(
                    "must be at least twice REQUEST_TIMEOUT ({:?}, the longest a sync can take)",
                    self.common.server.request_timeout
                ),
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
