//! gochat's gateway (spec section 1): the HTTP API and `/ws`, one Session actor per WebSocket
//! connection, the user -> sessions registry, and the downstream consumer.
//!
//! This crate fills in with the serve issue; today it only reserves its place in the workspace.
