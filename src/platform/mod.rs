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
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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
    /// Requests currently being proxied to this replica (claims held: see `Claim`).
    pub in_flight: AtomicUsize,
    /// Set once the replica is being removed: no new claim succeeds (see `retire`).
    retired: AtomicBool,
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
            retired: AtomicBool::new(false),
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

    /// Refuses new claims and waits until the claims already held are released, or `timeout`
    /// passes: called once the replica is out of the routing table, before it is stopped.
    /// A request that picked it from an older snapshot either claimed it first (and is waited
    /// for) or finds it retired and picks another.
    pub async fn retire(&self, timeout: std::time::Duration) {
        self.retired.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + timeout;
        while self.in_flight.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }
}

/// A request's hold on a replica, from its pick until its answer's last byte (or until it is
/// dropped): counted in the replica's `in_flight`, which a replica being removed drains.
#[derive(Debug)]
pub struct Claim(Arc<Endpoint>);

impl Claim {
    /// The claim, unless the replica is retired. The count goes up before the retirement is
    /// looked at, and `retire` sets it before it looks at the count (both sequentially
    /// consistent): either this claim is seen by the drain, or the retirement by this claim.
    pub fn new(endpoint: &Arc<Endpoint>) -> Option<Claim> {
        endpoint.in_flight.fetch_add(1, Ordering::SeqCst);
        if endpoint.retired.load(Ordering::SeqCst) {
            endpoint.in_flight.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Claim(endpoint.clone()))
    }

    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.0
    }
}

impl std::ops::Deref for Claim {
    type Target = Endpoint;

    fn deref(&self) -> &Endpoint {
        &self.0
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
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

    /// Least-outstanding-requests choice among the replicas not being removed, claimed; ties
    /// go round robin from a rotating start. None when every replica of this snapshot is
    /// retired (a newer snapshot has the replicas that replace them).
    pub fn pick(&self) -> Option<Claim> {
        let n = self.endpoints.len();
        match n {
            0 => None,
            1 => Claim::new(&self.endpoints[0]),
            _ => {
                let start = self.cursor.fetch_add(1, Ordering::Relaxed) % n;
                let mut best: Option<(&Arc<Endpoint>, usize)> = None;
                for i in 0..n {
                    let candidate = &self.endpoints[(start + i) % n];
                    if candidate.is_retired() {
                        continue;
                    }
                    let load = candidate.in_flight.load(Ordering::Relaxed);
                    if best.is_none_or(|(_, l)| load < l) {
                        best = Some((candidate, load));
                    }
                }
                let (best, _) = best?;
                // Retired between the look and the claim: any other that is not.
                Claim::new(best).or_else(|| {
                    (0..n)
                        .map(|i| &self.endpoints[(start + i) % n])
                        .filter(|e| !Arc::ptr_eq(e, best) && !e.is_retired())
                        .find_map(Claim::new)
                })
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
    use std::time::Duration;

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

    #[test]
    fn a_claim_counts_until_dropped() {
        let s = set(2);
        let held = s.pick().unwrap();
        assert_eq!(held.in_flight.load(Ordering::SeqCst), 1);
        // The other is idle, so it is picked next.
        let other = s.pick().unwrap();
        assert_ne!(other.instance, held.instance);
        drop(held);
        drop(other);
        assert!(s.iter().all(|e| e.in_flight.load(Ordering::SeqCst) == 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_retired_replica_is_never_claimed_and_waits_for_its_claims() {
        let s = Arc::new(set(2));
        let held = Claim::new(&s.endpoints[0]).unwrap();
        let r0 = s.endpoints[0].clone();
        let retiring = tokio::spawn(async move {
            r0.retire(Duration::from_secs(30)).await;
            tokio::time::Instant::now()
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!retiring.is_finished(), "the held claim is waited for");
        // r0 is retired: every pick goes to r1, even though r0 would be its turn, and a pick
        // from a snapshot holding only r0 finds nothing.
        assert!(Claim::new(&s.endpoints[0]).is_none());
        for _ in 0..4 {
            assert_eq!(s.pick().unwrap().instance, "r1");
        }
        assert!(EndpointSet::new(vec![s.endpoints[0].clone()])
            .pick()
            .is_none());
        let released = tokio::time::Instant::now();
        drop(held);
        let done = retiring.await.unwrap();
        assert!(
            done - released < Duration::from_millis(50),
            "{:?}",
            done - released
        );
        // A retirement with no claim ends at once; one whose claims never end, at the timeout.
        let idle = Arc::new(Endpoint::new("idle".into(), "127.0.0.1:1".parse().unwrap()));
        let before = tokio::time::Instant::now();
        idle.retire(Duration::from_secs(30)).await;
        assert_eq!(tokio::time::Instant::now(), before);
        let stuck = Arc::new(Endpoint::new(
            "stuck".into(),
            "127.0.0.1:2".parse().unwrap(),
        ));
        let _forever = Claim::new(&stuck).unwrap();
        stuck.retire(Duration::from_secs(30)).await;
        assert!(tokio::time::Instant::now() - before >= Duration::from_secs(30));
    }

    /// The claim and the retirement race from two threads: whenever a claim succeeds, the
    /// retirement that ran beside it sees it (never a claim the drain missed).
    #[test]
    fn a_claim_racing_a_retirement_is_seen_or_refused() {
        for _ in 0..2000 {
            let e = Arc::new(Endpoint::new("r".into(), "127.0.0.1:1".parse().unwrap()));
            let barrier = Arc::new(std::sync::Barrier::new(2));
            let (e2, b2) = (e.clone(), barrier.clone());
            let claimer = std::thread::spawn(move || {
                b2.wait();
                Claim::new(&e2).map(std::mem::forget).is_some()
            });
            barrier.wait();
            e.retired.store(true, Ordering::SeqCst);
            let seen = e.in_flight.load(Ordering::SeqCst);
            let claimed = claimer.join().unwrap();
            if claimed {
                assert_eq!(seen, 1, "a claim the retirement did not see");
            }
        }
    }
}
