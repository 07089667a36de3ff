//! The Session actor: one per WebSocket connection.
//!
//! ```text
//!  socket ──► WsReader ──(ctx.add_stream)──► Session actor ──► publisher task ──► im-upstream-topic
//!  worker's hub (`hub`) ──local push──► inbox ──(Flusher)──────────┘   │
//!                                                                          ▼ send
//!                                                WsWriter ──(one vectored write)──► socket
//!                                    (backlog, bounded, while the socket is full)
//! ```
//!
//! The actor owns everything that is per-connection state: the socket (its [`WsReader`] as a
//! stream of the context, its [`WsWriter`] as a field; see `wsio`), when a frame last came (for
//! the registry's heartbeat sweep), the abuse count, and the last seq delivered per
//! conversation (so redelivered records are dropped). It never awaits: a frame it produces or a
//! delivery it accepts goes into the session's backlog, which a [`Flusher`] polled by the
//! actor's own context writes after the handlers of each pass, all of the pass's frames in one
//! vectored write, and again whenever the socket takes more. No other task writes. The same
//! `Flusher` takes the deliveries from the session's inbox (filled by the hub of its worker
//! thread, on the same thread, see `hub`), right before it writes
//! (not a stream of the context of its own: one thing less to poll at each wake of each of
//! 10,000 sessions in a fan-out). When frames held back by a full socket reach
//! `outbound_queue` the client is not reading fast enough and the session is closed with 1013;
//! nothing is ever buffered without bound.
//!
//! Opening: the writer holds the `101` response until the user's presence is reported (at most
//! `presence_wait`), so from the moment a client sees its connection open every message stored
//! for it is routed here. Frames produced meanwhile wait in the backlog behind the `101`.
//! Sends are published in order by a per-session publisher task behind another bounded queue,
//! so a slow bus never blocks deliveries; both are made at the session's first send, so a
//! connection that only listens costs neither.
//!
//! Closing: the actor hands the writer, with the backlog when it is to be flushed first (and
//! then with the deliveries still in its queue, as far as `outbound_queue` allows), to
//! a short-lived task that sends the close frame within `close_grace` and drops the socket, then
//! stops. On stop the session leaves the registry and its user is marked for presence
//! reporting.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use actix::fut::{ActorFuture, ActorFutureExt};
use actix::{Actor, ActorContext, Addr, AsyncContext, Context, Handler, Message, StreamHandler};
use actix_web::web::Bytes;
use actix_ws::{AggregatedMessage, CloseCode, CloseReason, ProtocolError};
use bytestring::ByteString;
use gochat_infra::ErrorCode;
use gochat_infra::mq::{Payload, Producer};
use gochat_infra::time::now_ms;
use gochat_infra::wire::{HEADER_SESSION, UPSTREAM_TOPIC, UpstreamMessage};
use tokio::sync::{mpsc, oneshot};

use crate::frames::{
    self, ClientFrame, Empty, ErrorData, FrameError, SendMessage, parse_client_frame, server_frame,
};
use crate::hub::{Inbox, LocalHub};
use crate::registry::{SessionHandle, Signals};
use crate::shared::{ClosingSocket, Shared};
use crate::stats::{
    CAUSE_CLIENT, CloseCause, FRAME_BINARY, FRAME_CLOSE, FRAME_INVALID, FRAME_WS_PING,
    FRAME_WS_PONG, GatewayStats,
};
use crate::wsio::{self, Closed, OpCode, WsReader, WsWriter};

/// Conversations whose last delivered seq a session remembers; past this the memory is reset
/// (duplicate suppression is best effort beyond it; clients dedupe by seq anyway).
const MAX_TRACKED_CONVERSATIONS: usize = 4_096;

/// Header carrying the trace id on bus records.
pub(crate) const HEADER_TRACE: &str = "trace_id";

/// A frame for one or many sessions, serialized once. Queued to sessions as an `Arc`: a
/// session's delivery queue allocates room for 32 items when it is made, 8 bytes each rather
/// than this struct's 72.
#[derive(Debug, Clone)]
pub(crate) struct Delivery {
    /// The envelope's type (a `frames` constant), for metrics.
    pub kind: &'static str,
    /// The whole envelope (shared, not copied, by the sessions it goes to).
    pub text: ByteString,
    /// For `new-message`: (conversation, seq), for duplicate suppression.
    pub seq: Option<(Arc<str>, i64)>,
}

