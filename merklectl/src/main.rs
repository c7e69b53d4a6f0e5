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
    /// List the paths that differ between two directories: `A` added, `D` removed,
    /// `M` modified, `T` kind changed. Exits 1 when there are differences, like diff(1).
    Diff(merklectl::local::DiffArgs),
    /// Write an inclusion proof (JSON) that PATH is part of DIR's tree.
    Prove(merklectl::local::ProveArgs),
    /// Verify an inclusion proof file offline.
    VerifyProof(merklectl::local::VerifyProofArgs),
    /// The Cache service: statistics, status, clear, warm-up.
    Cache(merklectl::cache::CacheArgs),
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
        Command::Cache(args) => block_on(merklectl::cache::run(args)).map(|()| ExitCode::SUCCESS),
        Command::Hash(args) => merklectl::local::hash(args).map(|()| ExitCode::SUCCESS),
        Command::Diff(args) => merklectl::local::diff(args).map(|changed| {
            if changed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }),
        Command::Prove(args) => merklectl::local::prove_cmd(args).map(|()| ExitCode::SUCCESS),
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
