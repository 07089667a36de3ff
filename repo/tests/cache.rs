//! The cache backends against the `Cache` trait: every test is written once, generic over the
//! backend, and run for both the memory (moka) and the Redis backend.
//!
//! The Redis tests use `GOCHAT_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`), each in a
//! fresh random namespace that is flushed at the end; they fail when Redis is unreachable.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::FutureExt;
use gochat_repo::cache::{Cache, memory::MemoryCache, redis::RedisCache};
use gochat_repo::model::*;

/// A TTL no test outlives.
const TTL: Duration = Duration::from_secs(60);
/// A TTL that lapses during a test, and how long to wait for it to.
const SHORT_TTL: Duration = Duration::from_millis(300);
const LAPSE: Duration = Duration::from_millis(600);

/// A backend that can make a fresh, empty cache of its own.
trait Backend: Cache + Clone {
    async fn fresh() -> Self;
}

impl Backend for MemoryCache {
    async fn fresh() -> Self {
        MemoryCache::new(100_000)
    }
}

impl Backend for RedisCache {
    async fn fresh() -> Self {
        let url = std::env::var("GOCHAT_TEST_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
        let namespace = format!("gochat-test-{:016x}:", rand::random::<u64>());
        RedisCache::connect(&url, &namespace)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "the Redis tests need a Redis server at {url} (set GOCHAT_TEST_REDIS_URL \
                     to use another): {e}"
                )
            })
    }
}

/// Runs `test` on a fresh cache of backend `C`, then flushes it (also when the test fails).
async fn run<C, F, Fut>(test: F)
where
    C: Backend,
    F: FnOnce(C) -> Fut,
    Fut: Future<Output = ()>,
{
    let cache = C::fresh().await;
    let outcome = AssertUnwindSafe(test(cache.clone())).catch_unwind().await;
    cache.flush().await.expect("flush the test namespace");
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// Instantiates each generic test for both backends, as `memory::<name>` and `redis::<name>`.
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod memory {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    run::<MemoryCache, _, _>(super::$name).await;
                }
            )*
        }
        mod redis {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    run::<RedisCache, _, _>(super::$name).await;
                }
            )*
        }
    };
}

both_backends!(
    users,
    seq_counter,
    seq_concurrent_incr,
    dedup,
    members,
    hot_messages,
    read_ptr,
    presence_gateways,
    presence_lapse,
    presence_batch,
    flush_only_own_namespace,
);

fn now_ms() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    i64::try_from(since.as_millis()).expect("ms fit i64")
}

fn user(id: i64) -> User {
    User {
        id,
        username: format!("user{id}"),
        password_hash: "$argon2id$v=19$secret".to_owned(),
        nickname: format!("Nick 名字 {id}"),
        avatar_url: String::new(),
        created_at: 1_700_000_000_000 + id,
        updated_at: 1_700_000_000_500 + id,
    }
}

/// `u` as the cache returns it: without the password hash.
fn cached(u: &User) -> User {
    User {
        password_hash: String::new(),
        ..u.clone()
    }
}

fn message(conv: &str, seq: i64) -> Message {
    Message {
        id: 9_000 + seq,
        conversation_id: conv.to_owned(),
        sender_id: 11,
        message_type: 1,
        content: format!("hello {seq} \"quoted\" ✓"),
        seq_id: seq,
        client_msg_id: (seq % 2 == 0).then(|| format!("cmid-{seq}")),
        created_at: 1_700_000_000_000 + seq,
    }
}

/// The live gateway ids of one `presence_get` entry, sorted.
fn gateways(p: &[Presence]) -> Vec<&str> {
    let mut ids: Vec<&str> = p.iter().map(|p| p.gateway_id.as_str()).collect();
    ids.sort_unstable();
    ids
}

