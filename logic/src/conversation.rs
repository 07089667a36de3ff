//! Conversation actors: one actix actor per active conversation, spread over a fixed set of
//! arbiters (one per core) by a hash of the conversation id.
//!
//! An actor's mailbox is the serialization point of its conversation. Each message it receives
//! is queued; while no batch is in flight, it takes everything queued (up to `max_batch`) and
//! runs the batch: membership, dedup by (sender, client_msg_id) inside the batch, seq
//! reservation, one multi-row save (which also finds keys stored before, and moves the senders'
//! read pointers, in one transaction), acks, delivery. Messages arriving meanwhile
//! wait for the next batch, so a busy conversation stores in large batches and an idle one with
//! no delay.
//!
//! Seqs are reserved a block at a time (at least [`SEQ_BLOCK`]); the ones a batch does not use,
//! and those of a batch whose storing failed for good, are used by the next batches, so no gap
//! appears while the actor lives. An actor idle for `idle_timeout` stops; the next message
//! starts a new one, which restarts repo's counter right after the largest stored seq and so
//! continues the conversation's seq without a gap (the spare seqs of the stopped actor were
//! never stored).
//!
//! Mailboxes are bounded (`mailbox_capacity`): the upstream consumer waits when one is full, so
//! a hot conversation slows its own partition down rather than growing memory.
//!
//! Metrics (`gochat_infra::telemetry`): the live actor count (`gochat_actors{kind=
//! "conversation"}`), per batch the messages queued when it starts (mailbox depth), its size
//! and its handling time, and the messages stored, recognised as duplicates and refused. Each
//! actor also keeps an `ActorLoad` (queued messages and a ten-second rate)
//! that [`Directory::busiest`] reads for `/admin/actors`.

mod load;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use actix::prelude::*;
use dashmap::DashMap;
use gochat_infra::ids::ConversationKind;
use gochat_infra::mq::Bus;
use gochat_infra::telemetry as t;
use gochat_infra::time::now_ms;
use gochat_infra::wire::{
    CONTROL_MEMBERSHIP, DownstreamKind, DownstreamMessage, HEADER_CONTROL, HEADER_SESSION,
    UpstreamMessage,
};
use gochat_infra::{AppError, ErrorCode};
use gochat_proto::repo as rpb;
use metrics::{counter, gauge, histogram};
use tokio::sync::oneshot;
use tonic::Request;

use crate::{Core, RepoApi, repo_err};
use load::ActorLoad;

/// One upstream message for a conversation actor; `done` fires once it is handled (stored and
/// acknowledged, or refused with an error frame).
#[derive(Debug)]
pub struct Incoming {
    /// The message (as the bus handed it over: shared, not copied).
    pub message: Arc<UpstreamMessage>,
    /// Completion signal for the upstream consumer (it commits after this).
    pub done: oneshot::Sender<()>,
}

impl Message for Incoming {
    type Result = ();
}

/// A live actor and its load.
struct Live<R: RepoApi, B: Bus> {
    addr: Addr<ConversationActor<R, B>>,
    load: Arc<ActorLoad>,
}

impl<R: RepoApi, B: Bus> Clone for Live<R, B> {
    fn clone(&self) -> Self {
        Self {
            addr: self.addr.clone(),
            load: Arc::clone(&self.load),
        }
    }
}

/// The load of one conversation, as `/admin/actors` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct ConversationLoad {
    /// The conversation.
    pub conversation_id: String,
    /// Messages its actor accepted and has not finished (waiting plus the batch in flight).
    pub queued: u64,
    /// Messages it finished per second, averaged over the last ten seconds.
    pub messages_per_sec: f64,
}

/// The live Conversation actors of one logic instance.
pub struct Directory<R: RepoApi, B: Bus> {
    actors: DashMap<String, Live<R, B>>,
    arbiters: Vec<ArbiterHandle>,
    /// Kept so the arbiters live as long as the directory.
    _owned: Vec<Arbiter>,
    core: Weak<Core<R, B>>,
}

impl<R: RepoApi, B: Bus> std::fmt::Debug for Directory<R, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Directory")
            .field("actors", &self.actors.len())
            .finish()
    }
}

impl<R: RepoApi, B: Bus> Drop for Directory<R, B> {
    fn drop(&mut self) {
        for a in &self._owned {
            a.stop();
        }
    }
}

