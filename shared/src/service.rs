//! The common `main` of every service binary: load and validate the config (one-line error,
//! exit 2), start the runtime and telemetry, log the effective config (secrets redacted by the
//! args' `Debug`), install the signal handlers, and run the service until shutdown.

use std::{fmt::Debug, future::Future, process::ExitCode};

use clap::Parser;

use crate::{config::Validate, shutdown::Shutdown};

/// A service's config: parsed by clap, validated, loggable, with telemetry settings.
pub trait ServiceConfig: Parser + Validate + Debug {
    /// The settings every service has.
    fn common(&self) -> &crate::config::CommonArgs;
}

/// Why a service could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Serve(#[from] crate::server::ServeError),
}

/// Runs a service binary; `run` serves until the [`Shutdown`] it is given fires.
/// Exit status 2 for a configuration error (found at load or at start), 1 for any other
/// failure.
pub fn main<C, F, Fut>(service_name: &'static str, run: F) -> ExitCode
where
    C: ServiceConfig,
    F: FnOnce(C, Shutdown) -> Fut,
    Fut: Future<Output = Result<(), RunError>>,
{
    let config: C = crate::config::load();
    // Checked with the other settings, before anything starts: one line, exit 2.
    if let Err(err) = config.common().server.auth.validate() {
        eprintln!("{err}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("{service_name}: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let telemetry = match crate::telemetry::init(service_name, &config.common().telemetry) {
            Ok(guard) => guard,
            Err(err) => {
                eprintln!("{err}");
                return ExitCode::from(2);
            }
        };
        tracing::info!(service = service_name, version = env!("CARGO_PKG_VERSION"), config = ?config, "starting");
        if let Err(err) = crate::tls::init(&config.common().server.tls) {
            tracing::error!("{err}");
            return ExitCode::from(2);
        }
        if let Err(err) = crate::auth::init(&config.common().server.auth) {
            tracing::error!("{err}");
            return ExitCode::from(2);
        }
        let shutdown = match Shutdown::on_signals() {
            Ok(shutdown) => shutdown,
            Err(err) => {
                tracing::error!(%err, "cannot install signal handlers");
                return ExitCode::FAILURE;
            }
        };
        let code = match run(config, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(RunError::Config(err)) => {
                tracing::error!("{err}");
                ExitCode::from(2)
            }
            Err(err) => {
                tracing::error!(error = %err, "{service_name} failed");
                ExitCode::FAILURE
            }
        };
        drop(telemetry);
        code
    })
}
