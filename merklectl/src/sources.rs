//! The Scheduler at a terminal: `sources`, `source add|rm`, `build` (trigger and follow with a
//! progress bar), `builds`, and the build lines `up --watch` prints. Tables by default,
//! `--json` for scripts; `--addr` defaults to the local stack's Scheduler.

use std::{io::IsTerminal as _, time::Duration};

use anyhow::Context as _;
use merkle_proto::{
    common::v1::{BuildPhase, ChangeType},
    dbsync::v1::{DiffSnapshotsRequest, db_sync_service_client::DbSyncServiceClient},
    scheduler::v1::{
        Build, BuildState, CreateSourceRequest, CronSchedule, DeleteSourceRequest, FleetMode,
        ListBuildsRequest, ListSourcesRequest, Source, TriggerBuildRequest, WatchBuildRequest,
        scheduler_service_client::SchedulerServiceClient, source::Schedule,
    },
};
use merkle_shared::client::Channel;
use serde_json::json;

use crate::remote::{call_failed, connect};

/// The local stack's Scheduler.
pub const DEFAULT_ADDR: &str = "http://127.0.0.1:50051";

/// Where the Scheduler is.
#[derive(Debug, Clone, clap::Args)]
pub struct SchedulerAddr {
    /// The Scheduler's address (default: the local stack's).
    #[arg(long = "addr", env = "SCHEDULER_ADDR", default_value = DEFAULT_ADDR, global = true)]
    pub addr: String,
}

impl SchedulerAddr {
    pub fn client(&self) -> anyhow::Result<SchedulerServiceClient<Channel>> {
        Ok(SchedulerServiceClient::new(connect(&self.addr)?))
    }

    pub fn failed(&self) -> impl FnOnce(tonic::Status) -> anyhow::Error {
        call_failed("Scheduler", &self.addr)
    }
}

pub(crate) fn time(t: Option<prost_types::Timestamp>) -> String {
    t.and_then(|t| std::time::SystemTime::try_from(t).ok())
        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
        .unwrap_or_else(|| "-".into())
}

fn schedule(source: &Source) -> String {
    match &source.schedule {
        Some(Schedule::Interval(d)) => format!(
            "every {}",
            humantime::format_duration(Duration::new(d.seconds.max(0) as u64, 0))
        ),
        Some(Schedule::Cron(c)) if c.time_zone.is_empty() => format!("cron {}", c.expression),
        Some(Schedule::Cron(c)) => format!("cron {} {}", c.expression, c.time_zone),
        None => "on demand".into(),
    }
}

fn state_name(state: i32) -> &'static str {
    BuildState::try_from(state)
        .map(|s| s.as_str_name().trim_start_matches("BUILD_STATE_"))
        .unwrap_or("UNKNOWN")
}

fn build_json(b: &Build) -> serde_json::Value {
    let stats = b.stats.unwrap_or_default();
    json!({
        "build_id": b.build_id, "source": b.source, "state": state_name(b.state),
        "create_time": time(b.create_time), "start_time": time(b.start_time), "end_time": time(b.end_time),
        "root_hash": b.root_hash, "previous_root_hash": b.previous_root_hash, "snapshot_id": b.snapshot_id,
        "file_count": stats.file_count, "total_bytes": stats.total_bytes,
        "error_message": b.error_message, "trace_id": b.trace_id, "missed_ticks": b.missed_ticks,
        "parent_build_id": b.parent_build_id, "node": b.node,
    })
}

/// `merklectl sources`.
#[derive(Debug, Clone, clap::Args)]
pub struct SourcesArgs {
    #[command(flatten)]
    pub scheduler: SchedulerAddr,
    #[arg(long)]
    pub json: bool,
}

