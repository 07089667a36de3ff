//! The client contract's JSON shapes: request bodies and queries as clients send them, and
//! the objects of logic's answers as clients see them (snake_case, ids as strings, times in
//! Unix ms).

use gochat_proto::logic as pb;
use serde::{Deserialize, Serialize};

// ---- request bodies ----

/// `POST /auth/register`
#[derive(Debug, Deserialize)]
pub(crate) struct RegisterBody {
    pub username: String,
    pub password: String,
    #[serde(default)]
    pub nickname: Option<String>,
}

/// `POST /auth/login`
#[derive(Debug, Deserialize)]
pub(crate) struct LoginBody {
    pub username: String,
    pub password: String,
}

/// `POST /auth/refresh`
#[derive(Debug, Deserialize)]
pub(crate) struct RefreshBody {
    pub refresh_token: String,
}

/// `POST /conversations`
#[derive(Debug, Deserialize)]
pub(crate) struct CreateConversationBody {
    pub target_user_id: String,
}

/// `POST /conversations/:id/read`
#[derive(Debug, Deserialize)]
pub(crate) struct MarkReadBody {
    pub seq_id: i64,
}

/// `POST /groups`
#[derive(Debug, Deserialize)]
pub(crate) struct CreateGroupBody {
    pub name: String,
    #[serde(default)]
    pub member_ids: Vec<String>,
}

/// `POST /groups/:id/members`
#[derive(Debug, Deserialize)]
pub(crate) struct AddMembersBody {
    pub user_ids: Vec<String>,
}

// ---- queries ----

/// `GET /conversations?page=1&page_size=20`
#[derive(Debug, Deserialize)]
pub(crate) struct PageQuery {
    pub page: Option<i32>,
    pub page_size: Option<i32>,
}

/// `GET /conversations/:id/messages?after_seq=N|before_seq=N&limit=50`
#[derive(Debug, Deserialize)]
pub(crate) struct MessagesQuery {
    pub after_seq: Option<i64>,
    pub before_seq: Option<i64>,
    pub limit: Option<i32>,
}

/// `GET /groups/:id/members?offset=0&limit=200`
#[derive(Debug, Deserialize)]
pub(crate) struct MembersQuery {
    pub offset: Option<i32>,
    pub limit: Option<i32>,
}

// ---- objects ----

/// `user {id, username, nickname, avatar_url, created_at}`
#[derive(Debug, Serialize)]
pub(crate) struct User {
    pub id: String,
    pub username: String,
    pub nickname: String,
    pub avatar_url: String,
    pub created_at: i64,
}

impl From<pb::User> for User {
    fn from(u: pb::User) -> Self {
        Self {
            id: u.id,
            username: u.username,
            nickname: u.nickname,
            avatar_url: u.avatar_url,
            created_at: u.created_at,
        }
    }
}

/// `Message {id, conversation_id, sender_id, type, content, seq_id, created_at}`
#[derive(Debug, Serialize)]
pub(crate) struct Message {
    pub id: String,
    pub conversation_id: String,
    pub sender_id: String,
    #[serde(rename = "type")]
    pub message_type: i32,
    pub content: String,
    pub seq_id: i64,
    pub created_at: i64,
}

impl From<pb::Message> for Message {
    fn from(m: pb::Message) -> Self {
        Self {
            id: m.id,
            conversation_id: m.conversation_id,
            sender_id: m.sender_id,
            message_type: m.r#type,
            content: m.content,
            seq_id: m.seq_id,
            created_at: m.created_at,
        }
    }
}

/// `Conversation {id, type, name, avatar_url, last_message, unread_count, updated_at}`;
/// `last_message` is `null` in an empty conversation.
#[derive(Debug, Serialize)]
pub(crate) struct Conversation {
    pub id: String,
    #[serde(rename = "type")]
    pub conversation_type: i32,
    pub name: String,
    pub avatar_url: String,
    pub last_message: Option<Message>,
    pub unread_count: i64,
    pub updated_at: i64,
}

impl From<pb::Conversation> for Conversation {
    fn from(c: pb::Conversation) -> Self {
        Self {
            id: c.id,
            conversation_type: c.r#type,
            name: c.name,
            avatar_url: c.avatar_url,
            last_message: c.last_message.map(Message::from),
            unread_count: c.unread_count,
            updated_at: c.updated_at,
        }
    }
}

/// `group {id, name, owner_id, member_count, conversation_id, created_at}`
#[derive(Debug, Serialize)]
pub(crate) struct Group {
    pub id: String,
    pub name: String,
    pub owner_id: String,
    pub member_count: i32,
    pub conversation_id: String,
    pub created_at: i64,
}

impl From<pb::Group> for Group {
    fn from(g: pb::Group) -> Self {
        Self {
            id: g.id,
            name: g.name,
            owner_id: g.owner_id,
            member_count: g.member_count,
            conversation_id: g.conversation_id,
            created_at: g.created_at,
        }
    }
}

/// `{user, role, joined_at, is_online}`; role 1 member, 2 admin, 3 owner.
#[derive(Debug, Serialize)]
pub(crate) struct Member {
    pub user: Option<User>,
    pub role: i32,
    pub joined_at: i64,
    pub is_online: bool,
}

impl From<pb::GroupMember> for Member {
    fn from(m: pb::GroupMember) -> Self {
        Self {
            user: m.user.map(User::from),
            role: m.role,
            joined_at: m.joined_at,
            is_online: m.is_online,
        }
    }
}

// ---- response bodies ----

/// `{user}`
#[derive(Debug, Serialize)]
pub(crate) struct UserBody {
    pub user: User,
}

/// `{access_token, refresh_token, expires_in, user}`
#[derive(Debug, Serialize)]
pub(crate) struct TokensBody {
    pub access_token: String,
    pub refresh_token: String,
    pub expires_in: i64,
    pub user: User,
}

/// `{conversations, total}`
#[derive(Debug, Serialize)]
pub(crate) struct ConversationsBody {
    pub conversations: Vec<Conversation>,
    pub total: i32,
}

/// `{conversation}`
#[derive(Debug, Serialize)]
pub(crate) struct ConversationBody {
    pub conversation: Conversation,
}

/// `{messages, has_more}`
#[derive(Debug, Serialize)]
pub(crate) struct MessagesBody {
    pub messages: Vec<Message>,
    pub has_more: bool,
}

/// `{unread_count}`
#[derive(Debug, Serialize)]
pub(crate) struct UnreadBody {
    pub unread_count: i64,
}

/// `{group}`
#[derive(Debug, Serialize)]
pub(crate) struct GroupBody {
    pub group: Group,
}

/// `{members, total}`
#[derive(Debug, Serialize)]
pub(crate) struct MembersBody {
    pub members: Vec<Member>,
    pub total: i32,
}

/// `{}`
#[derive(Debug, Serialize)]
pub(crate) struct EmptyBody {}
