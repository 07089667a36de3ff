//! gochat's data service (spec design.md section 3): the only part of gochat that touches the
//! database and the cache.
//!
//! Data flows: a tonic service ([`service`]) validates a request, reads through the cache
//! ([`cache`], Cache-Aside), falls back to the store ([`store`]) on a miss or a cache failure,
//! and writes to the store first and then deletes the cache entry. In `serve` mode the logic
//! and task services call the same service structs in-process; in the distributed mode they
//! reach them over gRPC through [`client::RepoClient`], which implements the same traits.

pub mod cache;
pub mod client;
pub mod model;
pub mod schema;
pub mod service;
pub mod store;
pub use service::{Repo, RepoSettings};
pub mod run;
