//! [`GatewayStats`]: lock-free counters of one gateway, read by tests today and exported as
//! metrics later.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use gochat_infra::ErrorCode;

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

/// Counters of one gateway. Every field only ever grows, except `connections`.
#[derive(Debug, Default)]
pub struct GatewayStats {
    connections: AtomicI64,
    connections_total: AtomicU64,
    frames_in: AtomicU64,
    frames_out: AtomicU64,
    upstream_published: AtomicU64,
    downstream_records: AtomicU64,
    downstream_malformed: AtomicU64,
    duplicates_dropped: AtomicU64,
    closed_slow: AtomicU64,
    closed_abuse: AtomicU64,
    closed_heartbeat: AtomicU64,
    closed_shutdown: AtomicU64,
    closed_protocol: AtomicU64,
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
            closed_slow: get(&self.closed_slow),
            closed_abuse: get(&self.closed_abuse),
            closed_heartbeat: get(&self.closed_heartbeat),
            closed_shutdown: get(&self.closed_shutdown),
            closed_protocol: get(&self.closed_protocol),
            ws_errors: by_code(&self.ws_errors),
            http_errors: by_code(&self.http_errors),
        }
    }

    pub(crate) fn session_opened(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
        bump(&self.connections_total);
    }

    pub(crate) fn session_closed(&self) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
    }

    pub(crate) fn frame_in(&self) {
        bump(&self.frames_in);
    }

    pub(crate) fn frame_out(&self) {
        bump(&self.frames_out);
    }

    pub(crate) fn published(&self) {
        bump(&self.upstream_published);
    }

    pub(crate) fn downstream_record(&self) {
        bump(&self.downstream_records);
    }

    pub(crate) fn downstream_malformed(&self) {
        bump(&self.downstream_malformed);
    }

    pub(crate) fn duplicate_dropped(&self) {
        bump(&self.duplicates_dropped);
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

    pub(crate) fn ws_error(&self, code: ErrorCode) {
        bump(&self.ws_errors[code_index(code)]);
    }

    pub(crate) fn http_error(&self, code: ErrorCode) {
        bump(&self.http_errors[code_index(code)]);
    }
}
