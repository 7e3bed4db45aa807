//! Platform adapters: each kind of datacenter (local processes, Docker, Swarm, remote agents)
//! implements [`Platform`]. The control plane only ever talks to this trait.

pub mod compliance;
pub mod docker;
pub mod fake;
pub mod isolation;
pub mod limits;
pub mod local;
pub mod logs;
pub mod remote;
pub mod swarm;
pub mod table;
pub mod watchdog;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;

use crate::model::{FunctionDeployment, FunctionId};
pub use logs::{LogMessage, LogQuery, LogSubscription};
pub use table::ReadyTable;

#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    #[error("{0}")]
    Unsupported(String),
    #[error("platform failure: {0}")]
    Failed(String),
    /// The datacenter did not answer, or its connection failed (TLS included): an upstream's
    /// failure, a 502 to the API's caller.
    #[error("datacenter unreachable: {0}")]
    Unreachable(String),
}

/// Runs `pass` every `every` for as long as `target` lives (an adapter's poll of its engine or
/// agent); a slow pass skips ticks rather than piling them up.
pub(crate) fn poll_while_alive<T, F, Fut>(
    target: std::sync::Weak<T>,
    every: std::time::Duration,
    mut pass: F,
) where
    T: Send + Sync + 'static,
    F: FnMut(Arc<T>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            let Some(t) = target.upgrade() else { return };
            pass(t).await;
        }
    });
}

/// One ready replica that can take requests.
#[derive(Debug)]
pub struct Endpoint {
    /// Stable identity of the replica (never reused), e.g. `figlet-3-1`.
    pub instance: String,
    pub addr: SocketAddr,
    /// `addr` as a URI authority, made once rather than on every request.
    pub authority: http::uri::Authority,
    /// Requests currently being proxied to this replica.
    pub in_flight: AtomicUsize,
    /// Prepended to the invocation's path (a remote datacenter's agent takes
    /// `/function/NAME.NS/...`); empty for a replica.
    pub path_prefix: String,
    /// Sent as `X-Faastastic-Agent-Token` (an agent's invoke token).
    pub agent_token: Option<http::HeaderValue>,
    /// Set for an agent served over TLS: the client that speaks it (its CA, certificate and
    /// server name), with its own pool. Such endpoints are reached by the general path.
    pub https: Option<Arc<HttpsClient>>,
    /// Set for a function's own server reached without its watchdog (a local http-mode
    /// replica): what the watchdog would have done on the way, done by faastastic.
    pub direct: Option<Direct>,
}

/// What faastastic does for a function's server it reaches directly, in the watchdog's stead.
#[derive(Debug, Clone, Copy)]
pub struct Direct {
    /// The function's `exec_timeout`: its answer's head must come within it (else 504).
    pub exec_timeout: Option<std::time::Duration>,
}

/// The header that carries how long a function took, added where its answer lacks it.
pub const DURATION_HEADER: &str = "x-duration-seconds";

/// `DURATION_HEADER`'s value for work that began at `since`: seconds, to the microsecond.
pub fn seconds_since(since: std::time::Instant) -> String {
    format!("{:.6}", since.elapsed().as_secs_f64())
}

/// A pooled HTTPS client for invocations to one TLS datacenter.
pub type HttpsClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    axum::body::Body,
>;

impl Endpoint {
    pub fn new(instance: String, addr: SocketAddr) -> Self {
        Self {
            instance,
            addr,
            authority: addr
                .to_string()
                .parse()
                .expect("a socket address is a valid authority"),
            in_flight: AtomicUsize::new(0),
            path_prefix: String::new(),
            agent_token: None,
            https: None,
            direct: None,
        }
    }

    /// How long its answer's head may take: the function's exec timeout for a function's
    /// server reached directly, when shorter than `proxy` (`proxy.upstream_timeout_secs`).
    pub fn timeout(&self, proxy: std::time::Duration) -> std::time::Duration {
        match self.direct.and_then(|d| d.exec_timeout) {
            Some(exec) => exec.min(proxy),
            None => proxy,
        }
    }
}

/// An immutable snapshot of a function's ready replicas. A new snapshot replaces the old one on
/// every change, so a removed replica is never picked again.
#[derive(Debug, Default)]
pub struct EndpointSet {
    endpoints: Vec<Arc<Endpoint>>,
    cursor: AtomicUsize,
}

impl EndpointSet {
    pub fn new(endpoints: Vec<Arc<Endpoint>>) -> Self {
        Self {
            endpoints,
            cursor: AtomicUsize::new(0),
        }
    }

    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Endpoint>> {
        self.endpoints.iter()
    }

