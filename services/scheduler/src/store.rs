//! The Scheduler's PostgreSQL side: its migrations (component `scheduler`) and every query.
//!
//! Writes the leader makes carry a fence (`fence`): they apply only while the lease row
//! still names this replica with the epoch it was granted, so a leader that was paused past
//! its lease, and lost it, writes nothing when it wakes up.

use chrono::{DateTime, Utc};
use merkle_proto::scheduler::v1::{self as pb, BuildState};
use merkle_shared::postgres::Traced as _;
use merkle_shared::postgres::{Migration, PgError, PgPool, migrate as apply};
use prost::Message as _;
use tokio_postgres::{GenericClient, Row, error::SqlState};

use crate::{error::Error, record::timestamp};

const COMPONENT: &str = "scheduler";

/// The Scheduler's migrations, in order; never edit a released one, add the next.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "scheduler",
        sql: include_str!("../migrations/0001_scheduler.sql"),
    },
    Migration {
        version: 2,
        name: "fleet",
        sql: include_str!("../migrations/0002_fleet.sql"),
    },
    Migration {
        version: 3,
        name: "actors",
        sql: include_str!("../migrations/0003_actors.sql"),
    },
    Migration {
        version: 4,
        name: "builds_by_parent",
        sql: include_str!("../migrations/0004_builds_by_parent.sql"),
    },
];

pub async fn migrate(pool: &PgPool) -> Result<usize, PgError> {
    apply(pool, COMPONENT, MIGRATIONS).await
}

/// The lease's row name.
pub const LEASE: &str = "leader";

/// Appended to a leader's statement: true only while it holds the lease with epoch `$holder`,
/// `$epoch` (parameter numbers given by the caller).
fn fence(holder: usize, epoch: usize) -> String {
    format!(
        "EXISTS (SELECT 1 FROM scheduler_lease WHERE name = '{LEASE}' AND holder = ${holder} \
         AND epoch = ${epoch} AND expires_at > now())"
    )
}

/// The lease a leader holds.
#[derive(Debug, Clone)]
pub struct Lease {
    pub holder: String,
    pub epoch: i64,
}

/// Takes the lease if it is free or expired (a new epoch), or renews it when this replica
/// holds it; `None` when another replica holds it.
pub async fn acquire_lease(
    pool: &PgPool,
    holder: &str,
    ttl: std::time::Duration,
) -> Result<Option<Lease>, Error> {
    let conn = pool.get().await?;
    let ttl = ttl.as_secs_f64();
    let row = conn
        .query_opt_traced(
            "INSERT INTO scheduler_lease (name, holder, epoch, expires_at) \
             VALUES ($1, $2, 1, now() + make_interval(secs => $3)) \
             ON CONFLICT (name) DO UPDATE SET \
               holder = EXCLUDED.holder, \
               epoch = CASE WHEN scheduler_lease.holder = EXCLUDED.holder AND scheduler_lease.expires_at > now() \
                            THEN scheduler_lease.epoch ELSE scheduler_lease.epoch + 1 END, \
               expires_at = EXCLUDED.expires_at \
             WHERE scheduler_lease.expires_at <= now() OR scheduler_lease.holder = EXCLUDED.holder \
             RETURNING epoch",
            &[&LEASE, &holder, &ttl],
        )
        .await?;
    Ok(row.map(|r| Lease {
        holder: holder.to_owned(),
        epoch: r.get(0),
    }))
}

/// Renews a held lease; false when it was lost (another replica took it, or it expired).
pub async fn renew_lease(
    pool: &PgPool,
    lease: &Lease,
    ttl: std::time::Duration,
) -> Result<bool, Error> {
    let conn = pool.get().await?;
    let n = conn
        .execute_traced(
            "UPDATE scheduler_lease SET expires_at = now() + make_interval(secs => $3) \
             WHERE name = $4 AND holder = $1 AND epoch = $2 AND expires_at > now()",
            &[&lease.holder, &lease.epoch, &ttl.as_secs_f64(), &LEASE],
        )
        .await?;
    Ok(n == 1)
}

