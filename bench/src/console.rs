//! The console benchmark: `merklectl console` (release) in front of the release stack with
//! 10,000 sources, each built once, its pages fetched over HTTP the way a browser does.
//!
//! Target (the console issue): pages work at 10,000 sources, each served in under 200 ms. Each
//! page's time is printed beside its peer measured in the same run: the gRPC calls the page
//! makes, made by the benchmark itself, so what the console adds (templating, its own calls'
//! fan-out) is the difference.

use std::{
    fs,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use futures::{StreamExt as _, stream};
use merkle_proto::{
    cache::v1::{GetStatsRequest, cache_service_client::CacheServiceClient},
    dbsync::v1::{
        GetChangeActivityRequest, ListSnapshotsRequest, db_sync_service_client::DbSyncServiceClient,
    },
    discovery::v1::{ListClientsRequest, discovery_service_client::DiscoveryServiceClient},
    scheduler::v1::{
        CreateSourceRequest, GetSourceRequest, ListBuildsRequest, ListSourcesRequest, Source,
        TriggerBuildRequest, WatchBuildRequest, scheduler_service_client::SchedulerServiceClient,
    },
};

use crate::rpc::{self, Channel};

/// Options of `merkle-bench console`.
#[derive(Debug, clap::Args)]
pub struct ConsoleBenchArgs {
    /// Sources registered (and each built once).
    #[arg(long, default_value_t = 10_000)]
    sources: usize,
    /// Source pages fetched (spread over the sources).
    #[arg(long, default_value_t = 200)]
    source_pages: usize,
}

/// Rows per overview page: the console's own page size.
const PAGE: u32 = 50;
/// Calls in flight while the sources are registered and built.
const SETUP_CONCURRENCY: usize = 32;

#[derive(Clone)]
struct Clients {
    scheduler: SchedulerServiceClient<Channel>,
    db_sync: DbSyncServiceClient<Channel>,
    cache: CacheServiceClient<Channel>,
    discovery: DiscoveryServiceClient<Channel>,
}

pub fn run(args: ConsoleBenchArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(bench(args))
}

/// p50, p99 and the slowest of some timings.
fn spread(mut times: Vec<Duration>) -> [Duration; 3] {
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    [at(0.5), at(0.99), times[times.len() - 1]]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// The overview's calls, as the console makes them: a page of sources, each one's last build
/// and the page's change activity at once, the cache's statistics, the fleet.
async fn overview_calls(mut c: Clients, token: String) -> anyhow::Result<()> {
    let page = c
        .scheduler
        .list_sources(ListSourcesRequest {
            page_size: PAGE,
            page_token: token,
        })
        .await?
        .into_inner();
    let builds = futures::future::try_join_all(page.sources.iter().map(|s| {
        let mut scheduler = c.scheduler.clone();
        let source = s.name.clone();
        async move {
            scheduler
                .list_builds(ListBuildsRequest {
                    source,
                    page_size: 1,
                    ..Default::default()
                })
                .await
        }
    }));
    let activity = c.db_sync.get_change_activity(GetChangeActivityRequest {
        sources: page.sources.iter().map(|s| s.name.clone()).collect(),
        days: 14,
    });
    let (builds, activity) = tokio::join!(builds, activity);
    builds?;
    activity?;
    c.cache.get_stats(GetStatsRequest {}).await?;
    c.discovery
        .list_clients(ListClientsRequest::default())
        .await?;
    Ok(())
}

/// The source page's calls: the source, its last 20 builds, its snapshots, its activity.
async fn source_calls(mut c: Clients, name: String) -> anyhow::Result<()> {
    c.scheduler
        .get_source(GetSourceRequest { name: name.clone() })
        .await?;
    c.scheduler
        .list_builds(ListBuildsRequest {
            source: name.clone(),
            page_size: 20,
            ..Default::default()
        })
        .await?;
    c.db_sync
        .list_snapshots(ListSnapshotsRequest {
            source: name.clone(),
            page_size: PAGE,
            ..Default::default()
        })
        .await?;
    c.db_sync
        .get_change_activity(GetChangeActivityRequest {
            sources: vec![name],
            days: 14,
        })
        .await?;
    Ok(())
}

/// GETs a console page; its time to the last byte, checked to be a 200 holding `expect`.
async fn page(http: &reqwest::Client, url: &str, expect: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let response = http.get(url).send().await?;
    let status = response.status();
    let body = response.text().await?;
    let took = started.elapsed();
    anyhow::ensure!(
        status == 200 && body.contains(expect),
        "{url}: {status}, without {expect:?}"
    );
    Ok(took)
}

async fn build_once(
    mut scheduler: SchedulerServiceClient<Channel>,
    name: String,
) -> anyhow::Result<()> {
    let id = scheduler
        .trigger_build(TriggerBuildRequest { source: name })
        .await?
        .into_inner()
        .build_id;
    let mut watch = scheduler
        .watch_build(WatchBuildRequest { build_id: id })
        .await?
        .into_inner();
    while watch.message().await?.is_some() {}
    Ok(())
}

async fn bench(args: ConsoleBenchArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let merklectl = exe.parent().context("binary folder")?.join("merklectl");
    anyhow::ensure!(
        merklectl.is_file(),
        "{} not found: run scripts/bench.sh console (it builds the release binaries)",
        merklectl.display()
    );
    let storage = rpc::Storage::start("merkle-bench-console-").await?;
    let w = storage.dir();
    let (cache, db_sync) = (&storage.cache, &storage.db_sync);
    let tree_builder = rpc::start_service(
        w,
        "tree-builder",
        &[
            ("ALLOWED_ROOTS", w.display().to_string()),
            ("MAX_CONCURRENT_BUILDS", "16".into()),
        ],
    )
    .await?;
    let clients_file = w.join("clients.yaml");
    fs::write(
        &clients_file,
        format!(
            "clients:\n- {{id: node-a, tree_builder_address: \"{}\"}}\n",
            tree_builder.uri.trim_start_matches("http://")
        ),
    )?;
    let discovery = rpc::start_service(
        w,
        "discovery",
        &[
            ("STATIC_FILE", clients_file.display().to_string()),
            ("CACHE_ADDR", cache.uri.clone()),
        ],
    )
    .await?;
    let scheduler = rpc::start_service(
        w,
        "scheduler",
        &[
            ("DATABASE_URL", storage.postgres.url()),
            ("CACHE_ADDR", cache.uri.clone()),
            ("DB_SYNC_ADDR", db_sync.uri.clone()),
            ("TREE_BUILDER_ADDR", tree_builder.uri.clone()),
            ("DISCOVERY_ADDR", discovery.uri.clone()),
        ],
    )
    .await?;
    let c = Clients {
        scheduler: SchedulerServiceClient::new(rpc::channel(&scheduler.uri)?),
        db_sync: DbSyncServiceClient::new(rpc::channel(&db_sync.uri)?),
        cache: CacheServiceClient::new(rpc::channel(&cache.uri)?),
        discovery: DiscoveryServiceClient::new(rpc::channel(&discovery.uri)?),
    };

    // 10,000 sources over one small tree (each its own history), each built once.
    let tree = w.join("tree");
    for f in 0..20 {
        let path = tree.join(format!("d{}/f{f}.txt", f % 4));
        fs::create_dir_all(path.parent().context("parent")?)?;
        fs::write(path, format!("file {f}"))?;
    }
    let names: Vec<String> = (0..args.sources).map(|i| format!("src-{i:05}")).collect();
    let started = Instant::now();
    eprintln!("registering and building {} sources ...", names.len());
    let results: Vec<anyhow::Result<()>> = stream::iter(names.iter().cloned())
        .map(|name| {
            let mut scheduler = c.scheduler.clone();
            let path = tree.display().to_string();
            async move {
                scheduler
                    .create_source(CreateSourceRequest {
                        source: Some(Source {
                            name: name.clone(),
                            path,
                            enabled: true,
                            ..Default::default()
                        }),
                    })
                    .await?;
                build_once(scheduler, name).await
            }
        })
        .buffer_unordered(SETUP_CONCURRENCY)
        .collect()
        .await;
    results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    let setup = started.elapsed();
    eprintln!("{} sources built in {setup:.1?}", names.len());

    // The console, started as the chart starts it: environment variables, a reader's token.
    let port = merklectl::stack::free_port()?;
    let mut command = std::process::Command::new(&merklectl);
    command
        .arg("console")
        .env("CONSOLE_LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("SCHEDULER_ADDR", &scheduler.uri)
        .env("DB_SYNC_ADDR", &db_sync.uri)
        .env("CACHE_ADDR", &cache.uri)
        .env("DISCOVERY_ADDR", &discovery.uri)
        .env(
            "CONSOLE_READER_TOKEN_FILE",
            merklectl::credentials::Credentials::ensure(w)?.token_file("reader"),
        )
        .env_remove("MERKLE_TOKEN_FILE");
    let _console = merklectl::stack::ManagedProcess::spawn(
        "console",
        command,
        nix::sys::signal::Signal::SIGTERM,
        &w.join("console.log"),
    )?;
    let base = format!("http://127.0.0.1:{port}");
    // Plain HTTP only, but reqwest's TLS stack wants a provider chosen.
    merkle_shared::tls::install_crypto_provider();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while page(&http, &format!("{base}/healthz"), "ok").await.is_err() {
        anyhow::ensure!(Instant::now() < deadline, "the console did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Every overview page, first to last: the page tokens come from the Scheduler itself.
    let mut tokens = vec![String::new()];
    loop {
        let next = c
            .scheduler
            .clone()
            .list_sources(ListSourcesRequest {
                page_size: PAGE,
                page_token: tokens.last().cloned().unwrap_or_default(),
            })
            .await?
            .into_inner()
            .next_page_token;
        if next.is_empty() {
            break;
        }
        tokens.push(next);
    }
    // One round to warm both paths (connections, PostgreSQL's buffers), then the measured one.
    let mut overview = Vec::new();
    let mut overview_peer = Vec::new();
    for round in 0..2 {
        for (i, token) in tokens.iter().enumerate() {
            let first = names[i * PAGE as usize].as_str();
            let url = reqwest::Url::parse_with_params(&format!("{base}/"), [("page", token)])?;
            let console_took = page(&http, url.as_str(), first).await?;
            let started = Instant::now();
            overview_calls(c.clone(), token.clone()).await?;
            let peer_took = started.elapsed();
            if round == 1 {
                overview.push(console_took);
                overview_peer.push(peer_took);
            }
        }
    }
    let step = (names.len() / args.source_pages.max(1)).max(1);
    let mut source = Vec::new();
    let mut source_peer = Vec::new();
    for name in names.iter().step_by(step) {
        source.push(page(&http, &format!("{base}/sources/{name}"), "id=\"snapshots\"").await?);
        let started = Instant::now();
        source_calls(c.clone(), name.clone()).await?;
        source_peer.push(started.elapsed());
    }
    let mut log = Vec::new();
    for _ in 0..50 {
        log.push(page(&http, &format!("{base}/log"), "records").await?);
    }

    let console_rss = rpc::peak_rss(_console.pid())?;
    println!(
        "\nThe console at {} sources ({} built in {:.1} s; merklectl console and every service \
         release builds on this machine)\n",
        names.len(),
        names.len(),
        setup.as_secs_f64()
    );
    println!(
        "| page | pages fetched | p50 (ms) | p99 (ms) | slowest (ms) | its gRPC calls made directly: p50 / p99 (ms) |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let rows = [
        (
            "overview `/?page=` (50 sources: 50 ListBuilds, 1 GetChangeActivity)",
            &overview,
            Some(&overview_peer),
        ),
        ("source `/sources/NAME`", &source, Some(&source_peer)),
        ("log `/log`", &log, None),
    ];
    let mut worst = Duration::ZERO;
    for (what, times, peer) in rows {
        let [p50, p99, max] = spread(times.clone());
        worst = worst.max(p99);
        let peer = peer.map_or("-".to_owned(), |p| {
            let [p50, p99, _] = spread(p.clone());
            format!("{} / {}", ms(p50), ms(p99))
        });
        println!(
            "| {what} | {} | {} | {} | {} | {peer} |",
            times.len(),
            ms(p50),
            ms(p99),
            ms(max)
        );
    }
    println!(
        "\nconsole peak RSS: {:.1} MiB",
        console_rss as f64 / 1048576.0
    );
    println!("\n| target | met |\n|---|---|");
    println!(
        "| every page at {} sources under 200 ms (p99: {} ms) | {} |",
        names.len(),
        ms(worst),
        if worst < Duration::from_millis(200) {
            "yes"
        } else {
            "NO"
        }
    );
    Ok(())
}