fn shard(id: &str, n: usize) -> usize {
    let h = gochat_infra::mq::partition_for(id, u32::try_from(n).unwrap_or(u32::MAX));
    usize::try_from(h).unwrap_or(0)
}

impl<R: RepoApi, B: Bus> Directory<R, B> {
    pub(crate) fn new(arbiters: usize, core: Weak<Core<R, B>>) -> Self {
        let owned: Vec<Arbiter> = (0..arbiters).map(|_| Arbiter::new()).collect();
        Self {
            arbiters: owned.iter().map(Arbiter::handle).collect(),
            _owned: owned,
            actors: DashMap::new(),
            core,
        }
    }

    /// Live actors.
    pub fn len(&self) -> usize {
        self.actors.len()
    }

    /// Whether no actor is live.
    pub fn is_empty(&self) -> bool {
        self.actors.is_empty()
    }

    /// At most `limit` conversations whose actor holds messages or handled some in the last ten
    /// seconds, busiest (by rate, then by queued messages) first.
    pub fn busiest(&self, limit: usize) -> Vec<ConversationLoad> {
        let mut busy: Vec<ConversationLoad> = self
            .actors
            .iter()
            .filter_map(|e| {
                let load = &e.value().load;
                let (queued, messages_per_sec) = (load.queued(), load.per_sec());
                (queued > 0 || messages_per_sec > 0.0).then(|| ConversationLoad {
                    conversation_id: e.key().clone(),
                    queued,
                    messages_per_sec,
                })
            })
            .collect();
        busy.sort_unstable_by(|a, b| {
            b.messages_per_sec
                .total_cmp(&a.messages_per_sec)
                .then(b.queued.cmp(&a.queued))
                .then_with(|| a.conversation_id.cmp(&b.conversation_id))
        });
        busy.truncate(limit);
        busy
    }

    fn get_or_start(
        &self,
        conv: &str,
        core: &Arc<Core<R, B>>,
    ) -> Option<Addr<ConversationActor<R, B>>> {
        if let Some(a) = self.actors.get(conv)
            && a.addr.connected()
        {
            return Some(a.addr.clone());
        }
        let kind = ConversationKind::parse(conv)?;
        let arbiter = &self.arbiters[shard(conv, self.arbiters.len())];
        let entry = self
            .actors
            .entry(conv.to_owned())
            .or_insert_with(|| start_actor(arbiter, conv.to_owned(), kind, core.clone()));
        if entry.addr.connected() {
            return Some(entry.addr.clone());
        }
        let fresh = start_actor(arbiter, conv.to_owned(), kind, core.clone());
        drop(entry);
        self.actors.insert(conv.to_owned(), fresh.clone());
        Some(fresh.addr)
    }

    /// Hands a message to its conversation's actor and waits until it is handled. A message
    /// for an actor that stopped meanwhile goes to a fresh one.
    pub async fn route(&self, message: Arc<UpstreamMessage>) -> Result<(), AppError> {
        let core = self
            .core
            .upgrade()
            .ok_or_else(|| AppError::new(ErrorCode::Unavailable, "logic is shutting down"))?;
        for _ in 0..3 {
            let Some(addr) = self.get_or_start(&message.conversation_id, &core) else {
                return Err(AppError::invalid(format!(
                    "invalid conversation_id {:?}",
                    message.conversation_id
                )));
            };
            let (done, wait) = oneshot::channel();
            match addr
                .send(Incoming {
                    message: Arc::clone(&message),
                    done,
                })
                .await
            {
                Ok(()) => {
                    // The actor drops `done` only if it stops with the message unprocessed.
                    if wait.await.is_ok() {
                        return Ok(());
                    }
                }
                Err(_) => {
                    self.actors
                        .remove_if(&message.conversation_id, |_, a| a.addr == addr);
                }
            }
        }
        Err(AppError::new(
            ErrorCode::Unavailable,
            "conversation actor unavailable",
        ))
    }

    fn forget(&self, conv: &str, addr: &Addr<ConversationActor<R, B>>) {
        self.actors.remove_if(conv, |_, a| a.addr == *addr);
    }
}

