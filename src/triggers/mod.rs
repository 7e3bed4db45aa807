//! Events other than HTTP requests that invoke functions: schedules (`cron`) and NATS
//! JetStream messages (`nats`), asked for by the functions' annotations in OpenFaaS's
//! convention (`spec`). Both invoke through the gateway's routing and read the answer here.

pub mod cron;
pub mod nats;
pub mod spec;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::BodyExt;

use crate::model::FunctionId;
use crate::proxy::Invoker;
use crate::telemetry::Metrics;

/// What a function answered a trigger.
pub(crate) struct Answer {
    pub status: StatusCode,
    pub content_type: Option<String>,
    /// At most the bytes the trigger asked to keep (the whole body is read either way, so that
    /// a kept-alive connection stays usable).
    pub body: Bytes,
}

impl Answer {
    /// The start of the body (512 bytes at most), trimmed, for the record of a failure.
    pub fn start(&self) -> String {
        let start = String::from_utf8_lossy(&self.body[..self.body.len().min(512)]);
        start.trim().to_string()
    }

    /// The status and the start of the body.
    pub fn failure(&self) -> String {
        format!("{}: {}", self.status, self.start())
    }
}

/// Invokes `id` with `request` (its path `/`) through the gateway's routing, as an HTTP client
/// would (a function at zero is woken), keeping up to `keep` bytes of the answer.
pub(crate) async fn invoke(
    invoker: &Invoker,
    id: &FunctionId,
    request: http::Request<axum::body::Body>,
    keep: usize,
) -> Answer {
    let response = invoker.invoke(id, "/", request).await;
    let status = response.status();
    let content_type = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = http_body_util::Limited::new(response.into_body(), keep)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Answer {
        status,
        content_type,
        body,
    }
}

/// Counts `n` due times or deliveries of `trigger` for `id` by outcome
/// (`faastastic_trigger_runs_total`).
pub(crate) fn count(metrics: &Metrics, id: &FunctionId, trigger: &str, outcome: &str, n: u64) {
    metrics
        .trigger_runs
        .with_label_values(&[id.qualified().as_str(), trigger, outcome])
        .inc_by(n);
}
