//! [`Registry`]: the local sessions of this gateway, by user (a user may have several devices)
//! and by session id (acks and errors go to one session).
//!
//! Both maps are sharded (`DashMap`), so registering and looking up never take a global lock.
//! Deliveries do not go into a session from here: the registry knows which worker thread each
//! session lives on (its hub's port, see `hub`) and sends each worker's hub one job per record,
//! which queues the delivery for its sessions on that thread.
//!
//! Heartbeats are checked here too: each session stamps [`Signals::last_seen_ms`] when a frame
//! arrives, and one sweep per gateway ([`Registry::close_silent`], every
//! `heartbeat_check_interval`) closes the silent ones, instead of a timer in every session
//! (which every wake of the session polled, and which cost each connection its memory).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{PoisonError, RwLock};
use std::time::{Duration, Instant};

use actix::Addr;
use dashmap::DashMap;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use crate::hub::{Job, Target, Targets};
use crate::session::{CloseSession, Delivery, Session};
use crate::stats::CloseCause;

/// Tells registries apart (a worker thread's hubs are found by it).
static REGISTRIES: AtomicU64 = AtomicU64::new(0);

/// What a session and the rest of the gateway both read and write, in one allocation.
#[derive(Debug, Default)]
pub(crate) struct Signals {
    /// Frames the session holds back because its socket is not taking them (its backlog).
    pub backlog: AtomicUsize,
    /// Deliveries in the session's inbox, not yet taken by the session.
    pub inbox: AtomicUsize,
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
    /// The hub of its worker thread ([`Registry::send`]).
    port: u32,
    /// Its slot in that hub.
    slot: u32,
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
    /// The session `id` of `user_id`, in `slot` of the hub `port`.
    pub fn new(
        id: Arc<str>,
        user_id: Arc<str>,
        (port, slot): (u32, u32),
        signals: Arc<Signals>,
        control: Addr<Session>,
    ) -> Self {
        Self {
            id,
            user_id,
            port,
            slot,
            signals,
            control,
        }
    }

    /// Frames waiting for this session: deliveries not yet taken by the actor plus frames held
    /// in its backlog (those the socket could not take yet).
    pub fn queued(&self) -> usize {
        self.signals.inbox.load(Ordering::Relaxed) + self.signals.backlog.load(Ordering::Relaxed)
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

/// Sessions gathered for one delivery ([`Registry::deliver`]), by hub.
#[derive(Debug, Default)]
pub(crate) struct Fanout {
    /// The sessions of each hub (by port), in the order the hubs were first seen.
    hubs: Vec<(u32, Vec<Target>)>,
}

impl Fanout {
    /// Adds a session.
    pub fn add(&mut self, h: &SessionHandle) {
        let target = (h.slot, Arc::clone(&h.id));
        match self.hubs.iter_mut().find(|(port, _)| *port == h.port) {
            Some((_, sessions)) => sessions.push(target),
            None => self.hubs.push((h.port, vec![target])),
        }
    }
}

/// The local sessions.
pub(crate) struct Registry {
    by_user: DashMap<Arc<str>, Vec<SessionHandle>>,
    by_session: DashMap<Arc<str>, SessionHandle>,
    sessions: AtomicUsize,
    /// The job queues of the worker threads' hubs, by port (one per worker with sessions).
    ports: RwLock<Vec<mpsc::Sender<Job>>>,
    /// The origin of [`Registry::clock_ms`].
    epoch: Instant,
    /// Unique per registry.
    id: u64,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            by_user: DashMap::default(),
            by_session: DashMap::default(),
            sessions: AtomicUsize::new(0),
            ports: RwLock::default(),
            epoch: Instant::now(),
            id: REGISTRIES.fetch_add(1, Ordering::Relaxed),
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
    /// Unique among the registries of this process.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Adds a hub's job queue; returns its port.
    pub fn add_port(&self, jobs: mpsc::Sender<Job>) -> u32 {
        let mut ports = self.ports.write().unwrap_or_else(PoisonError::into_inner);
        ports.push(jobs);
        u32::try_from(ports.len() - 1).expect("fewer than 2^32 worker threads")
    }

    /// Hubs known.
    pub fn ports(&self) -> usize {
        self.ports
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Hands `job` to the hub `port`, waiting while its queue is full (its worker thread is
    /// behind). A hub that is gone (its worker stopped) is skipped.
    pub async fn send(&self, port: u32, job: Job) {
        let (jobs, job) = {
            let ports = self.ports.read().unwrap_or_else(PoisonError::into_inner);
            let Some(jobs) = ports.get(port as usize) else {
                return;
            };
            match jobs.try_send(job) {
                Ok(()) | Err(TrySendError::Closed(_)) => return,
                // Wait outside the lock, on a sender of our own.
                Err(TrySendError::Full(job)) => (jobs.clone(), job),
            }
        };
        // An error is a hub that went away meanwhile: skipped, as above.
        let _ = jobs.send(job).await;
    }

    /// Queues `delivery` for every local session except `exclude` (one job per hub).
    pub async fn broadcast(&self, delivery: &Arc<Delivery>, exclude: Option<&Arc<str>>) {
        for port in 0..u32::try_from(self.ports()).unwrap_or(u32::MAX) {
            let job = Job {
                delivery: Arc::clone(delivery),
                targets: Targets::All {
                    exclude: exclude.cloned(),
                },
            };
            self.send(port, job).await;
        }
    }

    /// Queues `delivery` for the sessions gathered in `targets` (one job per hub).
    pub async fn deliver(&self, delivery: &Arc<Delivery>, targets: Fanout) {
        for (port, sessions) in targets.hubs {
            let job = Job {
                delivery: Arc::clone(delivery),
                targets: Targets::Sessions(sessions),
            };
            self.send(port, job).await;
        }
    }

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
