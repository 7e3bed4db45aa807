//! The control plane's desired state: functions (placed in datacenters, with replicas per
//! datacenter), namespaces and secrets, kept in the store and converged onto each datacenter's
//! platform. Handlers call one method here per request. Operations on several datacenters run
//! concurrently, each with its own timeout and rate limit: when all fail nothing changes; when
//! some fail, what succeeded stays, the error names the failed ones, and the reconciler
//! converges them when they answer again.
//!
//! By concern: this file holds the types, the in-memory map and its reads; `deploy.rs` deploys,
//! updates and removes; `scale.rs` changes replica counts (for the engine); `reconcile.rs`
//! converges each datacenter; `namespaces.rs` keeps namespaces and secrets.

mod deploy;
mod follow;
mod namespaces;
mod reconcile;
mod scale;

pub use scale::Scaled;

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use base64::Engine;
use chrono::Utc;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{watch, Mutex};

use crate::autoscale::policy::Policy;
use crate::config::{AutoscaleConfig, Placement};
use crate::events::ScaleEvent;
use crate::model::{
    truncate_for_message, validate_dns_label, validate_secret_name, Function, FunctionDeployment,
    FunctionId, FunctionMap, Namespace, LABEL_DATACENTERS,
};
use crate::platform::{
    Condition, EndpointSet, Platform, PlatformError, ReadyGauge, ReplicaCounts, Workload,
};
use crate::store::{Decision, SecretRecord, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The request is wrong; each entry names a field.
    #[error("{}", .0.join("; "))]
    Invalid(Vec<String>),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Platform(#[from] PlatformError),
    /// Some datacenters did it and some failed: what succeeded stays, the reconciler retries
    /// the rest.
    #[error("{0}")]
    Partial(String),
}

impl FleetError {
    fn invalid(msg: impl Into<String>) -> Self {
        FleetError::Invalid(vec![msg.into()])
    }
}

/// A function with its live replica counts.
#[derive(Debug, Clone)]
pub struct FunctionView {
    pub function: Arc<Function>,
    /// Totals across the datacenters in `datacenters`.
    pub replicas: ReplicaCounts,
    /// Per datacenter: desired (the control plane's) and ready (the platform's).
    pub datacenters: Vec<(Arc<str>, ReplicaCounts)>,
}

/// A secret as clients send it: `rawValue` (base64 bytes) wins over `value` when non-empty.
#[derive(Debug, Clone, Default)]
pub struct SecretInput {
    pub name: String,
    pub namespace: Option<String>,
    pub value: Option<String>,
    pub raw_value: Option<String>,
}

/// One datacenter: a name and the platform that runs its functions, called with a timeout and
/// a rate limit of its own so a slow datacenter never holds up the others.
pub struct Datacenter {
    pub name: String,
    /// The name again, shared by every function view instead of copied into each.
    shared_name: Arc<str>,
    pub platform: Arc<dyn Platform>,
    timeout: Duration,
    limiter: DefaultDirectRateLimiter,
    /// The platform's last healthcheck (the reconciler asks at every pass): 1 answered, 0 did
    /// not, -1 not asked yet.
    up: std::sync::atomic::AtomicI64,
}

impl Datacenter {
    pub fn new(
        name: &str,
        platform: Arc<dyn Platform>,
        timeout: Duration,
        rate_per_sec: u32,
    ) -> Self {
        let rate = NonZeroU32::new(rate_per_sec.max(1)).expect("max(1) is non-zero");
        Datacenter {
            name: name.to_string(),
            shared_name: name.into(),
            platform,
            timeout,
            limiter: RateLimiter::direct(Quota::per_second(rate)),
            up: std::sync::atomic::AtomicI64::new(-1),
        }
    }

    /// 1 when the platform answered its last healthcheck, 0 when not, -1 before the first.
    pub fn up(&self) -> i64 {
        self.up.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Asks the platform whether it can take changes, and remembers the answer.
    pub async fn healthcheck(&self) -> Result<(), PlatformError> {
        let result = self.call(self.platform.healthcheck()).await;
        self.up.store(
            i64::from(result.is_ok()),
            std::sync::atomic::Ordering::Relaxed,
        );
        result
    }

    /// One platform call, rate-limited and bounded by this datacenter's timeout.
    async fn call<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, PlatformError>>,
    ) -> Result<T, PlatformError> {
        self.limiter.until_ready().await;
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result,
            Err(_) => {
                let why = format!("no answer within {:?}", self.timeout);
                // A remote datacenter that does not answer is an upstream's failure; a
                // local engine that is slow (an image pull) is this server's.
                Err(match self.platform.kind() {
                    "remote" => PlatformError::Unreachable(why),
                    _ => PlatformError::Failed(why),
                })
            }
        }
    }
}

