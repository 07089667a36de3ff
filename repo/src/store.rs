//! The store: everything repo keeps in a relational database, behind one trait ([`Store`]) with
//! two diesel-async backends that share their query code (`sql.rs`):
//!
//! - [`sqlite::SqliteStore`], the embedded default: one file in WAL mode, one writer connection
//!   behind a mutex (SQLite serializes writers anyway; queuing them in-process avoids
//!   `SQLITE_BUSY`), and a pool of reader connections.
//! - [`mysql::MysqlStore`]: MySQL/MariaDB through `AsyncMysqlConnection` behind a deadpool pool.
//!
//! Migrations (`migrations/sqlite`, `migrations/mysql`) are embedded in the binary and applied by
//! [`AnyStore::migrate`].

pub mod mysql;
mod sql;
pub mod sqlite;

use std::future::Future;

use gochat_infra::telemetry;
use gochat_infra::{AppError, ErrorCode};

use crate::model::{
    AuthSession, Conversation, Direction, Group, GroupMember, Message, SaveOutcome, User,
    UserChanges, UserConversation,
};

/// Where a page of a group's members starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberCursor {
    /// After skipping this many members in join order.
    Offset(i64),
    /// After the membership row with this id (keyset paging: an index seek, where an offset
    /// steps over every earlier member again, and unmoved by members joining or leaving).
    After(i64),
}

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A username that is taken.
    #[error("username is taken")]
    UserExists,
    /// The group does not exist.
    #[error("group {0} not found")]
    GroupNotFound(i64),
    /// Adding members would pass the group's limit.
    #[error("group {group} is full ({limit} members at most)")]
    GroupFull {
        /// The group.
        group: i64,
        /// Its limit.
        limit: i64,
    },
    /// The conversation does not exist.
    #[error("conversation {0} not found")]
    ConversationNotFound(String),
    /// A seq offered for storage is already taken in its conversation.
    #[error("seq {seq} is already taken in conversation {conversation}")]
    SeqConflict {
        /// The conversation.
        conversation: String,
        /// The seq.
        seq: i64,
    },
    /// A request the store cannot carry out as asked.
    #[error("{0}")]
    Invalid(String),
    /// The database or the pool could not be reached.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// Any other database failure.
    #[error("database error: {0}")]
    Database(String),
}

impl From<StoreError> for AppError {
    fn from(err: StoreError) -> Self {
        let code = match &err {
            StoreError::UserExists => ErrorCode::UserExists,
            StoreError::GroupNotFound(_) => ErrorCode::GroupNotFound,
            StoreError::GroupFull { .. } => ErrorCode::GroupFull,
            StoreError::SeqConflict { .. } => ErrorCode::SeqConflict,
            StoreError::ConversationNotFound(_) => ErrorCode::NotFound,
            StoreError::Invalid(_) => ErrorCode::InvalidParameter,
            StoreError::Unavailable(_) => ErrorCode::Unavailable,
            StoreError::Database(_) => ErrorCode::Internal,
        };
        AppError::new(code, err.to_string())
    }
}

/// Store results.
pub type StoreResult<T> = Result<T, StoreError>;

