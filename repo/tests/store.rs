//! The store against the `Store` trait: every test is written once and run on SQLite (a temp
//! file) and on MariaDB/MySQL (a fresh database per test at `GOCHAT_TEST_MYSQL_URL`, default
//! `mysql://root@127.0.0.1:3306`; the tests fail when it is unreachable).

mod common;

use std::collections::{BTreeSet, HashSet};

use common::{StoreKind, now_ms, with_store};
use gochat_repo::model::{
    Direction, Group, Message, SaveOutcome, User, UserChanges, UserConversation, role,
};
use gochat_repo::store::{AnyStore, MemberCursor, Store, StoreError};

/// Instantiates each test for both engines, as `sqlite::<name>` and `mysql::<name>`.
macro_rules! both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    with_store(StoreKind::Sqlite, super::$name).await;
                }
            )*
        }
        mod mysql {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    with_store(StoreKind::Mysql, super::$name).await;
                }
            )*
        }
    };
}

both_stores!(
    users_crud,
    duplicate_username,
    history_paging,
    duplicates_by_id_and_client_msg_id,
    duplicates_inside_one_batch,
    seq_conflict,
    conversation_keeps_last_message,
    concurrent_saves_to_one_conversation,
    group_lifecycle,
    group_concurrent_adds_and_removes,
    group_full,
    group_members_paging,
    single_conversation_idempotent,
    user_conversations_listing,
    read_pointer_rules,
    concurrent_read_pointer_updates,
    seq_floor_and_reserve,
    concurrent_reserve_seq,
);

fn user(id: i64, username: &str) -> User {
    User {
        id,
        username: username.to_owned(),
        password_hash: format!("$argon2id$v=19$m=64,t=1,p=1$hash-of-{id}"),
        nickname: format!("Nick 名字 {id}"),
        avatar_url: format!("https://example.invalid/{id}.png"),
        created_at: 1_700_000_000_000 + id,
        updated_at: 1_700_000_000_000 + id,
    }
}

fn msg(id: i64, conv: &str, sender: i64, seq: i64, client_msg_id: Option<&str>) -> Message {
    Message {
        id,
        conversation_id: conv.to_owned(),
        sender_id: sender,
        message_type: 1,
        content: format!("message {id} (seq {seq}) ✓ \"quoted\""),
        seq_id: seq,
        client_msg_id: client_msg_id.map(str::to_owned),
        created_at: 1_700_000_000_000 + seq,
    }
}

fn group(id: i64, owner: i64) -> Group {
    Group {
        id,
        name: format!("group {id}"),
        owner_id: owner,
        member_count: 0,
        avatar_url: String::new(),
        created_at: 1_700_000_000_000,
        updated_at: 1_700_000_000_000,
    }
}

fn seqs(rows: &[Message]) -> Vec<i64> {
    rows.iter().map(|m| m.seq_id).collect()
}

/// Stores one message that must be new.
async fn save_new(s: &AnyStore, m: Message) -> Message {
    let mut out = s.save_messages(&[m]).await.expect("save_messages");
    assert_eq!(out.len(), 1);
    let o = out.pop().expect("one outcome");
    assert!(
        !o.duplicate,
        "expected a new message, got a duplicate: {o:?}"
    );
    o.message
}

/// Asserts that a group's `member_count` equals its real number of members.
async fn assert_count_is_real(s: &AnyStore, g: i64) -> i64 {
    let group = s.get_group(g).await.expect("get_group").expect("group");
    let (_, total) = s.group_members(g, 0, 1).await.expect("group_members");
    let ids = s.group_member_ids(g).await.expect("group_member_ids");
    assert_eq!(
        i64::from(group.member_count),
        total,
        "member_count vs count"
    );
    assert_eq!(
        usize::try_from(total).expect("non-negative"),
        ids.len(),
        "total vs ids"
    );
    total
}

async fn users_crud(s: AnyStore) {
    let (a, b) = (user(11, "alice"), user(12, "bob"));
    assert_eq!(s.get_user(11).await.expect("get_user"), None);
    s.create_user(&a).await.expect("create alice");
    s.create_user(&b).await.expect("create bob");

    assert_eq!(s.get_user(11).await.expect("get_user"), Some(a.clone()));
    assert_eq!(
        s.get_user_by_username("bob").await.expect("by username"),
        Some(b.clone())
    );
    assert_eq!(
        s.get_user_by_username("carol").await.expect("by username"),
        None
    );
    assert_eq!(
        s.get_user_by_username("ALICE").await.expect("by username"),
        None,
        "usernames are case-sensitive"
    );

    let mut many = s.get_users(&[12, 999, 11]).await.expect("get_users");
    many.sort_by_key(|u| u.id);
    assert_eq!(many, vec![a.clone(), b.clone()]);
    assert!(s.get_users(&[]).await.expect("get_users empty").is_empty());

    // A batch bigger than one chunk.
    let ids: Vec<i64> = (1000..1600).collect();
    for &id in ids.iter().filter(|id| *id % 100 == 7) {
        s.create_user(&user(id, &format!("u{id}")))
            .await
            .expect("create");
    }
    let found = s.get_users(&ids).await.expect("get_users many");
    let found: BTreeSet<i64> = found.iter().map(|u| u.id).collect();
    let want: BTreeSet<i64> = ids.iter().copied().filter(|id| id % 100 == 7).collect();
    assert_eq!(found, want);

    let changed = s
        .update_user(
            11,
            &UserChanges {
                nickname: Some("Alice A.".to_owned()),
                ..Default::default()
            },
            1_800_000_000_000,
        )
        .await
        .expect("update_user")
        .expect("alice exists");
    assert_eq!(changed.nickname, "Alice A.");
    assert_eq!(
        changed.avatar_url, a.avatar_url,
        "None leaves a field alone"
    );
    assert_eq!(changed.password_hash, a.password_hash);
    assert_eq!(changed.updated_at, 1_800_000_000_000);
    assert_eq!(changed.created_at, a.created_at);
    assert_eq!(
        s.get_user(11).await.expect("get_user"),
        Some(changed.clone())
    );

    let changed = s
        .update_user(
            11,
            &UserChanges {
                avatar_url: Some(String::new()),
                password_hash: Some("new-hash".to_owned()),
                nickname: None,
            },
            1_800_000_000_001,
        )
        .await
        .expect("update_user")
        .expect("alice exists");
    assert_eq!(changed.nickname, "Alice A.");
    assert_eq!(changed.avatar_url, "");
    assert_eq!(changed.password_hash, "new-hash");

    assert_eq!(
        s.update_user(999, &UserChanges::default(), 1)
            .await
            .expect("update_user unknown"),
        None
    );
    // Bob untouched.
    assert_eq!(s.get_user(12).await.expect("get_user"), Some(b));
}

