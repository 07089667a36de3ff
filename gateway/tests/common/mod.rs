//! Test harness: a fake logic (users and tokens in memory, every call recorded), a real
//! MemoryBus, a real gateway on 127.0.0.1:0 in its own actix System thread, and helpers for
//! real WebSocket (tokio-tungstenite) and HTTP (reqwest) clients.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use gochat_gateway::{Gateway, GatewaySettings, GatewayStats};
use gochat_infra::mq::memory::{MemoryBus, MemoryBusConfig, MemoryConsumer};
use gochat_infra::mq::{Bus, Consumer, Producer, Record};
use gochat_infra::wire::{DownstreamMessage, UPSTREAM_TOPIC, downstream_topic};
use gochat_infra::{AppError, ErrorCode};
use gochat_proto::logic::auth_service_server::AuthService;
use gochat_proto::logic::conversation_service_server::ConversationService;
use gochat_proto::logic::group_service_server::GroupService;
use gochat_proto::logic::presence_service_server::PresenceService;
use gochat_proto::logic::*;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tonic::{Request, Response, Status};

/// Guards against hangs only; never a speed bound.
pub const GUARD: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------- fake logic

#[derive(Debug, Clone)]
pub struct FakeUser {
    pub id: String,
    pub username: String,
    pub password: String,
    pub nickname: String,
}

#[derive(Debug, Clone)]
pub struct FakeGroup {
    pub id: String,
    pub name: String,
    pub owner: String,
    pub members: Vec<String>,
}

#[derive(Debug, Default)]
pub struct FakeState {
    pub users: Vec<FakeUser>,
    /// access token -> user id
    pub tokens: HashMap<String, String>,
    /// refresh token -> user id
    pub refresh: HashMap<String, String>,
    pub groups: HashMap<String, FakeGroup>,
    /// Every call, as "Method:detail".
    pub calls: Vec<String>,
    /// `x-trace-id` metadata seen on calls.
    pub trace_ids: Vec<String>,
    /// When set, `UserConnected` waits for a permit of this semaphore before it answers (and
    /// records "UserConnected-done:<user>" then).
    pub presence_gate: Option<Arc<tokio::sync::Semaphore>>,
    /// When set, `UserConnected` fails with `unavailable`.
    pub presence_fails: bool,
    next: i64,
}

/// A logic service in memory.
#[derive(Debug, Clone, Default)]
pub struct FakeLogic {
    pub state: Arc<Mutex<FakeState>>,
}

fn err(code: ErrorCode, message: &str) -> Status {
    AppError::new(code, message).into()
}

impl FakeLogic {
    pub fn lock(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().expect("fake logic lock")
    }

    /// Creates a user and an access token for them: (user id, token).
    pub fn add_user(&self, username: &str) -> (String, String) {
        let mut st = self.lock();
        st.next += 1;
        let id = (100 + st.next).to_string();
        st.users.push(FakeUser {
            id: id.clone(),
            username: username.to_owned(),
            password: "secret".into(),
            nickname: username.to_owned(),
        });
        let token = format!("tok-{id}-{}", st.next);
        st.tokens.insert(token.clone(), id.clone());
        (id, token)
    }

    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    fn record<T>(&self, detail: String, req: &Request<T>) {
        let mut st = self.lock();
        st.calls.push(detail);
        if let Some(t) = req
            .metadata()
            .get("x-trace-id")
            .and_then(|v| v.to_str().ok())
        {
            st.trace_ids.push(t.to_owned());
        }
    }

    fn pb_user(u: &FakeUser) -> User {
        User {
            id: u.id.clone(),
            username: u.username.clone(),
            nickname: u.nickname.clone(),
            avatar_url: String::new(),
            created_at: 1_700_000_000_000,
        }
    }

    fn user_by_id(&self, id: &str) -> Option<User> {
        self.lock()
            .users
            .iter()
            .find(|u| u.id == id)
            .map(Self::pb_user)
    }

    fn issue_tokens(&self, user_id: &str) -> (String, String) {
        let mut st = self.lock();
        st.next += 1;
        let access = format!("tok-{user_id}-{}", st.next);
        let refresh = format!("ref-{user_id}-{}", st.next);
        st.tokens.insert(access.clone(), user_id.to_owned());
        st.refresh.insert(refresh.clone(), user_id.to_owned());
        (access, refresh)
    }

