//! Operator endpoints on the gateway's listener:
//!
//! - `GET /metrics`: the process's Prometheus text (from the handle given to
//!   [`Gateway::with_metrics`](crate::Gateway::with_metrics); 404 without one). Open when no
//!   admin token is configured; otherwise it needs the token, as `Authorization: Bearer` or
//!   `?token=` (Prometheus sends the former with `authorization: {credentials: ...}`).
//! - `GET /admin/actors`: JSON of actor counts, the busiest conversations, the slowest
//!   sessions, bus lag and uptime. Needs `Authorization: Bearer <admin token>`.
//! - `GET /admin`: one self-contained HTML page that polls `/admin/actors` every second and
//!   draws small charts. Needs the token as `?token=` (a browser cannot set the header) or
//!   bearer.
//!
//! Without an admin token (`[admin] token = ""`) or without an [`AdminSource`] both admin
//! routes answer 404 as if they did not exist. A wrong or missing token is 401 with an
//! `ErrorResponse`. Tokens are compared in constant time.
//!
//! What lives outside the gateway (Conversation and Fanout actors, bus lag) comes through the
//! [`AdminSource`] trait, implemented by whoever wires the services together (`gochat serve`,
//! or each process of the distributed mode for its own part); sessions come from the gateway's
//! own registry. A process without a gateway listener (`gochat logic|task`) serves the same
//! routes on its ops listener ([`spawn_ops_server`]); there the session fields are `null`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use gochat_infra::ErrorCode;
use gochat_infra::telemetry::PrometheusHandle;
use serde::{Deserialize, Serialize};

use crate::api::{ApiError, TraceId, bearer_token};
use crate::shared::Shared;

/// The admin page (HTML, CSS and script in one file; no external assets).
const PAGE: &str = include_str!("admin/page.html");

/// Rows of `busiest_conversations` and `slow_sessions` unless `?limit=` says otherwise.
const DEFAULT_LIMIT: usize = 10;
/// Most rows `?limit=` may ask for.
const MAX_LIMIT: usize = 100;

/// Where the admin routes find their [`AdminSource`]: empty until the process has one (an ops
/// server answers `/metrics` and `/healthz` from the start, and its admin routes 404 until the
/// service behind them is up).
pub type AdminSlot = Arc<OnceLock<Arc<dyn AdminSource>>>;

/// What the admin endpoints need from the services beyond the gateway. A kind of actor that
/// does not live in this process answers `None` (the default), shown as `null`.
pub trait AdminSource: Send + Sync + 'static {
    /// What this process runs: `serve`, `gateway`, `logic` or `task`.
    fn process(&self) -> &'static str;
    /// Live Conversation actors (logic).
    fn conversation_actors(&self) -> Option<u64> {
        None
    }
    /// Live Fanout actors (task).
    fn fanout_actors(&self) -> Option<u64> {
        None
    }
    /// At most `limit` conversations with work, busiest first.
    fn busiest_conversations(&self, _limit: usize) -> Vec<BusyConversation> {
        Vec::new()
    }
    /// Records not yet committed, by consumer group, of the groups this process consumes in.
    fn bus_lag(&self) -> BTreeMap<String, u64> {
        BTreeMap::new()
    }
}

/// One row of `busiest_conversations`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BusyConversation {
    /// The conversation.
    pub conversation_id: String,
    /// Messages its actor accepted and has not finished (waiting plus the batch in flight).
    pub queued: u64,
    /// Messages it handled per second, averaged over the last ten seconds.
    pub messages_per_sec: f64,
}

/// One row of `slow_sessions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct SlowSession {
    session_id: String,
    user_id: String,
    /// Frames waiting for the session (deliveries not yet taken plus frames not yet written).
    queued: u64,
}

/// Live actors by kind; `None` (`null`): that kind does not live in this process.
#[derive(Debug, Serialize)]
struct ActorCounts {
    session: Option<u64>,
    conversation: Option<u64>,
    fanout: Option<u64>,
}

#[derive(Debug, Serialize)]
struct GatewayCounters {
    connections_total: u64,
    frames_in: u64,
    frames_out: u64,
    messages_in: u64,
}