async fn duplicate_username(s: AnyStore) {
    s.create_user(&user(1, "dora")).await.expect("create");
    match s.create_user(&user(2, "dora")).await {
        Err(StoreError::UserExists) => {}
        other => panic!("expected UserExists, got {other:?}"),
    }
    assert_eq!(
        s.get_user(2).await.expect("get_user"),
        None,
        "nothing stored"
    );
    assert_eq!(
        s.get_user_by_username("dora")
            .await
            .expect("by username")
            .map(|u| u.id),
        Some(1)
    );
    // The error maps to the spec's code.
    let app: gochat_infra::AppError = StoreError::UserExists.into();
    assert_eq!(app.code, gochat_infra::ErrorCode::UserExists);
}

async fn history_paging(s: AnyStore) {
    let conv = "s_1_2";
    let batch: Vec<Message> = (1..=25).map(|q| msg(100 + q, conv, 1, q, None)).collect();
    let out = s.save_messages(&batch).await.expect("save 25");
    assert!(out.iter().all(|o| !o.duplicate));
    // Another conversation must not leak into the pages.
    let other: Vec<Message> = (1..=5).map(|q| msg(500 + q, "s_1_3", 1, q, None)).collect();
    s.save_messages(&other).await.expect("save other");

    let page = |d, l| {
        let s = s.clone();
        async move { s.get_messages(conv, d, l).await.expect("get_messages") }
    };

    let (rows, more) = page(Direction::Forward { after_seq: 0 }, 10).await;
    assert_eq!(seqs(&rows), (1..=10).collect::<Vec<_>>());
    assert!(more);
    assert_eq!(rows[0], batch[0], "rows round-trip unchanged");
    let (rows, more) = page(Direction::Forward { after_seq: 10 }, 10).await;
    assert_eq!(seqs(&rows), (11..=20).collect::<Vec<_>>());
    assert!(more);
    let (rows, more) = page(Direction::Forward { after_seq: 20 }, 10).await;
    assert_eq!(seqs(&rows), (21..=25).collect::<Vec<_>>());
    assert!(!more);
    let (rows, more) = page(Direction::Forward { after_seq: 15 }, 10).await;
    assert_eq!(seqs(&rows), (16..=25).collect::<Vec<_>>());
    assert!(!more, "exactly `limit` rows left: no more");
    let (rows, more) = page(Direction::Forward { after_seq: 25 }, 10).await;
    assert!(rows.is_empty());
    assert!(!more);

    let (rows, more) = page(Direction::Backward { before_seq: None }, 10).await;
    assert_eq!(seqs(&rows), (16..=25).rev().collect::<Vec<_>>());
    assert!(more);
    let (rows, more) = page(
        Direction::Backward {
            before_seq: Some(16),
        },
        10,
    )
    .await;
    assert_eq!(seqs(&rows), (6..=15).rev().collect::<Vec<_>>());
    assert!(more);
    let (rows, more) = page(
        Direction::Backward {
            before_seq: Some(6),
        },
        10,
    )
    .await;
    assert_eq!(seqs(&rows), (1..=5).rev().collect::<Vec<_>>());
    assert!(!more);
    let (rows, more) = page(
        Direction::Backward {
            before_seq: Some(11),
        },
        10,
    )
    .await;
    assert_eq!(seqs(&rows), (1..=10).rev().collect::<Vec<_>>());
    assert!(!more, "exactly `limit` rows left: no more");
    let (rows, more) = page(Direction::Backward { before_seq: None }, 25).await;
    assert_eq!(rows.len(), 25);
    assert!(!more);
    let (rows, more) = page(Direction::Backward { before_seq: None }, 24).await;
    assert_eq!(rows.len(), 24);
    assert!(more);

    let (rows, more) = s
        .get_messages("s_8_9", Direction::Backward { before_seq: None }, 10)
        .await
        .expect("empty conversation");
    assert!(rows.is_empty());
    assert!(!more);

    assert_eq!(
        s.get_message(105).await.expect("get_message"),
        Some(batch[4].clone())
    );
    assert_eq!(s.get_message(99_999).await.expect("get_message"), None);
}

