//! The Redis backend: the spec's keys and types (see the table in [`crate::cache`]), each key
//! prefixed by a namespace, over a deadpool-redis pool.
//!
//! Read-modify-write operations are single Lua scripts (`seq_incr`, `presence_set`,
//! `presence_remove`); replacements are MULTI/EXEC pipelines (DEL + add + PEXPIRE); batch reads
//! are one pipeline, so each method costs one round trip. Sets and sorted sets carry an
//! empty-marker member so that a cached empty value is told apart from a miss.

use std::collections::HashMap;
use std::fmt::Display;
use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadpool_redis::{Config, Connection, Pool, PoolConfig, Runtime, Timeouts};
use redis::Script;

use super::{Cache, CacheError, CacheResult};
use crate::model::{DedupEntry, Message, Presence, User};

/// The member every `group_members` set holds besides the ids (never a formatted `i64`), so an
/// empty group is a set with only this member rather than a missing key.
const MEMBERS_MARKER: &str = "_";
/// The member every `hot_messages` zset holds besides the messages (never a JSON object), so an
/// empty page is told apart from a miss.
const HOT_MARKER: &str = "_";
/// The key kinds this backend writes; `flush` deletes only these under its namespace.
const KINDS: [&str; 7] = [
    "user_info:",
    "user_session:",
    "conv_seq:",
    "group_members:",
    "msg_dedup:",
    "hot_messages:",
    "unread:",
];
/// How long to wait for a pooled connection, to connect, or to recycle one.
const POOL_TIMEOUT: Duration = Duration::from_secs(5);
/// Keys fetched per SCAN step in `flush`.
const SCAN_COUNT: usize = 1000;

/// INCRBY only when the counter exists; nil (changing nothing) otherwise.
static SEQ_INCR: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.call('INCRBY', KEYS[1], ARGV[1])
end
return false
",
    )
});

/// KEYS[1] session hash; ARGV: gateway, now (ms), its new expiry (ms). Drops lapsed gateways,
/// sets this one, expires the hash with its latest gateway; returns 1 when no gateway was live
/// before.
static PRESENCE_SET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local now = tonumber(ARGV[2])
local max = tonumber(ARGV[3])
local live = 0
local h = redis.call('HGETALL', KEYS[1])
for i = 1, #h, 2 do
  local e = tonumber(h[i + 1])
  if e == nil or e <= now then
    redis.call('HDEL', KEYS[1], h[i])
  else
    live = live + 1
    if h[i] ~= ARGV[1] and e > max then max = e end
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
if max > now then
  redis.call('PEXPIRE', KEYS[1], max - now)
else
  redis.call('DEL', KEYS[1])
end
if live == 0 then return 1 end
return 0
",
    )
});

/// KEYS[1] session hash; ARGV: now (ms), then the gateway to remove (none: remove all). Drops it
/// and lapsed gateways, re-expires the hash with its latest gateway; returns 1 when no gateway is
/// live any more.
static PRESENCE_REMOVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if #ARGV < 2 then
  redis.call('DEL', KEYS[1])
  return 1
end
redis.call('HDEL', KEYS[1], ARGV[2])
local now = tonumber(ARGV[1])
local max = 0
local live = 0
local h = redis.call('HGETALL', KEYS[1])
for i = 1, #h, 2 do
  local e = tonumber(h[i + 1])
  if e == nil or e <= now then
    redis.call('HDEL', KEYS[1], h[i])
  else
    live = live + 1
    if e > max then max = e end
  end
end
if live == 0 then
  redis.call('DEL', KEYS[1])
  return 1
end
redis.call('PEXPIRE', KEYS[1], max - now)
return 0
",
    )
});

/// The Redis cache. Cheap to clone: clones share the pool.
#[derive(Debug, Clone)]
pub struct RedisCache {
    pool: Pool,
    ns: String,
}

/// Maps a failure of `what` to a [`CacheError`].
fn fail<E: Display>(what: &'static str) -> impl FnOnce(E) -> CacheError {
    move |e| CacheError(format!("redis {what}: {e}"))
}

/// Now as Unix milliseconds.
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// `ttl` in milliseconds for PX/PEXPIRE: saturating, and at least 1 (Redis rejects 0).
fn px(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1)
}

