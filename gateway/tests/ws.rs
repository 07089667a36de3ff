//! The WebSocket side of the gateway against a fake logic, a real MemoryBus and real clients.

mod common;

use std::time::Duration;

use common::*;
use futures::SinkExt;
use gochat_gateway::GatewaySettings;
use gochat_infra::wire::{DownstreamKind, DownstreamMessage, UpstreamMessage};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

fn close_code(frame: &Option<tokio_tungstenite::tungstenite::protocol::CloseFrame>) -> u16 {
    frame
        .as_ref()
        .map(|f| u16::from(f.code))
        .expect("a close frame with a code")
}

async fn refused_upgrade(url: String) -> (u16, serde_json::Value) {
    let req = url.into_client_request().expect("request");
    refused_request(req).await
}

async fn refused_request(
    req: tokio_tungstenite::tungstenite::handshake::client::Request,
) -> (u16, serde_json::Value) {
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp.body().clone().expect("error body");
            (
                resp.status().as_u16(),
                serde_json::from_slice(&body).expect("ErrorResponse JSON"),
            )
        }
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("upgrade was accepted"),
    }
}

#[tokio::test]
async fn upgrade_without_a_valid_token_is_refused_with_401() {
    let gw = TestGateway::start(test_settings());
    let (status, body) = refused_upgrade(format!("ws://{}/ws", gw.addr)).await;
    assert_eq!(status, 401);
    assert_eq!(body["code"], 1002);
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(body["trace_id"].as_str().is_some_and(|t| !t.is_empty()));

    let (status, body) = refused_upgrade(gw.ws_url("nope")).await;
    assert_eq!(status, 401);
    assert_eq!(body["code"], 1002);

    // A valid token in the Authorization header works.
    let (_, token) = gw.logic.add_user("alice");
    let mut req = format!("ws://{}/ws", gw.addr)
        .into_client_request()
        .expect("request");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("connect");
    ping_pong(&mut ws).await;
    assert_eq!(gw.stats.snapshot().connections, 1);
}

#[tokio::test]
async fn ping_pong_and_ws_level_ping() {
    let gw = TestGateway::start(test_settings());
    let (_, token) = gw.logic.add_user("alice");
    let mut ws = connect(&gw, &token).await;
    ping_pong(&mut ws).await;
    ws.send(WsMessage::Ping(b"hb".to_vec().into()))
        .await
        .expect("ping");
    // tungstenite consumes the Pong; the connection still answers app-level pings after it.
    ping_pong(&mut ws).await;
}

#[tokio::test]
async fn refused_frames_get_error_frames_and_the_connection_stays_usable() {
    let settings = GatewaySettings {
        max_frame_bytes: 1024,
        max_content_chars: 10,
        ..test_settings()
    };
    let gw = TestGateway::start(settings);
    let (_, alice) = gw.logic.add_user("alice");
    let (_, bob) = gw.logic.add_user("bob");
    let mut a = connect_ready(&gw, &alice).await;
    let mut b = connect_ready(&gw, &bob).await;
    let mut upstream = gw.upstream().await;

    send_text(&mut a, "{not json".into()).await;
    let e = expect_frame(&mut a, "error").await;
    assert_eq!(e["code"], 1001);

    send_json(&mut a, json!({"type": "dance", "data": {}})).await;
    let e = expect_frame(&mut a, "error").await;
    assert_eq!(e["code"], 1001);
    assert!(e["message"].as_str().expect("message").contains("dance"));

    send_json(
        &mut a,
        json!({"type": "send-message", "data": {"conversation_id": "c"}}),
    )
    .await;
    let e = expect_frame(&mut a, "error").await;
    assert_eq!(e["code"], 1001);

    // Over max_frame_bytes (but under the hard limit): refused politely.
    send_json(
        &mut a,
        json!({"type": "ping", "data": {"pad": "x".repeat(2000)}}),
    )
    .await;
    let e = expect_frame(&mut a, "error").await;
    assert_eq!(e["code"], 1001);
    assert!(e["message"].as_str().expect("message").contains("1024"));

    // Over-long content (characters, not bytes) and a bad message type: 3002 with the key.
    send_json(&mut a, send_message("s_1_2", &"é".repeat(11), "long-1")).await;
    let e = expect_frame(&mut a, "error").await;
    assert_eq!(e["code"], 3002);
    assert_eq!(e["client_msg_id"], "long-1");
    let mut bad_type = send_message("s_1_2", "hi", "type-1");
    bad_type["data"]["message_type"] = json!(9);
    send_json(&mut a, bad_type).await;
    let e = expect_frame(&mut a, "error").await;
    assert_eq!(e["code"], 3002);
    assert_eq!(e["client_msg_id"], "type-1");

    a.send(WsMessage::Binary(vec![1, 2, 3].into()))
        .await
        .expect("binary");
    let e = expect_frame(&mut a, "error").await;
    assert_eq!(e["code"], 1001);

    // Still usable: a ping and a valid send (exactly 10 characters) go through.
    ping_pong(&mut a).await;
    send_json(&mut a, send_message("s_1_2", &"é".repeat(10), "ok-1")).await;
    let r = next_record(&mut upstream).await;
    let up: UpstreamMessage = r
        .payload
        .decode::<UpstreamMessage>()
        .expect("upstream JSON")
        .into_owned();
    assert_eq!(
        up.client_msg_id, "ok-1",
        "refused sends never reach the bus"
    );

    // Another user never noticed.
    ping_pong(&mut b).await;
    let snap = gw.stats.snapshot();
    assert_eq!(snap.ws_errors.get(&1001), Some(&5));
    assert_eq!(snap.ws_errors.get(&3002), Some(&2));
    assert_eq!(snap.closed_abuse, 0);
}