impl Delivery {
    /// The frame for one session's backlog (the text shared, not copied).
    fn outbound(&self) -> Outbound {
        Outbound::Text(self.text.clone(), self.kind)
    }
}

/// Close this session (sent by the registry: too slow, or shutdown).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct CloseSession {
    pub cause: CloseCause,
    pub reason: String,
}

/// The publisher could not hand a send to the bus.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct PublishFailed {
    pub client_msg_id: String,
    pub message: String,
}

/// A frame for the socket.
#[derive(Debug)]
pub(crate) enum Outbound {
    /// An envelope and its type.
    Text(ByteString, &'static str),
    /// A WebSocket-level pong.
    Pong(Bytes),
}

impl Outbound {
    /// The frame's opcode and payload.
    fn frame(&self) -> (OpCode, &[u8]) {
        match self {
            Self::Text(text, _) => (OpCode::Text, text.as_bytes()),
            Self::Pong(payload) => (OpCode::Pong, payload),
        }
    }

    /// The `type` it is counted as.
    fn kind(&self) -> &'static str {
        match self {
            Self::Text(_, kind) => kind,
            Self::Pong(_) => FRAME_WS_PONG,
        }
    }
}

/// One WebSocket connection.
pub(crate) struct Session {
    id: Arc<str>,
    user_id: Arc<str>,
    shared: Arc<Shared>,
    /// The sending half of the socket (taken when closing).
    ws: Option<WsWriter>,
    /// Frames waiting for the socket, oldest first (at most `outbound_queue`).
    backlog: VecDeque<Outbound>,
    /// `backlog.len()` for the registry's view of slow sessions, and when a frame last came.
    signals: Arc<Signals>,
    /// The [`Flusher`]'s waker while the backlog is empty.
    flush_waker: Option<Waker>,
    /// Sends for the publisher (bounded), made with the publisher at the first send: a
    /// connection that only listens has neither. Each item is an `Arc`: a channel allocates
    /// room for 32 items when it is made, and 32 unboxed messages would cost about 6 KiB. The
    /// `Arc` also goes onto the in-process bus as it is (`Payload::shared`).
    upstream: Option<mpsc::Sender<Arc<UpstreamMessage>>>,
    /// Starts a publisher task for this session.
    start_publisher: StartPublisher,
    /// Deliveries, queued by the hub of this worker thread and emptied by the [`Flusher`]
    /// before each write (at most `outbound_queue`).
    inbox: Rc<Inbox>,
    /// That hub and this session's slot in it, from `started` to `stopped`.
    hub: Option<(Rc<LocalHub>, u32)>,
    /// How long the `101` may wait for this user's presence report (zero: not at all).
    presence_wait: Duration,
    abuse_count: u32,
    abuse_since: Instant,
    /// Last seq delivered per conversation.
    delivered: HashMap<Arc<str>, i64>,
    closing: bool,
    /// Why the gateway closed it (`None`: the client did), for the disconnect metric.
    cause: Option<CloseCause>,
    span: tracing::Span,
}

/// Everything [`start`] needs.
pub(crate) struct SessionStart {
    pub shared: Arc<Shared>,
    pub user_id: String,
    /// The socket, holding the `101` response head until the writer opens.
    pub ws: WsWriter,
    pub stream: WsReader,
    pub start_publisher: StartPublisher,
    pub trace_id: String,
}

/// Starts a session's publisher task: the receiving end of its send queue, and the session
/// (told when a send fails). One per worker, shared by its sessions.
pub(crate) type StartPublisher = Rc<dyn Fn(mpsc::Receiver<Arc<UpstreamMessage>>, Addr<Session>)>;

/// A [`StartPublisher`] that publishes to `bus`.
pub(crate) fn publisher_starter<P: Producer + Clone>(
    bus: P,
    stats: Arc<GatewayStats>,
) -> StartPublisher {
    Rc::new(move |rx, session| {
        actix_rt::spawn(publish_loop(bus.clone(), rx, session, Arc::clone(&stats)));
    })
}