/// Everything repo reads and writes in the database.
pub trait Store: Send + Sync + 'static {
    /// Inserts a user; [`StoreError::UserExists`] when the username is taken.
    fn create_user(&self, user: &User) -> impl Future<Output = StoreResult<()>> + Send;
    /// A user by id.
    fn get_user(&self, id: i64) -> impl Future<Output = StoreResult<Option<User>>> + Send;
    /// A user by username.
    fn get_user_by_username(
        &self,
        username: &str,
    ) -> impl Future<Output = StoreResult<Option<User>>> + Send;
    /// The users among `ids` that exist (any order).
    fn get_users(&self, ids: &[i64]) -> impl Future<Output = StoreResult<Vec<User>>> + Send;
    /// Applies `changes`; `None` when the user does not exist.
    fn update_user(
        &self,
        id: i64,
        changes: &UserChanges,
        now: i64,
    ) -> impl Future<Output = StoreResult<Option<User>>> + Send;

    /// Inserts a login session.
    fn create_session(&self, session: &AuthSession)
    -> impl Future<Output = StoreResult<()>> + Send;
    /// Replaces the refresh token id of an active session if `old_jti` is the current one;
    /// returns the session after a rotation, `None` when nothing was rotated.
    fn rotate_session(
        &self,
        id: i64,
        old_jti: &str,
        new_jti: &str,
        expires_at: i64,
        now: i64,
    ) -> impl Future<Output = StoreResult<Option<AuthSession>>> + Send;
    /// Revokes a session; returns whether it was active.
    fn revoke_session(&self, id: i64, now: i64) -> impl Future<Output = StoreResult<bool>> + Send;
    /// A session by id.
    fn get_session(&self, id: i64)
    -> impl Future<Output = StoreResult<Option<AuthSession>>> + Send;

    /// Stores messages in one transaction, keeping each conversation's last seq and last message.
    /// A message whose id or (sender_id, client_msg_id) is stored already is not stored again:
    /// its outcome carries the original. A seq already taken by another message fails the whole
    /// batch with [`StoreError::SeqConflict`].
    fn save_messages(
        &self,
        messages: &[Message],
    ) -> impl Future<Output = StoreResult<Vec<SaveOutcome>>> + Send {
        self.save_batch(messages, false)
    }
    /// [`Store::save_messages`], and with `mark_read` each sender's read pointer also moves to
    /// its newest newly stored message of the batch, in the same transaction.
    fn save_batch(
        &self,
        messages: &[Message],
        mark_read: bool,
    ) -> impl Future<Output = StoreResult<Vec<SaveOutcome>>> + Send;
    /// A message by id.
    fn get_message(&self, id: i64) -> impl Future<Output = StoreResult<Option<Message>>> + Send;
    /// The message stored for (sender, client_msg_id).
    fn find_by_client_msg_id(
        &self,
        sender: i64,
        client_msg_id: &str,
    ) -> impl Future<Output = StoreResult<Option<Message>>> + Send;
    /// A page of a conversation's history and whether more lies beyond it.
    fn get_messages(
        &self,
        conversation: &str,
        direction: Direction,
        limit: i64,
    ) -> impl Future<Output = StoreResult<(Vec<Message>, bool)>> + Send;
    /// The lowest value a seq counter may restart from: the largest stored seq, or the largest
    /// seq reserved through [`Store::reserve_seq`], whichever is higher.
    fn seq_floor(&self, conversation: &str) -> impl Future<Output = StoreResult<i64>> + Send;
    /// Forgets seqs reserved through [`Store::reserve_seq`] but never stored: the durable
    /// counter restarts at the conversation's last stored seq. The conversation's owner calls it
    /// (through `GenerateSeqID.from_stored`) when the counter's state is unknown.
    fn rewind_seq(&self, conversation: &str) -> impl Future<Output = StoreResult<()>> + Send;
    /// Reserves `n` seqs durably in the database (the fallback while the cache is down) and
    /// returns the last one.
    fn reserve_seq(
        &self,
        conversation: &str,
        n: i64,
    ) -> impl Future<Output = StoreResult<i64>> + Send;

    /// Creates a group, its conversation, and its members (role per member).
    fn create_group(
        &self,
        group: &Group,
        members: &[(i64, i32)],
        now: i64,
    ) -> impl Future<Output = StoreResult<Group>> + Send;
    /// A group by id.
    fn get_group(&self, id: i64) -> impl Future<Output = StoreResult<Option<Group>>> + Send;
    /// The groups among `ids` that exist (any order).
    fn get_groups(&self, ids: &[i64]) -> impl Future<Output = StoreResult<Vec<Group>>> + Send;
    /// Adds members (existing ones are left alone) unless the group would exceed `max_members`;
    /// returns the group after the change and how many were added.
    fn add_group_members(
        &self,
        group: i64,
        users: &[i64],
        role: i32,
        max_members: i64,
        now: i64,
    ) -> impl Future<Output = StoreResult<(Group, i64)>> + Send;
    /// Removes a member; returns the group after the change and whether the user was a member.
    fn remove_group_member(
        &self,
        group: i64,
        user: i64,
        now: i64,
    ) -> impl Future<Output = StoreResult<(Group, bool)>> + Send;
    /// Members in join order from `offset`, and the total.
    fn group_members(
        &self,
        group: i64,
        offset: i64,
        limit: i64,
    ) -> impl Future<Output = StoreResult<(Vec<GroupMember>, i64)>> + Send;
    /// Up to `limit` members of a group in join order from `from`, each as (membership row id,
    /// user id): the row id is what [`MemberCursor::After`] continues from.
    fn member_ids_page(
        &self,
        group: i64,
        from: MemberCursor,
        limit: i64,
    ) -> impl Future<Output = StoreResult<Vec<(i64, i64)>>> + Send;
    /// One membership.
    fn group_member(
        &self,
        group: i64,
        user: i64,
    ) -> impl Future<Output = StoreResult<Option<GroupMember>>> + Send;
    /// Every member id of a group.
    fn group_member_ids(&self, group: i64) -> impl Future<Output = StoreResult<Vec<i64>>> + Send;

    /// The single chat `conversation` of users `a` and `b`, created when missing; returns it and
    /// whether this call created it.
    fn ensure_single_conversation(
        &self,
        conversation: &str,
        a: i64,
        b: i64,
        now: i64,
    ) -> impl Future<Output = StoreResult<(Conversation, bool)>> + Send;
    /// A conversation by id.
    fn get_conversation(
        &self,
        id: &str,
    ) -> impl Future<Output = StoreResult<Option<Conversation>>> + Send;
    /// A user's conversations (single chats, groups, the world room), newest activity first,
    /// with read pointers and last messages; and the total.
    fn user_conversations(
        &self,
        user: i64,
        offset: i64,
        limit: i64,
    ) -> impl Future<Output = StoreResult<(Vec<UserConversation>, i64)>> + Send;
    /// The other users of `user`'s single chats.
    fn single_chat_peers(&self, user: i64) -> impl Future<Output = StoreResult<Vec<i64>>> + Send;
    /// A user's read pointer in a conversation (0 when never read).
    fn read_pointer(
        &self,
        user: i64,
        conversation: &str,
    ) -> impl Future<Output = StoreResult<i64>> + Send;
    /// Moves the read pointer to `seq` unless that is backwards; never past the last seq.
    /// Returns (pointer after the call, conversation's last seq).
    fn update_read_pointer(
        &self,
        user: i64,
        conversation: &str,
        seq: i64,
        now: i64,
    ) -> impl Future<Output = StoreResult<(i64, i64)>> + Send;
}

