//! [`Shared`]: what every part of one gateway (HTTP workers, Session actors, the downstream
//! consumer, the presence reporter) reads or updates, behind one `Arc`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use gochat_infra::ids::Snowflake;
use gochat_infra::mq::partition_for;

use crate::presence::PresenceTracker;
use crate::registry::Registry;
use crate::settings::GatewaySettings;
use crate::stats::GatewayStats;

/// State shared by the whole gateway.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The settings it was started with.
    pub settings: GatewaySettings,
    /// Counters.
    pub stats: Arc<GatewayStats>,
    /// Local sessions by user and by session id.
    pub registry: Registry,
    /// Users whose presence must be (re)reported to logic.
    pub presence: PresenceTracker,
    /// Session ids, envelope message ids and trace ids.
    ids: Snowflake,
    /// Set once shutdown began: new upgrades are refused.
    shutting_down: AtomicBool,
    /// Sockets whose session ended and that are still sending their close frame (shutdown
    /// waits for them: they are no longer counted by the HTTP server).
    closing_sockets: AtomicUsize,
}

/// One socket being closed, counted in [`Shared::closing_sockets`] until dropped.
pub(crate) struct ClosingSocket(Arc<Shared>);

impl ClosingSocket {
    /// The gateway the socket belongs to.
    pub fn shared(&self) -> &Shared {
        &self.0
    }
}

impl Drop for ClosingSocket {
    fn drop(&mut self) {
        self.0.closing_sockets.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Shared {
    pub fn new(settings: GatewaySettings, stats: Arc<GatewayStats>) -> Self {
        // The node bits keep ids of different gateways apart (best effort: 1024 nodes).
        let node = partition_for(&settings.gateway_id, 1024) as u16;
        Self {
            settings,
            stats,
            registry: Registry::default(),
            presence: PresenceTracker::default(),
            ids: Snowflake::new(node),
            shutting_down: AtomicBool::new(false),
            closing_sockets: AtomicUsize::new(0),
        }
    }

    /// A fresh id (decimal string) for envelopes.
    pub fn next_id(&self) -> String {
        self.ids.next_id().to_string()
    }

    /// A fresh session id: `<gateway_id>-<snowflake>`, unique across restarts of this gateway.
    pub fn next_session_id(&self) -> String {
        format!("{}-{}", self.settings.gateway_id, self.ids.next_id())
    }

    /// A fresh trace id: 16 hex digits.
    pub fn next_trace_id(&self) -> String {
        format!("{:016x}", self.ids.next_id())
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }

    /// Counts a socket as closing until the returned guard is dropped.
    pub fn socket_closing(self: &Arc<Self>) -> ClosingSocket {
        self.closing_sockets.fetch_add(1, Ordering::AcqRel);
        ClosingSocket(Arc::clone(self))
    }

    /// Sockets still sending their close frame.
    pub fn closing_sockets(&self) -> usize {
        self.closing_sockets.load(Ordering::Acquire)
    }
}
