//! End-to-end harness: the real `gochat serve` (in-process, its own actix System on its own
//! thread, on 127.0.0.1:0 with a temporary data directory) and real clients: reqwest for HTTP,
//! tokio-tungstenite for WebSocket.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use gochat_infra::config::Config;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for something that should arrive (a guard against hangs, not a
/// speed bound).
pub const WAIT: Duration = Duration::from_secs(30);

/// A running server.
pub struct Server {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

/// The admin token of [`test_config`].
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// The configuration tests use: cheap password hashing, an admin token, everything else as
/// shipped.
pub fn test_config() -> Config {
    let mut c = Config::default();
    c.repo.argon2_memory_kib = 64;
    c.repo.argon2_iterations = 1;
    c.log.filter = "warn".into();
    c.admin.token = ADMIN_TOKEN.into();
    c
}

impl Server {
    /// Starts `serve` on `data_dir` with `config`.
    pub fn start_with(data_dir: &Path, config: Config) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let data_dir = data_dir.to_path_buf();
        let thread = std::thread::spawn(move || {
            let options = gochat::ServeOptions { data_dir, listener };
            actix_rt::System::new().block_on(gochat::serve(&config, options, async move {
                let _ = rx.await;
            }))
        });
        Self {
            addr,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    /// A server this process did not start (a `gochat gateway` process, say): the helpers only
    /// need its address; stopping it is its owner's business.
    pub fn external(addr: SocketAddr) -> Self {
        Self {
            addr,
            stop: None,
            thread: None,
        }
    }

    /// Starts `serve` on `data_dir` with [`test_config`].
    pub fn start(data_dir: &Path) -> Self {
        Self::start_with(data_dir, test_config())
    }

    /// `http://addr/api/v1{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}/api/v1{path}", self.addr)
    }

