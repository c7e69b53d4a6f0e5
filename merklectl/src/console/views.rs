//! The console's pages as maud templates: every value is escaped by maud; the only raw text is
//! the stylesheet and the live-progress script below, both fixed.

use maud::{DOCTYPE, Markup, PreEscaped, html};
use merkle_proto::{
    cache::v1::GetStatsResponse,
    common::v1::{BuildPhase, ChangeType, EntryKind, PathChange},
    dbsync::v1::{
        ChangeActivity, DriftGroup, GetChangeActivityResponse, GetDriftResponse,
        GetLogCheckpointResponse, ListDirectoryResponse, Snapshot,
    },
    discovery::v1::ListClientsResponse,
    scheduler::v1::{Build, BuildState, Source},
};

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:0 2em 2em;color:#222}\
nav{padding:.8em 0;border-bottom:1px solid #ddd;margin-bottom:1em}nav a{margin-right:1.2em}\
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{padding:.25em .8em;border-bottom:1px solid #eee;text-align:left}\
code{font-size:12px}.ok{color:#176f2c}.bad{color:#b00020}.muted{color:#777}\
.cards{display:flex;gap:1em;margin-bottom:1em}.card{border:1px solid #ddd;border-radius:6px;padding:.6em 1em}\
.bar{display:inline-block;background:#4a7bd0;height:10px;vertical-align:middle}.spark rect.some{fill:#4a7bd0}.spark rect.none{fill:#ccc}pre{background:#f6f6f6;padding:.8em}";

/// Follows a build over server-sent events and updates `#live` in place, no reload.
const LIVE_SCRIPT: &str = r#"
const live = document.getElementById('live');
if (live) {
  const events = new EventSource('/builds/' + encodeURIComponent(live.dataset.build) + '/events');
  events.addEventListener('build', (e) => {
    const b = JSON.parse(e.data);
    live.querySelector('.state').textContent = b.state;
    live.querySelector('.phase').textContent = b.phase;
    live.querySelector('.files').textContent = b.files_done + ' of ' + b.files_total + ' files';
    const bar = live.querySelector('progress');
    bar.max = Math.max(b.files_total, 1); bar.value = b.files_done;
    if (b.done) { live.querySelector('.root').textContent = b.root_hash; events.close(); }
  });
  events.addEventListener('failed', (e) => { live.querySelector('.state').textContent = 'watch failed: ' + e.data; events.close(); });
}
"#;

/// A path segment or query value, percent-encoded.
pub fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn page(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { (title) " · Merkle Mesh" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                nav { a href="/" { "Sources" } a href="/log" { "History" } }
                h1 { (title) }
                (body)
                script { (PreEscaped(LIVE_SCRIPT)) }
            }
        }
    }
}

pub fn error(message: &str) -> Markup {
    page("Error", html! { p.bad { (message) } })
}

fn time(t: Option<prost_types::Timestamp>) -> String {
    crate::sources::time(t)
}

/// "1 group", "2 groups".
fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn state(state: i32) -> &'static str {
    BuildState::try_from(state)
        .map(|s| s.as_str_name().trim_start_matches("BUILD_STATE_"))
        .unwrap_or("UNKNOWN")
}

fn state_class(state: i32) -> &'static str {
    match BuildState::try_from(state) {
        Ok(BuildState::SucceededChanged | BuildState::SucceededUnchanged) => "ok",
        Ok(BuildState::Failed) => "bad",
        _ => "muted",
    }
}

/// What the live view needs of a build, as the `build` event's JSON.
pub fn build_event_json(b: &Build) -> serde_json::Value {
    let progress = b.progress.unwrap_or_default();
    let done = !matches!(
        BuildState::try_from(b.state),
        Ok(BuildState::Queued | BuildState::Running | BuildState::Unspecified)
    );
    serde_json::json!({
        "state": state(b.state),
        "phase": BuildPhase::try_from(progress.phase)
            .map(|p| p.as_str_name().trim_start_matches("BUILD_PHASE_"))
            .unwrap_or("UNKNOWN"),
        "files_done": progress.files_done,
        "files_total": progress.files_total,
        "root_hash": b.root_hash,
        "done": done,
    })
}

pub fn overview(
    sources: &[Source],
    last_builds: &[Option<Build>],
    next_page: &str,
    activity: Option<&GetChangeActivityResponse>,
    stats: Option<&GetStatsResponse>,
    fleet: Option<&ListClientsResponse>,
) -> Markup {
    let activity_of = |name: &str| {
        activity.and_then(|all| {
            all.sources
                .iter()
                .find(|a| a.source == name)
                .map(|a| (all, a))
        })
    };
    let (hits, misses) = stats.map_or((0, 0), |s| {
        s.namespaces
            .iter()
            .fold((0, 0), |(h, m), n| (h + n.hits, m + n.misses))
    });
    page(
        "Sources",
        html! {
            div.cards {
                div.card id="cache" {
                    "Cache hit rate: "
                    @match stats {
                        Some(s) if hits + misses > 0 => {
                            strong { (format!("{:.1}%", 100.0 * hits as f64 / (hits + misses) as f64)) }
                            @if !s.redis_available { " " span.bad { "(Redis down: reading PostgreSQL)" } }
                        }
                        Some(_) => span.muted { "no lookups yet" },
                        None => span.bad { "the Cache service did not answer" },
                    }
                }
                div.card id="fleet" {
                    "Fleet nodes: "
                    @match fleet {
                        Some(f) => {
                            @let ready = f.clients.iter().filter(|c| c.ready).count();
                            strong { (ready) " ready" } ", " (f.clients.len() - ready) " down"
                        }
                        None => span.muted { "Discovery did not answer" },
                    }
                }
            }
            table id="sources" {
                thead { tr { th { "source" } th { "path" } th { "last build" } th { "state" } th { "files" } th { "last change" } th { "changes per day" } th { "next build" } } }
                tbody {
                    @for (s, b) in sources.iter().zip(last_builds) {
                        tr {
                            td { a href=(format!("/sources/{}", encode(&s.name))) { (s.name) } }
                            td { code { (s.path) } }
                            @match b {
                                Some(b) => {
                                    td { (time(b.end_time.or(b.create_time))) }
                                    td class=(state_class(b.state)) { (state(b.state)) }
                                    td { (b.stats.map_or(0, |s| s.file_count)) }
                                }
                                None => { td.muted { "never built" } td {} td {} }
                            }
                            @match activity_of(&s.name) {
                                Some((all, a)) => {
                                    td.changed { (a.last_change_time.map_or("never".to_owned(), |t| time(Some(t)))) }
                                    td { (sparkline(all, a)) }
                                }
                                None => { td.muted { "DbSync did not answer" } td {} }
                            }
                            td { (time(s.next_build_time)) }
                        }
                    }
                }
            }
            @if sources.is_empty() { p.muted { "No sources yet: merklectl source add NAME PATH" } }
            @if !next_page.is_empty() { a href=(format!("/?page={}", encode(next_page))) { "Next page" } }
        },
    )
}

/// The day (`YYYY-MM-DD`, UTC) `i` days after the activity's first.
fn day_of(activity: &GetChangeActivityResponse, i: usize) -> String {
    let first = activity.first_day.unwrap_or_default();
    let day = prost_types::Timestamp {
        seconds: first.seconds + 86_400 * i as i64,
        nanos: 0,
    };
    time(Some(day)).chars().take(10).collect()
}

/// A source's changes per day as a small inline bar chart, each bar titled with its day.
fn sparkline(activity: &GetChangeActivityResponse, a: &ChangeActivity) -> Markup {
    let most = a.changes_per_day.iter().copied().max().unwrap_or(0).max(1);
    let width = 5 * a.changes_per_day.len();
    html! {
        svg.spark width=(width) height="16" role="img" aria-label=(format!("{} changes in {} days", a.changes_per_day.iter().sum::<u32>(), a.changes_per_day.len())) {
            @for (i, n) in a.changes_per_day.iter().enumerate() {
                @let h = if *n == 0 { 1 } else { 3 + 13 * n / most };
                rect x=(5 * i) y=(16 - h) width="4" height=(h) class=(if *n == 0 { "none" } else { "some" }) {
                    title { (day_of(activity, i)) ": " (n) }
                }
            }
        }
    }
}

/// One source's changes per day (DbSync's change activity), newest day last, as bars.
fn changes_per_day(activity: &GetChangeActivityResponse) -> Markup {
    let Some(a) = activity.sources.first() else {
        return html! {};
    };
    let most = a.changes_per_day.iter().copied().max().unwrap_or(0).max(1);
    html! {
        table id="per-day" {
            @for (i, n) in a.changes_per_day.iter().enumerate() {
                tr { td { (day_of(activity, i)) } td { span.bar style=(format!("width:{}px", 4 + 200 * n / most)) {} " " (n) } }
            }
        }
    }
}

pub fn source(
    source: &Source,
    builds: &[Build],
    snapshots: &[Snapshot],
    activity: Option<&GetChangeActivityResponse>,
    live: Option<&str>,
    can_trigger: bool,
) -> Markup {
    let name = encode(&source.name);
    page(
        &source.name,
        html! {
            p { "Path " code { (source.path) } }
            @if can_trigger {
                form method="post" action=(format!("/sources/{name}/trigger")) {
                    button id="trigger" type="submit" { "Trigger build" }
                }
            }
            @if let Some(id) = live {
                div id="live" data-build=(id) {
                    h2 { "Build " code { (id) } }
                    p { span.state { "…" } " · " span.phase {} " · " span.files {} }
                    progress max="1" value="0" {}
                    p { "Root " code.root {} }
                }
            }
            h2 { "Snapshots" }
            @if snapshots.is_empty() { p.muted { "None stored yet." } }
            table id="snapshots" {
                @for (i, s) in snapshots.iter().enumerate() {
                    tr {
                        td { (s.sequence) }
                        td { (time(s.create_time)) }
                        td { code { (s.root_hash.get(..16).unwrap_or(&s.root_hash)) } }
                        td { (s.stats.map_or(0, |st| st.file_count)) " files" }
                        td { a.browse href=(format!("/sources/{name}/tree?sequence={}", s.sequence)) { "browse" } }
                        td {
                            @if let Some(older) = snapshots.get(i + 1) {
                                a.diff href=(format!("/sources/{name}/diff?from={}&to={}", older.root_hash, s.root_hash)) {
                                    "diff with " (older.sequence)
                                }
                            }
                        }
                    }
                }
            }
            @if let Some(activity) = activity.filter(|_| !snapshots.is_empty()) {
                h2 { "Changes per day (" (activity.sources.first().map_or(0, |a| a.changes_per_day.len())) " days, UTC)" }
                (changes_per_day(activity))
            }
            h2 { "Builds" }
            table id="builds" {
                @for b in builds {
                    tr {
                        td { code { (b.build_id) } }
                        td class=(state_class(b.state)) { (state(b.state)) }
                        td { (time(b.create_time)) }
                        td { (b.node) }
                        td.bad { (b.error_message) }
                    }
                }
            }
            p { a href=(format!("/drift/{name}")) { "Fleet drift of this source" } }
        },
    )
}

fn change_name(change: &PathChange) -> &'static str {
    ChangeType::try_from(change.change_type)
        .map(|c| c.as_str_name().trim_start_matches("CHANGE_TYPE_"))
        .unwrap_or("UNKNOWN")
}

