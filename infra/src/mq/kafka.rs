//! [`KafkaBus`]: the message bus of gochat's distributed mode, on Apache Kafka through
//! [rdkafka] (librdkafka, built from its bundled sources).
//!
//! It keeps the semantics of [`crate::mq`] (and of [`super::memory::MemoryBus`]), mapped onto
//! plain Kafka features so that any Kafka-protocol broker works; nothing here depends on a
//! particular broker:
//!
//! - **Partitioning.** Records are keyed, and the producer uses librdkafka's `murmur2_random`
//!   partitioner: murmur2 of the key bytes, positive, modulo the partition count — the default of
//!   the Java client. A key therefore lands on the same partition from every gochat process, and
//!   from any Java/Go/Python producer configured the Kafka way. (The in-process bus uses
//!   [`super::partition_for`] instead; the two buses never share a topic.)
//! - **Order and durability.** The producer is idempotent (`enable.idempotence=true`, hence
//!   `acks=all` and at most 5 requests in flight per connection with sequence numbers), so
//!   retries neither duplicate nor reorder records of one partition: per-key order is the send
//!   order. [`Producer::send`] resolves when the broker acknowledged the record on all in-sync
//!   replicas; it waits while librdkafka's local queue is full (backpressure) and fails after
//!   `message.timeout.ms` (30 s by default) without an acknowledgement.
//! - **Headers.** The `headers` map (gochat's `trace_id`, `session_id`, ...) travels as Kafka
//!   record headers, UTF-8 values.
//! - **Topics.** [`Bus::ensure_topic`] creates a topic through the admin API (an existing topic
//!   is left as it is) and returns once the cluster metadata shows it with its partitions and
//!   leaders. Unlike the in-process bus, `send` and `subscribe` never create topics themselves
//!   (whether the broker auto-creates them is the broker's configuration): call `ensure_topic`
//!   first.
//! - **Consumer groups.** Each [`Bus::subscribe`] creates one Kafka consumer with
//!   `group.id = group`; the broker's group coordinator shares the partitions among the members
//!   (librdkafka's default assignors, eager rebalance). The member joins while
//!   [`Consumer::recv`] is being polled, so keep calling `recv`: rebalances are served inside
//!   it. A group without committed offsets starts at the log start
//!   (`auto.offset.reset=earliest`).
//! - **At-least-once commits.** Offsets are never stored automatically
//!   (`enable.auto.offset.store=false`): [`Consumer::commit`] stores `offset + 1` of the record's
//!   partition locally (never moving backwards within one assignment), and librdkafka commits
//!   the stored offsets to the group every second (`auto.commit.interval.ms=1000`), when a
//!   partition is revoked by a rebalance, and when the consumer closes. So a record is committed
//!   only after `commit` was called for it or a later record of its partition, and a crash loses
//!   at most the last second of commits (those records are delivered again). A commit for a
//!   partition this member no longer owns is ignored (logged at debug): the new owner gets the
//!   record again.
//! - **Leaving.** Dropping a [`KafkaConsumer`] commits its stored offsets synchronously, then
//!   closes it (revoke, final commit, `LeaveGroup`) on tokio's blocking pool, so the group
//!   rebalances at once and the successor starts right after what was committed.
//!   [`KafkaConsumer::close`] does the same and waits for it. A member that crashes instead is
//!   noticed after `session.timeout.ms` (45 s by default).
//! - **Errors.** Broker and connection errors are logged (target `librdkafka`) and retried by
//!   librdkafka; [`Consumer::recv`] only returns [`MqError::Broker`] for fatal client errors and
//!   authentication/authorization failures, which do not heal by retrying.
//!
//! Settings can be tuned (or security settings such as `security.protocol` and `sasl.*` added)
//! through [`KafkaConfig::properties`], except the ones the guarantees above rely on.
//!
//! Tests run against tansu (`scripts/services.sh`), a Kafka-compatible broker. tansu 0.6
//! mishandles multi-record batches (a fetch from an offset inside one returns none of its
//! records, and its high watermark reads as the batch's base offset + 1), so a bus talking to
//! tansu must send one record per batch: `properties = {"batch.num.messages": "1"}`. Apache
//! Kafka needs no such setting.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers as _, Message as _, OwnedHeaders};
use rdkafka::metadata::Metadata;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::util::Timeout;

