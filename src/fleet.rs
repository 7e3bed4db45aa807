//! The control plane's desired state: functions (placed in datacenters, with replicas per
//! datacenter), namespaces and secrets, kept in the store and converged onto each datacenter's
//! platform. Handlers call one method here per request. Operations on several datacenters run
//! concurrently, each with its own timeout and rate limit: when all fail nothing changes; when
//! some fail, what succeeded stays, the error names the failed ones, and the reconciler
//! converges them when they answer again.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use base64::Engine;
use chrono::Utc;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{watch, Mutex};

use crate::config::{AutoscaleConfig, Placement};
use crate::model::{
    truncate_for_message, validate_dns_label, validate_secret_name, Function, FunctionDeployment,
    FunctionId, FunctionMap, Namespace, LABEL_DATACENTERS,
};
use crate::platform::{
    EndpointSet, Platform, PlatformError, ReadyGauge, ReplicaCounts, Rollout, Workload,
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
        }
    }

    /// One platform call, rate-limited and bounded by this datacenter's timeout.
    async fn call<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, PlatformError>>,
    ) -> Result<T, PlatformError> {
        self.limiter.until_ready().await;
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(PlatformError::Failed(format!(
                "no answer within {:?}",
                self.timeout
            ))),
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
            return Err(FleetError::Platform(PlatformError::Failed(format!(
                "{what} failed in {}",
                failures.join("; ")
            ))));
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
    /// Serialises mutations so that store and platforms see them in one order.
    write: Mutex<()>,
}