async fn users<C: Backend>(c: C) {
    let (a, b) = (user(101), user(102));
    assert_eq!(c.get_user(101).await.expect("get_user"), None);
    c.set_user(&a, TTL).await.expect("set_user a");
    c.set_user(&b, TTL).await.expect("set_user b");

    let got = c.get_user(101).await.expect("get_user").expect("a cached");
    assert!(got.password_hash.is_empty(), "the hash is never cached");
    assert_eq!(got, cached(&a));

    let many = c.get_users(&[102, 999, 101]).await.expect("get_users");
    assert_eq!(many, vec![Some(cached(&b)), None, Some(cached(&a))]);
    assert!(c.get_users(&[]).await.expect("get_users empty").is_empty());

    let changed = User {
        nickname: "renamed".to_owned(),
        ..a.clone()
    };
    c.set_user(&changed, TTL).await.expect("set_user again");
    let got = c.get_user(101).await.expect("get_user").expect("cached");
    assert_eq!(got, cached(&changed));

    c.del_user(101).await.expect("del_user");
    assert_eq!(c.get_user(101).await.expect("get_user"), None);
    let many = c.get_users(&[101, 102]).await.expect("get_users");
    assert_eq!(many, vec![None, Some(cached(&b))]);

    // Many ids in one call keep their order.
    let ids: Vec<i64> = (500..760).collect();
    for &id in ids.iter().filter(|id| *id % 3 == 0) {
        c.set_user(&user(id), TTL).await.expect("set_user");
    }
    let many = c.get_users(&ids).await.expect("get_users many");
    assert_eq!(many.len(), ids.len());
    for (id, got) in ids.iter().zip(many) {
        assert_eq!(got, (id % 3 == 0).then(|| cached(&user(*id))), "user {id}");
    }
}

async fn seq_counter<C: Backend>(c: C) {
    let conv = "s_1_2";
    assert_eq!(c.seq_incr(conv, 1).await.expect("incr"), None);
    assert_eq!(
        c.seq_incr(conv, 1).await.expect("incr"),
        None,
        "an absent counter stays absent"
    );

    c.seq_init(conv, 10).await.expect("init");
    c.seq_init(conv, 99).await.expect("init again");
    assert_eq!(
        c.seq_incr(conv, 1).await.expect("incr"),
        Some(11),
        "init is NX"
    );
    assert_eq!(c.seq_incr(conv, 5).await.expect("incr"), Some(16));
    assert_eq!(
        c.seq_incr("s_1_3", 1).await.expect("incr"),
        None,
        "counters are per conversation"
    );

    c.seq_del(conv).await.expect("del");
    assert_eq!(c.seq_incr(conv, 1).await.expect("incr"), None);
    c.seq_init(conv, 3).await.expect("init after del");
    assert_eq!(c.seq_incr(conv, 1).await.expect("incr"), Some(4));
}

async fn seq_concurrent_incr<C: Backend>(c: C) {
    let conv = "g_7";
    c.seq_init(conv, 0).await.expect("init");
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move {
                let mut got = Vec::with_capacity(100);
                for _ in 0..100 {
                    let seq = c.seq_incr(conv, 1).await.expect("incr");
                    got.push(seq.expect("the counter is cached"));
                }
                got
            })
        })
        .collect();
    let mut all = Vec::with_capacity(800);
    for task in tasks {
        all.extend(task.await.expect("incr task"));
    }
    all.sort_unstable();
    assert_eq!(
        all,
        (1..=800).collect::<Vec<i64>>(),
        "each seq handed out once"
    );
}

