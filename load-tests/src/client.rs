//! The client side of gochat's protocol as the scenarios need it: JSON over HTTP (with bounded
//! retries of transient refusals), WebSocket connections bound to a chosen local source address
//! (`TcpSocket` then `client_async`), the frames the scenarios send, and a cheap borrowed parse
//! of the frames the server sends.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::{SinkExt, StreamExt};
use memchr::memmem::{Finder, FinderRev};
use serde::Deserialize;
use serde_json::Value;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::guard::Target;
use crate::progress::{Counters, inc};

/// A WebSocket connection to the gateway.
pub type Ws = WebSocketStream<TcpStream>;

/// Microseconds since the Unix epoch (the clock every latency in a frame is measured with;
/// sender and receiver run on the same machine).
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// JSON over HTTP to the gateway's `/api/v1`.
#[derive(Debug, Clone)]
pub struct Http {
    client: reqwest::Client,
    target: Target,
}

/// Attempts per request when the answer is transient (no connection, 429, 503).
const HTTP_ATTEMPTS: u32 = 6;

impl Http {
    /// A client for `target` keeping up to `parallel` idle connections.
    pub fn new(target: &Target, parallel: usize) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(parallel.max(1))
            .timeout(Duration::from_secs(30))
            .build()?;
        Ok(Self {
            client,
            target: target.clone(),
        })
    }

    /// `POST /api/v1{path}` with a JSON body; (status, JSON body).
    pub async fn post(
        &self,
        path: &str,
        token: Option<&str>,
        body: &Value,
    ) -> anyhow::Result<(u16, Value)> {
        self.call(reqwest::Method::POST, path, token, Some(body))
            .await
    }

    /// `GET /api/v1{path}`; (status, JSON body).
    pub async fn get(&self, path: &str, token: Option<&str>) -> anyhow::Result<(u16, Value)> {
        self.call(reqwest::Method::GET, path, token, None).await
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let url = self.target.api(path);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut req = self.client.request(method.clone(), &url);
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            let transient = match req.send().await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    if (status == 429 || status == 503) && attempt < HTTP_ATTEMPTS {
                        true
                    } else {
                        let body = resp.json().await.unwrap_or(Value::Null);
                        return Ok((status, body));
                    }
                }
                Err(e) if attempt < HTTP_ATTEMPTS && (e.is_connect() || e.is_timeout()) => true,
                Err(e) => return Err(anyhow::anyhow!("{method} {url}: {e}")),
            };
            if transient {
                tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
            }
        }
    }
}

/// Why a WebSocket connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Binding the local source address failed (e.g. its ports are used up).
    #[error("binding {0}: {1}")]
    Bind(IpAddr, std::io::Error),
    /// The TCP connection failed.
    #[error("TCP connect: {0}")]
    Tcp(std::io::Error),
    /// The server answered the upgrade with an HTTP status (401 bad token, 503 full).
    #[error("upgrade refused with HTTP {0}")]
    Status(u16),
    /// The WebSocket handshake failed otherwise.
    #[error("handshake: {0}")]
    Handshake(String),
    /// Connect + upgrade took longer than allowed.
    #[error("timed out")]
    Timeout,
}

impl ConnectError {
    /// A short label to tally failures by.
    pub fn cause(&self) -> String {
        match self {
            Self::Bind(_, e) => format!("bind: {}", e.kind()),
            Self::Tcp(e) => format!("tcp: {}", e.kind()),
            Self::Status(s) => format!("upgrade: HTTP {s}"),
            Self::Handshake(m) => {
                let short: String = m.chars().take(60).collect();
                format!("handshake: {short}")
            }
            Self::Timeout => "connect+upgrade timeout".to_owned(),
        }
    }
}

/// Small client buffers: tens of thousands of connections live in one generator process.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

