//! [`MemoryBus`]: the in-process message bus of gochat's single-process `serve` mode.
//!
//! It has the semantics of the Kafka bus (see [`crate::mq`]), so the same service code runs on
//! both:
//!
//! - **Topics and partitions.** A topic is a fixed number of partitions, each an append-only log
//!   with offsets 0, 1, 2, ... A record goes to partition [`partition_for`]`(key, n)`, so one key
//!   always lands on one partition, in send order. [`Bus::ensure_topic`] creates a topic; a
//!   topic first named by [`Producer::send`] or [`Bus::subscribe`] is created with
//!   [`MemoryBusConfig::default_partitions`] partitions.
//! - **Consumer groups.** Each [`Bus::subscribe`] call adds a member to a group. The partitions
//!   of the group's topics are dealt round-robin to the live members that subscribe each topic,
//!   in join order; this assignment is recomputed whenever a member joins or is dropped (the
//!   rebalance). A new group starts at the log start of every partition (Kafka's
//!   `auto.offset.reset=earliest`). A member keeps its read position on partitions it retains
//!   across a rebalance and starts a newly assigned partition at the group's committed offset,
//!   so whatever the previous owner had not committed is delivered again (at-least-once). A
//!   member only ever reads the partitions it currently owns.
//! - **Commits.** [`Consumer::commit`] moves the group's committed offset of the record's
//!   partition to `offset + 1`, never backwards. The group and its committed offsets outlive its
//!   members, like Kafka's: a member joining later resumes where the group left off.
//! - **Retention and backpressure.** Unlike a Kafka broker, memory is bounded: a partition keeps
//!   the records from the lowest committed offset among the groups that subscribe its topic (a
//!   group keeps holding its topics after its members leave), or every record if no group
//!   subscribes it yet. When a partition holds [`MemoryBusConfig::partition_capacity`] records,
//!   `send` waits until commits free space. A topic nobody consumes therefore fills up and then
//!   blocks its producers, as does a group whose members all left.
//! - **Payloads.** A record keeps the [`Payload`] it was sent with: bytes stay bytes, and a
//!   typed value is shared by every group that reads it, never encoded.
//! - **Shutdown.** After [`MemoryBus::close`], `send`, `recv`, `commit`, `subscribe` and
//!   `ensure_topic` return [`MqError::Closed`], including calls that were waiting, so consumer
//!   loops end.
//!
//! Implementation: one [`std::sync::Mutex`] guards the whole state; critical sections are short
//! and never span an `.await`. Waiting uses [`tokio::sync::Notify`]: one per consumer (signalled
//! when a record lands on a partition it owns, on rebalance and on close) and one per partition
//! (signalled when a commit trims it, and on close). Nothing polls. [`Consumer::recv`] is
//! cancel-safe: a record is taken and returned without an intervening `.await`.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use super::{Bus, Consumer, MqError, Payload, Producer, Record, partition_for};

/// Sizing of a [`MemoryBus`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryBusConfig {
    /// Partitions of a topic created implicitly by `send` or `subscribe` (default 8).
    pub default_partitions: u32,
    /// Records a partition retains (not yet committed by every subscribing group) before `send`
    /// waits (default 65 536).
    pub partition_capacity: usize,
}

impl Default for MemoryBusConfig {
    fn default() -> Self {
        Self {
            default_partitions: 8,
            partition_capacity: 65_536,
        }
    }
}

/// The in-process bus: topics, partitions and consumer groups in memory. Cheap to clone; every
/// clone is the same bus.
#[derive(Clone)]
pub struct MemoryBus {
    inner: Arc<Inner>,
}

struct Inner {
    config: MemoryBusConfig,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    closed: bool,
    topics: HashMap<String, TopicState>,
    groups: HashMap<String, GroupState>,
    next_member: u64,
}

struct TopicState {
    partitions: Vec<PartitionState>,
    /// Groups that subscribe this topic (they hold its retention).
    groups: BTreeSet<String>,
}

struct PartitionState {
    /// Offset of `records[0]` (the log start).
    base: u64,
    records: VecDeque<Record>,
    /// Signalled when records are trimmed (producers waiting for space) and on close.
    space: Arc<Notify>,
}

impl PartitionState {
    fn end(&self) -> u64 {
        self.base + self.records.len() as u64
    }
}

