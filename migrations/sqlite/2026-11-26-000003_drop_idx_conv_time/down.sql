CREATE INDEX idx_conv_time ON messages (conversation_id, created_at);
