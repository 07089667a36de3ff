//! The `im-task-topic` consumer: reads task records, runs them through the dispatcher, commits.
//!
//! One member of consumer group `im-task` reads every partition it is assigned. Each partition
//! gets a lane (a tokio task with a bounded queue): a lane handles its records one after the
//! other and reports each finished one back to the reading loop, which commits it, so commits
//! are in offset order per partition while partitions proceed in parallel. A lane whose task
//! fails with a retryable error keeps that record (uncommitted) and tries it again after
//! `redelivery_delay` (doubling up to `redelivery_max_delay`); records behind it wait, keeping
//! the partition's order. Anything else (a record that is not a task, a type with no processor,
//! a task that can never succeed) is logged once and committed.
//!
//! Shutdown: reading stops, each lane finishes the record in hand (a task waiting for its next
//! try is abandoned uncommitted), the finished ones are committed, and the loop returns.
//! Records not committed are delivered again to whoever consumes the partition next.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use gochat_infra::mq::{Bus, Consumer, MqError, Record};
use gochat_infra::wire::TASK_TOPIC;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{CONSUMER_GROUP, TaskDispatcher, TaskError, TaskMessage, TaskSettings, TaskStats};

/// Wait after a failed read before reading again.
const READ_RETRY: Duration = Duration::from_millis(500);

/// Consumes `im-task-topic` until `shutdown` resolves or the bus closes.
pub async fn consume<B: Bus>(
    bus: &B,
    dispatcher: Arc<TaskDispatcher>,
    settings: &TaskSettings,
    stats: Arc<TaskStats>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TaskError> {
    bus.ensure_topic(TASK_TOPIC, settings.task_partitions)
        .await?;
    let consumer = bus.subscribe(CONSUMER_GROUP, &[TASK_TOPIC]).await?;
    tracing::info!(
        topic = TASK_TOPIC,
        group = CONSUMER_GROUP,
        "task consumer started"
    );
    let stop = CancellationToken::new();
    let mut reader = Reader {
        consumer,
        lanes: HashMap::new(),
        workers: JoinSet::new(),
        done: mpsc::unbounded_channel(),
        lane: LaneContext {
            dispatcher,
            stats,
            stop: stop.clone(),
            redelivery_delay: settings.redelivery_delay,
            redelivery_max_delay: settings.redelivery_max_delay,
        },
        lane_capacity: settings.lane_capacity,
    };
    let result = reader.read(shutdown).await;
    stop.cancel();
    reader.drain().await;
    tracing::info!("task consumer stopped");
    result
}

/// What every lane shares.
#[derive(Clone)]
struct LaneContext {
    /// Type -> processor.
    dispatcher: Arc<TaskDispatcher>,
    /// Counters.
    stats: Arc<TaskStats>,
    /// Cancelled at shutdown: lanes take no new record and stop waiting to retry.
    stop: CancellationToken,
    /// First wait before a failed task is tried again.
    redelivery_delay: Duration,
    /// Longest such wait.
    redelivery_max_delay: Duration,
}

/// The reading loop's state.
struct Reader<C> {
    /// The group member.
    consumer: C,
    /// The queue of each partition's lane, by (topic, partition).
    lanes: HashMap<(String, u32), mpsc::Sender<Record>>,
    /// The lanes' tasks.
    workers: JoinSet<()>,
    /// Finished records, from the lanes to the loop that commits them. Unbounded, yet bounded in
    /// practice: a lane reports at most one record per record it was given through its bounded
    /// queue, and the loop drains reports whenever it is not waiting on a full lane.
    done: (
        mpsc::UnboundedSender<Record>,
        mpsc::UnboundedReceiver<Record>,
    ),
    /// Lane setup.
    lane: LaneContext,
    /// Queue length of a lane.
    lane_capacity: usize,
}

impl<C: Consumer> Reader<C> {
    /// Reads and hands out records, committing finished ones, until `shutdown` resolves or the
    /// bus closes.
    async fn read(&mut self, shutdown: impl Future<Output = ()>) -> Result<(), TaskError> {
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => return Ok(()),
                Some(record) = self.done.1.recv() => {
                    if self.commit(&record).await.is_err() {
                        return Ok(());
                    }
                }
                got = self.consumer.recv() => match got {
                    Ok(record) => {
                        let lane = self.lane_for(&record);
                        tokio::select! {
                            biased;
                            () = &mut shutdown => return Ok(()),
                            sent = lane.send(record) => {
                                if sent.is_err() {
                                    tracing::error!("a task lane ended unexpectedly");
                                }
                            }
                        }
                    }
                    Err(MqError::Closed) => {
                        tracing::info!("the bus closed; the task consumer stops");
                        return Ok(());
                    }
                    Err(err) => {
                        tracing::warn!(cause = %err, "reading im-task-topic failed; retrying");
                        tokio::select! {
                            () = &mut shutdown => return Ok(()),
                            () = tokio::time::sleep(READ_RETRY) => {}
                        }
                    }
                },
            }
        }
    }

    /// The queue of `record`'s partition, starting its lane on first use.
    fn lane_for(&mut self, record: &Record) -> mpsc::Sender<Record> {
        let key = (record.topic.clone(), record.partition);
        if let Some(tx) = self.lanes.get(&key).filter(|tx| !tx.is_closed()) {
            return tx.clone();
        }
        let (tx, rx) = mpsc::channel(self.lane_capacity);
        self.workers
            .spawn(lane(rx, self.done.0.clone(), self.lane.clone()));
        self.lanes.insert(key, tx.clone());
        tx
    }

    /// Commits `record`; `Err` only when the bus is closed. Any other failure is logged (the
    /// record is then delivered again after a rebalance: at least once).
    async fn commit(&mut self, record: &Record) -> Result<(), ()> {
        match self.consumer.commit(record).await {
            Ok(()) => Ok(()),
            Err(MqError::Closed) => Err(()),
            Err(err) => {
                tracing::warn!(
                    cause = %err,
                    partition = record.partition,
                    offset = record.offset,
                    "committing a task record failed"
                );
                Ok(())
            }
        }
    }

    /// After the loop: lets the lanes finish the records in hand, commits those, waits for the
    /// lanes to end.
    async fn drain(&mut self) {
        self.lanes.clear();
        let (tx, _) = mpsc::unbounded_channel();
        drop(std::mem::replace(&mut self.done.0, tx));
        while let Some(record) = self.done.1.recv().await {
            if self.commit(&record).await.is_err() {
                break;
            }
        }
        while let Some(joined) = self.workers.join_next().await {
            if let Err(err) = joined {
                tracing::error!(cause = %err, "a task lane panicked");
            }
        }
    }
}

