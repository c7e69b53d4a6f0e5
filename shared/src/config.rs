//! Configuration from flags and environment variables, parsed once at start.
//!
//! Each service has one `Config` struct deriving [`clap::Parser`] that flattens the argument
//! groups below. [`load`] parses it and, on a bad or missing value, prints one line naming the
//! environment variable, the flag and the rule, and exits with status 2. Secrets in URLs are
//! redacted by [`redact_url`] before the effective config is logged.

use std::{net::SocketAddr, time::Duration};

use clap::{Args, Parser, error::ContextKind};

pub use crate::values::{
    ConfigError, parse_duration, redact_url, require_scheme, require_service_uri,
};

/// Implemented by each service's `Config` for the rules clap cannot express.
pub trait Validate {
    fn validate(&self) -> Result<(), ConfigError>;
}

/// Parses `T` from the process's arguments and environment and validates it. On failure prints
/// one line to stderr and exits with status 2; `--help` and `--version` exit 0 as usual.
pub fn load<T: Parser + Validate>() -> T {
    match try_load_from(std::env::args_os()) {
        Ok(config) => config,
        Err(LoadError::Display(err)) => err.exit(),
        Err(LoadError::Invalid(line)) => {
            eprintln!("{line}");
            std::process::exit(2);
        }
    }
}

/// Why [`try_load_from`] did not return a config.
#[derive(Debug)]
pub enum LoadError {
    /// `--help` or `--version`: clap prints it.
    Display(clap::Error),
    /// A bad or missing value, as one line.
    Invalid(String),
}

/// [`load`] without exiting, for tests and for callers that handle the error themselves.
pub fn try_load_from<T, I, A>(args: I) -> Result<T, LoadError>
where
    T: Parser + Validate,
    I: IntoIterator<Item = A>,
    A: Into<std::ffi::OsString> + Clone,
{
    let mut command = T::command();
    let matches = match command.try_get_matches_from_mut(args) {
        Ok(matches) => matches,
        Err(err) => return Err(classify(&command, err)),
    };
    let config =
        T::from_arg_matches(&matches).map_err(|err| classify(&command, err.with_cmd(&command)))?;
    config
        .validate()
        .map_err(|err| LoadError::Invalid(err.to_string()))?;
    Ok(config)
}

fn classify(command: &clap::Command, err: clap::Error) -> LoadError {
    use clap::error::ErrorKind;
    if matches!(
        err.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
    ) {
        return LoadError::Display(err);
    }
    let arg = match err.get(ContextKind::InvalidArg) {
        Some(clap::error::ContextValue::String(s)) => Some(s.clone()),
        Some(clap::error::ContextValue::Strings(v)) => v.first().cloned(),
        _ => None,
    };
    let variable = arg
        .as_deref()
        .map(|arg| describe_arg(command, arg))
        .unwrap_or_else(|| "arguments".to_owned());
    let value = match err.get(ContextKind::InvalidValue) {
        Some(clap::error::ContextValue::String(v)) => format!(" value {v:?}"),
        _ => String::new(),
    };
    // clap's own message is several lines; keep its first sentence, without the "error: ".
    let first = err.to_string();
    let first = first.lines().next().unwrap_or_default();
    let reason = first.trim_start_matches("error: ");
    LoadError::Invalid(format!(
        "invalid configuration: {variable}:{value} rejected: {reason}"
    ))
}

/// Turns clap's `--flag <NAME>` into `ENV_VAR (--flag)`, the name operators set.
fn describe_arg(command: &clap::Command, arg: &str) -> String {
    let flag = arg.split_whitespace().next().unwrap_or(arg);
    command
        .get_arguments()
        .find(|a| a.get_long().is_some_and(|long| flag == format!("--{long}")))
        .and_then(|a| a.get_env())
        .map(|env| format!("{} ({flag})", env.to_string_lossy()))
        .unwrap_or_else(|| flag.to_owned())
}

