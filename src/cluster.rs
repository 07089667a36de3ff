//! The distributed mode: `gochat repo|logic|gateway|task`, each service in its own process, on
//! Kafka (the bus), etcd or static addresses (discovery) and gRPC (calls between services),
//! with MySQL/MariaDB and Redis behind repo. The same service code as `serve` runs here; only
//! what joins the services differs.
//!
//! What each process does at start, besides its service:
//!
//! - **repo**: claims a snowflake node id (`repo-node-N` in etcd; the configured one with static
//!   discovery), serves gRPC, registers as `repo`.
//! - **logic**: claims its node id (`logic-node-N`), connects to repo through discovery, creates
//!   the topics it consumes and produces (`im-upstream-topic`, `im-task-topic`), consumes
//!   upstream as group `im-logic` (Kafka's partition assignment decides which logic owns which
//!   conversations), serves gRPC, registers as `logic`.
//! - **gateway**: claims its gateway id (`gw-N` for `auto`, or exactly the configured one),
//!   connects to logic through discovery, creates `im-upstream-topic` and its own
//!   `im-downstream-topic-{id}`, serves HTTP + WebSocket, registers as `gateway`.
//! - **task**: connects to repo, follows the live gateway ids (the world room reaches each),
//!   consumes `im-task-topic` as group `im-task`.
//!
//! Every process deregisters (and releases its ids) when it stops cleanly; a crashed one
//! disappears when its etcd lease expires (`discovery.lease_ttl_secs`).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use gochat_gateway::{AdminSlot, AdminSource, BusyConversation};
use gochat_infra::config::{BusBackend, Config, DiscoveryBackend};
use gochat_infra::discovery::{Discovery, EtcdClient, Registration};
use gochat_infra::mq::Bus;
use gochat_infra::mq::kafka::{KafkaBus, KafkaConfig};
use gochat_infra::telemetry::{self, PrometheusHandle};
use gochat_infra::wire::{TASK_TOPIC, UPSTREAM_TOPIC, downstream_topic};
use gochat_logic::Logic;
use gochat_logic::client::LogicClient;
use gochat_repo::client::RepoClient;
use gochat_task::LiveGateways;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Service names in discovery.
pub const REPO_SERVICE: &str = "repo";
/// The logic service.
pub const LOGIC_SERVICE: &str = "logic";
/// The gateways (instance = gateway id, address = HTTP listen address).
pub const GATEWAY_SERVICE: &str = "gateway";
/// Id kind of gateway ids (`gw-1`, `gw-2`, ...).
pub const GATEWAY_ID_KIND: &str = "gw";

/// The discovery the configuration names: etcd, or the static addresses of `[discovery]`.
pub async fn discovery(config: &Config) -> anyhow::Result<Discovery> {
    match config.discovery.backend {
        DiscoveryBackend::Static => {
            let mut services = BTreeMap::new();
            services.insert(REPO_SERVICE.to_owned(), config.discovery.repo_addrs.clone());
            services.insert(
                LOGIC_SERVICE.to_owned(),
                config.discovery.logic_addrs.clone(),
            );
            Ok(Discovery::Static { services })
        }
        DiscoveryBackend::Etcd => {
            let client =
                EtcdClient::connect(&config.discovery.etcd_endpoints, &config.discovery.prefix)
                    .await
                    .context("connecting to etcd")?;
            Ok(Discovery::Etcd(client))
        }
    }
}

/// The Kafka bus of the distributed services (`[bus] backend = "kafka"` is required: the
/// in-process bus cannot join processes).
pub async fn kafka(config: &Config, client_id: &str) -> anyhow::Result<KafkaBus> {
    if config.bus.backend != BusBackend::Kafka {
        bail!(
            "the distributed services need [bus] backend = \"kafka\" (GOCHAT_BUS__BACKEND=kafka); the memory bus only joins the services of one `gochat serve`"
        );
    }
    let session = config.bus.session_timeout_ms.max(1000);
    let mut properties = BTreeMap::from([
        ("session.timeout.ms".to_owned(), session.to_string()),
        (
            "heartbeat.interval.ms".to_owned(),
            (session / 3).to_string(),
        ),
    ]);
    properties.extend(config.bus.properties.clone());
    KafkaBus::connect(KafkaConfig {
        brokers: config.bus.brokers.clone(),
        client_id: client_id.to_owned(),
        replication_factor: config.bus.replication_factor,
        namespace: config.bus.namespace.clone(),
        properties,
        ..KafkaConfig::default()
    })
    .await
    .with_context(|| format!("connecting to Kafka at {}", config.bus.brokers))
}