/// Starts the Session actor (on the current arbiter).
pub(crate) fn start(params: SessionStart) -> Addr<Session> {
    let SessionStart {
        shared,
        user_id,
        ws,
        stream,
        start_publisher,
        trace_id,
    } = params;
    let queue = shared.settings.outbound_queue.max(1);
    let id: Arc<str> = shared.next_session_id().into();
    let span =
        tracing::info_span!("ws", session_id = %id, user_id = %user_id, trace_id = %trace_id);

    let last_seen = shared.registry.clock_ms();
    let presence_wait = shared.settings.presence_wait;
    Session::create(move |ctx| {
        ctx.add_stream(stream);
        let signals = Arc::new(Signals::new(last_seen));
        Session {
            id,
            user_id: user_id.into(),
            shared,
            ws: Some(ws),
            backlog: VecDeque::new(),
            inbox: Rc::new(Inbox::new(queue, Arc::clone(&signals))),
            hub: None,
            signals,
            flush_waker: None,
            upstream: None,
            start_publisher,
            presence_wait,
            abuse_count: 0,
            abuse_since: Instant::now(),
            delivered: HashMap::new(),
            closing: false,
            cause: None,
            span,
        }
    })
}

impl Actor for Session {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let _g = self.span.clone().entered();
        if self.hub.is_none() {
            let hub = LocalHub::current(&self.shared.registry);
            let slot = hub.insert(Arc::clone(&self.id), Rc::clone(&self.inbox));
            let handle = SessionHandle::new(
                Arc::clone(&self.id),
                Arc::clone(&self.user_id),
                (hub.port(), slot),
                Arc::clone(&self.signals),
                ctx.address(),
            );
            self.hub = Some((hub, slot));
            let sessions = self.shared.registry.insert(handle);
            self.shared
                .stats
                .user_sessions_changed(sessions.saturating_sub(1), sessions);
            if self.presence_wait.is_zero() {
                self.shared.presence.mark(&self.user_id);
                self.open();
            } else {
                let (ready_tx, ready_rx) = oneshot::channel();
                self.shared
                    .presence
                    .mark_and_notify(&self.user_id, ready_tx);
                let started = Instant::now();
                let wait = tokio::time::timeout(self.presence_wait, ready_rx);
                ctx.spawn(actix::fut::wrap_future(wait).map(move |res, act: &mut Self, _| {
                    // Reported only when the waiter is released: a timeout, or a dropped
                    // waiter (the reporter stopped), opens the connection unreported.
                    let reported = matches!(res, Ok(Ok(())));
                    act.shared.stats.presence_waited(started.elapsed(), reported);
                    if !reported {
                        tracing::warn!(
                            waited_ms = started.elapsed().as_millis() as u64,
                            "presence not reported; upgrading anyway (messages stored meanwhile \
                             reach this connection only by resync)"
                        );
                    }
                    act.open();
                }));
            }
            tracing::debug!(first_local_session = sessions == 1, "session opened");
        }
        self.shared.stats.session_opened();
        ctx.spawn(Flusher);
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        let _g = self.span.clone().entered();
        let (before, after) = self.shared.registry.remove(&self.user_id, &self.id);
        if let Some((hub, slot)) = self.hub.take() {
            hub.remove(slot);
        }
        self.inbox.close();
        self.shared.stats.user_sessions_changed(before, after);
        let last = before > 0 && after == 0;
        self.shared.presence.mark(&self.user_id);
        let cause = self.cause.map_or(CAUSE_CLIENT, CloseCause::as_str);
        self.shared.stats.session_closed(cause);
        tracing::debug!(last_local_session = last, "session closed");
    }
}

impl Session {
    /// Sends the `101` (held by the writer until now) and whatever waited behind it.
    fn open(&mut self) {
        if let Some(ws) = self.ws.as_mut() {
            ws.open();
            if let Some(waker) = self.flush_waker.take() {
                waker.wake();
            }
        }
    }

    /// Ends the session: the writer flushes (if `drain`) and sends the close frame.
    fn close(
        &mut self,
        ctx: &mut Context<Self>,
        code: CloseCode,
        reason: &str,
        cause: Option<CloseCause>,
        drain: bool,
    ) {
        let reason = CloseReason {
            code,
            description: (!reason.is_empty()).then(|| reason.to_owned()),
        };
        self.close_with(ctx, Some(reason), cause, drain);
    }