fn start_actor<R: RepoApi, B: Bus>(
    arbiter: &ArbiterHandle,
    id: String,
    kind: ConversationKind,
    core: Arc<Core<R, B>>,
) -> Live<R, B> {
    let capacity = core.settings.mailbox_capacity;
    let load = Arc::new(ActorLoad::default());
    let actor_load = Arc::clone(&load);
    let addr = ConversationActor::start_in_arbiter(arbiter, move |ctx| {
        ctx.set_mailbox_capacity(capacity);
        ConversationActor {
            id,
            kind,
            core,
            queued: Vec::new(),
            busy: false,
            last_active: Instant::now(),
            seqs: Seqs::new(),
            members: Members::default(),
            load: actor_load,
            _alive: Alive::new(),
        }
    });
    Live { addr, load }
}

/// Counts a live actor in `gochat_actors{kind="conversation"}` from its creation until it is
/// dropped (also when its arbiter stops under it).
struct Alive;

impl Alive {
    fn new() -> Self {
        gauge!(t::ACTORS, "kind" => "conversation").increment(1);
        Self
    }
}

impl Drop for Alive {
    fn drop(&mut self) {
        gauge!(t::ACTORS, "kind" => "conversation").decrement(1);
    }
}

/// The actor owning one conversation.
pub struct ConversationActor<R: RepoApi, B: Bus> {
    /// The conversation.
    id: String,
    /// What it is.
    kind: ConversationKind,
    core: Arc<Core<R, B>>,
    /// Messages waiting for the next batch.
    queued: Vec<Incoming>,
    /// A batch is in flight.
    busy: bool,
    /// Last time a batch finished.
    last_active: Instant,
    /// Seqs reserved but not stored yet, and whether the counter must be re-read from storage.
    seqs: Seqs,
    /// Senders known to be members, and when repo said so.
    members: Members,
    /// What `/admin/actors` reads about this actor.
    load: Arc<ActorLoad>,
    /// Keeps the actor counted while it lives.
    _alive: Alive,
}

impl<R: RepoApi, B: Bus> std::fmt::Debug for ConversationActor<R, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConversationActor")
            .field("id", &self.id)
            .field("queued", &self.queued.len())
            .field("busy", &self.busy)
            .finish()
    }
}

impl<R: RepoApi, B: Bus> Actor for ConversationActor<R, B> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let check = (self.core.settings.idle_timeout / 4).max(Duration::from_millis(100));
        ctx.run_interval(check, |act, ctx| {
            if !act.busy
                && act.queued.is_empty()
                && act.last_active.elapsed() >= act.core.settings.idle_timeout
            {
                act.core.directory.forget(&act.id, &ctx.address());
                ctx.stop();
            }
        });
    }
}

impl<R: RepoApi, B: Bus> Handler<Incoming> for ConversationActor<R, B> {
    type Result = ();

    fn handle(&mut self, msg: Incoming, ctx: &mut Self::Context) {
        self.load.accepted();
        self.queued.push(msg);
        if !self.busy {
            self.run_batch(ctx);
        }
    }
}

impl<R: RepoApi, B: Bus> ConversationActor<R, B> {
    fn run_batch(&mut self, ctx: &mut Context<Self>) {
        let take = self.queued.len().min(self.core.settings.max_batch.max(1));
        if take == 0 {
            return;
        }
        histogram!(t::MAILBOX_DEPTH, "kind" => "conversation").record(self.queued.len() as f64);
        histogram!(t::BATCH_SIZE, "kind" => "conversation").record(take as f64);
        let batch: Vec<Incoming> = self.queued.drain(..take).collect();
        self.busy = true;
        let core = self.core.clone();
        let conv = self.id.clone();
        let kind = self.kind;
        let seqs = std::mem::take(&mut self.seqs);
        let members = std::mem::take(&mut self.members);
        let load = Arc::clone(&self.load);
        let started = Instant::now();
        let fut = async move {
            let (messages, done): (Vec<Arc<UpstreamMessage>>, Vec<oneshot::Sender<()>>) =
                batch.into_iter().map(|i| (i.message, i.done)).unzip();
            let state = process(&core, &conv, kind, messages, (seqs, members)).await;
            for d in done {
                let _ = d.send(());
            }
            load.finished(take);
            histogram!(t::HANDLING_SECONDS, "kind" => "conversation")
                .record(started.elapsed().as_secs_f64());
            state
        };
        ctx.spawn(fut.into_actor(self).map(|(seqs, members), act, ctx| {
            act.seqs = seqs;
            act.members = members;
            act.busy = false;
            act.last_active = Instant::now();
            if !act.queued.is_empty() {
                act.run_batch(ctx);
            }
        }));
    }
}