async fn duplicates_by_id_and_client_msg_id(s: AnyStore) {
    let conv = "g_42";
    let original = save_new(&s, msg(1, conv, 7, 1, Some("c-1"))).await;
    assert_eq!(
        s.find_by_client_msg_id(7, "c-1").await.expect("find"),
        Some(original.clone())
    );
    assert_eq!(s.find_by_client_msg_id(8, "c-1").await.expect("find"), None);

    // The very same message again.
    let out = s
        .save_messages(std::slice::from_ref(&original))
        .await
        .expect("save again");
    assert_eq!(
        out,
        vec![SaveOutcome {
            message: original.clone(),
            duplicate: true
        }]
    );

    // Same id, different everything else: the original wins, seq 2 stays free.
    let mut same_id = msg(1, conv, 7, 2, None);
    same_id.content = "impostor".to_owned();
    let out = s.save_messages(&[same_id]).await.expect("save same id");
    assert_eq!(out[0].message, original);
    assert!(out[0].duplicate);

    // Same (sender, client_msg_id), new id and seq: the original wins.
    let out = s
        .save_messages(&[msg(2, conv, 7, 3, Some("c-1"))])
        .await
        .expect("save same key");
    assert_eq!(out[0].message, original);
    assert!(out[0].duplicate);
    assert_eq!(s.get_message(2).await.expect("get_message"), None);

    // The same key from another sender is another message.
    let other = save_new(&s, msg(3, conv, 8, 2, Some("c-1"))).await;
    assert_eq!(other.sender_id, 8);

    // A batch mixing a stored duplicate and a new message: the new one is stored.
    let out = s
        .save_messages(&[
            msg(4, conv, 7, 4, Some("c-1")),
            msg(5, conv, 7, 3, Some("c-2")),
        ])
        .await
        .expect("mixed batch");
    assert!(out[0].duplicate);
    assert_eq!(out[0].message, original);
    assert!(!out[1].duplicate);
    assert_eq!(out[1].message.id, 5);

    let (rows, _) = s
        .get_messages(conv, Direction::Forward { after_seq: 0 }, 100)
        .await
        .expect("history");
    assert_eq!(seqs(&rows), vec![1, 2, 3]);
    assert_eq!(rows.iter().map(|m| m.id).collect::<Vec<_>>(), vec![1, 3, 5]);
    let c = s
        .get_conversation(conv)
        .await
        .expect("get_conversation")
        .expect("created by the first save");
    assert_eq!(c.last_seq, 3);
    assert_eq!(c.last_message_id, Some(5));
}

async fn duplicates_inside_one_batch(s: AnyStore) {
    let conv = "s_3_4";
    let mut first = msg(10, conv, 3, 1, Some("dup"));
    // No creation time given: the store stamps one.
    first.created_at = 0;
    let by_key = msg(11, conv, 3, 2, Some("dup"));
    let by_id = msg(10, conv, 3, 3, None);
    let fresh = msg(12, conv, 3, 2, Some("other"));
    let out = s
        .save_messages(&[first, by_key, by_id, fresh])
        .await
        .expect("batch with duplicates");
    assert_eq!(out.len(), 4);
    assert!(!out[0].duplicate);
    assert!(out[0].message.created_at > 0, "created_at stamped");
    assert!(
        out[1].duplicate,
        "same key as an earlier message of the batch"
    );
    assert!(
        out[2].duplicate,
        "same id as an earlier message of the batch"
    );
    assert!(!out[3].duplicate);

    let stored = s
        .get_message(10)
        .await
        .expect("get_message")
        .expect("the first is stored");
    assert_eq!(out[0].message, stored);
    // A duplicate's outcome carries the original as stored.
    assert_eq!(out[1].message, stored, "duplicate by key inside a batch");
    assert_eq!(out[2].message, stored, "duplicate by id inside a batch");

    assert_eq!(s.get_message(11).await.expect("get_message"), None);
    let (rows, _) = s
        .get_messages(conv, Direction::Forward { after_seq: 0 }, 100)
        .await
        .expect("history");
    assert_eq!(
        rows.iter().map(|m| (m.id, m.seq_id)).collect::<Vec<_>>(),
        vec![(10, 1), (12, 2)]
    );
}

async fn seq_conflict(s: AnyStore) {
    let conv = "s_5_6";
    save_new(&s, msg(1, conv, 5, 1, Some("a"))).await;

    match s.save_messages(&[msg(2, conv, 6, 1, Some("b"))]).await {
        Err(StoreError::SeqConflict { conversation, seq }) => {
            assert_eq!(conversation, conv);
            assert_eq!(seq, 1);
        }
        other => panic!("expected SeqConflict, got {other:?}"),
    }
    // A batch with one conflicting message stores nothing.
    match s
        .save_messages(&[msg(3, conv, 6, 2, None), msg(4, conv, 6, 1, None)])
        .await
    {
        Err(StoreError::SeqConflict { conversation, .. }) => assert_eq!(conversation, conv),
        other => panic!("expected SeqConflict, got {other:?}"),
    }
    // Two new messages with one seq inside a batch.
    match s
        .save_messages(&[msg(5, conv, 6, 7, None), msg(6, conv, 6, 7, None)])
        .await
    {
        Err(StoreError::SeqConflict { .. }) => {}
        other => panic!("expected SeqConflict, got {other:?}"),
    }
    assert_eq!(
        s.get_message(3).await.expect("get_message"),
        None,
        "rolled back"
    );
    assert_eq!(
        s.get_message(5).await.expect("get_message"),
        None,
        "rolled back"
    );
    let c = s
        .get_conversation(conv)
        .await
        .expect("get_conversation")
        .expect("exists");
    assert_eq!(c.last_seq, 1, "a failed batch moves nothing");
    assert_eq!(c.last_message_id, Some(1));

    // The same seq in another conversation is fine; the failed ids are free again.
    save_new(&s, msg(2, "s_5_7", 6, 1, Some("b"))).await;
    save_new(&s, msg(3, conv, 6, 2, None)).await;

    // Non-positive seqs and bad conversation ids are refused.
    assert!(matches!(
        s.save_messages(&[msg(9, conv, 6, 0, None)]).await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        s.save_messages(&[msg(9, "nonsense", 6, 1, None)]).await,
        Err(StoreError::Invalid(_))
    ));
    let app: gochat_infra::AppError = StoreError::SeqConflict {
        conversation: conv.to_owned(),
        seq: 1,
    }
    .into();
    assert_eq!(app.code, gochat_infra::ErrorCode::SeqConflict);
}

