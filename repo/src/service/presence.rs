//! OnlineStatusService: where each user is online, in `user_session:{user}` (gateway ->
//! expiry). A user may be online on several gateways (several devices) at once; an entry lapses
//! unless its gateway refreshes it. Presence lives only in the cache: while the cache is down,
//! writes are logged and dropped and everyone reads as offline (clients then catch up by seq when
//! they next pull), so no call fails.

use std::time::Duration;

use gochat_infra::AppError;
use gochat_proto::repo as pb;
use gochat_proto::repo::online_status_service_server::OnlineStatusService;
use tonic::{Request, Response, Status};

use super::{Repo, id_field, pb_presence};
use crate::cache::Cache;
use crate::model::Presence;
use crate::store::Store;

/// Most users one batch lookup may ask for.
const MAX_BATCH: usize = 10_000;
/// Longest presence ttl a gateway may ask for.
const MAX_TTL_SECS: i64 = 3600;

impl<S: Store, C: Cache> Repo<S, C> {
    /// Live gateways of each user, in order; everyone offline while the cache is down.
    pub(crate) async fn presence_of(&self, users: &[i64]) -> Vec<Vec<Presence>> {
        match self.cache().presence_get(users).await {
            Ok(v) if v.len() == users.len() => v,
            Ok(_) => vec![Vec::new(); users.len()],
            Err(err) => {
                tracing::warn!(cause = %err, "presence unavailable; reporting users offline");
                vec![Vec::new(); users.len()]
            }
        }
    }
}

fn gateway_field(gateway: &str) -> Result<(), AppError> {
    if gateway.is_empty() || gateway.len() > 128 {
        return Err(AppError::invalid("gateway_id must be 1 to 128 bytes"));
    }
    Ok(())
}

#[tonic::async_trait]
impl<S: Store, C: Cache> OnlineStatusService for Repo<S, C> {
    async fn set_user_online(
        &self,
        request: Request<pb::SetUserOnlineRequest>,
    ) -> Result<Response<pb::SetUserOnlineResponse>, Status> {
        let r = request.into_inner();
        let user = id_field("user_id", &r.user_id)?;
        gateway_field(&r.gateway_id)?;
        let ttl = match r.ttl_seconds {
            0 => self.settings().presence_ttl,
            n if (1..=MAX_TTL_SECS).contains(&n) => Duration::from_secs(n.unsigned_abs()),
            n => {
                return Err(AppError::invalid(format!(
                    "ttl_seconds must be 1..={MAX_TTL_SECS}, got {n}"
                ))
                .into());
            }
        };
        let first_online = match self.cache().presence_set(user, &r.gateway_id, ttl).await {
            Ok(b) => b,
            Err(err) => {
                tracing::warn!(cause = %err, user, "presence unavailable; online state not recorded");
                false
            }
        };
        Ok(Response::new(pb::SetUserOnlineResponse { first_online }))
    }

    async fn set_user_offline(
        &self,
        request: Request<pb::SetUserOfflineRequest>,
    ) -> Result<Response<pb::SetUserOfflineResponse>, Status> {
        let r = request.into_inner();
        let user = id_field("user_id", &r.user_id)?;
        let gateway = (!r.gateway_id.is_empty()).then_some(r.gateway_id.as_str());
        if let Some(g) = gateway {
            gateway_field(g)?;
        }
        let now_offline = match self.cache().presence_remove(user, gateway).await {
            Ok(b) => b,
            Err(err) => {
                tracing::warn!(cause = %err, user, "presence unavailable; offline state not recorded");
                true
            }
        };
        Ok(Response::new(pb::SetUserOfflineResponse { now_offline }))
    }

    async fn get_user_online_status(
        &self,
        request: Request<pb::GetUserOnlineStatusRequest>,
    ) -> Result<Response<pb::GetUserOnlineStatusResponse>, Status> {
        let user = id_field("user_id", &request.get_ref().user_id)?;
        let p = self.presence_of(&[user]).await;
        let entries = p.first().map(Vec::as_slice).unwrap_or(&[]);
        Ok(Response::new(pb::GetUserOnlineStatusResponse {
            status: Some(pb_presence(user, entries)),
        }))
    }

    async fn get_users_online_status(
        &self,
        request: Request<pb::GetUsersOnlineStatusRequest>,
    ) -> Result<Response<pb::GetUsersOnlineStatusResponse>, Status> {
        let r = request.get_ref();
        if r.user_ids.len() > MAX_BATCH {
            return Err(AppError::invalid(format!("at most {MAX_BATCH} ids per call")).into());
        }
        // Keep request order and duplicates, as documented: one entry per requested id.
        let ids = r
            .user_ids
            .iter()
            .map(|s| id_field("user_ids", s))
            .collect::<Result<Vec<_>, _>>()?;
        let p = self.presence_of(&ids).await;
        Ok(Response::new(pb::GetUsersOnlineStatusResponse {
            statuses: ids
                .iter()
                .zip(&p)
                .map(|(id, e)| pb_presence(*id, e))
                .collect(),
        }))
    }
}