/// Results of one operation fanned out to several datacenters.
struct FanOut(Vec<(String, Result<(), PlatformError>)>);

impl FanOut {
    fn succeeded(&self) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(_, r)| r.is_ok())
            .map(|(dc, _)| dc.as_str())
            .collect()
    }

    fn failures(&self) -> Vec<String> {
        self.0
            .iter()
            .filter_map(|(dc, r)| r.as_ref().err().map(|e| format!("{dc}: {e}")))
            .collect()
    }

    /// `Ok` when every datacenter succeeded; `Platform` when all failed; `Partial` otherwise.
    fn into_result(self, what: &str) -> Result<(), FleetError> {
        let failures = self.failures();
        if failures.is_empty() {
            return Ok(());
        }
        let done = self.succeeded();
        if done.is_empty() {
            let text = format!("{what} failed in {}", failures.join("; "));
            let unreachable = self
                .0
                .iter()
                .all(|(_, r)| matches!(r, Err(PlatformError::Unreachable(_))));
            return Err(FleetError::Platform(match unreachable {
                true => PlatformError::Unreachable(text),
                false => PlatformError::Failed(text),
            }));
        }
        Err(FleetError::Partial(format!(
            "{what} done in {}; failed in {}; the failed datacenters are retried in the background",
            done.join(", "),
            failures.join("; ")
        )))
    }

    fn all_failed(&self) -> bool {
        !self.0.is_empty() && self.0.iter().all(|(_, r)| r.is_err())
    }
}

/// What a scale does with its new desired count when every platform call fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// An engine decision: undone with its event, for its source to retry.
    Undo,
    /// An operator's count: kept, for the reconciler to converge.
    Keep,
}

pub struct Fleet {
    store: Store,
    datacenters: Vec<Arc<Datacenter>>,
    home: String,
    placement: Placement,
    default_namespace: String,
    max_replicas: u64,
    /// The autoscale defaults and policies: a function's min (its initial count, what an
    /// update raises it to) comes from them as the engine reads it.
    autoscale: Arc<AutoscaleConfig>,
    /// Shared so that a view (status, list) costs a reference count, not a copy of the spec.
    functions: RwLock<FunctionMap<Placed>>,
    namespaces: RwLock<BTreeMap<String, Namespace>>,
    /// The deployment each datacenter last accepted for each function (a hash of it), so the
    /// reconciler knows which ones missed an update.
    applied: std::sync::Mutex<HashMap<(FunctionId, String), u64>>,
    /// Serialises mutations so that store and platforms see them in one order; a scale holds
    /// it only around its store writes, not across its platform calls.
    write: Mutex<()>,
    /// One lock per function and datacenter, held by a change of that count for its whole
    /// length (platform call included), taken before `write`: scales of different
    /// datacenters and functions run at once, and a slow datacenter holds up only its own.
    count_locks: std::sync::Mutex<HashMap<(FunctionId, String), CountLock>>,
    /// Whether this instance runs the loops that must run once (always, on a store of its own).
    leader: Arc<crate::store::Leader>,
    /// How many times this instance changed each function's record in memory: a read of
    /// another instance's change is applied only if none happened while it was read.
    generations: std::sync::Mutex<HashMap<FunctionId, u64>>,
    /// Held while a stored record is compared and taken into memory (a follower's check and
    /// its take are one step, which a locked change's own take cannot come between).
    taking: std::sync::Mutex<()>,
}

/// The lock of one function's count in one datacenter.
type CountLock = Arc<Mutex<()>>;

/// A function in the fleet's map, with what a view of it needs per datacenter laid out next
/// to it: the function list reads every function's counts in every datacenter, and following
/// the record's datacenter keys and a lookup in each platform's own map cost most of its time
/// (memory latency, at 10,000 functions).
struct Placed {
    function: Arc<Function>,
    /// One per datacenter in `function.replicas`, in its order.
    slots: Box<[Slot]>,
    /// Its scaling policy, worked out from its labels and the autoscale settings when this
    /// version of its spec was stored: decisions do not parse labels again.
    policy: Arc<PolicyOf>,
}