/// A TCP connection to `target` from `source` (any local address when `None`), without Nagle's
/// delay.
pub async fn tcp_connect(
    target: &Target,
    source: Option<IpAddr>,
) -> Result<TcpStream, ConnectError> {
    let socket = match target.addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(ConnectError::Tcp)?;
    if let Some(ip) = source {
        socket
            .bind(SocketAddr::new(ip, 0))
            .map_err(|e| ConnectError::Bind(ip, e))?;
    }
    let stream = socket
        .connect(target.addr)
        .await
        .map_err(ConnectError::Tcp)?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Opens an authenticated WebSocket to `target` from `source` (any local address when `None`):
/// TCP connect, then the HTTP upgrade with `?token=`, within `timeout`.
pub async fn connect(
    target: &Target,
    source: Option<IpAddr>,
    token: &str,
    timeout: Duration,
) -> Result<Ws, ConnectError> {
    let attempt = async {
        let stream = tcp_connect(target, source).await?;
        let url = target.ws_url(token);
        match tokio_tungstenite::client_async_with_config(url, stream, Some(ws_config())).await {
            Ok((ws, _response)) => Ok(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                Err(ConnectError::Status(resp.status().as_u16()))
            }
            Err(e) => Err(ConnectError::Handshake(e.to_string())),
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or(Err(ConnectError::Timeout))
}

/// Opens one connection per token, `rate` new connections per second with at most `inflight`
/// under way, connection `j` from source slot `first_source + j`. Every attempt is its own task
/// (the handshakes run on every runtime thread). Results in token order, with each attempt's
/// connect + upgrade time; `counters.connected` / `counters.failed` follow along.
pub async fn connect_many(
    target: &Target,
    tokens: Vec<String>,
    first_source: usize,
    rate: f64,
    inflight: usize,
    timeout: Duration,
    counters: &Arc<Counters>,
) -> Vec<(Result<Ws, ConnectError>, Duration)> {
    let plan = ConnectPlan {
        first_source,
        rate,
        inflight,
        timeout,
    };
    connect_many_with(target, tokens, plan, counters, |target, source, token, timeout| async move {
        connect(&target, source, &token, timeout).await
    })
    .await
}

/// How [`connect_many_with`] paces its connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnectPlan {
    /// Connection `j` comes from source slot `first_source + j`.
    pub first_source: usize,
    /// New connections per second.
    pub rate: f64,
    /// At most this many under way at once.
    pub inflight: usize,
    /// Connect + upgrade timeout per connection.
    pub timeout: Duration,
}

/// [`connect_many`] with another kind of connection: `open(target, source, token, timeout)`
/// makes one (e.g. [`crate::rawws::RawWs::connect`]).
pub async fn connect_many_with<C, F, Fut>(
    target: &Target,
    tokens: Vec<String>,
    plan: ConnectPlan,
    counters: &Arc<Counters>,
    open: F,
) -> Vec<(Result<C, ConnectError>, Duration)>
where
    C: Send + 'static,
    F: Fn(Target, Option<IpAddr>, String, Duration) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<C, ConnectError>> + Send,
{
    let permits = Arc::new(Semaphore::new(plan.inflight.max(1)));
    let start = tokio::time::Instant::now();
    let rate = plan.rate.max(0.001);
    let handles: Vec<_> = tokens
        .into_iter()
        .enumerate()
        .map(|(j, token)| {
            let at = start + Duration::from_secs_f64(j as f64 / rate);
            let (target, permits, counters, open) = (
                target.clone(),
                Arc::clone(&permits),
                Arc::clone(counters),
                open.clone(),
            );
            tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                let _permit = permits.acquire_owned().await;
                let began = Instant::now();
                let source = target.source(plan.first_source + j);
                let r = open(target, source, token, plan.timeout).await;
                match &r {
                    Ok(_) => inc(&counters.connected),
                    Err(_) => inc(&counters.failed),
                }
                (r, began.elapsed())
            })
        })
        .collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(
            h.await
                .unwrap_or_else(|e| (Err(ConnectError::Handshake(e.to_string())), Duration::ZERO)),
        );
    }
    out
}

/// Closes `ws` as a client should: a close frame, then reading until the server's close frame
/// (or the end of the stream), within `timeout`. True when the server answered the close.
pub async fn close(ws: &mut Ws, timeout: Duration) -> bool {
    let closing = async {
        if ws.close(None).await.is_err() {
            return false;
        }
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(_))) | None => return true,
                Some(Ok(_)) => {}
                Some(Err(_)) => return false,
            }
        }
    };
    tokio::time::timeout(timeout, closing)
        .await
        .unwrap_or(false)
}

