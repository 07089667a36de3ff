//! gochat's business service (spec section 2).
//!
//! Request/response APIs (the `im.logic.v1` services: auth, conversations, groups, presence) are
//! implemented by [`Logic`], which the gateway calls in-process (`serve`) or over gRPC. Messages
//! sent over WebSocket arrive on `im-upstream-topic`; the [`upstream`] consumer routes each to the
//! [`conversation`] actor that owns its conversation. That actor is the serialization point: it
//! drains its mailbox in batches, checks membership, drops duplicates (by sender and
//! client_msg_id), reserves seqs, persists through repo, acknowledges each sender, and delivers:
//! directly per gateway for single chats and groups up to 500 members, or as a `fanout` task to
//! the task service for bigger groups and the world room ([`deliver`]).
//!
//! Logic talks to repo only through the repo service traits ([`RepoApi`]) and to other services
//! only through the bus.

mod api;
pub mod auth;
pub mod client;
pub mod conversation;
pub mod deliver;
mod presence;
pub mod settings;
pub mod upstream;

use std::sync::Arc;

use gochat_infra::AppError;
use gochat_infra::ids::Snowflake;
use gochat_infra::mq::Bus;
use gochat_proto::repo::conversation_service_server::ConversationService as RepoConversations;
use gochat_proto::repo::group_service_server::GroupService as RepoGroups;
use gochat_proto::repo::message_service_server::MessageService as RepoMessages;
use gochat_proto::repo::online_status_service_server::OnlineStatusService as RepoPresence;
use gochat_proto::repo::user_service_server::UserService as RepoUsers;

pub use settings::LogicSettings;

/// Everything logic needs from repo: the five repo service traits. The real `gochat_repo::Repo`
/// implements them in-process; a tonic-client adapter implements them in the distributed mode.
pub trait RepoApi:
    RepoUsers + RepoMessages + RepoGroups + RepoConversations + RepoPresence + Clone + 'static
{
}

impl<T> RepoApi for T where
    T: RepoUsers + RepoMessages + RepoGroups + RepoConversations + RepoPresence + Clone + 'static
{
}

/// The logic service. Cheap to clone.
#[derive(Debug)]
pub struct Logic<R: RepoApi, B: Bus> {
    core: Arc<Core<R, B>>,
}

impl<R: RepoApi, B: Bus> Clone for Logic<R, B> {
    fn clone(&self) -> Self {
        Self {
            core: self.core.clone(),
        }
    }
}

/// What every part of logic shares.
#[derive(Debug)]
pub struct Core<R: RepoApi, B: Bus> {
    /// The data service.
    pub(crate) repo: R,
    /// The bus (upstream in, downstream and tasks out).
    pub(crate) bus: B,
    /// Tunables.
    pub(crate) settings: LogicSettings,
    /// Message ids.
    pub(crate) ids: Snowflake,
    /// Token signing keys.
    pub(crate) keys: auth::Keys,
    /// Live Conversation actors.
    pub(crate) directory: conversation::Directory<R, B>,
}

impl<R: RepoApi, B: Bus> Logic<R, B> {
    /// A logic service over `repo` and `bus`. Conversation actors run on `settings.arbiters`
    /// arbiters, so this must be called inside a running actix `System`.
    pub fn new(repo: R, bus: B, settings: LogicSettings) -> Result<Self, AppError> {
        let keys = auth::Keys::new(&settings.jwt_secret)?;
        let core = Arc::new_cyclic(|weak| Core {
            repo,
            bus,
            ids: Snowflake::new(settings.node_id),
            keys,
            directory: conversation::Directory::new(settings.arbiters.max(1), weak.clone()),
            settings,
        });
        Ok(Self { core })
    }

    /// Shared state (for the upstream consumer and tests).
    pub fn core(&self) -> &Arc<Core<R, B>> {
        &self.core
    }

    /// The four logic services as tonic routes, for `gochat logic`'s gRPC server.
    pub fn routes(&self) -> tonic::service::Routes {
        use gochat_proto::logic as pb;
        tonic::service::Routes::new(pb::auth_service_server::AuthServiceServer::new(
            self.clone(),
        ))
        .add_service(pb::conversation_service_server::ConversationServiceServer::new(self.clone()))
        .add_service(pb::group_service_server::GroupServiceServer::new(
            self.clone(),
        ))
        .add_service(pb::presence_service_server::PresenceServiceServer::new(
            self.clone(),
        ))
    }

    /// Number of live Conversation actors.
    pub fn conversation_actors(&self) -> usize {
        self.core.directory.len()
    }

    /// At most `limit` conversations with work (messages held, or handled in the last ten
    /// seconds), busiest first: for `/admin/actors`.
    pub fn busiest(&self, limit: usize) -> Vec<conversation::ConversationLoad> {
        self.core.directory.busiest(limit)
    }
}

/// A tonic status from a repo call as an [`AppError`].
pub(crate) fn repo_err(status: tonic::Status) -> AppError {
    AppError::from_status(&status)
}