/// A function's scaling policy and whether it is in shadow mode, or what is wrong with its
/// labels.
pub type PolicyOf = Result<(Policy, bool), Vec<String>>;

struct Slot {
    /// The datacenter's shared name.
    name: Arc<str>,
    /// Its index in `Fleet::datacenters` (`None`: not configured, nothing runs there).
    index: Option<usize>,
    desired: u64,
    /// The platform's ready gauge for the function, taken at the first read.
    gauge: OnceLock<Option<Arc<dyn ReadyGauge>>>,
}

impl Placed {
    fn new(
        function: Arc<Function>,
        datacenters: &[Arc<Datacenter>],
        policy: Arc<PolicyOf>,
    ) -> Self {
        let slots = function
            .replicas
            .iter()
            .map(|(dc, desired)| {
                let index = datacenters.iter().position(|d| d.name == *dc);
                Slot {
                    name: index.map_or_else(
                        || dc.as_str().into(),
                        |i| datacenters[i].shared_name.clone(),
                    ),
                    index,
                    desired: *desired,
                    gauge: OnceLock::new(),
                }
            })
            .collect();
        Placed {
            function,
            slots,
            policy,
        }
    }

    /// The same function with other desired counts (and datacenters); gauges already taken
    /// for datacenters it stays in are kept.
    fn with_replicas(
        &self,
        replicas: BTreeMap<String, u64>,
        datacenters: &[Arc<Datacenter>],
    ) -> Self {
        let mut function = Function::clone(&self.function);
        function.replicas = replicas;
        let mut placed = Placed::new(Arc::new(function), datacenters, self.policy.clone());
        for slot in placed.slots.iter_mut() {
            if let Some(old) = self
                .slots
                .iter()
                .find(|old| old.index.is_some() && old.index == slot.index)
            {
                slot.gauge = old.gauge.clone();
            }
        }
        placed
    }

    /// Ready replicas in one of its datacenters: from the platform's gauge while that is live,
    /// else asked of the platform (one without gauges, or the function was removed there since).
    fn ready(&self, slot: &Slot, datacenters: &[Arc<Datacenter>]) -> u64 {
        let Some(datacenter) = slot.index.map(|i| &datacenters[i]) else {
            return 0;
        };
        let id = &self.function.id;
        let gauge = slot
            .gauge
            .get_or_init(|| datacenter.platform.table().ready_gauge(id));
        gauge
            .as_ref()
            .and_then(|g| g.ready())
            .unwrap_or_else(|| datacenter.platform.table().replicas(id).ready)
    }
}

impl std::ops::Deref for Placed {
    type Target = Arc<Function>;

    fn deref(&self) -> &Arc<Function> {
        &self.function
    }
}

fn spec_hash(dep: &FunctionDeployment) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(dep).unwrap_or_default().hash(&mut h);
    h.finish()
}

/// A deployment without what only chooses datacenters, to compare two deployments' specs
/// (empty lists and maps as absent, so a spec deployed with no constraints compares equal to
/// the same spec with a datacenter constraint).
fn without_placement(dep: &FunctionDeployment) -> FunctionDeployment {
    let mut d = dep.clone();
    d.constraints = d
        .constraints
        .map(|c| {
            c.into_iter()
                .filter(|c| datacenter_constraint(c).is_none())
                .collect::<Vec<_>>()
        })
        .filter(|c| !c.is_empty());
    if let Some(labels) = d.labels.as_mut() {
        labels.remove(LABEL_DATACENTERS);
    }
    d.labels = d.labels.filter(|l| !l.is_empty());
    d
}

/// `dep` placed in exactly `datacenters`, written as one `datacenter==NAME` constraint each
/// (which the placement reads as a union), so the listed constraints say where it runs.
fn with_placement<'a>(
    dep: &FunctionDeployment,
    datacenters: impl Iterator<Item = &'a String>,
) -> FunctionDeployment {
    let mut d = without_placement(dep);
    let mut constraints = d.constraints.take().unwrap_or_default();
    constraints.extend(datacenters.map(|dc| format!("datacenter=={dc}")));
    d.constraints = Some(constraints);
    if d.labels.is_none() && dep.labels.is_some() {
        d.labels = Some(Default::default());
    }
    d
}

