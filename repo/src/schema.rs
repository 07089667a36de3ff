//! Diesel's view of the tables in `migrations/{sqlite,mysql}` (the same columns in both).

diesel::table! {
    users (id) {
        id -> BigInt,
        username -> Text,
        password_hash -> Text,
        nickname -> Text,
        avatar_url -> Text,
        created_at -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::table! {
    groups (id) {
        id -> BigInt,
        name -> Text,
        owner_id -> BigInt,
        member_count -> Integer,
        avatar_url -> Text,
        created_at -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::table! {
    group_members (id) {
        id -> BigInt,
        group_id -> BigInt,
        user_id -> BigInt,
        role -> Integer,
        joined_at -> BigInt,
    }
}

diesel::table! {
    messages (id) {
        id -> BigInt,
        conversation_id -> Text,
        sender_id -> BigInt,
        message_type -> Integer,
        content -> Text,
        seq_id -> BigInt,
        client_msg_id -> Nullable<Text>,
        created_at -> BigInt,
    }
}

diesel::table! {
    user_read_pointers (id) {
        id -> BigInt,
        user_id -> BigInt,
        conversation_id -> Text,
        last_read_seq_id -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::table! {
    conversations (id) {
        id -> Text,
        kind -> Integer,
        group_id -> Nullable<BigInt>,
        last_seq -> BigInt,
        seq_floor -> BigInt,
        last_message_id -> Nullable<BigInt>,
        last_message_at -> BigInt,
        created_at -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::table! {
    conversation_members (id) {
        id -> BigInt,
        conversation_id -> Text,
        user_id -> BigInt,
        joined_at -> BigInt,
    }
}

diesel::allow_tables_to_appear_in_same_query!(
    users,
    groups,
    group_members,
    messages,
    user_read_pointers,
    conversations,
    conversation_members,
);

diesel::table! {
    auth_sessions (id) {
        id -> BigInt,
        user_id -> BigInt,
        refresh_jti -> Text,
        revoked -> Integer,
        expires_at -> BigInt,
        created_at -> BigInt,
        updated_at -> BigInt,
    }
}