async fn conversation_keeps_last_message(s: AnyStore) {
    let conv = "g_77";
    assert_eq!(s.get_conversation(conv).await.expect("get"), None);
    let batch: Vec<Message> = (1..=3).map(|q| msg(q, conv, 9, q, None)).collect();
    s.save_messages(&batch).await.expect("save");
    let c = s
        .get_conversation(conv)
        .await
        .expect("get")
        .expect("created");
    assert_eq!(c.kind, 2);
    assert_eq!(c.group_id, Some(77));
    assert_eq!(c.last_seq, 3);
    assert_eq!(c.last_message_id, Some(3));
    assert_eq!(c.last_message_at, batch[2].created_at);

    // Out of order: seq 5 first, then seq 4. The last message stays seq 5.
    save_new(&s, msg(5, conv, 9, 5, None)).await;
    save_new(&s, msg(4, conv, 9, 4, None)).await;
    let c = s
        .get_conversation(conv)
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(c.last_seq, 5);
    assert_eq!(c.last_message_id, Some(5));
    assert_eq!(c.last_message_at, 1_700_000_000_005);
    assert_eq!(s.seq_floor(conv).await.expect("seq_floor"), 5);

    // A duplicate does not move anything.
    let out = s
        .save_messages(&[msg(3, conv, 9, 3, None)])
        .await
        .expect("dup");
    assert!(out[0].duplicate);
    let c2 = s
        .get_conversation(conv)
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(c2, c);

    // A batch over two conversations keeps both.
    s.save_messages(&[
        msg(10, conv, 9, 6, None),
        msg(11, "world", 9, 1, None),
        msg(12, conv, 9, 7, None),
    ])
    .await
    .expect("two conversations");
    let c = s
        .get_conversation(conv)
        .await
        .expect("get")
        .expect("exists");
    assert_eq!((c.last_seq, c.last_message_id), (7, Some(12)));
    let w = s
        .get_conversation("world")
        .await
        .expect("get")
        .expect("world");
    assert_eq!((w.kind, w.last_seq, w.last_message_id), (3, 1, Some(11)));
}