    fn close_with(
        &mut self,
        ctx: &mut Context<Self>,
        reason: Option<CloseReason>,
        cause: Option<CloseCause>,
        drain: bool,
    ) {
        if self.closing {
            return;
        }
        self.closing = true;
        self.cause = cause;
        if let Some(cause) = cause {
            self.shared.stats.closed(cause);
            tracing::info!(?cause, reason = ?reason, "closing session");
        }
        if let Some(ws) = self.ws.take() {
            let backlog = if drain {
                // What the downstream consumer already offered goes out too, behind what
                // waited, as far as the backlog's bound allows (the client resyncs the rest):
                // also what still waits in the hub's queue.
                if let Some((hub, _)) = &self.hub {
                    hub.run_queued();
                }
                let limit = self.shared.settings.outbound_queue.max(1);
                while self.backlog.len() < limit {
                    let Some(delivery) = self.inbox.take() else {
                        break;
                    };
                    if self.fresh(&delivery) {
                        self.backlog.push_back(delivery.outbound());
                    }
                }
                std::mem::take(&mut self.backlog)
            } else {
                VecDeque::new()
            };
            // Counted from here, so shutdown cannot miss it.
            let closing = self.shared.socket_closing();
            actix_rt::spawn(close_socket(ws, backlog, reason, closing));
        }
        self.backlog.clear();
        self.signals.backlog.store(0, Ordering::Relaxed);
        self.inbox.close();
        ctx.stop();
    }

    /// The socket failed (the connection is gone): nothing more can be written.
    fn gone(&mut self, ctx: &mut Context<Self>) {
        self.closing = true;
        self.ws = None;
        ctx.stop();
    }

    /// Writes a frame, or queues it behind the ones waiting; a full backlog closes the session
    /// as too slow.
    fn push(&mut self, ctx: &mut Context<Self>, out: Outbound) {
        if self.closing {
            return;
        }
        let Some(ws) = self.ws.as_ref() else {
            return;
        };
        // Only frames held back count against the limit (those queued in one pass of the actor
        // go out together at its end): held for the `101`, which waits for presence, or held
        // back by the client, whose socket is full.
        let held = !ws.is_open();
        let slow = !held && !ws.is_idle();
        if (held || slow) && self.backlog.len() >= self.shared.settings.outbound_queue.max(1) {
            if held {
                // The client has not seen its connection open yet, so it cannot be slow. A
                // busy conversation (the world room) may still fill the queue meanwhile: drop
                // what does not fit rather than the connection. Such frames are messages
                // stored (or presence changes made) before the client sees the `101`: its
                // resync finds the messages (the seq gap after the first new-message tells
                // it to).
                self.shared.stats.held_dropped();
                return;
            }
            return self.close(
                ctx,
                CloseCode::Again,
                "client too slow: outbound queue full",
                Some(CloseCause::Slow),
                false,
            );
        }
        // Frames held back by a full socket count as depth (as do the session's slow-session
        // figures); frames queued in this pass of the actor go out together at its end.
        self.shared
            .stats
            .outbound_depth(if slow { self.backlog.len() + 1 } else { 0 });
        self.backlog.push_back(out);
        if slow {
            self.signals
                .backlog
                .store(self.backlog.len(), Ordering::Relaxed);
        }
        if let Some(waker) = self.flush_waker.take() {
            waker.wake();
        }
    }

    /// Keeps the flusher's waker (for `push` and `open`) and parks it.
    fn park_flusher(&mut self, task: &std::task::Context<'_>) -> Poll<()> {
        if !self
            .flush_waker
            .as_ref()
            .is_some_and(|w| w.will_wake(task.waker()))
        {
            self.flush_waker = Some(task.waker().clone());
        }
        Poll::Pending
    }

