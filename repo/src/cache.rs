//! The cache behind repo: an in-process backend ([`memory::MemoryCache`], moka) for `serve` and a
//! Redis backend ([`redis::RedisCache`], deadpool-redis) for the distributed mode, both under the
//! spec's keys (design.md section 3.4), each prefixed by a configurable namespace:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `user_info:{user}` | HASH | a user's public fields (never the password hash) |
//! | `user_session:{user}` | HASH | gateway id -> expiry (Unix ms): where the user is online |
//! | `conv_seq:{conv}` | STRING | the last seq handed out by `GenerateSeqID` |
//! | `group_members:{group}` | SET | a group's member ids |
//! | `msg_dedup:{sender}:{client_msg_id}` | STRING + TTL | the original message of an idempotency key |
//! | `hot_messages:{conv}` | ZSET | the latest page of a conversation, scored by seq |
//! | `unread:{user}:{conv}` | STRING | the user's read pointer (the unread count is derived from it) |
//!
//! Every method may fail with [`CacheError`]; the services treat a failure as a miss (reads) or
//! ignore it after logging (writes and deletes), so a cache outage degrades to the database and
//! never fails a call. The one exception is the seq counter, whose fallback is described in
//! `service::message`.

pub mod memory;
pub mod redis;

use std::future::Future;
use std::time::Duration;

use gochat_infra::telemetry;

use crate::model::{DedupEntry, Message, Presence, User};

/// A cache operation that did not reach the cache.
#[derive(Debug, thiserror::Error)]
#[error("cache unavailable: {0}")]
pub struct CacheError(pub String);

/// Cache results.
pub type CacheResult<T> = Result<T, CacheError>;