/// Gives the lease up (on shutdown), so another replica takes over at once.
pub async fn release_lease(pool: &PgPool, lease: &Lease) -> Result<(), Error> {
    let conn = pool.get().await?;
    conn.execute_traced(
        "UPDATE scheduler_lease SET expires_at = now() WHERE name = $3 AND holder = $1 AND epoch = $2",
        &[&lease.holder, &lease.epoch, &LEASE],
    )
    .await?;
    Ok(())
}

/// A stored source and what the Scheduler keeps beside it.
#[derive(Debug, Clone)]
pub struct StoredSource {
    /// The message with the server's fields filled in.
    pub source: pb::Source,
    pub next_tick: Option<DateTime<Utc>>,
    pub next_due: Option<DateTime<Utc>>,
    pub failures: i32,
}

const SOURCE_COLUMNS: &str = "name, spec, next_tick, next_due_at, failures, created_at, updated_at";

fn source_from_row(row: &Row) -> Result<StoredSource, Error> {
    let spec: Vec<u8> = row.get(1);
    let mut source = pb::Source::decode(spec.as_slice())
        .map_err(|e| Error::Internal(format!("stored source does not decode: {e}")))?;
    let next_tick: Option<DateTime<Utc>> = row.get(2);
    let next_due: Option<DateTime<Utc>> = row.get(3);
    let failures: i32 = row.get(4);
    source.create_time = Some(timestamp(row.get(5)));
    source.update_time = Some(timestamp(row.get(6)));
    source.next_build_time = next_due.filter(|_| source.enabled).map(timestamp);
    source.consecutive_failures = failures.max(0) as u32;
    Ok(StoredSource {
        source,
        next_tick,
        next_due,
        failures,
    })
}

/// Stores a new source; ALREADY_EXISTS when the name is taken.
pub async fn insert_source(
    pool: &PgPool,
    source: &pb::Source,
    next: Option<(DateTime<Utc>, DateTime<Utc>)>,
) -> Result<StoredSource, Error> {
    let conn = pool.get().await?;
    let row = conn
        .query_one_traced(
            &format!(
                "INSERT INTO scheduler_sources (name, spec, enabled, next_tick, next_due_at) \
                 VALUES ($1, $2, $3, $4, $5) RETURNING {SOURCE_COLUMNS}"
            ),
            &[
                &source.name,
                &source.encode_to_vec(),
                &source.enabled,
                &next.map(|n| n.0),
                &next.map(|n| n.1),
            ],
        )
        .await
        .map_err(|e| match e.code() {
            Some(code) if *code == SqlState::UNIQUE_VIOLATION => Error::AlreadyExists(format!(
                "source.name: a source named {} exists",
                source.name
            )),
            _ => Error::from(e),
        })?;
    source_from_row(&row)
}

/// Replaces a source's settings; `next` reschedules it when its schedule changed.
pub async fn update_source(
    pool: &PgPool,
    source: &pb::Source,
    next: Option<Option<(DateTime<Utc>, DateTime<Utc>)>>,
) -> Result<Option<StoredSource>, Error> {
    let conn = pool.get().await?;
    let row = match next {
        Some(next) => {
            conn.query_opt_traced(
                &format!(
                    "UPDATE scheduler_sources SET spec = $2, enabled = $3, next_tick = $4, \
                     next_due_at = $5, failures = 0, updated_at = now() WHERE name = $1 \
                     RETURNING {SOURCE_COLUMNS}"
                ),
                &[
                    &source.name,
                    &source.encode_to_vec(),
                    &source.enabled,
                    &next.map(|n| n.0),
                    &next.map(|n| n.1),
                ],
            )
            .await?
        }
        None => {
            conn.query_opt_traced(
                &format!(
                    "UPDATE scheduler_sources SET spec = $2, enabled = $3, updated_at = now() \
                     WHERE name = $1 RETURNING {SOURCE_COLUMNS}"
                ),
                &[&source.name, &source.encode_to_vec(), &source.enabled],
            )
            .await?
        }
    };
    row.as_ref().map(source_from_row).transpose()
}

