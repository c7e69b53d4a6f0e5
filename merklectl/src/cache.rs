//! `merklectl cache`: the Cache service at a terminal (what the old system's
//! `/health/cache`, `/health/cache/clear`, `/health/cache/warmup` and `/health/status` HTTP
//! endpoints did). Tables by default, `--json` for scripts.

use std::time::Duration;

use merkle_proto::cache::v1::{
    CircuitState, ClearRequest, GetStatsRequest, GetStatusRequest, Namespace, WarmupRequest,
    cache_service_client::CacheServiceClient,
};
use serde_json::json;

use crate::remote::{call_failed, connect};

/// `merklectl cache`.
#[derive(Debug, Clone, clap::Args)]
pub struct CacheArgs {
    #[command(subcommand)]
    pub command: CacheCommand,
    /// The Cache service (default: the local stack's).
    #[arg(
        long,
        global = true,
        env = "CACHE_ADDR",
        default_value = "http://127.0.0.1:50054"
    )]
    pub addr: String,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum CacheCommand {
    /// Hits, misses and hit rate per namespace since the service started, and Redis' figures.
    Stats,
    /// The circuit breaker, Redis' reachability and latency, uptime and key prefix.
    Status,
    /// Delete this deployment's keys (never another deployment's), or one namespace's.
    Clear {
        /// Only this namespace.
        #[arg(long, value_enum)]
        namespace: Option<NamespaceArg>,
    },
    /// Load the latest snapshots from DbSync into the cache.
    Warmup {
        /// Only this source (repeatable; default: every source).
        #[arg(long = "source", value_name = "NAME")]
        sources: Vec<String>,
    },
}

/// A namespace, as typed at a terminal.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum NamespaceArg {
    LatestRoot,
    TreeMeta,
    BuildStatus,
    DiscoveryList,
    DiscoveryNode,
}

impl From<NamespaceArg> for Namespace {
    fn from(ns: NamespaceArg) -> Self {
        match ns {
            NamespaceArg::LatestRoot => Namespace::LatestRoot,
            NamespaceArg::TreeMeta => Namespace::TreeMeta,
            NamespaceArg::BuildStatus => Namespace::BuildStatus,
            NamespaceArg::DiscoveryList => Namespace::DiscoveryList,
            NamespaceArg::DiscoveryNode => Namespace::DiscoveryNode,
        }
    }
}

