-- gochat schema, SQLite flavour. Ids are snowflake BIGINTs chosen by the application; times are
-- Unix milliseconds. See docs/schema.md for why each table and index exists.

CREATE TABLE users (
    id            BIGINT PRIMARY KEY NOT NULL,
    username      VARCHAR(50)  NOT NULL,
    password_hash VARCHAR(255) NOT NULL,
    nickname      VARCHAR(50)  NOT NULL DEFAULT '',
    avatar_url    VARCHAR(255) NOT NULL DEFAULT '',
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL
);
CREATE UNIQUE INDEX uk_users_username ON users (username);

CREATE TABLE groups (
    id           BIGINT PRIMARY KEY NOT NULL,
    name         VARCHAR(50)  NOT NULL,
    owner_id     BIGINT NOT NULL,
    member_count INTEGER NOT NULL DEFAULT 0,
    avatar_url   VARCHAR(255) NOT NULL DEFAULT '',
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL
);
CREATE INDEX idx_groups_owner ON groups (owner_id);

CREATE TABLE group_members (
    id        INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    group_id  BIGINT  NOT NULL,
    user_id   BIGINT  NOT NULL,
    role      INTEGER NOT NULL DEFAULT 1,
    joined_at BIGINT  NOT NULL
);
CREATE UNIQUE INDEX idx_group_user ON group_members (group_id, user_id);
CREATE INDEX idx_group_members_user ON group_members (user_id);

CREATE TABLE messages (
    id              BIGINT PRIMARY KEY NOT NULL,
    conversation_id VARCHAR(64) NOT NULL,
    sender_id       BIGINT  NOT NULL,
    message_type    INTEGER NOT NULL DEFAULT 1,
    content         TEXT    NOT NULL,
    seq_id          BIGINT  NOT NULL,
    client_msg_id   VARCHAR(64),
    created_at      BIGINT  NOT NULL
);
CREATE UNIQUE INDEX idx_conv_seq ON messages (conversation_id, seq_id);
CREATE INDEX idx_conv_time ON messages (conversation_id, created_at);
CREATE UNIQUE INDEX uk_sender_client_msg ON messages (sender_id, client_msg_id);

CREATE TABLE user_read_pointers (
    id               INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    user_id          BIGINT NOT NULL,
    conversation_id  VARCHAR(64) NOT NULL,
    last_read_seq_id BIGINT NOT NULL DEFAULT 0,
    updated_at       BIGINT NOT NULL
);
CREATE UNIQUE INDEX idx_user_conv ON user_read_pointers (user_id, conversation_id);

CREATE TABLE conversations (
    id              VARCHAR(64) PRIMARY KEY NOT NULL,
    kind            INTEGER NOT NULL,
    group_id        BIGINT,
    last_seq        BIGINT NOT NULL DEFAULT 0,
    seq_floor       BIGINT NOT NULL DEFAULT 0,
    last_message_id BIGINT,
    last_message_at BIGINT NOT NULL DEFAULT 0,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL
);
CREATE INDEX idx_conversations_group ON conversations (group_id);

CREATE TABLE conversation_members (
    id              INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    conversation_id VARCHAR(64) NOT NULL,
    user_id         BIGINT NOT NULL,
    joined_at       BIGINT NOT NULL
);
CREATE UNIQUE INDEX idx_conv_member ON conversation_members (conversation_id, user_id);
CREATE INDEX idx_conversation_members_user ON conversation_members (user_id);

INSERT INTO conversations (id, kind, created_at, updated_at) VALUES ('world', 3, 0, 0);