    fn pb_group(g: &FakeGroup) -> Group {
        Group {
            id: g.id.clone(),
            name: g.name.clone(),
            owner_id: g.owner.clone(),
            member_count: g.members.len() as i32,
            conversation_id: format!("g_{}", g.id),
            created_at: 1_700_000_000_001,
        }
    }
}

#[tonic::async_trait]
impl AuthService for FakeLogic {
    async fn login(
        &self,
        request: Request<LoginRequest>,
    ) -> Result<Response<LoginResponse>, Status> {
        self.record(format!("Login:{}", request.get_ref().username), &request);
        let r = request.into_inner();
        let user = self
            .lock()
            .users
            .iter()
            .find(|u| u.username == r.username)
            .cloned()
            .ok_or_else(|| err(ErrorCode::UserNotFound, "no such user"))?;
        if user.password != r.password {
            return Err(err(ErrorCode::InvalidPassword, "wrong password"));
        }
        let (access_token, refresh_token) = self.issue_tokens(&user.id);
        Ok(Response::new(LoginResponse {
            access_token,
            refresh_token,
            expires_in: 900,
            user: Some(Self::pb_user(&user)),
        }))
    }

    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        self.record(format!("Register:{}", request.get_ref().username), &request);
        let r = request.into_inner();
        if r.username.is_empty() {
            return Err(err(
                ErrorCode::InvalidParameter,
                "username must not be empty",
            ));
        }
        let mut st = self.lock();
        if st.users.iter().any(|u| u.username == r.username) {
            return Err(err(ErrorCode::UserExists, "username taken"));
        }
        st.next += 1;
        let user = FakeUser {
            id: (100 + st.next).to_string(),
            username: r.username.clone(),
            password: r.password,
            nickname: if r.nickname.is_empty() {
                r.username
            } else {
                r.nickname
            },
        };
        st.users.push(user.clone());
        Ok(Response::new(RegisterResponse {
            user: Some(Self::pb_user(&user)),
        }))
    }

    async fn refresh_token(
        &self,
        request: Request<RefreshTokenRequest>,
    ) -> Result<Response<RefreshTokenResponse>, Status> {
        self.record("RefreshToken".into(), &request);
        let token = request.into_inner().refresh_token;
        let user_id = self
            .lock()
            .refresh
            .remove(&token)
            .ok_or_else(|| err(ErrorCode::Unauthorized, "invalid refresh token"))?;
        let (access_token, refresh_token) = self.issue_tokens(&user_id);
        Ok(Response::new(RefreshTokenResponse {
            access_token,
            refresh_token,
            expires_in: 900,
            user: self.user_by_id(&user_id),
        }))
    }

    async fn logout(
        &self,
        request: Request<LogoutRequest>,
    ) -> Result<Response<LogoutResponse>, Status> {
        self.record("Logout".into(), &request);
        let token = request.into_inner().access_token;
        let mut st = self.lock();
        if let Some(user) = st.tokens.remove(&token) {
            st.refresh.retain(|_, u| *u != user);
        }
        Ok(Response::new(LogoutResponse {}))
    }

    async fn validate_token(
        &self,
        request: Request<ValidateTokenRequest>,
    ) -> Result<Response<ValidateTokenResponse>, Status> {
        self.record("ValidateToken".into(), &request);
        let token = request.into_inner().access_token;
        let user_id = self
            .lock()
            .tokens
            .get(&token)
            .cloned()
            .ok_or_else(|| err(ErrorCode::Unauthorized, "invalid or expired access token"))?;
        Ok(Response::new(ValidateTokenResponse {
            user_id,
            expires_at: 4_000_000_000,
        }))
    }

    async fn get_user(
        &self,
        request: Request<GetUserRequest>,
    ) -> Result<Response<GetUserResponse>, Status> {
        self.record(format!("GetUser:{}", request.get_ref().user_id), &request);
        let user = self
            .user_by_id(&request.into_inner().user_id)
            .ok_or_else(|| err(ErrorCode::UserNotFound, "no such user"))?;
        Ok(Response::new(GetUserResponse { user: Some(user) }))
    }
}

fn message(conversation_id: &str, seq: i64) -> Message {
    Message {
        id: (9000 + seq).to_string(),
        conversation_id: conversation_id.to_owned(),
        sender_id: "101".into(),
        r#type: 1,
        content: format!("m{seq}"),
        seq_id: seq,
        created_at: 1_700_000_000_000 + seq,
        sender: None,
    }
}