/// `datacenter==lon` → (true, "lon"); `datacenter != syd` → (false, "syd"); anything else (for
/// the platform) → `None`.
fn datacenter_constraint(c: &str) -> Option<(bool, &str)> {
    let rest = c.trim().strip_prefix("datacenter")?.trim_start();
    let (equal, name) = if let Some(n) = rest.strip_prefix("==") {
        (true, n)
    } else if let Some(n) = rest.strip_prefix("!=") {
        (false, n)
    } else {
        return None;
    };
    Some((equal, name.trim()))
}

impl Fleet {
    /// Loads the stored state and brings every function's replicas back in every datacenter.
    pub async fn restore(
        store: Store,
        datacenters: Vec<Arc<Datacenter>>,
        home: &str,
        placement: Placement,
        default_namespace: &str,
        max_replicas: u64,
        autoscale: Arc<AutoscaleConfig>,
    ) -> Result<Fleet, FleetError> {
        let mut namespaces: BTreeMap<String, Namespace> = store
            .load_namespaces()
            .await?
            .into_iter()
            .map(|ns| (ns.name.clone(), ns))
            .collect();
        if !namespaces.contains_key(default_namespace) {
            let ns = default_namespace_record(default_namespace);
            store.put_namespace(&ns).await?;
            namespaces.insert(ns.name.clone(), ns);
        }
        let fleet = Fleet {
            store,
            datacenters,
            home: home.to_string(),
            placement,
            default_namespace: default_namespace.to_string(),
            max_replicas,
            autoscale,
            functions: RwLock::new(FunctionMap::default()),
            namespaces: RwLock::new(namespaces),
            applied: std::sync::Mutex::new(HashMap::new()),
            write: Mutex::new(()),
            count_locks: std::sync::Mutex::new(HashMap::new()),
            leader: crate::store::Leader::sole(),
            generations: std::sync::Mutex::new(HashMap::new()),
            taking: std::sync::Mutex::new(()),
        };
        // On a shared store the platforms are the leader's to converge (its reconciler does,
        // as soon as it leads): an instance starting beside others changes nothing there.
        let converge = !fleet.store.shared();
        for mut function in fleet.store.load_functions(home).await? {
            // A datacenter no longer configured: its replicas move home.
            let gone: Vec<String> = function
                .replicas
                .keys()
                .filter(|dc| fleet.datacenter(dc).is_none())
                .cloned()
                .collect();
            for dc in gone {
                let n = function.replicas.remove(&dc).unwrap_or(0);
                tracing::warn!(function = %function.id, datacenter = %dc, "datacenter no longer configured; its replicas move to {home}");
                let at_home = function.replicas.entry(home.to_string()).or_insert(0);
                let from = *at_home;
                *at_home = from.max(n);
                let event = ScaleEvent::change(
                    &function.id,
                    home,
                    chrono::Utc::now(),
                    "restore",
                    (from, *at_home),
                    format!(
                        "datacenter {dc} is no longer configured: its {n} replicas move to {home}: {from} -> {}",
                        *at_home
                    ),
                    "datacenter_gone",
                    serde_json::json!({"datacenter": dc, "replicas": n}),
                );
                // Stored, so that the move is made (and recorded) once; recorded when the
                // count at home changes.
                let stored = fleet
                    .store
                    .set_desired_replicas(&function.id, &function.replicas)
                    .await;
                let recorded = match stored {
                    Ok(()) if event.from == event.to => Ok(()),
                    Ok(()) => fleet.store.record_change(&event).await.map(|_| ()),
                    Err(e) => Err(e),
                };
                if let Err(e) = recorded {
                    tracing::error!(function = %function.id, error = %e, "cannot record the move home");
                }
            }
            if !converge {
                let hash = spec_hash(&function.deployment);
                for dc in function.replicas.keys() {
                    fleet.applied_set(&function.id, dc, Some(hash));
                }
                fleet.put_function(function);
                continue;
            }
            match fleet.workload(&function.id, &function.deployment).await {
                Ok(w) => {
                    let dcs: Vec<(String, u64)> = function
                        .replicas
                        .iter()
                        .map(|(d, n)| (d.clone(), *n))
                        .collect();
                    let result = fleet.apply_in(&w, &dcs).await;
                    for failure in result.failures() {
                        tracing::error!(function = %function.id, "cannot restore function in {failure}; the reconciler retries");
                    }
                }
                Err(e) => {
                    tracing::error!(function = %function.id, error = %e, "cannot restore function")
                }
            }
            fleet.put_function(function);
        }
        Ok(fleet)
    }

    pub fn default_namespace(&self) -> &str {
        &self.default_namespace
    }

