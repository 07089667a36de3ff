//! [`KafkaBus`] against a real Kafka-protocol broker, named by `GOCHAT_TEST_KAFKA_BROKERS`
//! (`scripts/services.sh up` starts one; `eval "$(scripts/services.sh env)"` sets the variable).
//! The tests fail, never skip, when the variable is missing.
//!
//! The broker is shared: every test uses its own topics and groups (random suffix). Group
//! members are driven by their own task (see [`Member`]) so that every member keeps polling, as
//! a Kafka consumer must for rebalances to complete. Timeouts only turn a hang into a failure;
//! no assertion depends on how fast the broker is.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gochat_infra::mq::kafka::{KafkaBus, KafkaConfig};
use gochat_infra::mq::{Bus, Consumer, MqError, Payload, Producer, Record};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout};

/// Bound of any single wait; only there to fail instead of hanging.
const GUARD: Duration = Duration::from_secs(120);

fn brokers() -> String {
    std::env::var("GOCHAT_TEST_KAFKA_BROKERS").unwrap_or_else(|_| {
        panic!(
            "GOCHAT_TEST_KAFKA_BROKERS is not set: start a broker with `scripts/services.sh up` \
             and run `eval \"$(scripts/services.sh env)\"` (or point it at any Kafka broker, \
             e.g. GOCHAT_TEST_KAFKA_BROKERS=127.0.0.1:9092)"
        )
    })
}

/// A bus on the test broker. One record per produce batch (`batch.num.messages=1`): tansu
/// 0.6, the test broker, mishandles multi-record batches — a fetch from an offset inside one
/// returns nothing of it (a consumer resuming there skips the batch's remaining records) and
/// its high watermark is the batch's base offset + 1. Apache Kafka needs no such setting.
async fn bus() -> KafkaBus {
    KafkaBus::connect(KafkaConfig {
        brokers: brokers(),
        client_id: "gochat-infra-test".to_owned(),
        properties: BTreeMap::from([("batch.num.messages".to_owned(), "1".to_owned())]),
        ..KafkaConfig::default()
    })
    .await
    .expect("connect to the test broker")
}

/// A name no other test (or earlier run) uses.
fn unique(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "{prefix}-{}-{nanos:x}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

async fn guard<T>(what: &str, f: impl Future<Output = T>) -> T {
    match timeout(GUARD, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

async fn send(bus: &KafkaBus, topic: &str, key: &str, payload: &str) {
    guard(
        "send",
        bus.send(topic, key, payload.as_bytes().to_vec(), BTreeMap::new()),
    )
    .await
    .expect("send");
}

fn text(r: &Record) -> String {
    String::from_utf8(r.payload.bytes().expect("bytes").into_owned()).expect("utf-8 payload")
}

/// murmur2 as the Java client computes it (`Utils.murmur2`), to check that the bus partitions
/// like every Kafka-default producer.
fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h = SEED ^ (data.len() as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

fn kafka_partition(key: &str, partitions: u32) -> u32 {
    (murmur2(key.as_bytes()) & 0x7fff_ffff) % partitions
}

/// A key that the Java partitioner puts on `partition`.
fn key_on(partition: u32, partitions: u32, prefix: &str) -> String {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|k| kafka_partition(k, partitions) == partition)
        .expect("a key")
}

// ---------------------------------------------------------------------------------------------
// A group member driven by its own task.
// ---------------------------------------------------------------------------------------------

enum Cmd {
    Commit(Record, oneshot::Sender<Result<(), MqError>>),
    Assignment(oneshot::Sender<Vec<(String, u32)>>),
    Close(oneshot::Sender<Result<(), MqError>>),
}

/// One consumer, polled continuously by a task that forwards its records and runs commands
/// between two polls.
struct Member {
    cmds: mpsc::UnboundedSender<Cmd>,
    records: mpsc::UnboundedReceiver<Result<Record, MqError>>,
    task: JoinHandle<()>,
}

impl Member {
    async fn join(bus: &KafkaBus, group: &str, topics: &[&str]) -> Member {
        let mut consumer = guard("subscribe", bus.subscribe(group, topics))
            .await
            .expect("subscribe");
        assert_eq!(consumer.group(), group);
        let (cmds, mut cmd_rx) = mpsc::unbounded_channel();
        let (rec_tx, records) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    biased;
                    cmd = cmd_rx.recv() => match cmd {
                        Some(Cmd::Commit(r, reply)) => {
                            let _ = reply.send(consumer.commit(&r).await);
                        }
                        Some(Cmd::Assignment(reply)) => {
                            let _ = reply.send(consumer.assignment());
                        }
                        Some(Cmd::Close(reply)) => {
                            let _ = reply.send(consumer.close().await);
                            return;
                        }
                        None => return,
                    },
                    r = consumer.recv() => {
                        if rec_tx.send(r).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Member {
            cmds,
            records,
            task,
        }
    }

    async fn recv(&mut self) -> Record {
        guard("recv", self.records.recv())
            .await
            .expect("member task ended")
            .expect("recv")
    }

    async fn commit(&self, r: &Record) -> Result<(), MqError> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Commit(r.clone(), tx))
            .expect("member task ended");
        guard("commit", rx).await.expect("member task ended")
    }

    async fn assignment(&self) -> Vec<(String, u32)> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Assignment(tx))
            .expect("member task ended");
        guard("assignment", rx).await.expect("member task ended")
    }

    /// Commits what was committed and leaves the group, waiting for both.
    async fn close(self) {
        let (tx, rx) = oneshot::channel();
        self.cmds.send(Cmd::Close(tx)).expect("member task ended");
        guard("close", rx)
            .await
            .expect("member task ended")
            .expect("close");
        guard("member task", self.task).await.expect("member task");
    }
}

