//! ConversationService: a user's conversation list (newest activity first, with last message
//! and unread count), read pointers, single chats, and membership checks.
//!
//! Unread counts are derived, never counted: `last_seq - last_read_seq`, clamped at 0. The read
//! pointer is cached in `unread:{user}:{conv}`; the last seq comes from the conversation row,
//! which every stored message keeps current in the same transaction. So a count cannot drift,
//! survives a cache loss, and never goes negative.

use std::collections::HashMap;

use gochat_infra::ids::{ConversationKind, single_conversation_id};
use gochat_infra::{AppError, ErrorCode, time::now_ms};
use gochat_proto::repo as pb;
use gochat_proto::repo::conversation_service_server::ConversationService;
use tonic::{Request, Response, Status};

use super::{Repo, cache_read, cache_write, conversation_field, id_field, pb_message};
use crate::cache::Cache;
use crate::model::{Conversation, Group, User, UserConversation, unread};
use crate::store::Store;

const DEFAULT_PAGE_SIZE: i64 = 20;
const MAX_PAGE_SIZE: i64 = 100;
/// Default and largest member page of GetConversationMembers.
const DEFAULT_MEMBERS: i64 = 200;
const MAX_MEMBERS: i64 = 1000;

fn conversation_not_found(id: &str) -> AppError {
    AppError::new(ErrorCode::NotFound, format!("conversation {id} not found"))
}

fn pb_type(kind: i32) -> i32 {
    match kind {
        1 => pb::ConversationType::Single as i32,
        2 => pb::ConversationType::Group as i32,
        3 => pb::ConversationType::World as i32,
        _ => pb::ConversationType::Unspecified as i32,
    }
}

impl<S: Store, C: Cache> Repo<S, C> {
    /// A read pointer through the cache.
    pub(crate) async fn load_read_pointer(&self, user: i64, conv: &str) -> Result<i64, AppError> {
        if let Some(v) = cache_read(self.cache().read_ptr_get(user, conv).await, "unread") {
            return Ok(v);
        }
        let v = self.store().read_pointer(user, conv).await?;
        cache_write(
            self.cache()
                .read_ptr_set(user, conv, v, self.settings().entry_ttl)
                .await,
            "unread",
        );
        Ok(v)
    }

    /// Whether `user` may read and write `conv`; with the conversation's type and member count.
    pub async fn membership(
        &self,
        user: i64,
        conv: &str,
    ) -> Result<(bool, ConversationKind, i64), AppError> {
        let kind = conversation_field(conv)?;
        Ok(match kind {
            ConversationKind::World => (true, kind, 0),
            ConversationKind::Single(a, b) => {
                let member = (user == a || user == b)
                    && self.store().get_conversation(conv).await?.is_some();
                (member, kind, 2)
            }
            ConversationKind::Group(g) => {
                let group = self.require_group(g).await?;
                let member = self.is_group_member(g, user).await?;
                (member, kind, i64::from(group.member_count))
            }
        })
    }

    /// Turns rows into what one user sees: names, avatars, peers, unread counts.
    async fn views(
        &self,
        user: i64,
        rows: Vec<UserConversation>,
    ) -> Result<Vec<pb::Conversation>, AppError> {
        let mut peer_ids = Vec::new();
        let mut group_ids = Vec::new();
        for r in &rows {
            match ConversationKind::parse(&r.conversation.id) {
                Some(ConversationKind::Single(a, b)) => {
                    peer_ids.push(if a == user { b } else { a })
                }
                Some(ConversationKind::Group(g)) => group_ids.push(g),
                _ => {}
            }
        }
        let peers: HashMap<i64, User> = self
            .load_users(&peer_ids)
            .await?
            .into_iter()
            .map(|u| (u.id, u))
            .collect();
        let groups: HashMap<i64, Group> = self
            .store()
            .get_groups(&group_ids)
            .await?
            .into_iter()
            .map(|g| (g.id, g))
            .collect();
        Ok(rows
            .into_iter()
            .map(|r| {
                let c = &r.conversation;
                let mut v = pb::Conversation {
                    id: c.id.clone(),
                    r#type: pb_type(c.kind),
                    last_message: r.last_message.as_ref().map(pb_message),
                    unread_count: r.unread(),
                    updated_at: c.last_message_at,
                    last_seq: c.last_seq,
                    last_read_seq: r.last_read_seq,
                    ..Default::default()
                };
                match ConversationKind::parse(&c.id) {
                    Some(ConversationKind::Single(a, b)) => {
                        let peer = if a == user { b } else { a };
                        v.peer_user_id = peer.to_string();
                        v.member_count = 2;
                        if let Some(p) = peers.get(&peer) {
                            v.name = p.nickname.clone();
                            v.avatar_url = p.avatar_url.clone();
                        }
                    }
                    Some(ConversationKind::Group(g)) => {
                        v.group_id = g.to_string();
                        if let Some(group) = groups.get(&g) {
                            v.name = group.name.clone();
                            v.avatar_url = group.avatar_url.clone();
                            v.member_count = group.member_count;
                        }
                    }
                    Some(ConversationKind::World) => v.name = "World".to_owned(),
                    None => {}
                }
                v
            })
            .collect())
    }

