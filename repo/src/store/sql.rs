//! The query code of both SQL backends, written once.
//!
//! [`impl_sql_store!`] expands the whole [`Store`](super::Store) implementation for a backend
//! type that has three inherent methods, `writer()`, `reader()` and `quick_reader()`, each
//! returning a guard that dereferences to a diesel-async connection. `quick_reader()` is for
//! reads of a few rows by key (SQLite runs them on the caller's thread, see `sqlite::Inline`);
//! anything that may read many rows takes `reader()`. Diesel checks every query against the
//! concrete backend at each expansion, so a query that one engine cannot run fails to compile.
//!
//! Portability rules the queries follow: ids come from the application (no `RETURNING`, no
//! last-insert-id), upserts are `INSERT IGNORE`/`INSERT OR IGNORE` followed by a guarded
//! `UPDATE`, and row locks are taken with an `UPDATE` (InnoDB locks the row until commit;
//! SQLite has one writer).

use std::collections::HashMap;

use diesel::result::{DatabaseErrorKind, Error as DieselError};
use gochat_infra::ids::ConversationKind;

use super::StoreError;
use crate::model::{Message, SaveOutcome};

/// Which unique guard a failed insert hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Violation {
    /// (sender_id, client_msg_id) or the message id: a duplicate to resolve by re-reading.
    Duplicate,
    /// (conversation_id, seq_id): a seq that is taken.
    Seq,
    /// Anything else unique (e.g. a username).
    Other,
}

/// Classifies a unique violation by the index it names (SQLite names columns, MySQL names keys).
pub(crate) fn violation(err: &DieselError) -> Option<Violation> {
    match err {
        DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, info) => {
            let text = format!(
                "{} {}",
                info.message(),
                info.constraint_name().unwrap_or("")
            );
            if text.contains("client_msg")
                || text.contains("PRIMARY")
                || text.contains("messages.id")
            {
                Some(Violation::Duplicate)
            } else if text.contains("seq") {
                Some(Violation::Seq)
            } else {
                Some(Violation::Other)
            }
        }
        _ => None,
    }
}

/// Maps a diesel error that no caller handles to a [`StoreError`].
pub(crate) fn classify(err: DieselError) -> StoreError {
    match &err {
        DieselError::DatabaseError(DatabaseErrorKind::ClosedConnection, _)
        | DieselError::BrokenTransactionManager => StoreError::Unavailable(err.to_string()),
        DieselError::DatabaseError(DatabaseErrorKind::Unknown, info)
            if info.message().contains("database is locked")
                || info.message().contains("Connection refused")
                || info.message().contains("broken pipe") =>
        {
            StoreError::Unavailable(err.to_string())
        }
        _ => StoreError::Database(err.to_string()),
    }
}

/// The errors a transaction body can end with.
#[derive(Debug)]
pub(crate) enum TxError {
    /// A diesel error not handled in the body.
    Diesel(DieselError),
    /// A decided outcome.
    Store(StoreError),
    /// A duplicate raced in: run the whole transaction again with a fresh snapshot.
    Retry,
    /// A transaction shared with other batches (SQLite's group commit) failed for a reason
    /// worth another try (the database was locked); the text says what happened.
    Busy(String),
}

impl From<DieselError> for TxError {
    fn from(e: DieselError) -> Self {
        Self::Diesel(e)
    }
}

impl From<TxError> for StoreError {
    fn from(e: TxError) -> Self {
        match e {
            TxError::Diesel(e) => classify(e),
            TxError::Store(e) => e,
            TxError::Retry => StoreError::Database("duplicate kept racing; gave up".into()),
            TxError::Busy(why) => StoreError::Unavailable(why),
        }
    }
}

/// A conversation row to create when missing.
#[derive(Debug, Clone, diesel::Insertable)]
#[diesel(table_name = crate::schema::conversations, treat_none_as_default_value = false)]
pub(crate) struct NewConversation {
    pub id: String,
    pub kind: i32,
    pub group_id: Option<i64>,
    pub last_message_at: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

impl NewConversation {
    /// The row for a conversation id, or why that id is not one.
    pub(crate) fn for_id(id: &str, now: i64) -> Result<Self, StoreError> {
        let kind = ConversationKind::parse(id)
            .ok_or_else(|| StoreError::Invalid(format!("invalid conversation id {id:?}")))?;
        Ok(Self {
            id: id.to_owned(),
            kind: kind.type_number(),
            group_id: match kind {
                ConversationKind::Group(g) => Some(g),
                _ => None,
            },
            last_message_at: now,
            created_at: now,
            updated_at: now,
        })
    }
}

/// A membership row to insert.
#[derive(Debug, Clone, diesel::Insertable)]
#[diesel(table_name = crate::schema::group_members)]
pub(crate) struct NewGroupMember {
    pub group_id: i64,
    pub user_id: i64,
    pub role: i32,
    pub joined_at: i64,
}

/// A single-chat membership row to insert.
#[derive(Debug, Clone, diesel::Insertable)]
#[diesel(table_name = crate::schema::conversation_members)]
pub(crate) struct NewConversationMember {
    pub conversation_id: String,
    pub user_id: i64,
    pub joined_at: i64,
}

/// A read pointer row to insert.
#[derive(Debug, Clone, diesel::Insertable)]
#[diesel(table_name = crate::schema::user_read_pointers)]
pub(crate) struct NewReadPointer<'a> {
    pub user_id: i64,
    pub conversation_id: &'a str,
    pub last_read_seq_id: i64,
    pub updated_at: i64,
}

