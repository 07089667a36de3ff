//! `/groups*`.

use actix_web::{HttpRequest, HttpResponse, web};
use gochat_proto::logic as pb;

use super::model::{
    AddMembersBody, CreateGroupBody, EmptyBody, Group, GroupBody, Member, MembersBody, MembersQuery,
};
use super::{ApiError, ApiState, TraceId, authenticate, call, logic_request};
use crate::LogicApi;

/// Default member page.
const DEFAULT_MEMBERS: i32 = 200;

fn need_group(group: Option<pb::Group>, trace: &TraceId) -> Result<Group, ApiError> {
    group.map(Group::from).ok_or_else(|| {
        ApiError::new(
            gochat_infra::ErrorCode::Internal,
            "logic returned no group",
            trace,
        )
    })
}

/// `POST /groups {name, member_ids}` -> 201 `{group}`
pub(crate) async fn create<L: LogicApi>(
    st: web::Data<ApiState<L>>,
    trace: TraceId,
    req: HttpRequest,
    body: web::Json<CreateGroupBody>,
) -> Result<HttpResponse, ApiError> {
    let caller = authenticate(&st.logic, &req, &trace).await?;
    let body = body.into_inner();
    let req = pb::CreateGroupRequest {
        operator_id: caller.user_id,
        name: body.name,
        member_ids: body.member_ids,
    };
    let res = call(st.logic.create_group(logic_request(req, &trace)), &trace).await?;
    Ok(HttpResponse::Created().json(GroupBody {
        group: need_group(res.group, &trace)?,
    }))
}

/// `GET /groups/:id` -> `{group}` (members only)
pub(crate) async fn get<L: LogicApi>(
    st: web::Data<ApiState<L>>,
    trace: TraceId,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let caller = authenticate(&st.logic, &req, &trace).await?;
    let req = pb::GetGroupRequest {
        operator_id: caller.user_id,
        group_id: path.into_inner(),
    };
    let res = call(st.logic.get_group(logic_request(req, &trace)), &trace).await?;
    Ok(HttpResponse::Ok().json(GroupBody {
        group: need_group(res.group, &trace)?,
    }))
}

/// `POST /groups/:id/members {user_ids}` -> `{group}`
pub(crate) async fn add_members<L: LogicApi>(
    st: web::Data<ApiState<L>>,
    trace: TraceId,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Json<AddMembersBody>,
) -> Result<HttpResponse, ApiError> {
    let caller = authenticate(&st.logic, &req, &trace).await?;
    let req = pb::JoinGroupRequest {
        operator_id: caller.user_id,
        group_id: path.into_inner(),
        user_ids: body.into_inner().user_ids,
    };
    let res = call(st.logic.join_group(logic_request(req, &trace)), &trace).await?;
    Ok(HttpResponse::Ok().json(GroupBody {
        group: need_group(res.group, &trace)?,
    }))
}

/// `DELETE /groups/:id/members/:userId` -> `{}`
pub(crate) async fn remove_member<L: LogicApi>(
    st: web::Data<ApiState<L>>,
    trace: TraceId,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let caller = authenticate(&st.logic, &req, &trace).await?;
    let (group_id, user_id) = path.into_inner();
    let req = pb::LeaveGroupRequest {
        operator_id: caller.user_id,
        group_id,
        user_id,
    };
    call(st.logic.leave_group(logic_request(req, &trace)), &trace).await?;
    Ok(HttpResponse::Ok().json(EmptyBody {}))
}

/// `GET /groups/:id/members?offset=0&limit=200` -> `{members, total}`
pub(crate) async fn members<L: LogicApi>(
    st: web::Data<ApiState<L>>,
    trace: TraceId,
    req: HttpRequest,
    path: web::Path<String>,
    query: web::Query<MembersQuery>,
) -> Result<HttpResponse, ApiError> {
    let caller = authenticate(&st.logic, &req, &trace).await?;
    let offset = query.offset.unwrap_or(0);
    let limit = query.limit.unwrap_or(DEFAULT_MEMBERS);
    if offset < 0 || limit < 1 {
        return Err(ApiError::invalid(
            "`offset` must not be negative and `limit` must be at least 1",
            &trace,
        ));
    }
    let req = pb::GetGroupMembersRequest {
        operator_id: caller.user_id,
        group_id: path.into_inner(),
        offset,
        limit,
    };
    let res = call(
        st.logic.get_group_members(logic_request(req, &trace)),
        &trace,
    )
    .await?;
    Ok(HttpResponse::Ok().json(MembersBody {
        members: res.members.into_iter().map(Member::from).collect(),
        total: res.total,
    }))
}