/// Sends one text frame.
pub async fn send_text(
    ws: &mut Ws,
    text: String,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    ws.send(Message::text(text)).await
}

/// The application-level heartbeat frame.
pub const PING: &str = r#"{"type":"ping","data":{}}"#;

/// A `send-message` frame. The ids and content the scenarios generate are plain ASCII
/// (letters, digits, `_`, `.`, `:`), so no JSON escaping is needed.
pub fn send_message(conversation_id: &str, content: &str, client_msg_id: &str) -> String {
    format!(
        r#"{{"type":"send-message","data":{{"conversation_id":"{conversation_id}","message_type":1,"content":"{content}","client_msg_id":"{client_msg_id}"}}}}"#
    )
}

/// A server frame, parsed without copying what the scenarios read.
#[derive(Debug, Deserialize)]
pub struct Frame<'a> {
    /// `new-message`, `message-ack`, `error`, `pong`, `online-status`.
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
    /// When the server made the frame (Unix ms; for `new-message`, when the gateway
    /// dispatched the record to its sessions).
    #[serde(default)]
    pub timestamp: Option<u64>,
    /// The frame's payload (only the fields the scenarios use).
    #[serde(default, borrow)]
    pub data: FrameData<'a>,
}

/// The fields of a frame's `data` the scenarios use.
#[derive(Debug, Default, Deserialize)]
pub struct FrameData<'a> {
    #[serde(default, borrow)]
    pub conversation_id: Option<Cow<'a, str>>,
    #[serde(default)]
    pub seq_id: Option<u64>,
    #[serde(default, borrow)]
    pub content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub client_msg_id: Option<Cow<'a, str>>,
    /// For `error` frames.
    #[serde(default)]
    pub code: Option<u16>,
}

/// Parses a server text frame (None when it is not a gochat envelope).
pub fn parse(text: &str) -> Option<Frame<'_>> {
    new_message(text).or_else(|| serde_json::from_str(text).ok())
}

/// The keys [`new_message`] looks for, each with its searcher built once: building one per
/// search (as `str::find` does) cost as much as serde's whole parse.
struct Keys {
    data: Finder<'static>,
    conversation_id: Finder<'static>,
    seq_id: Finder<'static>,
    content: Finder<'static>,
    timestamp: FinderRev<'static>,
}

