//! Shared harness of the store and gRPC integration tests.
//!
//! - Stores: SQLite (a file in a fresh `TempDir`) or MariaDB/MySQL at `GOCHAT_TEST_MYSQL_URL`
//!   (default `mysql://root@127.0.0.1:3306`), where every test gets a database of its own
//!   (`gochat_t_<random>`) that is dropped when the test ends, also when it fails.
//! - Caches: memory (moka) or Redis at `GOCHAT_TEST_REDIS_URL` (default
//!   `redis://127.0.0.1:6379`) under a random namespace that is flushed at the end.
//! - [`Switch`]: a cache wrapper that can be made unreachable at will (every call fails with a
//!   `CacheError`), to test what happens when Redis is lost.
//! - [`with_server`]: a real tonic server on `127.0.0.1:0` (`Repo::serve`) and a client channel.
//!
//! A missing MariaDB or Redis fails the test with a message naming the variable; nothing is
//! skipped.

#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use diesel_async::{AsyncConnection, AsyncMysqlConnection};
use futures::FutureExt;
use gochat_infra::ids::Snowflake;
use gochat_infra::{AppError, ErrorCode};
use gochat_proto::repo as pb;
use gochat_repo::cache::redis::RedisCache;
use gochat_repo::cache::{AnyCache, Cache, CacheError, CacheResult, memory::MemoryCache};
use gochat_repo::model::{DedupEntry, Message, Presence, User};
use gochat_repo::store::{AnyStore, Store};
use gochat_repo::{Repo, RepoSettings};
use tonic::transport::Channel;

/// Ids for users, groups and messages that tests make themselves (node 1000: never the
/// server's node 0).
pub static IDS: LazyLock<Snowflake> = LazyLock::new(|| Snowflake::new(1000));

/// A fresh snowflake id.
pub fn next_id() -> i64 {
    IDS.next_id()
}

/// Now as Unix milliseconds.
pub fn now_ms() -> i64 {
    gochat_infra::time::now_ms()
}

/// A random lowercase hex tag, for unique names.
pub fn tag() -> String {
    format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// A SQLite file in a temporary directory.
    Sqlite,
    /// A fresh database on the MariaDB/MySQL server.
    Mysql,
}

/// Which cache a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheKind {
    /// moka, in process.
    Memory,
    /// Redis, in a random namespace.
    Redis,
}

fn mysql_base() -> String {
    std::env::var("GOCHAT_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".to_owned())
        .trim_end_matches('/')
        .to_owned()
}

fn redis_url() -> String {
    std::env::var("GOCHAT_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// Drops a MySQL test database when dropped, on a thread with its own runtime, so it also runs
/// while a failed test unwinds.
#[derive(Debug)]
pub struct DropDatabase {
    base: String,
    db: String,
}

impl Drop for DropDatabase {
    fn drop(&mut self) {
        let base = self.base.clone();
        let db = self.db.clone();
        let joined = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime to drop the test database");
            rt.block_on(async {
                use diesel_async::RunQueryDsl;
                let mut conn = AsyncMysqlConnection::establish(&base)
                    .await
                    .map_err(|e| e.to_string())?;
                diesel::sql_query(format!("DROP DATABASE IF EXISTS `{db}`"))
                    .execute(&mut conn)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            })
        })
        .join();
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("could not drop test database {}: {e}", self.db),
            Err(_) => eprintln!("the thread dropping test database {} panicked", self.db),
        }
    }
}

/// What keeps a test database alive; dropping it removes the database.
#[derive(Debug)]
pub enum DbGuard {
    /// The directory of the SQLite file.
    Sqlite(tempfile::TempDir),
    /// The MySQL database, dropped with this.
    Mysql(DropDatabase),
}

