//! `fanout`: one publisher sends into the world room (or a large group) with K members online;
//! every member reads every message. Reports deliveries per second, publish → recipient latency
//! (every delivery) and publish → last recipient latency (per message, over the messages every
//! member got), and the seq check of every member's stream.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, ConnectPlan, Http, Ws, now_micros};
use crate::guard::Target;
use crate::progress::{self, Counters, dec, inc};
use crate::rawws::{Frame, RawWs};
use crate::report::{Latency, Outcome, Recorder, Table, histogram, per_sec};
use crate::seqcheck::{SeqStream, SeqTally};
use crate::traffic::{create_group, last_seq};
use crate::users::User;

/// Which conversation fans out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Room {
    /// The world room: every online session receives it.
    World,
    /// A group of the publisher and the K members (delivered by the task service past 500).
    Group,
}

/// Options of `gochat-load fanout`.
#[derive(Debug, Clone, clap::Args)]
pub struct FanoutOptions {
    /// Members online (each one connection); the publisher is one more user.
    #[arg(long, default_value_t = 10_000)]
    pub members: usize,
    /// The conversation.
    #[arg(long, value_enum, default_value_t = Room::World)]
    pub room: Room,
    /// Messages per second the publisher sends.
    #[arg(long, default_value_t = 30.0)]
    pub rate: f64,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 20)]
    pub duration: u64,
    /// Longest wait, in seconds, for outstanding deliveries after publishing.
    #[arg(long, default_value_t = 20)]
    pub drain: u64,
    /// New connections per second while connecting.
    #[arg(long, default_value_t = 2000.0)]
    pub connect_rate: f64,
    /// Connect + upgrade timeout, seconds.
    #[arg(long, default_value_t = 10)]
    pub connect_timeout: u64,
}

impl Default for FanoutOptions {
    fn default() -> Self {
        Self {
            members: 10_000,
            room: Room::World,
            rate: 30.0,
            duration: 20,
            drain: 20,
            connect_rate: 2000.0,
            connect_timeout: 10,
        }
    }
}

/// What `fanout` measured.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutOutcome {
    pub scenario: &'static str,
    pub target: String,
    pub room: Room,
    pub conversation_id: String,
    pub members: usize,
    /// Members connected.
    pub online: usize,
    pub rate: f64,
    pub published: u64,
    /// Publishes acked (stored).
    pub stored: u64,
    pub delivered: u64,
    /// stored × online members.
    pub expected_deliveries: u64,
    /// Deliveries per second, from the first publish to the last delivery.
    pub deliveries_per_sec: f64,
    /// Publish → each recipient's `new-message`.
    pub recipient_latency: Latency,
    /// The frame's `timestamp` (set when the gateway dispatched the record to its sessions) →
    /// read by the member, ms resolution: session mailboxes and writers, sockets, and the
    /// generator's own scheduling.
    pub read_lag: Latency,
    /// Publish → the last recipient's `new-message`, per message every member got.
    pub last_recipient_latency: Latency,
    /// Deliveries of an earlier run's messages (left out of every other figure).
    pub foreign: u64,
    /// Messages some member never got.
    pub incomplete_messages: u64,
    pub ack: Latency,
    pub connect_latency: Latency,
    pub connect_failures: BTreeMap<String, u64>,
    pub lost: BTreeMap<String, u64>,
    pub errors: BTreeMap<String, u64>,
    pub seq: SeqTally,
    pub drained: bool,
}

impl Outcome for FanoutOutcome {
    fn table(&self) -> Table {
        let mut t = Table::new(format!(
            "fanout against {}: {} ({}) with {} members online, {} msg/s",
            self.target,
            self.conversation_id,
            match self.room {
                Room::World => "world room",
                Room::Group => "group",
            },
            self.online,
            self.rate
        ));
        t.rate("deliveries", self.deliveries_per_sec)
            .row(
                "published / stored",
                format!("{} / {}", self.published, self.stored),
            )
            .row(
                "deliveries received / expected",
                format!("{} / {}", self.delivered, self.expected_deliveries),
            )
            .latency("publish -> recipient", &self.recipient_latency)
            .latency("publish -> last recipient", &self.last_recipient_latency)
            .latency("publish -> ack", &self.ack)
            .latency("gateway dispatch -> read", &self.read_lag)
            .latency("connect + upgrade", &self.connect_latency)
            .row("incomplete messages", self.incomplete_messages)
            .row("deliveries from earlier runs", self.foreign)
            .row("seq gaps", self.seq.gaps)
            .row("not delivered by the end", self.seq.tail)
            .row("seq duplicates", self.seq.duplicates)
            .row("seq reordered", self.seq.reordered)
            .row(
                "drained",
                if self.drained {
                    "yes"
                } else {
                    "no (time limit)"
                },
            )
            .failures("connect failures", &self.connect_failures)
            .failures("connections lost", &self.lost)
            .failures("error frames", &self.errors);
        t
    }

