//! PostgreSQL: the connection pool and forward-only migrations embedded in the binary.
//!
//! With `sslmode=require` (or libpq's `verify-ca` / `verify-full`) in the URL, connections use
//! TLS and the server's certificate is checked against `PGSSLROOTCERT`, its name included,
//! whichever of the three is written; without it (`prefer`, the default, or `disable`) they are
//! plaintext, as libpq's `prefer` is against a server without TLS.
//!
//! The pool connects lazily, so a service starts (and reports NOT_SERVING) while PostgreSQL is
//! down. [`migrate`] applies a component's migrations in one transaction under an advisory
//! lock, so replicas starting together apply each migration exactly once.

use std::{path::PathBuf, str::FromStr as _, time::Duration};

use bb8_postgres::PostgresConnectionManager;
use clap::Args;
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::{ConfigError, parse_duration};
use crate::error::ErrorCode;

/// A pool of PostgreSQL connections.
pub type PgPool = bb8::Pool<PostgresConnectionManager<MakeRustlsConnect>>;

/// PostgreSQL settings.
/// `Debug` redacts the password in the URL, so the effective config can be logged.
#[derive(Clone, Args)]
pub struct PostgresArgs {
    /// PostgreSQL connection URL, e.g. postgres://merkle:secret@127.0.0.1:5432/merkle.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    /// Most connections kept open.
    #[arg(long, env = "DATABASE_POOL_SIZE", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub database_pool_size: u32,
    /// Timeout for connecting and for taking a connection from the pool.
    #[arg(long, env = "DATABASE_CONNECT_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub database_connect_timeout: Duration,
    /// CA certificates (PEM) the server's certificate is checked against when the URL asks for
    /// TLS (sslmode=require, verify-ca or verify-full); libpq's variable.
    #[arg(long, env = "PGSSLROOTCERT")]
    pub database_ca_file: Option<PathBuf>,
}

/// Errors of PostgreSQL access.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("PostgreSQL unavailable: {0}")]
    Pool(#[from] bb8::RunError<tokio_postgres::Error>),
    #[error("PostgreSQL error: {}", describe(.0))]
    Query(#[from] tokio_postgres::Error),
    #[error("migrations of {component}: {reason}")]
    Migration { component: String, reason: String },
}

/// A query error with PostgreSQL's own message and SQLSTATE (tokio-postgres' `Display` of a
/// server error is only "db error").
fn describe(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => err.to_string(),
    }
}

impl PgError {
    /// The one rule for what a PostgreSQL failure means to a caller: UNAVAILABLE (worth a retry)
    /// when the server went away, is shutting down or starting, is out of resources, lost a
    /// serialization race, or its schema is not migrated yet; INTERNAL (a bug here) when it
    /// refused a query otherwise.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            PgError::Query(e) => match e.code().map(|c| c.code()) {
                Some(code) if is_transient(code) => ErrorCode::Unavailable,
                Some(_) => ErrorCode::Internal,
                // No SQLSTATE: the connection broke.
                None => ErrorCode::Unavailable,
            },
            PgError::Pool(_) | PgError::Migration { .. } => ErrorCode::Unavailable,
        }
    }
}

impl PgError {
    /// Whether PostgreSQL rolled the transaction back because it lost a race with another
    /// (a deadlock, 40P01, or a serialization failure, 40001): running it again is safe and
    /// usually succeeds.
    pub fn lost_race(&self) -> bool {
        matches!(self, PgError::Query(e) if e.code().is_some_and(|c| matches!(c.code(), "40001" | "40P01")))
    }
}

/// SQLSTATE classes and codes that pass: connection (08), transaction rollback (40),
/// insufficient resources (53), operator intervention (57), and an undefined table or column
/// (42P01, 42703) while the migrations have not run yet.
fn is_transient(code: &str) -> bool {
    ["08", "40", "53", "57"]
        .iter()
        .any(|class| code.starts_with(class))
        || code == "42P01"
        || code == "42703"
}

/// Implements `From<tokio_postgres::Error>` and `From<bb8::RunError<tokio_postgres::Error>>`
/// for a service's error enum whose variant `$variant` wraps a [`PgError`], so `?` works on
/// both.
#[macro_export]
macro_rules! from_postgres {
    ($error:ident :: $variant:ident) => {
        impl From<tokio_postgres::Error> for $error {
            fn from(err: tokio_postgres::Error) -> Self {
                $error::$variant($crate::postgres::PgError::Query(err))
            }
        }

        impl From<bb8::RunError<tokio_postgres::Error>> for $error {
            fn from(err: bb8::RunError<tokio_postgres::Error>) -> Self {
                $error::$variant($crate::postgres::PgError::Pool(err))
            }
        }
    };
}