fn changes_table(changes: &[PathChange]) -> Markup {
    html! {
        table.changes {
            @for c in changes {
                tr { td { (change_name(c)) } td { code { (c.path) } } }
            }
        }
    }
}

pub fn diff(name: &str, from: &str, to: &str, changes: &[PathChange], more: bool) -> Markup {
    page(
        &format!("{name}: what changed"),
        html! {
            p { "From root " code { (from) } br; "to root " code { (to) } }
            p id="change-count" { (changes.len()) @if more { "+" } " changed paths" }
            div id="changes" { (changes_table(changes)) }
            @if more { p.muted { "The first 1,000 are shown: merklectl diff --stored lists them all." } }
        },
    )
}

fn members(group: &DriftGroup) -> Markup {
    html! {
        @for m in &group.members {
            span.member { (if m.node.is_empty() { &m.source } else { &m.node }) } " "
        }
        @if group.member_count as usize > group.members.len() {
            span.muted { "and " (group.member_count as usize - group.members.len()) " more" }
        }
    }
}

pub fn drift(name: &str, drift: &GetDriftResponse) -> Markup {
    page(
        &format!("{name}: fleet drift"),
        html! {
            p id="drift-summary" {
                (drift.source_count) " members, " (drift.outlier_count) " differ from the most common tree in "
                (plural(drift.outlier_group_count, "group", "groups"))
            }
            @if let Some(b) = &drift.baseline {
                h2 { "The most common tree (" (b.member_count) ")" }
                p { code { (b.root_hash) } }
                p { (members(b)) }
            }
            @for (i, g) in drift.outliers.iter().enumerate() {
                details.outlier open[i == 0] {
                    summary { (g.member_count) " differ: " (members(g)) }
                    p { "Root " code { (g.root_hash) } }
                    @if !g.incomparable.is_empty() { p.muted { (g.incomparable) } }
                    p { (plural(g.change_count, "path differs", "paths differ")) " from the most common tree:" }
                    (changes_table(&g.changes))
                }
            }
            @if drift.outliers.is_empty() { p.ok id="no-drift" { "Every member has the same tree." } }
            @if !drift.next_page_token.is_empty() {
                a href=(format!("/drift/{}?page={}", encode(name), encode(&drift.next_page_token))) { "More outliers" }
            }
        },
    )
}

