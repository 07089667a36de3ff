//! PresenceService: gateways report their users' first and last sessions; logic records presence
//! in repo and, when a user's state changes everywhere (first session anywhere, last session
//! anywhere), tells the user's single-chat peers with `online-status` records.

use gochat_infra::AppError;
use gochat_infra::ids::parse_id;
use gochat_infra::mq::Bus;
use gochat_infra::time::now_ms;
use gochat_infra::wire::{DownstreamKind, DownstreamMessage};
use gochat_proto::logic as pb;
use gochat_proto::logic::presence_service_server::PresenceService;
use gochat_proto::repo as rpb;
use tonic::{Request, Response, Status};

use crate::{Core, Logic, RepoApi, repo_err};

impl<R: RepoApi, B: Bus> Core<R, B> {
    /// The peers of a user's single chats.
    async fn single_chat_peers(&self, user: &str) -> Result<Vec<String>, AppError> {
        Ok(self
            .repo
            .get_single_chat_peers(Request::new(rpb::GetSingleChatPeersRequest {
                user_id: user.to_owned(),
            }))
            .await
            .map_err(repo_err)?
            .into_inner()
            .user_ids)
    }

    /// Sends `online-status` about `user` to its online single-chat peers.
    pub(crate) async fn announce(&self, user: String, is_online: bool) -> Result<(), AppError> {
        let peers = self.single_chat_peers(&user).await?;
        for (gateway, targets) in self.locate(peers).await? {
            let record = DownstreamMessage {
                kind: DownstreamKind::OnlineStatus,
                sender_id: user.clone(),
                is_online,
                targets,
                conversation_id: format!("presence-{user}"),
                timestamp: now_ms(),
                ..Default::default()
            };
            self.publish(&gateway, record).await?;
        }
        Ok(())
    }

    fn ttl_seconds(&self, asked: i64) -> i64 {
        if asked > 0 {
            asked
        } else {
            i64::try_from(self.settings.presence_ttl.as_secs()).unwrap_or(60)
        }
    }
}

fn check(user: &str, gateway: &str) -> Result<(), AppError> {
    if parse_id(user).is_none() || gateway.is_empty() {
        return Err(AppError::invalid("user_id and gateway_id are required"));
    }
    Ok(())
}

#[tonic::async_trait]
impl<R: RepoApi, B: Bus> PresenceService for Logic<R, B> {
    async fn user_connected(
        &self,
        request: Request<pb::UserConnectedRequest>,
    ) -> Result<Response<pb::UserConnectedResponse>, Status> {
        let r = request.into_inner();
        check(&r.user_id, &r.gateway_id)?;
        let first_online = self
            .core
            .repo
            .set_user_online(Request::new(rpb::SetUserOnlineRequest {
                user_id: r.user_id.clone(),
                gateway_id: r.gateway_id,
                ttl_seconds: self.core.ttl_seconds(r.ttl_seconds),
            }))
            .await?
            .into_inner()
            .first_online;
        if first_online {
            let core = self.core.clone();
            tokio::spawn(async move {
                if let Err(e) = core.announce(r.user_id, true).await {
                    tracing::warn!(cause = %e, "could not announce a user online");
                }
            });
        }
        Ok(Response::new(pb::UserConnectedResponse { first_online }))
    }

    async fn user_disconnected(
        &self,
        request: Request<pb::UserDisconnectedRequest>,
    ) -> Result<Response<pb::UserDisconnectedResponse>, Status> {
        let r = request.into_inner();
        check(&r.user_id, &r.gateway_id)?;
        let now_offline = self
            .core
            .repo
            .set_user_offline(Request::new(rpb::SetUserOfflineRequest {
                user_id: r.user_id.clone(),
                gateway_id: r.gateway_id,
            }))
            .await?
            .into_inner()
            .now_offline;
        if now_offline {
            let core = self.core.clone();
            tokio::spawn(async move {
                if let Err(e) = core.announce(r.user_id, false).await {
                    tracing::warn!(cause = %e, "could not announce a user offline");
                }
            });
        }
        Ok(Response::new(pb::UserDisconnectedResponse { now_offline }))
    }

    async fn refresh_presence(
        &self,
        request: Request<pb::RefreshPresenceRequest>,
    ) -> Result<Response<pb::RefreshPresenceResponse>, Status> {
        let r = request.into_inner();
        if r.gateway_id.is_empty() || r.user_ids.len() > 100_000 {
            return Err(AppError::invalid(
                "gateway_id is required and at most 100000 users per call",
            )
            .into());
        }
        let ttl = self.core.ttl_seconds(r.ttl_seconds);
        for user in r.user_ids {
            if parse_id(&user).is_none() {
                continue;
            }
            self.core
                .repo
                .set_user_online(Request::new(rpb::SetUserOnlineRequest {
                    user_id: user,
                    gateway_id: r.gateway_id.clone(),
                    ttl_seconds: ttl,
                }))
                .await?;
        }
        Ok(Response::new(pb::RefreshPresenceResponse {}))
    }
}
