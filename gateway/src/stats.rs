//! [`GatewayStats`]: lock-free counters of one gateway (read by tests and `/admin/actors`), and
//! the one place the gateway records its Prometheus metrics: every counter update here also
//! updates the matching `gochat_gateway_*` metric (see `gochat_infra::telemetry`). The handles of
//! the per-frame metrics are looked up once, when the stats are made (after the process
//! installed its recorder), so a frame costs atomic adds, not a registry lookup by name and
//! labels (at 300,000 deliveries/s those lookups were about a tenth of the server's CPU).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use gochat_infra::ErrorCode;
use gochat_infra::telemetry::{self as t, code_label};
use metrics::{Counter, Histogram, counter, gauge, histogram};

use crate::frames;

/// `type` of a received text frame that was refused (bad JSON, unknown type, invalid fields, too
/// big).
pub(crate) const FRAME_INVALID: &str = "invalid";
/// `type` of a binary frame (refused).
pub(crate) const FRAME_BINARY: &str = "binary";
/// `type` of a WebSocket-level ping.
pub(crate) const FRAME_WS_PING: &str = "ws-ping";
/// `type` of a WebSocket-level pong.
pub(crate) const FRAME_WS_PONG: &str = "ws-pong";
/// `type` of a close frame.
pub(crate) const FRAME_CLOSE: &str = "close";

/// Why the gateway closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCause {
    /// The client could not keep up with its deliveries (1013).
    Slow,
    /// Too many refused frames (1008).
    Abuse,
    /// Nothing received for `heartbeat_timeout` (1000).
    Heartbeat,
    /// The gateway is shutting down (1001).
    Shutdown,
    /// A frame over the hard size limit or a WebSocket protocol error (1009 / 1002).
    Protocol,
}

impl CloseCause {
    /// The `cause` label of `gochat_gateway_disconnects_total`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Slow => "slow",
            Self::Abuse => "abuse",
            Self::Heartbeat => "heartbeat",
            Self::Shutdown => "shutdown",
            Self::Protocol => "protocol",
        }
    }
}

/// `cause` of a connection the client (or the network) ended.
pub(crate) const CAUSE_CLIENT: &str = "client";

/// The metric handles of what happens once per frame or per record.
struct Handles {
    frames_in: [Counter; FRAMES_IN.len()],
    frames_out: [Counter; FRAMES_OUT.len()],
    messages_in: Counter,
    messages_out: Counter,
    downstream_records: Counter,
    mailbox_depth: Histogram,
    handling: Histogram,
}

/// The `type` labels of `gochat_gateway_frames_in_total`; the last one takes every other kind.
const FRAMES_IN: [&str; 8] = [
    frames::SEND_MESSAGE,
    frames::PING,
    frames::PONG,
    FRAME_BINARY,
    FRAME_WS_PING,
    FRAME_WS_PONG,
    FRAME_CLOSE,
    FRAME_INVALID,
];

/// The `type` labels of `gochat_gateway_frames_out_total`; the last one takes every other kind.
const FRAMES_OUT: [&str; 7] = [
    frames::NEW_MESSAGE,
    frames::MESSAGE_ACK,
    frames::ERROR,
    frames::ONLINE_STATUS,
    frames::PONG,
    FRAME_WS_PONG,
    "other",
];

/// The index of `kind` in `labels`, or the last one.
fn label_index(labels: &[&str], kind: &str) -> usize {
    labels
        .iter()
        .position(|l| *l == kind)
        .unwrap_or(labels.len() - 1)
}

impl Default for Handles {
    fn default() -> Self {
        Self {
            frames_in: FRAMES_IN.map(|kind| counter!(t::GATEWAY_FRAMES_IN, "type" => kind)),
            frames_out: FRAMES_OUT.map(|kind| counter!(t::GATEWAY_FRAMES_OUT, "type" => kind)),
            messages_in: counter!(t::GATEWAY_MESSAGES_IN),
            messages_out: counter!(t::GATEWAY_MESSAGES_OUT),
            downstream_records: counter!(t::GATEWAY_DOWNSTREAM_RECORDS),
            mailbox_depth: histogram!(t::MAILBOX_DEPTH, "kind" => "session"),
            handling: histogram!(t::HANDLING_SECONDS, "kind" => "session"),
        }
    }
}

impl std::fmt::Debug for Handles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handles").finish_non_exhaustive()
    }
}