/// How long a TCP connect to another service may take.
fn connect_timeout(config: &Config) -> Duration {
    Duration::from_millis(config.rpc.connect_timeout_ms.max(1))
}

/// The lease TTL of registrations.
fn lease_ttl(config: &Config) -> Duration {
    Duration::from_secs(config.discovery.lease_ttl_secs.max(2))
}

/// `http://listen` unless an advertised address is configured; a wildcard listen address needs
/// one.
fn advertised(listen: &str, advertise: &str, what: &str) -> anyhow::Result<String> {
    if !advertise.trim().is_empty() {
        let a = advertise.trim();
        return Ok(if a.contains("://") {
            a.to_owned()
        } else {
            format!("http://{a}")
        });
    }
    if listen.starts_with("0.0.0.0") || listen.starts_with("[::]") {
        bail!("{what}.listen is {listen}: set {what}.advertise to the address others dial");
    }
    Ok(format!("http://{listen}"))
}

/// A snowflake node id unique among the live instances of a kind: claimed in etcd
/// (`{kind}-N`), or the configured one with static discovery. The registration holds the claim.
async fn node_id(
    discovery: &Discovery,
    kind: &str,
    configured: u16,
    ttl: Duration,
) -> anyhow::Result<(u16, Option<Registration>)> {
    let Discovery::Etcd(etcd) = discovery else {
        return Ok((configured, None));
    };
    let (id, hold) = etcd
        .claim(kind, ttl)
        .await
        .with_context(|| format!("claiming a {kind} id in etcd"))?;
    let n: u16 = id
        .strip_prefix(&format!("{kind}-"))
        .and_then(|n| n.parse().ok())
        .filter(|n| *n <= gochat_infra::ids::MAX_NODE_ID)
        .with_context(|| format!("claimed id {id} is not a node id (0..=1023)"))?;
    tracing::info!(kind, node_id = n, "claimed a node id");
    Ok((n, Some(hold)))
}

/// Releases a registration at once (a clean stop), logging a failure.
async fn release(hold: Option<Registration>, what: &str) {
    if let Some(h) = hold
        && let Err(e) = h.deregister().await
    {
        tracing::warn!(cause = %e, what, "could not deregister (the lease expires on its own)");
    }
}

/// The operator side of one distributed process: its metrics recorder, folded every second,
/// and, when a metrics listener is configured, `/metrics` and `/healthz` there from the start
/// (a taken port fails the start) with `/admin` once the service is up ([`Ops::attach`]).
struct Ops {
    slot: Option<AdminSlot>,
    /// The metrics upkeep and lag sampler; dropping `Ops` (at the end of the service's run)
    /// aborts them.
    background: JoinSet<()>,
}

impl Ops {
    /// Installs the process's metrics recorder, starts folding it, and serves `listen` when it
    /// is set.
    fn bind(config: &Config, listen: &str) -> anyhow::Result<Self> {
        let handle = telemetry::install();
        let mut background = JoinSet::new();
        background.spawn(upkeep(handle.clone()));
        if listen.trim().is_empty() {
            return Ok(Self {
                slot: None,
                background,
            });
        }
        let listener = std::net::TcpListener::bind(listen.trim())
            .with_context(|| format!("cannot listen on {listen} (metrics)"))?;
        let slot = gochat_gateway::spawn_ops_server(listener, handle, config.admin.token.clone())
            .with_context(|| format!("serving metrics on {listen}"))?;
        Ok(Self {
            slot: Some(slot),
            background,
        })
    }

    /// The service is up: reads its consumer lag from now on, and `/admin` shows `admin`.
    fn attach(&mut self, admin: ProcessAdmin) {
        let admin = Arc::new(admin);
        self.background.spawn(sample_lag(Arc::clone(&admin)));
        if let Some(slot) = &self.slot {
            let _ = slot.set(admin);
        }
    }
}

