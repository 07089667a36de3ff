//! The in-process backend: one moka cache whose entries each carry their own TTL, and presence
//! in a map of its own ([`PresenceMap`]).
//!
//! Keys are typed (an enum) rather than spec strings; each value remembers the TTL it was
//! written with and a [`moka::Expiry`] policy applies it on every insert or update, so one cache
//! holds every kind of entry with its own lifetime. The seq counter's read-modify-write runs
//! under moka's per-key lock (`and_compute_with`), so it is atomic per key.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use moka::Expiry;
use moka::future::Cache as Moka;
use moka::ops::compute::{CompResult, Op};

use super::{Cache, CacheResult};
use crate::model::{DedupEntry, Message, Presence, User};

/// How long a seq counter lives after it was last initialised or incremented.
const COUNTER_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// A cache key: the spec's key kinds, typed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    /// `user_info:{id}`.
    User(i64),
    /// `conv_seq:{conv}`.
    Seq(String),
    /// `group_members:{group}`.
    Members(i64),
    /// `msg_dedup:{sender}:{client_msg_id}`.
    Dedup(i64, String),
    /// `hot_messages:{conv}`.
    Hot(String),
    /// `unread:{user}:{conv}`.
    ReadPtr(i64, String),
}

/// A cached value; big ones behind `Arc` so clones out of moka stay cheap.
#[derive(Debug, Clone)]
enum Val {
    User(Arc<User>),
    Seq(i64),
    Members(Arc<HashSet<i64>>),
    Dedup(Arc<DedupEntry>),
    Hot(Arc<Vec<Message>>),
    ReadPtr(i64),
}

/// A value and the TTL it was written with.
#[derive(Debug, Clone)]
struct Stored {
    val: Val,
    ttl: Duration,
}

impl Stored {
    fn new(val: Val, ttl: Duration) -> Self {
        Self { val, ttl }
    }
}

/// Applies each entry's own TTL from the moment it is created or replaced; reads do not extend it.
struct PerEntryTtl;

impl Expiry<Key, Stored> for PerEntryTtl {
    fn expire_after_create(&self, _: &Key, value: &Stored, _: Instant) -> Option<Duration> {
        Some(value.ttl)
    }

