//! The downstream consumer: reads `im-downstream-topic-{gateway_id}` as consumer group
//! `im-gateway-{gateway_id}` and hands each record to the local sessions it is for.
//!
//! A record is turned into one frame, serialized once, and handed to the hub of each worker
//! thread with target sessions, one job per worker (`hub`), which queues it into each target
//! session's bounded inbox (a full session is closed as too slow; the others are unaffected,
//! and the consumer never waits on a client, only on a worker thread that is behind). The record
//! is committed after that dispatch, so a gateway that crashes mid-record gets it again; the
//! sessions drop `new-message` seqs they already delivered. A record that does not parse is
//! logged and committed.

use std::sync::Arc;
use std::time::Duration;

use gochat_infra::mq::{Bus, Consumer, MqError, Record};
use gochat_infra::time::now_ms;
use gochat_infra::wire::{DownstreamKind, DownstreamMessage, downstream_topic};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::frames::{
    self, ErrorData, MessageAckData, NewMessageData, OnlineStatusData, server_frame,
};
use crate::registry::Fanout;
use crate::session::Delivery;
use crate::shared::Shared;

/// Pause after a bus error before trying again.
const BACKOFF: Duration = Duration::from_secs(1);

/// The consumer group of a gateway.
pub fn consumer_group(gateway_id: &str) -> String {
    format!("im-gateway-{gateway_id}")
}

/// Consumes until `cancel` or until the bus closes.
pub(crate) async fn run_consumer<B: Bus>(shared: Arc<Shared>, bus: B, cancel: CancellationToken) {
    let gateway_id = &shared.settings.gateway_id;
    let topic = downstream_topic(gateway_id);
    let group = consumer_group(gateway_id);
    let partitions = shared.settings.downstream_partitions.max(1);

    let mut consumer = loop {
        let join = async {
            bus.ensure_topic(&topic, partitions).await?;
            bus.subscribe(&group, &[topic.as_str()]).await
        };
        let result = tokio::select! {
            () = cancel.cancelled() => return,
            r = join => r,
        };
        match result {
            Ok(c) => break c,
            Err(MqError::Closed) => return,
            Err(e) => {
                tracing::warn!(%topic, cause = %e, "downstream: cannot subscribe yet");
                if pause(&cancel).await {
                    return;
                }
            }
        }
    };
    tracing::info!(%topic, %group, "downstream consumer started");

    loop {
        let next = tokio::select! {
            () = cancel.cancelled() => return,
            r = consumer.recv() => r,
        };
        match next {
            Ok(record) => {
                dispatch(&shared, &record).await;
                if let Err(e) = consumer.commit(&record).await {
                    tracing::warn!(%topic, partition = record.partition, offset = record.offset,
                        cause = %e, "downstream: commit failed");
                }
            }
            Err(MqError::Closed) => return,
            Err(e) => {
                tracing::warn!(%topic, cause = %e, "downstream: receive failed");
                if pause(&cancel).await {
                    return;
                }
            }
        }
    }
}

/// Sleeps [`BACKOFF`]; true when cancelled meanwhile.
async fn pause(cancel: &CancellationToken) -> bool {
    tokio::select! {
        () = cancel.cancelled() => true,
        () = tokio::time::sleep(BACKOFF) => false,
    }
}

/// Delivers one record to the local sessions it targets.
pub(crate) async fn dispatch(shared: &Shared, record: &Record) {
    let msg = match record.payload.decode::<DownstreamMessage>() {
        Ok(m) => m,
        Err(e) => {
            shared.stats.downstream_record();
            shared.stats.downstream_malformed();
            tracing::warn!(topic = %record.topic, partition = record.partition,
                offset = record.offset, cause = %e, "downstream: malformed record skipped");
            return;
        }
    };
    let span = tracing::debug_span!("downstream", trace_id = %msg.trace_id, kind = ?msg.kind);
    deliver(shared, &msg).instrument(span).await;
    // Counted once handed to the hubs (tests wait on it before they look at sessions).
    shared.stats.downstream_record();
}

/// Delivers one downstream message to the local sessions it targets.
async fn deliver(shared: &Shared, msg: &DownstreamMessage) {
    let registry = &shared.registry;
    let now = now_ms();
    let frame = |kind: &'static str, text: String, seq: Option<(Arc<str>, i64)>| {
        Arc::new(Delivery {
            kind,
            text: text.into(),
            seq,
        })
    };
    match msg.kind {
        DownstreamKind::NewMessage => {
            let text = server_frame(
                frames::NEW_MESSAGE,
                shared.next_id(),
                NewMessageData::from(msg),
                now,
            );
            let delivery = frame(
                frames::NEW_MESSAGE,
                text,
                Some((msg.conversation_id.as_str().into(), msg.seq_id)),
            );
            // The excluded session (the sender's own) is found once and then told apart by
            // its id's address: comparing every handle's id text would read one more cache
            // line per session, which the world room's fan-out paid 10,000 times per message.
            let exclude: Option<Arc<str>> = (!msg.exclude_session.is_empty())
                .then(|| registry.session_id(&msg.exclude_session))
                .flatten();
            if msg.broadcast {
                registry.broadcast(&delivery, exclude.as_ref()).await;
            } else {
                let mut targets = Fanout::default();
                for user in msg.recipients() {
                    registry.for_user(user, |h| {
                        if !exclude.as_ref().is_some_and(|ex| Arc::ptr_eq(ex, &h.id)) {
                            targets.add(h);
                        }
                    });
                }
                registry.deliver(&delivery, targets).await;
            }
        }
        DownstreamKind::MessageAck => {
            let text = server_frame(
                frames::MESSAGE_ACK,
                shared.next_id(),
                MessageAckData::from(msg),
                now,
            );
            to_target_session(shared, msg, frame(frames::MESSAGE_ACK, text, None)).await;
        }
        DownstreamKind::Error => {
            let data = ErrorData {
                code: msg.error_code,
                message: &msg.error_message,
                client_msg_id: (!msg.client_msg_id.is_empty()).then_some(&msg.client_msg_id),
            };
            if let Some(code) = gochat_infra::ErrorCode::from_u16(msg.error_code) {
                shared.stats.ws_error(code);
            }
            let text = server_frame(frames::ERROR, shared.next_id(), data, now);
            to_target_session(shared, msg, frame(frames::ERROR, text, None)).await;
        }
        DownstreamKind::OnlineStatus => {
            let data = OnlineStatusData {
                user_id: &msg.sender_id,
                is_online: msg.is_online,
                timestamp: if msg.timestamp > 0 {
                    msg.timestamp
                } else {
                    now
                },
            };
            let text = server_frame(frames::ONLINE_STATUS, shared.next_id(), data, now);
            let delivery = frame(frames::ONLINE_STATUS, text, None);
            if msg.broadcast {
                registry.broadcast(&delivery, None).await;
            } else {
                let mut targets = Fanout::default();
                for user in msg.recipients() {
                    registry.for_user(user, |h| targets.add(h));
                }
                registry.deliver(&delivery, targets).await;
            }
        }
    }
}

/// Acks and errors go to the one session that sent the message; a record without
/// `target_session` (a spec-only producer) goes to every local session of its recipients.
async fn to_target_session(shared: &Shared, msg: &DownstreamMessage, delivery: Arc<Delivery>) {
    let registry = &shared.registry;
    let mut targets = Fanout::default();
    if msg.target_session.is_empty() {
        for user in msg.recipients() {
            registry.for_user(user, |h| targets.add(h));
        }
    } else {
        registry.for_session(&msg.target_session, |h| targets.add(h));
    }
    registry.deliver(&delivery, targets).await;
}