/// How often the Kafka consumer lag of a process's group is read (a metadata, a committed
/// offsets and a watermark request per partition, on a blocking thread).
const LAG_EVERY: Duration = Duration::from_secs(5);

/// Until aborted (the service's run ends): folds histogram samples into their buckets every
/// second (`run_upkeep`), whether or not anyone scrapes.
async fn upkeep(handle: PrometheusHandle) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        handle.run_upkeep();
    }
}

/// Until aborted (the service's run ends): reads the consumer lag of `admin`'s group from
/// Kafka every [`LAG_EVERY`] (on its own task, so a slow broker holds nothing else back).
async fn sample_lag(admin: Arc<ProcessAdmin>) {
    let mut tick = tokio::time::interval(LAG_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        admin.sample_lag().await;
    }
}

/// What `/admin/actors` shows of one distributed process: its own actors (Conversation actors
/// in logic, Fanout actors in task; a gateway's sessions come from the gateway itself) and the
/// lag of the consumer group it reads in.
pub struct ProcessAdmin {
    process: &'static str,
    logic: Option<Logic<RepoClient, KafkaBus>>,
    task: Option<Arc<gochat_task::TaskStats>>,
    bus: KafkaBus,
    /// (group, topic) this process consumes in.
    group: (String, String),
    /// The last lag read; absent until the first read succeeds, or after a failed one.
    lag: std::sync::Mutex<Option<u64>>,
}

impl std::fmt::Debug for ProcessAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessAdmin")
            .field("process", &self.process)
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl ProcessAdmin {
    fn new(process: &'static str, bus: KafkaBus, group: &str, topic: &str) -> Self {
        Self {
            process,
            logic: None,
            task: None,
            bus,
            group: (group.to_owned(), topic.to_owned()),
            lag: std::sync::Mutex::new(None),
        }
    }

    fn last_lag(&self) -> std::sync::MutexGuard<'_, Option<u64>> {
        self.lag
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reads the group's lag from Kafka into the gauge and the admin view.
    async fn sample_lag(&self) {
        let (group, topic) = &self.group;
        match self.bus.lag(group, topic).await {
            Ok(lag) => {
                metrics::gauge!(telemetry::BUS_LAG, "group" => group.clone(), "topic" => topic.clone())
                    .set(lag as f64);
                *self.last_lag() = Some(lag);
            }
            Err(e) => {
                // Not a frozen last value: the gauge reads NaN and the admin view drops the
                // group until a read succeeds again.
                metrics::gauge!(telemetry::BUS_LAG, "group" => group.clone(), "topic" => topic.clone())
                    .set(f64::NAN);
                if self.last_lag().take().is_some() {
                    tracing::warn!(cause = %e, group, topic, "could not read the consumer lag");
                } else {
                    tracing::debug!(cause = %e, group, topic, "could not read the consumer lag");
                }
            }
        }
    }
}

impl AdminSource for ProcessAdmin {
    fn process(&self) -> &'static str {
        self.process
    }

    fn conversation_actors(&self) -> Option<u64> {
        self.logic.as_ref().map(|l| l.conversation_actors() as u64)
    }

    fn fanout_actors(&self) -> Option<u64> {
        self.task.as_ref().map(|t| t.fanout_actors())
    }

    fn busiest_conversations(&self, limit: usize) -> Vec<BusyConversation> {
        self.logic
            .as_ref()
            .map_or_else(Vec::new, |l| crate::busy_rows(l.busiest(limit)))
    }

    fn bus_lag(&self) -> BTreeMap<String, u64> {
        let lag = *self.last_lag();
        lag.map(|lag| (self.group.0.clone(), lag))
            .into_iter()
            .collect()
    }
}

/// A name for this instance in discovery: its address and process id.
fn instance_name(addr: &str) -> String {
    let bare = addr.split("://").nth(1).unwrap_or(addr);
    format!("{}-{}", bare.replace(['/', ':'], "_"), std::process::id())
}