/// Either backend, chosen by configuration at run time.
#[derive(Debug, Clone)]
pub enum AnyStore {
    /// The embedded default.
    Sqlite(sqlite::SqliteStore),
    /// MySQL / MariaDB.
    Mysql(mysql::MysqlStore),
}

impl AnyStore {
    /// SQLite: the nice value the writer's group commits run at
    /// ([`sqlite::SqliteStore::set_writer_nice`]). MySQL: nothing (its server schedules itself).
    pub fn set_writer_nice(&self, nice: i32) {
        if let Self::Sqlite(s) = self {
            s.set_writer_nice(nice);
        }
    }

    /// Opens the database named by `url` (`sqlite://PATH`, a plain path, or `mysql://...`),
    /// applying pending migrations first.
    pub async fn open(url: &str, pool_size: usize) -> StoreResult<Self> {
        if url.starts_with("mysql://") {
            Ok(Self::Mysql(mysql::MysqlStore::open(url, pool_size).await?))
        } else {
            let path = url.strip_prefix("sqlite://").unwrap_or(url);
            Ok(Self::Sqlite(
                sqlite::SqliteStore::open(path, pool_size).await?,
            ))
        }
    }

    /// Creates the MySQL database `url` names unless it exists (SQLite creates its file on
    /// open: nothing to do).
    pub async fn create_database(url: &str) -> StoreResult<()> {
        if url.starts_with("mysql://") {
            mysql::create_database(url).await
        } else {
            Ok(())
        }
    }

    /// Which engine this is ("sqlite" or "mysql").
    pub fn engine(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Mysql(_) => "mysql",
        }
    }
}

/// Calls the engine's method and records its duration (`gochat_store_duration_seconds`) and
/// failure (`gochat_store_errors_total`) under `op` = the method's name.
macro_rules! delegate {
    ($self:ident, $s:ident => $_recv:ident . $method:ident($($arg:expr),*)) => {{
        let started = std::time::Instant::now();
        let result = match $self {
            AnyStore::Sqlite($s) => $s.$method($($arg),*).await,
            AnyStore::Mysql($s) => $s.$method($($arg),*).await,
        };
        let op: &'static str = stringify!($method);
        metrics::histogram!(telemetry::STORE_SECONDS, "op" => op)
            .record(started.elapsed().as_secs_f64());
        if result.is_err() {
            metrics::counter!(telemetry::STORE_ERRORS, "op" => op).increment(1);
        }
        result
    }};
}

