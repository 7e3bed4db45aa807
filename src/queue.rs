//! Asynchronous invocations (`/async-function/{name}`): a bounded in-memory queue drained by a
//! fixed pool of workers. Each job runs through the same invoke path as a synchronous call (so it
//! is metered the same) and its result is posted to `X-Callback-Url` when one was given.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request};
use http_body_util::BodyExt;
use tokio::sync::{mpsc, Mutex};

use crate::config::AsyncConfig;
use crate::model::FunctionId;
use crate::proxy::{strip_hop_by_hop, Invoker};
use crate::telemetry::Metrics;

pub struct AsyncJob {
    pub id: FunctionId,
    pub suffix: String,
    pub query: Option<String>,
    pub method: Method,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub callback: Option<reqwest::Url>,
    pub call_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum QueueFull {
    #[error("the asynchronous queue is full ({0} waiting invocations, async.queue_capacity)")]
    Jobs(usize),
    #[error("the asynchronous queue holds too many request bytes (async.max_queued_bytes = {0})")]
    Bytes(usize),
}

pub struct AsyncQueue {
    tx: mpsc::Sender<AsyncJob>,
    capacity: usize,
    /// Body bytes of the jobs waiting or running, bounded by `max_bytes`.
    bytes: Arc<std::sync::atomic::AtomicUsize>,
    max_bytes: usize,
    metrics: Arc<Metrics>,
}

impl AsyncQueue {
    pub fn start(invoker: Arc<Invoker>, metrics: Arc<Metrics>, cfg: &AsyncConfig) -> AsyncQueue {
        let (tx, rx) = mpsc::channel::<AsyncJob>(cfg.queue_capacity);
        let rx = Arc::new(Mutex::new(rx));
        let bytes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let callbacks = reqwest::Client::builder()
            .timeout(cfg.callback_timeout)
            .build()
            .expect("a default HTTP client can be built");
        for _ in 0..cfg.workers {
            let (rx, invoker, callbacks, metrics) = (
                rx.clone(),
                invoker.clone(),
                callbacks.clone(),
                metrics.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let job = rx.lock().await.recv().await;
                    let Some(job) = job else { return };
                    metrics.async_queue_depth.dec();
                    run_job(&invoker, &callbacks, job).await;
                }
            });
        }
        AsyncQueue {
            tx,
            capacity: cfg.queue_capacity,
            bytes,
            max_bytes: cfg.max_queued_bytes,
            metrics,
        }
    }

    /// Queues a job without waiting; a full queue is reported, never blocked on.
    pub fn submit(&self, job: AsyncJob) -> Result<(), QueueFull> {
        use std::sync::atomic::Ordering;
        let size = job.body.len();
        let before = self.bytes.fetch_add(size, Ordering::AcqRel);
        if before + size > self.max_bytes && before > 0 {
            self.bytes.fetch_sub(size, Ordering::AcqRel);
            return Err(QueueFull::Bytes(self.max_bytes));
        }
        if self.tx.try_send(job).is_err() {
            self.bytes.fetch_sub(size, Ordering::AcqRel);
            return Err(QueueFull::Jobs(self.capacity));
        }
        self.metrics.async_queue_depth.inc();
        Ok(())
    }
}

async fn run_job(invoker: &Invoker, callbacks: &reqwest::Client, job: AsyncJob) {
    let started = Instant::now();
    let uri = match &job.query {
        Some(q) => format!("{}?{q}", job.suffix),
        None => job.suffix.clone(),
    };
    let mut builder = Request::builder().method(job.method.clone()).uri(uri);
    if let Some(h) = builder.headers_mut() {
        *h = job.headers.clone();
    }
    let request = match builder.body(Body::from(job.body.clone())) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(function = %job.id, call_id = %job.call_id, error = %e, "cannot rebuild async request");
            return;
        }
    };
    let response = invoker.invoke(&job.id, &job.suffix, request).await;
    let status = response.status();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes());
    tracing::info!(function = %job.id, call_id = %job.call_id, status = status.as_u16(), "async invocation finished");
    let Some(url) = job.callback else { return };
    let (status, body) = match body {
        Ok(b) => (status, b),
        Err(_) => (http::StatusCode::SERVICE_UNAVAILABLE, Bytes::new()),
    };
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    headers.remove(http::header::CONTENT_LENGTH);
    let mut set = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    };
    set("x-function-status", status.as_u16().to_string());
    set("x-function-name", job.id.name.clone());
    set("x-call-id", job.call_id.clone());
    set(
        crate::platform::DURATION_HEADER,
        crate::platform::seconds_since(started),
    );
    let result = callbacks
        .post(url.clone())
        .headers(headers)
        .body(body)
        .send()
        .await;
    match result {
        Ok(r) => {
            tracing::info!(call_id = %job.call_id, callback = %url, status = r.status().as_u16(), "callback delivered")
        }
        Err(e) => {
            tracing::warn!(call_id = %job.call_id, callback = %url, error = %e, "callback failed")
        }
    }
}