/// The operations repo needs from a cache. Implemented by the memory and Redis backends; tests
/// are written once against this trait.
pub trait Cache: Send + Sync + 'static {
    /// `user_info:{id}`; `None` on a miss.
    fn get_user(&self, id: i64) -> impl Future<Output = CacheResult<Option<User>>> + Send;
    /// Several `user_info` entries in one round trip, in the order of `ids`.
    fn get_users(&self, ids: &[i64])
    -> impl Future<Output = CacheResult<Vec<Option<User>>>> + Send;
    /// Stores `user_info:{user.id}` for `ttl`.
    fn set_user(&self, user: &User, ttl: Duration) -> impl Future<Output = CacheResult<()>> + Send;
    /// Deletes `user_info:{id}`.
    fn del_user(&self, id: i64) -> impl Future<Output = CacheResult<()>> + Send;

    /// Adds `n` to `conv_seq:{conv}` atomically and returns the new value, or `None` (changing
    /// nothing) when the counter is not in the cache.
    fn seq_incr(&self, conv: &str, n: i64)
    -> impl Future<Output = CacheResult<Option<i64>>> + Send;
    /// Sets `conv_seq:{conv}` to `value` unless it exists (SET NX).
    fn seq_init(&self, conv: &str, value: i64) -> impl Future<Output = CacheResult<()>> + Send;
    /// Deletes `conv_seq:{conv}` (after a seq conflict, so the next reservation re-reads storage).
    fn seq_del(&self, conv: &str) -> impl Future<Output = CacheResult<()>> + Send;

    /// `msg_dedup:{sender}:{client_msg_id}`.
    fn dedup_get(
        &self,
        sender: i64,
        client_msg_id: &str,
    ) -> impl Future<Output = CacheResult<Option<DedupEntry>>> + Send;
    /// Stores `msg_dedup:{sender}:{client_msg_id}` for `ttl`.
    fn dedup_set(
        &self,
        sender: i64,
        client_msg_id: &str,
        entry: &DedupEntry,
        ttl: Duration,
    ) -> impl Future<Output = CacheResult<()>> + Send;

    /// Every member in `group_members:{group}`, in no set order; `None` when it is not cached.
    fn members_get(&self, group: i64)
    -> impl Future<Output = CacheResult<Option<Vec<i64>>>> + Send;
    /// Whether `user` is in `group_members:{group}`; `None` when the set is not cached.
    fn members_contains(
        &self,
        group: i64,
        user: i64,
    ) -> impl Future<Output = CacheResult<Option<bool>>> + Send;
    /// Replaces `group_members:{group}` with `members` for `ttl`.
    fn members_set(
        &self,
        group: i64,
        members: &[i64],
        ttl: Duration,
    ) -> impl Future<Output = CacheResult<()>> + Send;
    /// Deletes `group_members:{group}`.
    fn members_del(&self, group: i64) -> impl Future<Output = CacheResult<()>> + Send;

    /// `hot_messages:{conv}`: the cached latest page, ascending by seq; `None` on a miss.
    fn hot_get(&self, conv: &str)
    -> impl Future<Output = CacheResult<Option<Vec<Message>>>> + Send;
    /// Replaces `hot_messages:{conv}` with `messages` for `ttl`.
    fn hot_set(
        &self,
        conv: &str,
        messages: &[Message],
        ttl: Duration,
    ) -> impl Future<Output = CacheResult<()>> + Send;
    /// Deletes `hot_messages:{conv}`.
    fn hot_del(&self, conv: &str) -> impl Future<Output = CacheResult<()>> + Send;

    /// `unread:{user}:{conv}`: the cached read pointer.
    fn read_ptr_get(
        &self,
        user: i64,
        conv: &str,
    ) -> impl Future<Output = CacheResult<Option<i64>>> + Send;
    /// Stores `unread:{user}:{conv}` for `ttl`.
    fn read_ptr_set(
        &self,
        user: i64,
        conv: &str,
        last_read_seq: i64,
        ttl: Duration,
    ) -> impl Future<Output = CacheResult<()>> + Send;
    /// Deletes `unread:{user}:{conv}`.
    fn read_ptr_del(&self, user: i64, conv: &str) -> impl Future<Output = CacheResult<()>> + Send;

    /// Marks `user` online on `gateway` until now + `ttl` in `user_session:{user}`, dropping
    /// lapsed gateways. Returns whether the user had no live gateway before.
    fn presence_set(
        &self,
        user: i64,
        gateway: &str,
        ttl: Duration,
    ) -> impl Future<Output = CacheResult<bool>> + Send;
    /// Removes `gateway` (every gateway when `None`) from `user_session:{user}`. Returns whether
    /// the user has no live gateway left.
    fn presence_remove(
        &self,
        user: i64,
        gateway: Option<&str>,
    ) -> impl Future<Output = CacheResult<bool>> + Send;
    /// The live gateways of each user, in the order of `users`, in one round trip.
    fn presence_get(
        &self,
        users: &[i64],
    ) -> impl Future<Output = CacheResult<Vec<Vec<Presence>>>> + Send;

    /// Drops every entry of this cache's namespace (tests and operators).
    fn flush(&self) -> impl Future<Output = CacheResult<()>> + Send;
}

/// Either backend, chosen by configuration at run time.
#[derive(Debug, Clone)]
pub enum AnyCache {
    /// In-process (moka).
    Memory(memory::MemoryCache),
    /// Redis (deadpool-redis).
    Redis(redis::RedisCache),
}

/// Calls the backend's method and records its duration (`gochat_cache_duration_seconds`) and
/// failure (`gochat_cache_errors_total`) under `op` = the method's name.
macro_rules! delegate {
    ($self:ident, $c:ident => $_recv:ident . $method:ident($($arg:expr),*)) => {{
        let started = std::time::Instant::now();
        let result = match $self {
            AnyCache::Memory($c) => $c.$method($($arg),*).await,
            AnyCache::Redis($c) => $c.$method($($arg),*).await,
        };
        let op: &'static str = stringify!($method);
        metrics::histogram!(telemetry::CACHE_SECONDS, "op" => op)
            .record(started.elapsed().as_secs_f64());
        if result.is_err() {
            metrics::counter!(telemetry::CACHE_ERRORS, "op" => op).increment(1);
        }
        result
    }};
}

