//! `/system/secrets`: values go in, only names come out.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::Json;
use http::StatusCode;

use super::error::{ApiError, ApiResult};
use super::functions::NamespaceQuery;
use super::wire::{parse_json, SecretListItem, SecretRequest};
use super::{detached, AppState};
use crate::fleet::SecretInput;

pub async fn list(
    State(s): State<Arc<AppState>>,
    Query(q): Query<NamespaceQuery>,
) -> ApiResult<Json<Vec<SecretListItem>>> {
    let namespace = s.fleet.resolve_namespace(q.namespace.as_deref())?;
    let names = s.fleet.list_secrets(&namespace).await?;
    Ok(Json(
        names
            .into_iter()
            .map(|name| SecretListItem {
                name,
                namespace: namespace.clone(),
            })
            .collect(),
    ))
}

fn input(body: &[u8]) -> Result<SecretInput, ApiError> {
    let req: SecretRequest = parse_json(body)?;
    Ok(SecretInput {
        name: req.name.unwrap_or_default(),
        namespace: req.namespace,
        value: req.value,
        raw_value: req.raw_value,
    })
}

pub async fn create(State(s): State<Arc<AppState>>, body: Bytes) -> ApiResult<StatusCode> {
    let (fleet, input) = (s.fleet.clone(), input(&body)?);
    detached(async move { fleet.create_secret(input).await }).await??;
    Ok(StatusCode::ACCEPTED)
}

pub async fn update(State(s): State<Arc<AppState>>, body: Bytes) -> ApiResult<StatusCode> {
    let (fleet, input) = (s.fleet.clone(), input(&body)?);
    detached(async move { fleet.update_secret(input).await }).await??;
    Ok(StatusCode::ACCEPTED)
}

pub async fn delete(State(s): State<Arc<AppState>>, body: Bytes) -> ApiResult<StatusCode> {
    let (fleet, req) = (s.fleet.clone(), input(&body)?);
    detached(async move {
        fleet
            .delete_secret(&req.name, req.namespace.as_deref())
            .await
    })
    .await??;
    Ok(StatusCode::ACCEPTED)
}