#[tonic::async_trait]
impl ConversationService for FakeLogic {
    async fn get_conversations(
        &self,
        request: Request<GetConversationsRequest>,
    ) -> Result<Response<GetConversationsResponse>, Status> {
        let r = request.get_ref();
        self.record(
            format!("GetConversations:{}:{}:{}", r.user_id, r.page, r.page_size),
            &request,
        );
        Ok(Response::new(GetConversationsResponse {
            conversations: vec![
                Conversation {
                    id: "s_101_102".into(),
                    r#type: 1,
                    name: "bob".into(),
                    avatar_url: String::new(),
                    last_message: Some(message("s_101_102", 7)),
                    unread_count: 2,
                    updated_at: 1_700_000_000_007,
                },
                Conversation {
                    id: "world".into(),
                    r#type: 3,
                    name: "World".into(),
                    avatar_url: String::new(),
                    last_message: None,
                    unread_count: 0,
                    updated_at: 1_700_000_000_000,
                },
            ],
            total: 2,
        }))
    }

    async fn get_conversation(
        &self,
        request: Request<GetConversationRequest>,
    ) -> Result<Response<GetConversationResponse>, Status> {
        self.record("GetConversation".into(), &request);
        Err(err(ErrorCode::NotFound, "not used"))
    }

    async fn get_messages(
        &self,
        request: Request<GetMessagesRequest>,
    ) -> Result<Response<GetMessagesResponse>, Status> {
        let r = request.get_ref().clone();
        self.record(
            format!(
                "GetMessages:{}:{}:after={:?}:before={:?}:limit={}",
                r.user_id, r.conversation_id, r.after_seq, r.before_seq, r.limit
            ),
            &request,
        );
        if r.conversation_id == "forbidden" {
            return Err(err(
                ErrorCode::NotGroupMember,
                "not a member of this conversation",
            ));
        }
        let from = r.after_seq.unwrap_or(0);
        let messages = (from + 1..=from + 2)
            .map(|s| message(&r.conversation_id, s))
            .collect();
        Ok(Response::new(GetMessagesResponse {
            messages,
            has_more: true,
        }))
    }

    async fn mark_as_read(
        &self,
        request: Request<MarkAsReadRequest>,
    ) -> Result<Response<MarkAsReadResponse>, Status> {
        let r = request.get_ref();
        self.record(
            format!(
                "MarkAsRead:{}:{}:{}",
                r.user_id, r.conversation_id, r.seq_id
            ),
            &request,
        );
        Ok(Response::new(MarkAsReadResponse {
            unread_count: 3,
            last_read_seq: request.get_ref().seq_id,
        }))
    }

    async fn create_single_conversation(
        &self,
        request: Request<CreateSingleConversationRequest>,
    ) -> Result<Response<CreateSingleConversationResponse>, Status> {
        let r = request.get_ref().clone();
        self.record(
            format!("CreateSingle:{}:{}", r.user_id, r.target_user_id),
            &request,
        );
        if self.user_by_id(&r.target_user_id).is_none() {
            return Err(err(ErrorCode::UserNotFound, "no such user"));
        }
        let (a, b) = if r.user_id < r.target_user_id {
            (r.user_id, r.target_user_id)
        } else {
            (r.target_user_id, r.user_id)
        };
        Ok(Response::new(CreateSingleConversationResponse {
            conversation: Some(Conversation {
                id: format!("s_{a}_{b}"),
                r#type: 1,
                name: "peer".into(),
                avatar_url: String::new(),
                last_message: None,
                unread_count: 0,
                updated_at: 1_700_000_000_000,
            }),
        }))
    }
}

#[tonic::async_trait]
impl GroupService for FakeLogic {
    async fn create_group(
        &self,
        request: Request<CreateGroupRequest>,
    ) -> Result<Response<CreateGroupResponse>, Status> {
        self.record(format!("CreateGroup:{}", request.get_ref().name), &request);
        let r = request.into_inner();
        let mut st = self.lock();
        st.next += 1;
        let mut members = vec![r.operator_id.clone()];
        members.extend(r.member_ids.into_iter().filter(|m| *m != r.operator_id));
        let group = FakeGroup {
            id: (500 + st.next).to_string(),
            name: r.name,
            owner: r.operator_id,
            members,
        };
        st.groups.insert(group.id.clone(), group.clone());
        Ok(Response::new(CreateGroupResponse {
            group: Some(Self::pb_group(&group)),
        }))
    }

