//! The message-traffic engine of `chat` and `churn`: every user holds one connection and sends
//! a fixed number of messages at a fixed rate into its one conversation (a single chat or a
//! group), while reading everything the server sends it.
//!
//! Phases: connect everyone (paced), settle a second, send for `duration` (user `i` starts at
//! `i / users` of a period so sends spread evenly), drain (until every send is acked or
//! refused and every expected delivery arrived, or the drain time is up), close everyone.
//! Latencies use the send time carried in the message: `content` = `tag:slot:n:micros`,
//! `client_msg_id` = `tag.n.micros` (a new `tag` per run, so a rerun is never deduplicated
//! against an earlier one).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::watch;

use crate::client::{self, ConnectPlan, Http, now_micros};
use crate::guard::Target;
use crate::progress::{Counters, dec, inc};
use crate::rawws::{Frame, RawWs};
use crate::report::{Latency, Recorder, per_sec};
use crate::seqcheck::{SeqStream, SeqTally};
use crate::users::User;

/// One conversation of the run.
#[derive(Debug, Clone)]
pub struct Conversation {
    /// `s_<lo>_<hi>` or `g_<id>`.
    pub id: String,
    /// Positions (in the run's user slice) of its members.
    pub members: Vec<usize>,
    /// Its last seq before the run.
    pub base: u64,
}

/// Who talks where: the conversations, and each user's one conversation.
#[derive(Debug, Clone, Default)]
pub struct Layout {
    pub conversations: Vec<Conversation>,
    /// `conversation_of[p]`: index into `conversations` of the user at position `p`.
    pub conversation_of: Vec<usize>,
}

impl Layout {
    /// Single chats: positions (0, 1), (2, 3), ... of `users`.
    pub async fn pairs(http: &Http, users: &[User], parallel: usize) -> anyhow::Result<Self> {
        anyhow::ensure!(
            users.len().is_multiple_of(2),
            "pairs need an even number of users"
        );
        let created = futures::stream::iter(users.chunks(2).map(|pair| {
            let http = http.clone();
            let (a, b) = (pair[0].clone(), pair[1].clone());
            async move { single_chat(&http, &a, &b).await }
        }))
        .buffered(parallel.max(1))
        .collect::<Vec<_>>()
        .await;
        let mut layout = Self::default();
        for (k, c) in created.into_iter().enumerate() {
            let (id, base) = c?;
            layout.conversations.push(Conversation {
                id,
                members: vec![2 * k, 2 * k + 1],
                base,
            });
            layout.conversation_of.extend([k, k]);
        }
        Ok(layout)
    }

    /// Adds groups: consecutive runs of `sizes[i]` users of `users`, starting at position
    /// `first` (the first member of each creates it).
    pub async fn add_groups(
        &mut self,
        http: &Http,
        users: &[User],
        first: usize,
        sizes: &[usize],
        parallel: usize,
    ) -> anyhow::Result<()> {
        let mut spans = Vec::new();
        let mut at = first;
        for &n in sizes {
            spans.push(at..at + n);
            at += n;
        }
        anyhow::ensure!(at <= users.len(), "groups need {at} users");
        let created = futures::stream::iter(spans.iter().cloned().map(|span| {
            let http = http.clone();
            let members: Vec<User> = users[span].to_vec();
            async move { create_group(&http, &members).await }
        }))
        .buffered(parallel.max(1))
        .collect::<Vec<_>>()
        .await;
        self.conversation_of.resize(users.len(), usize::MAX);
        for (span, c) in spans.into_iter().zip(created) {
            let id = c?;
            let k = self.conversations.len();
            for p in span.clone() {
                self.conversation_of[p] = k;
            }
            self.conversations.push(Conversation {
                id,
                members: span.collect(),
                base: 0,
            });
        }
        Ok(())
    }
}

