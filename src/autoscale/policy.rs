//! The policy engine: a pure function of (policy, current replicas, remembered state, input,
//! now) that returns a decision with its reason, and the state to remember. It does no I/O and
//! reads no clock, so it can be replayed (`policy simulate`) and property-tested.
//!
//! Behaviour model (after Kubernetes HPA and the Nomad Autoscaler):
//! 1. the input gives a raw recommendation (OpenFaaS step up, step down, an explicit count);
//! 2. it is clamped into [min, max] (each clamp recorded);
//! 3. a scale-up waits out the up cooldown; a scale-down waits out the down cooldown and never
//!    goes below the highest recommendation seen in the stabilization window;
//! 4. a retried duplicate of an alert already applied within the cooldown is ignored;
//! 5. after a resolve, later ticks keep stepping down until min (unless `resolved_to_min`).

use std::collections::VecDeque;
use std::fmt;
use std::ops::ControlFlow;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub mod patch;
pub mod reason;

pub use reason::{Ask, Reason, Rule, StepMode, Window};

/// How far one step moves.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// A fixed number of replicas.
    Count(u64),
    /// A percentage of `max`, rounded up, exactly as OpenFaaS computes
    /// `ceil(max / 100 * factor)` in float64.
    PercentOfMax(u64),
}

impl Step {
    pub fn size(self, max: u64) -> u64 {
        match self {
            Step::Count(n) => n,
            Step::PercentOfMax(pct) => ((max as f64) / 100.0 * (pct as f64)).ceil() as u64,
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Count(n) => write!(f, "{n}"),
            Step::PercentOfMax(p) => write!(f, "{p}% of max"),
        }
    }
}

/// How a firing alert that carries its observed value is turned into a count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertMode {
    /// `ceil(value / target_per_replica)` in one decision when the alert carries a value and a
    /// target is known; OpenFaaS step mode otherwise.
    #[default]
    Proportional,
    /// Always OpenFaaS step mode, whatever the alert carries.
    Step,
}

impl fmt::Display for AlertMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AlertMode::Proportional => "proportional",
            AlertMode::Step => "step",
        })
    }
}

/// The largest scale-up one decision may make (Kubernetes HPA's scale-up policies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepCap {
    /// At most this many replicas more.
    Count(u64),
    /// At most this percentage of the current replicas more (at least one).
    Percent(u64),
}

impl StepCap {
    pub fn size(self, current: u64) -> u64 {
        match self {
            StepCap::Count(n) => n.max(1),
            StepCap::Percent(p) => {
                (((current.max(1) as f64) * (p as f64) / 100.0).ceil() as u64).max(1)
            }
        }
    }
}

impl fmt::Display for StepCap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StepCap::Count(n) => write!(f, "{n}"),
            StepCap::Percent(p) => write!(f, "{p}% of current"),
        }
    }
}

/// Everything that governs one function's scaling. Plain data; see `autoscale::labels` for how
/// it is built from config and labels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    pub min: u64,
    pub max: u64,
    pub step_up: Step,
    pub step_down: Step,
    #[serde(with = "secs")]
    pub up_cooldown: Duration,
    #[serde(with = "secs")]
    pub down_cooldown: Duration,
    /// Scale-down never goes below the highest recommendation made within this window.
    #[serde(with = "secs")]
    pub stabilization_window: Duration,
    /// OpenFaaS behaviour: a resolved alert recommends `min` at once instead of stepping down.
    pub resolved_to_min: bool,
    /// Scale to zero after this long without an invocation (`com.openfaas.scale.zero`); `None`
    /// keeps at least `min`.
    #[serde(default, with = "opt_secs", skip_serializing_if = "Option::is_none")]
    pub scale_to_zero_after: Option<Duration>,
    /// How firing alerts with a value are sized.
    #[serde(default)]
    pub alert_mode: AlertMode,
    /// Load one replica is meant to carry, in the alert value's unit; an alert's own
    /// `target_per_replica` wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_per_replica: Option<f64>,
    /// Cap on one scale-up; `None`: no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_step_up: Option<StepCap>,
    /// Hold an alert's scale-up when faastastic's own invocation counters show the load gone.
    #[serde(default = "yes")]
    pub staleness_guard: bool,
    /// How long a hold lasts after its last delivery when no resolve arrives.
    #[serde(default = "default_hold_ttl", with = "secs")]
    pub hold_ttl: Duration,
}

fn default_hold_ttl() -> Duration {
    Duration::from_secs(300)
}

fn yes() -> bool {
    true
}

impl Default for Policy {
    /// OpenFaaS's defaults: min 1, max 5, steps of 10 % of max, no cooldowns or window.
    fn default() -> Self {
        Policy {
            min: 1,
            max: 5,
            step_up: Step::PercentOfMax(10),
            step_down: Step::PercentOfMax(10),
            up_cooldown: Duration::ZERO,
            down_cooldown: Duration::ZERO,
            stabilization_window: Duration::ZERO,
            resolved_to_min: false,
            scale_to_zero_after: None,
            alert_mode: AlertMode::Proportional,
            target_per_replica: None,
            max_step_up: None,
            staleness_guard: true,
            hold_ttl: default_hold_ttl(),
        }
    }
}

mod opt_secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_f64(d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let v = Option::<f64>::deserialize(d)?;
        match v {
            None => Ok(None),
            Some(v) if v.is_finite() && v >= 0.0 => Ok(Some(Duration::from_secs_f64(v))),
            Some(_) => Err(serde::de::Error::custom("a duration must be >= 0 seconds")),
        }
    }
}

mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v = f64::deserialize(d)?;
        if !v.is_finite() || v < 0.0 {
            return Err(serde::de::Error::custom("a duration must be >= 0 seconds"));
        }
        Ok(Duration::from_secs_f64(v))
    }
}

/// What a signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "action", content = "replicas")]
pub enum Action {
    /// A firing alert in step mode.
    StepUp,
    /// A firing alert that carries its observed value (and maybe the per-replica target):
    /// proportional sizing when the policy allows, step mode otherwise.
    Sized { value: f64, target: Option<f64> },
    /// An explicit request to step down.
    StepDown,
    /// An explicit replica count.
    To(u64),
    /// A target-tracking reading of the load (query policies): see [`Track`].
    Track(Track),
    /// The alert that asked for more stopped firing.
    Resolved,
    /// A hold alert fires: no scale-down (and no scale-up from it) until it resolves or
    /// `hold_ttl` passes without another delivery.
    Hold,
    /// The hold alert resolved.
    Release,
}

/// What a target-tracking policy read: the count its own window asks for and the count the
/// short window over faastastic's own counters asks for.
///
/// The short window drives scale-ups only in a burst (as Knative's panic mode): one starts when
/// its load is at least [`BURST_FACTOR`] times what the running replicas carry, and lasts while
/// it keeps asking for more replicas than run, until it has not for [`BURST_GRACE`]. Outside a
/// burst the policy's window decides.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Track {
    /// The count the policy's window asks for (its query, or the internal rate over
    /// `window_secs`); `None` when it was not read this time or is within its tolerance of
    /// the running count.
    pub stable: Option<u64>,
    /// The short window's load in replicas' worth (its rate over the target, unrounded: it
    /// asks for the next whole count); `None` when the policy has none or it asks for no more
    /// than runs.
    pub short: Option<f64>,
    /// The load faastastic's own counters show over their longer window (the staleness
    /// window, 10 s), in replicas' worth: never scaled down below. Given with a reading that
    /// asks for fewer replicas than run; a policy's window that lags (a long query) or that
    /// splits a total among datacenters the calls do not split among must not undo what the
    /// counters show.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recent: Option<f64>,
    /// The last time the policy's window found the running count enough (within its
    /// tolerance), and that count. Such readings are not sent one by one (a policy over
    /// thousands of steady functions would make a decision for each, every interval); the
    /// next reading that is sent carries the last of them, and the stabilization window
    /// remembers it as a recommendation of that count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enough_at: Option<(DateTime<Utc>, u64)>,
}

/// How many times the running count the short window must ask for to start a burst.
pub const BURST_FACTOR: u64 = 2;

/// How long a burst outlasts the short window's last ask for more: four readings, so that one
/// noisy reading under the load does not end it.
pub const BURST_GRACE: Duration = Duration::from_secs(2);

/// [`BURST_GRACE`] as the engine adds it to its clock.
fn burst_grace() -> chrono::Duration {
    chrono::Duration::from_std(BURST_GRACE).expect("a small duration")
}

/// One input to the engine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Input<'a> {
    Signal {
        action: Action,
        /// Identifies retries of one alert (fingerprint and `startsAt`).
        dedupe_key: Option<&'a str>,
        /// The function's invocation rate as faastastic itself measured it over the last
        /// window, for the staleness guard; `None`: unknown (the guard does not apply).
        observed_rate: Option<f64>,
    },
    /// Periodic re-evaluation, which continues a gradual scale-down.
    Tick,
    /// Periodic check of a function that has had no invocation for `idle_for`.
    Idle { idle_for: Duration },
    /// An invocation found the function at zero replicas; `waiting` requests (this one
    /// included) are held until a replica is ready.
    Wake { waiting: u64 },
    /// An operator asks for `replicas` (`POST /system/scale-function`); `override_bounds`
    /// lets it leave min..max. The request's bounds were checked before it got here.
    Manual {
        replicas: u64,
        override_bounds: bool,
    },
}