async fn concurrent_saves_to_one_conversation(s: AnyStore) {
    // 8 writers, each storing 20 messages with seqs of its own, one at a time.
    let conv = "g_500";
    let tasks: Vec<_> = (0..8i64)
        .map(|w| {
            let s = s.clone();
            tokio::spawn(async move {
                for k in 0..20i64 {
                    let seq = k * 8 + w + 1;
                    let id = 10_000 + seq;
                    let out = s
                        .save_messages(&[msg(id, conv, 100 + w, seq, Some(&format!("w{w}-{k}")))])
                        .await
                        .unwrap_or_else(|e| panic!("writer {w} seq {seq}: {e:?}"));
                    assert!(!out[0].duplicate);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("writer task");
    }
    let (rows, more) = s
        .get_messages(conv, Direction::Forward { after_seq: 0 }, 1000)
        .await
        .expect("history");
    assert!(!more);
    assert_eq!(seqs(&rows), (1..=160).collect::<Vec<_>>());
    let c = s
        .get_conversation(conv)
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(c.last_seq, 160);
    assert_eq!(c.last_message_id, Some(10_160));
}

async fn group_lifecycle(s: AnyStore) {
    let g = s
        .create_group(
            &group(1, 10),
            &[(10, role::OWNER), (11, role::MEMBER), (12, role::ADMIN)],
            1_700_000_000_100,
        )
        .await
        .expect("create_group");
    assert_eq!(g.member_count, 3);
    assert_eq!(g.owner_id, 10);
    assert_eq!(assert_count_is_real(&s, 1).await, 3);
    let conv = s
        .get_conversation("g_1")
        .await
        .expect("get_conversation")
        .expect("the group's conversation");
    assert_eq!((conv.kind, conv.group_id, conv.last_seq), (2, Some(1), 0));

    let owner = s.group_member(1, 10).await.expect("member").expect("owner");
    assert_eq!(owner.role, role::OWNER);
    assert_eq!(owner.joined_at, 1_700_000_000_100);
    assert_eq!(
        s.group_member(1, 12).await.expect("member").map(|m| m.role),
        Some(role::ADMIN)
    );
    assert_eq!(s.group_member(1, 99).await.expect("member"), None);

    // Existing members are not an error and do not count.
    let (g, added) = s
        .add_group_members(1, &[12, 13, 14], role::MEMBER, 100, 1_700_000_000_200)
        .await
        .expect("add");
    assert_eq!(added, 2);
    assert_eq!(g.member_count, 5);
    assert_eq!(g.updated_at, 1_700_000_000_200);
    assert_eq!(
        s.group_member(1, 12).await.expect("member").map(|m| m.role),
        Some(role::ADMIN),
        "an existing member keeps its role"
    );
    let (g, added) = s
        .add_group_members(1, &[13], role::MEMBER, 100, 1_700_000_000_300)
        .await
        .expect("add again");
    assert_eq!((added, g.member_count), (0, 5));
    assert_eq!(assert_count_is_real(&s, 1).await, 5);

    let (g, removed) = s
        .remove_group_member(1, 11, 1_700_000_000_400)
        .await
        .expect("remove");
    assert!(removed);
    assert_eq!(g.member_count, 4);
    let (g, removed) = s
        .remove_group_member(1, 11, 1_700_000_000_500)
        .await
        .expect("remove again");
    assert!(!removed);
    assert_eq!(g.member_count, 4);
    assert_eq!(assert_count_is_real(&s, 1).await, 4);
    assert_eq!(
        s.group_member_ids(1).await.expect("ids"),
        vec![10, 12, 13, 14],
        "join order"
    );

    match s.add_group_members(999, &[1], role::MEMBER, 100, 1).await {
        Err(StoreError::GroupNotFound(999)) => {}
        other => panic!("expected GroupNotFound, got {other:?}"),
    }
    match s.remove_group_member(999, 1, 1).await {
        Err(StoreError::GroupNotFound(999)) => {}
        other => panic!("expected GroupNotFound, got {other:?}"),
    }
    assert_eq!(s.get_group(999).await.expect("get_group"), None);

    s.create_group(&group(2, 20), &[(20, role::OWNER)], 1)
        .await
        .expect("second group");
    let mut both = s.get_groups(&[2, 1, 3]).await.expect("get_groups");
    both.sort_by_key(|g| g.id);
    assert_eq!(both.iter().map(|g| g.id).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(both[1].member_count, 1);
    assert!(s.get_groups(&[]).await.expect("none").is_empty());
}

async fn group_concurrent_adds_and_removes(s: AnyStore) {
    s.create_group(&group(5, 1), &[(1, role::OWNER)], 1)
        .await
        .expect("create");
    // 8 concurrent adds of overlapping sets: task i adds 100+3i ..= 100+3i+9.
    let sets: Vec<Vec<i64>> = (0..8i64)
        .map(|i| (0..10).map(|k| 100 + 3 * i + k).collect())
        .collect();
    let union: HashSet<i64> = sets.iter().flatten().copied().collect();
    let tasks: Vec<_> = sets
        .iter()
        .cloned()
        .map(|set| {
            let s = s.clone();
            tokio::spawn(async move {
                s.add_group_members(5, &set, role::MEMBER, 1000, 2)
                    .await
                    .expect("concurrent add")
            })
        })
        .collect();
    let mut added = 0;
    for t in tasks {
        let (g, n) = t.await.expect("add task");
        assert!(g.member_count >= 1);
        added += n;
    }
    assert_eq!(
        added,
        i64::try_from(union.len()).expect("fits"),
        "`added` counts each new member exactly once"
    );
    assert_eq!(
        assert_count_is_real(&s, 5).await,
        1 + i64::try_from(union.len()).expect("fits")
    );

    // 8 concurrent removes of overlapping sets.
    let tasks: Vec<_> = (0..8i64)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                let mut removed = 0;
                for k in 0..4 {
                    let (_, r) = s
                        .remove_group_member(5, 100 + 2 * i + k, 3)
                        .await
                        .expect("concurrent remove");
                    removed += i64::from(r);
                }
                removed
            })
        })
        .collect();
    let mut removed = 0;
    for t in tasks {
        removed += t.await.expect("remove task");
    }
    let gone: HashSet<i64> = (0..8i64)
        .flat_map(|i| (0..4).map(move |k| 100 + 2 * i + k))
        .collect();
    assert_eq!(removed, i64::try_from(gone.len()).expect("fits"));
    let left = assert_count_is_real(&s, 5).await;
    assert_eq!(
        left,
        1 + i64::try_from(union.len() - gone.len()).expect("fits")
    );
}

async fn group_full(s: AnyStore) {
    s.create_group(
        &group(9, 1),
        &[(1, role::OWNER), (2, role::MEMBER), (3, role::MEMBER)],
        1,
    )
    .await
    .expect("create");
    let (g, added) = s
        .add_group_members(9, &[4, 5], role::MEMBER, 5, 2)
        .await
        .expect("fill up to the limit");
    assert_eq!((added, g.member_count), (2, 5));
    match s.add_group_members(9, &[6], role::MEMBER, 5, 3).await {
        Err(StoreError::GroupFull { group, limit }) => assert_eq!((group, limit), (9, 5)),
        other => panic!("expected GroupFull, got {other:?}"),
    }
    // New and existing together: refused as a whole.
    match s.add_group_members(9, &[2, 7], role::MEMBER, 5, 3).await {
        Err(StoreError::GroupFull { .. }) => {}
        other => panic!("expected GroupFull, got {other:?}"),
    }
    assert_eq!(s.group_member(9, 6).await.expect("member"), None);
    assert_eq!(s.group_member(9, 7).await.expect("member"), None);
    assert_eq!(assert_count_is_real(&s, 9).await, 5);
    // Only existing members: nothing to add, not full.
    let (g, added) = s
        .add_group_members(9, &[2, 3], role::MEMBER, 5, 4)
        .await
        .expect("existing members at the limit");
    assert_eq!((added, g.member_count), (0, 5));
    // Room again after a removal.
    s.remove_group_member(9, 5, 5).await.expect("remove");
    let (g, added) = s
        .add_group_members(9, &[6], role::MEMBER, 5, 6)
        .await
        .expect("add after removal");
    assert_eq!((added, g.member_count), (1, 5));
    let app: gochat_infra::AppError = StoreError::GroupFull { group: 9, limit: 5 }.into();
    assert_eq!(app.code, gochat_infra::ErrorCode::GroupFull);
}

async fn group_members_paging(s: AnyStore) {
    s.create_group(&group(3, 50), &[(50, role::OWNER), (40, role::MEMBER)], 1)
        .await
        .expect("create");
    // Added in several calls: join order is call order, then list order.
    s.add_group_members(3, &[30, 35], role::MEMBER, 100, 2)
        .await
        .expect("add");
    s.add_group_members(3, &[20], role::ADMIN, 100, 3)
        .await
        .expect("add");
    s.add_group_members(3, &[45, 10, 25], role::MEMBER, 100, 4)
        .await
        .expect("add");
    let order = vec![50, 40, 30, 35, 20, 45, 10, 25];

    let (page, total) = s.group_members(3, 0, 3).await.expect("page 1");
    assert_eq!(total, 8);
    assert_eq!(
        page.iter().map(|m| m.user_id).collect::<Vec<_>>(),
        order[0..3]
    );
    assert_eq!(page[0].role, role::OWNER);
    let (page, _) = s.group_members(3, 3, 3).await.expect("page 2");
    assert_eq!(
        page.iter().map(|m| m.user_id).collect::<Vec<_>>(),
        order[3..6]
    );
    assert_eq!(page[1].role, role::ADMIN);
    assert_eq!(page[1].joined_at, 3);
    let (page, _) = s.group_members(3, 6, 3).await.expect("page 3");
    assert_eq!(
        page.iter().map(|m| m.user_id).collect::<Vec<_>>(),
        order[6..8]
    );
    let (page, total) = s.group_members(3, 8, 3).await.expect("past the end");
    assert!(page.is_empty());
    assert_eq!(total, 8);
    let (page, _) = s.group_members(3, 0, 100).await.expect("all");
    assert_eq!(page.iter().map(|m| m.user_id).collect::<Vec<_>>(), order);
    assert_eq!(s.group_member_ids(3).await.expect("ids"), order);

    // A removed member leaves a hole the order closes over.
    s.remove_group_member(3, 30, 5).await.expect("remove");
    let (page, total) = s.group_members(3, 1, 3).await.expect("after removal");
    assert_eq!(total, 7);
    assert_eq!(
        page.iter().map(|m| m.user_id).collect::<Vec<_>>(),
        vec![40, 35, 20]
    );
    let (page, total) = s.group_members(404, 0, 10).await.expect("unknown group");
    assert!(page.is_empty());
    assert_eq!(total, 0);

    // Id pages: by offset, then on after the last row read, in the same order.
    let users = |rows: &[(i64, i64)]| rows.iter().map(|r| r.1).collect::<Vec<_>>();
    let first = s
        .member_ids_page(3, MemberCursor::Offset(0), 3)
        .await
        .expect("first id page");
    assert_eq!(users(&first), vec![50, 40, 35]);
    assert!(first.windows(2).all(|w| w[0].0 < w[1].0), "row ids ascend");
    let last_row = first.last().expect("a row").0;
    // A member before the cursor leaving moves nothing after it.
    s.remove_group_member(3, 40, 6).await.expect("remove");
    let second = s
        .member_ids_page(3, MemberCursor::After(last_row), 3)
        .await
        .expect("second id page");
    assert_eq!(users(&second), vec![20, 45, 10]);
    let third = s
        .member_ids_page(3, MemberCursor::After(second[2].0), 3)
        .await
        .expect("third id page");
    assert_eq!(users(&third), vec![25]);
    let past = s
        .member_ids_page(3, MemberCursor::After(third[0].0), 3)
        .await
        .expect("past the end");
    assert!(past.is_empty());
    assert_eq!(
        users(
            &s.member_ids_page(3, MemberCursor::Offset(2), 10)
                .await
                .expect("from an offset")
        ),
        vec![20, 45, 10, 25]
    );
    assert!(
        s.member_ids_page(404, MemberCursor::After(0), 10)
            .await
            .expect("unknown group")
            .is_empty()
    );
}

async fn single_conversation_idempotent(s: AnyStore) {
    let (c, created) = s
        .ensure_single_conversation("s_1_2", 1, 2, 1_700_000_000_000)
        .await
        .expect("ensure");
    assert!(created);
    assert_eq!((c.id.as_str(), c.kind, c.group_id), ("s_1_2", 1, None));
    assert_eq!(c.last_seq, 0);
    assert_eq!(c.created_at, 1_700_000_000_000);
    let (c2, created) = s
        .ensure_single_conversation("s_1_2", 1, 2, 1_800_000_000_000)
        .await
        .expect("ensure again");
    assert!(!created);
    assert_eq!(c2, c, "the second call changes nothing");

    // Eight at once on a new pair: exactly one creates it.
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move {
                s.ensure_single_conversation("s_3_4", 3, 4, 5)
                    .await
                    .expect("concurrent ensure")
            })
        })
        .collect();
    let mut creators = 0;
    for t in tasks {
        let (c, created) = t.await.expect("ensure task");
        assert_eq!(c.id, "s_3_4");
        creators += usize::from(created);
    }
    assert_eq!(creators, 1);

    // A conversation made by a message first, then ensured: not created again, members added.
    save_new(&s, msg(1, "s_5_6", 5, 1, None)).await;
    let (c, created) = s
        .ensure_single_conversation("s_5_6", 5, 6, 9)
        .await
        .expect("ensure after a message");
    assert!(!created);
    assert_eq!(c.last_seq, 1);
    let (list, _) = s.user_conversations(6, 0, 10).await.expect("list");
    assert!(list.iter().any(|u| u.conversation.id == "s_5_6"));

    let ids = |list: Vec<UserConversation>| -> BTreeSet<String> {
        list.into_iter().map(|u| u.conversation.id).collect()
    };
    let (l1, t1) = s.user_conversations(1, 0, 10).await.expect("list 1");
    assert_eq!(
        ids(l1),
        BTreeSet::from(["s_1_2".to_owned(), "world".to_owned()])
    );
    assert_eq!(t1, 2);
    let (l3, _) = s.user_conversations(3, 0, 10).await.expect("list 3");
    assert_eq!(
        ids(l3),
        BTreeSet::from(["s_3_4".to_owned(), "world".to_owned()])
    );

    assert!(matches!(
        s.ensure_single_conversation("s_2_1", 2, 1, 1).await,
        Err(StoreError::Invalid(_))
    ));
}