#[tokio::test]
async fn a_frame_over_the_hard_limit_closes_with_1009() {
    let gw = TestGateway::start(GatewaySettings {
        max_frame_bytes: 1024,
        ..test_settings()
    });
    let (_, alice) = gw.logic.add_user("alice");
    let mut a = connect_ready(&gw, &alice).await;
    send_text(&mut a, "x".repeat(5000)).await;
    assert_eq!(close_code(&expect_close(&mut a).await), 1009);
}

#[tokio::test]
async fn abuse_closes_the_connection_with_1008() {
    let gw = TestGateway::start(GatewaySettings {
        max_abuse: 3,
        ..test_settings()
    });
    let (_, alice) = gw.logic.add_user("alice");
    let (_, bob) = gw.logic.add_user("bob");
    let mut a = connect_ready(&gw, &alice).await;
    let mut b = connect_ready(&gw, &bob).await;
    for _ in 0..3 {
        send_text(&mut a, "garbage".into()).await;
    }
    for _ in 0..3 {
        assert_eq!(expect_frame(&mut a, "error").await["code"], 1001);
    }
    match next_incoming(&mut a).await {
        Incoming::Close(frame) => assert_eq!(close_code(&frame), 1008),
        other => panic!("expected a close, got {other:?}"),
    }
    ping_pong(&mut b).await;
    gw.wait_stats("abuse close", |s| s.closed_abuse == 1 && s.connections == 1)
        .await;
}

#[tokio::test]
async fn send_message_is_published_upstream_keyed_by_conversation() {
    let gw = TestGateway::start(test_settings());
    let (alice_id, alice) = gw.logic.add_user("alice");
    let mut upstream = gw.upstream().await;
    let mut a = connect_ready(&gw, &alice).await;
    send_json(&mut a, send_message("s_101_102", "hello", "c-1")).await;
    let r = next_record(&mut upstream).await;
    assert_eq!(r.key, "s_101_102");
    let session = r.headers.get("session_id").expect("session header");
    assert!(session.starts_with("gw-1-"), "{session}");
    let trace = r.headers.get("trace_id").expect("trace header");
    let up: UpstreamMessage = r
        .payload
        .decode::<UpstreamMessage>()
        .expect("upstream JSON")
        .into_owned();
    assert_eq!(up.user_id, alice_id);
    assert_eq!(up.gateway_id, "gw-1");
    assert_eq!(up.conversation_id, "s_101_102");
    assert_eq!(up.message_type, 1);
    assert_eq!(up.content, "hello");
    assert_eq!(up.client_msg_id, "c-1");
    assert_eq!(&up.trace_id, trace);
    assert_eq!(up.headers.get("session_id"), Some(session));
    assert!(up.timestamp > 0);
}

#[tokio::test]
async fn a_bus_failure_is_reported_as_1006() {
    let gw = TestGateway::start(test_settings());
    let (_, alice) = gw.logic.add_user("alice");
    let mut a = connect_ready(&gw, &alice).await;
    gw.bus.close();
    send_json(&mut a, send_message("s_101_102", "hello", "c-9")).await;
    let e = expect_frame(&mut a, "error").await;
    assert_eq!(e["code"], 1006);
    assert_eq!(e["client_msg_id"], "c-9");
}

