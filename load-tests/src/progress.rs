//! Live counters of a run and the once-a-second progress line on stderr (connected / failed /
//! sent / acked / received, with the last second's rates).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Counters the connection tasks bump.
#[derive(Debug, Default)]
pub struct Counters {
    /// WebSocket connections open now.
    pub connected: AtomicU64,
    /// Connection attempts that failed, and connections lost unexpectedly.
    pub failed: AtomicU64,
    /// `send-message` frames written.
    pub sent: AtomicU64,
    /// `message-ack` frames received.
    pub acked: AtomicU64,
    /// `new-message` frames received.
    pub received: AtomicU64,
}

/// A copy of [`Counters`] (storm workers send theirs to the parent).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub connected: u64,
    pub failed: u64,
    pub sent: u64,
    pub acked: u64,
    pub received: u64,
}

impl Snapshot {
    /// Field-wise sum.
    pub fn plus(self, o: Self) -> Self {
        Self {
            connected: self.connected + o.connected,
            failed: self.failed + o.failed,
            sent: self.sent + o.sent,
            acked: self.acked + o.acked,
            received: self.received + o.received,
        }
    }
}

/// Adds one.
pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Subtracts one.
pub fn dec(c: &AtomicU64) {
    c.fetch_sub(1, Ordering::Relaxed);
}

impl Counters {
    /// Copies every counter.
    pub fn snapshot(&self) -> Snapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Snapshot {
            connected: g(&self.connected),
            failed: g(&self.failed),
            sent: g(&self.sent),
            acked: g(&self.acked),
            received: g(&self.received),
        }
    }
}

/// The progress printer; stops when dropped.
#[derive(Debug)]
pub struct Ticker(Option<tokio::task::JoinHandle<()>>);

impl Drop for Ticker {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}

/// Prints `read()` every second on stderr, labelled `label`, while the returned [`Ticker`]
/// lives (nothing when `enabled` is false).
pub fn start(
    label: &'static str,
    enabled: bool,
    read: impl Fn() -> Snapshot + Send + 'static,
) -> Ticker {
    if !enabled {
        return Ticker(None);
    }
    let started = Instant::now();
    Ticker(Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        tick.tick().await;
        let mut last = read();
        loop {
            tick.tick().await;
            let now = read();
            eprintln!(
                "[{label} {:>4}s] connected {} failed {}  sent {} (+{}/s) acked {} received {} (+{}/s)",
                started.elapsed().as_secs(),
                now.connected,
                now.failed,
                now.sent,
                now.sent.saturating_sub(last.sent),
                now.acked,
                now.received,
                now.received.saturating_sub(last.received),
            );
            last = now;
        }
    })))
}
