//! Discovery at a terminal: `merklectl clients [--refresh | --force-refresh] [--json]`, a table
//! of the fleet's clients with where the list came from and what the refresh found.

use merkle_proto::discovery::v1::{
    CacheState, ListClientsRequest, discovery_service_client::DiscoveryServiceClient,
};
use serde_json::json;

use crate::{
    remote::{call_failed, connect},
    sources::time,
};

/// The local stack's Discovery.
pub const DEFAULT_ADDR: &str = "http://127.0.0.1:50055";

/// `merklectl clients`.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientsArgs {
    /// Discovery's address (default: the local stack's).
    #[arg(long, env = "DISCOVERY_ADDR", default_value = DEFAULT_ADDR)]
    pub addr: String,
    /// Read the backend's node list now, fetching only new or changed nodes.
    #[arg(long, conflicts_with = "force_refresh")]
    pub refresh: bool,
    /// Fetch every node from the backend, ignoring the cache.
    #[arg(long)]
    pub force_refresh: bool,
    /// One JSON object per client, then one for the list.
    #[arg(long)]
    pub json: bool,
}

fn state_name(state: i32) -> &'static str {
    CacheState::try_from(state)
        .map(|s| s.as_str_name().trim_start_matches("CACHE_STATE_"))
        .unwrap_or("UNKNOWN")
}

pub async fn run(args: ClientsArgs) -> anyhow::Result<()> {
    let mut client = DiscoveryServiceClient::new(connect(&args.addr)?);
    let answer = client
        .list_clients(ListClientsRequest {
            refresh: args.refresh,
            force_refresh: args.force_refresh,
        })
        .await
        .map_err(call_failed("Discovery", &args.addr))?
        .into_inner();
    let summary = answer.summary.unwrap_or_default();
    if args.json {
        for c in &answer.clients {
            println!(
                "{}",
                json!({ "id": c.id, "name": c.name, "address": c.address,
                        "tree_builder_address": c.tree_builder_address, "datacenter": c.datacenter,
                        "status": c.status, "ready": c.ready, "version": c.version,
                        "labels": c.labels, "fetch_time": time(c.fetch_time) })
            );
        }
        println!(
            "{}",
            json!({ "backend": answer.backend, "cache_state": state_name(answer.cache_state),
                    "refresh_time": time(answer.refresh_time), "error": answer.error,
                    "clients": answer.clients.len(), "new": summary.new_count,
                    "changed": summary.changed_count, "unchanged": summary.unchanged_count,
                    "removed": summary.removed_count, "backend_calls": summary.backend_calls })
        );
        return Ok(());
    }
    println!(
        "{:<38} {:<20} {:<12} {:<6} {:<22} {:<12} VERSION",
        "ID", "NAME", "STATUS", "READY", "TREEBUILDER", "DATACENTER"
    );
    for c in &answer.clients {
        println!(
            "{:<38} {:<20} {:<12} {:<6} {:<22} {:<12} {}",
            c.id,
            c.name,
            c.status,
            if c.ready { "yes" } else { "no" },
            c.tree_builder_address,
            c.datacenter,
            c.version
        );
    }
    println!(
        "\n{} clients from {}, {} (read {}); refresh: {} new, {} changed, {} unchanged, {} removed, {} backend calls",
        answer.clients.len(),
        answer.backend,
        state_name(answer.cache_state),
        time(answer.refresh_time),
        summary.new_count,
        summary.changed_count,
        summary.unchanged_count,
        summary.removed_count,
        summary.backend_calls
    );
    if !answer.error.is_empty() {
        println!("the backend could not be read: {}", answer.error);
    }
    Ok(())
}
