//! `faastastic agent`: runs one datacenter's platform (local processes) and exposes it to a
//! control plane's `remote` adapter over HTTP. Stateless: the control plane holds the desired
//! state, and its reconciler applies it again when an agent restarts.
//!
//! * `/agent/v1/functions[/{namespace}/{name}[/scale]]`: list, apply, scale, remove
//!   (`Authorization: Bearer TOKEN`);
//! * `/function/{name.namespace}/...`: invocations, proxied to one of the replicas
//!   (`X-Faastastic-Agent-Token: TOKEN`, so the caller's `Authorization` reaches the function);
//! * `/healthz`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post, put};
use axum::{Json, Router};
use base64::Engine;

use crate::config::LocalConfig;
use crate::model::{validate_dns_label, FunctionId};
use crate::platform::local::LocalPlatform;
use crate::platform::remote::wire::{AgentFunction, ApplyRequest, ScaleRequest};
use crate::platform::{Platform, Workload};
use crate::proxy::{http_client, send, GuardedBody, HttpClient, AGENT_TOKEN};
use crate::telemetry::Metrics;

pub struct AgentConfig {
    pub listen: SocketAddr,
    pub datacenter: String,
    /// `None`: no authentication (loopback experiments only).
    pub token: Option<String>,
    pub data_dir: PathBuf,
    pub local: LocalConfig,
    /// TLS on the listener; with a client CA, control planes must present a certificate it
    /// signed (mutual TLS).
    pub tls: Option<crate::tls::ListenerTls>,
}

struct Agent {
    platform: Arc<LocalPlatform>,
    token: Option<String>,
    client: HttpClient,
    timeout: std::time::Duration,
}

fn error(status: StatusCode, text: impl Into<String>) -> Response {
    (status, format!("{}\n", text.into())).into_response()
}

impl Agent {
    fn authorized(&self, headers: &axum::http::HeaderMap, bearer: bool) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let given = if bearer {
            headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
        } else {
            headers.get(AGENT_TOKEN).and_then(|v| v.to_str().ok())
        };
        given.is_some_and(|g| crate::api::auth::tokens_match(g.trim(), token))
    }
}

impl Agent {
    /// The function a control-plane call names, once the call is authorized.
    fn target(
        &self,
        headers: &axum::http::HeaderMap,
        namespace: &str,
        name: &str,
    ) -> Result<FunctionId, (StatusCode, String)> {
        if !self.authorized(headers, true) {
            return Err((
                StatusCode::UNAUTHORIZED,
                "a bearer token is required\n".into(),
            ));
        }
        validate_dns_label("name", name).map_err(|e| (StatusCode::BAD_REQUEST, e))?;
        validate_dns_label("namespace", namespace).map_err(|e| (StatusCode::BAD_REQUEST, e))?;
        Ok(FunctionId::new(name, namespace))
    }

    /// The function a control-plane call names and its JSON body (`what` names it in errors).
    fn target_and_body<T: serde::de::DeserializeOwned>(
        &self,
        headers: &axum::http::HeaderMap,
        (namespace, name): &(String, String),
        body: &[u8],
        what: &str,
    ) -> Result<(FunctionId, T), (StatusCode, String)> {
        let id = self.target(headers, namespace, name)?;
        let req = serde_json::from_slice(body).map_err(|e| {
            (
                StatusCode::BAD_REQUEST,
                format!("bad {what} request: {e}\n"),
            )
        })?;
        Ok((id, req))
    }
}

