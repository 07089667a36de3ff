//! [`FanoutJob`]: one delivery job, planned from a `fanout` task and run inside a Fanout actor.
//!
//! A group job reads the members' presence a page at a time (`GetMembersOnlineStatus`,
//! `batch_size` a page, each page continuing from the last one's token) and produces one
//! downstream record per gateway that has online members in the page, `targets` naming them. A
//! world job produces one `broadcast` record per live gateway. Every repo call and send is
//! retried under the spec's policy; a failure that outlasts it fails the job (records already
//! produced stay produced: the retried job sends them again and gateways drop what a session
//! already has).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use gochat_infra::ids::{WORLD_CONVERSATION_ID, group_conversation_id, parse_id};
use gochat_infra::mq::{Bus, Payload};
use gochat_infra::wire::{DownstreamMessage, FanoutTaskData, downstream_topic};
use gochat_proto::repo as pb;

use crate::retry::{RetryPolicy, retry};
use crate::{LiveGateways, RepoApi, TaskError, TaskMessage, TaskStats, TaskType};

/// The part of the settings a job uses.
#[derive(Debug, Clone)]
pub(crate) struct JobConfig {
    /// Members per page.
    pub batch_size: u32,
    /// Retries of one call.
    pub retry: RetryPolicy,
    /// Limit of one call.
    pub call_timeout: Duration,
}

/// Who a job delivers to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Audience {
    /// The online members of a group.
    Group(String),
    /// Every session on each of these gateways.
    World(Vec<String>),
}

/// What a finished job did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FanoutReport {
    /// Member pages read (0 for the world room).
    pub pages: u64,
    /// Downstream records produced.
    pub records: u64,
    /// Recipients named in them (per gateway).
    pub recipients: u64,
}

/// One planned delivery job.
#[derive(Debug)]
pub struct FanoutJob<R, B> {
    /// Members and presence.
    repo: R,
    /// Where the records go.
    bus: B,
    /// Page size, retries, timeouts.
    config: JobConfig,
    /// Counters.
    stats: Arc<TaskStats>,
    /// The task's id (for logs).
    task_id: String,
    /// Recipients.
    audience: Audience,
    /// The record every batch is a copy of (targets and broadcast unset).
    template: DownstreamMessage,
}

impl<R: RepoApi, B: Bus> FanoutJob<R, B> {
    /// Plans the job of `task` (a `fanout` task); [`TaskError::InvalidTask`] when its data does
    /// not describe one. The world room's gateways are read from `gateways` now.
    pub(crate) fn plan(
        task: &TaskMessage,
        repo: R,
        bus: B,
        gateways: &impl LiveGateways,
        config: JobConfig,
        stats: Arc<TaskStats>,
    ) -> Result<Self, TaskError> {
        let invalid = |reason: String| TaskError::InvalidTask {
            task_type: TaskType::Fanout,
            reason,
        };
        let data: FanoutTaskData = serde_json::from_value(task.data.clone())
            .map_err(|e| invalid(format!("data is not fan-out data: {e}")))?;
        let Some(mut template) = data.message else {
            return Err(invalid("no message to deliver".to_owned()));
        };
        let conversation = match (
            data.conversation_id.as_str(),
            template.conversation_id.as_str(),
        ) {
            ("", c) | (c, "") => c.to_owned(),
            (a, b) if a == b => a.to_owned(),
            (a, b) => {
                return Err(invalid(format!(
                    "conversation_id {a:?} and the message's {b:?} differ"
                )));
            }
        };
        let (audience, conversation) = if conversation == WORLD_CONVERSATION_ID {
            (Audience::World(gateways.gateways()), conversation)
        } else if !data.group_id.is_empty() {
            let group = parse_id(&data.group_id)
                .ok_or_else(|| invalid(format!("group_id {:?} is not an id", data.group_id)))?;
            let expected = group_conversation_id(group);
            if !conversation.is_empty() && conversation != expected {
                return Err(invalid(format!(
                    "conversation {conversation:?} is not group {group}'s"
                )));
            }
            (Audience::Group(data.group_id), expected)
        } else {
            return Err(invalid("neither a group_id nor the world room".to_owned()));
        };
        template.conversation_id = conversation;
        if template.message_id.is_empty() {
            template.message_id = data.message_id;
        }
        if template.trace_id.is_empty() {
            template.trace_id.clone_from(&task.trace_id);
        }
        template.target_user_id.clear();
        template.target_session.clear();
        template.targets.clear();
        template.broadcast = false;
        Ok(Self {
            repo,
            bus,
            config,
            stats,
            task_id: task.task_id.clone(),
            audience,
            template,
        })
    }

    /// The conversation the job delivers for.
    pub fn conversation_id(&self) -> &str {
        &self.template.conversation_id
    }

    /// The task this job came from.
    pub fn task_id(&self) -> &str {
        &self.task_id
    }

    /// Carries the job out.
    pub async fn run(self) -> Result<FanoutReport, TaskError> {
        match &self.audience {
            Audience::World(gateways) => self.run_world(gateways).await,
            Audience::Group(group) => self.run_group(group).await,
        }
    }

    async fn run_world(&self, gateways: &[String]) -> Result<FanoutReport, TaskError> {
        let mut report = FanoutReport::default();
        if gateways.is_empty() {
            tracing::debug!("no live gateway; the world-room message reaches nobody now");
        }
        for gateway in gateways {
            let mut record = self.template.clone();
            record.broadcast = true;
            self.produce(gateway, record).await?;
            self.stats.broadcast();
            report.records += 1;
        }
        Ok(report)
    }

