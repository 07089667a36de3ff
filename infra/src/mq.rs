//! The message bus between services: named topics split into partitions, records routed to a
//! partition by key (so one conversation always lands on one partition, in order), consumer
//! groups that share a topic's partitions among their members, and at-least-once delivery: a
//! consumer commits a record after processing it, and whatever was not committed when a member
//! leaves or crashes is delivered again to the member that takes its partitions over.
//!
//! Two implementations share these semantics: [`memory::MemoryBus`] (in-process, `serve` mode)
//! and [`kafka::KafkaBus`] (Apache Kafka through rdkafka, distributed mode).
//!
//! A record's [`Payload`] is bytes or a typed value ([`Payload::value`]). Kafka carries every
//! payload as bytes (a value as its JSON); the in-process bus hands a value over as it is, so
//! `serve` encodes and parses nothing between its services. A consumer reads either kind the
//! same way, with [`Payload::decode`].

pub mod kafka;
pub mod memory;

use std::any::Any;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

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
    /// A typed payload could not be encoded for the wire.
    #[error("encoding the payload: {0}")]
    Encoding(String),
}

/// A type the bus can carry as a value: JSON on the wire, handed over as is in process.
pub trait Message: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {}

impl<T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static> Message for T {}

/// A typed value behind a [`Payload`], with its type erased.
trait Carried: Any + Send + Sync {
    fn to_json(&self) -> Result<Vec<u8>, serde_json::Error>;
    fn as_any(&self) -> &dyn Any;
    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;
    fn type_name(&self) -> &'static str;
}

impl<T: Message> Carried for T {
    fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }

    fn type_name(&self) -> &'static str {
        std::any::type_name::<T>()
    }
}

/// What a record carries: bytes (everything Kafka delivers), or a typed value that the
/// in-process bus passes on without encoding it. Cheap to clone (a value is shared, not
/// copied).
#[derive(Clone)]
pub struct Payload(Body);

#[derive(Clone)]
enum Body {
    Bytes(Vec<u8>),
    Value(Arc<dyn Carried>),
}

impl Payload {
    /// A typed value. On Kafka it travels as its JSON. Pass an `Arc<T>` you already hold to
    /// [`Payload::shared`] instead, which keeps the `Arc`.
    pub fn value<T: Message>(value: T) -> Self {
        Self(Body::Value(Arc::new(value)))
    }

    /// A typed value already shared: the bus keeps this `Arc` rather than copying the value.
    pub fn shared<T: Message>(value: Arc<T>) -> Self {
        Self(Body::Value(value))
    }

    /// Whether this is a typed value rather than bytes.
    pub fn is_value(&self) -> bool {
        matches!(self.0, Body::Value(_))
    }

    /// The payload as a `T`. A value of type `T` is borrowed as it is; bytes, or a value of
    /// another type, go through JSON (so a consumer reads a value exactly as it would read the
    /// same payload from Kafka).
    pub fn decode<T: Message>(&self) -> Result<Cow<'_, T>, serde_json::Error> {
        match &self.0 {
            Body::Bytes(bytes) => serde_json::from_slice(bytes).map(Cow::Owned),
            Body::Value(value) => match value.as_any().downcast_ref::<T>() {
                Some(v) => Ok(Cow::Borrowed(v)),
                None => serde_json::from_slice(&value.to_json()?).map(Cow::Owned),
            },
        }
    }

    /// The payload as a shared `T`: a value of type `T` is shared as it is (its `Arc` cloned,
    /// nothing copied); anything else is read as [`Payload::decode`] reads it. For a consumer
    /// that keeps the value past the record.
    pub fn decode_shared<T: Message>(&self) -> Result<Arc<T>, serde_json::Error> {
        if let Body::Value(value) = &self.0
            && let Ok(shared) = Arc::clone(value).into_any().downcast::<T>()
        {
            return Ok(shared);
        }
        self.decode::<T>().map(|v| Arc::new(v.into_owned()))
    }

    /// The bytes on the wire: the bytes themselves, or a value's JSON.
    pub fn bytes(&self) -> Result<Cow<'_, [u8]>, serde_json::Error> {
        match &self.0 {
            Body::Bytes(bytes) => Ok(Cow::Borrowed(bytes)),
            Body::Value(value) => value.to_json().map(Cow::Owned),
        }
    }
}

impl From<Vec<u8>> for Payload {
    fn from(bytes: Vec<u8>) -> Self {
        Self(Body::Bytes(bytes))
    }
}