    /// The same fleet, whose leader-only loops follow `leader`.
    pub fn with_leader(mut self, leader: Arc<crate::store::Leader>) -> Fleet {
        self.leader = leader;
        self
    }

    /// Who runs the loops that must run once.
    pub fn leader(&self) -> &Arc<crate::store::Leader> {
        &self.leader
    }

    /// Where a deployment that names no datacenter goes.
    pub fn default_placement(&self) -> Placement {
        self.placement
    }

    /// The datacenters, in configuration order.
    pub fn datacenters(&self) -> &[Arc<Datacenter>] {
        &self.datacenters
    }

    pub fn datacenter(&self, name: &str) -> Option<&Arc<Datacenter>> {
        self.datacenters.iter().find(|d| d.name == name)
    }

    pub fn home(&self) -> &str {
        &self.home
    }

    /// `limits.max_replicas`: the most replicas of one function in one datacenter.
    pub fn max_replicas(&self) -> u64 {
        self.max_replicas
    }

    /// A `?datacenter=` value: `None` for all, else a configured datacenter.
    pub fn resolve_datacenter(&self, given: Option<&str>) -> Result<Option<String>, FleetError> {
        match given.filter(|d| !d.is_empty()) {
            None => Ok(None),
            Some(dc) if self.datacenter(dc).is_some() => Ok(Some(dc.to_string())),
            Some(dc) => Err(FleetError::invalid(format!(
                "datacenter: {:?} is not one of {}",
                truncate_for_message(dc),
                self.datacenter_names().join(", ")
            ))),
        }
    }

    pub fn datacenter_names(&self) -> Vec<String> {
        self.datacenters.iter().map(|d| d.name.clone()).collect()
    }

    /// Datacenters in the order invocations and spreads prefer them: home first.
    fn preference(&self) -> impl Iterator<Item = &Arc<Datacenter>> {
        self.datacenters
            .iter()
            .filter(|d| d.name == self.home)
            .chain(self.datacenters.iter().filter(|d| d.name != self.home))
    }

    fn read_functions(&self) -> std::sync::RwLockReadGuard<'_, FunctionMap<Placed>> {
        self.functions.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_functions(&self) -> std::sync::RwLockWriteGuard<'_, FunctionMap<Placed>> {
        self.functions.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The scaling policy of a deployed function, as worked out when its spec was stored.
    pub fn policy(&self, id: &FunctionId) -> Option<Arc<PolicyOf>> {
        self.read_functions().get(id).map(|f| f.policy.clone())
    }

    /// The function's current record.
    pub fn function(&self, id: &FunctionId) -> Option<Arc<Function>> {
        self.read_functions().get(id).map(|f| f.function.clone())
    }

    /// Stores a new record of a function (its gauges are read afresh).
    fn put_function(&self, function: Function) {
        let policy = crate::autoscale::labels::policy_for(
            &function.id.qualified(),
            &function.deployment,
            &self.autoscale,
        );
        let placed = Placed::new(Arc::new(function), &self.datacenters, Arc::new(policy));
        self.touched(&placed.function.id);
        self.write_functions()
            .insert(placed.function.id.clone(), placed);
    }

    /// Forgets a function in memory.
    fn drop_function(&self, id: &FunctionId) -> bool {
        self.touched(id);
        self.write_functions().remove(id).is_some()
    }

    /// Counts a change of `id`'s record in memory.
    fn touched(&self, id: &FunctionId) {
        let mut generations = self.generations.lock().unwrap_or_else(|p| p.into_inner());
        *generations.entry(id.clone()).or_default() += 1;
    }

    /// How many times `id`'s record changed in memory.
    fn generation(&self, id: &FunctionId) -> u64 {
        let generations = self.generations.lock().unwrap_or_else(|p| p.into_inner());
        generations.get(id).copied().unwrap_or(0)
    }

    /// Changes the desired replicas per datacenter of a function in memory.
    fn set_replicas(&self, id: &FunctionId, replicas: BTreeMap<String, u64>) {
        self.touched(id);
        let mut functions = self.write_functions();
        if let Some(placed) = functions.get_mut(id) {
            *placed = placed.with_replicas(replicas, &self.datacenters);
        }
    }

    fn namespaces_read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Namespace>> {
        self.namespaces.read().unwrap_or_else(|p| p.into_inner())
    }