/// Waits until `members` hold disjoint, non-empty assignments that together cover
/// `partitions` partitions of `topic`; returns them.
async fn settled(members: &[&Member], topic: &str, partitions: u32) -> Vec<BTreeSet<u32>> {
    let all: BTreeSet<u32> = (0..partitions).collect();
    guard("rebalance", async {
        loop {
            let mut sets = Vec::new();
            for m in members {
                let set: BTreeSet<u32> = m
                    .assignment()
                    .await
                    .into_iter()
                    .filter(|(t, _)| t == topic)
                    .map(|(_, p)| p)
                    .collect();
                sets.push(set);
            }
            let total: usize = sets.iter().map(BTreeSet::len).sum();
            let union: BTreeSet<u32> = sets.iter().flatten().copied().collect();
            if sets.iter().all(|s| !s.is_empty()) && total == all.len() && union == all {
                return sets;
            }
            sleep(Duration::from_millis(200)).await;
        }
    })
    .await
}

/// Receives `n` records.
async fn recv_n(member: &mut Member, n: usize) -> Vec<Record> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(member.recv().await);
    }
    out
}

/// Sends one marker record to each partition, then receives, committing each record as a
/// gochat consumer does, until every marker arrived; returns the records received before them
/// (per partition, nothing produced before its marker can come after it). Committing matters:
/// a rebalance while this runs (a member that is still leaving) starts the member again from
/// the group's committed offsets.
async fn drain_until_markers(
    bus: &KafkaBus,
    member: &mut Member,
    topic: &str,
    partitions: u32,
) -> Vec<Record> {
    for p in 0..partitions {
        send(bus, topic, &key_on(p, partitions, "marker-"), "marker").await;
    }
    let mut markers = BTreeSet::new();
    let mut before = Vec::new();
    while markers.len() < partitions as usize {
        let r = member.recv().await;
        member.commit(&r).await.expect("commit");
        if text(&r) == "marker" {
            assert!(markers.insert(r.partition), "marker twice: {r:?}");
        } else {
            assert!(
                !markers.contains(&r.partition),
                "record after marker: {r:?}"
            );
            before.push(r);
        }
    }
    before
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_topic_twice_creates_the_partitions_once() {
    let bus = bus().await;
    let topic = unique("ensure");
    guard("ensure", bus.ensure_topic(&topic, 3))
        .await
        .expect("ensure");
    assert_eq!(bus.partitions(&topic).await, Ok(3));
    guard("ensure again", bus.ensure_topic(&topic, 3))
        .await
        .expect("ensure again");
    // An existing topic keeps its partitions, as in the in-process bus.
    guard("ensure with more", bus.ensure_topic(&topic, 5))
        .await
        .expect("ensure with more");
    assert_eq!(bus.partitions(&topic).await, Ok(3));
    let missing = unique("missing");
    assert_eq!(
        bus.partitions(&missing).await,
        Err(MqError::UnknownTopic(missing.clone()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_fails_clearly_when_no_broker_answers() {
    let err = KafkaBus::connect(KafkaConfig {
        brokers: "127.0.0.1:1".to_owned(),
        connect_timeout: Duration::from_secs(2),
        ..KafkaConfig::default()
    })
    .await
    .expect_err("connected to nothing");
    match err {
        MqError::Broker(msg) => assert!(msg.contains("127.0.0.1:1"), "{msg}"),
        other => panic!("unexpected error {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_lands_on_one_partition_in_send_order() {
    const PARTITIONS: u32 = 4;
    const KEYS: usize = 16;
    const PER_KEY: usize = 6;
    let bus = bus().await;
    let topic = unique("order");
    guard("ensure", bus.ensure_topic(&topic, PARTITIONS))
        .await
        .expect("ensure");
    // Pipelined: every record is queued before the first is acknowledged, interleaving keys.
    let records: Vec<(String, String)> = (0..PER_KEY)
        .flat_map(|seq| (0..KEYS).map(move |k| (format!("conv-{k}"), seq.to_string())))
        .collect();
    send_all(&bus, &topic, &records).await;

    let mut member = Member::join(&bus, &unique("order-group"), &[&topic]).await;
    let records = recv_n(&mut member, KEYS * PER_KEY).await;
    let mut by_key: HashMap<String, Vec<&Record>> = HashMap::new();
    for r in &records {
        assert_eq!(r.topic, topic);
        by_key.entry(r.key.clone()).or_default().push(r);
    }
    assert_eq!(by_key.len(), KEYS);
    let mut used = BTreeSet::new();
    for (key, rs) in &by_key {
        let partition = rs[0].partition;
        // The Java client's partitioner: stable across processes and clients.
        assert_eq!(partition, kafka_partition(key, PARTITIONS), "{key}");
        used.insert(partition);
        let seqs: Vec<usize> = rs
            .iter()
            .map(|r| {
                assert_eq!(r.partition, partition, "{key} on two partitions");
                text(r).parse().expect("seq")
            })
            .collect();
        assert_eq!(seqs, (0..PER_KEY).collect::<Vec<_>>(), "{key} out of order");
        assert!(rs.windows(2).all(|w| w[0].offset < w[1].offset), "{key}");
    }
    assert!(used.len() > 1, "every key on one partition: {used:?}");
    // Offsets of a partition are delivered in order, starting at the log start.
    let mut last: HashMap<u32, u64> = HashMap::new();
    for r in &records {
        let expected = last.get(&r.partition).map_or(0, |o| o + 1);
        assert_eq!(r.offset, expected, "partition {}", r.partition);
        last.insert(r.partition, r.offset);
    }
    member.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_key_and_payload_round_trip() {
    let bus = bus().await;
    let topic = unique("headers");
    guard("ensure", bus.ensure_topic(&topic, 2))
        .await
        .expect("ensure");
    let headers = BTreeMap::from([
        (
            "trace_id".to_owned(),
            "4bf92f3577b34da6a3ce929d0e0e4736".to_owned(),
        ),
        ("session_id".to_owned(), "gw-1/42".to_owned()),
        ("note".to_owned(), "héllo, 世界".to_owned()),
    ]);
    let payload = br#"{"conversation_id":"s_1_2","content":"hi"}"#.to_vec();
    guard(
        "send",
        bus.send(&topic, "s_1_2", payload.clone(), headers.clone()),
    )
    .await
    .expect("send");
    guard(
        "send",
        bus.send(&topic, "s_1_2", Vec::new(), BTreeMap::new()),
    )
    .await
    .expect("send");
    // A typed value travels as its JSON.
    let value = BTreeMap::from([("seq_id".to_owned(), 7_i64)]);
    guard(
        "send",
        bus.send(
            &topic,
            "s_1_2",
            Payload::value(value.clone()),
            BTreeMap::new(),
        ),
    )
    .await
    .expect("send");

    let mut member = Member::join(&bus, &unique("headers-group"), &[&topic]).await;
    let first = member.recv().await;
    assert_eq!(first.key, "s_1_2");
    assert_eq!(first.payload, *payload);
    assert_eq!(first.headers, headers);
    let second = member.recv().await;
    assert_eq!(second.key, "s_1_2");
    assert!(second.payload.bytes().expect("bytes").is_empty());
    assert!(second.headers.is_empty());
    assert_eq!(second.partition, first.partition);
    assert_eq!(second.offset, first.offset + 1);
    let third = member.recv().await;
    assert!(!third.payload.is_value());
    assert_eq!(third.payload, *br#"{"seq_id":7}"#.as_slice());
    let decoded = third
        .payload
        .decode::<BTreeMap<String, i64>>()
        .expect("decodes");
    assert_eq!(*decoded, value);
    member.close().await;
}

/// Receives from either member until `n` records arrived; returns what each got.
async fn recv_from_both(a: &mut Member, b: &mut Member, n: usize) -> (Vec<Record>, Vec<Record>) {
    let (mut from_a, mut from_b) = (Vec::new(), Vec::new());
    while from_a.len() + from_b.len() < n {
        tokio::select! {
            r = a.recv() => from_a.push(r),
            r = b.recv() => from_b.push(r),
        }
    }
    (from_a, from_b)
}

/// Sends `(key, payload)` records concurrently (queued in this order, acknowledged together).
async fn send_all(bus: &KafkaBus, topic: &str, records: &[(String, String)]) {
    let sends = records
        .iter()
        .map(|(key, payload)| bus.send(topic, key, payload.clone().into_bytes(), BTreeMap::new()));
    for result in guard("sends", futures::future::join_all(sends)).await {
        result.expect("send");
    }
}

/// Sends `n` records `0..n` under 24 keys, concurrently.
async fn produce(bus: &KafkaBus, topic: &str, n: usize) {
    let records: Vec<(String, String)> = (0..n)
        .map(|i| (format!("key-{}", i % 24), i.to_string()))
        .collect();
    send_all(bus, topic, &records).await;
}

fn slots(records: &[Record]) -> BTreeSet<(u32, u64)> {
    records.iter().map(|r| (r.partition, r.offset)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_split_the_partitions_and_see_every_record_once() {
    const PARTITIONS: u32 = 4;
    const N: usize = 200;
    let bus = bus().await;
    let topic = unique("split");
    let group = unique("split-group");
    guard("ensure", bus.ensure_topic(&topic, PARTITIONS))
        .await
        .expect("ensure");
    let mut a = Member::join(&bus, &group, &[&topic]).await;
    let mut b = Member::join(&bus, &group, &[&topic]).await;
    let sets = settled(&[&a, &b], &topic, PARTITIONS).await;

    produce(&bus, &topic, N).await;
    let (from_a, from_b) = recv_from_both(&mut a, &mut b, N).await;
    assert!(from_a.iter().all(|r| sets[0].contains(&r.partition)));
    assert!(from_b.iter().all(|r| sets[1].contains(&r.partition)));
    let mut seen = HashSet::new();
    for r in from_a.iter().chain(&from_b) {
        assert!(seen.insert(text(r).to_owned()), "twice: {r:?}");
        a_or_b_commit(&a, &b, &sets, r).await;
    }
    assert_eq!(seen.len(), N);

    // Nothing else comes: each member's next record on each of its partitions is the marker.
    for p in 0..PARTITIONS {
        send(&bus, &topic, &key_on(p, PARTITIONS, "marker-"), "marker").await;
    }
    for (member, owned) in [(&mut a, &sets[0]), (&mut b, &sets[1])] {
        for _ in 0..owned.len() {
            let r = member.recv().await;
            assert_eq!(text(&r), "marker", "extra record {r:?}");
            assert!(owned.contains(&r.partition));
        }
    }
    a.close().await;
    b.close().await;
}

async fn a_or_b_commit(a: &Member, b: &Member, sets: &[BTreeSet<u32>], r: &Record) {
    let owner = if sets[0].contains(&r.partition) { a } else { b };
    owner.commit(r).await.expect("commit");
}

/// Commits the first half of `records` of each partition (in offset order); returns the rest.
async fn commit_half(member: &Member, records: &[Record]) -> Vec<Record> {
    let mut by_partition: BTreeMap<u32, Vec<&Record>> = BTreeMap::new();
    for r in records {
        by_partition.entry(r.partition).or_default().push(r);
    }
    let mut rest = Vec::new();
    for rs in by_partition.values_mut() {
        rs.sort_by_key(|r| r.offset);
        let half = rs.len() / 2;
        for r in &rs[..half] {
            member.commit(r).await.expect("commit");
        }
        rest.extend(rs[half..].iter().map(|r| (*r).clone()));
    }
    rest
}

/// Polls the lag until it equals `expected`; every value seen on the way lies between
/// `expected` and `upper` (commits only ever lower it).
async fn lag_reaches(bus: &KafkaBus, group: &str, topic: &str, expected: u64, upper: u64) {
    guard("lag", async {
        loop {
            let lag = bus.lag(group, topic).await.expect("lag");
            assert!(
                (expected..=upper).contains(&lag),
                "lag {lag} outside {expected}..={upper}"
            );
            if lag == expected {
                return;
            }
            sleep(Duration::from_millis(250)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_member_gets_exactly_what_a_closed_member_left_uncommitted() {
    const PARTITIONS: u32 = 2;
    const N: usize = 40;
    let bus = bus().await;
    let topic = unique("resume");
    let group = unique("resume-group");
    guard("ensure", bus.ensure_topic(&topic, PARTITIONS))
        .await
        .expect("ensure");
    produce(&bus, &topic, N).await;
    let mut a = Member::join(&bus, &group, &[&topic]).await;
    let got = recv_n(&mut a, N).await;
    let rest = commit_half(&a, &got).await;
    assert!(!rest.is_empty() && rest.len() < N);
    // Closed right after the commits, before any periodic auto-commit: closing must commit
    // them. (Closing, not dropping, waits until the member has left the group: tansu 0.6 keeps
    // a member that leaves after another joins in the assignment it hands out. Dropping is
    // covered by the survivor test below.)
    a.close().await;

    let mut c = Member::join(&bus, &group, &[&topic]).await;
    let again = drain_until_markers(&bus, &mut c, &topic, PARTITIONS).await;
    assert_eq!(slots(&again), slots(&rest));
    assert_eq!(again.len(), rest.len(), "duplicates");
    for r in &again {
        let before = rest
            .iter()
            .find(|x| (x.partition, x.offset) == (r.partition, r.offset))
            .expect("same record");
        assert_eq!(r, before);
    }
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_survivor_gets_the_uncommitted_records_of_a_dropped_member() {
    const PARTITIONS: u32 = 4;
    const N: usize = 80;
    let bus = bus().await;
    let topic = unique("survivor");
    let group = unique("survivor-group");
    guard("ensure", bus.ensure_topic(&topic, PARTITIONS))
        .await
        .expect("ensure");
    let mut a = Member::join(&bus, &group, &[&topic]).await;
    let mut b = Member::join(&bus, &group, &[&topic]).await;
    let sets = settled(&[&a, &b], &topic, PARTITIONS).await;
    produce(&bus, &topic, N).await;
    let (from_a, from_b) = recv_from_both(&mut a, &mut b, N).await;
    for r in &from_b {
        b.commit(r).await.expect("commit");
    }
    let rest = commit_half(&a, &from_a).await;
    // Both members' commits are on the broker before `a` goes.
    lag_reaches(&bus, &group, &topic, rest.len() as u64, N as u64).await;
    drop(a);

    // `b` takes every partition and gets exactly `a`'s uncommitted records again.
    let again = drain_until_markers(&bus, &mut b, &topic, PARTITIONS).await;
    assert_eq!(slots(&again), slots(&rest));
    assert_eq!(again.len(), rest.len(), "duplicates");
    assert!(again.iter().all(|r| sets[0].contains(&r.partition)));
    assert_eq!(
        b.assignment().await.len(),
        PARTITIONS as usize,
        "the survivor owns every partition"
    );
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_of_a_revoked_partition_is_ignored_and_the_record_redelivered() {
    const PARTITIONS: u32 = 2;
    let bus = bus().await;
    let topic = unique("revoked");
    let group = unique("revoked-group");
    guard("ensure", bus.ensure_topic(&topic, PARTITIONS))
        .await
        .expect("ensure");
    let mut a = Member::join(&bus, &group, &[&topic]).await;
    settled(&[&a], &topic, PARTITIONS).await;
    for p in 0..PARTITIONS {
        send(
            &bus,
            &topic,
            &key_on(p, PARTITIONS, "k"),
            &format!("on-{p}"),
        )
        .await;
    }
    let got = recv_n(&mut a, PARTITIONS as usize).await;

    let mut b = Member::join(&bus, &group, &[&topic]).await;
    let sets = settled(&[&a, &b], &topic, PARTITIONS).await;
    let lost = got
        .iter()
        .find(|r| sets[1].contains(&r.partition))
        .expect("a record of the partition `a` lost");
    assert_eq!(a.commit(lost).await, Ok(()));
    // Not committed: the new owner gets it again.
    let again = b.recv().await;
    assert_eq!(
        (again.partition, again.offset),
        (lost.partition, lost.offset)
    );
    assert_eq!(text(&again), text(lost));
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_is_produced_minus_committed() {
    const PARTITIONS: u32 = 3;
    const N: usize = 12;
    let bus = bus().await;
    let topic = unique("lag");
    let group = unique("lag-group");
    guard("ensure", bus.ensure_topic(&topic, PARTITIONS))
        .await
        .expect("ensure");
    assert_eq!(bus.lag(&group, &topic).await, Ok(0));
    assert_eq!(bus.lag(&group, &unique("no-such-topic")).await, Ok(0));
    produce(&bus, &topic, N).await;
    // A group that never committed counts from the log start.
    assert_eq!(bus.lag(&group, &topic).await, Ok(N as u64));

    let mut a = Member::join(&bus, &group, &[&topic]).await;
    let got = recv_n(&mut a, N).await;
    let mut by_partition: BTreeMap<u32, Vec<&Record>> = BTreeMap::new();
    for r in &got {
        by_partition.entry(r.partition).or_default().push(r);
    }
    assert!(by_partition.len() > 1, "all records on one partition");
    // The first partition: its last record, which covers everything before it. The others:
    // their first record only.
    let mut expected = N as u64;
    for (i, rs) in by_partition.values().enumerate() {
        let r = if i == 0 { rs[rs.len() - 1] } else { rs[0] };
        a.commit(r).await.expect("commit");
        expected -= if i == 0 { rs.len() as u64 } else { 1 };
    }
    lag_reaches(&bus, &group, &topic, expected, N as u64).await;

    for r in &got {
        a.commit(r).await.expect("commit");
    }
    lag_reaches(&bus, &group, &topic, 0, expected).await;
    // Committing an earlier record again does not move the group back.
    a.commit(&got[0]).await.expect("commit");
    a.close().await;
    assert_eq!(bus.lag(&group, &topic).await, Ok(0));
    // Another group has read nothing.
    assert_eq!(bus.lag(&unique("other"), &topic).await, Ok(N as u64));
}