#[derive(Default)]
struct GroupState {
    /// Every topic any member ever subscribed.
    topics: BTreeSet<String>,
    /// Committed offset per topic, per partition.
    committed: HashMap<String, Vec<u64>>,
    /// Live members in join order.
    members: Vec<MemberState>,
    /// Index in `members` of each partition's owner, per topic.
    owners: HashMap<String, Vec<Option<usize>>>,
}

struct MemberState {
    id: u64,
    topics: Vec<String>,
    assigned: Vec<Assignment>,
    /// Index in `assigned` where the next `recv` starts looking (round-robin fairness).
    cursor: usize,
    notify: Arc<Notify>,
}

struct Assignment {
    topic: String,
    partition: u32,
    /// Next offset to deliver.
    position: u64,
}

impl MemoryBus {
    /// An empty bus.
    pub fn new(config: MemoryBusConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// Shuts the bus down: every pending and later `send`, `recv`, `commit`, `subscribe` and
    /// `ensure_topic` returns [`MqError::Closed`]. Idempotent.
    pub fn close(&self) {
        let mut st = self.inner.lock();
        st.closed = true;
        for group in st.groups.values() {
            for member in &group.members {
                member.notify.notify_one();
            }
        }
        for topic in st.topics.values() {
            for part in &topic.partitions {
                part.space.notify_waiters();
            }
        }
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.inner.lock().closed
    }

    /// How far `group` is behind on `topic`: the sum over its partitions of end offset minus the
    /// group's committed offset. A group that does not subscribe the topic counts from the log
    /// start (what it would read if it joined now); an unknown topic has lag 0.
    pub fn lag(&self, group: &str, topic: &str) -> u64 {
        let st = self.inner.lock();
        let Some(t) = st.topics.get(topic) else {
            return 0;
        };
        let committed = st.groups.get(group).and_then(|g| g.committed.get(topic));
        t.partitions
            .iter()
            .enumerate()
            .map(|(p, part)| {
                let from = committed
                    .and_then(|c| c.get(p).copied())
                    .unwrap_or(part.base);
                part.end().saturating_sub(from)
            })
            .sum()
    }

    /// Appends `record` (its partition and offset are set here) unless its partition is full.
    fn try_push(&self, mut record: Record) -> Result<Push, MqError> {
        let capacity = self.inner.config.partition_capacity.max(1);
        let mut st = self.inner.lock();
        if st.closed {
            return Err(MqError::Closed);
        }
        let default_partitions = self.inner.config.default_partitions;
        let State { topics, groups, .. } = &mut *st;
        let topic = topics
            .entry(record.topic.clone())
            .or_insert_with(|| TopicState::new(default_partitions));
        let p = partition_for(&record.key, topic.partitions.len() as u32);
        let Some(part) = topic.partitions.get_mut(p as usize) else {
            return Err(MqError::UnknownTopic(record.topic));
        };
        if part.records.len() >= capacity {
            return Ok(Push::Full(record, Arc::clone(&part.space)));
        }
        // Wake the owner in every subscribing group (consumers recheck under this lock).
        for group in topic.groups.iter().filter_map(|g| groups.get(g)) {
            let owner = group
                .owners
                .get(&record.topic)
                .and_then(|o| o.get(p as usize).copied().flatten());
            if let Some(member) = owner.and_then(|i| group.members.get(i)) {
                member.notify.notify_one();
            }
        }
        record.partition = p;
        record.offset = part.end();
        part.records.push_back(record);
        Ok(Push::Done)
    }
}

enum Push {
    Done,
    Full(Record, Arc<Notify>),
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl TopicState {
    fn new(partitions: u32) -> Self {
        Self {
            partitions: (0..partitions.max(1))
                .map(|_| PartitionState {
                    base: 0,
                    records: VecDeque::new(),
                    space: Arc::new(Notify::new()),
                })
                .collect(),
            groups: BTreeSet::new(),
        }
    }
}

/// Recomputes the assignment of `group`'s partitions among its live members and wakes them.
fn rebalance(group: &mut GroupState, topics: &HashMap<String, TopicState>) {
    let mut assigned: Vec<Vec<Assignment>> = group.members.iter().map(|_| Vec::new()).collect();
    let mut owners = HashMap::new();
    let mut turn = 0usize;
    for topic in &group.topics {
        let n = topics.get(topic).map_or(0, |t| t.partitions.len());
        let subscribers: Vec<usize> = group
            .members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.topics.iter().any(|t| t == topic))
            .map(|(i, _)| i)
            .collect();
        let mut topic_owners = vec![None; n];
        if !subscribers.is_empty() {
            for (p, owner) in topic_owners.iter_mut().enumerate() {
                let idx = subscribers[turn % subscribers.len()];
                turn += 1;
                *owner = Some(idx);
                let partition = p as u32;
                let kept = group.members[idx]
                    .assigned
                    .iter()
                    .find(|a| a.topic == *topic && a.partition == partition)
                    .map(|a| a.position);
                let position = kept.unwrap_or_else(|| {
                    group
                        .committed
                        .get(topic)
                        .and_then(|c| c.get(p).copied())
                        .unwrap_or(0)
                });
                assigned[idx].push(Assignment {
                    topic: topic.clone(),
                    partition,
                    position,
                });
            }
        }
        owners.insert(topic.clone(), topic_owners);
    }
    group.owners = owners;
    for (member, a) in group.members.iter_mut().zip(assigned) {
        member.assigned = a;
        member.cursor = 0;
        member.notify.notify_one();
    }
}

impl fmt::Debug for MemoryBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.inner.lock();
        f.debug_struct("MemoryBus")
            .field("config", &self.inner.config)
            .field("closed", &st.closed)
            .field("topics", &st.topics.len())
            .field("groups", &st.groups.len())
            .finish()
    }
}