/// A function in the fleet's map, with what a view of it needs per datacenter laid out next
/// to it: the function list reads every function's counts in every datacenter, and following
/// the record's datacenter keys and a lookup in each platform's own map cost most of its time
/// (memory latency, at 10,000 functions).
struct Placed {
    function: Arc<Function>,
    /// One per datacenter in `function.replicas`, in its order.
    slots: Box<[Slot]>,
}

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
    fn new(function: Arc<Function>, datacenters: &[Arc<Datacenter>]) -> Self {
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
        Placed { function, slots }
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
        let mut placed = Placed::new(Arc::new(function), datacenters);
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
            .get_or_init(|| datacenter.platform.ready_gauge(id));
        gauge
            .as_ref()
            .and_then(|g| g.ready())
            .unwrap_or_else(|| datacenter.platform.ready_replicas(id))
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
        };
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
                *at_home = (*at_home).max(n);
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

    /// The function's current record.
    pub fn function(&self, id: &FunctionId) -> Option<Arc<Function>> {
        self.read_functions().get(id).map(|f| f.function.clone())
    }

    /// Stores a new record of a function (its gauges are read afresh).
    fn put_function(&self, function: Function) {
        let placed = Placed::new(Arc::new(function), &self.datacenters);
        self.write_functions()
            .insert(placed.function.id.clone(), placed);
    }

    /// Changes the desired replicas per datacenter of a function in memory.
    fn set_replicas(&self, id: &FunctionId, replicas: BTreeMap<String, u64>) {
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

    /// Visits every function under the read lock (no copies), collecting what `f` returns.
    pub fn scan<T>(&self, mut f: impl FnMut(&Function) -> Option<T>) -> Vec<T> {
        self.read_functions()
            .values()
            .filter_map(|function| f(function))
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
            .map(|d| d.platform.replicas(id).ready)
            .unwrap_or(0)
    }

    pub fn get(&self, id: &FunctionId) -> Result<FunctionView, FleetError> {
        self.get_in(id, None)
    }

    /// The updates of a viewed function that wait for their new version, per datacenter.
    pub fn rollouts(&self, view: &FunctionView) -> Vec<(Arc<str>, Rollout)> {
        view.datacenters
            .iter()
            .filter_map(|(dc, _)| {
                let rollout = self.datacenter(dc)?.platform.rollout(&view.function.id)?;
                Some((dc.clone(), rollout))
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
            let set = dc.platform.endpoints(id).filter(|s| !s.is_empty())?;
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
            Some((dc.name.clone(), dc.platform.watch_ready(id)))
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

    /// Where a deployment goes: `com.faastastic.datacenters` and `datacenter==NAME` choose,
    /// `datacenter!=NAME` excludes, else the configured default (all, or home). Other
    /// constraints are the platform's business.
    fn placement(&self, dep: &FunctionDeployment) -> Result<Vec<String>, Vec<String>> {
        let mut errors = Vec::new();
        let mut chosen: Vec<String> = Vec::new();
        let mut excluded: Vec<String> = Vec::new();
        let known = |name: &str, field: &str, errors: &mut Vec<String>| {
            if self.datacenter(name).is_none() {
                errors.push(format!(
                    "{field}: datacenter {:?} is not one of {}",
                    truncate_for_message(name),
                    self.datacenter_names().join(", ")
                ));
            }
        };
        if let Some(list) = dep.label(LABEL_DATACENTERS) {
            for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                known(name, &format!("labels: {LABEL_DATACENTERS}"), &mut errors);
                chosen.push(name.to_string());
            }
        }
        for c in dep.constraints.iter().flatten() {
            if let Some((equal, name)) = datacenter_constraint(c) {
                known(name, "constraints", &mut errors);
                if equal {
                    chosen.push(name.to_string());
                } else {
                    excluded.push(name.to_string());
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let out: Vec<String> = self
            .datacenters
            .iter()
            .map(|d| d.name.clone())
            .filter(|name| {
                if chosen.is_empty() {
                    self.placement == Placement::All || *name == self.home
                } else {
                    chosen.contains(name)
                }
            })
            .filter(|name| !excluded.contains(name))
            .collect();
        if out.is_empty() {
            return Err(vec![
                "constraints: they leave no datacenter to run the function in".to_string(),
            ]);
        }
        Ok(out)
    }

    /// Validates a deployment body and returns the function id it names and where it goes.
    fn check_deployment(
        &self,
        dep: &FunctionDeployment,
    ) -> Result<(FunctionId, Vec<String>), FleetError> {
        let mut errors = match dep.validate() {
            Ok(()) => Vec::new(),
            Err(errors) => errors,
        };
        let placement = match self.placement(dep) {
            Ok(p) => p,
            Err(e) => {
                errors.extend(e);
                Vec::new()
            }
        };
        for dc in &placement {
            if let Some(d) = self.datacenter(dc) {
                if let Err(e) = d.platform.validate(dep) {
                    if !errors.contains(&e) {
                        errors.push(e);
                    }
                }
            }
        }
        // The deployment's own checks may have named a label already.
        for e in crate::autoscale::labels::check_labels(dep) {
            let label = e.split(':').next().unwrap_or_default();
            let named = format!("labels: {label} ");
            if !errors.iter().any(|known| known.starts_with(&named)) {
                errors.push(e);
            }
        }
        for (label, n) in [
            (crate::model::LABEL_SCALE_MIN, dep.min_replicas()),
            (crate::model::LABEL_SCALE_INITIAL, dep.initial_replicas()),
        ] {
            // The initial count is named only when the user set it (else it is min's).
            let set = dep.label(label).is_some();
            if set && n > self.max_replicas {
                errors.push(format!(
                    "labels: {label} {n} is above this server's limit of {} replicas (limits.max_replicas)",
                    self.max_replicas
                ));
            }
        }
        let namespace = match self.resolve_namespace(dep.namespace.as_deref()) {
            Ok(ns) => Some(ns),
            Err(FleetError::Invalid(e)) => {
                errors.extend(e);
                None
            }
            Err(e) => return Err(e),
        };
        if !errors.is_empty() {
            return Err(FleetError::Invalid(errors));
        }
        let name = dep.service.clone().unwrap_or_default();
        Ok((
            FunctionId::new(
                name,
                namespace.expect("namespace resolved when there are no errors"),
            ),
            placement,
        ))
    }

    /// Reads the secrets a deployment names; a missing one is a 400 naming it.
    async fn workload(
        &self,
        id: &FunctionId,
        dep: &FunctionDeployment,
    ) -> Result<Workload, FleetError> {
        let mut secrets = Vec::new();
        let mut missing = Vec::new();
        for name in dep.secrets.iter().flatten() {
            match self.store.get_secret(&id.namespace, name).await? {
                Some(s) => secrets.push((s.name, s.value)),
                None => missing.push(format!(
                    "secrets: unable to find secret {name:?} in namespace {:?}",
                    id.namespace
                )),
            }
        }
        if !missing.is_empty() {
            return Err(FleetError::Invalid(missing));
        }
        Ok(Workload {
            id: id.clone(),
            deployment: dep.clone(),
            secrets,
        })
    }

    /// Applies a workload in several datacenters at once, each with its replica count.
    async fn apply_in(&self, workload: &Workload, targets: &[(String, u64)]) -> FanOut {
        let hash = spec_hash(&workload.deployment);
        let results = futures::future::join_all(targets.iter().map(|(dc, n)| async move {
            let result = match self.datacenter(dc) {
                Some(d) => d.call(d.platform.apply(workload.clone(), *n)).await,
                None => Err(PlatformError::Failed("not configured".into())),
            };
            if result.is_ok() {
                self.applied_set(&workload.id, dc, Some(hash));
            }
            (dc.clone(), result)
        }))
        .await;
        FanOut(results)
    }

    /// Runs one call per datacenter at once.
    async fn each<'a, F, Fut>(&'a self, dcs: &[String], call: F) -> FanOut
    where
        F: Fn(&'a Arc<Datacenter>) -> Fut,
        Fut: std::future::Future<Output = Result<(), PlatformError>> + 'a,
    {
        let results = futures::future::join_all(dcs.iter().map(|dc| {
            let d = self.datacenter(dc);
            let fut = d.map(|d| d.call(call(d)));
            async move {
                let result = match fut {
                    Some(f) => f.await,
                    None => Err(PlatformError::Failed("not configured".into())),
                };
                (dc.clone(), result)
            }
        }))
        .await;
        FanOut(results)
    }

    fn applied_set(&self, id: &FunctionId, dc: &str, hash: Option<u64>) {
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        match hash {
            Some(h) => applied.insert((id.clone(), dc.to_string()), h),
            None => applied.remove(&(id.clone(), dc.to_string())),
        };
    }

    /// POST /system/functions: a new function in the datacenters it names. Deploying the same
    /// spec again for datacenters it is not in yet adds them (one call per datacenter, as
    /// Terraform does with one provider block each); anything else under an existing name is
    /// a conflict.
    pub async fn deploy(&self, dep: FunctionDeployment) -> Result<FunctionId, FleetError> {
        // Checked under the lock, so a namespace deleted meanwhile cannot be deployed into.
        let _guard = self.write.lock().await;
        let (id, mut placement) = self.check_deployment(&dep)?;
        let workload = self.workload(&id, &dep).await?;
        let initial = crate::autoscale::labels::initial_for(&id, &dep, &self.autoscale);
        let existing = self.function(&id);
        let function = match &existing {
            Some(current) => {
                let placed = || {
                    current
                        .replicas
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let new: Vec<String> = placement
                    .iter()
                    .filter(|dc| !current.replicas.contains_key(*dc))
                    .cloned()
                    .collect();
                if new.is_empty() {
                    return Err(FleetError::Conflict(format!(
                        "function {id} already exists in {}; update it with PUT /system/functions",
                        placed()
                    )));
                }
                if without_placement(&current.deployment) != without_placement(&dep) {
                    return Err(FleetError::Conflict(format!(
                        "function {id} already exists (in {}) with a different spec; update it with PUT /system/functions \
                         (a POST with the same spec and a datacenter constraint adds that datacenter)",
                        placed()
                    )));
                }
                let mut f = Function::clone(current);
                for dc in &new {
                    f.replicas.insert(dc.clone(), initial);
                }
                f.deployment = with_placement(&current.deployment, f.replicas.keys());
                placement = new;
                f
            }
            None => Function {
                id: id.clone(),
                replicas: placement.iter().map(|dc| (dc.clone(), initial)).collect(),
                deployment: dep,
                created_at: Utc::now(),
            },
        };
        self.store.put_function(&function).await?;
        let targets: Vec<(String, u64)> =
            placement.iter().map(|dc| (dc.clone(), initial)).collect();
        let result = self.apply_in(&workload, &targets).await;
        if result.all_failed() {
            // Undo the record so nothing half-deployed remains.
            match &existing {
                Some(previous) => self.store.put_function(previous).await?,
                None => {
                    self.store.delete_function(&id).await?;
                }
            }
            return result.into_result("deploy").map(|_| id);
        }
        self.put_function(function);
        result.into_result("deploy").map(|_| id)
    }

    /// PUT /system/functions: replaces a deployed function's spec, keeping its replica counts
    /// (raised to the new `com.openfaas.scale.min` when that is higher). A new placement adds
    /// and removes datacenters.
    pub async fn update(&self, dep: FunctionDeployment) -> Result<FunctionId, FleetError> {
        let _guard = self.write.lock().await;
        let (id, placement) = self.check_deployment(&dep)?;
        let Some(current) = self.function(&id) else {
            return Err(not_found(&id));
        };
        let workload = self.workload(&id, &dep).await?;
        let min = crate::autoscale::labels::min_for(&id, &dep, &self.autoscale);
        let replicas: BTreeMap<String, u64> = placement
            .iter()
            .map(|dc| (dc.clone(), current.desired_in(dc).unwrap_or(min).max(min)))
            .collect();
        let dropped: Vec<String> = current
            .replicas
            .keys()
            .filter(|dc| !replicas.contains_key(*dc))
            .cloned()
            .collect();
        let function = Function {
            replicas,
            deployment: dep,
            ..Function::clone(&current)
        };
        self.store.put_function(&function).await?;
        let targets: Vec<(String, u64)> = function
            .replicas
            .iter()
            .map(|(d, n)| (d.clone(), *n))
            .collect();
        let mut result = self.apply_in(&workload, &targets).await;
        if result.all_failed() {
            self.store.put_function(&current).await?;
            return result.into_result("update").map(|_| id);
        }
        result
            .0
            .extend(self.each(&dropped, |d| d.platform.remove(&id)).await.0);
        for dc in &dropped {
            self.applied_set(&id, dc, None);
        }
        self.put_function(function);
        result.into_result("update").map(|_| id)
    }

    /// DELETE /system/functions: from every datacenter, or only from `datacenter`. Once this
    /// returns, no request reaches the removed replicas.
    pub async fn remove(
        &self,
        id: &FunctionId,
        datacenter: Option<&str>,
    ) -> Result<(), FleetError> {
        let _guard = self.write.lock().await;
        let Some(current) = self.function(id) else {
            return Err(not_found(id));
        };
        let keep: BTreeMap<String, u64> = match datacenter {
            None => BTreeMap::new(),
            Some(dc) => {
                if !current.replicas.contains_key(dc) {
                    return Err(FleetError::NotFound(format!(
                        "function {id} is not in datacenter {dc}"
                    )));
                }
                current
                    .replicas
                    .iter()
                    .filter(|(d, _)| d.as_str() != dc)
                    .map(|(d, n)| (d.clone(), *n))
                    .collect()
            }
        };
        let removed: Vec<String> = current
            .replicas
            .keys()
            .filter(|dc| !keep.contains_key(*dc))
            .cloned()
            .collect();
        if keep.is_empty() {
            self.store.delete_function(id).await?;
            self.write_functions().remove(id);
        } else {
            self.store.set_desired_replicas(id, &keep).await?;
            self.set_replicas(id, keep);
        }
        for dc in &removed {
            self.applied_set(id, dc, None);
        }
        // What failed here is removed by the reconciler once the datacenter answers again.
        self.each(&removed, |d| d.platform.remove(id))
            .await
            .into_result("remove")
    }

    /// Sets the desired replica count (0 allowed: scale to zero): in one datacenter, or,
    /// without one, as a total spread over the function's datacenters (home first). Outside
    /// tests every replica change is an engine decision ([`Fleet::scale_from`]).
    #[cfg(test)]
    pub async fn scale(
        &self,
        id: &FunctionId,
        datacenter: Option<&str>,
        replicas: u64,
    ) -> Result<(), FleetError> {
        self.scale_checked(id, datacenter, None, replicas, None, OnFailure::Undo)
            .await
            .map(|_| ())
    }

    /// Scales one datacenter only if its desired count is still `expected` (the count a
    /// decision was made from): a manual scale in between is never overwritten. A mismatch is
    /// a `Conflict`.
    ///
    /// `decision` is stored with the new desired count, before any platform call, and undone
    /// with it when every platform call fails. Returns whether it was stored (`false` when
    /// nothing had to change).
    ///
    /// `OnFailure::Keep` (an operator's count) keeps the new desired count even when the
    /// datacenter's platform call fails, for the reconciler to converge: a `Partial` error
    /// says so.
    pub async fn scale_from(
        &self,
        id: &FunctionId,
        datacenter: &str,
        expected: u64,
        replicas: u64,
        decision: Option<&Decision>,
        on_failure: OnFailure,
    ) -> Result<bool, FleetError> {
        self.scale_checked(
            id,
            Some(datacenter),
            Some(expected),
            replicas,
            decision,
            on_failure,
        )
        .await
    }

    /// How a manual scale to `total` replicas would spread over the function's datacenters
    /// (only `datacenter`, when given), checked against the server's limit and each
    /// platform's: a count that cannot run is refused before anything changes.
    pub fn shares_of(
        &self,
        id: &FunctionId,
        datacenter: Option<&str>,
        total: u64,
    ) -> Result<BTreeMap<String, u64>, FleetError> {
        let (shares, deployment) = {
            let functions = self.read_functions();
            let placed = functions.get(id).ok_or_else(|| not_found(id))?;
            let f = &placed.function;
            let shares = match datacenter {
                Some(dc) if f.replicas.contains_key(dc) => [(dc.to_string(), total)].into(),
                Some(dc) => {
                    return Err(FleetError::NotFound(format!(
                        "function {id} is not in datacenter {dc}"
                    )))
                }
                None => self.spread(total, &f.replicas),
            };
            (shares, f.deployment.clone())
        };
        self.check_counts(&deployment, &shares)?;
        Ok(shares)
    }

    /// Refuses counts above the server's limit or that a datacenter's platform cannot run.
    fn check_counts(
        &self,
        deployment: &FunctionDeployment,
        target: &BTreeMap<String, u64>,
    ) -> Result<(), FleetError> {
        let mut errors = Vec::new();
        for (dc, n) in target {
            if *n > self.max_replicas {
                errors.push(format!(
                    "replicas: {n} in {dc} is above this server's limit of {} per datacenter (limits.max_replicas)",
                    self.max_replicas
                ));
            } else if let Some(d) = self.datacenter(dc) {
                if let Err(e) = d.platform.validate_scale(deployment, *n) {
                    errors.push(e);
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(FleetError::Invalid(errors))
        }
    }

    /// `total` spread over `dcs` in preference order: equal shares, the remainder to the first.
    fn spread(&self, total: u64, dcs: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
        let order: Vec<&String> = self
            .preference()
            .map(|d| &d.name)
            .filter(|n| dcs.contains_key(*n))
            .chain(dcs.keys().filter(|n| self.datacenter(n).is_none()))
            .collect();
        let k = order.len().max(1) as u64;
        order
            .into_iter()
            .enumerate()
            .map(|(i, dc)| (dc.clone(), total / k + u64::from((i as u64) < total % k)))
            .collect()
    }

    async fn scale_checked(
        &self,
        id: &FunctionId,
        datacenter: Option<&str>,
        expected: Option<u64>,
        replicas: u64,
        decision: Option<&Decision>,
        on_failure: OnFailure,
    ) -> Result<bool, FleetError> {
        let _guard = self.write.lock().await;
        let Some((current, deployment)) = self
            .read_functions()
            .get(id)
            .map(|f| (f.replicas.clone(), f.deployment.clone()))
        else {
            return Err(not_found(id));
        };
        let target = match datacenter {
            Some(dc) => {
                let Some(now) = current.get(dc) else {
                    return Err(FleetError::NotFound(format!(
                        "function {id} is not in datacenter {dc}"
                    )));
                };
                if let Some(expected) = expected.filter(|e| e != now) {
                    return Err(FleetError::Conflict(format!(
                        "replicas changed from {expected} to {now} meanwhile"
                    )));
                }
                let mut t = current.clone();
                t.insert(dc.to_string(), replicas);
                t
            }
            None => self.spread(replicas, &current),
        };
        self.check_counts(&deployment, &target)?;
        let changed: Vec<(String, u64)> = target
            .iter()
            .filter(|(dc, n)| current.get(*dc) != Some(*n))
            .map(|(dc, n)| (dc.clone(), *n))
            .collect();
        if changed.is_empty() {
            return Ok(false);
        }
        let event_id = self.store.set_desired_with(id, &target, decision).await?;
        let dcs: Vec<String> = changed.iter().map(|(dc, _)| dc.clone()).collect();
        let result = self
            .each(&dcs, |d| {
                let n = target[&d.name];
                d.platform.scale(id, n)
            })
            .await;
        if result.all_failed() {
            if on_failure == OnFailure::Keep {
                let why = result.into_result("scale").err().map(|e| e.to_string());
                self.set_replicas(id, target);
                return Err(FleetError::Partial(format!(
                    "{}; the new count is kept and the reconciler retries it",
                    why.unwrap_or_default()
                )));
            }
            let undo = decision.zip(event_id);
            self.store.revert_desired(id, &current, undo).await?;
            return result.into_result("scale").map(|_| false);
        }
        // Datacenters that failed keep the new desired count: the reconciler converges them.
        self.set_replicas(id, target);
        result.into_result("scale").map(|_| event_id.is_some())
    }

    /// Logs of a function in one datacenter (given, else home if placed there, else the first).
    pub fn logs(
        &self,
        id: &FunctionId,
        datacenter: Option<&str>,
        query: &crate::platform::LogQuery,
    ) -> Option<crate::platform::LogSubscription> {
        let (dc, _) = self.wake_target(id, datacenter)?;
        self.datacenter(&dc)?.platform.logs(id, query)
    }

    /// One pass of the reconciler: every datacenter converges to the desired state. Functions
    /// a datacenter missed (it was down) are applied, wrong counts scaled, leftovers removed.
    /// A datacenter that does not answer is skipped until the next pass.
    pub async fn reconcile(&self) {
        futures::future::join_all(self.datacenters.iter().map(|d| self.reconcile_in(d))).await;
    }

    async fn reconcile_in(&self, d: &Arc<Datacenter>) {
        let actual = match d.call(d.platform.functions()).await {
            Ok(list) => list,
            Err(e) => {
                tracing::debug!(datacenter = %d.name, error = %e, "reconciler: datacenter unavailable");
                return;
            }
        };
        let actual: HashMap<FunctionId, u64> = actual.into_iter().collect();
        let desired: Vec<Arc<Function>> = self
            .read_functions()
            .values()
            .filter(|f| f.replicas.contains_key(&d.name))
            .map(|f| f.function.clone())
            .collect();
        for f in &desired {
            let _guard = self.write.lock().await;
            // Re-read under the lock: it may have changed or gone meanwhile.
            let Some(f) = self.function(&f.id) else {
                continue;
            };
            let Some(want) = f.desired_in(&d.name) else {
                continue;
            };
            let applied = self
                .applied
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&(f.id.clone(), d.name.clone()))
                .copied();
            let result = if !actual.contains_key(&f.id) || applied != Some(spec_hash(&f.deployment))
            {
                match self.workload(&f.id, &f.deployment).await {
                    Ok(w) => {
                        let r = self.apply_in(&w, &[(d.name.clone(), want)]).await;
                        r.into_result("apply")
                    }
                    Err(e) => Err(e),
                }
            } else if actual.get(&f.id) != Some(&want) {
                d.call(d.platform.scale(&f.id, want))
                    .await
                    .map_err(FleetError::from)
            } else {
                continue;
            };
            match result {
                Ok(()) => {
                    tracing::info!(function = %f.id, datacenter = %d.name, replicas = want, "reconciled")
                }
                Err(e) => {
                    tracing::warn!(function = %f.id, datacenter = %d.name, error = %e, "reconciler: cannot converge")
                }
            }
        }
        for id in actual.keys() {
            let _guard = self.write.lock().await;
            let placed = self
                .read_functions()
                .get(id)
                .is_some_and(|f| f.replicas.contains_key(&d.name));
            if !placed {
                match d.call(d.platform.remove(id)).await {
                    Ok(()) => {
                        tracing::info!(function = %id, datacenter = %d.name, "reconciler removed a leftover function")
                    }
                    Err(e) => {
                        tracing::warn!(function = %id, datacenter = %d.name, error = %e, "reconciler: cannot remove a leftover function")
                    }
                }
            }
        }
    }

    /// Runs the reconciler every `interval` until the process ends.
    pub fn spawn_reconciler(self: &Arc<Self>, interval: Duration) {
        let fleet = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            tick.tick().await;
            loop {
                tick.tick().await;
                fleet.reconcile().await;
            }
        });
    }

    /// Stops every platform (on shutdown).
    pub async fn shutdown(&self) {
        futures::future::join_all(self.datacenters.iter().map(|d| d.platform.shutdown())).await;
    }

    // ---- namespaces ----

    pub fn namespace_names(&self) -> Vec<String> {
        self.namespaces_read().keys().cloned().collect()
    }

    pub fn get_namespace(&self, name: &str) -> Result<Namespace, FleetError> {
        self.namespaces_read()
            .get(name)
            .cloned()
            .ok_or_else(|| FleetError::NotFound(format!("namespace {name} not found")))
    }

    pub async fn create_namespace(&self, ns: Namespace) -> Result<(), FleetError> {
        validate_dns_label("name", &ns.name).map_err(FleetError::invalid)?;
        let _guard = self.write.lock().await;
        if self.namespaces_read().contains_key(&ns.name) {
            return Err(FleetError::Conflict(format!(
                "namespace {} already exists",
                ns.name
            )));
        }
        self.store.put_namespace(&ns).await?;
        self.namespaces_write().insert(ns.name.clone(), ns);
        Ok(())
    }

    pub async fn update_namespace(&self, ns: Namespace) -> Result<(), FleetError> {
        let _guard = self.write.lock().await;
        if !self.namespaces_read().contains_key(&ns.name) {
            return Err(FleetError::NotFound(format!(
                "namespace {} not found",
                ns.name
            )));
        }
        self.store.put_namespace(&ns).await?;
        self.namespaces_write().insert(ns.name.clone(), ns);
        Ok(())
    }

    pub async fn delete_namespace(&self, name: &str) -> Result<(), FleetError> {
        if name == self.default_namespace {
            return Err(FleetError::invalid(format!(
                "name: {name} is the default namespace and cannot be deleted"
            )));
        }
        let _guard = self.write.lock().await;
        if !self.namespaces_read().contains_key(name) {
            return Err(FleetError::NotFound(format!("namespace {name} not found")));
        }
        let in_use = self
            .read_functions()
            .keys()
            .filter(|id| id.namespace == name)
            .count();
        if in_use > 0 {
            return Err(FleetError::Conflict(format!(
                "namespace {name} still has {in_use} function(s); remove them first"
            )));
        }
        self.store.delete_namespace(name).await?;
        self.namespaces_write().remove(name);
        Ok(())
    }

    // ---- secrets ----

    pub async fn list_secrets(&self, namespace: &str) -> Result<Vec<String>, FleetError> {
        Ok(self
            .store
            .list_secrets()
            .await?
            .into_iter()
            .filter(|s| s.namespace == namespace)
            .map(|s| s.name)
            .collect())
    }

    fn secret_record(&self, input: SecretInput) -> Result<SecretRecord, FleetError> {
        let mut errors = Vec::new();
        if let Err(e) = validate_secret_name(&input.name) {
            errors.push(e);
        }
        let namespace = match self.resolve_namespace(input.namespace.as_deref()) {
            Ok(ns) => ns,
            Err(FleetError::Invalid(e)) => {
                errors.extend(e);
                String::new()
            }
            Err(e) => return Err(e),
        };
        let value = match input.raw_value.as_deref().filter(|v| !v.is_empty()) {
            Some(raw) => match base64::engine::general_purpose::STANDARD.decode(raw) {
                Ok(bytes) => bytes,
                Err(e) => {
                    errors.push(format!("rawValue: not valid base64: {e}"));
                    Vec::new()
                }
            },
            None => input.value.unwrap_or_default().into_bytes(),
        };
        if !errors.is_empty() {
            return Err(FleetError::Invalid(errors));
        }
        Ok(SecretRecord {
            namespace,
            name: input.name,
            value,
        })
    }

    pub async fn create_secret(&self, input: SecretInput) -> Result<(), FleetError> {
        let _guard = self.write.lock().await;
        let record = self.secret_record(input)?;
        if self
            .store
            .get_secret(&record.namespace, &record.name)
            .await?
            .is_some()
        {
            return Err(FleetError::Conflict(format!(
                "secret with the name {} already exists in namespace {}",
                record.name, record.namespace
            )));
        }
        self.store.put_secret(&record).await?;
        Ok(())
    }

    pub async fn update_secret(&self, input: SecretInput) -> Result<(), FleetError> {
        let _guard = self.write.lock().await;
        let record = self.secret_record(input)?;
        if self
            .store
            .get_secret(&record.namespace, &record.name)
            .await?
            .is_none()
        {
            return Err(secret_not_found(&record.name, &record.namespace));
        }
        self.store.put_secret(&record).await?;
        Ok(())
    }

    pub async fn delete_secret(
        &self,
        name: &str,
        namespace: Option<&str>,
    ) -> Result<(), FleetError> {
        if name.is_empty() {
            return Err(FleetError::invalid("name: is required"));
        }
        let _guard = self.write.lock().await;
        let namespace = self.resolve_namespace(namespace)?;
        let users: Vec<String> = self
            .read_functions()
            .values()
            .filter(|f| {
                f.id.namespace == namespace
                    && f.deployment.secrets.iter().flatten().any(|s| s == name)
            })
            .map(|f| f.id.name.clone())
            .collect();
        if !users.is_empty() {
            return Err(FleetError::Conflict(format!(
                "secret {name} is used by {}; remove it from their secrets first",
                users.join(", ")
            )));
        }
        if !self.store.delete_secret(&namespace, name).await? {
            return Err(secret_not_found(name, &namespace));
        }
        Ok(())
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
    use super::name_prefix;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn name_prefixes_order_as_the_names_do(a in "[a-z0-9_-]{0,24}", b in "[a-z0-9_-]{0,24}") {
            let by_prefix = name_prefix(&a).cmp(&name_prefix(&b)).then_with(|| a.cmp(&b));
            prop_assert_eq!(by_prefix, a.cmp(&b));
        }
    }

    #[test]
    fn shared_sixteen_byte_prefixes_fall_back_to_the_whole_name() {
        let (a, b) = ("function-with-a-long-name-1", "function-with-a-long-name-2");
        assert_eq!(name_prefix(a), name_prefix(b));
        assert!(name_prefix("ab") < name_prefix("abc"));
    }
}
