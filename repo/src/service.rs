//! The five tonic services of spec section 3.2, implemented by one [`Repo`] value:
//! [`user`] (UserService), [`message`] (MessageService), [`group`] (GroupService),
//! [`conversation`] (ConversationService) and [`presence`] (OnlineStatusService).
//!
//! Reads are Cache-Aside: the cache first, the store on a miss (then the cache is filled).
//! Writes go to the store first, then delete the cache entry. A cache failure is logged and
//! treated as a miss, so it never fails a call. Errors leave as [`AppError`] and travel as gRPC
//! status carrying the spec's numeric code (`gochat_infra::error`).

pub mod conversation;
pub mod group;
pub mod message;
pub mod presence;
pub mod user;

use std::sync::Arc;
use std::time::Duration;

use gochat_infra::ids::{Snowflake, parse_id};
use gochat_infra::{AppError, ErrorCode};
use gochat_proto::repo as pb;
use tokio::net::TcpListener;

use crate::cache::{AnyCache, Cache, CacheResult};
use crate::model;
use crate::store::{AnyStore, Store};

/// Tunables of the repo service (the `[repo]` config section).
#[derive(Debug, Clone)]
pub struct RepoSettings {
    /// Largest group (the world room has no limit).
    pub max_group_members: i64,
    /// Argon2id memory cost in KiB (19456 is OWASP's minimum for argon2id).
    pub argon2_memory_kib: u32,
    /// Argon2id passes.
    pub argon2_iterations: u32,
    /// How long `user_info` entries live.
    pub user_ttl: Duration,
    /// How long `msg_dedup` entries live.
    pub dedup_ttl: Duration,
    /// How long `group_members`, `hot_messages` and `unread` entries live.
    pub entry_ttl: Duration,
    /// Presence entries without an explicit ttl last this long.
    pub presence_ttl: Duration,
    /// How many of a conversation's latest messages `hot_messages` keeps.
    pub hot_window: usize,
    /// Node id of this process's snowflake generator (unique among repo instances).
    pub node_id: u16,
}

impl Default for RepoSettings {
    fn default() -> Self {
        Self {
            max_group_members: 100_000,
            argon2_memory_kib: 19_456,
            argon2_iterations: 2,
            user_ttl: Duration::from_secs(3600),
            dedup_ttl: Duration::from_secs(24 * 3600),
            entry_ttl: Duration::from_secs(600),
            presence_ttl: Duration::from_secs(30),
            hot_window: 100,
            node_id: 0,
        }
    }
}

/// The repo service: a store, a cache, an id generator. Cheap to clone; every clone serves the
/// same data.
#[derive(Debug)]
pub struct Repo<S = AnyStore, C = AnyCache> {
    inner: Arc<Inner<S, C>>,
}

impl<S, C> Clone for Repo<S, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

#[derive(Debug)]
struct Inner<S, C> {
    store: S,
    cache: C,
    ids: Snowflake,
    settings: RepoSettings,
}

impl<S: Store, C: Cache> Repo<S, C> {
    /// A service over `store` and `cache`.
    pub fn new(store: S, cache: C, settings: RepoSettings) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                cache,
                ids: Snowflake::new(settings.node_id),
                settings,
            }),
        }
    }

    /// The store (for tests and tools).
    pub fn store(&self) -> &S {
        &self.inner.store
    }

    /// The cache (for tests and tools).
    pub fn cache(&self) -> &C {
        &self.inner.cache
    }

    fn settings(&self) -> &RepoSettings {
        &self.inner.settings
    }

    /// All five services as tonic routes, for a gRPC server.
    pub fn routes(&self) -> tonic::service::Routes {
        tonic::service::Routes::new(pb::user_service_server::UserServiceServer::new(
            self.clone(),
        ))
        .add_service(pb::message_service_server::MessageServiceServer::new(
            self.clone(),
        ))
        .add_service(pb::group_service_server::GroupServiceServer::new(
            self.clone(),
        ))
        .add_service(pb::conversation_service_server::ConversationServiceServer::new(self.clone()))
        .add_service(pb::online_status_service_server::OnlineStatusServiceServer::new(self.clone()))
    }

    /// Serves the five services over gRPC on `listener` until `shutdown` resolves.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        gochat_infra::rpc::serve(self.routes(), listener, shutdown).await
    }
}