impl Producer for MemoryBus {
    async fn send(
        &self,
        topic: &str,
        key: &str,
        payload: impl Into<Payload> + Send,
        headers: BTreeMap<String, String>,
    ) -> Result<(), MqError> {
        let record = Record {
            topic: topic.to_owned(),
            partition: 0,
            offset: 0,
            key: key.to_owned(),
            payload: payload.into(),
            headers,
        };
        let (mut record, space) = match self.try_push(record)? {
            Push::Done => return Ok(()),
            Push::Full(record, space) => (record, space),
        };
        loop {
            // Register for the wake-up before re-checking, so a trim in between is not missed.
            let mut notified = pin!(space.notified());
            notified.as_mut().enable();
            match self.try_push(record)? {
                Push::Done => return Ok(()),
                Push::Full(r, _) => record = r,
            }
            notified.await;
        }
    }
}

impl Bus for MemoryBus {
    type Consumer = MemoryConsumer;

    async fn ensure_topic(&self, topic: &str, partitions: u32) -> Result<(), MqError> {
        let mut st = self.inner.lock();
        if st.closed {
            return Err(MqError::Closed);
        }
        st.topics
            .entry(topic.to_owned())
            .or_insert_with(|| TopicState::new(partitions));
        Ok(())
    }

    async fn subscribe(&self, group: &str, topics: &[&str]) -> Result<MemoryConsumer, MqError> {
        let default_partitions = self.inner.config.default_partitions;
        let mut st = self.inner.lock();
        if st.closed {
            return Err(MqError::Closed);
        }
        let id = st.next_member;
        st.next_member += 1;
        let State {
            topics: all_topics,
            groups,
            ..
        } = &mut *st;
        let g = groups.entry(group.to_owned()).or_default();
        let mut member_topics: Vec<String> = Vec::new();
        for &topic in topics {
            if member_topics.iter().any(|t| t == topic) {
                continue;
            }
            member_topics.push(topic.to_owned());
            let t = all_topics
                .entry(topic.to_owned())
                .or_insert_with(|| TopicState::new(default_partitions));
            if g.topics.insert(topic.to_owned()) {
                // A new subscription starts at the log start (earliest).
                g.committed.insert(
                    topic.to_owned(),
                    t.partitions.iter().map(|p| p.base).collect(),
                );
                t.groups.insert(group.to_owned());
            }
        }
        let notify = Arc::new(Notify::new());
        g.members.push(MemberState {
            id,
            topics: member_topics,
            assigned: Vec::new(),
            cursor: 0,
            notify: Arc::clone(&notify),
        });
        rebalance(g, all_topics);
        Ok(MemoryConsumer {
            inner: Arc::clone(&self.inner),
            group: group.to_owned(),
            id,
            notify,
        })
    }
}

/// One member of a consumer group of a [`MemoryBus`]. Dropping it leaves the group, which
/// hands its partitions to the remaining members.
pub struct MemoryConsumer {
    inner: Arc<Inner>,
    group: String,
    id: u64,
    notify: Arc<Notify>,
}

