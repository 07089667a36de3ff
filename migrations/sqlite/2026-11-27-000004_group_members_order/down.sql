DROP INDEX IF EXISTS idx_group_members_group;
