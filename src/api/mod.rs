//! The HTTP surface: thin handlers that parse the wire type, call one domain function and write
//! the answer. `router` builds the whole app so tests can drive it without a socket; every route
//! is registered through one builder that also records it, and `route_table` lists them.

pub mod alert;
pub mod auth;
pub mod autoscaling;
pub mod error;
pub mod events;
pub mod functions;
pub mod guard;
pub mod info;
pub mod invoke;
pub mod logs;
pub mod namespaces;
pub mod origin;
pub mod secrets;
pub mod ui;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::handler::Handler;
use axum::middleware;
use axum::response::IntoResponse;
use axum::routing::{any, MethodFilter, MethodRouter};
use axum::Router;
use http::{Method, StatusCode};

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
    /// Function statuses' spec parts, serialized once per deployed version.
    pub statuses: wire::StatusCache,
    pub webhook_limiter: governor::DefaultDirectRateLimiter,
}

/// Who may call a route; the builder applies the matching middleware, so the table cannot
/// claim a class the router does not enforce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// Basic auth (every `/system/*` route but the alert webhook, and the web UI at `/ui/`).
    System,
    /// Basic auth, or the `autoscale.alert_bearer_token_file` token (`/system/alert`).
    Alert,
    /// No credentials: invocation, health and metrics, as in OpenFaaS.
    Open,
}

/// What one method of a route does with the request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BodyKind {
    /// Not read.
    Ignored,
    /// A JSON object; a malformed or mistyped one is answered 400, naming the field.
    Json,
    /// Handed to the function as it is.
    Raw,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodInfo {
    pub method: Method,
    pub body: BodyKind,
}

/// One registered path, as `route_table` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteInfo {
    /// As registered: `{name}` matches one segment, `{*path}` the rest of the path.
    pub path: &'static str,
    pub access: Access,
    /// Every method with a handler (a GET handler also answers HEAD); any other method is
    /// answered 405 with an `Allow` header listing these (401 first, on a guarded route asked
    /// without credentials).
    pub methods: Vec<MethodInfo>,
    /// For routes whose bodies are buffered: the `limits.*` key bounding the body of each
    /// method that reads one (413 above it); such bodies must also arrive in full within the
    /// body timeout (408), see [`guard`]. `None`: the body, if any, streams to the function.
    pub body_limit: Option<&'static str>,
}

impl RouteInfo {
    pub fn allows(&self, method: &Method) -> bool {
        self.methods.iter().any(|m| m.method == method)
    }
}

/// The methods of one path: each handler is registered together with its table entry.
struct Methods {
    router: MethodRouter<Arc<AppState>>,
    info: Vec<MethodInfo>,
}

impl Methods {
    fn new() -> Self {
        Methods {
            router: MethodRouter::new(),
            info: Vec::new(),
        }
    }

    /// One handler for `methods`, which it checks itself (invocation passes any method through
    /// to the function and answers 405 for the others).
    fn any<H, T>(methods: &[Method], body: BodyKind, handler: H) -> Self
    where
        H: Handler<T, Arc<AppState>>,
        T: 'static,
    {
        Methods {
            router: any(handler),
            info: methods
                .iter()
                .map(|method| MethodInfo {
                    method: method.clone(),
                    body,
                })
                .collect(),
        }
    }

    fn on<H, T>(mut self, method: Method, body: BodyKind, handler: H) -> Self
    where
        H: Handler<T, Arc<AppState>>,
        T: 'static,
    {
        let filter = MethodFilter::try_from(method.clone()).expect("a standard method");
        self.router = self.router.on(filter, handler);
        let get = method == Method::GET;
        self.info.push(MethodInfo { method, body });
        if get {
            self.info.push(MethodInfo {
                method: Method::HEAD,
                body: BodyKind::Ignored,
            });
        }
        self
    }

    fn get<H: Handler<T, Arc<AppState>>, T: 'static>(self, handler: H) -> Self {
        self.on(Method::GET, BodyKind::Ignored, handler)
    }

    fn post<H: Handler<T, Arc<AppState>>, T: 'static>(self, body: BodyKind, handler: H) -> Self {
        self.on(Method::POST, body, handler)
    }

    fn put<H: Handler<T, Arc<AppState>>, T: 'static>(self, body: BodyKind, handler: H) -> Self {
        self.on(Method::PUT, body, handler)
    }

    fn delete<H: Handler<T, Arc<AppState>>, T: 'static>(self, body: BodyKind, handler: H) -> Self {
        self.on(Method::DELETE, body, handler)
    }
}