/// Counters of one gateway. Every field only ever grows, except `connections`. Made after the
/// process installed its metrics recorder (`gochat_infra::telemetry::install`), its per-frame
/// metrics go there; made before, they go nowhere.
#[derive(Debug, Default)]
pub struct GatewayStats {
    metrics: Handles,
    connections: AtomicI64,
    connections_total: AtomicU64,
    frames_in: AtomicU64,
    frames_out: AtomicU64,
    upstream_published: AtomicU64,
    downstream_records: AtomicU64,
    downstream_malformed: AtomicU64,
    duplicates_dropped: AtomicU64,
    held_dropped: AtomicU64,
    closed_slow: AtomicU64,
    closed_abuse: AtomicU64,
    closed_heartbeat: AtomicU64,
    closed_shutdown: AtomicU64,
    closed_protocol: AtomicU64,
    presence_late: AtomicU64,
    ws_errors: [AtomicU64; ErrorCode::ALL.len()],
    http_errors: [AtomicU64; ErrorCode::ALL.len()],
}

/// A point-in-time copy of [`GatewayStats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Open WebSocket sessions.
    pub connections: i64,
    /// Sessions ever opened.
    pub connections_total: u64,
    /// WebSocket frames received (any kind).
    pub frames_in: u64,
    /// WebSocket frames written to sockets.
    pub frames_out: u64,
    /// `send-message` frames published to the upstream topic.
    pub upstream_published: u64,
    /// Downstream records consumed.
    pub downstream_records: u64,
    /// Downstream records that did not parse (logged and committed).
    pub downstream_malformed: u64,
    /// `new-message` deliveries a session dropped as already delivered (seq not above the last).
    pub duplicates_dropped: u64,
    /// Frames dropped while a session's `101` waited for presence and it held a full queue.
    pub held_dropped: u64,
    /// Sessions closed as too slow (1013).
    pub closed_slow: u64,
    /// Sessions closed for abuse (1008).
    pub closed_abuse: u64,
    /// Sessions closed for silence (1000).
    pub closed_heartbeat: u64,
    /// Sessions closed by shutdown (1001).
    pub closed_shutdown: u64,
    /// Sessions closed for an oversized frame or a protocol error (1009 / 1002).
    pub closed_protocol: u64,
    /// Upgrades answered 101 before their user's presence was reported (`presence_wait` ran out, or the gateway was stopping).
    pub presence_late: u64,
    /// `error` frames sent, by code.
    pub ws_errors: BTreeMap<u16, u64>,
    /// HTTP error responses, by code.
    pub http_errors: BTreeMap<u16, u64>,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn code_index(code: ErrorCode) -> usize {
    ErrorCode::ALL.iter().position(|c| *c == code).unwrap_or(0)
}

fn by_code(counters: &[AtomicU64]) -> BTreeMap<u16, u64> {
    ErrorCode::ALL
        .iter()
        .zip(counters)
        .map(|(code, n)| (code.as_u16(), n.load(Ordering::Relaxed)))
        .filter(|(_, n)| *n > 0)
        .collect()
}