/// A message of the batch on its way to storage.
struct Pending {
    up: Arc<UpstreamMessage>,
    sender: String,
    session: String,
}

/// Handles one batch; returns the seq state and the known members for the next one.
async fn process<R: RepoApi, B: Bus>(
    core: &Core<R, B>,
    conv: &str,
    kind: ConversationKind,
    messages: Vec<Arc<UpstreamMessage>>,
    (mut seqs, mut members): (Seqs, Members),
) -> (Seqs, Members) {
    // 0. Control records: a member left, so ask repo about them again. Messages of this batch
    //    are checked after that, whatever their order (each is checked against repo's state
    //    now, as without the memo).
    let (controls, messages): (Vec<Arc<UpstreamMessage>>, Vec<Arc<UpstreamMessage>>) = messages
        .into_iter()
        .partition(|m| m.headers.contains_key(HEADER_CONTROL));
    for c in &controls {
        if c.headers.get(HEADER_CONTROL).map(String::as_str) == Some(CONTROL_MEMBERSHIP) {
            members.forget(&c.user_id);
        }
    }
    members.prune(core.settings.membership_ttl);
    if messages.is_empty() {
        return (seqs, members);
    }

    // 1. Validate, and check membership once per sender (repo is asked only about senders not
    //    known as members within `membership_ttl`).
    let mut valid = Vec::with_capacity(messages.len());
    let mut membership: HashMap<String, Result<i64, AppError>> = HashMap::new();
    for up in messages {
        let session = up.headers.get(HEADER_SESSION).cloned().unwrap_or_default();
        if let Err(e) = validate(core, &up) {
            core.send_error(
                &up.gateway_id,
                &session,
                &up.trace_id,
                conv,
                &up.client_msg_id,
                &e,
            )
            .await;
            continue;
        }
        let sender = up.user_id.clone();
        if !membership.contains_key(&sender) {
            let m = match members.get(&sender, core.settings.membership_ttl) {
                Some(count) => Ok(count),
                None => {
                    let m = core.check_member(&sender, conv).await;
                    if let Ok(count) = m {
                        members.remember(&sender, count);
                    }
                    m
                }
            };
            membership.insert(sender.clone(), m);
        }
        match membership.get(&sender) {
            Some(Ok(_)) => valid.push(Pending {
                up,
                sender,
                session,
            }),
            Some(Err(e)) => {
                core.send_error(
                    &up.gateway_id,
                    &session,
                    &up.trace_id,
                    conv,
                    &up.client_msg_id,
                    e,
                )
                .await;
            }
            None => {}
        }
    }
    let member_count = membership
        .values()
        .find_map(|m| m.as_ref().ok().copied())
        .unwrap_or(0);

    // 2. Dedup inside the batch: a key seen earlier in it gets the ack of that earlier message.
    //    Keys stored before are found by SaveMessages, in the same transaction that stores the
    //    rest (no lookup per message beforehand): it answers with the original, and new
    //    messages take the lowest of the batch's seqs, so the seqs a duplicate leaves unused
    //    are the highest ones and go back to `seqs` for the next batch, without a hole.
    let mut fresh: Vec<Pending> = Vec::with_capacity(valid.len());
    let mut repeats: Vec<(Pending, usize)> = Vec::new();
    let mut seen: HashMap<(String, String), usize> = HashMap::new();
    for p in valid {
        let key = (p.sender.clone(), p.up.client_msg_id.clone());
        if let Some(&i) = seen.get(&key) {
            repeats.push((p, i));
            continue;
        }
        seen.insert(key, fresh.len());
        fresh.push(p);
    }
    let retries = repeats.len();

    // 3. Seqs, ids, storage.
    let stored = match store(core, conv, &fresh, &mut seqs).await {
        Ok(stored) => stored,
        Err(e) => {
            tracing::error!(cause = %e, conv, "storing a batch failed; senders told to retry");
            for p in fresh.iter().chain(repeats.iter().map(|(p, _)| p)) {
                core.send_error(
                    &p.up.gateway_id,
                    &p.session,
                    &p.up.trace_id,
                    conv,
                    &p.up.client_msg_id,
                    &e,
                )
                .await;
            }
            return (seqs, members);
        }
    };

    let new = stored.iter().filter(|m| !m.duplicate).count();
    let duplicates = retries + (stored.len() - new);
    counter!(t::LOGIC_MESSAGES_STORED).increment(new as u64);
    if duplicates > 0 {
        counter!(t::LOGIC_MESSAGES_DUPLICATE).increment(duplicates as u64);
    }

    // 4. Only after storage: in seq order, each new message goes to its recipients and then
    //    its sender gets the ack. Downstream records are keyed by conversation, so a session
    //    sees one conversation's seqs strictly increasing across `new-message` and
    //    `message-ack` frames (an ack of N never precedes the new-message of N-1 from the same
    //    batch). Through the task service (big groups) the deliveries take another path and
    //    may come after the ack.
    let mut route = if new > 0 {
        match core.route(kind, member_count, conv).await {
            Ok(route) => Some(route),
            Err(e) => {
                // Stored and acknowledged: recipients will find the messages by seq when they
                // pull.
                tracing::error!(cause = %e, conv, "delivery failed after storage");
                None
            }
        }
    } else {
        None
    };
    for (p, m) in fresh.iter().zip(&stored) {
        if !m.duplicate
            && let Some(r) = &route
        {
            let record = DownstreamMessage {
                trace_id: p.up.trace_id.clone(),
                message_id: m.id.clone(),
                conversation_id: conv.to_owned(),
                sender_id: p.sender.clone(),
                message_type: m.message_type,
                content: m.content.clone(),
                seq_id: m.seq_id,
                timestamp: m.created_at,
                exclude_session: p.session.clone(),
                kind: DownstreamKind::NewMessage,
                ..Default::default()
            };
            if let Err(e) = core.deliver(r, record).await {
                // The rest of the batch is not delivered either: the bus is failing.
                tracing::error!(cause = %e, conv, "delivery failed after storage");
                route = None;
            }
        }
        core.ack(p, &m.id, m.seq_id, conv).await;
    }
    for (p, i) in &repeats {
        if let Some(m) = stored.get(*i) {
            core.ack(p, &m.id, m.seq_id, conv).await;
        }
    }
    (seqs, members)
}

