//! When a source's ticks fall: the next run with its jitter, and the ticks missed while no
//! Scheduler ran, coalesced into one build.

use chrono::{DateTime, Utc};

use crate::spec::{Schedule, SourceSpec};

/// Most ticks counted when coalescing a long downtime (the count is reported, capped).
pub const MAX_MISSED: u32 = 100_000;

/// The tick after `tick` that is not yet due at `now`, and how many due ones were passed over.
pub fn coalesce(
    schedule: &Schedule,
    tick: DateTime<Utc>,
    now: DateTime<Utc>,
) -> (u32, Option<DateTime<Utc>>) {
    let mut missed = 0;
    let mut next = schedule.next_after(tick);
    while let Some(t) = next {
        if t > now || missed >= MAX_MISSED {
            break;
        }
        missed += 1;
        next = schedule.next_after(t);
    }
    // For long intervals behind by a lot, skip ahead in one step.
    if let (Schedule::Every(interval), Some(t)) = (schedule, next)
        && t <= now
    {
        let behind = (now - t).num_milliseconds().max(0) as u128;
        let steps = behind / interval.as_millis().max(1) + 1;
        let skip = chrono::Duration::milliseconds((steps * interval.as_millis()) as i64);
        next = Some(t + skip);
    }
    (missed, next)
}

/// The next tick and its start (the tick plus the source's jitter).
pub fn next_run(
    spec: &SourceSpec,
    tick: Option<DateTime<Utc>>,
) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    tick.map(|t| {
        let jitter = chrono::Duration::from_std(spec.jitter_for(t)).unwrap_or_default();
        (t, t + jitter)
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn missed_ticks_are_coalesced_into_one() {
        let at = |s: &str| s.parse::<DateTime<Utc>>().expect("time");
        let every = Schedule::Every(Duration::from_secs(10));
        // Due at 00:00:00; now 00:00:35: ticks 10, 20, 30 were missed; the next is 40.
        let (missed, next) = coalesce(
            &every,
            at("2026-01-01T00:00:00Z"),
            at("2026-01-01T00:00:35Z"),
        );
        assert_eq!((missed, next), (3, Some(at("2026-01-01T00:00:40Z"))));
        // On time: nothing missed.
        let (missed, next) = coalesce(
            &every,
            at("2026-01-01T00:00:00Z"),
            at("2026-01-01T00:00:00.5Z"),
        );
        assert_eq!((missed, next), (0, Some(at("2026-01-01T00:00:10Z"))));
        // Down for a year: the count is capped, the next tick is still right.
        let (missed, next) = coalesce(
            &every,
            at("2025-01-01T00:00:00Z"),
            at("2026-01-01T00:00:05Z"),
        );
        assert_eq!(missed, MAX_MISSED);
        assert_eq!(next, Some(at("2026-01-01T00:00:10Z")));
        assert_eq!(
            coalesce(&Schedule::Never, at("2026-01-01T00:00:00Z"), Utc::now()),
            (0, None)
        );
    }
}