impl PostgresArgs {
    /// Checks the URL, naming `DATABASE_URL` when it is malformed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.parse().map(drop)
    }

    fn parse(&self) -> Result<tokio_postgres::Config, ConfigError> {
        let config = parse_url("DATABASE_URL (--database-url)", &self.database_url)?;
        tls_for("DATABASE_URL (--database-url)", &config, self)?;
        Ok(config)
    }
}

/// A lazily connecting pool; fails only on a malformed URL, naming `DATABASE_URL`.
pub fn pool(args: &PostgresArgs) -> Result<PgPool, ConfigError> {
    pool_at(
        "postgresql".to_owned(),
        "DATABASE_URL (--database-url)",
        &args.database_url,
        args,
    )
}

/// A lazily connecting pool of `url` (named `pool_name` in metrics) with `args`' sizes and
/// timeouts; a malformed URL is refused naming `variable`.
pub fn pool_at(
    pool_name: String,
    variable: &str,
    url: &str,
    args: &PostgresArgs,
) -> Result<PgPool, ConfigError> {
    let mut config = parse_url(variable, url)?;
    config.connect_timeout(args.database_connect_timeout);
    let tls = tls_for(variable, &config, args)?;
    if tls.is_none() {
        // Without a CA to check a server against, `prefer` would offer TLS and then refuse
        // every certificate: it stays plaintext, as it was with no TLS at all.
        config.ssl_mode(SslMode::Disable);
    }
    let connector = tls.unwrap_or_else(|| {
        MakeRustlsConnect::new(
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
        )
    });
    let pool = bb8::Pool::builder()
        .max_size(args.database_pool_size)
        .connection_timeout(args.database_connect_timeout)
        .error_sink(Box::new(ConnectErrors::new(&pool_name)))
        .build_unchecked(PostgresConnectionManager::new(config, connector));
    crate::metrics::observe_pool(pool_name, pool.clone());
    Ok(pool)
}

/// Logs why connections could not be opened, since a checkout reports only that it timed out:
/// a new reason at once, the same one again at most once a minute.
#[derive(Debug, Clone)]
struct ConnectErrors {
    pool: String,
    last: std::sync::Arc<parking_lot::Mutex<Option<(String, std::time::Instant)>>>,
}

impl ConnectErrors {
    const REPEAT_AFTER: Duration = Duration::from_secs(60);

    fn new(pool: &str) -> ConnectErrors {
        ConnectErrors {
            pool: pool.to_owned(),
            last: Default::default(),
        }
    }

    /// Whether `reason` is worth a log line now, remembering it if so.
    fn news(&self, reason: &str) -> bool {
        let mut last = self.last.lock();
        let repeated = matches!(&*last, Some((before, at)) if before == reason && at.elapsed() < Self::REPEAT_AFTER);
        if !repeated {
            *last = Some((reason.to_owned(), std::time::Instant::now()));
        }
        !repeated
    }
}

impl bb8::ErrorSink<tokio_postgres::Error> for ConnectErrors {
    fn sink(&self, error: tokio_postgres::Error) {
        // tokio-postgres says "error performing TLS handshake"; the why is in its sources.
        let mut reason = describe(&error);
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            reason = format!("{reason}: {cause}");
            source = cause.source();
        }
        if self.news(&reason) {
            tracing::warn!(pool = %self.pool, %reason, "cannot connect to PostgreSQL");
        }
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<tokio_postgres::Error>> {
        Box::new(self.clone())
    }
}

fn parse_url(variable: &str, url: &str) -> Result<tokio_postgres::Config, ConfigError> {
    crate::config::require_scheme(variable, url, &["postgres", "postgresql"])?;
    // libpq's two checking modes are what `require` does here (the certificate and its name
    // are always checked), so a URL written for libpq works unchanged.
    let url = url
        .replace("sslmode=verify-full", "sslmode=require")
        .replace("sslmode=verify-ca", "sslmode=require");
    tokio_postgres::Config::from_str(&url).map_err(|e| {
        ConfigError::new(
            variable,
            format!("not a valid PostgreSQL URL: {e} (sslmode is disable, prefer, require, verify-ca or verify-full)"),
        )
    })
}

