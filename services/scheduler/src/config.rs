//! Scheduler's configuration.

use clap::Parser;
use merkle_shared::{
    config::{ConfigError, ServerArgs, TelemetryArgs, Validate},
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
    pub server: ServerArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }
}

impl ServiceConfig for Config {
    fn telemetry(&self) -> &TelemetryArgs {
        &self.telemetry
    }
}
