//! `/metrics`, `/admin/actors` and `/admin` of `gochat serve`: after real traffic over
//! WebSocket the metrics carry it, and the admin endpoints answer only with the admin token.

mod common;

use common::*;
use serde_json::Value;

/// GET with an optional bearer token: (status, content type, body).
async fn fetch(url: &str, bearer: Option<&str>) -> (u16, String, String) {
    let mut r = http().get(url);
    if let Some(t) = bearer {
        r = r.bearer_auth(t);
    }
    let resp = r.send().await.expect("request");
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (status, content_type, resp.text().await.expect("body"))
}

/// The value of the sample `series` (name and labels exactly as rendered) in Prometheus text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The sum of every sample of `name` whose labels contain all of `labels`.
fn sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (series, value) = rest.rsplit_once(' ')?;
            let ok = (series.is_empty() || series.starts_with('{'))
                && labels.iter().all(|want| series.contains(want));
            ok.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_and_admin_after_real_traffic() {
    let (_tmp, dir) = data_dir();
    let s = Server::start(&dir);
    let a = user(&s, "alice").await;
    let b = user(&s, "bob").await;
    let conv = single(&s, &a, &b).await;
    let mut wa = Ws::connect(&s, &a.access).await;
    let mut wb = Ws::connect(&s, &b.access).await;
    for i in 0..3 {
        wa.send_message(&conv, &format!("hello {i}"), &format!("m{i}"))
            .await;
        assert_eq!(
            wa.next_of("message-ack").await["data"]["seq_id"],
            i + 1,
            "ack {i}"
        );
        assert_eq!(
            wb.next_of("new-message").await["data"]["content"],
            format!("hello {i}")
        );
    }
    // A retry of the first message: acknowledged again, counted as a duplicate.
    wa.send_message(&conv, "hello 0", "m0").await;
    assert_eq!(wa.next_of("message-ack").await["data"]["seq_id"], 1);
    // A refused frame: an error frame, counted by code.
    wa.send_text("not json".to_owned()).await;
    assert_eq!(wa.next_of("error").await["data"]["code"], 1001);

    // /metrics needs the admin token once one is configured (bearer or ?token=).
    let (st, _, _) = fetch(&s.root_url("/metrics"), None).await;
    assert_eq!(st, 401);
    let (st, _, _) = fetch(&s.root_url("/metrics"), Some("wrong-token-0123456789")).await;
    assert_eq!(st, 401);
    let (st, _, by_query) =
        fetch(&s.root_url(&format!("/metrics?token={ADMIN_TOKEN}")), None).await;
    assert_eq!(st, 200);
    assert!(
        by_query.contains("gochat_gateway_connections"),
        "{by_query}"
    );
    let (st, content_type, text) = fetch(&s.root_url("/metrics"), Some(ADMIN_TOKEN)).await;
    assert_eq!(st, 200, "{text}");
    assert!(content_type.starts_with("text/plain"), "{content_type}");

    let at_least = |series: &str, min: f64| {
        let v = sample(&text, series).unwrap_or_else(|| panic!("{series} missing:\n{text}"));
        assert!(v >= min, "{series} = {v}, expected >= {min}");
    };
    at_least("gochat_gateway_connections", 2.0);
    at_least("gochat_gateway_connects_total", 2.0);
    at_least("gochat_actors{kind=\"session\"}", 2.0);
    at_least("gochat_actors{kind=\"conversation\"}", 1.0);
    at_least("gochat_gateway_messages_in_total", 4.0);
    at_least("gochat_gateway_messages_out_total", 3.0);
    at_least("gochat_gateway_frames_in_total{type=\"send-message\"}", 4.0);
    at_least("gochat_gateway_frames_out_total{type=\"message-ack\"}", 4.0);
    at_least("gochat_gateway_frames_out_total{type=\"new-message\"}", 3.0);
    at_least("gochat_logic_messages_stored_total", 3.0);
    at_least("gochat_logic_messages_duplicate_total", 1.0);
    at_least(
        "gochat_store_duration_seconds_count{op=\"save_batch\"}",
        1.0,
    );
    // The embedded store's group commits: how busy its one writer is.
    at_least(
        "gochat_store_duration_seconds_count{op=\"sqlite_group_commit\"}",
        1.0,
    );
    at_least("gochat_cache_duration_seconds_count{op=\"seq_incr\"}", 1.0);
    at_least("gochat_batch_size_count{kind=\"conversation\"}", 1.0);
    at_least(
        "gochat_actor_handling_seconds_count{kind=\"conversation\"}",
        1.0,
    );
    at_least("gochat_actor_mailbox_depth_count{kind=\"session\"}", 1.0);
    at_least("gochat_gateway_users{sessions=\"1\"}", 2.0);
    assert!(
        sum(
            &text,
            "gochat_gateway_errors_total",
            &["code=\"1001\"", "transport=\"ws\""]
        ) >= 1.0,
        "{text}"
    );
    assert!(
        sum(
            &text,
            "gochat_http_request_duration_seconds_count",
            &["status=\"2xx\""]
        ) >= 1.0,
        "{text}"
    );
    assert!(
        sum(
            &text,
            "gochat_gateway_errors_total",
            &["code=\"1002\"", "transport=\"http\""]
        ) >= 1.0,
        "the 401s above are counted: {text}"
    );
    for name in [
        "gochat_bus_consumer_lag{group=\"im-logic\",topic=\"im-upstream-topic\"}",
        "gochat_store_duration_seconds_bucket{op=\"save_batch\",le=\"0.005\"}",
    ] {
        assert!(sample(&text, name).is_some(), "{name} missing:\n{text}");
    }

    // /admin/actors: bearer only.
    let actors = s.root_url("/admin/actors");
    let (st, _, body) = fetch(&actors, None).await;
    assert_eq!(st, 401, "{body}");
    let err: Value = serde_json::from_str(&body).expect("ErrorResponse");
    assert_eq!(err["code"], 1002, "{body}");
    let (st, _, _) = fetch(&actors, Some("wrong-token-0123456789")).await;
    assert_eq!(st, 401);
    let (st, _, _) = fetch(&format!("{actors}?token={ADMIN_TOKEN}"), None).await;
    assert_eq!(
        st, 401,
        "the JSON endpoint takes the token as a bearer token only"
    );
    let (st, content_type, body) = fetch(&actors, Some(ADMIN_TOKEN)).await;
    assert_eq!(st, 200, "{body}");
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    let report: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(report["process"], "serve", "{report}");
    assert!(
        report["actors"]["session"].as_u64().expect("session") >= 2,
        "{report}"
    );
    assert!(
        report["actors"]["conversation"]
            .as_u64()
            .expect("conversation")
            >= 1,
        "{report}"
    );
    assert!(report["actors"]["fanout"].as_u64().is_some(), "{report}");
    for row in report["busiest_conversations"].as_array().expect("busiest") {
        assert!(row["conversation_id"].is_string(), "{row}");
        assert!(row["queued"].is_u64(), "{row}");
        assert!(
            row["messages_per_sec"].as_f64().expect("rate") >= 0.0,
            "{row}"
        );
    }
    for row in report["slow_sessions"].as_array().expect("slow sessions") {
        assert!(
            row["session_id"].is_string() && row["user_id"].is_string(),
            "{row}"
        );
        assert!(row["queued"].as_u64().expect("queued") > 0, "{row}");
    }
    for group in ["im-logic", "im-task", "im-gateway-gw-1"] {
        assert!(report["bus_lag"][group].is_u64(), "{group}: {report}");
    }
    assert!(
        report["gateway"]["messages_in"]
            .as_u64()
            .expect("messages_in")
            >= 4
    );
    assert!(report["uptime_secs"].is_u64(), "{report}");

    // /admin: the page, with ?token= (or bearer).
    let (st, _, body) = fetch(&s.root_url("/admin"), None).await;
    assert_eq!(st, 401, "{body}");
    let (st, content_type, page) =
        fetch(&s.root_url(&format!("/admin?token={ADMIN_TOKEN}")), None).await;
    assert_eq!(st, 200);
    assert!(content_type.starts_with("text/html"), "{content_type}");
    assert!(
        page.contains("/admin/actors") && page.contains("polyline"),
        "{page}"
    );
    let (st, _, _) = fetch(&s.root_url("/admin"), Some(ADMIN_TOKEN)).await;
    assert_eq!(st, 200);

    wa.close().await;
    wb.close().await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_an_admin_token_admin_is_off_and_metrics_are_open() {
    let (_tmp, dir) = data_dir();
    let mut config = test_config();
    config.admin.token = String::new();
    let s = Server::start_with(&dir, config);
    for path in ["/admin", "/admin/actors"] {
        let (st, _, body) = fetch(&s.root_url(path), Some(ADMIN_TOKEN)).await;
        assert_eq!(st, 404, "{path}: {body}");
        let err: Value = serde_json::from_str(&body).expect("ErrorResponse");
        assert_eq!(err["code"], 1004, "{body}");
    }
    let (st, _, text) = fetch(&s.root_url("/metrics"), None).await;
    assert_eq!(st, 200);
    assert!(text.contains("gochat_start_time_seconds"), "{text}");
    s.stop();
}