/// Records who set `name`'s retention policy (they are named when DbSync prunes by it).
pub async fn set_retention_set_by(pool: &PgPool, name: &str, actor: &str) -> Result<(), Error> {
    pool.get()
        .await?
        .execute_traced(
            "UPDATE scheduler_sources SET retention_set_by = $2 WHERE name = $1",
            &[&name, &actor],
        )
        .await?;
    Ok(())
}

/// Who set `name`'s retention policy; empty when unknown.
pub async fn retention_set_by(pool: &PgPool, name: &str) -> Result<String, Error> {
    Ok(pool
        .get()
        .await?
        .query_opt_traced(
            "SELECT retention_set_by FROM scheduler_sources WHERE name = $1",
            &[&name],
        )
        .await?
        .map(|row| row.get(0))
        .unwrap_or_default())
}

pub async fn get_source(
    client: &(impl GenericClient + Sync),
    name: &str,
) -> Result<Option<StoredSource>, Error> {
    client
        .query_opt_traced(
            &format!("SELECT {SOURCE_COLUMNS} FROM scheduler_sources WHERE name = $1"),
            &[&name],
        )
        .await?
        .as_ref()
        .map(source_from_row)
        .transpose()
}

pub async fn list_sources(
    client: &(impl GenericClient + Sync),
    after: &str,
    limit: i64,
) -> Result<Vec<StoredSource>, Error> {
    client
        .query_traced(
            &format!(
                "SELECT {SOURCE_COLUMNS} FROM scheduler_sources WHERE name > $1 ORDER BY name LIMIT $2"
            ),
            &[&after, &limit],
        )
        .await?
        .iter()
        .map(source_from_row)
        .collect()
}

pub async fn delete_source(pool: &PgPool, name: &str) -> Result<bool, Error> {
    let conn = pool.get().await?;
    Ok(conn
        .execute_traced("DELETE FROM scheduler_sources WHERE name = $1", &[&name])
        .await?
        == 1)
}

/// Sources whose scheduled build is due, earliest first.
pub async fn due_sources(pool: &PgPool, limit: i64) -> Result<Vec<StoredSource>, Error> {
    let conn = pool.get().await?;
    conn.query_traced(
        &format!(
            "SELECT {SOURCE_COLUMNS} FROM scheduler_sources \
             WHERE enabled AND next_due_at IS NOT NULL AND next_due_at <= now() \
             ORDER BY next_due_at LIMIT $1"
        ),
        &[&limit],
    )
    .await?
    .iter()
    .map(source_from_row)
    .collect()
}

fn build_from_row(row: &Row, at: usize) -> Result<pb::Build, Error> {
    let record: Vec<u8> = row.get(at);
    pb::Build::decode(record.as_slice())
        .map_err(|e| Error::Internal(format!("stored build does not decode: {e}")))
}

/// What a due tick becomes, decided by the leader in one fenced transaction.
#[derive(Debug)]
pub enum TickOutcome {
    /// A new queued build (and, with REPLACE, the id of the build it cancelled; or the id of
    /// a build a runner that is gone had left, failed for it).
    Queued {
        build: pb::Build,
        replaced: Option<String>,
        left: Option<String>,
    },
    /// A build was running (FORBID): the tick was recorded as skipped.
    Skipped(pb::Build),
    /// The lease was lost, or another leader took the tick: nothing was written.
    Lost,
}

/// How the build a tick finds active is judged.
pub struct Liveness<'a> {
    /// A runner silent this long is gone.
    pub silent_for: std::time::Duration,
    /// True for a build that runs in this process (a build of this replica's name that does not
    /// was left by its previous run).
    pub runs_here: &'a (dyn Fn(&str) -> bool + Sync),
}

