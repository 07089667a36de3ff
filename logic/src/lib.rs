//! gochat's business service (spec section 2): auth, conversations and groups as the client
//! sees them, the upstream processor and the Conversation actors that assign seqs, persist,
//! acknowledge and deliver. It calls the repo service through the repo service traits.
//!
//! This crate fills in with the serve issue; today it only reserves its place in the workspace.
