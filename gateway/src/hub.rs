//! Worker hubs: how a delivery reaches the sessions of one worker thread.
//!
//! ```text
//!  downstream consumer ──(one job per worker and record)──► LocalHub (a task on the worker)
//!                                                              │ local push + local wake
//!                                                              ▼
//!                                          Inbox of each target session (same thread)
//! ```
//!
//! The Session actors of a gateway live on its HTTP worker threads. The downstream consumer
//! runs on a thread of its own, so handing a record straight to 10,000 sessions meant 10,000
//! cross-thread queue writes and 10,000 cross-thread wake-ups (each a lock on the worker's run
//! queue and the cache lines of a queue the worker then reads back). Instead each worker has a
//! [`LocalHub`]: the consumer sends it one [`Job`] per record (a world-room message: one job per
//! worker, not per session), and the hub, a task on that worker, puts the delivery into the
//! [`Inbox`] of each target session and wakes it, all on the same thread.
//!
//! Order: the consumer sends jobs in record order, each hub runs its jobs in order, and a
//! session's inbox is first in, first out, so every delivery to a session (new messages, acks,
//! errors, presence) arrives in the order of the records, whatever its kind.
//!
//! Bounds: a session's inbox holds at most `outbound_queue` deliveries; one that is full closes
//! the session as too slow (1013), as before. A hub does not yield to the sessions after each
//! batch of jobs: tried (`tokio::task::yield_now`), a world-room message's median latency
//! doubled (docs/benchmarks.md, fourteenth session); tokio's cooperative budget bounds a hub's
//! turn. A hub's job queue is bounded too ([`JOBS`]): when a worker thread is so busy that it
//! fills, the consumer waits for room (the bus holds the rest), so a busy thread slows the
//! records down rather than dropping them or growing without bound.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Waker;

use tokio::sync::mpsc;

use crate::registry::{Registry, Signals};
use crate::session::Delivery;

/// Jobs a worker's hub queues before the consumer waits for it.
const JOBS: usize = 8_192;

/// Jobs a hub takes from its queue at once.
const JOBS_PER_PASS: usize = 64;

/// One delivery for some or all sessions of one worker.
#[derive(Debug)]
pub(crate) struct Job {
    pub delivery: Arc<Delivery>,
    pub targets: Targets,
}

/// A session of a hub: its slot and its id (the `Arc` its registry handle holds).
pub(crate) type Target = (u32, Arc<str>);

/// Which sessions of a worker a [`Job`] is for.
#[derive(Debug)]
pub(crate) enum Targets {
    /// Every session of the worker except the one with this id (compared by address: the
    /// `Arc` its handle holds).
    All { exclude: Option<Arc<str>> },
    /// These sessions, by hub slot and id (a slot freed and taken by a later session meanwhile
    /// does not get the earlier one's delivery).
    Sessions(Vec<Target>),
}

/// A session's deliveries, written by its worker's hub and read by the session's flusher, both
/// on the worker thread.
#[derive(Debug)]
pub(crate) struct Inbox {
    queue: RefCell<VecDeque<Arc<Delivery>>>,
    /// The session's waker while it waits for deliveries.
    waker: RefCell<Option<Waker>>,
    /// Set when the session closes: deliveries are not taken any more.
    closed: Cell<bool>,
    /// Set when a delivery found the inbox full: the session is to close as too slow.
    overflowed: Cell<bool>,
    /// At most this many deliveries wait.
    limit: usize,
    /// Where the queue's length is published for the registry's view of slow sessions.
    signals: Arc<Signals>,
}

/// What [`Inbox::offer`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Offer {
    /// Queued (and the session woken).
    Queued,
    /// Not queued: `limit` deliveries wait already. The inbox is marked overflowed and the
    /// session woken (it closes as too slow).
    Full,
    /// Not queued: the session is closing.
    Closed,
}

impl Inbox {
    pub fn new(limit: usize, signals: Arc<Signals>) -> Self {
        Self {
            queue: RefCell::new(VecDeque::new()),
            waker: RefCell::new(None),
            closed: Cell::new(false),
            overflowed: Cell::new(false),
            limit: limit.max(1),
            signals,
        }
    }

