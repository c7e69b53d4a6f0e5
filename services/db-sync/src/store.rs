//! DbSync's PostgreSQL side: the schema (migrations embedded in the binary), and every query
//! on sources and snapshots. Each hot-path query is a constant in [`queries`], so a test can
//! `EXPLAIN` all of them and prove none scans a table unindexed.

use merkle_shared::postgres::Traced as _;
use std::time::{Duration, SystemTime};

use merkle_core::{Digest, Profile, TreeStats};
use merkle_proto::{common::v1 as common, dbsync::v1 as pb};
use merkle_shared::{
    convert::{profile_to_proto, stats_to_proto},
    postgres::{Migration, PgError, PgPool, migrate as apply},
};
use tokio_postgres::{GenericClient, Row};

use crate::error::Error;

/// The component name under which DbSync's migrations are recorded.
const COMPONENT: &str = "db-sync";

/// DbSync's migrations, in order; never edit a released one, add the next.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "merkle_roots",
        sql: include_str!("../migrations/0001_merkle_roots.sql"),
    },
    Migration {
        version: 2,
        name: "history",
        sql: include_str!("../migrations/0002_history.sql"),
    },
    Migration {
        version: 3,
        name: "actors",
        sql: include_str!("../migrations/0003_actors.sql"),
    },
    Migration {
        version: 4,
        name: "sources_by_bytes",
        sql: include_str!("../migrations/0004_sources_by_bytes.sql"),
    },
    Migration {
        version: 5,
        name: "log",
        sql: include_str!("../migrations/0005_log.sql"),
    },
    Migration {
        version: 6,
        name: "witnesses",
        sql: include_str!("../migrations/0006_witnesses.sql"),
    },
];

/// Brings the schema up to date; returns how many migrations were applied.
pub async fn migrate(pool: &PgPool) -> Result<usize, PgError> {
    apply(pool, COMPONENT, MIGRATIONS).await
}

/// The SQL of every query on a hot path, for use here and for the EXPLAIN test.
pub mod queries {
    /// The columns of a snapshot, in the order [`super::Snapshot::from_row`] reads them.
    macro_rules! snapshot_columns {
        () => {
            "id, source, sequence, root_hash, profile, build_id, created_at, file_count, \
             dir_count, symlink_count, skipped_count, total_bytes, previous_record_hash, \
             record_hash, signature, key_id"
        };
    }

