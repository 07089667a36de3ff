//! Presence reporting: tells logic when a user's first local session opens
//! (`UserConnected`) and when their last local session closes (`UserDisconnected`), and keeps
//! the entries alive with `RefreshPresence` every third of the ttl.
//!
//! Reporting is level-triggered rather than event-driven: sessions only mark their user
//! "dirty"; one reporter task compares, per dirty user, whether the user has a local session now
//! with what it last reported, and makes the one call that closes the gap. Calls therefore never
//! race each other out of order (a quick disconnect/reconnect cannot end up reported offline),
//! flapping collapses into at most one call per user per round, memory is bounded by the number
//! of users, and a failed call is simply retried a second later.
//!
//! An upgrade can wait for its user's report ([`PresenceTracker::mark_and_notify`]): the
//! gateway answers 101 only once logic knows the user is online here, so every message stored
//! after a client sees its connection open is routed to it (see `GatewaySettings::presence_wait`).
//! A waiter is taken together with the dirty mark it came with, under one lock, so the round
//! that releases it looked at the registry after the session was in it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use gochat_proto::logic::presence_service_server::PresenceService;
use gochat_proto::logic::{RefreshPresenceRequest, UserConnectedRequest, UserDisconnectedRequest};
use tokio::sync::{Notify, oneshot};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::shared::Shared;

/// Presence calls in flight at once.
const CONCURRENCY: usize = 32;
/// User ids per `RefreshPresence` call.
const REFRESH_BATCH: usize = 1_000;
/// Delay before a failed call is retried.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Upgrades waiting for their user's presence to be reported, by user.
type Waiters = HashMap<String, Vec<oneshot::Sender<()>>>;

/// Users whose presence changed since the reporter last looked.
#[derive(Debug, Default)]
pub(crate) struct PresenceTracker {
    pending: Mutex<Pending>,
    wake: Notify,
}

#[derive(Debug, Default)]
struct Pending {
    dirty: HashSet<String>,
    waiters: Waiters,
}

impl PresenceTracker {
    /// Marks `user_id` for the reporter.
    pub fn mark(&self, user_id: &str) {
        self.lock().dirty.insert(user_id.to_owned());
        self.wake.notify_one();
    }

    /// Marks `user_id` and has `ready` sent once a reporter round that started after this call
    /// reconciled the user (reported them, or found nothing to report). A failed report keeps
    /// the waiter until a retry succeeds; when the reporter stops, it drops every waiter left.
    pub fn mark_and_notify(&self, user_id: &str, ready: oneshot::Sender<()>) {
        {
            let mut pending = self.lock();
            pending.dirty.insert(user_id.to_owned());
            pending
                .waiters
                .entry(user_id.to_owned())
                .or_default()
                .push(ready);
        }
        self.wake.notify_one();
    }

    /// The marked users and their waiters, atomically. Waiters of users not marked (their
    /// report failed and waits for its retry) stay.
    fn take(&self) -> (Vec<String>, Waiters) {
        let mut pending = self.lock();
        let dirty: Vec<String> = pending.dirty.drain().collect();
        let waiters = dirty
            .iter()
            .filter_map(|user| pending.waiters.remove_entry(user))
            .collect();
        (dirty, waiters)
    }

    /// Puts back waiters a round could not release (their users' reports failed).
    fn keep_waiting(&self, waiters: Waiters) {
        let mut pending = self.lock();
        for (user, mut list) in waiters {
            list.retain(|w| !w.is_closed());
            if !list.is_empty() {
                pending.waiters.entry(user).or_default().extend(list);
            }
        }
    }

