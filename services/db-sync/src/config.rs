//! DbSync's configuration.

use clap::Parser;
use merkle_shared::{
    config::{ConfigError, ServerArgs, TelemetryArgs, Validate},
    postgres::PostgresArgs,
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
    pub server: ServerArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    #[command(flatten)]
    pub postgres: PostgresArgs,
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        self.postgres.validate()
    }
}

impl ServiceConfig for Config {
    fn telemetry(&self) -> &TelemetryArgs {
        &self.telemetry
    }
}