    fn passed(&self) -> bool {
        self.connect_failures.is_empty()
            && self.lost.is_empty()
            && self.errors.is_empty()
            && self.seq.clean()
            && self.incomplete_messages == 0
            && self.foreign == 0
            && self.stored == self.published
            && self.delivered == self.expected_deliveries
    }
}

/// Shared by the member tasks.
#[derive(Debug)]
struct Shared {
    tag: String,
    conversation_id: String,
    counters: Arc<Counters>,
    recipient: Recorder,
    read_lag: Recorder,
    /// Per message index: the latest recipient's latency (µs) and how many got it.
    last_us: Vec<AtomicU64>,
    got: Vec<AtomicU64>,
    last_delivery_us: AtomicU64,
    foreign: AtomicU64,
    lost: Mutex<BTreeMap<String, u64>>,
    errors: Mutex<BTreeMap<String, u64>>,
}

fn tally(map: &Mutex<BTreeMap<String, u64>>, key: String) {
    *map.lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(key)
        .or_default() += 1;
}

/// Runs `fanout` with `users` (at least `opts.members + 1`; the first publishes).
pub async fn run(
    target: &Target,
    users: &[User],
    opts: &FanoutOptions,
    show_progress: bool,
) -> anyhow::Result<FanoutOutcome> {
    anyhow::ensure!(opts.members >= 1, "--members must be at least 1");
    anyhow::ensure!(opts.rate > 0.0, "--rate must be positive");
    anyhow::ensure!(
        users.len() > opts.members,
        "fanout needs {} users",
        opts.members + 1
    );
    let users = &users[..=opts.members];
    let publisher = &users[0];
    let http = Http::new(target, 8)?;
    let (conversation_id, base) = match opts.room {
        Room::World => {
            let base = last_seq(&http, &publisher.token, "world").await?;
            ("world".to_owned(), base)
        }
        Room::Group => (create_group(&http, users).await?, 0),
    };
    let count = (opts.rate * opts.duration as f64).round().max(1.0) as usize;
    let counters = Arc::new(Counters::default());
    let c = Arc::clone(&counters);
    let _ticker = progress::start("fanout", show_progress, move || c.snapshot());
    let shared = Arc::new(Shared {
        tag: format!("{:08x}", rand::random::<u32>()),
        conversation_id: conversation_id.clone(),
        counters: Arc::clone(&counters),
        recipient: Recorder::default(),
        read_lag: Recorder::default(),
        last_us: (0..count).map(|_| AtomicU64::new(0)).collect(),
        got: (0..count).map(|_| AtomicU64::new(0)).collect(),
        last_delivery_us: AtomicU64::new(0),
        foreign: AtomicU64::new(0),
        lost: Mutex::new(BTreeMap::new()),
        errors: Mutex::new(BTreeMap::new()),
    });

    // The publisher on a tungstenite connection (it reads acks and errors), the members on
    // the lean reader (`rawws`): they read 300,000 frames a second on the server's cores.
    let connect_timeout = Duration::from_secs(opts.connect_timeout);
    let connect_hist = Recorder::default();
    let mut connect_failures = BTreeMap::new();
    let began = Instant::now();
    let publisher_ws =
        match client::connect(target, target.source(0), &publisher.token, connect_timeout).await {
            Ok(ws) => {
                inc(&counters.connected);
                connect_hist.record(u64::try_from(began.elapsed().as_micros()).unwrap_or(u64::MAX));
                ws
            }
            Err(e) => anyhow::bail!("the publisher could not connect: {e}"),
        };
    let tokens = users[1..].iter().map(|u| u.token.clone()).collect();
    let plan = ConnectPlan {
        first_source: 1,
        rate: opts.connect_rate,
        inflight: 512,
        timeout: connect_timeout,
    };
    let connected = client::connect_many_with(
        target,
        tokens,
        plan,
        &counters,
        |target, source, token, t| async move { RawWs::connect(&target, source, &token, t).await },
    )
    .await;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut members = Vec::new();
    for (r, took) in connected {
        match r {
            Ok(ws) => {
                connect_hist.record(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
                members.push(tokio::spawn(member_task(
                    ws,
                    base,
                    Arc::clone(&shared),
                    stop_rx.clone(),
                )));
            }
            Err(e) => *connect_failures.entry(e.cause()).or_default() += 1,
        }
    }
    let online = members.len();

    tokio::time::sleep(Duration::from_secs(1)).await;
    let start_us = now_micros();
    let period = Duration::from_secs_f64(1.0 / opts.rate);
    let drain = Duration::from_secs(opts.drain);
    let expected_per_message = online as u64;
    let publish = publish(
        publisher_ws,
        Arc::clone(&shared),
        count,
        period,
        drain,
        expected_per_message,
    )
    .await;

    let _ = stop_tx.send(true);
    let mut seq = SeqTally::default();
    for m in members {
        if let Ok(stream) = m.await {
            seq.add(&stream.finish(publish.last_seq.max(base)));
        }
    }

    let mut last = histogram();
    let mut incomplete = 0;
    for j in 0..count.min(usize::try_from(publish.published).unwrap_or(usize::MAX)) {
        if shared.got[j].load(Ordering::Relaxed) >= expected_per_message {
            last.saturating_record(shared.last_us[j].load(Ordering::Relaxed).max(1));
        } else {
            incomplete += 1;
        }
    }
    let s = counters.snapshot();
    let secs = shared
        .last_delivery_us
        .load(Ordering::Relaxed)
        .saturating_sub(start_us) as f64
        / 1e6;
    let mut errors = shared
        .errors
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    for (k, v) in publish.errors {
        *errors.entry(k).or_default() += v;
    }
    let lost = shared
        .lost
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    Ok(FanoutOutcome {
        scenario: "fanout",
        target: target.addr.to_string(),
        room: opts.room,
        conversation_id,
        members: opts.members,
        online,
        rate: opts.rate,
        published: publish.published,
        stored: publish.acked,
        delivered: s.received,
        expected_deliveries: publish.acked * expected_per_message,
        deliveries_per_sec: per_sec(s.received, secs),
        recipient_latency: Latency::of(&shared.recipient.merged()),
        last_recipient_latency: Latency::of(&last),
        read_lag: Latency::of(&shared.read_lag.merged()),
        foreign: shared.foreign.load(Ordering::Relaxed),
        incomplete_messages: incomplete,
        ack: publish.ack,
        connect_latency: Latency::of(&connect_hist.merged()),
        connect_failures,
        lost,
        errors,
        seq,
        drained: publish.drained,
    })
}

#[derive(Debug, Default)]
struct Published {
    published: u64,
    acked: u64,
    last_seq: u64,
    ack: Latency,
    errors: BTreeMap<String, u64>,
    drained: bool,
}

/// The publisher: `count` messages, one every `period`, then waits for the acks and the
/// deliveries (every acked message × `members`) for at most `drain`.
async fn publish(
    mut ws: Ws,
    shared: Arc<Shared>,
    count: usize,
    period: Duration,
    drain: Duration,
    members: u64,
) -> Published {
    let mut out = Published::default();
    let ack_hist = Recorder::default();
    let mut tick = tokio::time::interval(period);
    let mut j = 0usize;
    let mut refused = 0u64;
    let mut drain_until: Option<Instant> = None;
    let mut check = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            biased;
            frame = ws.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    let Some(f) = client::parse(&text) else { continue };
                    match f.kind.as_ref() {
                        "message-ack" => {
                            out.acked += 1;
                            inc(&shared.counters.acked);
                            out.last_seq = out.last_seq.max(f.data.seq_id.unwrap_or(0));
                            if let Some(sent) = f.data.client_msg_id.as_deref()
                                .and_then(|c| c.rsplit('.').next())
                                .and_then(|t| t.parse::<u64>().ok())
                            {
                                ack_hist.record(now_micros().saturating_sub(sent));
                            }
                        }
                        "error" => {
                            *out.errors.entry(format!("error {}", f.data.code.unwrap_or_default())).or_default() += 1;
                            if f.data.client_msg_id.is_some() {
                                // A refused publish will not be acked.
                                refused += 1;
                            }
                        }
                        _ => {}
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    tally(&shared.lost, "publisher connection lost".to_owned());
                    break;
                }
                Some(Ok(_)) => {}
            },
            _ = tick.tick(), if j < count => {
                let now = now_micros();
                let content = format!("{}:{j}:{now}", shared.tag);
                let cmid = format!("{}.{j}.{now}", shared.tag);
                if client::send_text(&mut ws, client::send_message(&shared.conversation_id, &content, &cmid)).await.is_err() {
                    tally(&shared.lost, "publisher connection lost".to_owned());
                    break;
                }
                inc(&shared.counters.sent);
                out.published += 1;
                j += 1;
                if j == count {
                    drain_until = Some(Instant::now() + drain);
                }
            }
            _ = check.tick(), if drain_until.is_some() => {
                let received = shared.counters.received.load(Ordering::Relaxed);
                if out.acked + refused >= out.published && received >= out.acked * members {
                    out.drained = true;
                    break;
                }
                if drain_until.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
            }
        }
    }
    client::close(&mut ws, Duration::from_secs(5)).await;
    dec(&shared.counters.connected);
    out.ack = Latency::of(&ack_hist.merged());
    out
}

