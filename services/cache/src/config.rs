//! Cache's configuration.

use clap::Parser;
use merkle_shared::{
    config::{ConfigError, ServerArgs, TelemetryArgs, Validate},
    redis::RedisArgs,
    service::ServiceConfig,
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
    pub server: ServerArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    #[command(flatten)]
    pub redis: RedisArgs,
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        self.redis.validate()
    }
}

impl ServiceConfig for Config {
    fn telemetry(&self) -> &TelemetryArgs {
        &self.telemetry
    }
}