/// A group of routes sharing an access class and body bounds. Routes can only be added
/// through it, and it records each one, so the router and `route_table` cannot disagree.
struct Routes {
    access: Access,
    body: Option<guard::BodyPolicy>,
    router: Router<Arc<AppState>>,
    table: Vec<RouteInfo>,
}

impl Routes {
    fn new(access: Access) -> Self {
        Routes {
            access,
            body: None,
            router: Router::new(),
            table: Vec::new(),
        }
    }

    /// The group buffers bodies: at most `limit` bytes (`limit_key` in the config), arriving
    /// within `timeout`.
    fn buffered(mut self, limit_key: &'static str, limit: usize, timeout: Duration) -> Self {
        self.body = Some(guard::BodyPolicy {
            limit_key,
            limit,
            timeout,
        });
        self
    }

    fn route(mut self, path: &'static str, methods: Methods) -> Self {
        self.router = self.router.route(path, methods.router);
        self.table.push(RouteInfo {
            path,
            access: self.access,
            methods: methods.info,
            body_limit: self.body.map(|b| b.limit_key),
        });
        self
    }

    /// The group's router with its body bounds and access check; its routes join `table`.
    fn build(self, auth: &Arc<auth::Auth>, table: &mut Vec<RouteInfo>) -> Router<Arc<AppState>> {
        let mut router = self.router;
        if let Some(policy) = self.body {
            router = router
                .layer(DefaultBodyLimit::max(policy.limit))
                .route_layer(middleware::from_fn_with_state(policy, guard::guard_body));
        }
        router = match self.access {
            Access::System => router.route_layer(middleware::from_fn_with_state(
                auth.clone(),
                auth::require_basic,
            )),
            Access::Alert => router.route_layer(middleware::from_fn_with_state(
                auth.clone(),
                auth::require_alert,
            )),
            Access::Open => router,
        };
        if self.access != Access::Open {
            // Outermost: a cross-site state change is refused before credentials are looked
            // at, and errors are JSON for the clients that ask for it.
            router = router
                .route_layer(middleware::from_fn(origin::same_origin_only))
                .route_layer(middleware::from_fn(error::json_errors));
        }
        table.extend(self.table);
        router
    }
}

/// Every `/system/*` route; all of them require credentials when auth is on.
fn system_routes(limits: &LimitsConfig, timeout: Duration) -> Routes {
    use BodyKind::{Ignored, Json};
    Routes::new(Access::System)
        .buffered(
            "limits.max_system_body_bytes",
            limits.max_system_body_bytes,
            timeout,
        )
        .route(
            "/system/functions",
            Methods::new()
                .get(functions::list)
                .post(Json, functions::deploy)
                .put(Json, functions::update)
                .delete(Json, functions::remove),
        )
        .route(
            "/system/function/{name}",
            Methods::new().get(functions::status),
        )
        .route(
            "/system/scale-function/{name}",
            Methods::new().post(Json, functions::scale),
        )
        .route("/system/info", Methods::new().get(info::info))
        .route("/system/namespaces", Methods::new().get(namespaces::list))
        .route(
            "/system/namespace",
            Methods::new().post(Json, namespaces::create),
        )
        .route(
            "/system/namespace/",
            Methods::new().post(Json, namespaces::create),
        )
        .route(
            "/system/namespace/{name}",
            Methods::new()
                .get(namespaces::get)
                .put(Json, namespaces::update)
                .delete(Ignored, namespaces::delete),
        )
        .route(
            "/system/secrets",
            Methods::new()
                .get(secrets::list)
                .post(Json, secrets::create)
                .put(Json, secrets::update)
                .delete(Json, secrets::delete),
        )
        .route("/system/logs", Methods::new().get(logs::logs))
        .route("/system/scale-events", Methods::new().get(events::list))
        .route(
            "/system/trigger-events",
            Methods::new().get(events::triggers),
        )
        .route("/system/autoscaling", Methods::new().get(autoscaling::list))
        .route(
            "/system/autoscaling/pause",
            Methods::new().post(Json, autoscaling::pause),
        )
        .route(
            "/system/autoscaling/resume",
            Methods::new().post(Json, autoscaling::resume),
        )
        .route("/system/overview", Methods::new().get(info::overview))
}

/// The web UI: a page and its two assets, behind the same credentials as `/system/*`.
fn ui_routes() -> Routes {
    Routes::new(Access::System)
        .route("/ui", Methods::new().get(ui::redirect))
        .route("/ui/", Methods::new().get(ui::index))
        .route("/ui/{asset}", Methods::new().get(ui::asset))
}