/// `s` with Redis glob metacharacters escaped.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A `user_info` hash as a user; `None` for a missing (empty) hash.
fn decode_user(mut h: HashMap<String, String>) -> CacheResult<Option<User>> {
    if h.is_empty() {
        return Ok(None);
    }
    let mut text = |name: &str| {
        h.remove(name)
            .ok_or_else(|| CacheError(format!("redis user_info: field {name} missing")))
    };
    let int = |name: &str, v: String| {
        v.parse::<i64>()
            .map_err(|e| CacheError(format!("redis user_info: field {name}: {e}")))
    };
    Ok(Some(User {
        id: int("id", text("id")?)?,
        username: text("username")?,
        password_hash: String::new(),
        nickname: text("nickname")?,
        avatar_url: text("avatar_url")?,
        created_at: int("created_at", text("created_at")?)?,
        updated_at: int("updated_at", text("updated_at")?)?,
    }))
}

/// A `user_session` hash as its live gateways (expiry after `now`), sorted by gateway id.
fn decode_presence(h: HashMap<String, String>, now: i64) -> Vec<Presence> {
    let mut out: Vec<Presence> = h
        .into_iter()
        .filter_map(|(gateway_id, exp)| {
            let expires_at = exp.parse::<i64>().ok()?;
            (expires_at > now).then_some(Presence {
                gateway_id,
                expires_at,
            })
        })
        .collect();
    out.sort_by(|a, b| a.gateway_id.cmp(&b.gateway_id));
    out
}

impl RedisCache {
    /// Connects to `url` (e.g. `redis://127.0.0.1:6379/0`) and checks the server with a PING, so
    /// a wrong address fails here rather than at the first call. Every key is prefixed by
    /// `namespace` (e.g. `gochat:`).
    pub async fn connect(url: &str, namespace: &str) -> Result<Self, CacheError> {
        let mut config = Config::from_url(url);
        config.pool = Some(PoolConfig {
            timeouts: Timeouts {
                wait: Some(POOL_TIMEOUT),
                create: Some(POOL_TIMEOUT),
                recycle: Some(POOL_TIMEOUT),
            },
            ..PoolConfig::default()
        });
        let pool = config
            .create_pool(Some(Runtime::Tokio1))
            .map_err(|e| CacheError(format!("redis pool for {url}: {e}")))?;
        let cache = Self {
            pool,
            ns: namespace.to_owned(),
        };
        let mut conn = cache
            .pool
            .get()
            .await
            .map_err(|e| CacheError(format!("redis connect to {url}: {e}")))?;
        let pong: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(|e| CacheError(format!("redis PING to {url}: {e}")))?;
        if pong != "PONG" {
            return Err(CacheError(format!(
                "redis PING to {url}: unexpected reply {pong}"
            )));
        }
        Ok(cache)
    }

    async fn conn(&self) -> CacheResult<Connection> {
        self.pool.get().await.map_err(fail("connection"))
    }

    fn key(&self, key: impl Display) -> String {
        format!("{}{key}", self.ns)
    }

    fn user_key(&self, id: i64) -> String {
        self.key(format_args!("user_info:{id}"))
    }

    fn session_key(&self, user: i64) -> String {
        self.key(format_args!("user_session:{user}"))
    }

    fn seq_key(&self, conv: &str) -> String {
        self.key(format_args!("conv_seq:{conv}"))
    }

    fn members_key(&self, group: i64) -> String {
        self.key(format_args!("group_members:{group}"))
    }

    fn dedup_key(&self, sender: i64, client_msg_id: &str) -> String {
        self.key(format_args!("msg_dedup:{sender}:{client_msg_id}"))
    }

    fn hot_key(&self, conv: &str) -> String {
        self.key(format_args!("hot_messages:{conv}"))
    }

    fn read_ptr_key(&self, user: i64, conv: &str) -> String {
        self.key(format_args!("unread:{user}:{conv}"))
    }

    async fn del(&self, key: String, what: &'static str) -> CacheResult<()> {
        let mut conn = self.conn().await?;
        redis::cmd("DEL")
            .arg(key)
            .exec_async(&mut conn)
            .await
            .map_err(fail(what))
    }

    /// Whether `key` (a full key) is one of ours: under the namespace and of a known kind.
    fn is_ours(&self, key: &[u8]) -> bool {
        key.strip_prefix(self.ns.as_bytes())
            .is_some_and(|rest| KINDS.iter().any(|k| rest.starts_with(k.as_bytes())))
    }
}

