//! The `gochat` binary: parses the command line and the configuration, then calls the service
//! crates. No logic lives here.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use gochat_infra::config::Config;

/// jemalloc instead of glibc malloc: delivery allocates and frees many small, short-lived
/// buffers across threads, where glibc spent about a quarter of the server's CPU
/// (docs/benchmarks.md, sixth session).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// gochat: an actor-based instant-messaging backend.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// A TOML configuration file (see gochat.example.toml); `GOCHAT_*` variables override it.
    #[arg(long, global = true, env = "GOCHAT_CONFIG")]
    config: Option<PathBuf>,
    /// Where the embedded database lives.
    #[arg(long, global = true, default_value = "./data")]
    data_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole chat server in one process: HTTP API and WebSocket on --listen, SQLite in
    /// --data-dir, in-process bus and cache.
    Serve {
        /// HTTP + WebSocket listen address (overrides `[gateway] listen`).
        #[arg(long)]
        listen: Option<String>,
    },
    /// Apply pending database migrations and exit.
    Migrate {
        /// Create the MySQL database first unless it exists.
        #[arg(long)]
        create_database: bool,
    },
    /// Run the repo service (users, messages, groups, conversations, presence) over gRPC,
    /// registered in discovery (distributed mode).
    Repo {
        /// gRPC listen address (overrides `[repo] listen`).
        #[arg(long)]
        listen: Option<String>,
        /// HTTP address of /metrics and /healthz (overrides `[repo] metrics_listen`).
        #[arg(long)]
        metrics_listen: Option<String>,
    },
    /// Run the logic service: auth, conversations and groups over gRPC, and the Conversation
    /// actors consuming `im-upstream-topic` (distributed mode: Kafka, repo via discovery).
    Logic {
        /// gRPC listen address (overrides `[logic] listen`).
        #[arg(long)]
        listen: Option<String>,
        /// HTTP address of /metrics and /healthz (overrides `[logic] metrics_listen`).
        #[arg(long)]
        metrics_listen: Option<String>,
    },
    /// Run a gateway: the HTTP API and WebSocket, logic via discovery, deliveries from its
    /// `im-downstream-topic-{id}` (distributed mode).
    Gateway {
        /// HTTP + WebSocket listen address (overrides `[gateway] listen`).
        #[arg(long)]
        listen: Option<String>,
        /// Gateway id (overrides `[gateway] id`; `auto` claims one in etcd).
        #[arg(long)]
        id: Option<String>,
    },
    /// Run the task service: big-group and world-room fanout from `im-task-topic`
    /// (distributed mode).
    Task {
        /// HTTP address of /metrics and /healthz (overrides `[task] metrics_listen`).
        #[arg(long)]
        metrics_listen: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut config = Config::load(cli.config.as_deref())?;
    init_tracing(&config);
    raise_open_file_limit();
    match &cli.command {
        Command::Logic {
            listen,
            metrics_listen,
        } => {
            if let Some(l) = listen {
                config.logic.listen = l.clone();
            }
            if let Some(m) = metrics_listen {
                config.logic.metrics_listen = m.clone();
            }
            anyhow::ensure!(
                !config.auth.jwt_secret.is_empty(),
                "gochat logic needs [auth] jwt_secret (GOCHAT_AUTH__JWT_SECRET), the same on every logic instance"
            );
            let secret = config.auth.jwt_secret.clone();
            return actix_rt::System::new().block_on(gochat::cluster::run_logic(
                config,
                secret,
                shutdown_signal(),
            ));
        }
        Command::Gateway { listen, id } => {
            if let Some(l) = listen {
                config.gateway.listen = l.clone();
            }
            if let Some(id) = id {
                config.gateway.id = id.clone();
            }
            let listener = bind_listener(&config.gateway.listen)
                .with_context(|| format!("cannot listen on {}", config.gateway.listen))?;
            return actix_rt::System::new().block_on(gochat::cluster::run_gateway(
                config,
                listener,
                shutdown_signal(),
            ));
        }
        Command::Task { metrics_listen } => {
            if let Some(m) = metrics_listen {
                config.task.metrics_listen = m.clone();
            }
            return actix_rt::System::new()
                .block_on(gochat::cluster::run_task(config, shutdown_signal()));
        }
        _ => {}
    }
    if let Command::Serve { listen } = &cli.command {
        if let Some(l) = listen {
            config.gateway.listen = l.clone();
        }
        let listener = bind_listener(&config.gateway.listen)
            .with_context(|| format!("cannot listen on {}", config.gateway.listen))?;
        let options = gochat::ServeOptions {
            data_dir: cli.data_dir.clone(),
            listener,
        };
        // The gateway and the actors run on actix's runtime.
        return actix_rt::System::new().block_on(gochat::serve(
            &config,
            options,
            shutdown_signal(),
        ));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Serve { .. }
            | Command::Logic { .. }
            | Command::Gateway { .. }
            | Command::Task { .. } => Ok(()),
            Command::Migrate { create_database } => {
                let url = gochat_repo::run::database_url(&config, &cli.data_dir);
                if create_database {
                    gochat_repo::store::AnyStore::create_database(&url)
                        .await
                        .context("creating the database")?;
                }
                let store = gochat_repo::store::AnyStore::open(&url, 1)
                    .await
                    .context("migrating the database")?;
                tracing::info!(engine = store.engine(), "migrations applied");
                Ok(())
            }
            Command::Repo {
                listen,
                metrics_listen,
            } => {
                if let Some(l) = listen {
                    config.repo.listen = l;
                }
                if let Some(m) = metrics_listen {
                    config.repo.metrics_listen = m;
                }
                gochat::cluster::run_repo(config, &cli.data_dir, shutdown_signal()).await
            }
        }
    })
}

/// A listening socket with a deep accept backlog (connection storms arrive faster than a
/// worker accepts; the default of 128 would refuse some) and SO_REUSEADDR (quick restarts).
fn bind_listener(addr: &str) -> anyhow::Result<std::net::TcpListener> {
    use std::net::ToSocketAddrs;
    let addr = addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{addr} resolves to no address"))?;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Every WebSocket is a file descriptor: lift the soft limit to the hard one so a server can hold
/// as many connections as the machine allows (the hard limit stays the operator's choice).
fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "open file limit"),
        Err(err) => tracing::warn!(cause = %err, "cannot raise the open file limit"),
    }
}

fn init_tracing(config: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log.filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: logs written to files stay plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if config.log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(cause = %err, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(err) => {
                tracing::error!(cause = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown signal received");
}
