//! Applies the engine's decisions: one function at a time (a per-function lock, so racing
//! webhooks never lose an update), different functions concurrently, platform calls
//! rate-limited. Every decision becomes a scale event in the store, a metric and a log line;
//! the engine's state (cooldowns, window) is stored with it and read back after a restart.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Serialize;

use super::labels::policy_for;
use super::policy::{decide, Action, Clamp, Input, Outcome, State};
use super::rates::RateWindow;
use crate::config::AutoscaleConfig;
use crate::fleet::{Fleet, FleetError};
use crate::model::FunctionId;
use crate::proxy::Activity;
use crate::store::{EventRecord, Store, StoreError};
use crate::telemetry::Metrics;

/// One request to scale, from an alert or another source.
#[derive(Debug, Clone)]
pub struct SignalRequest {
    pub id: FunctionId,
    pub action: Action,
    pub dedupe_key: Option<String>,
    /// Where it came from, e.g. `alert`.
    pub source: String,
    /// What supports it (alert name, fingerprint, labels...), stored with the event.
    pub evidence: serde_json::Value,
}

/// A decision as recorded and served by `/system/scale-events`.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleEvent {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<i64>,
    pub time: DateTime<Utc>,
    pub function: String,
    pub namespace: String,
    pub datacenter: String,
    pub source: String,
    pub from: u64,
    pub to: u64,
    pub recommended: u64,
    pub direction: &'static str,
    pub outcome: &'static str,
    pub reason: String,
    pub clamps: Vec<Clamp>,
    pub evidence: serde_json::Value,
}

/// The answer for one signal, as the webhook reports it.
#[derive(Debug, Clone, Serialize)]
pub struct SignalResult {
    pub function: String,
    pub outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<u64>,
    pub reason: String,
    /// A platform call failed: the sender should retry.
    #[serde(skip)]
    pub retryable: bool,
}

impl SignalResult {
    pub fn other(function: String, outcome: &'static str, reason: String) -> Self {
        SignalResult {
            function,
            outcome,
            from: None,
            to: None,
            reason,
            retryable: false,
        }
    }
}

pub struct Autoscaler {
    fleet: Arc<Fleet>,
    store: Store,
    metrics: Arc<Metrics>,
    cfg: AutoscaleConfig,
    datacenter: String,
    states: Mutex<HashMap<FunctionId, Arc<tokio::sync::Mutex<State>>>>,
    /// Which deployment each state belongs to (its `createdAt`): a function deleted and
    /// deployed again under the same name starts with a fresh state.
    deployed_at: Mutex<HashMap<FunctionId, DateTime<Utc>>>,
    /// Functions in a gradual scale-down, which the ticker keeps stepping.
    stepping: Mutex<HashSet<FunctionId>>,
    scale_limiter: DefaultDirectRateLimiter,
    activity: Arc<Activity>,
    /// Idle time counts from here for functions not invoked since the server started.
    started_at: DateTime<Utc>,
    annotations: Option<Arc<crate::grafana::Annotations>>,
    /// Faastastic's own invocation counters over `staleness_window`, for the staleness guard.
    observed: Mutex<RateWindow>,
}

fn rank(action: Action) -> u8 {
    match action {
        Action::StepUp | Action::Sized { .. } | Action::To(_) => 2,
        Action::StepDown | Action::Resolved => 1,
    }
}

impl Autoscaler {
    /// Reads every function's stored engine state back (cooldowns survive a restart).
    pub async fn restore(
        fleet: Arc<Fleet>,
        store: Store,
        metrics: Arc<Metrics>,
        activity: Arc<Activity>,
        annotations: Option<Arc<crate::grafana::Annotations>>,
        cfg: AutoscaleConfig,
        datacenter: &str,
    ) -> Result<Arc<Autoscaler>, StoreError> {
        let mut states = HashMap::new();
        let mut stepping = HashSet::new();
        for (id, json) in store.load_autoscale_states().await? {
            match serde_json::from_str::<State>(&json) {
                Ok(state) => {
                    if state.stepping_down {
                        stepping.insert(id.clone());
                    }
                    states.insert(id, Arc::new(tokio::sync::Mutex::new(state)));
                }
                Err(e) => {
                    tracing::warn!(function = %id, error = %e, "ignoring unreadable autoscaler state")
                }
            }
        }
        let per_sec = NonZeroU32::new(cfg.scale_rate_per_sec.max(1)).expect("max(1) is non-zero");
        Ok(Arc::new(Autoscaler {
            fleet,
            store,
            metrics,
            datacenter: datacenter.to_string(),
            states: Mutex::new(states),
            deployed_at: Mutex::new(HashMap::new()),
            stepping: Mutex::new(stepping),
            scale_limiter: RateLimiter::direct(Quota::per_second(per_sec)),
            activity,
            started_at: Utc::now(),
            annotations,
            observed: Mutex::new(RateWindow::new(cfg.staleness_window)),
            cfg,
        }))
    }