/// The TLS connector `config` asks for: `None` unless its sslmode is `require`, which needs
/// `PGSSLROOTCERT`.
fn tls_for(
    variable: &str,
    config: &tokio_postgres::Config,
    args: &PostgresArgs,
) -> Result<Option<MakeRustlsConnect>, ConfigError> {
    if config.get_ssl_mode() != SslMode::Require {
        return Ok(None);
    }
    let Some(ca) = &args.database_ca_file else {
        return Err(ConfigError::new(
            variable,
            "sslmode=require needs PGSSLROOTCERT (--database-ca-file), the CA certificates the server's certificate is checked against",
        ));
    };
    let client = crate::tls::verifying_client("PGSSLROOTCERT (--database-ca-file)", ca)?;
    Ok(Some(MakeRustlsConnect::new(client)))
}

/// Checks that PostgreSQL answers, within `timeout`.
pub async fn ping(pool: &PgPool, timeout: Duration) -> Result<(), String> {
    let check = async {
        let conn = pool.get().await.map_err(|e| e.to_string())?;
        conn.simple_query("SELECT 1")
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    };
    tokio::time::timeout(timeout, check)
        .await
        .map_err(|_| format!("PostgreSQL did not answer within {timeout:?}"))?
}

/// One schema change. Versions of a component start at 1 and increase by one; a migration is
/// never edited once released, only followed by a new one.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Advisory-lock key shared by every component's migrations ("merkle" in ASCII).
const MIGRATION_LOCK: i64 = 0x6d65_726b_6c65;

/// Applies the migrations of `component` that the database lacks, all in one transaction under
/// an advisory lock. Returns how many were applied. Fails, changing nothing, when the database
/// has a migration this binary does not know (it is older than the schema) or a name differs.
pub async fn migrate(
    pool: &PgPool,
    component: &str,
    migrations: &[Migration],
) -> Result<usize, PgError> {
    let fail = |reason: String| PgError::Migration {
        component: component.to_owned(),
        reason,
    };
    for (i, m) in migrations.iter().enumerate() {
        if m.version != i as i64 + 1 {
            return Err(fail(format!(
                "migration {:?} has version {}, expected {}",
                m.name,
                m.version,
                i + 1
            )));
        }
    }

    let mut conn = pool.get().await?;
    let tx = conn.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             component  TEXT        NOT NULL,
             version    BIGINT      NOT NULL,
             name       TEXT        NOT NULL,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now(),
             PRIMARY KEY (component, version)
         )",
    )
    .await?;
    let applied = tx
        .query(
            "SELECT version, name FROM schema_migrations WHERE component = $1 ORDER BY version",
            &[&component],
        )
        .await?;
    for row in &applied {
        let version: i64 = row.get(0);
        let name: String = row.get(1);
        match migrations.get((version - 1).max(0) as usize) {
            Some(known) if known.version == version && known.name == name => {}
            Some(known) if known.version == version => {
                return Err(fail(format!(
                    "version {version} is {name:?} in the database but {:?} in this binary",
                    known.name
                )));
            }
            _ => {
                return Err(fail(format!(
                    "the database has version {version} ({name:?}), newer than this binary knows; \
                     upgrade the binary"
                )));
            }
        }
    }
    let pending = &migrations[applied.len()..];
    for m in pending {
        tx.batch_execute(m.sql)
            .await
            .map_err(|e| fail(format!("applying {} {:?} failed: {e}", m.version, m.name)))?;
        tx.execute(
            "INSERT INTO schema_migrations (component, version, name) VALUES ($1, $2, $3)",
            &[&component, &m.version, &m.name],
        )
        .await?;
        tracing::info!(
            component,
            version = m.version,
            name = m.name,
            "applied migration"
        );
    }
    tx.commit().await?;
    Ok(pending.len())
}

impl std::fmt::Debug for PostgresArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresArgs")
            .field(
                "database_url",
                &crate::config::redact_url(&self.database_url),
            )
            .field("database_pool_size", &self.database_pool_size)
            .field("database_connect_timeout", &self.database_connect_timeout)
            .field("database_ca_file", &self.database_ca_file)
            .finish()
    }
}

/// The table a statement names first (after FROM, INTO or UPDATE), for span names.
fn first_table(sql: &str) -> Option<&str> {
    let words: Vec<&str> = sql.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| ["FROM", "INTO", "UPDATE"].contains(&w[0].to_ascii_uppercase().as_str()))
        .map(|w| w[1].trim_end_matches(|c: char| !c.is_alphanumeric() && c != '_'))
        .filter(|t| !t.is_empty() && !t.starts_with('('))
}

