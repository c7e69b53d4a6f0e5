//! `merklectl`: the Merkle Mesh command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The Merkle Mesh command line.
#[derive(Debug, Parser)]
#[command(name = "merklectl", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole system on this machine: PostgreSQL, Redis and the five services, until
    /// Ctrl-C.
    Up(merklectl::up::UpArgs),
    /// Print the Merkle root of a directory (docs/merkle-spec.md).
    Hash(merklectl::local::HashArgs),
    /// List the paths that differ between two directories (or, with `--stored SOURCE`, two
    /// stored snapshots): `A` added, `D` removed, `M` modified, `T` kind changed. Exits 1 when
    /// there are differences, like diff(1).
    Diff(merklectl::local::DiffArgs),
    /// Which nodes of a fleet source (or which of several sources) differ from the most common
    /// root, and in which paths: `drift SOURCE` or `drift A B C`. Exits 1 when some differ.
    Drift(merklectl::drift::DriftArgs),
    /// Serve the operators' web console (loopback by default): sources, builds live, diffs,
    /// fleet drift, the transparency log; it reads with a reader's token.
    Console(merklectl::console::ConsoleArgs),
    /// Write an inclusion proof (JSON) that PATH is part of DIR's tree (or, with
    /// `--stored SOURCE[@SEQ]`, of a stored snapshot's).
    Prove(merklectl::local::ProveArgs),
    /// Verify an inclusion proof file offline.
    VerifyProof(merklectl::local::VerifyProofArgs),
    /// Hash a directory here and store it in DbSync as the newest snapshot of SOURCE (only
    /// the nodes DbSync lacks are sent; an unchanged tree stores nothing).
    Push(merklectl::stored::PushArgs),
    /// The snapshots DbSync stores of SOURCE, newest first; without SOURCE, the sources.
    Snapshots(merklectl::stored::SnapshotsArgs),
    /// The entries of a directory of a stored snapshot: `ls SOURCE[@SEQ] [PATH]`.
    Ls(merklectl::stored::LsArgs),
    /// The Cache service: statistics, status, clear, warm-up.
    Cache(merklectl::cache::CacheArgs),
    /// The Scheduler's sources: name, schedule, next build, path.
    Sources(merklectl::sources::SourcesArgs),
    /// Add or remove a Scheduler source: `source add NAME PATH --every 5m`, `source rm NAME`.
    Source(merklectl::sources::SourceArgs),
    /// Build a source now and follow it to the end (exits 1 when it failed).
    Build(merklectl::sources::BuildArgs),
    /// The Scheduler's builds, newest first, of one source or all.
    Builds(merklectl::sources::BuildsArgs),
    /// The fleet's client nodes as Discovery lists them, with where the list came from and
    /// what a refresh found.
    Clients(merklectl::clients::ClientsArgs),
    /// Check a source's tamper-evident history: sequence continuity, every chain link, every
    /// signature against the keys you trust, and with --deep every stored tree. Names the first
    /// bad record and exits 1.
    VerifyHistory(merklectl::history::VerifyHistoryArgs),
    /// The transparency log of every snapshot record: `log checkpoint`, `log prove SOURCE@SEQ`,
    /// `log consistency OLD [NEW]`, each proof checked here (and each checkpoint's signature
    /// with --verifier-key).
    Log(merklectl::log::LogArgs),
    /// Write the transparency log into DIR as C2SP tlog-tiles (checkpoint, tiles, entry
    /// bundles) that any static web server can serve, checking every tile against the
    /// checkpoint; exporting again adds only what is new.
    ExportLog(merklectl::log::ExportLogArgs),
    /// Write a source's history (records, keys, checkpoints) as JSON lines, for
    /// `verify-history --file` with no server.
    ExportHistory(merklectl::history::ExportHistoryArgs),
    /// A build's trace as an indented tree (service, span, duration, status), from the spans
    /// `merklectl up`'s receiver collected; `--json` writes OTLP JSON.
    Trace(merklectl::traces::TraceArgs),
    /// Check that every service is up: its gRPC health and one read call each (what the
    /// chart's `helm test` runs). Exits 1 when one fails.
    Check(merklectl::check::CheckArgs),
    /// Exit 0 when the service at --addr reports SERVING (grpc.health.v1), 1 otherwise.
    Health(merklectl::check::HealthArgs),
    /// Make a deployment's credentials in a folder: the identities file and a bearer token
    /// per role and per service (what `merklectl up` makes in .data/auth), for a Kubernetes
    /// Secret (docs/security.md).
    Credentials(merklectl::credentials::CredentialsArgs),
}

