//! `GET /ws`: authenticates BEFORE the upgrade (`?token=` or `Authorization: Bearer`; refused
//! with HTTP 401 and an `ErrorResponse`), then upgrades and starts one Session actor (which owns
//! the socket) and its publisher task.
//!
//! Two steps. The `/ws` route, an ordinary actix-web handler behind the same middleware as the
//! API, checks the request and answers `101` with a [`WsGrant`]. Requests asking for an upgrade
//! reach that handler through [`serve_upgrade`], actix-http's upgrade service, which holds the
//! raw connection: for a granted upgrade it takes the socket out of the HTTP/1 dispatcher (see
//! `wsio`) and starts the session on it; any other answer is written and the connection closed.
//!
//! The 101 is sent once the user's presence is reported to logic (at most
//! `presence_wait`): from the moment a client sees its connection open, every message stored
//! for it is routed to this gateway, and what was stored before is what its resync finds.

use std::collections::HashMap;
use std::io;
use std::rc::Rc;
use std::sync::Arc;

use actix_codec::{Encoder, Framed};
use actix_http::body::{BodySize, MessageBody};
use actix_http::{ConnectionType, HttpMessage, Request, Response, StatusCode, h1};
use actix_service::Service;
use actix_web::dev::ServiceResponse;
use actix_web::{HttpRequest, HttpResponse, web};
use futures::SinkExt;
use gochat_infra::ErrorCode;
use tokio::net::TcpStream;

use crate::LogicApi;
use crate::api::{ApiError, ApiState, TraceId, bearer_token, validate_token};
use crate::session::{self, SessionStart, StartPublisher};
use crate::shared::Shared;
use crate::wsio;

/// The access token of a WebSocket request: `?token=` first, then the bearer header.
fn ws_token(req: &HttpRequest) -> Option<String> {
    let from_query = web::Query::<HashMap<String, String>>::from_query(req.query_string())
        .ok()
        .and_then(|q| q.get("token").cloned())
        .filter(|t| !t.is_empty());
    from_query.or_else(|| bearer_token(req).map(str::to_owned))
}

/// Marks a request that came through [`serve_upgrade`], the only path that can keep the socket.
struct ViaUpgrade;

/// A checked WebSocket upgrade, carried on the `101` response to [`serve_upgrade`].
#[derive(Debug, Clone)]
pub(crate) struct WsGrant {
    user_id: String,
    trace_id: String,
}

pub(crate) async fn upgrade<L: LogicApi>(
    req: HttpRequest,
    st: web::Data<ApiState<L>>,
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
    let mut handshake = actix_http::ws::handshake(req.head())
        .map_err(|e| ApiError::invalid(format!("not a WebSocket upgrade request: {e}"), &trace))?;
    // actix-http hands a request over for upgrading only when its `Upgrade` header is exactly
    // `websocket` (and its body not chunked); the handshake check is looser. Anything else
    // stays an HTTP connection and must not be answered 101.
    if req.extensions().get::<ViaUpgrade>().is_none() {
        return Err(ApiError::invalid(
            "not a WebSocket upgrade request: send `Upgrade: websocket` and \
             `Connection: Upgrade` on a GET without a body",
            &trace,
        ));
    }
    let mut response = handshake.finish();
    response.extensions_mut().insert(WsGrant {
        user_id,
        trace_id: trace.as_str().to_owned(),
    });
    Ok(HttpResponse::from(response).map_into_boxed_body())
}

/// Serves a request that asked for a protocol upgrade (actix-http hands over the connection
/// with it). `app` answers it like any request; a granted WebSocket upgrade becomes a session
/// on the raw socket, and any other answer is written and the connection closed. A connection
/// that fails meanwhile is dropped (there is nobody left to tell).
pub(crate) async fn serve_upgrade<S, RB>(
    app: Rc<S>,
    shared: Arc<Shared>,
    start_publisher: StartPublisher,
    req: Request,
    framed: Framed<TcpStream, h1::Codec>,
) -> Result<(), actix_web::Error>
where
    S: Service<Request, Response = ServiceResponse<RB>, Error = actix_web::Error>,
    RB: MessageBody + 'static,
{
    if let Err(err) = answer_upgrade(app, shared, start_publisher, req, framed).await {
        tracing::debug!(%err, "connection failed while answering an upgrade request");
    }
    Ok(())
}

async fn answer_upgrade<S, RB>(
    app: Rc<S>,
    shared: Arc<Shared>,
    start_publisher: StartPublisher,
    req: Request,
    mut framed: Framed<TcpStream, h1::Codec>,
) -> io::Result<()>
where
    S: Service<Request, Response = ServiceResponse<RB>, Error = actix_web::Error>,
    RB: MessageBody + 'static,
{
    req.extensions_mut().insert(ViaUpgrade);
    let mut res: Response<_> = match app.call(req).await {
        Ok(res) => res.map_into_boxed_body().into(),
        Err(err) => err.error_response().into(),
    };
    let grant = res.extensions_mut().remove::<WsGrant>();
    match grant {
        Some(grant) if res.status() == StatusCode::SWITCHING_PROTOCOLS => {
            let mut parts = framed.into_parts();
            // The head waits in the writer until the user's presence is reported.
            let mut head = std::mem::take(&mut parts.write_buf);
            parts.codec.encode(
                h1::Message::Item((res.drop_body(), BodySize::None)),
                &mut head,
            )?;
            let limit = shared.settings.hard_frame_limit();
            let (stream, ws) = wsio::split(parts.io, parts.read_buf, head, limit, limit);
            session::start(SessionStart {
                shared,
                user_id: grant.user_id,
                ws,
                stream,
                start_publisher,
                trace_id: grant.trace_id,
            });
            Ok(())
        }
        _ => {
            // Refused (or not a WebSocket request): the answer, then the connection closes,
            // all within `close_grace` (the HTTP layer's timers no longer run here).
            res.head_mut().set_connection_type(ConnectionType::Close);
            let (head, body) = res.into_parts();
            let answer = async {
                let body = actix_http::body::to_bytes(body)
                    .await
                    .map_err(|e| io::Error::other(e.to_string()))?;
                let size = BodySize::Sized(body.len() as u64);
                // Head and body in one write, as the HTTP layer would send them (a client may
                // read the answer to a failed handshake from its first read only).
                framed.feed(h1::Message::Item((head, size))).await?;
                if !body.is_empty() {
                    framed.feed(h1::Message::Chunk(Some(body))).await?;
                }
                framed.feed(h1::Message::Chunk(None)).await?;
                // `Framed::close` shuts the socket without flushing first.
                framed.flush().await?;
                framed.close().await
            };
            tokio::time::timeout(shared.settings.close_grace, answer)
                .await
                .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
        }
    }
}