/// What was stored for one fresh message.
struct Stored {
    id: String,
    seq_id: i64,
    message_type: i32,
    content: String,
    created_at: i64,
    duplicate: bool,
}

/// Senders an actor knows to be members of its conversation, with the member count repo gave
/// and when. Only positive answers are kept (a refused sender is asked about again), for at
/// most `membership_ttl`; a control record forgets a user at once.
#[derive(Debug, Default)]
pub(crate) struct Members {
    known: HashMap<String, (i64, Instant)>,
}

impl Members {
    /// Entries kept before expired ones are swept.
    const SWEEP_ABOVE: usize = 1024;

    fn get(&self, user: &str, ttl: Duration) -> Option<i64> {
        self.known
            .get(user)
            .filter(|(_, at)| at.elapsed() < ttl)
            .map(|(count, _)| *count)
    }

    fn remember(&mut self, user: &str, count: i64) {
        self.known.insert(user.to_owned(), (count, Instant::now()));
    }

    fn forget(&mut self, user: &str) {
        self.known.remove(user);
    }

    /// Drops expired entries once there are many (a big group's actor sees many senders).
    fn prune(&mut self, ttl: Duration) {
        if self.known.len() > Self::SWEEP_ABOVE {
            self.known.retain(|_, (_, at)| at.elapsed() < ttl);
        }
    }
}

/// The seq state an actor keeps between batches.
///
/// Seqs come from repo's counter in blocks of at least [`SEQ_BLOCK`]. Two things would leave a
/// gap in a conversation's seqs: seqs reserved but never stored, and a counter that moved
/// without this actor knowing the outcome (a reservation whose answer was lost, a crashed
/// previous owner).
/// Reserved-but-unstored seqs are kept in `spare` and used first by the next batch; and whenever
/// the counter's state is unknown (a new actor, which may be taking over from a crashed or
/// rebalanced owner; a failed reservation; a seq conflict) the next reservation asks repo to
/// restart the counter right after the largest stored seq (`from_stored`). Storage's unique
/// (conversation, seq) index turns any overlap with another owner into a conflict, never into
/// two messages with one seq.
#[derive(Debug)]
pub(crate) struct Seqs {
    /// Reserved, not stored; ascending.
    spare: Vec<i64>,
    /// The next reservation restarts the counter from storage.
    resync: bool,
}