pub fn log(c: &GetLogCheckpointResponse) -> Markup {
    page(
        "History: the transparency log",
        html! {
            p id="log-size" { "The log holds " strong { (c.size) } " records (newest checkpoint, " (time(c.create_time)) ")." }
            p { "Root " code { (c.root_hash) } }
            p { "Checkpoint key " code id="verifier-key" { (c.verifier_key) } }
            p id="witnesses" {
                @if c.cosignatures == 0 && c.witnessed { "No witnesses are configured." }
                @else {
                    (c.cosignatures) " witness cosignatures"
                    @if c.witnessed { span.ok { " — the witness policy is met" } } @else { span.bad { " — the witness policy is not met yet" } }
                }
            }
            h2 { "The signed checkpoint" }
            pre id="checkpoint" { (c.note) }
            p.muted { "Check it on your machine, against the key you pinned: merklectl log verify --verifier-key KEY" }
        },
    )
}

/// `<source>-<sequence>-<entry name>.proof`, the name a downloaded proof bundle is saved as
/// (only characters safe in a file name and a header).
pub fn proof_file_name(source: &str, sequence: u64, path: &str) -> String {
    let entry = path.rsplit('/').next().unwrap_or_default();
    let safe = |text: &str| -> String {
        text.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    format!("{}-{sequence}-{}.proof", safe(source), safe(entry))
}

/// `a/b` under `dir`.
fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}