    /// Writes what the socket did not take yet, then the backlog, up to [`wsio::MAX_BATCH`]
    /// frames per vectored write, while the socket takes them. Polled by the actor's own
    /// context after its handlers, so every frame queued in one pass of the actor goes out in
    /// one system call.
    fn flush(&mut self, ctx: &mut Context<Self>, task: &mut std::task::Context<'_>) -> Poll<()> {
        // A delivery found the inbox full: the client does not keep up.
        if self.inbox.overflowed() && !self.closing {
            self.close(
                ctx,
                CloseCode::Again,
                "client too slow: delivery queue full",
                Some(CloseCause::Slow),
                false,
            );
            return Poll::Ready(());
        }
        // The deliveries offered since the last poll (the inbox wakes this context). Not
        // timed: a delivery is a queue push (well under the histogram's first bucket), and
        // two clock reads and a histogram sample per delivery were a tenth of the world room
        // fan-out's CPU outside the socket writes. Its waiting shows in the outbound depth.
        while !self.closing {
            match self.inbox.take() {
                Some(delivery) => self.deliver(ctx, delivery),
                None => {
                    self.inbox.wake_with(task.waker());
                    break;
                }
            }
        }
        loop {
            let Some(ws) = self.ws.as_mut() else {
                // Closing: the socket went to `close_socket`, or it failed.
                return Poll::Ready(());
            };
            match ws.poll_flush(task) {
                // The socket is full (its readiness wakes this context when it has room), or
                // the writer is not open yet (`open` wakes it).
                Poll::Pending => return self.park_flusher(task),
                Poll::Ready(Err(Closed)) => {
                    self.gone(ctx);
                    return Poll::Ready(());
                }
                Poll::Ready(Ok(())) => {}
            }
            if self.backlog.is_empty() {
                self.signals.backlog.store(0, Ordering::Relaxed);
                return self.park_flusher(task);
            }
            let n = self.backlog.len().min(wsio::MAX_BATCH);
            let sent = ws.send_batch(self.backlog.iter().take(n).map(Outbound::frame));
            if sent.is_err() {
                self.gone(ctx);
                return Poll::Ready(());
            }
            for out in self.backlog.drain(..n) {
                self.shared.stats.frame_out(out.kind());
            }
            self.signals
                .backlog
                .store(self.backlog.len(), Ordering::Relaxed);
        }
    }

    fn send_frame<T: serde::Serialize>(
        &mut self,
        ctx: &mut Context<Self>,
        kind: &'static str,
        data: T,
    ) {
        let text = server_frame(kind, self.shared.next_id(), data, now_ms());
        self.push(ctx, Outbound::Text(text.into(), kind));
    }

    fn send_error(
        &mut self,
        ctx: &mut Context<Self>,
        code: ErrorCode,
        message: &str,
        client_msg_id: Option<&str>,
    ) {
        self.shared.stats.ws_error(code);
        let data = ErrorData {
            code: code.as_u16(),
            message,
            client_msg_id,
        };
        self.send_frame(ctx, frames::ERROR, data);
    }

    /// Answers a refused frame and counts it against the abuse limit.
    fn refuse(&mut self, ctx: &mut Context<Self>, err: FrameError) {
        tracing::debug!(code = %err.code, message = %err.message, "frame refused");
        self.send_error(ctx, err.code, &err.message, err.client_msg_id.as_deref());
        let settings = &self.shared.settings;
        if self.abuse_since.elapsed() > settings.abuse_window {
            self.abuse_since = Instant::now();
            self.abuse_count = 0;
        }
        self.abuse_count += 1;
        if self.abuse_count >= settings.max_abuse.max(1) {
            self.close(
                ctx,
                CloseCode::Policy,
                "too many invalid frames",
                Some(CloseCause::Abuse),
                true,
            );
        }
    }

    fn on_text(&mut self, ctx: &mut Context<Self>, text: &str) {
        let max = self.shared.settings.max_frame_bytes;
        if text.len() > max {
            let err = FrameError::invalid(format!(
                "frame of {} bytes exceeds the {max} byte limit",
                text.len()
            ));
            self.shared.stats.frame_in(FRAME_INVALID);
            return self.refuse(ctx, err);
        }
        match parse_client_frame(text, self.shared.settings.max_content_chars) {
            Ok(ClientFrame::Ping) => {
                self.shared.stats.frame_in(frames::PING);
                self.send_frame(ctx, frames::PONG, Empty {});
            }
            Ok(ClientFrame::Pong) => self.shared.stats.frame_in(frames::PONG),
            Ok(ClientFrame::Send(msg)) => {
                self.shared.stats.frame_in(frames::SEND_MESSAGE);
                self.publish(ctx, msg);
            }
            Err(err) => {
                self.shared.stats.frame_in(FRAME_INVALID);
                self.refuse(ctx, err);
            }
        }
    }

