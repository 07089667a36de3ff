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
use gochat_infra::rpc::{Idempotency, RpcPolicy, idempotent, once};
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
        create_user(CreateUserRequest) -> CreateUserResponse: once;
        get_user(GetUserRequest) -> GetUserResponse: idempotent;
        get_users(GetUsersRequest) -> GetUsersResponse: idempotent;
        update_user(UpdateUserRequest) -> UpdateUserResponse: idempotent;
        verify_password(VerifyPasswordRequest) -> VerifyPasswordResponse: idempotent;
        get_user_by_username(GetUserByUsernameRequest) -> GetUserResponse: idempotent;
        create_session(CreateSessionRequest) -> CreateSessionResponse: once;
        rotate_session(RotateSessionRequest) -> RotateSessionResponse: once;
        revoke_session(RevokeSessionRequest) -> RevokeSessionResponse: idempotent;
        get_session(GetSessionRequest) -> GetSessionResponse: idempotent;
    }
}

forward_grpc! {
    impl MessageService for RepoClient { client: messages, pb: pb;
        save_message(SaveMessageRequest) -> SaveMessageResponse: idempotent;
        save_messages(SaveMessagesRequest) -> SaveMessagesResponse: idempotent;
        get_message(GetMessageRequest) -> GetMessageResponse: idempotent;
        get_conversation_messages(GetConversationMessagesRequest) -> GetConversationMessagesResponse: idempotent;
        // A plain reservation repeated would reserve twice (a gap); a restart from storage is
        // the same however often it is made.
        generate_seq_id(GenerateSeqIdRequest) -> GenerateSeqIdResponse:
            |r: &pb::GenerateSeqIdRequest| if r.from_stored { Idempotency::Idempotent } else { Idempotency::Once };
        check_message_idempotency(CheckMessageIdempotencyRequest) -> CheckMessageIdempotencyResponse: idempotent;
    }
}

forward_grpc! {
    impl GroupService for RepoClient { client: groups, pb: pb;
        create_group(CreateGroupRequest) -> CreateGroupResponse: once;
        get_group(GetGroupRequest) -> GetGroupResponse: idempotent;
        add_group_member(AddGroupMemberRequest) -> AddGroupMemberResponse: once;
        remove_group_member(RemoveGroupMemberRequest) -> RemoveGroupMemberResponse: once;
        get_group_members(GetGroupMembersRequest) -> GetGroupMembersResponse: idempotent;
        get_members_online_status(GetMembersOnlineStatusRequest) -> GetMembersOnlineStatusResponse: idempotent;
        is_group_member(IsGroupMemberRequest) -> IsGroupMemberResponse: idempotent;
    }
}

forward_grpc! {
    impl ConversationService for RepoClient { client: conversations, pb: pb;
        get_user_conversations(GetUserConversationsRequest) -> GetUserConversationsResponse: idempotent;
        update_read_pointer(UpdateReadPointerRequest) -> UpdateReadPointerResponse: idempotent;
        get_unread_count(GetUnreadCountRequest) -> GetUnreadCountResponse: idempotent;
        get_or_create_single_conversation(GetOrCreateSingleConversationRequest) -> GetOrCreateSingleConversationResponse: idempotent;
        get_conversation(GetConversationRequest) -> GetConversationResponse: idempotent;
        check_membership(CheckMembershipRequest) -> CheckMembershipResponse: idempotent;
        get_conversation_members(GetConversationMembersRequest) -> GetConversationMembersResponse: idempotent;
        get_single_chat_peers(GetSingleChatPeersRequest) -> GetSingleChatPeersResponse: idempotent;
    }
}

forward_grpc! {
    impl OnlineStatusService for RepoClient { client: presence, pb: pb;
        set_user_online(SetUserOnlineRequest) -> SetUserOnlineResponse: idempotent;
        set_user_offline(SetUserOfflineRequest) -> SetUserOfflineResponse: idempotent;
        get_user_online_status(GetUserOnlineStatusRequest) -> GetUserOnlineStatusResponse: idempotent;
        get_users_online_status(GetUsersOnlineStatusRequest) -> GetUsersOnlineStatusResponse: idempotent;
    }
}
