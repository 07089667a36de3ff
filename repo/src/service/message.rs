//! MessageService: storing messages, reading history, and handing out seq ids.
//!
//! # Seq ids
//!
//! `GenerateSeqID` reserves `count` consecutive seqs with one atomic `INCRBY` on
//! `conv_seq:{conv}`. When the counter is missing (first use, eviction, a flushed or restarted
//! cache) it is first initialised with SET NX to the conversation's floor: the largest stored
//! seq, or the largest seq ever reserved in the database, whichever is higher. So a lost cache
//! never makes a stored seq be handed out again. While the cache cannot be reached at all,
//! seqs are reserved in the database instead (`conversations.seq_floor`), which later
//! initialisations respect. Should a stale counter still offer a seq that is stored (a cache that
//! kept an old value through an outage), the unique `(conversation_id, seq_id)` index refuses the
//! message with 3003, and the counter is dropped so the next reservation starts above the floor.
//!
//! Seqs are gap-free as long as every reserved seq is stored, which the single owner of a
//! conversation (logic's Conversation actor) ensures by reserving exactly what it persists.

use gochat_infra::{AppError, ErrorCode, time::now_ms};
use gochat_proto::repo as pb;
use gochat_proto::repo::message_service_server::MessageService;
use tonic::{Request, Response, Status};

use super::{Repo, cache_read, cache_write, conversation_field, id_field, pb_message, status};
use crate::cache::Cache;
use crate::model::{DedupEntry, Direction, Message, SaveOutcome};
use crate::store::{Store, StoreError};

/// Largest message body in bytes (the TEXT column's limit).
pub const MAX_CONTENT_BYTES: usize = 65_535;
/// Longest client_msg_id.
pub const MAX_CLIENT_MSG_ID: usize = 64;
/// Most messages in one SaveMessages call.
pub const MAX_SAVE_BATCH: usize = 1000;
/// Most seqs in one GenerateSeqID call.
pub const MAX_SEQ_BLOCK: i64 = 10_000;
/// Default and largest history page.
const DEFAULT_PAGE: i64 = 50;
const MAX_PAGE: i64 = 100;

impl<S: Store, C: Cache> Repo<S, C> {
    /// Checks one message for storage.
    fn validate_message(r: pb::SaveMessageRequest) -> Result<Message, AppError> {
        let id = id_field("message_id", &r.message_id)?;
        conversation_field(&r.conversation_id)?;
        let sender_id = id_field("sender_id", &r.sender_id)?;
        if !(1..=4).contains(&r.message_type) {
            return Err(AppError::new(
                ErrorCode::InvalidMessage,
                format!("message_type must be 1..=4, got {}", r.message_type),
            ));
        }
        if r.content.len() > MAX_CONTENT_BYTES {
            return Err(AppError::new(
                ErrorCode::InvalidMessage,
                format!("content must be at most {MAX_CONTENT_BYTES} bytes"),
            ));
        }
        if r.seq_id <= 0 {
            return Err(AppError::invalid(
                "seq_id must be positive (reserve it with GenerateSeqID)",
            ));
        }
        if r.client_msg_id.len() > MAX_CLIENT_MSG_ID {
            return Err(AppError::invalid(format!(
                "client_msg_id must be at most {MAX_CLIENT_MSG_ID} bytes"
            )));
        }
        Ok(Message {
            id,
            conversation_id: r.conversation_id,
            sender_id,
            message_type: r.message_type,
            content: r.content,
            seq_id: r.seq_id,
            client_msg_id: (!r.client_msg_id.is_empty()).then_some(r.client_msg_id),
            created_at: if r.created_at > 0 {
                r.created_at
            } else {
                now_ms()
            },
        })
    }

    /// Stores a batch, then keeps the cache right: hot pages and read pointers dropped. No
    /// `msg_dedup` entry is written: the store finds a repeated key itself (its unique index,
    /// in the saving transaction), and `CheckMessageIdempotency` fills the entry on a miss like
    /// every other read, so a save costs no cache write per message (one Redis round trip per
    /// batch, or a table of entries nobody reads that slows every other in-process lookup).
    pub(crate) async fn save(
        &self,
        batch: Vec<Message>,
        mark_read: bool,
    ) -> Result<Vec<SaveOutcome>, AppError> {
        let outcomes = match self.store().save_batch(&batch, mark_read).await {
            Ok(o) => o,
            Err(StoreError::SeqConflict { conversation, seq }) => {
                // A stale counter: drop it so the next reservation starts above the floor.
                cache_write(self.cache().seq_del(&conversation).await, "conv_seq");
                return Err(StoreError::SeqConflict { conversation, seq }.into());
            }
            Err(e) => return Err(e.into()),
        };
        let mut touched: Vec<&str> = Vec::new();
        for o in outcomes.iter().filter(|o| !o.duplicate) {
            let conv = o.message.conversation_id.as_str();
            if !touched.contains(&conv) {
                touched.push(conv);
            }
        }
        for conv in touched {
            cache_write(self.cache().hot_del(conv).await, "hot_messages");
        }
        if mark_read {
            // The senders' read pointers moved in the store: drop their cached copies.
            let mut senders: Vec<(i64, &str)> = outcomes
                .iter()
                .filter(|o| !o.duplicate)
                .map(|o| (o.message.sender_id, o.message.conversation_id.as_str()))
                .collect();
            senders.sort_unstable();
            senders.dedup();
            for (user, conv) in senders {
                cache_write(self.cache().read_ptr_del(user, conv).await, "unread");
            }
        }
        Ok(outcomes)
    }