/// The answer to a platform call.
fn done(result: Result<(), crate::platform::PlatformError>) -> Response {
    match result {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn list(State(a): State<Arc<Agent>>, req: Request) -> Response {
    if !a.authorized(req.headers(), true) {
        return error(StatusCode::UNAUTHORIZED, "a bearer token is required");
    }
    let functions = match a.platform.list().await {
        Ok(f) => f,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let body: Vec<AgentFunction> = functions
        .into_iter()
        .map(|(id, desired)| {
            let table = a.platform.table();
            let condition = table.condition(&id).unwrap_or_default();
            AgentFunction {
                ready: table.replicas(&id).ready,
                reason: condition.reason,
                update: condition.update,
                namespace: id.namespace,
                name: id.name,
                desired,
            }
        })
        .collect();
    Json(body).into_response()
}

async fn apply(
    State(a): State<Arc<Agent>>,
    Path(path): Path<(String, String)>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    let (id, req): (FunctionId, ApplyRequest) =
        match a.target_and_body(&headers, &path, &body, "apply") {
            Ok(r) => r,
            Err(e) => return e.into_response(),
        };
    if let Err(e) = a.platform.validate(&req.deployment) {
        return error(StatusCode::BAD_REQUEST, e);
    }
    let mut secrets = Vec::new();
    for (secret, value) in req.secrets {
        match base64::engine::general_purpose::STANDARD.decode(value) {
            Ok(v) => secrets.push((secret, v)),
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("secret {secret}: bad base64: {e}"),
                )
            }
        }
    }
    let workload = Workload {
        id,
        deployment: req.deployment,
        secrets,
    };
    done(a.platform.apply(workload, req.replicas).await)
}

async fn scale(
    State(a): State<Arc<Agent>>,
    Path(path): Path<(String, String)>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    match a.target_and_body::<ScaleRequest>(&headers, &path, &body, "scale") {
        Ok((id, req)) => done(a.platform.scale(&id, req.replicas).await),
        Err(e) => e.into_response(),
    }
}

async fn remove(
    State(a): State<Arc<Agent>>,
    Path((namespace, name)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
) -> Response {
    match a.target(&headers, &namespace, &name) {
        Ok(id) => done(a.platform.remove(&id).await),
        Err(e) => e.into_response(),
    }
}

async fn invoke(State(a): State<Arc<Agent>>, req: Request) -> Response {
    if !a.authorized(req.headers(), false) {
        return error(StatusCode::UNAUTHORIZED, "the agent token is required");
    }
    let path = req.uri().path().to_string();
    let (qualified, suffix) = crate::proxy::split_path(&path, "/function/");
    let (name, namespace) = match crate::model::function_ref(qualified, None) {
        Ok(parts) => parts,
        Err(why) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("invalid function reference: {why} (use name or name.namespace)"),
            )
        }
    };
    let id = FunctionId::new(name, namespace.unwrap_or(crate::model::DEFAULT_NAMESPACE));
    // A snapshot read just before a scale-in's can hold only replicas being removed: the
    // table read again has those that stay.
    let pick = || a.platform.table().endpoints(&id).and_then(|set| set.pick());
    let Some(endpoint) = pick().or_else(pick) else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("No endpoints available for: {id}."),
        );
    };
    let path_and_query = match req.uri().query() {
        Some(q) => format!("{suffix}?{q}"),
        None => suffix.to_string(),
    };
    let uri = match Uri::builder()
        .scheme("http")
        .authority(endpoint.addr.to_string())
        .path_and_query(path_and_query)
        .build()
    {
        Ok(u) => u,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid path: {e}")),
    };
    let (mut parts, body) = req.into_parts();
    parts.headers.remove(AGENT_TOKEN);
    let req = Request::from_parts(parts, body);
    match send(&a.client, uri, req, Some(a.timeout)).await {
        Ok(resp) => {
            // The claim lives until the answer's body ends: a replica being removed waits.
            let (parts, body) = resp.into_parts();
            Response::from_parts(parts, Body::new(GuardedBody::new(body, endpoint)))
        }
        Err(e) => error(
            StatusCode::BAD_GATEWAY,
            format!("Can't reach service for: {id}: {e:?}"),
        ),
    }
}

/// The agent's HTTP surface around a platform.
fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "" }))
        .route("/agent/v1/functions", get(list))
        .route(
            "/agent/v1/functions/{namespace}/{name}",
            put(apply).delete(remove),
        )
        .route("/agent/v1/functions/{namespace}/{name}/scale", post(scale))
        .route("/function/{*rest}", any(invoke))
        .with_state(agent)
}

/// Runs the agent until SIGTERM or Ctrl-C, then stops its replicas.
pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    // Owner-only, as the gateway's: functions run as other users and must not look in.
    crate::server::create_data_dir(&cfg.data_dir)?;
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let platform = Arc::new(
        LocalPlatform::new(
            cfg.local.clone(),
            exe,
            cfg.data_dir.join("run"),
            &cfg.datacenter,
            Arc::new(Metrics::new()),
        )
        .context("cannot prepare the local platform")?,
    );
    let mutual = cfg.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
    match (&cfg.token, mutual) {
        (None, false) => {
            tracing::warn!("agent authentication is OFF: anyone who can reach this port can deploy")
        }
        (None, true) => tracing::info!("control planes are authenticated by mutual TLS only"),
        (Some(_), _) => {}
    }
    let acceptor = cfg.tls.as_ref().map(crate::tls::acceptor).transpose()?;
    let agent = Arc::new(Agent {
        platform: platform.clone(),
        token: cfg.token,
        client: http_client(std::time::Duration::from_secs(2), 128),
        timeout: cfg.local.exec_timeout + std::time::Duration::from_secs(5),
    });
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    println!(
        "faastastic agent for datacenter {} listening on {}://{}",
        cfg.datacenter,
        if acceptor.is_some() { "https" } else { "http" },
        listener.local_addr()?
    );
    crate::listener::serve(
        listener,
        router(agent),
        (&crate::config::Config::default().limits).into(),
        crate::listener::Lanes::invocations(0, None),
        acceptor,
        crate::listener::shutdown_signal(),
        crate::listener::DRAIN,
    )
    .await;
    platform.shutdown().await;
    Ok(())
}
