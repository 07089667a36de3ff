//! gochat's gateway (spec section 1): the HTTP API and `/ws` of the client contract, one
//! Session actor per WebSocket connection, the user -> sessions registry, presence reporting
//! and the downstream consumer.
//!
//! How data flows through it:
//!
//! - **HTTP** (`api`): a request gets a trace id, is authenticated with logic's
//!   `ValidateToken`, calls one logic RPC in-process through [`LogicApi`] and is answered with
//!   the contract's JSON (errors: `ErrorResponse` with the contract's status).
//! - **WebSocket up** (`ws`, `session`): `/ws` authenticates before the upgrade and starts a
//!   Session actor. Valid `send-message` frames are published to `im-upstream-topic`, keyed by
//!   conversation id, with the session id in the `session_id` header; logic checks membership,
//!   stores, acks and delivers.
//! - **WebSocket down** (`downstream`): one consumer per gateway reads
//!   `im-downstream-topic-{gateway_id}` and offers each record (new message, ack, error, online
//!   status) to the local sessions it targets: the `registry` knows each session's worker
//!   thread, and the consumer hands each worker's `hub` one job per record, which queues it for
//!   that worker's sessions. It never waits on a client: a session that cannot keep up is
//!   closed (1013) and resyncs by seq.
//! - **Presence** (`presence`): the first local session of a user reports `UserConnected`,
//!   the last one's close `UserDisconnected`, and all local users are refreshed every third of
//!   the presence ttl.
//!
//! - **Operators** (`admin`): `GET /metrics` renders the process's Prometheus recorder (given
//!   with [`Gateway::with_metrics`]); `GET /admin/actors` and `GET /admin` report actors, slow
//!   sessions and bus lag, with what lies outside the gateway coming from an [`AdminSource`]
//!   ([`Gateway::with_admin`]), behind the admin token.
//!
//! The gateway never touches a database: logic through the four logic service traits, the bus
//! through [`Bus`]. See `docs/protocol-client.md` for the wire protocol and `docs/operations.md`
//! for the metrics and the admin endpoints.

mod admin;
mod api;
mod downstream;
mod frames;
mod hub;
mod presence;
mod registry;
mod session;
mod settings;
mod shared;
mod stats;
mod ws;
mod wsio;

use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_http::{HttpService, KeepAlive};
use actix_service::{IntoServiceFactory, ServiceFactory, fn_factory, fn_service, map_config};
use actix_web::dev::AppConfig;
use actix_web::{App, middleware, web};
use gochat_infra::mq::Bus;
use gochat_infra::telemetry::PrometheusHandle;
use gochat_proto::logic::auth_service_server::AuthService;
use gochat_proto::logic::conversation_service_server::ConversationService;
use gochat_proto::logic::group_service_server::GroupService;
use gochat_proto::logic::presence_service_server::PresenceService;
use tokio_util::sync::CancellationToken;

pub use admin::{AdminSlot, AdminSource, BusyConversation, spawn_ops_server};
pub use api::{TRACE_HEADER, TRACE_METADATA_KEY};
pub use downstream::consumer_group;
pub use settings::GatewaySettings;
pub use stats::{CloseCause, GatewayStats, StatsSnapshot};

use crate::admin::AdminState;
use crate::api::ApiState;
use crate::shared::Shared;

/// Everything the gateway needs from logic: the four logic service traits. In `serve` mode the
/// logic service itself; in the distributed mode an adapter over the tonic clients.
pub trait LogicApi:
    AuthService + ConversationService + GroupService + PresenceService + Clone + Send + Sync + 'static
{
}

impl<T> LogicApi for T where
    T: AuthService
        + ConversationService
        + GroupService
        + PresenceService
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// A gateway ready to run; [`Gateway::stats`] reads its counters while it runs.
pub struct Gateway<L, B> {
    settings: GatewaySettings,
    logic: L,
    bus: B,
    stats: Arc<GatewayStats>,
    /// Renders `/metrics` (none: 404).
    metrics: Option<PrometheusHandle>,
    /// Feeds the admin routes (none: 404).
    admin: Option<Arc<dyn AdminSource>>,
}