impl MemoryConsumer {
    /// The group this member belongs to.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The partitions currently assigned to this member, as `(topic, partition)`, sorted.
    pub fn assignment(&self) -> Vec<(String, u32)> {
        let st = self.inner.lock();
        let mut out: Vec<(String, u32)> = st
            .groups
            .get(&self.group)
            .and_then(|g| g.members.iter().find(|m| m.id == self.id))
            .map(|m| {
                m.assigned
                    .iter()
                    .map(|a| (a.topic.clone(), a.partition))
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    /// Takes the next available record of an owned partition, round-robin across partitions.
    fn try_take(&self) -> Result<Option<Record>, MqError> {
        let mut st = self.inner.lock();
        if st.closed {
            return Err(MqError::Closed);
        }
        let State { topics, groups, .. } = &mut *st;
        let Some(member) = groups
            .get_mut(&self.group)
            .and_then(|g| g.members.iter_mut().find(|m| m.id == self.id))
        else {
            return Err(MqError::Closed);
        };
        let n = member.assigned.len();
        for i in 0..n {
            let idx = (member.cursor + i) % n;
            let a = &mut member.assigned[idx];
            let Some(part) = topics
                .get(&a.topic)
                .and_then(|t| t.partitions.get(a.partition as usize))
            else {
                continue;
            };
            // Records below the log start were committed by this group already.
            a.position = a.position.max(part.base);
            if a.position < part.end() {
                let record = part.records[(a.position - part.base) as usize].clone();
                a.position += 1;
                member.cursor = (idx + 1) % n;
                return Ok(Some(record));
            }
        }
        Ok(None)
    }
}

impl fmt::Debug for MemoryConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryConsumer")
            .field("group", &self.group)
            .field("member", &self.id)
            .finish()
    }
}

impl Consumer for MemoryConsumer {
    async fn recv(&mut self) -> Result<Record, MqError> {
        loop {
            if let Some(record) = self.try_take()? {
                return Ok(record);
            }
            // `notify_one` stores a permit, so a wake-up sent since `try_take` is not lost.
            self.notify.notified().await;
        }
    }

