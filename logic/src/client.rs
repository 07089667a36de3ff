//! [`LogicClient`]: the four logic services over gRPC, behind the same server traits the logic
//! service implements in-process, so the gateway runs unchanged against a remote (or a
//! load-balanced set of) logic instances.
//!
//! Every call has a deadline and carries the caller's metadata (the gateway's trace id). Calls
//! safe to repeat are retried on transient failures with the spec's backoff
//! (`gochat_infra::rpc`): token validation, reads, marking read (monotonic), opening a single
//! conversation (get-or-create), logout and presence. Login, registration, refresh (rotation),
//! creating, joining and leaving groups are made once.

use gochat_infra::forward_grpc;
use gochat_infra::rpc::{RpcPolicy, idempotent, once};
use gochat_proto::logic as pb;
use gochat_proto::logic::auth_service_client::AuthServiceClient;
use gochat_proto::logic::auth_service_server::AuthService;
use gochat_proto::logic::conversation_service_client::ConversationServiceClient;
use gochat_proto::logic::conversation_service_server::ConversationService;
use gochat_proto::logic::group_service_client::GroupServiceClient;
use gochat_proto::logic::group_service_server::GroupService;
use gochat_proto::logic::presence_service_client::PresenceServiceClient;
use gochat_proto::logic::presence_service_server::PresenceService;
use tonic::transport::Channel;

/// Largest gRPC message either side accepts.
const MAX_MESSAGE_BYTES: usize = 32 * 1024 * 1024;

/// The logic services of a remote logic (or a balanced set of them). Cheap to clone.
#[derive(Debug, Clone)]
pub struct LogicClient {
    auth: AuthServiceClient<Channel>,
    conversations: ConversationServiceClient<Channel>,
    groups: GroupServiceClient<Channel>,
    presence: PresenceServiceClient<Channel>,
    policy: RpcPolicy,
}

impl LogicClient {
    /// Calls over `channel` under `policy`.
    pub fn new(channel: Channel, policy: RpcPolicy) -> Self {
        Self {
            auth: AuthServiceClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            conversations: ConversationServiceClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            groups: GroupServiceClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            presence: PresenceServiceClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            policy,
        }
    }
}

forward_grpc! {
    impl AuthService for LogicClient { client: auth, pb: pb;
        login(LoginRequest) -> LoginResponse: once;
        register(RegisterRequest) -> RegisterResponse: once;
        refresh_token(RefreshTokenRequest) -> RefreshTokenResponse: once;
        logout(LogoutRequest) -> LogoutResponse: idempotent;
        validate_token(ValidateTokenRequest) -> ValidateTokenResponse: idempotent;
        get_user(GetUserRequest) -> GetUserResponse: idempotent;
    }
}

forward_grpc! {
    impl ConversationService for LogicClient { client: conversations, pb: pb;
        get_conversations(GetConversationsRequest) -> GetConversationsResponse: idempotent;
        get_conversation(GetConversationRequest) -> GetConversationResponse: idempotent;
        get_messages(GetMessagesRequest) -> GetMessagesResponse: idempotent;
        mark_as_read(MarkAsReadRequest) -> MarkAsReadResponse: idempotent;
        create_single_conversation(CreateSingleConversationRequest) -> CreateSingleConversationResponse: idempotent;
    }
}

forward_grpc! {
    impl GroupService for LogicClient { client: groups, pb: pb;
        create_group(CreateGroupRequest) -> CreateGroupResponse: once;
        get_group(GetGroupRequest) -> GetGroupResponse: idempotent;
        join_group(JoinGroupRequest) -> JoinGroupResponse: once;
        leave_group(LeaveGroupRequest) -> LeaveGroupResponse: once;
        get_group_members(GetGroupMembersRequest) -> GetGroupMembersResponse: idempotent;
    }
}

forward_grpc! {
    impl PresenceService for LogicClient { client: presence, pb: pb;
        user_connected(UserConnectedRequest) -> UserConnectedResponse: idempotent;
        user_disconnected(UserDisconnectedRequest) -> UserDisconnectedResponse: idempotent;
        refresh_presence(RefreshPresenceRequest) -> RefreshPresenceResponse: idempotent;
    }
}
