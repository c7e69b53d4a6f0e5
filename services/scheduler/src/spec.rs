//! A source as the Scheduler works with it: every field of the request checked once, here
//! (parse, don't validate), into a [`SourceSpec`]. What is stored is the normalized message.

use std::time::Duration;

use chrono::{DateTime, Utc};
use merkle_proto::{
    common::v1::{Profile as PbProfile, RetentionPolicy},
    scheduler::v1::{self as pb, ConcurrencyPolicy, FleetMode, source::Schedule as PbSchedule},
};
use merkle_shared::names::SourceName;

use crate::error::Error;

/// Longest interval, jitter or deadline accepted.
const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);
/// The deadline of a build when the source sets none.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(3600);

/// When a source is built.
#[derive(Debug, Clone)]
pub enum Schedule {
    /// Only on demand.
    Never,
    /// Every interval.
    Every(Duration),
    /// On a cron schedule, in a time zone.
    Cron {
        cron: Box<croner::Cron>,
        time_zone: chrono_tz::Tz,
    },
}

impl Schedule {
    /// The first tick strictly after `after`, or `None` when there is none.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Never => None,
            Schedule::Every(interval) => Some(after + *interval),
            Schedule::Cron { cron, time_zone } => cron
                .find_next_occurrence(&after.with_timezone(time_zone), false)
                .ok()
                .map(|t| t.with_timezone(&Utc)),
        }
    }
}

/// What to do when a build is due while one runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Forbid,
    Replace,
}

/// A checked source.
#[derive(Debug, Clone)]
pub struct SourceSpec {
    pub name: SourceName,
    pub path: String,
    pub exclude: Vec<String>,
    pub schedule: Schedule,
    pub jitter: Duration,
    pub enabled: bool,
    pub deadline: Duration,
    pub policy: Policy,
    pub profile: PbProfile,
    pub fleet: FleetMode,
    pub retention: Option<RetentionPolicy>,
    /// The message as stored (server fields unset).
    pub message: pb::Source,
}

fn duration(field: &str, d: &prost_types::Duration) -> Result<Duration, Error> {
    merkle_shared::convert::duration_from_proto(d, MAX_DURATION, "366 days")
        .map_err(|rule| Error::bad_request(field, rule))
}

/// A source name of the Scheduler: the contract's rule, without the `@node` suffix that only
/// fleet builds' snapshots carry.
pub fn source_name(field: &str, name: &str) -> Result<SourceName, Error> {
    if name.contains('@') {
        return Err(Error::bad_request(
            field,
            format!("{name:?} is not a source name: 1-128 characters of a-z, 0-9, -, _ and ."),
        ));
    }
    SourceName::parse(field, name).map_err(Error::BadRequest)
}

