//! The `remote` platform: a datacenter run by `faastastic agent` elsewhere, reached over HTTP
//! with a bearer token. Deploy, scale and remove are agent calls; replica counts come from a
//! snapshot of the agent's state refreshed every `POLL` (and after every change), so the
//! synchronous trait methods never wait on the network. Invocations for the datacenter go
//! through the agent, which picks one of its replicas.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use base64::Engine;
use serde::{Deserialize, Serialize};

use super::{Endpoint, EndpointSet, Platform, PlatformError, ReadyTable, Workload};
use crate::model::{FunctionDeployment, FunctionId};

/// How often the agent's state is read.
const POLL: Duration = Duration::from_millis(500);

/// The agent's API, shared with `crate::agent`.
pub mod wire {
    use super::*;

    /// One function as the agent reports it.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct AgentFunction {
        pub namespace: String,
        pub name: String,
        pub desired: u64,
        pub ready: u64,
        /// Why a replica does not serve (its last exit), as the agent's platform says.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub reason: Option<String>,
        /// An update whose new version is not serving yet.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub update: Option<crate::platform::Rollout>,
    }

    #[derive(Debug, Serialize, Deserialize)]
    pub struct ApplyRequest {
        pub deployment: FunctionDeployment,
        pub replicas: u64,
        /// (name, base64 value)
        pub secrets: Vec<(String, String)>,
    }

    #[derive(Debug, Serialize, Deserialize)]
    pub struct ScaleRequest {
        pub replicas: u64,
    }
}

pub struct RemotePlatform {
    base: String,
    addr: SocketAddr,
    /// For an `https://` agent: the invocations' client.
    https: Option<Arc<super::HttpsClient>>,
    token: Option<String>,
    http: reqwest::Client,
    table: ReadyTable,
    /// Set when the last read of the agent failed (logged once per outage).
    down: std::sync::atomic::AtomicBool,
}