async fn user_conversations_listing(s: AnyStore) {
    let me = 1;
    let base = now_ms() + 60_000;
    s.ensure_single_conversation("s_1_2", 1, 2, 1)
        .await
        .expect("s_1_2");
    s.ensure_single_conversation("s_1_3", 1, 3, 1)
        .await
        .expect("s_1_3");
    s.ensure_single_conversation("s_2_3", 2, 3, 1)
        .await
        .expect("s_2_3");
    s.create_group(&group(70, 1), &[(1, role::OWNER), (2, role::MEMBER)], 1)
        .await
        .expect("group 70");
    s.create_group(&group(71, 2), &[(2, role::OWNER)], 1)
        .await
        .expect("group 71 without me");
    // A conversation I am in but that has no messages yet.
    s.ensure_single_conversation("s_1_4", 1, 4, 1)
        .await
        .expect("s_1_4");

    // Activity order (oldest first): world, s_1_2, g_70, s_1_3; s_2_3 and g_71 are not mine.
    let at = |k: i64| base + k * 1000;
    let put = |id: i64, conv: &str, seq: i64, k: i64| {
        let mut m = msg(id, conv, 2, seq, None);
        m.created_at = at(k);
        m
    };
    let batch = vec![
        put(1, "world", 1, 1),
        put(2, "s_1_2", 1, 2),
        put(3, "s_1_2", 2, 3),
        put(4, "g_70", 1, 4),
        put(5, "s_1_3", 1, 5),
        put(6, "s_2_3", 1, 6),
        put(7, "g_71", 1, 7),
    ];
    s.save_messages(&batch).await.expect("save");
    s.update_read_pointer(me, "s_1_2", 1, 1)
        .await
        .expect("read s_1_2");
    s.update_read_pointer(2, "s_1_3", 1, 1)
        .await
        .expect("someone else's pointer");

    let (list, total) = s.user_conversations(me, 0, 10).await.expect("list");
    assert_eq!(total, 5);
    let order: Vec<&str> = list.iter().map(|u| u.conversation.id.as_str()).collect();
    assert_eq!(order[..4], ["s_1_3", "g_70", "s_1_2", "world"]);
    assert_eq!(order[4], "s_1_4", "no messages: ordered by its creation");
    let by = |id: &str| {
        list.iter()
            .find(|u| u.conversation.id == id)
            .expect("listed")
            .clone()
    };
    let s12 = by("s_1_2");
    assert_eq!(s12.last_read_seq, 1);
    assert_eq!(s12.conversation.last_seq, 2);
    assert_eq!(s12.unread(), 1);
    assert_eq!(s12.last_message, Some(batch[2].clone()));
    let s13 = by("s_1_3");
    assert_eq!((s13.last_read_seq, s13.unread()), (0, 1));
    assert_eq!(s13.last_message.as_ref().map(|m| m.id), Some(5));
    let w = by("world");
    assert_eq!(w.conversation.kind, 3);
    assert_eq!(w.last_message.as_ref().map(|m| m.id), Some(1));
    let g = by("g_70");
    assert_eq!(g.conversation.group_id, Some(70));
    let empty = by("s_1_4");
    assert_eq!(empty.last_message, None);
    assert_eq!(empty.unread(), 0);

    // Pages.
    let (p1, t) = s.user_conversations(me, 0, 2).await.expect("page 1");
    let (p2, _) = s.user_conversations(me, 2, 2).await.expect("page 2");
    let (p3, _) = s.user_conversations(me, 4, 2).await.expect("page 3");
    assert_eq!(t, 5);
    let paged: Vec<String> = p1
        .iter()
        .chain(&p2)
        .chain(&p3)
        .map(|u| u.conversation.id.clone())
        .collect();
    assert_eq!(paged, order);

    // New activity moves a conversation to the top.
    let mut m = msg(8, "s_1_2", 1, 3, None);
    m.created_at = at(10);
    save_new(&s, m).await;
    let (list, _) = s.user_conversations(me, 0, 1).await.expect("list");
    assert_eq!(list[0].conversation.id, "s_1_2");
    assert_eq!(list[0].unread(), 2);

    // Someone in no conversation still sees the world room.
    let (list, total) = s.user_conversations(12345, 0, 10).await.expect("list");
    assert_eq!(total, 1);
    assert_eq!(list[0].conversation.id, "world");
}

