//! The five repo services over real gRPC: a tonic server on 127.0.0.1:0 (`Repo::serve`) and the
//! generated clients of `gochat_proto::repo`. Every test is written once and run on the matrix
//! sqlite+memory, mysql+redis, sqlite+redis and mysql+memory (see `common` for the servers the
//! tests need and the variables naming them).
//!
//! Cache outages are simulated with `common::Switch`, a cache wrapper whose calls all fail while
//! it is switched off (what a lost Redis looks like to the services).

mod common;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::{CacheKind, Server, StoreKind, assert_code, next_id, now_ms, save_request, tag};
use futures::StreamExt;
use gochat_infra::ErrorCode;
use gochat_infra::ids::single_conversation_id;
use gochat_proto::repo as pb;
use gochat_repo::cache::Cache;
use gochat_repo::store::Store;

/// Instantiates each test for each (store, cache) pair, as `<store>_<cache>::<name>`.
macro_rules! matrix {
    ($($name:ident),* $(,)?) => {
        matrix!(@mod sqlite_memory, Sqlite, Memory; $($name),*);
        matrix!(@mod mysql_redis, Mysql, Redis; $($name),*);
        matrix!(@mod sqlite_redis, Sqlite, Redis; $($name),*);
        matrix!(@mod mysql_memory, Mysql, Memory; $($name),*);
    };
    (@mod $module:ident, $store:ident, $cache:ident; $($name:ident),*) => {
        mod $module {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    common::with_server(StoreKind::$store, CacheKind::$cache, super::$name).await;
                }
            )*
        }
    };
}

matrix!(
    user_service_round_trip,
    verify_password,
    message_service_round_trip,
    duplicates_inside_a_batch_leave_no_hole,
    group_service_round_trip,
    concurrent_group_adds,
    conversation_service_round_trip,
    single_chat_peers,
    presence_round_trip,
    error_codes_survive,
    concurrent_writers_are_gap_free,
    same_client_msg_id_concurrently,
    cache_flush_never_reuses_a_stored_seq,
    cache_loss_falls_back_to_the_database,
    stale_counter_after_an_outage_recovers,
    block_reservation,
    from_stored_forgets_unstored_reservations,
    unread_counts,
    user_conversations_newest_first,
    many_users_presence_and_group_limit,
    latest_page_hot_cache,
);

/// `RedisCache::connect` checks the server, so a dead address fails at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_connect_refuses_a_dead_server() {
    let dead =
        gochat_repo::cache::redis::RedisCache::connect("redis://127.0.0.1:1", "gochat-dead:").await;
    assert!(dead.is_err(), "connected to a dead Redis: {dead:?}");
}

fn ids(v: &[i64]) -> Vec<String> {
    v.iter().map(i64::to_string).collect()
}

fn seqs(rows: &[pb::Message]) -> Vec<i64> {
    rows.iter().map(|m| m.seq_id).collect()
}

/// A group conversation id nobody else uses (messages may be stored without the group).
fn fresh_group_conv() -> String {
    format!("g_{}", next_id())
}

async fn user_service_round_trip(t: Server) {
    let name = format!("alice_{}", tag());
    let a = t.create_user(&name).await;
    assert_eq!(a.username, name);
    assert_eq!(a.nickname, name, "the nickname defaults to the username");
    assert!(a.created_at > 0);
    let mut users = t.users();
    for _ in 0..2 {
        // The second read comes from the cache.
        let got = users
            .get_user(pb::GetUserRequest {
                user_id: a.id.clone(),
            })
            .await
            .expect("GetUser")
            .into_inner()
            .user;
        assert_eq!(got.as_ref(), Some(&a));
    }
    let by_name = users
        .get_user_by_username(pb::GetUserByUsernameRequest {
            username: name.clone(),
        })
        .await
        .expect("GetUserByUsername")
        .into_inner()
        .user;
    assert_eq!(by_name.as_ref(), Some(&a));

    let b = users
        .create_user(pb::CreateUserRequest {
            username: format!("bob_{}", tag()),
            password: "secret".to_owned(),
            nickname: "Bob 名字".to_owned(),
            avatar_url: "https://example.invalid/b.png".to_owned(),
        })
        .await
        .expect("CreateUser bob")
        .into_inner()
        .user
        .expect("bob");
    assert_eq!(b.nickname, "Bob 名字");
    assert_eq!(b.avatar_url, "https://example.invalid/b.png");

    let many = users
        .get_users(pb::GetUsersRequest {
            user_ids: vec![
                b.id.clone(),
                a.id.clone(),
                "999999".to_owned(),
                a.id.clone(),
            ],
        })
        .await
        .expect("GetUsers")
        .into_inner()
        .users;
    assert_eq!(
        many,
        vec![b.clone(), a.clone()],
        "request order, unknown left out"
    );

    let updated = users
        .update_user(pb::UpdateUserRequest {
            user_id: a.id.clone(),
            nickname: Some("Alice A.".to_owned()),
            avatar_url: None,
            password: None,
        })
        .await
        .expect("UpdateUser")
        .into_inner()
        .user
        .expect("updated user");
    assert_eq!(updated.nickname, "Alice A.");
    assert_eq!(updated.username, a.username);
    assert!(updated.updated_at >= a.updated_at);
    let got = users
        .get_user(pb::GetUserRequest {
            user_id: a.id.clone(),
        })
        .await
        .expect("GetUser after update")
        .into_inner()
        .user
        .expect("user");
    assert_eq!(got, updated, "the cached entry was dropped");
    let many = users
        .get_users(pb::GetUsersRequest {
            user_ids: vec![a.id.clone()],
        })
        .await
        .expect("GetUsers after update")
        .into_inner()
        .users;
    assert_eq!(many, vec![updated]);

    // Errors.
    assert_code(
        users
            .create_user(pb::CreateUserRequest {
                username: name.clone(),
                password: "x".to_owned(),
                ..Default::default()
            })
            .await,
        ErrorCode::UserExists,
    );
    assert_code(
        users
            .get_user(pb::GetUserRequest {
                user_id: "424242".to_owned(),
            })
            .await,
        ErrorCode::UserNotFound,
    );
    for bad in ["", "abc", "0", "-5", "12x"] {
        assert_code(
            users
                .get_user(pb::GetUserRequest {
                    user_id: bad.to_owned(),
                })
                .await,
            ErrorCode::InvalidParameter,
        );
    }
    assert_code(
        users
            .get_user_by_username(pb::GetUserByUsernameRequest {
                username: "nobody_here".to_owned(),
            })
            .await,
        ErrorCode::UserNotFound,
    );
    assert_code(
        users
            .update_user(pb::UpdateUserRequest {
                user_id: "424242".to_owned(),
                nickname: Some("x".to_owned()),
                ..Default::default()
            })
            .await,
        ErrorCode::UserNotFound,
    );
    assert_code(
        users
            .create_user(pb::CreateUserRequest {
                username: "ab".to_owned(),
                password: "x".to_owned(),
                ..Default::default()
            })
            .await,
        ErrorCode::InvalidParameter,
    );
    assert_code(
        users
            .create_user(pb::CreateUserRequest {
                username: format!("nopw_{}", tag()),
                password: String::new(),
                ..Default::default()
            })
            .await,
        ErrorCode::InvalidParameter,
    );
}

async fn verify_password(t: Server) {
    let name = format!("carol_{}", tag());
    let c = t.create_user(&name).await;
    let mut users = t.users();
    let verify = |username: String, password: &str| {
        let mut users = t.users();
        let password = password.to_owned();
        async move {
            users
                .verify_password(pb::VerifyPasswordRequest { username, password })
                .await
                .expect("VerifyPassword")
                .into_inner()
        }
    };
    let ok = verify(name.clone(), &format!("pw-{name}")).await;
    assert!(ok.valid);
    assert_eq!(ok.user.as_ref(), Some(&c));
    let wrong = verify(name.clone(), "not-it").await;
    assert!(!wrong.valid);
    assert_eq!(wrong.user, None);
    let unknown = verify(format!("ghost_{}", tag()), "whatever").await;
    assert!(!unknown.valid);
    assert_eq!(unknown.user, None);

    users
        .update_user(pb::UpdateUserRequest {
            user_id: c.id.clone(),
            password: Some("new password ✓".to_owned()),
            ..Default::default()
        })
        .await
        .expect("UpdateUser password");
    assert!(!verify(name.clone(), &format!("pw-{name}")).await.valid);
    assert!(verify(name.clone(), "new password ✓").await.valid);
}

/// A batch whose duplicates sit between new messages: the new ones take the lowest seqs, so
/// the unused seqs are the top ones, which the next batch uses without a hole or reordering.
async fn duplicates_inside_a_batch_leave_no_hole(t: Server) {
    let (alice, bob) = (11, 21);
    let conv = single_conversation_id(alice, bob).expect("two users");
    let mut m = t.messages();
    assert_eq!(t.reserve(&conv, 1).await, (1, 1));
    let first = save_request(&conv, alice, 1, "a1", 0);
    m.save_message(first.clone()).await.expect("first message");

    let (low, high) = t.reserve(&conv, 5).await;
    assert_eq!((low, high), (2, 6));
    let two = save_request(&conv, bob, 2, "b2", 0);
    let retry = save_request(&conv, alice, 3, "a1", 0);
    let three = save_request(&conv, alice, 4, "a3", 0);
    let again = save_request(&conv, bob, 5, "b2", 0);
    let four = save_request(&conv, bob, 6, "b4", 0);
    let results = m
        .save_messages(pb::SaveMessagesRequest {
            messages: vec![two.clone(), retry, three.clone(), again, four.clone()],
            mark_read_by_sender: true,
        })
        .await
        .expect("SaveMessages")
        .into_inner()
        .results;
    let got: Vec<(bool, i64, String)> = results
        .iter()
        .map(|r| {
            let msg = r.message.clone().expect("a message");
            (r.duplicate, msg.seq_id, msg.id)
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (false, 2, two.message_id.clone()),
            (true, 1, first.message_id.clone()),
            (false, 3, three.message_id.clone()),
            (true, 2, two.message_id.clone()),
            (false, 4, four.message_id.clone()),
        ],
        "new messages take 2, 3, 4 in batch order; duplicates answer with the original"
    );
    assert_eq!(seqs(&t.history(&conv).await), vec![1, 2, 3, 4]);

    // 5 and 6 came back unused: the next batch stores them without a conflict.
    let five = save_request(&conv, alice, 5, "a5", 0);
    let six = save_request(&conv, alice, 6, "a6", 0);
    let next = m
        .save_messages(pb::SaveMessagesRequest {
            messages: vec![five, six],
            mark_read_by_sender: false,
        })
        .await
        .expect("the unused seqs")
        .into_inner()
        .results;
    assert!(next.iter().all(|r| !r.duplicate));
    assert_eq!(seqs(&t.history(&conv).await), vec![1, 2, 3, 4, 5, 6]);
    let conversation = t
        .conversations()
        .get_conversation(pb::GetConversationRequest {
            conversation_id: conv.clone(),
            user_id: alice.to_string(),
        })
        .await
        .expect("GetConversation")
        .into_inner()
        .conversation
        .expect("the conversation");
    assert_eq!(conversation.last_seq, 6);
    assert_eq!(
        conversation.last_read_seq, 3,
        "alice's read pointer moved to her newest new message, at its final seq"
    );
}

