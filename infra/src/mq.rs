//! The message bus between services: named topics split into partitions, records routed to a
//! partition by key (so one conversation always lands on one partition, in order), consumer
//! groups that share a topic's partitions among their members, and at-least-once delivery: a
//! consumer commits a record after processing it, and whatever was not committed when a member
//! leaves or crashes is delivered again to the member that takes its partitions over.
//!
//! Two implementations share these semantics: [`memory::MemoryBus`] (in-process, `serve` mode)
//! and [`kafka::KafkaBus`] (Apache Kafka through rdkafka, distributed mode).

pub mod kafka;
pub mod memory;

use std::collections::BTreeMap;
use std::future::Future;

/// A bus failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MqError {
    /// The bus was shut down.
    #[error("the bus is closed")]
    Closed,
    /// The topic does not exist and is not created on demand.
    #[error("unknown topic {0}")]
    UnknownTopic(String),
    /// The broker refused or could not be reached.
    #[error("broker: {0}")]
    Broker(String),
}

/// One record as a consumer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its topic.
    pub topic: String,
    /// Its partition.
    pub partition: u32,
    /// Its offset in the partition (0, 1, 2, ...).
    pub offset: u64,
    /// The routing key.
    pub key: String,
    /// The payload (JSON in gochat).
    pub payload: Vec<u8>,
    /// Metadata (gochat puts `trace_id` here).
    pub headers: BTreeMap<String, String>,
}

/// Producing records.
pub trait Producer: Send + Sync + 'static {
    /// Appends a record to the partition `key` hashes to. Waits (backpressure) while that
    /// partition is full; resolves once the record is durable in the bus.
    fn send(
        &self,
        topic: &str,
        key: &str,
        payload: Vec<u8>,
        headers: BTreeMap<String, String>,
    ) -> impl Future<Output = Result<(), MqError>> + Send;
}

/// One member of a consumer group.
pub trait Consumer: Send + 'static {
    /// The next record of the partitions assigned to this member, in offset order per
    /// partition. Waits for one.
    fn recv(&mut self) -> impl Future<Output = Result<Record, MqError>> + Send;
    /// Marks `record` and everything before it in its partition as processed for this group.
    fn commit(&mut self, record: &Record) -> impl Future<Output = Result<(), MqError>> + Send;
}

/// A bus: producing, creating topics, joining consumer groups.
pub trait Bus: Producer + Clone {
    /// The consumer type.
    type Consumer: Consumer;
    /// Creates `topic` with `partitions` partitions unless it exists.
    fn ensure_topic(
        &self,
        topic: &str,
        partitions: u32,
    ) -> impl Future<Output = Result<(), MqError>> + Send;
    /// Joins consumer group `group` on `topics` as a new member. Partitions are shared among the
    /// group's live members; a member that is dropped gives its partitions back.
    fn subscribe(
        &self,
        group: &str,
        topics: &[&str],
    ) -> impl Future<Output = Result<Self::Consumer, MqError>> + Send;
}

/// The partition of `key` among `partitions` in the in-process bus (FNV-1a; stable across
/// processes and versions). The Kafka bus uses the Java client's murmur2 partitioner instead.
pub fn partition_for(key: &str, partitions: u32) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in key.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % partitions.max(1)
}