/// Why an active build is a leftover of a runner that is gone, or `None` when it runs.
fn leftover(row: &tokio_postgres::Row, lease: &Lease, live: &Liveness<'_>) -> Option<String> {
    let id: String = row.get(0);
    let runner: String = row.get(2);
    let epoch: Option<i64> = row.get(3);
    let silent: bool = row.get(4);
    if epoch.is_some_and(|e| e < lease.epoch) {
        Some("its scheduler replica lost the lead (the lease) while it ran".into())
    } else if silent {
        Some(format!(
            "its scheduler replica stopped: no heartbeat for {}",
            humantime::format_duration(live.silent_for)
        ))
    } else if runner == lease.holder && !(live.runs_here)(&id) {
        // Left by this replica's previous run, or its outcome was never taken (PostgreSQL
        // was away longer than the record's retries).
        Some("its runner ended without recording an outcome".into())
    } else {
        None
    }
}

/// Ends the build in `row` (columns: id, record) with `state` and `message`, in `tx`.
async fn end_in(
    tx: &tokio_postgres::Transaction<'_>,
    row: &tokio_postgres::Row,
    state: BuildState,
    message: String,
) -> Result<pb::Build, Error> {
    let mut build = build_from_row(row, 1)?;
    build.state = state as i32;
    build.error_message = message;
    build.end_time = Some(timestamp(Utc::now()));
    tx.execute_traced(
        "UPDATE scheduler_builds SET state = $2, record = $3 WHERE id = $1",
        &[&build.build_id, &(state as i16), &build.encode_to_vec()],
    )
    .await?;
    Ok(build)
}

/// The source's own queued or running build (not a fleet build's node builds), with what
/// judging its runner needs: id, record, runner, lease epoch, silent.
const ACTIVE: &str = "SELECT id, record, runner, lease_epoch, \
     heartbeat_at < now() - make_interval(secs => $2) FROM scheduler_builds \
     WHERE source = $1 AND state IN (1, 2) AND parent_id = '' FOR UPDATE";

/// Records one tick of `source`. A build still active blocks it (FORBID: the tick is
/// SKIPPED; REPLACE: that build is cancelled), unless that build's runner is gone (its
/// replica lost the lease it ran under, went silent, or is this replica's previous run): then
/// that build is failed, here, and the tick queues a build that coalesces what was missed.
#[allow(clippy::too_many_arguments)]
pub async fn record_tick(
    pool: &PgPool,
    lease: &Lease,
    live: &Liveness<'_>,
    source: &str,
    tick: DateTime<Utc>,
    next: Option<(DateTime<Utc>, DateTime<Utc>)>,
    replace: bool,
    make: impl FnOnce(BuildState) -> pb::Build,
) -> Result<TickOutcome, Error> {
    let mut conn = pool.get().await?;
    let tx = conn.transaction().await?;
    // The source row lock orders this with TriggerBuild and with updates of the source.
    let locked = tx
        .query_opt_traced(
            &format!(
                "SELECT 1 FROM scheduler_sources WHERE name = $1 AND next_tick = $2 AND {} FOR UPDATE",
                fence(3, 4)
            ),
            &[&source, &tick, &lease.holder, &lease.epoch],
        )
        .await?;
    if locked.is_none() {
        tx.rollback().await?;
        return Ok(TickOutcome::Lost);
    }
    let mut active = tx
        .query_opt_traced(ACTIVE, &[&source, &live.silent_for.as_secs_f64()])
        .await?;
    let mut replaced = None;
    let mut left = None;
    if let Some(row) = &active
        && let Some(why) = leftover(row, lease, live)
    {
        let failed = end_in(&tx, row, BuildState::Failed, why).await?;
        left = Some(failed.build_id);
        active = None;
    }
    let outcome_state = match (&active, replace) {
        (Some(_), false) => BuildState::Skipped,
        (Some(row), true) => {
            let cancelled = end_in(
                &tx,
                row,
                BuildState::Cancelled,
                format!(
                    "replaced by the build of the tick at {} (CONCURRENCY_POLICY_REPLACE)",
                    tick.to_rfc3339()
                ),
            )
            .await?;
            replaced = Some(cancelled.build_id.clone());
            BuildState::Queued
        }
        (None, _) => BuildState::Queued,
    };
    let build = make(outcome_state);
    let inserted = tx
        .execute_traced(
            "INSERT INTO scheduler_builds (id, source, state, scheduled_for, runner, lease_epoch, record) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
            &[
                &build.build_id,
                &source,
                &(build.state as i16),
                &tick,
                &lease.holder,
                &lease.epoch,
                &build.encode_to_vec(),
            ],
        )
        .await?;
    tx.execute_traced(
        "UPDATE scheduler_sources SET next_tick = $2, next_due_at = $3 WHERE name = $1",
        &[&source, &next.map(|n| n.0), &next.map(|n| n.1)],
    )
    .await?;
    if inserted == 0 {
        // The tick was recorded already (by a leader before this one).
        tx.commit().await?;
        return Ok(TickOutcome::Lost);
    }
    tx.commit().await?;
    Ok(match outcome_state {
        BuildState::Skipped => TickOutcome::Skipped(build),
        _ => TickOutcome::Queued {
            build,
            replaced,
            left,
        },
    })
}

