//! The spec's numeric error codes (design.md "错误码设计") and the one place that maps them to
//! gRPC status, HTTP status and the `ErrorResponse {code, message, trace_id}` body.
//!
//! A service error travels as [`AppError`]. Over gRPC it becomes a [`tonic::Status`] whose gRPC
//! code follows the error's class and whose metadata carries the exact numeric code
//! (`x-gochat-code`), so [`AppError::from_status`] on the client side restores it unchanged.

use serde::{Deserialize, Serialize};

/// gRPC metadata key carrying the numeric error code.
pub const CODE_METADATA_KEY: &str = "x-gochat-code";

/// The spec's numeric error codes, plus the additions documented in `docs/protocol.md`
/// (1005 rate limited, 1006 service unavailable, 3003 seq conflict).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "u16", try_from = "u16")]
pub enum ErrorCode {
    /// 1000: an unexpected failure inside gochat.
    Internal,
    /// 1001: a request field is missing or malformed.
    InvalidParameter,
    /// 1002: no valid credentials.
    Unauthorized,
    /// 1003: authenticated but not allowed.
    Forbidden,
    /// 1004: the addressed thing does not exist.
    NotFound,
    /// 1005: over a rate limit (client contract).
    RateLimited,
    /// 1006: a dependency (database, broker, another service) is unavailable; retry later.
    Unavailable,
    /// 2000
    UserNotFound,
    /// 2001
    UserExists,
    /// 2002
    InvalidPassword,
    /// 3000
    MessageNotFound,
    /// 3001
    DuplicateMessage,
    /// 3002
    InvalidMessage,
    /// 3003: a seq id that is already taken in its conversation was offered for storage.
    SeqConflict,
    /// 4000
    GroupNotFound,
    /// 4001
    NotGroupMember,
    /// 4002
    GroupFull,
}

impl ErrorCode {
    /// Every code, for tables and round-trip tests.
    pub const ALL: [ErrorCode; 17] = [
        Self::Internal,
        Self::InvalidParameter,
        Self::Unauthorized,
        Self::Forbidden,
        Self::NotFound,
        Self::RateLimited,
        Self::Unavailable,
        Self::UserNotFound,
        Self::UserExists,
        Self::InvalidPassword,
        Self::MessageNotFound,
        Self::DuplicateMessage,
        Self::InvalidMessage,
        Self::SeqConflict,
        Self::GroupNotFound,
        Self::NotGroupMember,
        Self::GroupFull,
    ];

    /// The spec's number.
    pub const fn as_u16(self) -> u16 {
        match self {
            Self::Internal => 1000,
            Self::InvalidParameter => 1001,
            Self::Unauthorized => 1002,
            Self::Forbidden => 1003,
            Self::NotFound => 1004,
            Self::RateLimited => 1005,
            Self::Unavailable => 1006,
            Self::UserNotFound => 2000,
            Self::UserExists => 2001,
            Self::InvalidPassword => 2002,
            Self::MessageNotFound => 3000,
            Self::DuplicateMessage => 3001,
            Self::InvalidMessage => 3002,
            Self::SeqConflict => 3003,
            Self::GroupNotFound => 4000,
            Self::NotGroupMember => 4001,
            Self::GroupFull => 4002,
        }
    }

    /// The code for a number, if it is one of ours.
    pub fn from_u16(n: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_u16() == n)
    }

    /// The gRPC status code this error travels as.
    pub const fn grpc_code(self) -> tonic::Code {
        use tonic::Code;
        match self {
            Self::Internal => Code::Internal,
            Self::InvalidParameter | Self::InvalidMessage => Code::InvalidArgument,
            Self::Unauthorized | Self::InvalidPassword => Code::Unauthenticated,
            Self::Forbidden | Self::NotGroupMember => Code::PermissionDenied,
            Self::NotFound | Self::UserNotFound | Self::MessageNotFound | Self::GroupNotFound => {
                Code::NotFound
            }
            Self::RateLimited | Self::GroupFull => Code::ResourceExhausted,
            Self::Unavailable => Code::Unavailable,
            Self::UserExists | Self::DuplicateMessage => Code::AlreadyExists,
            Self::SeqConflict => Code::Aborted,
        }
    }

    /// The HTTP status of the client contract.
    pub const fn http_status(self) -> u16 {
        match self {
            Self::Internal => 500,
            Self::InvalidParameter | Self::InvalidMessage => 400,
            Self::Unauthorized | Self::InvalidPassword => 401,
            Self::Forbidden | Self::NotGroupMember => 403,
            Self::NotFound | Self::UserNotFound | Self::MessageNotFound | Self::GroupNotFound => {
                404
            }
            Self::UserExists | Self::GroupFull | Self::DuplicateMessage | Self::SeqConflict => 409,
            Self::RateLimited => 429,
            Self::Unavailable => 503,
        }
    }

    /// The code a bare gRPC status maps to when it carries no `x-gochat-code`.
    pub const fn from_grpc_code(code: tonic::Code) -> Self {
        use tonic::Code;
        match code {
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
                Self::InvalidParameter
            }
            Code::Unauthenticated => Self::Unauthorized,
            Code::PermissionDenied => Self::Forbidden,
            Code::NotFound => Self::NotFound,
            Code::ResourceExhausted => Self::RateLimited,
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => Self::Unavailable,
            Code::AlreadyExists => Self::DuplicateMessage,
            Code::Aborted => Self::SeqConflict,
            _ => Self::Internal,
        }
    }
}