/// The body of `GET /admin/actors`.
#[derive(Debug, Serialize)]
struct ActorsReport {
    process: &'static str,
    actors: ActorCounts,
    busiest_conversations: Vec<BusyConversation>,
    slow_sessions: Vec<SlowSession>,
    bus_lag: BTreeMap<String, u64>,
    /// `None` in a process without a gateway listener.
    gateway: Option<GatewayCounters>,
    uptime_secs: u64,
}

/// What the operator endpoints share.
#[derive(Clone)]
pub(crate) struct AdminState {
    /// The admin token; empty: admin routes are off and `/metrics` is open.
    pub token: String,
    /// Conversation, fanout and bus data, once there is a source.
    pub source: AdminSlot,
    /// Renders `/metrics`.
    pub metrics: Option<PrometheusHandle>,
    /// When the process started serving.
    pub started: Instant,
}

impl fmt::Debug for AdminState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminState")
            .field("token_set", &!self.token.is_empty())
            .field("source", &self.source.get().is_some())
            .field("metrics", &self.metrics.is_some())
            .finish()
    }
}

/// Equal without revealing where two tokens differ.
fn same_token(given: &str, expected: &str) -> bool {
    let (a, b) = (given.as_bytes(), expected.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn query_token(req: &HttpRequest) -> Option<String> {
    web::Query::<HashMap<String, String>>::from_query(req.query_string())
        .ok()
        .and_then(|q| q.get("token").cloned())
        .filter(|t| !t.is_empty())
}

/// Whether the request carries `token` (bearer, or also `?token=` when `query` is allowed).
fn carries(req: &HttpRequest, token: &str, query: bool) -> bool {
    if let Some(given) = bearer_token(req) {
        return same_token(given, token);
    }
    query && query_token(req).is_some_and(|given| same_token(&given, token))
}

fn not_found(req: &HttpRequest, trace: &TraceId) -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        format!("no route for {} {}", req.method(), req.path()),
        trace,
    )
}

/// The source of an admin route, or the refusal: 404 while admin is off, 401 without the token.
fn admin_source<'a>(
    st: &'a AdminState,
    req: &HttpRequest,
    query: bool,
    trace: &TraceId,
) -> Result<&'a Arc<dyn AdminSource>, ApiError> {
    let source = match st.source.get() {
        Some(source) if !st.token.is_empty() => source,
        _ => return Err(not_found(req, trace)),
    };
    if !carries(req, &st.token, query) {
        let how = if query {
            "`?token=<admin token>` or `Authorization: Bearer <admin token>`"
        } else {
            "`Authorization: Bearer <admin token>`"
        };
        return Err(ApiError::unauthorized(
            format!("admin token required: {how}"),
            trace,
        ));
    }
    Ok(source)
}

/// `GET /metrics`.
pub(crate) async fn metrics(
    req: HttpRequest,
    st: web::Data<AdminState>,
    trace: TraceId,
) -> Result<HttpResponse, ApiError> {
    let Some(handle) = &st.metrics else {
        return Err(not_found(&req, &trace));
    };
    if !st.token.is_empty() && !carries(&req, &st.token, true) {
        return Err(ApiError::unauthorized(
            "metrics need the admin token: `Authorization: Bearer <admin token>` or `?token=`",
            &trace,
        ));
    }
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .body(handle.render()))
}