pub async fn sources(args: SourcesArgs) -> anyhow::Result<()> {
    let mut client = args.scheduler.client()?;
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_sources(ListSourcesRequest {
                page_size: 1000,
                page_token,
            })
            .await
            .map_err(args.scheduler.failed())?
            .into_inner();
        all.extend(page.sources);
        page_token = page.next_page_token;
        if page_token.is_empty() {
            break;
        }
    }
    if args.json {
        for s in &all {
            println!(
                "{}",
                json!({ "name": s.name, "path": s.path, "schedule": schedule(s), "enabled": s.enabled,
                        "next_build_time": time(s.next_build_time), "consecutive_failures": s.consecutive_failures })
            );
        }
        return Ok(());
    }
    println!(
        "{:<24} {:<22} {:<8} {:<21} {:>8}  PATH",
        "NAME", "SCHEDULE", "ENABLED", "NEXT BUILD", "FAILURES"
    );
    for s in &all {
        println!(
            "{:<24} {:<22} {:<8} {:<21} {:>8}  {}",
            s.name,
            schedule(s),
            if s.enabled { "yes" } else { "no" },
            time(s.next_build_time),
            s.consecutive_failures,
            s.path
        );
    }
    Ok(())
}

/// `merklectl source`.
#[derive(Debug, Clone, clap::Args)]
pub struct SourceArgs {
    #[command(subcommand)]
    pub command: SourceCommand,
    #[command(flatten)]
    pub scheduler: SchedulerAddr,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum SourceCommand {
    /// Register a directory to snapshot.
    Add(AddArgs),
    /// Remove a source (its running build is cancelled; its snapshots stay in DbSync).
    Rm {
        /// The source's name.
        name: String,
    },
}

/// `merklectl source add`.
#[derive(Debug, Clone, clap::Args)]
pub struct AddArgs {
    /// The source's name: a-z, 0-9, -, _ and . (at most 128).
    pub name: String,
    /// The directory (it must lie under one of TreeBuilder's allowed roots).
    pub path: String,
    /// Build every interval, e.g. 30s, 5m, 1h.
    #[arg(long, value_name = "INTERVAL", conflicts_with = "cron")]
    pub every: Option<String>,
    /// Build on a cron schedule (five fields), e.g. "0 3 * * *".
    #[arg(long)]
    pub cron: Option<String>,
    /// The cron schedule's IANA time zone, e.g. Europe/Berlin (default UTC).
    #[arg(long, requires = "cron", default_value = "")]
    pub tz: String,
    /// Leave out paths matching this gitignore pattern (repeatable).
    #[arg(long = "exclude", value_name = "PATTERN")]
    pub exclude: Vec<String>,
    /// Register it without scheduled builds (TriggerBuild still works).
    #[arg(long)]
    pub disabled: bool,
    /// Build PATH on every ready client node Discovery lists (each node's snapshots stored
    /// as NAME@NODE_ID) instead of on the Scheduler's own TreeBuilder. A relative PATH is
    /// then sent as typed: each node resolves it in its own first allowed root.
    #[arg(long)]
    pub fleet: bool,
    #[arg(long)]
    pub json: bool,
}

/// The Source message `source add` sends.
pub fn source_from(args: &AddArgs) -> anyhow::Result<Source> {
    let schedule = match (&args.every, &args.cron) {
        (Some(every), _) => {
            let d = humantime::parse_duration(every).with_context(|| format!("--every {every}"))?;
            Some(Schedule::Interval(prost_types::Duration::try_from(d)?))
        }
        (None, Some(cron)) => Some(Schedule::Cron(CronSchedule {
            expression: cron.clone(),
            time_zone: args.tz.clone(),
        })),
        (None, None) => None,
    };
    // A local source's path is made absolute here (where the person means it). A fleet
    // source's relative path is each node's own (resolved in its first allowed root), so it
    // is sent as typed.
    let relative = !std::path::Path::new(&args.path).is_absolute();
    let path = if args.fleet && relative {
        args.path.clone()
    } else {
        std::fs::canonicalize(&args.path)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| args.path.clone())
    };
    Ok(Source {
        name: args.name.clone(),
        path,
        exclude_patterns: args.exclude.clone(),
        schedule,
        enabled: !args.disabled,
        fleet_mode: if args.fleet {
            FleetMode::AllClients
        } else {
            FleetMode::Local
        } as i32,
        ..Default::default()
    })
}