/// What the engine remembers about one function between decisions. Serialisable so that
/// cooldowns and windows survive a restart.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub last_scale_up: Option<DateTime<Utc>>,
    pub last_scale_down: Option<DateTime<Utc>>,
    /// (when, recommended replicas after clamping), oldest first, pruned to the window. Only
    /// what the window's highest can still come from is kept: a recommendation no higher
    /// than a later one is dropped, so the counts fall from oldest to newest and a steady
    /// count is one entry however often it is read.
    pub recommendations: VecDeque<(DateTime<Utc>, u64)>,
    /// Alert retries already applied: (dedupe key, when).
    pub applied: VecDeque<(String, DateTime<Utc>)>,
    /// A resolve happened and replicas are stepping down towards min on ticks.
    pub stepping_down: bool,
    /// A hold forbids scale-down until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_until: Option<DateTime<Utc>>,
    /// A target-tracking burst lasts until then (see [`Track`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst_until: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Clamp {
    Min,
    Max,
    UpCooldown,
    DownCooldown,
    Stabilization,
    Duplicate,
    /// The scale-up was cut to the policy's `max_step_up`.
    StepCap,
    /// The alert asked for more, but the function's own traffic no longer supports it.
    LoadGone,
    /// Autoscaling is paused for this function (or for all).
    Paused,
    /// A hold alert forbids scale-down.
    Hold,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The replica count changes to `to`.
    Scale,
    /// A change was recommended but a rule held it back.
    Held,
    /// Nothing to do (already at the recommendation, or an idle tick).
    NoChange,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub from: u64,
    pub to: u64,
    /// The input's recommendation before clamps, cooldowns and the window.
    pub recommended: u64,
    pub outcome: Outcome,
    pub clamps: Vec<Clamp>,
    pub reason: Reason,
}

fn since(now: DateTime<Utc>, then: Option<DateTime<Utc>>) -> Option<Duration> {
    then.map(|t| (now - t).to_std().unwrap_or(Duration::ZERO))
}

/// Time since `last` when that is still inside `cooldown`.
fn in_cooldown(
    now: DateTime<Utc>,
    last: Option<DateTime<Utc>>,
    cooldown: Duration,
) -> Option<Duration> {
    since(now, last).filter(|elapsed| *elapsed < cooldown)
}

/// The end of an active hold, if one is active at `now`.
fn active_hold(state: &State, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    state.hold_until.filter(|until| *until > now)
}

/// One OpenFaaS step up from `current`, and what it asks (`why` says why step mode applies).
fn step_up(policy: &Policy, current: u64, max: u64, why: StepMode) -> (u64, Ask) {
    let step = policy.step_up.size(max);
    if step == 0 {
        (policy.min, Ask::StepZero { why })
    } else {
        let of = policy.step_up;
        (current.saturating_add(step), Ask::StepUp { step, of, why })
    }
}

/// The per-replica target for an alert: its own, else the policy's.
pub fn target_of(policy: &Policy, action: Action) -> Option<f64> {
    let own = match action {
        Action::Sized { target, .. } => target,
        _ => None,
    };
    own.or(policy.target_per_replica)
        .filter(|t| t.is_finite() && *t > 0.0)
}

/// Replicas that carry `value` at `target` each: `ceil(value / target)`, saturating.
pub fn proportional(value: f64, target: f64) -> u64 {
    let n = (value / target).ceil();
    if n.is_nan() || n <= 0.0 {
        0
    } else if n >= u64::MAX as f64 {
        u64::MAX
    } else {
        n as u64
    }
}

/// What the first stage hands on: the raw recommendation and what asked for it.
struct Recommendation {
    to: u64,
    ask: Ask,
    /// The input can only lower the count (a resolve, a step down, a tick).
    lowers: bool,
    /// For a gradual scale-down, the largest step one decision may take.
    gradual: Option<u64>,
    /// A count measured from the load (target tracking), not a step from the running count:
    /// it does not compound, so the up cooldown does not hold it.
    measured: bool,
}

/// One decision in progress: its fixed inputs and the clamps recorded so far. Each stage
/// either hands its result on or ends the decision (`Break`).
struct Run<'a> {
    policy: &'a Policy,
    current: u64,
    state: &'a State,
    now: DateTime<Utc>,
    min: u64,
    max: u64,
    clamps: Vec<Clamp>,
    /// A measured scale-up made inside the up cooldown: (cooldown, time since the last
    /// scale-up), for the reason.
    inside_up_cooldown: Option<(Duration, Duration)>,
}

type Stage<T> = ControlFlow<Decision, T>;

/// Decides what to do with one input. Pure: the same arguments always give the same result.
///
/// The stages, in order: [`Run::recommend`] (what the input asks for), [`Run::bound`] (the
/// zero rule, min and max, the staleness guard), [`Run::settle`] (hold, cooldowns, the
/// stabilization window, the step limits) and [`Run::commit`]. Inputs with their own rules
/// (hold and release, idle, wake, manual) end in the first stage.
pub fn decide(
    policy: &Policy,
    current: u64,
    state: &State,
    input: Input<'_>,
    now: DateTime<Utc>,
) -> (Decision, State) {
    let mut next = remembered(policy, state, now);
    let mut run = Run {
        policy,
        current,
        state,
        now,
        min: policy.min,
        max: policy.max.max(policy.min),
        clamps: Vec::new(),
        inside_up_cooldown: None,
    };
    let decision = match run.stages(&mut next, input) {
        ControlFlow::Break(d) | ControlFlow::Continue(d) => d,
    };
    (decision, next)
}

/// Adds a recommendation made at `at` to the window's memory (oldest first, counts falling),
/// dropping those it outlasts and outranks; one outlasted and outranked itself is not kept.
fn remember(window: &mut VecDeque<(DateTime<Utc>, u64)>, at: DateTime<Utc>, to: u64) {
    if window.iter().any(|(t, r)| *t >= at && *r >= to) {
        return;
    }
    window.retain(|(t, r)| *t > at || *r > to);
    let place = window.partition_point(|(t, _)| *t <= at);
    window.insert(place, (at, to));
}

/// The memory a decision starts from: recommendations and applied alerts pruned to their
/// windows, a hold that ran out dropped.
fn remembered(policy: &Policy, state: &State, now: DateTime<Utc>) -> State {
    let mut next = state.clone();
    let window = policy.stabilization_window;
    next.recommendations
        .retain(|(at, _)| since(now, Some(*at)).is_some_and(|age| age <= window));
    let dedupe_window = policy.up_cooldown.max(policy.down_cooldown);
    next.applied
        .retain(|(_, at)| since(now, Some(*at)).is_some_and(|age| age <= dedupe_window));
    if active_hold(&next, now).is_none() {
        next.hold_until = None;
    }
    // A clock stepped back must not stretch a burst.
    next.burst_until = next
        .burst_until
        .filter(|until| *until >= now && *until <= now + burst_grace());
    next
}

