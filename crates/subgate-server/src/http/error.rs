//! The one place an [`ApiError`] becomes Adapty's error body.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use subgate_core::ApiError;

/// An [`ApiError`] on its way out.
#[derive(Debug)]
pub struct ErrorResponse(pub ApiError);

impl From<ApiError> for ErrorResponse {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl IntoResponse for ErrorResponse {
    fn into_response(self) -> Response {
        let e = self.0;
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            // Internals are logged (the request span carries the request id), never returned.
            tracing::error!(error = %e, "request failed");
        }
        let body = json!({
            "errors": e.details,
            "error_code": e.code.as_str(),
            "status_code": e.status(),
        });
        (status, Json(body)).into_response()
    }
}

pub type ApiResult<T> = Result<T, ErrorResponse>;
