//! gochat's wire contracts: the protobuf messages and the tonic services of the repo service
//! (`im.repo.v1`, spec section 3.2) and the logic service (`im.logic.v1`, spec section 2.2).
//!
//! The code is generated at build time from `proto/*.proto` (see `build.rs`). Services depend on
//! the generated server traits; in `serve` mode they are called in-process, in the distributed
//! mode through the generated clients.

/// The data service: users, messages, groups, conversations, presence.
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations
)]
pub mod repo {
    tonic::include_proto!("im.repo.v1");
}

/// The business service: auth, conversations and groups as the client sees them.
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations
)]
pub mod logic {
    tonic::include_proto!("im.logic.v1");
}