    /// One conversation as `user` sees it.
    async fn view_one(&self, user: i64, conv: Conversation) -> Result<pb::Conversation, AppError> {
        let last_read_seq = self.load_read_pointer(user, &conv.id).await?;
        let last_message = match conv.last_message_id {
            Some(id) => self.store().get_message(id).await?,
            None => None,
        };
        let row = UserConversation {
            conversation: conv,
            last_read_seq,
            last_message,
        };
        self.views(user, vec![row])
            .await?
            .pop()
            .ok_or_else(|| AppError::internal("conversation view vanished"))
    }
}

#[tonic::async_trait]
impl<S: Store, C: Cache> ConversationService for Repo<S, C> {
    async fn get_user_conversations(
        &self,
        request: Request<pb::GetUserConversationsRequest>,
    ) -> Result<Response<pb::GetUserConversationsResponse>, Status> {
        let r = request.into_inner();
        let user = id_field("user_id", &r.user_id)?;
        let page = i64::from(r.page.max(1));
        let size = match i64::from(r.page_size) {
            0 => DEFAULT_PAGE_SIZE,
            n if (1..=MAX_PAGE_SIZE).contains(&n) => n,
            n => {
                return Err(AppError::invalid(format!(
                    "page_size must be 1..={MAX_PAGE_SIZE}, got {n}"
                ))
                .into());
            }
        };
        let offset = (page - 1).saturating_mul(size);
        let (rows, total) = self
            .store()
            .user_conversations(user, offset, size)
            .await
            .map_err(AppError::from)?;
        let has_more = offset + i64::try_from(rows.len()).unwrap_or(0) < total;
        let conversations = self.views(user, rows).await?;
        Ok(Response::new(pb::GetUserConversationsResponse {
            conversations,
            total: i32::try_from(total).unwrap_or(i32::MAX),
            has_more,
        }))
    }

    async fn update_read_pointer(
        &self,
        request: Request<pb::UpdateReadPointerRequest>,
    ) -> Result<Response<pb::UpdateReadPointerResponse>, Status> {
        let r = request.into_inner();
        let user = id_field("user_id", &r.user_id)?;
        conversation_field(&r.conversation_id)?;
        if r.seq_id < 0 {
            return Err(AppError::invalid("seq_id must not be negative").into());
        }
        let result = self
            .store()
            .update_read_pointer(user, &r.conversation_id, r.seq_id, now_ms())
            .await;
        cache_write(
            self.cache().read_ptr_del(user, &r.conversation_id).await,
            "unread",
        );
        let (pointer, last_seq) = result.map_err(AppError::from)?;
        Ok(Response::new(pb::UpdateReadPointerResponse {
            last_read_seq: pointer,
            unread_count: unread(last_seq, pointer),
        }))
    }

    async fn get_unread_count(
        &self,
        request: Request<pb::GetUnreadCountRequest>,
    ) -> Result<Response<pb::GetUnreadCountResponse>, Status> {
        let r = request.into_inner();
        let user = id_field("user_id", &r.user_id)?;
        conversation_field(&r.conversation_id)?;
        let conv = self
            .store()
            .get_conversation(&r.conversation_id)
            .await
            .map_err(AppError::from)?
            .ok_or_else(|| conversation_not_found(&r.conversation_id))?;
        let pointer = self.load_read_pointer(user, &r.conversation_id).await?;
        Ok(Response::new(pb::GetUnreadCountResponse {
            unread_count: unread(conv.last_seq, pointer),
            last_read_seq: pointer,
            last_seq: conv.last_seq,
        }))
    }