impl Cache for AnyCache {
    async fn get_user(&self, id: i64) -> CacheResult<Option<User>> {
        delegate!(self, c => c.get_user(id))
    }
    async fn get_users(&self, ids: &[i64]) -> CacheResult<Vec<Option<User>>> {
        delegate!(self, c => c.get_users(ids))
    }
    async fn set_user(&self, user: &User, ttl: Duration) -> CacheResult<()> {
        delegate!(self, c => c.set_user(user, ttl))
    }
    async fn del_user(&self, id: i64) -> CacheResult<()> {
        delegate!(self, c => c.del_user(id))
    }
    async fn seq_incr(&self, conv: &str, n: i64) -> CacheResult<Option<i64>> {
        delegate!(self, c => c.seq_incr(conv, n))
    }
    async fn seq_init(&self, conv: &str, value: i64) -> CacheResult<()> {
        delegate!(self, c => c.seq_init(conv, value))
    }
    async fn seq_del(&self, conv: &str) -> CacheResult<()> {
        delegate!(self, c => c.seq_del(conv))
    }
    async fn dedup_get(&self, sender: i64, cmid: &str) -> CacheResult<Option<DedupEntry>> {
        delegate!(self, c => c.dedup_get(sender, cmid))
    }
    async fn dedup_set(
        &self,
        sender: i64,
        cmid: &str,
        entry: &DedupEntry,
        ttl: Duration,
    ) -> CacheResult<()> {
        delegate!(self, c => c.dedup_set(sender, cmid, entry, ttl))
    }
    async fn members_get(&self, group: i64) -> CacheResult<Option<Vec<i64>>> {
        delegate!(self, c => c.members_get(group))
    }
    async fn members_contains(&self, group: i64, user: i64) -> CacheResult<Option<bool>> {
        delegate!(self, c => c.members_contains(group, user))
    }
    async fn members_set(&self, group: i64, members: &[i64], ttl: Duration) -> CacheResult<()> {
        delegate!(self, c => c.members_set(group, members, ttl))
    }
    async fn members_del(&self, group: i64) -> CacheResult<()> {
        delegate!(self, c => c.members_del(group))
    }
    async fn hot_get(&self, conv: &str) -> CacheResult<Option<Vec<Message>>> {
        delegate!(self, c => c.hot_get(conv))
    }
    async fn hot_set(&self, conv: &str, messages: &[Message], ttl: Duration) -> CacheResult<()> {
        delegate!(self, c => c.hot_set(conv, messages, ttl))
    }
    async fn hot_del(&self, conv: &str) -> CacheResult<()> {
        delegate!(self, c => c.hot_del(conv))
    }
    async fn read_ptr_get(&self, user: i64, conv: &str) -> CacheResult<Option<i64>> {
        delegate!(self, c => c.read_ptr_get(user, conv))
    }
    async fn read_ptr_set(&self, user: i64, conv: &str, v: i64, ttl: Duration) -> CacheResult<()> {
        delegate!(self, c => c.read_ptr_set(user, conv, v, ttl))
    }
    async fn read_ptr_del(&self, user: i64, conv: &str) -> CacheResult<()> {
        delegate!(self, c => c.read_ptr_del(user, conv))
    }
    async fn presence_set(&self, user: i64, gateway: &str, ttl: Duration) -> CacheResult<bool> {
        delegate!(self, c => c.presence_set(user, gateway, ttl))
    }
    async fn presence_remove(&self, user: i64, gateway: Option<&str>) -> CacheResult<bool> {
        delegate!(self, c => c.presence_remove(user, gateway))
    }
    async fn presence_get(&self, users: &[i64]) -> CacheResult<Vec<Vec<Presence>>> {
        delegate!(self, c => c.presence_get(users))
    }
    async fn flush(&self) -> CacheResult<()> {
        delegate!(self, c => c.flush())
    }
}
