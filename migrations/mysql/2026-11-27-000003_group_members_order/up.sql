-- Member pages (`GetGroupMembers`, read by the task service for every message of a large
-- group) list a group's members in join order: `WHERE group_id = ? ORDER BY id`. With only
-- (group_id, user_id) to go by, every page sorted all of the group's members first (a
-- 10,000-member group at 200 a page: 50 sorts of 10,000 rows per message). An index on
-- group_id holds its rows in id order (the primary key is part of every secondary index), so
-- a page is read in order (docs/schema.md).
CREATE INDEX idx_group_members_group ON group_members (group_id);
