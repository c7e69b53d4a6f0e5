//! Change activity: for a page of sources, when each last changed, how many snapshots it has
//! and how many it stored on each of the last days (UTC). Each snapshot is a change (DbSync
//! stores one only when the root changed). Read from the (source, created_at) index, so the
//! cost follows the snapshots in the window, not the history's length.

use std::time::{Duration, SystemTime};

use merkle_proto::dbsync::v1 as pb;
use merkle_shared::postgres::Traced as _;
use tokio_postgres::GenericClient;

use crate::{error::Error, store::queries};

/// Most sources one call names: a page of an overview.
pub const MAX_SOURCES: usize = 100;
/// Most days one call counts.
pub const MAX_DAYS: u32 = 31;
/// The days counted when the caller names none: two weeks.
pub const DEFAULT_DAYS: u32 = 14;

const DAY: u64 = 86_400;

/// One source's activity.
pub struct Activity {
    pub source: String,
    pub last_change: Option<SystemTime>,
    pub snapshot_count: u64,
    /// Oldest first, one count per day.
    pub per_day: Vec<u32>,
}

impl Activity {
    pub fn to_proto(&self) -> pb::ChangeActivity {
        pb::ChangeActivity {
            source: self.source.clone(),
            last_change_time: self.last_change.map(prost_types::Timestamp::from),
            snapshot_count: self.snapshot_count,
            changes_per_day: self.per_day.clone(),
        }
    }
}

/// The midnight (UTC) starting the first of `days` days that end with `now`'s.
pub fn first_day(now: SystemTime, days: u32) -> SystemTime {
    let today = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / DAY);
    let first = today.saturating_sub(u64::from(days.max(1)) - 1);
    SystemTime::UNIX_EPOCH + Duration::from_secs(first * DAY)
}

/// The activity of each of `names` (in that order) over the `days` days from `first_day`.
pub async fn read(
    client: &(impl GenericClient + Sync),
    names: &[&str],
    first_day: SystemTime,
    days: u32,
) -> Result<Vec<Activity>, Error> {
    let mut found: Vec<Activity> = client
        .query_traced(queries::ACTIVITY_TOTALS, &[&names])
        .await?
        .iter()
        .map(|row| Activity {
            source: row.get(0),
            snapshot_count: row.get::<_, Option<i64>>(1).unwrap_or(0).max(0) as u64,
            last_change: row.get(2),
            per_day: vec![0; days as usize],
        })
        .collect();
    let at: std::collections::HashMap<String, usize> = found
        .iter()
        .enumerate()
        .map(|(i, a)| (a.source.clone(), i))
        .collect();
    for row in client
        .query_traced(queries::ACTIVITY_DAYS, &[&names, &first_day])
        .await?
    {
        let (source, day, count): (String, i32, i64) = (row.get(0), row.get(1), row.get(2));
        // A snapshot stored after the call began (a later day) is not counted.
        if let (Some(&i), Ok(day)) = (at.get(&source), usize::try_from(day))
            && let Some(slot) = found[i].per_day.get_mut(day)
        {
            *slot = u32::try_from(count).unwrap_or(u32::MAX);
        }
    }
    // In the order asked (the query's order is unnest's, which PostgreSQL does not promise).
    let order: std::collections::HashMap<&str, usize> =
        names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    found.sort_by_key(|a| order.get(a.source.as_str()).copied().unwrap_or(usize::MAX));
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_day_is_a_utc_midnight_days_before_today() {
        // 2026-12-03T11:56:00Z: day 20,790 since the epoch.
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(20_790 * DAY + 43_000);
        let at = |days| {
            first_day(now, days)
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs()
        };
        assert_eq!(at(1), 20_790 * DAY);
        assert_eq!(at(14), 20_777 * DAY);
        assert_eq!(at(0), 20_790 * DAY, "0 days counts today alone");
    }
}
