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
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Up(args) => merklectl::up::run(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("merklectl: {err:#}");
            ExitCode::FAILURE
        }
    }
}