async fn read_pointer_rules(s: AnyStore) {
    let conv = "s_1_2";
    s.ensure_single_conversation(conv, 1, 2, 1)
        .await
        .expect("ensure");
    let batch: Vec<Message> = (1..=5).map(|q| msg(q, conv, 2, q, None)).collect();
    s.save_messages(&batch).await.expect("save");
    assert_eq!(s.read_pointer(1, conv).await.expect("pointer"), 0);

    assert_eq!(
        s.update_read_pointer(1, conv, 3, 10).await.expect("up"),
        (3, 5)
    );
    assert_eq!(s.read_pointer(1, conv).await.expect("pointer"), 3);
    assert_eq!(
        s.update_read_pointer(1, conv, 2, 11).await.expect("back"),
        (3, 5),
        "never backwards"
    );
    assert_eq!(
        s.update_read_pointer(1, conv, 0, 11).await.expect("zero"),
        (3, 5)
    );
    assert_eq!(
        s.update_read_pointer(1, conv, 99, 12).await.expect("past"),
        (5, 5),
        "never past the last seq"
    );
    assert_eq!(s.read_pointer(1, conv).await.expect("pointer"), 5);
    assert_eq!(
        s.update_read_pointer(1, conv, -4, 12)
            .await
            .expect("negative"),
        (5, 5)
    );
    // Another user's pointer is separate.
    assert_eq!(s.read_pointer(2, conv).await.expect("pointer"), 0);
    assert_eq!(
        s.update_read_pointer(2, conv, 99, 1).await.expect("2"),
        (5, 5)
    );

    // New messages raise the ceiling.
    s.save_messages(&[msg(6, conv, 2, 6, None), msg(7, conv, 2, 7, None)])
        .await
        .expect("save more");
    assert_eq!(
        s.update_read_pointer(1, conv, 6, 13).await.expect("up"),
        (6, 7)
    );
    let (list, _) = s.user_conversations(1, 0, 10).await.expect("list");
    let row = list
        .iter()
        .find(|u| u.conversation.id == conv)
        .expect("listed");
    assert_eq!((row.last_read_seq, row.unread()), (6, 1));

    // A pointer on an empty conversation stays 0.
    s.ensure_single_conversation("s_1_3", 1, 3, 1)
        .await
        .expect("ensure");
    assert_eq!(
        s.update_read_pointer(1, "s_1_3", 3, 1).await.expect("up"),
        (0, 0)
    );

    match s.update_read_pointer(1, "s_1_9", 1, 1).await {
        Err(StoreError::ConversationNotFound(c)) => assert_eq!(c, "s_1_9"),
        other => panic!("expected ConversationNotFound, got {other:?}"),
    }
}

