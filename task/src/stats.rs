//! [`TaskStats`]: the task service's counters, shared by the consumer, the dispatcher and every
//! Fanout actor. Plain atomics for now; the metrics exporter reads them later.

use std::sync::atomic::{AtomicU64, Ordering};

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

    pub(crate) fn task(&self) {
        bump(&self.tasks, 1);
    }
    pub(crate) fn malformed(&self) {
        bump(&self.malformed, 1);
    }
    pub(crate) fn unhandled(&self) {
        bump(&self.unhandled, 1);
    }
    pub(crate) fn rejected(&self) {
        bump(&self.rejected, 1);
    }
    pub(crate) fn job_done(&self) {
        bump(&self.jobs, 1);
    }
    pub(crate) fn job_failed(&self) {
        bump(&self.jobs_failed, 1);
    }
    pub(crate) fn batch(&self, targets: usize) {
        bump(&self.batches, 1);
        bump(&self.deliveries, targets as u64);
    }
    pub(crate) fn broadcast(&self) {
        bump(&self.batches, 1);
        bump(&self.broadcasts, 1);
    }
    pub(crate) fn retry(&self) {
        bump(&self.retries, 1);
    }
}