    /// Queues `delivery` and wakes the session, unless the inbox is full or closed.
    pub fn offer(&self, delivery: Arc<Delivery>) -> Offer {
        if self.closed.get() {
            return Offer::Closed;
        }
        let mut queue = self.queue.borrow_mut();
        let offer = if queue.len() >= self.limit {
            self.overflowed.set(true);
            Offer::Full
        } else {
            queue.push_back(delivery);
            self.signals.inbox.store(queue.len(), Ordering::Relaxed);
            Offer::Queued
        };
        drop(queue);
        if let Some(waker) = self.waker.borrow().as_ref() {
            waker.wake_by_ref();
        }
        offer
    }

    /// Whether a delivery was turned away because the inbox was full.
    pub fn overflowed(&self) -> bool {
        self.overflowed.get()
    }

    /// The oldest delivery waiting, if any.
    pub fn take(&self) -> Option<Arc<Delivery>> {
        let mut queue = self.queue.borrow_mut();
        let delivery = queue.pop_front();
        if delivery.is_some() {
            self.signals.inbox.store(queue.len(), Ordering::Relaxed);
        }
        delivery
    }

    /// Wakes `waker` at the next delivery (kept until replaced by one that wakes another task).
    pub fn wake_with(&self, waker: &Waker) {
        let mut slot = self.waker.borrow_mut();
        if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *slot = Some(waker.clone());
        }
    }

    /// Takes no more deliveries and lets go of those waiting and of the waker.
    pub fn close(&self) {
        self.closed.set(true);
        self.queue.borrow_mut().clear();
        self.signals.inbox.store(0, Ordering::Relaxed);
        self.waker.borrow_mut().take();
    }
}

/// A session as its hub knows it.
struct Entry {
    /// The session's id, the `Arc` its registry handle holds.
    id: Arc<str>,
    inbox: Rc<Inbox>,
}

/// The sessions of one worker thread of one gateway, and the task that queues deliveries for
/// them.
pub(crate) struct LocalHub {
    /// This hub's index in the registry's ports.
    port: u32,
    /// By slot; `None` for a free slot.
    entries: RefCell<Vec<Option<Entry>>>,
    free: RefCell<Vec<u32>>,
    /// Which gateway's (its registry's [`Registry::id`]).
    registry: u64,
    /// Its job queue, read by its task and by [`LocalHub::run_queued`].
    jobs: RefCell<mpsc::Receiver<Job>>,
}

impl std::fmt::Debug for LocalHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalHub")
            .field("port", &self.port)
            .field("slots", &self.entries.borrow().len())
            .finish_non_exhaustive()
    }
}

thread_local! {
    /// The hubs of this thread, one per gateway that has sessions on it.
    static HUBS: RefCell<Vec<Rc<LocalHub>>> = const { RefCell::new(Vec::new()) };
}

impl LocalHub {
    /// This thread's hub for the gateway of `registry`, made (with its task, on the current
    /// arbiter) on first use.
    pub fn current(registry: &Registry) -> Rc<Self> {
        let id = registry.id();
        if let Some(hub) = HUBS.with_borrow(|hubs| hubs.iter().find(|h| h.registry == id).cloned())
        {
            return hub;
        }
        let (tx, rx) = mpsc::channel(JOBS);
        let hub = Rc::new(Self {
            port: registry.add_port(tx),
            entries: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
            registry: id,
            jobs: RefCell::new(rx),
        });
        HUBS.with_borrow_mut(|hubs| hubs.push(Rc::clone(&hub)));
        actix_rt::spawn(run(Rc::clone(&hub)));
        hub
    }

    /// Its index in the registry's ports.
    pub fn port(&self) -> u32 {
        self.port
    }

    /// Adds the session `id` (the `Arc` its registry handle holds); returns its slot.
    pub fn insert(&self, id: Arc<str>, inbox: Rc<Inbox>) -> u32 {
        let mut entries = self.entries.borrow_mut();
        let entry = Some(Entry { id, inbox });
        if let Some(slot) = self.free.borrow_mut().pop() {
            entries[slot as usize] = entry;
            return slot;
        }
        entries.push(entry);
        u32::try_from(entries.len() - 1).expect("fewer than 2^32 sessions per worker")
    }