impl Run<'_> {
    fn stages(&mut self, next: &mut State, input: Input<'_>) -> Stage<Decision> {
        let rec = self.recommend(next, input)?;
        let to = self.bound(next, &rec, input)?;
        let (to, capped) = self.settle(next, &rec, to)?;
        ControlFlow::Continue(self.commit(next, input, rec, to, capped))
    }

    /// A decision that leaves the count as it is.
    fn stay(&mut self, recommended: u64, outcome: Outcome, reason: Reason) -> Decision {
        Decision {
            from: self.current,
            to: self.current,
            recommended,
            outcome,
            clamps: std::mem::take(&mut self.clamps),
            reason,
        }
    }

    /// A rule holds back a change the input recommended.
    fn held(&mut self, to: u64, recommended: u64, clamp: Clamp, reason: Reason) -> Decision {
        self.clamps.push(clamp);
        let mut d = self.stay(recommended, Outcome::Held, reason);
        d.to = to;
        d
    }

    fn change(&mut self, to: u64, recommended: u64, ask: Ask) -> Decision {
        let from = self.current;
        Decision {
            from,
            to,
            recommended,
            outcome: Outcome::Scale,
            clamps: std::mem::take(&mut self.clamps),
            reason: Reason::new(ask, Rule::Change { from, to }),
        }
    }

    /// Stage 1: the desired count and what asked for it. Inputs with rules of their own end
    /// here; so does a retry of an alert already applied.
    fn recommend(&mut self, next: &mut State, input: Input<'_>) -> Stage<Recommendation> {
        let (policy, current, min, max) = (self.policy, self.current, self.min, self.max);
        let step_down = policy.step_down.size(max).max(1);
        let only = |ask| Reason::new(ask, Rule::Ask);
        let rec = |to, ask| Recommendation {
            to,
            ask,
            lowers: false,
            gradual: None,
            measured: false,
        };
        let action = match input {
            Input::Idle { idle_for } => return ControlFlow::Break(self.idle(next, idle_for)),
            Input::Wake { waiting } => return ControlFlow::Break(self.wake(next, waiting)),
            Input::Manual {
                replicas,
                override_bounds,
            } => return ControlFlow::Break(self.manual(replicas, override_bounds)),
            Input::Tick => {
                if !next.stepping_down || current <= min {
                    next.stepping_down = false;
                    let reason = only(Ask::NothingToDo);
                    return ControlFlow::Break(self.stay(current, Outcome::NoChange, reason));
                }
                return ControlFlow::Continue(Recommendation {
                    lowers: true,
                    gradual: Some(step_down),
                    ..rec(
                        min,
                        Ask::NoLongerFiring {
                            step: step_down,
                            min,
                        },
                    )
                });
            }
            Input::Signal {
                action, dedupe_key, ..
            } => {
                let applied = dedupe_key
                    .and_then(|key| next.applied.iter().find(|(k, _)| k == key))
                    .map(|(_, at)| *at);
                // Holds are not retried alerts: a repeated delivery renews the hold.
                if let (Some(at), false) =
                    (applied, matches!(action, Action::Hold | Action::Release))
                {
                    let reason = only(Ask::Duplicate { at });
                    let d = self.held(current, current, Clamp::Duplicate, reason);
                    return ControlFlow::Break(d);
                }
                action
            }
        };
        ControlFlow::Continue(match action {
            Action::Hold => {
                // Saturating: `policy simulate` replays times up to the end of chrono's range.
                let until = self
                    .now
                    .checked_add_signed(
                        chrono::Duration::from_std(policy.hold_ttl)
                            .unwrap_or(chrono::Duration::seconds(300)),
                    )
                    .unwrap_or(DateTime::<Utc>::MAX_UTC);
                next.hold_until = Some(until);
                let reason = only(Ask::HoldSet {
                    ttl: policy.hold_ttl,
                });
                return ControlFlow::Break(self.stay(current, Outcome::NoChange, reason));
            }
            Action::Release => {
                next.hold_until = None;
                let reason = only(Ask::HoldReleased);
                return ControlFlow::Break(self.stay(current, Outcome::NoChange, reason));
            }
            Action::StepUp => {
                next.stepping_down = false;
                let (to, ask) = step_up(policy, current, max, StepMode::Plain);
                rec(to, ask)
            }
            Action::Sized { value, .. } => {
                next.stepping_down = false;
                match (policy.alert_mode, target_of(policy, action)) {
                    (AlertMode::Proportional, Some(target)) => {
                        let to = proportional(value, target);
                        rec(to, Ask::Proportional { value, target, to })
                    }
                    (AlertMode::Step, _) => {
                        let (to, ask) = step_up(policy, current, max, StepMode::AlertModeStep);
                        rec(to, ask)
                    }
                    (AlertMode::Proportional, None) => {
                        let (to, ask) = step_up(policy, current, max, StepMode::NoTarget);
                        rec(to, ask)
                    }
                }
            }
            Action::StepDown => Recommendation {
                lowers: true,
                ..rec(
                    current.saturating_sub(step_down),
                    Ask::StepDown { step: step_down },
                )
            },
            Action::To(n) => rec(n, Ask::AskedFor { replicas: n }),
            Action::Track(track) => {
                if let Some((at, n)) = track.enough_at {
                    let window = policy.stabilization_window;
                    if since(self.now, Some(at)).is_some_and(|age| age <= window) {
                        // Bounded as every recommendation the window keeps.
                        remember(&mut next.recommendations, at, n.clamp(min, max));
                    }
                }
                let (window, to) = self.track(next, track);
                let ask = Ask::Track {
                    replicas: to,
                    window,
                };
                // Neither window acted: the short one asked for too little (or nothing) and
                // the policy's was not read.
                let burst = matches!(window, Window::BurstStart | Window::Burst);
                if track.stable.is_none() && !burst {
                    let reason = only(ask);
                    return ControlFlow::Break(self.stay(to, Outcome::NoChange, reason));
                }
                Recommendation {
                    measured: true,
                    ..rec(to, ask)
                }
            }
            Action::Resolved if policy.resolved_to_min => {
                next.stepping_down = false;
                Recommendation {
                    lowers: true,
                    ..rec(min, Ask::ResolvedToMin)
                }
            }
            Action::Resolved => {
                next.stepping_down = true;
                Recommendation {
                    lowers: true,
                    gradual: Some(step_down),
                    ..rec(
                        min,
                        Ask::Resolved {
                            step: step_down,
                            min,
                        },
                    )
                }
            }
        })
    }

    /// Which window a target-tracking reading follows, and its count; starts, continues or
    /// ends a burst.
    fn track(&self, next: &mut State, track: Track) -> (Window, u64) {
        let (window, to) = self.follow(next, track.stable, track.short);
        // Never lower than what faastastic's own counters still show is needed.
        match (window, track.recent.filter(|l| l.is_finite() && *l >= 0.0)) {
            (Window::Policy, Some(load)) if to < self.current => {
                let needs = proportional(load, 1.0).min(self.current);
                match needs > to {
                    true => (Window::Floor { asked: to }, needs),
                    false => (window, to),
                }
            }
            _ => (window, to),
        }
    }

    /// [`Self::track`] before the floor.
    fn follow(&self, next: &mut State, stable: Option<u64>, short: Option<f64>) -> (Window, u64) {
        let current = self.current;
        // The short window counts only when it asks for more than runs and than the policy's
        // window asks for; a burst starts on its load, unrounded, so that a load just over
        // what one replica carries does not start one.
        let load = short.filter(|l| l.is_finite() && *l >= 0.0);
        let more = load
            .map(|l| proportional(l, 1.0))
            .filter(|n| *n > current && Some(*n) > stable);
        let starts = load.filter(|l| *l >= current.max(1).saturating_mul(BURST_FACTOR) as f64);
        let under_way = next.burst_until.is_some();
        let burst = more.is_some() && (starts.is_some() || under_way);
        if burst {
            next.burst_until = self.now.checked_add_signed(burst_grace());
        }
        match (more, stable) {
            (Some(n), _) if burst && !under_way => (Window::BurstStart, n),
            (Some(n), _) if burst => (Window::Burst, n),
            (_, Some(n)) => (Window::Policy, n),
            (Some(n), None) => (Window::BelowBurst, n),
            (None, None) => (Window::Policy, current),
        }
    }

    /// Scale to zero is opt-in and bypasses min; it still waits out the down cooldown and
    /// gives way to a hold.
    fn idle(&mut self, next: &mut State, idle_for: Duration) -> Decision {
        let current = self.current;
        let Some(after) = self.policy.scale_to_zero_after else {
            let reason = Reason::new(Ask::ScaleToZeroOff, Rule::Ask);
            return self.stay(current, Outcome::NoChange, reason);
        };
        if current == 0 || idle_for < after {
            let reason = Reason::new(Ask::Idle { idle_for }, Rule::Ask);
            return self.stay(current, Outcome::NoChange, reason);
        }
        let ask = Ask::ScaleToZero { idle_for, after };
        if let Some(until) = active_hold(next, self.now) {
            return self.held(
                current,
                0,
                Clamp::Hold,
                Reason::new(ask, Rule::Hold { until }),
            );
        }
        let last_scale = self.state.last_scale_down.max(self.state.last_scale_up);
        let cooldown = self.policy.down_cooldown;
        if let Some(elapsed) = in_cooldown(self.now, last_scale, cooldown) {
            let rule = Rule::DownCooldown { cooldown, elapsed };
            return self.held(current, 0, Clamp::DownCooldown, Reason::new(ask, rule));
        }
        next.stepping_down = false;
        next.last_scale_down = Some(self.now);
        self.change(0, 0, ask)
    }

    /// Waking from zero brings the function to its min (at least one replica) at once: a held
    /// invocation must not wait out a cooldown or a window, and the wake starts no cooldown,
    /// so that the load behind it can scale further straight away. Only a hold of scale-down
    /// is irrelevant here; a pause still holds it (see the executor).
    fn wake(&mut self, next: &mut State, waiting: u64) -> Decision {
        let current = self.current;
        if current > 0 {
            let reason = Reason::new(Ask::AlreadyRunning { current }, Rule::Ask);
            return self.stay(current, Outcome::NoChange, reason);
        }
        let to = self.min.max(1).min(self.max.max(1));
        next.stepping_down = false;
        self.change(to, to, Ask::Wake { waiting })
    }

    /// An operator's count is carried out as asked: no cooldown, window, hold or step cap
    /// stands in its way, and it leaves the engine's memory as it was (no cooldown starts).
    /// Only min..max bounds it, unless overridden; zero is always allowed.
    fn manual(&mut self, replicas: u64, override_bounds: bool) -> Decision {
        let (min, max, current) = (self.min, self.max, self.current);
        let to = match (override_bounds, replicas) {
            (true, _) | (_, 0) => replicas,
            _ => replicas.clamp(min, max),
        };
        if to < replicas {
            self.clamps.push(Clamp::Max);
        } else if to > replicas {
            self.clamps.push(Clamp::Min);
        }
        let outside = (to != 0 && !(min..=max).contains(&to)).then_some((min, max));
        let mut d = self.change(to, replicas, Ask::Manual { outside });
        if to == current {
            d.outcome = Outcome::NoChange;
        }
        d
    }

    /// Stage 2: a function at zero stays there unless replicas are asked for; the count is
    /// clamped into min..max (and remembered by the window), unless the staleness guard finds
    /// that faastastic's own counters no longer show the load an alert reports.
    fn bound(&mut self, next: &mut State, rec: &Recommendation, input: Input<'_>) -> Stage<u64> {
        let (current, min, max) = (self.current, self.min, self.max);
        let recommended = rec.to;
        // Min is no reason to wake a function at zero, and a scale-down never raises a count.
        if current == 0 && (recommended == 0 || rec.lowers) {
            next.stepping_down = false;
            let reason = Reason::new(rec.ask.clone(), Rule::AtZero);
            return ControlFlow::Break(self.stay(recommended, Outcome::NoChange, reason));
        }
        let mut to = recommended;
        if to < min {
            to = min;
            self.clamps.push(Clamp::Min);
        }
        if to > max {
            to = max;
            self.clamps.push(Clamp::Max);
        }
        // An alert asking for more when the current replicas already carry the load is held,
        // and is not remembered by the window.
        if let Input::Signal {
            action: action @ (Action::StepUp | Action::Sized { .. }),
            observed_rate: Some(rate),
            ..
        } = input
        {
            let guard = self.policy.staleness_guard;
            if let Some(target) = target_of(self.policy, action).filter(|_| guard) {
                let supported = proportional(rate, target);
                if to > current && supported <= current && rate.is_finite() {
                    let rule = Rule::LoadGone {
                        rate,
                        current,
                        target,
                    };
                    let reason = Reason::new(rec.ask.clone(), rule);
                    let d = self.held(current, recommended, Clamp::LoadGone, reason);
                    return ControlFlow::Break(d);
                }
            }
        }
        // A floor from the short window holds this decision only: the window remembers what
        // the policy's window asked for, or one noisy reading would hold it for a window.
        let remembered = match rec.ask {
            Ask::Track {
                window: Window::Floor { asked },
                ..
            } => asked.clamp(min, max),
            _ => to,
        };
        remember(&mut next.recommendations, self.now, remembered);
        if to == current {
            if current <= min {
                next.stepping_down = false;
            }
            // Held by a bound when the input asked for another count.
            let held_by = self.clamps.last().copied();
            let rule = Rule::Already {
                current,
                min,
                max,
                held_by,
            };
            let outcome = if self.clamps.is_empty() {
                Outcome::NoChange
            } else {
                Outcome::Held
            };
            let reason = Reason::new(rec.ask.clone(), rule);
            return ControlFlow::Break(self.stay(recommended, outcome, reason));
        }
        ControlFlow::Continue(to)
    }

    /// Stage 3: a scale-up waits out the up cooldown and is cut to the step limit; a
    /// scale-down gives way to a hold, waits out the down cooldown, never goes below the
    /// window's highest recommendation and, when gradual, moves one step.
    fn settle(
        &mut self,
        next: &State,
        rec: &Recommendation,
        mut to: u64,
    ) -> Stage<(u64, Option<(u64, StepCap)>)> {
        let (policy, current, now) = (self.policy, self.current, self.now);
        let recommended = rec.to;
        let hold_back = |run: &mut Self, clamp, rule| {
            let reason = Reason::new(rec.ask.clone(), rule);
            ControlFlow::Break(run.held(current, recommended, clamp, reason))
        };
        if to > current {
            let cooldown = policy.up_cooldown;
            if let Some(elapsed) = in_cooldown(now, self.state.last_scale_up, cooldown) {
                if !rec.measured {
                    let rule = Rule::UpCooldown { cooldown, elapsed };
                    return hold_back(self, Clamp::UpCooldown, rule);
                }
                self.inside_up_cooldown = Some((cooldown, elapsed));
            }
            if let Some(cap) = policy.max_step_up {
                // Reaching min is never capped (as in Kubernetes HPA).
                let limit = current.saturating_add(cap.size(current)).max(self.min);
                if to > limit {
                    self.clamps.push(Clamp::StepCap);
                    return ControlFlow::Continue((limit, Some((limit, cap))));
                }
            }
            return ControlFlow::Continue((to, None));
        }
        if let Some(until) = active_hold(next, now) {
            return hold_back(self, Clamp::Hold, Rule::Hold { until });
        }
        let last_scale = self.state.last_scale_down.max(self.state.last_scale_up);
        let cooldown = policy.down_cooldown;
        if let Some(elapsed) = in_cooldown(now, last_scale, cooldown) {
            return hold_back(
                self,
                Clamp::DownCooldown,
                Rule::DownCooldown { cooldown, elapsed },
            );
        }
        // Remembered under the policy of the time: a max lowered since (a redeploy with other
        // labels) bounds them too, so the window never keeps the count above the current max.
        let max = self.max;
        let highest = next
            .recommendations
            .iter()
            .map(|(_, r)| (*r).min(max))
            .max()
            .unwrap_or(to);
        if highest > to {
            if highest >= current {
                let window = policy.stabilization_window;
                return hold_back(
                    self,
                    Clamp::Stabilization,
                    Rule::Stabilization { highest, window },
                );
            }
            self.clamps.push(Clamp::Stabilization);
            to = highest;
        }
        if let Some(step) = rec.gradual {
            // Gradual within bounds; above max the clamp applies at once.
            to = to.max(current.saturating_sub(step)).min(max);
        }
        ControlFlow::Continue((to, None))
    }

    /// Stage 4: the change, and what the engine remembers of it.
    fn commit(
        &mut self,
        next: &mut State,
        input: Input<'_>,
        rec: Recommendation,
        to: u64,
        capped: Option<(u64, StepCap)>,
    ) -> Decision {
        if let Input::Signal {
            dedupe_key: Some(key),
            ..
        } = input
        {
            next.applied.push_back((key.to_string(), self.now));
        }
        if to > self.current {
            next.last_scale_up = Some(self.now);
        } else {
            next.last_scale_down = Some(self.now);
            if to <= self.min {
                next.stepping_down = false;
            }
        }
        let mut d = self.change(to, rec.to, rec.ask);
        d.reason.capped = capped;
        d.reason.inside_up_cooldown = self.inside_up_cooldown;
        d
    }
}

