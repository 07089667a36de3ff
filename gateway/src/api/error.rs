//! [`ApiError`]: the one place where a gateway failure becomes an HTTP response
//! (`ErrorResponse {code, message, trace_id}` with the contract's status for the code).

use std::fmt;

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, ResponseError};
use gochat_infra::{AppError, ErrorCode};

use super::TraceId;

/// An HTTP failure: a spec code, a message and the request's trace id.
#[derive(Debug)]
pub(crate) struct ApiError {
    /// Code and message.
    pub error: AppError,
    /// Echoed in the body.
    pub trace_id: Option<String>,
    /// Overrides the code's status (405 only).
    status: Option<StatusCode>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>, trace: &TraceId) -> Self {
        Self {
            error: AppError::new(code, message),
            trace_id: trace.as_option(),
            status: None,
        }
    }

    /// 1001 (400).
    pub fn invalid(message: impl Into<String>, trace: &TraceId) -> Self {
        Self::new(ErrorCode::InvalidParameter, message, trace)
    }

    /// 1002 (401).
    pub fn unauthorized(message: impl Into<String>, trace: &TraceId) -> Self {
        Self::new(ErrorCode::Unauthorized, message, trace)
    }

    /// A logic failure, with its exact code.
    pub fn from_status(status: &tonic::Status, trace: &TraceId) -> Self {
        Self {
            error: AppError::from_status(status),
            trace_id: trace.as_option(),
            status: None,
        }
    }

    /// For extractor error handlers, which only see the request.
    pub fn invalid_for(req: &HttpRequest, message: impl Into<String>) -> actix_web::Error {
        Self::invalid(message, &TraceId::of(req)).into()
    }

    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = Some(status);
        self
    }

    pub fn code(&self) -> ErrorCode {
        self.error.code
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.error)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status.unwrap_or_else(|| {
            StatusCode::from_u16(self.error.code.http_status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
        })
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        if status.is_server_error() {
            tracing::warn!(code = %self.error.code, message = %self.error.message, "request failed");
        }
        HttpResponse::build(status).json(self.error.to_response(self.trace_id.clone()))
    }
}