impl<L, B> std::fmt::Debug for Gateway<L, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("settings", &self.settings)
            .field("stats", &self.stats)
            .field("metrics", &self.metrics.is_some())
            .field("admin", &self.admin.is_some())
            .finish_non_exhaustive()
    }
}

impl<L: LogicApi, B: Bus> Gateway<L, B> {
    /// A gateway with these settings, talking to `logic` and `bus`.
    pub fn new(settings: GatewaySettings, logic: L, bus: B) -> Self {
        Self {
            settings,
            logic,
            bus,
            stats: Arc::new(GatewayStats::default()),
            metrics: None,
            admin: None,
        }
    }

    /// Serves `GET /metrics` from `handle` (the process's recorder, see
    /// `gochat_infra::telemetry::install`).
    pub fn with_metrics(mut self, handle: PrometheusHandle) -> Self {
        self.metrics = Some(handle);
        self
    }

    /// Serves `GET /admin/actors` and `GET /admin` with data from `source` (only when
    /// `settings.admin_token` is set).
    pub fn with_admin(mut self, source: Arc<dyn AdminSource>) -> Self {
        self.admin = Some(source);
        self
    }

    /// The gateway's counters (live).
    pub fn stats(&self) -> Arc<GatewayStats> {
        Arc::clone(&self.stats)
    }