impl RemotePlatform {
    /// Starts polling the agent at `url` (`http://host:port`, or `https://` with `tls`);
    /// `token_file` holds its token.
    pub fn new(
        url: &str,
        token_file: Option<&Path>,
        tls: &crate::tls::ClientTls,
        timeout: Duration,
    ) -> anyhow::Result<Arc<RemotePlatform>> {
        let parsed = reqwest::Url::parse(url)?;
        let host = parsed
            .host_str()
            .ok_or_else(|| anyhow::anyhow!("{url} has no host"))?;
        let port = parsed.port_or_known_default().unwrap_or(80);
        let addr = (host, port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| anyhow::anyhow!("{url}: the host does not resolve"))?;
        let token = match token_file {
            Some(path) => {
                let t = std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?
                    .trim()
                    .to_string();
                anyhow::ensure!(!t.is_empty(), "{} is empty", path.display());
                Some(t)
            }
            None => None,
        };
        let mut http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(CONNECT_TIMEOUT);
        let mut base = url.trim_end_matches('/').to_string();
        anyhow::ensure!(
            parsed.scheme() == "https" || *tls == crate::tls::ClientTls::default(),
            "{url}: ca_file, cert_file, key_file and server_name need an https:// URL"
        );
        let https = match parsed.scheme() {
            "https" => {
                let config = tls
                    .config()
                    .with_context(|| format!("TLS to the agent at {url}"))?;
                let name = tls.name_for(host)?;
                // The control calls check the certificate against `server_name` too: the URL
                // names it, and it resolves to the agent's address.
                if let Some(server_name) = &tls.server_name {
                    let mut named = parsed.clone();
                    named
                        .set_host(Some(server_name))
                        .map_err(|e| anyhow::anyhow!("server_name {server_name:?}: {e}"))?;
                    base = named.as_str().trim_end_matches('/').to_string();
                    http = http.resolve(server_name, addr);
                }
                http = http.use_preconfigured_tls(config.clone());
                let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
                connector.set_nodelay(true);
                connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
                connector.enforce_http(false);
                let https = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config(config)
                    .https_only()
                    .with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name))
                    .enable_http1()
                    .wrap_connector(connector);
                Some(Arc::new(
                    hyper_util::client::legacy::Client::builder(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .pool_idle_timeout(POOL_IDLE_TIMEOUT)
                    .pool_max_idle_per_host(POOL_MAX_IDLE)
                    .pool_timer(hyper_util::rt::TokioTimer::new())
                    .build(https),
                ))
            }
            _ => None,
        };
        let platform = Arc::new(RemotePlatform {
            base,
            addr,
            https,
            token,
            http: http.build()?,
            table: ReadyTable::default(),
            down: std::sync::atomic::AtomicBool::new(false),
        });
        spawn_poller(Arc::downgrade(&platform));
        Ok(platform)
    }

    fn url(&self, id: Option<&FunctionId>, tail: &str) -> String {
        match id {
            Some(id) => format!(
                "{}/agent/v1/functions/{}/{}{tail}",
                self.base, id.namespace, id.name
            ),
            None => format!("{}/agent/v1/functions{tail}", self.base),
        }
    }

    fn request(&self, method: reqwest::Method, url: String) -> reqwest::RequestBuilder {
        let r = self.http.request(method, url);
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    async fn send(&self, r: reqwest::RequestBuilder) -> Result<reqwest::Response, PlatformError> {
        let response = r.send().await.map_err(|e| {
            let chain = crate::error_chain(&e);
            PlatformError::Unreachable(format!(
                "agent {} unreachable: {chain}{}",
                self.base,
                tls_hint(&chain)
            ))
        })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        Err(PlatformError::Failed(format!(
            "agent {} answered {status}: {}",
            self.base,
            text.trim()
        )))
    }

    /// Reads the agent's functions and refreshes the snapshot.
    async fn refresh(&self) -> Result<Vec<wire::AgentFunction>, PlatformError> {
        let list: Vec<wire::AgentFunction> = self
            .send(self.request(reqwest::Method::GET, self.url(None, "")))
            .await?
            .json()
            .await
            .map_err(|e| PlatformError::Failed(format!("agent {}: bad answer: {e}", self.base)))?;
        let mut seen = std::collections::HashSet::new();
        for f in &list {
            let id = FunctionId::new(&f.name, &f.namespace);
            let row = self.table.row(&id);
            // The agent's endpoint is kept while the counts stand, so that its in-flight
            // count survives a poll.
            if row.counts().ready != f.ready {
                row.set_endpoints(Arc::new(self.endpoint_set(&id, f.ready)), f.ready);
            }
            row.set_desired(f.desired);
            row.set_reason(f.reason.as_deref());
            row.set_rollout(f.update.clone());
            seen.insert(id);
        }
        // A row a request waits on stays: the agent may not list the function yet.
        self.table
            .retain(|id, row| seen.contains(id) || row.awaited());
        Ok(list)
    }

    /// The agent as one endpoint for the function while it has ready replicas.
    fn endpoint_set(&self, id: &FunctionId, ready: u64) -> EndpointSet {
        if ready == 0 {
            return EndpointSet::default();
        }
        let mut e = Endpoint::new(format!("agent:{}", self.base), self.addr);
        e.path_prefix = format!("/function/{}", id.qualified());
        e.agent_token = self
            .token
            .as_deref()
            .and_then(|t| http::HeaderValue::from_str(t).ok());
        e.https = self.https.clone();
        EndpointSet::new(vec![Arc::new(e)])
    }

    async fn after_change(&self) {
        if let Err(e) = self.refresh().await {
            tracing::debug!(error = %e, "agent state not refreshed after a change");
        }
    }
}

