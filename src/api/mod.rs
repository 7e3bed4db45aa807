//! The HTTP surface: thin handlers that parse the wire type, call one domain function and write
//! the answer. `router` builds the whole app so tests can drive it without a socket.

pub mod alert;
pub mod auth;
pub mod autoscaling;
pub mod error;
pub mod events;
pub mod functions;
pub mod info;
pub mod invoke;
pub mod logs;
pub mod namespaces;
pub mod secrets;
pub mod wire;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::response::IntoResponse;
use axum::routing::{any, get, post};
use axum::Router;
use http::StatusCode;

use crate::autoscale::executor::Autoscaler;
use crate::config::{LimitsConfig, Role};
use crate::fleet::Fleet;
use crate::proxy::Invoker;
use crate::queue::AsyncQueue;
use crate::store::Store;
use crate::telemetry::Metrics;

pub struct AppState {
    pub fleet: Arc<Fleet>,
    pub invoker: Arc<Invoker>,
    pub queue: Arc<AsyncQueue>,
    pub metrics: Arc<Metrics>,
    pub role: Role,
    pub limits: LimitsConfig,
    pub autoscaler: Arc<Autoscaler>,
    pub fleet_store: Store,
    pub webhook_limiter: governor::DefaultDirectRateLimiter,
}

/// Every `/system/*` route; all of them require credentials when auth is on.
fn system_routes(limits: &LimitsConfig, auth: Arc<auth::Auth>) -> Router<Arc<AppState>> {
    Router::new()
        .route(
            "/system/functions",
            get(functions::list)
                .post(functions::deploy)
                .put(functions::update)
                .delete(functions::remove),
        )
        .route("/system/function/{name}", get(functions::status))
        .route("/system/scale-function/{name}", post(functions::scale))
        .route("/system/info", get(info::info))
        .route("/system/namespaces", get(namespaces::list))
        .route("/system/namespace", post(namespaces::create))
        .route("/system/namespace/", post(namespaces::create))
        .route(
            "/system/namespace/{name}",
            get(namespaces::get)
                .put(namespaces::update)
                .delete(namespaces::delete),
        )
        .route(
            "/system/secrets",
            get(secrets::list)
                .post(secrets::create)
                .put(secrets::update)
                .delete(secrets::delete),
        )
        .route("/system/logs", get(logs::logs))
        .route("/system/scale-events", get(events::list))
        .route("/system/autoscaling", get(autoscaling::list))
        .route("/system/autoscaling/pause", post(autoscaling::pause))
        .route("/system/autoscaling/resume", post(autoscaling::resume))
        .layer(DefaultBodyLimit::max(limits.max_system_body_bytes))
        .route_layer(middleware::from_fn_with_state(
            auth.clone(),
            auth::require_basic,
        ))
        .merge(
            Router::new()
                .route("/system/alert", post(alert::receive))
                .layer(DefaultBodyLimit::max(limits.max_alert_body_bytes))
                .route_layer(middleware::from_fn_with_state(auth, auth::require_alert)),
        )
}

/// Invocation, health and metrics routes: open, as in OpenFaaS.
fn open_routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/function/{name}", any(invoke::sync))
        .route("/function/{name}/", any(invoke::sync))
        .route("/function/{name}/{*path}", any(invoke::sync))
        .route("/async-function/{name}", post(invoke::submit))
        .route("/async-function/{name}/", post(invoke::submit))
        .route("/async-function/{name}/{*path}", post(invoke::submit))
        .merge(monitoring_routes())
}

/// `/healthz` and `/metrics`, also served alone on the optional metrics listener.
pub fn monitoring_routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/healthz", get(info::healthz))
        .route("/metrics", get(info::metrics))
}

/// Runs a state change to completion even if the client disconnects (which drops the handler's
/// future): a store write must always be followed by the in-memory and platform steps.
pub(crate) async fn detached<T, F>(change: F) -> Result<T, error::ApiError>
where
    T: Send + 'static,
    F: std::future::Future<Output = T> + Send + 'static,
{
    tokio::spawn(change).await.map_err(|e| {
        error::ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("state change failed: {e}"),
        )
    })
}

async fn not_found() -> impl IntoResponse {
    (StatusCode::NOT_FOUND, "404 page not found\n")
}

pub fn router(state: Arc<AppState>, auth: Arc<auth::Auth>) -> Router {
    system_routes(&state.limits, auth)
        .merge(open_routes())
        .fallback(not_found)
        .with_state(state)
}

/// The router for the optional second listener (OpenFaaS serves metrics on port 8082).
pub fn monitoring_router(state: Arc<AppState>) -> Router {
    monitoring_routes().fallback(not_found).with_state(state)
}