async fn message_service_round_trip(t: Server) {
    let (alice, bob) = (10, 20);
    let conv = single_conversation_id(alice, bob).expect("two users");
    let mut m = t.messages();

    let (first, last) = t.reserve(&conv, 1).await;
    assert_eq!((first, last), (1, 1));
    let req = save_request(&conv, alice, 1, "m1", 0);
    let saved = m
        .save_message(req.clone())
        .await
        .expect("SaveMessage")
        .into_inner();
    assert!(!saved.duplicate);
    let one = saved.message.expect("the stored message");
    assert_eq!(one.id, req.message_id);
    assert_eq!(one.conversation_id, conv);
    assert_eq!(one.sender_id, alice.to_string());
    assert_eq!((one.message_type, one.seq_id), (1, 1));
    assert_eq!(one.content, req.content);
    assert_eq!(one.client_msg_id, "m1");
    assert!(one.created_at > 0, "the server stamps a creation time");

    // A batch: two new messages and a duplicate of the first by client_msg_id.
    let (first, last) = t.reserve(&conv, 3).await;
    assert_eq!((first, last), (2, 4));
    let mut two = save_request(&conv, bob, 2, "", 1_700_000_000_002);
    two.message_type = 2;
    two.content = "image://x".to_owned();
    let three = save_request(&conv, alice, 3, "m3", 1_700_000_000_003);
    let dup = save_request(&conv, alice, 4, "m1", 0);
    let results = m
        .save_messages(pb::SaveMessagesRequest {
            messages: vec![two.clone(), three.clone(), dup],
            mark_read_by_sender: false,
        })
        .await
        .expect("SaveMessages")
        .into_inner()
        .results;
    assert_eq!(results.len(), 3);
    assert!(!results[0].duplicate && !results[1].duplicate);
    assert!(results[2].duplicate);
    assert_eq!(
        results[2].message.as_ref(),
        Some(&one),
        "the original comes back"
    );
    let stored_two = results[0].message.clone().expect("two");
    assert_eq!(stored_two.created_at, 1_700_000_000_002);
    assert_eq!(stored_two.client_msg_id, "");
    assert_eq!(stored_two.message_type, 2);

    let got = m
        .get_message(pb::GetMessageRequest {
            message_id: one.id.clone(),
        })
        .await
        .expect("GetMessage")
        .into_inner()
        .message;
    assert_eq!(got.as_ref(), Some(&one));
    assert_code(
        m.get_message(pb::GetMessageRequest {
            message_id: "77777".to_owned(),
        })
        .await,
        ErrorCode::MessageNotFound,
    );
    assert_code(
        m.get_message(pb::GetMessageRequest {
            message_id: "x".to_owned(),
        })
        .await,
        ErrorCode::InvalidParameter,
    );

    let history = t.history(&conv).await;
    assert_eq!(seqs(&history), vec![1, 2, 3]);
    assert_eq!(history[0], one);
    assert_eq!(history[1], stored_two);
    let back = m
        .get_conversation_messages(pb::GetConversationMessagesRequest {
            conversation_id: conv.clone(),
            direction: pb::Direction::Backward as i32,
            before_seq: 3,
            limit: 1,
            ..Default::default()
        })
        .await
        .expect("backward page")
        .into_inner();
    assert_eq!(seqs(&back.messages), vec![2]);
    assert!(back.has_more);
    let fwd = m
        .get_conversation_messages(pb::GetConversationMessagesRequest {
            conversation_id: conv.clone(),
            direction: pb::Direction::Forward as i32,
            after_seq: 1,
            limit: 1,
            ..Default::default()
        })
        .await
        .expect("forward page")
        .into_inner();
    assert_eq!(seqs(&fwd.messages), vec![2]);
    assert!(fwd.has_more);

    // Idempotency lookups, from the cache and (after a flush) from the database.
    for flush in [false, true] {
        if flush {
            t.flush_cache().await;
        }
        let check = m
            .check_message_idempotency(pb::CheckMessageIdempotencyRequest {
                sender_id: alice.to_string(),
                client_msg_id: "m1".to_owned(),
            })
            .await
            .expect("CheckMessageIdempotency")
            .into_inner();
        assert!(check.exists);
        assert_eq!(check.message_id, one.id);
        assert_eq!(check.seq_id, 1);
        assert_eq!(check.conversation_id, conv);
    }
    let none = m
        .check_message_idempotency(pb::CheckMessageIdempotencyRequest {
            sender_id: bob.to_string(),
            client_msg_id: "m1".to_owned(),
        })
        .await
        .expect("CheckMessageIdempotency other sender")
        .into_inner();
    assert!(!none.exists);
    assert_eq!(none.message_id, "");

    // Errors.
    assert_code(t.save(&conv, bob, 1, "", 0).await, ErrorCode::SeqConflict);
    let mut bad_type = save_request(&conv, bob, 9, "", 0);
    bad_type.message_type = 9;
    assert_code(m.save_message(bad_type).await, ErrorCode::InvalidMessage);
    assert_code(
        t.save(&conv, bob, 0, "", 0).await,
        ErrorCode::InvalidParameter,
    );
    assert_code(
        t.save("s_2_1", bob, 5, "", 0).await,
        ErrorCode::InvalidParameter,
    );
    assert_code(
        m.generate_seq_id(pb::GenerateSeqIdRequest {
            conversation_id: "nope".to_owned(),
            count: 1,
            from_stored: false,
        })
        .await,
        ErrorCode::InvalidParameter,
    );
    assert_code(
        m.get_conversation_messages(pb::GetConversationMessagesRequest {
            conversation_id: conv.clone(),
            limit: 101,
            ..Default::default()
        })
        .await,
        ErrorCode::InvalidParameter,
    );
    assert_code(
        m.check_message_idempotency(pb::CheckMessageIdempotencyRequest {
            sender_id: alice.to_string(),
            client_msg_id: String::new(),
        })
        .await,
        ErrorCode::InvalidParameter,
    );
    // Nothing above was stored.
    assert_eq!(seqs(&t.history(&conv).await), vec![1, 2, 3]);
}

