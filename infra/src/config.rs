//! gochat's configuration: one typed struct, read from defaults, then an optional TOML file,
//! then `GOCHAT_`-prefixed environment variables (`__` separates sections:
//! `GOCHAT_DATABASE__URL=mysql://...` sets `[database] url`). Every field is documented in
//! `gochat.example.toml`. Unknown fields and wrong types are refused with a message naming them.
//!
//! Layering uses figment: it merges sources and reports which source a bad value came from.

use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where repo keeps its data.
    pub database: DatabaseConfig,
    /// Repo's cache.
    pub cache: CacheConfig,
    /// The repo service.
    pub repo: RepoConfig,
    /// The gateway (HTTP API and WebSocket).
    pub gateway: GatewayConfig,
    /// Tokens.
    pub auth: AuthConfig,
    /// The logic service.
    pub logic: LogicConfig,
    /// The task service.
    pub task: TaskConfig,
    /// The message bus.
    pub bus: BusConfig,
    /// How services find each other (distributed mode).
    pub discovery: DiscoveryConfig,
    /// Calls between services over gRPC (distributed mode).
    pub rpc: RpcConfig,
    /// Logging.
    pub log: LogConfig,
    /// Admin endpoints.
    pub admin: AdminConfig,
}

/// `[database]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `sqlite://PATH` (or a plain path) for the embedded default, `mysql://user:pass@host/db`
    /// for MySQL/MariaDB. Empty: `<data_dir>/gochat.db`.
    pub url: String,
    /// Connections in the pool (SQLite: reader connections; there is always one writer).
    pub pool_size: usize,
    /// SQLite: the nice value (-20..=19, Linux) the writer's group commits run at. Every stored
    /// message waits for that one thread, so by default it goes ahead of the sessions and
    /// actors when the machine is busy. Going below 0 needs `CAP_SYS_NICE` or `RLIMIT_NICE`
    /// (root has it); without it the writer keeps the process's priority and says so once.
    /// 0 leaves the writer's thread alone.
    pub writer_nice: i32,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            pool_size: 8,
            writer_nice: -10,
        }
    }
}

/// Which cache backs repo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheBackend {
    /// In-process (moka); the embedded default.
    Memory,
    /// Redis, shared by every repo instance.
    Redis,
}

/// `[cache]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// `memory` or `redis`.
    pub backend: CacheBackend,
    /// Redis URL, used when `backend = "redis"`.
    pub redis_url: String,
    /// Prefix of every key, so several deployments can share one Redis.
    pub namespace: String,
    /// Entries the memory backend keeps at most (presence, one per online user, not counted).
    pub max_entries: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            backend: CacheBackend::Memory,
            redis_url: "redis://127.0.0.1:6379".into(),
            namespace: "gochat:".into(),
            max_entries: 1_000_000,
        }
    }
}

/// `[repo]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RepoConfig {
    /// gRPC listen address of `gochat repo`.
    pub listen: String,
    /// The address other services dial, as registered in etcd (`http://host:port`). Empty:
    /// derived from `listen`.
    pub advertise: String,
    /// HTTP address of `/metrics` and `/healthz` for `gochat repo`. Empty: none.
    pub metrics_listen: String,
    /// Snowflake node id of this instance (0..=1023), unique among repo instances.
    pub node_id: u16,
    /// Largest group.
    pub max_group_members: i64,
    /// Argon2id memory cost in KiB.
    pub argon2_memory_kib: u32,
    /// Argon2id passes.
    pub argon2_iterations: u32,
    /// Seconds a presence entry lasts unless its gateway refreshes it.
    pub presence_ttl_secs: u64,
}

impl Default for RepoConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9100".into(),
            advertise: String::new(),
            metrics_listen: String::new(),
            node_id: 0,
            max_group_members: 100_000,
            argon2_memory_kib: 19_456,
            argon2_iterations: 2,
            presence_ttl_secs: 30,
        }
    }
}

