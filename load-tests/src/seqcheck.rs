//! The check of every received stream by seq. A recipient's view of one conversation starts
//! after `base` (the conversation's last seq before the run) and must contain every seq up to
//! the conversation's last stored one exactly once, in order: its own messages arrive as acks,
//! everyone else's as `new-message` frames.
//!
//! - a **duplicate** is a `new-message` whose seq this stream already has (or one from before
//!   the run);
//! - a **reordering** is a `new-message` whose seq is below one already delivered;
//! - a **gap** is a seq in `base+1..=last` this stream never got although a later one arrived
//!   as a `new-message` (a hole), counted after the run;
//! - the **tail** is what the stream never got above the highest `new-message` seq it got:
//!   nothing, once the run drained; after a run stopped by its time limit, the deliveries still
//!   on their way (which can lie below the recipient's own latest ack when the deliveries take
//!   the task service's path: groups above the fanout threshold and the world room).

use serde::{Deserialize, Serialize};

/// Tallies over many streams.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqTally {
    /// `new-message` frames checked.
    pub delivered: u64,
    /// Seqs never received although a later one was (holes).
    pub gaps: u64,
    /// Seqs never received above the highest one received (not delivered by the end).
    #[serde(default)]
    pub tail: u64,
    /// Seqs received more than once.
    pub duplicates: u64,
    /// Seqs received after a higher one.
    pub reordered: u64,
}

impl SeqTally {
    /// Field-wise sum.
    pub fn add(&mut self, o: &Self) {
        self.delivered += o.delivered;
        self.gaps += o.gaps;
        self.tail += o.tail;
        self.duplicates += o.duplicates;
        self.reordered += o.reordered;
    }

    /// Nothing missing (holes or tail), no duplicate, no reordering.
    pub fn clean(&self) -> bool {
        self.gaps == 0 && self.tail == 0 && self.duplicates == 0 && self.reordered == 0
    }
}

/// One recipient's view of one conversation.
#[derive(Debug, Clone)]
pub struct SeqStream {
    base: u64,
    /// Bit `s - base - 1` is set once seq `s` was seen.
    seen: Vec<u64>,
    /// Highest seq delivered as a `new-message`.
    max_delivered: u64,
    tally: SeqTally,
}

/// Streams longer than this (seqs past base) are not tracked bit by bit (16 MiB of bits).
const MAX_TRACKED: u64 = 128 * 1024 * 1024;

impl SeqStream {
    /// A stream of a conversation whose last seq before the run was `base`.
    pub fn new(base: u64) -> Self {
        Self {
            base,
            seen: Vec::new(),
            max_delivered: base,
            tally: SeqTally::default(),
        }
    }

    /// Marks `seq` seen; false when it already was (or is out of range).
    fn mark(&mut self, seq: u64) -> bool {
        if seq <= self.base || seq - self.base > MAX_TRACKED {
            return false;
        }
        let off = seq - self.base - 1;
        let (word, bit) = ((off / 64) as usize, off % 64);
        if self.seen.len() <= word {
            self.seen.resize(word + 1, 0);
        }
        let fresh = self.seen[word] & (1 << bit) == 0;
        self.seen[word] |= 1 << bit;
        fresh
    }

    /// A `new-message` with `seq` arrived.
    pub fn delivered(&mut self, seq: u64) {
        self.tally.delivered += 1;
        if !self.mark(seq) {
            self.tally.duplicates += 1;
            return;
        }
        if seq < self.max_delivered {
            self.tally.reordered += 1;
        }
        self.max_delivered = self.max_delivered.max(seq);
    }

    /// This recipient's own message was stored with `seq` (its ack).
    pub fn own(&mut self, seq: u64) {
        self.mark(seq);
    }