async fn group_service_round_trip(t: Server) {
    let u = t.seed_users(6).await;
    let mut g = t.groups();
    let group = g
        .create_group(pb::CreateGroupRequest {
            name: "  Team ✓  ".to_owned(),
            owner_id: u[0].to_string(),
            member_ids: ids(&[u[1], u[2], u[0], u[1]]),
            avatar_url: "https://example.invalid/g.png".to_owned(),
        })
        .await
        .expect("CreateGroup")
        .into_inner()
        .group
        .expect("group");
    assert_eq!(group.name, "Team ✓");
    assert_eq!(group.owner_id, u[0].to_string());
    assert_eq!(group.member_count, 3, "owner and two members, deduplicated");
    assert_eq!(group.conversation_id, format!("g_{}", group.id));
    let got = g
        .get_group(pb::GetGroupRequest {
            group_id: group.id.clone(),
        })
        .await
        .expect("GetGroup")
        .into_inner()
        .group;
    assert_eq!(got.as_ref(), Some(&group));

    let is_member = |user: i64| {
        let mut g = t.groups();
        let group_id = group.id.clone();
        async move {
            g.is_group_member(pb::IsGroupMemberRequest {
                group_id,
                user_id: user.to_string(),
            })
            .await
            .expect("IsGroupMember")
            .into_inner()
            .is_member
        }
    };
    assert!(is_member(u[1]).await);
    assert!(!is_member(u[3]).await, "the member set is now cached");

    let add = g
        .add_group_member(pb::AddGroupMemberRequest {
            group_id: group.id.clone(),
            user_ids: ids(&[u[2], u[3], u[4]]),
            role: pb::GroupRole::Unspecified as i32,
        })
        .await
        .expect("AddGroupMember")
        .into_inner();
    assert_eq!(
        add.added, 2,
        "an existing member is not an error and not counted"
    );
    assert_eq!(add.group.as_ref().map(|g| g.member_count), Some(5));
    assert!(is_member(u[3]).await, "the cached member set was dropped");
    let add = g
        .add_group_member(pb::AddGroupMemberRequest {
            group_id: group.id.clone(),
            user_ids: ids(&[u[5]]),
            role: pb::GroupRole::Admin as i32,
        })
        .await
        .expect("AddGroupMember admin")
        .into_inner();
    assert_eq!(add.added, 1);

    let page = g
        .get_group_members(pb::GetGroupMembersRequest {
            group_id: group.id.clone(),
            offset: 0,
            limit: 2,
        })
        .await
        .expect("GetGroupMembers")
        .into_inner();
    assert_eq!(page.total, 6);
    assert!(page.has_more);
    assert_eq!(
        page.members
            .iter()
            .map(|m| (m.user_id.clone(), m.role))
            .collect::<Vec<_>>(),
        vec![
            (u[0].to_string(), pb::GroupRole::Owner as i32),
            (u[1].to_string(), pb::GroupRole::Member as i32)
        ]
    );
    let page = g
        .get_group_members(pb::GetGroupMembersRequest {
            group_id: group.id.clone(),
            offset: 4,
            limit: 2,
        })
        .await
        .expect("GetGroupMembers last page")
        .into_inner();
    assert!(!page.has_more);
    assert_eq!(
        page.members
            .iter()
            .map(|m| (m.user_id.clone(), m.role))
            .collect::<Vec<_>>(),
        vec![
            (u[4].to_string(), pb::GroupRole::Member as i32),
            (u[5].to_string(), pb::GroupRole::Admin as i32)
        ]
    );

    let removed = g
        .remove_group_member(pb::RemoveGroupMemberRequest {
            group_id: group.id.clone(),
            user_id: u[1].to_string(),
        })
        .await
        .expect("RemoveGroupMember")
        .into_inner();
    assert!(removed.removed);
    assert_eq!(removed.group.as_ref().map(|g| g.member_count), Some(5));
    assert!(!is_member(u[1]).await, "the cached member set was dropped");
    let again = g
        .remove_group_member(pb::RemoveGroupMemberRequest {
            group_id: group.id.clone(),
            user_id: u[1].to_string(),
        })
        .await
        .expect("RemoveGroupMember again")
        .into_inner();
    assert!(!again.removed);
    assert_eq!(again.group.as_ref().map(|g| g.member_count), Some(5));
    let total = g
        .get_group_members(pb::GetGroupMembersRequest {
            group_id: group.id.clone(),
            ..Default::default()
        })
        .await
        .expect("GetGroupMembers all")
        .into_inner();
    assert_eq!(total.total, 5);
    assert_eq!(total.members.len(), 5);

    // Errors.
    let unknown = next_id().to_string();
    assert_code(
        g.get_group(pb::GetGroupRequest {
            group_id: unknown.clone(),
        })
        .await,
        ErrorCode::GroupNotFound,
    );
    assert_code(
        g.add_group_member(pb::AddGroupMemberRequest {
            group_id: unknown.clone(),
            user_ids: ids(&[u[1]]),
            role: 0,
        })
        .await,
        ErrorCode::GroupNotFound,
    );
    assert_code(
        g.remove_group_member(pb::RemoveGroupMemberRequest {
            group_id: unknown.clone(),
            user_id: u[1].to_string(),
        })
        .await,
        ErrorCode::GroupNotFound,
    );
    assert_code(
        g.get_group_members(pb::GetGroupMembersRequest {
            group_id: unknown.clone(),
            ..Default::default()
        })
        .await,
        ErrorCode::GroupNotFound,
    );
    assert_code(
        g.is_group_member(pb::IsGroupMemberRequest {
            group_id: unknown.clone(),
            user_id: u[1].to_string(),
        })
        .await,
        ErrorCode::GroupNotFound,
    );
    assert_code(
        g.add_group_member(pb::AddGroupMemberRequest {
            group_id: group.id.clone(),
            user_ids: ids(&[424_242]),
            role: 0,
        })
        .await,
        ErrorCode::UserNotFound,
    );
    assert_code(
        g.add_group_member(pb::AddGroupMemberRequest {
            group_id: group.id.clone(),
            user_ids: ids(&[u[1]]),
            role: pb::GroupRole::Owner as i32,
        })
        .await,
        ErrorCode::InvalidParameter,
    );
    assert_code(
        g.create_group(pb::CreateGroupRequest {
            name: "x".to_owned(),
            owner_id: u[0].to_string(),
            member_ids: ids(&[424_242]),
            avatar_url: String::new(),
        })
        .await,
        ErrorCode::UserNotFound,
    );
    assert_code(
        g.create_group(pb::CreateGroupRequest {
            name: "   ".to_owned(),
            owner_id: u[0].to_string(),
            ..Default::default()
        })
        .await,
        ErrorCode::InvalidParameter,
    );
    assert_code(
        g.get_group(pb::GetGroupRequest {
            group_id: "g_1".to_owned(),
        })
        .await,
        ErrorCode::InvalidParameter,
    );
}

async fn concurrent_group_adds(t: Server) {
    let u = t.seed_users(40).await;
    let group = t
        .groups()
        .create_group(pb::CreateGroupRequest {
            name: "crowd".to_owned(),
            owner_id: u[0].to_string(),
            ..Default::default()
        })
        .await
        .expect("CreateGroup")
        .into_inner()
        .group
        .expect("group");
    // 8 concurrent adds of overlapping sets: call i adds u[1+3i ..= 1+3i+9].
    let sets: Vec<Vec<i64>> = (0..8)
        .map(|i| u[1 + 3 * i..1 + 3 * i + 10].to_vec())
        .collect();
    let union: HashSet<i64> = sets.iter().flatten().copied().collect();
    let tasks: Vec<_> = sets
        .into_iter()
        .map(|set| {
            let mut g = t.groups();
            let group_id = group.id.clone();
            tokio::spawn(async move {
                g.add_group_member(pb::AddGroupMemberRequest {
                    group_id,
                    user_ids: ids(&set),
                    role: 0,
                })
                .await
                .expect("concurrent AddGroupMember")
                .into_inner()
                .added
            })
        })
        .collect();
    let mut added = 0;
    for task in tasks {
        added += task.await.expect("add task");
    }
    assert_eq!(usize::try_from(added).expect("non-negative"), union.len());
    let got = t
        .groups()
        .get_group(pb::GetGroupRequest {
            group_id: group.id.clone(),
        })
        .await
        .expect("GetGroup")
        .into_inner()
        .group
        .expect("group");
    let members = t
        .groups()
        .get_group_members(pb::GetGroupMembersRequest {
            group_id: group.id.clone(),
            offset: 0,
            limit: 1000,
        })
        .await
        .expect("GetGroupMembers")
        .into_inner();
    assert_eq!(got.member_count, members.total);
    assert_eq!(
        usize::try_from(members.total).expect("non-negative"),
        union.len() + 1
    );
    assert_eq!(members.members.len(), union.len() + 1);
}

/// GetSingleChatPeers names the other user of every single chat, and nothing of groups.
async fn single_chat_peers(t: Server) {
    let u = t.seed_users(5).await;
    let mut conv = t.conversations();
    for peer in [u[1], u[2]] {
        conv.get_or_create_single_conversation(pb::GetOrCreateSingleConversationRequest {
            user_id: u[0].to_string(),
            peer_user_id: peer.to_string(),
        })
        .await
        .expect("GetOrCreateSingleConversation");
    }
    // u3 opened the chat with u0 from its side.
    conv.get_or_create_single_conversation(pb::GetOrCreateSingleConversationRequest {
        user_id: u[3].to_string(),
        peer_user_id: u[0].to_string(),
    })
    .await
    .expect("GetOrCreateSingleConversation");
    t.groups()
        .create_group(pb::CreateGroupRequest {
            name: "not a peer".to_owned(),
            owner_id: u[0].to_string(),
            member_ids: ids(&[u[4]]),
            avatar_url: String::new(),
        })
        .await
        .expect("CreateGroup");
    let peers = |user: i64| {
        let mut conv = t.conversations();
        async move {
            let mut v = conv
                .get_single_chat_peers(pb::GetSingleChatPeersRequest {
                    user_id: user.to_string(),
                })
                .await
                .expect("GetSingleChatPeers")
                .into_inner()
                .user_ids;
            v.sort();
            v
        }
    };
    let mut want = ids(&[u[1], u[2], u[3]]);
    want.sort();
    assert_eq!(peers(u[0]).await, want);
    assert_eq!(peers(u[3]).await, ids(&[u[0]]));
    assert!(peers(u[4]).await.is_empty(), "a group member is no peer");
    assert_code(
        conv.get_single_chat_peers(pb::GetSingleChatPeersRequest {
            user_id: "nobody".to_owned(),
        })
        .await,
        ErrorCode::InvalidParameter,
    );
}

