//! gochat's task service (spec section 4): it consumes `im-task-topic`, hands each task to the
//! processor registered for its type, and delivers big-group and world-room messages through
//! Fanout actors.
//!
//! Data flows: [`consumer`] reads task records as consumer group `im-task`, one lane per
//! partition (records of one partition are handled one after the other, partitions in
//! parallel), parses each into a [`TaskMessage`] and calls the [`TaskDispatcher`]. The only
//! processor today is [`fanout::FanoutProcessor`]: it starts one [`fanout::Fanout`] actor per
//! job on an arbiter of a small pool (round-robin, one arbiter per core), at most
//! [`TaskSettings::max_in_flight`] at a time. The actor reads the group members' presence a
//! page at a time (`GetMembersOnlineStatus`, 200 a page, each page after the last one's token:
//! an index seek rather than an offset that steps over every earlier member again) and
//! produces ONE `DownstreamMessage` per gateway per page to `im-downstream-topic-{gateway}`,
//! keyed by conversation id, with `targets` naming the online recipients on that gateway; the
//! world room is one `broadcast` record per live gateway. When
//! the job is done the actor replies, and the lane commits the task record. A failed repo call is
//! retried with the spec's backoff; a job that still fails is not committed and is tried again
//! after a delay (a redelivered job re-sends; gateways drop a `new-message` whose seq a session
//! already has). A record that cannot be parsed or has no processor is logged and committed.
//!
//! The service is generic over the repo ([`RepoApi`]: the repo's tonic server traits, the real
//! `gochat_repo::Repo` in-process in `serve` mode, a tonic-client adapter when distributed), the
//! bus ([`gochat_infra::mq::Bus`]) and gateway discovery ([`LiveGateways`]).

pub mod arbiters;
pub mod consumer;
pub mod dispatcher;
pub mod error;
pub mod fanout;
pub mod gateways;
pub mod retry;
pub mod settings;
pub mod stats;

use std::future::Future;
use std::sync::Arc;

use gochat_infra::mq::Bus;
use gochat_proto::repo::group_service_server::GroupService;
use gochat_proto::repo::online_status_service_server::OnlineStatusService;

pub use dispatcher::{TaskDispatcher, TaskProcessor};
pub use error::TaskError;
pub use gateways::{LiveGateways, StaticGateways};
pub use gochat_infra::wire::{TaskMessage, TaskType};
pub use retry::RetryPolicy;
pub use settings::TaskSettings;
pub use stats::{TaskStats, TaskStatsSnapshot};

/// The consumer group of the task service on `im-task-topic`.
pub const CONSUMER_GROUP: &str = "im-task";

/// What the task service needs from repo: group members and presence. Implemented by every type
/// that implements both tonic server traits (the real `gochat_repo::Repo`, or an adapter over the
/// tonic clients).
pub trait RepoApi: GroupService + OnlineStatusService + Clone + Send + Sync + 'static {}

impl<T> RepoApi for T where T: GroupService + OnlineStatusService + Clone + Send + Sync + 'static {}

/// The task service, built but not yet running: holds what [`run`](Self::run) needs and the
/// counters, so a caller can keep [`stats`](Self::stats) for its admin endpoints.
#[derive(Debug)]
pub struct TaskService<R, B, G> {
    /// Tunables.
    settings: TaskSettings,
    /// Where members and presence come from.
    repo: R,
    /// Where tasks come from and deliveries go.
    bus: B,
    /// The gateways a world-room message goes to.
    gateways: G,
    /// Counters shared with the consumer, the dispatcher and every Fanout actor.
    stats: Arc<TaskStats>,
}

impl<R: RepoApi, B: Bus, G: LiveGateways> TaskService<R, B, G> {
    /// A service over `repo`, `bus` and `gateways`.
    pub fn new(settings: TaskSettings, repo: R, bus: B, gateways: G) -> Self {
        Self {
            settings,
            repo,
            bus,
            gateways,
            stats: Arc::new(TaskStats::default()),
        }
    }

    /// The service's counters (live: they keep moving while the service runs).
    pub fn stats(&self) -> Arc<TaskStats> {
        Arc::clone(&self.stats)
    }

    /// Consumes `im-task-topic` until `shutdown` resolves (then finishes the records in hand and
    /// returns) or the bus closes. Fails when the arbiters cannot be started or the bus refuses
    /// the topic or the subscription.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), TaskError> {
        let settings = self.settings.validated()?;
        let pool = Arc::new(arbiters::ArbiterPool::start(settings.arbiter_count())?);
        let mut dispatcher = TaskDispatcher::new();
        dispatcher.register(
            TaskType::Fanout,
            fanout::FanoutProcessor::new(
                self.repo,
                self.bus.clone(),
                self.gateways,
                &settings,
                Arc::clone(&pool),
                Arc::clone(&self.stats),
            ),
        );
        let result = consumer::consume(
            &self.bus,
            Arc::new(dispatcher),
            &settings,
            Arc::clone(&self.stats),
            shutdown,
        )
        .await;
        pool.stop().await;
        result
    }
}

/// Runs the task service until `shutdown` resolves: [`TaskService::new`] then
/// [`TaskService::run`] (use those to keep the counters).
pub async fn run<R: RepoApi, B: Bus, G: LiveGateways>(
    settings: TaskSettings,
    repo: R,
    bus: B,
    gateways: G,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TaskError> {
    TaskService::new(settings, repo, bus, gateways)
        .run(shutdown)
        .await
}
