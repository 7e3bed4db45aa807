//! One error type for every handler, mapped to the status codes OpenFaaS clients expect, with
//! plain-text bodies (as the reference providers send). A client that asks for JSON
//! (`Accept: application/json`, as the web UI does) gets the same message as
//! `{"message": ..., "errors": [{"field": ..., "message": ...}]}`, one entry per field a
//! validation failure names, so it can show each next to its field.

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::StatusCode;

use crate::fleet::FleetError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// Validation failures, each `field: message`.
    pub fields: Vec<String>,
}

/// An error answer's parts, kept on the response for [`json_errors`].
#[derive(Debug, Clone)]
struct ErrorDetail {
    message: String,
    fields: Vec<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            fields: Vec::new(),
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
            FleetError::Store(e) if e.is_unavailable() => StatusCode::SERVICE_UNAVAILABLE,
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
            FleetError::Store(e) if e.is_unavailable() => {
                format!("{e}: retry once the database answers again")
            }
            other => other.to_string(),
        };
        let mut error = ApiError::new(status, message);
        if let FleetError::Invalid(errors) = e {
            error.fields = errors;
        }
        error
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = self.status.as_u16(), error = %self.message, "request failed");
        }
        let body = format!("{}\n", self.message.trim_end());
        let mut response = (
            self.status,
            [(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            body,
        )
            .into_response();
        response.extensions_mut().insert(ErrorDetail {
            message: self.message,
            fields: self.fields,
        });
        response
    }
}

/// Middleware: an error answer as JSON when the request asked for JSON (and only then: the
/// stock clients read the plain-text body).
pub async fn json_errors(req: Request, next: Next) -> Response {
    // JSON when asked for it and plain text is not also acceptable (a client that takes
    // either gets what the stock clients get).
    let wants_json = req
        .headers()
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/json") && !a.contains("text/plain"));
    let response = next.run(req).await;
    if !wants_json {
        return response;
    }
    let Some(detail) = response.extensions().get::<ErrorDetail>().cloned() else {
        return response;
    };
    let errors: Vec<serde_json::Value> = detail
        .fields
        .iter()
        .map(|f| {
            let (field, message) = f.split_once(": ").unwrap_or(("", f.as_str()));
            serde_json::json!({"field": field, "message": message})
        })
        .collect();
    let (mut parts, _) = response.into_parts();
    parts.headers.remove(http::header::CONTENT_LENGTH);
    parts.headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    let body = serde_json::json!({"message": detail.message.trim_end(), "errors": errors});
    Response::from_parts(parts, axum::body::Body::from(body.to_string()))
}

pub type ApiResult<T> = Result<T, ApiError>;