use super::{Bus, Consumer, MqError, Payload, Producer, Record};

/// How long to pause in [`Consumer::recv`] after a transient error before polling again.
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// How often [`Bus::ensure_topic`] looks at the metadata while waiting for a new topic.
const TOPIC_POLL: Duration = Duration::from_millis(100);

/// Settings of a [`KafkaBus`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaConfig {
    /// Bootstrap brokers, comma-separated `host:port` (`bootstrap.servers`; default
    /// `127.0.0.1:9092`).
    pub brokers: String,
    /// Client id reported to the brokers (`client.id`; default `gochat`).
    pub client_id: String,
    /// Replication factor of the topics [`Bus::ensure_topic`] creates (default 1, right for a
    /// single broker; use 3 on a production cluster, or -1 for the broker's
    /// `default.replication.factor`).
    pub replication_factor: i32,
    /// How long [`KafkaBus::connect`] waits for a broker to answer (default 5 s).
    pub connect_timeout: Duration,
    /// Bound of each admin and metadata request, and of the wait for a new topic to appear in
    /// the metadata (default 30 s).
    pub request_timeout: Duration,
    /// Extra librdkafka properties applied to every client (producer, consumers, admin) after
    /// gochat's tunable defaults (`session.timeout.ms`, `message.timeout.ms`,
    /// `auto.commit.interval.ms`, ...) and before the settings the bus's guarantees rely on
    /// (`partitioner`, `enable.idempotence`, `acks`, `enable.auto.offset.store`,
    /// `enable.auto.commit`, `auto.offset.reset`, `group.id`), which always win.
    pub properties: BTreeMap<String, String>,
    /// Prefix of every topic and group name on the broker (`{namespace}.{name}`), so several
    /// deployments (or test runs) share one Kafka cluster; callers keep using the plain names
    /// (records come back with the plain topic name). Empty (the default): names as given.
    pub namespace: String,
}

impl KafkaConfig {
    /// The broker-side name of topic or group `name`.
    fn qualified(&self, name: &str) -> String {
        if self.namespace.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.namespace)
        }
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".to_owned(),
            client_id: "gochat".to_owned(),
            replication_factor: 1,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            properties: BTreeMap::new(),
            namespace: String::new(),
        }
    }
}

impl KafkaConfig {
    /// A librdkafka config: `base` settings, then the user's properties, then `fixed`.
    fn client_config(&self, base: &[(&str, &str)], fixed: &[(&str, &str)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("client.id", &self.client_id);
        for (key, value) in base {
            config.set(*key, *value);
        }
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        for (key, value) in fixed {
            config.set(*key, *value);
        }
        config
    }

    fn producer_config(&self) -> ClientConfig {
        self.client_config(
            &[("message.timeout.ms", "30000")],
            &[
                // The Java client's partitioner: same key, same partition, everywhere.
                ("partitioner", "murmur2_random"),
                // Retries neither duplicate nor reorder records of a partition.
                ("enable.idempotence", "true"),
                ("acks", "all"),
            ],
        )
    }

    fn consumer_config(&self, group: &str) -> ClientConfig {
        self.client_config(
            &[
                ("auto.commit.interval.ms", "1000"),
                ("session.timeout.ms", "45000"),
            ],
            &[
                ("group.id", group),
                ("enable.auto.offset.store", "false"),
                ("enable.auto.commit", "true"),
                ("auto.offset.reset", "earliest"),
                ("enable.partition.eof", "false"),
            ],
        )
    }

    /// Admin requests and metadata lookups only; never creates a topic by looking at it.
    fn admin_config(&self) -> ClientConfig {
        self.client_config(&[], &[("allow.auto.create.topics", "false")])
    }

    /// A consumer that never subscribes: it reads a group's committed offsets for
    /// [`KafkaBus::lag`].
    fn offsets_reader_config(&self, group: &str) -> ClientConfig {
        self.client_config(
            &[],
            &[
                ("group.id", group),
                ("enable.auto.commit", "false"),
                ("allow.auto.create.topics", "false"),
            ],
        )
    }
}

/// The Kafka bus: one idempotent producer and one admin client shared by every clone, and one
/// Kafka consumer per [`Bus::subscribe`]. See the [module documentation](self) for how the bus
/// semantics map onto Kafka.
#[derive(Clone)]
pub struct KafkaBus {
    inner: Arc<Inner>,
}

struct Inner {
    config: KafkaConfig,
    producer: FutureProducer<LogContext>,
    admin: AdminClient<LogContext>,
    /// Idle group consumers reading committed offsets for [`KafkaBus::lag`], by group.
    offsets_readers: Mutex<HashMap<String, Arc<BaseConsumer<LogContext>>>>,
}

impl fmt::Debug for KafkaBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaBus")
            .field("brokers", &self.inner.config.brokers)
            .field("client_id", &self.inner.config.client_id)
            .finish_non_exhaustive()
    }
}