    /// Reserves `n` consecutive seqs of `conv`; returns (first, last).
    /// Restarts `conv`'s counter right after its largest stored seq: the durable counter is
    /// rewound and the cached one dropped, so the next reservation seeds it from storage.
    pub async fn rewind_seqs(&self, conv: &str) -> Result<(), AppError> {
        self.store().rewind_seq(conv).await?;
        if let Err(err) = self.cache().seq_del(conv).await {
            // A counter we cannot drop may hand out seqs above a gap; storage stays consistent,
            // and the owner resyncs again after the next conflict.
            tracing::warn!(cause = %err, conv, "cannot drop conv_seq for a rewind");
        }
        Ok(())
    }

    pub async fn reserve_seqs(&self, conv: &str, n: i64) -> Result<(i64, i64), AppError> {
        for _ in 0..3 {
            match self.cache().seq_incr(conv, n).await {
                Ok(Some(end)) => return Ok((end - n + 1, end)),
                Ok(None) => {
                    let floor = self.store().seq_floor(conv).await?;
                    if let Err(err) = self.cache().seq_init(conv, floor).await {
                        tracing::warn!(cause = %err, conv, "cannot seed conv_seq; reserving in the database");
                        break;
                    }
                }
                Err(err) => {
                    tracing::warn!(cause = %err, conv, "conv_seq unavailable; reserving in the database");
                    break;
                }
            }
        }
        let end = self.store().reserve_seq(conv, n).await?;
        Ok((end - n + 1, end))
    }

    /// A history page, the latest page through `hot_messages`.
    pub(crate) async fn history(
        &self,
        conv: &str,
        direction: Direction,
        limit: i64,
    ) -> Result<(Vec<Message>, bool), AppError> {
        let window = i64::try_from(self.settings().hot_window).unwrap_or(i64::MAX);
        if direction != (Direction::Backward { before_seq: None }) || limit > window {
            return Ok(self.store().get_messages(conv, direction, limit).await?);
        }
        let latest = match cache_read(self.cache().hot_get(conv).await, "hot_messages") {
            Some(cached) => cached,
            None => {
                let (mut rows, _) = self.store().get_messages(conv, direction, window).await?;
                rows.reverse();
                cache_write(
                    self.cache()
                        .hot_set(conv, &rows, self.settings().entry_ttl)
                        .await,
                    "hot_messages",
                );
                // A save that committed after our read may have deleted the page before we set
                // it: check the conversation's last seq now, and drop a page that is behind.
                let newest = rows.last().map_or(0, |m| m.seq_id);
                let last = self
                    .store()
                    .get_conversation(conv)
                    .await?
                    .map_or(0, |c| c.last_seq);
                if last > newest {
                    cache_write(self.cache().hot_del(conv).await, "hot_messages");
                }
                rows
            }
        };
        // `latest` is ascending; seqs start at 1, so anything above 1 at its start means older
        // messages exist.
        let limit_usize = usize::try_from(limit).unwrap_or(usize::MAX);
        let has_more = latest.len() > limit_usize || latest.first().is_some_and(|m| m.seq_id > 1);
        let page: Vec<Message> = latest.into_iter().rev().take(limit_usize).collect();
        Ok((page, has_more))
    }
}

#[tonic::async_trait]
impl<S: Store, C: Cache> MessageService for Repo<S, C> {
    async fn save_message(
        &self,
        request: Request<pb::SaveMessageRequest>,
    ) -> Result<Response<pb::SaveMessageResponse>, Status> {
        let message = Self::validate_message(request.into_inner())?;
        let outcome = self
            .save(vec![message], false)
            .await?
            .pop()
            .ok_or_else(|| AppError::internal("store returned no outcome"))?;
        Ok(Response::new(pb::SaveMessageResponse {
            message: Some(pb_message(&outcome.message)),
            duplicate: outcome.duplicate,
        }))
    }