/// The fields an update may change (`None` keeps a field).
#[derive(Debug, diesel::AsChangeset)]
#[diesel(table_name = crate::schema::users)]
pub(crate) struct UserChangeset<'a> {
    pub nickname: Option<&'a str>,
    pub avatar_url: Option<&'a str>,
    pub password_hash: Option<&'a str>,
    pub updated_at: i64,
}

/// Multi-row inserts are split so no statement passes SQLite's bound-parameter limit.
pub(crate) const INSERT_CHUNK: usize = 500;

/// How often a transaction that lost a race (a raced duplicate, an InnoDB deadlock or lock
/// wait timeout, a busy SQLite file) is run again before the error is returned.
pub(crate) const TX_RETRIES: usize = 8;

/// Whether a transaction failed only because it raced another one and is worth running again.
pub(crate) fn is_transient(err: &TxError) -> bool {
    match err {
        TxError::Retry | TxError::Busy(_) => true,
        TxError::Diesel(DieselError::DatabaseError(DatabaseErrorKind::SerializationFailure, _)) => {
            true
        }
        TxError::Diesel(DieselError::DatabaseError(_, info)) => {
            let m = info.message();
            m.contains("Deadlock found")
                || m.contains("Lock wait timeout")
                || m.contains("database is locked")
        }
        _ => false,
    }
}

/// Waits before retry `attempt` (0-based): 2, 4, 8 ... ms, at most 128 ms, plus jitter so
/// racing transactions do not meet again.
pub(crate) async fn backoff(attempt: usize) {
    let base = 2u64 << attempt.min(6);
    let jitter = rand::random::<u64>() % (base + 1);
    tokio::time::sleep(std::time::Duration::from_millis(base + jitter)).await;
}

/// Runs a diesel-async transaction, again (after [`backoff`]) while it fails transiently.
macro_rules! retry_tx {
    ($conn:expr, $ty:ty, $body:expr) => {{
        let mut attempt = 0usize;
        loop {
            let result = $conn
                .transaction::<$ty, $crate::store::sql::TxError, _>($body)
                .await;
            match result {
                Err(e)
                    if attempt + 1 < $crate::store::sql::TX_RETRIES
                        && $crate::store::sql::is_transient(&e) =>
                {
                    $crate::store::sql::backoff(attempt).await;
                    attempt += 1;
                }
                other => break other,
            }
        }
    }};
}

pub(crate) use retry_tx;

/// A batch checked and indexed for storage, shared by both backends' save paths.
#[derive(Debug)]
pub(crate) struct Prepared {
    /// The messages as asked, `created_at` filled in.
    pub batch: Vec<Message>,
    /// Conversation rows to create when missing.
    pub conversations: Vec<NewConversation>,
    /// Ids of the batch.
    pub ids: Vec<i64>,
    /// Idempotency keys of the batch.
    pub keys: Vec<String>,
    /// Senders of the messages that have a key (the leading column of the
    /// `(sender_id, client_msg_id)` index: looking keys up without it scans the table).
    pub senders: Vec<i64>,
    /// Transaction time.
    pub now: i64,
    /// Move each sender's read pointer to its newest new message.
    pub mark_read: bool,
}

impl Prepared {
    /// Checks seqs and conversation ids.
    pub(crate) fn new(batch: &[Message], now: i64) -> Result<Self, StoreError> {
        let mut conversations = std::collections::BTreeMap::new();
        let mut out = Vec::with_capacity(batch.len());
        for m in batch {
            if m.seq_id <= 0 {
                return Err(StoreError::Invalid(format!(
                    "seq_id must be positive, got {}",
                    m.seq_id
                )));
            }
            if !conversations.contains_key(&m.conversation_id) {
                conversations.insert(
                    m.conversation_id.clone(),
                    NewConversation::for_id(&m.conversation_id, now)?,
                );
            }
            let mut m = m.clone();
            if m.created_at <= 0 {
                m.created_at = now;
            }
            out.push(m);
        }
        Ok(Self {
            ids: out.iter().map(|m| m.id).collect(),
            keys: out.iter().filter_map(|m| m.client_msg_id.clone()).collect(),
            senders: {
                let mut v: Vec<i64> = out
                    .iter()
                    .filter(|m| m.client_msg_id.is_some())
                    .map(|m| m.sender_id)
                    .collect();
                v.sort_unstable();
                v.dedup();
                v
            },
            batch: out,
            conversations: conversations.into_values().collect(),
            now,
            mark_read: false,
        })
    }

    /// Decides each message against what is stored (`stored`: rows found by id or by key):
    /// a duplicate of a stored message, a duplicate of an earlier one in the batch, or new.
    /// Returns the outcomes in batch order and the rows to insert.
    ///
    /// New messages of a conversation take the lowest of the seqs the batch brought for that
    /// conversation, in batch order: a duplicate in the middle of a batch then leaves its seq
    /// unused at the top, never as a hole below a stored message (the caller gets the highest
    /// seqs back unused and hands them out next).
    pub(crate) fn plan(&self, stored: Vec<Message>) -> (Vec<SaveOutcome>, Vec<Message>) {
        let (mut outcomes, mut fresh) = self.decide(stored);
        let mut seqs: HashMap<&str, Vec<i64>> = HashMap::new();
        for m in &self.batch {
            seqs.entry(m.conversation_id.as_str())
                .or_default()
                .push(m.seq_id);
        }
        for v in seqs.values_mut() {
            // Descending, so `pop` hands out the lowest first.
            v.sort_unstable_by_key(|s| std::cmp::Reverse(*s));
        }
        let mut renumbered: HashMap<i64, i64> = HashMap::new();
        for m in &mut fresh {
            if let Some(seq) = seqs.get_mut(m.conversation_id.as_str()).and_then(Vec::pop)
                && seq != m.seq_id
            {
                renumbered.insert(m.id, seq);
                m.seq_id = seq;
            }
        }
        if !renumbered.is_empty() {
            for o in &mut outcomes {
                // Only new rows are renumbered, and a stored original never shares a new id.
                if let Some(&seq) = renumbered.get(&o.message.id) {
                    o.message.seq_id = seq;
                }
            }
        }
        (outcomes, fresh)
    }