    pub const LATEST: &str = concat!(
        "SELECT ",
        snapshot_columns!(),
        " FROM merkle_roots WHERE source = $1 ORDER BY sequence DESC LIMIT 1"
    );
    /// Every snapshot of a source, oldest first.
    pub const ALL_OF_SOURCE: &str = concat!(
        "SELECT ",
        snapshot_columns!(),
        " FROM merkle_roots WHERE source = $1 ORDER BY sequence"
    );
    pub const BY_ID: &str = concat!(
        "SELECT ",
        snapshot_columns!(),
        " FROM merkle_roots WHERE id = $1"
    );
    pub const BY_SEQUENCE: &str = concat!(
        "SELECT ",
        snapshot_columns!(),
        " FROM merkle_roots WHERE source = $1 AND sequence = $2"
    );
    pub const BY_BUILD: &str = concat!(
        "SELECT ",
        snapshot_columns!(),
        " FROM merkle_roots WHERE source = $1 AND build_id = $2 AND build_id <> ''"
    );
    /// Newest first, below a sequence, within [start, end).
    pub const PAGE: &str = concat!(
        "SELECT ",
        snapshot_columns!(),
        " FROM merkle_roots WHERE source = $1 AND sequence < $2 AND created_at >= $3 \
         AND created_at < $4 ORDER BY sequence DESC LIMIT $5"
    );
    /// Sources after a name, each with its latest snapshot.
    pub const SOURCES: &str = concat!(
        "SELECT s.name, s.keep_last, s.keep_within_secs, s.snapshot_count, ",
        "r.id, r.source, r.sequence, r.root_hash, r.profile, r.build_id, r.created_at, r.file_count, \
         r.dir_count, r.symlink_count, r.skipped_count, r.total_bytes, r.previous_record_hash, \
         r.record_hash, r.signature, r.key_id \
         FROM merkle_sources s CROSS JOIN LATERAL (SELECT * FROM merkle_roots m \
         WHERE m.source = s.name ORDER BY m.sequence DESC LIMIT 1) r \
         WHERE s.name > $1 ORDER BY s.name LIMIT $2"
    );
    /// The latest snapshot with an id up to $3 of every source whose name is in [$1, $2)
    /// bytewise (a fleet source's `<source>@` histories).
    pub const LATEST_IN_RANGE: &str = concat!(
        "SELECT r.* FROM merkle_sources s CROSS JOIN LATERAL (SELECT ",
        snapshot_columns!(),
        " FROM merkle_roots m WHERE m.source = s.name AND m.id <= $3 ORDER BY m.sequence DESC \
         LIMIT 1) r WHERE s.name COLLATE \"C\" >= $1 AND s.name COLLATE \"C\" < $2"
    );
    /// The latest snapshot with an id up to $2 of each of the named sources.
    pub const LATEST_OF_NAMES: &str = concat!(
        "SELECT r.* FROM merkle_sources s CROSS JOIN LATERAL (SELECT ",
        snapshot_columns!(),
        " FROM merkle_roots m WHERE m.source = s.name AND m.id <= $2 ORDER BY m.sequence DESC \
         LIMIT 1) r WHERE s.name = ANY($1)"
    );
    /// Each name asked ($1) with its snapshot count and its latest snapshot's time (the
    /// (source, created_at) index's last entry); NULLs for a source with none.
    pub const ACTIVITY_TOTALS: &str = "SELECT n.name, s.snapshot_count, \
         (SELECT max(m.created_at) FROM merkle_roots m WHERE m.source = n.name) \
         FROM unnest($1::text[]) AS n(name) LEFT JOIN merkle_sources s ON s.name = n.name";
    /// Snapshots of the names ($1) stored since $2, counted per day from $2.
    pub const ACTIVITY_DAYS: &str = "SELECT source, \
         floor(extract(epoch FROM created_at - $2::timestamptz) / 86400)::int4, count(*) \
         FROM merkle_roots WHERE source = ANY($1) AND created_at >= $2::timestamptz \
         GROUP BY 1, 2";
    pub const SOURCE: &str = "SELECT name, keep_last, keep_within_secs, snapshot_count, retention_set_by FROM merkle_sources WHERE name = $1";
    /// Which of the hashes are stored; those found and not used for `$2` seconds (half of
    /// GC_GRACE) are marked used, so garbage collection spares them while the sync that asked
    /// relies on them. Rows used more recently are protected long enough already and are not
    /// written again.
    pub const FIND_NODES: &str = "WITH found AS (SELECT hash, last_used FROM merkle_tree_data \
         WHERE hash = ANY($1)), touched AS (UPDATE merkle_tree_data d SET last_used = now() \
         FROM found f WHERE d.hash = f.hash AND f.last_used < now() - make_interval(secs => $2)) \
         SELECT hash FROM found";
    /// Every node below the given stored ones (a sync's unchanged subtrees), walked through
    /// the stored subdirectory hashes; those not used for `$2` seconds (half of GC_GRACE) are
    /// marked used, which row-locks them against garbage collection until the sync commits
    /// (the others cannot be collected before it commits anyway). Returns every hash walked,
    /// so the caller can check that all of them exist ([`EXISTING`]).
    /// Walks stored subtrees from `$1`, starting each at the depth `$3` it hangs at, and marks
    /// the nodes used (as FIND_NODES does). Returns each (hash, depth) reached; the walk stops
    /// one level past the depth limit `$4`, so a row deeper than `$4` means too deep.
    pub const TOUCH_TREE: &str = "WITH RECURSIVE walk(hash, depth) AS ( \
             SELECT * FROM unnest($1::bytea[], $3::int[]) \
           UNION \
             SELECT substring(d.child_dirs FROM i * 32 + 1 FOR 32), w.depth + 1 \
             FROM walk w JOIN merkle_tree_data d ON d.hash = w.hash, \
                  generate_series(0, octet_length(d.child_dirs) / 32 - 1) AS i \
             WHERE w.depth <= $4 \
         ), touched AS (UPDATE merkle_tree_data d SET last_used = now() \
             FROM (SELECT DISTINCT hash FROM walk) w \
             WHERE d.hash = w.hash AND d.last_used < now() - make_interval(secs => $2)) \
         SELECT hash, depth FROM walk";
    /// Which of the hashes are stored.
    pub const EXISTING: &str = "SELECT hash FROM merkle_tree_data WHERE hash = ANY($1)";
    pub const INSERT_NODES: &str = "INSERT INTO merkle_tree_data (hash, encoded, sizes, child_dirs) \
         SELECT * FROM unnest($1::bytea[], $2::bytea[], $3::bytea[], $4::bytea[]) \
         ON CONFLICT (hash) DO UPDATE SET last_used = now() RETURNING (xmax = 0)";
    /// Stores a snapshot and queues its record for the transparency log, in one statement.
    pub const INSERT_SNAPSHOT: &str = concat!(
        "WITH r AS (INSERT INTO merkle_roots (source, sequence, root_hash, profile, build_id, \
         created_at, file_count, dir_count, symlink_count, skipped_count, total_bytes, \
         previous_record_hash, record_hash, signature, key_id) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) RETURNING ",
        snapshot_columns!(),
        "), queued AS (INSERT INTO merkle_log_pending (snapshot_id, source, sequence, record_hash) \
         SELECT id, source, sequence, record_hash FROM r) SELECT * FROM r"
    );
    /// A range of a source's records, oldest first.
    pub const HISTORY: &str = concat!(
        "SELECT ",
        snapshot_columns!(),
        " FROM merkle_roots WHERE source = $1 AND sequence >= $2 AND sequence <= $3 \
         ORDER BY sequence LIMIT $4"
    );
    /// A source's first and latest kept sequence numbers.
    pub const SEQUENCE_RANGE: &str =
        "SELECT min(sequence), max(sequence) FROM merkle_roots WHERE source = $1";
    pub const CHECKPOINTS: &str = "SELECT kind, source, sequence, record_hash, signature, key_id, \
         created_at, actor FROM merkle_history_checkpoints WHERE source = $1";
    pub const UPSERT_CHECKPOINT: &str = "INSERT INTO merkle_history_checkpoints \
         (source, kind, sequence, record_hash, signature, key_id, created_at, actor) \
         VALUES ($1, $2, $3, $4, $5, $6, now(), $7) ON CONFLICT (source, kind) DO UPDATE SET \
         sequence = EXCLUDED.sequence, record_hash = EXCLUDED.record_hash, \
         signature = EXCLUDED.signature, key_id = EXCLUDED.key_id, created_at = now(), \
         actor = EXCLUDED.actor";
    pub const NODE: &str = "SELECT hash, encoded, sizes FROM merkle_tree_data WHERE hash = ANY($1)";
    /// Every hot-path query with sample arguments' types, for the EXPLAIN test:
    /// (name, SQL).
    pub const ALL: &[(&str, &str)] = &[
        ("LATEST", LATEST),
        ("ALL_OF_SOURCE", ALL_OF_SOURCE),
        ("BY_ID", BY_ID),
        ("BY_SEQUENCE", BY_SEQUENCE),
        ("BY_BUILD", BY_BUILD),
        ("PAGE", PAGE),
        ("SOURCES", SOURCES),
        ("SOURCE", SOURCE),
        ("LATEST_IN_RANGE", LATEST_IN_RANGE),
        ("LATEST_OF_NAMES", LATEST_OF_NAMES),
        ("ACTIVITY_TOTALS", ACTIVITY_TOTALS),
        ("ACTIVITY_DAYS", ACTIVITY_DAYS),
        ("FIND_NODES", FIND_NODES),
        ("TOUCH_TREE", TOUCH_TREE),
        ("EXISTING", EXISTING),
        ("NODE", NODE),
        ("HISTORY", HISTORY),
        ("SEQUENCE_RANGE", SEQUENCE_RANGE),
        ("CHECKPOINTS", CHECKPOINTS),
    ];
}