    async fn get_or_create_single_conversation(
        &self,
        request: Request<pb::GetOrCreateSingleConversationRequest>,
    ) -> Result<Response<pb::GetOrCreateSingleConversationResponse>, Status> {
        let r = request.into_inner();
        let user = id_field("user_id", &r.user_id)?;
        let peer = id_field("peer_user_id", &r.peer_user_id)?;
        let conv_id = single_conversation_id(user, peer)
            .ok_or_else(|| AppError::invalid("a single chat needs two different users"))?;
        self.require_users(&[user, peer]).await?;
        let (a, b) = (user.min(peer), user.max(peer));
        let (conv, created) = self
            .store()
            .ensure_single_conversation(&conv_id, a, b, now_ms())
            .await
            .map_err(AppError::from)?;
        let view = self.view_one(user, conv).await?;
        Ok(Response::new(pb::GetOrCreateSingleConversationResponse {
            conversation: Some(view),
            created,
        }))
    }

    async fn get_conversation(
        &self,
        request: Request<pb::GetConversationRequest>,
    ) -> Result<Response<pb::GetConversationResponse>, Status> {
        let r = request.into_inner();
        let user = id_field("user_id", &r.user_id)?;
        conversation_field(&r.conversation_id)?;
        let conv = self
            .store()
            .get_conversation(&r.conversation_id)
            .await
            .map_err(AppError::from)?
            .ok_or_else(|| conversation_not_found(&r.conversation_id))?;
        let view = self.view_one(user, conv).await?;
        Ok(Response::new(pb::GetConversationResponse {
            conversation: Some(view),
        }))
    }

    async fn check_membership(
        &self,
        request: Request<pb::CheckMembershipRequest>,
    ) -> Result<Response<pb::CheckMembershipResponse>, Status> {
        let r = request.get_ref();
        let user = id_field("user_id", &r.user_id)?;
        let (is_member, kind, count) = self.membership(user, &r.conversation_id).await?;
        Ok(Response::new(pb::CheckMembershipResponse {
            is_member,
            r#type: pb_type(kind.type_number()),
            member_count: i32::try_from(count).unwrap_or(i32::MAX),
        }))
    }

    async fn get_conversation_members(
        &self,
        request: Request<pb::GetConversationMembersRequest>,
    ) -> Result<Response<pb::GetConversationMembersResponse>, Status> {
        let r = request.into_inner();
        if r.offset < 0 {
            return Err(AppError::invalid("offset must not be negative").into());
        }
        let limit = match i64::from(r.limit) {
            0 => DEFAULT_MEMBERS,
            n if (1..=MAX_MEMBERS).contains(&n) => n,
            n => {
                return Err(
                    AppError::invalid(format!("limit must be 1..={MAX_MEMBERS}, got {n}")).into(),
                );
            }
        };
        let offset = i64::from(r.offset);
        let (ids, has_more) = match conversation_field(&r.conversation_id)? {
            ConversationKind::World => (Vec::new(), false),
            ConversationKind::Single(a, b) => {
                let all = [a, b];
                let from = usize::try_from(offset).unwrap_or(usize::MAX).min(2);
                (all[from..].to_vec(), false)
            }
            ConversationKind::Group(g) => {
                // A first page that holds the whole group comes from the member set (cached,
                // ascending ids): what delivery to a small group asks for every batch.
                let whole = if offset == 0 {
                    Some(self.member_ids(g).await?)
                } else {
                    None
                };
                match whole {
                    Some(ids) if i64::try_from(ids.len()).unwrap_or(i64::MAX) <= limit => {
                        (ids, false)
                    }
                    _ => {
                        let (members, total) = self.member_page(g, offset, limit).await?;
                        let more = offset + i64::try_from(members.len()).unwrap_or(0) < total;
                        (members.into_iter().map(|m| m.user_id).collect(), more)
                    }
                }
            }
        };
        Ok(Response::new(pb::GetConversationMembersResponse {
            user_ids: ids.iter().map(i64::to_string).collect(),
            has_more,
        }))
    }

    async fn get_single_chat_peers(
        &self,
        request: Request<pb::GetSingleChatPeersRequest>,
    ) -> Result<Response<pb::GetSingleChatPeersResponse>, Status> {
        let user = id_field("user_id", &request.get_ref().user_id)?;
        let peers = self
            .store()
            .single_chat_peers(user)
            .await
            .map_err(AppError::from)?;
        Ok(Response::new(pb::GetSingleChatPeersResponse {
            user_ids: peers.iter().map(i64::to_string).collect(),
        }))
    }
}
