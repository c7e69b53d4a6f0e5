//! `merklectl drift`: which nodes of a fleet source (or which of several sources) are not like
//! the others, and in what, from DbSync's GetDrift. Exits 1 when some differ, like diff(1).

use merkle_proto::dbsync::v1::{DriftGroup, GetDriftRequest, GetDriftResponse};
use merkle_shared::convert::change_from_proto;
use serde_json::json;

use crate::{local, remote::DbSyncAddr};

/// Members named on a group's table line; the rest are counted.
const NAMED_MEMBERS: usize = 6;

/// `merklectl drift`.
#[derive(Debug, Clone, clap::Args)]
pub struct DriftArgs {
    /// A fleet source (its nodes' latest snapshots are compared), or two or more sources.
    #[arg(required = true, value_name = "SOURCE")]
    pub sources: Vec<String>,
    /// Most outlier groups to show, most members first.
    #[arg(long, default_value_t = 20)]
    pub groups: usize,
    /// Most differing paths to show per group.
    #[arg(long, default_value_t = 20)]
    pub paths: u32,
    #[command(flatten)]
    pub db_sync: DbSyncAddr,
    /// One JSON object per group (the baseline first) instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Prints the drift; returns whether any source differs from the baseline.
pub async fn drift(args: DriftArgs) -> anyhow::Result<bool> {
    let mut client = args.db_sync.client()?;
    let question = match &args.sources[..] {
        [one] => GetDriftRequest {
            fleet_source: one.clone(),
            ..Default::default()
        },
        many => GetDriftRequest {
            sources: many.to_vec(),
            ..Default::default()
        },
    };
    let mut first: Option<GetDriftResponse> = None;
    let mut outliers: Vec<DriftGroup> = Vec::new();
    let mut token = String::new();
    while outliers.len() < args.groups {
        let page = client
            .get_drift(GetDriftRequest {
                page_size: (args.groups - outliers.len()).min(100) as u32,
                max_changes: args.paths.max(1),
                page_token: token,
                ..question.clone()
            })
            .await
            .map_err(args.db_sync.failed())?
            .into_inner();
        outliers.extend(page.outliers.iter().cloned());
        token = page.next_page_token.clone();
        first.get_or_insert(page);
        if token.is_empty() {
            break;
        }
    }
    let Some(summary) = first else {
        return Ok(false);
    };
    let baseline = summary.baseline.clone().unwrap_or_default();
    if args.json {
        println!("{}", group_json(&baseline, true)?);
        for group in &outliers {
            println!("{}", group_json(group, false)?);
        }
    } else {
        print_table(&args, &summary, &baseline, &outliers)?;
    }
    Ok(summary.outlier_count > 0)
}

fn member_names(group: &DriftGroup) -> Vec<&str> {
    group
        .members
        .iter()
        .map(|m| {
            if m.node.is_empty() {
                m.source.as_str()
            } else {
                m.node.as_str()
            }
        })
        .collect()
}

fn print_table(
    args: &DriftArgs,
    summary: &GetDriftResponse,
    baseline: &DriftGroup,
    outliers: &[DriftGroup],
) -> anyhow::Result<()> {
    let what = match &args.sources[..] {
        [fleet] => format!("{fleet}: {} nodes", summary.source_count),
        _ => format!("{} sources", summary.source_count),
    };
    println!(
        "{what}, {} roots; {} differ from the most common root",
        summary.outlier_group_count + 1,
        summary.outlier_count
    );
    println!("{:<16}  {:>7}  {:>8}  MEMBERS", "ROOT", "COUNT", "PATHS");
    let line = |group: &DriftGroup, paths: String| {
        let names = member_names(group);
        let mut members = names
            .iter()
            .take(NAMED_MEMBERS)
            .copied()
            .collect::<Vec<_>>()
            .join(", ");
        let unnamed = group.member_count as usize - names.len().min(NAMED_MEMBERS);
        if unnamed > 0 {
            members.push_str(&format!(" (+{unnamed} more)"));
        }
        println!(
            "{:<16}  {:>7}  {:>8}  {members}",
            &group.root_hash[..16.min(group.root_hash.len())],
            group.member_count,
            paths
        );
    };
    line(baseline, "baseline".into());
    for group in outliers {
        if !group.incomparable.is_empty() {
            line(group, "-".into());
            println!("    not compared: {}", group.incomparable);
            continue;
        }
        line(group, group.change_count.to_string());
        for change in &group.changes {
            let change = change_from_proto(change)
                .map_err(|e| anyhow::anyhow!("DbSync sent a bad change: {e}"))?;
            let (letter, _) = local::change_names(change.change);
            println!("    {letter} {}", String::from_utf8_lossy(&change.path));
        }
        let unlisted = group
            .change_count
            .saturating_sub(group.changes.len() as u64);
        if unlisted > 0 {
            println!("    ... {unlisted} more paths (--paths)");
        }
    }
    let unshown = summary
        .outlier_group_count
        .saturating_sub(outliers.len() as u64);
    if unshown > 0 {
        println!("... {unshown} more roots (--groups)");
    }
    Ok(())
}

fn group_json(group: &DriftGroup, baseline: bool) -> anyhow::Result<serde_json::Value> {
    let changes = group
        .changes
        .iter()
        .map(|c| {
            change_from_proto(c)
                .map(|c| local::change_json(&c))
                .map_err(|e| anyhow::anyhow!("DbSync sent a bad change: {e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(json!({
        "root_hash": group.root_hash,
        "baseline": baseline,
        "member_count": group.member_count,
        "members": group.members.iter().map(|m| json!({
            "source": m.source,
            "node": m.node,
            "sequence": m.sequence,
        })).collect::<Vec<_>>(),
        "change_count": group.change_count,
        "changes": changes,
        "incomparable": group.incomparable,
    }))
}