impl Seqs {
    /// The state of a new actor: nothing reserved, counter unknown.
    pub(crate) fn new() -> Self {
        Self {
            spare: Vec::new(),
            resync: true,
        }
    }

    /// Gives unstored seqs back for the next batch.
    fn give_back(&mut self, seqs: impl IntoIterator<Item = i64>) {
        self.spare.extend(seqs);
        self.spare.sort_unstable();
        self.spare.dedup();
    }
}

impl Default for Seqs {
    fn default() -> Self {
        Self::new()
    }
}

/// Reserves seqs (spare ones first), builds the rows and saves them, retrying transient
/// failures with the spec's backoff and a seq conflict with fresh seqs.
async fn store<R: RepoApi, B: Bus>(
    core: &Core<R, B>,
    conv: &str,
    fresh: &[Pending],
    state: &mut Seqs,
) -> Result<Vec<Stored>, AppError> {
    if fresh.is_empty() {
        return Ok(Vec::new());
    }
    let now = now_ms();
    // Ids are fixed across attempts: a save that committed but whose answer was lost is found
    // again by id on the next attempt (a "duplicate" of our own message, which is not one).
    let ids: Vec<i64> = fresh.iter().map(|_| core.ids.next_id()).collect();
    let mut delay = Duration::from_millis(100);
    let mut last_err = AppError::internal("not attempted");
    for attempt in 0..4 {
        if attempt > 0 {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
        let seqs = match take_seqs(core, conv, fresh.len(), state).await {
            Ok(s) => s,
            Err(e) => {
                last_err = e;
                continue;
            }
        };
        let request = rpb::SaveMessagesRequest {
            messages: fresh
                .iter()
                .zip(&seqs)
                .zip(&ids)
                .map(|((p, seq), id)| rpb::SaveMessageRequest {
                    message_id: id.to_string(),
                    conversation_id: conv.to_owned(),
                    sender_id: p.sender.clone(),
                    message_type: p.up.message_type,
                    content: p.up.content.clone(),
                    seq_id: *seq,
                    client_msg_id: p.up.client_msg_id.clone(),
                    created_at: now,
                })
                .collect(),
            // Senders have read what they sent: their read pointers move in the same transaction.
            mark_read_by_sender: true,
        };
        match core.repo.save_messages(Request::new(request)).await {
            Ok(r) => {
                let results = r.into_inner().results;
                let stored: Vec<Stored> = results
                    .into_iter()
                    .zip(&ids)
                    .map(|(r, id)| {
                        let m = r.message.unwrap_or_default();
                        // Our own message, stored by an earlier attempt, is new, not a duplicate.
                        let duplicate = r.duplicate && m.id != id.to_string();
                        Stored {
                            id: m.id,
                            seq_id: m.seq_id,
                            message_type: m.message_type,
                            content: m.content,
                            created_at: m.created_at,
                            duplicate,
                        }
                    })
                    .collect();
                let used: HashSet<i64> = stored
                    .iter()
                    .filter(|m| !m.duplicate)
                    .map(|m| m.seq_id)
                    .collect();
                // Seqs of messages that turned out to be duplicates were not used: keep them.
                state.give_back(seqs.into_iter().filter(|s| !used.contains(s)));
                return Ok(stored);
            }
            Err(status) => {
                let e = repo_err(status);
                if e.code == ErrorCode::SeqConflict {
                    // Another owner (a rebalance) or a stale counter: those seqs are taken, and
                    // the counter must restart from what is stored.
                    state.spare.clear();
                    state.resync = true;
                } else {
                    state.give_back(seqs);
                }
                if matches!(
                    e.code,
                    ErrorCode::InvalidParameter | ErrorCode::InvalidMessage
                ) {
                    return Err(e);
                }
                last_err = e;
            }
        }
    }
    Err(last_err)
}

/// Seqs reserved at least at once: a conversation with a message every few milliseconds, in
/// batches of one or two, would otherwise call `GenerateSeqID` for every batch (2.7 % of the
/// server's CPU in a chat run, docs/benchmarks.md). What is left over stays spare (see
/// [`Seqs`]).
pub(crate) const SEQ_BLOCK: usize = 16;

/// `n` seqs: spare ones first, then a reservation from repo (at least [`SEQ_BLOCK`], the rest
/// kept spare; restarting the counter from storage when its state is unknown).
async fn take_seqs<R: RepoApi, B: Bus>(
    core: &Core<R, B>,
    conv: &str,
    n: usize,
    state: &mut Seqs,
) -> Result<Vec<i64>, AppError> {
    if state.resync {
        // Whatever was spare lies above the stored maximum and is handed out again.
        state.spare.clear();
    }
    let from_spare = n.min(state.spare.len());
    let mut seqs: Vec<i64> = state.spare.drain(..from_spare).collect();
    let need = n - from_spare;
    if need > 0 {
        let r = core
            .repo
            .generate_seq_id(Request::new(rpb::GenerateSeqIdRequest {
                conversation_id: conv.to_owned(),
                count: i64::try_from(need.max(SEQ_BLOCK)).unwrap_or(i64::MAX),
                from_stored: state.resync,
            }))
            .await;
        match r {
            Ok(r) => {
                let r = r.into_inner();
                let mut reserved = r.seq_id..=r.end_seq_id;
                seqs.extend(reserved.by_ref().take(need));
                // Ascending and above every seq handed out before: spare stays sorted.
                state.spare.extend(reserved);
                state.resync = false;
            }
            Err(status) => {
                state.give_back(seqs);
                // The counter may have moved without us seeing the answer.
                state.resync = true;
                return Err(repo_err(status));
            }
        }
    }
    Ok(seqs)
}

fn validate<R: RepoApi, B: Bus>(core: &Core<R, B>, up: &UpstreamMessage) -> Result<(), AppError> {
    if !(1..=4).contains(&up.message_type) {
        return Err(AppError::new(
            ErrorCode::InvalidMessage,
            "message_type must be 1..=4",
        ));
    }
    let chars = up.content.chars().count();
    if chars == 0 || chars > core.settings.max_content_chars {
        return Err(AppError::new(
            ErrorCode::InvalidMessage,
            format!(
                "content must be 1 to {} characters",
                core.settings.max_content_chars
            ),
        ));
    }
    if up.client_msg_id.is_empty() || up.client_msg_id.len() > 64 {
        return Err(AppError::invalid("client_msg_id must be 1 to 64 bytes"));
    }
    if gochat_infra::ids::parse_id(&up.user_id).is_none() {
        return Err(AppError::invalid("invalid sender"));
    }
    Ok(())
}

impl<R: RepoApi, B: Bus> Core<R, B> {
    /// Membership of a sender; Ok(member count) or the error to send back.
    async fn check_member(&self, user: &str, conv: &str) -> Result<i64, AppError> {
        let r = self
            .repo
            .check_membership(Request::new(rpb::CheckMembershipRequest {
                user_id: user.to_owned(),
                conversation_id: conv.to_owned(),
            }))
            .await
            .map_err(repo_err)?
            .into_inner();
        if r.is_member {
            return Ok(i64::from(r.member_count));
        }
        Err(match ConversationKind::parse(conv) {
            Some(ConversationKind::Group(_)) => AppError::new(
                ErrorCode::NotGroupMember,
                "you are not a member of this group",
            ),
            _ => AppError::new(
                ErrorCode::Forbidden,
                "you are not part of this conversation",
            ),
        })
    }

    async fn ack(&self, p: &Pending, message_id: &str, seq_id: i64, conv: &str) {
        let record = DownstreamMessage {
            trace_id: p.up.trace_id.clone(),
            message_id: message_id.to_owned(),
            conversation_id: conv.to_owned(),
            sender_id: p.sender.clone(),
            seq_id,
            timestamp: now_ms(),
            kind: DownstreamKind::MessageAck,
            target_session: p.session.clone(),
            client_msg_id: p.up.client_msg_id.clone(),
            ..Default::default()
        };
        if let Err(e) = self.publish(&p.up.gateway_id, record).await {
            tracing::warn!(cause = %e, conv, "could not send an ack");
        }
    }
}