impl KafkaBus {
    /// Creates the producer and admin clients and checks that a broker answers within
    /// [`KafkaConfig::connect_timeout`]; fails with [`MqError::Broker`] naming the brokers
    /// otherwise, or when the configuration is invalid. Must be called within a tokio runtime.
    pub async fn connect(config: KafkaConfig) -> Result<Self, MqError> {
        let producer: FutureProducer<LogContext> = config
            .producer_config()
            .create_with_context(LogContext)
            .map_err(|e| MqError::Broker(format!("creating the Kafka producer: {e}")))?;
        let admin: AdminClient<LogContext> = config
            .admin_config()
            .create_with_context(LogContext)
            .map_err(|e| MqError::Broker(format!("creating the Kafka admin client: {e}")))?;
        let bus = Self {
            inner: Arc::new(Inner {
                config,
                producer,
                admin,
                offsets_readers: Mutex::new(HashMap::new()),
            }),
        };
        let timeout = bus.inner.config.connect_timeout;
        let metadata = bus
            .metadata(None, timeout)
            .await
            .map_err(|e| bus.unreachable(&e))?;
        if metadata.brokers().is_empty() {
            return Err(bus.unreachable(&"the cluster metadata lists no broker"));
        }
        tracing::debug!(
            brokers = %bus.inner.config.brokers,
            cluster_brokers = metadata.brokers().len(),
            "connected to Kafka"
        );
        Ok(bus)
    }

    fn unreachable(&self, cause: &dyn fmt::Display) -> MqError {
        let config = &self.inner.config;
        MqError::Broker(format!(
            "no Kafka broker answered at {} within {:?}: {cause}",
            config.brokers, config.connect_timeout
        ))
    }

    /// The configuration this bus was built with.
    pub fn config(&self) -> &KafkaConfig {
        &self.inner.config
    }

    /// The number of partitions of `topic`, from the cluster metadata;
    /// [`MqError::UnknownTopic`] when it does not exist.
    pub async fn partitions(&self, topic: &str) -> Result<u32, MqError> {
        let topic = &self.inner.config.qualified(topic);
        let metadata = self
            .metadata(Some(topic), self.inner.config.request_timeout)
            .await
            .map_err(|e| MqError::Broker(format!("metadata of topic {topic}: {e}")))?;
        match topic_state(&metadata, topic) {
            TopicState::Ready(n) | TopicState::Partial(n) => Ok(n),
            TopicState::Missing => Err(MqError::UnknownTopic(topic.to_owned())),
            TopicState::Failed(code) => Err(MqError::Broker(format!(
                "metadata of topic {topic}: {code}"
            ))),
        }
    }

