//! TreeBuilder's configuration.

use std::{path::PathBuf, time::Duration};

use clap::Parser;
use merkle_shared::{
    config::{CommonArgs, ConfigError, Validate, parse_duration, require_service_uri},
    service::ServiceConfig,
};

/// TreeBuilder's settings, from flags or environment variables.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "merkle-tree-builder",
    version,
    about = "Merkle Mesh TreeBuilder: hashes directories into Merkle trees"
)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Directories under which builds are allowed, comma-separated. Each is resolved once at
    /// start (symlinks followed, and the resolution logged); a requested path must lie under
    /// one of them once canonicalized. Relative request paths are taken from the first.
    #[arg(long, env = "ALLOWED_ROOTS", value_delimiter = ',', required = true)]
    pub allowed_roots: Vec<PathBuf>,
    /// Folder for the persistent stat caches that make rebuilds incremental (one file per
    /// built directory); unset reads every file on every build.
    #[arg(long, env = "STAT_CACHE_DIR")]
    pub stat_cache_dir: Option<PathBuf>,
    /// Builds that run at once; further BuildTree and VerifyTree calls wait (phase QUEUED).
    #[arg(long, env = "MAX_CONCURRENT_BUILDS", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub max_concurrent_builds: u32,
    /// Hashing threads per build; 0 means one per core.
    #[arg(long, env = "HASH_THREADS", default_value_t = 0)]
    pub hash_threads: usize,
    /// Most entries a tree may have.
    #[arg(long, env = "MAX_ENTRIES", default_value_t = 10_000_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_entries: u64,
    /// Deepest directory nesting below the built directory; at most 256, the spec's limit.
    #[arg(long, env = "MAX_DEPTH", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pub max_depth: u32,
    /// Trees kept in memory and watched for changes (Linux inotify), so that rebuilding one
    /// lists only the directories with changes and reads only the changed files; the most
    /// recently built are kept. 0 turns watching off (rebuilds then use the stat cache).
    #[arg(long, env = "WATCH_TREES", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(0..=100))]
    pub watch_trees: u32,
    /// Largest tree, in entries, that is kept watched (about 250 bytes of memory each, and
    /// one inotify watch per directory); a larger tree is built as without watching.
    #[arg(long, env = "WATCH_MAX_ENTRIES", default_value_t = 500_000)]
    pub watch_max_entries: u64,
    /// A watched tree is scanned whole again once this long has passed since its last full
    /// scan, to catch what change events cannot report (writes through a shared mmap, a file
    /// system mounted inside the tree).
    #[arg(long, env = "WATCH_RESCAN_INTERVAL", default_value = "10m", value_parser = parse_duration)]
    pub watch_rescan_interval: Duration,
    /// Directory entries of recent builds kept in memory (about 100 bytes each), so
    /// VerifyTree can list the paths that differ from one of them; 0 keeps none.
    #[arg(long, env = "RECENT_ENTRIES", default_value_t = 1_000_000)]
    pub recent_entries: usize,
    /// DbSync, for VerifyTree against a stored tree that is not one of the recent builds;
    /// unset: such a VerifyTree compares roots only.
    #[arg(long, env = "DB_SYNC_ADDR")]
    pub db_sync_addr: Option<String>,
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(addr) = &self.db_sync_addr {
            require_service_uri("DB_SYNC_ADDR (--db-sync-addr)", addr)?;
        }
        let variable = "ALLOWED_ROOTS (--allowed-roots)";
        for root in &self.allowed_roots {
            if !root.is_absolute() {
                return Err(ConfigError::new(
                    variable,
                    format!("{} must be an absolute path", root.display()),
                ));
            }
            match std::fs::metadata(root) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(ConfigError::new(
                        variable,
                        format!("{} is not a directory", root.display()),
                    ));
                }
                Err(e) => {
                    return Err(ConfigError::new(
                        variable,
                        format!("{} cannot be used: {e}", root.display()),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl ServiceConfig for Config {
    fn common(&self) -> &CommonArgs {
        &self.common
    }
}