#[tokio::test]
async fn deliveries_reach_the_right_sessions() {
    let gw = TestGateway::start(test_settings());
    let (u, utok) = gw.logic.add_user("alice");
    let (v, vtok) = gw.logic.add_user("bob");
    let mut upstream = gw.upstream().await;
    let mut a1 = connect_ready(&gw, &utok).await;
    let mut a2 = connect_ready(&gw, &utok).await;
    let mut b = connect_ready(&gw, &vtok).await;
    let a1_id = session_id(&mut a1, &mut upstream, "probe-a1").await;
    let a2_id = session_id(&mut a2, &mut upstream, "probe-a2").await;
    assert_ne!(a1_id, a2_id);
    // One key: the records are consumed in this order.
    let key = "k";

    // new-message to alice, not to her sending session a1.
    let mut msg = new_message(&[&u], "s_101_102", 1);
    msg.exclude_session = a1_id.clone();
    gw.publish_down(key, &msg).await;
    // ack only to a1.
    let ack = DownstreamMessage {
        kind: DownstreamKind::MessageAck,
        target_user_id: u.clone(),
        target_session: a1_id.clone(),
        message_id: "7001".into(),
        conversation_id: "s_101_102".into(),
        client_msg_id: "c-1".into(),
        seq_id: 1,
        timestamp: 1_700_000_000_001,
        ..DownstreamMessage::default()
    };
    gw.publish_down(key, &ack).await;
    // error only to a2.
    let error = DownstreamMessage {
        kind: DownstreamKind::Error,
        target_user_id: u.clone(),
        target_session: a2_id.clone(),
        client_msg_id: "c-2".into(),
        error_code: 4001,
        error_message: "not a member".into(),
        ..DownstreamMessage::default()
    };
    gw.publish_down(key, &error).await;
    // online-status about bob to alice's sessions.
    let status = DownstreamMessage {
        kind: DownstreamKind::OnlineStatus,
        targets: vec![u.clone()],
        sender_id: v.clone(),
        is_online: true,
        timestamp: 1_700_000_000_005,
        ..DownstreamMessage::default()
    };
    gw.publish_down(key, &status).await;
    // broadcast to everyone.
    let mut world = new_message(&[], "world", 1);
    world.broadcast = true;
    gw.publish_down(key, &world).await;

    // a1: ack, online-status, world (the new-message was excluded, the error was a2's).
    let ack = expect_frame(&mut a1, "message-ack").await;
    assert_eq!(
        ack,
        json!({"client_msg_id": "c-1", "message_id": "7001", "conversation_id": "s_101_102",
               "seq_id": 1, "timestamp": 1_700_000_000_001i64})
    );
    let st = expect_frame(&mut a1, "online-status").await;
    assert_eq!(
        st,
        json!({"user_id": v, "is_online": true, "timestamp": 1_700_000_000_005i64})
    );
    assert_eq!(
        expect_frame(&mut a1, "new-message").await["conversation_id"],
        "world"
    );

    // a2: new-message, error, online-status, world.
    let nm = expect_frame(&mut a2, "new-message").await;
    assert_eq!(
        nm,
        json!({"message_id": "7001", "conversation_id": "s_101_102", "sender_id": "999",
               "message_type": 1, "content": "hello 1", "seq_id": 1,
               "timestamp": 1_700_000_000_001i64})
    );
    let e = expect_frame(&mut a2, "error").await;
    assert_eq!(
        e,
        json!({"code": 4001, "message": "not a member", "client_msg_id": "c-2"})
    );
    expect_frame(&mut a2, "online-status").await;
    assert_eq!(
        expect_frame(&mut a2, "new-message").await["conversation_id"],
        "world"
    );

    // b: only the broadcast.
    assert_eq!(
        expect_frame(&mut b, "new-message").await["conversation_id"],
        "world"
    );
}

#[tokio::test]
async fn redelivered_seqs_are_dropped_and_malformed_records_skipped() {
    let gw = TestGateway::start(test_settings());
    let (u, utok) = gw.logic.add_user("alice");
    let mut a = connect_ready(&gw, &utok).await;
    for seq in [1, 2, 2, 1] {
        gw.publish_down("k", &new_message(&[&u], "g_5", seq)).await;
    }
    gw.publish_raw_down("k", b"{not json").await;
    gw.publish_down("k", &new_message(&[&u], "g_5", 3)).await;
    gw.publish_down("k", &new_message(&[&u], "g_6", 1)).await;
    for (conversation, seq) in [("g_5", 1), ("g_5", 2), ("g_5", 3), ("g_6", 1)] {
        let nm = expect_frame(&mut a, "new-message").await;
        assert_eq!(
            (nm["conversation_id"].as_str(), nm["seq_id"].as_i64()),
            (Some(conversation), Some(seq))
        );
    }
    let snap = gw.stats.snapshot();
    assert_eq!(snap.duplicates_dropped, 2);
    assert_eq!(snap.downstream_malformed, 1);
}

#[tokio::test]
async fn presence_is_reported_on_first_open_and_last_close() {
    let gw = TestGateway::start(test_settings());
    let (u, utok) = gw.logic.add_user("alice");
    let connected = format!("UserConnected:{u}:gw-1");
    let disconnected = format!("UserDisconnected:{u}:gw-1");
    let presence = |calls: &[String]| -> Vec<String> {
        calls
            .iter()
            .filter(|c| c.starts_with("User"))
            .cloned()
            .collect()
    };

    let mut a1 = connect_ready(&gw, &utok).await;
    gw.wait_calls("UserConnected", |c| c.contains(&connected))
        .await;
    let mut a2 = connect_ready(&gw, &utok).await;
    a1.close(None).await.expect("close");
    assert!(matches!(expect_close(&mut a1).await, Some(_) | None));
    gw.wait_stats("one session left", |s| s.connections == 1)
        .await;
    ping_pong(&mut a2).await;
    a2.close(None).await.expect("close");
    let calls = gw
        .wait_calls("UserDisconnected", |c| c.contains(&disconnected))
        .await;
    assert_eq!(presence(&calls), vec![connected, disconnected]);
}