impl From<&[u8]> for Payload {
    fn from(bytes: &[u8]) -> Self {
        Self(Body::Bytes(bytes.to_vec()))
    }
}

impl Default for Payload {
    fn default() -> Self {
        Self(Body::Bytes(Vec::new()))
    }
}

/// Equal when the bytes on the wire are equal. Not `Eq`: a value that cannot be encoded equals
/// nothing, not even itself (gochat's wire types always encode).
impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        match (self.bytes(), other.bytes()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        }
    }
}

impl PartialEq<[u8]> for Payload {
    fn eq(&self, other: &[u8]) -> bool {
        self.bytes().is_ok_and(|b| *b == *other)
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Body::Bytes(bytes) => match std::str::from_utf8(bytes) {
                Ok(text) => f.debug_tuple("Bytes").field(&text).finish(),
                Err(_) => f.debug_tuple("Bytes").field(&bytes.len()).finish(),
            },
            Body::Value(value) => f.debug_tuple("Value").field(&value.type_name()).finish(),
        }
    }
}

/// One record as a consumer sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Its topic.
    pub topic: String,
    /// Its partition.
    pub partition: u32,
    /// Its offset in the partition (0, 1, 2, ...).
    pub offset: u64,
    /// The routing key.
    pub key: String,
    /// The payload (JSON in gochat, or the value it encodes; read it with [`Payload::decode`]).
    pub payload: Payload,
    /// Metadata (gochat puts `trace_id` here).
    pub headers: BTreeMap<String, String>,
}

/// Producing records.
pub trait Producer: Send + Sync + 'static {
    /// Appends a record to the partition `key` hashes to. Waits (backpressure) while that
    /// partition is full; resolves once the record is durable in the bus. Bytes (a `Vec<u8>`)
    /// or a [`Payload::value`].
    fn send(
        &self,
        topic: &str,
        key: &str,
        payload: impl Into<Payload> + Send,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Note {
        text: String,
        seq: i64,
    }

    #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    struct SeqOnly {
        seq: i64,
    }

    fn note() -> Note {
        Note {
            text: "hi".into(),
            seq: 3,
        }
    }

    #[test]
    fn a_value_of_the_asked_type_is_borrowed_not_parsed() {
        let payload = Payload::value(note());
        assert!(payload.is_value());
        let decoded = payload.decode::<Note>().expect("decodes");
        assert!(matches!(decoded, Cow::Borrowed(_)));
        assert_eq!(*decoded, note());
    }

    #[test]
    fn a_shared_value_of_the_asked_type_is_the_same_allocation() {
        let shared = Arc::new(note());
        let payload = Payload::shared(Arc::clone(&shared));
        let decoded = payload.decode_shared::<Note>().expect("decodes");
        assert!(Arc::ptr_eq(&decoded, &shared), "not copied");
        // Another type, or bytes, are read as `decode` reads them.
        assert_eq!(payload.decode_shared::<SeqOnly>().expect("json").seq, 3);
        let bytes = Payload::from(serde_json::to_vec(&note()).expect("json"));
        assert_eq!(*bytes.decode_shared::<Note>().expect("parsed"), note());
        assert!(
            Payload::from(b"{".as_slice())
                .decode_shared::<Note>()
                .is_err()
        );
    }

    #[test]
    fn a_value_read_as_another_type_goes_through_its_json() {
        let payload = Payload::value(note());
        let decoded = payload.decode::<SeqOnly>().expect("decodes");
        assert!(matches!(decoded, Cow::Owned(_)));
        assert_eq!(decoded.seq, 3);
        let err = payload.decode::<Vec<i64>>();
        assert!(err.is_err(), "an object is not a list: {err:?}");
    }

    #[test]
    fn bytes_and_the_value_they_encode_are_the_same_payload() {
        let json = serde_json::to_vec(&note()).expect("json");
        let bytes = Payload::from(json.clone());
        let value = Payload::value(note());
        assert_eq!(bytes, value);
        assert_eq!(value, *json.as_slice());
        assert_eq!(value.bytes().expect("bytes").as_ref(), json.as_slice());
        assert_eq!(*bytes.decode::<Note>().expect("decodes"), note());
        assert_ne!(bytes, Payload::value(SeqOnly { seq: 3 }));
        assert!(Payload::from(b"{".as_slice()).decode::<Note>().is_err());
    }

    #[test]
    fn debug_names_the_kind() {
        assert_eq!(
            format!("{:?}", Payload::from(b"ab".to_vec())),
            r#"Bytes("ab")"#
        );
        assert!(format!("{:?}", Payload::value(note())).contains("Note"));
    }
}
