//! `/system/namespaces` and `/system/namespace/{name}`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::StatusCode;

use super::error::{ApiError, ApiResult};
use super::wire::parse_json;
use super::{detached, AppState};
use crate::model::{validate_dns_label, Namespace};

pub async fn list(State(s): State<Arc<AppState>>) -> Json<Vec<String>> {
    Json(s.fleet.namespace_names())
}

/// Namespaces are DNS labels (checked when created), so a path naming anything else is a bad
/// request, answered without echoing a huge name back.
fn path_name(name: &str) -> Result<(), ApiError> {
    validate_dns_label("namespace", name).map_err(ApiError::bad_request)
}

pub async fn get(State(s): State<Arc<AppState>>, Path(name): Path<String>) -> ApiResult<Response> {
    path_name(&name)?;
    Ok(Json(s.fleet.get_namespace(&name)?).into_response())
}

pub async fn create(State(s): State<Arc<AppState>>, body: Bytes) -> ApiResult<StatusCode> {
    let ns: Namespace = parse_json(&body)?;
    let fleet = s.fleet.clone();
    detached(async move { fleet.create_namespace(ns).await }).await??;
    Ok(StatusCode::CREATED)
}

/// The path names the namespace; a body naming another one is a mistake worth reporting.
pub async fn update(
    State(s): State<Arc<AppState>>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    path_name(&name)?;
    let mut ns: Namespace = parse_json(&body)?;
    if !ns.name.is_empty() && ns.name != name {
        return Err(ApiError::bad_request(format!(
            "name: body names {:?} but the path names {name:?}",
            ns.name
        )));
    }
    ns.name = name;
    let fleet = s.fleet.clone();
    detached(async move { fleet.update_namespace(ns).await }).await??;
    Ok(StatusCode::ACCEPTED)
}

pub async fn delete(
    State(s): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    path_name(&name)?;
    let fleet = s.fleet.clone();
    detached(async move { fleet.delete_namespace(&name).await }).await??;
    Ok(StatusCode::ACCEPTED)
}
