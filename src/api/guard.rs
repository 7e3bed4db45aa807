//! Bounds on request bodies the server buffers (`/system/*`, `/system/alert`,
//! `/async-function/*`): a size limit (413, naming its `limits.*` key) and a deadline for the
//! whole body, counted from the request head (408). Without the deadline a client that sends a
//! head and then stalls mid-body would hold its handler forever.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, StatusCode};
use http_body::{Frame, SizeHint};

use super::error::ApiError;

/// The bounds of one group of routes.
#[derive(Debug, Clone, Copy)]
pub struct BodyPolicy {
    /// The configuration key of `limit`, quoted in the 413 answer.
    pub limit_key: &'static str,
    pub limit: usize,
    pub timeout: Duration,
}

const READING: u8 = 0;
const TIMED_OUT: u8 = 1;
const TOO_LARGE: u8 = 2;

#[derive(Debug)]
struct BodyRejected(&'static str);

impl std::fmt::Display for BodyRejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for BodyRejected {}

/// The request body, failing once it passes the deadline or the size limit; `outcome` tells
/// the middleware which (a handler's own answer to a failed read is replaced).
struct Guarded {
    inner: Body,
    deadline: Pin<Box<tokio::time::Sleep>>,
    left: usize,
    outcome: Arc<AtomicU8>,
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        if this.deadline.as_mut().poll(cx).is_ready() {
            this.outcome.store(TIMED_OUT, Ordering::Relaxed);
            return Poll::Ready(Some(Err(axum::Error::new(BodyRejected(
                "the request body did not arrive in time",
            )))));
        }
        let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        if let Some(data) = frame.data_ref() {
            if data.len() > this.left {
                this.outcome.store(TOO_LARGE, Ordering::Relaxed);
                return Poll::Ready(Some(Err(axum::Error::new(BodyRejected(
                    "the request body is too large",
                )))));
            }
            this.left -= data.len();
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Middleware: wraps the body in the group's bounds and answers 408 or 413 when the handler's
/// read of it failed on one of them. The connection is closed after either answer, since the
/// rest of the body was never read.
pub async fn guard_body(State(policy): State<BodyPolicy>, req: Request, next: Next) -> Response {
    let outcome = Arc::new(AtomicU8::new(READING));
    let (parts, body) = req.into_parts();
    let body = Body::new(Guarded {
        inner: body,
        deadline: Box::pin(tokio::time::sleep(policy.timeout)),
        left: policy.limit,
        outcome: outcome.clone(),
    });
    let response = next.run(Request::from_parts(parts, body)).await;
    let rejection = match outcome.load(Ordering::Relaxed) {
        TIMED_OUT => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {:?} (limits.body_timeout_ms)",
                policy.timeout
            ),
        ),
        TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body is larger than {} bytes ({})",
                policy.limit, policy.limit_key
            ),
        ),
        _ => return response,
    };
    let mut response = rejection.into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}
