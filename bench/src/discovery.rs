//! The Discovery benchmark: the release binary with the Cache service and Redis, against the
//! Nomad stand-in (`merkle-stand-ins`; `--backend kubernetes`: the Kubernetes API's) serving
//! 1,000 nodes (or `--nodes`) with 2 ms added to every answer, as a remote agent would.
//!
//! Targets (the Discovery issue): `ListClients` HOT p50 under 1 ms per 1,000 clients in the
//! answer; a refresh with 1% of the
//! nodes changed makes at least 20x fewer backend calls than a full fetch of every node's
//! details (`force_refresh`, measured in the same run) and is at least 5x faster. And (the
//! scale-out issue) that refresh reads at most 2 list pages per 1,000 nodes plus one detail
//! per changed node, and Discovery's peak RSS over the whole run stays under 100 MiB.

use std::time::{Duration, Instant};

use merkle_proto::discovery::v1::{
    CacheState, ListClientsRequest, discovery_service_client::DiscoveryServiceClient,
};
use merkle_stand_ins::{
    kubernetes::{KubeNode, KubernetesStandIn},
    nomad::{Node, NomadStandIn},
};
use merklectl::stack::{self, Redis};

use crate::rpc::{self, Load, Row};

/// Options of `merkle-bench discovery`.
#[derive(Debug, clap::Args)]
pub struct DiscoveryBenchArgs {
    /// Nodes the stand-in serves (the scale-out issue's fleet: `--nodes 10000`).
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Latency added to every backend answer, in milliseconds.
    #[arg(long, default_value_t = 2)]
    latency_ms: u64,
    /// Refreshes of each kind measured.
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Seconds of the HOT latency row.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// The stand-in Discovery reads.
    #[arg(long, default_value = "nomad", value_parser = ["nomad", "kubernetes"])]
    backend: String,
}

/// List pages and single nodes a stand-in served.
#[derive(Debug, Clone, Copy, Default)]
struct Served {
    list: u64,
    detail: u64,
}

/// The stand-in the bench runs against, with its nodes.
enum Backend {
    Nomad(NomadStandIn),
    Kubernetes(KubernetesStandIn, std::path::PathBuf),
}

impl Backend {
    async fn start(
        kind: &str,
        nodes: usize,
        latency: Duration,
        dir: &std::path::Path,
    ) -> anyhow::Result<Backend> {
        Ok(if kind == "kubernetes" {
            let kube = KubernetesStandIn::start().await?;
            for n in 0..nodes {
                kube.upsert_node(&KubeNode::numbered(n));
            }
            kube.set_token(Some("bench-token"));
            kube.set_latency(latency);
            let config = kube.write_kubeconfig(dir, Some("bench-token"), "merkle")?;
            Backend::Kubernetes(kube, config)
        } else {
            let nomad = NomadStandIn::start().await?;
            for n in 0..nodes {
                nomad.upsert(Node::numbered(n));
            }
            nomad.set_latency(latency);
            Backend::Nomad(nomad)
        })
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        match self {
            Backend::Nomad(nomad) => vec![
                ("DISCOVERY_BACKEND", "nomad".into()),
                ("NOMAD_ADDR", nomad.addr()),
            ],
            Backend::Kubernetes(_, config) => vec![
                ("DISCOVERY_BACKEND", "kubernetes".into()),
                ("KUBECONFIG", config.display().to_string()),
            ],
        }
    }

    /// Changes node `n` (a label naming the round).
    fn change(&self, n: usize, round: usize) {
        match self {
            Backend::Nomad(nomad) => {
                let mut node = Node::numbered(n);
                node.meta.insert("round".into(), round.to_string());
                nomad.upsert(node);
            }
            Backend::Kubernetes(kube, _) => {
                let mut node = KubeNode::numbered(n);
                node.labels.insert("round".into(), round.to_string());
                kube.upsert_node(&node);
            }
        }
    }

    fn reset_calls(&self) {
        match self {
            Backend::Nomad(nomad) => nomad.reset_calls(),
            Backend::Kubernetes(kube, _) => kube.reset_calls(),
        }
    }

    fn served(&self) -> Served {
        match self {
            Backend::Nomad(nomad) => {
                let c = nomad.calls();
                Served {
                    list: c.list,
                    detail: c.detail,
                }
            }
            Backend::Kubernetes(kube, _) => {
                let c = kube.calls();
                Served {
                    list: c.list,
                    detail: c.get,
                }
            }
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Backend::Nomad(_) => "Nomad",
            Backend::Kubernetes(..) => "Kubernetes",
        }
    }
}

pub fn run(args: DiscoveryBenchArgs) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(run_async(args))
}

type Client = DiscoveryServiceClient<crate::rpc::Channel>;

async fn list(
    c: &mut Client,
    refresh: bool,
    force_refresh: bool,
) -> anyhow::Result<(Duration, u64, CacheState)> {
    let started = Instant::now();
    let answer = c
        .list_clients(ListClientsRequest {
            refresh,
            force_refresh,
        })
        .await?
        .into_inner();
    let took = started.elapsed();
    let state = CacheState::try_from(answer.cache_state)?;
    Ok((
        took,
        answer.summary.unwrap_or_default().backend_calls,
        state,
    ))
}

fn percentile(values: &mut [Duration], q: f64) -> Duration {
    values.sort();
    values[((values.len() as f64 * q) as usize).min(values.len() - 1)]
}