/// A stored snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub id: i64,
    pub source: String,
    pub sequence: i64,
    pub root: Digest,
    pub profile: Profile,
    pub build_id: String,
    pub created_at: SystemTime,
    pub stats: TreeStats,
    pub previous_record_hash: Option<Vec<u8>>,
    pub record_hash: Option<Vec<u8>>,
    pub signature: Option<Vec<u8>>,
    pub key_id: Option<String>,
}

fn digest(bytes: &[u8]) -> Result<Digest, Error> {
    <[u8; 32]>::try_from(bytes)
        .map(Digest)
        .map_err(|_| Error::Internal("a stored hash is not 32 bytes".into()))
}

fn profile_of(byte: i16) -> Result<Profile, Error> {
    Profile::from_byte(byte as u8)
        .ok_or_else(|| Error::Internal(format!("stored profile {byte} is unknown")))
}

impl Snapshot {
    /// Reads the snapshot columns starting at column `at`.
    fn from_row(row: &Row, at: usize) -> Result<Snapshot, Error> {
        let count = |i: usize| row.get::<_, i64>(at + i) as u64;
        Ok(Snapshot {
            id: row.get(at),
            source: row.get(at + 1),
            sequence: row.get(at + 2),
            root: digest(row.get(at + 3))?,
            profile: profile_of(row.get(at + 4))?,
            build_id: row.get(at + 5),
            created_at: row.get(at + 6),
            stats: TreeStats {
                file_count: count(7),
                dir_count: count(8),
                symlink_count: count(9),
                skipped_count: count(10),
                total_bytes: count(11),
            },
            previous_record_hash: row.get(at + 12),
            record_hash: row.get(at + 13),
            signature: row.get(at + 14),
            key_id: row.get(at + 15),
        })
    }

