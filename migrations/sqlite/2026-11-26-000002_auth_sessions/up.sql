-- Login sessions: one row per login, named by both of its tokens (see docs/schema.md).
CREATE TABLE auth_sessions (
    id          BIGINT PRIMARY KEY NOT NULL,
    user_id     BIGINT NOT NULL,
    refresh_jti VARCHAR(64) NOT NULL,
    revoked     INTEGER NOT NULL DEFAULT 0,
    expires_at  BIGINT NOT NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);
CREATE INDEX idx_auth_sessions_user ON auth_sessions (user_id);
