//! [`GatewaySettings`]: every knob of one gateway, with the defaults a production deployment
//! starts from.

use std::time::Duration;

/// How one gateway runs. `Default` gives the documented defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewaySettings {
    /// This gateway's id (default `"gw-1"`): names its downstream topic
    /// (`im-downstream-topic-{gateway_id}`), its consumer group (`im-gateway-{gateway_id}`) and
    /// its presence entries. Unique among the gateways sharing one bus.
    pub gateway_id: String,
    /// Largest WebSocket text frame accepted (default 65 536 bytes). A bigger frame up to
    /// four times this size is refused with an `error` frame (code 1001) and the connection
    /// stays open; anything bigger cannot even be buffered and closes the connection with 1009.
    pub max_frame_bytes: usize,
    /// Longest `send-message` content, in Unicode characters (default 5 000); longer: error
    /// frame 3002.
    pub max_content_chars: usize,
    /// Frames one session holds back while actix-ws's channel to its socket (32 frames) is
    /// full, and deliveries queued for its actor (default 256 each). A session whose backlog or
    /// delivery queue is full is too slow to keep up: it is closed with 1013.
    pub outbound_queue: usize,
    /// `send-message` frames of one session waiting to be published upstream (default 64);
    /// beyond that a send is refused with error 1005 (retry later).
    pub upstream_inflight: usize,
    /// A connection that sends nothing (no frame at all, `ping` included) for this long is
    /// closed with 1000 "heartbeat timeout" (default 90 s).
    pub heartbeat_timeout: Duration,
    /// How often the gateway sweeps its sessions for silent ones (default 10 s).
    pub heartbeat_check_interval: Duration,
    /// Lifetime of this gateway's presence entries in logic (default 30 s); they are refreshed
    /// every third of it.
    pub presence_ttl: Duration,
    /// How long an upgrade waits for its user's presence report before answering 101 (default
    /// 3 s; zero: no wait). Once a client sees 101, logic routes every new message of its
    /// conversations here; past the wait (logic slow or down) the connection opens anyway and
    /// `gochat_gateway_presence_late_total` counts it.
    pub presence_wait: Duration,
    /// Refused frames (bad JSON, unknown type, invalid fields, binary) tolerated within
    /// `abuse_window` (default 20): the one that reaches it gets its error frame, then the
    /// connection is closed with 1008 (policy violation).
    pub max_abuse: u32,
    /// The window `max_abuse` counts in (default 60 s); the count restarts after it.
    pub abuse_window: Duration,
    /// WebSocket sessions this gateway holds at most (default 100 000); an upgrade beyond it is
    /// refused with HTTP 503, code 1006.
    pub max_sessions: usize,
    /// Largest HTTP JSON body (default 65 536 bytes); bigger: 400, code 1001.
    pub max_body_bytes: usize,
    /// How long a closing session may spend flushing its queue and the close frame to a
    /// client that does not read (default 5 s); then the socket is dropped.
    pub close_grace: Duration,
    /// How long a graceful shutdown waits for connections to finish (default 10 s).
    pub shutdown_grace: Duration,
    /// Partitions of the downstream topic when this gateway creates it (default 8).
    pub downstream_partitions: u32,
    /// HTTP worker threads (default 0: one per CPU core).
    pub workers: usize,
    /// Bearer token of `/admin` and `/admin/actors`, also required by `/metrics` when set
    /// (default empty: the admin routes answer 404 and `/metrics` is open).
    pub admin_token: String,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        Self {
            gateway_id: "gw-1".to_owned(),
            max_frame_bytes: 64 * 1024,
            max_content_chars: 5_000,
            outbound_queue: 256,
            upstream_inflight: 64,
            heartbeat_timeout: Duration::from_secs(90),
            heartbeat_check_interval: Duration::from_secs(10),
            presence_ttl: Duration::from_secs(30),
            presence_wait: Duration::from_secs(3),
            max_abuse: 20,
            abuse_window: Duration::from_secs(60),
            max_sessions: 100_000,
            max_body_bytes: 64 * 1024,
            close_grace: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(10),
            downstream_partitions: 8,
            workers: 0,
            admin_token: String::new(),
        }
    }
}

impl GatewaySettings {
    /// The WebSocket codec's hard frame limit: frames up to this size are read (and refused
    /// politely when over `max_frame_bytes`); bigger ones close the connection.
    pub fn hard_frame_limit(&self) -> usize {
        self.max_frame_bytes.max(1).saturating_mul(4)
    }

    /// The presence ttl in whole seconds (at least 1), as logic takes it.
    pub(crate) fn presence_ttl_secs(&self) -> i64 {
        i64::try_from(self.presence_ttl.as_secs().max(1)).unwrap_or(i64::MAX)
    }

    /// How often presence is refreshed: a third of the ttl (at least 1 s).
    pub(crate) fn presence_refresh_every(&self) -> Duration {
        (self.presence_ttl / 3).max(Duration::from_secs(1))
    }
}
