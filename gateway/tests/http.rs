//! The HTTP API of the gateway against a fake logic: routes map to logic calls, logic answers
//! map to the contract's JSON, errors map to the contract's statuses.

mod common;

use common::*;
use reqwest::StatusCode;
use serde_json::{Value, json};

struct Api {
    gw: TestGateway,
    client: reqwest::Client,
}

impl Api {
    fn start() -> Self {
        Self {
            gw: TestGateway::start(test_settings()),
            client: reqwest::Client::new(),
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> (StatusCode, Value) {
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let text = resp.text().await.expect("body");
        let body = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text:?}"));
        (status, body)
    }

    async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (StatusCode, Value) {
        let mut req = self.client.post(self.gw.url(path)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        self.send(req).await
    }

    async fn get(&self, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        let mut req = self.client.get(self.gw.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        self.send(req).await
    }

    async fn delete(&self, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        let mut req = self.client.delete(self.gw.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        self.send(req).await
    }
}

fn assert_error(status: StatusCode, body: &Value, want_status: u16, want_code: u16) {
    assert_eq!(status.as_u16(), want_status, "{body}");
    assert_eq!(body["code"], want_code, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(
        body["trace_id"].as_str().is_some_and(|t| !t.is_empty()),
        "{body}"
    );
}

#[tokio::test]
async fn healthz_and_unknown_routes() {
    let api = Api::start();
    let (status, _) = api.get("/healthz", None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = api.get("/api/v1/nothing", None).await;
    assert_error(status, &body, 404, 1004);
    let (status, body) = api.get("/api/v1/auth/login", None).await;
    assert_error(status, &body, 405, 1001);
}

#[tokio::test]
async fn register_login_refresh_logout_me() {
    let api = Api::start();
    let (status, body) = api
        .post(
            "/api/v1/auth/register",
            None,
            json!({"username": "alice", "password": "pw1", "nickname": "Al"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let user = &body["user"];
    assert_eq!(user["username"], "alice");
    assert_eq!(user["nickname"], "Al");
    assert!(user["id"].is_string());
    assert_eq!(user["avatar_url"], "");
    assert!(user["created_at"].is_i64());
    let user_id = user["id"].as_str().expect("id").to_owned();

    let (status, body) = api
        .post(
            "/api/v1/auth/register",
            None,
            json!({"username": "alice", "password": "x"}),
        )
        .await;
    assert_error(status, &body, 409, 2001);

    let (status, body) = api
        .post(
            "/api/v1/auth/login",
            None,
            json!({"username": "alice", "password": "bad"}),
        )
        .await;
    assert_error(status, &body, 401, 2002);

    let (status, login) = api
        .post(
            "/api/v1/auth/login",
            None,
            json!({"username": "alice", "password": "pw1"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{login}");
    assert_eq!(login["expires_in"], 900);
    assert_eq!(login["user"]["id"], user_id.as_str());
    let access = login["access_token"].as_str().expect("access").to_owned();
    let refresh = login["refresh_token"].as_str().expect("refresh").to_owned();

    let (status, me) = api.get("/api/v1/users/me", Some(&access)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(me, json!({"user": login["user"].clone()}));

    let (status, fresh) = api
        .post(
            "/api/v1/auth/refresh",
            None,
            json!({"refresh_token": refresh}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{fresh}");
    assert!(fresh["access_token"].is_string() && fresh["user"]["id"] == user_id.as_str());
    let (status, body) = api
        .post(
            "/api/v1/auth/refresh",
            None,
            json!({"refresh_token": refresh}),
        )
        .await;
    assert_error(status, &body, 401, 1002);

    let (status, body) = api.delete("/api/v1/auth/logout", Some(&access)).await;
    assert_eq!((status, body), (StatusCode::OK, json!({})));
    let (status, body) = api.get("/api/v1/users/me", Some(&access)).await;
    assert_error(status, &body, 401, 1002);
}

#[tokio::test]
async fn bearer_auth_is_required() {
    let api = Api::start();
    for path in [
        "/api/v1/users/me",
        "/api/v1/conversations",
        "/api/v1/groups/1",
    ] {
        let (status, body) = api.get(path, None).await;
        assert_error(status, &body, 401, 1002);
        let (status, body) = api.get(path, Some("forged")).await;
        assert_error(status, &body, 401, 1002);
    }
    let (status, body) = api.delete("/api/v1/auth/logout", None).await;
    assert_error(status, &body, 401, 1002);
}

#[tokio::test]
async fn bad_bodies_and_queries_are_400_1001() {
    let api = Api::start();
    let (_, token) = api.gw.logic.add_user("alice");
    let req = api
        .client
        .post(api.gw.url("/api/v1/auth/login"))
        .header("content-type", "application/json")
        .body("{\"username\": ");
    let (status, body) = api.send(req).await;
    assert_error(status, &body, 400, 1001);
    assert!(
        body["message"]
            .as_str()
            .expect("m")
            .contains("malformed JSON"),
        "{body}"
    );

    let (status, body) = api
        .post("/api/v1/auth/login", None, json!({"username": "alice"}))
        .await;
    assert_error(status, &body, 400, 1001);
    assert!(
        body["message"].as_str().expect("m").contains("password"),
        "{body}"
    );

    let (status, body) = api
        .post(
            "/api/v1/auth/register",
            None,
            json!({"username": "x".repeat(70_000), "password": "p"}),
        )
        .await;
    assert_error(status, &body, 400, 1001);
    assert!(
        body["message"].as_str().expect("m").contains("limit"),
        "{body}"
    );

    let (status, body) = api
        .post(
            "/api/v1/conversations/s_1_2/read",
            Some(&token),
            json!({"seq_id": "seven"}),
        )
        .await;
    assert_error(status, &body, 400, 1001);

    let (status, body) = api
        .get("/api/v1/conversations?page=abc", Some(&token))
        .await;
    assert_error(status, &body, 400, 1001);
    let (status, body) = api
        .get(
            "/api/v1/conversations/s_1_2/messages?after_seq=1&before_seq=5",
            Some(&token),
        )
        .await;
    assert_error(status, &body, 400, 1001);
}

#[tokio::test]
async fn trace_ids_are_taken_from_the_request_and_passed_to_logic() {
    let api = Api::start();
    let req = api
        .client
        .get(api.gw.url("/api/v1/users/me"))
        .header("x-trace-id", "trace-abc-123")
        .bearer_auth("forged");
    let resp = req.send().await.expect("request");
    assert_eq!(
        resp.headers()
            .get("x-trace-id")
            .and_then(|v| v.to_str().ok()),
        Some("trace-abc-123")
    );
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["trace_id"], "trace-abc-123");
    assert!(
        api.gw
            .logic
            .lock()
            .trace_ids
            .contains(&"trace-abc-123".to_owned())
    );
}

#[tokio::test]
async fn conversation_routes_map_to_logic() {
    let api = Api::start();
    let (alice, token) = api.gw.logic.add_user("alice");
    let (bob, _) = api.gw.logic.add_user("bob");

    let (status, body) = api
        .get("/api/v1/conversations?page=2&page_size=5", Some(&token))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["total"], 2);
    assert_eq!(
        body["conversations"][0],
        json!({
            "id": "s_101_102", "type": 1, "name": "bob", "avatar_url": "",
            "last_message": {"id": "9007", "conversation_id": "s_101_102", "sender_id": "101",
                             "type": 1, "content": "m7", "seq_id": 7, "created_at": 1_700_000_000_007i64},
            "unread_count": 2, "updated_at": 1_700_000_000_007i64
        })
    );
    assert_eq!(body["conversations"][1]["id"], "world");
    assert_eq!(body["conversations"][1]["last_message"], Value::Null);

    let (status, body) = api
        .post(
            "/api/v1/conversations",
            Some(&token),
            json!({"target_user_id": bob}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["conversation"]["id"], format!("s_{alice}_{bob}"));
    let (status, body) = api
        .post(
            "/api/v1/conversations",
            Some(&token),
            json!({"target_user_id": "42"}),
        )
        .await;
    assert_error(status, &body, 404, 2000);

    let (status, body) = api
        .get(
            "/api/v1/conversations/s_101_102/messages?after_seq=4&limit=500",
            Some(&token),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["has_more"], true);
    let seqs: Vec<i64> = body["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["seq_id"].as_i64().expect("seq"))
        .collect();
    assert_eq!(seqs, vec![5, 6]);
    assert_eq!(body["messages"][0]["type"], 1);
    let (status, body) = api
        .get("/api/v1/conversations/forbidden/messages", Some(&token))
        .await;
    assert_error(status, &body, 403, 4001);

    let (status, body) = api
        .post(
            "/api/v1/conversations/s_101_102/read",
            Some(&token),
            json!({"seq_id": 6}),
        )
        .await;
    assert_eq!((status, body), (StatusCode::OK, json!({"unread_count": 3})));

    let calls = api.gw.logic.calls();
    assert!(
        calls.contains(&format!("GetConversations:{alice}:2:5")),
        "{calls:?}"
    );
    assert!(
        calls.contains(&format!(
            "GetMessages:{alice}:s_101_102:after=Some(4):before=None:limit=100"
        )),
        "{calls:?}"
    );
    assert!(
        calls.contains(&format!(
            "GetMessages:{alice}:forbidden:after=None:before=None:limit=50"
        )),
        "{calls:?}"
    );
    assert!(
        calls.contains(&format!("MarkAsRead:{alice}:s_101_102:6")),
        "{calls:?}"
    );
}

#[tokio::test]
async fn group_routes_map_to_logic() {
    let api = Api::start();
    let (alice, atok) = api.gw.logic.add_user("alice");
    let (bob, btok) = api.gw.logic.add_user("bob");
    let (carol, ctok) = api.gw.logic.add_user("carol");

    let (status, body) = api
        .post(
            "/api/v1/groups",
            Some(&atok),
            json!({"name": "team", "member_ids": [bob]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let group = body["group"].clone();
    let id = group["id"].as_str().expect("id").to_owned();
    assert_eq!(
        group,
        json!({"id": id, "name": "team", "owner_id": alice, "member_count": 2,
               "conversation_id": format!("g_{id}"), "created_at": 1_700_000_000_001i64})
    );

    let (status, body) = api.get(&format!("/api/v1/groups/{id}"), Some(&btok)).await;
    assert_eq!((status, &body["group"]["id"]), (StatusCode::OK, &json!(id)));
    let (status, body) = api.get(&format!("/api/v1/groups/{id}"), Some(&ctok)).await;
    assert_error(status, &body, 403, 4001);
    let (status, body) = api.get("/api/v1/groups/999", Some(&atok)).await;
    assert_error(status, &body, 404, 4000);

    let (status, body) = api
        .post(
            &format!("/api/v1/groups/{id}/members"),
            Some(&btok),
            json!({"user_ids": [carol, bob]}),
        )
        .await;
    assert_eq!(
        (status, &body["group"]["member_count"]),
        (StatusCode::OK, &json!(3))
    );
    let (status, body) = api
        .post(
            &format!("/api/v1/groups/{id}/members"),
            Some(&btok),
            json!({"user_ids": ["1", "2", "3"]}),
        )
        .await;
    assert_error(status, &body, 409, 4002);

    let (status, body) = api
        .get(
            &format!("/api/v1/groups/{id}/members?offset=0&limit=10"),
            Some(&ctok),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["total"], 3);
    let owner = &body["members"][0];
    assert_eq!(owner["user"]["id"], alice.as_str());
    assert_eq!(owner["role"], 3);
    assert_eq!(owner["is_online"], true);
    assert_eq!(owner["joined_at"], 1_700_000_000_002i64);
    assert_eq!(body["members"][1]["role"], 1);

    let (status, body) = api
        .delete(&format!("/api/v1/groups/{id}/members/{alice}"), Some(&btok))
        .await;
    assert_error(status, &body, 403, 1003);
    let (status, body) = api
        .delete(&format!("/api/v1/groups/{id}/members/{carol}"), Some(&ctok))
        .await;
    assert_eq!((status, body), (StatusCode::OK, json!({})));

    let calls = api.gw.logic.calls();
    assert!(
        calls.contains(&format!("GetGroupMembers:{id}:0:10")),
        "{calls:?}"
    );
    assert!(
        calls.contains(&format!("LeaveGroup:{id}:{carol}")),
        "{calls:?}"
    );
    assert!(api.gw.stats.snapshot().http_errors.contains_key(&4001));
}