pub async fn source(args: SourceArgs) -> anyhow::Result<()> {
    let mut client = args.scheduler.client()?;
    match args.command {
        SourceCommand::Add(add) => {
            let created = client
                .create_source(CreateSourceRequest {
                    source: Some(source_from(&add)?),
                })
                .await
                .map_err(args.scheduler.failed())?
                .into_inner()
                .source
                .unwrap_or_default();
            if add.json {
                println!(
                    "{}",
                    json!({ "name": created.name, "path": created.path, "schedule": schedule(&created),
                                       "next_build_time": time(created.next_build_time) })
                );
            } else {
                println!(
                    "source {} added: {} ({}), next build {}",
                    created.name,
                    created.path,
                    schedule(&created),
                    time(created.next_build_time)
                );
            }
        }
        SourceCommand::Rm { name } => {
            client
                .delete_source(DeleteSourceRequest { name: name.clone() })
                .await
                .map_err(args.scheduler.failed())?;
            println!("source {name} removed (its snapshots stay in DbSync)");
        }
    }
    Ok(())
}

/// `merklectl build`.
#[derive(Debug, Clone, clap::Args)]
pub struct BuildArgs {
    /// The source to build now.
    pub source: String,
    /// Only trigger it; do not follow it.
    #[arg(long)]
    pub no_wait: bool,
    #[command(flatten)]
    pub scheduler: SchedulerAddr,
    #[arg(long)]
    pub json: bool,
}