/// Who holds the lease now, and its epoch (`None`: nobody ever did).
pub async fn lease_holder(pool: &PgPool) -> Result<Option<(String, i64)>, Error> {
    Ok(pool
        .get()
        .await?
        .query_opt_traced(
            &format!(
                "SELECT holder, epoch FROM scheduler_lease WHERE name = '{LEASE}' AND expires_at > now()"
            ),
            &[],
        )
        .await?
        .map(|row| (row.get(0), row.get(1))))
}

/// Says the runner of build `id` (and of its node builds) is alive.
pub async fn beat(pool: &PgPool, id: &str, runner: &str) -> Result<(), Error> {
    pool.get()
        .await?
        .execute_traced(
            "UPDATE scheduler_builds SET heartbeat_at = now() \
             WHERE (id = $1 OR parent_id = $1) AND runner = $2 AND state IN (1, 2)",
            &[&id, &runner],
        )
        .await?;
    Ok(())
}

/// After a build whose runner went silent was failed: the ticks of its source SKIPPED while it
/// seemed to run were ticks lost to a dead runner. Queues one build that coalesces them (none
/// when no tick was skipped, or another build is active), fenced by the lease.
pub async fn catch_up(
    pool: &PgPool,
    lease: &Lease,
    failed: &str,
    make: impl FnOnce(&str, u32) -> pb::Build,
) -> Result<Option<pb::Build>, Error> {
    let mut conn = pool.get().await?;
    let tx = conn.transaction().await?;
    let Some(row) = tx
        .query_opt_traced(
            "SELECT source, created_at FROM scheduler_builds WHERE id = $1 AND parent_id = ''",
            &[&failed],
        )
        .await?
    else {
        return Ok(None);
    };
    let source: String = row.get(0);
    let since: DateTime<Utc> = row.get(1);
    let locked = tx
        .query_opt_traced(
            &format!(
                "SELECT 1 FROM scheduler_sources WHERE name = $1 AND {} FOR UPDATE",
                fence(2, 3)
            ),
            &[&source, &lease.holder, &lease.epoch],
        )
        .await?;
    if locked.is_none() {
        return Ok(None);
    }
    let skipped: i64 = tx
        .query_one_traced(
            "SELECT count(*) FROM scheduler_builds WHERE source = $1 AND parent_id = '' \
             AND state = 7 AND created_at > $2",
            &[&source, &since],
        )
        .await?
        .get(0);
    if skipped == 0 {
        return Ok(None);
    }
    let build = make(&source, skipped as u32);
    let inserted = tx
        .execute_traced(
            "INSERT INTO scheduler_builds (id, source, state, runner, lease_epoch, record) \
             VALUES ($1, $2, 1, $3, $4, $5) ON CONFLICT DO NOTHING",
            &[
                &build.build_id,
                &source,
                &lease.holder,
                &lease.epoch,
                &build.encode_to_vec(),
            ],
        )
        .await?;
    tx.commit().await?;
    Ok((inserted == 1).then_some(build))
}

