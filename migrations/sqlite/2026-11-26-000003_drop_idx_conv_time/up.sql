-- No query reads messages by (conversation_id, created_at): history pages by seq, and the
-- conversation list reads `conversations`. On SQLite, where one writer stores every message,
-- the index cost a third of the index leaves each stored message dirties (docs/schema.md).
DROP INDEX IF EXISTS idx_conv_time;