async fn dedup<C: Backend>(c: C) {
    let entry = DedupEntry {
        message_id: 77,
        seq_id: 5,
        conversation_id: "s_1_2".to_owned(),
    };
    assert_eq!(c.dedup_get(1, "cmid-a").await.expect("get"), None);
    c.dedup_set(1, "cmid-a", &entry, TTL).await.expect("set");
    assert_eq!(
        c.dedup_get(1, "cmid-a").await.expect("get"),
        Some(entry.clone())
    );
    assert_eq!(c.dedup_get(1, "cmid-b").await.expect("get"), None);
    assert_eq!(c.dedup_get(2, "cmid-a").await.expect("get"), None);

    c.dedup_set(1, "cmid-short", &entry, SHORT_TTL)
        .await
        .expect("set short");
    assert_eq!(
        c.dedup_get(1, "cmid-short").await.expect("get"),
        Some(entry.clone())
    );
    tokio::time::sleep(LAPSE).await;
    assert_eq!(
        c.dedup_get(1, "cmid-short").await.expect("get"),
        None,
        "expired"
    );
    assert_eq!(
        c.dedup_get(1, "cmid-a").await.expect("get"),
        Some(entry.clone())
    );
}

async fn members<C: Backend>(c: C) {
    assert_eq!(c.members_contains(5, 1).await.expect("contains"), None);
    assert_eq!(c.members_get(5).await.expect("get"), None);
    c.members_set(5, &[1, 2, 3], TTL).await.expect("set");
    let mut all = c.members_get(5).await.expect("get").expect("cached");
    all.sort_unstable();
    assert_eq!(all, vec![1, 2, 3]);
    assert_eq!(
        c.members_contains(5, 1).await.expect("contains"),
        Some(true)
    );
    assert_eq!(
        c.members_contains(5, 3).await.expect("contains"),
        Some(true)
    );
    assert_eq!(
        c.members_contains(5, 4).await.expect("contains"),
        Some(false)
    );

    c.members_set(5, &[4], TTL).await.expect("replace");
    assert_eq!(
        c.members_contains(5, 1).await.expect("contains"),
        Some(false),
        "replaced, not merged"
    );
    assert_eq!(
        c.members_contains(5, 4).await.expect("contains"),
        Some(true)
    );

    c.members_set(6, &[], TTL).await.expect("set empty");
    assert_eq!(
        c.members_get(6).await.expect("get"),
        Some(Vec::new()),
        "an empty group is cached, not a miss"
    );
    assert_eq!(
        c.members_contains(6, 1).await.expect("contains"),
        Some(false),
        "an empty group is cached, not a miss"
    );
    assert_eq!(
        c.members_contains(6, 0).await.expect("contains"),
        Some(false)
    );

    c.members_del(5).await.expect("del");
    assert_eq!(c.members_contains(5, 4).await.expect("contains"), None);
    assert_eq!(c.members_get(5).await.expect("get"), None);
    assert_eq!(
        c.members_contains(6, 1).await.expect("contains"),
        Some(false)
    );
}

async fn hot_messages<C: Backend>(c: C) {
    let conv = "g_9";
    assert_eq!(c.hot_get(conv).await.expect("get"), None);
    let page: Vec<Message> = [3, 1, 2].iter().map(|s| message(conv, *s)).collect();
    c.hot_set(conv, &page, TTL).await.expect("set");
    let expected: Vec<Message> = (1..=3).map(|s| message(conv, s)).collect();
    assert_eq!(
        c.hot_get(conv).await.expect("get"),
        Some(expected),
        "ascending by seq"
    );
    assert_eq!(c.hot_get("g_10").await.expect("get"), None);

    let newer: Vec<Message> = (4..=6).map(|s| message(conv, s)).collect();
    c.hot_set(conv, &newer, TTL).await.expect("replace");
    assert_eq!(
        c.hot_get(conv).await.expect("get"),
        Some(newer),
        "replaced, not merged"
    );

    c.hot_set(conv, &[], TTL).await.expect("set empty");
    assert_eq!(c.hot_get(conv).await.expect("get"), Some(Vec::new()));

    c.hot_del(conv).await.expect("del");
    assert_eq!(c.hot_get(conv).await.expect("get"), None);
}