/// The single chat of `a` and `b` and its last seq.
pub async fn single_chat(http: &Http, a: &User, b: &User) -> anyhow::Result<(String, u64)> {
    let (st, body) = http
        .post(
            "/conversations",
            Some(&a.token),
            &json!({"target_user_id": b.id}),
        )
        .await?;
    anyhow::ensure!(
        st == 200 || st == 201,
        "creating a single chat: HTTP {st} {body}"
    );
    let id = body["conversation"]["id"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no conversation id in {body}"))?
        .to_owned();
    let base = last_seq(http, &a.token, &id).await?;
    Ok((id, base))
}

/// A group of `members` created by the first, in chunks of 1,000 ids; its conversation id.
pub async fn create_group(http: &Http, members: &[User]) -> anyhow::Result<String> {
    let owner = members
        .first()
        .ok_or_else(|| anyhow::anyhow!("a group needs a member"))?;
    let ids: Vec<&str> = members[1..].iter().map(|u| u.id.as_str()).collect();
    let mut chunks = ids.chunks(1000);
    let first: Vec<&str> = chunks.next().map(<[&str]>::to_vec).unwrap_or_default();
    let (st, body) = http
        .post(
            "/groups",
            Some(&owner.token),
            &json!({"name": format!("load-{}", owner.index), "member_ids": first}),
        )
        .await?;
    anyhow::ensure!(st == 201, "creating a group: HTTP {st} {body}");
    let group_id = body["group"]["id"].as_str().unwrap_or_default().to_owned();
    for chunk in chunks {
        let (st, body) = http
            .post(
                &format!("/groups/{group_id}/members"),
                Some(&owner.token),
                &json!({"user_ids": chunk}),
            )
            .await?;
        anyhow::ensure!(st == 200, "adding group members: HTTP {st} {body}");
    }
    Ok(format!("g_{group_id}"))
}

/// The last seq of conversation `id` (0 when empty).
pub async fn last_seq(http: &Http, token: &str, id: &str) -> anyhow::Result<u64> {
    let (st, body) = http
        .get(
            &format!("/conversations/{id}/messages?limit=1"),
            Some(token),
        )
        .await?;
    anyhow::ensure!(st == 200, "reading {id}: HTTP {st} {body}");
    Ok(body["messages"][0]["seq_id"].as_u64().unwrap_or(0))
}

/// How the traffic runs.
#[derive(Debug, Clone)]
pub struct TrafficPlan {
    /// Messages per second each user sends.
    pub rate: f64,
    /// How long users send.
    pub duration: Duration,
    /// Longest wait for outstanding acks and deliveries after sending.
    pub drain: Duration,
    /// New connections per second while connecting.
    pub connect_rate: f64,
    /// Connect + upgrade timeout.
    pub connect_timeout: Duration,
    /// First source-address slot (connection `p` uses slot `first_source + p`).
    pub first_source: usize,
}

/// Where the run is; scenarios running beside the traffic (churn) follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Connecting,
    /// Sending started at this instant and ends at the second.
    Sending(Instant, Instant),
    Draining,
    Closing,
}

/// What the traffic measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrafficResult {
    pub users: usize,
    pub conversations: usize,
    /// Messages per second offered (users × rate).
    pub offered_per_sec: f64,
    /// Connections that could not be opened, by cause.
    pub connect_failures: BTreeMap<String, u64>,
    /// Connect + upgrade time.
    pub connect_latency: Latency,
    /// Open connections the server closed (or that broke) before the end, by cause.
    pub lost: BTreeMap<String, u64>,
    pub sent: u64,
    /// Sends acked (stored).
    pub stored: u64,
    /// `error` frames, by code.
    pub errors: BTreeMap<String, u64>,
    /// `new-message` frames received for the run's conversations.
    pub delivered: u64,
    /// `new-message` frames of messages an earlier run sent (a server still working through
    /// its backlog); checked by seq, left out of every other figure.
    pub foreign: u64,
    /// Deliveries the acks call for (members − 1 per stored message).
    pub expected_deliveries: u64,
    /// Seconds of the sending window.
    pub send_secs: f64,
    /// Sends per second achieved by the generator.
    pub sent_per_sec: f64,
    /// Acks per second, from the first send to the last ack.
    pub stored_per_sec: f64,
    /// Deliveries per second, from the first send to the last delivery.
    pub delivered_per_sec: f64,
    /// Send → the recipient's `new-message`.
    pub e2e: Latency,
    /// Send → `message-ack`.
    pub ack: Latency,
    /// A `new-message`'s `timestamp` (set when the gateway dispatched it to its sessions) →
    /// read, ms resolution: session mailboxes and writers, sockets, and the generator's own
    /// scheduling.
    pub read_lag: Latency,
    /// The seq check of every recipient stream.
    pub seq: SeqTally,
    /// True when the drain ended with everything accounted for (not by its time limit).
    pub drained: bool,
}

