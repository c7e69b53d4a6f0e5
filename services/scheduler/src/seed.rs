//! Sources declared in a file (`SOURCES_FILE`), created or updated at start: the file is the
//! truth for the sources it names (never duplicated), and sources it does not name are left
//! alone. A JSON array of objects:
//!
//! ```json
//! [{"name": "docs", "path": "/srv/docs", "every": "5m", "exclude": ["*.log"]},
//!  {"name": "etc", "path": "/etc", "cron": "0 3 * * *", "time_zone": "Europe/Berlin",
//!   "profile": "full", "retention": {"keep_last": 30}}]
//! ```

use std::{path::Path, time::Duration};

use chrono::Utc;
use merkle_proto::{
    common::v1::{Profile, RetentionPolicy},
    scheduler::v1::{ConcurrencyPolicy, CronSchedule, Source, source::Schedule},
};
use merkle_shared::postgres::PgPool;
use serde::Deserialize;

use crate::{calendar::next_run, error::Error, spec::SourceSpec, store};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Declared {
    name: String,
    path: String,
    #[serde(default)]
    exclude: Vec<String>,
    every: Option<String>,
    cron: Option<String>,
    #[serde(default)]
    time_zone: String,
    jitter: Option<String>,
    #[serde(default = "enabled")]
    enabled: bool,
    deadline: Option<String>,
    #[serde(default)]
    replace: bool,
    #[serde(default)]
    profile: Option<String>,
    retention: Option<DeclaredRetention>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeclaredRetention {
    #[serde(default)]
    keep_last: u32,
    keep_within: Option<String>,
}

fn enabled() -> bool {
    true
}

fn duration(field: &str, text: &Option<String>) -> Result<Option<prost_types::Duration>, String> {
    text.as_deref()
        .map(|t| {
            humantime::parse_duration(t)
                .map_err(|e| format!("{field}: {t:?}: {e}"))
                .and_then(|d| {
                    prost_types::Duration::try_from(d).map_err(|e| format!("{field}: {e}"))
                })
        })
        .transpose()
}

impl Declared {
    fn to_source(&self) -> Result<Source, String> {
        let schedule = match (&self.every, &self.cron) {
            (Some(_), Some(_)) => return Err("set `every` or `cron`, not both".into()),
            (Some(_), None) => duration("every", &self.every)?.map(Schedule::Interval),
            (None, Some(expression)) => Some(Schedule::Cron(CronSchedule {
                expression: expression.clone(),
                time_zone: self.time_zone.clone(),
            })),
            (None, None) => None,
        };
        let profile = match self.profile.as_deref() {
            None | Some("content") => Profile::Content,
            Some("full") => Profile::Full,
            Some(other) => return Err(format!("profile: {other:?} is not content or full")),
        };
        Ok(Source {
            name: self.name.clone(),
            path: self.path.clone(),
            exclude_patterns: self.exclude.clone(),
            schedule,
            jitter: duration("jitter", &self.jitter)?,
            enabled: self.enabled,
            deadline: duration("deadline", &self.deadline)?,
            concurrency_policy: if self.replace {
                ConcurrencyPolicy::Replace
            } else {
                ConcurrencyPolicy::Forbid
            } as i32,
            profile: profile as i32,
            retention: match &self.retention {
                Some(r) => Some(RetentionPolicy {
                    keep_last: r.keep_last,
                    keep_within: duration("retention.keep_within", &r.keep_within)?,
                }),
                None => None,
            },
            ..Default::default()
        })
    }
}

/// Creates or updates every source the file declares; the first bad entry stops the start,
/// named with the file and the rule.
pub async fn seed(pool: &PgPool, file: &Path, min_interval: Duration) -> Result<usize, Error> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| Error::FailedPrecondition(format!("SOURCES_FILE {}: {e}", file.display())))?;
    let declared: Vec<Declared> = serde_json::from_str(&text).map_err(|e| {
        Error::FailedPrecondition(format!(
            "SOURCES_FILE {}: not a JSON array of sources: {e}",
            file.display()
        ))
    })?;
    let mut changed = 0;
    for (i, entry) in declared.iter().enumerate() {
        let bad = |rule: String| {
            Error::FailedPrecondition(format!("SOURCES_FILE {} [{i}]: {rule}", file.display()))
        };
        let spec = SourceSpec::from_proto(&entry.to_source().map_err(bad)?, min_interval)
            .map_err(|e| bad(e.to_string()))?;
        let conn = pool.get().await?;
        let existing = store::get_source(&*conn, spec.name.as_str()).await?;
        drop(conn);
        match existing {
            None => {
                let tick = match &spec.schedule {
                    crate::spec::Schedule::Every(_) => Some(Utc::now()),
                    other => other.next_after(Utc::now()),
                };
                store::insert_source(pool, &spec.message, next_run(&spec, tick)).await?;
                changed += 1;
            }
            Some(stored) => {
                let mut current = stored.source.clone();
                current.create_time = None;
                current.update_time = None;
                current.next_build_time = None;
                current.consecutive_failures = 0;
                if current != spec.message {
                    let tick = match &spec.schedule {
                        crate::spec::Schedule::Every(interval) => Some(Utc::now() + *interval),
                        other => other.next_after(Utc::now()),
                    };
                    store::update_source(pool, &spec.message, Some(next_run(&spec, tick))).await?;
                    changed += 1;
                }
            }
        }
        if spec.retention.is_some() {
            let actor = format!("SOURCES_FILE {}", file.display());
            store::set_retention_set_by(pool, spec.name.as_str(), &actor).await?;
        }
    }
    Ok(changed)
}