/// Which side refused a TLS handshake, and what to check, from the alert the agent sent or
/// what this side found wrong with the agent's certificate.
fn tls_hint(chain: &str) -> &'static str {
    const CLIENT: &str = " (the agent refused this control plane's client certificate: check cert_file and key_file against the agent's --client-ca)";
    let hints = [
        ("alert: UnknownCA", CLIENT),
        ("alert: BadCertificate", CLIENT),
        ("alert: CertificateRequired", CLIENT),
        ("alert: AccessDenied", CLIENT),
        ("alert: CertificateExpired", " (the agent says this control plane's client certificate has expired: renew cert_file)"),
        ("received fatal alert", " (the agent ended the TLS handshake: see its log for why)"),
        ("not valid for name", " (the agent's certificate does not carry the name checked: set server_name to one it carries)"),
        ("certificate expired", " (the agent's certificate has expired: renew it on the agent)"),
        ("UnknownIssuer", " (this control plane does not trust the agent's certificate: set ca_file to the CA that signed it)"),
        ("invalid peer certificate", " (this control plane refused the agent's certificate: check ca_file and server_name)"),
    ];
    hints
        .iter()
        .find(|(found, _)| chain.contains(found))
        .map_or("", |(_, hint)| hint)
}

/// How long a connection to the agent may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an idle invocation connection to a TLS agent is kept: less than the agent's own
/// idle limit (60 s), so a pooled connection is not reused just as the agent closes it.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(50);
/// Idle invocation connections kept to a TLS agent.
const POOL_MAX_IDLE: usize = 64;

fn spawn_poller(platform: Weak<RemotePlatform>) {
    super::poll_while_alive(platform, POLL, |p| async move {
        let result = p.refresh().await;
        let was_down = p
            .down
            .swap(result.is_err(), std::sync::atomic::Ordering::Relaxed);
        match result {
            Err(e) if !was_down => {
                tracing::warn!(agent = %p.base, error = %e, "agent unavailable")
            }
            Ok(_) if was_down => tracing::info!(agent = %p.base, "agent answers again"),
            _ => {}
        }
    });
}

#[async_trait]
impl Platform for RemotePlatform {
    fn kind(&self) -> &'static str {
        "remote"
    }

    /// The agent validates on apply; here only what no platform can run.
    fn validate(&self, _deployment: &FunctionDeployment) -> Result<(), String> {
        Ok(())
    }

    async fn apply(&self, workload: Workload, replicas: u64) -> Result<(), PlatformError> {
        let body = wire::ApplyRequest {
            deployment: workload.deployment,
            replicas,
            secrets: workload
                .secrets
                .into_iter()
                .map(|(name, value)| {
                    (
                        name,
                        base64::engine::general_purpose::STANDARD.encode(value),
                    )
                })
                .collect(),
        };
        self.send(
            self.request(reqwest::Method::PUT, self.url(Some(&workload.id), ""))
                .json(&body),
        )
        .await?;
        self.after_change().await;
        Ok(())
    }

    async fn scale(&self, id: &FunctionId, replicas: u64) -> Result<(), PlatformError> {
        self.send(
            self.request(reqwest::Method::POST, self.url(Some(id), "/scale"))
                .json(&wire::ScaleRequest { replicas }),
        )
        .await?;
        self.after_change().await;
        Ok(())
    }

    async fn remove(&self, id: &FunctionId) -> Result<(), PlatformError> {
        self.send(self.request(reqwest::Method::DELETE, self.url(Some(id), "")))
            .await?;
        self.table.remove(id);
        Ok(())
    }

    async fn list(&self) -> Result<Vec<(FunctionId, u64)>, PlatformError> {
        Ok(self
            .refresh()
            .await?
            .into_iter()
            .map(|f| (FunctionId::new(f.name, f.namespace), f.desired))
            .collect())
    }

    /// The agent's own health endpoint (its function list is read by `list` and the poller).
    async fn healthcheck(&self) -> Result<(), PlatformError> {
        let url = format!("{}/healthz", self.base);
        self.send(self.http.get(url)).await.map(|_| ())
    }

    fn table(&self) -> &ReadyTable {
        &self.table
    }

    /// The agent keeps running its replicas when the control plane stops.
    async fn shutdown(&self) {}
}