    /// How far `group` is behind on `topic`: the sum over its partitions of the high watermark
    /// minus the group's committed offset. A partition without a committed offset (a group
    /// that never committed, or never subscribed) counts from the log start, which is where
    /// the group would begin; an unknown topic has lag 0. Commits reach the broker up to a
    /// second after [`Consumer::commit`], so the lag follows them with that delay.
    pub async fn lag(&self, group: &str, topic: &str) -> Result<u64, MqError> {
        let (group, topic) = (
            &self.inner.config.qualified(group),
            &self.inner.config.qualified(topic),
        );
        let reader = self.offsets_reader(group)?;
        let timeout = self.inner.config.request_timeout;
        let topic = topic.to_owned();
        let group = group.to_owned();
        blocking(move || {
            let fail = |what: &str, e: &dyn fmt::Display| {
                MqError::Broker(format!("lag of group {group} on {topic}: {what}: {e}"))
            };
            // The reader never subscribes; drop the error events its queue collects.
            while reader.poll(Duration::ZERO).is_some() {}
            let metadata = reader
                .fetch_metadata(Some(&topic), timeout)
                .map_err(|e| fail("metadata", &e))?;
            let partitions: Vec<i32> = match topic_state(&metadata, &topic) {
                TopicState::Missing => return Ok(0),
                TopicState::Failed(code) => return Err(fail("metadata", &code)),
                TopicState::Ready(_) | TopicState::Partial(_) => metadata
                    .topics()
                    .iter()
                    .filter(|t| t.name() == topic)
                    .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                    .collect(),
            };
            let mut list = TopicPartitionList::with_capacity(partitions.len());
            for &p in &partitions {
                list.add_partition(&topic, p);
            }
            let committed = reader
                .committed_offsets(list, timeout)
                .map_err(|e| fail("committed offsets", &e))?;
            let mut lag = 0u64;
            for &p in &partitions {
                let (low, high) = reader
                    .fetch_watermarks(&topic, p, timeout)
                    .map_err(|e| fail("watermarks", &e))?;
                let from = match committed
                    .find_partition(&topic, p)
                    .map(|elem| elem.offset())
                {
                    Some(Offset::Offset(c)) => c.max(low),
                    _ => low,
                };
                lag += u64::try_from(high.saturating_sub(from)).unwrap_or(0);
            }
            Ok(lag)
        })
        .await?
    }

    /// The cached offsets reader of `group`, created on first use.
    fn offsets_reader(&self, group: &str) -> Result<Arc<BaseConsumer<LogContext>>, MqError> {
        let mut readers = lock(&self.inner.offsets_readers);
        if let Some(reader) = readers.get(group) {
            return Ok(Arc::clone(reader));
        }
        let reader: BaseConsumer<LogContext> = self
            .inner
            .config
            .offsets_reader_config(group)
            .create_with_context(LogContext)
            .map_err(|e| MqError::Broker(format!("creating an offsets reader: {e}")))?;
        let reader = Arc::new(reader);
        readers.insert(group.to_owned(), Arc::clone(&reader));
        Ok(reader)
    }

    /// Cluster metadata (of one topic, or of all), fetched on the blocking pool.
    async fn metadata(&self, topic: Option<&str>, timeout: Duration) -> Result<Metadata, MqError> {
        let inner = Arc::clone(&self.inner);
        let topic = topic.map(str::to_owned);
        blocking(move || {
            inner
                .admin
                .inner()
                .fetch_metadata(topic.as_deref(), timeout)
                .map_err(|e| MqError::Broker(e.to_string()))
        })
        .await?
    }

    /// Waits until the metadata shows `topic` with every partition led (and, when `expected`,
    /// with that many partitions).
    async fn wait_for_topic(&self, topic: &str, expected: Option<u32>) -> Result<(), MqError> {
        let timeout = self.inner.config.request_timeout;
        let deadline = Instant::now() + timeout;
        loop {
            let metadata = self.metadata(Some(topic), timeout).await;
            let last = match &metadata {
                Ok(metadata) => match topic_state(metadata, topic) {
                    TopicState::Ready(n) if expected.is_none_or(|e| e == n) => return Ok(()),
                    state => format!("{state:?}"),
                },
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(MqError::Broker(format!(
                    "topic {topic} did not become ready within {timeout:?} (last seen: {last})"
                )));
            }
            tokio::time::sleep(TOPIC_POLL).await;
        }
    }
}

/// What the metadata says about one topic.
#[derive(Debug)]
enum TopicState {
    /// Not in the cluster.
    Missing,
    /// This many partitions, each with a leader.
    Ready(u32),
    /// This many partitions, some without a leader yet.
    Partial(u32),
    /// The broker reported another error for it.
    Failed(RDKafkaErrorCode),
}

