//! TreeBuilder's configuration.

use std::path::PathBuf;

use clap::Parser;
use merkle_shared::{
    config::{ConfigError, ServerArgs, TelemetryArgs, Validate},
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
    pub server: ServerArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
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
    /// Deepest directory nesting below the built directory.
    #[arg(long, env = "MAX_DEPTH", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_depth: u32,
    /// Directory entries of recent builds kept in memory (about 100 bytes each), so
    /// VerifyTree can list the paths that differ from one of them; 0 keeps none.
    #[arg(long, env = "RECENT_ENTRIES", default_value_t = 1_000_000)]
    pub recent_entries: usize,
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
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
    fn telemetry(&self) -> &TelemetryArgs {
        &self.telemetry
    }
}
