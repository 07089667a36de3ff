//! The conversation and group APIs as clients see them: every call is made on behalf of an
//! authenticated user (set by the gateway) and checked against membership before repo is asked.

use std::collections::HashMap;

use gochat_infra::ids::ConversationKind;
use gochat_infra::mq::Bus;
use gochat_infra::{AppError, ErrorCode};
use gochat_proto::logic as pb;
use gochat_proto::logic::conversation_service_server::ConversationService;
use gochat_proto::logic::group_service_server::GroupService;
use gochat_proto::repo as rpb;
use tonic::{Request, Response, Status};

use crate::auth::logic_user;
use crate::{Logic, RepoApi, repo_err};

/// Default and largest history page (client contract).
const DEFAULT_LIMIT: i32 = 50;
const MAX_LIMIT: i32 = 100;

fn not_member(conv: &str) -> AppError {
    match ConversationKind::parse(conv) {
        Some(ConversationKind::Group(_)) => AppError::new(
            ErrorCode::NotGroupMember,
            "you are not a member of this group",
        ),
        _ => AppError::new(
            ErrorCode::Forbidden,
            "you are not part of this conversation",
        ),
    }
}

pub(crate) fn logic_message(m: rpb::Message) -> pb::Message {
    pb::Message {
        id: m.id,
        conversation_id: m.conversation_id,
        sender_id: m.sender_id,
        r#type: m.message_type,
        content: m.content,
        seq_id: m.seq_id,
        created_at: m.created_at,
        sender: None,
    }
}

fn logic_conversation(c: rpb::Conversation) -> pb::Conversation {
    pb::Conversation {
        id: c.id,
        r#type: c.r#type,
        name: c.name,
        avatar_url: c.avatar_url,
        last_message: c.last_message.map(logic_message),
        unread_count: c.unread_count,
        updated_at: c.updated_at,
    }
}

fn logic_group(g: rpb::Group) -> pb::Group {
    pb::Group {
        id: g.id,
        name: g.name,
        owner_id: g.owner_id,
        member_count: g.member_count,
        conversation_id: g.conversation_id,
        created_at: g.created_at,
    }
}

fn require_id(name: &str, v: &str) -> Result<(), AppError> {
    if gochat_infra::ids::parse_id(v).is_none() {
        return Err(AppError::invalid(format!("{name} must be a decimal id")));
    }
    Ok(())
}

impl<R: RepoApi, B: Bus> Logic<R, B> {
    /// Membership of `user` in `conv` (with its type and member count), as repo sees it.
    pub async fn check_membership(
        &self,
        user: &str,
        conv: &str,
    ) -> Result<rpb::CheckMembershipResponse, AppError> {
        if ConversationKind::parse(conv).is_none() {
            return Err(AppError::invalid(format!(
                "invalid conversation_id {conv:?}"
            )));
        }
        Ok(self
            .core
            .repo
            .check_membership(Request::new(rpb::CheckMembershipRequest {
                user_id: user.to_owned(),
                conversation_id: conv.to_owned(),
            }))
            .await
            .map_err(repo_err)?
            .into_inner())
    }

    async fn require_member(&self, user: &str, conv: &str) -> Result<(), AppError> {
        if self.check_membership(user, conv).await?.is_member {
            Ok(())
        } else {
            Err(not_member(conv))
        }
    }

    async fn require_group_member(&self, user: &str, group: &str) -> Result<(), AppError> {
        require_id("group_id", group)?;
        let r = self
            .core
            .repo
            .is_group_member(Request::new(rpb::IsGroupMemberRequest {
                group_id: group.to_owned(),
                user_id: user.to_owned(),
            }))
            .await
            .map_err(repo_err)?
            .into_inner();
        if r.is_member {
            Ok(())
        } else {
            Err(AppError::new(
                ErrorCode::NotGroupMember,
                "you are not a member of this group",
            ))
        }
    }

    async fn load_group(&self, group: &str) -> Result<rpb::Group, AppError> {
        self.core
            .repo
            .get_group(Request::new(rpb::GetGroupRequest {
                group_id: group.to_owned(),
            }))
            .await
            .map_err(repo_err)?
            .into_inner()
            .group
            .ok_or_else(|| AppError::new(ErrorCode::GroupNotFound, "group not found"))
    }
}

#[tonic::async_trait]
impl<R: RepoApi, B: Bus> ConversationService for Logic<R, B> {
    async fn get_conversations(
        &self,
        request: Request<pb::GetConversationsRequest>,
    ) -> Result<Response<pb::GetConversationsResponse>, Status> {
        let r = request.into_inner();
        if r.page < 0 || r.page_size < 0 || r.page_size > 100 {
            return Err(AppError::invalid("page must be >= 1 and page_size 1..=100").into());
        }
        let resp = self
            .core
            .repo
            .get_user_conversations(Request::new(rpb::GetUserConversationsRequest {
                user_id: r.user_id,
                page: r.page,
                page_size: r.page_size,
            }))
            .await?
            .into_inner();
        Ok(Response::new(pb::GetConversationsResponse {
            conversations: resp
                .conversations
                .into_iter()
                .map(logic_conversation)
                .collect(),
            total: resp.total,
        }))
    }

