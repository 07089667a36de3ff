//! GroupService: groups, their members (`member_count` kept right under concurrency by locking
//! the group row), membership checks through `group_members:{group}`, and members' presence.

use gochat_infra::{AppError, ErrorCode, time::now_ms};
use gochat_proto::repo as pb;
use gochat_proto::repo::group_service_server::GroupService;
use tonic::{Request, Response, Status};

use super::{Repo, cache_read, cache_write, id_field, id_list, pb_group, pb_presence, status};
use crate::cache::Cache;
use crate::model::{Group, GroupMember, role};
use crate::store::{MemberCursor, Store};

/// Default member page (the spec's fan-out batch).
const DEFAULT_PAGE: i64 = 200;
/// Largest member page.
const MAX_PAGE: i64 = 1000;
/// Most ids one add call may carry.
const MAX_ADD: usize = 1000;

pub(crate) fn group_not_found(id: i64) -> AppError {
    AppError::new(ErrorCode::GroupNotFound, format!("group {id} not found"))
}

fn page(offset: i32, limit: i32) -> Result<(i64, i64), AppError> {
    if offset < 0 {
        return Err(AppError::invalid("offset must not be negative"));
    }
    let limit = match i64::from(limit) {
        0 => DEFAULT_PAGE,
        n if (1..=MAX_PAGE).contains(&n) => n,
        n => {
            return Err(AppError::invalid(format!(
                "limit must be 1..={MAX_PAGE}, got {n}"
            )));
        }
    };
    Ok((i64::from(offset), limit))
}

/// The membership row a `page_token` continues after.
fn page_token(token: &str) -> Result<i64, AppError> {
    token
        .parse::<i64>()
        .ok()
        .filter(|row| *row > 0)
        .ok_or_else(|| AppError::invalid("page_token is not one a previous page returned"))
}

fn pb_role(r: i32) -> i32 {
    match r {
        role::OWNER => pb::GroupRole::Owner as i32,
        role::ADMIN => pb::GroupRole::Admin as i32,
        _ => pb::GroupRole::Member as i32,
    }
}

impl<S: Store, C: Cache> Repo<S, C> {
    /// A group, or 4000.
    pub(crate) async fn require_group(&self, id: i64) -> Result<Group, AppError> {
        self.store()
            .get_group(id)
            .await?
            .ok_or_else(|| group_not_found(id))
    }

    /// Whether `user` is in `group`, through `group_members:{group}`.
    pub async fn is_group_member(&self, group: i64, user: i64) -> Result<bool, AppError> {
        if let Some(b) = cache_read(
            self.cache().members_contains(group, user).await,
            "group_members",
        ) {
            return Ok(b);
        }
        Ok(self.load_member_ids(group).await?.contains(&user))
    }

    /// Every member id of `group`, through `group_members:{group}` (ascending).
    pub(crate) async fn member_ids(&self, group: i64) -> Result<Vec<i64>, AppError> {
        let mut ids = match cache_read(self.cache().members_get(group).await, "group_members") {
            Some(ids) => ids,
            None => self.load_member_ids(group).await?,
        };
        ids.sort_unstable();
        Ok(ids)
    }

    /// Reads a group's member ids from the store and caches them.
    async fn load_member_ids(&self, group: i64) -> Result<Vec<i64>, AppError> {
        self.require_group(group).await?;
        let ids = self.store().group_member_ids(group).await?;
        cache_write(
            self.cache()
                .members_set(group, &ids, self.settings().entry_ttl)
                .await,
            "group_members",
        );
        Ok(ids)
    }

    /// A page of members.
    pub(crate) async fn member_page(
        &self,
        group: i64,
        offset: i64,
        limit: i64,
    ) -> Result<(Vec<GroupMember>, i64), AppError> {
        self.require_group(group).await?;
        Ok(self.store().group_members(group, offset, limit).await?)
    }
}

