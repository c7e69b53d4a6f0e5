//! PostgreSQL streaming replicas for heavy reads: their pools, how far each is behind the
//! primary, and which one a read may use.
//!
//! A replica serves only while it is reachable, in recovery, a replica of the primary's own
//! server (same system identifier) and at most `DATABASE_READ_MAX_LAG` behind; a monitor
//! measures that every `DATABASE_READ_CHECK_INTERVAL`, and a read that fails on a replica
//! takes it out until the next measurement. Two ways to read without a wrong answer:
//!
//! - [`ReadReplicas::pick`] for rows that never change (content-addressed nodes): a replica
//!   either has a row or not yet, and the caller asks the primary for what it lacked.
//! - [`ReadReplicas::caught_up`] for rows that change: a replica that has replayed the
//!   primary's WAL up to where it was when the read began (waiting at most
//!   `DATABASE_READ_CATCH_UP`), so it sees every commit that happened before; else none, and
//!   the caller reads from the primary.

use parking_lot::Mutex;
use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use clap::Args;
use opentelemetry::KeyValue;

use crate::{
    config::{ConfigError, parse_duration, redact_url},
    postgres::{PgPool, PostgresArgs, pool_at},
};

const VARIABLE: &str = "DATABASE_READ_URL (--database-read-url)";

/// Read replica settings.
#[derive(Clone, Args)]
pub struct ReadReplicaArgs {
    /// Streaming replicas of DATABASE_URL's server for heavy reads (tree browsing, diffs,
    /// proofs, snapshot lists, history), comma-separated URLs; unset: every read goes to the
    /// primary. Change detection, syncs and retention always use the primary.
    #[arg(
        long = "database-read-url",
        env = "DATABASE_READ_URL",
        value_delimiter = ','
    )]
    pub database_read_urls: Vec<String>,
    /// A replica further behind the primary than this is skipped until it catches up.
    #[arg(long, env = "DATABASE_READ_MAX_LAG", default_value = "5s", value_parser = parse_duration)]
    pub database_read_max_lag: Duration,
    /// How long a read of changing rows waits for a replica to replay what the primary had
    /// committed when the read began, before it reads from the primary instead.
    #[arg(long, env = "DATABASE_READ_CATCH_UP", default_value = "50ms", value_parser = parse_duration)]
    pub database_read_catch_up: Duration,
    /// How often each replica's lag is measured.
    #[arg(long, env = "DATABASE_READ_CHECK_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub database_read_check_interval: Duration,
}

impl std::fmt::Debug for ReadReplicaArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<String> = self
            .database_read_urls
            .iter()
            .map(|u| redact_url(u))
            .collect();
        f.debug_struct("ReadReplicaArgs")
            .field("database_read_urls", &urls)
            .field("database_read_max_lag", &self.database_read_max_lag)
            .field("database_read_catch_up", &self.database_read_catch_up)
            .field(
                "database_read_check_interval",
                &self.database_read_check_interval,
            )
            .finish()
    }
}

impl ReadReplicaArgs {
    /// Checks the URLs, naming `DATABASE_READ_URL`.
    pub fn validate(&self, primary: &PostgresArgs) -> Result<(), ConfigError> {
        for url in &self.database_read_urls {
            pool_check(url)?;
            if url == &primary.database_url {
                return Err(ConfigError::new(
                    VARIABLE,
                    "names DATABASE_URL itself; give the replicas' URLs",
                ));
            }
        }
        if self.database_read_check_interval.is_zero() {
            return Err(ConfigError::new(
                "DATABASE_READ_CHECK_INTERVAL (--database-read-check-interval)",
                "must be more than 0",
            ));
        }
        Ok(())
    }
}

fn pool_check(url: &str) -> Result<(), ConfigError> {
    crate::config::require_scheme(VARIABLE, url, &["postgres", "postgresql"])?;
    url.parse::<tokio_postgres::Config>()
        .map(drop)
        .map_err(|e| {
            ConfigError::new(
                VARIABLE,
                format!("{}: not a valid PostgreSQL URL: {e}", redact_url(url)),
            )
        })
}

