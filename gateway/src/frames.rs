//! The WebSocket envelope `{type, message_id?, data, timestamp}` (spec §1.3.2): parsing and
//! validating client frames, building server frames.
//!
//! Parsing never panics and never trusts the client: every refusal is a [`FrameError`] carrying
//! the spec code (1001 malformed / unknown / missing field, 3002 invalid message) and, when the
//! frame had a usable one, the client's `client_msg_id` so the client can match the error to its
//! send.

use gochat_infra::ErrorCode;
use gochat_infra::wire::DownstreamMessage;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Client -> server: send a message.
pub const SEND_MESSAGE: &str = "send-message";
/// Server -> client: a stored message.
pub const NEW_MESSAGE: &str = "new-message";
/// Server -> sender: the message was stored.
pub const MESSAGE_ACK: &str = "message-ack";
/// Either way: heartbeat.
pub const PING: &str = "ping";
/// Either way: heartbeat answer.
pub const PONG: &str = "pong";
/// Server -> client: a peer came online or went offline.
pub const ONLINE_STATUS: &str = "online-status";
/// Server -> client: a frame was refused.
pub const ERROR: &str = "error";

/// Longest `conversation_id` and `client_msg_id` accepted, in bytes.
pub const MAX_ID_LEN: usize = 64;

/// A frame the client sent, once validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    /// `ping`: answer with `pong`.
    Ping,
    /// `pong`: the client answering; nothing to do.
    Pong,
    /// A valid `send-message`.
    Send(SendMessage),
}

/// `send-message` data, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendMessage {
    /// Where it goes (non-empty, at most 64 bytes).
    pub conversation_id: String,
    /// 1 text, 2 image, 3 file, 4 system.
    pub message_type: i32,
    /// The body (non-empty, at most `max_content_chars` characters).
    pub content: String,
    /// The client's idempotency key (non-empty, at most 64 bytes).
    pub client_msg_id: String,
}

/// Why a client frame was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    /// The spec code sent back.
    pub code: ErrorCode,
    /// What was wrong, for people.
    pub message: String,
    /// The refused send's key, when it had a usable one.
    pub client_msg_id: Option<String>,
}

impl FrameError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            client_msg_id: None,
        }
    }

    /// 1001 with a message.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidParameter, message)
    }

    fn with_client_msg_id(mut self, id: Option<String>) -> Self {
        self.client_msg_id = id;
        self
    }
}

/// The envelope as a client sends it. `data` and `timestamp` may be left out by clients.
#[derive(Debug, Deserialize)]
struct InEnvelope {
    #[serde(rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    data: Value,
}

/// Parses and validates one text frame (its size was checked by the caller).
pub fn parse_client_frame(text: &str, max_content_chars: usize) -> Result<ClientFrame, FrameError> {
    let envelope: InEnvelope = serde_json::from_str(text)
        .map_err(|e| FrameError::invalid(format!("malformed JSON envelope: {e}")))?;
    let kind = envelope
        .kind
        .ok_or_else(|| FrameError::invalid("missing field `type`"))?;
    match kind.as_str() {
        PING => Ok(ClientFrame::Ping),
        PONG => Ok(ClientFrame::Pong),
        SEND_MESSAGE => parse_send(&envelope.data, max_content_chars).map(ClientFrame::Send),
        other => Err(FrameError::invalid(format!(
            "unknown frame type `{}`; clients send `send-message`, `ping` or `pong`",
            truncate(other, 32)
        ))),
    }
}

fn truncate(s: &str, max_chars: usize) -> String {
    s.chars().take(max_chars).collect()
}

