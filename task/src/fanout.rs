//! Fan-out: the `fanout` task processor and the [`Fanout`] actor.
//!
//! [`FanoutProcessor`] plans a [`FanoutJob`] from the task, waits for one of
//! `max_in_flight` permits, and starts a [`Fanout`] actor for the job on the next arbiter of the
//! pool. The actor runs the job, replies with its outcome on a oneshot channel and stops; the
//! permit is held by the actor, so it is given back exactly when the actor is gone (also when an
//! arbiter stops under it, in which case the reply is [`TaskError::ActorGone`]).

pub mod job;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use actix::prelude::*;
use actix_rt::ArbiterHandle;
use gochat_infra::mq::Bus;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tracing::Instrument;

use crate::arbiters::ArbiterPool;
use crate::dispatcher::{ProcessFuture, TaskProcessor};
use crate::{LiveGateways, RepoApi, TaskError, TaskMessage, TaskSettings, TaskStats};
pub use job::{FanoutJob, FanoutReport};

type JobFuture = Pin<Box<dyn Future<Output = Result<FanoutReport, TaskError>> + Send>>;
type Reply = oneshot::Sender<Result<FanoutReport, TaskError>>;

/// Counts a Fanout actor as alive (in [`TaskStats`] and `gochat_actors{kind="fanout"}`) from
/// its creation until it is dropped, also when its arbiter stops under it.
struct Alive(Arc<TaskStats>);

impl Alive {
    fn new(stats: Arc<TaskStats>) -> Self {
        stats.fanout_started();
        Self(stats)
    }
}

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.fanout_stopped();
    }
}

/// The actor of one delivery job: runs it on its arbiter, replies, stops.
pub struct Fanout {
    /// The job's task id (for logs).
    task_id: String,
    /// The job, until `started` spawns it.
    job: Option<JobFuture>,
    /// Where the outcome goes.
    reply: Option<Reply>,
    /// The in-flight slot this job occupies; released when the actor is dropped.
    _permit: OwnedSemaphorePermit,
    /// Keeps the actor counted while it lives.
    _alive: Alive,
}

impl fmt::Debug for Fanout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fanout")
            .field("task_id", &self.task_id)
            .field("running", &self.job.is_none())
            .finish_non_exhaustive()
    }
}

impl Fanout {
    /// Starts the actor of `job` on `arbiter`, holding `permit` until it stops and counted in
    /// `stats` while it lives; the receiver gets the job's outcome.
    pub fn start<R: RepoApi, B: Bus>(
        arbiter: &ArbiterHandle,
        job: FanoutJob<R, B>,
        permit: OwnedSemaphorePermit,
        stats: Arc<TaskStats>,
    ) -> oneshot::Receiver<Result<FanoutReport, TaskError>> {
        let (tx, rx) = oneshot::channel();
        let task_id = job.task_id().to_owned();
        let work: JobFuture = Box::pin(job.run().instrument(tracing::Span::current()));
        let alive = Alive::new(stats);
        Fanout::start_in_arbiter(arbiter, move |_| Fanout {
            task_id,
            job: Some(work),
            reply: Some(tx),
            _permit: permit,
            _alive: alive,
        });
        rx
    }
}

impl Actor for Fanout {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let Some(job) = self.job.take() else {
            ctx.stop();
            return;
        };
        ctx.spawn(job.into_actor(self).map(|outcome, act, ctx| {
            if let Some(reply) = act.reply.take() {
                // The waiting lane may be gone (shutdown); the outcome is logged there anyway.
                let _ = reply.send(outcome);
            }
            ctx.stop();
        }));
    }
}

/// The processor of `fanout` tasks.
pub struct FanoutProcessor<R, B, G> {
    /// Members and presence.
    repo: R,
    /// Where deliveries go.
    bus: B,
    /// Gateways for the world room.
    gateways: G,
    /// Page size, retries, timeouts.
    config: job::JobConfig,
    /// Where actors run.
    pool: Arc<ArbiterPool>,
    /// `max_in_flight` slots.
    permits: Arc<Semaphore>,
    /// How many slots there are.
    max_in_flight: usize,
    /// Counters.
    stats: Arc<TaskStats>,
}

impl<R, B, G> fmt::Debug for FanoutProcessor<R, B, G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FanoutProcessor")
            .field("config", &self.config)
            .field("arbiters", &self.pool.len())
            .field("free_slots", &self.permits.available_permits())
            .finish_non_exhaustive()
    }
}

impl<R: RepoApi, B: Bus, G: LiveGateways> FanoutProcessor<R, B, G> {
    /// A processor running its actors on `pool`.
    pub fn new(
        repo: R,
        bus: B,
        gateways: G,
        settings: &TaskSettings,
        pool: Arc<ArbiterPool>,
        stats: Arc<TaskStats>,
    ) -> Self {
        Self {
            repo,
            bus,
            gateways,
            config: job::JobConfig {
                batch_size: settings.batch_size,
                retry: settings.retry.clone(),
                call_timeout: settings.call_timeout,
            },
            pool,
            permits: Arc::new(Semaphore::new(settings.max_in_flight.max(1))),
            max_in_flight: settings.max_in_flight.max(1),
            stats,
        }
    }

    async fn fan_out(&self, task: &TaskMessage) -> Result<FanoutReport, TaskError> {
        let job = FanoutJob::plan(
            task,
            self.repo.clone(),
            self.bus.clone(),
            &self.gateways,
            self.config.clone(),
            Arc::clone(&self.stats),
        )?;
        self.stats.job_queued(
            self.max_in_flight - self.permits.available_permits().min(self.max_in_flight),
        );
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| TaskError::ShuttingDown)?;
        let conversation_id = job.conversation_id().to_owned();
        let started = std::time::Instant::now();
        let reply = Fanout::start(self.pool.next(), job, permit, Arc::clone(&self.stats));
        let outcome = reply.await.unwrap_or(Err(TaskError::ActorGone));
        let took = started.elapsed();
        match &outcome {
            Ok(report) => {
                self.stats.job_done(took);
                tracing::debug!(
                    conversation_id,
                    pages = report.pages,
                    records = report.records,
                    recipients = report.recipients,
                    "fan-out done"
                );
            }
            Err(_) => self.stats.job_failed(took),
        }
        outcome
    }
}

impl<R: RepoApi, B: Bus, G: LiveGateways> TaskProcessor for FanoutProcessor<R, B, G> {
    fn process<'a>(&'a self, task: &'a TaskMessage) -> ProcessFuture<'a> {
        Box::pin(async move { self.fan_out(task).await.map(drop) })
    }
}
