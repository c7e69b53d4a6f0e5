//! DbSync's PostgreSQL schema: migrations embedded in the binary, applied at start.

use merkle_shared::postgres::{Migration, PgError, PgPool, migrate as apply};

/// The component name under which DbSync's migrations are recorded.
const COMPONENT: &str = "db-sync";

/// DbSync's migrations, in order; never edit a released one, add the next.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "snapshots",
    sql: include_str!("../migrations/0001_snapshots.sql"),
}];

/// Brings the schema up to date; returns how many migrations were applied.
pub async fn migrate(pool: &PgPool) -> Result<usize, PgError> {
    apply(pool, COMPONENT, MIGRATIONS).await
}
