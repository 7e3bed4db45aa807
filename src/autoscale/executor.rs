//! Applies the engine's decisions: one function at a time (a per-function lock, so racing
//! webhooks never lose an update), different functions concurrently, platform calls
//! rate-limited. Every decision becomes a scale event in the store, a metric and a log line;
//! the engine's state (cooldowns, window) is stored with it and read back after a restart.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Serialize;

use super::clock::Clock;
use super::labels::policy_for;
use super::policy::reason::Paused;
use super::policy::{decide, Action, Clamp, Input, Outcome, Policy, State};
use super::rates::RateWindow;
use crate::config::AutoscaleConfig;
pub use crate::events::{ScaleEvent, Verdict};
use crate::fleet::{Fleet, FleetError, OnFailure, Scaled};
use crate::model::FunctionId;
use crate::platform::PlatformError;
use crate::proxy::Activity;
use crate::store::{self, EventRecord, Store, StoreError};
use crate::telemetry::Metrics;

/// One request to scale, from an alert or another source.
#[derive(Debug, Clone)]
pub struct SignalRequest {
    pub id: FunctionId,
    /// `None`: every datacenter the function runs in (an alert's value is shared equally).
    pub datacenter: Option<String>,
    pub action: Action,
    pub dedupe_key: Option<String>,
    /// Where it came from, e.g. `alert`.
    pub source: String,
    /// What supports it (alert name, fingerprint, labels...), stored with the event.
    pub evidence: serde_json::Value,
}

/// The answer for one signal, as the webhook reports it.
#[derive(Debug, Clone, Serialize)]
pub struct SignalResult {
    pub function: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub datacenter: Option<String>,
    pub outcome: Verdict,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<u64>,
    pub reason: String,
    /// A platform call failed: the sender should retry.
    #[serde(skip)]
    pub retryable: bool,
}

/// Decisions of one webhook payload in progress at once. Their store writes queue for one
/// connection anyway; starting all of a 1,000-alert payload's (3,000 in three datacenters)
/// at once only held every one's evidence and state copies at the same time.
const CONCURRENT_DECISIONS: usize = 64;

impl SignalResult {
    fn in_datacenter(mut self, dc: &str) -> Self {
        self.datacenter = Some(dc.to_string());
        self
    }

    /// One result for a signal applied in several datacenters: the most telling outcome,
    /// counts summed, reasons prefixed with their datacenter.
    fn combine(function: String, mut results: Vec<SignalResult>) -> SignalResult {
        if results.len() == 1 {
            return results.remove(0);
        }
        let outcome = results
            .iter()
            .map(|r| r.outcome)
            .min()
            .unwrap_or(Verdict::NoChange);
        let sum = |get: fn(&SignalResult) -> Option<u64>| {
            results
                .iter()
                .map(get)
                .try_fold(0u64, |acc, v| v.map(|v| acc.saturating_add(v)))
        };
        SignalResult {
            function,
            datacenter: None,
            outcome,
            from: sum(|r| r.from),
            to: sum(|r| r.to),
            reason: results
                .iter()
                .map(|r| format!("{}: {}", r.datacenter.as_deref().unwrap_or("?"), r.reason))
                .collect::<Vec<_>>()
                .join(" | "),
            retryable: results.iter().any(|r| r.retryable),
        }
    }

    pub fn other(function: String, outcome: Verdict, reason: String) -> Self {
        SignalResult {
            function,
            datacenter: None,
            outcome,
            from: None,
            to: None,
            reason,
            retryable: false,
        }
    }
}

/// Engine state is kept per function and datacenter.
type Key = (FunctionId, String);

pub struct Autoscaler {
    fleet: Arc<Fleet>,
    store: Store,
    metrics: Arc<Metrics>,
    cfg: AutoscaleConfig,
    states: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<Tracked>>>>,
    /// Functions in a gradual scale-down, which the ticker keeps stepping.
    stepping: Mutex<HashSet<Key>>,
    scale_limiter: DefaultDirectRateLimiter,
    activity: Arc<Activity>,
    /// Idle time counts from here for functions not invoked since the server started.
    started_at: DateTime<Utc>,
    annotations: Option<Arc<crate::grafana::Annotations>>,
    /// Faastastic's own invocation counters over `staleness_window`, for the staleness guard.
    observed: Mutex<RateWindow<(String, String)>>,
    /// Paused scopes (`*`: every function; else `name.namespace`) with since when and why.
    paused: Mutex<HashMap<String, Pause>>,
    clock: Arc<dyn Clock>,
}

/// One function's engine state in one datacenter.
#[derive(Default)]
struct Tracked {
    state: State,
    /// Which deployment the state belongs to (its `createdAt`): a function deleted and
    /// deployed again under the same name starts with a fresh state.
    deployed_at: Option<DateTime<Utc>>,
    /// The last shadow (dry-run) decision a periodic source recorded, as (from, to): the same
    /// one again is not recorded (nor annotated) until the recommendation changes.
    last_shadow: Option<(u64, u64)>,
    /// The state as this instance last stored or read it: on a shared store, a different one
    /// there means another instance decided since, and its state is taken over. (The state in
    /// memory may be ahead of it: periodic inputs that change nothing are not stored.)
    stored: Option<String>,
}

/// A pause of autoscaling, as `/system/autoscaling` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct Pause {
    /// `*` for every function, else `name.namespace`.
    pub scope: String,
    pub since: DateTime<Utc>,
    pub reason: String,
}

/// The pauses the store holds, by scope.
async fn stored_pauses(store: &Store) -> Result<HashMap<String, Pause>, StoreError> {
    Ok(store
        .load_pauses()
        .await?
        .into_iter()
        .map(|(scope, since, reason)| {
            let pause = Pause {
                scope: scope.clone(),
                since,
                reason,
            };
            (scope, pause)
        })
        .collect())
}

/// The scope that pauses every function.
pub const ALL: &str = "*";