/// The short name of a namespace: `latest_root`, ...
fn namespace_name(value: i32) -> String {
    Namespace::try_from(value)
        .map(|ns| {
            ns.as_str_name()
                .trim_start_matches("NAMESPACE_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| value.to_string())
}

fn seconds(d: Option<&prost_types::Duration>) -> Option<f64> {
    d.map(|d| d.seconds as f64 + f64::from(d.nanos) / 1e9)
}

/// Runs one `merklectl cache` command.
pub async fn run(args: CacheArgs) -> anyhow::Result<()> {
    let mut client = CacheServiceClient::new(connect(&args.addr)?);
    let failed = || call_failed("Cache", &args.addr);
    match args.command {
        CacheCommand::Stats => {
            let stats = client
                .get_stats(GetStatsRequest {})
                .await
                .map_err(failed())?
                .into_inner();
            if args.json {
                let namespaces: Vec<_> = stats
                    .namespaces
                    .iter()
                    .map(|n| {
                        json!({
                            "namespace": namespace_name(n.namespace),
                            "hits": n.hits, "misses": n.misses, "hit_rate": n.hit_rate,
                            "sets": n.sets, "deletes": n.deletes,
                            "errors": n.errors, "skipped": n.skipped,
                        })
                    })
                    .collect();
                let out = json!({
                    "namespaces": namespaces,
                    "redis": {
                        "available": stats.redis_available,
                        "version": stats.redis_version,
                        "used_memory_bytes": stats.redis_used_memory_bytes,
                        "maxmemory_bytes": stats.redis_maxmemory_bytes,
                        "maxmemory_policy": stats.redis_maxmemory_policy,
                        "keys": stats.redis_keys,
                        "evicted_keys": stats.redis_evicted_keys,
                        "cluster": stats.redis_cluster,
                        "nodes": stats.redis_nodes.iter().map(|n| json!({
                            "address": n.address,
                            "used_memory_bytes": n.used_memory_bytes,
                            "maxmemory_bytes": n.maxmemory_bytes,
                            "keys": n.keys,
                            "evicted_keys": n.evicted_keys,
                        })).collect::<Vec<_>>(),
                    },
                });
                println!("{out}");
                return Ok(());
            }
            println!(
                "{:<16} {:>10} {:>10} {:>9} {:>10} {:>9} {:>8} {:>8}",
                "NAMESPACE", "HITS", "MISSES", "HIT RATE", "SETS", "DELETES", "ERRORS", "SKIPPED"
            );
            for n in &stats.namespaces {
                println!(
                    "{:<16} {:>10} {:>10} {:>8.1}% {:>10} {:>9} {:>8} {:>8}",
                    namespace_name(n.namespace),
                    n.hits,
                    n.misses,
                    n.hit_rate * 100.0,
                    n.sets,
                    n.deletes,
                    n.errors,
                    n.skipped
                );
            }
            if stats.redis_available {
                let max = match stats.redis_maxmemory_bytes {
                    0 => "no limit".to_owned(),
                    m => format!("limit {:.1} MiB", m as f64 / 1048576.0),
                };
                let kind = if stats.redis_cluster {
                    format!(" cluster of {} masters", stats.redis_nodes.len())
                } else {
                    String::new()
                };
                println!(
                    "\nredis {}{kind}: {:.1} MiB used ({max}, policy {}), {} keys of this deployment, {} evicted",
                    stats.redis_version,
                    stats.redis_used_memory_bytes as f64 / 1048576.0,
                    stats.redis_maxmemory_policy,
                    stats.redis_keys,
                    stats.redis_evicted_keys
                );
                if stats.redis_cluster {
                    println!(
                        "{:<24} {:>10} {:>10} {:>9}",
                        "MASTER", "USED MiB", "KEYS", "EVICTED"
                    );
                    for n in &stats.redis_nodes {
                        println!(
                            "{:<24} {:>10.1} {:>10} {:>9}",
                            n.address,
                            n.used_memory_bytes as f64 / 1048576.0,
                            n.keys,
                            n.evicted_keys
                        );
                    }
                }
            } else {
                println!("\nredis: unavailable (figures above are the service's own counters)");
            }
        }
        CacheCommand::Status => {
            let status = client
                .get_status(GetStatusRequest {})
                .await
                .map_err(failed())?
                .into_inner();
            let state = CircuitState::try_from(status.circuit_state)
                .map(|s| s.as_str_name().trim_start_matches("CIRCUIT_STATE_"))
                .unwrap_or("UNKNOWN");
            let latency_ms = seconds(status.redis_latency.as_ref()).map(|s| s * 1000.0);
            let uptime = seconds(status.uptime.as_ref()).unwrap_or(0.0);
            if args.json {
                let out = json!({
                    "circuit_state": state,
                    "circuit_opened_count": status.circuit_opened_count,
                    "redis_reachable": status.redis_reachable,
                    "redis_latency_ms": latency_ms,
                    "uptime_seconds": uptime,
                    "key_prefix": status.key_prefix,
                    "schema_version": status.schema_version,
                    "latest_root_invalidating": status.latest_root_invalidating,
                    "last_error": status.last_error,
                });
                println!("{out}");
                return Ok(());
            }
            println!(
                "circuit breaker  {state} (opened {} times since start)",
                status.circuit_opened_count
            );
            match (status.redis_reachable, latency_ms) {
                (true, Some(ms)) => println!("redis            reachable, ping {ms:.2} ms"),
                _ => println!("redis            NOT reachable"),
            }
            println!(
                "uptime           {}",
                humantime::format_duration(Duration::from_secs(uptime as u64))
            );
            println!(
                "keys             {}:v{}:<namespace>:<key>",
                status.key_prefix, status.schema_version
            );
            println!(
                "latest roots     {}",
                if status.latest_root_invalidating {
                    "being invalidated after an outage (read as misses meanwhile)"
                } else {
                    "served from the cache"
                }
            );
            if !status.last_error.is_empty() {
                println!("last error       {}", status.last_error);
            }
        }
        CacheCommand::Clear { namespace } => {
            let ns = namespace.map(Namespace::from);
            let cleared = client
                .clear(ClearRequest {
                    namespace: ns.map_or(0, |n| n as i32),
                })
                .await
                .map_err(failed())?
                .into_inner();
            let what = ns.map_or("all".to_owned(), |n| namespace_name(n as i32));
            if args.json {
                println!(
                    "{}",
                    json!({ "namespace": what, "deleted": cleared.deleted })
                );
            } else {
                println!("deleted {} keys ({what})", cleared.deleted);
            }
        }
        CacheCommand::Warmup { sources } => {
            let warmed = client
                .warmup(WarmupRequest { sources })
                .await
                .map_err(failed())?
                .into_inner();
            if args.json {
                println!(
                    "{}",
                    json!({ "sources_warmed": warmed.sources_warmed, "entries_written": warmed.entries_written })
                );
            } else {
                println!(
                    "warmed {} sources ({} cache entries written)",
                    warmed.sources_warmed, warmed.entries_written
                );
            }
        }
    }
    Ok(())
}
