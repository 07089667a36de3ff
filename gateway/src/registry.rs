//! [`Registry`]: the local sessions of this gateway, by user (a user may have several devices)
//! and by session id (acks and errors go to one session).
//!
//! Both maps are sharded (`DashMap`), so registering, looking up and delivering never take a
//! global lock. Delivery into a session is a non-blocking bounded `try_send`; a session whose
//! queue is full is told to close as too slow (once), and the others are unaffected.
//!
//! Heartbeats are checked here too: each session stamps [`Signals::last_seen_ms`] when a frame
//! arrives, and one sweep per gateway ([`Registry::close_silent`], every
//! `heartbeat_check_interval`) closes the silent ones, instead of a timer in every session
//! (which every wake of the session polled, and which cost each connection its memory).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use actix::Addr;
use dashmap::DashMap;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use crate::session::{CloseSession, Delivery, Session};
use crate::stats::CloseCause;

/// What a session and the rest of the gateway both read and write, in one allocation.
#[derive(Debug, Default)]
pub(crate) struct Signals {
    /// Frames the session holds back because its socket is not taking them (its backlog).
    pub backlog: AtomicUsize,
    /// When the session last received a frame, in milliseconds of [`Registry::clock_ms`]; the
    /// heartbeat sweep closes it once this is `heartbeat_timeout` old.
    pub last_seen_ms: AtomicU64,
    /// Set once the session was told to close, so a flood of failed deliveries sends one
    /// close request, not one per delivery.
    doomed: AtomicBool,
}

impl Signals {
    /// A session's, last seen at `last_seen_ms`.
    pub fn new(last_seen_ms: u64) -> Self {
        Self {
            last_seen_ms: AtomicU64::new(last_seen_ms),
            ..Self::default()
        }
    }
}

/// How the rest of the gateway reaches one Session actor.
#[derive(Clone)]
pub(crate) struct SessionHandle {
    /// The session id (`<gateway_id>-<snowflake>`).
    pub id: Arc<str>,
    /// Its authenticated user.
    pub user_id: Arc<str>,
    /// Bounded queue of deliveries into the actor.
    deliveries: mpsc::Sender<Arc<Delivery>>,
    /// Shared with the session.
    signals: Arc<Signals>,
    /// The actor's mailbox, for control messages (close).
    control: Addr<Session>,
}

impl fmt::Debug for SessionHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionHandle")
            .field("id", &self.id)
            .field("user_id", &self.user_id)
            .finish_non_exhaustive()
    }
}

impl SessionHandle {
    pub fn new(
        id: Arc<str>,
        user_id: Arc<str>,
        deliveries: mpsc::Sender<Arc<Delivery>>,
        signals: Arc<Signals>,
        control: Addr<Session>,
    ) -> Self {
        Self {
            id,
            user_id,
            deliveries,
            signals,
            control,
        }
    }

    /// Queues `delivery` without waiting. A full queue means the client cannot keep up: the
    /// session is closed with 1013 and the delivery dropped (the client resyncs by seq).
    pub fn deliver(&self, delivery: Arc<Delivery>) {
        match self.deliveries.try_send(delivery) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.close(CloseCause::Slow, "client too slow: delivery queue full");
            }
            Err(TrySendError::Closed(_)) => {}
        }
    }

    /// Frames waiting for this session: deliveries not yet taken by the actor plus frames held
    /// in its backlog (those the socket could not take yet).
    pub fn queued(&self) -> usize {
        let waiting = |max: usize, free: usize| max.saturating_sub(free);
        let deliveries = waiting(self.deliveries.max_capacity(), self.deliveries.capacity());
        deliveries + self.signals.backlog.load(Ordering::Relaxed)
    }

    /// When the session last received a frame ([`Registry::clock_ms`]).
    pub fn last_seen_ms(&self) -> u64 {
        self.signals.last_seen_ms.load(Ordering::Relaxed)
    }

    /// Asks the session to close (once; later requests are ignored). True when this call
    /// asked.
    pub fn close(&self, cause: CloseCause, reason: &str) -> bool {
        let first = !self.signals.doomed.swap(true, Ordering::AcqRel);
        if first {
            self.control.do_send(CloseSession {
                cause,
                reason: reason.to_owned(),
            });
        }
        first
    }
}

