//! [`ArbiterPool`]: the threads the Fanout actors run on, one actix arbiter per core, picked
//! round-robin.
//!
//! Arbiters belong to an actix `System`. When the pool is started on a thread that runs one (the
//! `serve` binary's actix system, `#[actix_rt::test]`), its arbiters join that system; otherwise
//! (a plain tokio runtime) the pool starts a system of its own on a dedicated thread, so the task
//! service runs under either.

use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use actix_rt::{Arbiter, ArbiterHandle, System};

use crate::TaskError;

/// A fixed set of arbiters.
#[derive(Debug)]
pub struct ArbiterPool {
    /// Where actors are started.
    handles: Vec<ArbiterHandle>,
    /// Round-robin cursor.
    next: AtomicUsize,
    /// What [`stop`](Self::stop) has to stop and join (taken by the first call).
    owner: Mutex<Option<Owner>>,
}

#[derive(Debug)]
enum Owner {
    /// Arbiters inside the caller's system.
    Hosted(Vec<Arbiter>),
    /// A system of our own, on its thread (which stops and joins the arbiters on exit).
    Own {
        system: System,
        thread: JoinHandle<()>,
    },
}

impl ArbiterPool {
    /// Starts `n` (at least 1) arbiters.
    pub fn start(n: usize) -> Result<Self, TaskError> {
        let n = n.max(1);
        let (handles, owner) = if System::try_current().is_some() {
            let arbiters = spawn_arbiters(n).map_err(TaskError::Start)?;
            let handles = arbiters.iter().map(Arbiter::handle).collect();
            (handles, Owner::Hosted(arbiters))
        } else {
            let (tx, rx) = std::sync::mpsc::channel();
            let thread = std::thread::Builder::new()
                .name("gochat-task-actors".to_owned())
                .spawn(move || own_system(n, tx))
                .map_err(TaskError::Start)?;
            let (system, handles) = rx
                .recv()
                .map_err(|_| TaskError::Start(io::Error::other("the actor system thread died")))?
                .map_err(TaskError::Start)?;
            (handles, Owner::Own { system, thread })
        };
        tracing::debug!(arbiters = n, "fan-out arbiters started");
        Ok(Self {
            handles,
            next: AtomicUsize::new(0),
            owner: Mutex::new(Some(owner)),
        })
    }

    /// The next arbiter, round-robin.
    pub fn next(&self) -> &ArbiterHandle {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        &self.handles[i]
    }

    /// How many arbiters there are.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Always false: a pool has at least one arbiter.
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Stops the arbiters (actors still on them are dropped, their jobs answer
    /// [`TaskError::ActorGone`]) and waits for their threads. Later calls do nothing.
    pub async fn stop(&self) {
        let owner = self.owner.lock().unwrap_or_else(|e| e.into_inner()).take();
        let join = match owner {
            None => return,
            Some(Owner::Hosted(arbiters)) => {
                for a in &arbiters {
                    a.stop();
                }
                tokio::task::spawn_blocking(move || {
                    for a in arbiters {
                        let _ = a.join();
                    }
                })
            }
            Some(Owner::Own { system, thread }) => {
                system.stop();
                tokio::task::spawn_blocking(move || {
                    let _ = thread.join();
                })
            }
        };
        if join.await.is_err() {
            tracing::warn!("a fan-out arbiter thread panicked");
        }
    }
}

fn spawn_arbiters(n: usize) -> io::Result<Vec<Arbiter>> {
    (0..n).map(|_| Arbiter::try_new()).collect()
}

type Started = io::Result<(System, Vec<ArbiterHandle>)>;

/// The body of the pool's own system thread: start the system and `n` arbiters, report them,
/// run until the system is stopped, then stop and join the arbiters.
fn own_system(n: usize, report: std::sync::mpsc::Sender<Started>) {
    let runner = actix_rt::System::new();
    let arbiters = match spawn_arbiters(n) {
        Ok(a) => a,
        Err(err) => {
            let _ = report.send(Err(err));
            return;
        }
    };
    let handles = arbiters.iter().map(Arbiter::handle).collect();
    if report.send(Ok((System::current(), handles))).is_ok()
        && let Err(err) = runner.run()
    {
        tracing::warn!(cause = %err, "the fan-out actor system ended with an error");
    }
    for a in &arbiters {
        a.stop();
    }
    for a in arbiters {
        let _ = a.join();
    }
}