    /// `http://addr{path}` (routes outside the API: `/metrics`, `/admin`, ...).
    pub fn root_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Stops the server (as SIGTERM would) and waits for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join()
                .expect("server thread")
                .expect("server stopped cleanly");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A logged-in user.
#[derive(Debug, Clone)]
pub struct User {
    pub id: String,
    pub username: String,
    pub access: String,
    pub refresh: String,
}

/// A random suffix for unique names.
pub fn tag() -> String {
    format!("{:08x}", rand::random::<u32>())
}

pub fn http() -> reqwest::Client {
    reqwest::Client::new()
}

/// POST JSON, returning (status, body).
pub async fn post(url: &str, token: Option<&str>, body: Value) -> (u16, Value) {
    let mut r = http().post(url).json(&body);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let resp = r.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// GET, returning (status, body).
pub async fn get(url: &str, token: Option<&str>) -> (u16, Value) {
    let mut r = http().get(url);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let resp = r.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// DELETE, returning (status, body).
pub async fn delete(url: &str, token: Option<&str>) -> (u16, Value) {
    let mut r = http().delete(url);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let resp = r.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Registers and logs in a user named `name` + a random tag.
pub async fn user(s: &Server, name: &str) -> User {
    let username = format!("{name}{}", tag());
    let (st, body) = post(
        &s.url("/auth/register"),
        None,
        json!({"username": username, "password": "password123"}),
    )
    .await;
    assert_eq!(st, 201, "register {username}: {body}");
    login(s, &username).await
}

/// Logs a registered user in.
pub async fn login(s: &Server, username: &str) -> User {
    let (st, body) = post(
        &s.url("/auth/login"),
        None,
        json!({"username": username, "password": "password123"}),
    )
    .await;
    assert_eq!(st, 200, "login {username}: {body}");
    User {
        id: body["user"]["id"].as_str().expect("id").to_owned(),
        username: username.to_owned(),
        access: body["access_token"].as_str().expect("access").to_owned(),
        refresh: body["refresh_token"].as_str().expect("refresh").to_owned(),
    }
}

/// The single chat of `a` with `b`.
pub async fn single(s: &Server, a: &User, b: &User) -> String {
    let (st, body) = post(
        &s.url("/conversations"),
        Some(&a.access),
        json!({"target_user_id": b.id}),
    )
    .await;
    assert!(st == 200 || st == 201, "single chat: {st} {body}");
    body["conversation"]["id"]
        .as_str()
        .expect("conversation id")
        .to_owned()
}

/// A WebSocket client.
pub struct Ws {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Ws {
    /// Connects with `?token=`.
    pub async fn connect(s: &Server, token: &str) -> Self {
        let url = format!("ws://{}/ws?token={token}", s.addr);
        let (stream, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("ws connect");
        Self { stream }
    }

    /// Sends a text frame.
    pub async fn send_text(&mut self, text: String) {
        self.stream
            .send(WsMessage::text(text))
            .await
            .expect("ws send");
    }

    /// Sends an envelope.
    pub async fn send(&mut self, kind: &str, data: Value) {
        let frame = json!({"type": kind, "data": data, "timestamp": 0});
        self.send_text(frame.to_string()).await;
    }

    /// Sends a message.
    pub async fn send_message(&mut self, conv: &str, content: &str, cmid: &str) {
        self.send(
            "send-message",
            json!({"conversation_id": conv, "message_type": 1, "content": content, "client_msg_id": cmid}),
        )
        .await;
    }

    /// The next text frame as JSON (None when the connection closed).
    pub async fn next(&mut self) -> Option<Value> {
        loop {
            let m = tokio::time::timeout(WAIT, self.stream.next())
                .await
                .expect("a frame in time")?;
            match m {
                Ok(WsMessage::Text(t)) => {
                    return Some(serde_json::from_str(&t).expect("json frame"));
                }
                Ok(WsMessage::Close(_)) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// The next frame of type `kind` (skipping others, e.g. online-status).
    pub async fn next_of(&mut self, kind: &str) -> Value {
        loop {
            let f = self
                .next()
                .await
                .unwrap_or_else(|| panic!("connection closed while waiting for {kind}"));
            if f["type"] == kind {
                return f;
            }
        }
    }

    /// Waits for the close frame and returns its code.
    pub async fn closed_with(&mut self) -> Option<u16> {
        loop {
            match tokio::time::timeout(WAIT, self.stream.next())
                .await
                .expect("close in time")
            {
                Some(Ok(WsMessage::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// Closes the connection.
    pub async fn close(mut self) {
        let _ = self.stream.close(None).await;
    }
}

/// A temporary data directory.
pub fn data_dir() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().expect("tempdir");
    let p = d.path().join("data");
    (d, p)
}

/// A big group: registers `n` users over HTTP (16 at a time, spread round-robin over `servers`),
/// logs them in, and makes them and `extra` (user ids) members of a new group of `owner`'s,
/// created on the first server and filled in batches of 200 on the last. Returns the new users,
/// the group id and its conversation id.
pub async fn big_group(
    servers: &[&Server],
    owner: &User,
    n: usize,
    extra: &[&str],
) -> (Vec<User>, String, String) {
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
    let mut handles = Vec::new();
    for i in 0..n {
        let url = servers[i % servers.len()].url("/auth/register");
        let permits = permits.clone();
        handles.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await.expect("permit");
            let name = format!("m{i}x{}", tag());
            let (st, body) = post(
                &url,
                None,
                json!({"username": name, "password": "password123"}),
            )
            .await;
            assert_eq!(st, 201, "{body}");
            name
        }));
    }
    let mut members = Vec::new();
    for h in handles {
        let name = h.await.expect("register");
        members.push(login(servers[0], &name).await);
    }
    let mut ids: Vec<&str> = members.iter().map(|m| m.id.as_str()).collect();
    ids.extend_from_slice(extra);
    let (first, last) = (servers[0], servers[servers.len() - 1]);
    let mut gid = String::new();
    let mut conv = String::new();
    for (i, chunk) in ids.chunks(200).enumerate() {
        if i == 0 {
            let (st, g) = post(
                &first.url("/groups"),
                Some(&owner.access),
                json!({"name": "all hands", "member_ids": chunk}),
            )
            .await;
            assert_eq!(st, 201, "{g}");
            gid = g["group"]["id"].as_str().expect("gid").to_owned();
            conv = g["group"]["conversation_id"]
                .as_str()
                .expect("conv")
                .to_owned();
        } else {
            let (st, g) = post(
                &last.url(&format!("/groups/{gid}/members")),
                Some(&owner.access),
                json!({"user_ids": chunk}),
            )
            .await;
            assert_eq!(st, 200, "{g}");
        }
    }
    (members, gid, conv)
}

/// Asserts that every one of `ids` shows online in the member list of group `gid` now: a
/// gateway answers the upgrade only once the user's presence is reported (docs/protocol.md,
/// "Open means routed"), so a connected member is online without waiting.
pub async fn assert_online(
    s: &Server,
    token: &str,
    gid: &str,
    ids: &std::collections::BTreeSet<String>,
) {
    let mut online = 0;
    let mut offset = 0;
    loop {
        let url = s.url(&format!("/groups/{gid}/members?offset={offset}&limit=200"));
        let (st, body) = get(&url, Some(token)).await;
        assert_eq!(st, 200, "members: {body}");
        let page = body["members"].as_array().expect("members");
        online += page
            .iter()
            .filter(|m| m["is_online"] == true)
            .filter(|m| m["user"]["id"].as_str().is_some_and(|id| ids.contains(id)))
            .count();
        if page.len() < 200 {
            break;
        }
        offset += page.len();
    }
    assert_eq!(online, ids.len(), "members online right after connecting");
}