/// Alertmanager's webhook: basic auth or the alert bearer token.
fn alert_routes(limits: &LimitsConfig, timeout: Duration) -> Routes {
    Routes::new(Access::Alert)
        .buffered(
            "limits.max_alert_body_bytes",
            limits.max_alert_body_bytes,
            timeout,
        )
        .route(
            "/system/alert",
            Methods::new().post(BodyKind::Json, alert::receive),
        )
}

/// Synchronous invocation: open, as in OpenFaaS; the body streams to the function (bounded by
/// `proxy.upstream_timeout_secs`).
fn invoke_routes() -> Routes {
    let sync = || Methods::any(crate::proxy::METHODS, BodyKind::Raw, invoke::sync);
    Routes::new(Access::Open)
        .route("/function/{name}", sync())
        .route("/function/{name}/", sync())
        .route("/function/{name}/{*path}", sync())
}

/// Asynchronous invocation: open; the body is queued, so it is buffered.
fn async_routes(limits: &LimitsConfig, timeout: Duration) -> Routes {
    let submit = || Methods::new().post(BodyKind::Raw, invoke::submit);
    Routes::new(Access::Open)
        .buffered(
            "limits.max_async_body_bytes",
            limits.max_async_body_bytes,
            timeout,
        )
        .route("/async-function/{name}", submit())
        .route("/async-function/{name}/", submit())
        .route("/async-function/{name}/{*path}", submit())
}

/// `/healthz` and `/metrics`, also served alone on the optional metrics listener.
fn monitoring() -> Routes {
    Routes::new(Access::Open)
        .route("/healthz", Methods::new().get(info::healthz))
        .route("/metrics", Methods::new().get(info::metrics))
}

/// `/healthz` and `/metrics` as a router of their own.
pub fn monitoring_routes() -> Router<Arc<AppState>> {
    monitoring().build(&auth::Auth::disabled(), &mut Vec::new())
}

/// Every route of the main listener, and its table; the one place routes are assembled.
fn assemble(
    limits: &LimitsConfig,
    auth: &Arc<auth::Auth>,
) -> (Router<Arc<AppState>>, Vec<RouteInfo>) {
    let timeout = limits.body_timeout;
    let mut table = Vec::new();
    let router = system_routes(limits, timeout)
        .build(auth, &mut table)
        .merge(alert_routes(limits, timeout).build(auth, &mut table))
        .merge(invoke_routes().build(auth, &mut table))
        .merge(async_routes(limits, timeout).build(auth, &mut table))
        .merge(monitoring().build(auth, &mut table))
        .merge(ui_routes().build(auth, &mut table));
    (router, table)
}

/// Every route `router` serves, with its methods, access class and body bounds, in
/// registration order.
pub fn route_table() -> Vec<RouteInfo> {
    let defaults = crate::config::Config::default();
    assemble(&defaults.limits, &auth::Auth::disabled()).1
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
    let (routes, _) = assemble(&state.limits, &auth);
    routes.fallback(not_found).with_state(state)
}

/// The router for the optional second listener (OpenFaaS serves metrics on port 8082).
pub fn monitoring_router(state: Arc<AppState>) -> Router {
    monitoring_routes().fallback(not_found).with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_table_lists_every_route_once_with_its_access() {
        let table = route_table();
        let mut paths: Vec<&str> = table.iter().map(|r| r.path).collect();
        paths.sort();
        paths.dedup();
        assert_eq!(paths.len(), table.len(), "a path is registered twice");
        for r in &table {
            assert!(!r.methods.is_empty(), "{} has no method", r.path);
            let expected = if r.path == "/system/alert" {
                Access::Alert
            } else if r.path.starts_with("/system/") || r.path.starts_with("/ui") {
                Access::System
            } else {
                Access::Open
            };
            assert_eq!(r.access, expected, "{}", r.path);
            if r.allows(&Method::GET) {
                assert!(r.allows(&Method::HEAD), "{}: GET also answers HEAD", r.path);
            }
            let reads_body = r.methods.iter().any(|m| m.body != BodyKind::Ignored);
            let streams = r.path.starts_with("/function/");
            if reads_body && !streams {
                assert!(r.body_limit.is_some(), "{}: a read body is bounded", r.path);
            }
        }
        let deploy = table
            .iter()
            .find(|r| r.path == "/system/functions")
            .unwrap();
        assert_eq!(deploy.body_limit, Some("limits.max_system_body_bytes"));
        let methods: Vec<&str> = deploy.methods.iter().map(|m| m.method.as_str()).collect();
        assert_eq!(methods, ["GET", "HEAD", "POST", "PUT", "DELETE"]);
        let invoke = table.iter().find(|r| r.path == "/function/{name}").unwrap();
        assert_eq!(invoke.methods.len(), crate::proxy::METHODS.len());
        assert_eq!(invoke.body_limit, None);
    }
}