    fn publish(&mut self, ctx: &mut Context<Self>, msg: SendMessage) {
        let trace_id = self.shared.next_trace_id();
        let headers = BTreeMap::from([
            (HEADER_SESSION.to_owned(), self.id.to_string()),
            (HEADER_TRACE.to_owned(), trace_id.clone()),
        ]);
        let upstream = Arc::new(UpstreamMessage {
            trace_id,
            user_id: self.user_id.to_string(),
            gateway_id: self.shared.settings.gateway_id.clone(),
            conversation_id: msg.conversation_id,
            message_type: msg.message_type,
            content: msg.content,
            client_msg_id: msg.client_msg_id,
            timestamp: now_ms(),
            headers,
        });
        let queue = match &self.upstream {
            Some(queue) => queue,
            None => {
                let (tx, rx) = mpsc::channel(self.shared.settings.upstream_inflight.max(1));
                (self.start_publisher)(rx, ctx.address());
                self.upstream.insert(tx)
            }
        };
        match queue.try_send(upstream) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(m)) => self.send_error(
                ctx,
                ErrorCode::RateLimited,
                "too many messages in flight; retry later",
                Some(&m.client_msg_id),
            ),
            Err(mpsc::error::TrySendError::Closed(m)) => self.send_error(
                ctx,
                ErrorCode::Unavailable,
                "message service unavailable; retry later",
                Some(&m.client_msg_id),
            ),
        }
    }
}

impl StreamHandler<Result<AggregatedMessage, ProtocolError>> for Session {
    fn handle(&mut self, item: Result<AggregatedMessage, ProtocolError>, ctx: &mut Context<Self>) {
        if self.closing {
            return;
        }
        let _g = self.span.clone().entered();
        let started = Instant::now();
        self.signals
            .last_seen_ms
            .store(self.shared.registry.ms_at(started), Ordering::Relaxed);
        let stats = Arc::clone(&self.shared.stats);
        match item {
            Ok(AggregatedMessage::Text(text)) => self.on_text(ctx, &text),
            Ok(AggregatedMessage::Binary(_)) => {
                stats.frame_in(FRAME_BINARY);
                self.refuse(
                    ctx,
                    FrameError::invalid("binary frames are not supported; send JSON text frames"),
                );
            }
            Ok(AggregatedMessage::Ping(payload)) => {
                stats.frame_in(FRAME_WS_PING);
                self.push(ctx, Outbound::Pong(payload));
            }
            Ok(AggregatedMessage::Pong(_)) => stats.frame_in(FRAME_WS_PONG),
            // Echo the client's close (RFC 6455 §5.5.1).
            Ok(AggregatedMessage::Close(reason)) => {
                stats.frame_in(FRAME_CLOSE);
                self.close_with(ctx, reason, None, false);
            }
            Err(err) => {
                stats.frame_in(FRAME_INVALID);
                let (code, reason) = match &err {
                    ProtocolError::Overflow => (CloseCode::Size, "frame too large"),
                    ProtocolError::Io(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                        (CloseCode::Invalid, "text frame is not valid UTF-8")
                    }
                    err if wsio::is_message_too_large(err) => {
                        (CloseCode::Size, "message too large")
                    }
                    _ => (CloseCode::Protocol, "WebSocket protocol error"),
                };
                tracing::info!(cause = %err, "WebSocket protocol error");
                self.close(ctx, code, reason, Some(CloseCause::Protocol), false);
            }
        }
        stats.handled(started.elapsed());
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        // The client went away (TCP closed, with or without a close frame).
        self.closing = true;
        ctx.stop();
    }
}

impl Session {
    /// Queues a delivery unless this session already delivered its seq.
    fn deliver(&mut self, ctx: &mut Context<Self>, delivery: Arc<Delivery>) {
        if self.fresh(&delivery) {
            self.push(ctx, delivery.outbound());
        }
    }