    async fn run_group(&self, group: &str) -> Result<FanoutReport, TaskError> {
        let mut report = FanoutReport::default();
        let limit = i32::try_from(self.config.batch_size).unwrap_or(i32::MAX);
        let repo = &self.repo;
        // The next page: after `page_token`, or at `offset` from a repo that returns no tokens.
        let (mut offset, mut page_token) = (0i32, String::new());
        loop {
            let page = self
                .call("GetMembersOnlineStatus", || {
                    repo.get_members_online_status(tonic::Request::new(
                        pb::GetMembersOnlineStatusRequest {
                            group_id: group.to_owned(),
                            offset,
                            limit,
                            page_token: page_token.clone(),
                        },
                    ))
                })
                .await?;
            if page.statuses.is_empty() {
                break;
            }
            report.pages += 1;
            for (gateway, targets) in by_gateway(&page.statuses) {
                let mut record = self.template.clone();
                let n = targets.len();
                record.targets = targets;
                self.produce(&gateway, record).await?;
                self.stats.batch(n);
                report.records += 1;
                report.recipients += n as u64;
            }
            if !page.has_more {
                break;
            }
            if page.next_page_token.is_empty() {
                // A repo from before page tokens: page on by offset.
                let read = i32::try_from(page.statuses.len()).unwrap_or(i32::MAX);
                offset = offset.saturating_add(read);
            } else {
                page_token = page.next_page_token;
            }
        }
        Ok(report)
    }

    /// Sends `record` to `gateway`'s downstream topic, keyed by conversation (so the gateway
    /// sees one conversation's records in order).
    async fn produce(&self, gateway: &str, record: DownstreamMessage) -> Result<(), TaskError> {
        let topic = downstream_topic(gateway);
        let headers = BTreeMap::from([("trace_id".to_owned(), record.trace_id.clone())]);
        // One shared value, however many attempts it takes.
        let record = Arc::new(record);
        let payload = Payload::shared(Arc::clone(&record));
        let (bus, key) = (&self.bus, record.conversation_id.as_str());
        retry(
            &self.config.retry,
            self.config.call_timeout,
            "downstream send",
            || {
                let (topic, payload, headers) = (topic.as_str(), payload.clone(), headers.clone());
                async move {
                    bus.send(topic, key, payload, headers)
                        .await
                        .map_err(TaskError::from)
                }
            },
            |err, wait| self.on_retry("downstream send", err, wait),
        )
        .await
    }

    /// A repo call under the retry policy.
    async fn call<T, F, Fut>(&self, what: &'static str, mut call: F) -> Result<T, TaskError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        retry(
            &self.config.retry,
            self.config.call_timeout,
            what,
            || {
                let fut = call();
                async move {
                    fut.await
                        .map(tonic::Response::into_inner)
                        .map_err(|s| TaskError::repo(what, &s))
                }
            },
            |err, wait| self.on_retry(what, err, wait),
        )
        .await
    }

    fn on_retry(&self, what: &str, err: &TaskError, wait: Duration) {
        self.stats.retry();
        tracing::warn!(cause = %err, call = what, retry_in = ?wait, "fan-out call failed; retrying");
    }
}

/// The online users of `statuses` per gateway (a user online on several gateways is listed under
/// each, once), in the order they came.
pub fn by_gateway(statuses: &[pb::OnlineStatus]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut seen: BTreeSet<(&str, &str)> = BTreeSet::new();
    for s in statuses.iter().filter(|s| s.is_online) {
        let gateways = s
            .gateway_ids
            .iter()
            .map(String::as_str)
            .chain(std::iter::once(s.gateway_id.as_str()));
        for gw in gateways.filter(|g| !g.is_empty()) {
            if seen.insert((gw, s.user_id.as_str())) {
                out.entry(gw.to_owned())
                    .or_default()
                    .push(s.user_id.clone());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(user: &str, online: bool, gateways: &[&str]) -> pb::OnlineStatus {
        pb::OnlineStatus {
            user_id: user.to_owned(),
            is_online: online,
            gateway_id: gateways
                .first()
                .map(|g| (*g).to_owned())
                .unwrap_or_default(),
            last_seen: 0,
            gateway_ids: gateways.iter().map(|g| (*g).to_owned()).collect(),
        }
    }

    #[test]
    fn groups_online_users_by_gateway() {
        let statuses = [
            status("1", true, &["a"]),
            status("2", false, &[]),
            status("3", true, &["a", "b"]),
            status("4", true, &["b"]),
            // Duplicates in the answer (a duplicated member) are listed once.
            status("1", true, &["a"]),
            // An old repo that sets only the spec's single gateway_id.
            pb::OnlineStatus {
                user_id: "5".into(),
                is_online: true,
                gateway_id: "c".into(),
                last_seen: 0,
                gateway_ids: Vec::new(),
            },
        ];
        let got = by_gateway(&statuses);
        let want = BTreeMap::from([
            ("a".to_owned(), vec!["1".to_owned(), "3".to_owned()]),
            ("b".to_owned(), vec!["3".to_owned(), "4".to_owned()]),
            ("c".to_owned(), vec!["5".to_owned()]),
        ]);
        assert_eq!(got, want);
    }
}
