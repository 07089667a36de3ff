//! Shared plumbing of every gochat service.
//!
//! - [`error`]: the spec's numeric error codes, the `ErrorResponse` body, and the one place that
//!   maps codes to gRPC status and HTTP status (and back from a gRPC status).
//! - [`ids`]: snowflake message/user/group ids and the conversation-id scheme.
//! - [`time`]: Unix-millisecond clock helpers.

pub mod error;
pub mod ids;
pub mod time;

pub use error::{AppError, ErrorCode, ErrorResponse};