/// Queues a manual build; FAILED_PRECONDITION when one is queued or running (FORBID), or, with
/// `replace`, cancels that one first. Returns the queued build and the cancelled one's id.
pub async fn queue_manual(
    pool: &PgPool,
    build: &pb::Build,
    runner: &str,
    replace: bool,
) -> Result<Option<String>, Error> {
    let mut conn = pool.get().await?;
    let tx = conn.transaction().await?;
    let exists = tx
        .query_opt_traced(
            "SELECT 1 FROM scheduler_sources WHERE name = $1 FOR UPDATE",
            &[&build.source],
        )
        .await?;
    if exists.is_none() {
        return Err(Error::NotFound(format!(
            "source: no source named {}",
            build.source
        )));
    }
    let active = tx
        .query_opt_traced(
            "SELECT id, record FROM scheduler_builds WHERE source = $1 AND state IN (1, 2) \
             AND parent_id = ''",
            &[&build.source],
        )
        .await?;
    let mut replaced = None;
    if let Some(row) = active {
        if !replace {
            let id: String = row.get(0);
            return Err(Error::FailedPrecondition(format!(
                "source: build {id} of {} is still running (CONCURRENCY_POLICY_FORBID); \
                 cancel it or wait for it",
                build.source
            )));
        }
        let mut cancelled = build_from_row(&row, 1)?;
        cancelled.state = BuildState::Cancelled as i32;
        cancelled.error_message =
            "replaced by a triggered build (CONCURRENCY_POLICY_REPLACE)".into();
        cancelled.end_time = Some(timestamp(Utc::now()));
        tx.execute_traced(
            "UPDATE scheduler_builds SET state = $2, record = $3 WHERE id = $1",
            &[
                &cancelled.build_id,
                &(BuildState::Cancelled as i16),
                &cancelled.encode_to_vec(),
            ],
        )
        .await?;
        replaced = Some(cancelled.build_id);
    }
    tx.execute_traced(
        "INSERT INTO scheduler_builds (id, source, state, runner, record) VALUES ($1, $2, $3, $4, $5)",
        &[&build.build_id, &build.source, &(build.state as i16), &runner, &build.encode_to_vec()],
    )
    .await?;
    tx.commit().await?;
    Ok(replaced)
}

/// Writes a build's record as its runner sees it. Only while the build is still this runner's
/// and not ended (a cancellation or a takeover wins), and for scheduled builds only while the
/// runner's lease epoch is current. Returns false when the write was refused.
pub async fn save_build(
    pool: &PgPool,
    build: &pb::Build,
    runner: &str,
    epoch: Option<i64>,
) -> Result<bool, Error> {
    let conn = pool.get().await?;
    let n = match epoch {
        Some(epoch) => {
            conn.execute_traced(
                &format!(
                    "UPDATE scheduler_builds SET state = $2, record = $3, heartbeat_at = now() \
                     WHERE id = $1 AND runner = $4 AND state IN (1, 2) AND {}",
                    fence(4, 5)
                ),
                &[
                    &build.build_id,
                    &(build.state as i16),
                    &build.encode_to_vec(),
                    &runner,
                    &epoch,
                ],
            )
            .await?
        }
        None => {
            conn.execute_traced(
                "UPDATE scheduler_builds SET state = $2, record = $3, heartbeat_at = now() \
                 WHERE id = $1 AND runner = $4 AND state IN (1, 2)",
                &[
                    &build.build_id,
                    &(build.state as i16),
                    &build.encode_to_vec(),
                    &runner,
                ],
            )
            .await?
        }
    };
    Ok(n == 1)
}