async fn read_ptr<C: Backend>(c: C) {
    assert_eq!(c.read_ptr_get(1, "s_1_2").await.expect("get"), None);
    c.read_ptr_set(1, "s_1_2", 5, TTL).await.expect("set");
    assert_eq!(c.read_ptr_get(1, "s_1_2").await.expect("get"), Some(5));
    c.read_ptr_set(1, "s_1_2", 7, TTL).await.expect("set");
    assert_eq!(c.read_ptr_get(1, "s_1_2").await.expect("get"), Some(7));
    assert_eq!(c.read_ptr_get(2, "s_1_2").await.expect("get"), None);
    assert_eq!(c.read_ptr_get(1, "g_3").await.expect("get"), None);
    c.read_ptr_del(1, "s_1_2").await.expect("del");
    assert_eq!(c.read_ptr_get(1, "s_1_2").await.expect("get"), None);
}

async fn presence_gateways<C: Backend>(c: C) {
    let u = 42;
    assert_eq!(c.presence_get(&[u]).await.expect("get"), vec![Vec::new()]);
    assert!(
        c.presence_set(u, "gw-a", TTL).await.expect("set"),
        "first online"
    );
    assert!(
        !c.presence_set(u, "gw-b", TTL).await.expect("set"),
        "already online"
    );
    assert!(
        !c.presence_set(u, "gw-a", TTL).await.expect("refresh"),
        "refresh"
    );

    let before = now_ms();
    let got = c.presence_get(&[u]).await.expect("get");
    assert_eq!(got.len(), 1);
    assert_eq!(gateways(&got[0]), vec!["gw-a", "gw-b"]);
    for p in &got[0] {
        assert!(p.expires_at > before, "{p:?} is live");
        assert!(
            p.expires_at <= before + 61_000,
            "{p:?} lapses after the ttl"
        );
    }

    assert!(
        !c.presence_remove(u, Some("gw-a")).await.expect("remove"),
        "still on gw-b"
    );
    let got = c.presence_get(&[u]).await.expect("get");
    assert_eq!(gateways(&got[0]), vec!["gw-b"]);
    assert!(
        c.presence_remove(u, Some("gw-b")).await.expect("remove"),
        "now offline"
    );
    assert_eq!(c.presence_get(&[u]).await.expect("get"), vec![Vec::new()]);
    assert!(
        c.presence_remove(u, Some("gw-b"))
            .await
            .expect("remove again"),
        "still offline"
    );

    assert!(
        c.presence_set(u, "gw-c", TTL).await.expect("set"),
        "online again"
    );
    assert!(!c.presence_set(u, "gw-d", TTL).await.expect("set"));
    assert!(
        c.presence_remove(u, None).await.expect("remove all"),
        "offline everywhere"
    );
    assert_eq!(c.presence_get(&[u]).await.expect("get"), vec![Vec::new()]);
}

async fn presence_lapse<C: Backend>(c: C) {
    // 7: one gateway lapses, one stays.
    assert!(c.presence_set(7, "gw-a", SHORT_TTL).await.expect("set"));
    assert!(!c.presence_set(7, "gw-b", TTL).await.expect("set"));
    // 8: its only gateway lapses.
    assert!(c.presence_set(8, "gw-a", SHORT_TTL).await.expect("set"));
    // 9: lapses, then an unrelated gateway is removed.
    assert!(c.presence_set(9, "gw-a", SHORT_TTL).await.expect("set"));
    tokio::time::sleep(LAPSE).await;

    let got = c.presence_get(&[7, 8, 9]).await.expect("get");
    assert_eq!(gateways(&got[0]), vec!["gw-b"]);
    assert!(got[1].is_empty(), "lapsed: {:?}", got[1]);
    assert!(got[2].is_empty(), "lapsed: {:?}", got[2]);

    assert!(
        !c.presence_set(7, "gw-a", TTL).await.expect("set"),
        "gw-b is still live"
    );
    assert!(
        c.presence_set(8, "gw-c", TTL).await.expect("set"),
        "online again after the lapse"
    );
    assert_eq!(
        gateways(&c.presence_get(&[8]).await.expect("get")[0]),
        vec!["gw-c"],
        "the lapsed gateway was dropped"
    );
    assert!(
        c.presence_remove(9, Some("gw-x")).await.expect("remove"),
        "nothing live left"
    );
}

