//! Logic against the real repo (SQLite + memory cache) and the in-process bus: the upstream
//! consumer, Conversation actors, acks, delivery records, dedup and membership errors.

use std::collections::BTreeMap;
use std::time::Duration;

use gochat_infra::mq::memory::{MemoryBus, MemoryBusConfig};
use gochat_infra::mq::{Bus, Consumer, Producer};
use gochat_infra::wire::{
    DownstreamKind, DownstreamMessage, HEADER_SESSION, UPSTREAM_TOPIC, UpstreamMessage,
    downstream_topic,
};
use gochat_logic::{Logic, LogicSettings};
use gochat_proto::logic as lpb;
use gochat_proto::logic::auth_service_server::AuthService;
use gochat_proto::logic::conversation_service_server::ConversationService;
use gochat_proto::logic::group_service_server::GroupService;
use gochat_proto::logic::presence_service_server::PresenceService;
use gochat_repo::cache::AnyCache;
use gochat_repo::cache::memory::MemoryCache;
use gochat_repo::store::AnyStore;
use gochat_repo::{Repo, RepoSettings};
use tonic::Request;

type TestLogic = Logic<Repo, MemoryBus>;

struct World {
    logic: TestLogic,
    bus: MemoryBus,
    _dir: tempfile::TempDir,
}

async fn world() -> World {
    world_with(|_| {}).await
}

async fn world_with(tune: impl FnOnce(&mut LogicSettings)) -> World {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = AnyStore::open(&dir.path().join("t.db").to_string_lossy(), 4)
        .await
        .expect("store");
    let repo = Repo::new(
        store,
        AnyCache::Memory(MemoryCache::new(100_000)),
        RepoSettings {
            argon2_memory_kib: 64,
            argon2_iterations: 1,
            ..RepoSettings::default()
        },
    );
    let bus = MemoryBus::new(MemoryBusConfig::default());
    let mut settings = LogicSettings {
        jwt_secret: "x".repeat(40),
        arbiters: 2,
        ..LogicSettings::default()
    };
    tune(&mut settings);
    let logic = Logic::new(repo, bus.clone(), settings).expect("logic");
    let runner = logic.clone();
    actix_rt::spawn(async move {
        runner
            .run_upstream(4, std::future::pending())
            .await
            .expect("upstream");
    });
    World {
        logic,
        bus,
        _dir: dir,
    }
}

async fn user(w: &World, name: &str) -> String {
    w.logic
        .register(Request::new(lpb::RegisterRequest {
            username: name.into(),
            password: "password1".into(),
            nickname: String::new(),
        }))
        .await
        .expect("register")
        .into_inner()
        .user
        .expect("user")
        .id
}

async fn online(w: &World, user: &str, gateway: &str) {
    w.logic
        .user_connected(Request::new(lpb::UserConnectedRequest {
            user_id: user.into(),
            gateway_id: gateway.into(),
            ttl_seconds: 600,
        }))
        .await
        .expect("connected");
}

async fn send(w: &World, user: &str, conv: &str, cmid: &str, content: &str, session: &str) {
    let mut headers = BTreeMap::new();
    headers.insert(HEADER_SESSION.to_owned(), session.to_owned());
    let up = UpstreamMessage {
        trace_id: format!("t-{cmid}"),
        user_id: user.into(),
        gateway_id: "gw-1".into(),
        conversation_id: conv.into(),
        message_type: 1,
        content: content.into(),
        client_msg_id: cmid.into(),
        timestamp: 0,
        headers,
    };
    w.bus
        .send(
            UPSTREAM_TOPIC,
            conv,
            serde_json::to_vec(&up).expect("json"),
            BTreeMap::new(),
        )
        .await
        .expect("send");
}

/// Reads downstream records of gw-1 until `want` of kind `kind` arrived (others are collected too).
async fn collect<C: Consumer>(
    c: &mut C,
    kind: DownstreamKind,
    want: usize,
) -> Vec<DownstreamMessage> {
    let mut out = Vec::new();
    let mut n = 0;
    while n < want {
        let r = tokio::time::timeout(Duration::from_secs(20), c.recv())
            .await
            .expect("a downstream record in time")
            .expect("recv");
        c.commit(&r).await.expect("commit");
        let m: DownstreamMessage = r
            .payload
            .decode::<DownstreamMessage>()
            .expect("downstream json")
            .into_owned();
        if m.kind == kind {
            n += 1;
        }
        out.push(m);
    }
    out
}