fn rank(action: Action) -> u8 {
    match action {
        Action::StepUp | Action::Sized { .. } | Action::To(_) | Action::Track(_) => 2,
        // Holds are not scale signals: they never compete (see `apply_batch`).
        Action::Hold | Action::Release => 0,
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
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Autoscaler>, StoreError> {
        let mut states = HashMap::new();
        let mut stepping = HashSet::new();
        for (id, dc, json) in store.load_autoscale_states(fleet.home()).await? {
            match serde_json::from_str::<State>(&json) {
                Ok(state) => {
                    let key = (id, dc);
                    if state.stepping_down {
                        stepping.insert(key.clone());
                    }
                    let tracked = Tracked {
                        state,
                        deployed_at: None,
                        last_shadow: None,
                        stored: Some(json),
                    };
                    states.insert(key, Arc::new(tokio::sync::Mutex::new(tracked)));
                }
                Err(e) => {
                    tracing::warn!(function = %id, datacenter = %dc, error = %e, "ignoring unreadable autoscaler state")
                }
            }
        }
        let paused = stored_pauses(&store).await?;
        let per_sec = NonZeroU32::new(cfg.scale_rate_per_sec.max(1)).expect("max(1) is non-zero");
        Ok(Arc::new(Autoscaler {
            paused: Mutex::new(paused),
            fleet,
            store,
            metrics,
            states: Mutex::new(states),
            stepping: Mutex::new(stepping),
            scale_limiter: RateLimiter::direct(Quota::per_second(per_sec)),
            activity,
            started_at: clock.now(),
            clock,
            annotations,
            observed: Mutex::new(RateWindow::new(cfg.staleness_window)),
            cfg,
        }))
    }

    fn state_of(&self, key: &Key) -> Arc<tokio::sync::Mutex<Tracked>> {
        self.states
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .clone()
    }

    /// The datacenters a request applies to, each with its share of an alert's value.
    fn expand(&self, r: &SignalRequest) -> Vec<(String, Action)> {
        if let Some(dc) = &r.datacenter {
            return vec![(dc.clone(), r.action)];
        }
        let dcs: Vec<String> = match self.fleet.placement_of(&r.id) {
            Some(placed) => placed.into_keys().collect(),
            None => vec![self.fleet.home().to_string()],
        };
        let share = dcs.len().max(1) as f64;
        dcs.into_iter()
            .map(|dc| {
                let action = match r.action {
                    Action::Sized { value, target } => Action::Sized {
                        value: value / share,
                        target,
                    },
                    other => other,
                };
                (dc, action)
            })
            .collect()
    }

    /// Applies a batch (one webhook): per function and datacenter, the strongest signal wins
    /// (up beats down, then the first); the rest are reported as superseded. A signal without
    /// a datacenter applies to each of the function's datacenters. Results come in input order.
    pub async fn apply_batch(&self, requests: Vec<SignalRequest>) -> Vec<SignalResult> {
        // (request index, datacenter, action) for every datacenter each request touches.
        let parts: Vec<(usize, String, Action)> = requests
            .iter()
            .enumerate()
            .flat_map(|(i, r)| {
                self.expand(r)
                    .into_iter()
                    .map(move |(dc, action)| (i, dc, action))
            })
            .collect();
        let mut winners: HashMap<Key, usize> = HashMap::new();
        let mut holds: Vec<usize> = Vec::new();
        for (p, (i, dc, action)) in parts.iter().enumerate() {
            if matches!(action, Action::Hold | Action::Release) {
                holds.push(p);
                continue;
            }
            let w = winners
                .entry((requests[*i].id.clone(), dc.clone()))
                .or_insert(p);
            if rank(*action) > rank(parts[*w].2) {
                *w = p;
            }
        }
        // Holds apply first, so a scale signal in the same payload already sees them.
        let mut by_part: HashMap<usize, SignalResult> = HashMap::new();
        for &p in &holds {
            let (i, dc, action) = &parts[p];
            let r = &requests[*i];
            let input = Input::Signal {
                action: *action,
                dedupe_key: r.dedupe_key.as_deref(),
                observed_rate: None,
            };
            let result = self
                .apply(&r.id, dc, input, &r.source, r.evidence.clone(), false)
                .await;
            by_part.insert(p, result);
        }
        let chosen: HashSet<usize> = winners.values().copied().collect();
        let applied = futures::stream::iter(chosen.into_iter().map(|p| {
            let (i, dc, action) = &parts[p];
            let r = &requests[*i];
            async move {
                let input = Input::Signal {
                    action: *action,
                    dedupe_key: r.dedupe_key.as_deref(),
                    observed_rate: self.observed_rate(&r.id, dc, *action),
                };
                let mut evidence = r.evidence.clone();
                if let (Action::Sized { value, .. }, Some(obj)) = (action, evidence.as_object_mut())
                {
                    obj.insert("value_share".into(), serde_json::json!(value));
                }
                (
                    p,
                    self.apply(&r.id, dc, input, &r.source, evidence, false)
                        .await,
                )
            }
        }))
        .buffer_unordered(CONCURRENT_DECISIONS)
        .collect::<Vec<_>>()
        .await;
        by_part.extend(applied);
        let mut per_request: Vec<Vec<SignalResult>> = vec![Vec::new(); requests.len()];
        for (p, (i, dc, _)) in parts.iter().enumerate() {
            let result = match by_part.remove(&p) {
                Some(result) => result,
                None => {
                    let w = winners[&(requests[*i].id.clone(), dc.clone())];
                    SignalResult::other(
                        requests[*i].id.qualified(),
                        Verdict::Superseded,
                        format!(
                            "alert #{} for the same function in this batch wins (up beats down)",
                            parts[w].0
                        ),
                    )
                }
            };
            per_request[*i].push(result.in_datacenter(dc));
        }
        per_request
            .into_iter()
            .zip(&requests)
            .map(|(results, r)| SignalResult::combine(r.id.qualified(), results))
            .collect()
    }

    /// Runs one input through the engine for one function in one datacenter and carries the
    /// decision out. `quiet` (periodic sources: ticks, idle checks, queries) records only
    /// decisions that scale, so a long hold does not flood the audit trail.
    pub async fn apply(
        &self,
        id: &FunctionId,
        datacenter: &str,
        input: Input<'_>,
        source: &str,
        evidence: serde_json::Value,
        quiet: bool,
    ) -> SignalResult {
        let mut failure = None;
        self.apply_noting(
            id,
            datacenter,
            input,
            source,
            evidence,
            quiet,
            OnFailure::Undo,
            &mut failure,
        )
        .await
    }

    /// [`Self::apply`], with what a failed platform call does to the decision, leaving the
    /// error of a failed platform or store call in `failure` for callers that answer with its
    /// kind (a full disk is a 507).
    #[allow(clippy::too_many_arguments)]
    async fn apply_noting(
        &self,
        id: &FunctionId,
        datacenter: &str,
        input: Input<'_>,
        source: &str,
        evidence: serde_json::Value,
        quiet: bool,
        on_failure: OnFailure,
        failure: &mut Option<FleetError>,
    ) -> SignalResult {
        let key: Key = (id.clone(), datacenter.to_string());
        let state_lock = self.state_of(&key);
        let mut tracked = state_lock.lock().await;
        // Held until the decision is stored and carried out.
        let _held = match self.follow(&key, &mut tracked).await {
            Ok(held) => held,
            Err(e) => {
                let mut result = SignalResult::other(
                    id.qualified(),
                    Verdict::Failed,
                    format!("cannot read the shared store: {e}"),
                );
                result.retryable = true;
                *failure = Some(e);
                return result;
            }
        };
        let (function, current) = match self.fleet.get(id) {
            Ok(v) => match v.function.desired_in(datacenter) {
                Some(current) => (v.function, current),
                None => {
                    self.forget_key(&key);
                    return SignalResult::other(
                        id.qualified(),
                        Verdict::UnknownFunction,
                        format!("function {id} is not in datacenter {datacenter}"),
                    );
                }
            },
            Err(_) => {
                self.forget(id);
                return SignalResult::other(
                    id.qualified(),
                    Verdict::UnknownFunction,
                    format!("function {id} is not deployed"),
                );
            }
        };
        let created = function.created_at;
        if tracked
            .deployed_at
            .replace(created)
            .is_some_and(|p| p != created)
        {
            tracked.state = State::default();
        }
        let state = &mut tracked.state;
        let now = self.clock.now();
        let policy = self.policy_of(id, &function.deployment);
        // A function whose stored labels the current settings refuse (the configuration
        // changed since its deploy) is still woken, to its labels' min: its invocations must
        // be answered. Every other input is held and says why.
        let fallback;
        let (policy, dry_run) = match policy.as_ref() {
            Ok((p, dry_run)) => (p, *dry_run),
            Err(_) if matches!(input, Input::Wake { .. }) => {
                fallback = Policy {
                    min: function.deployment.min_replicas(),
                    max: self.fleet.max_replicas(),
                    ..Policy::default()
                };
                (&fallback, false)
            }
            Err(errors) => {
                let reason = format!("held: invalid scaling labels: {}", errors.join("; "));
                // Periodic sources would record this every evaluation: answer only.
                if quiet || matches!(input, Input::Tick | Input::Idle { .. }) {
                    return SignalResult::other(id.qualified(), Verdict::Held, reason);
                }
                let mut event = ScaleEvent::about(&key.0, datacenter, now, source, current);
                event.outcome = Verdict::Held;
                event.reason = reason;
                event.reason_code = "invalid_labels";
                event.evidence = evidence;
                let result = self.finish(&key, state, event, false, false).await;
                tracked.stored = Some(state_json(&tracked.state));
                return result;
            }
        };
        let quiet = quiet || matches!(input, Input::Tick | Input::Idle { .. });
        // Periodic sources run on the leader: what they change carries its fencing token, so
        // a decision still in flight when another instance took over is refused by the store.
        // A wake from zero is quiet too, but comes from an invocation on any instance.
        let leader = self.fleet.leader();
        let periodic = quiet && !matches!(input, Input::Wake { .. });
        let fence = if periodic && leader.elected() {
            match leader.token() {
                Some(token) => Some(token),
                None => {
                    let reason = "held: this instance no longer leads".to_string();
                    return SignalResult::other(id.qualified(), Verdict::Held, reason);
                }
            }
        } else {
            None
        };
        // Shadow mode is for trying scaling rules: a function at zero is still woken, or its
        // invocations would go unanswered, and an operator's manual scale is carried out.
        let manual = matches!(input, Input::Manual { .. });
        let dry_run = dry_run && !manual && !matches!(input, Input::Wake { .. });
        let (mut decision, mut next) = decide(policy, current, state, input, now);
        // Paused: the decision is computed and explained, but nothing changes, not even the
        // engine's memory (no cooldown starts, no alert counts as applied). A pause stops
        // autoscaling, not the operator.
        let pause = self.pause_of(id).filter(|_| !manual);
        if let (Outcome::Scale, Some(pause)) = (decision.outcome, pause) {
            decision.outcome = Outcome::Held;
            decision.clamps.push(Clamp::Paused);
            decision.reason.paused = Some(Paused {
                all: pause.scope == ALL,
                since: pause.since,
                why: pause.reason,
            });
            next = state.clone();
        }
        // A periodic input that changes nothing is not an event: only its state is kept (in
        // memory; the next recorded decision stores it).
        if quiet && decision.outcome != Outcome::Scale {
            tracked.last_shadow = None;
            let state = &mut tracked.state;
            *state = next;
            self.set_stepping(&key, state.stepping_down);
            let reason = decision.reason.to_string();
            return SignalResult::other(id.qualified(), Verdict::NoChange, reason);
        }
        // In shadow mode nothing changes, so a periodic source would recommend the same step
        // at every evaluation: it is recorded once, until the recommendation changes.
        if quiet && dry_run {
            let shadow = (decision.from, decision.to);
            if tracked.last_shadow.replace(shadow) == Some(shadow) {
                let reason = decision.reason.to_string();
                return SignalResult::other(id.qualified(), Verdict::DryRun, reason);
            }
        }
        let state = &mut tracked.state;
        // The event as it reads when the decision is executed; the arms below amend it.
        let mut event = ScaleEvent::about(&key.0, datacenter, now, source, decision.from);
        event.direction = match decision.to.cmp(&decision.from) {
            std::cmp::Ordering::Greater => "up",
            std::cmp::Ordering::Less => "down",
            std::cmp::Ordering::Equal => "none",
        };
        if decision.outcome == Outcome::Scale {
            event.to = decision.to;
        }
        event.recommended = decision.recommended;
        event.outcome = Verdict::Scaled;
        // A source that explains its recommendation (a query's value against its target)
        // says so first.
        event.reason = match evidence.get("why").and_then(|w| w.as_str()) {
            Some(why) => format!("{why}; {}", decision.reason),
            None => decision.reason.to_string(),
        };
        event.reason_code = decision.reason.code();
        event.clamps = decision.clamps;
        event.evidence = evidence;
        let mut recorded = false;
        let (outcome, keep_state, retryable) = match decision.outcome {
            Outcome::NoChange => (Verdict::NoChange, true, false),
            Outcome::Held => (Verdict::Held, true, false),
            Outcome::Scale if dry_run => {
                event.reason.push_str(" (dry run: not executed)");
                (Verdict::DryRun, false, false)
            }
            Outcome::Scale => {
                self.scale_limiter.until_ready().await;
                // The decision is stored with the desired count it sets, before the platform
                // is called: a crash from here on neither loses it nor lets it apply twice.
                let ahead = store::Decision {
                    datacenter: datacenter.to_string(),
                    state_json: state_json(&next),
                    previous_state_json: state_json(state),
                    event: event_record(&event),
                    fence,
                };
                match self
                    .fleet
                    .scale_from(
                        id,
                        datacenter,
                        decision.from,
                        decision.to,
                        Some(&ahead),
                        on_failure,
                    )
                    .await
                {
                    Ok(Scaled::Unchanged) => (Verdict::Scaled, true, false),
                    Ok(Scaled::Applied { event: stored }) => {
                        recorded = stored.is_some();
                        (Verdict::Scaled, true, false)
                    }
                    // An operator's count, kept although the platform call failed: the
                    // decision stands (its stored event now says why), the reconciler
                    // converges it, and the answer says the platform failed.
                    Ok(Scaled::Kept { event: stored, why }) => {
                        event.reason.push_str(&format!("; {why}"));
                        if let Some(stored) = stored {
                            recorded = true;
                            let json = event_record(&event).json;
                            if let Err(e) = self.store.amend_event(stored, json).await {
                                tracing::error!(function = %id, error = %e, "cannot amend a scale event");
                            }
                        }
                        (Verdict::Scaled, true, true)
                    }
                    Err(e) => {
                        event.to = decision.from;
                        match e {
                            FleetError::Conflict(why) => {
                                event.reason.push_str(&format!("; superseded: {why}"));
                                (Verdict::Superseded, false, false)
                            }
                            e => {
                                let retryable =
                                    !matches!(e, FleetError::NotFound(_) | FleetError::Invalid(_));
                                event.reason.push_str(&format!("; failed: {e}"));
                                *failure = Some(e);
                                (Verdict::Failed, false, retryable)
                            }
                        }
                    }
                }
            }
        };
        event.outcome = outcome;
        if keep_state {
            *state = next;
        }
        self.set_stepping(&key, state.stepping_down);
        let result = self.finish(&key, state, event, retryable, recorded).await;
        tracked.stored = Some(state_json(&tracked.state));
        result
    }

    /// On a shared store: holds the function against the other instances and reads it and its
    /// state as they are there now (another instance may have decided since). Nothing to do
    /// on a store of one's own.
    async fn follow(
        &self,
        (id, datacenter): &Key,
        tracked: &mut Tracked,
    ) -> Result<Option<store::Guard>, FleetError> {
        let held = self.fleet.hold_shared(id).await?;
        if held.is_none() {
            return Ok(None);
        }
        let stored = self.store.load_state(id, datacenter).await?;
        self.adopt(&(id.clone(), datacenter.clone()), tracked, stored);
        Ok(held)
    }

    /// Takes over a state another instance stored, when it differs from the one this instance
    /// last stored or read.
    fn adopt(&self, key: &Key, tracked: &mut Tracked, stored: Option<String>) {
        if stored == tracked.stored {
            return;
        }
        tracked.state = stored
            .as_deref()
            .and_then(|json| serde_json::from_str(json).ok())
            .unwrap_or_default();
        tracked.stored = stored;
        tracked.last_shadow = None;
        self.set_stepping(key, tracked.state.stepping_down);
    }

    /// Reads every function's states again from a shared store (after a gap in the change
    /// announcements, and as a safety net), or one function's (`only`) when another instance
    /// announced a decision about it.
    pub async fn refresh_states(&self, only: Option<&FunctionId>) -> Result<(), StoreError> {
        let rows: Vec<(FunctionId, String, Option<String>)> = match only {
            Some(id) => {
                // Each read while its state is held, so that no decision here lands between
                // the read and its adoption (which would put an older state back).
                for dc in self.fleet.placement_of(id).unwrap_or_default().into_keys() {
                    let key = (id.clone(), dc);
                    let lock = self.state_of(&key);
                    let Ok(mut tracked) = lock.try_lock() else {
                        continue;
                    };
                    let stored = self.store.load_state(id, &key.1).await?;
                    self.adopt(&key, &mut tracked, stored);
                }
                return Ok(());
            }
            None => self
                .store
                .load_autoscale_states(self.fleet.home())
                .await?
                .into_iter()
                .map(|(id, dc, json)| (id, dc, Some(json)))
                .collect(),
        };
        for (id, dc, stored) in rows {
            let key = (id, dc);
            let lock = self.state_of(&key);
            // A decision in progress here reads the store itself when it next runs.
            let Ok(mut tracked) = lock.try_lock() else {
                continue;
            };
            self.adopt(&key, &mut tracked, stored);
        }
        Ok(())
    }

    /// Reads the pauses again from a shared store (another instance paused or resumed).
    pub async fn reload_pauses(&self) -> Result<(), StoreError> {
        let paused = stored_pauses(&self.store).await?;
        *self.paused.lock().unwrap_or_else(|p| p.into_inner()) = paused;
        Ok(())
    }

    /// Stores the state and the event together, counts and logs it.
    async fn finish(
        &self,
        (id, datacenter): &Key,
        state: &State,
        event: ScaleEvent,
        retryable: bool,
        recorded: bool,
    ) -> SignalResult {
        let function_name = id.qualified();
        self.metrics
            .scale_decisions
            .with_label_values(&[
                function_name.as_str(),
                &event.datacenter,
                event.direction,
                event.outcome.as_str(),
            ])
            .inc();
        tracing::info!(
            function = %id,
            datacenter = %event.datacenter,
            source = %event.source,
            from = event.from,
            to = event.to,
            outcome = event.outcome.as_str(),
            reason_code = event.reason_code,
            "{}",
            event.reason
        );
        // Executed decisions are annotated; shadow-mode ones too, marked as what would happen.
        let shadow = event.outcome == Verdict::DryRun;
        if let (Some(a), Verdict::Scaled | Verdict::DryRun) = (&self.annotations, event.outcome) {
            let mut tags = vec![
                "faastastic".to_string(),
                format!("scale-{}", event.direction),
                format!("function:{function_name}"),
                format!("datacenter:{}", event.datacenter),
            ];
            if shadow {
                tags.push("shadow".to_string());
            }
            a.post(
                event.time.timestamp_millis(),
                tags,
                format!(
                    "{}{} {} → {}: {}",
                    if shadow {
                        "would scale (shadow mode): "
                    } else {
                        ""
                    },
                    function_name,
                    event.from,
                    event.to,
                    event.reason
                ),
            );
        }
        if !recorded {
            if let Err(e) = self
                .store
                .record_decision(
                    id,
                    datacenter,
                    state_json(state),
                    Some(event_record(&event)),
                )
                .await
            {
                tracing::error!(function = %id, error = %e, "cannot record a scale decision");
            }
        }
        SignalResult {
            function: function_name,
            datacenter: Some(datacenter.clone()),
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
        outcome: Verdict,
        reason: String,
        evidence: serde_json::Value,
    ) {
        self.record_event_about(None, source, outcome, reason, evidence)
            .await
    }

    /// Records an event that is not a decision, about one function (so that
    /// `scale-events?function=NAME` finds it) or about none.
    async fn record_event_about(
        &self,
        function: Option<&FunctionId>,
        source: &str,
        outcome: Verdict,
        reason: String,
        evidence: serde_json::Value,
    ) {
        tracing::warn!(source, outcome = outcome.as_str(), "{reason}");
        // Nothing changes: a function's event reads its replicas as they stand.
        let replicas = function
            .and_then(|f| self.fleet.desired_replicas(f))
            .unwrap_or(0);
        let nobody = FunctionId::new(String::new(), String::new());
        let about = function.unwrap_or(&nobody);
        let now = self.clock.now();
        let mut event = ScaleEvent::about(about, self.fleet.home(), now, source, replicas);
        event.outcome = outcome;
        event.reason = reason;
        event.reason_code = outcome.as_str();
        event.evidence = evidence;
        if let Err(e) = self
            .store
            .record_source_event(
                &event.namespace,
                &event.function,
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

    /// Now, on the autoscaler's clock.
    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    fn set_stepping(&self, key: &Key, on: bool) {
        let mut stepping = self.stepping.lock().unwrap_or_else(|p| p.into_inner());
        if on {
            stepping.insert(key.clone());
        } else {
            stepping.remove(key);
        }
    }

    fn forget_key(&self, key: &Key) {
        self.set_stepping(key, false);
        self.states
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// Drops every datacenter's state of a function that is gone.
    fn forget(&self, id: &FunctionId) {
        self.stepping
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(f, _)| f != id);
        self.states
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(f, _), _| f != id);
    }

    /// A function's policy as the fleet worked it out when its spec was stored (worked out
    /// here only for a function removed meanwhile).
    fn policy_of(
        &self,
        id: &FunctionId,
        deployment: &crate::model::FunctionDeployment,
    ) -> Arc<crate::fleet::PolicyOf> {
        self.fleet
            .policy(id)
            .unwrap_or_else(|| Arc::new(policy_for(&id.qualified(), deployment, &self.cfg)))
    }

    /// One datacenter's share of a manual scale, as an engine decision, with the platform's
    /// or store's error when it was not carried out.
    async fn manual_share(
        &self,
        id: &FunctionId,
        datacenter: &str,
        replicas: u64,
        override_bounds: bool,
        evidence: &serde_json::Value,
        on_failure: OnFailure,
    ) -> (SignalResult, Option<FleetError>) {
        let input = Input::Manual {
            replicas,
            override_bounds,
        };
        let mut failure = None;
        let result = self
            .apply_noting(
                id,
                datacenter,
                input,
                "manual",
                evidence.clone(),
                false,
                on_failure,
                &mut failure,
            )
            .await;
        (result, failure)
    }

    /// `POST /system/scale-function`: a manual scale, in one datacenter or as a total spread
    /// over the function's datacenters. It must stay within the function's min and max (per
    /// datacenter; 0, scale to zero, is always allowed) unless `override_bounds`, and it is
    /// recorded as an event from source `manual`.
    pub async fn manual_scale(
        &self,
        id: &FunctionId,
        datacenter: Option<&str>,
        replicas: u64,
        override_bounds: bool,
    ) -> Result<(), FleetError> {
        let view = self.fleet.get_in(id, datacenter)?;
        let policy = self.policy_of(id, &view.function.deployment);
        let (policy, _) = policy
            .as_ref()
            .as_ref()
            .map_err(|errors| FleetError::Invalid(errors.clone()))?;
        let k = view.datacenters.len().max(1) as u64;
        let (min, max) = (policy.min.saturating_mul(k), policy.max.saturating_mul(k));
        let outside = replicas != 0 && !(min..=max).contains(&replicas);
        let from = view.replicas.desired;
        let over_limit = replicas > self.fleet.max_replicas().saturating_mul(k);
        if outside && !override_bounds && !over_limit {
            let per = if k > 1 {
                format!(" ({k} datacenters × {}..{})", policy.min, policy.max)
            } else {
                String::new()
            };
            return Err(FleetError::Invalid(vec![format!(
                "replicas: {replicas} is outside {min}..{max}{per}, the function's min and max; send \"override\": true to scale outside them"
            )]));
        }
        // Each datacenter's share is a decision of its own, recorded as such; a share that
        // cannot run is refused before any of them is made.
        let shares = self.fleet.shares_of(id, datacenter, replicas)?;
        let evidence = serde_json::json!({
            "override": outside,
            "requested": replicas,
            "datacenter": datacenter.unwrap_or("*"),
            "from": from,
        });
        // As any change across datacenters: when every datacenter's platform fails, nothing
        // changes; when some succeed, the shares that failed are decided again and kept for
        // the reconciler, so the total the operator asked for is what the fleet converges to.
        let mut failed: Vec<(String, Option<u64>, String)> = Vec::new();
        let (mut conflict, mut store_error, mut done) = (false, None, 0);
        // A share refused as not found or invalid (the function or datacenter went meanwhile)
        // keeps that kind, as the request's own checks answer it.
        let (mut not_found, mut invalid) = (false, false);
        // The datacenters are called at once: a spread costs what its slowest datacenter costs.
        let results = futures::future::join_all(shares.iter().map(|(dc, n)| {
            self.manual_share(id, dc, *n, override_bounds, &evidence, OnFailure::Undo)
        }))
        .await;
        for ((dc, n), (result, failure)) in shares.iter().zip(results) {
            match (result.outcome, failure) {
                (Verdict::Scaled | Verdict::NoChange, _) => done += 1,
                (outcome, failure) => {
                    conflict |= outcome == Verdict::Superseded;
                    not_found |= outcome == Verdict::UnknownFunction
                        || matches!(failure, Some(FleetError::NotFound(_)));
                    invalid |= matches!(failure, Some(FleetError::Invalid(_)));
                    let platform = matches!(
                        failure,
                        Some(FleetError::Platform(_) | FleetError::Partial(_))
                    );
                    if let Some(FleetError::Store(e)) = failure {
                        store_error.get_or_insert(e);
                    }
                    let reason = format!("{dc}: {}", result.reason);
                    failed.push((dc.clone(), platform.then_some(*n), reason));
                }
            }
        }
        if done > 0 {
            let kept = failed.iter().filter_map(|(dc, n, _)| {
                let n = (*n)?;
                Some(self.manual_share(id, dc, n, override_bounds, &evidence, OnFailure::Keep))
            });
            futures::future::join_all(kept).await;
        }
        let why = failed
            .iter()
            .map(|(_, _, reason)| reason.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        if let (Some(e), 0) = (store_error, done) {
            return Err(FleetError::Store(e));
        }
        match (failed.is_empty(), done) {
            (true, _) => Ok(()),
            (false, 0) if conflict => Err(FleetError::Conflict(why)),
            (false, 0) if not_found => Err(FleetError::NotFound(why)),
            (false, 0) if invalid => Err(FleetError::Invalid(vec![why])),
            (false, 0) => Err(FleetError::Platform(PlatformError::Failed(why))),
            (false, _) => Err(FleetError::Partial(why)),
        }
    }

    /// The pause that holds a function, if any (a pause of all wins).
    pub fn pause_of(&self, id: &FunctionId) -> Option<Pause> {
        let paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        paused
            .get(ALL)
            .or_else(|| paused.get(&id.qualified()))
            .cloned()
    }

    /// Whether any pause is in force (the function list asks before looking each one up).
    pub fn any_paused(&self) -> bool {
        !self
            .paused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    pub fn pauses(&self) -> Vec<Pause> {
        let mut out: Vec<Pause> = self
            .paused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        out.sort_by(|a, b| a.scope.cmp(&b.scope));
        out
    }

    /// Pauses (`Some(reason)`) or resumes (`None`) autoscaling of a scope (`*` or
    /// `name.namespace`), stored so it survives a restart, and recorded as an event. Returns
    /// whether anything changed.
    pub async fn set_pause(&self, scope: &str, reason: Option<String>) -> Result<bool, StoreError> {
        let now = self.clock.now();
        let changed = self
            .store
            .set_pause(scope, reason.clone().map(|r| (now, r)))
            .await?;
        if !changed {
            return Ok(false);
        }
        {
            let mut paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
            match &reason {
                Some(r) => {
                    paused.insert(
                        scope.to_string(),
                        Pause {
                            scope: scope.to_string(),
                            since: now,
                            reason: r.clone(),
                        },
                    );
                }
                None => {
                    paused.remove(scope);
                }
            }
        }
        let what = if scope == ALL {
            "all functions".to_string()
        } else {
            scope.to_string()
        };
        let (outcome, text) = match &reason {
            Some(r) => (
                Verdict::Paused,
                format!("autoscaling of {what} paused: {r}"),
            ),
            None => (Verdict::Resumed, format!("autoscaling of {what} resumed")),
        };
        let function = (scope != ALL)
            .then(|| crate::model::split_qualified(scope))
            .and_then(|(name, namespace)| Some(FunctionId::new(name, namespace?)));
        self.record_event_about(
            function.as_ref(),
            "operator",
            outcome,
            text,
            serde_json::json!({"scope": scope}),
        )
        .await;
        Ok(true)
    }

    /// The function's invocation rate in one datacenter as faastastic measured it, for an
    /// alert asking for more: known only once the counters cover half the window (a load
    /// running since before the first sample: the whole window) and the function has been
    /// invoked through faastastic at all (traffic that bypasses it must not look like no
    /// traffic).
    fn observed_rate(&self, id: &FunctionId, datacenter: &str, action: Action) -> Option<f64> {
        if !matches!(action, Action::StepUp | Action::Sized { .. }) {
            return None;
        }
        let observed = self.observed.lock().unwrap_or_else(|p| p.into_inner());
        let key = (id.qualified(), datacenter.to_string());
        if observed.span() < observed.window() / 2 || !observed.seen(&key) {
            return None;
        }
        observed.rate(&key)
    }

    /// The function's invocation rate in one datacenter over the last
    /// `autoscale.staleness_window_secs`, from faastastic's own counters (sampled every
    /// `tick_interval`); `None` until they cover it.
    pub fn own_rate(&self, id: &FunctionId, datacenter: &str) -> Option<f64> {
        let observed = self.observed.lock().unwrap_or_else(|p| p.into_inner());
        observed.rate(&(id.qualified(), datacenter.to_string()))
    }

    /// Steps functions that are scaling down gradually, every `tick_interval`.
    pub fn spawn_ticker(self: &Arc<Self>) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(this.cfg.tick_interval);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                interval.tick().await;
                let started = std::time::Instant::now();
                let counts = this.metrics.invocation_counts_by_datacenter();
                this.observed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(std::time::Instant::now(), counts);
                // Gradual scale-down and scale to zero are the leader's to run.
                if !this.fleet.leader().is_leader() {
                    continue;
                }
                let due: Vec<Key> = this
                    .stepping
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .cloned()
                    .collect();
                futures::future::join_all(due.iter().map(|(id, dc)| {
                    this.apply(id, dc, Input::Tick, "tick", serde_json::json!({}), true)
                }))
                .await;
                this.scale_idle_to_zero().await;
                this.metrics.evaluated("ticker", started);
            }
        });
    }

    /// Functions that opted in to scale to zero and have been idle long enough go to zero, in
    /// each datacenter that still runs replicas.
    async fn scale_idle_to_zero(&self) {
        let now = self.clock.now();
        let mut idle = Vec::new();
        for view in self.fleet.all() {
            let f = &view.function;
            if f.desired_total() == 0 {
                continue;
            }
            let policy = self.policy_of(&f.id, &f.deployment);
            let Ok((policy, _)) = policy.as_ref() else {
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
                for (dc, _) in f.replicas.iter().filter(|(_, n)| **n > 0) {
                    idle.push((f.id.clone(), dc.clone(), idle_for, last));
                }
            }
        }
        futures::future::join_all(idle.iter().map(|(id, dc, idle_for, last)| {
            let evidence =
                serde_json::json!({"last_invocation": last, "idle_secs": idle_for.as_secs_f64()});
            self.apply(
                id,
                dc,
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

/// A scale event as the store keeps it.
fn event_record(event: &ScaleEvent) -> EventRecord {
    EventRecord {
        at: event.time,
        datacenter: event.datacenter.clone(),
        json: serde_json::to_string(event).unwrap_or_default(),
    }
}

fn state_json(state: &State) -> String {
    serde_json::to_string(state).unwrap_or_else(|_| "{}".to_string())
}

#[async_trait::async_trait]
/// A wake brings a function at zero replicas in `datacenter` to its min for a held
/// invocation (`call_id`), as an audited engine decision: source `wake`, the call id and the
/// number of requests waiting in its evidence. A pause holds it.
impl crate::proxy::Wake for Autoscaler {
    async fn wake(
        &self,
        id: &FunctionId,
        datacenter: &str,
        waiting: u64,
        call_id: Option<&str>,
    ) -> Result<(), String> {
        let evidence = serde_json::json!({"call_id": call_id, "waiting": waiting});
        let input = Input::Wake { waiting };
        let result = self
            .apply(id, datacenter, input, "wake", evidence, true)
            .await;
        // Held (paused), failed, or lost to a concurrent change: what counts is whether
        // replicas are now asked for.
        let asked = self
            .fleet
            .get(id)
            .ok()
            .and_then(|v| v.function.desired_in(datacenter));
        match asked {
            Some(0) | None => Err(result.reason),
            Some(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::autoscale::clock::{ManualClock, SystemClock};
    use crate::config::{Config, Placement};
    use crate::fleet::Datacenter;
    use crate::model::FunctionDeployment;
    use std::time::Duration;

    /// Fault injection for the executor's retry contract: the fake platform fails while
    /// `down` is set.
    type FlakyPlatform = crate::platform::fake::FakePlatform;

    /// Every scale event `store` holds, newest first.
    async fn stored_events(store: &Store) -> Vec<serde_json::Value> {
        store.events_json(100).await
    }

    async fn scaler_over(
        platforms: Vec<(&str, Arc<FlakyPlatform>)>,
    ) -> (tempfile::TempDir, Arc<Fleet>, FunctionId, Arc<Autoscaler>) {
        let mut cfg = Config::default().autoscale;
        cfg.defaults.up_cooldown = Some(Duration::ZERO);
        let t = Timeline::new(platforms, cfg, Arc::new(SystemClock), Default::default()).await;
        (t.dir, t.fleet, t.id, t.scaler)
    }

    /// A fleet over `platforms` (the first is home) with function `f` deployed with `labels`,
    /// and an autoscaler on `clock`.
    struct Timeline {
        dir: tempfile::TempDir,
        store: Store,
        fleet: Arc<Fleet>,
        id: FunctionId,
        scaler: Arc<Autoscaler>,
        activity: Arc<Activity>,
    }

    impl Timeline {
        async fn new(
            platforms: Vec<(&str, Arc<FlakyPlatform>)>,
            cfg: AutoscaleConfig,
            clock: Arc<dyn Clock>,
            labels: std::collections::BTreeMap<String, String>,
        ) -> Timeline {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(&dir.path().join("s.db")).unwrap();
            let home = platforms[0].0.to_string();
            let datacenters = platforms
                .into_iter()
                .map(|(name, p)| Arc::new(Datacenter::new(name, p, Duration::from_secs(5), 100)))
                .collect();
            // The fleet and the engine read the same settings, as in the server.
            let fleet = Arc::new(
                Fleet::restore(
                    store.clone(),
                    datacenters,
                    &home,
                    Placement::All,
                    "openfaas-fn",
                    64,
                    Arc::new(cfg.clone()),
                )
                .await
                .unwrap(),
            );
            let id = fleet
                .deploy(FunctionDeployment {
                    service: Some("f".into()),
                    image: Some("i".into()),
                    labels: Some(labels),
                    ..Default::default()
                })
                .await
                .unwrap();
            let activity = Arc::new(Activity::default());
            let scaler = Autoscaler::restore(
                fleet.clone(),
                store.clone(),
                Arc::new(Metrics::new()),
                activity.clone(),
                None,
                cfg,
                clock,
            )
            .await
            .unwrap();
            Timeline {
                dir,
                store,
                fleet,
                id,
                scaler,
                activity,
            }
        }

        fn replicas(&self) -> u64 {
            self.fleet.desired_replicas(&self.id).unwrap()
        }

        async fn signal(&self, action: Action, key: &str) -> SignalResult {
            let request = SignalRequest {
                id: self.id.clone(),
                datacenter: None,
                action,
                dedupe_key: Some(key.to_string()),
                source: "alert".into(),
                evidence: serde_json::json!({}),
            };
            self.scaler.apply_batch(vec![request]).await.remove(0)
        }

        /// The newest stored event's (source, outcome, reason code).
        async fn last_event(&self) -> (String, String, String) {
            let e = &stored_events(&self.store).await[0];
            let text = |k: &str| e[k].as_str().unwrap_or_default().to_string();
            (text("source"), text("outcome"), text("reason_code"))
        }
    }

    /// The executor's own timeline, on a clock the test moves: cooldowns, a hold and its
    /// expiry, scale to zero after the idle time, and a wake, each an event with its reason
    /// code, and none of it waiting on real time.
    #[tokio::test]
    async fn the_executor_follows_its_clock_through_cooldowns_holds_idle_and_wake() {
        let clock = Arc::new(ManualClock::at(Utc::now()));
        let mut cfg = Config::default().autoscale;
        let d = &mut cfg.defaults;
        d.up_cooldown = Some(Duration::from_secs(5));
        d.down_cooldown = Some(Duration::from_secs(30));
        d.stabilization_window = Some(Duration::ZERO);
        d.hold_ttl = Some(Duration::from_secs(120));
        let labels = std::collections::BTreeMap::from([
            ("com.openfaas.scale.max".to_string(), "10".to_string()),
            ("com.openfaas.scale.factor".to_string(), "10".to_string()),
            ("com.openfaas.scale.zero".to_string(), "true".to_string()),
            (
                "com.openfaas.scale.zero-duration".to_string(),
                "10m".to_string(),
            ),
        ]);
        let t = Timeline::new(
            vec![("lon", Arc::new(FlakyPlatform::default()))],
            cfg,
            clock.clone(),
            labels,
        )
        .await;
        let sec = Duration::from_secs;

        let up = t.signal(Action::StepUp, "a").await;
        assert_eq!((up.outcome, t.replicas()), (Verdict::Scaled, 2), "{up:?}");
        assert_eq!(t.last_event().await.2, "step_up");
        // One second later the up cooldown holds a new alert; five seconds on it does not.
        clock.advance(sec(1));
        let held = t.signal(Action::StepUp, "b").await;
        assert_eq!((held.outcome, t.replicas()), (Verdict::Held, 2), "{held:?}");
        assert!(
            held.reason.contains("up cooldown 5s not over (1s"),
            "{}",
            held.reason
        );
        assert_eq!(
            t.last_event().await,
            ("alert".into(), "held".into(), "up_cooldown".into())
        );
        clock.advance(sec(4));
        let up = t.signal(Action::StepUp, "c").await;
        assert_eq!((up.outcome, t.replicas()), (Verdict::Scaled, 3), "{up:?}");

        // A hold keeps the count through a resolve until its time to live runs out.
        clock.advance(sec(60));
        t.signal(Action::Hold, "h").await;
        let resolved = t.signal(Action::Resolved, "r1").await;
        assert_eq!((resolved.outcome, t.replicas()), (Verdict::Held, 3));
        assert_eq!(t.last_event().await.2, "hold");
        clock.advance(sec(121));
        let resolved = t.signal(Action::Resolved, "r2").await;
        assert_eq!(
            (resolved.outcome, t.replicas()),
            (Verdict::Scaled, 2),
            "{resolved:?}"
        );
        assert_eq!(t.last_event().await.2, "resolved");

        // Idle: last invoked now; ten minutes of the clock later, not a second of real time,
        // the idle check takes it to zero.
        let now_ms = t.scaler.clock.now().timestamp_millis();
        t.activity.clock(&t.id).store(now_ms, Ordering::Relaxed);
        clock.advance(sec(9 * 60));
        t.scaler.scale_idle_to_zero().await;
        assert_eq!(t.replicas(), 2, "idle for 9 minutes of 10");
        clock.advance(sec(60));
        t.scaler.scale_idle_to_zero().await;
        assert_eq!(t.replicas(), 0);
        assert_eq!(
            t.last_event().await,
            ("idle".into(), "scaled".into(), "scale_to_zero".into())
        );

        // An invocation wakes it, at once, as an audited decision.
        crate::proxy::Wake::wake(&*t.scaler, &t.id, "lon", 3, Some("call-1"))
            .await
            .unwrap();
        assert_eq!(t.replicas(), 1);
        let e = &stored_events(&t.store).await[0];
        assert_eq!(
            (
                &e["source"],
                &e["reason_code"],
                &e["evidence"]["call_id"],
                &e["evidence"]["waiting"]
            ),
            (
                &serde_json::json!("wake"),
                &serde_json::json!("wake"),
                &serde_json::json!("call-1"),
                &serde_json::json!(3)
            ),
            "{e}"
        );
        let _ = &t.dir;
    }

    #[tokio::test]
    async fn a_failed_platform_call_is_retryable_and_changes_no_state() {
        // lon fails while `down` is set; syd always works.
        let lon = Arc::new(FlakyPlatform::default());
        let (_dir, fleet, id, scaler) = scaler_over(vec![
            ("lon", lon.clone()),
            ("syd", Arc::new(FlakyPlatform::default())),
        ])
        .await;
        let firing = |key: &str, dc: Option<&str>| SignalRequest {
            id: id.clone(),
            datacenter: dc.map(str::to_string),
            action: Action::StepUp,
            dedupe_key: Some(key.to_string()),
            source: "alert".into(),
            evidence: serde_json::json!({}),
        };
        let replicas = |dc: &str| fleet.get(&id).unwrap().function.desired_in(dc);
        lon.down.store(true, Ordering::SeqCst);
        let failed = scaler.apply_batch(vec![firing("a", Some("lon"))]).await;
        assert_eq!(failed[0].outcome, Verdict::Failed);
        assert!(failed[0].retryable);
        assert!(
            failed[0].reason.contains("datacenter unreachable"),
            "{}",
            failed[0].reason
        );
        assert_eq!(replicas("lon"), Some(1));
        // Alertmanager's retry of the same alert is applied, not taken for a duplicate and not
        // held by a cooldown that the failed attempt never started.
        lon.down.store(false, Ordering::SeqCst);
        let retried = scaler.apply_batch(vec![firing("a", Some("lon"))]).await;
        assert_eq!(
            (retried[0].outcome, retried[0].to),
            (Verdict::Scaled, Some(2))
        );
        assert!(!retried[0].retryable);
        assert_eq!(
            replicas("syd"),
            Some(1),
            "an alert for lon leaves syd alone"
        );

        // Without a datacenter the alert applies in both: lon fails, syd scales, and the
        // answer asks for a retry; the retry scales lon and is a duplicate in syd.
        lon.down.store(true, Ordering::SeqCst);
        let mixed = scaler.apply_batch(vec![firing("b", None)]).await;
        assert_eq!(mixed[0].outcome, Verdict::Failed, "{mixed:?}");
        assert!(mixed[0].retryable);
        assert!(
            mixed[0].reason.contains("syd: firing"),
            "{}",
            mixed[0].reason
        );
        assert_eq!((replicas("lon"), replicas("syd")), (Some(2), Some(2)));
        lon.down.store(false, Ordering::SeqCst);
        let again = scaler.apply_batch(vec![firing("b", None)]).await;
        assert!(
            again[0].reason.contains("syd: duplicate"),
            "{}",
            again[0].reason
        );
        assert!(
            again[0].reason.contains("lon: firing"),
            "{}",
            again[0].reason
        );

        // A decision made from a count that changed meanwhile (a manual scale) is not applied.
        let now_lon = replicas("lon").unwrap();
        let stale = fleet
            .scale_from(&id, "lon", now_lon - 1, 5, None, OnFailure::Undo)
            .await;
        assert!(matches!(stale, Err(FleetError::Conflict(_))), "{stale:?}");
        assert_eq!(replicas("lon"), Some(now_lon));
        fleet
            .scale_from(&id, "lon", now_lon, 5, None, OnFailure::Undo)
            .await
            .unwrap();
        assert_eq!(replicas("lon"), Some(5));

        // A manual scale across both with lon down: syd's part stays, the error names lon,
        // and each datacenter's share is an event of its own.
        lon.down.store(true, Ordering::SeqCst);
        let partial = scaler.manual_scale(&id, None, 6, true).await;
        match partial {
            Err(FleetError::Partial(msg)) => assert!(msg.contains("lon"), "{msg}"),
            other => panic!("expected a partial failure, got {other:?}"),
        }
        assert_eq!(replicas("syd"), Some(3), "6 spread over two: 3 each");
        let events = stored_events(&scaler.store).await;
        let manual: Vec<(String, String)> = events
            .iter()
            .filter(|e| e["source"] == "manual")
            .map(|e| (e["datacenter"].to_string(), e["outcome"].to_string()))
            .collect();
        // The kept share's stored event says that the platform failed and what happens next.
        let kept = &events[0];
        assert_eq!(
            (&kept["datacenter"], &kept["outcome"]),
            (&"lon".into(), &"scaled".into())
        );
        let reason = kept["reason"].as_str().unwrap();
        assert!(
            reason.contains("datacenter unreachable")
                && reason.contains("the reconciler retries it"),
            "{reason}"
        );
        // lon's failed decision is undone, then, since syd's went through, decided again and
        // kept for the reconciler: the fleet converges to the total the operator asked for.
        assert_eq!(manual.len(), 3, "{manual:?}");
        assert_eq!(replicas("lon"), Some(3));
        for (dc, outcome) in [("syd", "scaled"), ("lon", "failed"), ("lon", "scaled")] {
            let pair = (format!("{dc:?}"), format!("{outcome:?}"));
            assert!(manual.contains(&pair), "{manual:?}");
        }
    }

    /// A manual scale across datacenters calls them at once: each call here waits until it is
    /// released, and both must have started before either is.
    #[tokio::test]
    async fn a_manual_scale_calls_its_datacenters_at_once() {
        let (lon, syd) = (FlakyPlatform::new(), FlakyPlatform::new());
        let (_dir, _fleet, id, scaler) =
            scaler_over(vec![("lon", lon.clone()), ("syd", syd.clone())]).await;
        lon.hold.store(true, Ordering::SeqCst);
        syd.hold.store(true, Ordering::SeqCst);
        let pending = {
            let (scaler, id) = (scaler.clone(), id.clone());
            tokio::spawn(async move { scaler.manual_scale(&id, None, 6, true).await })
        };
        let both = async {
            lon.started.notified().await;
            syd.started.notified().await;
        };
        let started = tokio::time::timeout(Duration::from_secs(10), both).await;
        lon.release.notify_one();
        syd.release.notify_one();
        assert!(
            started.is_ok(),
            "one datacenter was called only after the other"
        );
        pending.await.unwrap().unwrap();
        for platform in [&lon, &syd] {
            assert_eq!(
                crate::platform::Platform::table(&**platform)
                    .replicas(&id)
                    .desired,
                3
            );
        }
    }

    /// A count change waiting on its datacenter holds up neither another datacenter's nor
    /// another function's; an update of the function waits for it, and sees its count.
    #[tokio::test]
    async fn a_slow_datacenter_holds_up_only_its_own_counts() {
        let (lon, syd) = (FlakyPlatform::new(), FlakyPlatform::new());
        let (_dir, fleet, id, scaler) =
            scaler_over(vec![("lon", lon.clone()), ("syd", syd.clone())]).await;
        let other = FunctionDeployment {
            service: Some("g".into()),
            image: Some("i".into()),
            ..Default::default()
        };
        let g = fleet.deploy(other).await.unwrap();
        lon.hold.store(true, Ordering::SeqCst);
        let held = {
            let (scaler, id) = (scaler.clone(), id.clone());
            tokio::spawn(async move { scaler.manual_scale(&id, Some("lon"), 3, true).await })
        };
        lon.started.notified().await;
        let others = async {
            scaler
                .manual_scale(&id, Some("syd"), 2, true)
                .await
                .unwrap();
            scaler.manual_scale(&g, Some("syd"), 4, true).await.unwrap();
        };
        let unblocked = tokio::time::timeout(Duration::from_secs(10), others).await;
        let update = {
            let fleet = fleet.clone();
            tokio::spawn(async move {
                fleet
                    .update(FunctionDeployment {
                        service: Some("f".into()),
                        image: Some("i2".into()),
                        ..Default::default()
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        let update_waited = !update.is_finished();
        lon.hold.store(false, Ordering::SeqCst);
        lon.release.notify_one();
        assert!(unblocked.is_ok(), "a held scale in lon held up syd");
        assert!(update_waited, "an update went ahead of a scale under way");
        held.await.unwrap().unwrap();
        update.await.unwrap().unwrap();
        let view = fleet.get(&id).unwrap();
        let counts: Vec<(String, u64)> = view
            .function
            .replicas
            .iter()
            .map(|(dc, n)| (dc.clone(), *n))
            .collect();
        assert_eq!(counts, vec![("lon".into(), 3), ("syd".into(), 2)]);
        assert_eq!(
            crate::platform::Platform::table(&*lon)
                .replicas(&id)
                .desired,
            3
        );
    }

    #[tokio::test]
    async fn a_policy_is_worked_out_once_per_stored_spec() {
        let lon = Arc::new(FlakyPlatform::default());
        let (_dir, fleet, id, scaler) = scaler_over(vec![("lon", lon)]).await;
        let first = fleet.policy(&id).unwrap();
        scaler.manual_scale(&id, None, 3, true).await.unwrap();
        let tick = scaler
            .apply(&id, "lon", Input::Tick, "tick", serde_json::json!({}), true)
            .await;
        assert_eq!(tick.outcome, Verdict::NoChange);
        assert!(
            Arc::ptr_eq(&first, &fleet.policy(&id).unwrap()),
            "scales and decisions read the stored policy"
        );
        fleet
            .update(FunctionDeployment {
                service: Some("f".into()),
                image: Some("i".into()),
                labels: Some([("com.openfaas.scale.max".to_string(), "7".to_string())].into()),
                ..Default::default()
            })
            .await
            .unwrap();
        let updated = fleet.policy(&id).unwrap();
        assert!(!Arc::ptr_eq(&first, &updated), "a new spec, a new policy");
        assert_eq!(updated.as_ref().as_ref().unwrap().0.max, 7);
    }

    #[tokio::test]
    async fn a_decision_is_stored_before_the_platform_call_and_undone_when_it_fails() {
        let lon = Arc::new(FlakyPlatform::default());
        let (dir, _fleet, id, scaler) = scaler_over(vec![("lon", lon.clone())]).await;
        // A second connection sees what a restart after a crash would see.
        let disk = Store::open(&dir.path().join("s.db")).unwrap();
        let stored = || async {
            let f = disk.load_functions("lon").await.unwrap();
            let outcomes: Vec<String> = stored_events(&disk)
                .await
                .iter()
                .map(|e| e["outcome"].as_str().unwrap().to_string())
                .collect();
            (f[0].desired_in("lon"), outcomes)
        };
        let firing = SignalRequest {
            id: id.clone(),
            datacenter: Some("lon".into()),
            action: Action::StepUp,
            dedupe_key: Some("a".into()),
            source: "alert".into(),
            evidence: serde_json::json!({}),
        };

        // Mid-call: the new count and its event are already on disk.
        lon.hold.store(true, Ordering::SeqCst);
        let pending = {
            let (scaler, firing) = (scaler.clone(), firing.clone());
            tokio::spawn(async move { scaler.apply_batch(vec![firing]).await })
        };
        lon.started.notified().await;
        assert_eq!(stored().await, (Some(2), vec!["scaled".to_string()]));

        // The call fails: the count, the engine state and the event are undone together, and
        // the failure is what the audit trail keeps.
        lon.down.store(true, Ordering::SeqCst);
        lon.release.notify_one();
        let failed = pending.await.unwrap();
        assert_eq!(failed[0].outcome, Verdict::Failed, "{failed:?}");
        assert_eq!(stored().await, (Some(1), vec!["failed".to_string()]));

        // A server restored from disk takes Alertmanager's retry for a new alert, not a
        // duplicate of one already applied; once applied, it is a duplicate after a restart.
        lon.hold.store(false, Ordering::SeqCst);
        lon.down.store(false, Ordering::SeqCst);
        let cfg = scaler.config().clone();
        let restart = || async {
            let lon = Datacenter::new("lon", lon.clone(), Duration::from_secs(5), 100);
            let fleet = Fleet::restore(
                disk.clone(),
                vec![Arc::new(lon)],
                "lon",
                Placement::All,
                "openfaas-fn",
                64,
                Arc::new(cfg.clone()),
            )
            .await
            .unwrap();
            Autoscaler::restore(
                Arc::new(fleet),
                disk.clone(),
                Arc::new(Metrics::new()),
                Arc::new(Activity::default()),
                None,
                cfg.clone(),
                Arc::new(crate::autoscale::clock::SystemClock),
            )
            .await
            .unwrap()
        };
        let retried = restart().await.apply_batch(vec![firing.clone()]).await;
        assert_eq!(
            (retried[0].outcome, retried[0].to),
            (Verdict::Scaled, Some(2))
        );
        assert_eq!(stored().await.0, Some(2));
        let again = restart().await.apply_batch(vec![firing]).await;
        assert_ne!(again[0].outcome, Verdict::Scaled, "{again:?}");
    }
}