async fn conversation_service_round_trip(t: Server) {
    let u = t.seed_users(3).await;
    let (a, b, c) = (u[0], u[1], u[2]);
    let mut conv = t.conversations();
    let single = single_conversation_id(a, b).expect("two users");

    let made = conv
        .get_or_create_single_conversation(pb::GetOrCreateSingleConversationRequest {
            user_id: a.to_string(),
            peer_user_id: b.to_string(),
        })
        .await
        .expect("GetOrCreateSingleConversation")
        .into_inner();
    assert!(made.created);
    let view = made.conversation.expect("the conversation");
    assert_eq!(view.id, single);
    assert_eq!(view.r#type, pb::ConversationType::Single as i32);
    assert_eq!(view.peer_user_id, b.to_string());
    assert_eq!(view.name, format!("Seed {b}"), "named after the peer");
    assert_eq!(
        (view.member_count, view.last_seq, view.unread_count),
        (2, 0, 0)
    );
    assert_eq!(view.last_message, None);

    let again = conv
        .get_or_create_single_conversation(pb::GetOrCreateSingleConversationRequest {
            user_id: b.to_string(),
            peer_user_id: a.to_string(),
        })
        .await
        .expect("GetOrCreateSingleConversation from the other side")
        .into_inner();
    assert!(!again.created);
    let other_view = again.conversation.expect("conversation");
    assert_eq!(other_view.id, single);
    assert_eq!(other_view.peer_user_id, a.to_string());

    let group = t
        .groups()
        .create_group(pb::CreateGroupRequest {
            name: "pair".to_owned(),
            owner_id: a.to_string(),
            member_ids: ids(&[b]),
            avatar_url: String::new(),
        })
        .await
        .expect("CreateGroup")
        .into_inner()
        .group
        .expect("group");
    let group_conv = group.conversation_id.clone();

    let membership = |user: i64, id: &str| {
        let mut conv = t.conversations();
        let id = id.to_owned();
        async move {
            conv.check_membership(pb::CheckMembershipRequest {
                user_id: user.to_string(),
                conversation_id: id,
            })
            .await
            .expect("CheckMembership")
            .into_inner()
        }
    };
    let m = membership(a, &single).await;
    assert!(m.is_member);
    assert_eq!(
        (m.r#type, m.member_count),
        (pb::ConversationType::Single as i32, 2)
    );
    assert!(!membership(c, &single).await.is_member);
    let m = membership(b, &group_conv).await;
    assert!(m.is_member);
    assert_eq!(
        (m.r#type, m.member_count),
        (pb::ConversationType::Group as i32, 2)
    );
    assert!(!membership(c, &group_conv).await.is_member);
    let m = membership(c, "world").await;
    assert!(m.is_member);
    assert_eq!(m.r#type, pb::ConversationType::World as i32);
    // A single chat nobody created yet.
    let ac = single_conversation_id(a, c).expect("two users");
    assert!(!membership(a, &ac).await.is_member);

    let members = |id: &str, offset: i32, limit: i32| {
        let mut conv = t.conversations();
        let id = id.to_owned();
        async move {
            conv.get_conversation_members(pb::GetConversationMembersRequest {
                conversation_id: id,
                offset,
                limit,
            })
            .await
            .expect("GetConversationMembers")
            .into_inner()
        }
    };
    let (lo, hi) = (a.min(b), a.max(b));
    assert_eq!(members(&single, 0, 0).await.user_ids, ids(&[lo, hi]));
    let page = members(&group_conv, 0, 1).await;
    assert_eq!((page.user_ids, page.has_more), (ids(&[a]), true));
    let page = members(&group_conv, 1, 1).await;
    assert_eq!((page.user_ids, page.has_more), (ids(&[b]), false));
    // A first page holding the whole group (from the cached member set, ascending), and it
    // follows the membership: a new member is in the next answer, a removed one is not.
    let (lo, hi) = (a.min(b), a.max(b));
    assert_eq!(members(&group_conv, 0, 0).await.user_ids, ids(&[lo, hi]));
    t.groups()
        .add_group_member(pb::AddGroupMemberRequest {
            group_id: group.id.clone(),
            user_ids: ids(&[c]),
            ..Default::default()
        })
        .await
        .expect("add c");
    let mut want = vec![a, b, c];
    want.sort_unstable();
    let page = members(&group_conv, 0, 0).await;
    assert_eq!((page.user_ids, page.has_more), (ids(&want), false));
    t.groups()
        .remove_group_member(pb::RemoveGroupMemberRequest {
            group_id: group.id.clone(),
            user_id: c.to_string(),
        })
        .await
        .expect("remove c");
    assert_eq!(members(&group_conv, 0, 0).await.user_ids, ids(&[lo, hi]));

    // Messages, unread counts, read pointers.
    for k in 0..3 {
        t.send(&single, b, &format!("hi {k}")).await;
    }
    let unread = conv
        .get_unread_count(pb::GetUnreadCountRequest {
            user_id: a.to_string(),
            conversation_id: single.clone(),
        })
        .await
        .expect("GetUnreadCount")
        .into_inner();
    assert_eq!(
        (unread.unread_count, unread.last_read_seq, unread.last_seq),
        (3, 0, 3)
    );
    let read = conv
        .update_read_pointer(pb::UpdateReadPointerRequest {
            user_id: a.to_string(),
            conversation_id: single.clone(),
            seq_id: 2,
        })
        .await
        .expect("UpdateReadPointer")
        .into_inner();
    assert_eq!((read.last_read_seq, read.unread_count), (2, 1));
    let view = conv
        .get_conversation(pb::GetConversationRequest {
            user_id: a.to_string(),
            conversation_id: single.clone(),
        })
        .await
        .expect("GetConversation")
        .into_inner()
        .conversation
        .expect("conversation");
    assert_eq!(
        (view.last_seq, view.last_read_seq, view.unread_count),
        (3, 2, 1)
    );
    assert_eq!(
        view.last_message.as_ref().map(|m| m.content.as_str()),
        Some("hi 2")
    );

    let list = conv
        .get_user_conversations(pb::GetUserConversationsRequest {
            user_id: a.to_string(),
            page: 1,
            page_size: 10,
        })
        .await
        .expect("GetUserConversations")
        .into_inner();
    assert_eq!(list.total, 3);
    assert!(!list.has_more);
    let listed: BTreeSet<&str> = list.conversations.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(
        listed,
        BTreeSet::from([single.as_str(), group_conv.as_str(), "world"])
    );
    assert_eq!(
        list.conversations[0].id, single,
        "the newest activity first"
    );

    // Errors.
    assert_code(
        conv.get_conversation(pb::GetConversationRequest {
            user_id: a.to_string(),
            conversation_id: ac.clone(),
        })
        .await,
        ErrorCode::NotFound,
    );
    assert_code(
        conv.get_unread_count(pb::GetUnreadCountRequest {
            user_id: a.to_string(),
            conversation_id: ac.clone(),
        })
        .await,
        ErrorCode::NotFound,
    );
    assert_code(
        conv.update_read_pointer(pb::UpdateReadPointerRequest {
            user_id: a.to_string(),
            conversation_id: ac.clone(),
            seq_id: 1,
        })
        .await,
        ErrorCode::NotFound,
    );
    assert_code(
        conv.update_read_pointer(pb::UpdateReadPointerRequest {
            user_id: a.to_string(),
            conversation_id: single.clone(),
            seq_id: -1,
        })
        .await,
        ErrorCode::InvalidParameter,
    );
    assert_code(
        conv.get_or_create_single_conversation(pb::GetOrCreateSingleConversationRequest {
            user_id: a.to_string(),
            peer_user_id: a.to_string(),
        })
        .await,
        ErrorCode::InvalidParameter,
    );
    assert_code(
        conv.get_or_create_single_conversation(pb::GetOrCreateSingleConversationRequest {
            user_id: a.to_string(),
            peer_user_id: "424242".to_owned(),
        })
        .await,
        ErrorCode::UserNotFound,
    );
    assert_code(
        conv.check_membership(pb::CheckMembershipRequest {
            user_id: a.to_string(),
            conversation_id: format!("g_{}", next_id()),
        })
        .await,
        ErrorCode::GroupNotFound,
    );
    assert_code(
        conv.check_membership(pb::CheckMembershipRequest {
            user_id: a.to_string(),
            conversation_id: "g_x".to_owned(),
        })
        .await,
        ErrorCode::InvalidParameter,
    );
}

/// The sorted gateway ids of a status.
fn gateways(s: &pb::OnlineStatus) -> Vec<String> {
    let mut g = s.gateway_ids.clone();
    g.sort();
    g
}

async fn presence_round_trip(t: Server) {
    let mut p = t.presence();
    let (u, v) = (next_id(), next_id());
    let online = |user: i64, gateway: &str, ttl: i64| {
        let mut p = t.presence();
        let gateway = gateway.to_owned();
        async move {
            p.set_user_online(pb::SetUserOnlineRequest {
                user_id: user.to_string(),
                gateway_id: gateway,
                ttl_seconds: ttl,
            })
            .await
            .expect("SetUserOnline")
            .into_inner()
            .first_online
        }
    };
    let status = |user: i64| {
        let mut p = t.presence();
        async move {
            p.get_user_online_status(pb::GetUserOnlineStatusRequest {
                user_id: user.to_string(),
            })
            .await
            .expect("GetUserOnlineStatus")
            .into_inner()
            .status
            .expect("a status")
        }
    };
    let offline = |user: i64, gateway: &str| {
        let mut p = t.presence();
        let gateway = gateway.to_owned();
        async move {
            p.set_user_offline(pb::SetUserOfflineRequest {
                user_id: user.to_string(),
                gateway_id: gateway,
            })
            .await
            .expect("SetUserOffline")
            .into_inner()
            .now_offline
        }
    };

    let s = status(u).await;
    assert!(!s.is_online);
    assert_eq!((s.gateway_id.as_str(), s.last_seen), ("", 0));
    assert!(online(u, "gw-1", 0).await, "first gateway: first online");
    assert!(
        !online(u, "gw-2", 0).await,
        "second gateway: already online"
    );
    assert!(!online(u, "gw-1", 0).await, "refresh");
    let s = status(u).await;
    assert!(s.is_online);
    assert_eq!(s.user_id, u.to_string());
    assert_eq!(gateways(&s), vec!["gw-1", "gw-2"]);
    assert!(s.gateway_ids.contains(&s.gateway_id));
    assert!(s.last_seen > 0);

    assert!(!offline(u, "gw-1").await, "still on gw-2");
    assert_eq!(gateways(&status(u).await), vec!["gw-2"]);
    assert!(offline(u, "gw-2").await, "no gateway left");
    assert!(!status(u).await.is_online);
    assert!(offline(u, "gw-9").await, "offline stays offline");

    assert!(online(u, "gw-1", 0).await);
    assert!(!online(u, "gw-2", 0).await);
    assert!(offline(u, "").await, "every gateway at once");
    assert!(!status(u).await.is_online);

    // Entries lapse unless refreshed.
    assert!(online(v, "gw-short", 1).await);
    assert!(!online(v, "gw-long", 600).await);
    assert_eq!(gateways(&status(v).await), vec!["gw-long", "gw-short"]);
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(gateways(&status(v).await), vec!["gw-long"]);
    let batch = p
        .get_users_online_status(pb::GetUsersOnlineStatusRequest {
            user_ids: ids(&[v, u, v]),
        })
        .await
        .expect("GetUsersOnlineStatus")
        .into_inner()
        .statuses;
    assert_eq!(
        batch
            .iter()
            .map(|s| (s.user_id.clone(), s.is_online))
            .collect::<Vec<_>>(),
        vec![
            (v.to_string(), true),
            (u.to_string(), false),
            (v.to_string(), true)
        ],
        "one entry per requested id, in order"
    );

    assert_code(
        p.set_user_online(pb::SetUserOnlineRequest {
            user_id: u.to_string(),
            gateway_id: "gw".to_owned(),
            ttl_seconds: 7200,
        })
        .await,
        ErrorCode::InvalidParameter,
    );
    assert_code(
        p.set_user_online(pb::SetUserOnlineRequest {
            user_id: u.to_string(),
            gateway_id: String::new(),
            ttl_seconds: 0,
        })
        .await,
        ErrorCode::InvalidParameter,
    );
    assert_code(
        p.get_users_online_status(pb::GetUsersOnlineStatusRequest {
            user_ids: vec!["1".to_owned(), "x".to_owned()],
        })
        .await,
        ErrorCode::InvalidParameter,
    );
}

async fn error_codes_survive(t: Server) {
    // The numeric code travels in metadata; the gRPC code follows its class.
    let name = format!("erin_{}", tag());
    t.create_user(&name).await;
    let dup = t
        .users()
        .create_user(pb::CreateUserRequest {
            username: name,
            password: "pw".to_owned(),
            ..Default::default()
        })
        .await
        .expect_err("a taken username");
    assert_eq!(dup.code(), tonic::Code::AlreadyExists);
    assert_eq!(common::code_of(&dup), ErrorCode::UserExists);
    assert_eq!(
        dup.metadata()
            .get(gochat_infra::error::CODE_METADATA_KEY)
            .and_then(|v| v.to_str().ok()),
        Some("2001")
    );

    let missing = t
        .groups()
        .get_group(pb::GetGroupRequest {
            group_id: next_id().to_string(),
        })
        .await
        .expect_err("an unknown group");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    assert_eq!(common::code_of(&missing), ErrorCode::GroupNotFound);

    let bad = t
        .users()
        .get_user(pb::GetUserRequest {
            user_id: "not-a-number".to_owned(),
        })
        .await
        .expect_err("a bad id");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert_eq!(common::code_of(&bad), ErrorCode::InvalidParameter);

    let conv = fresh_group_conv();
    t.send(&conv, 1, "first").await;
    let conflict = t.save(&conv, 1, 1, "", 0).await.expect_err("a taken seq");
    assert_eq!(conflict.code(), tonic::Code::Aborted);
    assert_eq!(common::code_of(&conflict), ErrorCode::SeqConflict);

    let not_found = t
        .messages()
        .get_message(pb::GetMessageRequest {
            message_id: next_id().to_string(),
        })
        .await
        .expect_err("an unknown message");
    assert_eq!(common::code_of(&not_found), ErrorCode::MessageNotFound);
}

async fn concurrent_writers_are_gap_free(t: Server) {
    const WRITERS: i64 = 8;
    const EACH: i64 = 25;
    let conv = fresh_group_conv();
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let channel = t.connect().await;
        let conv = conv.clone();
        tasks.push(tokio::spawn(async move {
            let mut m = pb::message_service_client::MessageServiceClient::new(channel);
            let mut mine = Vec::new();
            for k in 0..EACH {
                let r = m
                    .generate_seq_id(pb::GenerateSeqIdRequest {
                        conversation_id: conv.clone(),
                        count: 1,
                        from_stored: false,
                    })
                    .await
                    .unwrap_or_else(|e| panic!("writer {w} GenerateSeqID: {e:?}"))
                    .into_inner();
                assert_eq!(r.seq_id, r.end_seq_id);
                let req = save_request(&conv, 100 + w, r.seq_id, &format!("w{w}-{k}"), 0);
                let saved = m
                    .save_message(req.clone())
                    .await
                    .unwrap_or_else(|e| panic!("writer {w} SaveMessage seq {}: {e:?}", r.seq_id))
                    .into_inner();
                assert!(!saved.duplicate);
                let msg = saved.message.expect("stored");
                assert_eq!((msg.id, msg.seq_id), (req.message_id, r.seq_id));
                mine.push(r.seq_id);
            }
            mine
        }));
    }
    let mut handed_out = Vec::new();
    for task in tasks {
        let mine = task.await.expect("writer task");
        assert!(
            mine.windows(2).all(|w| w[0] < w[1]),
            "each writer's seqs ascend"
        );
        handed_out.extend(mine);
    }
    handed_out.sort_unstable();
    let n = WRITERS * EACH;
    assert_eq!(
        handed_out,
        (1..=n).collect::<Vec<_>>(),
        "no gap, no duplicate"
    );

    let history = t.history(&conv).await;
    assert_eq!(seqs(&history), (1..=n).collect::<Vec<_>>());
    let distinct: HashSet<&str> = history.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(distinct.len(), history.len());
    for w in 0..WRITERS {
        let sent = history
            .iter()
            .filter(|m| m.sender_id == (100 + w).to_string())
            .count();
        assert_eq!(sent, usize::try_from(EACH).expect("fits"), "writer {w}");
    }
    let c = t
        .store()
        .get_conversation(&conv)
        .await
        .expect("get_conversation")
        .expect("conversation");
    assert_eq!(c.last_seq, n);
}

async fn same_client_msg_id_concurrently(t: Server) {
    const CALLERS: usize = 8;
    let conv = fresh_group_conv();
    let sender = 77;
    for round in 0..4 {
        let cmid = format!("same-{round}");
        let barrier = Arc::new(tokio::sync::Barrier::new(CALLERS));
        let mut tasks = Vec::new();
        for _ in 0..CALLERS {
            let channel = t.connect().await;
            let (conv, cmid, barrier) = (conv.clone(), cmid.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                let mut m = pb::message_service_client::MessageServiceClient::new(channel);
                barrier.wait().await;
                let check = m
                    .check_message_idempotency(pb::CheckMessageIdempotencyRequest {
                        sender_id: sender.to_string(),
                        client_msg_id: cmid.clone(),
                    })
                    .await
                    .expect("CheckMessageIdempotency")
                    .into_inner();
                if check.exists {
                    return (check.message_id, check.seq_id);
                }
                let r = m
                    .generate_seq_id(pb::GenerateSeqIdRequest {
                        conversation_id: conv.clone(),
                        count: 1,
                        from_stored: false,
                    })
                    .await
                    .expect("GenerateSeqID")
                    .into_inner();
                let saved = m
                    .save_message(save_request(&conv, sender, r.seq_id, &cmid, 0))
                    .await
                    .expect("SaveMessage of a possibly duplicate message")
                    .into_inner();
                let msg = saved.message.expect("a message");
                (msg.id, msg.seq_id)
            }));
        }
        let mut answers = Vec::new();
        for task in tasks {
            answers.push(task.await.expect("caller task"));
        }
        let first = answers[0].clone();
        assert!(
            answers.iter().all(|a| *a == first),
            "round {round}: every caller gets the same message: {answers:?}"
        );
        let stored: Vec<pb::Message> = t
            .history(&conv)
            .await
            .into_iter()
            .filter(|m| m.client_msg_id == cmid)
            .collect();
        assert_eq!(stored.len(), 1, "round {round}: stored once");
        assert_eq!((stored[0].id.clone(), stored[0].seq_id), first);
    }
}

/// `GenerateSeqID.from_stored`, what a conversation's new owner sends: seqs reserved by a
/// crashed owner and never stored are handed out again, so the conversation stays gap-free;
/// also while the cache is down (the durable counter is rewound too).
async fn from_stored_forgets_unstored_reservations(t: Server) {
    let conv = fresh_group_conv();
    for k in 0..3 {
        t.send(&conv, 1, &format!("m{k}")).await;
    }
    // A previous owner reserved 4..=8 and died before storing them.
    assert_eq!(t.reserve(&conv, 5).await, (4, 8));
    let resync = |count: i64| {
        let mut m = t.messages();
        let conv = conv.clone();
        async move {
            let r = m
                .generate_seq_id(pb::GenerateSeqIdRequest {
                    conversation_id: conv,
                    count,
                    from_stored: true,
                })
                .await
                .expect("GenerateSeqID from_stored")
                .into_inner();
            (r.seq_id, r.end_seq_id)
        }
    };
    assert_eq!(resync(2).await, (4, 5), "restarts after the stored 3");
    assert_eq!(
        resync(2).await,
        (4, 5),
        "idempotent while nothing is stored"
    );
    t.save(&conv, 1, 4, "", 0).await.expect("save 4");
    t.save(&conv, 1, 5, "", 0).await.expect("save 5");
    assert_eq!(t.reserve(&conv, 1).await, (6, 6), "then counts on normally");

    // With the cache down, reservations go to the durable counter, which rewinds the same way.
    t.cache().set_down(true);
    let (_, e) = t.reserve(&conv, 3).await;
    assert!(e > 6, "a durable reservation that is never stored: ..={e}");
    assert_eq!(resync(1).await, (6, 6));
    t.save(&conv, 1, 6, "", 0).await.expect("save 6");
    assert_eq!(
        t.reserve(&conv, 1).await,
        (7, 7),
        "the durable counter continues after the rewind, not after {e}"
    );
    t.save(&conv, 1, 7, "", 0).await.expect("save 7");
    t.cache().set_down(false);
    t.flush_cache().await;
    assert_eq!(resync(1).await, (8, 8));
    t.save(&conv, 1, 8, "", 0).await.expect("save 8");
    assert_eq!(
        seqs(&t.history(&conv).await),
        (1..=8).collect::<Vec<_>>(),
        "gap-free"
    );
}

async fn cache_flush_never_reuses_a_stored_seq(t: Server) {
    let conv = fresh_group_conv();
    for k in 0..10 {
        t.send(&conv, 1, &format!("before {k}")).await;
    }
    t.flush_cache().await;
    let (s, e) = t.reserve(&conv, 1).await;
    assert_eq!((s, e), (11, 11), "re-seeded from the largest stored seq");
    t.save(&conv, 1, 11, "", 0).await.expect("save 11");

    // A reserved block that is never stored, then a flush: the floor is what is stored.
    t.flush_cache().await;
    let (s, _) = t.reserve(&conv, 5).await;
    assert_eq!(s, 12);
    t.flush_cache().await;

    // Flushes between reservations, with and without messages in between.
    let mut max_stored = 11;
    for k in 0..30 {
        if k % 3 == 0 {
            t.flush_cache().await;
        }
        let (s, e) = t.reserve(&conv, 1).await;
        assert!(
            s > max_stored,
            "reservation {k}: seq {s} is already stored (max {max_stored})"
        );
        assert_eq!(s, e);
        t.save(&conv, 1, s, "", 0)
            .await
            .unwrap_or_else(|e| panic!("saving reserved seq {s}: {e:?}"));
        max_stored = s;
    }
    assert_eq!(
        seqs(&t.history(&conv).await),
        (1..=max_stored).collect::<Vec<_>>(),
        "every stored seq once, no gap"
    );
}

async fn cache_loss_falls_back_to_the_database(t: Server) {
    t.cache().set_down(true);
    // Users.
    let name = format!("dana_{}", tag());
    let d = t.create_user(&name).await;
    let mut users = t.users();
    for _ in 0..2 {
        let got = users
            .get_user(pb::GetUserRequest {
                user_id: d.id.clone(),
            })
            .await
            .expect("GetUser without a cache")
            .into_inner()
            .user;
        assert_eq!(got.as_ref(), Some(&d));
    }
    let updated = users
        .update_user(pb::UpdateUserRequest {
            user_id: d.id.clone(),
            nickname: Some("Dana".to_owned()),
            ..Default::default()
        })
        .await
        .expect("UpdateUser without a cache")
        .into_inner()
        .user
        .expect("user");
    let many = users
        .get_users(pb::GetUsersRequest {
            user_ids: vec![d.id.clone()],
        })
        .await
        .expect("GetUsers without a cache")
        .into_inner()
        .users;
    assert_eq!(many, vec![updated]);
    let ok = users
        .verify_password(pb::VerifyPasswordRequest {
            username: name.clone(),
            password: format!("pw-{name}"),
        })
        .await
        .expect("VerifyPassword without a cache")
        .into_inner();
    assert!(ok.valid);

    // Seqs come from the database, still gap-free and never reused.
    let conv = fresh_group_conv();
    for k in 0..6 {
        let m = t.send(&conv, 5, &format!("outage {k}")).await;
        assert_eq!(m.seq_id, k + 1);
    }
    let (s, e) = t.reserve(&conv, 100).await;
    assert_eq!((s, e), (7, 106), "a block from the database");
    let (s, _) = t.reserve(&conv, 1).await;
    assert_eq!(s, 107);
    t.save(&conv, 5, 107, "during-outage", 0)
        .await
        .expect("save");
    let check = t
        .messages()
        .check_message_idempotency(pb::CheckMessageIdempotencyRequest {
            sender_id: "5".to_owned(),
            client_msg_id: "during-outage".to_owned(),
        })
        .await
        .expect("CheckMessageIdempotency without a cache")
        .into_inner();
    assert!(check.exists);
    assert_eq!(check.seq_id, 107);
    let dup = t
        .save(&conv, 5, 108, "during-outage", 0)
        .await
        .expect("a duplicate without a cache");
    assert!(dup.duplicate);
    assert_eq!(dup.message.map(|m| m.seq_id), Some(107));
    let (latest, more) = t.latest(&conv, 3).await;
    assert_eq!(seqs(&latest), vec![107, 6, 5]);
    assert!(more);

    // Presence: writes are dropped without failing, everyone reads offline.
    let mut p = t.presence();
    let first = p
        .set_user_online(pb::SetUserOnlineRequest {
            user_id: d.id.clone(),
            gateway_id: "gw-1".to_owned(),
            ttl_seconds: 0,
        })
        .await
        .expect("SetUserOnline without a cache")
        .into_inner();
    assert!(!first.first_online);
    let s = p
        .get_user_online_status(pb::GetUserOnlineStatusRequest {
            user_id: d.id.clone(),
        })
        .await
        .expect("GetUserOnlineStatus without a cache")
        .into_inner()
        .status
        .expect("status");
    assert!(!s.is_online);
    let all = p
        .get_users_online_status(pb::GetUsersOnlineStatusRequest {
            user_ids: vec![d.id.clone(), "12345".to_owned()],
        })
        .await
        .expect("GetUsersOnlineStatus without a cache")
        .into_inner()
        .statuses;
    assert_eq!(all.len(), 2);
    assert!(all.iter().all(|s| !s.is_online));
    p.set_user_offline(pb::SetUserOfflineRequest {
        user_id: d.id.clone(),
        gateway_id: String::new(),
    })
    .await
    .expect("SetUserOffline without a cache");

    // Groups and conversations.
    let other = t.seed_users(1).await[0];
    let group = t
        .groups()
        .create_group(pb::CreateGroupRequest {
            name: "outage".to_owned(),
            owner_id: d.id.clone(),
            member_ids: ids(&[other]),
            avatar_url: String::new(),
        })
        .await
        .expect("CreateGroup without a cache")
        .into_inner()
        .group
        .expect("group");
    let member = t
        .groups()
        .is_group_member(pb::IsGroupMemberRequest {
            group_id: group.id.clone(),
            user_id: other.to_string(),
        })
        .await
        .expect("IsGroupMember without a cache")
        .into_inner();
    assert!(member.is_member);
    let statuses = t
        .groups()
        .get_members_online_status(pb::GetMembersOnlineStatusRequest {
            group_id: group.id.clone(),
            ..Default::default()
        })
        .await
        .expect("GetMembersOnlineStatus without a cache")
        .into_inner();
    assert_eq!(statuses.statuses.len(), 2);
    t.send(&group.conversation_id, other, "hello").await;
    let mut cs = t.conversations();
    let unread = cs
        .get_unread_count(pb::GetUnreadCountRequest {
            user_id: d.id.clone(),
            conversation_id: group.conversation_id.clone(),
        })
        .await
        .expect("GetUnreadCount without a cache")
        .into_inner();
    assert_eq!(unread.unread_count, 1);
    let read = cs
        .update_read_pointer(pb::UpdateReadPointerRequest {
            user_id: d.id.clone(),
            conversation_id: group.conversation_id.clone(),
            seq_id: 1,
        })
        .await
        .expect("UpdateReadPointer without a cache")
        .into_inner();
    assert_eq!(read.unread_count, 0);
    let list = cs
        .get_user_conversations(pb::GetUserConversationsRequest {
            user_id: d.id.clone(),
            page: 1,
            page_size: 10,
        })
        .await
        .expect("GetUserConversations without a cache")
        .into_inner();
    assert_eq!(list.total, 2, "the group and the world room");
    assert_eq!(list.conversations[0].id, group.conversation_id);

    // The cache comes back empty (a restarted Redis): seqs continue above everything stored or
    // reserved in the database.
    t.flush_cache().await;
    t.cache().set_down(false);
    let (s, _) = t.reserve(&group.conversation_id, 1).await;
    assert_eq!(s, 2);
    let (s, _) = t.reserve(&conv, 1).await;
    assert!(s > 107, "seq {s} after the cache came back");
}

async fn stale_counter_after_an_outage_recovers(t: Server) {
    // The counter is cached at 5; the cache becomes unreachable (keeping its data), seqs 6..=8
    // are reserved in the database and stored; then the cache is back with its stale counter.
    let conv = fresh_group_conv();
    for k in 0..5 {
        t.send(&conv, 1, &format!("before {k}")).await;
    }
    t.cache().set_down(true);
    for k in 0..3 {
        let m = t.send(&conv, 1, &format!("during {k}")).await;
        assert_eq!(m.seq_id, 6 + k);
    }
    t.cache().set_down(false);
    let max_stored = 8;
    // A stale offer is refused by the store (3003) and drops the counter; the next reservation
    // starts above everything stored.
    let (s, _) = t.reserve(&conv, 1).await;
    if s <= max_stored {
        assert_code(t.save(&conv, 1, s, "", 0).await, ErrorCode::SeqConflict);
        let (again, _) = t.reserve(&conv, 1).await;
        assert_eq!(again, max_stored + 1, "re-seeded after the conflict");
        t.save(&conv, 1, again, "", 0)
            .await
            .expect("save after re-seed");
    } else {
        assert_eq!(s, max_stored + 1);
        t.save(&conv, 1, s, "", 0).await.expect("save");
    }
    assert_eq!(
        seqs(&t.history(&conv).await),
        (1..=max_stored + 1).collect::<Vec<_>>()
    );
}

async fn block_reservation(t: Server) {
    let conv = fresh_group_conv();
    assert_eq!(t.reserve(&conv, 100).await, (1, 100));
    assert_eq!(t.reserve(&conv, 1).await, (101, 101));
    assert_eq!(t.reserve(&conv, 0).await, (102, 102), "count 0 means 1");

    // Concurrent blocks never overlap and leave no hole.
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let mut m = t.messages();
            let conv = conv.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                for _ in 0..5 {
                    let r = m
                        .generate_seq_id(pb::GenerateSeqIdRequest {
                            conversation_id: conv.clone(),
                            count: 100,
                            from_stored: false,
                        })
                        .await
                        .expect("GenerateSeqID block")
                        .into_inner();
                    assert_eq!(r.end_seq_id - r.seq_id, 99);
                    got.extend(r.seq_id..=r.end_seq_id);
                }
                got
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("reserve task"));
    }
    all.sort_unstable();
    assert_eq!(all, (103..=2102).collect::<Vec<_>>());

    // A block stored in one SaveMessages call.
    let conv2 = fresh_group_conv();
    let (s, e) = t.reserve(&conv2, 100).await;
    let batch: Vec<pb::SaveMessageRequest> =
        (s..=e).map(|q| save_request(&conv2, 3, q, "", 0)).collect();
    let results = t
        .messages()
        .save_messages(pb::SaveMessagesRequest {
            messages: batch,
            mark_read_by_sender: false,
        })
        .await
        .expect("SaveMessages of a block")
        .into_inner()
        .results;
    assert_eq!(results.len(), 100);
    assert!(results.iter().all(|r| !r.duplicate));
    assert_eq!(
        seqs(&t.history(&conv2).await),
        (1..=100).collect::<Vec<_>>()
    );
    assert_eq!(t.reserve(&conv2, 1).await, (101, 101));

    // From the database too (seq 101 was handed out but never stored, so the database may
    // offer it again: it only guarantees to stay above what is stored).
    t.cache().set_down(true);
    let (s, e) = t.reserve(&conv2, 100).await;
    assert!(
        s > 100,
        "block from the database starts at {s}, inside stored seqs"
    );
    assert_eq!(e - s, 99);
    t.cache().set_down(false);

    for bad in [-1, 10_001] {
        assert_code(
            t.messages()
                .generate_seq_id(pb::GenerateSeqIdRequest {
                    conversation_id: conv.clone(),
                    count: bad,
                    from_stored: false,
                })
                .await,
            ErrorCode::InvalidParameter,
        );
    }
}