// Text forms of the engine's settings, shared by labels and the configuration file.

/// `3` (replicas) or `25%` (of max).
pub fn parse_step(text: &str) -> Result<Step, String> {
    let t = text.trim();
    if let Some(pct) = t.strip_suffix('%') {
        return match pct.trim().parse::<u64>() {
            Ok(p) if (1..=100).contains(&p) => Ok(Step::PercentOfMax(p)),
            _ => Err(format!("{text:?} is not a percentage from 1% to 100%")),
        };
    }
    t.parse::<u64>()
        .map(Step::Count)
        .map_err(|_| format!("{text:?} is not a replica count or a percentage such as 25%"))
}

/// `4` (replicas) or `100%` (of the current replicas).
pub fn parse_step_cap(text: &str) -> Result<StepCap, String> {
    let t = text.trim();
    if let Some(pct) = t.strip_suffix('%') {
        return match pct.trim().parse::<u64>() {
            Ok(p) if (1..=10_000).contains(&p) => Ok(StepCap::Percent(p)),
            _ => Err(format!("{text:?} is not a percentage from 1% to 10000%")),
        };
    }
    match t.parse::<u64>() {
        Ok(n) if n > 0 => Ok(StepCap::Count(n)),
        _ => Err(format!(
            "{text:?} is not a positive replica count or a percentage such as 100%"
        )),
    }
}

pub fn parse_alert_mode(text: &str) -> Result<AlertMode, String> {
    match text.trim() {
        "proportional" => Ok(AlertMode::Proportional),
        "step" => Ok(AlertMode::Step),
        other => Err(format!("{other:?} is not proportional or step")),
    }
}

