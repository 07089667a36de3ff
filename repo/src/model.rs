//! Rows and values shared by the store, the cache and the services. Ids are `i64` snowflakes;
//! times are Unix milliseconds.

use diesel::prelude::*;
use serde::{Deserialize, Serialize};

use crate::schema;

/// A user as stored (the password hash never leaves repo).
#[derive(
    Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Queryable, Selectable, Insertable,
)]
#[diesel(table_name = schema::users)]
pub struct User {
    /// Snowflake id.
    pub id: i64,
    /// Unique login name.
    pub username: String,
    /// The argon2 PHC string; empty in values read from the cache (it is never cached).
    #[serde(skip)]
    pub password_hash: String,
    /// Display name.
    pub nickname: String,
    /// Avatar address.
    pub avatar_url: String,
    /// Creation time.
    pub created_at: i64,
    /// Last change.
    pub updated_at: i64,
}

/// Changes to a user; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct UserChanges {
    /// New display name.
    pub nickname: Option<String>,
    /// New avatar.
    pub avatar_url: Option<String>,
    /// New password hash (already hashed).
    pub password_hash: Option<String>,
}

/// A stored message.
#[derive(
    Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Queryable, Selectable, Insertable,
)]
#[diesel(table_name = schema::messages, treat_none_as_default_value = false)]
pub struct Message {
    /// Snowflake id.
    pub id: i64,
    /// Its conversation.
    pub conversation_id: String,
    /// Its author.
    pub sender_id: i64,
    /// Spec message type (1 text, 2 image, 3 file, 4 system).
    pub message_type: i32,
    /// The body.
    pub content: String,
    /// Position in the conversation, from 1, gap-free.
    pub seq_id: i64,
    /// The sender's idempotency key, if it sent one.
    pub client_msg_id: Option<String>,
    /// Storage time.
    pub created_at: i64,
}

/// The outcome of storing one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaveOutcome {
    /// The stored message: the new one, or the original of a duplicate.
    pub message: Message,
    /// Whether (sender, client_msg_id) was stored before.
    pub duplicate: bool,
}

/// Which way a history page runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Ascending seqs after an exclusive lower bound.
    Forward {
        /// Exclusive lower bound.
        after_seq: i64,
    },
    /// Descending seqs before an exclusive upper bound (`None`: from the latest).
    Backward {
        /// Exclusive upper bound.
        before_seq: Option<i64>,
    },
}

/// A group.
#[derive(
    Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Queryable, Selectable, Insertable,
)]
#[diesel(table_name = schema::groups)]
pub struct Group {
    /// Snowflake id.
    pub id: i64,
    /// Name shown to members.
    pub name: String,
    /// The owner (always a member).
    pub owner_id: i64,
    /// Members right now.
    pub member_count: i32,
    /// Avatar address.
    pub avatar_url: String,
    /// Creation time.
    pub created_at: i64,
    /// Last change.
    pub updated_at: i64,
}

/// Group roles, stored as their numbers.
pub mod role {
    /// An ordinary member.
    pub const MEMBER: i32 = 1;
    /// An administrator.
    pub const ADMIN: i32 = 2;
    /// The owner.
    pub const OWNER: i32 = 3;
}

/// One membership of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Queryable, Selectable)]
#[diesel(table_name = schema::group_members)]
pub struct GroupMember {
    /// The member.
    pub user_id: i64,
    /// See [`role`].
    pub role: i32,
    /// When they joined.
    pub joined_at: i64,
}

/// A conversation row.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = schema::conversations)]
pub struct Conversation {
    /// `s_<lo>_<hi>`, `g_<group>` or `world`.
    pub id: String,
    /// 1 single, 2 group, 3 world.
    pub kind: i32,
    /// The group, for group conversations.
    pub group_id: Option<i64>,
    /// The highest stored seq.
    pub last_seq: i64,
    /// The message with that seq.
    pub last_message_id: Option<i64>,
    /// Time of the last message (or of creation): the activity order.
    pub last_message_at: i64,
    /// Creation time.
    pub created_at: i64,
}

/// A conversation as one user sees it in their list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserConversation {
    /// The conversation.
    pub conversation: Conversation,
    /// The user's read pointer.
    pub last_read_seq: i64,
    /// The last message, when there is one.
    pub last_message: Option<Message>,
}

impl UserConversation {
    /// Messages after the read pointer; never negative.
    pub fn unread(&self) -> i64 {
        unread(self.conversation.last_seq, self.last_read_seq)
    }
}

/// Unread count from a conversation's last seq and a read pointer; never negative.
pub fn unread(last_seq: i64, last_read_seq: i64) -> i64 {
    (last_seq - last_read_seq).max(0)
}

/// A (sender, client_msg_id) seen before: which message it became.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupEntry {
    /// The original message.
    pub message_id: i64,
    /// Its seq.
    pub seq_id: i64,
    /// Its conversation.
    pub conversation_id: String,
}

/// One gateway a user is online on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    /// The gateway holding the user's session(s).
    pub gateway_id: String,
    /// When this entry lapses unless refreshed (Unix ms).
    pub expires_at: i64,
}

/// A login session (both tokens of one login name it).
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = schema::auth_sessions)]
pub struct AuthSession {
    /// Snowflake id.
    pub id: i64,
    /// Whose.
    pub user_id: i64,
    /// The current refresh token's id.
    pub refresh_jti: String,
    /// 1 after logout.
    pub revoked: i32,
    /// End unless refreshed (Unix ms).
    pub expires_at: i64,
    /// Login time.
    pub created_at: i64,
    /// Last rotation.
    pub updated_at: i64,
}

impl AuthSession {
    /// Not revoked and not expired at `now`.
    pub fn is_active(&self, now: i64) -> bool {
        self.revoked == 0 && self.expires_at > now
    }
}
