//! Ids.
//!
//! Users, groups and messages get snowflake ids ([`Snowflake`]): 41 bits of milliseconds since
//! 2024-01-01, 10 bits of node id, 12 bits of sequence. They are positive `i64`s (stored as
//! `BIGINT`, sent as decimal strings in JSON and protobuf) and sort by creation time.
//!
//! Conversation ids are strings derived from what they are ([`ConversationKind`]):
//! `s_<lo>_<hi>` for the single chat of users lo < hi (the same id whichever side asks),
//! `g_<group_id>` for a group, and `world` for the world room.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::time::now_ms;

/// 2024-01-01T00:00:00Z in Unix milliseconds.
const EPOCH_MS: i64 = 1_704_067_200_000;
const NODE_BITS: u32 = 10;
const SEQ_BITS: u32 = 12;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;

/// The largest node id a [`Snowflake`] generator accepts.
pub const MAX_NODE_ID: u16 = (1 << NODE_BITS) - 1;

/// A lock-free snowflake id generator. One per process, with a node id unique among the
/// processes that write to the same database.
#[derive(Debug)]
pub struct Snowflake {
    /// The node id, already shifted into place.
    node: u64,
    /// `(ms since EPOCH) << SEQ_BITS | seq` of the last id handed out.
    state: AtomicU64,
}

impl Snowflake {
    /// A generator for `node` (masked to 10 bits).
    pub fn new(node: u16) -> Self {
        Self {
            node: u64::from(node & MAX_NODE_ID) << SEQ_BITS,
            state: AtomicU64::new(0),
        }
    }

    /// The next id: strictly greater than every id this generator handed out before, even if
    /// the wall clock steps back (it then borrows from the future until the clock catches up).
    pub fn next_id(&self) -> i64 {
        let now = u64::try_from(now_ms() - EPOCH_MS).unwrap_or(0);
        let mut prev = self.state.load(Ordering::Relaxed);
        loop {
            let prev_ms = prev >> SEQ_BITS;
            let next = if now > prev_ms {
                now << SEQ_BITS
            } else {
                // Same millisecond (or clock behind): bump the sequence; overflowing it moves
                // into the next millisecond.
                prev + 1
            };
            match self
                .state
                .compare_exchange_weak(prev, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => {
                    let ms = next >> SEQ_BITS;
                    let seq = next & SEQ_MASK;
                    let id = (ms << (NODE_BITS + SEQ_BITS)) | self.node | seq;
                    return i64::try_from(id & (i64::MAX as u64)).unwrap_or(i64::MAX);
                }
                Err(actual) => prev = actual,
            }
        }
    }
}

impl Default for Snowflake {
    fn default() -> Self {
        Self::new(0)
    }
}

/// The id of the world room's conversation.
pub const WORLD_CONVERSATION_ID: &str = "world";

/// What a conversation id names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConversationKind {
    /// The single chat of two users (lo < hi).
    Single(i64, i64),
    /// A group's conversation.
    Group(i64),
    /// The world room.
    World,
}

impl ConversationKind {
    /// Parses a conversation id; `None` when it is not one of gochat's.
    pub fn parse(id: &str) -> Option<Self> {
        if id == WORLD_CONVERSATION_ID {
            return Some(Self::World);
        }
        if let Some(rest) = id.strip_prefix("g_") {
            return parse_id(rest).map(Self::Group);
        }
        if let Some(rest) = id.strip_prefix("s_") {
            let (a, b) = rest.split_once('_')?;
            let (a, b) = (parse_id(a)?, parse_id(b)?);
            if a < b {
                return Some(Self::Single(a, b));
            }
        }
        None
    }

    /// The conversation id for this kind.
    pub fn id(self) -> String {
        match self {
            Self::Single(a, b) => format!("s_{a}_{b}"),
            Self::Group(g) => format!("g_{g}"),
            Self::World => WORLD_CONVERSATION_ID.to_owned(),
        }
    }

    /// The spec's conversation type number (1 single, 2 group, 3 world).
    pub fn type_number(self) -> i32 {
        match self {
            Self::Single(..) => 1,
            Self::Group(_) => 2,
            Self::World => 3,
        }
    }
}

/// The single chat of two distinct users; `None` for a user with themselves.
pub fn single_conversation_id(a: i64, b: i64) -> Option<String> {
    match a.cmp(&b) {
        std::cmp::Ordering::Less => Some(ConversationKind::Single(a, b).id()),
        std::cmp::Ordering::Greater => Some(ConversationKind::Single(b, a).id()),
        std::cmp::Ordering::Equal => None,
    }
}

/// A group's conversation id.
pub fn group_conversation_id(group_id: i64) -> String {
    ConversationKind::Group(group_id).id()
}

/// Parses a positive decimal id ("123"); `None` for anything else.
pub fn parse_id(s: &str) -> Option<i64> {
    if s.is_empty() || s.len() > 19 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<i64>().ok().filter(|n| *n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn snowflakes_are_unique_and_increasing_across_threads() {
        let ids_gen = std::sync::Arc::new(Snowflake::new(3));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let ids_gen = ids_gen.clone();
                std::thread::spawn(move || {
                    let ids: Vec<i64> = (0..20_000).map(|_| ids_gen.next_id()).collect();
                    assert!(ids.windows(2).all(|w| w[0] < w[1]));
                    ids
                })
            })
            .collect();
        let mut all = HashSet::new();
        for h in handles {
            for id in h.join().expect("thread") {
                assert!(id > 0);
                assert!(all.insert(id), "duplicate id {id}");
            }
        }
        assert_eq!(all.len(), 80_000);
    }

    #[test]
    fn conversation_ids_round_trip() {
        assert_eq!(single_conversation_id(9, 4).as_deref(), Some("s_4_9"));
        assert_eq!(single_conversation_id(4, 9), single_conversation_id(9, 4));
        assert_eq!(single_conversation_id(4, 4), None);
        assert_eq!(
            ConversationKind::parse("s_4_9"),
            Some(ConversationKind::Single(4, 9))
        );
        assert_eq!(ConversationKind::parse("s_9_4"), None);
        assert_eq!(
            ConversationKind::parse("g_12"),
            Some(ConversationKind::Group(12))
        );
        assert_eq!(
            ConversationKind::parse("world"),
            Some(ConversationKind::World)
        );
        for bad in [
            "",
            "g_",
            "g_-1",
            "g_0",
            "s_1",
            "s_1_x",
            "x_1",
            "g_1 ",
            "g_99999999999999999999",
        ] {
            assert_eq!(ConversationKind::parse(bad), None, "{bad}");
        }
        assert_eq!(group_conversation_id(7), "g_7");
    }
}