/// `[gateway]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// HTTP + WebSocket listen address (`serve` and `gochat gateway`).
    pub listen: String,
    /// This gateway's id, unique among live gateways (names its downstream topic). With etcd
    /// discovery, `auto` claims the first free `gw-N`; a fixed id is claimed exactly (a second
    /// live gateway with the same id is refused at start).
    pub id: String,
    /// Largest WebSocket frame in bytes.
    pub max_frame_bytes: usize,
    /// Longest message content in characters.
    pub max_content_chars: usize,
    /// Frames queued for one connection before it is closed as too slow.
    pub outbound_queue: usize,
    /// A connection silent for this many seconds is closed.
    pub heartbeat_timeout_secs: u64,
    /// How long (ms) an upgrade waits for its user's presence report before answering 101
    /// anyway (0: no wait).
    pub presence_wait_ms: u64,
    /// HTTP worker threads (0: one per core).
    pub workers: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            id: "gw-1".into(),
            max_frame_bytes: 65_536,
            max_content_chars: 5000,
            outbound_queue: 256,
            heartbeat_timeout_secs: 90,
            presence_wait_ms: 3000,
            workers: 0,
        }
    }
}

/// `[auth]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// HMAC secret for JWTs, at least 32 bytes. Empty: `serve` generates one and keeps it in
    /// `<data-dir>/jwt_secret`; the distributed services require it.
    pub jwt_secret: String,
    /// Access token lifetime in seconds.
    pub access_ttl_secs: u64,
    /// Refresh token lifetime in seconds.
    pub refresh_ttl_secs: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            jwt_secret: String::new(),
            access_ttl_secs: 900,
            refresh_ttl_secs: 7 * 24 * 3600,
        }
    }
}

/// `[logic]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogicConfig {
    /// gRPC listen address of `gochat logic`.
    pub listen: String,
    /// The address other services dial, as registered in etcd. Empty: derived from `listen`.
    pub advertise: String,
    /// HTTP address of `/metrics` and `/healthz` for `gochat logic`. Empty: none.
    pub metrics_listen: String,
    /// Snowflake node id of this logic instance (0..=1023).
    pub node_id: u16,
    /// Arbiters (threads) for Conversation actors (0: one per core).
    pub arbiters: usize,
    /// Mailbox capacity of a Conversation actor.
    pub mailbox_capacity: usize,
    /// Most messages one conversation stores in one batch.
    pub max_batch: usize,
    /// Seconds an idle Conversation actor lives.
    pub idle_timeout_secs: u64,
    /// Groups bigger than this are delivered by the task service (spec: 500).
    pub async_fanout_threshold: i64,
    /// Seconds a Conversation actor trusts a sender's membership without asking repo again
    /// (a member who leaves or is removed is forgotten at once; this bounds it when that news
    /// is lost). 0 asks repo for every batch.
    pub membership_cache_secs: u64,
}

impl Default for LogicConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9200".into(),
            advertise: String::new(),
            metrics_listen: String::new(),
            node_id: 1,
            arbiters: 0,
            mailbox_capacity: 1024,
            max_batch: 256,
            idle_timeout_secs: 120,
            async_fanout_threshold: 500,
            membership_cache_secs: 60,
        }
    }
}

/// `[task]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct TaskConfig {
    /// HTTP address of `/metrics` and `/healthz` for `gochat task`. Empty: none.
    pub metrics_listen: String,
}

