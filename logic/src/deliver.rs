//! Delivery: acks to senders, new messages to recipients, and the distribution policy (spec
//! §2.3 `ShouldDistributeAsync`): single chats and groups up to the threshold (500 members) are
//! delivered here, one downstream record per gateway per message with every online recipient
//! on that gateway in `targets`; bigger groups and the world room become a `fanout` task.
//!
//! Every downstream record is keyed by conversation id, so a gateway receives one
//! conversation's records in seq order.

use std::collections::{BTreeMap, HashMap};

use gochat_infra::ids::ConversationKind;
use gochat_infra::mq::{Bus, MqError, Payload};
use gochat_infra::telemetry;
use gochat_infra::time::now_ms;
use gochat_infra::wire::{
    CONTROL_MEMBERSHIP, DownstreamKind, DownstreamMessage, FanoutTaskData, HEADER_CONTROL,
    TASK_TOPIC, TaskMessage, TaskType, UPSTREAM_TOPIC, UpstreamMessage, downstream_topic,
};
use gochat_infra::{AppError, ErrorCode};
use gochat_proto::repo as rpb;
use tonic::Request;

use crate::{Core, RepoApi, repo_err};

/// Where a batch's new messages go.
#[derive(Debug)]
pub(crate) enum Route {
    /// A fanout task per message (big groups, the world room).
    Task(ConversationKind),
    /// Gateway -> its online members.
    Gateways(HashMap<String, Vec<String>>),
}

/// Whether a conversation's messages go through the task service (spec `ShouldDistributeAsync`,
/// extended to the world room, whose members are every online user).
pub fn should_distribute_async(kind: ConversationKind, member_count: i64, threshold: i64) -> bool {
    match kind {
        ConversationKind::World => true,
        ConversationKind::Group(_) => member_count > threshold,
        ConversationKind::Single(..) => false,
    }
}

impl<R: RepoApi, B: Bus> Core<R, B> {
    /// Publishes one downstream record (as a value: JSON on Kafka, handed over as is in process).
    pub(crate) async fn publish(
        &self,
        gateway: &str,
        record: DownstreamMessage,
    ) -> Result<(), AppError> {
        let headers = BTreeMap::from([("trace_id".to_owned(), record.trace_id.clone())]);
        let key = record.conversation_id.clone();
        self.bus
            .send(
                &downstream_topic(gateway),
                &key,
                Payload::value(record),
                headers,
            )
            .await
            .map_err(bus_err)
    }

    /// Tells the conversation's actor (wherever it runs: the record goes through
    /// `im-upstream-topic`, keyed like the conversation's messages) that `user` is no longer a
    /// member. Best effort: if the record is lost, the actor asks repo again once its
    /// `membership_ttl` has passed.
    pub(crate) async fn membership_changed(&self, conversation: &str, user: &str) {
        let record = UpstreamMessage {
            trace_id: format!("{:016x}", self.ids.next_id()),
            user_id: user.to_owned(),
            gateway_id: String::new(),
            conversation_id: conversation.to_owned(),
            message_type: 0,
            content: String::new(),
            client_msg_id: String::new(),
            timestamp: now_ms(),
            headers: BTreeMap::from([(HEADER_CONTROL.to_owned(), CONTROL_MEMBERSHIP.to_owned())]),
        };
        let headers = record.headers.clone();
        let sent = self
            .bus
            .send(
                UPSTREAM_TOPIC,
                conversation,
                Payload::value(record),
                headers,
            )
            .await;
        if let Err(cause) = sent {
            tracing::warn!(%cause, conversation, user, "could not tell the conversation a member left");
        }
    }

    /// Tells one session its message was refused.
    pub(crate) async fn send_error(
        &self,
        gateway: &str,
        session: &str,
        trace_id: &str,
        conversation: &str,
        client_msg_id: &str,
        err: &AppError,
    ) {
        metrics::counter!(
            telemetry::LOGIC_MESSAGES_REFUSED,
            "code" => telemetry::code_label(err.code)
        )
        .increment(1);
        let record = DownstreamMessage {
            trace_id: trace_id.to_owned(),
            conversation_id: conversation.to_owned(),
            kind: DownstreamKind::Error,
            target_session: session.to_owned(),
            client_msg_id: client_msg_id.to_owned(),
            error_code: err.code.as_u16(),
            error_message: err.message.clone(),
            timestamp: now_ms(),
            ..Default::default()
        };
        if let Err(e) = self.publish(gateway, record).await {
            tracing::warn!(cause = %e, %trace_id, "could not send an error frame");
        }
    }

