//! [`RetryPolicy`]: the spec's retry configuration ("重试策略": 3 retries, 100 ms initial delay,
//! x2 per retry, at most 5 s) and [`retry`], which runs a fallible call under it.

use std::future::Future;
use std::time::Duration;

use crate::error::TaskError;

/// How a failed call is retried: after the first attempt fails with a retryable error, up to
/// `max_retries` more attempts, waiting `initial_delay` before the first retry and
/// `backoff_factor` times longer before each next one, never more than `max_delay`.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts after the first (spec `MaxRetries`: 3).
    pub max_retries: u32,
    /// Wait before the first retry (spec: 100 ms).
    pub initial_delay: Duration,
    /// Longest wait between two attempts (spec: 5 s).
    pub max_delay: Duration,
    /// Growth of the wait per retry (spec: 2.0).
    pub backoff_factor: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 3,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            backoff_factor: 2.0,
        }
    }
}

impl RetryPolicy {
    /// The wait before retry number `retry` (0-based).
    pub fn delay(&self, retry: u32) -> Duration {
        let factor = self
            .backoff_factor
            .max(1.0)
            .powi(i32::try_from(retry).unwrap_or(i32::MAX));
        let secs = self.initial_delay.as_secs_f64() * factor;
        if secs.is_finite() && secs < self.max_delay.as_secs_f64() {
            Duration::from_secs_f64(secs)
        } else {
            self.max_delay
        }
    }
}

/// Runs `call` until it succeeds, fails with an error that is not
/// [retryable](TaskError::is_retryable), or has failed `1 + policy.max_retries` times; each
/// attempt may take at most `timeout` (a timeout counts as a retryable failure of `what`).
/// `on_retry` sees each failure that is followed by another attempt.
pub async fn retry<T, F, Fut>(
    policy: &RetryPolicy,
    timeout: Duration,
    what: &'static str,
    mut call: F,
    mut on_retry: impl FnMut(&TaskError, Duration),
) -> Result<T, TaskError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, TaskError>>,
{
    let mut retries = 0;
    loop {
        let err = match tokio::time::timeout(timeout, call()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(err)) => err,
            Err(_) => TaskError::Timeout { what, timeout },
        };
        if !err.is_retryable() || retries >= policy.max_retries {
            return Err(err);
        }
        let wait = policy.delay(retries);
        on_retry(&err, wait);
        tokio::time::sleep(wait).await;
        retries += 1;
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use gochat_infra::{AppError, ErrorCode};

    use super::*;

    #[test]
    fn delays_follow_the_spec() {
        let p = RetryPolicy::default();
        let ms: Vec<u128> = (0..8).map(|i| p.delay(i).as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(p.delay(u32::MAX), Duration::from_secs(5));
    }

    fn unavailable() -> TaskError {
        TaskError::Repo {
            call: "GetGroupMembers",
            source: AppError::new(ErrorCode::Unavailable, "down"),
        }
    }

    fn quick() -> RetryPolicy {
        RetryPolicy {
            initial_delay: Duration::from_millis(1),
            ..RetryPolicy::default()
        }
    }

    #[tokio::test]
    async fn retries_a_retryable_error_then_gives_up() {
        let calls = Cell::new(0);
        let mut seen = 0;
        let r: Result<(), _> = retry(
            &quick(),
            Duration::from_secs(60),
            "x",
            || {
                calls.set(calls.get() + 1);
                async { Err(unavailable()) }
            },
            |_, _| seen += 1,
        )
        .await;
        assert!(r.is_err());
        assert_eq!(calls.get(), 4, "the first attempt and 3 retries");
        assert_eq!(seen, 3);
    }

    #[tokio::test]
    async fn a_permanent_error_is_not_retried() {
        let calls = Cell::new(0);
        let r: Result<(), _> = retry(
            &quick(),
            Duration::from_secs(60),
            "x",
            || {
                calls.set(calls.get() + 1);
                async {
                    Err(TaskError::Repo {
                        call: "GetGroupMembers",
                        source: AppError::new(ErrorCode::GroupNotFound, "gone"),
                    })
                }
            },
            |_, _| {},
        )
        .await;
        assert!(r.is_err());
        assert_eq!(calls.get(), 1);
    }

    #[tokio::test]
    async fn success_after_failures() {
        let calls = Cell::new(0);
        let r = retry(
            &quick(),
            Duration::from_secs(60),
            "x",
            || {
                calls.set(calls.get() + 1);
                let n = calls.get();
                async move { if n < 3 { Err(unavailable()) } else { Ok(n) } }
            },
            |_, _| {},
        )
        .await;
        assert_eq!(r.expect("third attempt succeeds"), 3);
    }
}