    /// Removes the session in `slot`.
    pub fn remove(&self, slot: u32) {
        let mut entries = self.entries.borrow_mut();
        if let Some(entry) = entries.get_mut(slot as usize)
            && entry.take().is_some()
        {
            self.free.borrow_mut().push(slot);
        }
    }

    /// Runs the jobs queued now, without waiting for the hub's task: a session that closes
    /// with its deliveries flushed first calls this, so every record dispatched before its
    /// close reaches it (the job may still wait here when the close request comes).
    pub fn run_queued(&self) {
        loop {
            let job = self.jobs.borrow_mut().try_recv();
            match job {
                Ok(job) => self.run(job),
                Err(_) => break,
            }
        }
    }

    /// Sessions on this hub.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.borrow().iter().flatten().count()
    }

    /// Queues the job's delivery for each of its targets on this worker.
    fn run(&self, job: Job) {
        let entries = self.entries.borrow();
        let Job { delivery, targets } = job;
        match targets {
            Targets::All { exclude } => {
                for entry in entries.iter().flatten() {
                    if !exclude
                        .as_ref()
                        .is_some_and(|ex| Arc::ptr_eq(ex, &entry.id))
                    {
                        entry.inbox.offer(Arc::clone(&delivery));
                    }
                }
            }
            Targets::Sessions(sessions) => {
                for (slot, id) in sessions {
                    if let Some(Some(entry)) = entries.get(slot as usize)
                        && Arc::ptr_eq(&entry.id, &id)
                    {
                        entry.inbox.offer(Arc::clone(&delivery));
                    }
                }
            }
        }
    }
}

