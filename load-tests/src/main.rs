//! `gochat-load`: gochat's load generator and benchmarks.
//!
//! Today it has the data-layer benchmark (`repo`): batch persistence and seq reservation through
//! the repo service, in-process, against SQLite or MySQL/MariaDB and the memory or Redis cache.
//! The WebSocket scenarios (storm, chat, fanout, churn) arrive with the serve issue.

mod repo_bench;

use clap::{Parser, Subcommand};

/// gochat's load generator.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Benchmark the data layer: 100-message batch persistence and seq block reservation.
    Repo(repo_bench::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Repo(args) => repo_bench::run(args).await,
        }
    })
}