    fn expire_after_update(
        &self,
        _: &Key,
        value: &Stored,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// The in-process cache (moka, plus a map of its own for presence). Cheap to clone: clones share
/// the same entries.
#[derive(Debug, Clone)]
pub struct MemoryCache {
    inner: Moka<Key, Stored>,
    presence: Arc<PresenceMap>,
}

/// `user_session:{user}` in process: user -> gateway -> expiry (Unix ms), outside moka.
///
/// Presence is read for every recipient of every message (a large group's fan-out reads 100,000
/// entries a second); a moka read also records the access for its eviction policy, about a
/// microsecond each, 10.7 % of the server in such a run (docs/benchmarks.md, sixteenth
/// session). Its entries need no eviction policy: there is one per user online, each read
/// keeps only gateways whose expiry is ahead, and a sweep at most once a minute (on a write)
/// drops users whose every gateway lapsed without going offline. A user's entry is updated
/// under its shard's lock, so set and remove are atomic per user.
#[derive(Debug, Default)]
struct PresenceMap {
    users: DashMap<i64, BTreeMap<String, i64>>,
    /// When the last sweep ran (Unix ms).
    swept_at: AtomicI64,
}

impl PresenceMap {
    /// Sweeps lapsed users once [`SWEEP_EVERY_MS`] has passed since the last sweep.
    fn maybe_sweep(&self, now: i64) {
        let last = self.swept_at.load(Ordering::Relaxed);
        if now.saturating_sub(last) < SWEEP_EVERY_MS
            || self
                .swept_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        self.users.retain(|_, gateways| {
            gateways.retain(|_, exp| *exp > now);
            !gateways.is_empty()
        });
    }
}

/// How often lapsed presence entries are swept.
const SWEEP_EVERY_MS: i64 = 60_000;

impl MemoryCache {
    /// A cache holding at most `max_entries` entries (least useful evicted first).
    pub fn new(max_entries: u64) -> Self {
        let inner = Moka::builder()
            .max_capacity(max_entries)
            .expire_after(PerEntryTtl)
            .build();
        Self {
            inner,
            presence: Arc::default(),
        }
    }

    async fn get(&self, key: &Key) -> Option<Val> {
        self.inner.get(key).await.map(|s| s.val)
    }

    async fn put(&self, key: Key, val: Val, ttl: Duration) {
        self.inner.insert(key, Stored::new(val, ttl)).await;
    }

    /// Drops `key`. An absent key (the usual case for the entries dropped on every save: a
    /// conversation's hot page, a sender's read pointer) is only looked up: an invalidation
    /// takes the map's write path even when there is nothing to remove. Linearized at the
    /// lookup, which is what an invalidation finding nothing amounts to.
    async fn del(&self, key: &Key) {
        if self.inner.contains_key(key) {
            self.inner.invalidate(key).await;
        }
    }

    fn live_presence(&self, user: i64, now: i64) -> Vec<Presence> {
        self.presence
            .users
            .get(&user)
            .map_or_else(Vec::new, |gateways| {
                gateways
                    .iter()
                    .filter(|(_, exp)| **exp > now)
                    .map(|(gateway, exp)| Presence {
                        gateway_id: gateway.clone(),
                        expires_at: *exp,
                    })
                    .collect()
            })
    }
}

/// Now as Unix milliseconds.
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// `ttl` in milliseconds, saturating.
fn ms(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)
}

impl Cache for MemoryCache {
    async fn get_user(&self, id: i64) -> CacheResult<Option<User>> {
        Ok(match self.get(&Key::User(id)).await {
            Some(Val::User(u)) => Some(User {
                password_hash: String::new(),
                ..(*u).clone()
            }),
            _ => None,
        })
    }

    async fn get_users(&self, ids: &[i64]) -> CacheResult<Vec<Option<User>>> {
        let mut out = Vec::with_capacity(ids.len());
        for &id in ids {
            out.push(self.get_user(id).await?);
        }
        Ok(out)
    }

    async fn set_user(&self, user: &User, ttl: Duration) -> CacheResult<()> {
        let user = User {
            password_hash: String::new(),
            ..user.clone()
        };
        self.put(Key::User(user.id), Val::User(Arc::new(user)), ttl)
            .await;
        Ok(())
    }

    async fn del_user(&self, id: i64) -> CacheResult<()> {
        self.del(&Key::User(id)).await;
        Ok(())
    }

    async fn seq_incr(&self, conv: &str, n: i64) -> CacheResult<Option<i64>> {
        let result = self
            .inner
            .entry(Key::Seq(conv.to_owned()))
            .and_compute_with(|entry| {
                let op = match entry.map(|e| e.into_value().val) {
                    Some(Val::Seq(v)) => {
                        Op::Put(Stored::new(Val::Seq(v.saturating_add(n)), COUNTER_TTL))
                    }
                    _ => Op::Nop,
                };
                std::future::ready(op)
            })
            .await;
        Ok(match result {
            CompResult::ReplacedWith(e) | CompResult::Inserted(e) => match e.into_value().val {
                Val::Seq(v) => Some(v),
                _ => None,
            },
            _ => None,
        })
    }

    async fn seq_init(&self, conv: &str, value: i64) -> CacheResult<()> {
        self.inner
            .entry(Key::Seq(conv.to_owned()))
            .and_compute_with(|entry| {
                let op = match entry {
                    Some(_) => Op::Nop,
                    None => Op::Put(Stored::new(Val::Seq(value), COUNTER_TTL)),
                };
                std::future::ready(op)
            })
            .await;
        Ok(())
    }

