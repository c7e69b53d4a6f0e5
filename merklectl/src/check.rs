//! `merklectl check`: is every service up and answering? For each of the five, its gRPC health
//! (its own service name) and one read call. The chart's `helm test` pod runs it with the
//! addresses from the release's ConfigMap.

use std::time::{Duration, Instant};

use merkle_proto::{
    cache::v1::{GetStatusRequest, cache_service_client::CacheServiceClient},
    dbsync::v1::{
        ListSourcesRequest as DbSyncSources, db_sync_service_client::DbSyncServiceClient,
    },
    discovery::v1::{ListClientsRequest, discovery_service_client::DiscoveryServiceClient},
    scheduler::v1::{ListSourcesRequest, scheduler_service_client::SchedulerServiceClient},
    service_names,
    treebuilder::v1::{CheckPathRequest, tree_builder_service_client::TreeBuilderServiceClient},
};
use serde_json::json;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::remote::connect;

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    #[arg(long, env = "SCHEDULER_ADDR", default_value = "http://127.0.0.1:50051")]
    pub scheduler: String,
    #[arg(
        long,
        env = "TREE_BUILDER_ADDR",
        default_value = "http://127.0.0.1:50052"
    )]
    pub tree_builder: String,
    #[arg(long, env = "DB_SYNC_ADDR", default_value = "http://127.0.0.1:50053")]
    pub db_sync: String,
    #[arg(long, env = "CACHE_ADDR", default_value = "http://127.0.0.1:50054")]
    pub cache: String,
    #[arg(long, env = "DISCOVERY_ADDR", default_value = "http://127.0.0.1:50055")]
    pub discovery: String,
    /// The directory TreeBuilder's CheckPath is asked about (one of its allowed roots).
    #[arg(long, default_value = "/data")]
    pub tree_builder_path: String,
    /// Print the outcome as JSON lines.
    #[arg(long)]
    pub json: bool,
}

/// One service's outcome.
struct Outcome {
    service: &'static str,
    addr: String,
    rpc: &'static str,
    result: Result<Duration, String>,
}

async fn health(addr: &str, service: &str) -> Result<(), String> {
    let status = HealthClient::new(connect(addr).map_err(|e| e.to_string())?)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .map_err(|s| format!("health: {:?}: {}", s.code(), s.message()))?
        .into_inner()
        .status;
    if status == ServingStatus::Serving as i32 {
        Ok(())
    } else {
        Err(format!(
            "health: {}",
            ServingStatus::try_from(status)
                .map(|s| s.as_str_name())
                .unwrap_or("UNKNOWN")
        ))
    }
}

fn failed(status: tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// Health, then the read call, timed.
async fn one<F>(
    service: &'static str,
    grpc_name: &str,
    addr: &str,
    rpc: &'static str,
    read: F,
) -> Outcome
where
    F: std::future::Future<Output = Result<(), String>>,
{
    let started = Instant::now();
    let result = async {
        health(addr, grpc_name).await?;
        read.await
    }
    .await
    .map(|()| started.elapsed());
    Outcome {
        service,
        addr: addr.to_owned(),
        rpc,
        result,
    }
}

#[derive(Debug, clap::Args)]
pub struct HealthArgs {
    /// The service's gRPC address.
    #[arg(long, required_unless_present = "http", conflicts_with = "http")]
    pub addr: Option<String>,
    /// An HTTP URL to GET instead (`http://127.0.0.1:8088/healthz`, the console's), healthy
    /// on a 200: the console's probe, which listens on the pod's loopback where the kubelet's
    /// HTTP probe cannot reach.
    #[arg(long)]
    pub http: Option<String>,
    /// The service name to ask about; empty: the whole server.
    #[arg(long, default_value = "")]
    pub service: String,
}

/// `merklectl health`: true when the service reports SERVING (an exec probe for clusters
/// where the services speak TLS, which the kubelet's gRPC probe cannot), or the URL answers
/// 200.
pub async fn health_only(args: HealthArgs) -> anyhow::Result<bool> {
    let (target, result) = match (&args.addr, &args.http) {
        (Some(addr), _) => (addr, health(addr, &args.service).await),
        (None, Some(url)) => (url, http_ok(url).await),
        (None, None) => anyhow::bail!("give --addr or --http"),
    };
    match result {
        Ok(()) => Ok(true),
        Err(why) => {
            eprintln!("{target}: {why}");
            Ok(false)
        }
    }
}

/// GET `url` and expect a 200.
async fn http_ok(url: &str) -> Result<(), String> {
    match merkle_shared::http_get::status_of(url, Duration::from_secs(3)).await? {
        merkle_shared::http_get::StatusCode::OK => Ok(()),
        status => Err(format!("answered {status}")),
    }
}

/// `merklectl check`: true when every service answered.
pub async fn run(args: CheckArgs) -> anyhow::Result<bool> {
    let channel = |addr: &str| connect(addr).map_err(|e| e.to_string());
    let outcomes = [
        one(
            "scheduler",
            service_names::SCHEDULER,
            &args.scheduler,
            "ListSources",
            async {
                SchedulerServiceClient::new(channel(&args.scheduler)?)
                    .list_sources(ListSourcesRequest::default())
                    .await
                    .map(drop)
                    .map_err(failed)
            },
        )
        .await,
        one(
            "tree-builder",
            service_names::TREE_BUILDER,
            &args.tree_builder,
            "CheckPath",
            async {
                TreeBuilderServiceClient::new(channel(&args.tree_builder)?)
                    .check_path(CheckPathRequest {
                        path: args.tree_builder_path.clone(),
                    })
                    .await
                    .map(drop)
                    .map_err(failed)
            },
        )
        .await,
        one(
            "db-sync",
            service_names::DB_SYNC,
            &args.db_sync,
            "ListSources",
            async {
                DbSyncServiceClient::new(channel(&args.db_sync)?)
                    .list_sources(DbSyncSources::default())
                    .await
                    .map(drop)
                    .map_err(failed)
            },
        )
        .await,
        one(
            "cache",
            service_names::CACHE,
            &args.cache,
            "GetStatus",
            async {
                CacheServiceClient::new(channel(&args.cache)?)
                    .get_status(GetStatusRequest {})
                    .await
                    .map(drop)
                    .map_err(failed)
            },
        )
        .await,
        one(
            "discovery",
            service_names::DISCOVERY,
            &args.discovery,
            "ListClients",
            async {
                DiscoveryServiceClient::new(channel(&args.discovery)?)
                    .list_clients(ListClientsRequest::default())
                    .await
                    .map(drop)
                    .map_err(failed)
            },
        )
        .await,
    ];
    for o in &outcomes {
        if args.json {
            println!(
                "{}",
                json!({
                    "service": o.service,
                    "address": o.addr,
                    "rpc": o.rpc,
                    "ok": o.result.is_ok(),
                    "ms": o.result.as_ref().map(|d| d.as_secs_f64() * 1000.0).ok(),
                    "error": o.result.as_ref().err(),
                })
            );
        } else {
            match &o.result {
                Ok(took) => println!(
                    "{:<13} {:<40} SERVING, {} ok ({:.1} ms)",
                    o.service,
                    o.addr,
                    o.rpc,
                    took.as_secs_f64() * 1000.0
                ),
                Err(why) => println!("{:<13} {:<40} FAILED ({}): {why}", o.service, o.addr, o.rpc),
            }
        }
    }
    Ok(outcomes.iter().all(|o| o.result.is_ok()))
}