impl Cache for RedisCache {
    async fn get_user(&self, id: i64) -> CacheResult<Option<User>> {
        let mut conn = self.conn().await?;
        let h: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.user_key(id))
            .query_async(&mut conn)
            .await
            .map_err(fail("get_user"))?;
        decode_user(h)
    }

    async fn get_users(&self, ids: &[i64]) -> CacheResult<Vec<Option<User>>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for &id in ids {
            pipe.cmd("HGETALL").arg(self.user_key(id));
        }
        let mut conn = self.conn().await?;
        let hashes: Vec<HashMap<String, String>> = pipe
            .query_async(&mut conn)
            .await
            .map_err(fail("get_users"))?;
        hashes.into_iter().map(decode_user).collect()
    }

    async fn set_user(&self, user: &User, ttl: Duration) -> CacheResult<()> {
        let key = self.user_key(user.id);
        let mut conn = self.conn().await?;
        redis::pipe()
            .atomic()
            .cmd("DEL")
            .arg(&key)
            .ignore()
            .cmd("HSET")
            .arg(&key)
            .arg("id")
            .arg(user.id)
            .arg("username")
            .arg(&user.username)
            .arg("nickname")
            .arg(&user.nickname)
            .arg("avatar_url")
            .arg(&user.avatar_url)
            .arg("created_at")
            .arg(user.created_at)
            .arg("updated_at")
            .arg(user.updated_at)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(px(ttl))
            .ignore()
            .exec_async(&mut conn)
            .await
            .map_err(fail("set_user"))
    }

    async fn del_user(&self, id: i64) -> CacheResult<()> {
        self.del(self.user_key(id), "del_user").await
    }

    async fn seq_incr(&self, conv: &str, n: i64) -> CacheResult<Option<i64>> {
        let mut conn = self.conn().await?;
        SEQ_INCR
            .key(self.seq_key(conv))
            .arg(n)
            .invoke_async(&mut conn)
            .await
            .map_err(fail("seq_incr"))
    }

    async fn seq_init(&self, conv: &str, value: i64) -> CacheResult<()> {
        let mut conn = self.conn().await?;
        redis::cmd("SET")
            .arg(self.seq_key(conv))
            .arg(value)
            .arg("NX")
            .exec_async(&mut conn)
            .await
            .map_err(fail("seq_init"))
    }

    async fn seq_del(&self, conv: &str) -> CacheResult<()> {
        self.del(self.seq_key(conv), "seq_del").await
    }

    async fn dedup_get(&self, sender: i64, client_msg_id: &str) -> CacheResult<Option<DedupEntry>> {
        let mut conn = self.conn().await?;
        let json: Option<String> = redis::cmd("GET")
            .arg(self.dedup_key(sender, client_msg_id))
            .query_async(&mut conn)
            .await
            .map_err(fail("dedup_get"))?;
        json.map(|j| serde_json::from_str(&j).map_err(fail("dedup_get decode")))
            .transpose()
    }

    async fn dedup_set(
        &self,
        sender: i64,
        client_msg_id: &str,
        entry: &DedupEntry,
        ttl: Duration,
    ) -> CacheResult<()> {
        let json = serde_json::to_string(entry).map_err(fail("dedup_set encode"))?;
        let mut conn = self.conn().await?;
        redis::cmd("SET")
            .arg(self.dedup_key(sender, client_msg_id))
            .arg(json)
            .arg("PX")
            .arg(px(ttl))
            .exec_async(&mut conn)
            .await
            .map_err(fail("dedup_set"))
    }

    async fn members_get(&self, group: i64) -> CacheResult<Option<Vec<i64>>> {
        let mut conn = self.conn().await?;
        let all: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.members_key(group))
            .query_async(&mut conn)
            .await
            .map_err(fail("members_get"))?;
        // A cached set always holds the marker; an empty answer is a missing key.
        if all.is_empty() {
            return Ok(None);
        }
        Ok(Some(
            all.iter()
                .filter(|m| m.as_str() != MEMBERS_MARKER)
                .filter_map(|m| m.parse().ok())
                .collect(),
        ))
    }

    async fn members_contains(&self, group: i64, user: i64) -> CacheResult<Option<bool>> {
        let key = self.members_key(group);
        let mut conn = self.conn().await?;
        let (exists, member): (bool, bool) = redis::pipe()
            .atomic()
            .cmd("EXISTS")
            .arg(&key)
            .cmd("SISMEMBER")
            .arg(&key)
            .arg(user)
            .query_async(&mut conn)
            .await
            .map_err(fail("members_contains"))?;
        Ok(exists.then_some(member))
    }

    async fn members_set(&self, group: i64, members: &[i64], ttl: Duration) -> CacheResult<()> {
        let key = self.members_key(group);
        let mut conn = self.conn().await?;
        redis::pipe()
            .atomic()
            .cmd("DEL")
            .arg(&key)
            .ignore()
            .cmd("SADD")
            .arg(&key)
            .arg(MEMBERS_MARKER)
            .arg(members)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(px(ttl))
            .ignore()
            .exec_async(&mut conn)
            .await
            .map_err(fail("members_set"))
    }

    async fn members_del(&self, group: i64) -> CacheResult<()> {
        self.del(self.members_key(group), "members_del").await
    }

    async fn hot_get(&self, conv: &str) -> CacheResult<Option<Vec<Message>>> {
        let mut conn = self.conn().await?;
        let members: Vec<String> = redis::cmd("ZRANGE")
            .arg(self.hot_key(conv))
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .map_err(fail("hot_get"))?;
        if members.is_empty() {
            return Ok(None);
        }
        members
            .iter()
            .filter(|m| m.as_str() != HOT_MARKER)
            .map(|m| serde_json::from_str(m).map_err(fail("hot_get decode")))
            .collect::<CacheResult<Vec<Message>>>()
            .map(Some)
    }

    async fn hot_set(&self, conv: &str, messages: &[Message], ttl: Duration) -> CacheResult<()> {
        let key = self.hot_key(conv);
        let mut pipe = redis::pipe();
        pipe.atomic().cmd("DEL").arg(&key).ignore();
        pipe.cmd("ZADD").arg(&key).arg(0).arg(HOT_MARKER);
        for m in messages {
            let json = serde_json::to_string(m).map_err(fail("hot_set encode"))?;
            pipe.arg(m.seq_id).arg(json);
        }
        pipe.ignore().cmd("PEXPIRE").arg(&key).arg(px(ttl)).ignore();
        let mut conn = self.conn().await?;
        pipe.exec_async(&mut conn).await.map_err(fail("hot_set"))
    }

    async fn hot_del(&self, conv: &str) -> CacheResult<()> {
        self.del(self.hot_key(conv), "hot_del").await
    }

    async fn read_ptr_get(&self, user: i64, conv: &str) -> CacheResult<Option<i64>> {
        let mut conn = self.conn().await?;
        redis::cmd("GET")
            .arg(self.read_ptr_key(user, conv))
            .query_async(&mut conn)
            .await
            .map_err(fail("read_ptr_get"))
    }

    async fn read_ptr_set(
        &self,
        user: i64,
        conv: &str,
        last_read_seq: i64,
        ttl: Duration,
    ) -> CacheResult<()> {
        let mut conn = self.conn().await?;
        redis::cmd("SET")
            .arg(self.read_ptr_key(user, conv))
            .arg(last_read_seq)
            .arg("PX")
            .arg(px(ttl))
            .exec_async(&mut conn)
            .await
            .map_err(fail("read_ptr_set"))
    }

    async fn read_ptr_del(&self, user: i64, conv: &str) -> CacheResult<()> {
        self.del(self.read_ptr_key(user, conv), "read_ptr_del")
            .await
    }

    async fn presence_set(&self, user: i64, gateway: &str, ttl: Duration) -> CacheResult<bool> {
        let now = now_ms();
        let expires_at = now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
        let mut conn = self.conn().await?;
        let first: i64 = PRESENCE_SET
            .key(self.session_key(user))
            .arg(gateway)
            .arg(now)
            .arg(expires_at)
            .invoke_async(&mut conn)
            .await
            .map_err(fail("presence_set"))?;
        Ok(first == 1)
    }

    async fn presence_remove(&self, user: i64, gateway: Option<&str>) -> CacheResult<bool> {
        let mut conn = self.conn().await?;
        let mut invocation = PRESENCE_REMOVE.key(self.session_key(user));
        invocation.arg(now_ms());
        if let Some(g) = gateway {
            invocation.arg(g);
        }
        let offline: i64 = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(fail("presence_remove"))?;
        Ok(offline == 1)
    }

    async fn presence_get(&self, users: &[i64]) -> CacheResult<Vec<Vec<Presence>>> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for &user in users {
            pipe.cmd("HGETALL").arg(self.session_key(user));
        }
        let mut conn = self.conn().await?;
        let hashes: Vec<HashMap<String, String>> = pipe
            .query_async(&mut conn)
            .await
            .map_err(fail("presence_get"))?;
        let now = now_ms();
        Ok(hashes
            .into_iter()
            .map(|h| decode_presence(h, now))
            .collect())
    }

    async fn flush(&self) -> CacheResult<()> {
        let pattern = format!("{}*", glob_escape(&self.ns));
        let mut conn = self.conn().await?;
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .query_async(&mut conn)
                .await
                .map_err(fail("flush scan"))?;
            let ours: Vec<Vec<u8>> = keys.into_iter().filter(|k| self.is_ours(k)).collect();
            if !ours.is_empty() {
                redis::cmd("DEL")
                    .arg(&ours)
                    .exec_async(&mut conn)
                    .await
                    .map_err(fail("flush del"))?;
            }
            cursor = next;
            if cursor == 0 {
                return Ok(());
            }
        }
    }
}