/// Records one node's build of a fleet build, running, under the parent's runner (and, for a
/// scheduled build, fenced by its lease). Returns false when the write was refused.
pub async fn insert_child(
    pool: &PgPool,
    build: &pb::Build,
    runner: &str,
    epoch: Option<i64>,
) -> Result<bool, Error> {
    let conn = pool.get().await?;
    let record = build.encode_to_vec();
    let state = build.state as i16;
    let n = match epoch {
        Some(epoch) => {
            conn.execute_traced(
                &format!(
                    "INSERT INTO scheduler_builds (id, source, state, runner, lease_epoch, record, parent_id) \
                     SELECT $1, $2, $3, $4, $5, $6, $7 WHERE {}",
                    fence(4, 5)
                ),
                &[
                    &build.build_id,
                    &build.source,
                    &state,
                    &runner,
                    &epoch,
                    &record,
                    &build.parent_build_id,
                ],
            )
            .await?
        }
        None => {
            conn.execute_traced(
                "INSERT INTO scheduler_builds (id, source, state, runner, record, parent_id) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &build.build_id,
                    &build.source,
                    &state,
                    &runner,
                    &record,
                    &build.parent_build_id,
                ],
            )
            .await?
        }
    };
    Ok(n == 1)
}

/// Ends every node build of a fleet build that is still queued or running (the fleet build
/// ended without them: cancelled, past its deadline, or taken over).
pub async fn end_children(
    pool: &PgPool,
    parent: &str,
    state: BuildState,
    message: &str,
) -> Result<usize, Error> {
    let ids: Vec<String> = {
        let conn = pool.get().await?;
        conn.query_traced(
            "SELECT id FROM scheduler_builds WHERE parent_id = $1 AND state IN (1, 2)",
            &[&parent],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    let mut ended = 0;
    for id in ids {
        if end_build(pool, &id, state, message).await?.is_some() {
            ended += 1;
        }
    }
    Ok(ended)
}

/// Ends a queued or running build from outside its runner (a cancellation, a dead runner);
/// returns the build as written, or `None` when it had ended already.
pub async fn end_build(
    pool: &PgPool,
    id: &str,
    state: BuildState,
    message: &str,
) -> Result<Option<pb::Build>, Error> {
    let mut conn = pool.get().await?;
    let tx = conn.transaction().await?;
    let Some(row) = tx
        .query_opt_traced(
            "SELECT record FROM scheduler_builds WHERE id = $1 AND state IN (1, 2) FOR UPDATE",
            &[&id],
        )
        .await?
    else {
        return Ok(None);
    };
    let mut build = build_from_row(&row, 0)?;
    build.state = state as i32;
    build.error_message = message.to_owned();
    build.end_time = Some(timestamp(Utc::now()));
    tx.execute_traced(
        "UPDATE scheduler_builds SET state = $2, record = $3 WHERE id = $1",
        &[&id, &(state as i16), &build.encode_to_vec()],
    )
    .await?;
    tx.commit().await?;
    Ok(Some(build))
}

pub async fn get_build(
    client: &(impl GenericClient + Sync),
    id: &str,
) -> Result<Option<pb::Build>, Error> {
    client
        .query_opt_traced("SELECT record FROM scheduler_builds WHERE id = $1", &[&id])
        .await?
        .as_ref()
        .map(|r| build_from_row(r, 0))
        .transpose()
}

/// The state of a build as stored (cheap: for runners checking whether they were cancelled).
pub async fn build_state(pool: &PgPool, id: &str) -> Result<Option<i16>, Error> {
    let conn = pool.get().await?;
    Ok(conn
        .query_opt_traced("SELECT state FROM scheduler_builds WHERE id = $1", &[&id])
        .await?
        .map(|r| r.get(0)))
}

/// Builds newest first, of one source or all, before a (created_at, id) position.
pub async fn list_builds(
    client: &(impl GenericClient + Sync),
    filter: &BuildFilter<'_>,
    before: Option<(DateTime<Utc>, String)>,
    limit: i64,
) -> Result<Vec<(pb::Build, DateTime<Utc>)>, Error> {
    let (before_time, before_id) = before.unwrap_or((DateTime::<Utc>::MAX_UTC, String::new()));
    let mut sql = String::from(
        "SELECT record, created_at FROM scheduler_builds WHERE (created_at, id) < ($1, $2)",
    );
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
        vec![&before_time, &before_id];
    if let Some(source) = &filter.source {
        params.push(source);
        sql.push_str(&format!(" AND source = ${}", params.len()));
    }
    if let Some(parent) = &filter.parent {
        params.push(parent);
        sql.push_str(&format!(
            " AND parent_id = ${} AND parent_id <> ''",
            params.len()
        ));
    }
    if !filter.states.is_empty() {
        params.push(&filter.states);
        sql.push_str(&format!(" AND state = ANY(${})", params.len()));
    }
    params.push(&limit);
    sql.push_str(&format!(
        " ORDER BY created_at DESC, id DESC LIMIT ${}",
        params.len()
    ));
    let rows = client.query_traced(&sql, &params).await?;
    rows.iter()
        .map(|r| Ok((build_from_row(r, 0)?, r.get(1))))
        .collect()
}

/// Which builds `list_builds` lists; each filter set narrows it.
#[derive(Debug, Default)]
pub struct BuildFilter<'a> {
    pub source: Option<&'a str>,
    /// Only the node builds of this fleet build.
    pub parent: Option<&'a str>,
    /// Only builds in these states (`BuildState` numbers); empty for every state.
    pub states: Vec<i16>,
}

/// Queued or running builds whose runner is `runner` (after a restart, they are orphans), or
/// whose heartbeat is older than `silent_for` (their runner is gone).
pub async fn orphaned_builds(
    pool: &PgPool,
    runner: Option<&str>,
    silent_for: std::time::Duration,
) -> Result<Vec<String>, Error> {
    let conn = pool.get().await?;
    let rows = match runner {
        Some(runner) => {
            conn.query_traced(
                "SELECT id FROM scheduler_builds WHERE state IN (1, 2) AND runner = $1",
                &[&runner],
            )
            .await?
        }
        None => {
            conn.query_traced(
                "SELECT id FROM scheduler_builds WHERE state IN (1, 2) \
                 AND heartbeat_at < now() - make_interval(secs => $1)",
                &[&silent_for.as_secs_f64()],
            )
            .await?
        }
    };
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// After a scheduled build: a success clears the failure count; a failure counts one more and
/// pushes the next build back by the backoff. Fenced by the lease.
pub async fn record_outcome(
    pool: &PgPool,
    lease: &Lease,
    source: &str,
    failed: bool,
) -> Result<(), Error> {
    let conn = pool.get().await?;
    if failed {
        conn.execute_traced(
            &format!(
                "UPDATE scheduler_sources SET failures = failures + 1, next_due_at = \
                 GREATEST(next_due_at, now() + make_interval(secs => LEAST(600, 10 * power(2, LEAST(failures, 10))))) \
                 WHERE name = $1 AND next_due_at IS NOT NULL AND {}",
                fence(2, 3)
            ),
            &[&source, &lease.holder, &lease.epoch],
        )
        .await?;
    } else {
        conn.execute_traced(
            &format!("UPDATE scheduler_sources SET failures = 0 WHERE name = $1 AND failures <> 0 AND {}", fence(2, 3)),
            &[&source, &lease.holder, &lease.epoch],
        )
        .await?;
    }
    Ok(())
}

pub async fn page_token_key(pool: &PgPool) -> Result<Vec<u8>, Error> {
    let conn = pool.get().await?;
    Ok(conn
        .query_one_traced(
            "SELECT value FROM scheduler_secrets WHERE name = 'page_token_key'",
            &[],
        )
        .await?
        .get(0))
}