#[tonic::async_trait]
impl<S: Store, C: Cache> GroupService for Repo<S, C> {
    async fn create_group(
        &self,
        request: Request<pb::CreateGroupRequest>,
    ) -> Result<Response<pb::CreateGroupResponse>, Status> {
        let r = request.into_inner();
        let name = r.name.trim();
        if name.is_empty() || name.chars().count() > 50 {
            return Err(AppError::invalid("group name must be 1 to 50 characters").into());
        }
        if r.avatar_url.chars().count() > 255 {
            return Err(AppError::invalid("avatar_url must be at most 255 characters").into());
        }
        let owner = id_field("owner_id", &r.owner_id)?;
        let mut members = id_list("member_ids", &r.member_ids, MAX_ADD)?;
        members.retain(|m| *m != owner);
        let max = self.settings().max_group_members;
        if i64::try_from(members.len() + 1).unwrap_or(i64::MAX) > max {
            return Err(AppError::new(
                ErrorCode::GroupFull,
                format!("a group has at most {max} members"),
            )
            .into());
        }
        let mut everyone = vec![owner];
        everyone.extend(&members);
        self.require_users(&everyone).await?;
        let now = now_ms();
        let group = Group {
            id: self.inner.ids.next_id(),
            name: name.to_owned(),
            owner_id: owner,
            member_count: 0,
            avatar_url: r.avatar_url,
            created_at: now,
            updated_at: now,
        };
        let rows: Vec<(i64, i32)> = std::iter::once((owner, role::OWNER))
            .chain(members.iter().map(|m| (*m, role::MEMBER)))
            .collect();
        let group = self
            .store()
            .create_group(&group, &rows, now)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::CreateGroupResponse {
            group: Some(pb_group(&group)),
        }))
    }

    async fn get_group(
        &self,
        request: Request<pb::GetGroupRequest>,
    ) -> Result<Response<pb::GetGroupResponse>, Status> {
        let id = id_field("group_id", &request.get_ref().group_id)?;
        let group = self.require_group(id).await?;
        Ok(Response::new(pb::GetGroupResponse {
            group: Some(pb_group(&group)),
        }))
    }

    async fn add_group_member(
        &self,
        request: Request<pb::AddGroupMemberRequest>,
    ) -> Result<Response<pb::AddGroupMemberResponse>, Status> {
        let r = request.into_inner();
        let group = id_field("group_id", &r.group_id)?;
        let users = id_list("user_ids", &r.user_ids, MAX_ADD)?;
        if users.is_empty() {
            return Err(AppError::invalid("user_ids must not be empty").into());
        }
        let member_role = match pb::GroupRole::try_from(r.role) {
            Ok(pb::GroupRole::Admin) => role::ADMIN,
            Ok(pb::GroupRole::Owner) => {
                return Err(AppError::invalid("a group has one owner, set at creation").into());
            }
            _ => role::MEMBER,
        };
        self.require_users(&users).await?;
        let result = self
            .store()
            .add_group_members(
                group,
                &users,
                member_role,
                self.settings().max_group_members,
                now_ms(),
            )
            .await;
        cache_write(self.cache().members_del(group).await, "group_members");
        let (g, added) = result.map_err(status)?;
        Ok(Response::new(pb::AddGroupMemberResponse {
            group: Some(pb_group(&g)),
            added: i32::try_from(added).unwrap_or(i32::MAX),
        }))
    }

    async fn remove_group_member(
        &self,
        request: Request<pb::RemoveGroupMemberRequest>,
    ) -> Result<Response<pb::RemoveGroupMemberResponse>, Status> {
        let r = request.into_inner();
        let group = id_field("group_id", &r.group_id)?;
        let user = id_field("user_id", &r.user_id)?;
        let result = self
            .store()
            .remove_group_member(group, user, now_ms())
            .await;
        cache_write(self.cache().members_del(group).await, "group_members");
        let (g, removed) = result.map_err(status)?;
        Ok(Response::new(pb::RemoveGroupMemberResponse {
            group: Some(pb_group(&g)),
            removed,
        }))
    }

    async fn get_group_members(
        &self,
        request: Request<pb::GetGroupMembersRequest>,
    ) -> Result<Response<pb::GetGroupMembersResponse>, Status> {
        let r = request.into_inner();
        let group = id_field("group_id", &r.group_id)?;
        let (offset, limit) = page(r.offset, r.limit)?;
        let (members, total) = self.member_page(group, offset, limit).await?;
        let has_more = offset + i64::try_from(members.len()).unwrap_or(0) < total;
        Ok(Response::new(pb::GetGroupMembersResponse {
            members: members
                .iter()
                .map(|m| pb::GroupMember {
                    user_id: m.user_id.to_string(),
                    role: pb_role(m.role),
                    joined_at: m.joined_at,
                })
                .collect(),
            total: i32::try_from(total).unwrap_or(i32::MAX),
            has_more,
        }))
    }

    async fn get_members_online_status(
        &self,
        request: Request<pb::GetMembersOnlineStatusRequest>,
    ) -> Result<Response<pb::GetMembersOnlineStatusResponse>, Status> {
        let r = request.into_inner();
        let group = id_field("group_id", &r.group_id)?;
        let (offset, limit) = page(r.offset, r.limit)?;
        let from = match (r.page_token.as_str(), offset) {
            ("", n) => MemberCursor::Offset(n),
            (token, 0) => MemberCursor::After(page_token(token)?),
            _ => return Err(AppError::invalid("offset must be 0 with a page_token").into()),
        };
        self.require_group(group).await?;
        // One more than asked tells whether another page follows, with no count of the group.
        let mut rows = self
            .store()
            .member_ids_page(group, from, limit + 1)
            .await
            .map_err(AppError::from)?;
        let has_more = rows.len() > usize::try_from(limit).unwrap_or(usize::MAX);
        rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        let next_page_token = match rows.last() {
            Some((row, _)) if has_more => row.to_string(),
            _ => String::new(),
        };
        let ids: Vec<i64> = rows.into_iter().map(|(_, user)| user).collect();
        let presence = self.presence_of(&ids).await;
        Ok(Response::new(pb::GetMembersOnlineStatusResponse {
            statuses: ids
                .iter()
                .zip(&presence)
                .map(|(id, p)| pb_presence(*id, p))
                .collect(),
            has_more,
            next_page_token,
        }))
    }

    async fn is_group_member(
        &self,
        request: Request<pb::IsGroupMemberRequest>,
    ) -> Result<Response<pb::IsGroupMemberResponse>, Status> {
        let r = request.get_ref();
        let group = id_field("group_id", &r.group_id)?;
        let user = id_field("user_id", &r.user_id)?;
        let is_member = self.is_group_member(group, user).await?;
        Ok(Response::new(pb::IsGroupMemberResponse { is_member }))
    }
}