/// One partition's lane: handles its records in order and reports each finished one.
async fn lane(
    mut queue: mpsc::Receiver<Record>,
    done: mpsc::UnboundedSender<Record>,
    cx: LaneContext,
) {
    loop {
        let record = tokio::select! {
            biased;
            () = cx.stop.cancelled() => return,
            next = queue.recv() => match next {
                Some(r) => r,
                None => return,
            },
        };
        if !handle(&record, &cx).await || done.send(record).is_err() {
            return;
        }
    }
}

/// Handles one record; true when it may be committed, false when it was abandoned at shutdown.
async fn handle(record: &Record, cx: &LaneContext) -> bool {
    cx.stats.task();
    let task = match record.payload.decode::<TaskMessage>() {
        Ok(t) => t,
        Err(err) => {
            cx.stats.malformed();
            tracing::warn!(
                cause = %err,
                trace_id = record.headers.get("trace_id").map_or("", String::as_str),
                partition = record.partition,
                offset = record.offset,
                "a task record is not a task message; committing it"
            );
            return true;
        }
    };
    let span = tracing::info_span!(
        "task",
        trace_id = %task.trace_id,
        task_id = %task.task_id,
        task_type = ?task.task_type,
        partition = record.partition,
        offset = record.offset,
    );
    run_task(&task, cx).instrument(span).await
}

/// Dispatches `task` until it succeeds or fails for good; false when abandoned at shutdown.
async fn run_task(task: &TaskMessage, cx: &LaneContext) -> bool {
    let mut delay = cx.redelivery_delay;
    loop {
        let err = match cx.dispatcher.dispatch(task).await {
            Ok(()) => return true,
            Err(err) => err,
        };
        if let TaskError::NoProcessor(_) = err {
            cx.stats.unhandled();
            tracing::error!(cause = %err, "no processor for this task; committing it");
            return true;
        }
        if !err.is_retryable() {
            cx.stats.rejected();
            tracing::error!(cause = %err, "task failed and cannot succeed; committing it");
            return true;
        }
        tracing::warn!(cause = %err, retry_in = ?delay, "task failed; it will be tried again");
        tokio::select! {
            biased;
            () = cx.stop.cancelled() => {
                tracing::info!("shutting down; the failed task stays uncommitted");
                return false;
            }
            () = tokio::time::sleep(delay) => {}
        }
        delay = delay
            .saturating_mul(2)
            .min(cx.redelivery_max_delay.max(delay));
    }
}