fn parse_send(data: &Value, max_content_chars: usize) -> Result<SendMessage, FrameError> {
    let obj = data
        .as_object()
        .ok_or_else(|| FrameError::invalid("`data` of send-message must be an object"))?;
    // Echo the key in every refusal when it is a usable string, whatever else is wrong.
    let echo = obj
        .get("client_msg_id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty() && s.len() <= MAX_ID_LEN)
        .map(str::to_owned);
    let fail = |e: FrameError| e.with_client_msg_id(echo.clone());

    let string_field = |name: &str| -> Result<&str, FrameError> {
        match obj.get(name) {
            None | Some(Value::Null) => Err(FrameError::invalid(format!("missing field `{name}`"))),
            Some(Value::String(s)) => Ok(s.as_str()),
            Some(_) => Err(FrameError::invalid(format!("`{name}` must be a string"))),
        }
    };
    let id_field = |name: &str| -> Result<String, FrameError> {
        let s = string_field(name)?;
        if s.is_empty() {
            return Err(FrameError::invalid(format!("`{name}` must not be empty")));
        }
        if s.len() > MAX_ID_LEN {
            return Err(FrameError::invalid(format!(
                "`{name}` is longer than {MAX_ID_LEN} bytes"
            )));
        }
        Ok(s.to_owned())
    };

    let client_msg_id = id_field("client_msg_id").map_err(&fail)?;
    let conversation_id = id_field("conversation_id").map_err(&fail)?;
    let message_type = match obj.get("message_type") {
        None | Some(Value::Null) => {
            return Err(fail(FrameError::invalid("missing field `message_type`")));
        }
        Some(v) => v.as_i64().ok_or_else(|| {
            fail(FrameError::new(
                ErrorCode::InvalidMessage,
                "`message_type` must be an integer 1..=4",
            ))
        })?,
    };
    if !(1..=4).contains(&message_type) {
        return Err(fail(FrameError::new(
            ErrorCode::InvalidMessage,
            format!(
                "`message_type` {message_type} is not one of 1 (text), 2 (image), 3 (file), 4 (system)"
            ),
        )));
    }
    let content = string_field("content").map_err(&fail)?;
    if content.is_empty() {
        return Err(fail(FrameError::new(
            ErrorCode::InvalidMessage,
            "`content` must not be empty",
        )));
    }
    let chars = content.chars().count();
    if chars > max_content_chars {
        return Err(fail(FrameError::new(
            ErrorCode::InvalidMessage,
            format!("`content` has {chars} characters; at most {max_content_chars} are allowed"),
        )));
    }
    Ok(SendMessage {
        conversation_id,
        message_type: i32::try_from(message_type).unwrap_or(1),
        content: content.to_owned(),
        client_msg_id,
    })
}

/// The envelope as the server sends it.
#[derive(Debug, Serialize)]
struct OutEnvelope<'a, T: Serialize> {
    #[serde(rename = "type")]
    kind: &'a str,
    message_id: String,
    data: T,
    timestamp: i64,
}

/// Serializes a server frame with a fresh envelope `message_id`.
pub fn server_frame<T: Serialize>(kind: &str, message_id: String, data: T, now_ms: i64) -> String {
    let envelope = OutEnvelope {
        kind,
        message_id,
        data,
        timestamp: now_ms,
    };
    // Serializing plain structs and JSON values cannot fail; fall back to a minimal frame.
    serde_json::to_string(&envelope)
        .unwrap_or_else(|_| format!(r#"{{"type":"{kind}","data":{{}}}}"#))
}

/// `new-message` data: exactly the spec's `NewMessageData`.
#[derive(Debug, Serialize)]
pub struct NewMessageData<'a> {
    /// The stored message's id.
    pub message_id: &'a str,
    /// Its conversation.
    pub conversation_id: &'a str,
    /// Its sender.
    pub sender_id: &'a str,
    /// 1..=4.
    pub message_type: i32,
    /// The body.
    pub content: &'a str,
    /// Its seq in the conversation.
    pub seq_id: i64,
    /// Storage time (Unix ms).
    pub timestamp: i64,
}

impl<'a> From<&'a DownstreamMessage> for NewMessageData<'a> {
    fn from(m: &'a DownstreamMessage) -> Self {
        Self {
            message_id: &m.message_id,
            conversation_id: &m.conversation_id,
            sender_id: &m.sender_id,
            message_type: m.message_type,
            content: &m.content,
            seq_id: m.seq_id,
            timestamp: m.timestamp,
        }
    }
}

/// `message-ack` data.
#[derive(Debug, Serialize)]
pub struct MessageAckData<'a> {
    /// The sender's key.
    pub client_msg_id: &'a str,
    /// The stored message's id.
    pub message_id: &'a str,
    /// Its conversation.
    pub conversation_id: &'a str,
    /// Its seq.
    pub seq_id: i64,
    /// Storage time (Unix ms).
    pub timestamp: i64,
}