    async fn seq_del(&self, conv: &str) -> CacheResult<()> {
        self.del(&Key::Seq(conv.to_owned())).await;
        Ok(())
    }

    async fn dedup_get(&self, sender: i64, client_msg_id: &str) -> CacheResult<Option<DedupEntry>> {
        Ok(
            match self
                .get(&Key::Dedup(sender, client_msg_id.to_owned()))
                .await
            {
                Some(Val::Dedup(e)) => Some((*e).clone()),
                _ => None,
            },
        )
    }

    async fn dedup_set(
        &self,
        sender: i64,
        client_msg_id: &str,
        entry: &DedupEntry,
        ttl: Duration,
    ) -> CacheResult<()> {
        self.put(
            Key::Dedup(sender, client_msg_id.to_owned()),
            Val::Dedup(Arc::new(entry.clone())),
            ttl,
        )
        .await;
        Ok(())
    }

    async fn members_get(&self, group: i64) -> CacheResult<Option<Vec<i64>>> {
        Ok(match self.get(&Key::Members(group)).await {
            Some(Val::Members(set)) => Some(set.iter().copied().collect()),
            _ => None,
        })
    }

    async fn members_contains(&self, group: i64, user: i64) -> CacheResult<Option<bool>> {
        Ok(match self.get(&Key::Members(group)).await {
            Some(Val::Members(set)) => Some(set.contains(&user)),
            _ => None,
        })
    }

    async fn members_set(&self, group: i64, members: &[i64], ttl: Duration) -> CacheResult<()> {
        let set: HashSet<i64> = members.iter().copied().collect();
        self.put(Key::Members(group), Val::Members(Arc::new(set)), ttl)
            .await;
        Ok(())
    }

    async fn members_del(&self, group: i64) -> CacheResult<()> {
        self.del(&Key::Members(group)).await;
        Ok(())
    }

    async fn hot_get(&self, conv: &str) -> CacheResult<Option<Vec<Message>>> {
        Ok(match self.get(&Key::Hot(conv.to_owned())).await {
            Some(Val::Hot(page)) => Some((*page).clone()),
            _ => None,
        })
    }

    async fn hot_set(&self, conv: &str, messages: &[Message], ttl: Duration) -> CacheResult<()> {
        let mut page = messages.to_vec();
        page.sort_by_key(|m| m.seq_id);
        self.put(Key::Hot(conv.to_owned()), Val::Hot(Arc::new(page)), ttl)
            .await;
        Ok(())
    }

    async fn hot_del(&self, conv: &str) -> CacheResult<()> {
        self.del(&Key::Hot(conv.to_owned())).await;
        Ok(())
    }

    async fn read_ptr_get(&self, user: i64, conv: &str) -> CacheResult<Option<i64>> {
        Ok(match self.get(&Key::ReadPtr(user, conv.to_owned())).await {
            Some(Val::ReadPtr(v)) => Some(v),
            _ => None,
        })
    }

    async fn read_ptr_set(
        &self,
        user: i64,
        conv: &str,
        last_read_seq: i64,
        ttl: Duration,
    ) -> CacheResult<()> {
        self.put(
            Key::ReadPtr(user, conv.to_owned()),
            Val::ReadPtr(last_read_seq),
            ttl,
        )
        .await;
        Ok(())
    }

    async fn read_ptr_del(&self, user: i64, conv: &str) -> CacheResult<()> {
        self.del(&Key::ReadPtr(user, conv.to_owned())).await;
        Ok(())
    }

    async fn presence_set(&self, user: i64, gateway: &str, ttl: Duration) -> CacheResult<bool> {
        let now = now_ms();
        self.presence.maybe_sweep(now);
        let mut gateways = self.presence.users.entry(user).or_default();
        gateways.retain(|_, exp| *exp > now);
        let first_online = gateways.is_empty();
        gateways.insert(gateway.to_owned(), now.saturating_add(ms(ttl)));
        Ok(first_online)
    }