/// `gochat repo`: the five repo services over gRPC on MySQL/MariaDB (or SQLite) and Redis (or
/// the memory cache), registered in discovery.
pub async fn run_repo(
    mut config: Config,
    data_dir: &Path,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let _ops = Ops::bind(&config, &config.repo.metrics_listen)?;
    let discovery = discovery(&config).await?;
    let ttl = lease_ttl(&config);
    let (node, node_hold) = node_id(&discovery, "repo-node", config.repo.node_id, ttl).await?;
    config.repo.node_id = node;
    let repo = gochat_repo::run::build(&config, data_dir)
        .await
        .context("opening the data layer")?;
    let listener = tokio::net::TcpListener::bind(&config.repo.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.repo.listen))?;
    let addr = advertised(&config.repo.listen, &config.repo.advertise, "repo")?;
    let registration = discovery
        .register(REPO_SERVICE, &instance_name(&addr), &addr, ttl)
        .await
        .context("registering in etcd")?;
    tracing::info!(listen = %config.repo.listen, %addr, node_id = node, "repo gRPC serving");
    let served = repo.serve(listener, shutdown).await;
    release(registration, "repo").await;
    release(node_hold, "repo node id").await;
    served.context("repo gRPC server")?;
    tracing::info!("repo stopped");
    Ok(())
}

/// `gochat logic`: the logic services over gRPC and the upstream consumer (Conversation actors)
/// on Kafka; repo through discovery. Runs inside an actix `System`.
pub async fn run_logic(
    mut config: Config,
    jwt_secret: String,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut ops = Ops::bind(&config, &config.logic.metrics_listen)?;
    let discovery = discovery(&config).await?;
    let ttl = lease_ttl(&config);
    let (node, node_hold) = node_id(&discovery, "logic-node", config.logic.node_id, ttl).await?;
    config.logic.node_id = node;
    let bus = kafka(&config, &format!("gochat-logic-{node}")).await?;
    for topic in [UPSTREAM_TOPIC, TASK_TOPIC] {
        bus.ensure_topic(topic, config.bus.partitions)
            .await
            .with_context(|| format!("creating {topic}"))?;
    }
    let repo = RepoClient::new(
        discovery
            .channel_with_timeout(REPO_SERVICE, connect_timeout(&config))
            .await
            .context("finding repo")?,
        config.rpc.policy(),
    );
    let logic = Logic::new(
        repo,
        bus.clone(),
        crate::logic_settings(&config, jwt_secret),
    )
    .map_err(|e| anyhow::anyhow!("starting logic: {e}"))?;
    ops.attach(ProcessAdmin {
        logic: Some(logic.clone()),
        ..ProcessAdmin::new("logic", bus, gochat_logic::upstream::GROUP, UPSTREAM_TOPIC)
    });
    let listener = tokio::net::TcpListener::bind(&config.logic.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.logic.listen))?;
    let addr = advertised(&config.logic.listen, &config.logic.advertise, "logic")?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let grpc = {
        let routes = logic.routes();
        let rx = stop_rx.clone();
        actix_rt::spawn(
            async move { gochat_infra::rpc::serve(routes, listener, stopped(rx)).await },
        )
    };
    let registration = discovery
        .register(LOGIC_SERVICE, &instance_name(&addr), &addr, ttl)
        .await
        .context("registering in etcd")?;
    tracing::info!(listen = %config.logic.listen, %addr, node_id = node, "logic serving gRPC and consuming upstream");
    let partitions = config.bus.partitions;
    let consumed = logic
        .run_upstream(partitions, async {
            shutdown.await;
        })
        .await;
    // Leave discovery first so callers stop choosing this instance, then finish the calls in
    // flight.
    release(registration, "logic").await;
    let _ = stop_tx.send(true);
    match tokio::time::timeout(Duration::from_secs(10), grpc).await {
        Ok(Ok(Err(e))) => tracing::warn!(cause = %e, "logic gRPC server ended with an error"),
        Err(_) => tracing::warn!("logic gRPC server did not stop within 10 s"),
        _ => {}
    }
    release(node_hold, "logic node id").await;
    consumed.context("upstream consumer")?;
    tracing::info!("logic stopped");
    Ok(())
}