    async fn get_conversation(
        &self,
        request: Request<pb::GetConversationRequest>,
    ) -> Result<Response<pb::GetConversationResponse>, Status> {
        let r = request.into_inner();
        self.require_member(&r.user_id, &r.conversation_id).await?;
        let c = self
            .core
            .repo
            .get_conversation(Request::new(rpb::GetConversationRequest {
                user_id: r.user_id,
                conversation_id: r.conversation_id,
            }))
            .await?
            .into_inner()
            .conversation
            .map(logic_conversation);
        Ok(Response::new(pb::GetConversationResponse {
            conversation: c,
        }))
    }

    async fn get_messages(
        &self,
        request: Request<pb::GetMessagesRequest>,
    ) -> Result<Response<pb::GetMessagesResponse>, Status> {
        let r = request.into_inner();
        let limit = match r.limit {
            0 => DEFAULT_LIMIT,
            n if (1..=MAX_LIMIT).contains(&n) => n,
            n => {
                return Err(
                    AppError::invalid(format!("limit must be 1..={MAX_LIMIT}, got {n}")).into(),
                );
            }
        };
        if r.after_seq.is_some_and(|s| s < 0) || r.before_seq.is_some_and(|s| s < 0) {
            return Err(AppError::invalid("after_seq and before_seq must not be negative").into());
        }
        if r.after_seq.is_some() && r.before_seq.is_some() {
            return Err(AppError::invalid("give after_seq or before_seq, not both").into());
        }
        self.require_member(&r.user_id, &r.conversation_id).await?;
        let (direction, after_seq, before_seq) = match (r.after_seq, r.before_seq) {
            (Some(a), _) => (rpb::Direction::Forward, a, 0),
            (None, Some(b)) => (rpb::Direction::Backward, 0, b),
            (None, None) => (rpb::Direction::Backward, 0, 0),
        };
        if r.before_seq == Some(0) {
            // Nothing is older than seq 1.
            return Ok(Response::new(pb::GetMessagesResponse {
                messages: Vec::new(),
                has_more: false,
            }));
        }
        let resp = self
            .core
            .repo
            .get_conversation_messages(Request::new(rpb::GetConversationMessagesRequest {
                conversation_id: r.conversation_id,
                direction: direction as i32,
                after_seq,
                before_seq,
                limit,
            }))
            .await?
            .into_inner();
        Ok(Response::new(pb::GetMessagesResponse {
            messages: resp.messages.into_iter().map(logic_message).collect(),
            has_more: resp.has_more,
        }))
    }

    async fn mark_as_read(
        &self,
        request: Request<pb::MarkAsReadRequest>,
    ) -> Result<Response<pb::MarkAsReadResponse>, Status> {
        let r = request.into_inner();
        if r.seq_id < 0 {
            return Err(AppError::invalid("seq_id must not be negative").into());
        }
        self.require_member(&r.user_id, &r.conversation_id).await?;
        let resp = self
            .core
            .repo
            .update_read_pointer(Request::new(rpb::UpdateReadPointerRequest {
                user_id: r.user_id,
                conversation_id: r.conversation_id,
                seq_id: r.seq_id,
            }))
            .await?
            .into_inner();
        Ok(Response::new(pb::MarkAsReadResponse {
            unread_count: resp.unread_count,
            last_read_seq: resp.last_read_seq,
        }))
    }

    async fn create_single_conversation(
        &self,
        request: Request<pb::CreateSingleConversationRequest>,
    ) -> Result<Response<pb::CreateSingleConversationResponse>, Status> {
        let r = request.into_inner();
        require_id("target_user_id", &r.target_user_id)?;
        if r.user_id == r.target_user_id {
            return Err(AppError::invalid("a single chat needs another user").into());
        }
        let c = self
            .core
            .repo
            .get_or_create_single_conversation(Request::new(
                rpb::GetOrCreateSingleConversationRequest {
                    user_id: r.user_id,
                    peer_user_id: r.target_user_id,
                },
            ))
            .await?
            .into_inner()
            .conversation
            .map(logic_conversation);
        Ok(Response::new(pb::CreateSingleConversationResponse {
            conversation: c,
        }))
    }
}

#[tonic::async_trait]
impl<R: RepoApi, B: Bus> GroupService for Logic<R, B> {
    async fn create_group(
        &self,
        request: Request<pb::CreateGroupRequest>,
    ) -> Result<Response<pb::CreateGroupResponse>, Status> {
        let r = request.into_inner();
        let g = self
            .core
            .repo
            .create_group(Request::new(rpb::CreateGroupRequest {
                name: r.name,
                owner_id: r.operator_id,
                member_ids: r.member_ids,
                avatar_url: String::new(),
            }))
            .await?
            .into_inner()
            .group
            .ok_or_else(|| AppError::internal("repo returned no group"))?;
        Ok(Response::new(pb::CreateGroupResponse {
            group: Some(logic_group(g)),
        }))
    }