impl<'a> From<&'a DownstreamMessage> for MessageAckData<'a> {
    fn from(m: &'a DownstreamMessage) -> Self {
        Self {
            client_msg_id: &m.client_msg_id,
            message_id: &m.message_id,
            conversation_id: &m.conversation_id,
            seq_id: m.seq_id,
            timestamp: m.timestamp,
        }
    }
}

/// `error` data.
#[derive(Debug, Serialize)]
pub struct ErrorData<'a> {
    /// The spec code.
    pub code: u16,
    /// What went wrong.
    pub message: &'a str,
    /// The refused send's key, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_msg_id: Option<&'a str>,
}

/// `online-status` data.
#[derive(Debug, Serialize)]
pub struct OnlineStatusData<'a> {
    /// Whose state changed.
    pub user_id: &'a str,
    /// Online or not.
    pub is_online: bool,
    /// When (Unix ms).
    pub timestamp: i64,
}

/// `ping` / `pong` data: `{}`.
#[derive(Debug, Serialize)]
pub struct Empty {}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(data: Value) -> Result<ClientFrame, FrameError> {
        parse_client_frame(
            &serde_json::json!({"type": "send-message", "data": data, "timestamp": 1}).to_string(),
            10,
        )
    }

    #[test]
    fn ping_and_pong_need_no_data() {
        assert_eq!(
            parse_client_frame(r#"{"type":"ping"}"#, 10),
            Ok(ClientFrame::Ping)
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"pong","data":{},"timestamp":5}"#, 10),
            Ok(ClientFrame::Pong)
        );
    }

    #[test]
    fn malformed_and_unknown_frames_are_1001() {
        for bad in [
            "",
            "{",
            "[]",
            "42",
            r#"{"data":{}}"#,
            r#"{"type":"new-message"}"#,
        ] {
            let err = parse_client_frame(bad, 10).expect_err(bad);
            assert_eq!(err.code, ErrorCode::InvalidParameter, "{bad}");
        }
    }

    #[test]
    fn a_valid_send_is_accepted_and_lengths_count_characters() {
        let frame = send(serde_json::json!({
            "conversation_id": "s_1_2", "message_type": 1,
            "content": "éééééééééé", "client_msg_id": "c1"
        }));
        assert_eq!(
            frame,
            Ok(ClientFrame::Send(SendMessage {
                conversation_id: "s_1_2".into(),
                message_type: 1,
                content: "éééééééééé".into(),
                client_msg_id: "c1".into(),
            }))
        );
    }

    #[test]
    fn invalid_sends_get_the_right_code_and_echo_the_key() {
        let base = serde_json::json!({
            "conversation_id": "s_1_2", "message_type": 1, "content": "hi", "client_msg_id": "c1"
        });
        let with = |k: &str, v: Value| {
            let mut d = base.clone();
            d[k] = v;
            send(d).expect_err(k)
        };
        let long = with("content", Value::String("x".repeat(11)));
        assert_eq!(long.code, ErrorCode::InvalidMessage);
        assert_eq!(long.client_msg_id.as_deref(), Some("c1"));
        assert_eq!(with("content", "".into()).code, ErrorCode::InvalidMessage);
        assert_eq!(
            with("message_type", 5.into()).code,
            ErrorCode::InvalidMessage
        );
        assert_eq!(
            with("message_type", 0.into()).code,
            ErrorCode::InvalidMessage
        );
        assert_eq!(
            with("message_type", Value::Null).code,
            ErrorCode::InvalidParameter
        );
        assert_eq!(
            with("conversation_id", "".into()).code,
            ErrorCode::InvalidParameter
        );
        let long_id = with("conversation_id", Value::String("c".repeat(65)));
        assert_eq!(long_id.code, ErrorCode::InvalidParameter);
        let no_key = with("client_msg_id", Value::Null);
        assert_eq!(no_key.code, ErrorCode::InvalidParameter);
        assert_eq!(no_key.client_msg_id, None);
        assert_eq!(
            send(Value::Null).expect_err("null").code,
            ErrorCode::InvalidParameter
        );
    }

    #[test]
    fn server_frames_have_the_envelope() {
        let text = server_frame(PONG, "9".into(), Empty {}, 42);
        let v: Value = serde_json::from_str(&text).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"type": "pong", "message_id": "9", "data": {}, "timestamp": 42})
        );
    }
}