/// A member: reads until told to stop, checking seqs and timing every delivery.
async fn member_task(
    mut ws: RawWs,
    base: u64,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> SeqStream {
    let mut stream = SeqStream::new(base);
    let mut ping = tokio::time::interval(Duration::from_secs(30));
    ping.tick().await;
    let mut alive = true;
    // One wait for the stop signal across the loop: a `changed()` made in every pass would
    // join and leave the channel's waiter list (under its lock) for every frame read.
    let stopped = stop.changed();
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            biased;
            _ = &mut stopped => break,
            read = ws.read_frames(|frame| match frame {
                Frame::Text(text) => on_frame(text, &shared, &mut stream),
                Frame::Binary(_) => tally(&shared.errors, "binary frame".to_owned()),
                Frame::Close(code) => tally(&shared.lost, format!("closed by server ({code})")),
            }), if alive => match read {
                // A close frame was tallied as it came.
                Ok(()) => alive = !ws.close_received(),
                Err(e) => {
                    tally(&shared.lost, format!("connection broke ({})", e.cause()));
                    alive = false;
                }
            },
            _ = ping.tick(), if alive => {
                if ws.send_text(client::PING).await.is_err() {
                    alive = false;
                }
            }
        }
    }
    if alive {
        ws.close(Duration::from_secs(5)).await;
    }
    dec(&shared.counters.connected);
    stream
}