/// `[bus]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BusConfig {
    /// `memory` (in-process; `serve` only) or `kafka` (the distributed services).
    pub backend: BusBackend,
    /// Partitions of `im-upstream-topic` (and the other topics gochat creates).
    pub partitions: u32,
    /// Kafka bootstrap servers, `host:port[,host:port...]`.
    pub brokers: String,
    /// Replication factor of the topics gochat creates (3 on a production cluster).
    pub replication_factor: i32,
    /// Prefix of every Kafka topic and consumer group gochat uses (`<namespace>.im-upstream-topic`),
    /// so several deployments can share one Kafka cluster. Empty: the spec's names as they are.
    pub namespace: String,
    /// Milliseconds after which the broker gives a silent consumer's partitions to the rest of
    /// its group (`session.timeout.ms`): how long a crashed logic's conversations wait for a new
    /// owner.
    pub session_timeout_ms: u64,
    /// Extra librdkafka properties for every Kafka client (tuning; this build has no TLS or
    /// SASL); the settings gochat's guarantees rely on cannot be overridden.
    pub properties: std::collections::BTreeMap<String, String>,
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            backend: BusBackend::Memory,
            partitions: 8,
            brokers: "127.0.0.1:9092".into(),
            replication_factor: 1,
            namespace: String::new(),
            session_timeout_ms: 10_000,
            properties: std::collections::BTreeMap::new(),
        }
    }
}

/// Which bus joins the services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BusBackend {
    /// In-process (`serve`).
    Memory,
    /// Kafka (rdkafka).
    Kafka,
}

/// How services find each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiscoveryBackend {
    /// Fixed addresses from this file.
    Static,
    /// etcd: instances register with a lease; callers watch.
    Etcd,
}

/// `[discovery]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// `static` or `etcd`.
    pub backend: DiscoveryBackend,
    /// etcd client URLs.
    pub etcd_endpoints: Vec<String>,
    /// Prefix of every key gochat writes in etcd.
    pub prefix: String,
    /// Seconds a registration outlives its instance (the lease TTL): a crashed instance
    /// disappears from every caller's view within this time.
    pub lease_ttl_secs: u64,
    /// Static discovery: the repo instances (`http://host:port`).
    pub repo_addrs: Vec<String>,
    /// Static discovery: the logic instances.
    pub logic_addrs: Vec<String>,
    /// Static discovery: the live gateway ids (the world room goes to each).
    pub gateway_ids: Vec<String>,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        Self {
            backend: DiscoveryBackend::Static,
            etcd_endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: "/gochat".into(),
            lease_ttl_secs: 10,
            repo_addrs: vec!["http://127.0.0.1:9100".into()],
            logic_addrs: vec!["http://127.0.0.1:9200".into()],
            gateway_ids: vec!["gw-1".into()],
        }
    }
}

/// `[rpc]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RpcConfig {
    /// Deadline of one call attempt, in milliseconds.
    pub timeout_ms: u64,
    /// Retries of an idempotent call after the first attempt (spec: 3).
    pub max_retries: usize,
    /// Wait before the first retry in milliseconds (spec: 100); doubles per retry.
    pub initial_backoff_ms: u64,
    /// Longest wait between retries in milliseconds (spec: 5000).
    pub max_backoff_ms: u64,
    /// Milliseconds to wait for a TCP connection to another service.
    pub connect_timeout_ms: u64,
}

impl Default for RpcConfig {
    fn default() -> Self {
        Self {
            timeout_ms: 5000,
            max_retries: 3,
            initial_backoff_ms: 100,
            max_backoff_ms: 5000,
            connect_timeout_ms: 2000,
        }
    }
}

impl RpcConfig {
    /// The call policy of this configuration.
    pub fn policy(&self) -> crate::rpc::RpcPolicy {
        crate::rpc::RpcPolicy {
            timeout: std::time::Duration::from_millis(self.timeout_ms.max(1)),
            max_retries: self.max_retries,
            initial_backoff: std::time::Duration::from_millis(self.initial_backoff_ms),
            max_backoff: std::time::Duration::from_millis(
                self.max_backoff_ms.max(self.initial_backoff_ms),
            ),
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter (`info`, `gochat_repo=debug,info`, ...); `RUST_LOG` wins when set.
    pub filter: String,
    /// `text` or `json`.
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            filter: "info".into(),
            format: "text".into(),
        }
    }
}

