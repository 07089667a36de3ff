-- gochat schema, MySQL/MariaDB flavour (InnoDB, utf8mb4). Ids are snowflake BIGINTs chosen by
-- the application; times are Unix milliseconds. See docs/schema.md for why each table and index
-- exists. `groups` is quoted: it is a reserved word in MySQL 8.

CREATE TABLE users (
    id            BIGINT NOT NULL PRIMARY KEY,
    username      VARCHAR(50)  NOT NULL,
    password_hash VARCHAR(255) NOT NULL,
    nickname      VARCHAR(50)  NOT NULL DEFAULT '',
    avatar_url    VARCHAR(255) NOT NULL DEFAULT '',
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL,
    UNIQUE KEY uk_users_username (username)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE `groups` (
    id           BIGINT NOT NULL PRIMARY KEY,
    name         VARCHAR(50)  NOT NULL,
    owner_id     BIGINT NOT NULL,
    member_count INT NOT NULL DEFAULT 0,
    avatar_url   VARCHAR(255) NOT NULL DEFAULT '',
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL,
    KEY idx_groups_owner (owner_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE group_members (
    id        BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    group_id  BIGINT NOT NULL,
    user_id   BIGINT NOT NULL,
    role      INT NOT NULL DEFAULT 1,
    joined_at BIGINT NOT NULL,
    UNIQUE KEY idx_group_user (group_id, user_id),
    KEY idx_group_members_user (user_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE messages (
    id              BIGINT NOT NULL PRIMARY KEY,
    conversation_id VARCHAR(64) NOT NULL,
    sender_id       BIGINT NOT NULL,
    message_type    INT NOT NULL DEFAULT 1,
    content         TEXT NOT NULL,
    seq_id          BIGINT NOT NULL,
    client_msg_id   VARCHAR(64) NULL,
    created_at      BIGINT NOT NULL,
    UNIQUE KEY idx_conv_seq (conversation_id, seq_id),
    KEY idx_conv_time (conversation_id, created_at),
    UNIQUE KEY uk_sender_client_msg (sender_id, client_msg_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE user_read_pointers (
    id               BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    user_id          BIGINT NOT NULL,
    conversation_id  VARCHAR(64) NOT NULL,
    last_read_seq_id BIGINT NOT NULL DEFAULT 0,
    updated_at       BIGINT NOT NULL,
    UNIQUE KEY idx_user_conv (user_id, conversation_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE conversations (
    id              VARCHAR(64) NOT NULL PRIMARY KEY,
    kind            INT NOT NULL,
    group_id        BIGINT NULL,
    last_seq        BIGINT NOT NULL DEFAULT 0,
    seq_floor       BIGINT NOT NULL DEFAULT 0,
    last_message_id BIGINT NULL,
    last_message_at BIGINT NOT NULL DEFAULT 0,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    KEY idx_conversations_group (group_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE conversation_members (
    id              BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    conversation_id VARCHAR(64) NOT NULL,
    user_id         BIGINT NOT NULL,
    joined_at       BIGINT NOT NULL,
    UNIQUE KEY idx_conv_member (conversation_id, user_id),
    KEY idx_conversation_members_user (user_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

INSERT INTO conversations (id, kind, created_at, updated_at) VALUES ('world', 3, 0, 0);
