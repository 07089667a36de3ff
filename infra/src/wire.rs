//! Payloads that cross the message bus (in-process or Kafka), as JSON (spec §1.3.3 and §4.2).
//!
//! The spec's fields keep their names and meaning; gochat's additions are optional, so a payload
//! that carries only the spec's fields parses, and every addition is documented in
//! `docs/protocol.md` ("Bus payloads").

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `im-upstream-topic`: messages sent over WebSocket, keyed by conversation id.
pub const UPSTREAM_TOPIC: &str = "im-upstream-topic";
/// `im-task-topic`: heavy work for the task service.
pub const TASK_TOPIC: &str = "im-task-topic";

/// The downstream topic of one gateway.
pub fn downstream_topic(gateway_id: &str) -> String {
    format!("im-downstream-topic-{gateway_id}")
}

/// Header naming the WebSocket session a message came from.
pub const HEADER_SESSION: &str = "session_id";

/// Header marking an upstream record as a control record for the conversation's actor rather
/// than a message (gateways never set it; logic does).
pub const HEADER_CONTROL: &str = "gochat_control";

/// [`HEADER_CONTROL`] value: `user_id` left or was removed from the conversation, so the actor
/// must check that user's membership again before storing anything more from them.
pub const CONTROL_MEMBERSHIP: &str = "membership-changed";

/// A message a user sent, on its way to the conversation's owner in logic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamMessage {
    /// Trace id of the send, carried into every log line and the ack.
    pub trace_id: String,
    /// The sender.
    pub user_id: String,
    /// The gateway holding the sender's session.
    pub gateway_id: String,
    /// Where it goes.
    pub conversation_id: String,
    /// 1 text, 2 image, 3 file, 4 system.
    pub message_type: i32,
    /// The body.
    pub content: String,
    /// The sender's idempotency key.
    pub client_msg_id: String,
    /// When the gateway received it (Unix ms).
    pub timestamp: i64,
    /// Extra metadata; gochat sets `session_id` (the sending session).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// What a downstream record asks the gateway to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DownstreamKind {
    /// Deliver a stored message as `new-message` (the spec's only kind).
    #[default]
    NewMessage,
    /// Acknowledge a stored message to the session that sent it (`message-ack`).
    MessageAck,
    /// Tell the sending session its message was refused (`error`).
    Error,
    /// Tell users that a peer came online or went offline (`online-status`).
    OnlineStatus,
}

/// A delivery for one gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct DownstreamMessage {
    /// Trace id of the original send.
    pub trace_id: String,
    /// The spec's single recipient (empty when `targets` or `broadcast` is used).
    pub target_user_id: String,
    /// The stored message's id.
    pub message_id: String,
    /// Its conversation.
    pub conversation_id: String,
    /// Its sender (for `online-status`: the user whose state changed).
    pub sender_id: String,
    /// 1 text, 2 image, 3 file, 4 system.
    pub message_type: i32,
    /// The body.
    pub content: String,
    /// Its seq.
    pub seq_id: i64,
    /// Storage time (Unix ms).
    pub timestamp: i64,
    /// Extra metadata.
    pub headers: BTreeMap<String, String>,
    /// Addition: what to do (default `new-message`).
    pub kind: DownstreamKind,
    /// Addition: several recipients on this gateway in one record (fan-out batches).
    pub targets: Vec<String>,
    /// Addition: every session on this gateway (the world room).
    pub broadcast: bool,
    /// Addition: the one session an ack or error is for.
    pub target_session: String,
    /// Addition: a session not to deliver to (the sender's own, which gets the ack instead).
    pub exclude_session: String,
    /// Addition: the sender's idempotency key (acks and errors).
    pub client_msg_id: String,
    /// Addition: the numeric error code (errors).
    pub error_code: u16,
    /// Addition: the error text (errors).
    pub error_message: String,
    /// Addition: online or not (`online-status`).
    pub is_online: bool,
}

impl DownstreamMessage {
    /// Every user this record is for (not counting `broadcast`).
    pub fn recipients(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.target_user_id.as_str())
            .filter(|s| !s.is_empty())
            .chain(self.targets.iter().map(String::as_str))
    }
}

/// The task types of spec §4.2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskType {
    /// Deliver a message to a big group or the world room.
    Fanout,
    /// Offline push.
    Push,
    /// Content audit.
    Audit,
    /// Search indexing.
    Index,
    /// Recommendation update.
    Recommend,
}