    fn namespaces_write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Namespace>> {
        self.namespaces.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The namespace a request means: the one given (if non-empty) or the default. It must exist.
    /// A function reference as every `/system/*` route reads it ([`crate::model::function_ref`]),
    /// in an existing namespace (the default when none is named). The function need not exist.
    pub fn resolve_function(
        &self,
        raw: &str,
        namespace: Option<&str>,
    ) -> Result<FunctionId, FleetError> {
        let (name, namespace) =
            crate::model::function_ref(raw, namespace).map_err(FleetError::invalid)?;
        let namespace = self.resolve_namespace(namespace)?;
        Ok(FunctionId::new(name, namespace))
    }

    pub fn resolve_namespace(&self, given: Option<&str>) -> Result<String, FleetError> {
        let ns = match given {
            Some(ns) if !ns.is_empty() => ns,
            _ => return Ok(self.default_namespace.clone()),
        };
        if self.namespaces_read().contains_key(ns) {
            Ok(ns.to_string())
        } else {
            Err(FleetError::invalid(format!(
                "namespace: {:?} does not exist (known: {})",
                truncate_for_message(ns),
                self.namespace_names().join(", ")
            )))
        }
    }

    /// Desired replicas of a function across its datacenters, or `None` if it is not
    /// deployed. Cheap: the invoke path calls it on every request.
    pub fn desired_replicas(&self, id: &FunctionId) -> Option<u64> {
        self.read_functions().get(id).map(|f| f.desired_total())
    }

    /// Desired replicas per datacenter.
    pub fn placement_of(&self, id: &FunctionId) -> Option<BTreeMap<String, u64>> {
        self.read_functions().get(id).map(|f| f.replicas.clone())
    }

    /// The functions of a namespace; with `datacenter`, only those placed there, counted there.
    pub fn list(&self, namespace: &str, datacenter: Option<&str>) -> Vec<FunctionView> {
        let functions = self.read_functions();
        let mut listed: Vec<(u128, &Placed)> = functions
            .values()
            .filter(|f| f.id.namespace == namespace)
            .filter(|f| datacenter.is_none_or(|dc| f.replicas.contains_key(dc)))
            .map(|f| (name_prefix(&f.id.name), f))
            .collect();
        // By name (unique within a namespace, so an unstable sort is exact). Comparing the
        // names' first bytes held inline first keeps most comparisons off the heap: at
        // 10,000 functions the sort was a fifth of the list's time.
        listed.sort_unstable_by(|(a_prefix, a), (b_prefix, b)| {
            a_prefix
                .cmp(b_prefix)
                .then_with(|| a.id.name.cmp(&b.id.name))
        });
        listed
            .into_iter()
            .map(|(_, f)| self.view(f, datacenter))
            .collect()
    }

    /// Visits every function with its policy under the read lock (no copies), collecting
    /// what `f` returns. `f` must not call back into the fleet.
    pub fn scan<T>(&self, mut f: impl FnMut(&Function, &PolicyOf) -> Option<T>) -> Vec<T> {
        self.read_functions()
            .values()
            .filter_map(|placed| f(&placed.function, &placed.policy))
            .collect()
    }

    /// [`Self::scan`] over the given functions only (those deployed).
    pub fn scan_ids<'a, T>(
        &self,
        ids: impl IntoIterator<Item = &'a FunctionId>,
        mut f: impl FnMut(&Function, &PolicyOf) -> Option<T>,
    ) -> Vec<T> {
        let functions = self.read_functions();
        ids.into_iter()
            .filter_map(|id| functions.get(id))
            .filter_map(|placed| f(&placed.function, &placed.policy))
            .collect()
    }

    /// How many functions are deployed, in every namespace.
    pub fn count(&self) -> usize {
        self.read_functions().len()
    }

    /// Whether `function` is the fleet's current version of that function.
    pub fn is_current(&self, function: &Arc<Function>) -> bool {
        self.read_functions()
            .get(&function.id)
            .is_some_and(|placed| Arc::ptr_eq(&placed.function, function))
    }

    /// Every function in every namespace (for metrics).
    pub fn all(&self) -> Vec<FunctionView> {
        self.read_functions()
            .values()
            .map(|f| self.view(f, None))
            .collect()
    }

    /// Ready replicas of a function in one datacenter, as its platform sees them now.
    pub fn ready_in(&self, id: &FunctionId, datacenter: &str) -> u64 {
        self.datacenter(datacenter)
            .map(|d| d.platform.table().replicas(id).ready)
            .unwrap_or(0)
    }

