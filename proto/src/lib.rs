//! gochat's wire contracts: the protobuf messages and the tonic services of the repo service
//! (`im.repo.v1`, spec section 3.2) and the logic service (`im.logic.v1`, spec section 2.2).
//!
//! The code is generated at build time from `proto/*.proto` (see `build.rs`). Services depend on
//! the generated server traits; in `serve` mode they are called in-process, in the distributed
//! mode through the generated clients.
//!
//! [`etcd`] holds a client for a wire-compatible subset of etcd's v3 gRPC API (generated from
//! `proto/etcd/*.proto`), used by the etcd service discovery of the distributed mode.

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

/// A client for the subset of etcd's v3 gRPC API that gochat's service discovery uses (KV, Lease,
/// Watch). Wire-compatible with upstream etcd: same packages, services, messages and field
/// numbers as `api/etcdserverpb/rpc.proto` and `api/mvccpb/kv.proto`.
pub mod etcd {
    /// etcd's RPC messages and the generated `kv_client`, `lease_client` and `watch_client`.
    #[allow(
        missing_docs,
        clippy::all,
        clippy::pedantic,
        missing_debug_implementations
    )]
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }

    /// etcd's stored key-value pair and watch event.
    #[allow(
        missing_docs,
        clippy::all,
        clippy::pedantic,
        missing_debug_implementations
    )]
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
}