static KEYS: LazyLock<Keys> = LazyLock::new(|| Keys {
    data: Finder::new(r#""data":{"#),
    conversation_id: Finder::new(r#""conversation_id":""#),
    seq_id: Finder::new(r#""seq_id":"#),
    content: Finder::new(r#""content":""#),
    timestamp: FinderRev::new(r#","timestamp":"#),
});

/// A `new-message` envelope as the gateway writes it, read by finding its keys rather than
/// parsing the JSON: the fan-out scenario reads 300,000 of them a second on the same two cores
/// as the server, and serde took a quarter of the generator's CPU there. The gateway writes
/// the envelope's `timestamp` last and `data`'s keys before it; a key is found by its quoted
/// name followed by `:`, which cannot occur inside a JSON string (a quote there is escaped).
/// None, for serde to parse, when the frame is anything else or a string read holds an escape.
fn new_message(text: &str) -> Option<Frame<'_>> {
    let keys = &*KEYS;
    let rest = text.strip_prefix(r#"{"type":"new-message","#)?;
    let data = &rest[keys.data.find(rest.as_bytes())?..];
    let envelope_end = text.strip_suffix('}')?;
    let at = keys.timestamp.rfind(envelope_end.as_bytes())? + keys.timestamp.needle().len();
    let timestamp = envelope_end.get(at..)?.parse().ok()?;
    Some(Frame {
        kind: Cow::Borrowed("new-message"),
        timestamp: Some(timestamp),
        data: FrameData {
            conversation_id: Some(Cow::Borrowed(string_at(data, &keys.conversation_id)?)),
            seq_id: Some(number_at(data, &keys.seq_id)?),
            content: Some(Cow::Borrowed(string_at(data, &keys.content)?)),
            client_msg_id: None,
            code: None,
        },
    })
}

/// The string value after `key` (which ends with its opening quote), if it holds no escape.
fn string_at<'a>(json: &'a str, key: &Finder<'_>) -> Option<&'a str> {
    let from = key.find(json.as_bytes())? + key.needle().len();
    let rest = json.get(from..)?;
    let value = &rest[..memchr::memchr(b'"', rest.as_bytes())?];
    memchr::memchr(b'\\', value.as_bytes())
        .is_none()
        .then_some(value)
}

/// The unsigned integer after `key`.
fn number_at(json: &str, key: &Finder<'_>) -> Option<u64> {
    let from = key.find(json.as_bytes())? + key.needle().len();
    let rest = json.get(from..)?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    rest[..digits].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let out = send_message("s_1_2", "r1:3:17", "r1.3.17");
        let v: Value = serde_json::from_str(&out).expect("json");
        assert_eq!(v["data"]["client_msg_id"], "r1.3.17");
        let f = parse(
            r#"{"type":"new-message","message_id":"9","data":{"message_id":"1","conversation_id":"g_5","sender_id":"2","message_type":1,"content":"r1:3:17","seq_id":42,"timestamp":1},"timestamp":2}"#,
        )
        .expect("frame");
        assert_eq!(f.kind, "new-message");
        assert_eq!(f.data.seq_id, Some(42));
        assert_eq!(f.data.conversation_id.as_deref(), Some("g_5"));
        assert_eq!(f.data.content.as_deref(), Some("r1:3:17"));
        let pong = parse(r#"{"type":"pong","message_id":"1","data":{},"timestamp":1}"#);
        assert_eq!(pong.expect("pong").kind, "pong");
    }

    /// The fields a `new-message` is read for: (kind, timestamp, conversation, seq, content).
    fn fields(
        f: &Frame<'_>,
    ) -> (
        String,
        Option<u64>,
        Option<String>,
        Option<u64>,
        Option<String>,
    ) {
        (
            f.kind.to_string(),
            f.timestamp,
            f.data.conversation_id.as_deref().map(str::to_owned),
            f.data.seq_id,
            f.data.content.as_deref().map(str::to_owned),
        )
    }

    #[test]
    fn new_message_frames_read_by_key_match_serde() {
        let frames = [
            r#"{"type":"new-message","message_id":"9","data":{"message_id":"1","conversation_id":"w_1","sender_id":"2","message_type":1,"content":"fan:3:1764230000000000","seq_id":42,"timestamp":1764230000001},"timestamp":1764230000002}"#,
            // Keys inside the content (escaped quotes) and a quote in it: serde reads those.
            r#"{"type":"new-message","message_id":"9","data":{"message_id":"1","conversation_id":"g_5","sender_id":"2","message_type":1,"content":"x\",\"seq_id\":7,\"timestamp\":3}","seq_id":8,"timestamp":4},"timestamp":5}"#,
            r#"{"type":"new-message","message_id":"9","data":{"message_id":"1","conversation_id":"s_1_2","sender_id":"2","message_type":1,"content":"héllo wörld","seq_id":1,"timestamp":4},"timestamp":6}"#,
        ];
        for text in frames {
            let serde: Frame<'_> = serde_json::from_str(text).expect("valid JSON");
            let parsed = parse(text).expect("parsed");
            assert_eq!(fields(&parsed), fields(&serde), "{text}");
        }
        // The first and the third are read by key; the second has escapes and goes to serde.
        assert!(new_message(frames[0]).is_some());
        assert!(new_message(frames[1]).is_none());
        assert!(new_message(frames[2]).is_some());
        let f = parse(frames[1]).expect("parsed");
        assert_eq!(f.data.seq_id, Some(8));
        assert_eq!(f.timestamp, Some(5));
        // Other frames are not new-messages.
        let ack = r#"{"type":"message-ack","message_id":"3","data":{"message_id":"1","conversation_id":"s_1_2","seq_id":4,"client_msg_id":"k"},"timestamp":7}"#;
        assert!(new_message(ack).is_none());
        assert_eq!(
            parse(ack).expect("ack").data.client_msg_id.as_deref(),
            Some("k")
        );
    }
}