async fn unread_counts(t: Server) {
    let u = t.seed_users(2).await;
    let (a, b) = (u[0], u[1]);
    let conv = t
        .conversations()
        .get_or_create_single_conversation(pb::GetOrCreateSingleConversationRequest {
            user_id: a.to_string(),
            peer_user_id: b.to_string(),
        })
        .await
        .expect("GetOrCreateSingleConversation")
        .into_inner()
        .conversation
        .expect("conversation")
        .id;
    let unread = |user: i64| {
        let mut c = t.conversations();
        let conv = conv.clone();
        async move {
            let r = c
                .get_unread_count(pb::GetUnreadCountRequest {
                    user_id: user.to_string(),
                    conversation_id: conv,
                })
                .await
                .expect("GetUnreadCount")
                .into_inner();
            assert!(r.unread_count >= 0, "negative unread count: {r:?}");
            assert_eq!(r.unread_count, (r.last_seq - r.last_read_seq).max(0));
            (r.unread_count, r.last_read_seq, r.last_seq)
        }
    };
    let read = |user: i64, seq: i64| {
        let mut c = t.conversations();
        let conv = conv.clone();
        async move {
            let r = c
                .update_read_pointer(pb::UpdateReadPointerRequest {
                    user_id: user.to_string(),
                    conversation_id: conv,
                    seq_id: seq,
                })
                .await
                .expect("UpdateReadPointer")
                .into_inner();
            assert!(r.unread_count >= 0);
            (r.last_read_seq, r.unread_count)
        }
    };
    let listed = |user: i64| {
        let mut c = t.conversations();
        let conv = conv.clone();
        async move {
            let list = c
                .get_user_conversations(pb::GetUserConversationsRequest {
                    user_id: user.to_string(),
                    page: 1,
                    page_size: 10,
                })
                .await
                .expect("GetUserConversations")
                .into_inner();
            let v = list
                .conversations
                .into_iter()
                .find(|c| c.id == conv)
                .expect("listed");
            (v.unread_count, v.last_read_seq)
        }
    };

    assert_eq!(unread(a).await, (0, 0, 0));
    for k in 0..5 {
        t.send(&conv, b, &format!("m{k}")).await;
    }
    assert_eq!(unread(a).await, (5, 0, 5));
    assert_eq!(read(a, 3).await, (3, 2));
    assert_eq!(unread(a).await, (2, 3, 5));
    assert_eq!(
        unread(a).await,
        (2, 3, 5),
        "again, through the cached pointer"
    );
    assert_eq!(read(a, 1).await, (3, 2), "backwards is ignored");
    assert_eq!(unread(a).await, (2, 3, 5));
    assert_eq!(read(a, 99).await, (5, 0), "clamped to the last seq");
    assert_eq!(unread(a).await, (0, 5, 5));

    for k in 5..7 {
        t.send(&conv, b, &format!("m{k}")).await;
    }
    assert_eq!(unread(a).await, (2, 5, 7), "new messages count");
    assert_eq!(listed(a).await, (2, 5));
    assert_eq!(unread(b).await, (7, 0, 7));

    t.flush_cache().await;
    assert_eq!(unread(a).await, (2, 5, 7), "after losing the cache");
    assert_eq!(listed(a).await, (2, 5));

    t.cache().set_down(true);
    assert_eq!(unread(a).await, (2, 5, 7), "with the cache unreachable");
    assert_eq!(read(a, 6).await, (6, 1));
    assert_eq!(unread(a).await, (1, 6, 7));
    t.flush_cache().await;
    t.cache().set_down(false);
    assert_eq!(unread(a).await, (1, 6, 7), "with the cache back");

    assert_eq!(read(b, 1_000_000).await, (7, 0));
    assert_eq!(read(b, 0).await, (7, 0));
    assert_eq!(unread(b).await, (0, 7, 7));

    // A batch saved with mark_read_by_sender: each sender has read up to its own newest message,
    // in the same transaction, and the cached pointers (a's is cached at 6) do not go stale.
    let (first, last) = t.reserve(&conv, 3).await;
    assert_eq!((first, last), (8, 10));
    let batch = vec![
        save_request(&conv, a, 8, "", 0),
        save_request(&conv, b, 9, "", 0),
        save_request(&conv, a, 10, "", 0),
    ];
    let results = t
        .messages()
        .save_messages(pb::SaveMessagesRequest {
            messages: batch,
            mark_read_by_sender: true,
        })
        .await
        .expect("SaveMessages marking read")
        .into_inner()
        .results;
    assert!(results.iter().all(|r| !r.duplicate));
    assert_eq!(unread(a).await, (0, 10, 10), "a read its own 8 and 10");
    assert_eq!(unread(b).await, (1, 9, 10), "b read its own 9, not a's 10");
    assert_eq!(listed(a).await, (0, 10));

    // A sender whose pointer is already ahead keeps it; a first pointer is created.
    let c = t.seed_users(1).await[0];
    assert_eq!(read(b, 10).await, (10, 0));
    let (seq, _) = t.reserve(&conv, 1).await;
    let late = save_request(&conv, c, seq, "", 0);
    t.messages()
        .save_messages(pb::SaveMessagesRequest {
            messages: vec![late],
            mark_read_by_sender: true,
        })
        .await
        .expect("SaveMessages by a new sender");
    assert_eq!(unread(b).await, (1, 10, 11));
    let r = t
        .conversations()
        .get_unread_count(pb::GetUnreadCountRequest {
            user_id: c.to_string(),
            conversation_id: conv.clone(),
        })
        .await
        .expect("GetUnreadCount")
        .into_inner();
    assert_eq!((r.last_read_seq, r.unread_count), (11, 0));
}