fn topic_state(metadata: &Metadata, topic: &str) -> TopicState {
    let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return TopicState::Missing;
    };
    if let Some(err) = t.error() {
        return match RDKafkaErrorCode::from(err) {
            RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic => {
                TopicState::Missing
            }
            code => TopicState::Failed(code),
        };
    }
    let n = u32::try_from(t.partitions().len()).unwrap_or(u32::MAX);
    let led = t
        .partitions()
        .iter()
        .all(|p| p.error().is_none() && p.leader() >= 0);
    if n > 0 && led {
        TopicState::Ready(n)
    } else if n == 0 {
        TopicState::Missing
    } else {
        TopicState::Partial(n)
    }
}

impl Producer for KafkaBus {
    async fn send(
        &self,
        topic: &str,
        key: &str,
        payload: impl Into<Payload> + Send,
        headers: BTreeMap<String, String>,
    ) -> Result<(), MqError> {
        let payload = payload.into();
        let payload = payload
            .bytes()
            .map_err(|e| MqError::Encoding(e.to_string()))?;
        let topic = &self.inner.config.qualified(topic);
        let mut kafka_headers = OwnedHeaders::new_with_capacity(headers.len());
        for (name, value) in &headers {
            kafka_headers = kafka_headers.insert(Header {
                key: name.as_str(),
                value: Some(value.as_str()),
            });
        }
        let record = FutureRecord::to(topic)
            .key(key)
            .payload(payload.as_ref())
            .headers(kafka_headers);
        // `Timeout::Never`: wait while the local queue is full; the delivery itself is bounded
        // by `message.timeout.ms`.
        match self.inner.producer.send(record, Timeout::Never).await {
            Ok(_) => Ok(()),
            Err((error, _)) => Err(match error.rdkafka_error_code() {
                Some(
                    RDKafkaErrorCode::UnknownTopicOrPartition
                    | RDKafkaErrorCode::UnknownTopic
                    | RDKafkaErrorCode::UnknownPartition,
                ) => MqError::UnknownTopic(topic.to_owned()),
                _ => MqError::Broker(format!("producing to {topic}: {error}")),
            }),
        }
    }
}

impl Bus for KafkaBus {
    type Consumer = KafkaConsumer;

    async fn ensure_topic(&self, topic: &str, partitions: u32) -> Result<(), MqError> {
        let topic = &self.inner.config.qualified(topic);
        let count = i32::try_from(partitions.max(1))
            .map_err(|_| MqError::Broker(format!("{partitions} partitions is too many")))?;
        let new_topic = NewTopic::new(
            topic,
            count,
            TopicReplication::Fixed(self.inner.config.replication_factor),
        );
        let timeout = self.inner.config.request_timeout;
        let options = AdminOptions::new()
            .request_timeout(Some(timeout))
            .operation_timeout(Some(timeout));
        let results = self
            .inner
            .admin
            .create_topics([&new_topic], &options)
            .await
            .map_err(|e| MqError::Broker(format!("creating topic {topic}: {e}")))?;
        let created = match results.into_iter().next() {
            Some(Ok(_)) => true,
            Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => false,
            Some(Err((_, code))) => {
                return Err(MqError::Broker(format!("creating topic {topic}: {code}")));
            }
            None => {
                return Err(MqError::Broker(format!(
                    "creating topic {topic}: no result from the broker"
                )));
            }
        };
        if created {
            tracing::info!(topic, partitions, "created Kafka topic");
        }
        // An existing topic keeps its partition count, as in the in-process bus.
        self.wait_for_topic(topic, created.then_some(partitions.max(1)))
            .await
    }