/// A directory of a stored tree: subdirectories a click away, a proof bundle per entry.
pub fn tree(snapshot: &Snapshot, path: &str, dir: &ListDirectoryResponse) -> Markup {
    let name = encode(&snapshot.source);
    let seq = snapshot.sequence;
    let at = |p: &str| format!("/sources/{name}/tree?sequence={seq}&path={}", encode(p));
    // The path as links, the root first.
    let mut crumbs = vec![(snapshot.source.clone(), String::new())];
    let mut so_far = String::new();
    for part in path.split('/').filter(|p| !p.is_empty()) {
        so_far = join(&so_far, part);
        crumbs.push((part.to_owned(), so_far.clone()));
    }
    page(
        &format!(
            "{}@{seq}: {}",
            snapshot.source,
            if path.is_empty() { "/" } else { path }
        ),
        html! {
            p id="crumbs" {
                @for (i, (label, p)) in crumbs.iter().enumerate() {
                    @if i > 0 { " / " }
                    a href=(at(p)) { (label) }
                }
            }
            p { "Snapshot " (seq) " of " (time(snapshot.create_time)) ", root " code { (snapshot.root_hash) } br;
                "This directory " code { (dir.directory_hash) } }
            table id="entries" {
                thead { tr { th { "name" } th { "kind" } th { "size" } th { "hash" } th {} } }
                tbody {
                    @for e in &dir.entries {
                        @let kind = EntryKind::try_from(e.kind).unwrap_or(EntryKind::Unspecified);
                        @let entry = join(path, &e.name);
                        tr.entry {
                            @if !e.raw_name.is_empty() {
                                // Not UTF-8: shown lossily; the CLI addresses it by its bytes.
                                td { code { (e.name) } " " span.muted { "(not UTF-8)" } }
                            } @else if kind == EntryKind::Directory {
                                td { a.dir href=(at(&entry)) { (e.name) "/" } }
                            } @else {
                                td { code { (e.name) } }
                            }
                            td { (kind.as_str_name().trim_start_matches("ENTRY_KIND_").to_lowercase()) }
                            td { @if kind != EntryKind::Directory { (e.size) } }
                            td { code { (e.hash.get(..16).unwrap_or(&e.hash)) } }
                            td {
                                @if e.raw_name.is_empty() {
                                    a.proof href=(format!("/sources/{name}/proof?sequence={seq}&path={}", encode(&entry))) { "proof" }
                                }
                            }
                        }
                    }
                }
            }
            @if dir.entries.is_empty() { p.muted { "An empty directory." } }
            @if !dir.next_page_token.is_empty() {
                a href=(format!("{}&page={}", at(path), encode(&dir.next_page_token))) { "More entries" }
            }
            p.muted { "A proof bundle proves one entry of this snapshot offline, with only the log's key: merklectl verify-proof FILE --verifier-key KEY" }
        },
    )
}