    async fn save_messages(
        &self,
        request: Request<pb::SaveMessagesRequest>,
    ) -> Result<Response<pb::SaveMessagesResponse>, Status> {
        let r = request.into_inner();
        if r.messages.len() > MAX_SAVE_BATCH {
            return Err(
                AppError::invalid(format!("at most {MAX_SAVE_BATCH} messages per call")).into(),
            );
        }
        let batch = r
            .messages
            .into_iter()
            .map(Self::validate_message)
            .collect::<Result<Vec<_>, _>>()?;
        let outcomes = self.save(batch, r.mark_read_by_sender).await?;
        Ok(Response::new(pb::SaveMessagesResponse {
            results: outcomes
                .iter()
                .map(|o| pb::SaveMessageResponse {
                    message: Some(pb_message(&o.message)),
                    duplicate: o.duplicate,
                })
                .collect(),
        }))
    }

    async fn get_message(
        &self,
        request: Request<pb::GetMessageRequest>,
    ) -> Result<Response<pb::GetMessageResponse>, Status> {
        let id = id_field("message_id", &request.get_ref().message_id)?;
        let m = self
            .store()
            .get_message(id)
            .await
            .map_err(status)?
            .ok_or_else(|| {
                AppError::new(
                    ErrorCode::MessageNotFound,
                    format!("message {id} not found"),
                )
            })?;
        Ok(Response::new(pb::GetMessageResponse {
            message: Some(pb_message(&m)),
        }))
    }

    async fn get_conversation_messages(
        &self,
        request: Request<pb::GetConversationMessagesRequest>,
    ) -> Result<Response<pb::GetConversationMessagesResponse>, Status> {
        let r = request.into_inner();
        conversation_field(&r.conversation_id)?;
        let limit = match i64::from(r.limit) {
            0 => DEFAULT_PAGE,
            n if (1..=MAX_PAGE).contains(&n) => n,
            n => {
                return Err(
                    AppError::invalid(format!("limit must be 1..={MAX_PAGE}, got {n}")).into(),
                );
            }
        };
        if r.after_seq < 0 || r.before_seq < 0 {
            return Err(AppError::invalid("after_seq and before_seq must not be negative").into());
        }
        let direction = match pb::Direction::try_from(r.direction) {
            Ok(pb::Direction::Forward) => Direction::Forward {
                after_seq: r.after_seq,
            },
            Ok(pb::Direction::Backward) => Direction::Backward {
                before_seq: (r.before_seq > 0).then_some(r.before_seq),
            },
            Err(_) => return Err(AppError::invalid("unknown direction").into()),
        };
        let (messages, has_more) = self.history(&r.conversation_id, direction, limit).await?;
        Ok(Response::new(pb::GetConversationMessagesResponse {
            messages: messages.iter().map(pb_message).collect(),
            has_more,
        }))
    }

    async fn generate_seq_id(
        &self,
        request: Request<pb::GenerateSeqIdRequest>,
    ) -> Result<Response<pb::GenerateSeqIdResponse>, Status> {
        let r = request.into_inner();
        conversation_field(&r.conversation_id)?;
        let n = match r.count {
            0 => 1,
            n if (1..=MAX_SEQ_BLOCK).contains(&n) => n,
            n => {
                return Err(AppError::invalid(format!(
                    "count must be 1..={MAX_SEQ_BLOCK}, got {n}"
                ))
                .into());
            }
        };
        if r.from_stored {
            self.rewind_seqs(&r.conversation_id).await?;
        }
        let (first, last) = self.reserve_seqs(&r.conversation_id, n).await?;
        Ok(Response::new(pb::GenerateSeqIdResponse {
            seq_id: first,
            end_seq_id: last,
        }))
    }

    async fn check_message_idempotency(
        &self,
        request: Request<pb::CheckMessageIdempotencyRequest>,
    ) -> Result<Response<pb::CheckMessageIdempotencyResponse>, Status> {
        let r = request.into_inner();
        let sender = id_field("sender_id", &r.sender_id)?;
        if r.client_msg_id.is_empty() || r.client_msg_id.len() > MAX_CLIENT_MSG_ID {
            return Err(AppError::invalid(format!(
                "client_msg_id must be 1..={MAX_CLIENT_MSG_ID} bytes"
            ))
            .into());
        }
        let entry = match cache_read(
            self.cache().dedup_get(sender, &r.client_msg_id).await,
            "msg_dedup",
        ) {
            Some(e) => Some(e),
            None => {
                let found = self
                    .store()
                    .find_by_client_msg_id(sender, &r.client_msg_id)
                    .await
                    .map_err(status)?;
                let entry = found.map(|m| DedupEntry {
                    message_id: m.id,
                    seq_id: m.seq_id,
                    conversation_id: m.conversation_id,
                });
                if let Some(e) = &entry {
                    cache_write(
                        self.cache()
                            .dedup_set(sender, &r.client_msg_id, e, self.settings().dedup_ttl)
                            .await,
                        "msg_dedup",
                    );
                }
                entry
            }
        };
        Ok(Response::new(match entry {
            Some(e) => pb::CheckMessageIdempotencyResponse {
                exists: true,
                message_id: e.message_id.to_string(),
                seq_id: e.seq_id,
                conversation_id: e.conversation_id,
            },
            None => pb::CheckMessageIdempotencyResponse::default(),
        }))
    }
}