/// A record of `im-task-topic`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskMessage {
    /// Trace id of the work's origin.
    pub trace_id: String,
    /// Which processor handles it.
    pub task_type: TaskType,
    /// Unique id of this task (processors use it to stay idempotent).
    pub task_id: String,
    /// The type's own payload.
    pub data: serde_json::Value,
    /// Extra metadata.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// When it was created (Unix ms).
    pub created_at: i64,
}

/// The data of a `fanout` task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct FanoutTaskData {
    /// The group (empty for the world room).
    pub group_id: String,
    /// The stored message.
    pub message_id: String,
    /// Addition: the conversation (`world` for the world room).
    pub conversation_id: String,
    /// Addition: the message itself, so task needs no read to deliver it.
    pub message: Option<DownstreamMessage>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_only_downstream_payload_parses() {
        let json = r#"{"trace_id":"t","target_user_id":"7","message_id":"9","conversation_id":"s_1_7",
            "sender_id":"1","message_type":1,"content":"hi","seq_id":3,"timestamp":5,"headers":{}}"#;
        let m: DownstreamMessage = serde_json::from_str(json).expect("parses");
        assert_eq!(m.kind, DownstreamKind::NewMessage);
        assert_eq!(m.recipients().collect::<Vec<_>>(), vec!["7"]);
    }

    #[test]
    fn task_types_are_the_spec_strings() {
        let t = TaskMessage {
            trace_id: "t".into(),
            task_type: TaskType::Fanout,
            task_id: "1".into(),
            data: serde_json::json!({"group_id": "5", "message_id": "6"}),
            headers: BTreeMap::new(),
            created_at: 0,
        };
        let v = serde_json::to_value(&t).expect("serializes");
        assert_eq!(v["task_type"], "fanout");
        let d: FanoutTaskData = serde_json::from_value(v["data"].clone()).expect("parses");
        assert_eq!(d.group_id, "5");
    }

    /// The in-process bus hands values over as they are and Kafka sends their JSON; the two
    /// agree only if every field survives the JSON round trip. This checks it for a fully
    /// populated value of each wire type (every optional field set, text needing escapes).
    #[test]
    fn every_wire_type_survives_the_trip_through_kafka_bytes() {
        use crate::mq::Payload;

        fn through_bytes<T: crate::mq::Message + PartialEq + std::fmt::Debug>(value: T) {
            let bytes = Payload::value(value.clone())
                .bytes()
                .expect("encodes")
                .into_owned();
            let read = Payload::from(bytes);
            assert!(!read.is_value());
            assert_eq!(*read.decode::<T>().expect("decodes"), value);
        }

        let headers: BTreeMap<String, String> =
            [("traceparent".to_string(), "00-ab-cd-01".to_string())].into();
        let text = "héllo \"quoted\" \\ \n\t \u{1F600} <b>";
        through_bytes(UpstreamMessage {
            trace_id: "trace-1".into(),
            user_id: "7".into(),
            gateway_id: "gw-a".into(),
            conversation_id: "g_12".into(),
            message_type: 3,
            content: text.into(),
            client_msg_id: "c-1".into(),
            timestamp: 1_764_000_000_123,
            headers: headers.clone(),
        });
        let down = DownstreamMessage {
            trace_id: "trace-2".into(),
            target_user_id: "8".into(),
            message_id: "900719925474099".into(),
            conversation_id: "s_7_8".into(),
            sender_id: "7".into(),
            message_type: 2,
            content: text.into(),
            seq_id: i64::MAX,
            timestamp: -1,
            headers: headers.clone(),
            kind: DownstreamKind::Error,
            targets: vec!["9".into(), "10".into()],
            broadcast: true,
            target_session: "sess-1".into(),
            exclude_session: "sess-2".into(),
            client_msg_id: "c-2".into(),
            error_code: 3002,
            error_message: "refused".into(),
            is_online: true,
        };
        through_bytes(down.clone());
        for kind in [
            DownstreamKind::NewMessage,
            DownstreamKind::MessageAck,
            DownstreamKind::OnlineStatus,
        ] {
            through_bytes(DownstreamMessage {
                kind,
                ..down.clone()
            });
        }
        let fanout = FanoutTaskData {
            group_id: "12".into(),
            message_id: "900719925474099".into(),
            conversation_id: "g_12".into(),
            message: Some(down),
        };
        through_bytes(fanout.clone());
        through_bytes(TaskMessage {
            trace_id: "trace-3".into(),
            task_type: TaskType::Fanout,
            task_id: "task-1".into(),
            data: serde_json::to_value(&fanout).expect("serializes"),
            headers,
            created_at: 1_764_000_000_456,
        });
    }
}