async fn run_async(args: DiscoveryBenchArgs) -> anyhow::Result<()> {
    let work = tempfile::Builder::new()
        .prefix("merkle-bench-discovery-")
        .tempdir()?;
    let w = work.path();
    eprintln!("logs in {}", w.display());
    let redis = Redis::start(&w.join("redis"), stack::free_port()?).await?;
    let cache = rpc::start_service(w, "cache", &[("REDIS_URL", redis.url())]).await?;
    let backend = Backend::start(
        &args.backend,
        args.nodes,
        Duration::from_millis(args.latency_ms),
        w,
    )
    .await?;
    let mut env = backend.env();
    env.push(("CACHE_ADDR", cache.uri.clone()));
    let discovery = rpc::start_service(w, "discovery", &env).await?;
    let mut c = DiscoveryServiceClient::new(rpc::channel(&discovery.uri)?);
    rpc::reset_peak_rss(discovery.pid)?;

    // HOT: the list as it is, within LIST_TTL.
    let (_, _, state) = list(&mut c, false, false).await?;
    anyhow::ensure!(
        state == CacheState::Hot,
        "the first list was {state:?}, not HOT"
    );
    let uri = discovery.uri.clone();
    let hot: Load = rpc::measure(
        1,
        Duration::from_secs(args.seconds),
        move || Ok(DiscoveryServiceClient::new(rpc::channel(&uri)?)),
        |mut c: Client| async move {
            c.list_clients(ListClientsRequest::default()).await?;
            Ok(())
        },
    )
    .await?;

    // Refreshes: 1% of the nodes changed before each incremental one; every node fetched by
    // each forced one.
    let changed = (args.nodes / 100).max(1);
    let (mut incremental, mut forced) = (Vec::new(), Vec::new());
    let (mut incremental_calls, mut forced_calls) = (0, 0);
    let mut incremental_served = Served::default();
    for round in 0..args.rounds {
        for i in 0..changed {
            backend.change((round * changed + i * 97) % args.nodes, round);
        }
        backend.reset_calls();
        let (took, calls, state) = list(&mut c, true, false).await?;
        anyhow::ensure!(
            state == CacheState::Refreshed,
            "a refresh answered {state:?}"
        );
        let served = backend.served();
        anyhow::ensure!(
            calls == served.list + served.detail,
            "the summary says {calls} backend calls, the stand-in served {served:?}"
        );
        incremental.push(took);
        incremental_calls = calls;
        incremental_served = served;

        backend.reset_calls();
        let (took, calls, state) = list(&mut c, false, true).await?;
        anyhow::ensure!(
            state == CacheState::Bypass,
            "a forced refresh answered {state:?}"
        );
        forced.push(took);
        forced_calls = calls;
    }
    let (inc50, inc99) = (
        percentile(&mut incremental, 0.5),
        percentile(&mut incremental, 0.99),
    );
    let (full50, full99) = (percentile(&mut forced, 0.5), percentile(&mut forced, 0.99));
    let discovery_rss = rpc::peak_rss(discovery.pid)?;
    let fewer = forced_calls as f64 / incremental_calls.max(1) as f64;
    let pages_allowed = 2 * args.nodes.div_ceil(1000) as u64;
    let faster = full50.as_secs_f64() / inc50.as_secs_f64();

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    rpc::print(
        &format!(
            "merkle-bench discovery: {cores} cores, {} {} nodes (stand-in, {} ms per answer), client and servers on this machine",
            args.nodes,
            backend.name(),
            args.latency_ms
        ),
        &[Row {
            what: format!("ListClients, HOT ({} clients in each answer)", args.nodes),
            load: hot,
        }],
        &[],
    );
    println!(
        "\n| refresh of {} nodes | backend calls | p50 (ms) | p99 (ms) |",
        args.nodes
    );
    println!("|---|---:|---:|---:|");
    println!(
        "| incremental (`refresh`), {changed} changed: {} list pages + {} details | {incremental_calls} | {:.1} | {:.1} |",
        incremental_served.list,
        incremental_served.detail,
        inc50.as_secs_f64() * 1000.0,
        inc99.as_secs_f64() * 1000.0
    );
    println!(
        "| full fetch (`force_refresh`) | {forced_calls} | {:.1} | {:.1} |",
        full50.as_secs_f64() * 1000.0,
        full99.as_secs_f64() * 1000.0
    );
    let targets = [
        (
            format!(
                "ListClients HOT p50 <= 1 ms per 1,000 clients = {} ms (is {:.3} ms)",
                args.nodes.div_ceil(1000),
                hot.p50.as_secs_f64() * 1000.0
            ),
            hot.p50 <= Duration::from_millis(args.nodes.div_ceil(1000) as u64),
        ),
        (
            format!(
                "a 1% refresh makes >= 20x fewer backend calls than a full fetch (is {fewer:.0}x)"
            ),
            fewer >= 20.0,
        ),
        (
            format!("a 1% refresh is >= 5x faster than a full fetch (p50, is {faster:.1}x)"),
            faster >= 5.0,
        ),
        (
            format!(
                "a 1% refresh reads <= {pages_allowed} list pages (2 per 1,000 nodes) and <= {changed} details (one per changed node) (is {} and {})",
                incremental_served.list, incremental_served.detail
            ),
            incremental_served.list <= pages_allowed && incremental_served.detail <= changed as u64,
        ),
        (
            format!(
                "Discovery's peak RSS over the run < 100 MiB (is {:.1} MiB)",
                discovery_rss as f64 / 1048576.0
            ),
            discovery_rss < 100 << 20,
        ),
    ];
    println!("\n| target | met |\n|---|---|");
    for (what, met) in targets {
        println!("| {what} | {} |", if met { "yes" } else { "NO" });
    }
    drop((discovery, cache));
    drop(redis);
    Ok(())
}
