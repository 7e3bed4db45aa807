//! `/system/autoscaling`: pause and resume autoscaling, for one function or all of them. A
//! paused function keeps its replica count; decisions are still computed and recorded as held,
//! so resuming behaves as if the pause had never been.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::error::ApiResult;
use super::wire::parse_json;
use super::{detached, AppState};
use crate::autoscale::executor::ALL;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PauseRequest {
    /// `name` or `name.namespace`; absent: every function.
    #[serde(default)]
    function: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

pub async fn list(State(s): State<Arc<AppState>>) -> Response {
    Json(json!({"paused": s.autoscaler.pauses()})).into_response()
}

/// The scope a request names: `*`, or a deployed function's `name.namespace`.
fn scope(s: &AppState, req: &PauseRequest) -> ApiResult<String> {
    let Some(raw) = req.function.as_deref().filter(|f| !f.is_empty()) else {
        return Ok(ALL.to_string());
    };
    let id = s.fleet.resolve_function(raw, req.namespace.as_deref())?;
    s.fleet.get(&id)?;
    Ok(id.qualified())
}

async fn set(s: Arc<AppState>, body: Bytes, pause: bool) -> ApiResult<Response> {
    let req: PauseRequest = if body.iter().all(u8::is_ascii_whitespace) {
        PauseRequest::default()
    } else {
        parse_json(&body)?
    };
    let scope = scope(&s, &req)?;
    let reason = pause.then(|| {
        req.reason
            .clone()
            .filter(|r| !r.trim().is_empty())
            .unwrap_or_else(|| "paused by an operator".to_string())
    });
    let (autoscaler, target) = (s.autoscaler.clone(), scope.clone());
    let changed = detached(async move { autoscaler.set_pause(&target, reason).await })
        .await?
        .map_err(crate::fleet::FleetError::from)?;
    Ok(Json(json!({"scope": scope, "paused": pause, "changed": changed})).into_response())
}

pub async fn pause(State(s): State<Arc<AppState>>, body: Bytes) -> ApiResult<Response> {
    set(s, body, true).await
}

pub async fn resume(State(s): State<Arc<AppState>>, body: Bytes) -> ApiResult<Response> {
    set(s, body, false).await
}
