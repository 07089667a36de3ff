//! `gochat serve`: the four services in one process on the embedded default (SQLite, the
//! in-process bus, the in-process cache), calling each other in-process through the same
//! service traits the distributed mode reaches over gRPC.
//!
//! [`serve`] installs the process's metrics recorder, opens (and migrates) the database, starts
//! logic's upstream consumer and the task service on the bus, and runs the gateway's HTTP +
//! WebSocket server on the given listener until the shutdown future resolves. The same listener
//! serves `/metrics` and, with an admin token, `/admin` and `/admin/actors`, fed by
//! [`ServeAdmin`]; a sampler records bus lag every second. It must run inside an actix `System`
//! (the gateway and the actors need one); `main` and the tests provide it.

pub mod cluster;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use gochat_gateway::{AdminSource, BusyConversation};
use gochat_infra::config::Config;
use gochat_infra::mq::memory::{MemoryBus, MemoryBusConfig};
use gochat_infra::telemetry::{self, PrometheusHandle};
use gochat_infra::wire::{TASK_TOPIC, UPSTREAM_TOPIC, downstream_topic};
use gochat_logic::{Logic, LogicSettings};
use gochat_repo::Repo;
use gochat_task::TaskStats;

/// Everything `serve` needs besides the configuration.
#[derive(Debug)]
pub struct ServeOptions {
    /// Where the SQLite file and the generated JWT secret live.
    pub data_dir: PathBuf,
    /// The HTTP + WebSocket listener (bound by the caller, so tests can use port 0).
    pub listener: std::net::TcpListener,
}

/// The JWT secret: the configured one, or the one kept in `<data_dir>/jwt_secret` (created on
/// first start with 256 random bits, readable only by its owner).
pub fn jwt_secret(config: &Config, data_dir: &Path) -> anyhow::Result<String> {
    if !config.auth.jwt_secret.is_empty() {
        return Ok(config.auth.jwt_secret.clone());
    }
    let path = data_dir.join("jwt_secret");
    if let Ok(existing) = std::fs::read_to_string(&path) {
        let s = existing.trim().to_owned();
        anyhow::ensure!(
            s.len() >= 32,
            "{} holds a secret shorter than 32 bytes",
            path.display()
        );
        return Ok(s);
    }
    let secret = format!(
        "{:032x}{:032x}",
        rand::random::<u128>(),
        rand::random::<u128>()
    );
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    write_private(&path, &secret).with_context(|| format!("writing {}", path.display()))?;
    tracing::info!(path = %path.display(), "generated a JWT secret");
    Ok(secret)
}

#[cfg(unix)]
fn write_private(path: &Path, content: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(content.as_bytes())
}

#[cfg(not(unix))]
fn write_private(path: &Path, content: &str) -> std::io::Result<()> {
    std::fs::write(path, content)
}

/// Logic's settings from configuration.
pub fn logic_settings(config: &Config, jwt_secret: String) -> LogicSettings {
    let defaults = LogicSettings::default();
    LogicSettings {
        jwt_secret,
        access_ttl: Duration::from_secs(config.auth.access_ttl_secs.max(1)),
        refresh_ttl: Duration::from_secs(config.auth.refresh_ttl_secs.max(1)),
        node_id: config.logic.node_id,
        arbiters: if config.logic.arbiters == 0 {
            defaults.arbiters
        } else {
            config.logic.arbiters
        },
        mailbox_capacity: config.logic.mailbox_capacity.max(1),
        max_batch: config.logic.max_batch.max(1),
        idle_timeout: Duration::from_secs(config.logic.idle_timeout_secs.max(1)),
        async_fanout_threshold: config.logic.async_fanout_threshold,
        max_content_chars: config.gateway.max_content_chars,
        presence_ttl: Duration::from_secs(config.repo.presence_ttl_secs.max(1)),
        membership_ttl: Duration::from_secs(config.logic.membership_cache_secs),
        ..defaults
    }
}

/// The gateway's settings from configuration.
pub fn gateway_settings(config: &Config) -> gochat_gateway::GatewaySettings {
    gochat_gateway::GatewaySettings {
        gateway_id: config.gateway.id.clone(),
        max_frame_bytes: config.gateway.max_frame_bytes,
        max_content_chars: config.gateway.max_content_chars,
        outbound_queue: config.gateway.outbound_queue.max(1),
        heartbeat_timeout: Duration::from_secs(config.gateway.heartbeat_timeout_secs.max(1)),
        presence_ttl: Duration::from_secs(config.repo.presence_ttl_secs.max(3)),
        presence_wait: Duration::from_millis(config.gateway.presence_wait_ms),
        downstream_partitions: config.bus.partitions,
        workers: config.gateway.workers,
        admin_token: config.admin.token.clone(),
        ..gochat_gateway::GatewaySettings::default()
    }
}

/// The consumer groups of one `serve` process and the topic each reads: logic on the upstream
/// topic, task on the task topic, the gateway on its downstream topic.
#[derive(Debug, Clone)]
pub struct BusLag {
    bus: MemoryBus,
    /// (group, topic).
    groups: Vec<(String, String)>,
}

impl BusLag {
    /// The groups of `serve` with gateway `gateway_id`.
    pub fn new(bus: MemoryBus, gateway_id: &str) -> Self {
        Self {
            bus,
            groups: vec![
                (
                    gochat_logic::upstream::GROUP.to_owned(),
                    UPSTREAM_TOPIC.to_owned(),
                ),
                (
                    gochat_task::CONSUMER_GROUP.to_owned(),
                    TASK_TOPIC.to_owned(),
                ),
                (
                    gochat_gateway::consumer_group(gateway_id),
                    downstream_topic(gateway_id),
                ),
            ],
        }
    }

