//! End-to-end tests of `gochat serve`: real WebSocket and HTTP clients against the real server
//! on 127.0.0.1:0 (see `common`).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// The seqs of a history page, in page order.
fn seqs_of(page: &Value) -> Vec<i64> {
    page["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["seq_id"].as_i64().expect("seq"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn register_login_refresh_logout() {
    let (_tmp, dir) = data_dir();
    let s = Server::start(&dir);
    let u = user(&s, "alice").await;
    let (st, me) = get(&s.url("/users/me"), Some(&u.access)).await;
    assert_eq!(st, 200, "{me}");
    assert_eq!(me["user"]["id"], u.id.as_str());

    // Duplicate username, wrong password, bad body.
    let (st, body) = post(
        &s.url("/auth/register"),
        None,
        json!({"username": u.username, "password": "password123"}),
    )
    .await;
    assert_eq!((st, body["code"].as_u64()), (409, Some(2001)), "{body}");
    let (st, body) = post(
        &s.url("/auth/login"),
        None,
        json!({"username": u.username, "password": "wrong-password"}),
    )
    .await;
    assert_eq!((st, body["code"].as_u64()), (401, Some(2002)), "{body}");
    let (st, body) = post(&s.url("/auth/register"), None, json!({"username": "x"})).await;
    assert_eq!((st, body["code"].as_u64()), (400, Some(1001)), "{body}");

    // Refresh: new tokens work, the old refresh token is refused.
    let (st, fresh) = post(
        &s.url("/auth/refresh"),
        None,
        json!({"refresh_token": u.refresh}),
    )
    .await;
    assert_eq!(st, 200, "{fresh}");
    let new_access = fresh["access_token"].as_str().expect("access").to_owned();
    let new_refresh = fresh["refresh_token"].as_str().expect("refresh").to_owned();
    assert!(fresh["expires_in"].as_i64().expect("expires_in") > 0);
    let (st, body) = post(
        &s.url("/auth/refresh"),
        None,
        json!({"refresh_token": u.refresh}),
    )
    .await;
    assert_eq!(
        (st, body["code"].as_u64()),
        (401, Some(1002)),
        "old refresh token: {body}"
    );

    // Logout stops both tokens at once (of a fresh login: the replay above ended that session).
    let u2 = login(&s, &u.username).await;
    let _ = (new_access, new_refresh);
    let (st, _) = delete(&s.url("/auth/logout"), Some(&u2.access)).await;
    assert_eq!(st, 200);
    let (st, body) = get(&s.url("/users/me"), Some(&u2.access)).await;
    assert_eq!((st, body["code"].as_u64()), (401, Some(1002)), "{body}");
    let (st, _) = post(
        &s.url("/auth/refresh"),
        None,
        json!({"refresh_token": u2.refresh}),
    )
    .await;
    assert_eq!(st, 401);
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_to_one_chat_both_ways_with_two_devices() {
    let (_tmp, dir) = data_dir();
    let s = Server::start(&dir);
    let a = user(&s, "alice").await;
    let b = user(&s, "bob").await;
    let conv = single(&s, &a, &b).await;
    assert_eq!(
        single(&s, &b, &a).await,
        conv,
        "the same id from either side"
    );

    let mut a1 = Ws::connect(&s, &a.access).await;
    let mut a2 = Ws::connect(&s, &a.access).await;
    let mut b1 = Ws::connect(&s, &b.access).await;
    for i in 1..=3 {
        a1.send_message(&conv, &format!("hi {i}"), &format!("a-{i}"))
            .await;
        let ack = a1.next_of("message-ack").await;
        assert_eq!(ack["data"]["seq_id"], i, "{ack}");
        assert_eq!(ack["data"]["client_msg_id"], format!("a-{i}"));
        assert!(
            ack["data"]["message_id"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
        let got = b1.next_of("new-message").await;
        assert_eq!(got["data"]["seq_id"], i);
        assert_eq!(got["data"]["content"], format!("hi {i}"));
        assert_eq!(got["data"]["sender_id"], a.id.as_str());
        assert_eq!(got["data"]["message_id"], ack["data"]["message_id"]);
        let other = a2.next_of("new-message").await;
        assert_eq!(other["data"]["seq_id"], i, "the sender's second device");
    }
    b1.send_message(&conv, "hello back", "b-1").await;
    assert_eq!(b1.next_of("message-ack").await["data"]["seq_id"], 4);
    assert_eq!(
        a1.next_of("new-message").await["data"]["content"],
        "hello back"
    );
    assert_eq!(a2.next_of("new-message").await["data"]["seq_id"], 4);

    // ping / pong
    a1.send("ping", json!({})).await;
    a1.next_of("pong").await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn offline_recipient_catches_up_by_seq_and_reads() {
    let (_tmp, dir) = data_dir();
    let s = Server::start(&dir);
    let a = user(&s, "alice").await;
    let b = user(&s, "bob").await;
    let conv = single(&s, &a, &b).await;
    let mut a1 = Ws::connect(&s, &a.access).await;
    for i in 1..=5 {
        a1.send_message(&conv, &format!("m{i}"), &format!("c{i}"))
            .await;
        a1.next_of("message-ack").await;
    }
    // Bob comes online later.
    let _b1 = Ws::connect(&s, &b.access).await;
    let (st, list) = get(
        &s.url("/conversations?page=1&page_size=20"),
        Some(&b.access),
    )
    .await;
    assert_eq!(st, 200, "{list}");
    let convs = list["conversations"].as_array().expect("list");
    assert!(
        convs.iter().any(|c| c["id"] == "world"),
        "the world room is always listed"
    );
    let c = convs
        .iter()
        .find(|c| c["id"] == conv.as_str())
        .expect("the chat is listed");
    assert_eq!(c["unread_count"], 5);
    assert_eq!(c["last_message"]["content"], "m5");
    assert_eq!(convs[0]["id"], conv.as_str(), "newest activity first");

    let (st, page) = get(
        &s.url(&format!(
            "/conversations/{conv}/messages?after_seq=0&limit=3"
        )),
        Some(&b.access),
    )
    .await;
    assert_eq!(st, 200, "{page}");
    let seqs = seqs_of(&page);
    assert_eq!(seqs, vec![1, 2, 3]);
    assert_eq!(page["has_more"], true);
    let (_, page) = get(
        &s.url(&format!("/conversations/{conv}/messages?after_seq=3")),
        Some(&b.access),
    )
    .await;
    let seqs = seqs_of(&page);
    assert_eq!(seqs, vec![4, 5]);
    assert_eq!(page["has_more"], false);
    let (_, page) = get(
        &s.url(&format!("/conversations/{conv}/messages?before_seq=3")),
        Some(&b.access),
    )
    .await;
    let seqs = seqs_of(&page);
    assert_eq!(seqs, vec![2, 1], "newest first");

    let (st, r) = post(
        &s.url(&format!("/conversations/{conv}/read")),
        Some(&b.access),
        json!({"seq_id": 3}),
    )
    .await;
    assert_eq!((st, r["unread_count"].as_i64()), (200, Some(2)), "{r}");
    let (_, r) = post(
        &s.url(&format!("/conversations/{conv}/read")),
        Some(&b.access),
        json!({"seq_id": 1}),
    )
    .await;
    assert_eq!(r["unread_count"], 2, "never backwards");
    let (_, r) = post(
        &s.url(&format!("/conversations/{conv}/read")),
        Some(&b.access),
        json!({"seq_id": 99}),
    )
    .await;
    assert_eq!(r["unread_count"], 0, "clamped to the last seq");
    let (_, list) = get(&s.url("/conversations"), Some(&b.access)).await;
    let c = list["conversations"]
        .as_array()
        .expect("list")
        .iter()
        .find(|c| c["id"] == conv.as_str())
        .cloned()
        .expect("listed");
    assert_eq!(c["unread_count"], 0);
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn groups_membership_rules() {
    let (_tmp, dir) = data_dir();
    let s = Server::start(&dir);
    let owner = user(&s, "owner").await;
    let m1 = user(&s, "member").await;
    let m2 = user(&s, "later").await;
    let stranger = user(&s, "stranger").await;
    let (st, g) = post(
        &s.url("/groups"),
        Some(&owner.access),
        json!({"name": "team", "member_ids": [m1.id]}),
    )
    .await;
    assert_eq!(st, 201, "{g}");
    let gid = g["group"]["id"].as_str().expect("gid").to_owned();
    let conv = g["group"]["conversation_id"]
        .as_str()
        .expect("conv")
        .to_owned();
    assert_eq!(g["group"]["member_count"], 2);
    let (st, g) = post(
        &s.url(&format!("/groups/{gid}/members")),
        Some(&m1.access),
        json!({"user_ids": [m2.id, m1.id]}),
    )
    .await;
    assert_eq!(
        (st, g["group"]["member_count"].as_i64()),
        (200, Some(3)),
        "{g}"
    );
    let (st, members) = get(
        &s.url(&format!("/groups/{gid}/members?offset=0&limit=200")),
        Some(&m2.access),
    )
    .await;
    assert_eq!(st, 200, "{members}");
    assert_eq!(members["total"], 3);
    assert!(
        members["members"]
            .as_array()
            .expect("members")
            .iter()
            .all(|m| m["user"]["id"].is_string())
    );

    // A stranger can neither read nor send nor see the group.
    let (st, body) = get(&s.url(&format!("/groups/{gid}")), Some(&stranger.access)).await;
    assert_eq!((st, body["code"].as_u64()), (403, Some(4001)), "{body}");
    let (st, body) = get(
        &s.url(&format!("/conversations/{conv}/messages")),
        Some(&stranger.access),
    )
    .await;
    assert_eq!((st, body["code"].as_u64()), (403, Some(4001)), "{body}");
    let mut ws = Ws::connect(&s, &stranger.access).await;
    ws.send_message(&conv, "let me in", "s-1").await;
    let err = ws.next_of("error").await;
    assert_eq!(err["data"]["code"], 4001, "{err}");
    assert_eq!(err["data"]["client_msg_id"], "s-1");

    // Members chat; then the owner removes m2, who loses access.
    let mut o = Ws::connect(&s, &owner.access).await;
    let mut w2 = Ws::connect(&s, &m2.access).await;
    assert_online(&s, &owner.access, &gid, &[m2.id.clone()].into()).await;
    o.send_message(&conv, "welcome", "o-1").await;
    assert_eq!(o.next_of("message-ack").await["data"]["seq_id"], 1);
    assert_eq!(
        w2.next_of("new-message").await["data"]["content"],
        "welcome"
    );
    let (st, body) = delete(
        &s.url(&format!("/groups/{gid}/members/{}", m2.id)),
        Some(&m1.access),
    )
    .await;
    assert_eq!(st, 403, "only the owner removes others: {body}");
    let (st, _) = delete(
        &s.url(&format!("/groups/{gid}/members/{}", m2.id)),
        Some(&owner.access),
    )
    .await;
    assert_eq!(st, 200);
    w2.send_message(&conv, "still here?", "m2-1").await;
    assert_eq!(w2.next_of("error").await["data"]["code"], 4001);
    let (st, body) = get(
        &s.url(&format!("/conversations/{conv}/messages")),
        Some(&m2.access),
    )
    .await;
    assert_eq!((st, body["code"].as_u64()), (403, Some(4001)), "{body}");
    // Anyone may leave.
    let (st, _) = delete(
        &s.url(&format!("/groups/{gid}/members/{}", m1.id)),
        Some(&m1.access),
    )
    .await;
    assert_eq!(st, 200);
    let (_, g) = get(&s.url(&format!("/groups/{gid}")), Some(&owner.access)).await;
    assert_eq!(g["group"]["member_count"], 1);
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicate_client_msg_id_gets_the_same_ack() {
    let (_tmp, dir) = data_dir();
    let s = Server::start(&dir);
    let a = user(&s, "alice").await;
    let b = user(&s, "bob").await;
    let conv = single(&s, &a, &b).await;
    let mut a1 = Ws::connect(&s, &a.access).await;
    let mut a2 = Ws::connect(&s, &a.access).await;
    a1.send_message(&conv, "once", "dup-1").await;
    let first = a1.next_of("message-ack").await;
    a1.send_message(&conv, "once", "dup-1").await;
    let second = a1.next_of("message-ack").await;
    assert_eq!(first["data"]["message_id"], second["data"]["message_id"]);
    assert_eq!(first["data"]["seq_id"], second["data"]["seq_id"]);
    // Concurrently from two devices.
    a1.send_message(&conv, "twice", "dup-2").await;
    a2.send_message(&conv, "twice", "dup-2").await;
    let x = a1.next_of("message-ack").await;
    let y = a2.next_of("message-ack").await;
    assert_eq!(x["data"]["message_id"], y["data"]["message_id"]);
    assert_eq!(x["data"]["seq_id"], y["data"]["seq_id"]);
    let (_, page) = get(
        &s.url(&format!("/conversations/{conv}/messages?after_seq=0")),
        Some(&b.access),
    )
    .await;
    assert_eq!(
        page["messages"].as_array().expect("messages").len(),
        2,
        "{page}"
    );
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_senders_into_one_group_arrive_in_order() {
    let (_tmp, dir) = data_dir();
    let s = Server::start(&dir);
    let mut users = Vec::new();
    for i in 0..6 {
        users.push(user(&s, &format!("g{i}")).await);
    }
    let ids: Vec<&str> = users[1..].iter().map(|u| u.id.as_str()).collect();
    let (_, g) = post(
        &s.url("/groups"),
        Some(&users[0].access),
        json!({"name": "busy", "member_ids": ids}),
    )
    .await;
    let conv = g["group"]["conversation_id"]
        .as_str()
        .expect("conv")
        .to_owned();
    let mut listeners = Vec::new();
    for u in &users {
        listeners.push(Ws::connect(&s, &u.access).await);
    }
    let per = 250;
    // Every listener reads concurrently from before the first send: a client that stops
    // reading is (rightly) closed as too slow once its outbound queue fills.
    let total = 4 * per;
    let readers: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(n, mut l)| {
            tokio::spawn(async move {
                let mut seqs = Vec::with_capacity(total);
                while seqs.len() < total {
                    let f = l.next_of("new-message").await;
                    seqs.push(f["data"]["seq_id"].as_i64().expect("seq"));
                }
                (n, seqs)
            })
        })
        .collect();
    let mut senders = Vec::new();
    for (k, u) in users.iter().take(4).enumerate() {
        let mut ws = Ws::connect(&s, &u.access).await;
        let conv = conv.clone();
        senders.push(tokio::spawn(async move {
            // In rounds of 25, reading this connection's frames (its acks, and the others'
            // messages to the group) between rounds, so it never stops reading for long.
            for round in 0..per / 25 {
                for i in round * 25..(round + 1) * 25 {
                    ws.send_message(&conv, &format!("s{k}-{i}"), &format!("s{k}-{i}"))
                        .await;
                }
                let mut acks = 0;
                while acks < 25 {
                    let f = ws.next().await.expect("open");
                    if f["type"] == "message-ack" {
                        acks += 1;
                    }
                }
            }
            ws
        }));
    }
    for r in readers {
        let (n, seqs) = r.await.expect("reader");
        assert_eq!(
            seqs,
            (1..=i64::try_from(total).expect("n")).collect::<Vec<_>>(),
            "listener {n}: in order, no gap, no duplicate"
        );
    }
    for t in senders {
        t.await.expect("sender");
    }
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn big_group_goes_through_the_task_path_and_world_reaches_everyone() {
    let (_tmp, dir) = data_dir();
    let s = Server::start(&dir);
    let owner = user(&s, "boss").await;
    // 600 members: registered over HTTP, concurrently.
    let (members, gid, conv) = big_group(&[&s], &owner, 599, &[]).await;
    let (_, g) = get(&s.url(&format!("/groups/{gid}")), Some(&owner.access)).await;
    assert_eq!(g["group"]["member_count"], 600);

    // Every other member online.
    let mut online = Vec::new();
    for m in members.iter().step_by(2) {
        online.push(Ws::connect(&s, &m.access).await);
    }
    let mut boss = Ws::connect(&s, &owner.access).await;
    boss.send_message(&conv, "to everyone", "big-1").await;
    assert_eq!(boss.next_of("message-ack").await["data"]["seq_id"], 1);
    for ws in &mut online {
        let f = ws.next_of("new-message").await;
        assert_eq!(f["data"]["content"], "to everyone");
    }

    // The world room reaches every connected user.
    boss.send_message("world", "hello world", "w-1").await;
    boss.next_of("message-ack").await;
    for ws in &mut online {
        let f = ws.next_of("new-message").await;
        assert_eq!(f["data"]["conversation_id"], "world");
    }
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_clear_errors_and_the_server_stays_up() {
    let (_tmp, dir) = data_dir();
    let mut config = test_config();
    config.auth.access_ttl_secs = 2;
    let s = Server::start_with(&dir, config);
    let a = user(&s, "alice").await;
    let b = user(&s, "bob").await;
    let conv = single(&s, &a, &b).await;

    // Tokens: missing, invalid, expired (below).
    let resp = http()
        .get(format!("http://{}/ws", s.addr))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status().as_u16(), 401);
    let body: Value = resp.json().await.expect("error body");
    assert_eq!(body["code"], 1002);
    let (st, _) = get(&s.url("/conversations"), Some("not-a-token")).await;
    assert_eq!(st, 401);
    let bad = tokio_tungstenite::connect_async(format!("ws://{}/ws?token=garbage", s.addr)).await;
    assert!(
        bad.is_err(),
        "an invalid token is refused before the upgrade"
    );

    let mut ws = Ws::connect(&s, &a.access).await;
    let mut peer = Ws::connect(&s, &b.access).await;
    ws.send_text("{not json".into()).await;
    assert_eq!(ws.next_of("error").await["data"]["code"], 1001);
    ws.send("teleport", json!({})).await;
    assert_eq!(ws.next_of("error").await["data"]["code"], 1001);
    ws.send("send-message", json!({"conversation_id": conv}))
        .await;
    assert_eq!(ws.next_of("error").await["data"]["code"], 1001);
    ws.send_message(&conv, &"x".repeat(6000), "long-1").await;
    assert_eq!(ws.next_of("error").await["data"]["code"], 3002);
    ws.send_message("s_1_2", "not mine", "nm-1").await;
    let e = ws.next_of("error").await;
    assert!(
        e["data"]["code"] == 1003 || e["data"]["code"] == 4001,
        "{e}"
    );
    // Still usable, and the peer is unaffected.
    ws.send_message(&conv, "fine", "ok-1").await;
    assert_eq!(ws.next_of("message-ack").await["data"]["seq_id"], 1);
    assert_eq!(peer.next_of("new-message").await["data"]["content"], "fine");
    // An oversize frame is refused; a far oversize one closes only that connection (1009).
    let mut big = Ws::connect(&s, &a.access).await;
    big.send_text(format!(
        "{{\"type\":\"ping\",\"data\":{{\"x\":\"{}\"}}}}",
        "y".repeat(100_000)
    ))
    .await;
    assert_eq!(big.next_of("error").await["data"]["code"], 1001);
    big.send_text(format!(
        "{{\"type\":\"ping\",\"data\":{{\"x\":\"{}\"}}}}",
        "y".repeat(400_000)
    ))
    .await;
    let closed = big.closed_with().await;
    assert!(closed.is_none_or(|c| c == 1009), "far oversize: {closed:?}");
    ws.send("ping", json!({})).await;
    ws.next_of("pong").await;

    // Expired access token.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (st, body) = get(&s.url("/conversations"), Some(&a.access)).await;
    assert_eq!((st, body["code"].as_u64()), (401, Some(1002)), "{body}");
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_keeps_history_seq_and_unread() {
    let (_tmp, dir) = data_dir();
    let (a, b, conv);
    {
        let s = Server::start(&dir);
        a = user(&s, "alice").await;
        b = user(&s, "bob").await;
        conv = single(&s, &a, &b).await;
        let mut ws = Ws::connect(&s, &a.access).await;
        for i in 1..=3 {
            ws.send_message(&conv, &format!("before {i}"), &format!("r{i}"))
                .await;
            ws.next_of("message-ack").await;
        }
        ws.close().await;
        s.stop();
    }
    let s = Server::start(&dir);
    // The JWT secret was kept in the data directory: old tokens still work.
    let mut ws = Ws::connect(&s, &a.access).await;
    ws.send_message(&conv, "after", "r4").await;
    assert_eq!(ws.next_of("message-ack").await["data"]["seq_id"], 4);
    ws.send_message(&conv, "before 2", "r2").await;
    assert_eq!(
        ws.next_of("message-ack").await["data"]["seq_id"],
        2,
        "dedup survives a restart"
    );
    let (_, page) = get(
        &s.url(&format!("/conversations/{conv}/messages?after_seq=0")),
        Some(&b.access),
    )
    .await;
    let seqs = seqs_of(&page);
    assert_eq!(seqs, vec![1, 2, 3, 4]);
    let (_, list) = get(&s.url("/conversations"), Some(&b.access)).await;
    let unread: HashMap<String, i64> = list["conversations"]
        .as_array()
        .expect("list")
        .iter()
        .map(|c| {
            (
                c["id"].as_str().unwrap_or_default().to_owned(),
                c["unread_count"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    assert_eq!(unread.get(&conv), Some(&4));
    s.stop();
}