/// A consumer of gw-1's downstream topic, users alice and bobby online on gw-1, and their single
/// chat.
async fn alice_and_bob(w: &World) -> (impl Consumer, String, String, String) {
    w.bus
        .ensure_topic(&downstream_topic("gw-1"), 4)
        .await
        .expect("topic");
    let down = w
        .bus
        .subscribe("test", &[&downstream_topic("gw-1")])
        .await
        .expect("subscribe");
    let a = user(w, "alice").await;
    let b = user(w, "bobby").await;
    online(w, &a, "gw-1").await;
    online(w, &b, "gw-1").await;
    let conv = w
        .logic
        .create_single_conversation(Request::new(lpb::CreateSingleConversationRequest {
            user_id: a.clone(),
            target_user_id: b.clone(),
        }))
        .await
        .expect("conversation")
        .into_inner()
        .conversation
        .expect("conv")
        .id;
    (down, a, b, conv)
}

#[actix_rt::test]
async fn single_chat_acks_in_seq_order_delivers_and_dedups() {
    let w = world().await;
    let (mut down, a, b, conv) = alice_and_bob(&w).await;
    for i in 0..20 {
        send(
            &w,
            &a,
            &conv,
            &format!("m{i}"),
            &format!("hello {i}"),
            "sess-a",
        )
        .await;
    }
    let records = collect(&mut down, DownstreamKind::MessageAck, 20).await;
    let acks: Vec<&DownstreamMessage> = records
        .iter()
        .filter(|m| m.kind == DownstreamKind::MessageAck)
        .collect();
    let seqs: Vec<i64> = acks.iter().map(|m| m.seq_id).collect();
    assert_eq!(
        seqs,
        (1..=20).collect::<Vec<_>>(),
        "acks carry seq 1..=20 in order"
    );
    // Each message goes to its recipients before its sender's ack, in seq order (the records
    // share one partition): a gateway never sees an ack of N before the new-message of N-1.
    let order: Vec<(i64, bool)> = records
        .iter()
        .filter(|m| {
            matches!(
                m.kind,
                DownstreamKind::NewMessage | DownstreamKind::MessageAck
            )
        })
        .map(|m| (m.seq_id, m.kind == DownstreamKind::MessageAck))
        .collect();
    assert_eq!(order.len(), 40, "{order:?}");
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "new-message N, ack N, new-message N+1, ...: {order:?}"
    );
    assert!(acks.iter().all(|m| m.target_session == "sess-a"));
    // The resend of m3 gets the original ack again.
    send(&w, &a, &conv, "m3", "hello 3", "sess-a").await;
    let again = collect(&mut down, DownstreamKind::MessageAck, 1).await;
    let ack = again
        .iter()
        .find(|m| m.kind == DownstreamKind::MessageAck)
        .expect("ack");
    assert_eq!(ack.seq_id, 4);
    assert_eq!(ack.message_id, acks[3].message_id);
    // The seq reserved for the resend was not used: the next message takes it (no hole).
    send(&w, &a, &conv, "m20", "hello 20", "sess-a").await;
    let next = collect(&mut down, DownstreamKind::MessageAck, 1).await;
    let ack = next
        .iter()
        .find(|m| m.kind == DownstreamKind::MessageAck)
        .expect("ack");
    assert_eq!(ack.seq_id, 21);
    // History has exactly 21 messages, and bob has 21 unread.
    let history = w
        .logic
        .get_messages(Request::new(lpb::GetMessagesRequest {
            user_id: b.clone(),
            conversation_id: conv.clone(),
            after_seq: Some(0),
            before_seq: None,
            limit: 100,
        }))
        .await
        .expect("history")
        .into_inner();
    assert_eq!(history.messages.len(), 21);
    let list = w
        .logic
        .get_conversations(Request::new(lpb::GetConversationsRequest {
            user_id: b.clone(),
            page: 1,
            page_size: 20,
        }))
        .await
        .expect("list")
        .into_inner();
    let c = list
        .conversations
        .iter()
        .find(|c| c.id == conv)
        .expect("listed");
    assert_eq!(c.unread_count, 21);
    let mine = w
        .logic
        .get_conversations(Request::new(lpb::GetConversationsRequest {
            user_id: a.clone(),
            page: 1,
            page_size: 20,
        }))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(
        mine.conversations
            .iter()
            .find(|c| c.id == conv)
            .expect("listed")
            .unread_count,
        0,
        "own messages are read"
    );
    // New-message records went to gw-1 for both users, excluding the sending session.
    let deliveries: Vec<&DownstreamMessage> = records
        .iter()
        .filter(|m| m.kind == DownstreamKind::NewMessage)
        .collect();
    assert!(!deliveries.is_empty());
    for d in &deliveries {
        assert_eq!(d.exclude_session, "sess-a");
        assert!(d.targets.contains(&b));
    }
}

