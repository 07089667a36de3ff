//! [`TaskError`]: everything that can go wrong in the task service, and the one place that
//! decides whether a failure is worth another try.

use std::time::Duration;

use gochat_infra::mq::MqError;
use gochat_infra::{AppError, ErrorCode};

use crate::TaskType;

/// A task service failure.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// The settings are out of range.
    #[error("invalid task settings: {0}")]
    Config(String),
    /// The actor arbiters could not be started.
    #[error("cannot start the fan-out arbiters: {0}")]
    Start(#[source] std::io::Error),
    /// A task's payload is not what its type requires (never retried).
    #[error("invalid {task_type:?} task: {reason}")]
    InvalidTask {
        /// The task's type.
        task_type: TaskType,
        /// What is wrong with it.
        reason: String,
    },
    /// No processor is registered for the task's type (never retried).
    #[error("no processor for task type {0:?}")]
    NoProcessor(TaskType),
    /// A repo call failed (after its retries, when the error was retryable).
    #[error("repo {call} failed: {source}")]
    Repo {
        /// The RPC.
        call: &'static str,
        /// The error, with the spec's code.
        #[source]
        source: AppError,
    },
    /// The bus failed.
    #[error("bus: {0}")]
    Bus(#[from] MqError),
    /// A call took longer than `call_timeout`.
    #[error("{what} took longer than {timeout:?}")]
    Timeout {
        /// The call.
        what: &'static str,
        /// The limit.
        timeout: Duration,
    },
    /// A Fanout actor stopped without answering (its arbiter was stopped).
    #[error("the fan-out actor stopped before finishing its job")]
    ActorGone,
    /// The service is shutting down.
    #[error("the task service is shutting down")]
    ShuttingDown,
}

impl TaskError {
    /// Whether trying again later may succeed: dependencies that are down or slow, yes; a task
    /// that is wrong in itself (bad payload, unknown group, no processor), no. A retryable
    /// failure leaves the task record uncommitted and is tried again; any other is logged and
    /// the record committed, so one bad task never blocks its partition.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Repo { source, .. } => matches!(
                source.code,
                ErrorCode::Unavailable | ErrorCode::Internal | ErrorCode::RateLimited
            ),
            Self::Bus(err) => !matches!(err, MqError::Closed | MqError::Encoding(_)),
            Self::Timeout { .. } | Self::ActorGone => true,
            Self::Config(_)
            | Self::Start(_)
            | Self::InvalidTask { .. }
            | Self::NoProcessor(_)
            | Self::ShuttingDown => false,
        }
    }

    /// A repo error from a tonic status.
    pub fn repo(call: &'static str, status: &tonic::Status) -> Self {
        Self::Repo {
            call,
            source: AppError::from_status(status),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let down = TaskError::repo("GetUsersOnlineStatus", &tonic::Status::unavailable("down"));
        assert!(down.is_retryable());
        let gone: tonic::Status = AppError::new(ErrorCode::GroupNotFound, "no such group").into();
        assert!(!TaskError::repo("GetGroupMembers", &gone).is_retryable());
        assert!(!TaskError::NoProcessor(TaskType::Push).is_retryable());
        assert!(!TaskError::Bus(MqError::Closed).is_retryable());
        assert!(!TaskError::Bus(MqError::Encoding("x".into())).is_retryable());
        assert!(TaskError::Bus(MqError::Broker("x".into())).is_retryable());
    }
}
