//! [`TaskStats`]: the task service's counters, shared by the consumer, the dispatcher and every
//! Fanout actor, and the one place the task service records its Prometheus metrics: each update
//! here also updates the matching `gochat_task_*` / `gochat_fanout_*` metric (see
//! `gochat_infra::telemetry`).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use gochat_infra::telemetry as t;
use metrics::{counter, gauge, histogram};

/// Live counters of one task service (monotonic since it was built).
#[derive(Debug, Default)]
pub struct TaskStats {
    /// Task records read from `im-task-topic`.
    tasks: AtomicU64,
    /// Records that were not a task message (logged and committed).
    malformed: AtomicU64,
    /// Tasks whose type has no processor (logged and committed).
    unhandled: AtomicU64,
    /// Tasks dropped because they failed with an error that retrying cannot fix.
    rejected: AtomicU64,
    /// Fan-out jobs that finished.
    jobs: AtomicU64,
    /// Fan-out job runs that failed and were (or will be) tried again.
    jobs_failed: AtomicU64,
    /// Downstream records produced (one per gateway per member page, or per gateway for the
    /// world room).
    batches: AtomicU64,
    /// Recipients named in those records (a user online on two gateways counts twice).
    deliveries: AtomicU64,
    /// Broadcast records produced (world room).
    broadcasts: AtomicU64,
    /// Repo calls and downstream sends that were retried.
    retries: AtomicU64,
    /// Fanout actors alive now (the only field that goes down).
    fanout_actors: AtomicI64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TaskStatsSnapshot {
    /// Task records read.
    pub tasks: u64,
    /// Records that were not a task message.
    pub malformed: u64,
    /// Tasks whose type has no processor.
    pub unhandled: u64,
    /// Tasks dropped after a permanent failure.
    pub rejected: u64,
    /// Fan-out jobs finished.
    pub jobs: u64,
    /// Fan-out job runs that failed.
    pub jobs_failed: u64,
    /// Downstream records produced.
    pub batches: u64,
    /// Recipients named in them.
    pub deliveries: u64,
    /// Broadcast records produced.
    pub broadcasts: u64,
    /// Retried calls.
    pub retries: u64,
}

fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl TaskStats {
    /// The counters now.
    pub fn snapshot(&self) -> TaskStatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        TaskStatsSnapshot {
            tasks: get(&self.tasks),
            malformed: get(&self.malformed),
            unhandled: get(&self.unhandled),
            rejected: get(&self.rejected),
            jobs: get(&self.jobs),
            jobs_failed: get(&self.jobs_failed),
            batches: get(&self.batches),
            deliveries: get(&self.deliveries),
            broadcasts: get(&self.broadcasts),
            retries: get(&self.retries),
        }
    }

    /// Fanout actors alive now.
    pub fn fanout_actors(&self) -> u64 {
        u64::try_from(self.fanout_actors.load(Ordering::Relaxed)).unwrap_or(0)
    }

    pub(crate) fn task(&self) {
        bump(&self.tasks, 1);
        counter!(t::TASK_RECORDS).increment(1);
    }
    pub(crate) fn malformed(&self) {
        bump(&self.malformed, 1);
        counter!(t::TASK_DROPPED, "reason" => "malformed").increment(1);
    }
    pub(crate) fn unhandled(&self) {
        bump(&self.unhandled, 1);
        counter!(t::TASK_DROPPED, "reason" => "unhandled").increment(1);
    }
    pub(crate) fn rejected(&self) {
        bump(&self.rejected, 1);
        counter!(t::TASK_DROPPED, "reason" => "rejected").increment(1);
    }
    /// A job finished after `took` (from its actor's start to its reply).
    pub(crate) fn job_done(&self, took: Duration) {
        bump(&self.jobs, 1);
        counter!(t::FANOUT_JOBS, "result" => "done").increment(1);
        histogram!(t::HANDLING_SECONDS, "kind" => "fanout").record(took.as_secs_f64());
    }
    /// A job run failed after `took`.
    pub(crate) fn job_failed(&self, took: Duration) {
        bump(&self.jobs_failed, 1);
        counter!(t::FANOUT_JOBS, "result" => "failed").increment(1);
        histogram!(t::HANDLING_SECONDS, "kind" => "fanout").record(took.as_secs_f64());
    }
    /// A job asked for a slot while `running` jobs held one.
    pub(crate) fn job_queued(&self, running: usize) {
        histogram!(t::MAILBOX_DEPTH, "kind" => "fanout").record(running as f64);
    }
    pub(crate) fn batch(&self, targets: usize) {
        bump(&self.batches, 1);
        bump(&self.deliveries, targets as u64);
        counter!(t::FANOUT_RECORDS).increment(1);
        counter!(t::FANOUT_DELIVERIES).increment(targets as u64);
        histogram!(t::BATCH_SIZE, "kind" => "fanout").record(targets as f64);
    }
    pub(crate) fn broadcast(&self) {
        bump(&self.batches, 1);
        bump(&self.broadcasts, 1);
        counter!(t::FANOUT_RECORDS).increment(1);
        counter!(t::FANOUT_BROADCASTS).increment(1);
    }
    pub(crate) fn retry(&self) {
        bump(&self.retries, 1);
        counter!(t::TASK_RETRIES).increment(1);
    }
    pub(crate) fn fanout_started(&self) {
        self.fanout_actors.fetch_add(1, Ordering::Relaxed);
        gauge!(t::ACTORS, "kind" => "fanout").increment(1);
    }
    pub(crate) fn fanout_stopped(&self) {
        self.fanout_actors.fetch_sub(1, Ordering::Relaxed);
        gauge!(t::ACTORS, "kind" => "fanout").decrement(1);
    }
}