    async fn presence_remove(&self, user: i64, gateway: Option<&str>) -> CacheResult<bool> {
        let now = now_ms();
        self.presence.maybe_sweep(now);
        let Entry::Occupied(mut entry) = self.presence.users.entry(user) else {
            return Ok(true);
        };
        let gateways = entry.get_mut();
        gateways.retain(|_, exp| *exp > now);
        match gateway {
            Some(g) => {
                gateways.remove(g);
            }
            None => gateways.clear(),
        }
        let now_offline = gateways.is_empty();
        if now_offline {
            entry.remove();
        }
        Ok(now_offline)
    }

    async fn presence_get(&self, users: &[i64]) -> CacheResult<Vec<Vec<Presence>>> {
        let now = now_ms();
        Ok(users.iter().map(|&u| self.live_presence(u, now)).collect())
    }

    async fn flush(&self) -> CacheResult<()> {
        self.inner.invalidate_all();
        self.presence.users.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache at its capacity, filled with entries written faster than presence and never
    /// read, keeps the presence of users who came online meanwhile (presence is not subject to
    /// moka's eviction: one lost would make an online user look offline).
    #[tokio::test]
    async fn presence_survives_a_cache_full_of_other_entries() {
        let cache = MemoryCache::new(1000);
        let entry = DedupEntry {
            message_id: 1,
            seq_id: 1,
            conversation_id: "s_1_2".into(),
        };
        let ttl = Duration::from_secs(3600);
        for user in 1..=100 {
            cache
                .presence_set(user, "gw", Duration::from_secs(60))
                .await
                .expect("set");
            for i in 0..50 {
                let k = 100_000 + user * 100 + i;
                cache.dedup_set(k, "x", &entry, ttl).await.expect("dedup");
            }
        }
        cache.inner.run_pending_tasks().await;
        assert!(cache.inner.entry_count() <= 1000);
        let users: Vec<i64> = (1..=100).collect();
        let got = cache.presence_get(&users).await.expect("get");
        assert!(got.iter().all(|p| p.len() == 1), "presence entries lost");
    }

    /// Users whose every gateway lapsed (no SetUserOffline: a crashed gateway) read as offline
    /// at once and are dropped by the next sweep; live ones stay.
    #[tokio::test]
    async fn lapsed_presence_reads_offline_and_is_swept() {
        let cache = MemoryCache::new(1000);
        cache
            .presence_set(1, "gw-a", Duration::from_millis(1))
            .await
            .expect("set");
        cache
            .presence_set(2, "gw-a", Duration::from_secs(60))
            .await
            .expect("set");
        tokio::time::sleep(Duration::from_millis(20)).await;
        let got = cache.presence_get(&[1, 2]).await.expect("get");
        assert!(got[0].is_empty(), "lapsed reads offline");
        assert_eq!(got[1].len(), 1);
        assert_eq!(cache.presence.users.len(), 2, "not swept yet");
        cache.presence.swept_at.store(0, Ordering::Relaxed);
        cache.presence.maybe_sweep(now_ms());
        assert_eq!(cache.presence.users.len(), 1, "the lapsed user is swept");
        assert!(cache.presence.users.contains_key(&2));
        // A lapsed gateway does not count: coming back is a first connection.
        let first = cache
            .presence_set(1, "gw-b", Duration::from_secs(60))
            .await
            .expect("set");
        assert!(first);
        let again = cache
            .presence_set(1, "gw-c", Duration::from_secs(60))
            .await
            .expect("set");
        assert!(!again);
        let gone = cache
            .presence_remove(1, Some("gw-b"))
            .await
            .expect("remove");
        assert!(!gone, "still on gw-c");
        assert!(cache.presence_remove(1, None).await.expect("remove all"));
        assert!(!cache.presence.users.contains_key(&1));
    }
}