/// What the last measurement found.
#[derive(Debug, Clone, Default)]
struct Measured {
    usable: bool,
    lag: Duration,
    lag_bytes: u64,
    /// Why it is not usable.
    why: String,
}

/// One replica.
pub struct Replica {
    /// Its URL without the password, for logs and metrics.
    pub name: String,
    pub pool: PgPool,
    measured: Mutex<Measured>,
}

impl Replica {
    fn measured(&self) -> Measured {
        self.measured.lock().clone()
    }

    fn set(&self, measured: Measured) {
        let mut current = self.measured.lock();
        if current.usable != measured.usable {
            if measured.usable {
                tracing::info!(replica = %self.name, lag = ?measured.lag, "PostgreSQL replica serves reads");
            } else {
                tracing::warn!(replica = %self.name, why = %measured.why, "PostgreSQL replica skipped");
            }
        }
        *current = measured;
    }
}

/// The replicas of one primary.
pub struct ReadReplicas {
    replicas: Vec<Replica>,
    next: AtomicUsize,
    max_lag: Duration,
    catch_up: Duration,
    interval: Duration,
    reads: opentelemetry::metrics::Counter<u64>,
}

/// Where a read went, for `merkle.postgres.reads`.
#[derive(Debug, Clone, Copy)]
pub enum ReadOn {
    Replica,
    /// The primary, as no replica could serve it.
    Primary,
}