    async fn get_group(
        &self,
        request: Request<pb::GetGroupRequest>,
    ) -> Result<Response<pb::GetGroupResponse>, Status> {
        let r = request.into_inner();
        require_id("group_id", &r.group_id)?;
        let g = self.load_group(&r.group_id).await?;
        self.require_group_member(&r.operator_id, &r.group_id)
            .await?;
        Ok(Response::new(pb::GetGroupResponse {
            group: Some(logic_group(g)),
        }))
    }

    async fn join_group(
        &self,
        request: Request<pb::JoinGroupRequest>,
    ) -> Result<Response<pb::JoinGroupResponse>, Status> {
        let r = request.into_inner();
        require_id("group_id", &r.group_id)?;
        if r.user_ids.is_empty() {
            return Err(AppError::invalid("user_ids must not be empty").into());
        }
        self.load_group(&r.group_id).await?;
        self.require_group_member(&r.operator_id, &r.group_id)
            .await?;
        let g = self
            .core
            .repo
            .add_group_member(Request::new(rpb::AddGroupMemberRequest {
                group_id: r.group_id,
                user_ids: r.user_ids,
                role: rpb::GroupRole::Member as i32,
            }))
            .await?
            .into_inner()
            .group
            .ok_or_else(|| AppError::internal("repo returned no group"))?;
        Ok(Response::new(pb::JoinGroupResponse {
            group: Some(logic_group(g)),
        }))
    }

    async fn leave_group(
        &self,
        request: Request<pb::LeaveGroupRequest>,
    ) -> Result<Response<pb::LeaveGroupResponse>, Status> {
        let r = request.into_inner();
        require_id("group_id", &r.group_id)?;
        require_id("user_id", &r.user_id)?;
        let g = self.load_group(&r.group_id).await?;
        let is_owner = g.owner_id == r.operator_id;
        if r.user_id == g.owner_id {
            return Err(
                AppError::new(ErrorCode::Forbidden, "the owner cannot leave the group").into(),
            );
        }
        if r.user_id != r.operator_id && !is_owner {
            return Err(AppError::new(
                ErrorCode::Forbidden,
                "only the owner can remove other members",
            )
            .into());
        }
        if !is_owner {
            self.require_group_member(&r.operator_id, &r.group_id)
                .await?;
        }
        self.core
            .repo
            .remove_group_member(Request::new(rpb::RemoveGroupMemberRequest {
                group_id: r.group_id.clone(),
                user_id: r.user_id.clone(),
            }))
            .await?;
        if let Some(group) = gochat_infra::ids::parse_id(&r.group_id) {
            self.core
                .membership_changed(&gochat_infra::ids::group_conversation_id(group), &r.user_id)
                .await;
        }
        Ok(Response::new(pb::LeaveGroupResponse {}))
    }

    async fn get_group_members(
        &self,
        request: Request<pb::GetGroupMembersRequest>,
    ) -> Result<Response<pb::GetGroupMembersResponse>, Status> {
        let r = request.into_inner();
        require_id("group_id", &r.group_id)?;
        if r.offset < 0 || !(0..=1000).contains(&r.limit) {
            return Err(AppError::invalid("offset must be >= 0 and limit 1..=1000").into());
        }
        self.load_group(&r.group_id).await?;
        self.require_group_member(&r.operator_id, &r.group_id)
            .await?;
        let page = self
            .core
            .repo
            .get_group_members(Request::new(rpb::GetGroupMembersRequest {
                group_id: r.group_id,
                offset: r.offset,
                limit: r.limit,
            }))
            .await?
            .into_inner();
        let ids: Vec<String> = page.members.iter().map(|m| m.user_id.clone()).collect();
        let users: HashMap<String, rpb::User> = self
            .core
            .repo
            .get_users(Request::new(rpb::GetUsersRequest {
                user_ids: ids.clone(),
            }))
            .await?
            .into_inner()
            .users
            .into_iter()
            .map(|u| (u.id.clone(), u))
            .collect();
        let online: HashMap<String, bool> = self
            .core
            .repo
            .get_users_online_status(Request::new(rpb::GetUsersOnlineStatusRequest {
                user_ids: ids,
            }))
            .await?
            .into_inner()
            .statuses
            .into_iter()
            .map(|s| (s.user_id, s.is_online))
            .collect();
        let mut users = users;
        let members = page
            .members
            .into_iter()
            .map(|m| pb::GroupMember {
                is_online: online.get(&m.user_id).copied().unwrap_or(false),
                user: users.remove(&m.user_id).map(logic_user),
                role: m.role,
                joined_at: m.joined_at,
            })
            .collect();
        Ok(Response::new(pb::GetGroupMembersResponse {
            members,
            total: page.total,
        }))
    }
}
