//! [`RepoClient`]: the five repo services over gRPC, behind the same server traits the repo
//! service implements in-process. Logic and task take any implementation of those traits, so
//! in the distributed mode they get this adapter and never know the difference.
//!
//! Every call has a deadline and carries the caller's metadata (trace id); calls that are safe to
//! repeat are retried on transient failures with the spec's backoff (`gochat_infra::rpc`). Which
//! calls those are is decided here, per RPC:
//!
//! - reads, presence updates, read pointers (monotonic), session revocation: idempotent;
//! - `SaveMessage(s)`: idempotent, because the caller chooses the message id and repo answers a
//!   repeated id with the stored original (`duplicate`, same id);
//! - `GenerateSeqID`: idempotent only with `from_stored` (a plain reservation repeated would
//!   reserve twice);
//! - creating users, sessions and groups, rotating sessions, adding and removing members: once.

use gochat_infra::forward_grpc;
use gochat_infra::rpc::{self, Idempotency, RpcPolicy};
use gochat_proto::repo as pb;
use gochat_proto::repo::conversation_service_client::ConversationServiceClient;
use gochat_proto::repo::conversation_service_server::ConversationService;
use gochat_proto::repo::group_service_client::GroupServiceClient;
use gochat_proto::repo::group_service_server::GroupService;
use gochat_proto::repo::message_service_client::MessageServiceClient;
use gochat_proto::repo::message_service_server::MessageService;
use gochat_proto::repo::online_status_service_client::OnlineStatusServiceClient;
use gochat_proto::repo::online_status_service_server::OnlineStatusService;
use gochat_proto::repo::user_service_client::UserServiceClient;
use gochat_proto::repo::user_service_server::UserService;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// Largest gRPC message either side accepts (member lists of big groups are the largest).
const MAX_MESSAGE_BYTES: usize = 32 * 1024 * 1024;

/// The repo services of a remote repo (or a load-balanced set of them). Cheap to clone.
#[derive(Debug, Clone)]
pub struct RepoClient {
    users: UserServiceClient<Channel>,
    messages: MessageServiceClient<Channel>,
    groups: GroupServiceClient<Channel>,
    conversations: ConversationServiceClient<Channel>,
    presence: OnlineStatusServiceClient<Channel>,
    policy: RpcPolicy,
}

impl RepoClient {
    /// Calls over `channel` (one address or a balanced set) under `policy`.
    pub fn new(channel: Channel, policy: RpcPolicy) -> Self {
        Self {
            users: UserServiceClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            messages: MessageServiceClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            groups: GroupServiceClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            conversations: ConversationServiceClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            presence: OnlineStatusServiceClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            policy,
        }
    }
}

forward_grpc! {
    impl UserService for RepoClient { client: users, pb: pb;
        create_user(CreateUserRequest) -> CreateUserResponse: Once;
        get_user(GetUserRequest) -> GetUserResponse: Idempotent;
        get_users(GetUsersRequest) -> GetUsersResponse: Idempotent;
        update_user(UpdateUserRequest) -> UpdateUserResponse: Idempotent;
        verify_password(VerifyPasswordRequest) -> VerifyPasswordResponse: Idempotent;
        get_user_by_username(GetUserByUsernameRequest) -> GetUserResponse: Idempotent;
        create_session(CreateSessionRequest) -> CreateSessionResponse: Once;
        rotate_session(RotateSessionRequest) -> RotateSessionResponse: Once;
        revoke_session(RevokeSessionRequest) -> RevokeSessionResponse: Idempotent;
        get_session(GetSessionRequest) -> GetSessionResponse: Idempotent;
    }
}

#[tonic::async_trait]
impl MessageService for RepoClient {
    async fn save_message(
        &self,
        request: Request<pb::SaveMessageRequest>,
    ) -> Result<Response<pb::SaveMessageResponse>, Status> {
        let c = self.messages.clone();
        rpc::call(&self.policy, Idempotency::Idempotent, request, move |r| {
            let mut c = c.clone();
            async move { c.save_message(r).await }
        })
        .await
    }

