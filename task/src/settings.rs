//! [`TaskSettings`]: the task service's tunables, with the spec's values as defaults.

use std::time::Duration;

use crate::error::TaskError;
use crate::retry::RetryPolicy;

/// Tunables of the task service (what a future `[task]` config section maps to).
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSettings {
    /// Partitions `im-task-topic` gets when this service is the first to create it (an existing
    /// topic keeps its own count).
    pub task_partitions: u32,
    /// Members per page of a group fan-out, and so at most this many targets per downstream
    /// record (spec: 200; repo accepts 1..=1000).
    pub batch_size: u32,
    /// Fan-out jobs running at once, over all partitions (default 64).
    pub max_in_flight: usize,
    /// Arbiters (threads) the Fanout actors run on; 0 means one per core.
    pub arbiters: usize,
    /// Retries of one failed repo call or downstream send inside a job (spec: 3 retries,
    /// 100 ms, x2, at most 5 s).
    pub retry: RetryPolicy,
    /// How long one repo call or one downstream send may take before it counts as failed (and is
    /// retried). Keeps a stuck dependency from holding a partition forever.
    pub call_timeout: Duration,
    /// Wait before a failed task is tried again (the record stays uncommitted meanwhile and its
    /// partition waits behind it, keeping order); doubles per failure up to
    /// [`redelivery_max_delay`](Self::redelivery_max_delay).
    pub redelivery_delay: Duration,
    /// Longest wait between two tries of one failed task.
    pub redelivery_max_delay: Duration,
    /// Records read ahead per partition while its lane is busy. When a lane is full, reading
    /// waits (backpressure for every partition of this member).
    pub lane_capacity: usize,
}

impl Default for TaskSettings {
    fn default() -> Self {
        Self {
            task_partitions: 8,
            batch_size: 200,
            max_in_flight: 64,
            arbiters: 0,
            retry: RetryPolicy::default(),
            call_timeout: Duration::from_secs(10),
            redelivery_delay: Duration::from_secs(1),
            redelivery_max_delay: Duration::from_secs(30),
            lane_capacity: 64,
        }
    }
}

/// Largest member page repo serves.
const MAX_BATCH: u32 = 1000;

impl TaskSettings {
    /// These settings, or an error naming the first value out of range.
    pub fn validated(self) -> Result<Self, TaskError> {
        let bad = |what: &str| Err(TaskError::Config(what.to_owned()));
        if self.task_partitions == 0 {
            return bad("task_partitions must be at least 1");
        }
        if !(1..=MAX_BATCH).contains(&self.batch_size) {
            return bad("batch_size must be 1..=1000");
        }
        if self.max_in_flight == 0 {
            return bad("max_in_flight must be at least 1");
        }
        if self.lane_capacity == 0 {
            return bad("lane_capacity must be at least 1");
        }
        if self.call_timeout.is_zero() {
            return bad("call_timeout must be positive");
        }
        if self.retry.backoff_factor < 1.0 || !self.retry.backoff_factor.is_finite() {
            return bad("retry.backoff_factor must be a finite number >= 1");
        }
        Ok(self)
    }

    /// The number of arbiters to start: [`arbiters`](Self::arbiters), or the core count.
    pub fn arbiter_count(&self) -> usize {
        if self.arbiters > 0 {
            self.arbiters
        } else {
            std::thread::available_parallelism().map_or(2, usize::from)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_spec_values_and_valid() {
        let s = TaskSettings::default();
        assert_eq!(s.batch_size, 200);
        assert_eq!(s.max_in_flight, 64);
        assert!(s.arbiter_count() >= 1);
        assert!(TaskSettings::default().validated().is_ok());
    }

    #[test]
    fn out_of_range_values_are_refused() {
        let s = TaskSettings {
            batch_size: 1001,
            ..TaskSettings::default()
        };
        assert!(matches!(s.validated(), Err(TaskError::Config(_))));
        let s = TaskSettings {
            max_in_flight: 0,
            ..TaskSettings::default()
        };
        assert!(matches!(s.validated(), Err(TaskError::Config(_))));
    }
}