/// `[admin]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// The bearer token of `/admin` and `/admin/actors` (and of `/metrics` when set). Empty:
    /// the admin endpoints answer 404 and `/metrics` is open. At least 16 characters.
    pub token: String,
}

/// Shortest admin token accepted.
pub const MIN_ADMIN_TOKEN_LEN: usize = 16;

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl Config {
    /// The layered figment: defaults < `file` (if given) < `GOCHAT_*` environment.
    pub fn figment(file: Option<&Path>) -> Figment {
        let mut f = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            f = f.merge(Toml::file_exact(path));
        }
        // Only `GOCHAT_<SECTION>__<FIELD>` variables are configuration; other `GOCHAT_*`
        // variables (GOCHAT_CONFIG, the tests' GOCHAT_TEST_*) are not.
        f.merge(
            Env::prefixed("GOCHAT_")
                .filter(|key| key.as_str().contains("__"))
                .split("__"),
        )
    }

    /// Reads and checks the configuration.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        if let Some(path) = file
            && !path.is_file()
        {
            return Err(ConfigError(format!(
                "config file {} not found",
                path.display()
            )));
        }
        Self::from_figment(&Self::figment(file))
    }

    /// Extracts and checks a configuration from a figment.
    pub fn from_figment(figment: &Figment) -> Result<Self, ConfigError> {
        let config: Config = figment.extract().map_err(|e| ConfigError(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that types alone do not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.database.pool_size == 0 {
            return Err(ConfigError("database.pool_size must be at least 1".into()));
        }
        if !(-20..=19).contains(&self.database.writer_nice) {
            return Err(ConfigError(
                "database.writer_nice must be a nice value, -20 to 19".into(),
            ));
        }
        if self.repo.node_id > crate::ids::MAX_NODE_ID {
            return Err(ConfigError(format!(
                "repo.node_id must be at most {}",
                crate::ids::MAX_NODE_ID
            )));
        }
        if self.repo.max_group_members < 2 {
            return Err(ConfigError(
                "repo.max_group_members must be at least 2".into(),
            ));
        }
        if self.repo.argon2_memory_kib < 8 || self.repo.argon2_iterations == 0 {
            return Err(ConfigError(
                "repo.argon2_memory_kib must be >= 8 and repo.argon2_iterations >= 1".into(),
            ));
        }
        if self.cache.backend == CacheBackend::Redis && !self.cache.redis_url.starts_with("redis") {
            return Err(ConfigError(format!(
                "cache.redis_url must be a redis:// URL, got {:?}",
                self.cache.redis_url
            )));
        }
        if !self.auth.jwt_secret.is_empty() && self.auth.jwt_secret.len() < 32 {
            return Err(ConfigError(
                "auth.jwt_secret must be at least 32 bytes".into(),
            ));
        }
        if self.discovery.backend == DiscoveryBackend::Etcd
            && (self.discovery.etcd_endpoints.is_empty() || self.discovery.lease_ttl_secs < 2)
        {
            return Err(ConfigError(
                "discovery.etcd_endpoints must name at least one endpoint and discovery.lease_ttl_secs be at least 2".into(),
            ));
        }
        if self.bus.backend == BusBackend::Kafka && self.bus.brokers.trim().is_empty() {
            return Err(ConfigError(
                "bus.brokers must name the Kafka brokers".into(),
            ));
        }
        if !self
            .bus
            .namespace
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(ConfigError(
                "bus.namespace must be letters, digits, '-', '_' or '.' (it prefixes topic names)"
                    .into(),
            ));
        }
        if self.bus.replication_factor < 1 {
            return Err(ConfigError(
                "bus.replication_factor must be at least 1".into(),
            ));
        }
        if self.gateway.id.is_empty()
            || !self
                .gateway
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(ConfigError(
                "gateway.id must be letters, digits, '-' or '_' (it names a topic)".into(),
            ));
        }
        if self.logic.node_id > crate::ids::MAX_NODE_ID {
            return Err(ConfigError(format!(
                "logic.node_id must be at most {}",
                crate::ids::MAX_NODE_ID
            )));
        }
        if self.bus.partitions == 0 {
            return Err(ConfigError("bus.partitions must be at least 1".into()));
        }
        if !self.admin.token.is_empty()
            && (self.admin.token.chars().count() < MIN_ADMIN_TOKEN_LEN
                || !self.admin.token.chars().all(|c| c.is_ascii_graphic()))
        {
            return Err(ConfigError(format!(
                "admin.token must be at least {MIN_ADMIN_TOKEN_LEN} visible ASCII characters (or empty to disable the admin endpoints)"
            )));
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(ConfigError(
                "log.format must be \"text\" or \"json\"".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().expect("defaults validate");
    }

    #[test]
    fn the_example_file_documents_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../gochat.example.toml");
        let from_file: Config = Figment::from(Toml::file_exact(&path))
            .extract()
            .expect("example parses");
        assert_eq!(from_file, Config::default());
        assert!(
            from_file.admin.token.is_empty(),
            "admin endpoints are off unless configured"
        );
    }

    #[test]
    fn file_then_environment_override() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "g.toml",
                "[database]\nurl = \"mysql://a@b/c\"\npool_size = 3\n[cache]\nbackend = \"redis\"\n",
            )?;
            jail.set_env("GOCHAT_DATABASE__POOL_SIZE", "5");
            let c = Config::from_figment(&Config::figment(Some(Path::new("g.toml"))))
                .map_err(|e| e.to_string())?;
            assert_eq!(c.database.url, "mysql://a@b/c");
            assert_eq!(c.database.pool_size, 5);
            assert_eq!(c.cache.backend, CacheBackend::Redis);
            assert_eq!(c.repo, RepoConfig::default());
            Ok(())
        });
    }

    #[test]
    fn other_gochat_variables_are_not_configuration() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("GOCHAT_CONFIG", "elsewhere.toml");
            jail.set_env("GOCHAT_TEST_MYSQL_URL", "mysql://x@y");
            jail.set_env("GOCHAT_BUS__PARTITIONS", "3");
            let c = Config::from_figment(&Config::figment(None)).map_err(|e| e.to_string())?;
            assert_eq!(c.bus.partitions, 3);
            Ok(())
        });
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("g.toml", "[database]\nurll = \"x\"\n")?;
            let err = Config::from_figment(&Config::figment(Some(Path::new("g.toml"))))
                .expect_err("unknown field refused");
            assert!(err.to_string().contains("urll"), "{err}");
            jail.create_file("h.toml", "[repo]\nnode_id = 5000\n")?;
            let err = Config::from_figment(&Config::figment(Some(Path::new("h.toml"))))
                .expect_err("node id refused");
            assert!(err.to_string().contains("node_id"), "{err}");
            jail.create_file("n.toml", "[database]\nwriter_nice = -21\n")?;
            let err = Config::from_figment(&Config::figment(Some(Path::new("n.toml"))))
                .expect_err("a nice value out of range refused");
            assert!(err.to_string().contains("writer_nice"), "{err}");
            jail.create_file("a.toml", "[admin]\ntoken = \"short\"\n")?;
            let err = Config::from_figment(&Config::figment(Some(Path::new("a.toml"))))
                .expect_err("short admin token refused");
            assert!(err.to_string().contains("admin.token"), "{err}");
            jail.set_env("GOCHAT_ADMIN__TOKEN", "0123456789abcdef-admin");
            let c = Config::from_figment(&Config::figment(None)).map_err(|e| e.to_string())?;
            assert_eq!(c.admin.token, "0123456789abcdef-admin");
            Ok(())
        });
    }
}