    async fn subscribe(&self, group: &str, topics: &[&str]) -> Result<KafkaConsumer, MqError> {
        let group = &self.inner.config.qualified(group);
        let names: Vec<String> = topics
            .iter()
            .map(|t| self.inner.config.qualified(t))
            .collect();
        let mut unique: Vec<&str> = Vec::with_capacity(names.len());
        for topic in &names {
            if !unique.contains(&topic.as_str()) {
                unique.push(topic);
            }
        }
        let context = GroupContext {
            group: group.to_owned(),
            stored: Mutex::new(HashMap::new()),
        };
        let consumer: StreamConsumer<GroupContext> = self
            .inner
            .config
            .consumer_config(group)
            .create_with_context(context)
            .map_err(|e| MqError::Broker(format!("creating a consumer of group {group}: {e}")))?;
        consumer.subscribe(&unique).map_err(|e| {
            MqError::Broker(format!("subscribing group {group} to {unique:?}: {e}"))
        })?;
        tracing::debug!(group, topics = ?unique, "joined Kafka consumer group");
        Ok(KafkaConsumer {
            consumer: Some(consumer),
            group: group.to_owned(),
            namespace: self.inner.config.namespace.clone(),
        })
    }
}

/// One member of a consumer group of a [`KafkaBus`]: a Kafka consumer subscribed to the
/// group's topics. Keep calling [`Consumer::recv`]: joining the group and rebalances happen
/// while it is polled. Dropping it commits what was committed through [`Consumer::commit`] and
/// leaves the group (in the background; [`KafkaConsumer::close`] waits for it).
pub struct KafkaConsumer {
    /// `None` once closed.
    consumer: Option<StreamConsumer<GroupContext>>,
    group: String,
    /// The bus's namespace: stripped from consumed topics, added back on commit.
    namespace: String,
}

impl fmt::Debug for KafkaConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConsumer")
            .field("group", &self.group)
            .field("closed", &self.consumer.is_none())
            .finish()
    }
}

impl KafkaConsumer {
    /// The broker-side name of `topic`.
    fn qualified(&self, topic: &str) -> String {
        if self.namespace.is_empty() {
            topic.to_owned()
        } else {
            format!("{}.{topic}", self.namespace)
        }
    }

    /// The caller's name of broker-side `topic` (None: no namespace to strip).
    fn plain(&self, topic: &str) -> Option<String> {
        if self.namespace.is_empty() {
            return None;
        }
        topic
            .strip_prefix(&self.namespace)
            .and_then(|t| t.strip_prefix('.'))
            .map(str::to_owned)
    }

