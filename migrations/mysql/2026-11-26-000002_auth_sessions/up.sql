-- Login sessions: one row per login, named by both of its tokens (see docs/schema.md).
CREATE TABLE auth_sessions (
    id          BIGINT NOT NULL PRIMARY KEY,
    user_id     BIGINT NOT NULL,
    refresh_jti VARCHAR(64) NOT NULL,
    revoked     INT NOT NULL DEFAULT 0,
    expires_at  BIGINT NOT NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    KEY idx_auth_sessions_user (user_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