fn block_on<T>(future: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Runtime::new()?.block_on(future)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        // Commands that talk to services need an async runtime; the local ones run on the
        // hashing threads.
        Command::Up(args) => block_on(merklectl::up::run(args)).map(|()| ExitCode::SUCCESS),
        Command::Credentials(args) => merklectl::credentials::run(args).map(|()| ExitCode::SUCCESS),
        Command::Cache(args) => block_on(merklectl::cache::run(args)).map(|()| ExitCode::SUCCESS),
        Command::Clients(args) => {
            block_on(merklectl::clients::run(args)).map(|()| ExitCode::SUCCESS)
        }
        Command::Sources(args) => {
            block_on(merklectl::sources::sources(args)).map(|()| ExitCode::SUCCESS)
        }
        Command::Source(args) => {
            block_on(merklectl::sources::source(args)).map(|()| ExitCode::SUCCESS)
        }
        Command::Build(args) => block_on(merklectl::sources::build(args)).map(|ok| {
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }),
        Command::Builds(args) => {
            block_on(merklectl::sources::builds(args)).map(|()| ExitCode::SUCCESS)
        }
        Command::VerifyHistory(args) => {
            block_on(merklectl::history::verify_history(args)).map(|ok| {
                if ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                }
            })
        }
        Command::Console(args) => {
            block_on(merklectl::console::run(args)).map(|()| ExitCode::SUCCESS)
        }
        Command::Drift(args) => block_on(merklectl::drift::drift(args)).map(|differ| {
            if differ {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }),
        Command::Health(args) => block_on(merklectl::check::health_only(args)).map(|ok| {
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }),
        Command::Check(args) => block_on(merklectl::check::run(args)).map(|ok| {
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }),
        Command::Trace(args) => {
            block_on(merklectl::traces::trace(args)).map(|()| ExitCode::SUCCESS)
        }
        Command::Log(args) if matches!(args.command, merklectl::log::LogCommand::Verify { .. }) => {
            block_on(merklectl::log::verify(args)).map(|ok| {
                if ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                }
            })
        }
        Command::Log(args) => block_on(merklectl::log::run(args)).map(|()| ExitCode::SUCCESS),
        Command::ExportLog(args) => {
            block_on(merklectl::log::export(args)).map(|()| ExitCode::SUCCESS)
        }
        Command::ExportHistory(args) => {
            block_on(merklectl::history::export(args)).map(|()| ExitCode::SUCCESS)
        }
        Command::Hash(args) => merklectl::local::hash(args).map(|()| ExitCode::SUCCESS),
        Command::Diff(args) => match args.stored.clone() {
            Some(source) => block_on(merklectl::stored::diff(
                &args.db_sync,
                &source,
                &args.old,
                &args.new,
                args.json,
            )),
            None => merklectl::local::diff(args),
        }
        .map(|changed| {
            if changed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }),
        Command::Prove(args) => match (&args.stored, args.args.as_slice()) {
            (Some(source), [path]) => block_on(merklectl::stored::prove(
                &args.db_sync,
                source,
                path,
                args.bundle,
            )),
            (Some(_), _) => Err(anyhow::anyhow!("prove --stored SOURCE takes one PATH")),
            (None, _) => merklectl::local::prove_cmd(args),
        }
        .map(|()| ExitCode::SUCCESS),
        Command::Push(args) => block_on(merklectl::stored::push(args)).map(|()| ExitCode::SUCCESS),
        Command::Snapshots(args) => {
            block_on(merklectl::stored::snapshots(args)).map(|()| ExitCode::SUCCESS)
        }
        Command::Ls(args) => block_on(merklectl::stored::ls(args)).map(|()| ExitCode::SUCCESS),
        Command::VerifyProof(args) => {
            merklectl::local::verify_proof(args).map(|()| ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("merklectl: {err:#}");
            ExitCode::from(2)
        }
    }
}