    /// [`Self::plan`] before renumbering.
    fn decide(&self, stored: Vec<Message>) -> (Vec<SaveOutcome>, Vec<Message>) {
        let mut by_id: HashMap<i64, Message> = HashMap::new();
        let mut by_key: HashMap<(i64, String), Message> = HashMap::new();
        for m in stored {
            if let Some(k) = m.client_msg_id.clone() {
                by_key.insert((m.sender_id, k), m.clone());
            }
            by_id.insert(m.id, m);
        }
        let mut outcomes = Vec::with_capacity(self.batch.len());
        let mut fresh: Vec<Message> = Vec::new();
        let mut fresh_by_key: HashMap<(i64, &str), usize> = HashMap::new();
        let mut fresh_ids: HashMap<i64, usize> = HashMap::new();
        for m in &self.batch {
            let key = m.client_msg_id.as_deref().map(|k| (m.sender_id, k));
            let original = by_id
                .get(&m.id)
                .cloned()
                .or_else(|| key.and_then(|(s, k)| by_key.get(&(s, k.to_owned())).cloned()));
            let earlier = fresh_ids
                .get(&m.id)
                .copied()
                .or_else(|| key.and_then(|k| fresh_by_key.get(&k).copied()));
            if let Some(original) = original {
                outcomes.push(SaveOutcome {
                    message: original,
                    duplicate: true,
                });
            } else if let Some(i) = earlier {
                outcomes.push(SaveOutcome {
                    message: fresh[i].clone(),
                    duplicate: true,
                });
            } else {
                fresh_ids.insert(m.id, fresh.len());
                if let Some(k) = key {
                    fresh_by_key.insert(k, fresh.len());
                }
                fresh.push(m.clone());
                outcomes.push(SaveOutcome {
                    message: m.clone(),
                    duplicate: false,
                });
            }
        }
        (outcomes, fresh)
    }
}

/// The newest of `rows` per conversation: what each conversation row must be moved forward to.
pub(crate) fn newest_per_conversation(rows: &[Message]) -> Vec<&Message> {
    let mut last: HashMap<&str, &Message> = HashMap::new();
    for m in rows {
        let e = last.entry(m.conversation_id.as_str()).or_insert(m);
        if m.seq_id > e.seq_id {
            *e = m;
        }
    }
    last.into_values().collect()
}

/// The newest of `rows` per (sender, conversation): where each sender's read pointer moves.
pub(crate) fn newest_per_sender(rows: &[Message]) -> Vec<(i64, &str, i64)> {
    let mut last: HashMap<(i64, &str), i64> = HashMap::new();
    for m in rows {
        let e = last
            .entry((m.sender_id, m.conversation_id.as_str()))
            .or_insert(m.seq_id);
        *e = (*e).max(m.seq_id);
    }
    last.into_iter().map(|((u, c), s)| (u, c, s)).collect()
}

/// Maps a failed message insert: a raced duplicate retries, a taken seq is a conflict.
pub(crate) fn insert_failure(err: DieselError, chunk: &[Message]) -> TxError {
    match violation(&err) {
        Some(Violation::Duplicate) => TxError::Retry,
        Some(Violation::Seq) => {
            let (conversation, seq) = chunk
                .first()
                .map(|m| (m.conversation_id.clone(), m.seq_id))
                .unwrap_or_default();
            TxError::Store(StoreError::SeqConflict { conversation, seq })
        }
        _ => TxError::Diesel(err),
    }
}