    /// Least-outstanding-requests choice; ties go round robin from a rotating start.
    pub fn pick(&self) -> Option<Arc<Endpoint>> {
        let n = self.endpoints.len();
        match n {
            0 => None,
            1 => Some(self.endpoints[0].clone()),
            _ => {
                let start = self.cursor.fetch_add(1, Ordering::Relaxed) % n;
                let mut best = &self.endpoints[start];
                let mut best_load = best.in_flight.load(Ordering::Relaxed);
                for i in 1..n {
                    let candidate = &self.endpoints[(start + i) % n];
                    let load = candidate.in_flight.load(Ordering::Relaxed);
                    if load < best_load {
                        best = candidate;
                        best_load = load;
                    }
                }
                Some(best.clone())
            }
        }
    }
}

/// Replica counts of one function in one datacenter.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaCounts {
    pub desired: u64,
    pub ready: u64,
}

impl ReplicaCounts {
    pub fn starting(&self) -> u64 {
        self.desired.saturating_sub(self.ready)
    }
}

/// An update that has not taken over yet: the previous version still serves while the new
/// one has no ready replica.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rollout {
    /// Always false while reported: the new version is not serving.
    pub ready: bool,
    pub ready_replicas: u64,
    pub replicas: u64,
    /// Why, when the platform knows: the new version's last replica failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What a datacenter says of a function beyond its counts, when it says anything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Condition {
    /// An update whose new version is not ready yet.
    pub update: Option<Rollout>,
    /// Why a replica does not serve (its last exit, say), until it serves again.
    pub reason: Option<String>,
}

/// What a platform needs to run a function: its deployment and the values of its secrets.
#[derive(Debug, Clone)]
pub struct Workload {
    pub id: FunctionId,
    pub deployment: FunctionDeployment,
    pub secrets: Vec<(String, Vec<u8>)>,
}

/// A function's ready replicas on one platform, kept current by the platform.
pub trait ReadyGauge: Send + Sync {
    /// The count now, or `None` once the function is no longer deployed there (ask the
    /// platform again).
    fn ready(&self) -> Option<u64>;
}

/// What the control plane asks of a platform. Replica state (counts, endpoints, readiness, a
/// stalled update) is not asked of it: the platform publishes it into its [`ReadyTable`],
/// which serves it the same way for every platform.
#[async_trait]
pub trait Platform: Send + Sync {
    /// Short kind name shown in `/system/info` (`local`, `docker`, ...).
    fn kind(&self) -> &'static str;

    /// Rejects deployments this platform cannot run, naming what is missing.
    fn validate(&self, deployment: &FunctionDeployment) -> Result<(), String>;

    /// Rejects a replica count this platform cannot run for this deployment.
    fn validate_scale(
        &self,
        _deployment: &FunctionDeployment,
        _replicas: u64,
    ) -> Result<(), String> {
        Ok(())
    }

    /// Creates the function or rolls it to a new deployment, running `replicas` copies.
    async fn apply(&self, workload: Workload, replicas: u64) -> Result<(), PlatformError>;

    /// Changes the replica count of a deployed function.
    async fn scale(&self, id: &FunctionId, replicas: u64) -> Result<(), PlatformError>;

    /// Stops every replica; once this returns no request is routed to them. Removing a
    /// function the platform does not run succeeds.
    async fn remove(&self, id: &FunctionId) -> Result<(), PlatformError>;

    /// Every function this platform runs, with the replicas it was asked for: what the
    /// reconciler compares with the desired state.
    async fn list(&self) -> Result<Vec<(FunctionId, u64)>, PlatformError> {
        Ok(self.table().desired())
    }

    /// Whether the platform can take changes now (its engine or agent answers).
    async fn healthcheck(&self) -> Result<(), PlatformError>;

    /// The table this platform publishes its functions' replicas into.
    fn table(&self) -> &ReadyTable;

    /// Buffered log lines plus, when following, new ones as they arrive; `None`: this
    /// platform keeps no logs of the function here.
    fn logs(&self, _id: &FunctionId, _query: &LogQuery) -> Option<LogSubscription> {
        None
    }

    /// Stops everything this platform started (on shutdown).
    async fn shutdown(&self);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(n: usize) -> EndpointSet {
        EndpointSet::new(
            (0..n)
                .map(|i| {
                    Arc::new(Endpoint::new(
                        format!("r{i}"),
                        SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16)),
                    ))
                })
                .collect(),
        )
    }

    #[test]
    fn picks_round_robin_when_idle() {
        let s = set(3);
        let picked: Vec<_> = (0..6).map(|_| s.pick().unwrap().instance.clone()).collect();
        assert_eq!(picked, ["r0", "r1", "r2", "r0", "r1", "r2"]);
        assert!(set(0).pick().is_none());
    }

    #[test]
    fn prefers_least_outstanding() {
        let s = set(3);
        s.endpoints[0].in_flight.store(5, Ordering::Relaxed);
        s.endpoints[2].in_flight.store(1, Ordering::Relaxed);
        for _ in 0..4 {
            assert_eq!(s.pick().unwrap().instance, "r1");
        }
    }
}