    pub fn to_proto(&self) -> pb::Snapshot {
        let hex = |b: &Option<Vec<u8>>| {
            b.as_deref()
                .map(merkle_core::digest::hex)
                .unwrap_or_default()
        };
        pb::Snapshot {
            snapshot_id: self.id.to_string(),
            source: self.source.clone(),
            sequence: self.sequence as u64,
            root_hash: self.root.to_hex(),
            profile: profile_to_proto(self.profile) as i32,
            build_id: self.build_id.clone(),
            create_time: Some(prost_types::Timestamp::from(self.created_at)),
            stats: Some(stats_to_proto(&self.stats)),
            previous_record_hash: hex(&self.previous_record_hash),
            record_hash: hex(&self.record_hash),
            signature: hex(&self.signature),
            key_id: self.key_id.clone().unwrap_or_default(),
        }
    }
}

/// A source's retention policy: a snapshot is kept when a rule that is set keeps it; with no
/// rule set every snapshot is kept; the latest is always kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    pub keep_last: Option<u32>,
    pub keep_within: Option<Duration>,
}

impl Retention {
    pub fn to_proto(self) -> common::RetentionPolicy {
        common::RetentionPolicy {
            keep_last: self.keep_last.unwrap_or(0),
            keep_within: self
                .keep_within
                .and_then(|d| prost_types::Duration::try_from(d).ok()),
        }
    }

    fn from_row(row: &Row, at: usize) -> Retention {
        Retention {
            keep_last: row.get::<_, Option<i32>>(at).map(|n| n as u32),
            keep_within: row
                .get::<_, Option<i64>>(at + 1)
                .map(|s| Duration::from_secs(s as u64)),
        }
    }
}

/// A source with its latest snapshot.
#[derive(Debug, Clone)]
pub struct SourceSummary {
    pub name: String,
    pub retention: Retention,
    pub snapshot_count: u64,
    pub latest: Snapshot,
}

/// The snapshot in a row of [`queries::INSERT_SNAPSHOT`] (or any query of its columns).
pub fn snapshot_from_row(row: &Row) -> Result<Snapshot, Error> {
    Snapshot::from_row(row, 0)
}