    pub fn get(&self, id: &FunctionId) -> Result<FunctionView, FleetError> {
        self.get_in(id, None)
    }

    /// What each datacenter says of a viewed function beyond its counts: updates that wait
    /// for their new version, replicas that fail.
    pub fn conditions(&self, view: &FunctionView) -> Vec<(Arc<str>, Condition)> {
        view.datacenters
            .iter()
            .filter_map(|(dc, _)| {
                let condition = self
                    .datacenter(dc)?
                    .platform
                    .table()
                    .condition(&view.function.id)?;
                Some((dc.clone(), condition))
            })
            .collect()
    }

    /// A function; with `datacenter`, counted there only (not found when not placed there).
    pub fn get_in(
        &self,
        id: &FunctionId,
        datacenter: Option<&str>,
    ) -> Result<FunctionView, FleetError> {
        let functions = self.read_functions();
        let f = functions.get(id).ok_or_else(|| not_found(id))?;
        if let Some(dc) = datacenter.filter(|dc| !f.replicas.contains_key(*dc)) {
            return Err(FleetError::NotFound(format!(
                "function {id} is not in datacenter {dc}"
            )));
        }
        Ok(self.view(f, datacenter))
    }

    fn view(&self, f: &Placed, only: Option<&str>) -> FunctionView {
        let mut total = ReplicaCounts::default();
        let mut per_dc = Vec::with_capacity(f.slots.len());
        for slot in &f.slots {
            if only.is_some_and(|o| o != &*slot.name) {
                continue;
            }
            let counts = ReplicaCounts {
                desired: slot.desired,
                ready: f.ready(slot, &self.datacenters),
            };
            total.desired = total.desired.saturating_add(counts.desired);
            total.ready = total.ready.saturating_add(counts.ready);
            per_dc.push((slot.name.clone(), counts));
        }
        FunctionView {
            function: f.function.clone(),
            replicas: total,
            datacenters: per_dc,
        }
    }

    /// The ready replicas to send an invocation to: the pinned datacenter's, else home's, else
    /// the first other datacenter with any. Fresh from the platforms on every call.
    pub fn endpoints(
        &self,
        id: &FunctionId,
        pin: Option<&str>,
    ) -> Option<(String, Arc<EndpointSet>)> {
        self.find_placed(id, pin, |dc| {
            let set = dc
                .platform
                .table()
                .endpoints(id)
                .filter(|s| !s.is_empty())?;
            Some((dc.name.clone(), set))
        })
    }

    /// The datacenter a held invocation waits in (pinned, else home if placed there, else the
    /// first placed) and a watch on its ready replicas.
    pub fn wake_target(
        &self,
        id: &FunctionId,
        pin: Option<&str>,
    ) -> Option<(String, Option<watch::Receiver<u64>>)> {
        self.find_placed(id, pin, |dc| {
            Some((dc.name.clone(), Some(dc.platform.table().watch_ready(id))))
        })
    }

    /// The first of the function's datacenters (only `pin`, when given), in preference order,
    /// for which `f` answers. Reads the placement in place: the invoke path calls this on every
    /// request.
    fn find_placed<T>(
        &self,
        id: &FunctionId,
        pin: Option<&str>,
        f: impl FnMut(&Arc<Datacenter>) -> Option<T>,
    ) -> Option<T> {
        let functions = self.read_functions();
        let placed = &functions.get(id)?.replicas;
        self.preference()
            .filter(|d| placed.contains_key(&d.name) && pin.is_none_or(|p| p == d.name))
            .find_map(f)
    }

    /// Logs of a function in one datacenter (given, else home if placed there, else the first).
    pub fn logs(
        &self,
        id: &FunctionId,
        datacenter: Option<&str>,
        query: &crate::platform::LogQuery,
    ) -> Option<crate::platform::LogSubscription> {
        self.find_placed(id, datacenter, |dc| dc.platform.logs(id, query))
    }

    /// Stops every platform (on shutdown).
    pub async fn shutdown(&self) {
        // Replicas on a shared store belong to every instance: one stopping leaves them.
        if self.store.shared() {
            return;
        }
        futures::future::join_all(self.datacenters.iter().map(|d| d.platform.shutdown())).await;
    }
}

fn default_namespace_record(name: &str) -> Namespace {
    let openfaas: BTreeMap<String, String> = [("openfaas".to_string(), "1".to_string())].into();
    Namespace {
        name: name.to_string(),
        labels: Some(openfaas.clone()),
        annotations: Some(openfaas),
    }
}