    /// Records not yet committed, by group.
    pub fn read(&self) -> BTreeMap<String, u64> {
        self.groups
            .iter()
            .map(|(group, topic)| (group.clone(), self.bus.lag(group, topic)))
            .collect()
    }

    /// Every second until `stop`: sets `gochat_bus_consumer_lag` for each group and folds the
    /// histogram samples recorded since into their buckets (`run_upkeep`).
    pub async fn sample(self, metrics: PrometheusHandle, stop: impl Future<Output = ()>) {
        let gauges: Vec<_> = self
            .groups
            .iter()
            .map(|(group, topic)| {
                metrics::gauge!(telemetry::BUS_LAG, "group" => group.clone(), "topic" => topic.clone())
            })
            .collect();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut stop = std::pin::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = tick.tick() => {}
            }
            for ((group, topic), gauge) in self.groups.iter().zip(&gauges) {
                gauge.set(self.bus.lag(group, topic) as f64);
            }
            metrics.run_upkeep();
        }
    }
}

/// The `busiest_conversations` rows of `/admin/actors` from logic's view of its actors.
pub(crate) fn busy_rows(
    loads: Vec<gochat_logic::conversation::ConversationLoad>,
) -> Vec<BusyConversation> {
    loads
        .into_iter()
        .map(|c| BusyConversation {
            conversation_id: c.conversation_id,
            queued: c.queued,
            messages_per_sec: c.messages_per_sec,
        })
        .collect()
}

/// What `/admin/actors` reads from the services of one `serve` process: logic's Conversation
/// actors, the task service's Fanout actors and the bus.
pub struct ServeAdmin {
    /// Conversation actors and their load.
    pub logic: Logic<Repo, MemoryBus>,
    /// Fanout actors.
    pub task: Arc<TaskStats>,
    /// Lag of the consumer groups.
    pub lag: BusLag,
}

impl std::fmt::Debug for ServeAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeAdmin")
            .field("lag", &self.lag)
            .finish_non_exhaustive()
    }
}

impl AdminSource for ServeAdmin {
    fn process(&self) -> &'static str {
        "serve"
    }

    fn conversation_actors(&self) -> Option<u64> {
        Some(self.logic.conversation_actors() as u64)
    }

    fn fanout_actors(&self) -> Option<u64> {
        Some(self.task.fanout_actors())
    }

    fn busiest_conversations(&self, limit: usize) -> Vec<BusyConversation> {
        busy_rows(self.logic.busiest(limit))
    }

    fn bus_lag(&self) -> BTreeMap<String, u64> {
        self.lag.read()
    }
}

/// Runs the whole chat server in this process until `shutdown` resolves; then closes every
/// WebSocket session (going away), lets the consumers finish what they hold, and returns.
pub async fn serve(
    config: &Config,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let metrics = telemetry::install();
    std::fs::create_dir_all(&options.data_dir)
        .with_context(|| format!("creating {}", options.data_dir.display()))?;
    let secret = jwt_secret(config, &options.data_dir)?;
    let repo = gochat_repo::run::build(config, &options.data_dir)
        .await
        .context("opening the data layer")?;
    let bus = MemoryBus::new(MemoryBusConfig {
        default_partitions: config.bus.partitions,
        ..MemoryBusConfig::default()
    });
    let logic = Logic::new(repo.clone(), bus.clone(), logic_settings(config, secret))
        .map_err(|e| anyhow::anyhow!("starting logic: {e}"))?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let upstream = {
        let logic = logic.clone();
        let partitions = config.bus.partitions;
        let rx = stop_rx.clone();
        // A thread of its own: every message passes through this consumer.
        gochat_infra::rt::OwnThread::spawn(async move {
            logic.run_upstream(partitions, stopped(rx)).await
        })
    };
    let task_service = gochat_task::TaskService::new(
        gochat_task::TaskSettings {
            task_partitions: config.bus.partitions,
            ..gochat_task::TaskSettings::default()
        },
        repo.clone(),
        bus.clone(),
        gochat_task::StaticGateways::new(vec![config.gateway.id.clone()]),
    );
    let task_stats = task_service.stats();
    let task = {
        let rx = stop_rx.clone();
        actix_rt::spawn(async move { task_service.run(stopped(rx)).await })
    };
    let lag = BusLag::new(bus.clone(), &config.gateway.id);
    let sampler = actix_rt::spawn(
        lag.clone()
            .sample(metrics.clone(), stopped(stop_rx.clone())),
    );
    let admin = ServeAdmin {
        logic: logic.clone(),
        task: task_stats,
        lag,
    };

    tracing::info!(
        addr = %options.listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        data_dir = %options.data_dir.display(),
        "gochat serving HTTP and WebSocket"
    );
    let served = gochat_gateway::Gateway::new(gateway_settings(config), logic, bus.clone())
        .with_metrics(metrics)
        .with_admin(Arc::new(admin))
        .run(options.listener, shutdown)
        .await;

    // The gateway is down: let the consumers finish what they hold, then close the bus.
    let _ = stop_tx.send(true);
    let grace = Duration::from_secs(10);
    match tokio::time::timeout(grace, upstream.join()).await {
        Ok(Some(Err(e))) => tracing::warn!(cause = %e, "upstream consumer ended with an error"),
        Err(_) => tracing::warn!("upstream consumer did not finish within the grace period"),
        _ => {}
    }
    match tokio::time::timeout(grace, task).await {
        Ok(Ok(Err(e))) => tracing::warn!(cause = %e, "task service ended with an error"),
        Err(_) => tracing::warn!("task service did not finish within the grace period"),
        _ => {}
    }
    let _ = sampler.await;
    bus.close();
    served.context("gateway")?;
    tracing::info!("gochat stopped");
    Ok(())
}
