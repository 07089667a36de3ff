DROP TABLE conversation_members;
DROP TABLE conversations;
DROP TABLE user_read_pointers;
DROP TABLE messages;
DROP TABLE group_members;
DROP TABLE groups;
DROP TABLE users;