    fn state_of(&self, id: &FunctionId) -> Arc<tokio::sync::Mutex<State>> {
        self.states
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.clone())
            .or_default()
            .clone()
    }

    /// Applies a batch (one webhook): per function, the strongest signal wins (up beats down,
    /// then the first); the rest are reported as superseded. Results come in input order.
    pub async fn apply_batch(&self, requests: Vec<SignalRequest>) -> Vec<SignalResult> {
        let mut winners: HashMap<FunctionId, usize> = HashMap::new();
        for (i, r) in requests.iter().enumerate() {
            let w = winners.entry(r.id.clone()).or_insert(i);
            if rank(r.action) > rank(requests[*w].action) {
                *w = i;
            }
        }
        let chosen: HashSet<usize> = winners.values().copied().collect();
        let applied = futures::future::join_all(chosen.iter().map(|&i| {
            let r = &requests[i];
            async move {
                let input = Input::Signal {
                    action: r.action,
                    dedupe_key: r.dedupe_key.as_deref(),
                    observed_rate: self.observed_rate(&r.id, r.action),
                };
                (
                    i,
                    self.apply(&r.id, input, &r.source, r.evidence.clone(), false)
                        .await,
                )
            }
        }))
        .await;
        let mut by_index: HashMap<usize, SignalResult> = applied.into_iter().collect();
        requests
            .iter()
            .enumerate()
            .map(|(i, r)| match by_index.remove(&i) {
                Some(result) => result,
                None => {
                    let w = winners[&r.id];
                    SignalResult::other(
                        r.id.qualified(),
                        "superseded",
                        format!(
                            "alert #{w} for the same function in this batch wins (up beats down)"
                        ),
                    )
                }
            })
            .collect()
    }

    /// Runs one input through the engine for one function and carries the decision out.
    /// `quiet` (periodic sources: ticks, idle checks, queries) records only decisions that
    /// scale, so a long hold does not flood the audit trail.
    pub async fn apply(
        &self,
        id: &FunctionId,
        input: Input<'_>,
        source: &str,
        evidence: serde_json::Value,
        quiet: bool,
    ) -> SignalResult {
        let state_lock = self.state_of(id);
        let mut state = state_lock.lock().await;
        let view = match self.fleet.get(id) {
            Ok(v) => v,
            Err(_) => {
                self.forget(id);
                return SignalResult::other(
                    id.qualified(),
                    "unknown_function",
                    format!("function {id} is not deployed"),
                );
            }
        };
        let created = view.function.created_at;
        let previous = self
            .deployed_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), created);
        if previous.is_some_and(|p| p != created) {
            *state = State::default();
        }
        let now = Utc::now();
        let current = view.function.desired_replicas;
        let (policy, dry_run) =
            match policy_for(&id.qualified(), &view.function.deployment, &self.cfg) {
                Ok(p) => p,
                Err(errors) => {
                    let reason = format!("held: invalid scaling labels: {}", errors.join("; "));
                    // Periodic sources would record this every evaluation: answer only.
                    if quiet || matches!(input, Input::Tick | Input::Idle { .. }) {
                        return SignalResult::other(id.qualified(), "held", reason);
                    }
                    let event = self.event(
                        id,
                        now,
                        source,
                        current,
                        current,
                        current,
                        "none",
                        "held",
                        reason,
                        vec![],
                        evidence,
                    );
                    return self.finish(id, &state, event, false).await;
                }
            };
        let quiet = quiet || matches!(input, Input::Tick | Input::Idle { .. });
        let (decision, next) = decide(&policy, current, &state, input, now);
        // A periodic input that changes nothing is not an event: only its state is kept (in
        // memory; the next recorded decision stores it).
        if quiet && decision.outcome != Outcome::Scale {
            *state = next;
            self.set_stepping(id, state.stepping_down);
            return SignalResult::other(id.qualified(), "no_change", decision.reason);
        }
        let direction = match decision.to.cmp(&decision.from) {
            std::cmp::Ordering::Greater => "up",
            std::cmp::Ordering::Less => "down",
            std::cmp::Ordering::Equal => "none",
        };
        // A source that explains its recommendation (a query's value against its target)
        // says so first.
        let mut reason = match evidence.get("why").and_then(|w| w.as_str()) {
            Some(why) => format!("{why}; {}", decision.reason),
            None => decision.reason.clone(),
        };
        let (outcome, keep_state, retryable) = match decision.outcome {
            Outcome::NoChange => ("no_change", true, false),
            Outcome::Held => ("held", true, false),
            Outcome::Scale if dry_run => {
                reason.push_str(" (dry run: not executed)");
                ("dry_run", false, false)
            }
            Outcome::Scale => {
                self.scale_limiter.until_ready().await;
                match self.fleet.scale_from(id, decision.from, decision.to).await {
                    Ok(()) => ("scaled", true, false),
                    Err(FleetError::Conflict(why)) => {
                        reason.push_str(&format!("; superseded: {why}"));
                        ("superseded", false, false)
                    }
                    Err(e) => {
                        let retryable =
                            !matches!(e, FleetError::NotFound(_) | FleetError::Invalid(_));
                        reason.push_str(&format!("; failed: {e}"));
                        ("failed", false, retryable)
                    }
                }
            }
        };
        if keep_state {
            *state = next;
        }
        self.set_stepping(id, state.stepping_down);
        let to = if outcome == "scaled" {
            decision.to
        } else {
            decision.from
        };
        let event = self.event(
            id,
            now,
            source,
            decision.from,
            if outcome == "dry_run" {
                decision.to
            } else {
                to
            },
            decision.recommended,
            direction,
            outcome,
            reason,
            decision.clamps,
            evidence,
        );
        self.finish(id, &state, event, retryable).await
    }

    #[allow(clippy::too_many_arguments)]
    fn event(
        &self,
        id: &FunctionId,
        time: DateTime<Utc>,
        source: &str,
        from: u64,
        to: u64,
        recommended: u64,
        direction: &'static str,
        outcome: &'static str,
        reason: String,
        clamps: Vec<Clamp>,
        evidence: serde_json::Value,
    ) -> ScaleEvent {
        ScaleEvent {
            id: None,
            time,
            function: id.name.clone(),
            namespace: id.namespace.clone(),
            datacenter: self.datacenter.clone(),
            source: source.to_string(),
            from,
            to,
            recommended,
            direction,
            outcome,
            reason,
            clamps,
            evidence,
        }
    }

    /// Stores the state and the event together, counts and logs it.
    async fn finish(
        &self,
        id: &FunctionId,
        state: &State,
        event: ScaleEvent,
        retryable: bool,
    ) -> SignalResult {
        let function_name = id.qualified();
        self.metrics
            .scale_decisions
            .with_label_values(&[
                function_name.as_str(),
                &event.datacenter,
                event.direction,
                event.outcome,
            ])
            .inc();
        tracing::info!(
            function = %id,
            datacenter = %event.datacenter,
            source = %event.source,
            from = event.from,
            to = event.to,
            outcome = event.outcome,
            "{}",
            event.reason
        );
        if let (Some(a), "scaled") = (&self.annotations, event.outcome) {
            a.post(
                event.time.timestamp_millis(),
                vec![
                    "faastastic".to_string(),
                    format!("scale-{}", event.direction),
                    format!("function:{function_name}"),
                    format!("datacenter:{}", event.datacenter),
                ],
                format!(
                    "{} {} → {}: {}",
                    function_name, event.from, event.to, event.reason
                ),
            );
        }
        let record = serde_json::to_string(&event).ok().map(|json| EventRecord {
            at: event.time,
            datacenter: event.datacenter.clone(),
            json,
        });
        let state_json = serde_json::to_string(state).unwrap_or_else(|_| "{}".to_string());
        if let Err(e) = self.store.record_decision(id, state_json, record).await {
            tracing::error!(function = %id, error = %e, "cannot record a scale decision");
        }
        SignalResult {
            function: function_name,
            outcome: event.outcome,
            from: Some(event.from),
            to: Some(event.to),
            reason: event.reason,
            retryable,
        }
    }

    /// Records a change in a metric source's health (once per outage, once per recovery).
    pub async fn record_source_event(
        &self,
        source: &str,
        outcome: &'static str,
        reason: String,
        evidence: serde_json::Value,
    ) {
        tracing::warn!(source, outcome, "{reason}");
        let event = ScaleEvent {
            id: None,
            time: Utc::now(),
            function: String::new(),
            namespace: String::new(),
            datacenter: self.datacenter.clone(),
            source: source.to_string(),
            from: 0,
            to: 0,
            recommended: 0,
            direction: "none",
            outcome,
            reason,
            clamps: Vec::new(),
            evidence,
        };
        if let Err(e) = self
            .store
            .record_source_event(
                &event.datacenter,
                event.time,
                serde_json::to_string(&event).unwrap_or_default(),
            )
            .await
        {
            tracing::error!(source, error = %e, "cannot record a source event");
        }
    }

    pub fn config(&self) -> &AutoscaleConfig {
        &self.cfg
    }

    fn set_stepping(&self, id: &FunctionId, on: bool) {
        let mut stepping = self.stepping.lock().unwrap_or_else(|p| p.into_inner());
        if on {
            stepping.insert(id.clone());
        } else {
            stepping.remove(id);
        }
    }

    fn forget(&self, id: &FunctionId) {
        self.set_stepping(id, false);
        self.states
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// The function's invocation rate as faastastic measured it, for an alert asking for more:
    /// known only once the counters cover half the window and the function has been invoked
    /// through faastastic at all (traffic that bypasses it must not look like no traffic).
    fn observed_rate(&self, id: &FunctionId, action: Action) -> Option<f64> {
        if !matches!(action, Action::StepUp | Action::Sized { .. }) {
            return None;
        }
        let observed = self.observed.lock().unwrap_or_else(|p| p.into_inner());
        let key = id.qualified();
        if observed.span() < observed.window() / 2 || !observed.seen(&key) {
            return None;
        }
        observed.rate(&key)
    }

    /// Steps functions that are scaling down gradually, every `tick_interval`.
    pub fn spawn_ticker(self: &Arc<Self>) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(this.cfg.tick_interval);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                interval.tick().await;
                let counts = this.metrics.invocation_counts();
                this.observed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(std::time::Instant::now(), counts);
                let due: Vec<FunctionId> = this
                    .stepping
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .cloned()
                    .collect();
                futures::future::join_all(
                    due.iter()
                        .map(|id| this.apply(id, Input::Tick, "tick", serde_json::json!({}), true)),
                )
                .await;
                this.scale_idle_to_zero().await;
            }
        });
    }

    /// Functions that opted in to scale to zero and have been idle long enough go to zero.
    async fn scale_idle_to_zero(&self) {
        let now = Utc::now();
        let mut idle = Vec::new();
        for view in self.fleet.all() {
            let f = &view.function;
            if f.desired_replicas == 0 {
                continue;
            }
            let Ok((policy, _)) = policy_for(&f.id.qualified(), &f.deployment, &self.cfg) else {
                continue;
            };
            let Some(after) = policy.scale_to_zero_after else {
                continue;
            };
            let last = self
                .activity
                .last(&f.id)
                .unwrap_or(self.started_at.max(f.created_at));
            let idle_for = (now - last).to_std().unwrap_or_default();
            if idle_for >= after {
                idle.push((f.id.clone(), idle_for, last));
            }
        }
        futures::future::join_all(idle.iter().map(|(id, idle_for, last)| {
            let evidence =
                serde_json::json!({"last_invocation": last, "idle_secs": idle_for.as_secs_f64()});
            self.apply(
                id,
                Input::Idle {
                    idle_for: *idle_for,
                },
                "idle",
                evidence,
                true,
            )
        }))
        .await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use async_trait::async_trait;
    use tokio::sync::watch;

    use super::*;
    use crate::config::Config;
    use crate::model::FunctionDeployment;
    use crate::platform::{
        EndpointSet, LogQuery, LogSubscription, Platform, PlatformError, ReplicaCounts, Workload,
    };

    /// A platform whose scale calls fail while `down` is set: fault injection for the
    /// executor's retry contract.
    #[derive(Default)]
    struct FlakyPlatform {
        down: AtomicBool,
    }

    #[async_trait]
    impl Platform for FlakyPlatform {
        fn kind(&self) -> &'static str {
            "flaky"
        }
        fn validate(&self, _: &FunctionDeployment) -> Result<(), String> {
            Ok(())
        }
        async fn apply(&self, _: Workload, _: u64) -> Result<(), PlatformError> {
            Ok(())
        }
        async fn scale(&self, _: &FunctionId, _: u64) -> Result<(), PlatformError> {
            if self.down.load(Ordering::SeqCst) {
                Err(PlatformError::Failed("datacenter unreachable".into()))
            } else {
                Ok(())
            }
        }
        async fn remove(&self, _: &FunctionId) -> Result<(), PlatformError> {
            Ok(())
        }
        fn replicas(&self, _: &FunctionId) -> ReplicaCounts {
            ReplicaCounts::default()
        }
        fn endpoints(&self, _: &FunctionId) -> Option<Arc<EndpointSet>> {
            None
        }
        fn watch_ready(&self, _: &FunctionId) -> Option<watch::Receiver<u64>> {
            None
        }
        fn logs(&self, _: &FunctionId, _: &LogQuery) -> Option<LogSubscription> {
            None
        }
        async fn shutdown(&self) {}
    }

    #[tokio::test]
    async fn a_failed_platform_call_is_retryable_and_changes_no_state() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).unwrap();
        let platform = Arc::new(FlakyPlatform::default());
        let fleet = Arc::new(
            Fleet::restore(store.clone(), platform.clone(), "openfaas-fn", 64)
                .await
                .unwrap(),
        );
        let id = fleet
            .deploy(FunctionDeployment {
                service: Some("f".into()),
                image: Some("i".into()),
                ..Default::default()
            })
            .await
            .unwrap();
        let scaler = Autoscaler::restore(
            fleet.clone(),
            store,
            Arc::new(Metrics::new()),
            Arc::new(Activity::default()),
            None,
            Config::default().autoscale,
            "home",
        )
        .await
        .unwrap();
        let firing = |key: &str| SignalRequest {
            id: id.clone(),
            action: Action::StepUp,
            dedupe_key: Some(key.to_string()),
            source: "alert".into(),
            evidence: serde_json::json!({}),
        };
        platform.down.store(true, Ordering::SeqCst);
        let failed = scaler.apply_batch(vec![firing("a")]).await;
        assert_eq!(failed[0].outcome, "failed");
        assert!(failed[0].retryable);
        assert!(
            failed[0].reason.contains("datacenter unreachable"),
            "{}",
            failed[0].reason
        );
        assert_eq!(fleet.get(&id).unwrap().function.desired_replicas, 1);
        // Alertmanager's retry of the same alert is applied, not taken for a duplicate and not
        // held by a cooldown that the failed attempt never started.
        platform.down.store(false, Ordering::SeqCst);
        let retried = scaler.apply_batch(vec![firing("a")]).await;
        assert_eq!((retried[0].outcome, retried[0].to), ("scaled", Some(2)));
        assert!(!retried[0].retryable);

        // A decision made from a count that changed meanwhile (a manual scale) is not applied.
        let stale = fleet.scale_from(&id, 1, 3).await;
        assert!(matches!(stale, Err(FleetError::Conflict(_))), "{stale:?}");
        assert_eq!(fleet.get(&id).unwrap().function.desired_replicas, 2);
        fleet.scale_from(&id, 2, 3).await.unwrap();
        assert_eq!(fleet.get(&id).unwrap().function.desired_replicas, 3);
    }
}