    async fn get_group(
        &self,
        request: Request<GetGroupRequest>,
    ) -> Result<Response<GetGroupResponse>, Status> {
        self.record(format!("GetGroup:{}", request.get_ref().group_id), &request);
        let r = request.into_inner();
        let g = self.group_for(&r.group_id, &r.operator_id)?;
        Ok(Response::new(GetGroupResponse {
            group: Some(Self::pb_group(&g)),
        }))
    }

    async fn join_group(
        &self,
        request: Request<JoinGroupRequest>,
    ) -> Result<Response<JoinGroupResponse>, Status> {
        self.record(
            format!("JoinGroup:{}", request.get_ref().group_id),
            &request,
        );
        let r = request.into_inner();
        let mut g = self.group_for(&r.group_id, &r.operator_id)?;
        for u in r.user_ids {
            if !g.members.contains(&u) {
                g.members.push(u);
            }
        }
        if g.members.len() > 5 {
            return Err(err(ErrorCode::GroupFull, "group is full"));
        }
        self.lock().groups.insert(g.id.clone(), g.clone());
        Ok(Response::new(JoinGroupResponse {
            group: Some(Self::pb_group(&g)),
        }))
    }

    async fn leave_group(
        &self,
        request: Request<LeaveGroupRequest>,
    ) -> Result<Response<LeaveGroupResponse>, Status> {
        let r = request.get_ref().clone();
        self.record(format!("LeaveGroup:{}:{}", r.group_id, r.user_id), &request);
        let mut g = self.group_for(&r.group_id, &r.operator_id)?;
        if r.operator_id != g.owner && r.operator_id != r.user_id {
            return Err(err(ErrorCode::Forbidden, "only the owner removes others"));
        }
        g.members.retain(|m| *m != r.user_id);
        self.lock().groups.insert(g.id.clone(), g);
        Ok(Response::new(LeaveGroupResponse {}))
    }

    async fn get_group_members(
        &self,
        request: Request<GetGroupMembersRequest>,
    ) -> Result<Response<GetGroupMembersResponse>, Status> {
        let r = request.get_ref().clone();
        self.record(
            format!("GetGroupMembers:{}:{}:{}", r.group_id, r.offset, r.limit),
            &request,
        );
        let g = self.group_for(&r.group_id, &r.operator_id)?;
        let members = g
            .members
            .iter()
            .map(|id| GroupMember {
                user: self.user_by_id(id),
                role: if *id == g.owner { 3 } else { 1 },
                joined_at: 1_700_000_000_002,
                is_online: *id == g.owner,
            })
            .collect();
        Ok(Response::new(GetGroupMembersResponse {
            members,
            total: g.members.len() as i32,
        }))
    }
}

impl FakeLogic {
    fn group_for(&self, group_id: &str, operator: &str) -> Result<FakeGroup, Status> {
        let g = self
            .lock()
            .groups
            .get(group_id)
            .cloned()
            .ok_or_else(|| err(ErrorCode::GroupNotFound, "no such group"))?;
        if !g.members.iter().any(|m| m == operator) {
            return Err(err(ErrorCode::NotGroupMember, "not a member of this group"));
        }
        Ok(g)
    }
}

#[tonic::async_trait]
impl PresenceService for FakeLogic {
    async fn user_connected(
        &self,
        request: Request<UserConnectedRequest>,
    ) -> Result<Response<UserConnectedResponse>, Status> {
        let r = request.get_ref();
        self.record(
            format!("UserConnected:{}:{}", r.user_id, r.gateway_id),
            &request,
        );
        let (gate, fails) = {
            let st = self.lock();
            (st.presence_gate.clone(), st.presence_fails)
        };
        if fails {
            return Err(err(ErrorCode::Unavailable, "presence store unavailable"));
        }
        if let Some(gate) = gate {
            gate.acquire().await.expect("gate open").forget();
            self.lock()
                .calls
                .push(format!("UserConnected-done:{}", r.user_id));
        }
        Ok(Response::new(UserConnectedResponse { first_online: true }))
    }

    async fn user_disconnected(
        &self,
        request: Request<UserDisconnectedRequest>,
    ) -> Result<Response<UserDisconnectedResponse>, Status> {
        let r = request.get_ref();
        self.record(
            format!("UserDisconnected:{}:{}", r.user_id, r.gateway_id),
            &request,
        );
        Ok(Response::new(UserDisconnectedResponse {
            now_offline: true,
        }))
    }