/// Triggers a build and follows it to its end (a progress bar on a terminal); exits non-zero
/// when it failed or was cancelled.
pub async fn build(args: BuildArgs) -> anyhow::Result<bool> {
    let mut client = args.scheduler.client()?;
    let triggered = client
        .trigger_build(TriggerBuildRequest {
            source: args.source.clone(),
        })
        .await
        .map_err(args.scheduler.failed())?
        .into_inner();
    if args.no_wait {
        println!("{}", triggered.build_id);
        return Ok(true);
    }
    let mut stream = client
        .watch_build(WatchBuildRequest {
            build_id: triggered.build_id.clone(),
        })
        .await
        .map_err(args.scheduler.failed())?
        .into_inner();
    let bar = (!args.json && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(0);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{spinner} {msg:10} [{bar:30}] {pos}/{len} files",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    });
    let mut last = triggered.build.unwrap_or_default();
    while let Some(message) = stream.message().await.map_err(args.scheduler.failed())? {
        let Some(b) = message.build else { continue };
        if let (Some(bar), Some(p)) = (&bar, b.progress) {
            let phase = BuildPhase::try_from(p.phase)
                .map(|p| {
                    p.as_str_name()
                        .trim_start_matches("BUILD_PHASE_")
                        .to_lowercase()
                })
                .unwrap_or_default();
            bar.set_message(phase);
            bar.set_length(p.files_total);
            bar.set_position(p.files_done);
        }
        last = b;
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if args.json {
        println!("{}", build_json(&last));
    } else {
        println!("{}", build_line(&last));
    }
    Ok(matches!(
        BuildState::try_from(last.state),
        Ok(BuildState::SucceededChanged | BuildState::SucceededUnchanged)
    ))
}

/// True once a build ended (skipped ticks included).
pub fn is_done(b: &Build) -> bool {
    !matches!(
        BuildState::try_from(b.state),
        Ok(BuildState::Queued | BuildState::Running | BuildState::Unspecified)
    )
}

/// One line for a finished build: time, short root, outcome, counts, duration.
pub fn build_line(b: &Build) -> String {
    let stats = b.stats.unwrap_or_default();
    let took = match (b.start_time, b.end_time) {
        (Some(s), Some(e)) => {
            let ms = (e.seconds - s.seconds) * 1000 + i64::from(e.nanos - s.nanos) / 1_000_000;
            format!("{:.2}s", ms.max(0) as f64 / 1000.0)
        }
        _ => "-".into(),
    };
    let short = b.root_hash.get(..12).unwrap_or("-");
    let outcome = match BuildState::try_from(b.state) {
        Ok(BuildState::SucceededChanged) => "changed".to_owned(),
        Ok(BuildState::SucceededUnchanged) => "unchanged".to_owned(),
        _ => format!("{} {}", state_name(b.state).to_lowercase(), b.error_message),
    };
    format!(
        "{}  {}  {:<12}  {:<10} {} files, {} bytes, {took}",
        time(b.end_time.or(b.create_time)),
        b.source,
        short,
        outcome,
        stats.file_count,
        stats.total_bytes
    )
}

/// The paths a changed build changed (A/D/M/T lines), from DbSync's diff.
pub async fn changed_paths(db_sync: &str, b: &Build) -> anyhow::Result<Vec<String>> {
    if b.previous_root_hash.is_empty() || b.root_hash.is_empty() {
        return Ok(Vec::new());
    }
    let mut client = DbSyncServiceClient::new(connect(db_sync)?);
    let mut stream = client
        .diff_snapshots(DiffSnapshotsRequest {
            old_root_hash: b.previous_root_hash.clone(),
            new_root_hash: b.root_hash.clone(),
        })
        .await
        .map_err(call_failed("DbSync", db_sync))?
        .into_inner();
    let mut lines = Vec::new();
    while let Some(batch) = stream
        .message()
        .await
        .map_err(call_failed("DbSync", db_sync))?
    {
        for c in batch.changes {
            let letter = match ChangeType::try_from(c.change_type) {
                Ok(ChangeType::Added) => "A",
                Ok(ChangeType::Removed) => "D",
                Ok(ChangeType::Modified) => "M",
                _ => "T",
            };
            lines.push(format!("{letter} {}", c.path));
        }
    }
    Ok(lines)
}

/// `merklectl builds`.
#[derive(Debug, Clone, clap::Args)]
pub struct BuildsArgs {
    /// Only this source's builds.
    pub source: Option<String>,
    /// Most builds to show, newest first (up to 1000).
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
    /// Only the node builds of this fleet build.
    #[arg(long, value_name = "BUILD_ID")]
    pub parent: Option<String>,
    /// Only builds in this state (repeatable): queued, running, succeeded_changed,
    /// succeeded_unchanged, failed, cancelled.
    #[arg(long = "state", value_name = "STATE", value_parser = parse_state)]
    pub states: Vec<BuildState>,
    #[command(flatten)]
    pub scheduler: SchedulerAddr,
    #[arg(long)]
    pub json: bool,
}

/// A build state by its short name (`failed`) or its contract name (`BUILD_STATE_FAILED`).
fn parse_state(text: &str) -> Result<BuildState, String> {
    let upper = text.to_ascii_uppercase().replace('-', "_");
    let name = if upper.starts_with("BUILD_STATE_") {
        upper
    } else {
        format!("BUILD_STATE_{upper}")
    };
    BuildState::from_str_name(&name)
        .filter(|s| *s != BuildState::Unspecified)
        .ok_or_else(|| {
            format!(
                "{text:?} is not a build state (queued, running, succeeded_changed, \
                 succeeded_unchanged, failed, cancelled)"
            )
        })
}

pub async fn builds(args: BuildsArgs) -> anyhow::Result<()> {
    let mut client = args.scheduler.client()?;
    let page = client
        .list_builds(ListBuildsRequest {
            source: args.source.clone().unwrap_or_default(),
            page_size: args.limit,
            page_token: String::new(),
            parent_build_id: args.parent.clone().unwrap_or_default(),
            states: args.states.iter().map(|s| *s as i32).collect(),
        })
        .await
        .map_err(args.scheduler.failed())?
        .into_inner();
    if args.json {
        for b in &page.builds {
            println!("{}", build_json(b));
        }
        return Ok(());
    }
    println!(
        "{:<36}  {:<24} {:<20} {:<21} {:<12}  DETAIL",
        "BUILD", "SOURCE", "STATE", "CREATED", "ROOT"
    );
    for b in &page.builds {
        // A fleet node's build shows as `source@node`, the name its snapshots are stored under.
        let source = if b.node.is_empty() {
            b.source.clone()
        } else {
            format!("{}@{}", b.source, b.node)
        };
        println!(
            "{:<36}  {:<24} {:<20} {:<21} {:<12}  {}",
            b.build_id,
            source,
            state_name(b.state),
            time(b.create_time),
            b.root_hash.get(..12).unwrap_or("-"),
            b.error_message
        );
    }
    Ok(())
}