impl GatewayStats {
    /// Copies every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            connections: self.connections.load(Ordering::Relaxed),
            connections_total: get(&self.connections_total),
            frames_in: get(&self.frames_in),
            frames_out: get(&self.frames_out),
            upstream_published: get(&self.upstream_published),
            downstream_records: get(&self.downstream_records),
            downstream_malformed: get(&self.downstream_malformed),
            duplicates_dropped: get(&self.duplicates_dropped),
            held_dropped: get(&self.held_dropped),
            closed_slow: get(&self.closed_slow),
            closed_abuse: get(&self.closed_abuse),
            closed_heartbeat: get(&self.closed_heartbeat),
            closed_shutdown: get(&self.closed_shutdown),
            closed_protocol: get(&self.closed_protocol),
            presence_late: get(&self.presence_late),
            ws_errors: by_code(&self.ws_errors),
            http_errors: by_code(&self.http_errors),
        }
    }

    pub(crate) fn session_opened(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
        bump(&self.connections_total);
        gauge!(t::GATEWAY_CONNECTIONS).increment(1);
        gauge!(t::ACTORS, "kind" => "session").increment(1);
        counter!(t::GATEWAY_CONNECTS).increment(1);
    }

    /// A session ended; `cause` is a [`CloseCause::as_str`] or [`CAUSE_CLIENT`].
    pub(crate) fn session_closed(&self, cause: &'static str) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
        gauge!(t::GATEWAY_CONNECTIONS).decrement(1);
        gauge!(t::ACTORS, "kind" => "session").decrement(1);
        counter!(t::GATEWAY_DISCONNECTS, "cause" => cause).increment(1);
    }

    /// A frame was received; `kind` is its envelope type or one of the `FRAME_*` kinds.
    pub(crate) fn frame_in(&self, kind: &'static str) {
        bump(&self.frames_in);
        self.metrics.frames_in[label_index(&FRAMES_IN, kind)].increment(1);
    }

    /// A frame was written to a socket; `kind` is its envelope type or [`FRAME_WS_PONG`].
    pub(crate) fn frame_out(&self, kind: &'static str) {
        bump(&self.frames_out);
        if kind == frames::NEW_MESSAGE {
            self.metrics.messages_out.increment(1);
        }
        self.metrics.frames_out[label_index(&FRAMES_OUT, kind)].increment(1);
    }

    /// A session queued a frame for its socket; `depth` frames are now waiting.
    pub(crate) fn outbound_depth(&self, depth: usize) {
        self.metrics.mailbox_depth.record(depth as f64);
    }

    /// A session handled one frame or delivery in `took`.
    pub(crate) fn handled(&self, took: Duration) {
        self.metrics.handling.record(took.as_secs_f64());
    }

    pub(crate) fn published(&self) {
        bump(&self.upstream_published);
        self.metrics.messages_in.increment(1);
    }

    pub(crate) fn downstream_record(&self) {
        bump(&self.downstream_records);
        self.metrics.downstream_records.increment(1);
    }

    pub(crate) fn downstream_malformed(&self) {
        bump(&self.downstream_malformed);
        counter!(t::GATEWAY_DOWNSTREAM_MALFORMED).increment(1);
    }

    pub(crate) fn duplicate_dropped(&self) {
        bump(&self.duplicates_dropped);
        counter!(t::GATEWAY_DUPLICATES_DROPPED).increment(1);
    }

    pub(crate) fn held_dropped(&self) {
        bump(&self.held_dropped);
        counter!(t::GATEWAY_HELD_DROPPED).increment(1);
    }

    pub(crate) fn closed(&self, cause: CloseCause) {
        bump(match cause {
            CloseCause::Slow => &self.closed_slow,
            CloseCause::Abuse => &self.closed_abuse,
            CloseCause::Heartbeat => &self.closed_heartbeat,
            CloseCause::Shutdown => &self.closed_shutdown,
            CloseCause::Protocol => &self.closed_protocol,
        });
    }

    /// An upgrade waited `took` for its user's presence report; `reported`: the report came.
    pub(crate) fn presence_waited(&self, took: Duration, reported: bool) {
        histogram!(t::GATEWAY_PRESENCE_WAIT).record(took.as_secs_f64());
        if !reported {
            bump(&self.presence_late);
            counter!(t::GATEWAY_PRESENCE_LATE).increment(1);
        }
    }

    pub(crate) fn ws_error(&self, code: ErrorCode) {
        bump(&self.ws_errors[code_index(code)]);
        counter!(t::GATEWAY_ERRORS, "code" => code_label(code), "transport" => "ws").increment(1);
    }

    pub(crate) fn http_error(&self, code: ErrorCode) {
        bump(&self.http_errors[code_index(code)]);
        counter!(t::GATEWAY_ERRORS, "code" => code_label(code), "transport" => "http").increment(1);
    }

    /// A user's local sessions went from `from` to `to` (one of them 0 when the user appears or
    /// leaves): moves the user between the `sessions` buckets of `gochat_gateway_users`.
    pub(crate) fn user_sessions_changed(&self, from: usize, to: usize) {
        if from == to {
            return;
        }
        if from > 0 {
            users_gauge(from).decrement(1);
        }
        if to > 0 {
            users_gauge(to).increment(1);
        }
    }
}

fn users_gauge(sessions: usize) -> metrics::Gauge {
    match sessions {
        1 => gauge!(t::GATEWAY_USERS, "sessions" => "1"),
        2 => gauge!(t::GATEWAY_USERS, "sessions" => "2"),
        3 => gauge!(t::GATEWAY_USERS, "sessions" => "3"),
        _ => gauge!(t::GATEWAY_USERS, "sessions" => "4+"),
    }
}
