//! Grafana annotations for every executed scale decision (`POST /api/annotations`), sent from
//! a bounded queue by one background worker: rate-limited, retried with backoff, and never in
//! the way of scaling (a full queue drops the annotation and counts it).

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use governor::{Quota, RateLimiter};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::config::GrafanaConfig;
use crate::telemetry::Metrics;

/// The body Grafana's annotations API takes.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Annotation {
    #[serde(rename = "dashboardUID", skip_serializing_if = "Option::is_none")]
    pub dashboard_uid: Option<String>,
    /// Epoch milliseconds.
    pub time: i64,
    pub tags: Vec<String>,
    pub text: String,
}

pub struct Annotations {
    tx: mpsc::Sender<Annotation>,
    dashboard_uid: Option<String>,
    metrics: Arc<Metrics>,
}

impl Annotations {
    /// Starts the sender; `Ok(None)` when no Grafana is configured.
    pub fn start(
        cfg: &GrafanaConfig,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Option<Arc<Annotations>>> {
        let Some(base) = &cfg.url else {
            return Ok(None);
        };
        let token = match &cfg.token_file {
            Some(path) => {
                let token = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read grafana.token_file {}", path.display()))?
                    .trim()
                    .to_string();
                if token.is_empty() {
                    tracing::warn!(file = %path.display(), "grafana.token_file is empty: annotations are sent without a token");
                }
                Some(token).filter(|t| !t.is_empty())
            }
            None => None,
        };
        // Every result's series at zero from the start, for rate() and absent().
        for result in ["sent", "failed", "dropped"] {
            metrics.annotations.with_label_values(&[result]);
        }
        let url = format!("{}/api/annotations", base.trim_end_matches('/'));
        let client = reqwest::Client::builder().timeout(cfg.timeout).build()?;
        let (tx, mut rx) = mpsc::channel::<Annotation>(cfg.queue_capacity.max(1));
        let per_sec = NonZeroU32::new(cfg.rate_per_sec.max(1)).expect("max(1) is non-zero");
        let limiter = RateLimiter::direct(Quota::per_second(per_sec));
        let max_attempts = cfg.max_attempts.max(1);
        let worker_metrics = metrics.clone();
        tokio::spawn(async move {
            while let Some(annotation) = rx.recv().await {
                worker_metrics.annotations_queued.dec();
                let mut backoff = Duration::from_millis(100);
                let mut attempt = 1;
                loop {
                    limiter.until_ready().await;
                    let mut req = client.post(&url).json(&annotation);
                    if let Some(t) = &token {
                        req = req.bearer_auth(t);
                    }
                    let retry = match req.send().await {
                        Ok(r) if r.status().is_success() => {
                            worker_metrics
                                .annotations
                                .with_label_values(&["sent"])
                                .inc();
                            break;
                        }
                        Ok(r) => {
                            let s = r.status();
                            tracing::warn!(
                                status = s.as_u16(),
                                attempt,
                                "Grafana refused an annotation"
                            );
                            s.is_server_error() || s.as_u16() == 429
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, attempt, "cannot reach Grafana");
                            true
                        }
                    };
                    if !retry || attempt >= max_attempts {
                        worker_metrics
                            .annotations
                            .with_label_values(&["failed"])
                            .inc();
                        break;
                    }
                    attempt += 1;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        });
        Ok(Some(Arc::new(Annotations {
            tx,
            dashboard_uid: cfg.dashboard_uid.clone(),
            metrics,
        })))
    }

    /// Queues an annotation; never waits. A full queue drops it (counted as `dropped`).
    pub fn post(&self, time_ms: i64, tags: Vec<String>, text: String) {
        let annotation = Annotation {
            dashboard_uid: self.dashboard_uid.clone(),
            time: time_ms,
            tags,
            text,
        };
        match self.tx.try_send(annotation) {
            Ok(()) => self.metrics.annotations_queued.inc(),
            Err(_) => self
                .metrics
                .annotations
                .with_label_values(&["dropped"])
                .inc(),
        }
    }
}