    /// The group this member belongs to.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The partitions currently assigned to this member, as `(topic, partition)`, sorted.
    /// Empty until the member has joined the group (which happens while `recv` is polled).
    pub fn assignment(&self) -> Vec<(String, u32)> {
        let Some(consumer) = &self.consumer else {
            return Vec::new();
        };
        let mut out: Vec<(String, u32)> = consumer
            .assignment()
            .map(|list| {
                list.elements()
                    .iter()
                    .filter_map(|e| {
                        Some((e.topic().to_owned(), u32::try_from(e.partition()).ok()?))
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    /// Commits the stored offsets synchronously and leaves the group, waiting until both are
    /// done, so that the next owner of the partitions starts right after the last
    /// [`Consumer::commit`]. Dropping the consumer does the same in the background.
    pub async fn close(mut self) -> Result<(), MqError> {
        match self.consumer.take() {
            Some(consumer) => blocking(move || close_consumer(consumer)).await?,
            None => Ok(()),
        }
    }

    fn consumer(&self) -> Result<&StreamConsumer<GroupContext>, MqError> {
        self.consumer.as_ref().ok_or(MqError::Closed)
    }
}

impl Drop for KafkaConsumer {
    fn drop(&mut self) {
        let Some(consumer) = self.consumer.take() else {
            return;
        };
        let group = self.group.clone();
        let close = move || {
            if let Err(e) = close_consumer(consumer) {
                tracing::warn!(group, error = %e, "closing a Kafka consumer");
            }
        };
        // Closing blocks on the broker: keep it off the async worker threads.
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn_blocking(close);
            }
            Err(_) => close(),
        }
    }
}

/// Commits the stored offsets, then closes the consumer (revoke, final commit, leave the group).
/// Blocking.
fn close_consumer(consumer: StreamConsumer<GroupContext>) -> Result<(), MqError> {
    let committed = match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => Ok(()),
        Err(e) => Err(MqError::Broker(format!(
            "committing the offsets of group {}: {e}",
            consumer.context().group
        ))),
    };
    // Dropping the last handle closes the consumer and waits until it left the group.
    drop(consumer);
    committed
}

impl Consumer for KafkaConsumer {
    async fn recv(&mut self) -> Result<Record, MqError> {
        let consumer = self.consumer()?;
        loop {
            // Convert before any other `.await`: a `BorrowedMessage` is not `Send`.
            let next = consumer.recv().await.and_then(|m| to_record(&m));
            match next {
                Ok(mut record) => {
                    if let Some(plain) = self.plain(&record.topic) {
                        record.topic = plain;
                    }
                    return Ok(record);
                }
                Err(e) if is_fatal(&e) => {
                    return Err(MqError::Broker(format!(
                        "consuming as group {}: {e}",
                        self.group
                    )));
                }
                Err(e) => {
                    // The client context already logged it; librdkafka retries by itself.
                    tracing::debug!(group = %self.group, error = %e, "transient Kafka consumer error");
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        }
    }

    async fn commit(&mut self, record: &Record) -> Result<(), MqError> {
        let topic = self.qualified(&record.topic);
        let consumer = self.consumer()?;
        let partition =
            i32::try_from(record.partition).map_err(|_| MqError::UnknownTopic(topic.clone()))?;
        let next = i64::try_from(record.offset)
            .ok()
            .and_then(|o| o.checked_add(1))
            .ok_or_else(|| MqError::Broker(format!("offset {} out of range", record.offset)))?;
        let mut stored = lock(&consumer.context().stored);
        let slot = (topic.clone(), partition);
        if stored.get(&slot).is_some_and(|&s| s >= next) {
            return Ok(());
        }
        let mut list = TopicPartitionList::with_capacity(1);
        list.add_partition_offset(&topic, partition, Offset::Offset(next))
            .map_err(|e| MqError::Broker(format!("committing {topic}: {e}")))?;
        match consumer.store_offsets(&list) {
            Ok(()) => {
                stored.insert(slot, next);
                Ok(())
            }
            // The partition was revoked: its new owner gets the record again.
            Err(KafkaError::StoreOffset(
                RDKafkaErrorCode::State | RDKafkaErrorCode::UnknownPartition,
            )) => {
                tracing::debug!(
                    group = %self.group,
                    topic = %topic,
                    partition,
                    offset = record.offset,
                    "commit of a partition this member no longer owns; ignored"
                );
                Ok(())
            }
            Err(e) => Err(MqError::Broker(format!(
                "committing {}/{} offset {}: {e}",
                topic, record.partition, record.offset
            ))),
        }
    }
}

/// Copies a consumed message out of librdkafka's buffer.
fn to_record(message: &BorrowedMessage<'_>) -> Result<Record, KafkaError> {
    let invalid = || KafkaError::MessageConsumption(RDKafkaErrorCode::InvalidRecord);
    let headers = message
        .headers()
        .map(|hs| {
            hs.iter()
                .map(|h| {
                    let value = h.value.map(String::from_utf8_lossy).unwrap_or_default();
                    (h.key.to_owned(), value.into_owned())
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Record {
        topic: message.topic().to_owned(),
        partition: u32::try_from(message.partition()).map_err(|_| invalid())?,
        offset: u64::try_from(message.offset()).map_err(|_| invalid())?,
        key: message
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .unwrap_or_default(),
        payload: message.payload().unwrap_or_default().into(),
        headers,
    })
}

/// Whether a consumer error will not heal by retrying: librdkafka's fatal errors, and
/// authentication or authorization failures (a configuration or ACL problem).
fn is_fatal(error: &KafkaError) -> bool {
    matches!(error, KafkaError::MessageConsumptionFatal(_))
        || matches!(
            error.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::Fatal
                    | RDKafkaErrorCode::Authentication
                    | RDKafkaErrorCode::SaslAuthenticationFailed
                    | RDKafkaErrorCode::TopicAuthorizationFailed
                    | RDKafkaErrorCode::GroupAuthorizationFailed
                    | RDKafkaErrorCode::ClusterAuthorizationFailed
            )
        )
}

/// Runs a blocking librdkafka call on tokio's blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, MqError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| MqError::Broker(format!("Kafka client task failed: {e}")))
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Routes librdkafka's logs and error callbacks to `tracing` (target `librdkafka`).
#[derive(Debug, Clone, Copy, Default)]
struct LogContext;

fn log_librdkafka(level: RDKafkaLogLevel, facility: &str, message: &str) {
    // The same extra properties go to producers and consumers; librdkafka warns about the ones
    // that do not apply to a client kind. Expected, so not worth a warning.
    if facility == "CONFWARN" {
        tracing::debug!(target: "librdkafka", facility, "{message}");
        return;
    }
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => {
            tracing::error!(target: "librdkafka", facility, "{message}");
        }
        RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", facility, "{message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", facility, "{message}");
        }
        RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", facility, "{message}"),
    }
}

fn error_librdkafka(error: &KafkaError, reason: &str) {
    if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) {
        tracing::error!(target: "librdkafka", %error, "{reason}");
    } else {
        tracing::warn!(target: "librdkafka", %error, "{reason}");
    }
}

impl ClientContext for LogContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_librdkafka(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        error_librdkafka(&error, reason);
    }
}

impl ConsumerContext for LogContext {}

/// The context of a group member: logging, plus the offsets it stored, per partition, during
/// the current assignment (commits never move them backwards).
struct GroupContext {
    group: String,
    stored: Mutex<HashMap<(String, i32), i64>>,
}

impl ClientContext for GroupContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_librdkafka(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        error_librdkafka(&error, reason);
    }
}

/// `topic/partition` pairs of a rebalance, for the log.
fn describe(list: &TopicPartitionList) -> String {
    list.elements()
        .iter()
        .map(|e| format!("{}/{}", e.topic(), e.partition()))
        .collect::<Vec<_>>()
        .join(",")
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(list) => {
                let mut stored = lock(&self.stored);
                for e in list.elements() {
                    stored.remove(&(e.topic().to_owned(), e.partition()));
                }
                tracing::info!(group = %self.group, partitions = %describe(list), "partitions revoked");
            }
            Rebalance::Assign(list) => {
                tracing::info!(group = %self.group, partitions = %describe(list), "partitions assigned");
            }
            Rebalance::Error(e) => {
                tracing::warn!(group = %self.group, error = %e, "rebalance failed");
            }
        }
    }