/// A fresh, migrated, empty store, and the guard that removes it.
pub async fn fresh_store(kind: StoreKind) -> (AnyStore, DbGuard) {
    match kind {
        StoreKind::Sqlite => {
            let dir = tempfile::tempdir().expect("a temporary directory");
            let path = dir.path().join("gochat.db");
            let url = path.to_str().expect("a UTF-8 temp path").to_owned();
            let store = AnyStore::open(&url, 4)
                .await
                .expect("open the SQLite test store");
            assert_eq!(store.engine(), "sqlite");
            (store, DbGuard::Sqlite(dir))
        }
        StoreKind::Mysql => {
            use diesel_async::RunQueryDsl;
            let base = mysql_base();
            let db = format!("gochat_t_{}", tag());
            let mut conn = AsyncMysqlConnection::establish(&base)
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "the MySQL tests need a MariaDB/MySQL server at {base} (set \
                         GOCHAT_TEST_MYSQL_URL to use another, e.g. mysql://root@127.0.0.1:3306): {e}"
                    )
                });
            diesel::sql_query(format!(
                "CREATE DATABASE `{db}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
            ))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| {
                panic!("cannot create test database {db} on {base} (GOCHAT_TEST_MYSQL_URL): {e}")
            });
            drop(conn);
            let guard = DropDatabase {
                base: base.clone(),
                db: db.clone(),
            };
            let store = AnyStore::open(&format!("{base}/{db}"), 8)
                .await
                .expect("open the MySQL test store");
            assert_eq!(store.engine(), "mysql");
            (store, DbGuard::Mysql(guard))
        }
    }
}

/// A fresh, empty cache.
pub async fn fresh_cache(kind: CacheKind) -> AnyCache {
    match kind {
        CacheKind::Memory => AnyCache::Memory(MemoryCache::new(1_000_000)),
        CacheKind::Redis => {
            let url = redis_url();
            let namespace = format!("gochat-test-{}:", tag());
            let cache = RedisCache::connect(&url, &namespace)
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "the Redis tests need a Redis server at {url} (set \
                         GOCHAT_TEST_REDIS_URL to use another): {e}"
                    )
                });
            AnyCache::Redis(cache)
        }
    }
}