    /// The online gateways of `users`: gateway -> users on it.
    pub(crate) async fn locate(
        &self,
        users: Vec<String>,
    ) -> Result<HashMap<String, Vec<String>>, AppError> {
        let mut by_gateway: HashMap<String, Vec<String>> = HashMap::new();
        if users.is_empty() {
            return Ok(by_gateway);
        }
        let statuses = self
            .repo
            .get_users_online_status(Request::new(rpb::GetUsersOnlineStatusRequest {
                user_ids: users,
            }))
            .await
            .map_err(repo_err)?
            .into_inner()
            .statuses;
        for s in statuses.into_iter().filter(|s| s.is_online) {
            for gw in &s.gateway_ids {
                by_gateway
                    .entry(gw.clone())
                    .or_default()
                    .push(s.user_id.clone());
            }
        }
        Ok(by_gateway)
    }

    /// Every member of a single chat or a (small) group.
    pub(crate) async fn members(&self, conv: &str) -> Result<Vec<String>, AppError> {
        let mut out = Vec::new();
        let mut offset = 0;
        loop {
            let page = self
                .repo
                .get_conversation_members(Request::new(rpb::GetConversationMembersRequest {
                    conversation_id: conv.to_owned(),
                    offset,
                    limit: 1000,
                }))
                .await
                .map_err(repo_err)?
                .into_inner();
            offset += i32::try_from(page.user_ids.len()).unwrap_or(i32::MAX);
            out.extend(page.user_ids);
            if !page.has_more {
                return Ok(out);
            }
        }
    }

    /// Where the new messages of one conversation go: decided once per batch (the members and
    /// where they are online are looked up once).
    pub(crate) async fn route(
        &self,
        kind: ConversationKind,
        member_count: i64,
        conv: &str,
    ) -> Result<Route, AppError> {
        if should_distribute_async(kind, member_count, self.settings.async_fanout_threshold) {
            return Ok(Route::Task(kind));
        }
        let members = self.members(conv).await?;
        Ok(Route::Gateways(self.locate(members).await?))
    }

    /// Delivers one stored message along `route`: one record per gateway with that gateway's
    /// online members in `targets`, or a fanout task.
    pub(crate) async fn deliver(
        &self,
        route: &Route,
        m: DownstreamMessage,
    ) -> Result<(), AppError> {
        match route {
            Route::Task(kind) => self.submit_fanout(*kind, &m).await,
            Route::Gateways(located) => {
                // A copy per gateway but the last, which takes the message itself.
                let mut gateways: Vec<_> = located.iter().collect();
                let Some((last, users)) = gateways.pop() else {
                    return Ok(());
                };
                for (gateway, users) in gateways {
                    let mut record = m.clone();
                    record.targets.clone_from(users);
                    self.publish(gateway, record).await?;
                }
                let mut record = m;
                record.targets.clone_from(users);
                self.publish(last, record).await
            }
        }
    }

    async fn submit_fanout(
        &self,
        kind: ConversationKind,
        m: &DownstreamMessage,
    ) -> Result<(), AppError> {
        let data = FanoutTaskData {
            group_id: match kind {
                ConversationKind::Group(g) => g.to_string(),
                _ => String::new(),
            },
            message_id: m.message_id.clone(),
            conversation_id: m.conversation_id.clone(),
            message: Some(m.clone()),
        };
        let task = TaskMessage {
            trace_id: m.trace_id.clone(),
            task_type: TaskType::Fanout,
            task_id: format!("fanout-{}", m.message_id),
            data: serde_json::to_value(&data)
                .map_err(|e| AppError::internal(format!("encoding: {e}")))?,
            headers: BTreeMap::new(),
            created_at: now_ms(),
        };
        let headers = BTreeMap::from([("trace_id".to_owned(), m.trace_id.clone())]);
        self.bus
            .send(
                TASK_TOPIC,
                &m.conversation_id,
                Payload::value(task),
                headers,
            )
            .await
            .map_err(bus_err)
    }
}

/// A bus failure as the caller sees it: a record that cannot be encoded is gochat's own fault
/// (1000); anything else is the bus being unavailable (1006), worth retrying.
fn bus_err(err: MqError) -> AppError {
    let code = match err {
        MqError::Encoding(_) => ErrorCode::Internal,
        _ => ErrorCode::Unavailable,
    };
    AppError::new(code, format!("bus: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_that_cannot_be_encoded_is_an_internal_error_and_a_bus_outage_is_retryable() {
        assert_eq!(
            bus_err(MqError::Encoding("bad".into())).code,
            ErrorCode::Internal
        );
        assert_eq!(bus_err(MqError::Closed).code, ErrorCode::Unavailable);
    }

    #[test]
    fn the_spec_policy() {
        assert!(!should_distribute_async(
            ConversationKind::Single(1, 2),
            2,
            500
        ));
        assert!(!should_distribute_async(
            ConversationKind::Group(1),
            500,
            500
        ));
        assert!(should_distribute_async(
            ConversationKind::Group(1),
            501,
            500
        ));
        assert!(should_distribute_async(ConversationKind::World, 0, 500));
    }
}
