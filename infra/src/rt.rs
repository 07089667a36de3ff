//! Running a long-lived future on a thread of its own.
//!
//! An actix `System` runs everything spawned with `actix_rt::spawn` on its one thread. The bus
//! consumers of a process (logic's upstream consumer, the gateway's downstream consumer) are
//! each a serial stage every message passes through; on the `System` thread together they
//! share one core however many the machine has. [`OwnThread`] gives such a stage an
//! [`Arbiter`] (an actix thread with its own event loop) of its own.

use std::future::Future;

use actix_rt::Arbiter;
use tokio::sync::oneshot;

/// A future running on an [`Arbiter`] of its own. [`OwnThread::join`] waits for its output;
/// dropping the handle (joined or not, for instance when a join times out) stops the arbiter,
/// which drops the future if it is still running.
#[derive(Debug)]
pub struct OwnThread<T> {
    arbiter: Arbiter,
    done: oneshot::Receiver<T>,
}

impl<T: Send + 'static> OwnThread<T> {
    /// Starts a new arbiter and runs `future` on it.
    pub fn spawn<F>(future: F) -> Self
    where
        F: Future<Output = T> + Send + 'static,
    {
        let arbiter = Arbiter::new();
        let (tx, done) = oneshot::channel();
        arbiter.spawn(async move {
            let _ = tx.send(future.await);
        });
        Self { arbiter, done }
    }

    /// The future's output, once it finished; `None` if it can no longer finish (its arbiter
    /// stopped, or the future panicked).
    pub async fn join(mut self) -> Option<T> {
        (&mut self.done).await.ok()
    }
}

impl<T> Drop for OwnThread<T> {
    fn drop(&mut self) {
        self.arbiter.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[actix_rt::test]
    async fn runs_on_another_thread_and_joins() {
        let here = std::thread::current().id();
        let task = OwnThread::spawn(async move { std::thread::current().id() });
        let there = task.join().await.expect("the future finished");
        assert_ne!(there, here);
    }

    #[actix_rt::test]
    async fn a_panicking_future_joins_as_none() {
        let task = OwnThread::spawn(async {
            panic!("on purpose");
        });
        assert_eq!(task.join().await, None::<()>);
    }

    #[actix_rt::test]
    async fn dropping_the_handle_stops_a_future_that_never_ends() {
        let (alive, gone) = oneshot::channel::<()>();
        let task = OwnThread::spawn(async move {
            let _alive = alive;
            std::future::pending::<()>().await;
        });
        drop(task);
        // `gone` resolves (closed) only once the future, holding `alive`, was dropped; the
        // timeout keeps a regression from hanging the suite.
        let dropped = tokio::time::timeout(std::time::Duration::from_secs(30), gone).await;
        assert!(matches!(dropped, Ok(Err(_))), "{dropped:?}");
    }
}