impl SourceSpec {
    /// Checks a source message; `min_interval` is the configured shortest interval.
    pub fn from_proto(source: &pb::Source, min_interval: Duration) -> Result<SourceSpec, Error> {
        let name = source_name("source.name", &source.name)?;
        if source.path.is_empty() {
            return Err(Error::bad_request("source.path", "must not be empty"));
        }
        merkle_core::build::check_excludes(&source.exclude_patterns)
            .map_err(|rule| Error::BadRequest(format!("source.exclude_patterns{rule}")))?;
        let schedule = match &source.schedule {
            None => Schedule::Never,
            Some(PbSchedule::Interval(d)) => {
                let d = duration("source.interval", d)?;
                if d < min_interval {
                    return Err(Error::bad_request(
                        "source.interval",
                        format!(
                            "must be at least {} (MIN_INTERVAL)",
                            humantime::format_duration(min_interval)
                        ),
                    ));
                }
                Schedule::Every(d)
            }
            Some(PbSchedule::Cron(c)) => {
                let cron = croner::parser::CronParser::builder()
                    .seconds(croner::parser::Seconds::Disallowed)
                    .build()
                    .parse(&c.expression)
                    .map_err(|e| {
                        Error::bad_request(
                            "source.cron.expression",
                            format!(
                                "{:?} is not a five-field cron expression: {e}",
                                c.expression
                            ),
                        )
                    })?;
                let time_zone = if c.time_zone.is_empty() {
                    chrono_tz::UTC
                } else {
                    c.time_zone.parse::<chrono_tz::Tz>().map_err(|_| {
                        Error::bad_request(
                            "source.cron.time_zone",
                            format!(
                                "{:?} is not an IANA time zone (such as Europe/Berlin)",
                                c.time_zone
                            ),
                        )
                    })?
                };
                let schedule = Schedule::Cron {
                    cron: Box::new(cron),
                    time_zone,
                };
                if schedule.next_after(Utc::now()).is_none() {
                    return Err(Error::bad_request(
                        "source.cron.expression",
                        format!("{:?} never falls due", c.expression),
                    ));
                }
                schedule
            }
        };
        let jitter = source
            .jitter
            .as_ref()
            .map(|d| duration("source.jitter", d))
            .transpose()?
            .unwrap_or_default();
        if let Schedule::Every(interval) = schedule
            && jitter >= interval
        {
            return Err(Error::bad_request(
                "source.jitter",
                "must be shorter than the interval",
            ));
        }
        let deadline = match source.deadline.as_ref() {
            None => DEFAULT_DEADLINE,
            Some(d) => match duration("source.deadline", d)? {
                d if d.is_zero() => DEFAULT_DEADLINE,
                d => d,
            },
        };
        let policy = match ConcurrencyPolicy::try_from(source.concurrency_policy) {
            Ok(ConcurrencyPolicy::Unspecified | ConcurrencyPolicy::Forbid) => Policy::Forbid,
            Ok(ConcurrencyPolicy::Replace) => Policy::Replace,
            Err(_) => {
                return Err(Error::bad_request(
                    "source.concurrency_policy",
                    format!("{} is not a known policy", source.concurrency_policy),
                ));
            }
        };
        let profile = match PbProfile::try_from(source.profile) {
            Ok(PbProfile::Unspecified | PbProfile::Content) => PbProfile::Content,
            Ok(PbProfile::Full) => PbProfile::Full,
            Err(_) => {
                return Err(Error::bad_request(
                    "source.profile",
                    format!("{} is not a known profile", source.profile),
                ));
            }
        };
        let fleet = match FleetMode::try_from(source.fleet_mode) {
            Ok(FleetMode::Unspecified | FleetMode::Local) => FleetMode::Local,
            Ok(FleetMode::AllClients) => FleetMode::AllClients,
            Err(_) => {
                return Err(Error::bad_request(
                    "source.fleet_mode",
                    format!("{} is not a known fleet mode", source.fleet_mode),
                ));
            }
        };
        if let Some(r) = &source.retention
            && let Some(d) = &r.keep_within
        {
            duration("source.retention.keep_within", d)?;
        }
        let retention = source.retention.filter(|r| {
            r.keep_last > 0 || r.keep_within.is_some_and(|d| d.seconds > 0 || d.nanos > 0)
        });
        let message = pb::Source {
            name: name.to_string(),
            path: source.path.clone(),
            exclude_patterns: source.exclude_patterns.clone(),
            schedule: source.schedule.clone(),
            jitter: source.jitter.filter(|_| !jitter.is_zero()),
            enabled: source.enabled,
            deadline: prost_types::Duration::try_from(deadline).ok(),
            concurrency_policy: match policy {
                Policy::Forbid => ConcurrencyPolicy::Forbid,
                Policy::Replace => ConcurrencyPolicy::Replace,
            } as i32,
            profile: profile as i32,
            fleet_mode: fleet as i32,
            retention,
            ..Default::default()
        };
        Ok(SourceSpec {
            name,
            path: source.path.clone(),
            exclude: source.exclude_patterns.clone(),
            schedule,
            jitter,
            enabled: source.enabled,
            deadline,
            policy,
            profile,
            fleet,
            retention,
            message,
        })
    }