/// A per-replica target: a finite number above zero.
pub fn parse_target(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("{text:?} is not a number above zero")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use chrono::TimeZone;

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + secs, 0).unwrap()
    }

    /// OpenFaaS CE defaults, with no cooldowns or window.
    fn openfaas(max: u64, min: u64, factor: u64) -> Policy {
        Policy {
            min,
            max,
            step_up: Step::PercentOfMax(factor),
            step_down: Step::PercentOfMax(factor),
            up_cooldown: Duration::ZERO,
            down_cooldown: Duration::ZERO,
            stabilization_window: Duration::ZERO,
            resolved_to_min: true,
            scale_to_zero_after: None,
            ..Policy::default()
        }
    }

    fn signal(action: Action) -> Input<'static> {
        Input::Signal {
            action,
            dedupe_key: None,
            observed_rate: None,
        }
    }

    /// At zero replicas min is no reason to wake a function; only a demand for replicas is.
    #[test]
    fn zero_stays_zero_until_replicas_are_asked_for() {
        let p = openfaas(10, 2, 20);
        for input in [
            signal(Action::To(0)),
            signal(Action::Resolved),
            signal(Action::StepDown),
            Input::Tick,
        ] {
            let (d, _) = decide(&p, 0, &State::default(), input, at(0));
            assert_eq!(
                (d.outcome, d.to),
                (Outcome::NoChange, 0),
                "{input:?}: {d:?}"
            );
        }
        let (d, _) = decide(&p, 0, &State::default(), signal(Action::To(1)), at(0));
        assert_eq!(
            (d.outcome, d.to),
            (Outcome::Scale, 2),
            "raised to min once woken"
        );
        let (d, _) = decide(&p, 0, &State::default(), signal(Action::StepUp), at(0));
        assert_eq!(d.outcome, Outcome::Scale);
    }

    /// Found by fuzzing: recommendations the window remembers from before max was lowered (a
    /// redeploy with a smaller `com.openfaas.scale.max`) do not keep the count above the new
    /// max; it applies at once, as it does without a window.
    #[test]
    fn window_from_a_higher_max_does_not_hold_the_count_above_max() {
        let p = Policy {
            stabilization_window: Duration::from_secs(120),
            ..openfaas(9, 1, 10)
        };
        let state = State {
            recommendations: [(at(0), 18)].into(),
            ..State::default()
        };
        for input in [signal(Action::To(1)), signal(Action::StepUp)] {
            let (d, _) = decide(&p, 20, &state, input, at(30));
            assert_eq!((d.outcome, d.to), (Outcome::Scale, 9), "{input:?}: {d:?}");
        }
        // Within the bounds the window still holds a scale-down.
        let (d, _) = decide(&p, 9, &state, signal(Action::To(1)), at(30));
        assert_eq!((d.outcome, d.to), (Outcome::Held, 9), "{d:?}");
        assert!(d.clamps.contains(&Clamp::Stabilization));
    }

    /// A hold at the end of time lasts until then instead of overflowing the clock.
    #[test]
    fn a_hold_near_the_end_of_time_saturates() {
        let p = openfaas(10, 1, 10);
        let (d, next) = decide(
            &p,
            3,
            &State::default(),
            signal(Action::Hold),
            DateTime::<Utc>::MAX_UTC,
        );
        assert_eq!(d.outcome, Outcome::NoChange);
        assert_eq!(next.hold_until, Some(DateTime::<Utc>::MAX_UTC));
    }

    /// The upstream gateway's own test vectors (status, current, max, min, factor, expected),
    /// without the CE licence cap of 5 on max.
    #[test]
    fn openfaas_formula() {
        let cases = [
            (Action::StepUp, 1, 5, 1, 0, 1),
            (Action::StepUp, 1, 5, 0, 0, 0),
            (Action::StepUp, 5, 5, 5, 10, 5),
            (Action::StepUp, 1, 5, 1, 10, 2),
            (Action::StepUp, 4, 5, 1, 25, 5),
            (Action::StepUp, 5, 5, 1, 10, 5),
            (Action::StepUp, 19, 5, 1, 10, 5),
            (Action::Resolved, 8, 5, 1, 10, 1),
            (Action::StepUp, 1, 5, 1, 30, 3),
            (Action::StepUp, 1, 4, 1, 1, 2),
            (Action::StepUp, 1, 20, 1, 20, 5),
            (Action::StepUp, 17, 20, 1, 20, 20),
            (Action::StepUp, 1, 5, 1, 100, 5),
        ];
        for (action, current, max, min, factor, expected) in cases {
            let (d, _) = decide(
                &openfaas(max, min, factor),
                current,
                &State::default(),
                signal(action),
                at(0),
            );
            assert_eq!(
                d.to, expected,
                "{action:?} current={current} max={max} min={min} factor={factor}: {d:?}"
            );
        }
    }

    #[test]
    fn float_artefacts_match_go() {
        assert_eq!(Step::PercentOfMax(100).size(7), 8);
        assert_eq!(Step::PercentOfMax(25).size(28), 8);
    }

    fn gradual() -> Policy {
        Policy {
            min: 1,
            max: 10,
            step_up: Step::Count(2),
            step_down: Step::Count(1),
            up_cooldown: Duration::from_secs(10),
            down_cooldown: Duration::from_secs(20),
            stabilization_window: Duration::from_secs(30),
            resolved_to_min: false,
            scale_to_zero_after: None,
            ..Policy::default()
        }
    }

    /// A timeline: each step is (seconds, input, expected replicas after it).
    fn timeline(policy: &Policy, start: u64, steps: &[(i64, Input<'_>, u64)]) {
        let mut current = start;
        let mut state = State::default();
        for (t, input, want) in steps {
            let (d, next) = decide(policy, current, &state, *input, at(*t));
            assert_eq!(d.to, *want, "at {t}s {input:?}: {d:?}");
            if d.outcome == Outcome::Scale {
                current = d.to;
            }
            state = next;
        }
    }

    #[test]
    fn up_cooldown_then_gradual_stabilized_scale_down() {
        timeline(
            &gradual(),
            1,
            &[
                (0, signal(Action::StepUp), 3),
                (5, signal(Action::StepUp), 3),    // up cooldown
                (10, signal(Action::StepUp), 5),   // cooldown over
                (12, signal(Action::Resolved), 5), // down cooldown (20 s since the scale-up)
                (30, Input::Tick, 5), // past the cooldown, but 5 was recommended at 10 s
                (41, Input::Tick, 4), // window passed: one step
                (50, Input::Tick, 4), // down cooldown
                (61, Input::Tick, 3),
                (81, Input::Tick, 2),
                (101, Input::Tick, 1),
                (121, Input::Tick, 1), // at min: done
            ],
        );
    }

    #[test]
    fn firing_stops_a_step_down() {
        let p = Policy {
            stabilization_window: Duration::ZERO,
            down_cooldown: Duration::ZERO,
            ..gradual()
        };
        timeline(
            &p,
            5,
            &[
                (0, signal(Action::Resolved), 4),
                (1, Input::Tick, 3),
                (2, signal(Action::StepUp), 5),
                (3, Input::Tick, 5), // no longer stepping down
            ],
        );
    }

    #[test]
    fn duplicates_are_ignored_within_the_cooldown() {
        let p = gradual();
        let key = Some("fp@2024-01-01T00:00:00Z");
        let firing = Input::Signal {
            action: Action::StepUp,
            dedupe_key: key,
            observed_rate: None,
        };
        let (d, s) = decide(&p, 1, &State::default(), firing, at(0));
        assert_eq!((d.outcome, d.to), (Outcome::Scale, 3));
        let (d, s) = decide(&p, 3, &s, firing, at(1));
        assert_eq!(d.outcome, Outcome::Held);
        assert_eq!(d.clamps, vec![Clamp::Duplicate]);
        // After the cooldowns, the same alert repeated by Alertmanager steps again.
        let (d, _) = decide(&p, 3, &s, firing, at(25));
        assert_eq!((d.outcome, d.to), (Outcome::Scale, 5));
    }

    #[test]
    fn idle_functions_scale_to_zero_only_when_opted_in() {
        let idle = |secs| Input::Idle {
            idle_for: Duration::from_secs(secs),
        };
        let off = gradual();
        let (d, _) = decide(&off, 3, &State::default(), idle(3600), at(0));
        assert_eq!(d.outcome, Outcome::NoChange);
        let on = Policy {
            scale_to_zero_after: Some(Duration::from_secs(900)),
            ..gradual()
        };
        let (d, _) = decide(&on, 3, &State::default(), idle(899), at(0));
        assert_eq!(d.outcome, Outcome::NoChange);
        let (d, s) = decide(&on, 3, &State::default(), idle(900), at(0));
        assert_eq!(
            (d.outcome, d.to),
            (Outcome::Scale, 0),
            "below min: zero is opt-in"
        );
        assert!(
            d.reason.to_string().contains("no invocation"),
            "{}",
            d.reason
        );
        // Right after a scale-up the down cooldown still applies.
        let (_, s2) = decide(&on, 1, &s, signal(Action::StepUp), at(10));
        let (d, _) = decide(&on, 3, &s2, idle(1000), at(11));
        assert_eq!(d.outcome, Outcome::Held);
    }

    #[test]
    fn a_wake_brings_min_at_once_through_cooldowns_and_starts_none() {
        let p = Policy {
            up_cooldown: Duration::from_secs(600),
            down_cooldown: Duration::from_secs(600),
            stabilization_window: Duration::from_secs(600),
            ..openfaas(10, 3, 20)
        };
        // Just scaled down to zero: every cooldown is running.
        let state = State {
            last_scale_down: Some(at(0)),
            last_scale_up: Some(at(0)),
            ..State::default()
        };
        let (d, next) = decide(&p, 0, &state, Input::Wake { waiting: 4 }, at(1));
        assert_eq!((d.outcome, d.from, d.to), (Outcome::Scale, 0, 3));
        assert!(
            d.reason.to_string().contains("4 requests waiting"),
            "{}",
            d.reason
        );
        assert_eq!(
            next.last_scale_up, state.last_scale_up,
            "no cooldown starts"
        );
        // An alert right after a wake is not held by an up-cooldown the wake started.
        let scaled_to_zero = State {
            last_scale_down: Some(at(0)),
            ..State::default()
        };
        let (_, woken) = decide(&p, 0, &scaled_to_zero, Input::Wake { waiting: 1 }, at(1));
        let (d, _) = decide(&p, 3, &woken, signal(Action::StepUp), at(2));
        assert_eq!(d.outcome, Outcome::Scale, "{}", d.reason);
        // Already running: nothing to do.
        let (d, _) = decide(&p, 2, &state, Input::Wake { waiting: 1 }, at(1));
        assert_eq!((d.outcome, d.to), (Outcome::NoChange, 2));
        // A min of 0 still wakes one replica; a max below min does not cap it under one.
        let (d, _) = decide(
            &openfaas(0, 0, 20),
            0,
            &state,
            Input::Wake { waiting: 1 },
            at(1),
        );
        assert_eq!(d.to, 1);
    }

    #[test]
    fn a_manual_count_is_carried_out_through_cooldowns_within_its_bounds() {
        let p = Policy {
            up_cooldown: Duration::from_secs(600),
            down_cooldown: Duration::from_secs(600),
            ..openfaas(5, 2, 20)
        };
        let state = State {
            last_scale_up: Some(at(0)),
            hold_until: Some(at(1000)),
            ..State::default()
        };
        let manual = |replicas, override_bounds| Input::Manual {
            replicas,
            override_bounds,
        };
        // Cooldowns and a hold do not stand in an operator's way, and nothing starts.
        let (d, next) = decide(&p, 3, &state, manual(4, false), at(1));
        assert_eq!((d.outcome, d.to), (Outcome::Scale, 4));
        assert_eq!(d.reason.to_string(), "manual scale: 3 -> 4");
        assert_eq!(next.last_scale_up, state.last_scale_up);
        let (d, _) = decide(&p, 3, &state, manual(1, false), at(1));
        assert_eq!((d.outcome, d.to), (Outcome::Scale, 2), "bounded by min");
        assert_eq!(d.clamps, vec![Clamp::Min]);
        let (d, _) = decide(&p, 3, &state, manual(0, false), at(1));
        assert_eq!(d.to, 0, "zero is always allowed");
        let (d, _) = decide(&p, 3, &state, manual(9, true), at(1));
        assert_eq!(d.to, 9);
        assert!(
            d.reason
                .to_string()
                .contains("override: outside min..max 2..5"),
            "{}",
            d.reason
        );
        let (d, _) = decide(&p, 3, &state, manual(3, false), at(1));
        assert_eq!(d.outcome, Outcome::NoChange);
    }

    #[test]
    fn the_highest_recommendation_in_the_window_wins() {
        // Two query policies on one function: one wants 5, the other 3.
        let p = Policy {
            up_cooldown: Duration::ZERO,
            down_cooldown: Duration::ZERO,
            ..gradual()
        };
        timeline(
            &p,
            1,
            &[
                (0, signal(Action::To(5)), 5),
                (1, signal(Action::To(3)), 5), // 5 was recommended 1 s ago
                (2, signal(Action::To(5)), 5), // no change
                (20, signal(Action::To(3)), 5), // still inside the 30 s window of the 5 at 2 s
                (33, signal(Action::To(3)), 3), // window passed
            ],
        );
    }

    fn track(stable: Option<u64>, short: Option<f64>) -> Input<'static> {
        signal(Action::Track(Track {
            stable,
            short,
            recent: None,
            enough_at: None,
        }))
    }

    /// The shipped defaults: 5 s up cooldown, 30 s down cooldown, 60 s window; max 10.
    fn defaults() -> Policy {
        let (p, _) = patch::PolicyPatch::default().resolve().unwrap();
        Policy { max: 10, ..p }
    }

    /// One decision of a timeline, with its reason's text and code.
    fn step(
        p: &Policy,
        current: &mut u64,
        state: &mut State,
        t: i64,
        input: Input<'_>,
    ) -> Decision {
        let (d, next) = decide(p, *current, state, input, at(t));
        if d.outcome == Outcome::Scale {
            *current = d.to;
        }
        *state = next;
        d
    }

    #[test]
    fn a_burst_starts_at_twice_the_running_load_and_lasts_while_the_short_window_asks_for_more() {
        let p = defaults();
        let (mut current, mut state) = (1, State::default());
        let in_burst = |state: &State, t: i64| state.burst_until.is_some_and(|u| u >= at(t));
        // Just under twice what one replica carries: no burst, nothing from the policy's
        // window this time.
        let d = step(&p, &mut current, &mut state, 0, track(None, Some(1.9)));
        assert_eq!(
            (d.outcome, current, d.reason.code()),
            (Outcome::NoChange, 1, "below_burst")
        );
        assert!(state.burst_until.is_none());
        // Twice: a burst, to the short window's count, the policy's window notwithstanding.
        let d = step(&p, &mut current, &mut state, 10, track(Some(1), Some(2.4)));
        assert_eq!((current, d.reason.code()), (3, "burst"));
        assert_eq!(
            state.burst_until,
            Some(at(10) + chrono::Duration::seconds(2))
        );
        assert_eq!(
            d.reason.to_string(),
            "burst: the short window asks for 3 replicas, at least twice as many as run: 1 -> 3"
        );
        // Under way: more is enough (4.2 < 2 × 3), inside the up cooldown, which says so.
        let d = step(&p, &mut current, &mut state, 11, track(None, Some(4.2)));
        assert_eq!((current, d.reason.code()), (5, "burst"));
        assert_eq!(
            d.reason.to_string(),
            "burst: the short window still asks for more, 5 replicas: 3 -> 5 (1s into the 5s up cooldown, which holds steps, not a count measured from the load)"
        );
        // A reading that asks for no more does not end it at once, and a lower count from
        // the policy's window waits for the down cooldown.
        let d = step(&p, &mut current, &mut state, 12, track(Some(4), None));
        assert_eq!((current, d.reason.code()), (5, "down_cooldown"));
        // Nor below what faastastic's own counters still show, whatever the policy's window
        // says; the window remembers what that asked for, not the floor.
        let floored = signal(Action::Track(Track {
            stable: Some(2),
            recent: Some(4.5),
            ..Track::default()
        }));
        let d = step(&p, &mut current, &mut state, 12, floored);
        assert_eq!(
            (d.outcome, current, d.reason.code()),
            (Outcome::NoChange, 5, "target")
        );
        assert_eq!(
            d.reason.to_string(),
            "the policy's window asks for 2 replicas, but faastastic's own counters still show 5 needed; already at 5 (min 1, max 10)"
        );
        assert!(!state.recommendations.contains(&(at(12), 5)));
        let d = step(&p, &mut current, &mut state, 13, track(None, Some(5.5)));
        assert_eq!((current, d.reason.code()), (6, "burst"));
        assert!(in_burst(&state, 15));
        // Two seconds without an ask for more end it: a later rise under twice the running
        // load is no burst, and the policy's window decides.
        let d = step(&p, &mut current, &mut state, 16, track(None, Some(8.0)));
        assert_eq!((current, d.reason.code()), (6, "below_burst"));
        assert!(!in_burst(&state, 16));
        let d = step(&p, &mut current, &mut state, 17, track(Some(7), Some(8.0)));
        assert_eq!((current, d.reason.code()), (7, "target"));
        assert_eq!(
            d.reason.to_string(),
            "the policy's window asks for 7 replicas: 6 -> 7 (4s into the 5s up cooldown, which holds steps, not a count measured from the load)"
        );
        // Clamped by max like any count; a burst at max stays a burst.
        let d = step(&p, &mut current, &mut state, 30, track(None, Some(40.0)));
        assert_eq!((current, d.clamps.clone()), (10, vec![Clamp::Max]));
        assert!(in_burst(&state, 31));
        // Nonsense from a source is no reading.
        for bad in [f64::NAN, f64::INFINITY, -3.0] {
            let (d, next) = decide(&p, 2, &State::default(), track(None, Some(bad)), at(9));
            assert_eq!(
                (d.outcome, next.burst_until),
                (Outcome::NoChange, None),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_up_cooldown_holds_steps_and_explicit_counts_but_not_a_measured_count() {
        let p = defaults();
        let (mut current, mut state) = (1, State::default());
        step(&p, &mut current, &mut state, 0, track(Some(3), None));
        assert_eq!(current, 3);
        let d = step(&p, &mut current, &mut state, 1, signal(Action::StepUp));
        assert_eq!((current, d.reason.code()), (3, "up_cooldown"));
        let d = step(&p, &mut current, &mut state, 2, signal(Action::To(8)));
        assert_eq!((current, d.reason.code()), (3, "up_cooldown"));
        let d = step(&p, &mut current, &mut state, 3, track(Some(4), None));
        assert_eq!((current, d.reason.code()), (4, "target"));
        // Past the cooldown, nothing to say.
        let d = step(&p, &mut current, &mut state, 30, track(Some(5), None));
        assert_eq!(current, 5);
        assert_eq!(d.reason.inside_up_cooldown, None);
        // A scale-down is still held by the window of what was asked.
        let d = step(&p, &mut current, &mut state, 70, track(Some(2), None));
        assert_eq!((current, d.reason.code()), (5, "stabilization"));
        let d = step(&p, &mut current, &mut state, 91, track(Some(2), None));
        assert_eq!((current, d.reason.code()), (2, "target"));
    }

    #[test]
    fn clamps_are_reported() {
        let p = gradual();
        let (d, _) = decide(&p, 9, &State::default(), signal(Action::To(50)), at(0));
        assert_eq!((d.to, d.recommended), (10, 50));
        assert_eq!(d.clamps, vec![Clamp::Max]);
        assert!(
            d.reason.to_string().contains("asked for 50"),
            "{}",
            d.reason
        );
        let (d, _) = decide(&p, 1, &State::default(), signal(Action::To(0)), at(0));
        assert_eq!(d.outcome, Outcome::Held);
        assert_eq!(d.clamps, vec![Clamp::Min]);
    }

    fn sized(value: f64, target: Option<f64>, observed: Option<f64>) -> Input<'static> {
        Input::Signal {
            action: Action::Sized { value, target },
            dedupe_key: None,
            observed_rate: observed,
        }
    }

    /// min 1, max 10, target 5 per replica, no cooldowns.
    fn proportional_policy() -> Policy {
        Policy {
            max: 10,
            target_per_replica: Some(5.0),
            ..Policy::default()
        }
    }

    #[test]
    fn proportional_sizing_table() {
        let p = proportional_policy();
        // (current, value, alert's own target, expected count, expected outcome)
        let cases = [
            (1, 40.0, None, 8, Outcome::Scale), // 8x the target: one decision
            (1, 41.0, None, 9, Outcome::Scale), // rounded up
            (1, 5.0, None, 1, Outcome::NoChange), // exactly one replica's worth
            (1, 500.0, None, 10, Outcome::Scale), // clamped to max
            (3, 0.0, None, 1, Outcome::Scale),  // no load while firing: down to min
            (1, 40.0, Some(20.0), 2, Outcome::Scale), // the alert's target wins
            (4, 12.0, None, 3, Outcome::Scale), // above need: down, as HPA would
        ];
        for (current, value, target, want, outcome) in cases {
            let (d, _) = decide(
                &p,
                current,
                &State::default(),
                sized(value, target, None),
                at(0),
            );
            assert_eq!(
                (d.to, d.outcome),
                (want, outcome),
                "{current} {value} {target:?}: {d:?}"
            );
            assert!(d.reason.to_string().contains("per replica"), "{}", d.reason);
        }
        let (d, _) = decide(&p, 1, &State::default(), sized(500.0, None, None), at(0));
        assert_eq!(
            (d.recommended, d.clamps.as_slice()),
            (100, &[Clamp::Max][..])
        );
    }

    #[test]
    fn step_mode_without_a_target_or_when_asked() {
        let mut p = proportional_policy();
        p.target_per_replica = None;
        let (d, _) = decide(&p, 1, &State::default(), sized(40.0, None, None), at(0));
        assert_eq!(d.to, 2, "10% of max 10 = 1 step: {d:?}");
        assert!(
            d.reason.to_string().contains("no target_per_replica"),
            "{}",
            d.reason
        );
        let p = Policy {
            alert_mode: AlertMode::Step,
            ..proportional_policy()
        };
        let (d, _) = decide(
            &p,
            1,
            &State::default(),
            sized(40.0, Some(5.0), None),
            at(0),
        );
        assert_eq!(d.to, 2, "{d:?}");
        assert!(
            d.reason.to_string().contains("alert_mode step"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn proportional_keeps_cooldowns_and_the_window() {
        let p = Policy {
            up_cooldown: Duration::from_secs(30),
            down_cooldown: Duration::from_secs(60),
            stabilization_window: Duration::from_secs(120),
            ..proportional_policy()
        };
        let (d, s) = decide(&p, 1, &State::default(), sized(20.0, None, None), at(0));
        assert_eq!(d.to, 4);
        let (d, s) = decide(&p, 4, &s, sized(40.0, None, None), at(10));
        assert_eq!(
            (d.outcome, d.clamps.as_slice()),
            (Outcome::Held, &[Clamp::UpCooldown][..])
        );
        let (d, s) = decide(&p, 4, &s, sized(40.0, None, None), at(31));
        assert_eq!(d.to, 8);
        // Lower values while firing wait for the down cooldown, then the window's highest.
        let (d, s) = decide(&p, 8, &s, sized(10.0, None, None), at(40));
        assert_eq!(d.clamps, vec![Clamp::DownCooldown]);
        let (d, _) = decide(&p, 8, &s, sized(10.0, None, None), at(100));
        assert_eq!(
            (d.outcome, d.to),
            (Outcome::Held, 8),
            "8 was recommended within the window: {d:?}"
        );
    }

    #[test]
    fn the_step_cap_limits_one_decision() {
        let mut p = proportional_policy();
        p.max = 40;
        for (cap, current, want) in [
            (StepCap::Count(4), 1, 5),
            (StepCap::Count(4), 10, 14),
            (StepCap::Percent(100), 1, 2),
            (StepCap::Percent(100), 6, 12),
            (StepCap::Percent(50), 3, 5),
            (StepCap::Percent(100), 0, 1),
        ] {
            p.max_step_up = Some(cap);
            let (d, _) = decide(
                &p,
                current,
                &State::default(),
                sized(200.0, None, None),
                at(0),
            );
            assert_eq!(
                (d.recommended, d.to),
                (40, want),
                "{cap:?} from {current}: {d:?}"
            );
            assert_eq!(d.clamps, vec![Clamp::StepCap]);
            assert!(
                d.reason
                    .to_string()
                    .contains(&format!("capped at {want} by the step limit")),
                "the reason names the cap: {}",
                d.reason
            );
        }
        // Reaching min is not capped; a scale-down is not capped.
        p.min = 6;
        p.max_step_up = Some(StepCap::Count(1));
        let (d, _) = decide(&p, 1, &State::default(), sized(1.0, None, None), at(0));
        assert_eq!(d.to, 6, "{d:?}");
        let (d, _) = decide(&p, 30, &State::default(), sized(5.0, None, None), at(0));
        assert_eq!(d.to, 6, "{d:?}");
    }

    #[test]
    fn the_staleness_guard_holds_scale_ups_the_traffic_no_longer_needs() {
        let p = proportional_policy();
        // The alert says 40/s, faastastic measures 3/s now: one replica carries it.
        let (d, s) = decide(
            &p,
            1,
            &State::default(),
            sized(40.0, None, Some(3.0)),
            at(0),
        );
        assert_eq!((d.outcome, d.to), (Outcome::Held, 1), "{d:?}");
        assert_eq!(d.clamps, vec![Clamp::LoadGone]);
        assert!(
            d.reason.to_string().contains("load already gone"),
            "{}",
            d.reason
        );
        assert!(
            s.recommendations.is_empty(),
            "a stale alert is not remembered by the window"
        );
        // Still 40/s: scale.
        let (d, _) = decide(
            &p,
            1,
            &State::default(),
            sized(40.0, None, Some(38.0)),
            at(0),
        );
        assert_eq!(d.to, 8);
        // Some load left, more than the current replicas carry: scale as the alert says.
        let (d, _) = decide(
            &p,
            1,
            &State::default(),
            sized(40.0, None, Some(12.0)),
            at(0),
        );
        assert_eq!(d.to, 8);
        // Step mode alerts are guarded too, when a target is known.
        let (d, _) = decide(
            &p,
            2,
            &State::default(),
            signal_with_rate(Action::StepUp, 4.0),
            at(0),
        );
        assert_eq!(d.clamps, vec![Clamp::LoadGone]);
        // Turned off, or with no measurement, or no target: no guard.
        let off = Policy {
            staleness_guard: false,
            ..proportional_policy()
        };
        let (d, _) = decide(
            &off,
            1,
            &State::default(),
            sized(40.0, None, Some(0.0)),
            at(0),
        );
        assert_eq!(d.to, 8);
        let (d, _) = decide(&p, 1, &State::default(), sized(40.0, None, None), at(0));
        assert_eq!(d.to, 8);
        let no_target = Policy {
            target_per_replica: None,
            ..proportional_policy()
        };
        let (d, _) = decide(
            &no_target,
            1,
            &State::default(),
            signal_with_rate(Action::StepUp, 0.0),
            at(0),
        );
        assert_eq!(d.to, 2);
    }

    #[test]
    fn a_hold_forbids_scale_down_until_released_or_expired() {
        let p = Policy {
            max: 10,
            hold_ttl: Duration::from_secs(120),
            ..Policy::default()
        };
        let (d, s) = decide(&p, 5, &State::default(), signal(Action::Hold), at(0));
        assert_eq!(
            (d.outcome, d.to),
            (Outcome::NoChange, 5),
            "a hold scales nothing"
        );
        assert!(d.reason.to_string().starts_with("hold"), "{}", d.reason);
        for input in [
            signal(Action::StepDown),
            signal(Action::To(2)),
            signal(Action::Resolved),
            Input::Idle {
                idle_for: Duration::from_secs(3600),
            },
        ] {
            let p = Policy {
                scale_to_zero_after: Some(Duration::from_secs(60)),
                ..p.clone()
            };
            let (d, _) = decide(&p, 5, &s, input, at(10));
            assert_eq!((d.outcome, d.to), (Outcome::Held, 5), "{input:?}: {d:?}");
            assert_eq!(d.clamps.last(), Some(&Clamp::Hold), "{d:?}");
        }
        // Scale-up is not held.
        let (d, _) = decide(&p, 5, &s, signal(Action::StepUp), at(10));
        assert_eq!((d.outcome, d.to), (Outcome::Scale, 6));
        // Released: down again.
        let (_, released) = decide(&p, 5, &s, signal(Action::Release), at(20));
        let (d, _) = decide(&p, 5, &released, signal(Action::To(2)), at(21));
        assert_eq!((d.outcome, d.to), (Outcome::Scale, 2));
        // No delivery for the hold's ttl: it lapses on its own.
        let (d, _) = decide(&p, 5, &s, signal(Action::To(2)), at(121));
        assert_eq!((d.outcome, d.to), (Outcome::Scale, 2));
    }

    fn signal_with_rate(action: Action, rate: f64) -> Input<'static> {
        Input::Signal {
            action,
            dedupe_key: None,
            observed_rate: Some(rate),
        }
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    fn action() -> impl Strategy<Value = Action> {
        prop_oneof![
            Just(Action::StepUp),
            Just(Action::StepDown),
            Just(Action::Resolved),
            (0u64..40).prop_map(Action::To),
            (0.0f64..200.0, prop::option::of(0.5f64..20.0))
                .prop_map(|(value, target)| Action::Sized { value, target }),
            Just(Action::Hold),
            Just(Action::Release),
            (
                prop::option::of(0u64..40),
                prop::option::of(0.0f64..80.0),
                // (seconds before the input, count): moved to the input's time below.
                prop::option::of((0i64..120, 0u64..40)),
            )
                .prop_map(|(stable, short, enough)| Action::Track(Track {
                    stable,
                    short,
                    recent: None,
                    enough_at: enough.map(|(back, n)| (
                        DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::seconds(back),
                        n
                    )),
                })),
        ]
    }

    fn policy() -> impl Strategy<Value = Policy> {
        (
            0u64..5,
            0u64..20,
            prop_oneof![
                (0u64..5).prop_map(Step::Count),
                (0u64..=100).prop_map(Step::PercentOfMax)
            ],
            prop_oneof![
                (0u64..5).prop_map(Step::Count),
                (1u64..=100).prop_map(Step::PercentOfMax)
            ],
            0u64..30,
            0u64..60,
            0u64..120,
            any::<bool>(),
            (
                prop::option::of(prop_oneof![
                    (1u64..5).prop_map(StepCap::Count),
                    (1u64..300).prop_map(StepCap::Percent)
                ]),
                prop::option::of(0.5f64..20.0),
                any::<bool>(),
                any::<bool>(),
            ),
        )
            .prop_map(
                |(min, extra, up, down, upc, downc, win, to_min, sizing)| Policy {
                    min,
                    max: min + extra,
                    step_up: up,
                    step_down: down,
                    up_cooldown: Duration::from_secs(upc),
                    down_cooldown: Duration::from_secs(downc),
                    stabilization_window: Duration::from_secs(win),
                    resolved_to_min: to_min,
                    scale_to_zero_after: None,
                    max_step_up: sizing.0,
                    target_per_replica: sizing.1,
                    alert_mode: if sizing.2 {
                        AlertMode::Proportional
                    } else {
                        AlertMode::Step
                    },
                    staleness_guard: sizing.3,
                    hold_ttl: Duration::from_secs(90),
                },
            )
    }

    /// (seconds after the previous input, input: None = tick, duplicate key index, observed
    /// rate)
    type Step4 = (u64, Option<Action>, Option<u8>, Option<f64>);
    fn inputs() -> impl Strategy<Value = Vec<Step4>> {
        prop::collection::vec(
            (
                0u64..40,
                prop::option::of(action()),
                prop::option::of(0u8..3),
                prop::option::of(0.0f64..100.0),
            ),
            1..60,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn engine_invariants(p in policy(), start in 0u64..30, seq in inputs()) {
            let t0 = Utc.timestamp_opt(1_700_000_000, 0).unwrap();
            let mut now = t0;
            let mut current = start;
            let mut state = State::default();
            // Every scale actually applied: (when, from, to).
            let mut applied: Vec<(DateTime<Utc>, u64, u64)> = Vec::new();
            let mut recs: Vec<(DateTime<Utc>, u64)> = Vec::new();
            let mut keys_applied: Vec<(String, DateTime<Utc>)> = Vec::new();
            let mut hold_until: Option<DateTime<Utc>> = None;
            for (gap, action, key, observed) in seq {
                now += chrono::Duration::seconds(gap as i64);
                let action = match action {
                    Some(Action::Track(mut t)) => {
                        t.enough_at = t.enough_at.map(|(back, n)| (now - (back - DateTime::<Utc>::UNIX_EPOCH), n));
                        Some(Action::Track(t))
                    }
                    other => other,
                };
                match action {
                    Some(Action::Hold) => {
                        hold_until = Some(now + chrono::Duration::from_std(p.hold_ttl).unwrap())
                    }
                    Some(Action::Release) => hold_until = None,
                    _ => {}
                }
                let key_text = key.map(|k| format!("alert-{k}"));
                let input = match action {
                    Some(a) => Input::Signal { action: a, dedupe_key: key_text.as_deref(), observed_rate: observed },
                    None => Input::Tick,
                };
                let (d, next) = decide(&p, current, &state, input, now);
                // Deterministic.
                let (again, again_state) = decide(&p, current, &state, input, now);
                prop_assert_eq!(&d, &again);
                prop_assert_eq!(&next, &again_state);
                prop_assert_eq!(d.from, current);
                if d.outcome == Outcome::Scale {
                    // Within bounds.
                    prop_assert!(d.to >= p.min && d.to <= p.max.max(p.min), "{:?} {:?}", p, d);
                    prop_assert_ne!(d.to, current);
                    if d.to > current {
                        // Never more than the step cap in one decision.
                        if let Some(cap) = p.max_step_up {
                            prop_assert!(d.to - current <= cap.size(current) || d.to == p.min, "{:?} {:?}", p, d);
                        }
                        // An alert's scale-up is never one the function's own traffic disowns.
                        if let (Some(a @ (Action::StepUp | Action::Sized { .. })), Some(rate)) = (action, observed) {
                            if let Some(t) = target_of(&p, a).filter(|_| p.staleness_guard) {
                                prop_assert!(proportional(rate, t) > current, "{:?} {:?} rate {}", p, d, rate);
                            }
                        }
                        if let Some(Action::Track(Track { stable, short, .. })) = action {
                            // A measured count: to what one of the windows asked for, the
                            // short one only in a burst.
                            let short_n = short.map(|l| proportional(l, 1.0));
                            let burst = next.burst_until == now.checked_add_signed(chrono::Duration::from_std(BURST_GRACE).unwrap());
                            let asked = stable.max(short_n.filter(|_| burst)).unwrap_or(0);
                            prop_assert!(d.to <= asked.max(p.min), "{:?} {:?}", d, action);
                            let under_way = state.burst_until.is_some_and(|u| u >= now);
                            if !under_way && d.to > stable.map_or(p.min, |n| n.clamp(p.min, p.max.max(p.min))) {
                                prop_assert!(short.unwrap() >= 2.0 * current.max(1) as f64, "{:?}", d);
                            }
                        } else if let Some((t, _, _)) = applied.iter().rev().find(|(_, f, to)| to > f) {
                            // No other scale-up inside the up cooldown.
                            prop_assert!((now - *t).to_std().unwrap() >= p.up_cooldown);
                        }
                    } else {
                        // Never down while a hold is active.
                        prop_assert!(hold_until.is_none_or(|u| u <= now), "{:?} during a hold", d);
                        // No scale-down inside the down cooldown (after any scale) ...
                        if let Some((t, _, _)) = applied.last() {
                            prop_assert!((now - *t).to_std().unwrap() >= p.down_cooldown);
                        }
                        // ... nor below the highest recommendation in the window.
                        let highest = recs.iter()
                            .filter(|(t, _)| (now - *t).to_std().unwrap() <= p.stabilization_window)
                            .map(|(_, r)| *r)
                            .max();
                        if let Some(h) = highest {
                            prop_assert!(d.to >= h.min(current), "{:?} highest {}", d, h);
                        }
                    }
                    // Duplicates never scale twice within the dedupe window.
                    if let Some(k) = &key_text {
                        if action.is_some() {
                            let window = p.up_cooldown.max(p.down_cooldown);
                            let dup = keys_applied.iter().any(|(kk, t)| kk == k && (now - *t).to_std().unwrap() <= window);
                            prop_assert!(!dup, "duplicate {} scaled again: {:?}", k, d);
                            keys_applied.push((k.clone(), now));
                        }
                    }
                    applied.push((now, current, d.to));
                    current = d.to;
                }
                if d.clamps.contains(&Clamp::LoadGone) {
                    prop_assert_eq!(d.to, current);
                }
                let hold_signal = matches!(action, Some(Action::Hold | Action::Release));
                // A tracking reading that neither window acts on is not a recommendation.
                let unread = matches!(action, Some(Action::Track(Track { stable: None, .. })))
                    && !matches!(d.reason.ask, Ask::Track { window: Window::Burst | Window::BurstStart, .. });
                if let Some(Action::Track(Track { enough_at: Some((at, n)), .. })) = action {
                    if !d.clamps.contains(&Clamp::Duplicate) && (now - at).to_std().unwrap() <= p.stabilization_window {
                        recs.push((at, n.clamp(p.min, p.max.max(p.min))));
                    }
                }
                if action.is_some() && !hold_signal && !unread && !d.clamps.contains(&Clamp::Duplicate) && !d.clamps.contains(&Clamp::LoadGone) {
                    let recommended = match d.reason.ask {
                        Ask::Track { window: Window::Floor { asked }, .. } => asked,
                        _ => d.recommended,
                    };
                    recs.push((now, recommended.clamp(p.min, p.max.max(p.min))));
                }
                state = next;
            }
        }
    }
}