async fn concurrent_read_pointer_updates(s: AnyStore) {
    // One user reading on eight devices at once: every call succeeds, the pointer ends at the
    // highest seq any of them read, and no call ever sees it move backwards.
    let conv = "s_1_2";
    let batch: Vec<Message> = (1..=50).map(|q| msg(q, conv, 2, q, None)).collect();
    s.save_messages(&batch).await.expect("save");
    let tasks: Vec<_> = (0..8i64)
        .map(|d| {
            let s = s.clone();
            tokio::spawn(async move {
                let mut seen = 0;
                for k in 0..6i64 {
                    let target = 1 + (d * 7 + k * 11) % 50;
                    let (pointer, last) = s
                        .update_read_pointer(1, conv, target, k)
                        .await
                        .unwrap_or_else(|e| panic!("device {d} reading to {target}: {e:?}"));
                    assert_eq!(last, 50);
                    assert!(pointer >= target, "pointer {pointer} below {target}");
                    assert!(
                        pointer >= seen,
                        "pointer went back from {seen} to {pointer}"
                    );
                    seen = pointer;
                }
                seen
            })
        })
        .collect();
    let mut highest = 0;
    for t in tasks {
        highest = highest.max(t.await.expect("device task"));
    }
    let want = (0..8i64)
        .flat_map(|d| (0..6i64).map(move |k| 1 + (d * 7 + k * 11) % 50))
        .max()
        .expect("some targets");
    assert_eq!(highest, want);
    assert_eq!(s.read_pointer(1, conv).await.expect("pointer"), want);
}

async fn seq_floor_and_reserve(s: AnyStore) {
    let conv = "g_1234";
    assert_eq!(s.seq_floor(conv).await.expect("floor"), 0, "unknown: 0");
    assert_eq!(s.reserve_seq(conv, 5).await.expect("reserve"), 5);
    assert_eq!(s.seq_floor(conv).await.expect("floor"), 5);
    assert_eq!(s.reserve_seq(conv, 1).await.expect("reserve"), 6);
    assert_eq!(
        s.reserve_seq(conv, 0).await.expect("reserve"),
        7,
        "at least one"
    );

    // Storing below the floor does not lower it.
    let batch: Vec<Message> = (1..=3).map(|q| msg(q, conv, 1, q, None)).collect();
    s.save_messages(&batch).await.expect("save");
    assert_eq!(s.seq_floor(conv).await.expect("floor"), 7);
    // Storing above it raises it, and later reservations start above what is stored.
    save_new(&s, msg(10, conv, 1, 10, None)).await;
    assert_eq!(s.seq_floor(conv).await.expect("floor"), 10);
    assert_eq!(s.reserve_seq(conv, 2).await.expect("reserve"), 12);
    assert_eq!(s.seq_floor(conv).await.expect("floor"), 12);

    // A conversation with messages only (no reservation) floors at its largest seq.
    s.save_messages(&[msg(20, "s_1_2", 1, 4, None)])
        .await
        .expect("save");
    assert_eq!(s.seq_floor("s_1_2").await.expect("floor"), 4);
    assert_eq!(s.reserve_seq("s_1_2", 1).await.expect("reserve"), 5);

    assert!(matches!(
        s.reserve_seq("bogus", 1).await,
        Err(StoreError::Invalid(_))
    ));
}

async fn concurrent_reserve_seq(s: AnyStore) {
    // Eight reservers, ten blocks of 3 each: every seq handed out once, none skipped.
    let conv = "world";
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                for _ in 0..10 {
                    let end = s.reserve_seq(conv, 3).await.expect("concurrent reserve");
                    got.extend(end - 2..=end);
                }
                got
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("reserve task"));
    }
    all.sort_unstable();
    assert_eq!(all, (1..=240).collect::<Vec<_>>());
    assert_eq!(s.seq_floor(conv).await.expect("floor"), 240);
}
