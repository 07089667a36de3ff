//! `/auth/*` and `/users/me`.

use actix_web::{HttpRequest, HttpResponse, web};
use gochat_proto::logic as pb;

use super::model::{EmptyBody, LoginBody, RefreshBody, RegisterBody, TokensBody, User, UserBody};
use super::{ApiError, ApiState, TraceId, authenticate, call, logic_request};
use crate::LogicApi;

/// Logic answered without the user the contract promises.
fn need_user(user: Option<pb::User>, trace: &TraceId) -> Result<User, ApiError> {
    user.map(User::from).ok_or_else(|| {
        ApiError::new(
            gochat_infra::ErrorCode::Internal,
            "logic returned no user",
            trace,
        )
    })
}

/// `POST /auth/register` -> 201 `{user}`
pub(crate) async fn register<L: LogicApi>(
    st: web::Data<ApiState<L>>,
    trace: TraceId,
    body: web::Json<RegisterBody>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let req = pb::RegisterRequest {
        username: body.username,
        password: body.password,
        nickname: body.nickname.unwrap_or_default(),
    };
    let res = call(st.logic.register(logic_request(req, &trace)), &trace).await?;
    let user = need_user(res.user, &trace)?;
    Ok(HttpResponse::Created().json(UserBody { user }))
}

/// `POST /auth/login` -> `{access_token, refresh_token, expires_in, user}`
pub(crate) async fn login<L: LogicApi>(
    st: web::Data<ApiState<L>>,
    trace: TraceId,
    body: web::Json<LoginBody>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let req = pb::LoginRequest {
        username: body.username,
        password: body.password,
    };
    let res = call(st.logic.login(logic_request(req, &trace)), &trace).await?;
    Ok(HttpResponse::Ok().json(TokensBody {
        access_token: res.access_token,
        refresh_token: res.refresh_token,
        expires_in: res.expires_in,
        user: need_user(res.user, &trace)?,
    }))
}

/// `POST /auth/refresh` -> same as login; the old refresh token stops working.
pub(crate) async fn refresh<L: LogicApi>(
    st: web::Data<ApiState<L>>,
    trace: TraceId,
    body: web::Json<RefreshBody>,
) -> Result<HttpResponse, ApiError> {
    let req = pb::RefreshTokenRequest {
        refresh_token: body.into_inner().refresh_token,
    };
    let res = call(st.logic.refresh_token(logic_request(req, &trace)), &trace).await?;
    Ok(HttpResponse::Ok().json(TokensBody {
        access_token: res.access_token,
        refresh_token: res.refresh_token,
        expires_in: res.expires_in,
        user: need_user(res.user, &trace)?,
    }))
}

/// `DELETE /auth/logout` -> `{}`; the access token presented and its refresh token are revoked.
pub(crate) async fn logout<L: LogicApi>(
    st: web::Data<ApiState<L>>,
    trace: TraceId,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let caller = authenticate(&st.logic, &req, &trace).await?;
    let req = pb::LogoutRequest {
        access_token: caller.token,
    };
    call(st.logic.logout(logic_request(req, &trace)), &trace).await?;
    Ok(HttpResponse::Ok().json(EmptyBody {}))
}

/// `GET /users/me` -> `{user}`
pub(crate) async fn me<L: LogicApi>(
    st: web::Data<ApiState<L>>,
    trace: TraceId,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let caller = authenticate(&st.logic, &req, &trace).await?;
    let req = pb::GetUserRequest {
        user_id: caller.user_id,
    };
    let res = call(st.logic.get_user(logic_request(req, &trace)), &trace).await?;
    Ok(HttpResponse::Ok().json(UserBody {
        user: need_user(res.user, &trace)?,
    }))
}