    async fn commit(&mut self, record: &Record) -> Result<(), MqError> {
        let mut st = self.inner.lock();
        if st.closed {
            return Err(MqError::Closed);
        }
        let State { topics, groups, .. } = &mut *st;
        let unknown = || MqError::UnknownTopic(record.topic.clone());
        let topic = topics.get_mut(&record.topic).ok_or_else(unknown)?;
        let p = record.partition as usize;
        let end = topic.partitions.get(p).ok_or_else(unknown)?.end();
        let slot = groups
            .get_mut(&self.group)
            .and_then(|g| g.committed.get_mut(&record.topic))
            .and_then(|c| c.get_mut(p))
            .ok_or_else(unknown)?;
        let next = record.offset.saturating_add(1).min(end);
        if next <= *slot {
            return Ok(());
        }
        *slot = next;
        // Trim what every subscribing group has committed.
        let keep_from = topic
            .groups
            .iter()
            .filter_map(|g| groups.get(g)?.committed.get(&record.topic)?.get(p).copied())
            .min()
            .unwrap_or(0);
        let part = &mut topic.partitions[p];
        let mut trimmed = false;
        while part.base < keep_from && part.records.pop_front().is_some() {
            part.base += 1;
            trimmed = true;
        }
        if trimmed {
            part.space.notify_waiters();
        }
        Ok(())
    }
}

impl Drop for MemoryConsumer {
    fn drop(&mut self) {
        let mut st = self.inner.lock();
        let State { topics, groups, .. } = &mut *st;
        if let Some(group) = groups.get_mut(&self.group) {
            group.members.retain(|m| m.id != self.id);
            rebalance(group, topics);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap, HashSet};
    use std::time::Duration;

    use tokio::time::timeout;

    use super::*;

    /// Guards against hangs only; never a speed bound.
    const GUARD: Duration = Duration::from_secs(30);
    /// How long to watch a future that must stay pending.
    const PENDING: Duration = Duration::from_millis(100);

    fn bus(default_partitions: u32, partition_capacity: usize) -> MemoryBus {
        MemoryBus::new(MemoryBusConfig {
            default_partitions,
            partition_capacity,
        })
    }

    async fn send(bus: &MemoryBus, topic: &str, key: &str, payload: &str) {
        timeout(
            GUARD,
            bus.send(topic, key, payload.as_bytes().to_vec(), BTreeMap::new()),
        )
        .await
        .expect("send hung")
        .expect("send");
    }

    async fn recv(c: &mut MemoryConsumer) -> Record {
        timeout(GUARD, c.recv())
            .await
            .expect("recv hung")
            .expect("recv")
    }

    async fn nothing_pending(c: &mut MemoryConsumer) -> bool {
        timeout(PENDING, c.recv()).await.is_err()
    }

    fn text(r: &Record) -> String {
        String::from_utf8(r.payload.bytes().expect("bytes").into_owned()).expect("utf8")
    }

    #[tokio::test]
    async fn a_value_reaches_every_group_as_it_was_sent() {
        let bus = bus(2, 16);
        let mut a = bus.subscribe("a", &["t"]).await.expect("subscribe");
        let mut b = bus.subscribe("b", &["t"]).await.expect("subscribe");
        let value = BTreeMap::from([("seq".to_owned(), 9_i64)]);
        timeout(
            GUARD,
            bus.send("t", "k", Payload::value(value.clone()), BTreeMap::new()),
        )
        .await
        .expect("send hung")
        .expect("send");
        for c in [&mut a, &mut b] {
            let r = recv(c).await;
            assert!(r.payload.is_value(), "handed over, not encoded: {r:?}");
            let got = r
                .payload
                .decode::<BTreeMap<String, i64>>()
                .expect("decodes");
            assert!(matches!(got, std::borrow::Cow::Borrowed(_)));
            assert_eq!(*got, value);
            assert_eq!(text(&r), r#"{"seq":9}"#);
        }
    }

    #[tokio::test]
    async fn key_maps_to_one_partition_in_order() {
        let bus = bus(8, 1024);
        let mut c = bus.subscribe("g", &["t"]).await.expect("subscribe");
        for i in 0..20 {
            send(&bus, "t", "conv-1", &i.to_string()).await;
        }
        let expected = partition_for("conv-1", 8);
        for i in 0..20u64 {
            let r = recv(&mut c).await;
            assert_eq!(r.partition, expected);
            assert_eq!(r.offset, i);
            assert_eq!(r.key, "conv-1");
            assert_eq!(text(&r), i.to_string());
            assert_eq!(r.topic, "t");
        }
        assert!(nothing_pending(&mut c).await);
    }

    #[tokio::test]
    async fn headers_are_carried() {
        let bus = MemoryBus::new(MemoryBusConfig::default());
        let mut c = bus.subscribe("g", &["t"]).await.expect("subscribe");
        let headers = BTreeMap::from([("trace_id".to_owned(), "abc".to_owned())]);
        bus.send("t", "k", b"x".to_vec(), headers.clone())
            .await
            .expect("send");
        assert_eq!(recv(&mut c).await.headers, headers);
    }

    #[tokio::test]
    async fn two_groups_each_get_every_record() {
        let bus = bus(4, 1024);
        let mut a = bus.subscribe("a", &["t"]).await.expect("subscribe");
        let mut b = bus.subscribe("b", &["t"]).await.expect("subscribe");
        for i in 0..50 {
            send(&bus, "t", &format!("k{i}"), &i.to_string()).await;
        }
        for c in [&mut a, &mut b] {
            let mut got = HashSet::new();
            for _ in 0..50 {
                let r = recv(c).await;
                assert!(got.insert(text(&r)));
                c.commit(&r).await.expect("commit");
            }
            assert!(nothing_pending(c).await);
        }
    }

    #[tokio::test]
    async fn members_split_partitions_and_get_each_record_once() {
        let bus = bus(8, 1024);
        let mut a = bus.subscribe("g", &["t"]).await.expect("subscribe");
        let mut b = bus.subscribe("g", &["t"]).await.expect("subscribe");
        let (pa, pb) = (a.assignment(), b.assignment());
        assert_eq!(pa.len(), 4);
        assert_eq!(pb.len(), 4);
        let all: HashSet<_> = pa.iter().chain(&pb).cloned().collect();
        assert_eq!(all.len(), 8);

        for i in 0..100 {
            send(&bus, "t", &format!("k{i}"), &i.to_string()).await;
        }
        let mut got = HashMap::new();
        for (c, mine) in [(&mut a, &pa), (&mut b, &pb)] {
            while let Ok(r) = timeout(PENDING, c.recv()).await {
                let r = r.expect("recv");
                assert!(mine.contains(&(r.topic.clone(), r.partition)));
                c.commit(&r).await.expect("commit");
                assert!(got.insert(text(&r), 1).is_none(), "duplicate {r:?}");
            }
        }
        assert_eq!(got.len(), 100);
        assert_eq!(bus.lag("g", "t"), 0);
    }

    #[tokio::test]
    async fn dropped_member_records_are_redelivered() {
        let bus = bus(4, 1024);
        let mut a = bus.subscribe("g", &["t"]).await.expect("subscribe");
        let mut b = bus.subscribe("g", &["t"]).await.expect("subscribe");
        for i in 0..40 {
            send(&bus, "t", &format!("k{i}"), &i.to_string()).await;
        }
        // `a` reads its share and commits only the first record.
        let mut a_got = Vec::new();
        while let Ok(r) = timeout(PENDING, a.recv()).await {
            a_got.push(r.expect("recv"));
        }
        assert!(a_got.len() > 1);
        a.commit(&a_got[0]).await.expect("commit");
        drop(a);
        assert_eq!(b.assignment().len(), 4);

        let mut b_got = HashSet::new();
        while let Ok(r) = timeout(PENDING, b.recv()).await {
            let r = r.expect("recv");
            b.commit(&r).await.expect("commit");
            b_got.insert(text(&r));
        }
        // Everything but `a`'s committed record reaches `b`, including what `a` saw uncommitted.
        assert_eq!(b_got.len(), 39);
        assert!(!b_got.contains(&text(&a_got[0])));
        for r in &a_got[1..] {
            assert!(b_got.contains(&text(r)), "{r:?} not redelivered");
        }
    }

    #[tokio::test]
    async fn revoked_partitions_are_not_delivered() {
        let bus = bus(2, 1024);
        let mut a = bus.subscribe("g", &["t"]).await.expect("subscribe");
        assert_eq!(a.assignment().len(), 2);
        let mut b = bus.subscribe("g", &["t"]).await.expect("subscribe");
        let pa = a.assignment();
        let pb = b.assignment();
        assert_eq!((pa.len(), pb.len()), (1, 1));
        // A key on `b`'s partition.
        let key = (0..)
            .map(|i| format!("k{i}"))
            .find(|k| partition_for(k, 2) == pb[0].1)
            .expect("key");
        send(&bus, "t", &key, "x").await;
        assert!(nothing_pending(&mut a).await);
        assert_eq!(recv(&mut b).await.partition, pb[0].1);
    }

    #[tokio::test]
    async fn retained_partition_keeps_position_new_one_starts_at_commit() {
        let bus = bus(1, 1024);
        let mut a = bus.subscribe("g", &["t"]).await.expect("subscribe");
        for i in 0..3 {
            send(&bus, "t", "k", &i.to_string()).await;
        }
        let r0 = recv(&mut a).await;
        a.commit(&r0).await.expect("commit");
        assert_eq!(text(&recv(&mut a).await), "1");
        // `b` joins but gets no partition (one partition, `a` joined first): `a` goes on.
        let mut b = bus.subscribe("g", &["t"]).await.expect("subscribe");
        assert!(b.assignment().is_empty());
        assert_eq!(text(&recv(&mut a).await), "2");
        drop(a);
        // `b` starts at the committed offset 1.
        assert_eq!(text(&recv(&mut b).await), "1");
        assert_eq!(text(&recv(&mut b).await), "2");
    }

    #[tokio::test]
    async fn rejoining_group_resumes_from_commit() {
        let bus = bus(1, 1024);
        let mut a = bus.subscribe("g", &["t"]).await.expect("subscribe");
        for i in 0..3 {
            send(&bus, "t", "k", &i.to_string()).await;
        }
        let r = recv(&mut a).await;
        a.commit(&r).await.expect("commit");
        drop(a);
        let mut a = bus.subscribe("g", &["t"]).await.expect("subscribe");
        assert_eq!(text(&recv(&mut a).await), "1");
    }

    #[tokio::test]
    async fn commit_never_goes_backwards() {
        let bus = bus(1, 1024);
        let mut c = bus.subscribe("g", &["t"]).await.expect("subscribe");
        for i in 0..10 {
            send(&bus, "t", "k", &i.to_string()).await;
        }
        let mut records = Vec::new();
        for _ in 0..10 {
            records.push(recv(&mut c).await);
        }
        c.commit(&records[5]).await.expect("commit");
        assert_eq!(bus.lag("g", "t"), 4);
        c.commit(&records[2]).await.expect("commit");
        assert_eq!(bus.lag("g", "t"), 4);
        drop(c);
        let mut c = bus.subscribe("g", &["t"]).await.expect("subscribe");
        assert_eq!(recv(&mut c).await.offset, 6);
    }

    #[tokio::test]
    async fn lag_counts_uncommitted_records() {
        let bus = bus(4, 1024);
        assert_eq!(bus.lag("g", "t"), 0);
        let mut c = bus.subscribe("g", &["t"]).await.expect("subscribe");
        assert_eq!(bus.lag("g", "t"), 0);
        for i in 0..10 {
            send(&bus, "t", &format!("k{i}"), "x").await;
        }
        assert_eq!(bus.lag("g", "t"), 10);
        // Receiving is not committing.
        let mut records = Vec::new();
        for _ in 0..10 {
            records.push(recv(&mut c).await);
        }
        assert_eq!(bus.lag("g", "t"), 10);
        for r in &records[..3] {
            c.commit(r).await.expect("commit");
        }
        assert_eq!(bus.lag("g", "t"), 7);
        // Committing the last record of a partition covers everything before it.
        let p = records[9].partition;
        c.commit(&records[9]).await.expect("commit");
        let left = records.iter().filter(|r| r.partition != p).count()
            - records[..3].iter().filter(|r| r.partition != p).count();
        assert_eq!(bus.lag("g", "t"), left as u64);
        for r in &records {
            c.commit(r).await.expect("commit");
        }
        assert_eq!(bus.lag("g", "t"), 0);
        // A group that never subscribed would read from the log start: all trimmed now.
        assert_eq!(bus.lag("other", "t"), 0);
    }

    #[tokio::test]
    async fn full_partition_makes_send_wait_until_commit() {
        let bus = bus(1, 4);
        let mut c = bus.subscribe("g", &["t"]).await.expect("subscribe");
        for i in 0..4 {
            send(&bus, "t", "k", &i.to_string()).await;
        }
        let producer = bus.clone();
        let mut fifth = tokio::spawn(async move {
            producer
                .send("t", "k", b"4".to_vec(), BTreeMap::new())
                .await
        });
        assert!(
            timeout(PENDING, &mut fifth).await.is_err(),
            "5th send completed"
        );
        // Receiving alone frees nothing.
        let r = recv(&mut c).await;
        assert!(
            timeout(PENDING, &mut fifth).await.is_err(),
            "5th send completed"
        );
        c.commit(&r).await.expect("commit");
        timeout(GUARD, fifth)
            .await
            .expect("send still blocked")
            .expect("join")
            .expect("send");
        for i in 1..5 {
            assert_eq!(text(&recv(&mut c).await), i.to_string());
        }
    }

    #[tokio::test]
    async fn slowest_group_holds_retention() {
        let bus = bus(1, 2);
        let mut fast = bus.subscribe("fast", &["t"]).await.expect("subscribe");
        let mut slow = bus.subscribe("slow", &["t"]).await.expect("subscribe");
        send(&bus, "t", "k", "0").await;
        send(&bus, "t", "k", "1").await;
        for _ in 0..2 {
            let r = recv(&mut fast).await;
            fast.commit(&r).await.expect("commit");
        }
        let producer = bus.clone();
        let mut third = tokio::spawn(async move {
            producer
                .send("t", "k", b"2".to_vec(), BTreeMap::new())
                .await
        });
        assert!(
            timeout(PENDING, &mut third).await.is_err(),
            "send ignored `slow`"
        );
        let r = recv(&mut slow).await;
        slow.commit(&r).await.expect("commit");
        timeout(GUARD, third)
            .await
            .expect("send still blocked")
            .expect("join")
            .expect("send");
    }

    #[tokio::test]
    async fn unsubscribed_topic_retains_until_capacity_then_a_new_group_reads_from_start() {
        let bus = bus(1, 3);
        for i in 0..3 {
            send(&bus, "t", "k", &i.to_string()).await;
        }
        let producer = bus.clone();
        let mut fourth = tokio::spawn(async move {
            producer
                .send("t", "k", b"3".to_vec(), BTreeMap::new())
                .await
        });
        assert!(
            timeout(PENDING, &mut fourth).await.is_err(),
            "4th send completed"
        );
        let mut c = bus.subscribe("g", &["t"]).await.expect("subscribe");
        let r = recv(&mut c).await;
        assert_eq!(r.offset, 0);
        c.commit(&r).await.expect("commit");
        timeout(GUARD, fourth)
            .await
            .expect("send still blocked")
            .expect("join")
            .expect("send");
        for i in 1..4 {
            assert_eq!(text(&recv(&mut c).await), i.to_string());
        }
    }

    #[tokio::test]
    async fn recv_fairness_across_partitions() {
        let bus = bus(2, 1024);
        let mut c = bus.subscribe("g", &["t"]).await.expect("subscribe");
        let key_of = |p: u32| {
            (0..)
                .map(|i| format!("k{i}"))
                .find(|k| partition_for(k, 2) == p)
                .expect("key")
        };
        let (k0, k1) = (key_of(0), key_of(1));
        for i in 0..10 {
            send(&bus, "t", &k0, &i.to_string()).await;
        }
        send(&bus, "t", &k1, "other").await;
        // The lone record of partition 1 comes within the first two, not after all ten.
        let first_two = [recv(&mut c).await, recv(&mut c).await];
        assert!(first_two.iter().any(|r| r.partition == 1));
    }

    #[tokio::test]
    async fn ensure_topic_sets_partitions_once() {
        let bus = bus(8, 1024);
        bus.ensure_topic("t", 3).await.expect("ensure");
        bus.ensure_topic("t", 5).await.expect("ensure");
        let c = bus.subscribe("g", &["t"]).await.expect("subscribe");
        assert_eq!(c.assignment().len(), 3);
        let d = bus.subscribe("g", &["u"]).await.expect("subscribe");
        assert_eq!(d.assignment().len(), 8);
        assert_eq!(c.group(), "g");
    }

    #[tokio::test]
    async fn close_ends_recv_and_send() {
        let bus = bus(1, 1);
        let mut c = bus.subscribe("g", &["t"]).await.expect("subscribe");
        let mut idle = bus.subscribe("idle", &["u"]).await.expect("subscribe");
        send(&bus, "t", "k", "0").await;
        let producer = bus.clone();
        let blocked = tokio::spawn(async move {
            producer
                .send("t", "k", b"1".to_vec(), BTreeMap::new())
                .await
        });
        let waiting = tokio::spawn(async move { idle.recv().await });
        tokio::task::yield_now().await;
        bus.close();
        assert!(bus.is_closed());
        let sent = timeout(GUARD, blocked).await.expect("hung").expect("join");
        assert_eq!(sent, Err(MqError::Closed));
        let got = timeout(GUARD, waiting).await.expect("hung").expect("join");
        assert_eq!(got, Err(MqError::Closed));
        assert_eq!(c.recv().await, Err(MqError::Closed));
        assert_eq!(
            bus.send("t", "k", Vec::new(), BTreeMap::new()).await,
            Err(MqError::Closed)
        );
        assert_eq!(
            bus.subscribe("g", &["t"]).await.map(|_| ()),
            Err(MqError::Closed)
        );
        assert_eq!(bus.ensure_topic("v", 1).await, Err(MqError::Closed));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_producers_and_consumers_deliver_everything_in_key_order() {
        const PRODUCERS: usize = 4;
        const PER_PRODUCER: usize = 1000;
        // A small capacity so backpressure is exercised too.
        let bus = bus(8, 16);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut consumers = Vec::new();
        for _ in 0..2 {
            let mut c = bus.subscribe("g", &["t"]).await.expect("subscribe");
            let tx = tx.clone();
            consumers.push(tokio::spawn(async move {
                loop {
                    match c.recv().await {
                        Ok(r) => {
                            c.commit(&r).await.expect("commit");
                            let seq: usize = text(&r).parse().expect("seq");
                            tx.send((r.key.clone(), seq)).expect("collector");
                        }
                        Err(e) => return e,
                    }
                }
            }));
        }
        drop(tx);
        let producers: Vec<_> = (0..PRODUCERS)
            .map(|t| {
                let bus = bus.clone();
                tokio::spawn(async move {
                    for i in 0..PER_PRODUCER {
                        let key = format!("p{t}-k{}", i % 7);
                        bus.send("t", &key, i.to_string().into_bytes(), BTreeMap::new())
                            .await
                            .expect("send");
                    }
                })
            })
            .collect();

        let collect = async {
            let mut last: HashMap<String, usize> = HashMap::new();
            let mut seen = HashSet::new();
            for _ in 0..PRODUCERS * PER_PRODUCER {
                let (key, seq) = rx.recv().await.expect("consumers ended early");
                if let Some(prev) = last.insert(key.clone(), seq) {
                    assert!(prev < seq, "{key}: {seq} after {prev}");
                }
                assert!(seen.insert((key, seq)), "duplicate");
            }
            seen.len()
        };
        let total = timeout(GUARD, collect).await.expect("hung");
        assert_eq!(total, PRODUCERS * PER_PRODUCER);
        for p in producers {
            p.await.expect("producer");
        }
        assert_eq!(bus.lag("g", "t"), 0);
        bus.close();
        for c in consumers {
            assert_eq!(c.await.expect("consumer"), MqError::Closed);
        }
    }
}