#[tokio::test]
async fn the_upgrade_is_answered_once_presence_is_reported() {
    let gw = TestGateway::start(GatewaySettings {
        presence_wait: Duration::from_secs(60),
        ..test_settings()
    });
    let (u, utok) = gw.logic.add_user("alice");
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    gw.logic.lock().presence_gate = Some(gate.clone());

    // The client notes in the fake's call log when its connection opened.
    let logic = gw.logic.clone();
    let url = gw.ws_url(&utok);
    let client = tokio::spawn(async move {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("connect");
        logic.lock().calls.push("client-open".to_owned());
        ws
    });
    let connected = format!("UserConnected:{u}:gw-1");
    gw.wait_calls("UserConnected", |c| c.contains(&connected))
        .await;
    // While the report hangs the client stays unanswered (give an eager 101 time to show).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !gw.logic.calls().iter().any(|c| c == "client-open"),
        "101 came before the presence report"
    );
    gate.add_permits(1);
    let mut ws = tokio::time::timeout(GUARD, client)
        .await
        .expect("connect timed out")
        .expect("client task");
    let calls = gw.logic.calls();
    let done = calls
        .iter()
        .position(|c| *c == format!("UserConnected-done:{u}"));
    let open = calls.iter().position(|c| c == "client-open");
    assert!(done.is_some() && done < open, "calls: {calls:?}");
    ping_pong(&mut ws).await;

    // A second device of the same user needs no call and is answered at once.
    let _second = connect_ready(&gw, &utok).await;
    let reports = gw
        .logic
        .calls()
        .iter()
        .filter(|c| c.starts_with("UserConnected:"))
        .count();
    assert_eq!(reports, 1);
    assert_eq!(gw.stats.snapshot().presence_late, 0);
}

