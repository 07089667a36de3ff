//! `gochat-load`: the command line of gochat's load generator (the scenarios live in the
//! library). Scenario results go to stdout (a table, or JSON with `--json`), progress to stderr;
//! the exit status is 1 when a run failed its checks (failures, gaps, duplicates).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gochat_load::report::Outcome;
use gochat_load::users::{self, UserOptions};
use gochat_load::{chat, churn, fanout, guard, repo_bench, storm};

/// The generator shares the machine's cores with the server it measures, so it uses the
/// allocator the server uses (src/main.rs): less of its CPU goes to glibc malloc, and `repo`
/// measures the store with the server's allocator.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// gochat's load generator.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Options every WebSocket scenario takes.
#[derive(Debug, clap::Args)]
struct Common {
    /// The server (`host:port`).
    #[arg(long, default_value = "127.0.0.1:8080")]
    server: String,
    /// Allow a server that is not on a loopback address (only one you own).
    #[arg(long)]
    allow_remote: bool,
    /// Print the result as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// No progress lines on stderr.
    #[arg(long)]
    quiet: bool,
    /// Usernames are `<prefix><i>`.
    #[arg(long, default_value = "load")]
    user_prefix: String,
    /// The token cache (default: $TMPDIR/gochat-load-users-<host>-<port>.json).
    #[arg(long)]
    users_file: Option<PathBuf>,
    /// Neither read nor write the token cache.
    #[arg(long)]
    no_users_cache: bool,
    /// Concurrent register/login requests while creating users.
    #[arg(long, default_value_t = 32)]
    parallel: usize,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Benchmark the data layer: 100-message batch persistence and seq block reservation.
    Repo(repo_bench::Args),
    /// Open N authenticated WebSocket connections at R/s, hold them, close them.
    Storm {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        opts: storm::StormOptions,
    },
    /// Users in pairs and groups sending M messages/s each; latency and seq checks.
    Chat {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        opts: chat::ChatOptions,
    },
    /// One publisher, K online members of the world room or a large group.
    Fanout {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        opts: fanout::FanoutOptions,
    },
    /// Steady connects and disconnects while chat traffic flows.
    Churn {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        opts: churn::ChurnOptions,
    },
    /// A storm worker process (started by `storm --processes P`; speaks JSON lines).
    #[command(hide = true)]
    StormWorker,
}

fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Repo(args) => repo_bench::run(args).await.map(|()| ExitCode::SUCCESS),
            Command::StormWorker => storm::worker_main().await.map(|()| ExitCode::SUCCESS),
            Command::Storm { common, opts } => {
                let (target, users) = prepare(&common, opts.users_needed()).await?;
                let outcome =
                    storm::run(&target, common.allow_remote, &users, &opts, !common.quiet).await?;
                finish(&common, &outcome)
            }
            Command::Chat { common, opts } => {
                let (target, users) = prepare(&common, opts.users).await?;
                finish(
                    &common,
                    &chat::run(&target, &users, &opts, !common.quiet).await?,
                )
            }
            Command::Fanout { common, opts } => {
                let (target, users) = prepare(&common, opts.members + 1).await?;
                finish(
                    &common,
                    &fanout::run(&target, &users, &opts, !common.quiet).await?,
                )
            }
            Command::Churn { common, opts } => {
                let (target, users) = prepare(&common, opts.users()).await?;
                finish(
                    &common,
                    &churn::run(&target, &users, &opts, !common.quiet).await?,
                )
            }
        }
    })
}

/// Checks the target, raises the open-files limit, and gets `count` users.
async fn prepare(
    common: &Common,
    count: usize,
) -> anyhow::Result<(guard::Target, Vec<users::User>)> {
    let target = guard::resolve(&common.server, common.allow_remote).await?;
    let nofile = storm::raise_nofile();
    if !common.quiet {
        eprintln!("target {} (open-files limit {nofile})", target.addr);
    }
    let cache = if common.no_users_cache {
        None
    } else {
        Some(
            common
                .users_file
                .clone()
                .unwrap_or_else(|| users::default_cache(&target)),
        )
    };
    let opts = UserOptions {
        prefix: common.user_prefix.clone(),
        parallel: common.parallel,
        cache,
        progress: !common.quiet,
    };
    let users = users::ensure(&target, &opts, count).await?;
    Ok((target, users))
}

/// Prints the outcome; exit status 1 when the run failed its checks.
fn finish(common: &Common, outcome: &impl Outcome) -> anyhow::Result<ExitCode> {
    if common.json {
        println!("{}", serde_json::to_string_pretty(outcome)?);
    } else {
        print!("{}", outcome.table().render());
    }
    if outcome.passed() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("the run failed its checks (failures, gaps, duplicates or missing deliveries)");
        Ok(ExitCode::FAILURE)
    }
}