/// A cache read: a failure is logged and counts as a miss.
pub(crate) fn cache_read<T>(result: CacheResult<Option<T>>, what: &str) -> Option<T> {
    match result {
        Ok(v) => v,
        Err(err) => {
            tracing::warn!(cause = %err, what, "cache read failed; using the database");
            None
        }
    }
}

/// A cache write or delete: a failure is logged and otherwise ignored (entries expire).
pub(crate) fn cache_write(result: CacheResult<()>, what: &str) {
    if let Err(err) = result {
        tracing::warn!(cause = %err, what, "cache write failed");
    }
}

/// A required id field.
pub(crate) fn id_field(name: &str, value: &str) -> Result<i64, AppError> {
    parse_id(value).ok_or_else(|| {
        AppError::invalid(format!(
            "{name} must be a positive decimal id, got {value:?}"
        ))
    })
}

/// A required conversation id.
pub(crate) fn conversation_field(
    value: &str,
) -> Result<gochat_infra::ids::ConversationKind, AppError> {
    gochat_infra::ids::ConversationKind::parse(value)
        .ok_or_else(|| AppError::invalid(format!("invalid conversation_id {value:?}")))
}

/// A list of ids, deduplicated in order, at most `max`.
pub(crate) fn id_list(name: &str, values: &[String], max: usize) -> Result<Vec<i64>, AppError> {
    if values.len() > max {
        return Err(AppError::invalid(format!(
            "{name}: at most {max} ids per call"
        )));
    }
    let mut seen = std::collections::HashSet::with_capacity(values.len());
    let mut out = Vec::with_capacity(values.len());
    for v in values {
        let id = id_field(name, v)?;
        if seen.insert(id) {
            out.push(id);
        }
    }
    Ok(out)
}

/// A store error as a gRPC status.
pub(crate) fn status(err: impl Into<AppError>) -> tonic::Status {
    err.into().into()
}

/// 2000 user not found.
pub(crate) fn user_not_found(id: i64) -> AppError {
    AppError::new(ErrorCode::UserNotFound, format!("user {id} not found"))
}

pub(crate) fn pb_user(u: &model::User) -> pb::User {
    pb::User {
        id: u.id.to_string(),
        username: u.username.clone(),
        nickname: u.nickname.clone(),
        avatar_url: u.avatar_url.clone(),
        created_at: u.created_at,
        updated_at: u.updated_at,
    }
}

pub(crate) fn pb_message(m: &model::Message) -> pb::Message {
    pb::Message {
        id: m.id.to_string(),
        conversation_id: m.conversation_id.clone(),
        sender_id: m.sender_id.to_string(),
        message_type: m.message_type,
        content: m.content.clone(),
        seq_id: m.seq_id,
        client_msg_id: m.client_msg_id.clone().unwrap_or_default(),
        created_at: m.created_at,
    }
}

pub(crate) fn pb_group(g: &model::Group) -> pb::Group {
    pb::Group {
        id: g.id.to_string(),
        name: g.name.clone(),
        owner_id: g.owner_id.to_string(),
        member_count: g.member_count,
        conversation_id: gochat_infra::ids::group_conversation_id(g.id),
        created_at: g.created_at,
        updated_at: g.updated_at,
        avatar_url: g.avatar_url.clone(),
    }
}

pub(crate) fn pb_presence(user: i64, entries: &[model::Presence]) -> pb::OnlineStatus {
    let now = gochat_infra::time::now_ms();
    let live: Vec<&model::Presence> = entries.iter().filter(|p| p.expires_at > now).collect();
    pb::OnlineStatus {
        user_id: user.to_string(),
        is_online: !live.is_empty(),
        gateway_id: live
            .first()
            .map(|p| p.gateway_id.clone())
            .unwrap_or_default(),
        last_seen: if live.is_empty() { 0 } else { now },
        gateway_ids: live.iter().map(|p| p.gateway_id.clone()).collect(),
    }
}