/// A connection whose `101` waits for the presence report is not a slow client: what its queue
/// cannot hold meanwhile is dropped (its resync finds those messages), never the connection.
#[tokio::test]
async fn a_held_upgrade_drops_what_does_not_fit_and_still_opens() {
    let gw = TestGateway::start(GatewaySettings {
        presence_wait: Duration::from_secs(60),
        outbound_queue: 4,
        ..test_settings()
    });
    let (u, utok) = gw.logic.add_user("alice");
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    gw.logic.lock().presence_gate = Some(gate.clone());
    let url = gw.ws_url(&utok);
    let client = tokio::spawn(async move {
        tokio_tungstenite::connect_async(url)
            .await
            .expect("connect")
            .0
    });
    let connected = format!("UserConnected:{u}:gw-1");
    gw.wait_calls("UserConnected", |c| c.contains(&connected))
        .await;
    gw.wait_stats("the session is registered", |s| s.connections == 1)
        .await;
    // The first four fill the queue (the delivery channel holds four too, and the actor takes
    // them in its own time); each later one is dropped by the actor, one at a time, so the
    // delivery channel never overflows (that would be a slow client too).
    for seq in 1..=4 {
        gw.publish_down(&u, &new_message(&[&u], "s_1_2", seq)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for seq in 5..=10 {
        gw.publish_down(&u, &new_message(&[&u], "s_1_2", seq)).await;
        gw.wait_stats("what does not fit is dropped", |s| {
            s.held_dropped == seq as u64 - 4
        })
        .await;
    }
    assert_eq!(gw.stats.snapshot().closed_slow, 0);

    gate.add_permits(1);
    let mut ws = tokio::time::timeout(GUARD, client)
        .await
        .expect("connect timed out")
        .expect("client task");
    for seq in 1..=4 {
        let nm = expect_frame(&mut ws, "new-message").await;
        assert_eq!(nm["seq_id"], seq);
    }
    gw.publish_down(&u, &new_message(&[&u], "s_1_2", 11)).await;
    let nm = expect_frame(&mut ws, "new-message").await;
    assert_eq!(nm["seq_id"], 11, "the gap tells the client to resync");
    ping_pong(&mut ws).await;
    let stats = gw.stats.snapshot();
    assert_eq!((stats.closed_slow, stats.held_dropped), (0, 6));
}

#[tokio::test]
async fn an_upgrade_opens_anyway_when_presence_cannot_be_reported() {
    let gw = TestGateway::start(GatewaySettings {
        presence_wait: Duration::from_secs(1),
        ..test_settings()
    });
    let (u, utok) = gw.logic.add_user("alice");
    gw.logic.lock().presence_fails = true;
    let mut a = connect_ready(&gw, &utok).await;
    assert_eq!(gw.stats.snapshot().presence_late, 1);
    // The report is retried until logic takes it.
    gw.logic.lock().presence_fails = false;
    let connected = format!("UserConnected:{u}:gw-1");
    gw.wait_calls("a retried UserConnected", |c| {
        c.iter().filter(|x| **x == connected).count() >= 2
    })
    .await;
    ping_pong(&mut a).await;
    // Now that the user is reported, another device does not wait.
    let _b = connect_ready(&gw, &utok).await;
    assert_eq!(gw.stats.snapshot().presence_late, 1);
}

#[tokio::test]
async fn presence_is_refreshed_periodically() {
    let gw = TestGateway::start(GatewaySettings {
        presence_ttl: Duration::from_secs(3),
        ..test_settings()
    });
    let (u, utok) = gw.logic.add_user("alice");
    let _a = connect_ready(&gw, &utok).await;
    let refresh = format!("RefreshPresence:{u}");
    gw.wait_calls("RefreshPresence", |c| c.contains(&refresh))
        .await;
}

#[tokio::test]
async fn a_silent_connection_is_closed_after_the_heartbeat_timeout() {
    let gw = TestGateway::start(GatewaySettings {
        heartbeat_timeout: Duration::from_millis(300),
        heartbeat_check_interval: Duration::from_millis(50),
        ..test_settings()
    });
    let (_, utok) = gw.logic.add_user("alice");
    let mut a = connect_ready(&gw, &utok).await;
    let frame = expect_close(&mut a).await;
    assert_eq!(close_code(&frame), 1000);
    assert_eq!(frame.expect("frame").reason.as_str(), "heartbeat timeout");
    gw.wait_stats("heartbeat close", |s| s.closed_heartbeat == 1)
        .await;
}

#[tokio::test]
async fn the_heartbeat_sweep_closes_the_silent_connection_and_keeps_the_one_that_pings() {
    let gw = TestGateway::start(GatewaySettings {
        heartbeat_timeout: Duration::from_millis(1_000),
        heartbeat_check_interval: Duration::from_millis(50),
        ..test_settings()
    });
    let (_, silent_tok) = gw.logic.add_user("silent");
    let (_, talker_tok) = gw.logic.add_user("talker");
    let mut silent = connect_ready(&gw, &silent_tok).await;
    let mut talker = connect_ready(&gw, &talker_tok).await;
    // The talker pings ten times a second until the silent one is closed.
    let closed = expect_close(&mut silent);
    let talking = async {
        loop {
            ping_pong(&mut talker).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let frame = tokio::select! {
        frame = closed => frame,
        () = talking => unreachable!("the talker loops until the silent one is closed"),
    };
    assert_eq!(close_code(&frame), 1000);
    assert_eq!(frame.expect("frame").reason.as_str(), "heartbeat timeout");
    gw.wait_stats("one heartbeat close", |s| s.closed_heartbeat == 1)
        .await;
    ping_pong(&mut talker).await;
    assert_eq!(gw.stats.snapshot().closed_heartbeat, 1);
    assert_eq!(gw.stats.snapshot().connections, 1);
}

#[tokio::test]
async fn a_client_that_does_not_read_is_closed_and_others_keep_receiving() {
    let gw = TestGateway::start(GatewaySettings {
        outbound_queue: 8,
        ..test_settings()
    });
    let (slow_id, slow_tok) = gw.logic.add_user("slow");
    let (fast_id, fast_tok) = gw.logic.add_user("fast");

    let mut slow = connect_small_buffer(&gw, &slow_tok).await;
    let mut fast = connect_ready(&gw, &fast_tok).await;

    // Flood the slow client (it never reads) until the gateway gives up on it.
    let big = "x".repeat(16 * 1024);
    let mut seq = 0;
    while gw.stats.snapshot().closed_slow == 0 {
        seq += 1;
        assert!(seq < 20_000, "the slow client was never closed");
        let mut msg = new_message(&[&slow_id], "s_1_2", seq);
        msg.content = big.clone();
        gw.publish_down(&slow_id, &msg).await;
        if seq % 16 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    gw.wait_stats("slow session gone", |s| s.connections == 1)
        .await;

    // The other client is unaffected.
    gw.publish_down(&fast_id, &new_message(&[&fast_id], "s_1_3", 1))
        .await;
    let nm = expect_frame(&mut fast, "new-message").await;
    assert_eq!(nm["seq_id"], 1);
    ping_pong(&mut fast).await;

    // If the close frame made it out behind the backlog, it says 1013.
    if let Some(frame) = expect_close(&mut slow).await {
        assert_eq!(u16::from(frame.code), 1013);
    }
}

/// Publishes `total` new-message records of 16 KiB each (seq 1..=total) to `user`, and waits
/// until the gateway's consumer has offered them all to the user's sessions.
async fn publish_big_messages(gw: &TestGateway, user: &str, total: i64) {
    let big = "y".repeat(16 * 1024);
    for seq in 1..=total {
        let mut msg = new_message(&[user], "s_1_2", seq);
        msg.content = big.clone();
        gw.publish_down(user, &msg).await;
    }
    gw.wait_stats("every delivery consumed", |s| {
        s.downstream_records >= total as u64
    })
    .await;
}

#[tokio::test]
async fn a_client_that_pauses_reading_gets_every_frame_in_order_afterwards() {
    let gw = TestGateway::start(GatewaySettings {
        outbound_queue: 1024,
        ..test_settings()
    });
    let (id, tok) = gw.logic.add_user("sleepy");
    let mut ws = connect_small_buffer(&gw, &tok).await;

    // 9.6 MB while the client reads nothing: more than the socket buffers hold, so the
    // session keeps the rest in its backlog and must drain it once the client reads again (a
    // lost wake-up would stall the reads below until GUARD).
    let total = 600;
    publish_big_messages(&gw, &id, total).await;
    for seq in 1..=total {
        let nm = expect_frame(&mut ws, "new-message").await;
        assert_eq!(nm["seq_id"], seq);
    }
    ping_pong(&mut ws).await;
    let snap = gw.stats.snapshot();
    assert_eq!(snap.closed_slow, 0);
    assert_eq!(snap.connections, 1);
}

#[tokio::test]
async fn shutdown_closes_sessions_with_1001_and_reports_users_offline() {
    let gw = TestGateway::start(test_settings());
    let (u, utok) = gw.logic.add_user("alice");
    let (v, vtok) = gw.logic.add_user("bob");
    let mut a = connect_ready(&gw, &utok).await;
    let mut b = connect_ready(&gw, &vtok).await;
    gw.wait_calls("both online", |c| {
        c.contains(&format!("UserConnected:{u}:gw-1"))
            && c.contains(&format!("UserConnected:{v}:gw-1"))
    })
    .await;
    let logic = gw.logic.clone();
    let closes = async {
        let fa = expect_close(&mut a).await;
        let fb = expect_close(&mut b).await;
        (fa, fb)
    };
    let (stopped, (fa, fb)) = tokio::join!(gw.stop(), closes);
    stopped.expect("run returned an error");
    assert_eq!(close_code(&fa), 1001);
    assert_eq!(close_code(&fb), 1001);
    let calls = logic.calls();
    assert!(
        calls.contains(&format!("UserDisconnected:{u}:gw-1")),
        "{calls:?}"
    );
    assert!(
        calls.contains(&format!("UserDisconnected:{v}:gw-1")),
        "{calls:?}"
    );
}

// ------------------------------------------------------------ the socket itself, byte by byte

/// A client frame: final or not, masked with a fixed key (as every client frame must be).
fn client_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let key = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&key);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    out
}

fn upgrade_request(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// Reads an HTTP response head; returns it and the bytes read after it.
async fn read_head(sock: &mut tokio::net::TcpStream) -> (String, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let read = async {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let rest = buf.split_off(end + 4);
                return (String::from_utf8(buf).expect("ASCII head"), rest);
            }
            let mut chunk = [0u8; 4096];
            let n = sock.read(&mut chunk).await.expect("read");
            assert!(n > 0, "connection closed before a response head");
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(GUARD, read)
        .await
        .expect("response head")
}

/// A raw socket upgraded to WebSocket for `token`, and the bytes read past the `101` head.
async fn raw_upgrade(gw: &TestGateway, token: &str) -> (tokio::net::TcpStream, Vec<u8>) {
    use tokio::io::AsyncWriteExt;
    let mut sock = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    sock.write_all(upgrade_request(&format!("/ws?token={token}")).as_bytes())
        .await
        .expect("write");
    let (head, pending) = read_head(&mut sock).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    (sock, pending)
}

/// Reads one unmasked server frame: (first byte, payload).
async fn read_frame(sock: &mut tokio::net::TcpStream, pending: &mut Vec<u8>) -> (u8, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let read = async {
        loop {
            if pending.len() >= 2 {
                assert_eq!(pending[1] & 0x80, 0, "server frames are never masked");
                let (len, at) = match pending[1] & 0x7F {
                    126 if pending.len() >= 4 => {
                        (u16::from_be_bytes([pending[2], pending[3]]) as usize, 4)
                    }
                    127 if pending.len() >= 10 => (
                        u64::from_be_bytes(pending[2..10].try_into().expect("8 bytes")) as usize,
                        10,
                    ),
                    126 | 127 => (usize::MAX, 0),
                    n => (n as usize, 2),
                };
                if len != usize::MAX && pending.len() >= at + len {
                    let first = pending[0];
                    let payload = pending[at..at + len].to_vec();
                    pending.drain(..at + len);
                    return (first, payload);
                }
            }
            let mut chunk = [0u8; 4096];
            let n = sock.read(&mut chunk).await.expect("read");
            assert!(n > 0, "connection closed before a whole frame");
            pending.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(GUARD, read).await.expect("a frame")
}

const PING_FRAME: &[u8] = br#"{"type":"ping","data":{},"timestamp":1}"#;

#[tokio::test]
async fn frames_sent_with_the_upgrade_request_and_split_across_writes_are_answered() {
    use tokio::io::AsyncWriteExt;
    let gw = TestGateway::start(test_settings());
    let (_, token) = gw.logic.add_user("alice");
    let mut sock = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    // The request and a first frame in one write: the server reads both at once, and the
    // frame must reach the session rather than stay in the HTTP layer's buffer.
    let mut bytes = upgrade_request(&format!("/ws?token={token}")).into_bytes();
    bytes.extend(client_frame(0x1, true, PING_FRAME));
    sock.write_all(&bytes).await.expect("write");
    let (head, mut pending) = read_head(&mut sock).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let head = head.to_ascii_lowercase();
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    assert!(head.contains("x-trace-id: "), "{head}");
    let (first, payload) = read_frame(&mut sock, &mut pending).await;
    assert_eq!(first, 0x81, "a final text frame");
    let pong: serde_json::Value = serde_json::from_slice(&payload).expect("JSON");
    assert_eq!(pong["type"], "pong");

    // One frame written a byte at a time.
    for byte in client_frame(0x1, true, PING_FRAME) {
        sock.write_all(&[byte]).await.expect("write");
        sock.flush().await.expect("flush");
    }
    let (_, payload) = read_frame(&mut sock, &mut pending).await;
    assert!(String::from_utf8_lossy(&payload).contains("\"pong\""));

    // A text message in three fragments, a WebSocket ping between two of them (control
    // frames may come between fragments): the ping is answered first, then the message.
    let (a, b) = PING_FRAME.split_at(10);
    let (b, c) = b.split_at(10);
    let mut bytes = client_frame(0x1, false, a);
    bytes.extend(client_frame(0x0, false, b));
    bytes.extend(client_frame(0x9, true, b"hb"));
    bytes.extend(client_frame(0x0, true, c));
    sock.write_all(&bytes).await.expect("write");
    let (first, payload) = read_frame(&mut sock, &mut pending).await;
    assert_eq!((first, payload.as_slice()), (0x8A, &b"hb"[..]), "the pong");
    let (first, payload) = read_frame(&mut sock, &mut pending).await;
    assert_eq!(first, 0x81);
    assert!(String::from_utf8_lossy(&payload).contains("\"pong\""));

    // The client closes; the server echoes the close and ends the connection.
    sock.write_all(&client_frame(0x8, true, &1000u16.to_be_bytes()))
        .await
        .expect("write");
    let (first, payload) = read_frame(&mut sock, &mut pending).await;
    assert_eq!(first, 0x88);
    assert_eq!(payload[..2], 1000u16.to_be_bytes());
    let mut rest = Vec::new();
    let read = tokio::io::AsyncReadExt::read_to_end(&mut sock, &mut rest);
    tokio::time::timeout(GUARD, read)
        .await
        .expect("the server ends the connection")
        .expect("a clean end, not a reset");
    assert!(rest.is_empty());
    gw.wait_stats("the session closed", |s| s.connections == 0)
        .await;
}

#[tokio::test]
async fn a_fragmented_message_over_the_limit_closes_with_1009() {
    use tokio::io::AsyncWriteExt;
    let settings = GatewaySettings {
        max_frame_bytes: 1024,
        ..test_settings()
    };
    let gw = TestGateway::start(settings);
    let (_, token) = gw.logic.add_user("alice");
    let (mut sock, mut pending) = raw_upgrade(&gw, &token).await;
    // Each fragment is under the frame limit; together they are far over it.
    let part = vec![b'x'; 1000];
    let mut bytes = client_frame(0x1, false, &part);
    for _ in 0..200 {
        bytes.extend(client_frame(0x0, false, &part));
    }
    let _ = sock.write_all(&bytes).await;
    loop {
        let (first, payload) = read_frame(&mut sock, &mut pending).await;
        if first == 0x88 {
            assert_eq!(payload[..2], 1009u16.to_be_bytes());
            break;
        }
    }
}

#[tokio::test]
async fn other_upgrade_requests_get_their_answer_and_the_connection_closes() {
    use tokio::io::AsyncWriteExt;
    let gw = TestGateway::start(test_settings());
    // Any request asking for a WebSocket upgrade goes through the upgrade path: a route that
    // is not `/ws` is answered as usual, then the connection closes.
    let mut sock = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    sock.write_all(upgrade_request("/healthz").as_bytes())
        .await
        .expect("write");
    let (head, mut body) = read_head(&mut sock).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    let read = tokio::io::AsyncReadExt::read_to_end(&mut sock, &mut body);
    tokio::time::timeout(GUARD, read)
        .await
        .expect("the connection closes")
        .expect("read");
    assert!(!body.is_empty());

    // A WebSocket upgrade without a token: 401 with an ErrorResponse, then the close.
    let mut sock = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    sock.write_all(upgrade_request("/ws").as_bytes())
        .await
        .expect("write");
    let (head, mut body) = read_head(&mut sock).await;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    let read = tokio::io::AsyncReadExt::read_to_end(&mut sock, &mut body);
    tokio::time::timeout(GUARD, read)
        .await
        .expect("the connection closes")
        .expect("read");
    let err: serde_json::Value = serde_json::from_slice(&body).expect("ErrorResponse");
    assert_eq!(err["code"], 1002);

    // A plain GET /ws with a valid token but no upgrade asked: 400 with an ErrorResponse.
    let (_, token) = gw.logic.add_user("alice");
    let resp = reqwest::get(gw.url(&format!("/ws?token={token}")))
        .await
        .expect("request");
    assert_eq!(resp.status().as_u16(), 400);
    let err: serde_json::Value = resp.json().await.expect("ErrorResponse");
    assert_eq!(err["code"], 1001);
}

#[tokio::test]
async fn a_frame_with_a_reserved_bit_set_closes_with_1002() {
    use tokio::io::AsyncWriteExt;
    let gw = TestGateway::start(test_settings());
    let (_, token) = gw.logic.add_user("alice");
    for rsv in [0x40u8, 0x20, 0x10] {
        let (mut sock, mut pending) = raw_upgrade(&gw, &token).await;
        // A valid ping frame first: the session answers it, so the refusal below is the
        // reserved bit's and not the connection's.
        let mut frame = client_frame(0x1, true, PING_FRAME);
        sock.write_all(&frame).await.expect("write");
        let (first, payload) = read_frame(&mut sock, &mut pending).await;
        assert_eq!(first, 0x81, "a text frame");
        assert!(String::from_utf8_lossy(&payload).contains("pong"));
        // The same text frame with a reserved bit set (what a compressed frame looks like
        // to a server that negotiated no extension): valid UTF-8 or not, it is a protocol error.
        frame[0] |= rsv;
        sock.write_all(&frame).await.expect("write");
        let (first, payload) = read_frame(&mut sock, &mut pending).await;
        assert_eq!(first, 0x88, "a close frame");
        assert_eq!(payload[..2], 1002u16.to_be_bytes(), "rsv {rsv:#x}");
    }
}

#[tokio::test]
async fn a_frame_announcing_more_than_the_limit_closes_with_1009_before_its_payload() {
    use tokio::io::AsyncWriteExt;
    let gw = TestGateway::start(test_settings());
    let (_, token) = gw.logic.add_user("alice");
    let (mut sock, mut pending) = raw_upgrade(&gw, &token).await;
    // A masked text frame header announcing 2^62 bytes, and none of them: the server must
    // refuse it from the header alone instead of waiting (and buffering) for the payload.
    let mut header = vec![0x81, 0x80 | 127];
    header.extend_from_slice(&(1u64 << 62).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    sock.write_all(&header).await.expect("write");
    let (first, payload) = read_frame(&mut sock, &mut pending).await;
    assert_eq!(first, 0x88, "a close frame");
    assert_eq!(payload[..2], 1009u16.to_be_bytes());
}

#[tokio::test]
async fn an_upgrade_the_http_layer_keeps_as_http_is_refused_not_answered_101() {
    use tokio::io::AsyncWriteExt;
    let gw = TestGateway::start(test_settings());
    let (_, token) = gw.logic.add_user("alice");
    // `Upgrade: websocket, foo` passes the handshake check but actix-http keeps the request
    // on its HTTP path (it hands over only `websocket` exactly): a 101 here would leave the
    // client's frames to be read as HTTP.
    let mut sock = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    let req = upgrade_request(&format!("/ws?token={token}"))
        .replace("Upgrade: websocket", "Upgrade: websocket, foo");
    sock.write_all(req.as_bytes()).await.expect("write");
    let (head, _) = read_head(&mut sock).await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert_eq!(gw.stats.snapshot().connections, 0);
}

/// After the server's close frame, a client that answers with its own close but keeps its TCP
/// side open does not hold the socket, nor the gateway's shutdown, for `close_grace`.
#[tokio::test]
async fn a_client_that_answers_the_close_but_keeps_tcp_open_does_not_hold_shutdown() {
    use tokio::io::AsyncWriteExt;
    let gw = TestGateway::start(GatewaySettings {
        // Far longer than GUARD: waiting for the client's end of stream would fail the test.
        close_grace: Duration::from_secs(120),
        ..test_settings()
    });
    let (_, token) = gw.logic.add_user("alice");
    let (mut sock, mut pending) = raw_upgrade(&gw, &token).await;
    sock.write_all(&client_frame(0x1, true, PING_FRAME))
        .await
        .expect("write");
    let (_, payload) = read_frame(&mut sock, &mut pending).await;
    assert!(String::from_utf8_lossy(&payload).contains("\"pong\""));

    let stop = tokio::spawn(gw.stop());
    let (first, payload) = read_frame(&mut sock, &mut pending).await;
    assert_eq!(first, 0x88, "a close frame");
    assert_eq!(payload[..2], 1001u16.to_be_bytes());
    // The client's close, after a last text frame; its TCP side stays open.
    let mut bytes = client_frame(0x1, true, PING_FRAME);
    bytes.extend(client_frame(0x8, true, &1001u16.to_be_bytes()));
    sock.write_all(&bytes).await.expect("write");
    tokio::time::timeout(GUARD, stop)
        .await
        .expect("shutdown waited for the client's end of stream")
        .expect("join")
        .expect("run returned an error");
    drop(sock);
}

#[tokio::test]
async fn shutdown_delivers_a_backed_up_clients_frames_then_1001() {
    let gw = TestGateway::start(GatewaySettings {
        outbound_queue: 1024,
        // Long enough for a slow test machine to read 3 MB: this test is about the gateway
        // keeping the socket, not about how fast the client reads.
        close_grace: std::time::Duration::from_secs(60),
        ..test_settings()
    });
    let (id, tok) = gw.logic.add_user("sleepy");
    let mut ws = connect_small_buffer(&gw, &tok).await;
    // More than the socket buffers hold, while the client reads nothing.
    publish_big_messages(&gw, &id, 200).await;
    // Shutdown drains a session's backlog before the 1001: the gateway must keep the socket
    // (and its worker) until the client has read it all, within `close_grace`.
    // The client ends its side once it has the close (the gateway waits for that, up to
    // `close_grace`, before it lets go of the socket).
    // Every delivery offered to the session before the shutdown (the backlog, then what it
    // had not yet taken from its queue: 200 fit in `outbound_queue`) must arrive, in order,
    // and then the close frame, not an abrupt end.
    let read = async move {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let mut next = 1;
        loop {
            match next_incoming(&mut ws).await {
                Incoming::Frame(nm) => {
                    assert_eq!(nm["type"], "new-message");
                    assert_eq!(nm["data"]["seq_id"], next, "in order, no gaps");
                    next += 1;
                }
                Incoming::Close(frame) => {
                    assert_eq!(close_code(&frame), 1001);
                    break;
                }
                Incoming::Ended => panic!("the connection ended without a close frame"),
            }
        }
        assert_eq!(next, 201, "every offered delivery before the close");
        drop(ws);
    };
    let (stopped, ()) = tokio::join!(gw.stop(), read);
    stopped.expect("run returned an error");
}