/// The local sessions.
pub(crate) struct Registry {
    by_user: DashMap<Arc<str>, Vec<SessionHandle>>,
    by_session: DashMap<Arc<str>, SessionHandle>,
    sessions: AtomicUsize,
    /// The origin of [`Registry::clock_ms`].
    epoch: Instant,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            by_user: DashMap::default(),
            by_session: DashMap::default(),
            sessions: AtomicUsize::new(0),
            epoch: Instant::now(),
        }
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("users", &self.by_user.len())
            .field("sessions", &self.len())
            .finish()
    }
}

impl Registry {
    /// Adds a session; returns how many local sessions its user has now (1: the first).
    pub fn insert(&self, handle: SessionHandle) -> usize {
        self.sessions.fetch_add(1, Ordering::Relaxed);
        self.by_session
            .insert(Arc::clone(&handle.id), handle.clone());
        let mut sessions = self.by_user.entry(Arc::clone(&handle.user_id)).or_default();
        sessions.push(handle);
        sessions.len()
    }

    /// Removes a session; returns how many local sessions its user had before and has after
    /// (after 0: it was the last).
    pub fn remove(&self, user_id: &str, session_id: &str) -> (usize, usize) {
        let mut counts = (0, 0);
        self.by_user.remove_if_mut(user_id, |_, sessions| {
            let before = sessions.len();
            sessions.retain(|h| &*h.id != session_id);
            counts = (before, sessions.len());
            sessions.is_empty()
        });
        if self.by_session.remove(session_id).is_some() {
            self.sessions.fetch_sub(1, Ordering::Relaxed);
        }
        counts
    }

    /// Milliseconds since the registry was made: the clock of [`Signals::last_seen_ms`].
    pub fn clock_ms(&self) -> u64 {
        self.ms_at(Instant::now())
    }

    /// `at` on the clock of [`Registry::clock_ms`].
    pub fn ms_at(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    /// Asks every session that has received nothing for `timeout` to close (1000 "heartbeat
    /// timeout"); returns how many were asked (a session already closing is not asked again).
    pub fn close_silent(&self, timeout: Duration) -> usize {
        let now = self.clock_ms();
        let timeout = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let mut asked = 0;
        self.for_each(|h| {
            if now.saturating_sub(h.last_seen_ms()) >= timeout
                && h.close(CloseCause::Heartbeat, "heartbeat timeout")
            {
                asked += 1;
            }
        });
        asked
    }

    /// Open sessions.
    pub fn len(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
    }

    /// Whether `user_id` has a local session.
    pub fn has_user(&self, user_id: &str) -> bool {
        self.by_user.contains_key(user_id)
    }

    /// Calls `f` for each local session of `user_id`.
    pub fn for_user(&self, user_id: &str, mut f: impl FnMut(&SessionHandle)) {
        if let Some(sessions) = self.by_user.get(user_id) {
            sessions.iter().for_each(&mut f);
        }
    }

    /// Calls `f` for the session `session_id`, if it is local.
    pub fn for_session(&self, session_id: &str, f: impl FnOnce(&SessionHandle)) {
        if let Some(handle) = self.by_session.get(session_id) {
            f(&handle);
        }
    }

    /// The id of the local session `session_id`, as the `Arc` its handle holds (so a caller
    /// can tell that handle apart by address), if it is local.
    pub fn session_id(&self, session_id: &str) -> Option<Arc<str>> {
        self.by_session
            .get(session_id)
            .map(|handle| Arc::clone(&handle.id))
    }

    /// Calls `f` for every local session.
    pub fn for_each(&self, mut f: impl FnMut(&SessionHandle)) {
        self.by_session.iter().for_each(|e| f(e.value()));
    }
}