/// `gochat gateway`: HTTP API and WebSocket on `[gateway] listen`, logic through discovery,
/// deliveries from `im-downstream-topic-{id}`. Runs inside an actix `System`.
pub async fn run_gateway(
    mut config: Config,
    listener: std::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let metrics = telemetry::install();
    let discovery = discovery(&config).await?;
    let ttl = lease_ttl(&config);
    let id_hold = match &discovery {
        Discovery::Etcd(etcd) if config.gateway.id == "auto" => {
            let (id, hold) = etcd
                .claim(GATEWAY_ID_KIND, ttl)
                .await
                .context("claiming a gateway id in etcd")?;
            config.gateway.id = id;
            Some(hold)
        }
        Discovery::Etcd(etcd) => Some(
            etcd.claim_exact(GATEWAY_ID_KIND, &config.gateway.id, ttl)
                .await
                .with_context(|| format!("claiming gateway id {}", config.gateway.id))?,
        ),
        Discovery::Static { .. } if config.gateway.id == "auto" => {
            bail!("gateway.id = \"auto\" needs etcd discovery; configure an id")
        }
        Discovery::Static { .. } => None,
    };
    let id = config.gateway.id.clone();
    let bus = kafka(&config, &format!("gochat-gateway-{id}")).await?;
    bus.ensure_topic(UPSTREAM_TOPIC, config.bus.partitions)
        .await
        .context("creating the upstream topic")?;
    let logic = LogicClient::new(
        discovery
            .channel_with_timeout(LOGIC_SERVICE, connect_timeout(&config))
            .await
            .context("finding logic")?,
        config.rpc.policy(),
    );
    let addr = format!(
        "http://{}",
        listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default()
    );
    let registration = discovery
        .register(GATEWAY_SERVICE, &id, &addr, ttl)
        .await
        .context("registering in etcd")?;
    tracing::info!(gateway_id = %id, %addr, "gateway serving HTTP and WebSocket");
    let admin = Arc::new(ProcessAdmin::new(
        "gateway",
        bus.clone(),
        &gochat_gateway::consumer_group(&id),
        &downstream_topic(&id),
    ));
    // Aborted when this function returns (dropped with the set).
    let mut background = JoinSet::new();
    background.spawn(upkeep(metrics.clone()));
    background.spawn(sample_lag(Arc::clone(&admin)));
    let served = gochat_gateway::Gateway::new(crate::gateway_settings(&config), logic, bus)
        .with_metrics(metrics)
        .with_admin(admin)
        .run(listener, shutdown)
        .await;
    release(registration, "gateway").await;
    release(id_hold, "gateway id").await;
    served.context("gateway")?;
    tracing::info!(gateway_id = %id, "gateway stopped");
    Ok(())
}

/// The live gateway ids from etcd.
#[derive(Debug, Clone)]
struct WatchedGateways(watch::Receiver<BTreeSet<String>>);

impl LiveGateways for WatchedGateways {
    fn gateways(&self) -> Vec<String> {
        self.0.borrow().iter().cloned().collect()
    }
}

/// `gochat task`: fanout of big groups and the world room, from `im-task-topic`; repo through
/// discovery; the world room goes to every live gateway. Runs inside an actix `System`.
pub async fn run_task(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let mut ops = Ops::bind(&config, &config.task.metrics_listen)?;
    let discovery = discovery(&config).await?;
    let bus = kafka(&config, &format!("gochat-task-{}", std::process::id())).await?;
    let repo = RepoClient::new(
        discovery
            .channel_with_timeout(REPO_SERVICE, connect_timeout(&config))
            .await
            .context("finding repo")?,
        config.rpc.policy(),
    );
    let gateways: Arc<dyn LiveGateways> = match &discovery {
        Discovery::Etcd(etcd) => Arc::new(WatchedGateways(
            etcd.watch_ids(GATEWAY_ID_KIND)
                .await
                .context("watching the gateways")?,
        )),
        Discovery::Static { .. } => Arc::new(gochat_task::StaticGateways::new(
            config.discovery.gateway_ids.clone(),
        )),
    };
    let service = gochat_task::TaskService::new(
        gochat_task::TaskSettings {
            task_partitions: config.bus.partitions,
            ..gochat_task::TaskSettings::default()
        },
        repo,
        bus.clone(),
        gateways,
    );
    ops.attach(ProcessAdmin {
        task: Some(service.stats()),
        ..ProcessAdmin::new("task", bus, gochat_task::CONSUMER_GROUP, TASK_TOPIC)
    });
    tracing::info!("task consuming im-task-topic");
    service
        .run(async {
            shutdown.await;
        })
        .await
        .map_err(|e| anyhow::anyhow!("task service: {e}"))?;
    tracing::info!("task stopped");
    Ok(())
}