impl TrafficResult {
    /// Nothing failed, lost, refused, missing or duplicated.
    pub fn passed(&self) -> bool {
        self.connect_failures.is_empty()
            && self.lost.is_empty()
            && self.errors.is_empty()
            && self.seq.clean()
            && self.stored == self.sent
            && self.delivered == self.expected_deliveries
            && self.foreign == 0
    }
}

/// State every connection task shares.
#[derive(Debug)]
struct Shared {
    tag: String,
    counters: Arc<Counters>,
    e2e: Recorder,
    ack: Recorder,
    read_lag: Recorder,
    expected: AtomicU64,
    refused: AtomicU64,
    foreign: AtomicU64,
    last_ack_us: AtomicU64,
    last_delivery_us: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    lost: Mutex<BTreeMap<String, u64>>,
}

fn tally(map: &Mutex<BTreeMap<String, u64>>, key: String) {
    *map.lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(key)
        .or_default() += 1;
}

/// What one connection task ends with.
#[derive(Debug)]
struct UserEnd {
    position: usize,
    conversation: usize,
    stream: SeqStream,
    own_max: u64,
}

/// Runs the traffic of `users` over `layout`; `phase` (if given) follows the run.
pub async fn run(
    target: &Target,
    users: &[User],
    layout: &Layout,
    plan: &TrafficPlan,
    counters: Arc<Counters>,
    phase_tx: Option<watch::Sender<Phase>>,
) -> anyhow::Result<TrafficResult> {
    anyhow::ensure!(
        layout.conversation_of.len() == users.len()
            && layout
                .conversation_of
                .iter()
                .all(|&c| c < layout.conversations.len()),
        "every user needs a conversation"
    );
    let phase_tx = phase_tx.unwrap_or_else(|| watch::channel(Phase::Connecting).0);
    phase_tx.send_replace(Phase::Connecting);
    let shared = Arc::new(Shared {
        tag: format!("{:08x}", rand::random::<u32>()),
        counters: Arc::clone(&counters),
        e2e: Recorder::default(),
        ack: Recorder::default(),
        read_lag: Recorder::default(),
        expected: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        foreign: AtomicU64::new(0),
        last_ack_us: AtomicU64::new(0),
        last_delivery_us: AtomicU64::new(0),
        errors: Mutex::new(BTreeMap::new()),
        lost: Mutex::new(BTreeMap::new()),
    });
    let mut result = TrafficResult {
        users: users.len(),
        conversations: layout.conversations.len(),
        offered_per_sec: plan.rate * users.len() as f64,
        ..TrafficResult::default()
    };

    // Connect (on the lean client WebSocket, `rawws`: the generator shares the server's cores).
    let tokens = users.iter().map(|u| u.token.clone()).collect();
    let connect = ConnectPlan {
        first_source: plan.first_source,
        rate: plan.connect_rate,
        inflight: 512,
        timeout: plan.connect_timeout,
    };
    let connected = client::connect_many_with(
        target,
        tokens,
        connect,
        &counters,
        |target, source, token, t| async move { RawWs::connect(&target, source, &token, t).await },
    )
    .await;
    let connect_hist = Recorder::default();
    let per_user = (plan.rate * plan.duration.as_secs_f64()).round() as u64;
    let period = Duration::from_secs_f64(1.0 / plan.rate.max(0.001));
    let mut tasks = Vec::new();
    for (p, (r, took)) in connected.into_iter().enumerate() {
        match r {
            Ok(ws) => {
                connect_hist.record(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
                let k = layout.conversation_of[p];
                let conv = &layout.conversations[k];
                let me = Me {
                    position: p,
                    conversation: k,
                    conversation_id: conv.id.clone(),
                    others: conv.members.len().saturating_sub(1) as u64,
                    base: conv.base,
                    count: per_user,
                    period,
                    offset: period.mul_f64(p as f64 / users.len().max(1) as f64),
                };
                tasks.push(tokio::spawn(user_task(
                    ws,
                    me,
                    Arc::clone(&shared),
                    phase_tx.subscribe(),
                )));
            }
            Err(e) => *result.connect_failures.entry(e.cause()).or_default() += 1,
        }
    }
    result.connect_latency = Latency::of(&connect_hist.merged());

    // Send.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start = Instant::now();
    let start_us = now_micros();
    let end = start + plan.duration;
    phase_tx.send_replace(Phase::Sending(start, end));
    tokio::time::sleep_until((end + period).into()).await;
    let sent_by_end = counters.sent.load(Ordering::Relaxed);
    result.send_secs = plan.duration.as_secs_f64();

    // Drain.
    phase_tx.send_replace(Phase::Draining);
    let drain_until = Instant::now() + plan.drain;
    loop {
        let s = counters.snapshot();
        let answered = s.acked + shared.refused.load(Ordering::Relaxed);
        if answered >= s.sent && s.received >= shared.expected.load(Ordering::Relaxed) {
            result.drained = true;
            break;
        }
        if Instant::now() >= drain_until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Close, then check every stream against its conversation's last stored seq.
    phase_tx.send_replace(Phase::Closing);
    let mut ends = Vec::new();
    for t in tasks {
        if let Ok(end) = t.await {
            ends.push(end);
        }
    }
    let mut last = vec![0u64; layout.conversations.len()];
    for e in &ends {
        last[e.conversation] = last[e.conversation].max(e.own_max);
    }
    let mut named = 0;
    for e in &ends {
        let conv_last = last[e.conversation].max(layout.conversations[e.conversation].base);
        let t = e.stream.finish(conv_last);
        if t.gaps > 0 && named < 5 {
            // A hole is a failure worth chasing: name the first few on stderr.
            named += 1;
            eprintln!(
                "seq gap: user {} in {}: missing {:?} below {} (highest new-message; own highest {}, conversation's {})",
                e.position,
                layout.conversations[e.conversation].id,
                e.stream.holes(5),
                e.stream.max_delivered(),
                e.own_max,
                conv_last
            );
        }
        result.seq.add(&t);
    }

    let s = counters.snapshot();
    result.sent = s.sent;
    result.stored = s.acked;
    result.delivered = s.received;
    result.expected_deliveries = shared.expected.load(Ordering::Relaxed);
    result.foreign = shared.foreign.load(Ordering::Relaxed);
    result.sent_per_sec = per_sec(sent_by_end, result.send_secs);
    let secs_to = |us: u64| us.saturating_sub(start_us) as f64 / 1e6;
    result.stored_per_sec = per_sec(s.acked, secs_to(shared.last_ack_us.load(Ordering::Relaxed)));
    result.delivered_per_sec = per_sec(
        s.received,
        secs_to(shared.last_delivery_us.load(Ordering::Relaxed)),
    );
    result.e2e = Latency::of(&shared.e2e.merged());
    result.ack = Latency::of(&shared.ack.merged());
    result.read_lag = Latency::of(&shared.read_lag.merged());
    result.errors = shared
        .errors
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    result.lost = shared
        .lost
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    Ok(result)
}

/// One user's part.
#[derive(Debug)]
struct Me {
    position: usize,
    conversation: usize,
    conversation_id: String,
    /// Other members: deliveries each of this user's messages calls for.
    others: u64,
    base: u64,
    /// Messages to send.
    count: u64,
    period: Duration,
    /// Delay of the first send after the sending phase starts.
    offset: Duration,
}

/// One connection: sends on schedule while the phase is `Sending`, reads always, closes at
/// `Closing`.
async fn user_task(
    mut ws: RawWs,
    me: Me,
    shared: Arc<Shared>,
    mut phase: watch::Receiver<Phase>,
) -> UserEnd {
    let mut stream = SeqStream::new(me.base);
    let mut own_max = 0;
    let mut n = 0u64;
    // Until the sending phase starts, the next send is "never".
    let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
    let mut next_send = far;
    let mut send_until = far;
    let mut ping = tokio::time::interval(Duration::from_secs(30));
    ping.tick().await;
    let mut alive = true;
    loop {
        tokio::select! {
            biased;
            changed = phase.changed() => {
                let now_phase = if changed.is_ok() { *phase.borrow_and_update() } else { Phase::Closing };
                match now_phase {
                    Phase::Sending(start, end) => {
                        next_send = tokio::time::Instant::from(start) + me.offset;
                        send_until = end.into();
                    }
                    Phase::Closing => break,
                    _ => {}
                }
            }
            read = ws.read_frames(|frame| match frame {
                Frame::Text(text) => on_frame(text, &me, &shared, &mut stream, &mut own_max),
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
            () = tokio::time::sleep_until(next_send), if alive && n < me.count && next_send < send_until => {
                let now = now_micros();
                let content = format!("{}:{}:{n}:{now}", shared.tag, me.position);
                let cmid = format!("{}.{n}.{now}", shared.tag);
                let frame = client::send_message(&me.conversation_id, &content, &cmid);
                if let Err(e) = ws.send_text(&frame).await {
                    tally(&shared.lost, format!("write error: {}", short(&e.to_string())));
                    alive = false;
                } else {
                    inc(&shared.counters.sent);
                }
                n += 1;
                next_send += me.period;
            }
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
    UserEnd {
        position: me.position,
        conversation: me.conversation,
        stream,
        own_max,
    }
}

fn short(s: &str) -> String {
    s.chars().take(60).collect()
}

fn on_frame(text: &str, me: &Me, shared: &Shared, stream: &mut SeqStream, own_max: &mut u64) {
    let Some(f) = client::parse(text) else {
        tally(&shared.errors, "unparsable frame".to_owned());
        return;
    };
    let now = now_micros();
    match f.kind.as_ref() {
        "message-ack" => {
            inc(&shared.counters.acked);
            shared.last_ack_us.fetch_max(now, Ordering::Relaxed);
            shared.expected.fetch_add(me.others, Ordering::Relaxed);
            if let Some(sent) = f
                .data
                .client_msg_id
                .as_deref()
                .and_then(|c| c.rsplit('.').next())
                .and_then(|t| t.parse::<u64>().ok())
            {
                shared.ack.record(now.saturating_sub(sent));
            }
            if let Some(seq) = f.data.seq_id {
                stream.own(seq);
                *own_max = (*own_max).max(seq);
            }
        }
        "new-message" if f.data.conversation_id.as_deref() == Some(me.conversation_id.as_str()) => {
            if let Some(seq) = f.data.seq_id {
                stream.delivered(seq);
            }
            let content = f.data.content.as_deref().unwrap_or("");
            if !content.starts_with(shared.tag.as_str()) {
                // Stored by an earlier run the server was still working through: part of the
                // stream, but neither this run's delivery nor its latency.
                shared.foreign.fetch_add(1, Ordering::Relaxed);
                return;
            }
            inc(&shared.counters.received);
            shared.last_delivery_us.fetch_max(now, Ordering::Relaxed);
            if let Some(sent) = content
                .rsplit(':')
                .next()
                .and_then(|t| t.parse::<u64>().ok())
            {
                shared.e2e.record(now.saturating_sub(sent));
            }
            if let Some(ts) = f.timestamp {
                shared.read_lag.record(now.saturating_sub(ts * 1000));
            }
        }
        "error" => {
            if f.data.client_msg_id.is_some() {
                shared.refused.fetch_add(1, Ordering::Relaxed);
            }
            tally(
                &shared.errors,
                format!("error {}", f.data.code.unwrap_or_default()),
            );
        }
        _ => {}
    }
}
