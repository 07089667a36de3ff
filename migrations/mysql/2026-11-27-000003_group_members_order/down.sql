DROP INDEX idx_group_members_group ON group_members;