impl ReadReplicas {
    /// Pools for each replica (connecting lazily); `None` without `DATABASE_READ_URL`.
    pub fn new(
        args: &ReadReplicaArgs,
        primary: &PostgresArgs,
    ) -> Result<Option<Arc<Self>>, ConfigError> {
        if args.database_read_urls.is_empty() {
            return Ok(None);
        }
        let replicas = args
            .database_read_urls
            .iter()
            .enumerate()
            .map(|(i, url)| {
                Ok(Replica {
                    name: redact_url(url),
                    pool: pool_at(format!("postgresql-replica-{i}"), VARIABLE, url, primary)?,
                    measured: Mutex::new(Measured {
                        why: "not measured yet".into(),
                        ..Measured::default()
                    }),
                })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let replicas = Arc::new(ReadReplicas {
            replicas,
            next: AtomicUsize::new(0),
            max_lag: args.database_read_max_lag,
            catch_up: args.database_read_catch_up,
            interval: args.database_read_check_interval,
            reads: crate::metrics::meter()
                .u64_counter("merkle.postgres.reads")
                .with_description(
                    "Reads that could go to a replica, by where they went (replica, primary)",
                )
                .build(),
        });
        replicas.observe();
        Ok(Some(replicas))
    }

    /// The next usable replica, in turn; `None` when none is.
    pub fn pick(&self) -> Option<&Replica> {
        let n = self.replicas.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| &self.replicas[(start + i) % n])
            .find(|r| r.measured().usable)
    }

    /// Counts where a read went.
    pub fn count(&self, on: ReadOn) {
        let on = match on {
            ReadOn::Replica => "replica",
            ReadOn::Primary => "primary",
        };
        self.reads.add(1, &[KeyValue::new("on", on)]);
    }

    /// A read on `replica` failed (it went away, say): it serves no more reads until the next
    /// measurement finds it well.
    pub fn failed(&self, replica: &Replica, error: &dyn std::fmt::Display) {
        replica.set(Measured {
            usable: false,
            why: format!("a read failed: {error}"),
            ..replica.measured()
        });
    }

    /// A usable replica that has replayed everything the primary had committed when this was
    /// called (waiting up to `DATABASE_READ_CATCH_UP`); `None` when none has (the caller reads
    /// from the primary).
    pub async fn caught_up(&self, primary: &PgPool) -> Option<&Replica> {
        let replica = self.pick()?;
        let position: String = match primary.get().await {
            Ok(conn) => match conn
                .query_one("SELECT pg_current_wal_lsn()::text", &[])
                .await
            {
                Ok(row) => row.get(0),
                Err(_) => return None,
            },
            Err(_) => return None,
        };
        let conn = match replica.pool.get().await {
            Ok(conn) => conn,
            Err(e) => {
                self.failed(replica, &e);
                return None;
            }
        };
        let deadline = Instant::now() + self.catch_up;
        loop {
            let replayed = conn
                .query_one(
                    "SELECT COALESCE(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, false)",
                    &[&position],
                )
                .await;
            match replayed {
                Ok(row) if row.get::<_, bool>(0) => return Some(replica),
                Ok(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Ok(_) => return None,
                Err(e) => {
                    self.failed(replica, &e);
                    return None;
                }
            }
        }
    }

    /// Refuses, naming `DATABASE_READ_URL`, a replica that answers and is not one of the
    /// primary's: a primary itself, another server, or a database without the schema. One
    /// that does not answer (or a primary that does not) is not refused: the monitor keeps it
    /// out until it is well.
    pub async fn refuse_wrong(
        &self,
        primary: &PgPool,
        schema_table: &str,
    ) -> Result<(), ConfigError> {
        let Some(primary_facts) = facts(primary, schema_table).await else {
            return Ok(());
        };
        for replica in &self.replicas {
            // The schema may reach a new replica a moment after the primary's migration.
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let Some(ours) = facts(&replica.pool, schema_table).await else {
                    break;
                };
                let wrong = if !ours.in_recovery {
                    Some("is a primary (not in recovery), not a streaming replica".to_owned())
                } else if ours.system != primary_facts.system {
                    Some(format!(
                        "is a replica of another server (system identifier {}, DATABASE_URL's is {})",
                        ours.system, primary_facts.system
                    ))
                } else if primary_facts.schema && !ours.schema {
                    Some(format!(
                        "has no Merkle Mesh schema (no table {schema_table}): another database of the server?"
                    ))
                } else {
                    None
                };
                match wrong {
                    None => break,
                    Some(why) if why.contains("schema") && Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Some(why) => {
                        return Err(ConfigError::new(
                            VARIABLE,
                            format!("{} {why}", replica.name),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Measures every replica now.
    pub async fn measure(&self, primary: &PgPool) {
        let position: Option<String> = match primary.get().await {
            Ok(conn) => conn
                .query_one(
                    "SELECT pg_current_wal_lsn()::text, (SELECT system_identifier FROM pg_control_system())::text",
                    &[],
                )
                .await
                .ok()
                .map(|row| format!("{}\0{}", row.get::<_, String>(0), row.get::<_, String>(1))),
            Err(_) => None,
        };
        for replica in &self.replicas {
            let measured = match &position {
                None => Measured {
                    why: "the primary cannot be asked how far replicas are behind".into(),
                    ..Measured::default()
                },
                Some(position) => {
                    let (lsn, system) = position.split_once('\0').unwrap_or_default();
                    self.measure_one(replica, lsn, system).await
                }
            };
            replica.set(measured);
        }
    }

    async fn measure_one(&self, replica: &Replica, lsn: &str, system: &str) -> Measured {
        let timeout = self.interval.max(Duration::from_secs(1));
        let asking = async {
            let conn = replica.pool.get().await.map_err(|e| e.to_string())?;
            conn.query_one(
                "SELECT pg_is_in_recovery(),
                        (SELECT system_identifier FROM pg_control_system())::text,
                        COALESCE(pg_wal_lsn_diff($1::text::pg_lsn, pg_last_wal_replay_lsn()), 0)::float8,
                        COALESCE(EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()), 0)::float8",
                &[&lsn],
            )
            .await
            .map_err(|e| e.to_string())
        };
        let row = match tokio::time::timeout(timeout, asking).await {
            Ok(Ok(row)) => row,
            Ok(Err(e)) => {
                return Measured {
                    why: format!("does not answer: {e}"),
                    ..Measured::default()
                };
            }
            Err(_) => {
                return Measured {
                    why: format!("does not answer within {timeout:?}"),
                    ..Measured::default()
                };
            }
        };
        let in_recovery: bool = row.get(0);
        let their_system: String = row.get(1);
        let behind_bytes = row.get::<_, f64>(2).max(0.0) as u64;
        // The age of the last replayed commit means lag only while WAL is left to replay.
        let lag = if behind_bytes == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(row.get::<_, f64>(3).max(0.0))
        };
        let why = if !in_recovery {
            "is not in recovery (a primary?)".to_owned()
        } else if their_system != system {
            "is a replica of another server".to_owned()
        } else if lag > self.max_lag {
            format!(
                "is {lag:?} behind (DATABASE_READ_MAX_LAG is {:?})",
                self.max_lag
            )
        } else {
            String::new()
        };
        Measured {
            usable: why.is_empty(),
            lag,
            lag_bytes: behind_bytes,
            why,
        }
    }

    /// Measures every `DATABASE_READ_CHECK_INTERVAL` until `shutdown`.
    pub fn monitor(self: &Arc<Self>, primary: PgPool, mut shutdown: crate::shutdown::Shutdown) {
        let replicas = self.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(replicas.interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticks.tick() => replicas.measure(&primary).await,
                    () = shutdown.wait() => return,
                }
            }
        });
    }

    fn observe(self: &Arc<Self>) {
        let meter = crate::metrics::meter();
        let lagging = Arc::downgrade(self);
        meter
            .f64_observable_gauge("merkle.postgres.replica.lag")
            .with_unit("s")
            .with_description("How far each read replica is behind the primary, in seconds")
            .with_callback(move |observer| {
                if let Some(replicas) = lagging.upgrade() {
                    for r in &replicas.replicas {
                        let m = r.measured();
                        observer.observe(
                            m.lag.as_secs_f64(),
                            &[KeyValue::new("replica", r.name.clone())],
                        );
                    }
                }
            })
            .build();
        let behind = Arc::downgrade(self);
        meter
            .u64_observable_gauge("merkle.postgres.replica.replay_backlog")
            .with_unit("By")
            .with_description("WAL each read replica has yet to replay, in bytes")
            .with_callback(move |observer| {
                if let Some(replicas) = behind.upgrade() {
                    for r in &replicas.replicas {
                        observer.observe(
                            r.measured().lag_bytes,
                            &[KeyValue::new("replica", r.name.clone())],
                        );
                    }
                }
            })
            .build();
        let usable = Arc::downgrade(self);
        meter
            .u64_observable_gauge("merkle.postgres.replica.usable")
            .with_description("1 while a read replica serves reads, 0 while it is skipped")
            .with_callback(move |observer| {
                if let Some(replicas) = usable.upgrade() {
                    for r in &replicas.replicas {
                        observer.observe(
                            u64::from(r.measured().usable),
                            &[KeyValue::new("replica", r.name.clone())],
                        );
                    }
                }
            })
            .build();
    }
}

/// A server's facts for [`ReadReplicas::refuse_wrong`]; `None` when it does not answer.
struct Facts {
    in_recovery: bool,
    system: String,
    schema: bool,
}

async fn facts(pool: &PgPool, schema_table: &str) -> Option<Facts> {
    let asking = async {
        let conn = pool.get().await.ok()?;
        let row = conn
            .query_one(
                "SELECT pg_is_in_recovery(),
                        (SELECT system_identifier FROM pg_control_system())::text,
                        to_regclass($1) IS NOT NULL",
                &[&schema_table],
            )
            .await
            .ok()?;
        Some(Facts {
            in_recovery: row.get(0),
            system: row.get(1),
            schema: row.get(2),
        })
    };
    tokio::time::timeout(Duration::from_secs(5), asking)
        .await
        .ok()
        .flatten()
}