/// Seqs are reserved a block at a time; an actor that stops with seqs to spare leaves no gap:
/// the next one restarts the counter right after the largest stored seq.
#[actix_rt::test]
async fn seqs_go_on_without_a_gap_after_an_idle_actor_stopped() {
    let w = world_with(|s| s.idle_timeout = Duration::from_millis(300)).await;
    let (mut down, a, b, conv) = alice_and_bob(&w).await;
    let acked = |records: Vec<DownstreamMessage>| -> Vec<i64> {
        records
            .iter()
            .filter(|m| m.kind == DownstreamKind::MessageAck)
            .map(|m| m.seq_id)
            .collect()
    };
    for i in 0..3 {
        send(&w, &a, &conv, &format!("m{i}"), "hi", "sess-a").await;
    }
    let first = acked(collect(&mut down, DownstreamKind::MessageAck, 3).await);
    assert_eq!(first, vec![1, 2, 3]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while w.logic.conversation_actors() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the idle actor never stopped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    send(&w, &a, &conv, "m3", "hi", "sess-a").await;
    send(&w, &a, &conv, "m4", "hi", "sess-a").await;
    let next = acked(collect(&mut down, DownstreamKind::MessageAck, 2).await);
    assert_eq!(
        next,
        vec![4, 5],
        "the new actor goes on from the stored seqs"
    );
    let history = w
        .logic
        .get_messages(Request::new(lpb::GetMessagesRequest {
            user_id: b.clone(),
            conversation_id: conv.clone(),
            after_seq: Some(0),
            before_seq: None,
            limit: 100,
        }))
        .await
        .expect("history")
        .into_inner();
    let seqs: Vec<i64> = history.messages.iter().map(|m| m.seq_id).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
}

#[actix_rt::test]
async fn non_members_get_an_error_frame() {
    let w = world().await;
    w.bus
        .ensure_topic(&downstream_topic("gw-1"), 4)
        .await
        .expect("topic");
    let mut down = w
        .bus
        .subscribe("test", &[&downstream_topic("gw-1")])
        .await
        .expect("subscribe");
    let a = user(&w, "owner").await;
    let b = user(&w, "member").await;
    let c = user(&w, "stranger").await;
    let group = w
        .logic
        .create_group(Request::new(lpb::CreateGroupRequest {
            operator_id: a.clone(),
            name: "team".into(),
            member_ids: vec![b.clone()],
        }))
        .await
        .expect("group")
        .into_inner()
        .group
        .expect("group");
    send(&w, &c, &group.conversation_id, "x1", "let me in", "sess-c").await;
    let recs = collect(&mut down, DownstreamKind::Error, 1).await;
    let err = recs
        .iter()
        .find(|m| m.kind == DownstreamKind::Error)
        .expect("error");
    assert_eq!(err.error_code, 4001);
    assert_eq!(err.target_session, "sess-c");
    assert_eq!(err.client_msg_id, "x1");
    // And a member's message is stored with seq 1.
    send(&w, &b, &group.conversation_id, "y1", "hi team", "sess-b").await;
    let recs = collect(&mut down, DownstreamKind::MessageAck, 1).await;
    let ack = recs
        .iter()
        .find(|m| m.kind == DownstreamKind::MessageAck)
        .expect("ack");
    assert_eq!(ack.seq_id, 1);

    // The actor now trusts b's membership (for a minute by default); b is removed, and the
    // very next message is refused: the removal reached the actor as a control record.
    send(&w, &b, &group.conversation_id, "y2", "still here", "sess-b").await;
    let recs = collect(&mut down, DownstreamKind::MessageAck, 1).await;
    assert!(
        recs.iter()
            .any(|m| m.kind == DownstreamKind::MessageAck && m.seq_id == 2)
    );
    w.logic
        .leave_group(Request::new(lpb::LeaveGroupRequest {
            operator_id: a.clone(),
            group_id: group.id.clone(),
            user_id: b.clone(),
        }))
        .await
        .expect("remove b");
    send(&w, &b, &group.conversation_id, "y3", "am I out?", "sess-b").await;
    let recs = collect(&mut down, DownstreamKind::Error, 1).await;
    let err = recs
        .iter()
        .find(|m| m.kind == DownstreamKind::Error)
        .expect("error");
    assert_eq!((err.error_code, err.client_msg_id.as_str()), (4001, "y3"));
    // The owner still sends, right after seq 2.
    send(&w, &a, &group.conversation_id, "z1", "bye b", "sess-a").await;
    let recs = collect(&mut down, DownstreamKind::MessageAck, 1).await;
    let ack = recs
        .iter()
        .find(|m| m.kind == DownstreamKind::MessageAck)
        .expect("ack");
    assert_eq!((ack.seq_id, ack.client_msg_id.as_str()), (3, "z1"));
}

#[actix_rt::test]
async fn tokens_rotate_and_logout_revokes_both() {
    let w = world().await;
    user(&w, "carol").await;
    let login = w
        .logic
        .login(Request::new(lpb::LoginRequest {
            username: "carol".into(),
            password: "password1".into(),
        }))
        .await
        .expect("login")
        .into_inner();
    let wrong = w
        .logic
        .login(Request::new(lpb::LoginRequest {
            username: "carol".into(),
            password: "nope-nope".into(),
        }))
        .await
        .expect_err("wrong password");
    assert_eq!(
        gochat_infra::AppError::from_status(&wrong).code.as_u16(),
        2002
    );
    w.logic
        .validate_token(Request::new(lpb::ValidateTokenRequest {
            access_token: login.access_token.clone(),
        }))
        .await
        .expect("valid");
    let refreshed = w
        .logic
        .refresh_token(Request::new(lpb::RefreshTokenRequest {
            refresh_token: login.refresh_token.clone(),
        }))
        .await
        .expect("refresh")
        .into_inner();
    let replay = w
        .logic
        .refresh_token(Request::new(lpb::RefreshTokenRequest {
            refresh_token: login.refresh_token.clone(),
        }))
        .await
        .expect_err("old refresh token refused");
    assert_eq!(
        gochat_infra::AppError::from_status(&replay).code.as_u16(),
        1002
    );
    // The replay revoked the session: the new tokens stopped working too.
    let after = w
        .logic
        .validate_token(Request::new(lpb::ValidateTokenRequest {
            access_token: refreshed.access_token.clone(),
        }))
        .await
        .expect_err("session revoked after replay");
    assert_eq!(
        gochat_infra::AppError::from_status(&after).code.as_u16(),
        1002
    );
    // A fresh login, then logout: both tokens stop at once.
    let login = w
        .logic
        .login(Request::new(lpb::LoginRequest {
            username: "carol".into(),
            password: "password1".into(),
        }))
        .await
        .expect("login")
        .into_inner();
    w.logic
        .logout(Request::new(lpb::LogoutRequest {
            access_token: login.access_token.clone(),
        }))
        .await
        .expect("logout");
    assert!(
        w.logic
            .validate_token(Request::new(lpb::ValidateTokenRequest {
                access_token: login.access_token
            }))
            .await
            .is_err()
    );
    assert!(
        w.logic
            .refresh_token(Request::new(lpb::RefreshTokenRequest {
                refresh_token: login.refresh_token
            }))
            .await
            .is_err()
    );
}
