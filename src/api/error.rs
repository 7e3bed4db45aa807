//! One error type for every handler, mapped to the status codes OpenFaaS clients expect, with
//! plain-text bodies (as the reference providers send).

use axum::response::{IntoResponse, Response};
use http::StatusCode;

use crate::fleet::FleetError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<FleetError> for ApiError {
    fn from(e: FleetError) -> Self {
        let status = match &e {
            FleetError::Invalid(_) => StatusCode::BAD_REQUEST,
            FleetError::NotFound(_) => StatusCode::NOT_FOUND,
            FleetError::Conflict(_) => StatusCode::CONFLICT,
            FleetError::Store(e) if e.is_full() => StatusCode::INSUFFICIENT_STORAGE,
            // A datacenter that does not answer (or whose TLS handshake fails) is an
            // upstream's failure; one that answers with a refusal is this server's.
            FleetError::Platform(crate::platform::PlatformError::Unreachable(_)) => {
                StatusCode::BAD_GATEWAY
            }
            FleetError::Store(_) | FleetError::Platform(_) => StatusCode::INTERNAL_SERVER_ERROR,
            // Some datacenters failed: a gateway's upstream did.
            FleetError::Partial(_) => StatusCode::BAD_GATEWAY,
        };
        let message = match &e {
            FleetError::Invalid(errors) => format!("validation failed: {}", errors.join("; ")),
            FleetError::Store(e) if e.is_full() => {
                format!("{e}: nothing was stored; free space in the data directory and retry")
            }
            other => other.to_string(),
        };
        ApiError::new(status, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = self.status.as_u16(), error = %self.message, "request failed");
        }
        let body = format!("{}\n", self.message.trim_end());
        (
            self.status,
            [(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            body,
        )
            .into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