    /// The first `limit` holes: seqs after `base` and below the highest `new-message` seq
    /// that this stream never got (what [`SeqTally::gaps`] counts), for a report to name.
    pub fn holes(&self, limit: usize) -> Vec<u64> {
        (self.base + 1..self.max_delivered.min(self.base + MAX_TRACKED))
            .filter(|&s| !self.has(s))
            .take(limit)
            .collect()
    }

    /// The highest seq this stream got as a `new-message`.
    pub fn max_delivered(&self) -> u64 {
        self.max_delivered
    }

    fn has(&self, seq: u64) -> bool {
        let off = seq - self.base - 1;
        let (word, bit) = ((off / 64) as usize, off % 64);
        self.seen.get(word).is_some_and(|w| w & (1 << bit) != 0)
    }

    /// Seqs in `base+1..=upto` this stream has.
    fn count_upto(&self, upto: u64) -> u64 {
        let n = upto.saturating_sub(self.base).min(MAX_TRACKED);
        let full_words = (n / 64) as usize;
        let mut have: u64 = self
            .seen
            .iter()
            .take(full_words)
            .map(|w| u64::from(w.count_ones()))
            .sum();
        let rest = n % 64;
        if rest > 0
            && let Some(w) = self.seen.get(full_words)
        {
            have += u64::from((w & ((1u64 << rest) - 1)).count_ones());
        }
        have
    }

    /// The tally, with what is missing up to `last` (the conversation's last seq after the
    /// run): holes below the highest `new-message` seq received are gaps (deliveries arrive in
    /// seq order), the rest is the tail. The tail may hold seqs below this recipient's own
    /// highest ack: deliveries through the task service (big groups, the world room) can come
    /// after the ack of a later seq.
    pub fn finish(&self, last: u64) -> SeqTally {
        let mut t = self.tally;
        let expected = last.saturating_sub(self.base).min(MAX_TRACKED);
        let missing = expected - self.count_upto(last);
        let below = self.max_delivered.min(last);
        let holes = below.saturating_sub(self.base).min(MAX_TRACKED) - self.count_upto(below);
        t.gaps = holes;
        t.tail = missing - holes;
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_complete_stream_is_clean() {
        let mut s = SeqStream::new(10);
        s.own(11);
        s.delivered(12);
        s.own(13);
        s.delivered(14);
        let t = s.finish(14);
        assert!(t.clean(), "{t:?}");
        assert_eq!(t.delivered, 2);
    }

    #[test]
    fn gaps_duplicates_and_reordering_are_counted() {
        let mut s = SeqStream::new(0);
        s.delivered(1);
        s.delivered(3);
        s.delivered(2); // late
        s.delivered(3); // again
        s.delivered(70);
        let t = s.finish(72);
        assert_eq!(t.reordered, 1);
        assert_eq!(t.duplicates, 1);
        // Missing: 4..=69 (66 holes) and 71, 72 (the tail, above the highest received).
        assert_eq!((t.gaps, t.tail), (66, 2));
        assert_eq!(s.holes(3), vec![4, 5, 6]);
        assert_eq!(s.holes(100).len(), 66);
        assert!(!t.clean());
        // A seq from before the run is a duplicate.
        let mut old = SeqStream::new(5);
        old.delivered(5);
        assert_eq!(old.finish(5).duplicates, 1);
    }

    #[test]
    fn a_stream_cut_short_has_a_tail_not_gaps() {
        let mut s = SeqStream::new(0);
        s.delivered(1);
        s.own(2);
        s.delivered(3);
        let t = s.finish(6);
        assert_eq!((t.gaps, t.tail), (0, 3));
        // The own ack of 7 came before the new-messages 5 and 6 (the task path): still tail.
        s.own(7);
        let t = s.finish(7);
        assert_eq!((t.gaps, t.tail), (0, 3), "4, 5 and 6 are on their way");
        assert!(!t.clean(), "missing deliveries are never clean");
        let nothing = SeqStream::new(4).finish(6);
        assert_eq!((nothing.gaps, nothing.tail), (0, 2));
    }
}
