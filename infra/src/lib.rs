//! Shared plumbing of every gochat service.
//!
//! - [`config`]: the one typed configuration (TOML file + `GOCHAT_` environment overrides).
//! - [`error`]: the spec's numeric error codes, the `ErrorResponse` body, and the one place that
//!   maps codes to gRPC status and HTTP status (and back from a gRPC status).
//! - [`ids`]: snowflake message/user/group ids and the conversation-id scheme.
//! - [`rt`]: a long-lived future on a thread of its own.
//! - [`rpc`]: deadlines, retries of idempotent calls and trace ids for gRPC between services.
//! - [`telemetry`]: metric names and the process's Prometheus recorder.
//! - [`time`]: Unix-millisecond clock helpers.

pub mod config;
pub mod discovery;
pub mod error;
pub mod ids;
pub mod mq;
pub mod rpc;
pub mod rt;
pub mod telemetry;
pub mod time;
pub mod wire;

pub use error::{AppError, ErrorCode, ErrorResponse};
