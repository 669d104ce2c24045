//! The one place errors become HTTP: every failure leaves as the contract's envelope
//! `{"error": …, "status": N}`; 5xx bodies say nothing about internals: the cause is logged
//! under an error id that the body quotes, so an operator can find what the client was not told.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use boxwood_core::{CoreError, ErrorKind, error_chain, error_id};
use serde_json::json;

/// An error on its way to the client.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into() }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> Self {
        let status = match e.kind() {
            ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
            ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorKind::Forbidden => StatusCode::FORBIDDEN,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::Gone => StatusCode::GONE,
            ErrorKind::TooEarly => StatusCode::TOO_EARLY,
            ErrorKind::Unprocessable => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::InsufficientStorage => StatusCode::INSUFFICIENT_STORAGE,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            let id = error_id();
            tracing::error!(error_id = %id, error = %error_chain(&e), "request failed");
            return Self::new(status, format!("internal server error (error id {id})"));
        }
        Self::new(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({"error": self.message, "status": self.status.as_u16()}));
        let mut response = (self.status, body).into_response();
        if matches!(self.status, StatusCode::GONE | StatusCode::TOO_EARLY | StatusCode::SERVICE_UNAVAILABLE) {
            // Clients with a retry policy wait this many seconds before trying again.
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_errors_quote_an_id_and_nothing_else() {
        let e = CoreError::Internal("open /var/lib/boxwood/blobs/sha256/ab: SECRET".into());
        assert!(e.to_string().contains("SECRET"), "positive control: the error holds the detail");
        let api = ApiError::from(e);
        assert_eq!(api.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(api.message.starts_with("internal server error (error id "), "{}", api.message);
        assert!(!api.message.contains("SECRET") && !api.message.contains("/var/lib"), "{}", api.message);
    }
}