async fn user_conversations_newest_first(t: Server) {
    let u = t.seed_users(4).await;
    let (me, p1, p2, p3) = (u[0], u[1], u[2], u[3]);
    let single = |x: i64, y: i64| {
        let mut c = t.conversations();
        async move {
            c.get_or_create_single_conversation(pb::GetOrCreateSingleConversationRequest {
                user_id: x.to_string(),
                peer_user_id: y.to_string(),
            })
            .await
            .expect("GetOrCreateSingleConversation")
            .into_inner()
            .conversation
            .expect("conversation")
            .id
        }
    };
    let s1 = single(me, p1).await;
    let s2 = single(me, p2).await;
    let not_mine = single(p2, p3).await;
    let group = t
        .groups()
        .create_group(pb::CreateGroupRequest {
            name: "Friends".to_owned(),
            owner_id: p1.to_string(),
            member_ids: ids(&[me]),
            avatar_url: "https://example.invalid/f.png".to_owned(),
        })
        .await
        .expect("CreateGroup")
        .into_inner()
        .group
        .expect("group");
    let g = group.conversation_id.clone();

    // Activity times fixed by the messages (in the future, after every creation time).
    let base = now_ms() + 60_000;
    let mut sent: HashMap<String, pb::Message> = HashMap::new();
    for (k, (conv, sender)) in [
        ("world", p3),
        (s1.as_str(), p1),
        (g.as_str(), p1),
        (s2.as_str(), me),
        (not_mine.as_str(), p3),
    ]
    .into_iter()
    .enumerate()
    {
        let (seq, _) = t.reserve(conv, 1).await;
        let at = base + 1000 * i64::try_from(k).expect("fits");
        let m = t
            .save(conv, sender, seq, "", at)
            .await
            .expect("SaveMessage")
            .message
            .expect("message");
        sent.insert(conv.to_owned(), m);
    }
    let mut c = t.conversations();
    let list = c
        .get_user_conversations(pb::GetUserConversationsRequest {
            user_id: me.to_string(),
            page: 0,
            page_size: 0,
        })
        .await
        .expect("GetUserConversations")
        .into_inner();
    let order: Vec<&str> = list.conversations.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(order, vec![s2.as_str(), g.as_str(), s1.as_str(), "world"]);
    assert_eq!(list.total, 4);
    assert!(!list.has_more);
    for v in &list.conversations {
        assert_eq!(v.last_message.as_ref(), sent.get(&v.id), "{}", v.id);
        assert_eq!(v.updated_at, sent[&v.id].created_at);
        assert_eq!((v.last_seq, v.last_read_seq, v.unread_count), (1, 0, 1));
    }
    let by = |id: &str| {
        list.conversations
            .iter()
            .find(|c| c.id == id)
            .expect("listed")
    };
    assert_eq!(by(&s1).name, format!("Seed {p1}"));
    assert_eq!(by(&s1).peer_user_id, p1.to_string());
    assert_eq!(by(&s1).r#type, pb::ConversationType::Single as i32);
    assert_eq!(by(&g).name, "Friends");
    assert_eq!(by(&g).avatar_url, "https://example.invalid/f.png");
    assert_eq!(by(&g).group_id, group.id);
    assert_eq!(by(&g).member_count, 2);
    assert_eq!(by(&g).r#type, pb::ConversationType::Group as i32);
    assert_eq!(by("world").name, "World");
    assert_eq!(by("world").r#type, pb::ConversationType::World as i32);

    // Pages.
    let page = |n: i32| {
        let mut c = t.conversations();
        async move {
            c.get_user_conversations(pb::GetUserConversationsRequest {
                user_id: me.to_string(),
                page: n,
                page_size: 3,
            })
            .await
            .expect("GetUserConversations page")
            .into_inner()
        }
    };
    let p1_page = page(1).await;
    assert_eq!(p1_page.conversations.len(), 3);
    assert!(p1_page.has_more);
    let p2_page = page(2).await;
    assert_eq!(
        p2_page
            .conversations
            .iter()
            .map(|c| c.id.as_str())
            .collect::<Vec<_>>(),
        vec!["world"]
    );
    assert!(!p2_page.has_more);
    assert_eq!(p2_page.total, 4);

    // Reading moves the unread count; new activity moves the order.
    c.update_read_pointer(pb::UpdateReadPointerRequest {
        user_id: me.to_string(),
        conversation_id: g.clone(),
        seq_id: 1,
    })
    .await
    .expect("UpdateReadPointer");
    let (seq, _) = t.reserve("world", 1).await;
    t.save("world", p2, seq, "", base + 10_000)
        .await
        .expect("SaveMessage world");
    let list = c
        .get_user_conversations(pb::GetUserConversationsRequest {
            user_id: me.to_string(),
            page: 1,
            page_size: 10,
        })
        .await
        .expect("GetUserConversations")
        .into_inner();
    let order: Vec<&str> = list.conversations.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(order, vec!["world", s2.as_str(), g.as_str(), s1.as_str()]);
    assert_eq!(list.conversations[0].unread_count, 2);
    assert_eq!(
        (
            list.conversations[2].unread_count,
            list.conversations[2].last_read_seq
        ),
        (0, 1)
    );

    assert_code(
        c.get_user_conversations(pb::GetUserConversationsRequest {
            user_id: me.to_string(),
            page: 1,
            page_size: 101,
        })
        .await,
        ErrorCode::InvalidParameter,
    );
}

async fn many_users_presence_and_group_limit(t: Server) {
    // The test settings allow 260 members per group.
    let u = t.seed_users(262).await;
    let members = &u[..250];
    let group = t
        .groups()
        .create_group(pb::CreateGroupRequest {
            name: "big".to_owned(),
            owner_id: members[0].to_string(),
            member_ids: ids(&members[1..]),
            avatar_url: String::new(),
        })
        .await
        .expect("CreateGroup with 250 members")
        .into_inner()
        .group
        .expect("group");
    assert_eq!(group.member_count, 250);

    // Every third member on gw-a, every fifth on gw-b (so every fifteenth on both).
    let expect = |i: usize| -> Vec<String> {
        let mut g = Vec::new();
        if i.is_multiple_of(3) {
            g.push("gw-a".to_owned());
        }
        if i.is_multiple_of(5) {
            g.push("gw-b".to_owned());
        }
        g
    };
    let calls: Vec<(i64, String)> = members
        .iter()
        .enumerate()
        .flat_map(|(i, id)| expect(i).into_iter().map(move |g| (*id, g)))
        .collect();
    let results: Vec<_> = futures::stream::iter(calls)
        .map(|(user, gateway)| {
            let mut p = t.presence();
            async move {
                p.set_user_online(pb::SetUserOnlineRequest {
                    user_id: user.to_string(),
                    gateway_id: gateway,
                    ttl_seconds: 600,
                })
                .await
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    for r in results {
        r.expect("SetUserOnline");
    }

    let check = |statuses: &[pb::OnlineStatus], from: usize| {
        for (k, s) in statuses.iter().enumerate() {
            let i = from + k;
            assert_eq!(s.user_id, members[i].to_string(), "order at {i}");
            let want = expect(i);
            assert_eq!(s.is_online, !want.is_empty(), "user {i}");
            assert_eq!(gateways(s), want, "user {i}");
        }
    };
    let all = t
        .presence()
        .get_users_online_status(pb::GetUsersOnlineStatusRequest {
            user_ids: ids(members),
        })
        .await
        .expect("GetUsersOnlineStatus for 250 users")
        .into_inner()
        .statuses;
    assert_eq!(all.len(), 250);
    check(&all, 0);

    let page = |offset: i32, limit: i32| {
        let mut g = t.groups();
        let group_id = group.id.clone();
        async move {
            g.get_members_online_status(pb::GetMembersOnlineStatusRequest {
                group_id,
                offset,
                limit,
                page_token: String::new(),
            })
            .await
            .expect("GetMembersOnlineStatus")
            .into_inner()
        }
    };
    let whole = page(0, 1000).await;
    assert_eq!(whole.statuses.len(), 250);
    assert!(!whole.has_more);
    check(&whole.statuses, 0);
    let first = page(0, 200).await;
    assert_eq!(first.statuses.len(), 200);
    assert!(first.has_more);
    check(&first.statuses, 0);
    let rest = page(200, 200).await;
    assert_eq!(rest.statuses.len(), 50);
    assert!(!rest.has_more);
    check(&rest.statuses, 200);

    // By token: the same members in the same order; a page carries on after the last member
    // read even when an earlier member leaves meanwhile (an offset would skip one).
    let by_token = |token: &str, offset: i32, limit: i32| {
        let mut g = t.groups();
        let request = pb::GetMembersOnlineStatusRequest {
            group_id: group.id.clone(),
            offset,
            limit,
            page_token: token.to_owned(),
        };
        async move {
            g.get_members_online_status(request)
                .await
                .map(tonic::Response::into_inner)
        }
    };
    let t1 = by_token("", 0, 100).await.expect("first page");
    assert_eq!(t1.statuses.len(), 100);
    assert!(t1.has_more);
    assert!(!t1.next_page_token.is_empty());
    check(&t1.statuses, 0);
    t.groups()
        .remove_group_member(pb::RemoveGroupMemberRequest {
            group_id: group.id.clone(),
            user_id: members[10].to_string(),
        })
        .await
        .expect("RemoveGroupMember");
    let t2 = by_token(&t1.next_page_token, 0, 100)
        .await
        .expect("second page");
    assert_eq!(t2.statuses.len(), 100);
    assert!(t2.has_more);
    check(&t2.statuses, 100);
    let t3 = by_token(&t2.next_page_token, 0, 100)
        .await
        .expect("last page");
    assert_eq!(t3.statuses.len(), 50);
    assert!(!t3.has_more);
    assert!(
        t3.next_page_token.is_empty(),
        "no token after the last page"
    );
    check(&t3.statuses, 200);
    // An offset's page hands out a token too (member 10 is gone: 150 members are 0..=150).
    let o = page(0, 150).await;
    assert!(o.has_more);
    let after = by_token(&o.next_page_token, 0, 200)
        .await
        .expect("the page after an offset's");
    assert_eq!(after.statuses.len(), 99);
    assert!(!after.has_more);
    check(&after.statuses, 151);
    for bad in ["abc", "0", "-5", " 1"] {
        assert_code(by_token(bad, 0, 10).await, ErrorCode::InvalidParameter);
    }
    assert_code(
        by_token(&t1.next_page_token, 5, 10).await,
        ErrorCode::InvalidParameter,
    );
    t.groups()
        .add_group_member(pb::AddGroupMemberRequest {
            group_id: group.id.clone(),
            user_ids: vec![members[10].to_string()],
            role: 0,
        })
        .await
        .expect("AddGroupMember back");

    // The group limit.
    let mut g = t.groups();
    assert_code(
        g.add_group_member(pb::AddGroupMemberRequest {
            group_id: group.id.clone(),
            user_ids: ids(&u[250..261]),
            role: 0,
        })
        .await,
        ErrorCode::GroupFull,
    );
    let after = g
        .get_group(pb::GetGroupRequest {
            group_id: group.id.clone(),
        })
        .await
        .expect("GetGroup")
        .into_inner()
        .group
        .expect("group");
    assert_eq!(after.member_count, 250, "a refused add changes nothing");
    let added = g
        .add_group_member(pb::AddGroupMemberRequest {
            group_id: group.id.clone(),
            user_ids: ids(&u[250..260]),
            role: 0,
        })
        .await
        .expect("AddGroupMember up to the limit")
        .into_inner();
    assert_eq!(added.added, 10);
    assert_eq!(added.group.map(|g| g.member_count), Some(260));
    assert_code(
        g.add_group_member(pb::AddGroupMemberRequest {
            group_id: group.id.clone(),
            user_ids: ids(&u[261..262]),
            role: 0,
        })
        .await,
        ErrorCode::GroupFull,
    );
    assert_code(
        g.create_group(pb::CreateGroupRequest {
            name: "too big".to_owned(),
            owner_id: u[0].to_string(),
            member_ids: ids(&u[1..261]),
            avatar_url: String::new(),
        })
        .await,
        ErrorCode::GroupFull,
    );
}

async fn latest_page_hot_cache(t: Server) {
    let conv = fresh_group_conv();
    for k in 0..30 {
        t.send(&conv, 4, &format!("hot {k}")).await;
    }
    let (first, more) = t.latest(&conv, 20).await;
    assert_eq!(seqs(&first), (11..=30).rev().collect::<Vec<_>>());
    assert!(more);
    let cached = t
        .cache()
        .inner()
        .hot_get(&conv)
        .await
        .expect("hot_get")
        .expect("the latest page is cached");
    assert_eq!(cached.len(), 30);
    let (second, more2) = t.latest(&conv, 20).await;
    assert_eq!(second, first, "served from the hot cache, unchanged");
    assert_eq!(more2, more);

    // The same page as the store serves it.
    let (rows, _) = t
        .store()
        .get_messages(
            &conv,
            gochat_repo::model::Direction::Backward { before_seq: None },
            20,
        )
        .await
        .expect("get_messages");
    assert_eq!(
        first.iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
        rows.iter().map(|m| m.id.to_string()).collect::<Vec<_>>()
    );
    assert_eq!(first[0].content, "hot 29");

    // A duplicate changes nothing and keeps the page; a new message drops it.
    let dup_of = &first[0];
    let mut again = save_request(&conv, 4, 30, "", 0);
    again.message_id = dup_of.id.clone();
    let dup = t
        .messages()
        .save_message(again)
        .await
        .expect("duplicate SaveMessage")
        .into_inner();
    assert!(dup.duplicate);
    assert!(
        t.cache()
            .inner()
            .hot_get(&conv)
            .await
            .expect("hot_get")
            .is_some(),
        "a duplicate keeps the cached page"
    );
    let new = t.send(&conv, 4, "fresh").await;
    assert_eq!(new.seq_id, 31);
    assert_eq!(
        t.cache().inner().hot_get(&conv).await.expect("hot_get"),
        None,
        "a new message invalidates the cached page"
    );
    let (third, more3) = t.latest(&conv, 20).await;
    assert_eq!(seqs(&third), (12..=31).rev().collect::<Vec<_>>());
    assert!(more3);
    assert_eq!(third[0], new);
    let (fourth, _) = t.latest(&conv, 20).await;
    assert_eq!(fourth, third);

    t.flush_cache().await;
    let (fifth, _) = t.latest(&conv, 20).await;
    assert_eq!(fifth, third, "after losing the cache");

    let (all, more) = t.latest(&conv, 100).await;
    assert_eq!(all.len(), 31);
    assert!(!more);
    let (exact, more) = t.latest(&conv, 31).await;
    assert_eq!(exact.len(), 31);
    assert!(!more, "exactly all messages: no more");
    let (short, more) = t.latest(&conv, 30).await;
    assert_eq!(short.len(), 30);
    assert!(more);

    // A conversation without messages.
    let (none, more) = t.latest(&fresh_group_conv(), 20).await;
    assert!(none.is_empty());
    assert!(!more);
}