async fn one(
    client: &(impl GenericClient + Sync),
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Option<Snapshot>, Error> {
    match client.query_opt_traced(sql, params).await? {
        Some(row) => Ok(Some(Snapshot::from_row(&row, 0)?)),
        None => Ok(None),
    }
}

pub async fn latest(
    client: &(impl GenericClient + Sync),
    source: &str,
) -> Result<Option<Snapshot>, Error> {
    one(client, queries::LATEST, &[&source]).await
}

pub async fn by_build(
    client: &(impl GenericClient + Sync),
    source: &str,
    build_id: &str,
) -> Result<Option<Snapshot>, Error> {
    if build_id.is_empty() {
        return Ok(None);
    }
    one(client, queries::BY_BUILD, &[&source, &build_id]).await
}

pub async fn by_id(
    client: &(impl GenericClient + Sync),
    id: i64,
) -> Result<Option<Snapshot>, Error> {
    one(client, queries::BY_ID, &[&id]).await
}

pub async fn by_sequence(
    client: &(impl GenericClient + Sync),
    source: &str,
    sequence: i64,
) -> Result<Option<Snapshot>, Error> {
    one(client, queries::BY_SEQUENCE, &[&source, &sequence]).await
}

/// A page of a source's snapshots, newest first, below `before` (a sequence).
pub async fn page(
    client: &(impl GenericClient + Sync),
    source: &str,
    before: i64,
    start: SystemTime,
    end: SystemTime,
    limit: i64,
) -> Result<Vec<Snapshot>, Error> {
    client
        .query_traced(queries::PAGE, &[&source, &before, &start, &end, &limit])
        .await?
        .iter()
        .map(|row| Snapshot::from_row(row, 0))
        .collect()
}

/// A page of sources after `after`, by name.
pub async fn sources(
    client: &(impl GenericClient + Sync),
    after: &str,
    limit: i64,
) -> Result<Vec<SourceSummary>, Error> {
    client
        .query_traced(queries::SOURCES, &[&after, &limit])
        .await?
        .iter()
        .map(|row| {
            Ok(SourceSummary {
                name: row.get(0),
                retention: Retention::from_row(row, 1),
                snapshot_count: row.get::<_, i64>(3) as u64,
                latest: Snapshot::from_row(row, 4)?,
            })
        })
        .collect()
}

/// The latest snapshot of every `<fleet>@<node>` history of the fleet source `fleet`, as of
/// the snapshot id `as_of` (snapshots stored later are not seen).
pub async fn latest_of_fleet(
    client: &(impl GenericClient + Sync),
    fleet: &str,
    as_of: i64,
) -> Result<Vec<Snapshot>, Error> {
    // `A` follows `@` in ASCII: [fleet@, fleetA) holds exactly the names starting `fleet@`.
    let (from, to) = (format!("{fleet}@"), format!("{fleet}A"));
    client
        .query_traced(queries::LATEST_IN_RANGE, &[&from, &to, &as_of])
        .await?
        .iter()
        .map(|row| Snapshot::from_row(row, 0))
        .collect()
}

/// The latest snapshot of each of `names` that has one, as of the snapshot id `as_of`.
pub async fn latest_of_names(
    client: &(impl GenericClient + Sync),
    names: &[&str],
    as_of: i64,
) -> Result<Vec<Snapshot>, Error> {
    client
        .query_traced(queries::LATEST_OF_NAMES, &[&names, &as_of])
        .await?
        .iter()
        .map(|row| Snapshot::from_row(row, 0))
        .collect()
}

/// A source's retention policy and snapshot count, or `None` when it has no snapshots.
/// A source as DbSync keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceRow {
    pub retention: Retention,
    pub snapshot_count: u64,
    /// Who last changed the retention policy (empty: never set).
    pub retention_set_by: String,
}

pub async fn source(
    client: &(impl GenericClient + Sync),
    name: &str,
) -> Result<Option<SourceRow>, Error> {
    Ok(client
        .query_opt_traced(queries::SOURCE, &[&name])
        .await?
        .map(|row| SourceRow {
            retention: Retention::from_row(&row, 1),
            snapshot_count: row.get::<_, i64>(3) as u64,
            retention_set_by: row.get(4),
        }))
}