impl Store for AnyStore {
    async fn create_user(&self, user: &User) -> StoreResult<()> {
        delegate!(self, s => s.create_user(user))
    }
    async fn get_user(&self, id: i64) -> StoreResult<Option<User>> {
        delegate!(self, s => s.get_user(id))
    }
    async fn get_user_by_username(&self, username: &str) -> StoreResult<Option<User>> {
        delegate!(self, s => s.get_user_by_username(username))
    }
    async fn get_users(&self, ids: &[i64]) -> StoreResult<Vec<User>> {
        delegate!(self, s => s.get_users(ids))
    }
    async fn update_user(&self, id: i64, c: &UserChanges, now: i64) -> StoreResult<Option<User>> {
        delegate!(self, s => s.update_user(id, c, now))
    }
    async fn create_session(&self, session: &AuthSession) -> StoreResult<()> {
        delegate!(self, s => s.create_session(session))
    }
    async fn rotate_session(
        &self,
        id: i64,
        old_jti: &str,
        new_jti: &str,
        expires_at: i64,
        now: i64,
    ) -> StoreResult<Option<AuthSession>> {
        delegate!(self, s => s.rotate_session(id, old_jti, new_jti, expires_at, now))
    }
    async fn revoke_session(&self, id: i64, now: i64) -> StoreResult<bool> {
        delegate!(self, s => s.revoke_session(id, now))
    }
    async fn get_session(&self, id: i64) -> StoreResult<Option<AuthSession>> {
        delegate!(self, s => s.get_session(id))
    }
    async fn save_batch(
        &self,
        messages: &[Message],
        mark_read: bool,
    ) -> StoreResult<Vec<SaveOutcome>> {
        delegate!(self, s => s.save_batch(messages, mark_read))
    }
    async fn get_message(&self, id: i64) -> StoreResult<Option<Message>> {
        delegate!(self, s => s.get_message(id))
    }
    async fn find_by_client_msg_id(&self, sender: i64, cmid: &str) -> StoreResult<Option<Message>> {
        delegate!(self, s => s.find_by_client_msg_id(sender, cmid))
    }
    async fn get_messages(
        &self,
        conversation: &str,
        direction: Direction,
        limit: i64,
    ) -> StoreResult<(Vec<Message>, bool)> {
        delegate!(self, s => s.get_messages(conversation, direction, limit))
    }
    async fn seq_floor(&self, conversation: &str) -> StoreResult<i64> {
        delegate!(self, s => s.seq_floor(conversation))
    }
    async fn rewind_seq(&self, conversation: &str) -> StoreResult<()> {
        delegate!(self, s => s.rewind_seq(conversation))
    }
    async fn reserve_seq(&self, conversation: &str, n: i64) -> StoreResult<i64> {
        delegate!(self, s => s.reserve_seq(conversation, n))
    }
    async fn create_group(
        &self,
        g: &Group,
        members: &[(i64, i32)],
        now: i64,
    ) -> StoreResult<Group> {
        delegate!(self, s => s.create_group(g, members, now))
    }
    async fn get_group(&self, id: i64) -> StoreResult<Option<Group>> {
        delegate!(self, s => s.get_group(id))
    }
    async fn get_groups(&self, ids: &[i64]) -> StoreResult<Vec<Group>> {
        delegate!(self, s => s.get_groups(ids))
    }
    async fn add_group_members(
        &self,
        group: i64,
        users: &[i64],
        role: i32,
        max_members: i64,
        now: i64,
    ) -> StoreResult<(Group, i64)> {
        delegate!(self, s => s.add_group_members(group, users, role, max_members, now))
    }
    async fn remove_group_member(
        &self,
        group: i64,
        user: i64,
        now: i64,
    ) -> StoreResult<(Group, bool)> {
        delegate!(self, s => s.remove_group_member(group, user, now))
    }
    async fn group_members(
        &self,
        group: i64,
        offset: i64,
        limit: i64,
    ) -> StoreResult<(Vec<GroupMember>, i64)> {
        delegate!(self, s => s.group_members(group, offset, limit))
    }
    async fn member_ids_page(
        &self,
        group: i64,
        from: MemberCursor,
        limit: i64,
    ) -> StoreResult<Vec<(i64, i64)>> {
        delegate!(self, s => s.member_ids_page(group, from, limit))
    }
    async fn group_member(&self, group: i64, user: i64) -> StoreResult<Option<GroupMember>> {
        delegate!(self, s => s.group_member(group, user))
    }
    async fn group_member_ids(&self, group: i64) -> StoreResult<Vec<i64>> {
        delegate!(self, s => s.group_member_ids(group))
    }
    async fn ensure_single_conversation(
        &self,
        conversation: &str,
        a: i64,
        b: i64,
        now: i64,
    ) -> StoreResult<(Conversation, bool)> {
        delegate!(self, s => s.ensure_single_conversation(conversation, a, b, now))
    }
    async fn get_conversation(&self, id: &str) -> StoreResult<Option<Conversation>> {
        delegate!(self, s => s.get_conversation(id))
    }
    async fn user_conversations(
        &self,
        user: i64,
        offset: i64,
        limit: i64,
    ) -> StoreResult<(Vec<UserConversation>, i64)> {
        delegate!(self, s => s.user_conversations(user, offset, limit))
    }
    async fn single_chat_peers(&self, user: i64) -> StoreResult<Vec<i64>> {
        delegate!(self, s => s.single_chat_peers(user))
    }
    async fn read_pointer(&self, user: i64, conversation: &str) -> StoreResult<i64> {
        delegate!(self, s => s.read_pointer(user, conversation))
    }
    async fn update_read_pointer(
        &self,
        user: i64,
        conversation: &str,
        seq: i64,
        now: i64,
    ) -> StoreResult<(i64, i64)> {
        delegate!(self, s => s.update_read_pointer(user, conversation, seq, now))
    }
}
