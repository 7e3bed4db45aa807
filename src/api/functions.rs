//! `/system/functions`, `/system/function/{name}`, `/system/scale-function/{name}`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde::Deserialize;

use super::error::{ApiError, ApiResult};
use super::wire::{parse_json, status_json, DeleteFunctionRequest, ScaleServiceRequest};
use super::{detached, AppState};
use crate::model::{FunctionDeployment, FunctionId};

#[derive(Debug, Default, Deserialize)]
pub struct NamespaceQuery {
    pub namespace: Option<String>,
    /// faastastic: one datacenter only.
    pub datacenter: Option<String>,
}

pub async fn list(
    State(s): State<Arc<AppState>>,
    Query(q): Query<NamespaceQuery>,
) -> ApiResult<Response> {
    let namespace = s.fleet.resolve_namespace(q.namespace.as_deref())?;
    let datacenter = s.fleet.resolve_datacenter(q.datacenter.as_deref())?;
    let views = s.fleet.list(&namespace, datacenter.as_deref());
    let counts = s.metrics.invocation_counts();
    let any_paused = s.autoscaler.any_paused();
    let body = s.statuses.list_json(&views, &counts, |id| {
        any_paused.then(|| s.autoscaler.pause_of(id)).flatten()
    });
    // Entries of removed functions and replaced versions go once they outnumber the live ones
    // noticeably.
    if s.statuses.entries() > s.fleet.count() + 1024 {
        s.statuses.retain(|f| s.fleet.is_current(f));
    }
    Ok(json_response(body))
}

/// The new version's status spec is serialized now rather than by the next list.
fn prime_status(s: &AppState, id: &FunctionId) {
    if let Some(function) = s.fleet.function(id) {
        s.statuses.prime(&function);
    }
}

fn json_response(body: Vec<u8>) -> Response {
    ([(http::header::CONTENT_TYPE, "application/json")], body).into_response()
}

pub async fn status(
    State(s): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(q): Query<NamespaceQuery>,
) -> ApiResult<Response> {
    let id = function_id(&s, &name, q.namespace.as_deref())?;
    let datacenter = s.fleet.resolve_datacenter(q.datacenter.as_deref())?;
    let view = s.fleet.get_in(&id, datacenter.as_deref())?;
    let counts = s.metrics.invocation_counts();
    let pause = s.autoscaler.pause_of(&id);
    let conditions = s.fleet.conditions(&view);
    Ok(json_response(status_json(
        &view,
        &counts,
        pause.as_ref(),
        &conditions,
    )))
}

pub async fn deploy(State(s): State<Arc<AppState>>, body: Bytes) -> ApiResult<StatusCode> {
    let dep: FunctionDeployment = parse_json(&body)?;
    let fleet = s.fleet.clone();
    let id = detached(async move { fleet.deploy(dep).await }).await??;
    tracing::info!(function = %id, "deployed");
    prime_status(&s, &id);
    Ok(StatusCode::ACCEPTED)
}

pub async fn update(State(s): State<Arc<AppState>>, body: Bytes) -> ApiResult<StatusCode> {
    let dep: FunctionDeployment = parse_json(&body)?;
    let fleet = s.fleet.clone();
    let id = detached(async move { fleet.update(dep).await }).await??;
    tracing::info!(function = %id, "updated");
    prime_status(&s, &id);
    Ok(StatusCode::ACCEPTED)
}

/// Namespace from the body, else the query (old clients), else the default.
pub async fn remove(
    State(s): State<Arc<AppState>>,
    Query(q): Query<NamespaceQuery>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let req: DeleteFunctionRequest = parse_json(&body)?;
    let name = req.function_name.unwrap_or_default();
    if name.is_empty() {
        return Err(ApiError::bad_request(
            "functionName: is required, e.g. {\"functionName\":\"figlet\"}",
        ));
    }
    let namespace = req.namespace.filter(|n| !n.is_empty()).or(q.namespace);
    let id = function_id(&s, &name, namespace.as_deref())?;
    let datacenter = s
        .fleet
        .resolve_datacenter(req.datacenter.as_deref().or(q.datacenter.as_deref()))?;
    let (fleet, target, dc) = (s.fleet.clone(), id.clone(), datacenter.clone());
    detached(async move { fleet.remove(&target, dc.as_deref()).await }).await??;
    tracing::info!(function = %id, datacenter = ?datacenter, "removed");
    Ok(StatusCode::ACCEPTED)
}

/// Name from the path; namespace from the body, else the query, else the default.
pub async fn scale(
    State(s): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(q): Query<NamespaceQuery>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let req: ScaleServiceRequest = parse_json(&body)?;
    let Some(replicas) = req.replicas else {
        return Err(ApiError::bad_request(
            "replicas: is required, e.g. {\"serviceName\":\"figlet\",\"replicas\":2}",
        ));
    };
    let namespace = req.namespace.filter(|n| !n.is_empty()).or(q.namespace);
    let id = function_id(&s, &name, namespace.as_deref())?;
    let datacenter = s
        .fleet
        .resolve_datacenter(req.datacenter.as_deref().or(q.datacenter.as_deref()))?;
    let override_bounds = req.override_bounds.unwrap_or(false);
    let (autoscaler, target, dc) = (s.autoscaler.clone(), id.clone(), datacenter.clone());
    detached(async move {
        autoscaler
            .manual_scale(&target, dc.as_deref(), replicas, override_bounds)
            .await
    })
    .await??;
    tracing::info!(function = %id, datacenter = ?datacenter, replicas, "scaled");
    Ok(StatusCode::ACCEPTED)
}

/// `name` may carry a `.namespace` suffix; an explicit namespace wins over it.
fn function_id(s: &AppState, raw: &str, namespace: Option<&str>) -> Result<FunctionId, ApiError> {
    Ok(s.fleet.resolve_function(raw, namespace)?)
}
