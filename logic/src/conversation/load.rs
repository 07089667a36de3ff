//! [`ActorLoad`]: what one Conversation actor is doing, readable from outside the actor (for
//! `/admin/actors`): the messages it holds and its recent rate.
//!
//! The actor updates it once per message it accepts and once per batch it finishes; a reader
//! (the admin endpoint, about once a second) takes the rate. The rate is kept in ten one-second
//! buckets, so it is the average over the last ten seconds and decays to 0 once the
//! conversation goes quiet, without the actor having to do anything.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

/// Seconds the rate is averaged over.
const WINDOW: usize = 10;

/// The load of one Conversation actor.
#[derive(Debug, Default)]
pub(crate) struct ActorLoad {
    /// Messages accepted and not yet finished (waiting, or in the batch in flight).
    queued: AtomicU64,
    /// Messages finished per second.
    meter: Mutex<Meter>,
}

impl ActorLoad {
    /// One message was accepted.
    pub fn accepted(&self) {
        self.queued.fetch_add(1, Ordering::Relaxed);
    }

    /// A batch of `n` messages was finished.
    pub fn finished(&self, n: usize) {
        let n = n as u64;
        // Never below zero, whatever the order of updates.
        let _ = self
            .queued
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |q| {
                Some(q.saturating_sub(n))
            });
        self.meter().record(now_secs(), n);
    }

    /// Messages accepted and not yet finished.
    pub fn queued(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }

    /// Messages finished per second over the last ten seconds.
    pub fn per_sec(&self) -> f64 {
        self.meter().rate(now_secs())
    }

    fn meter(&self) -> std::sync::MutexGuard<'_, Meter> {
        self.meter.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Seconds since the first call in this process.
fn now_secs() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_secs()
}

/// Counts per second over a sliding window of [`WINDOW`] seconds.
#[derive(Debug, Default)]
struct Meter {
    /// `counts[s % WINDOW]` holds second `s`, for the seconds in `(head - WINDOW, head]`.
    counts: [u64; WINDOW],
    /// The latest second recorded or read.
    head: u64,
}

impl Meter {
    /// Moves the window to end at `now`, clearing the seconds it passes.
    fn advance(&mut self, now: u64) {
        if now <= self.head {
            return;
        }
        if now - self.head >= WINDOW as u64 {
            self.counts = [0; WINDOW];
        } else {
            for s in self.head + 1..=now {
                self.counts[(s % WINDOW as u64) as usize] = 0;
            }
        }
        self.head = now;
    }

    fn record(&mut self, now: u64, n: u64) {
        self.advance(now);
        // A second already behind the window (a late writer) counts in the newest one.
        self.counts[(self.head % WINDOW as u64) as usize] += n;
    }

    fn rate(&mut self, now: u64) -> f64 {
        self.advance(now);
        self.counts.iter().sum::<u64>() as f64 / WINDOW as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_is_a_ten_second_average_that_decays() {
        let mut m = Meter::default();
        m.record(100, 30);
        m.record(101, 20);
        assert_eq!(m.rate(101), 5.0);
        assert_eq!(m.rate(109), 5.0);
        assert_eq!(m.rate(110), 2.0, "second 100 left the window");
        assert_eq!(m.rate(111), 0.0);
        m.record(200, 10);
        assert_eq!(m.rate(200), 1.0, "a long gap clears everything");
    }

    #[test]
    fn queued_counts_accepted_until_finished() {
        let load = ActorLoad::default();
        load.accepted();
        load.accepted();
        load.accepted();
        assert_eq!(load.queued(), 3);
        load.finished(2);
        assert_eq!(load.queued(), 1);
        load.finished(5);
        assert_eq!(load.queued(), 0);
        assert!(load.per_sec() > 0.0);
    }
}