/// A hub's task: runs its jobs until the gateway is gone (every sender dropped).
async fn run(hub: Rc<LocalHub>) {
    let mut batch = Vec::with_capacity(JOBS_PER_PASS);
    loop {
        // The queue is borrowed only while polled: `run_queued` may take jobs between polls.
        let taken = std::future::poll_fn(|cx| {
            hub.jobs
                .borrow_mut()
                .poll_recv_many(cx, &mut batch, JOBS_PER_PASS)
        })
        .await;
        if taken == 0 {
            break;
        }
        for job in batch.drain(..) {
            hub.run(job);
        }
    }
    HUBS.with_borrow_mut(|hubs| hubs.retain(|h| !Rc::ptr_eq(h, &hub)));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(text: &str) -> Arc<Delivery> {
        Arc::new(Delivery {
            kind: crate::frames::NEW_MESSAGE,
            text: text.to_owned().into(),
            seq: None,
        })
    }

    /// A job for every session of a hub but `exclude`.
    fn to_all(text: &str, exclude: Option<Arc<str>>) -> Job {
        Job {
            delivery: delivery(text),
            targets: Targets::All { exclude },
        }
    }

    fn texts(inbox: &Inbox) -> Vec<String> {
        std::iter::from_fn(|| inbox.take())
            .map(|d| d.text.to_string())
            .collect()
    }

    #[test]
    fn an_inbox_keeps_order_holds_at_most_its_limit_and_takes_nothing_once_closed() {
        let signals = Arc::new(Signals::new(0));
        let inbox = Inbox::new(2, Arc::clone(&signals));
        assert_eq!(inbox.offer(delivery("a")), Offer::Queued);
        assert_eq!(inbox.offer(delivery("b")), Offer::Queued);
        assert_eq!(signals.inbox.load(Ordering::Relaxed), 2);
        assert!(!inbox.overflowed());
        assert_eq!(inbox.offer(delivery("c")), Offer::Full);
        assert!(inbox.overflowed(), "the session is to close as too slow");
        assert_eq!(texts(&inbox), ["a", "b"]);
        assert_eq!(signals.inbox.load(Ordering::Relaxed), 0);
        assert_eq!(inbox.offer(delivery("d")), Offer::Queued);
        inbox.close();
        assert_eq!(signals.inbox.load(Ordering::Relaxed), 0);
        assert_eq!(inbox.offer(delivery("e")), Offer::Closed);
        assert!(inbox.take().is_none());
    }

    #[test]
    fn an_offer_wakes_the_waiting_session() {
        struct Count(std::sync::atomic::AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let count = Arc::new(Count(0.into()));
        let inbox = Inbox::new(8, Arc::new(Signals::new(0)));
        inbox.offer(delivery("before"));
        assert_eq!(count.0.load(Ordering::Relaxed), 0, "nobody waits yet");
        inbox.wake_with(&Waker::from(Arc::clone(&count)));
        inbox.offer(delivery("x"));
        inbox.offer(delivery("y"));
        assert_eq!(count.0.load(Ordering::Relaxed), 2);
        inbox.close();
        inbox.offer(delivery("z"));
        assert_eq!(
            count.0.load(Ordering::Relaxed),
            2,
            "a closed inbox wakes nobody"
        );
    }

    #[test]
    fn a_hub_delivers_to_all_but_the_excluded_and_skips_a_stale_slot() {
        let registry = Registry::default();
        let system = actix_rt::System::new();
        system.block_on(async {
            let hub = LocalHub::current(&registry);
            assert!(
                Rc::ptr_eq(&hub, &LocalHub::current(&registry)),
                "one per thread"
            );
            assert_eq!(registry.ports(), 1);
            let session = |id: &str| {
                let id: Arc<str> = id.into();
                let inbox = Rc::new(Inbox::new(8, Arc::new(Signals::new(0))));
                let slot = hub.insert(Arc::clone(&id), Rc::clone(&inbox));
                (id, inbox, slot)
            };
            let (a, a_in, a_slot) = session("a");
            let (b, b_in, _) = session("b");
            let (_, c_in, c_slot) = session("c");
            assert_eq!(hub.len(), 3);

            hub.run(to_all("1", Some(Arc::clone(&b))));
            // An id of the same text but another address is not the excluded session.
            hub.run(to_all("2", Some("a".into())));
            assert_eq!(texts(&a_in), ["1", "2"]);
            assert_eq!(texts(&b_in), ["2"]);
            assert_eq!(texts(&c_in), ["1", "2"]);

            // `a` leaves and `d` takes its slot: a job still naming `a` does not reach `d`.
            hub.remove(a_slot);
            let (d, d_in, d_slot) = session("d");
            assert_eq!(d_slot, a_slot, "a free slot is taken again");
            hub.run(Job {
                delivery: delivery("3"),
                targets: Targets::Sessions(vec![(a_slot, a), (c_slot, Arc::from("c"))]),
            });
            hub.run(Job {
                delivery: delivery("4"),
                targets: Targets::Sessions(vec![(d_slot, d), (99, Arc::from("nobody"))]),
            });
            assert_eq!(texts(&d_in), ["4"]);
            assert!(
                texts(&c_in).is_empty(),
                "another `c` than the one in the slot"
            );
            assert_eq!(hub.len(), 3);
        });
    }

    #[test]
    fn run_queued_delivers_what_the_hub_task_has_not_taken_yet() {
        let registry = Registry::default();
        let system = actix_rt::System::new();
        system.block_on(async {
            let hub = LocalHub::current(&registry);
            let inbox = Rc::new(Inbox::new(8, Arc::new(Signals::new(0))));
            hub.insert("s".into(), Rc::clone(&inbox));
            for text in ["1", "2"] {
                // Sent without yielding: the hub's task cannot have run them.
                registry.send(hub.port(), to_all(text, None)).await;
            }
            assert!(inbox.take().is_none());
            hub.run_queued();
            assert_eq!(texts(&inbox), ["1", "2"]);
            // Nothing is left for the task to deliver twice.
            tokio::task::yield_now().await;
            assert!(inbox.take().is_none());
        });
    }

    #[test]
    fn jobs_sent_through_the_registry_reach_the_hub_in_order() {
        let registry = Arc::new(Registry::default());
        let system = actix_rt::System::new();
        system.block_on(async {
            let hub = LocalHub::current(&registry);
            let inbox = Rc::new(Inbox::new(64, Arc::new(Signals::new(0))));
            hub.insert("s".into(), Rc::clone(&inbox));
            for i in 0..40 {
                registry
                    .send(hub.port(), to_all(&i.to_string(), None))
                    .await;
            }
            while inbox.queue.borrow().len() < 40 {
                tokio::task::yield_now().await;
            }
            let expected: Vec<String> = (0..40).map(|i| i.to_string()).collect();
            assert_eq!(texts(&inbox), expected);
        });
    }
}