    /// Serves HTTP and WebSocket on `listener` until `shutdown` resolves, then closes every
    /// session with 1001 (going away), reports its users offline and stops gracefully (within
    /// `shutdown_grace`). Must run inside an actix `System`.
    pub async fn run(
        self,
        listener: std::net::TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let Self {
            settings,
            logic,
            bus,
            stats,
            metrics,
            admin,
        } = self;
        let source = AdminSlot::default();
        if let Some(admin) = admin {
            let _ = source.set(admin);
        }
        let admin_data = web::Data::new(AdminState {
            token: settings.admin_token.clone(),
            source,
            metrics,
            started: Instant::now(),
        });
        let workers = settings.workers;
        let grace = settings.shutdown_grace;
        let close_grace = settings.close_grace;
        let max_body = settings.max_body_bytes;
        let shared = Arc::new(Shared::new(settings, stats));
        let cancel = CancellationToken::new();

        // The consumer (parse, frame, hand to sessions: every delivery passes through it) gets
        // a thread of its own instead of sharing the `System` thread.
        let consumer = gochat_infra::rt::OwnThread::spawn(downstream::run_consumer(
            Arc::clone(&shared),
            bus.clone(),
            cancel.clone(),
        ));
        let reporter = actix_rt::spawn(presence::run_reporter(
            Arc::clone(&shared),
            logic.clone(),
            cancel.clone(),
        ));
        let sweeper = actix_rt::spawn(sweep_heartbeats(Arc::clone(&shared), cancel.clone()));

        let api_state = web::Data::new(ApiState {
            shared: Arc::clone(&shared),
            logic,
        });
        let shared_data = web::Data::from(Arc::clone(&shared));
        let make_app = move || {
            App::new()
                .app_data(api_state.clone())
                .app_data(shared_data.clone())
                .app_data(admin_data.clone())
                .configure(|cfg| api::configure::<L>(cfg, max_body))
                .wrap(middleware::from_fn(api::trace_layer))
        };
        // actix-web's `HttpServer` has no place for an upgrade service, so the server is put
        // together from its parts with the same settings (timeouts as `HttpServer`'s defaults).
        // Requests asking for an upgrade go to `ws::serve_upgrade`, which runs them through an
        // instance of the same app and, for `/ws`, keeps the socket (see `wsio`).
        let local_addr = listener.local_addr()?;
        let upgrade_shared = Arc::clone(&shared);
        let mut builder = actix_server::Server::build()
            .disable_signals()
            .shutdown_timeout(grace.as_secs().max(1));
        if workers > 0 {
            builder = builder.workers(workers);
        }
        let server = builder
            .listen("gochat-gateway", listener, move || {
                let upgrade_app = make_app.clone();
                let shared = Arc::clone(&upgrade_shared);
                let bus = bus.clone();
                let upgrade = fn_factory(move || {
                    let factory = upgrade_app().into_factory();
                    let shared = Arc::clone(&shared);
                    let publisher =
                        session::publisher_starter(bus.clone(), Arc::clone(&shared.stats));
                    async move {
                        let app = Rc::new(factory.new_service(AppConfig::default()).await?);
                        Ok::<_, ()>(fn_service(move |(req, framed)| {
                            ws::serve_upgrade(
                                Rc::clone(&app),
                                Arc::clone(&shared),
                                Rc::clone(&publisher),
                                req,
                                framed,
                            )
                        }))
                    }
                });
                HttpService::build()
                    .keep_alive(KeepAlive::default())
                    .client_request_timeout(Duration::from_secs(5))
                    .client_disconnect_timeout(Duration::from_secs(1))
                    // Chat frames are small and latency-bound: never let Nagle hold one back.
                    .tcp_nodelay(true)
                    .local_addr(local_addr)
                    .upgrade(upgrade)
                    // `AppConfig` only gives the host and address when a request names none.
                    .finish(map_config(make_app(), |_| AppConfig::default()))
                    .tcp()
            })?
            .run();
        let handle = server.handle();
        let mut server = std::pin::pin!(server);
        let shutdown = std::pin::pin!(shutdown);

        let stopped_early = tokio::select! {
            res = &mut server => Some(res),
            () = shutdown => None,
        };
        if let Some(res) = stopped_early {
            cancel.cancel();
            let _ = consumer.join().await;
            let _ = reporter.await;
            let _ = sweeper.await;
            return res;
        }

        tracing::info!(sessions = shared.registry.len(), "gateway shutting down");
        shared.begin_shutdown();
        shared.registry.for_each(|h| {
            h.close(CloseCause::Shutdown, "server shutting down");
        });
        // Sessions end at once; their sockets then send the close frame (and what the close
        // drains), which the workers' graceful stop does not wait for: wait here.
        let drained = async {
            while shared.registry.len() > 0 || shared.closing_sockets() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        // The server keeps running (sessions need their workers) while they close.
        tokio::select! {
            res = &mut server => {
                cancel.cancel();
                let _ = consumer.join().await;
                let _ = reporter.await;
                let _ = sweeper.await;
                return res;
            }
            _ = tokio::time::timeout(close_grace, drained) => {}
        }
        cancel.cancel();
        let (_, res) = tokio::join!(handle.stop(true), server);
        let _ = consumer.join().await;
        let _ = reporter.await;
        let _ = sweeper.await;
        tracing::info!("gateway stopped");
        res
    }
}

/// Every `heartbeat_check_interval`, asks the sessions silent for `heartbeat_timeout` to close
/// (see `registry`), until cancelled.
async fn sweep_heartbeats(shared: Arc<Shared>, cancel: CancellationToken) {
    let every = shared
        .settings
        .heartbeat_check_interval
        .max(Duration::from_millis(10));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {
                let asked = shared.registry.close_silent(shared.settings.heartbeat_timeout);
                if asked > 0 {
                    tracing::debug!(asked, "heartbeat sweep");
                }
            }
        }
    }
}

/// Runs a gateway: [`Gateway::new`] then [`Gateway::run`].
pub async fn run<L: LogicApi, B: Bus>(
    settings: GatewaySettings,
    logic: L,
    bus: B,
    listener: std::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    Gateway::new(settings, logic, bus)
        .run(listener, shutdown)
        .await
}