/// Runs `test` on a fresh store of `kind`; the database is removed afterwards, also when the
/// test fails.
pub async fn with_store<F, Fut>(kind: StoreKind, test: F)
where
    F: FnOnce(AnyStore) -> Fut,
    Fut: Future<Output = ()>,
{
    let (store, guard) = fresh_store(kind).await;
    let outcome = AssertUnwindSafe(test(store)).catch_unwind().await;
    drop(guard);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// A cache that can be switched off: while down, every call fails with a [`CacheError`] (what a
/// lost Redis looks like to the services). Clones share the switch.
#[derive(Debug, Clone)]
pub struct Switch<C> {
    inner: C,
    down: Arc<AtomicBool>,
}

impl<C> Switch<C> {
    /// `inner`, reachable.
    pub fn new(inner: C) -> Self {
        Self {
            inner,
            down: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Makes every call fail (`true`) or reach the inner cache again (`false`).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// The wrapped cache (reachable whatever the switch says).
    pub fn inner(&self) -> &C {
        &self.inner
    }

    fn check(&self) -> CacheResult<()> {
        if self.down.load(Ordering::SeqCst) {
            Err(CacheError("cache switched off by the test".to_owned()))
        } else {
            Ok(())
        }
    }
}

impl<C: Cache> Cache for Switch<C> {
    async fn get_user(&self, id: i64) -> CacheResult<Option<User>> {
        self.check()?;
        self.inner.get_user(id).await
    }
    async fn get_users(&self, ids: &[i64]) -> CacheResult<Vec<Option<User>>> {
        self.check()?;
        self.inner.get_users(ids).await
    }
    async fn set_user(&self, user: &User, ttl: Duration) -> CacheResult<()> {
        self.check()?;
        self.inner.set_user(user, ttl).await
    }
    async fn del_user(&self, id: i64) -> CacheResult<()> {
        self.check()?;
        self.inner.del_user(id).await
    }
    async fn seq_incr(&self, conv: &str, n: i64) -> CacheResult<Option<i64>> {
        self.check()?;
        self.inner.seq_incr(conv, n).await
    }
    async fn seq_init(&self, conv: &str, value: i64) -> CacheResult<()> {
        self.check()?;
        self.inner.seq_init(conv, value).await
    }
    async fn seq_del(&self, conv: &str) -> CacheResult<()> {
        self.check()?;
        self.inner.seq_del(conv).await
    }
    async fn dedup_get(&self, sender: i64, cmid: &str) -> CacheResult<Option<DedupEntry>> {
        self.check()?;
        self.inner.dedup_get(sender, cmid).await
    }
    async fn dedup_set(
        &self,
        sender: i64,
        cmid: &str,
        entry: &DedupEntry,
        ttl: Duration,
    ) -> CacheResult<()> {
        self.check()?;
        self.inner.dedup_set(sender, cmid, entry, ttl).await
    }
    async fn members_get(&self, group: i64) -> CacheResult<Option<Vec<i64>>> {
        self.check()?;
        self.inner.members_get(group).await
    }
    async fn members_contains(&self, group: i64, user: i64) -> CacheResult<Option<bool>> {
        self.check()?;
        self.inner.members_contains(group, user).await
    }
    async fn members_set(&self, group: i64, members: &[i64], ttl: Duration) -> CacheResult<()> {
        self.check()?;
        self.inner.members_set(group, members, ttl).await
    }
    async fn members_del(&self, group: i64) -> CacheResult<()> {
        self.check()?;
        self.inner.members_del(group).await
    }
    async fn hot_get(&self, conv: &str) -> CacheResult<Option<Vec<Message>>> {
        self.check()?;
        self.inner.hot_get(conv).await
    }
    async fn hot_set(&self, conv: &str, messages: &[Message], ttl: Duration) -> CacheResult<()> {
        self.check()?;
        self.inner.hot_set(conv, messages, ttl).await
    }
    async fn hot_del(&self, conv: &str) -> CacheResult<()> {
        self.check()?;
        self.inner.hot_del(conv).await
    }
    async fn read_ptr_get(&self, user: i64, conv: &str) -> CacheResult<Option<i64>> {
        self.check()?;
        self.inner.read_ptr_get(user, conv).await
    }
    async fn read_ptr_set(&self, user: i64, conv: &str, v: i64, ttl: Duration) -> CacheResult<()> {
        self.check()?;
        self.inner.read_ptr_set(user, conv, v, ttl).await
    }
    async fn read_ptr_del(&self, user: i64, conv: &str) -> CacheResult<()> {
        self.check()?;
        self.inner.read_ptr_del(user, conv).await
    }
    async fn presence_set(&self, user: i64, gateway: &str, ttl: Duration) -> CacheResult<bool> {
        self.check()?;
        self.inner.presence_set(user, gateway, ttl).await
    }
    async fn presence_remove(&self, user: i64, gateway: Option<&str>) -> CacheResult<bool> {
        self.check()?;
        self.inner.presence_remove(user, gateway).await
    }
    async fn presence_get(&self, users: &[i64]) -> CacheResult<Vec<Vec<Presence>>> {
        self.check()?;
        self.inner.presence_get(users).await
    }
    async fn flush(&self) -> CacheResult<()> {
        self.check()?;
        self.inner.flush().await
    }
}

/// The repo type every gRPC test serves.
pub type TestRepo = Repo<AnyStore, Switch<AnyCache>>;

/// Settings for tests: cheap password hashing, and a group limit the tests can reach.
pub fn test_settings() -> RepoSettings {
    RepoSettings {
        argon2_memory_kib: 64,
        argon2_iterations: 1,
        max_group_members: 260,
        ..Default::default()
    }
}

/// A running repo server and a client channel to it.
#[derive(Debug)]
pub struct Server {
    /// The served repo (the same value the server runs).
    pub repo: TestRepo,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Which engines this run uses.
    pub store_kind: StoreKind,
    pub cache_kind: CacheKind,
    channel: Channel,
}

impl Server {
    /// The cache switch of the served repo.
    pub fn cache(&self) -> &Switch<AnyCache> {
        self.repo.cache()
    }

    /// The store of the served repo.
    pub fn store(&self) -> &AnyStore {
        self.repo.store()
    }

    /// Empties the cache (a restarted Redis, a flushed moka).
    pub async fn flush_cache(&self) {
        self.cache()
            .inner()
            .flush()
            .await
            .expect("flush the test cache");
    }

    /// A new connection of its own to the server.
    pub async fn connect(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("a valid address")
            .connect()
            .await
            .expect("connect to the test server")
    }

    pub fn users(&self) -> pb::user_service_client::UserServiceClient<Channel> {
        pb::user_service_client::UserServiceClient::new(self.channel.clone())
    }

    pub fn messages(&self) -> pb::message_service_client::MessageServiceClient<Channel> {
        pb::message_service_client::MessageServiceClient::new(self.channel.clone())
    }

    pub fn groups(&self) -> pb::group_service_client::GroupServiceClient<Channel> {
        pb::group_service_client::GroupServiceClient::new(self.channel.clone())
    }

    pub fn conversations(
        &self,
    ) -> pb::conversation_service_client::ConversationServiceClient<Channel> {
        pb::conversation_service_client::ConversationServiceClient::new(self.channel.clone())
    }

    pub fn presence(&self) -> pb::online_status_service_client::OnlineStatusServiceClient<Channel> {
        pb::online_status_service_client::OnlineStatusServiceClient::new(self.channel.clone())
    }

    /// Creates a user over gRPC (password `pw-<username>`); returns it.
    pub async fn create_user(&self, username: &str) -> pb::User {
        self.users()
            .create_user(pb::CreateUserRequest {
                username: username.to_owned(),
                password: format!("pw-{username}"),
                nickname: String::new(),
                avatar_url: String::new(),
            })
            .await
            .expect("CreateUser")
            .into_inner()
            .user
            .expect("CreateUser returns the user")
    }

    /// Inserts `n` users straight into the store (fast; they have no usable password); returns
    /// their ids in creation order.
    pub async fn seed_users(&self, n: usize) -> Vec<i64> {
        seed_users(self.store(), n).await
    }

    /// Reserves seqs over gRPC; returns (first, last).
    pub async fn reserve(&self, conv: &str, count: i64) -> (i64, i64) {
        let r = self
            .messages()
            .generate_seq_id(pb::GenerateSeqIdRequest {
                conversation_id: conv.to_owned(),
                count,
                from_stored: false,
            })
            .await
            .expect("GenerateSeqID")
            .into_inner();
        (r.seq_id, r.end_seq_id)
    }

    /// Stores one message over gRPC.
    pub async fn save(
        &self,
        conv: &str,
        sender: i64,
        seq: i64,
        client_msg_id: &str,
        created_at: i64,
    ) -> Result<pb::SaveMessageResponse, tonic::Status> {
        self.messages()
            .save_message(save_request(conv, sender, seq, client_msg_id, created_at))
            .await
            .map(tonic::Response::into_inner)
    }

    /// Reserves one seq and stores a message with it (the logic service's send path).
    pub async fn send(&self, conv: &str, sender: i64, content: &str) -> pb::Message {
        let (seq, _) = self.reserve(conv, 1).await;
        let mut req = save_request(conv, sender, seq, "", 0);
        req.content = content.to_owned();
        self.messages()
            .save_message(req)
            .await
            .expect("SaveMessage")
            .into_inner()
            .message
            .expect("SaveMessage returns the message")
    }

    /// The whole history of `conv`, ascending, read forward page by page.
    pub async fn history(&self, conv: &str) -> Vec<pb::Message> {
        let mut out: Vec<pb::Message> = Vec::new();
        let mut after = 0;
        loop {
            let page = self
                .messages()
                .get_conversation_messages(pb::GetConversationMessagesRequest {
                    conversation_id: conv.to_owned(),
                    direction: pb::Direction::Forward as i32,
                    after_seq: after,
                    before_seq: 0,
                    limit: 100,
                })
                .await
                .expect("GetConversationMessages")
                .into_inner();
            if let Some(last) = page.messages.last() {
                after = last.seq_id;
            }
            out.extend(page.messages);
            if !page.has_more {
                return out;
            }
        }
    }

    /// The latest page of `conv` (newest first), through the hot cache.
    pub async fn latest(&self, conv: &str, limit: i32) -> (Vec<pb::Message>, bool) {
        let r = self
            .messages()
            .get_conversation_messages(pb::GetConversationMessagesRequest {
                conversation_id: conv.to_owned(),
                direction: pb::Direction::Backward as i32,
                after_seq: 0,
                before_seq: 0,
                limit,
            })
            .await
            .expect("GetConversationMessages latest")
            .into_inner();
        (r.messages, r.has_more)
    }
}

/// A SaveMessage request with a fresh message id.
pub fn save_request(
    conv: &str,
    sender: i64,
    seq: i64,
    client_msg_id: &str,
    created_at: i64,
) -> pb::SaveMessageRequest {
    pb::SaveMessageRequest {
        message_id: next_id().to_string(),
        conversation_id: conv.to_owned(),
        sender_id: sender.to_string(),
        message_type: 1,
        content: format!("message {seq} of {conv}"),
        seq_id: seq,
        client_msg_id: client_msg_id.to_owned(),
        created_at,
    }
}

/// Inserts `n` users straight into `store`; returns their ids in creation order.
pub async fn seed_users(store: &AnyStore, n: usize) -> Vec<i64> {
    use futures::StreamExt;
    let now = now_ms();
    let users: Vec<User> = (0..n)
        .map(|_| {
            let id = next_id();
            User {
                id,
                username: format!("seed{id}"),
                password_hash: "x".to_owned(),
                nickname: format!("Seed {id}"),
                avatar_url: String::new(),
                created_at: now,
                updated_at: now,
            }
        })
        .collect();
    let ids: Vec<i64> = users.iter().map(|u| u.id).collect();
    let results: Vec<_> = futures::stream::iter(users)
        .map(|u| async move { store.create_user(&u).await })
        .buffer_unordered(8)
        .collect()
        .await;
    for r in results {
        r.expect("seed a user");
    }
    ids
}

/// Runs `test` against a real gRPC server over a fresh store and cache of the given kinds, then
/// shuts the server down and removes the database and the cache namespace (also on failure).
pub async fn with_server<F, Fut>(store_kind: StoreKind, cache_kind: CacheKind, test: F)
where
    F: FnOnce(Server) -> Fut,
    Fut: Future<Output = ()>,
{
    let (store, guard) = fresh_store(store_kind).await;
    let cache = fresh_cache(cache_kind).await;
    let repo: TestRepo = Repo::new(store, Switch::new(cache.clone()), test_settings());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("the listener's address");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = repo.clone();
    let server = tokio::spawn(async move {
        served
            .serve(listener, async {
                let _ = stopped.await;
            })
            .await
    });
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("a valid address")
        .connect()
        .await
        .expect("connect to the test server");
    let ctx = Server {
        repo,
        addr,
        store_kind,
        cache_kind,
        channel,
    };
    let outcome = AssertUnwindSafe(test(ctx)).catch_unwind().await;
    let _ = stop.send(());
    let served = server.await;
    if let Err(e) = cache.flush().await {
        eprintln!("could not flush the test cache: {e}");
    }
    drop(guard);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    served
        .expect("the server task")
        .expect("the server ran and stopped cleanly");
}

/// The spec error code a failed call carries (restored from the status metadata).
pub fn code_of(status: &tonic::Status) -> ErrorCode {
    AppError::from_status(status).code
}

/// Asserts that `result` failed with `code`.
#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: ErrorCode) {
    match result {
        Ok(v) => panic!("expected error {code:?}, got success {v:?}"),
        Err(status) => assert_eq!(
            code_of(&status),
            code,
            "wrong error code; status: {status:?}"
        ),
    }
}