    /// Whether `delivery` is to be sent: not a seq of its conversation this session delivered
    /// already (a redelivered record). Counts it as delivered.
    fn fresh(&mut self, delivery: &Delivery) -> bool {
        if let Some((conversation, seq)) = &delivery.seq
            && *seq > 0
        {
            // One lookup for a conversation already tracked (the common case): the key is
            // hashed once per delivery, not three times.
            if let Some(last) = self.delivered.get_mut(conversation) {
                if *seq <= *last {
                    self.shared.stats.duplicate_dropped();
                    return false;
                }
                *last = *seq;
            } else {
                if self.delivered.len() >= MAX_TRACKED_CONVERSATIONS {
                    self.delivered.clear();
                }
                self.delivered.insert(Arc::clone(conversation), *seq);
            }
        }
        true
    }
}

impl Handler<CloseSession> for Session {
    type Result = ();

    fn handle(&mut self, msg: CloseSession, ctx: &mut Context<Self>) {
        let (code, drain) = match msg.cause {
            CloseCause::Slow => (CloseCode::Again, false),
            CloseCause::Shutdown => (CloseCode::Away, true),
            CloseCause::Abuse => (CloseCode::Policy, true),
            CloseCause::Heartbeat => (CloseCode::Normal, true),
            CloseCause::Protocol => (CloseCode::Protocol, false),
        };
        self.close(ctx, code, &msg.reason, Some(msg.cause), drain);
    }
}

impl Handler<PublishFailed> for Session {
    type Result = ();

    fn handle(&mut self, msg: PublishFailed, ctx: &mut Context<Self>) {
        self.send_error(
            ctx,
            ErrorCode::Unavailable,
            &msg.message,
            Some(&msg.client_msg_id),
        );
    }
}

/// Publishes one session's sends to the upstream topic, in order, keyed by conversation.
pub(crate) async fn publish_loop<P: Producer>(
    bus: P,
    mut rx: mpsc::Receiver<Arc<UpstreamMessage>>,
    session: Addr<Session>,
    stats: Arc<GatewayStats>,
) {
    while let Some(msg) = rx.recv().await {
        let headers = msg.headers.clone();
        let payload = Payload::shared(Arc::clone(&msg));
        let result = bus
            .send(UPSTREAM_TOPIC, &msg.conversation_id, payload, headers)
            .await;
        match result {
            Ok(()) => stats.published(),
            Err(cause) => {
                tracing::warn!(trace_id = %msg.trace_id, %cause, "publishing upstream failed");
                session.do_send(PublishFailed {
                    client_msg_id: msg.client_msg_id.clone(),
                    message: "message could not be queued; retry later".to_owned(),
                });
            }
        }
    }
}

/// Drains a session's backlog into the socket, polled by the session's own context (so a
/// frame queued by a handler is written in the same poll, without waking another task).
struct Flusher;

impl ActorFuture<Session> for Flusher {
    type Output = ();

    fn poll(
        self: Pin<&mut Self>,
        act: &mut Session,
        ctx: &mut Context<Session>,
        task: &mut std::task::Context<'_>,
    ) -> Poll<()> {
        act.flush(ctx, task)
    }
}

/// Ends a connection: writes `backlog` (empty unless the close flushes) and the close frame
/// within `close_grace`, then drops the socket. Counted by `closing` meanwhile: a gateway
/// shutting down waits for these before it stops its workers (which would drop them).
async fn close_socket(
    mut ws: WsWriter,
    mut backlog: VecDeque<Outbound>,
    reason: Option<CloseReason>,
    closing: ClosingSocket,
) {
    let shared = closing.shared();
    // The backlog is bounded (`outbound_queue`), so it may all wait in the writer: `close`
    // writes it, and the close frame after it, within `close_grace`. Batched as `flush` does.
    for batch in backlog.make_contiguous().chunks(wsio::MAX_BATCH) {
        if ws.send_batch(batch.iter().map(Outbound::frame)).is_err() {
            return;
        }
        for out in batch {
            shared.stats.frame_out(out.kind());
        }
    }
    ws.close(reason, shared.settings.close_grace).await;
}