    async fn refresh_presence(
        &self,
        request: Request<RefreshPresenceRequest>,
    ) -> Result<Response<RefreshPresenceResponse>, Status> {
        let mut ids = request.get_ref().user_ids.clone();
        ids.sort();
        self.record(format!("RefreshPresence:{}", ids.join(",")), &request);
        Ok(Response::new(RefreshPresenceResponse {}))
    }
}

// ---------------------------------------------------------------- the gateway under test

/// A running gateway with its fake logic and bus.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub logic: FakeLogic,
    pub bus: MemoryBus,
    pub stats: Arc<GatewayStats>,
    pub gateway_id: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

/// Settings for tests: one worker, otherwise the defaults.
pub fn test_settings() -> GatewaySettings {
    GatewaySettings {
        workers: 1,
        ..GatewaySettings::default()
    }
}

impl TestGateway {
    pub fn start(settings: GatewaySettings) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let logic = FakeLogic::default();
        let bus = MemoryBus::new(MemoryBusConfig::default());
        let gateway_id = settings.gateway_id.clone();
        let gateway = Gateway::new(settings, logic.clone(), bus.clone());
        let stats = gateway.stats();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            actix_rt::System::new().block_on(gateway.run(listener, async {
                let _ = rx.await;
            }))
        });
        Self {
            addr,
            logic,
            bus,
            stats,
            gateway_id,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn ws_url(&self, token: &str) -> String {
        format!("ws://{}/ws?token={token}", self.addr)
    }

    /// Triggers shutdown and waits for `run` to return.
    pub async fn stop(mut self) -> std::io::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let thread = self.thread.take().expect("thread");
        tokio::task::spawn_blocking(move || thread.join().expect("gateway thread panicked"))
            .await
            .expect("join")
    }

    /// Publishes a downstream record to this gateway (key: `key`, so tests control order).
    pub async fn publish_down(&self, key: &str, msg: &DownstreamMessage) {
        let payload = serde_json::to_vec(msg).expect("json");
        self.bus
            .send(
                &downstream_topic(&self.gateway_id),
                key,
                payload,
                BTreeMap::new(),
            )
            .await
            .expect("publish downstream");
    }

    pub async fn publish_raw_down(&self, key: &str, payload: &[u8]) {
        self.bus
            .send(
                &downstream_topic(&self.gateway_id),
                key,
                payload.to_vec(),
                BTreeMap::new(),
            )
            .await
            .expect("publish downstream");
    }

    /// A consumer of the upstream topic.
    pub async fn upstream(&self) -> MemoryConsumer {
        self.bus
            .subscribe("test-upstream", &[UPSTREAM_TOPIC])
            .await
            .expect("subscribe")
    }

    /// Waits until `pred` holds for the recorded logic calls.
    pub async fn wait_calls(&self, what: &str, pred: impl Fn(&[String]) -> bool) -> Vec<String> {
        let wait = async {
            loop {
                let calls = self.logic.calls();
                if pred(&calls) {
                    return calls;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(GUARD, wait)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}: {:?}", self.logic.calls()))
    }

    /// Waits until `pred` holds for the gateway's stats.
    pub async fn wait_stats(
        &self,
        what: &str,
        pred: impl Fn(&gochat_gateway::StatsSnapshot) -> bool,
    ) {
        let wait = async {
            while !pred(&self.stats.snapshot()) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(GUARD, wait).await.unwrap_or_else(|_| {
            panic!("timed out waiting for {what}: {:?}", self.stats.snapshot())
        });
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub async fn next_record(c: &mut MemoryConsumer) -> Record {
    let r = tokio::time::timeout(GUARD, c.recv())
        .await
        .expect("timed out waiting for an upstream record")
        .expect("recv");
    c.commit(&r).await.expect("commit");
    r
}

// ---------------------------------------------------------------- WebSocket client helpers

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub async fn connect(gw: &TestGateway, token: &str) -> Ws {
    let (ws, _) = tokio::time::timeout(GUARD, tokio_tungstenite::connect_async(gw.ws_url(token)))
        .await
        .expect("connect timed out")
        .expect("connect");
    ws
}

/// Connects and makes sure the session is registered (its first pong came back).
pub async fn connect_ready(gw: &TestGateway, token: &str) -> Ws {
    let mut ws = connect(gw, token).await;
    ping_pong(&mut ws).await;
    ws
}

/// Connects through a socket with a tiny receive buffer (4 KiB), so the server's writes back up
/// as soon as the client stops reading; waits for the first pong like [`connect_ready`].
pub async fn connect_small_buffer(gw: &TestGateway, token: &str) -> Ws {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let stream = socket.connect(gw.addr).await.expect("connect");
    let (mut ws, _) =
        tokio_tungstenite::client_async(gw.ws_url(token), MaybeTlsStream::Plain(stream))
            .await
            .expect("handshake");
    ping_pong(&mut ws).await;
    ws
}

pub async fn send_json(ws: &mut Ws, v: Value) {
    ws.send(WsMessage::text(v.to_string())).await.expect("send");
}

pub async fn send_text(ws: &mut Ws, text: String) {
    ws.send(WsMessage::text(text)).await.expect("send");
}

/// What the server sent next (WS-level pings/pongs are skipped).
#[derive(Debug)]
pub enum Incoming {
    Frame(Value),
    Close(Option<CloseFrame>),
    Ended,
}

pub async fn next_incoming(ws: &mut Ws) -> Incoming {
    let read = async {
        loop {
            match ws.next().await {
                Some(Ok(WsMessage::Text(t))) => {
                    return Incoming::Frame(serde_json::from_str(t.as_str()).expect("server JSON"));
                }
                Some(Ok(WsMessage::Close(c))) => return Incoming::Close(c),
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
                Some(Ok(other)) => panic!("unexpected message {other:?}"),
                Some(Err(_)) | None => return Incoming::Ended,
            }
        }
    };
    tokio::time::timeout(GUARD, read)
        .await
        .expect("timed out waiting for a frame")
}

/// The next frame, which must be a JSON text frame.
pub async fn next_frame(ws: &mut Ws) -> Value {
    match next_incoming(ws).await {
        Incoming::Frame(v) => v,
        other => panic!("expected a frame, got {other:?}"),
    }
}

/// The next frame, which must be of type `kind`; returns its `data`.
pub async fn expect_frame(ws: &mut Ws, kind: &str) -> Value {
    let v = next_frame(ws).await;
    assert_eq!(v["type"], kind, "unexpected frame {v}");
    assert!(
        v["timestamp"].as_i64().is_some_and(|t| t > 0),
        "timestamp in {v}"
    );
    assert!(
        v["message_id"].as_str().is_some_and(|m| !m.is_empty()),
        "message_id in {v}"
    );
    v["data"].clone()
}

/// The close frame the server sends next, skipping any text frames before it.
pub async fn expect_close(ws: &mut Ws) -> Option<CloseFrame> {
    loop {
        match next_incoming(ws).await {
            Incoming::Frame(_) => continue,
            Incoming::Close(c) => return c,
            Incoming::Ended => return None,
        }
    }
}

pub async fn ping_pong(ws: &mut Ws) {
    send_json(
        ws,
        serde_json::json!({"type": "ping", "data": {}, "timestamp": 1}),
    )
    .await;
    let data = expect_frame(ws, "pong").await;
    assert_eq!(data, serde_json::json!({}));
}

pub fn send_message(conversation_id: &str, content: &str, client_msg_id: &str) -> Value {
    serde_json::json!({
        "type": "send-message",
        "data": {
            "conversation_id": conversation_id,
            "message_type": 1,
            "content": content,
            "client_msg_id": client_msg_id,
        },
        "timestamp": 1,
    })
}

/// Learns a session's id: it sends a message and the upstream record names it.
pub async fn session_id(ws: &mut Ws, upstream: &mut MemoryConsumer, probe: &str) -> String {
    send_json(ws, send_message(probe, "probe", probe)).await;
    loop {
        let r = next_record(upstream).await;
        if r.key == probe {
            return r
                .headers
                .get("session_id")
                .expect("session_id header")
                .clone();
        }
    }
}

pub fn new_message(recipients: &[&str], conversation_id: &str, seq: i64) -> DownstreamMessage {
    DownstreamMessage {
        trace_id: "t".into(),
        message_id: (7000 + seq).to_string(),
        conversation_id: conversation_id.into(),
        sender_id: "999".into(),
        message_type: 1,
        content: format!("hello {seq}"),
        seq_id: seq,
        timestamp: 1_700_000_000_000 + seq,
        targets: recipients.iter().map(|s| s.to_string()).collect(),
        ..DownstreamMessage::default()
    }
}
