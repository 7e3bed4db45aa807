//! `/function/{name}[/{path}]` (synchronous) and `/async-function/{name}[/{path}]`.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::header::{HeaderValue, ALLOW, RETRY_AFTER};
use http::{Method, StatusCode};

use super::error::ApiError;
use super::AppState;
use crate::proxy::{split_path, METHODS};
use crate::proxy::{unix_nanos, CALL_ID, START_TIME};
use crate::queue::AsyncJob;

pub async fn sync(State(s): State<Arc<AppState>>, req: Request) -> Response {
    if !METHODS.contains(req.method()) {
        let allow: Vec<&str> = METHODS.iter().map(Method::as_str).collect();
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            [(ALLOW, allow.join(", "))],
            "method not allowed\n",
        )
            .into_response();
    }
    let path = req.uri().path().to_string();
    let (raw_name, suffix) = split_path(&path, "/function/");
    let id = match s.invoker.resolve(raw_name) {
        Ok(id) => id,
        Err(resp) => return *resp,
    };
    s.invoker.invoke(&id, suffix, req).await
}

pub async fn submit(State(s): State<Arc<AppState>>, req: Request) -> Response {
    match queue(&s, req).await {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    }
}

async fn queue(s: &AppState, req: Request) -> Result<Response, ApiError> {
    let path = req.uri().path().to_string();
    let (raw_name, suffix) = split_path(&path, "/async-function/");
    let id = match s.invoker.resolve(raw_name) {
        Ok(id) => id,
        Err(resp) => return Ok(*resp),
    };
    let callback = match req.headers().get("x-callback-url") {
        None => None,
        Some(v) => {
            let text = v.to_str().unwrap_or("");
            let url = reqwest::Url::parse(text)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https"))
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "X-Callback-Url: {text:?} is not an absolute http(s) URL"
                    ))
                })?;
            Some(url)
        }
    };
    let (mut parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, s.limits.max_async_body_bytes)
        .await
        .map_err(|e| {
            if is_length_limit(e) {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "request body is larger than {} bytes (limits.max_async_body_bytes)",
                        s.limits.max_async_body_bytes
                    ),
                )
            } else {
                ApiError::bad_request("the request body could not be read")
            }
        })?;
    let call_id = match parts.headers.get(CALL_ID).and_then(|v| v.to_str().ok()) {
        Some(existing) => existing.to_string(),
        None => uuid::Uuid::new_v4().to_string(),
    };
    let call_id_value = HeaderValue::from_str(&call_id).expect("a call id is a valid header value");
    let start_time = HeaderValue::from(unix_nanos().min(u64::MAX as u128) as u64);
    parts.headers.insert(CALL_ID, call_id_value.clone());
    parts.headers.insert(START_TIME, start_time.clone());
    let job = AsyncJob {
        id,
        suffix: suffix.to_string(),
        query: parts.uri.query().map(str::to_string),
        method: parts.method,
        headers: parts.headers,
        body,
        callback,
        call_id,
    };
    match s.queue.submit(job) {
        Ok(()) => Ok((
            StatusCode::ACCEPTED,
            [(CALL_ID, call_id_value), (START_TIME, start_time)],
        )
            .into_response()),
        Err(full) => Ok((
            StatusCode::TOO_MANY_REQUESTS,
            [(RETRY_AFTER, HeaderValue::from_static("1"))],
            format!("{full}; retry later\n"),
        )
            .into_response()),
    }
}

/// True when reading a body failed on its size limit rather than on the connection.
fn is_length_limit(e: axum::Error) -> bool {
    e.into_inner()
        .downcast_ref::<http_body_util::LengthLimitError>()
        .is_some()
}

#[cfg(test)]
mod tests {
    use super::{is_length_limit, split_path};

    #[tokio::test]
    async fn tells_a_size_limit_from_a_failed_read() {
        let too_big = axum::body::to_bytes(axum::body::Body::from("0123456789"), 4)
            .await
            .unwrap_err();
        assert!(is_length_limit(too_big));
        let chunks: Vec<Result<bytes::Bytes, std::io::Error>> =
            vec![Err(std::io::Error::other("connection reset"))];
        let broken = axum::body::Body::from_stream(futures::stream::iter(chunks));
        let failed = axum::body::to_bytes(broken, 1024).await.unwrap_err();
        assert!(!is_length_limit(failed));
    }

    #[test]
    fn keeps_suffix_and_trailing_slash() {
        assert_eq!(split_path("/function/f", "/function/"), ("f", "/"));
        assert_eq!(split_path("/function/f/", "/function/"), ("f", "/"));
        assert_eq!(split_path("/function/f/a/b/", "/function/"), ("f", "/a/b/"));
        assert_eq!(
            split_path("/async-function/f.ns/x", "/async-function/"),
            ("f.ns", "/x")
        );
    }
}