macro_rules! impl_sql_store {
    ($store:ty, $batch:ident) => {
        impl $crate::store::Store for $store {
            async fn create_user(
                &self,
                user: &$crate::model::User,
            ) -> $crate::store::StoreResult<()> {
                use $crate::schema::users;
                let mut conn = self.writer().await?;
                match diesel::insert_into(users::table)
                    .values(user)
                    .execute(&mut *conn)
                    .await
                {
                    Ok(_) => Ok(()),
                    Err(e) if $crate::store::sql::violation(&e).is_some() => {
                        Err($crate::store::StoreError::UserExists)
                    }
                    Err(e) => Err($crate::store::sql::classify(e)),
                }
            }

            async fn get_user(
                &self,
                id: i64,
            ) -> $crate::store::StoreResult<Option<$crate::model::User>> {
                use $crate::schema::users;
                let mut conn = self.quick_reader().await?;
                users::table
                    .find(id)
                    .select($crate::model::User::as_select())
                    .first(&mut *conn)
                    .await
                    .optional()
                    .map_err($crate::store::sql::classify)
            }

            async fn get_user_by_username(
                &self,
                username: &str,
            ) -> $crate::store::StoreResult<Option<$crate::model::User>> {
                use $crate::schema::users;
                let mut conn = self.quick_reader().await?;
                users::table
                    .filter(users::username.eq(username))
                    .select($crate::model::User::as_select())
                    .first(&mut *conn)
                    .await
                    .optional()
                    .map_err($crate::store::sql::classify)
            }

            async fn get_users(
                &self,
                ids: &[i64],
            ) -> $crate::store::StoreResult<Vec<$crate::model::User>> {
                use $crate::schema::users;
                if ids.is_empty() {
                    return Ok(Vec::new());
                }
                let mut conn = self.reader().await?;
                let mut out = Vec::with_capacity(ids.len());
                for chunk in ids.chunks($crate::store::sql::INSERT_CHUNK) {
                    let rows: Vec<$crate::model::User> = users::table
                        .filter(users::id.eq_any(chunk))
                        .select($crate::model::User::as_select())
                        .load(&mut *conn)
                        .await
                        .map_err($crate::store::sql::classify)?;
                    out.extend(rows);
                }
                Ok(out)
            }

            async fn update_user(
                &self,
                id: i64,
                changes: &$crate::model::UserChanges,
                now: i64,
            ) -> $crate::store::StoreResult<Option<$crate::model::User>> {
                use $crate::schema::users;
                let set = $crate::store::sql::UserChangeset {
                    nickname: changes.nickname.as_deref(),
                    avatar_url: changes.avatar_url.as_deref(),
                    password_hash: changes.password_hash.as_deref(),
                    updated_at: now,
                };
                let mut conn = self.writer().await?;
                diesel::update(users::table.find(id))
                    .set(&set)
                    .execute(&mut *conn)
                    .await
                    .map_err($crate::store::sql::classify)?;
                users::table
                    .find(id)
                    .select($crate::model::User::as_select())
                    .first(&mut *conn)
                    .await
                    .optional()
                    .map_err($crate::store::sql::classify)
            }

            async fn create_session(
                &self,
                session: &$crate::model::AuthSession,
            ) -> $crate::store::StoreResult<()> {
                use $crate::schema::auth_sessions;
                let mut conn = self.writer().await?;
                diesel::insert_into(auth_sessions::table)
                    .values(session)
                    .execute(&mut *conn)
                    .await
                    .map(|_| ())
                    .map_err($crate::store::sql::classify)
            }

            async fn rotate_session(
                &self,
                id: i64,
                old_jti: &str,
                new_jti: &str,
                expires_at: i64,
                now: i64,
            ) -> $crate::store::StoreResult<Option<$crate::model::AuthSession>> {
                use $crate::schema::auth_sessions;
                let mut conn = self.writer().await?;
                // Compare-and-set: of two refreshes with the same token, one wins.
                let n = diesel::update(
                    auth_sessions::table
                        .filter(auth_sessions::id.eq(id))
                        .filter(auth_sessions::refresh_jti.eq(old_jti))
                        .filter(auth_sessions::revoked.eq(0))
                        .filter(auth_sessions::expires_at.gt(now)),
                )
                .set((
                    auth_sessions::refresh_jti.eq(new_jti),
                    auth_sessions::expires_at.eq(expires_at),
                    auth_sessions::updated_at.eq(now),
                ))
                .execute(&mut *conn)
                .await
                .map_err($crate::store::sql::classify)?;
                if n == 0 {
                    return Ok(None);
                }
                auth_sessions::table
                    .find(id)
                    .select($crate::model::AuthSession::as_select())
                    .first(&mut *conn)
                    .await
                    .optional()
                    .map_err($crate::store::sql::classify)
            }

            async fn revoke_session(&self, id: i64, now: i64) -> $crate::store::StoreResult<bool> {
                use $crate::schema::auth_sessions;
                let mut conn = self.writer().await?;
                let n = diesel::update(
                    auth_sessions::table
                        .filter(auth_sessions::id.eq(id))
                        .filter(auth_sessions::revoked.eq(0)),
                )
                .set((
                    auth_sessions::revoked.eq(1),
                    auth_sessions::updated_at.eq(now),
                ))
                .execute(&mut *conn)
                .await
                .map_err($crate::store::sql::classify)?;
                Ok(n > 0)
            }

            async fn get_session(
                &self,
                id: i64,
            ) -> $crate::store::StoreResult<Option<$crate::model::AuthSession>> {
                use $crate::schema::auth_sessions;
                let mut conn = self.quick_reader().await?;
                auth_sessions::table
                    .find(id)
                    .select($crate::model::AuthSession::as_select())
                    .first(&mut *conn)
                    .await
                    .optional()
                    .map_err($crate::store::sql::classify)
            }

            async fn save_batch(
                &self,
                batch: &[$crate::model::Message],
                mark_read: bool,
            ) -> $crate::store::StoreResult<Vec<$crate::model::SaveOutcome>> {
                if batch.is_empty() {
                    return Ok(Vec::new());
                }
                let mut prepared =
                    $crate::store::sql::Prepared::new(batch, gochat_infra::time::now_ms())?;
                prepared.mark_read = mark_read;
                // Shared, not copied, by each attempt (SQLite queues it for a group commit).
                let prepared = std::sync::Arc::new(prepared);
                let mut attempt = 0usize;
                loop {
                    match self.save_once(&prepared).await {
                        Ok(outcomes) => return Ok(outcomes),
                        Err(e)
                            if attempt + 1 < $crate::store::sql::TX_RETRIES
                                && $crate::store::sql::is_transient(&e) =>
                        {
                            $crate::store::sql::backoff(attempt).await;
                            attempt += 1;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            }

            async fn get_message(
                &self,
                id: i64,
            ) -> $crate::store::StoreResult<Option<$crate::model::Message>> {
                use $crate::schema::messages;
                let mut conn = self.quick_reader().await?;
                messages::table
                    .find(id)
                    .select($crate::model::Message::as_select())
                    .first(&mut *conn)
                    .await
                    .optional()
                    .map_err($crate::store::sql::classify)
            }

            async fn find_by_client_msg_id(
                &self,
                sender: i64,
                client_msg_id: &str,
            ) -> $crate::store::StoreResult<Option<$crate::model::Message>> {
                use $crate::schema::messages;
                let mut conn = self.quick_reader().await?;
                messages::table
                    .filter(messages::sender_id.eq(sender))
                    .filter(messages::client_msg_id.eq(client_msg_id))
                    .select($crate::model::Message::as_select())
                    .first(&mut *conn)
                    .await
                    .optional()
                    .map_err($crate::store::sql::classify)
            }

            async fn get_messages(
                &self,
                conversation: &str,
                direction: $crate::model::Direction,
                limit: i64,
            ) -> $crate::store::StoreResult<(Vec<$crate::model::Message>, bool)> {
                use $crate::model::{Direction, Message};
                use $crate::schema::messages;
                let limit = limit.max(1);
                let mut conn = self.reader().await?;
                let mut rows: Vec<Message> = match direction {
                    Direction::Forward { after_seq } => {
                        messages::table
                            .filter(messages::conversation_id.eq(conversation))
                            .filter(messages::seq_id.gt(after_seq))
                            .order(messages::seq_id.asc())
                            .limit(limit + 1)
                            .select(Message::as_select())
                            .load(&mut *conn)
                            .await
                    }
                    Direction::Backward {
                        before_seq: Some(before),
                    } => {
                        messages::table
                            .filter(messages::conversation_id.eq(conversation))
                            .filter(messages::seq_id.lt(before))
                            .order(messages::seq_id.desc())
                            .limit(limit + 1)
                            .select(Message::as_select())
                            .load(&mut *conn)
                            .await
                    }
                    Direction::Backward { before_seq: None } => {
                        messages::table
                            .filter(messages::conversation_id.eq(conversation))
                            .order(messages::seq_id.desc())
                            .limit(limit + 1)
                            .select(Message::as_select())
                            .load(&mut *conn)
                            .await
                    }
                }
                .map_err($crate::store::sql::classify)?;
                let has_more = rows.len() as i64 > limit;
                rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
                Ok((rows, has_more))
            }

            async fn seq_floor(&self, conversation: &str) -> $crate::store::StoreResult<i64> {
                use $crate::schema::{conversations, messages};
                let mut conn = self.quick_reader().await?;
                let row: Option<(i64, i64)> = conversations::table
                    .find(conversation)
                    .select((conversations::last_seq, conversations::seq_floor))
                    .first(&mut *conn)
                    .await
                    .optional()
                    .map_err($crate::store::sql::classify)?;
                let stored: Option<i64> = messages::table
                    .filter(messages::conversation_id.eq(conversation))
                    .select(diesel::dsl::max(messages::seq_id))
                    .first(&mut *conn)
                    .await
                    .map_err($crate::store::sql::classify)?;
                let (last, floor) = row.unwrap_or((0, 0));
                Ok(last.max(floor).max(stored.unwrap_or(0)))
            }

            async fn rewind_seq(&self, conversation: &str) -> $crate::store::StoreResult<()> {
                use $crate::schema::conversations;
                let mut conn = self.writer().await?;
                diesel::update(
                    conversations::table
                        .filter(conversations::id.eq(conversation))
                        .filter(conversations::seq_floor.gt(conversations::last_seq)),
                )
                .set(conversations::seq_floor.eq(conversations::last_seq))
                .execute(&mut *conn)
                .await
                .map_err($crate::store::sql::classify)?;
                Ok(())
            }

            async fn reserve_seq(
                &self,
                conversation: &str,
                n: i64,
            ) -> $crate::store::StoreResult<i64> {
                use $crate::schema::conversations;
                use $crate::store::sql::NewConversation;
                let row = NewConversation::for_id(conversation, gochat_infra::time::now_ms())?;
                let n = n.max(1);
                let mut conn = self.writer().await?;
                $crate::store::sql::retry_tx!(conn, i64, async |conn| {
                    // Lock the row first (X), then create it if missing: taking a shared lock
                    // on a duplicate and upgrading it later deadlocks concurrent callers.
                    diesel::update(conversations::table.filter(conversations::id.eq(conversation)))
                        .set(conversations::updated_at.eq(row.updated_at))
                        .execute(conn)
                        .await?;
                    diesel::insert_or_ignore_into(conversations::table)
                        .values(&row)
                        .execute(conn)
                        .await?;
                    diesel::update(
                        conversations::table
                            .filter(conversations::id.eq(conversation))
                            .filter(conversations::seq_floor.lt(conversations::last_seq)),
                    )
                    .set(conversations::seq_floor.eq(conversations::last_seq))
                    .execute(conn)
                    .await?;
                    diesel::update(conversations::table.filter(conversations::id.eq(conversation)))
                        .set(conversations::seq_floor.eq(conversations::seq_floor + n))
                        .execute(conn)
                        .await?;
                    Ok(conversations::table
                        .find(conversation)
                        .select(conversations::seq_floor)
                        .first(conn)
                        .await?)
                })
                .map_err(Into::into)
            }

            async fn create_group(
                &self,
                group: &$crate::model::Group,
                members: &[(i64, i32)],
                now: i64,
            ) -> $crate::store::StoreResult<$crate::model::Group> {
                use $crate::model::Group;
                use $crate::schema::{conversations, group_members, groups};
                use $crate::store::sql::{NewConversation, NewGroupMember};
                let conv = NewConversation::for_id(
                    &gochat_infra::ids::group_conversation_id(group.id),
                    now,
                )?;
                let rows: Vec<NewGroupMember> = members
                    .iter()
                    .map(|&(user_id, role)| NewGroupMember {
                        group_id: group.id,
                        user_id,
                        role,
                        joined_at: now,
                    })
                    .collect();
                let mut conn = self.writer().await?;
                $crate::store::sql::retry_tx!(conn, Group, async |conn| {
                    diesel::insert_into(groups::table)
                        .values(group)
                        .execute(conn)
                        .await?;
                    diesel::insert_or_ignore_into(conversations::table)
                        .values(&conv)
                        .execute(conn)
                        .await?;
                    for chunk in rows.chunks($crate::store::sql::INSERT_CHUNK) {
                        $batch!(
                            conn,
                            insert_or_ignore_into,
                            group_members::table,
                            chunk.to_vec()
                        )?;
                    }
                    let count: i64 = group_members::table
                        .filter(group_members::group_id.eq(group.id))
                        .count()
                        .get_result(conn)
                        .await?;
                    diesel::update(groups::table.find(group.id))
                        .set(groups::member_count.eq(i32::try_from(count).unwrap_or(i32::MAX)))
                        .execute(conn)
                        .await?;
                    Ok(groups::table
                        .find(group.id)
                        .select(Group::as_select())
                        .first(conn)
                        .await?)
                })
                .map_err(Into::into)
            }

            async fn get_group(
                &self,
                id: i64,
            ) -> $crate::store::StoreResult<Option<$crate::model::Group>> {
                use $crate::schema::groups;
                let mut conn = self.quick_reader().await?;
                groups::table
                    .find(id)
                    .select($crate::model::Group::as_select())
                    .first(&mut *conn)
                    .await
                    .optional()
                    .map_err($crate::store::sql::classify)
            }

            async fn get_groups(
                &self,
                ids: &[i64],
            ) -> $crate::store::StoreResult<Vec<$crate::model::Group>> {
                use $crate::schema::groups;
                if ids.is_empty() {
                    return Ok(Vec::new());
                }
                let mut conn = self.reader().await?;
                groups::table
                    .filter(groups::id.eq_any(ids))
                    .select($crate::model::Group::as_select())
                    .load(&mut *conn)
                    .await
                    .map_err($crate::store::sql::classify)
            }

            async fn add_group_members(
                &self,
                group: i64,
                users: &[i64],
                role: i32,
                max_members: i64,
                now: i64,
            ) -> $crate::store::StoreResult<($crate::model::Group, i64)> {
                use $crate::model::Group;
                use $crate::schema::{group_members, groups};
                use $crate::store::StoreError;
                use $crate::store::sql::{NewGroupMember, TxError};
                let rows: Vec<NewGroupMember> = users
                    .iter()
                    .map(|&user_id| NewGroupMember {
                        group_id: group,
                        user_id,
                        role,
                        joined_at: now,
                    })
                    .collect();
                let mut conn = self.writer().await?;
                $crate::store::sql::retry_tx!(conn, (Group, i64), async |conn| {
                    // The UPDATE locks the group row until commit, serializing membership changes.
                    diesel::update(groups::table.find(group))
                        .set(groups::updated_at.eq(now))
                        .execute(conn)
                        .await?;
                    let exists: Option<i64> = groups::table
                        .find(group)
                        .select(groups::id)
                        .first(conn)
                        .await
                        .optional()?;
                    if exists.is_none() {
                        return Err(TxError::Store(StoreError::GroupNotFound(group)));
                    }
                    let mut added = 0i64;
                    for chunk in rows.chunks($crate::store::sql::INSERT_CHUNK) {
                        let n = $batch!(
                            conn,
                            insert_or_ignore_into,
                            group_members::table,
                            chunk.to_vec()
                        )?;
                        added += i64::try_from(n).unwrap_or(0);
                    }
                    let count: i64 = group_members::table
                        .filter(group_members::group_id.eq(group))
                        .count()
                        .get_result(conn)
                        .await?;
                    if count > max_members {
                        return Err(TxError::Store(StoreError::GroupFull {
                            group,
                            limit: max_members,
                        }));
                    }
                    diesel::update(groups::table.find(group))
                        .set(groups::member_count.eq(i32::try_from(count).unwrap_or(i32::MAX)))
                        .execute(conn)
                        .await?;
                    let g = groups::table
                        .find(group)
                        .select(Group::as_select())
                        .first(conn)
                        .await?;
                    Ok((g, added))
                })
                .map_err(Into::into)
            }

            async fn remove_group_member(
                &self,
                group: i64,
                user: i64,
                now: i64,
            ) -> $crate::store::StoreResult<($crate::model::Group, bool)> {
                use $crate::model::Group;
                use $crate::schema::{group_members, groups};
                use $crate::store::StoreError;
                use $crate::store::sql::TxError;
                let mut conn = self.writer().await?;
                $crate::store::sql::retry_tx!(conn, (Group, bool), async |conn| {
                    diesel::update(groups::table.find(group))
                        .set(groups::updated_at.eq(now))
                        .execute(conn)
                        .await?;
                    let exists: Option<i64> = groups::table
                        .find(group)
                        .select(groups::id)
                        .first(conn)
                        .await
                        .optional()?;
                    if exists.is_none() {
                        return Err(TxError::Store(StoreError::GroupNotFound(group)));
                    }
                    let removed = diesel::delete(
                        group_members::table
                            .filter(group_members::group_id.eq(group))
                            .filter(group_members::user_id.eq(user)),
                    )
                    .execute(conn)
                    .await?;
                    let count: i64 = group_members::table
                        .filter(group_members::group_id.eq(group))
                        .count()
                        .get_result(conn)
                        .await?;
                    diesel::update(groups::table.find(group))
                        .set(groups::member_count.eq(i32::try_from(count).unwrap_or(i32::MAX)))
                        .execute(conn)
                        .await?;
                    let g = groups::table
                        .find(group)
                        .select(Group::as_select())
                        .first(conn)
                        .await?;
                    Ok((g, removed > 0))
                })
                .map_err(Into::into)
            }

            async fn group_members(
                &self,
                group: i64,
                offset: i64,
                limit: i64,
            ) -> $crate::store::StoreResult<(Vec<$crate::model::GroupMember>, i64)> {
                use $crate::schema::group_members;
                let mut conn = self.reader().await?;
                let rows = group_members::table
                    .filter(group_members::group_id.eq(group))
                    .order(group_members::id.asc())
                    .offset(offset.max(0))
                    .limit(limit.max(0))
                    .select($crate::model::GroupMember::as_select())
                    .load(&mut *conn)
                    .await
                    .map_err($crate::store::sql::classify)?;
                // The group's own count (kept right by every change of its members, in the
                // same transaction): one row by key, where a COUNT read the whole group's index
                // for each page, and the task service reads every page of a large group for each
                // of its messages.
                let total: Option<i32> = $crate::schema::groups::table
                    .find(group)
                    .select($crate::schema::groups::member_count)
                    .first(&mut *conn)
                    .await
                    .optional()
                    .map_err($crate::store::sql::classify)?;
                Ok((rows, i64::from(total.unwrap_or(0))))
            }

            async fn member_ids_page(
                &self,
                group: i64,
                from: $crate::store::MemberCursor,
                limit: i64,
            ) -> $crate::store::StoreResult<Vec<(i64, i64)>> {
                use $crate::schema::group_members;
                let mut conn = self.reader().await?;
                let page = group_members::table
                    .filter(group_members::group_id.eq(group))
                    .order(group_members::id.asc())
                    .select((group_members::id, group_members::user_id))
                    .limit(limit.max(0));
                match from {
                    $crate::store::MemberCursor::Offset(n) => {
                        page.offset(n.max(0)).load(&mut *conn).await
                    }
                    // (group_id, id) is the index's order (the row id rides in every entry of
                    // idx_group_members_group), so this is one seek and a short scan.
                    $crate::store::MemberCursor::After(row) => {
                        page.filter(group_members::id.gt(row))
                            .load(&mut *conn)
                            .await
                    }
                }
                .map_err($crate::store::sql::classify)
            }

            async fn group_member(
                &self,
                group: i64,
                user: i64,
            ) -> $crate::store::StoreResult<Option<$crate::model::GroupMember>> {
                use $crate::schema::group_members;
                let mut conn = self.quick_reader().await?;
                group_members::table
                    .filter(group_members::group_id.eq(group))
                    .filter(group_members::user_id.eq(user))
                    .select($crate::model::GroupMember::as_select())
                    .first(&mut *conn)
                    .await
                    .optional()
                    .map_err($crate::store::sql::classify)
            }

            async fn group_member_ids(&self, group: i64) -> $crate::store::StoreResult<Vec<i64>> {
                use $crate::schema::group_members;
                let mut conn = self.reader().await?;
                group_members::table
                    .filter(group_members::group_id.eq(group))
                    .order(group_members::id.asc())
                    .select(group_members::user_id)
                    .load(&mut *conn)
                    .await
                    .map_err($crate::store::sql::classify)
            }

            async fn ensure_single_conversation(
                &self,
                conversation: &str,
                a: i64,
                b: i64,
                now: i64,
            ) -> $crate::store::StoreResult<($crate::model::Conversation, bool)> {
                use $crate::model::Conversation;
                use $crate::schema::{conversation_members, conversations};
                use $crate::store::sql::{NewConversation, NewConversationMember};
                let row = NewConversation::for_id(conversation, now)?;
                let members = [a, b].map(|user_id| NewConversationMember {
                    conversation_id: conversation.to_owned(),
                    user_id,
                    joined_at: now,
                });
                let mut conn = self.writer().await?;
                $crate::store::sql::retry_tx!(conn, (Conversation, bool), async |conn| {
                    let created = diesel::insert_or_ignore_into(conversations::table)
                        .values(&row)
                        .execute(conn)
                        .await?;
                    $batch!(
                        conn,
                        insert_or_ignore_into,
                        conversation_members::table,
                        members.to_vec()
                    )?;
                    let c = conversations::table
                        .find(conversation)
                        .select(Conversation::as_select())
                        .first(conn)
                        .await?;
                    Ok((c, created > 0))
                })
                .map_err(Into::into)
            }

            async fn get_conversation(
                &self,
                id: &str,
            ) -> $crate::store::StoreResult<Option<$crate::model::Conversation>> {
                use $crate::schema::conversations;
                let mut conn = self.quick_reader().await?;
                conversations::table
                    .find(id)
                    .select($crate::model::Conversation::as_select())
                    .first(&mut *conn)
                    .await
                    .optional()
                    .map_err($crate::store::sql::classify)
            }

            async fn single_chat_peers(&self, user: i64) -> $crate::store::StoreResult<Vec<i64>> {
                use $crate::schema::conversation_members;
                // One index range, a row per conversation the user is in: a quick read for
                // every user but one in thousands of conversations.
                let mut conn = self.quick_reader().await?;
                let ids: Vec<String> = conversation_members::table
                    .filter(conversation_members::user_id.eq(user))
                    .select(conversation_members::conversation_id)
                    .load(&mut *conn)
                    .await
                    .map_err($crate::store::sql::classify)?;
                // Only single chats have two members whose ids the conversation id names.
                Ok(ids
                    .iter()
                    .filter_map(|id| match gochat_infra::ids::ConversationKind::parse(id) {
                        Some(gochat_infra::ids::ConversationKind::Single(a, b)) => {
                            Some(if a == user { b } else { a })
                        }
                        _ => None,
                    })
                    .collect())
            }

            async fn user_conversations(
                &self,
                user: i64,
                offset: i64,
                limit: i64,
            ) -> $crate::store::StoreResult<(Vec<$crate::model::UserConversation>, i64)> {
                use std::collections::HashMap;
                use $crate::model::{Conversation, Message, UserConversation};
                use $crate::schema::{
                    conversation_members, conversations, group_members, messages,
                    user_read_pointers,
                };
                macro_rules! mine {
                    () => {
                        conversations::id
                            .eq_any(
                                conversation_members::table
                                    .filter(conversation_members::user_id.eq(user))
                                    .select(conversation_members::conversation_id),
                            )
                            .or(conversations::group_id.assume_not_null().eq_any(
                                group_members::table
                                    .filter(group_members::user_id.eq(user))
                                    .select(group_members::group_id),
                            ))
                            .or(conversations::kind.eq(3))
                    };
                }
                let mut conn = self.reader().await?;
                let rows: Vec<Conversation> = conversations::table
                    .filter(mine!())
                    .order((
                        conversations::last_message_at.desc(),
                        conversations::id.asc(),
                    ))
                    .offset(offset.max(0))
                    .limit(limit.max(0))
                    .select(Conversation::as_select())
                    .load(&mut *conn)
                    .await
                    .map_err($crate::store::sql::classify)?;
                let total: i64 = conversations::table
                    .filter(mine!())
                    .count()
                    .get_result(&mut *conn)
                    .await
                    .map_err($crate::store::sql::classify)?;
                let ids: Vec<&str> = rows.iter().map(|c| c.id.as_str()).collect();
                let pointers: HashMap<String, i64> = user_read_pointers::table
                    .filter(user_read_pointers::user_id.eq(user))
                    .filter(user_read_pointers::conversation_id.eq_any(&ids))
                    .select((
                        user_read_pointers::conversation_id,
                        user_read_pointers::last_read_seq_id,
                    ))
                    .load::<(String, i64)>(&mut *conn)
                    .await
                    .map_err($crate::store::sql::classify)?
                    .into_iter()
                    .collect();
                let last_ids: Vec<i64> = rows.iter().filter_map(|c| c.last_message_id).collect();
                let mut last: HashMap<i64, Message> = messages::table
                    .filter(messages::id.eq_any(&last_ids))
                    .select(Message::as_select())
                    .load(&mut *conn)
                    .await
                    .map_err($crate::store::sql::classify)?
                    .into_iter()
                    .map(|m| (m.id, m))
                    .collect();
                let out = rows
                    .into_iter()
                    .map(|c| UserConversation {
                        last_read_seq: pointers.get(&c.id).copied().unwrap_or(0),
                        last_message: c.last_message_id.and_then(|id| last.remove(&id)),
                        conversation: c,
                    })
                    .collect();
                Ok((out, total))
            }

            async fn read_pointer(
                &self,
                user: i64,
                conversation: &str,
            ) -> $crate::store::StoreResult<i64> {
                use $crate::schema::user_read_pointers;
                let mut conn = self.quick_reader().await?;
                let v: Option<i64> = user_read_pointers::table
                    .filter(user_read_pointers::user_id.eq(user))
                    .filter(user_read_pointers::conversation_id.eq(conversation))
                    .select(user_read_pointers::last_read_seq_id)
                    .first(&mut *conn)
                    .await
                    .optional()
                    .map_err($crate::store::sql::classify)?;
                Ok(v.unwrap_or(0))
            }

            async fn update_read_pointer(
                &self,
                user: i64,
                conversation: &str,
                seq: i64,
                now: i64,
            ) -> $crate::store::StoreResult<(i64, i64)> {
                use $crate::schema::{conversations, user_read_pointers};
                use $crate::store::StoreError;
                use $crate::store::sql::{NewReadPointer, TxError};
                let mut conn = self.writer().await?;
                $crate::store::sql::retry_tx!(conn, (i64, i64), async |conn| {
                    let last_seq: Option<i64> = conversations::table
                        .find(conversation)
                        .select(conversations::last_seq)
                        .first(conn)
                        .await
                        .optional()?;
                    let Some(last_seq) = last_seq else {
                        return Err(TxError::Store(StoreError::ConversationNotFound(
                            conversation.to_owned(),
                        )));
                    };
                    let target = seq.min(last_seq).max(0);
                    // Move an existing pointer forward (X lock); create a missing one with the
                    // target; and when a concurrent call created it first (our insert was
                    // ignored), move that one forward too. A lock upgrade between two such
                    // calls may deadlock InnoDB: retry_tx runs the transaction again.
                    let forward = diesel::update(
                        user_read_pointers::table
                            .filter(user_read_pointers::user_id.eq(user))
                            .filter(user_read_pointers::conversation_id.eq(conversation))
                            .filter(user_read_pointers::last_read_seq_id.lt(target)),
                    )
                    .set((
                        user_read_pointers::last_read_seq_id.eq(target),
                        user_read_pointers::updated_at.eq(now),
                    ));
                    if forward.clone().execute(conn).await? == 0 {
                        let inserted = diesel::insert_or_ignore_into(user_read_pointers::table)
                            .values(&NewReadPointer {
                                user_id: user,
                                conversation_id: conversation,
                                last_read_seq_id: target,
                                updated_at: now,
                            })
                            .execute(conn)
                            .await?;
                        if inserted == 0 {
                            forward.execute(conn).await?;
                        }
                    }
                    let pointer: i64 = user_read_pointers::table
                        .filter(user_read_pointers::user_id.eq(user))
                        .filter(user_read_pointers::conversation_id.eq(conversation))
                        .select(user_read_pointers::last_read_seq_id)
                        .first(conn)
                        .await?;
                    Ok((pointer, last_seq))
                })
                .map_err(Into::into)
            }
        }
    };
}

pub(crate) use impl_sql_store;
