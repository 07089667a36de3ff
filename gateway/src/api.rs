//! The HTTP API of the client contract (`/api/v1/...`), `/healthz` and the route table (the
//! operator routes `/metrics`, `/admin` and `/admin/actors` are in `admin`).
//!
//! Each handler authenticates (bearer token -> logic `ValidateToken`), calls one logic RPC
//! in-process through [`LogicApi`], and maps the proto answer to the contract's JSON. Failures
//! of every kind (logic errors, bad JSON, bad queries, unknown routes) become [`ApiError`], the
//! one place that turns a spec code into an HTTP status and an `ErrorResponse`. A middleware
//! gives every request a trace id (the client's `X-Trace-Id` or a fresh one), runs the request
//! in a tracing span carrying it, passes it to logic as `x-trace-id` metadata, echoes it in the
//! `X-Trace-Id` response header and in error bodies.

mod auth;
mod conversations;
pub(crate) mod error;
mod groups;
pub(crate) mod model;

use std::future::{Ready, ready};
use std::sync::Arc;

use actix_web::body::MessageBody;
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::error::{JsonPayloadError, PathError, QueryPayloadError};
use actix_web::http::StatusCode;
use actix_web::http::header::{AUTHORIZATION, HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{FromRequest, HttpMessage, HttpRequest, HttpResponse, web};
use gochat_infra::ErrorCode;
use gochat_infra::telemetry;
use gochat_proto::logic::ValidateTokenRequest;
use gochat_proto::logic::auth_service_server::AuthService;
use tracing::Instrument;

pub(crate) use self::error::ApiError;
use crate::LogicApi;
use crate::shared::Shared;

/// The request/response header carrying the trace id.
pub const TRACE_HEADER: &str = "x-trace-id";
/// The gRPC metadata key carrying the trace id into logic.
pub const TRACE_METADATA_KEY: &str = "x-trace-id";

/// What HTTP handlers share.
#[derive(Debug)]
pub(crate) struct ApiState<L> {
    pub shared: Arc<Shared>,
    pub logic: L,
}

/// The trace id of the current request (set by [`trace_layer`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct TraceId(pub String);

impl TraceId {
    /// The request's trace id (empty if the middleware did not run).
    pub fn of(req: &HttpRequest) -> Self {
        req.extensions()
            .get::<TraceId>()
            .cloned()
            .unwrap_or_default()
    }

    pub fn as_option(&self) -> Option<String> {
        (!self.0.is_empty()).then(|| self.0.clone())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromRequest for TraceId {
    type Error = actix_web::Error;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _payload: &mut Payload) -> Self::Future {
        ready(Ok(Self::of(req)))
    }
}

/// A client-supplied trace id is used when it is 1..=64 visible ASCII characters.
fn incoming_trace_id(req: &ServiceRequest) -> Option<String> {
    let value = req.headers().get(TRACE_HEADER)?.to_str().ok()?.trim();
    let ok = !value.is_empty() && value.len() <= 64 && value.bytes().all(|b| b.is_ascii_graphic());
    ok.then(|| value.to_owned())
}

/// Middleware: trace id, span, `X-Trace-Id` header, error counters, request duration.
pub(crate) async fn trace_layer(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let shared = req.app_data::<web::Data<Shared>>().cloned();
    let trace_id = incoming_trace_id(&req)
        .or_else(|| shared.as_ref().map(|s| s.next_trace_id()))
        .unwrap_or_default();
    req.extensions_mut().insert(TraceId(trace_id.clone()));
    let span = tracing::info_span!("http", trace_id = %trace_id, method = %req.method(), path = %req.path());
    let started = std::time::Instant::now();
    let mut res = next.call(req).instrument(span).await?;
    let class = telemetry::status_class(res.status().as_u16());
    metrics::histogram!(telemetry::HTTP_REQUEST_SECONDS, "status" => class)
        .record(started.elapsed().as_secs_f64());
    if let (Some(shared), Some(err)) = (
        shared,
        res.response()
            .error()
            .and_then(|e| e.as_error::<ApiError>()),
    ) {
        shared.stats.http_error(err.code());
    }
    if let Ok(value) = HeaderValue::from_str(&trace_id) {
        res.headers_mut()
            .insert(HeaderName::from_static(TRACE_HEADER), value);
    }
    Ok(res)
}

/// A logic request carrying the trace id as metadata.
pub(crate) fn logic_request<T>(message: T, trace: &TraceId) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    if let Ok(value) = trace.as_str().parse() {
        req.metadata_mut().insert(TRACE_METADATA_KEY, value);
    }
    req
}

/// Awaits a logic call and maps its failure.
pub(crate) async fn call<T>(
    fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    trace: &TraceId,
) -> Result<T, ApiError> {
    fut.await
        .map(tonic::Response::into_inner)
        .map_err(|status| ApiError::from_status(&status, trace))
}

/// The token of an `Authorization: Bearer <token>` header.
pub(crate) fn bearer_token(req: &HttpRequest) -> Option<&str> {
    let value = req.headers().get(AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The user an access token belongs to. Any refusal of the token is 401 / 1002; logic being
/// unavailable or failing stays a 5xx.
pub(crate) async fn validate_token<L: AuthService>(
    logic: &L,
    token: &str,
    trace: &TraceId,
) -> Result<String, ApiError> {
    let req = logic_request(
        ValidateTokenRequest {
            access_token: token.to_owned(),
        },
        trace,
    );
    match logic.validate_token(req).await {
        Ok(res) => {
            let user_id = res.into_inner().user_id;
            if user_id.is_empty() {
                Err(ApiError::unauthorized("invalid access token", trace))
            } else {
                Ok(user_id)
            }
        }
        Err(status) => {
            let err = ApiError::from_status(&status, trace);
            if matches!(err.code(), ErrorCode::Internal | ErrorCode::Unavailable) {
                Err(err)
            } else {
                let message = if err.error.message.is_empty() {
                    "invalid or expired access token".to_owned()
                } else {
                    err.error.message
                };
                Err(ApiError::unauthorized(message, trace))
            }
        }
    }
}

/// The caller of a route that needs a bearer token.
#[derive(Debug)]
pub(crate) struct Caller {
    pub user_id: String,
    pub token: String,
}

pub(crate) async fn authenticate<L: AuthService>(
    logic: &L,
    req: &HttpRequest,
    trace: &TraceId,
) -> Result<Caller, ApiError> {
    let token = bearer_token(req).ok_or_else(|| {
        ApiError::unauthorized(
            "missing `Authorization: Bearer <access_token>` header",
            trace,
        )
    })?;
    let user_id = validate_token(logic, token, trace).await?;
    Ok(Caller {
        user_id,
        token: token.to_owned(),
    })
}

fn json_error(err: JsonPayloadError, req: &HttpRequest) -> actix_web::Error {
    let message = match &err {
        JsonPayloadError::Overflow { limit }
        | JsonPayloadError::OverflowKnownLength { limit, .. } => {
            format!("request body exceeds the {limit} byte limit")
        }
        JsonPayloadError::Deserialize(e) if e.is_data() => format!("invalid request body: {e}"),
        JsonPayloadError::Deserialize(e) => format!("malformed JSON body: {e}"),
        JsonPayloadError::ContentType => "the body must be JSON".to_owned(),
        other => format!("could not read the request body: {other}"),
    };
    ApiError::invalid_for(req, message)
}

fn query_error(err: QueryPayloadError, req: &HttpRequest) -> actix_web::Error {
    ApiError::invalid_for(req, format!("invalid query string: {err}"))
}

fn path_error(err: PathError, req: &HttpRequest) -> actix_web::Error {
    ApiError::invalid_for(req, format!("invalid path: {err}"))
}

async fn not_found(req: HttpRequest, trace: TraceId) -> Result<HttpResponse, ApiError> {
    Err(ApiError::new(
        ErrorCode::NotFound,
        format!("no route for {} {}", req.method(), req.path()),
        &trace,
    ))
}

async fn method_not_allowed(req: HttpRequest, trace: TraceId) -> Result<HttpResponse, ApiError> {
    Err(ApiError::invalid(
        format!("method {} is not allowed on {}", req.method(), req.path()),
        &trace,
    )
    .with_status(StatusCode::METHOD_NOT_ALLOWED))
}

pub(crate) async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

/// Registers every route (extractor configs included) on an app.
pub(crate) fn configure<L: LogicApi>(cfg: &mut web::ServiceConfig, max_body_bytes: usize) {
    use actix_web::web::{delete, get, post, resource};

    let not_allowed = || web::to(method_not_allowed);
    cfg.app_data(
        web::JsonConfig::default()
            .limit(max_body_bytes)
            .content_type_required(false)
            .error_handler(json_error),
    )
    .app_data(web::QueryConfig::default().error_handler(query_error))
    .app_data(web::PathConfig::default().error_handler(path_error))
    .service(
        resource("/healthz")
            .route(get().to(healthz))
            .default_service(not_allowed()),
    )
    .service(
        resource("/ws")
            .route(get().to(crate::ws::upgrade::<L>))
            .default_service(not_allowed()),
    )
    .service(
        resource("/metrics")
            .route(get().to(crate::admin::metrics))
            .default_service(not_allowed()),
    )
    .service(
        resource("/admin")
            .route(get().to(crate::admin::page))
            .default_service(not_allowed()),
    )
    .service(
        resource("/admin/actors")
            .route(get().to(crate::admin::actors))
            .default_service(not_allowed()),
    )
    .service(
        web::scope("/api/v1")
            .service(
                resource("/auth/register")
                    .route(post().to(auth::register::<L>))
                    .default_service(not_allowed()),
            )
            .service(
                resource("/auth/login")
                    .route(post().to(auth::login::<L>))
                    .default_service(not_allowed()),
            )
            .service(
                resource("/auth/refresh")
                    .route(post().to(auth::refresh::<L>))
                    .default_service(not_allowed()),
            )
            .service(
                resource("/auth/logout")
                    .route(delete().to(auth::logout::<L>))
                    .default_service(not_allowed()),
            )
            .service(
                resource("/users/me")
                    .route(get().to(auth::me::<L>))
                    .default_service(not_allowed()),
            )
            .service(
                resource("/conversations")
                    .route(get().to(conversations::list::<L>))
                    .route(post().to(conversations::create::<L>))
                    .default_service(not_allowed()),
            )
            .service(
                resource("/conversations/{id}/messages")
                    .route(get().to(conversations::messages::<L>))
                    .default_service(not_allowed()),
            )
            .service(
                resource("/conversations/{id}/read")
                    .route(post().to(conversations::mark_read::<L>))
                    .default_service(not_allowed()),
            )
            .service(
                resource("/groups")
                    .route(post().to(groups::create::<L>))
                    .default_service(not_allowed()),
            )
            .service(
                resource("/groups/{id}")
                    .route(get().to(groups::get::<L>))
                    .default_service(not_allowed()),
            )
            .service(
                resource("/groups/{id}/members")
                    .route(get().to(groups::members::<L>))
                    .route(post().to(groups::add_members::<L>))
                    .default_service(not_allowed()),
            )
            .service(
                resource("/groups/{id}/members/{user_id}")
                    .route(delete().to(groups::remove_member::<L>))
                    .default_service(not_allowed()),
            ),
    )
    .default_service(web::to(not_found));
}
