//! `merkle-bench`: measures Merkle Mesh beside the peers its issues name, in one run on this
//! machine, and prints tables with the targets. Run it with `scripts/bench.sh`.
//!
//! - default: the tree benchmark ([`trees`]): `merklectl hash` and TreeBuilder against
//!   sha256sum, git and openssl;
//! - `cache`: the Cache service's RPCs against `redis-benchmark` and a bare tonic echo server
//!   ([`cache`], [`rpc`]);
//! - `db-sync`: DbSync's reads, syncs and cache hit rate against `pgbench -S` and a two-hop
//!   echo ([`db_sync`]);
//! - `scheduler`: the Scheduler's schedule at 1,000 sources, its CPU and memory
//!   ([`scheduler`]);
//! - `discovery`: Discovery's HOT list and incremental refresh against a Nomad stand-in with
//!   2 ms per answer ([`discovery`]);
//! - `fleet`: a fleet source built on 10,000 Nomad nodes over a few real TreeBuilders
//!   ([`fleet`]);
//! - `history`: what chaining and signing add to a changed SyncTree, and `verify-history` of
//!   100,000 signed records ([`history`]);
//! - `log`: the transparency log's append rate, checkpoint lag and proofs at 1,000,000 leaves
//!   ([`tlog`]);
//! - `bundle`: a proof bundle's size and offline verification for a file of a 1,000,000-file
//!   tree, beside the plain node proof ([`bundle`]);
//! - `load`: the whole release stack under 200 concurrent callers of a mix of real calls while
//!   builds run, beside the same mix with one caller ([`load`]);
//! - `console`: `merklectl console`'s pages at 10,000 sources, beside the gRPC calls each
//!   makes ([`console`]);
//! - `echo-server`: that bare server, which the RPC benchmarks start as a separate process.

mod bundle;
mod cache;
mod console;
mod db_sync;
mod discovery;
mod fleet;
mod history;
mod load;
mod rpc;
mod scheduler;
mod tlog;
mod trees;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    about = "Benchmark Merkle Mesh beside its peers",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    trees: trees::TreeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The Cache service's Get, GetMany and breaker beside redis-benchmark and a bare echo.
    Cache(cache::CacheBenchArgs),
    /// DbSync's reads, syncs and cache hit rate beside pgbench and a two-hop bare echo.
    DbSync(db_sync::DbSyncBenchArgs),
    /// The Scheduler: 1,000 scheduled sources, its CPU per build, an unchanged rebuild of a
    /// watched 100,000-file tree, its memory on a large tree.
    Scheduler(scheduler::SchedulerBenchArgs),
    /// Discovery: the HOT list, and an incremental refresh of 1,000 Nomad nodes beside a full
    /// fetch.
    Discovery(discovery::DiscoveryBenchArgs),
    /// A fleet source built on 10,000 Nomad nodes over a few real TreeBuilders: the fan-out's
    /// time, the Scheduler's memory, storage per identical node, ListBuilds paging.
    Fleet(fleet::FleetBenchArgs),
    /// The tamper-evident history: signing and chaining on a changed SyncTree, and
    /// verify-history of 100,000 signed records.
    History(history::HistoryBenchArgs),
    /// The transparency log: records appended per second, checkpoint lag under concurrent
    /// syncs, inclusion and consistency proofs in a 1,000,000-leaf log.
    Log(tlog::LogBenchArgs),
    /// Proof bundles: size and verify time for a file of a 1,000,000-file tree of several
    /// directory widths, in a 1,000,000-leaf log, beside the plain node proof.
    Bundle(bundle::BundleBenchArgs),
    /// The whole release stack under many concurrent callers of a mix of real calls while
    /// builds run: rate, p50/p90/p99 and errors per call, each service's peak RSS.
    Load(load::LoadArgs),
    /// The console at 10,000 sources: each page's time beside the gRPC calls it makes.
    Console(console::ConsoleBenchArgs),
    /// Serve the bare tonic echo (grpc.health.v1.Health/Check) on 127.0.0.1:PORT, optionally
    /// forwarding each call to another echo (two hops).
    #[command(hide = true)]
    EchoServer(rpc::EchoArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        None => trees::run(cli.trees),
        Some(Command::Cache(args)) => cache::run(args),
        Some(Command::DbSync(args)) => db_sync::run(args),
        Some(Command::History(args)) => history::run(args),
        Some(Command::Scheduler(args)) => scheduler::run(args),
        Some(Command::Discovery(args)) => discovery::run(args),
        Some(Command::Fleet(args)) => fleet::run(args),
        Some(Command::Log(args)) => tlog::run(args),
        Some(Command::Bundle(args)) => bundle::run(args),
        Some(Command::Load(args)) => load::run_load(args),
        Some(Command::Console(args)) => console::run(args),
        Some(Command::EchoServer(args)) => rpc::serve_echo(args),
    }
}