fn on_frame(text: &str, shared: &Shared, stream: &mut SeqStream) {
    let Some(f) = client::parse(text) else {
        tally(&shared.errors, "unparsable frame".to_owned());
        return;
    };
    match f.kind.as_ref() {
        "new-message" if f.data.conversation_id.as_deref() == Some(&shared.conversation_id) => {
            let now = now_micros();
            if let Some(seq) = f.data.seq_id {
                stream.delivered(seq);
            }
            // content = tag:j:micros
            let mut parts = f.data.content.as_deref().unwrap_or("").split(':');
            let (tag, j, sent) = (parts.next(), parts.next(), parts.next());
            if tag != Some(shared.tag.as_str()) {
                // An earlier run's message (a server still working through its backlog).
                shared.foreign.fetch_add(1, Ordering::Relaxed);
                return;
            }
            inc(&shared.counters.received);
            shared.last_delivery_us.fetch_max(now, Ordering::Relaxed);
            let (Some(j), Some(sent)) = (
                j.and_then(|v| v.parse::<usize>().ok()),
                sent.and_then(|v| v.parse::<u64>().ok()),
            ) else {
                return;
            };
            let latency = now.saturating_sub(sent);
            shared.recipient.record(latency);
            if let Some(ts) = f.timestamp {
                shared.read_lag.record(now.saturating_sub(ts * 1000));
            }
            if let (Some(last), Some(got)) = (shared.last_us.get(j), shared.got.get(j)) {
                last.fetch_max(latency, Ordering::Relaxed);
                got.fetch_add(1, Ordering::Relaxed);
            }
        }
        "error" => tally(
            &shared.errors,
            format!("error {}", f.data.code.unwrap_or_default()),
        ),
        _ => {}
    }
}