    /// Drops every waiter: nobody will report their users any more.
    fn abandon(&self) {
        self.lock().waiters.clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Tells the upgrades waiting for `user` that its presence is reported.
fn release(waiters: &mut Waiters, user: &str) {
    for ready in waiters.remove(user).into_iter().flatten() {
        let _ = ready.send(());
    }
}

/// What one reconciliation did for one user.
enum Outcome {
    Online(String),
    Offline(String),
    Unchanged(String),
    Failed(String),
}

/// Runs until `cancel`, then reports every user it reported online as disconnected (bounded by
/// `shutdown_grace`).
pub(crate) async fn run_reporter<L: PresenceService + Clone>(
    shared: Arc<Shared>,
    logic: L,
    cancel: CancellationToken,
) {
    let gateway_id = shared.settings.gateway_id.clone();
    let ttl = shared.settings.presence_ttl_secs();
    let mut reported: HashSet<String> = HashSet::new();
    let mut refresh = tokio::time::interval(shared.settings.presence_refresh_every());
    refresh.set_missed_tick_behavior(MissedTickBehavior::Skip);
    refresh.tick().await;
    let mut retry: Option<(Instant, Vec<String>)> = None;

    loop {
        let retry_at = retry.as_ref().map(|(at, _)| *at);
        tokio::select! {
            () = cancel.cancelled() => break,
            () = shared.presence.wake.notified() => {}
            () = sleep_until_opt(retry_at) => {
                if let Some((_, users)) = retry.take() {
                    users.iter().for_each(|u| shared.presence.mark(u));
                }
            }
            _ = refresh.tick() => {
                refresh_all(&logic, &gateway_id, &reported, ttl).await;
                continue;
            }
        }
        let (dirty, mut waiters) = shared.presence.take();
        if dirty.is_empty() {
            continue;
        }
        // Looked at now, after the take: a waiter's session is in the registry already.
        let work: Vec<(String, bool, bool)> = dirty
            .into_iter()
            .map(|user| {
                let online_now = shared.registry.has_user(&user);
                let was_online = reported.contains(&user);
                (user, online_now, was_online)
            })
            .collect();
        let mut outcomes =
            futures::stream::iter(work)
                .map(|(user, online_now, was_online)| {
                    let logic = logic.clone();
                    let gateway_id = gateway_id.clone();
                    async move {
                        reconcile(&logic, &gateway_id, ttl, user, online_now, was_online).await
                    }
                })
                .buffer_unordered(CONCURRENCY);
        let mut failed = Vec::new();
        // Each outcome is applied as it arrives, so one slow call does not hold the upgrades
        // waiting for other users.
        while let Some(outcome) = outcomes.next().await {
            match outcome {
                Outcome::Online(u) => {
                    release(&mut waiters, &u);
                    reported.insert(u);
                }
                Outcome::Offline(u) => {
                    release(&mut waiters, &u);
                    reported.remove(&u);
                }
                Outcome::Unchanged(u) => release(&mut waiters, &u),
                Outcome::Failed(u) => failed.push(u),
            }
        }
        if !waiters.is_empty() {
            shared.presence.keep_waiting(waiters);
        }
        if !failed.is_empty() {
            let at = Instant::now() + RETRY_AFTER;
            match &mut retry {
                Some((_, users)) => users.extend(failed),
                None => retry = Some((at, failed)),
            }
        }
    }

    // Upgrades still waiting (their reports failed) go ahead unreported.
    shared.presence.abandon();
    // Shutdown: this gateway's users are offline here now.
    let goodbye = futures::stream::iter(reported)
        .map(|user| {
            let logic = logic.clone();
            let gateway_id = gateway_id.clone();
            async move {
                let req = UserDisconnectedRequest {
                    user_id: user,
                    gateway_id,
                };
                let _ = logic.user_disconnected(tonic::Request::new(req)).await;
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<()>>();
    if tokio::time::timeout(shared.settings.shutdown_grace, goodbye)
        .await
        .is_err()
    {
        tracing::warn!("presence: gave up reporting users offline at shutdown");
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn reconcile<L: PresenceService>(
    logic: &L,
    gateway_id: &str,
    ttl: i64,
    user: String,
    online_now: bool,
    was_online: bool,
) -> Outcome {
    match (online_now, was_online) {
        (true, false) => {
            let req = UserConnectedRequest {
                user_id: user.clone(),
                gateway_id: gateway_id.to_owned(),
                ttl_seconds: ttl,
            };
            match logic.user_connected(tonic::Request::new(req)).await {
                Ok(_) => Outcome::Online(user),
                Err(status) => {
                    tracing::warn!(user_id = %user, cause = %status.message(), "presence: UserConnected failed");
                    Outcome::Failed(user)
                }
            }
        }
        (false, true) => {
            let req = UserDisconnectedRequest {
                user_id: user.clone(),
                gateway_id: gateway_id.to_owned(),
            };
            match logic.user_disconnected(tonic::Request::new(req)).await {
                Ok(_) => Outcome::Offline(user),
                Err(status) => {
                    tracing::warn!(user_id = %user, cause = %status.message(), "presence: UserDisconnected failed");
                    Outcome::Failed(user)
                }
            }
        }
        _ => Outcome::Unchanged(user),
    }
}

async fn refresh_all<L: PresenceService>(
    logic: &L,
    gateway_id: &str,
    reported: &HashSet<String>,
    ttl: i64,
) {
    let users: Vec<String> = reported.iter().cloned().collect();
    for chunk in users.chunks(REFRESH_BATCH) {
        let req = RefreshPresenceRequest {
            gateway_id: gateway_id.to_owned(),
            user_ids: chunk.to_vec(),
            ttl_seconds: ttl,
        };
        if let Err(status) = logic.refresh_presence(tonic::Request::new(req)).await {
            tracing::warn!(cause = %status.message(), users = chunk.len(), "presence: RefreshPresence failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_takes_only_the_waiters_of_the_users_it_takes() {
        let tracker = PresenceTracker::default();
        let (tx, mut rx) = oneshot::channel();
        tracker.mark_and_notify("alice", tx);
        let (dirty, waiters) = tracker.take();
        assert_eq!(dirty, vec!["alice".to_owned()]);
        // Alice's report failed: her waiter is kept for the retry.
        tracker.keep_waiting(waiters);
        // A round with nobody marked neither releases nor drops it.
        let (dirty, waiters) = tracker.take();
        assert!(dirty.is_empty() && waiters.is_empty());
        assert!(matches!(
            rx.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ));
        // The retry marks her again and its round gets the waiter back.
        tracker.mark("alice");
        let (_, mut waiters) = tracker.take();
        release(&mut waiters, "alice");
        assert_eq!(rx.try_recv(), Ok(()));
    }

    #[test]
    fn abandoned_waiters_are_dropped_and_closed_ones_not_kept() {
        let tracker = PresenceTracker::default();
        let (gone_tx, gone_rx) = oneshot::channel();
        let (tx, mut rx) = oneshot::channel();
        tracker.mark_and_notify("alice", gone_tx);
        tracker.mark_and_notify("alice", tx);
        drop(gone_rx); // that upgrade timed out
        let (_, waiters) = tracker.take();
        tracker.keep_waiting(waiters);
        assert_eq!(tracker.lock().waiters["alice"].len(), 1);
        tracker.abandon();
        assert!(matches!(
            rx.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
    }
}