/// The operator endpoints of a process without a gateway listener (`gochat repo|logic|task`):
/// `GET /metrics` (the process's Prometheus text, behind `token` when it is set, as on a
/// gateway) and `GET /healthz`, on `listener`, with one worker; once an [`AdminSource`] is put
/// into the returned slot (logic, task), also `GET /admin/actors` and `GET /admin`, as on a
/// gateway but without sessions (404 before). The server runs on its own thread (with its own
/// actix System), so it works whatever runtime the service uses; it ends with the process.
pub fn spawn_ops_server(
    listener: std::net::TcpListener,
    handle: PrometheusHandle,
    token: String,
) -> std::io::Result<AdminSlot> {
    let slot = AdminSlot::default();
    let state = AdminState {
        token,
        source: Arc::clone(&slot),
        metrics: Some(handle),
        started: Instant::now(),
    };
    let addr = listener.local_addr()?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
    std::thread::Builder::new()
        .name("gochat-ops".into())
        .spawn(move || {
            actix_rt::System::new().block_on(async move {
                let server = actix_web::HttpServer::new(move || {
                    actix_web::App::new()
                        .app_data(web::Data::new(state.clone()))
                        .route("/metrics", web::get().to(metrics))
                        .route("/healthz", web::get().to(crate::api::healthz))
                        .route("/admin", web::get().to(page))
                        .route("/admin/actors", web::get().to(actors))
                })
                .workers(1)
                .disable_signals()
                .listen(listener);
                match server {
                    Ok(server) => {
                        let _ = ready_tx.send(Ok(()));
                        if let Err(e) = server.run().await {
                            tracing::warn!(cause = %e, "the ops server stopped");
                        }
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            });
        })?;
    ready_rx
        .recv()
        .unwrap_or_else(|_| Err(std::io::Error::other("the ops server thread ended")))?;
    tracing::info!(%addr, "serving /metrics and /healthz");
    Ok(slot)
}

#[derive(Debug, Deserialize)]
pub(crate) struct LimitQuery {
    limit: Option<usize>,
}

/// `GET /admin/actors`; `shared` is absent on the ops server of a process without a gateway.
pub(crate) async fn actors(
    req: HttpRequest,
    st: web::Data<AdminState>,
    shared: Option<web::Data<Shared>>,
    query: web::Query<LimitQuery>,
    trace: TraceId,
) -> Result<HttpResponse, ApiError> {
    let source = admin_source(&st, &req, false, &trace)?;
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let gateway = shared.as_ref().map(|shared| {
        let stats = shared.stats.snapshot();
        GatewayCounters {
            connections_total: stats.connections_total,
            frames_in: stats.frames_in,
            frames_out: stats.frames_out,
            messages_in: stats.upstream_published,
        }
    });
    let report = ActorsReport {
        process: source.process(),
        actors: ActorCounts {
            session: shared.as_ref().map(|s| s.registry.len() as u64),
            conversation: source.conversation_actors(),
            fanout: source.fanout_actors(),
        },
        busiest_conversations: source.busiest_conversations(limit),
        slow_sessions: shared
            .as_ref()
            .map(|s| slow_sessions(s, limit))
            .unwrap_or_default(),
        bus_lag: source.bus_lag(),
        gateway,
        uptime_secs: st.started.elapsed().as_secs(),
    };
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(report))
}

/// Sessions with frames waiting, most waiting first.
fn slow_sessions(shared: &Shared, limit: usize) -> Vec<SlowSession> {
    let mut slow = Vec::new();
    shared.registry.for_each(|h| {
        let queued = h.queued();
        if queued > 0 {
            slow.push(SlowSession {
                session_id: h.id.to_string(),
                user_id: h.user_id.to_string(),
                queued: queued as u64,
            });
        }
    });
    slow.sort_unstable_by(|a, b| {
        b.queued
            .cmp(&a.queued)
            .then_with(|| a.session_id.cmp(&b.session_id))
    });
    slow.truncate(limit);
    slow
}

/// `GET /admin`.
pub(crate) async fn page(
    req: HttpRequest,
    st: web::Data<AdminState>,
    trace: TraceId,
) -> Result<HttpResponse, ApiError> {
    admin_source(&st, &req, true, &trace)?;
    Ok(HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .insert_header((header::X_FRAME_OPTIONS, "DENY"))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'",
        ))
        .body(PAGE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(same_token("0123456789abcdef", "0123456789abcdef"));
        assert!(!same_token("0123456789abcdeg", "0123456789abcdef"));
        assert!(!same_token("0123456789abcde", "0123456789abcdef"));
        assert!(!same_token("", "0123456789abcdef"));
    }

    #[test]
    fn the_page_is_self_contained() {
        assert!(PAGE.starts_with("<!doctype html>"));
        assert!(PAGE.contains("/admin/actors"));
        for external in ["src=\"http", "href=\"http", "@import", "<link"] {
            assert!(!PAGE.contains(external), "the page loads {external}");
        }
    }
}
