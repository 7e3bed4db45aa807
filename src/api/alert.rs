//! `POST /system/alert`: Alertmanager's webhook. Each alert is one signal; the answer lists each
//! alert's outcome. 500 only when a platform call failed (Alertmanager retries 5xx, not 4xx).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::header::RETRY_AFTER;
use http::StatusCode;
use serde::Serialize;

use super::error::ApiError;
use super::wire::parse_object;
use super::AppState;
use crate::autoscale::alertmanager::Webhook;
use crate::autoscale::executor::{SignalRequest, SignalResult, Verdict};
use crate::model::{validate_dns_label, FunctionId};

#[derive(Serialize)]
struct AlertOutcome {
    index: usize,
    #[serde(flatten)]
    result: SignalResult,
}

#[derive(Serialize)]
struct WebhookResponse {
    receiver: String,
    alerts: Vec<AlertOutcome>,
}

pub async fn receive(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    if s.webhook_limiter.check().is_err() {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(RETRY_AFTER, "1")],
            "too many webhook requests (autoscale.webhook_rate_per_sec); retry later\n",
        )
            .into_response();
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return ApiError::bad_request("A body is required for this endpoint").into_response();
    }
    let hook: Webhook = match parse_object(&body, "Unable to parse alert, bad format") {
        Ok(h) => h,
        Err(e) => return e.into_response(),
    };
    let receiver = hook.receiver.clone().unwrap_or_default();
    let alerts = hook.alerts.unwrap_or_default();
    let mut results: Vec<Option<SignalResult>> = vec![None; alerts.len()];
    let mut requests = Vec::new();
    let mut positions = Vec::new();
    for (i, alert) in alerts.iter().enumerate() {
        let function = alert.label("function_name").unwrap_or("").to_string();
        let signal = match alert.signal() {
            Ok(Some(signal)) => signal,
            Ok(None) => {
                let reason = if function.is_empty() {
                    "no function_name label: not an autoscaling alert"
                } else {
                    "resolved explicit action: nothing to undo"
                };
                results[i] = Some(SignalResult::other(
                    function,
                    Verdict::Ignored,
                    reason.to_string(),
                ));
                continue;
            }
            Err(e) => {
                results[i] = Some(SignalResult::other(function, Verdict::Invalid, e));
                continue;
            }
        };
        if let Err(e) = validate_dns_label("function_name", &signal.name) {
            results[i] = Some(SignalResult::other(function, Verdict::Invalid, e));
            continue;
        }
        let namespace = match s.fleet.resolve_namespace(signal.namespace.as_deref()) {
            Ok(ns) => ns,
            Err(e) => {
                results[i] = Some(SignalResult::other(
                    function,
                    Verdict::UnknownFunction,
                    e.to_string(),
                ));
                continue;
            }
        };
        let datacenter = match s.fleet.resolve_datacenter(signal.datacenter.as_deref()) {
            Ok(dc) => dc,
            Err(e) => {
                results[i] = Some(SignalResult::other(
                    function,
                    Verdict::Invalid,
                    e.to_string(),
                ));
                continue;
            }
        };
        let evidence = alert.evidence(&signal, &receiver, hook.group_key.as_ref());
        requests.push(SignalRequest {
            id: FunctionId::new(signal.name, namespace),
            datacenter,
            action: signal.action,
            dedupe_key: signal.dedupe_key,
            source: "alert".to_string(),
            evidence,
        });
        positions.push(i);
    }
    let autoscaler = s.autoscaler.clone();
    let applied = match super::detached(async move { autoscaler.apply_batch(requests).await }).await
    {
        Ok(applied) => applied,
        Err(e) => return e.into_response(),
    };
    for (i, result) in positions.into_iter().zip(applied) {
        results[i] = Some(result);
    }
    let outcomes: Vec<AlertOutcome> = results
        .into_iter()
        .enumerate()
        .map(|(index, r)| AlertOutcome {
            index,
            result: r.expect("every alert has an outcome"),
        })
        .collect();
    let status = if outcomes.iter().any(|o| o.result.retryable) {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    };
    (
        status,
        Json(WebhookResponse {
            receiver,
            alerts: outcomes,
        }),
    )
        .into_response()
}