/// Saves `name`'s retention policy, in `tx`. The identity is recorded when the policy changes:
/// passing on the same policy again (as the Scheduler does after each build) keeps the name of
/// whoever set it.
pub async fn save_retention(
    tx: &tokio_postgres::Transaction<'_>,
    name: &str,
    policy: Retention,
    actor: &str,
) -> Result<(), Error> {
    let keep_last = policy.keep_last.map(|n| n as i32);
    let keep_within = policy.keep_within.map(|d| d.as_secs() as i64);
    tx.execute_traced(
        "UPDATE merkle_sources SET keep_last = $2, keep_within_secs = $3, \
         retention_set_by = CASE WHEN keep_last IS DISTINCT FROM $2 \
           OR keep_within_secs IS DISTINCT FROM $3 THEN $4 ELSE retention_set_by END \
         WHERE name = $1",
        &[&name, &keep_last, &keep_within, &actor],
    )
    .await?;
    Ok(())
}

/// What [`prune`] removed: how many snapshots, the last one (sequence, record hash) for the
/// pruning checkpoint, and who set the policy that removed them.
pub struct Pruned {
    pub deleted: u64,
    pub last: Option<(i64, Option<Vec<u8>>)>,
    pub actor: String,
}

/// Deletes the snapshots of `name` its retention policy no longer keeps (always a prefix of
/// the history: the rules keep the newest).
pub async fn prune(tx: &tokio_postgres::Transaction<'_>, name: &str) -> Result<Pruned, Error> {
    let nothing = Pruned {
        deleted: 0,
        last: None,
        actor: String::new(),
    };
    // Lock the source first: a sync of it waits, so the latest is the latest.
    let Some(row) = tx
        .query_opt_traced(
            "SELECT keep_last, keep_within_secs, retention_set_by FROM merkle_sources \
             WHERE name = $1 FOR UPDATE",
            &[&name],
        )
        .await?
    else {
        return Ok(nothing);
    };
    let keep_last: Option<i32> = row.get(0);
    let keep_within: Option<i64> = row.get(1);
    let actor: String = row.get(2);
    if keep_last.is_none() && keep_within.is_none() {
        return Ok(nothing);
    }
    let rows = tx
        .query_traced(
            "DELETE FROM merkle_roots WHERE source = $1 \
             AND sequence < (SELECT max(sequence) FROM merkle_roots WHERE source = $1) \
             AND ($2::int IS NULL OR sequence <= (SELECT max(sequence) FROM merkle_roots WHERE source = $1) - $2) \
             AND ($3::bigint IS NULL OR created_at < now() - make_interval(secs => $3::bigint)) \
             RETURNING sequence, record_hash",
            &[&name, &keep_last, &keep_within],
        )
        .await?;
    let deleted = rows.len() as u64;
    let last = rows
        .iter()
        .map(|r| (r.get::<_, i64>(0), r.get::<_, Option<Vec<u8>>>(1)))
        .max_by_key(|(sequence, _)| *sequence);
    if deleted > 0 {
        tx.execute_traced(
            "UPDATE merkle_sources SET snapshot_count = snapshot_count - $2 WHERE name = $1",
            &[&name, &(deleted as i64)],
        )
        .await?;
    }
    Ok(Pruned {
        deleted,
        last,
        actor,
    })
}

/// Sources that have a retention policy.
pub async fn sources_with_policies(pool: &PgPool) -> Result<Vec<String>, Error> {
    let conn = pool.get().await?;
    Ok(conn
        .query_traced(
            "SELECT name FROM merkle_sources WHERE keep_last IS NOT NULL OR keep_within_secs IS NOT NULL",
            &[],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect())
}

/// The key that signs page tokens, made once by migration 1 and shared by every replica.
pub async fn page_token_key(pool: &PgPool) -> Result<Vec<u8>, Error> {
    let conn = pool.get().await?;
    let row = conn
        .query_one_traced(
            "SELECT value FROM dbsync_secrets WHERE name = 'page_token_key'",
            &[],
        )
        .await?;
    Ok(row.get(0))
}
