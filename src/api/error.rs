//! The one place where library errors become HTTP responses.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::error::Error;

/// An error answered as JSON `{error, details}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error: String,
    details: Vec<String>,
}

impl ApiError {
    /// Adds one line to the error's details.
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.details.push(detail.into());
        self
    }

    /// An error with a status, a message and details.
    pub fn new(status: StatusCode, error: impl Into<String>, details: Vec<String>) -> Self {
        ApiError {
            status,
            error: error.into(),
            details,
        }
    }

    /// The status it answers with.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The messages of an openFHIR-style error body (a JSON array): every detail, or the
    /// summary when there is none.
    pub fn messages(&self) -> Vec<String> {
        if self.details.is_empty() {
            vec![self.error.clone()]
        } else {
            self.details.clone()
        }
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let root = e.root();
        let (status, error, details) = match root {
            Error::Invalid { message, details } => {
                (StatusCode::BAD_REQUEST, message.clone(), details.clone())
            }
            Error::NotFound { .. } => (StatusCode::NOT_FOUND, root.to_string(), vec![]),
            Error::Conflict(m) => (StatusCode::CONFLICT, m.clone(), vec![]),
            Error::Duplicate(m) => (StatusCode::BAD_REQUEST, m.clone(), vec![]),
            Error::Unprocessable { message, details } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                message.clone(),
                details.clone(),
            ),
            Error::Db(db) if root.is_bad_value() => (
                StatusCode::BAD_REQUEST,
                "invalid value".to_string(),
                vec![db
                    .as_db_error()
                    .map_or_else(|| db.to_string(), |d| d.message().to_string())],
            ),
            _ if root.is_unavailable() => {
                // Log the cause; tell the client only that the database is unavailable.
                tracing::warn!(error = %root, "request failed: database unavailable");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "database unavailable; retry later".to_string(),
                    vec![],
                )
            }
            _ => {
                tracing::error!(error = %root, "request failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error".to_string(),
                    vec![],
                )
            }
        };
        ApiError {
            status,
            error,
            details,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({ "error": self.error, "details": self.details })),
        )
            .into_response()
    }
}

/// Result of a handler.
pub type ApiResult<T> = std::result::Result<T, ApiError>;