fn not_found(id: &FunctionId) -> FleetError {
    FleetError::NotFound(format!("function {id} not found"))
}

fn secret_not_found(name: &str, namespace: &str) -> FleetError {
    FleetError::NotFound(format!(
        "unable to find secret: {name} in namespace {namespace}"
    ))
}

/// A name's first 16 bytes as a number that orders as the names do (shorter names padded
/// with zeros, which sort first as a shorter string does).
fn name_prefix(name: &str) -> u128 {
    let mut bytes = [0u8; 16];
    let n = name.len().min(16);
    bytes[..n].copy_from_slice(&name.as_bytes()[..n]);
    u128::from_be_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn name_prefixes_order_as_the_names_do(a in "[a-z0-9_-]{0,24}", b in "[a-z0-9_-]{0,24}") {
            let by_prefix = name_prefix(&a).cmp(&name_prefix(&b)).then_with(|| a.cmp(&b));
            prop_assert_eq!(by_prefix, a.cmp(&b));
        }
    }

    use super::*;
    use crate::platform::fake::FakePlatform;

    async fn fleet_over(store: &Store, dcs: &[&str]) -> Fleet {
        let datacenters = dcs
            .iter()
            .map(|dc| {
                Arc::new(Datacenter::new(
                    dc,
                    FakePlatform::new(),
                    Duration::from_secs(5),
                    100,
                ))
            })
            .collect();
        Fleet::restore(
            store.clone(),
            datacenters,
            dcs[0],
            Placement::All,
            "openfaas-fn",
            64,
            Arc::new(AutoscaleConfig::default()),
        )
        .await
        .unwrap()
    }

    fn deployment(min: &str) -> FunctionDeployment {
        FunctionDeployment {
            service: Some("f".into()),
            image: Some("i".into()),
            labels: Some([("com.openfaas.scale.min".to_string(), min.to_string())].into()),
            ..Default::default()
        }
    }

    /// (source, reason_code, datacenter, from, to) of every stored event, newest first.
    async fn events(store: &Store) -> Vec<(String, String, String, u64, u64)> {
        let text = |e: &serde_json::Value, k: &str| e[k].as_str().unwrap().to_string();
        let n = |e: &serde_json::Value, k: &str| e[k].as_u64().unwrap();
        store
            .events_json(100)
            .await
            .iter()
            .map(|e| {
                let source = text(e, "source");
                (
                    source,
                    text(e, "reason_code"),
                    text(e, "datacenter"),
                    n(e, "from"),
                    n(e, "to"),
                )
            })
            .collect()
    }

    /// Counts change outside the engine in two places; each change is an audited event.
    #[tokio::test]
    async fn an_update_raising_min_and_a_datacenter_leaving_are_audited() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).unwrap();
        let fleet = fleet_over(&store, &["home", "far"]).await;
        let id = fleet.deploy(deployment("1")).await.unwrap();
        fleet.update(deployment("3")).await.unwrap();
        assert_eq!(fleet.get(&id).unwrap().function.desired_in("far"), Some(3));
        let mut seen = events(&store).await;
        seen.sort();
        let raised = |dc: &str| {
            (
                "update".to_string(),
                "min_raised".to_string(),
                dc.to_string(),
                1,
                3,
            )
        };
        assert_eq!(seen, vec![raised("far"), raised("home")]);

        // `far` leaves the configuration: its replicas move home once, recorded once.
        fleet.scale(&id, Some("far"), 5).await.unwrap();
        drop(fleet);
        let fleet = fleet_over(&store, &["home"]).await;
        assert_eq!(fleet.get(&id).unwrap().function.desired_in("home"), Some(5));
        let moved = (
            "restore".to_string(),
            "datacenter_gone".to_string(),
            "home".to_string(),
            3,
            5,
        );
        assert_eq!(events(&store).await[0], moved);
        drop(fleet);
        let _again = fleet_over(&store, &["home"]).await;
        let count = events(&store).await.iter().filter(|e| **e == moved).count();
        assert_eq!(
            count, 1,
            "the move is stored: a second restart moves nothing"
        );
    }

    #[test]
    fn shared_sixteen_byte_prefixes_fall_back_to_the_whole_name() {
        let (a, b) = ("function-with-a-long-name-1", "function-with-a-long-name-2");
        assert_eq!(name_prefix(a), name_prefix(b));
        assert!(name_prefix("ab") < name_prefix("abc"));
    }
}