impl From<ErrorCode> for u16 {
    fn from(c: ErrorCode) -> u16 {
        c.as_u16()
    }
}

impl TryFrom<u16> for ErrorCode {
    type Error = String;
    fn try_from(n: u16) -> Result<Self, String> {
        Self::from_u16(n).ok_or_else(|| format!("unknown error code {n}"))
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.as_u16())
    }
}

/// A service error: a spec code and a human message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct AppError {
    /// The numeric code.
    pub code: ErrorCode,
    /// What went wrong, for people.
    pub message: String,
}

impl AppError {
    /// An error with a code and a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// 1001 with a message.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidParameter, message)
    }

    /// 1000 with a message.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }

    /// Restores an error from a gRPC status (the exact code when the server was gochat).
    pub fn from_status(status: &tonic::Status) -> Self {
        let code = status
            .metadata()
            .get(CODE_METADATA_KEY)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse::<u16>().ok())
            .and_then(ErrorCode::from_u16)
            .unwrap_or_else(|| ErrorCode::from_grpc_code(status.code()));
        Self::new(code, status.message())
    }

    /// The client-facing body.
    pub fn to_response(&self, trace_id: Option<String>) -> ErrorResponse {
        ErrorResponse {
            code: self.code.as_u16(),
            message: self.message.clone(),
            trace_id,
        }
    }
}

impl From<AppError> for tonic::Status {
    fn from(err: AppError) -> Self {
        let mut status = tonic::Status::new(err.code.grpc_code(), err.message);
        if let Ok(v) = err.code.as_u16().to_string().parse() {
            status.metadata_mut().insert(CODE_METADATA_KEY, v);
        }
        status
    }
}

impl From<tonic::Status> for AppError {
    fn from(status: tonic::Status) -> Self {
        Self::from_status(&status)
    }
}

/// The spec's error body for HTTP responses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// The numeric code.
    pub code: u16,
    /// What went wrong, for people.
    pub message: String,
    /// The request's trace id, when it has one.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub trace_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_survives_a_grpc_round_trip() {
        for code in ErrorCode::ALL {
            let status: tonic::Status = AppError::new(code, "boom").into();
            let back = AppError::from_status(&status);
            assert_eq!(back.code, code);
            assert_eq!(back.message, "boom");
        }
    }

    #[test]
    fn numbers_are_the_spec_numbers() {
        assert_eq!(ErrorCode::Internal.as_u16(), 1000);
        assert_eq!(ErrorCode::NotGroupMember.as_u16(), 4001);
        assert_eq!(ErrorCode::from_u16(2001), Some(ErrorCode::UserExists));
        assert_eq!(ErrorCode::from_u16(9999), None);
        let mut numbers: Vec<u16> = ErrorCode::ALL.iter().map(|c| c.as_u16()).collect();
        numbers.dedup();
        assert_eq!(numbers.len(), ErrorCode::ALL.len());
    }

    #[test]
    fn a_foreign_status_maps_by_class() {
        let status = tonic::Status::unavailable("down");
        assert_eq!(AppError::from_status(&status).code, ErrorCode::Unavailable);
    }

    #[test]
    fn error_response_serializes_like_the_spec() {
        let body =
            AppError::new(ErrorCode::NotGroupMember, "not a member").to_response(Some("t1".into()));
        let json = serde_json::to_value(&body).expect("serializes");
        assert_eq!(
            json,
            serde_json::json!({"code": 4001, "message": "not a member", "trace_id": "t1"})
        );
    }
}