    fn commit_callback(&self, result: Result<(), KafkaError>, _offsets: &TopicPartitionList) {
        match result {
            Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => tracing::warn!(group = %self.group, error = %e, "offset commit failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_properties_tune_but_never_override_the_guarantees() {
        let config = KafkaConfig {
            properties: BTreeMap::from([
                ("session.timeout.ms".to_owned(), "10000".to_owned()),
                ("message.timeout.ms".to_owned(), "5000".to_owned()),
                ("enable.auto.offset.store".to_owned(), "true".to_owned()),
                ("auto.offset.reset".to_owned(), "latest".to_owned()),
                ("partitioner".to_owned(), "consistent".to_owned()),
                ("enable.idempotence".to_owned(), "false".to_owned()),
                ("security.protocol".to_owned(), "ssl".to_owned()),
            ]),
            ..KafkaConfig::default()
        };
        let consumer = config.consumer_config("g");
        assert_eq!(consumer.get("group.id"), Some("g"));
        assert_eq!(consumer.get("session.timeout.ms"), Some("10000"));
        assert_eq!(consumer.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(consumer.get("enable.auto.commit"), Some("true"));
        assert_eq!(consumer.get("auto.offset.reset"), Some("earliest"));
        assert_eq!(consumer.get("security.protocol"), Some("ssl"));
        let producer = config.producer_config();
        assert_eq!(producer.get("message.timeout.ms"), Some("5000"));
        assert_eq!(producer.get("partitioner"), Some("murmur2_random"));
        assert_eq!(producer.get("enable.idempotence"), Some("true"));
        assert_eq!(producer.get("acks"), Some("all"));
        assert_eq!(producer.get("bootstrap.servers"), Some("127.0.0.1:9092"));
        assert_eq!(producer.get("client.id"), Some("gochat"));
    }
}
