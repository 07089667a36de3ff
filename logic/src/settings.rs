//! Logic's tunables.

use std::time::Duration;

/// Settings of the logic service.
#[derive(Debug, Clone)]
pub struct LogicSettings {
    /// HMAC secret of the JWTs (at least 32 bytes).
    pub jwt_secret: String,
    /// Lifetime of an access token.
    pub access_ttl: Duration,
    /// Lifetime of a refresh token (and of a login session unless refreshed).
    pub refresh_ttl: Duration,
    /// Snowflake node id of this logic instance (unique among logic instances).
    pub node_id: u16,
    /// Arbiters (threads) the Conversation actors are spread over.
    pub arbiters: usize,
    /// Mailbox capacity of a Conversation actor; a full mailbox makes the upstream consumer wait.
    pub mailbox_capacity: usize,
    /// Most messages one Conversation actor batch stores at once.
    pub max_batch: usize,
    /// A Conversation actor with nothing to do for this long stops.
    pub idle_timeout: Duration,
    /// Groups with more members than this (and the world room) are delivered by the task service.
    pub async_fanout_threshold: i64,
    /// Longest message content in characters.
    pub max_content_chars: usize,
    /// Upstream records being processed at once per consumer (across conversations).
    pub max_in_flight: usize,
    /// Presence entries last this long unless refreshed.
    pub presence_ttl: Duration,
    /// How long a Conversation actor trusts a sender's membership without asking repo (zero:
    /// every batch asks). Leaving or removal forgets it at once through a control record.
    pub membership_ttl: Duration,
}

impl Default for LogicSettings {
    fn default() -> Self {
        Self {
            jwt_secret: String::new(),
            access_ttl: Duration::from_secs(15 * 60),
            refresh_ttl: Duration::from_secs(7 * 24 * 3600),
            node_id: 0,
            arbiters: std::thread::available_parallelism().map_or(2, |n| n.get()),
            mailbox_capacity: 1024,
            max_batch: 256,
            idle_timeout: Duration::from_secs(120),
            async_fanout_threshold: 500,
            max_content_chars: 5000,
            max_in_flight: 4096,
            presence_ttl: Duration::from_secs(60),
            membership_ttl: Duration::from_secs(60),
        }
    }
}