/// What every service takes, flattened once into its settings: how it serves, what it
/// reports, and how it calls the other services.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// The gRPC server settings every service has.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Address to listen on, host:port. Default: 0.0.0.0 and the service's port.
    #[arg(long, env = "LISTEN_ADDR")]
    pub listen_addr: Option<SocketAddr>,
    /// Deadline for one unary call, or for the whole of a streaming call.
    #[arg(long, env = "REQUEST_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// Largest gRPC message accepted or sent, in bytes.
    #[arg(long, env = "MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024,
          value_parser = clap::value_parser!(u32).range(1024..=64 * 1024 * 1024))]
    pub max_message_bytes: u32,
    /// Calls served at once across all connections; further calls wait.
    #[arg(long, env = "CONCURRENCY_LIMIT", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub concurrency_limit: u32,
    /// On SIGTERM or SIGINT, how long in-flight calls may take to finish before exit.
    #[arg(long, env = "SHUTDOWN_GRACE", default_value = "20s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// How often dependencies (PostgreSQL, Redis) are checked for the health status.
    #[arg(long, env = "HEALTH_CHECK_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub health_check_interval: Duration,
    /// Where `/metrics` (Prometheus text) is served, host:port; default: the gRPC address
    /// with its port + 1000 (51051-51055 locally); `off` serves none.
    #[arg(long, env = "METRICS_LISTEN_ADDR", value_parser = parse_metrics_addr)]
    pub metrics_listen_addr: Option<String>,
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
    #[command(flatten)]
    pub auth: crate::auth::AuthArgs,
}

impl ServerArgs {
    /// The address to listen on: the configured one, or 0.0.0.0 with the service's port.
    pub fn listen_addr_or(&self, default_port: u16) -> SocketAddr {
        self.listen_addr
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], default_port)))
    }
}

fn parse_metrics_addr(value: &str) -> Result<String, String> {
    if value == "off" || value.parse::<SocketAddr>().is_ok() {
        Ok(value.to_owned())
    } else {
        Err("use host:port (e.g. 0.0.0.0:51053) or off".into())
    }
}

/// Logging and tracing settings every service has.
#[derive(Debug, Clone, Args)]
pub struct TelemetryArgs {
    /// Log filter in `tracing` EnvFilter syntax, e.g. `info` or `info,merkle_db_sync=debug`.
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Log format: `json` (one object per line) or `text`.
    #[arg(long, env = "LOG_FORMAT", default_value = "json", value_parser = ["json", "text"])]
    pub log_format: String,
    /// OTLP/gRPC endpoint for traces, e.g. http://127.0.0.1:4317; unset disables export
    /// (trace context is still propagated).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

/// Settings for the channels a service opens to other services.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Timeout for establishing a connection to another service.
    #[arg(long, env = "CLIENT_CONNECT_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub client_connect_timeout: Duration,
    /// Timeout for one call to another service.
    #[arg(long, env = "CLIENT_REQUEST_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub client_request_timeout: Duration,
    /// Attempts for an idempotent call that failed with UNAVAILABLE (1 = no retry).
    #[arg(long, env = "CLIENT_MAX_ATTEMPTS", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=10))]
    pub client_max_attempts: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Parser)]
    struct TestConfig {
        #[command(flatten)]
        server: ServerArgs,
        #[arg(
            long,
            env = "TEST_DATABASE_URL",
            default_value = "postgres://localhost/x"
        )]
        database_url: String,
    }

    impl Validate for TestConfig {
        fn validate(&self) -> Result<(), ConfigError> {
            require_scheme(
                "TEST_DATABASE_URL (--database-url)",
                &self.database_url,
                &["postgres", "postgresql"],
            )
        }
    }

    fn error_line(args: &[&str]) -> String {
        match try_load_from::<TestConfig, _, _>(args.iter().copied()) {
            Err(LoadError::Invalid(line)) => line,
            other => panic!("expected an invalid-config error, got {other:?}"),
        }
    }

    #[test]
    fn bad_value_names_the_environment_variable_in_one_line() {
        let line = error_line(&["svc", "--listen-addr", "nonsense"]);
        assert!(line.contains("LISTEN_ADDR (--listen-addr)"), "{line}");
        assert!(line.contains("nonsense"), "{line}");
        assert!(!line.contains('\n'), "{line}");
    }

    #[test]
    fn out_of_range_value_names_the_rule() {
        let line = error_line(&["svc", "--concurrency-limit", "0"]);
        assert!(line.contains("CONCURRENCY_LIMIT"), "{line}");
        assert!(
            line.contains("1..=100000") || line.contains("range"),
            "{line}"
        );
    }

    #[test]
    fn validation_rule_names_the_variable() {
        let line = error_line(&["svc", "--database-url", "mysql://x"]);
        assert!(line.contains("TEST_DATABASE_URL"), "{line}");
        assert!(line.contains("postgres://"), "{line}");
    }

    #[test]
    fn durations_are_human() {
        let config: TestConfig =
            try_load_from(["svc", "--request-timeout", "250ms"]).expect("valid config");
        assert_eq!(config.server.request_timeout, Duration::from_millis(250));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://merkle:s3cret@db:5432/merkle"),
            "postgres://merkle:***@db:5432/merkle"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(
            redact_url("redis://:pw@127.0.0.1:6379/0"),
            "redis://:***@127.0.0.1:6379/0"
        );
    }
}
