//! `GET /ws`: authenticates BEFORE the upgrade (`?token=` or `Authorization: Bearer`; refused
//! with HTTP 401 and an `ErrorResponse`), then upgrades and starts one Session actor (which owns
//! the socket half) and its publisher task.
//!
//! The 101 is sent once the user's presence is reported to logic (at most
//! `presence_wait`): from the moment a client sees its connection open, every message stored
//! for it is routed to this gateway, and what was stored before is what its resync finds.

use std::collections::HashMap;
use std::time::Instant;

use actix_web::{HttpRequest, HttpResponse, web};
use gochat_infra::ErrorCode;
use gochat_infra::mq::Bus;
use tokio::sync::{mpsc, oneshot};

use crate::LogicApi;
use crate::api::{ApiError, ApiState, TraceId, bearer_token, validate_token};
use crate::session::{self, SessionStart};

/// The access token of a WebSocket request: `?token=` first, then the bearer header.
fn ws_token(req: &HttpRequest) -> Option<String> {
    let from_query = web::Query::<HashMap<String, String>>::from_query(req.query_string())
        .ok()
        .and_then(|q| q.get("token").cloned())
        .filter(|t| !t.is_empty());
    from_query.or_else(|| bearer_token(req).map(str::to_owned))
}

pub(crate) async fn upgrade<L: LogicApi, B: Bus>(
    req: HttpRequest,
    body: web::Payload,
    st: web::Data<ApiState<L>>,
    bus: web::Data<B>,
    trace: TraceId,
) -> Result<HttpResponse, ApiError> {
    let shared = &st.shared;
    if shared.is_shutting_down() {
        return Err(ApiError::new(
            ErrorCode::Unavailable,
            "the gateway is shutting down",
            &trace,
        ));
    }
    let token = ws_token(&req).ok_or_else(|| {
        ApiError::unauthorized(
            "missing access token: pass `?token=` or `Authorization: Bearer`",
            &trace,
        )
    })?;
    let user_id = validate_token(&st.logic, &token, &trace).await?;
    if shared.registry.len() >= shared.settings.max_sessions {
        return Err(ApiError::new(
            ErrorCode::Unavailable,
            "the gateway is at its connection limit; retry later",
            &trace,
        ));
    }
    let (response, ws, stream) = actix_ws::handle(&req, body)
        .map_err(|e| ApiError::invalid(format!("not a WebSocket upgrade request: {e}"), &trace))?;
    let limit = shared.settings.hard_frame_limit();
    let stream = stream
        .max_frame_size(limit)
        .aggregate_continuations()
        .max_continuation_size(limit);
    let (upstream_tx, upstream_rx) = mpsc::channel(shared.settings.upstream_inflight.max(1));
    let wait = shared.settings.presence_wait;
    let (ready_tx, ready_rx) = (!wait.is_zero()).then(oneshot::channel).unzip();
    let addr = session::start(SessionStart {
        shared: shared.clone(),
        user_id,
        ws,
        stream,
        upstream: upstream_tx,
        trace_id: trace.as_str().to_owned(),
        presence_ready: ready_tx,
    });
    actix_rt::spawn(session::publish_loop(
        bus.get_ref().clone(),
        upstream_rx,
        addr,
        shared.stats.clone(),
    ));
    if let Some(ready) = ready_rx {
        let started = Instant::now();
        // Reported only when the waiter is released: a timeout, or a dropped waiter (the
        // reporter stopped), opens the connection unreported.
        let reported = matches!(tokio::time::timeout(wait, ready).await, Ok(Ok(())));
        shared.stats.presence_waited(started.elapsed(), reported);
        if !reported {
            tracing::warn!(
                trace_id = %trace.as_str(),
                waited_ms = started.elapsed().as_millis() as u64,
                "presence not reported; upgrading anyway (messages stored meanwhile reach this \
                 connection only by resync)"
            );
        }
    }
    Ok(response)
}
