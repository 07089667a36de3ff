//! gochat's task service (spec section 4): the task dispatcher and the Fanout actors that deliver
//! big-group and world-room messages in member batches, grouped per gateway.
//!
//! This crate fills in with the serve issue; today it only reserves its place in the workspace.