async fn presence_batch<C: Backend>(c: C) {
    let users: Vec<i64> = (1_000..1_250).rev().collect();
    for &u in users.iter().filter(|u| *u % 2 == 0) {
        let gateway = format!("gw-{}", u % 3);
        assert!(c.presence_set(u, &gateway, TTL).await.expect("set"));
        if u % 4 == 0 {
            assert!(!c.presence_set(u, "gw-z", TTL).await.expect("set"));
        }
    }
    let got = c.presence_get(&users).await.expect("get");
    assert_eq!(got.len(), users.len());
    for (u, p) in users.iter().zip(&got) {
        let first = format!("gw-{}", u % 3);
        let expected: Vec<&str> = match (u % 2 == 0, u % 4 == 0) {
            (false, _) => Vec::new(),
            (true, false) => vec![first.as_str()],
            (true, true) => vec![first.as_str(), "gw-z"],
        };
        assert_eq!(gateways(p), expected, "user {u}");
    }
    assert!(c.presence_get(&[]).await.expect("get none").is_empty());
}

async fn flush_only_own_namespace<C: Backend>(c: C) {
    let other = C::fresh().await;
    let entry = DedupEntry {
        message_id: 1,
        seq_id: 1,
        conversation_id: "s_1_2".to_owned(),
    };
    for cache in [&c, &other] {
        cache.set_user(&user(1), TTL).await.expect("set_user");
        cache.seq_init("s_1_2", 50).await.expect("seq_init");
        cache.members_set(3, &[1], TTL).await.expect("members_set");
        cache
            .hot_set("s_1_2", &[message("s_1_2", 1)], TTL)
            .await
            .expect("hot_set");
        cache
            .read_ptr_set(1, "s_1_2", 1, TTL)
            .await
            .expect("read_ptr_set");
        cache
            .presence_set(1, "gw-a", TTL)
            .await
            .expect("presence_set");
        cache
            .dedup_set(1, "cmid", &entry, TTL)
            .await
            .expect("dedup_set");
    }

    c.flush().await.expect("flush");
    assert_eq!(c.get_user(1).await.expect("get_user"), None);
    assert_eq!(c.seq_incr("s_1_2", 1).await.expect("seq_incr"), None);
    assert_eq!(c.members_contains(3, 1).await.expect("members"), None);
    assert_eq!(c.hot_get("s_1_2").await.expect("hot_get"), None);
    assert_eq!(c.read_ptr_get(1, "s_1_2").await.expect("read_ptr"), None);
    assert_eq!(
        c.presence_get(&[1]).await.expect("presence"),
        vec![Vec::new()]
    );
    assert_eq!(c.dedup_get(1, "cmid").await.expect("dedup"), None);

    let survived = async {
        assert_eq!(
            other.get_user(1).await.expect("get_user"),
            Some(cached(&user(1)))
        );
        assert_eq!(
            other.seq_incr("s_1_2", 1).await.expect("seq_incr"),
            Some(51)
        );
        assert_eq!(
            other.members_contains(3, 1).await.expect("members"),
            Some(true)
        );
        assert_eq!(
            other.hot_get("s_1_2").await.expect("hot_get"),
            Some(vec![message("s_1_2", 1)])
        );
        assert_eq!(
            other.read_ptr_get(1, "s_1_2").await.expect("read_ptr"),
            Some(1)
        );
        assert_eq!(
            gateways(&other.presence_get(&[1]).await.expect("presence")[0]),
            vec!["gw-a"]
        );
        assert_eq!(
            other.dedup_get(1, "cmid").await.expect("dedup"),
            Some(entry.clone())
        );
    };
    let outcome = AssertUnwindSafe(survived).catch_unwind().await;
    other.flush().await.expect("flush the other namespace");
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}