    /// This source's jitter for a tick: spread over [0, jitter), the same on every replica
    /// for the same source and tick (derived from both, not drawn at random).
    pub fn jitter_for(&self, tick: DateTime<Utc>) -> Duration {
        if self.jitter.is_zero() {
            return Duration::ZERO;
        }
        use sha2::Digest as _;
        let digest = sha2::Sha256::new()
            .chain_update(self.name.as_str())
            .chain_update(tick.timestamp_millis().to_be_bytes())
            .finalize();
        let spread = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
        Duration::from_millis(spread % (self.jitter.as_millis().max(1) as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(schedule: Option<PbSchedule>) -> pb::Source {
        pb::Source {
            name: "docs".into(),
            path: "/srv/docs".into(),
            schedule,
            enabled: true,
            ..Default::default()
        }
    }

    fn every(seconds: i64) -> Option<PbSchedule> {
        Some(PbSchedule::Interval(prost_types::Duration {
            seconds,
            nanos: 0,
        }))
    }

    fn cron(expression: &str, time_zone: &str) -> Option<PbSchedule> {
        Some(PbSchedule::Cron(pb::CronSchedule {
            expression: expression.into(),
            time_zone: time_zone.into(),
        }))
    }

    fn rejected(s: pb::Source) -> String {
        SourceSpec::from_proto(&s, Duration::from_secs(10))
            .expect_err("rejected")
            .to_string()
    }

    #[test]
    fn bad_fields_are_named() {
        assert!(rejected(source(every(5))).starts_with("source.interval: must be at least 10s"));
        assert!(rejected(source(cron("61 * * * *", ""))).starts_with("source.cron.expression: "));
        assert!(
            rejected(source(cron("0 * * * * *", ""))).starts_with("source.cron.expression: "),
            "six fields"
        );
        assert!(
            rejected(source(cron("0 * * * *", "Mars/Olympus")))
                .starts_with("source.cron.time_zone: ")
        );
        assert!(
            rejected(pb::Source {
                name: "Docs".into(),
                ..source(None)
            })
            .starts_with("source.name: ")
        );
        assert!(
            rejected(pb::Source {
                name: "docs@n1".into(),
                ..source(None)
            })
            .starts_with("source.name: ")
        );
        assert!(
            rejected(pb::Source {
                path: String::new(),
                ..source(None)
            })
            .starts_with("source.path: ")
        );
        assert!(
            rejected(pb::Source {
                jitter: Some(prost_types::Duration {
                    seconds: 20,
                    nanos: 0
                }),
                ..source(every(20))
            })
            .starts_with("source.jitter: ")
        );
        assert!(
            rejected(pb::Source {
                concurrency_policy: 9,
                ..source(None)
            })
            .starts_with("source.concurrency_policy: ")
        );
    }

    #[test]
    fn intervals_and_cron_in_a_time_zone_give_the_next_tick() {
        let at = |s: &str| s.parse::<DateTime<Utc>>().expect("time");
        let spec =
            SourceSpec::from_proto(&source(every(30)), Duration::from_secs(10)).expect("valid");
        assert_eq!(
            spec.schedule.next_after(at("2026-01-01T00:00:00Z")),
            Some(at("2026-01-01T00:00:30Z"))
        );
        // 09:00 in Berlin is 08:00 UTC in winter and 07:00 UTC in summer.
        let spec = SourceSpec::from_proto(
            &source(cron("0 9 * * *", "Europe/Berlin")),
            Duration::from_secs(10),
        )
        .expect("valid");
        assert_eq!(
            spec.schedule.next_after(at("2026-01-10T12:00:00Z")),
            Some(at("2026-01-11T08:00:00Z"))
        );
        assert_eq!(
            spec.schedule.next_after(at("2026-07-10T12:00:00Z")),
            Some(at("2026-07-11T07:00:00Z"))
        );
        let never = SourceSpec::from_proto(&source(None), Duration::from_secs(10)).expect("valid");
        assert_eq!(never.schedule.next_after(Utc::now()), None);
        assert_eq!(never.deadline, DEFAULT_DEADLINE);
    }

    #[test]
    fn jitter_is_spread_and_stable() {
        let spec = SourceSpec::from_proto(
            &pb::Source {
                jitter: Some(prost_types::Duration {
                    seconds: 5,
                    nanos: 0,
                }),
                ..source(every(60))
            },
            Duration::from_secs(10),
        )
        .expect("valid");
        let tick = Utc::now();
        assert_eq!(spec.jitter_for(tick), spec.jitter_for(tick));
        let spread: std::collections::HashSet<u128> = (0..50)
            .map(|i| {
                spec.jitter_for(tick + chrono::Duration::seconds(60 * i))
                    .as_millis()
            })
            .collect();
        assert!(spread.len() > 40, "spread out: {}", spread.len());
        assert!(spread.iter().all(|ms| *ms < 5000));
    }
}