    async fn save_messages(
        &self,
        request: Request<pb::SaveMessagesRequest>,
    ) -> Result<Response<pb::SaveMessagesResponse>, Status> {
        let c = self.messages.clone();
        rpc::call(&self.policy, Idempotency::Idempotent, request, move |r| {
            let mut c = c.clone();
            async move { c.save_messages(r).await }
        })
        .await
    }

    async fn get_message(
        &self,
        request: Request<pb::GetMessageRequest>,
    ) -> Result<Response<pb::GetMessageResponse>, Status> {
        let c = self.messages.clone();
        rpc::call(&self.policy, Idempotency::Idempotent, request, move |r| {
            let mut c = c.clone();
            async move { c.get_message(r).await }
        })
        .await
    }

    async fn get_conversation_messages(
        &self,
        request: Request<pb::GetConversationMessagesRequest>,
    ) -> Result<Response<pb::GetConversationMessagesResponse>, Status> {
        let c = self.messages.clone();
        rpc::call(&self.policy, Idempotency::Idempotent, request, move |r| {
            let mut c = c.clone();
            async move { c.get_conversation_messages(r).await }
        })
        .await
    }

    async fn generate_seq_id(
        &self,
        request: Request<pb::GenerateSeqIdRequest>,
    ) -> Result<Response<pb::GenerateSeqIdResponse>, Status> {
        // A plain reservation repeated would reserve twice (a gap); a restart from storage is
        // the same however often it is made.
        let idempotency = if request.get_ref().from_stored {
            Idempotency::Idempotent
        } else {
            Idempotency::Once
        };
        let c = self.messages.clone();
        rpc::call(&self.policy, idempotency, request, move |r| {
            let mut c = c.clone();
            async move { c.generate_seq_id(r).await }
        })
        .await
    }

    async fn check_message_idempotency(
        &self,
        request: Request<pb::CheckMessageIdempotencyRequest>,
    ) -> Result<Response<pb::CheckMessageIdempotencyResponse>, Status> {
        let c = self.messages.clone();
        rpc::call(&self.policy, Idempotency::Idempotent, request, move |r| {
            let mut c = c.clone();
            async move { c.check_message_idempotency(r).await }
        })
        .await
    }
}

forward_grpc! {
    impl GroupService for RepoClient { client: groups, pb: pb;
        create_group(CreateGroupRequest) -> CreateGroupResponse: Once;
        get_group(GetGroupRequest) -> GetGroupResponse: Idempotent;
        add_group_member(AddGroupMemberRequest) -> AddGroupMemberResponse: Once;
        remove_group_member(RemoveGroupMemberRequest) -> RemoveGroupMemberResponse: Once;
        get_group_members(GetGroupMembersRequest) -> GetGroupMembersResponse: Idempotent;
        get_members_online_status(GetMembersOnlineStatusRequest) -> GetMembersOnlineStatusResponse: Idempotent;
        is_group_member(IsGroupMemberRequest) -> IsGroupMemberResponse: Idempotent;
    }
}

forward_grpc! {
    impl ConversationService for RepoClient { client: conversations, pb: pb;
        get_user_conversations(GetUserConversationsRequest) -> GetUserConversationsResponse: Idempotent;
        update_read_pointer(UpdateReadPointerRequest) -> UpdateReadPointerResponse: Idempotent;
        get_unread_count(GetUnreadCountRequest) -> GetUnreadCountResponse: Idempotent;
        get_or_create_single_conversation(GetOrCreateSingleConversationRequest) -> GetOrCreateSingleConversationResponse: Idempotent;
        get_conversation(GetConversationRequest) -> GetConversationResponse: Idempotent;
        check_membership(CheckMembershipRequest) -> CheckMembershipResponse: Idempotent;
        get_conversation_members(GetConversationMembersRequest) -> GetConversationMembersResponse: Idempotent;
    }
}

forward_grpc! {
    impl OnlineStatusService for RepoClient { client: presence, pb: pb;
        set_user_online(SetUserOnlineRequest) -> SetUserOnlineResponse: Idempotent;
        set_user_offline(SetUserOfflineRequest) -> SetUserOfflineResponse: Idempotent;
        get_user_online_status(GetUserOnlineStatusRequest) -> GetUserOnlineStatusResponse: Idempotent;
        get_users_online_status(GetUsersOnlineStatusRequest) -> GetUsersOnlineStatusResponse: Idempotent;
    }
}