/// A client span for one statement (inside a trace only), following the database semantic conventions: the
/// statement's text (its values are parameters, never in it), its operation and table.
pub fn statement_span(sql: &str) -> tracing::Span {
    let operation = sql
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_ascii_uppercase();
    let name = match first_table(sql) {
        Some(table) => format!("{operation} {table}"),
        None => operation.clone(),
    };
    crate::telemetry::child_span(|| {
        tracing::info_span!(
            "postgresql",
            otel.name = %name,
            otel.kind = "client",
            db.system = "postgresql",
            db.operation = %operation,
            db.statement = %sql,
        )
    })
}

/// PostgreSQL calls with a client span each ([`statement_span`]): what every service uses
/// instead of `query`, `execute` and friends, so every statement shows in the trace.
pub trait Traced: tokio_postgres::GenericClient + Sync {
    fn query_traced<'a>(
        &'a self,
        sql: &'a str,
        params: &'a [&'a (dyn tokio_postgres::types::ToSql + Sync)],
    ) -> impl std::future::Future<Output = Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>>
    + Send
    + 'a {
        tracing::Instrument::instrument(
            tokio_postgres::GenericClient::query(self, sql, params),
            statement_span(sql),
        )
    }

    fn query_one_traced<'a>(
        &'a self,
        sql: &'a str,
        params: &'a [&'a (dyn tokio_postgres::types::ToSql + Sync)],
    ) -> impl std::future::Future<Output = Result<tokio_postgres::Row, tokio_postgres::Error>> + Send + 'a
    {
        tracing::Instrument::instrument(
            tokio_postgres::GenericClient::query_one(self, sql, params),
            statement_span(sql),
        )
    }

    fn query_opt_traced<'a>(
        &'a self,
        sql: &'a str,
        params: &'a [&'a (dyn tokio_postgres::types::ToSql + Sync)],
    ) -> impl std::future::Future<
        Output = Result<Option<tokio_postgres::Row>, tokio_postgres::Error>,
    > + Send
    + 'a {
        tracing::Instrument::instrument(
            tokio_postgres::GenericClient::query_opt(self, sql, params),
            statement_span(sql),
        )
    }

    fn execute_traced<'a>(
        &'a self,
        sql: &'a str,
        params: &'a [&'a (dyn tokio_postgres::types::ToSql + Sync)],
    ) -> impl std::future::Future<Output = Result<u64, tokio_postgres::Error>> + Send + 'a {
        tracing::Instrument::instrument(
            tokio_postgres::GenericClient::execute(self, sql, params),
            statement_span(sql),
        )
    }

    fn batch_execute_traced<'a>(
        &'a self,
        sql: &'a str,
    ) -> impl std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'a {
        tracing::Instrument::instrument(
            tokio_postgres::GenericClient::batch_execute(self, sql),
            statement_span(sql),
        )
    }
}

impl<C: tokio_postgres::GenericClient + Sync> Traced for C {}

#[cfg(test)]
mod tests {
    use super::{ConnectErrors, first_table, is_transient};

    #[test]
    fn a_connection_error_is_logged_when_it_is_new_not_at_every_retry() {
        let errors = ConnectErrors::new("postgresql");
        assert!(errors.news("connection refused"));
        assert!(!errors.news("connection refused"));
        assert!(errors.news("invalid peer certificate: UnknownIssuer"));
        assert!(errors.news("connection refused"));
    }

    #[test]
    fn sqlstates_that_pass_are_worth_a_retry() {
        // admin_shutdown, cannot_connect_now, connection_failure, serialization_failure,
        // deadlock, too_many_connections, and a table or column the migrations add.
        for code in [
            "57P01", "57P03", "08006", "40001", "40P01", "53300", "42P01", "42703",
        ] {
            assert!(is_transient(code), "{code}");
        }
        // unique_violation, syntax_error, invalid_text_representation: bugs, not weather.
        for code in ["23505", "42601", "22P02"] {
            assert!(!is_transient(code), "{code}");
        }
    }

    #[test]
    fn span_names_take_the_first_table() {
        assert_eq!(
            first_table("SELECT a FROM merkle_roots WHERE x = $1"),
            Some("merkle_roots")
        );
        assert_eq!(
            first_table("INSERT INTO builds (id) VALUES ($1)"),
            Some("builds")
        );
        assert_eq!(first_table("UPDATE sources SET a = 1"), Some("sources"));
        assert_eq!(first_table("SELECT 1"), None);
    }
}
