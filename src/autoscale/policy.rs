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
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "action", content = "replicas")]
pub enum Action {
    /// A firing alert in step mode.
    StepUp,
    /// An explicit request to step down.
    StepDown,
    /// An explicit replica count.
    To(u64),
    /// The alert that asked for more stopped firing.
    Resolved,
}

/// One input to the engine.
#[derive(Debug, Clone, PartialEq)]
pub enum Input<'a> {
    Signal {
        action: Action,
        /// Identifies retries of one alert (fingerprint and `startsAt`).
        dedupe_key: Option<&'a str>,
    },
    /// Periodic re-evaluation, which continues a gradual scale-down.
    Tick,
    /// Periodic check of a function that has had no invocation for `idle_for`.
    Idle { idle_for: Duration },
}

/// What the engine remembers about one function between decisions. Serialisable so that
/// cooldowns and windows survive a restart.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub last_scale_up: Option<DateTime<Utc>>,
    pub last_scale_down: Option<DateTime<Utc>>,
    /// (when, recommended replicas after clamping), oldest first, pruned to the window.
    pub recommendations: VecDeque<(DateTime<Utc>, u64)>,
    /// Alert retries already applied: (dedupe key, when).
    pub applied: VecDeque<(String, DateTime<Utc>)>,
    /// A resolve happened and replicas are stepping down towards min on ticks.
    pub stepping_down: bool,
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub from: u64,
    pub to: u64,
    /// The input's recommendation before clamps, cooldowns and the window.
    pub recommended: u64,
    pub outcome: Outcome,
    pub clamps: Vec<Clamp>,
    pub reason: String,
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

fn cooldown_reason(
    why: &str,
    which: &str,
    cooldown: Duration,
    elapsed: Duration,
    since_what: &str,
) -> String {
    format!(
        "{why}; held: {which} cooldown {} not over ({} since the last {since_what})",
        secs_text(cooldown),
        secs_text(elapsed)
    )
}

fn secs_text(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0}s")
    } else {
        format!("{s:.1}s")
    }
}

/// Decides what to do with one input. Pure: the same arguments always give the same result.
pub fn decide(
    policy: &Policy,
    current: u64,
    state: &State,
    input: Input<'_>,
    now: DateTime<Utc>,
) -> (Decision, State) {
    let mut next = state.clone();
    let window = policy.stabilization_window;
    next.recommendations
        .retain(|(at, _)| since(now, Some(*at)).is_some_and(|age| age <= window));
    let dedupe_window = policy.up_cooldown.max(policy.down_cooldown);
    next.applied
        .retain(|(_, at)| since(now, Some(*at)).is_some_and(|age| age <= dedupe_window));

    let (min, max) = (policy.min, policy.max.max(policy.min));
    let mut clamps = Vec::new();
    let held = |to: u64, recommended: u64, clamps: Vec<Clamp>, reason: String| Decision {
        from: current,
        to,
        recommended,
        outcome: Outcome::Held,
        clamps,
        reason,
    };

    // Scale to zero is opt-in and bypasses min; it still waits out the down cooldown.
    if let Input::Idle { idle_for } = input {
        let nothing = |reason: String| Decision {
            from: current,
            to: current,
            recommended: current,
            outcome: Outcome::NoChange,
            clamps: Vec::new(),
            reason,
        };
        let Some(after) = policy.scale_to_zero_after else {
            return (nothing("scale to zero is off".to_string()), next);
        };
        if current == 0 || idle_for < after {
            return (nothing(format!("idle for {}", secs_text(idle_for))), next);
        }
        let why = format!(
            "no invocation for {} (scale to zero after {})",
            secs_text(idle_for),
            secs_text(after)
        );
        let last_scale = state.last_scale_down.max(state.last_scale_up);
        if let Some(elapsed) = in_cooldown(now, last_scale, policy.down_cooldown) {
            let reason = cooldown_reason(&why, "down", policy.down_cooldown, elapsed, "scale");
            return (held(current, 0, vec![Clamp::DownCooldown], reason), next);
        }
        next.stepping_down = false;
        next.last_scale_down = Some(now);
        let d = Decision {
            from: current,
            to: 0,
            recommended: 0,
            outcome: Outcome::Scale,
            clamps: Vec::new(),
            reason: format!("{why}: {current} -> 0"),
        };
        return (d, next);
    }

    // 1. The desired count, its reason and, for a gradual scale-down, the largest step allowed.
    let step_down = policy.step_down.size(max).max(1);
    let (recommended, why, max_step_down) = match input {
        Input::Signal { dedupe_key, action } => {
            if let Some(key) = dedupe_key {
                if let Some((_, at)) = next.applied.iter().find(|(k, _)| k == key) {
                    let d = held(
                        current,
                        current,
                        vec![Clamp::Duplicate],
                        format!(
                            "duplicate of an alert already applied at {} (same fingerprint and start); ignored",
                            at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                        ),
                    );
                    return (d, next);
                }
            }
            match action {
                Action::StepUp => {
                    next.stepping_down = false;
                    let step = policy.step_up.size(max);
                    if step == 0 {
                        (
                            min,
                            "firing, but the step is 0: OpenFaaS sets min".to_string(),
                            None,
                        )
                    } else {
                        (
                            current.saturating_add(step),
                            format!("firing: step up by {step} ({})", policy.step_up),
                            None,
                        )
                    }
                }
                Action::StepDown => (
                    current.saturating_sub(step_down),
                    format!("step down by {step_down}"),
                    None,
                ),
                Action::To(n) => (n, format!("asked for {n} replicas"), None),
                Action::Resolved if policy.resolved_to_min => {
                    next.stepping_down = false;
                    (
                        min,
                        "resolved: back to min (resolved_to_min)".to_string(),
                        None,
                    )
                }
                Action::Resolved => {
                    next.stepping_down = true;
                    (
                        min,
                        format!("resolved: stepping down by {step_down} towards min {min}"),
                        Some(step_down),
                    )
                }
            }
        }
        Input::Idle { .. } => unreachable!("handled above"),
        Input::Tick => {
            if !next.stepping_down || current <= min {
                next.stepping_down = false;
                let d = Decision {
                    from: current,
                    to: current,
                    recommended: current,
                    outcome: Outcome::NoChange,
                    clamps,
                    reason: "nothing to do".to_string(),
                };
                return (d, next);
            }
            (
                min,
                format!("no longer firing: stepping down by {step_down} towards min {min}"),
                Some(step_down),
            )
        }
    };

    // 2. Clamp into [min, max]; the clamped count is what the window remembers.
    let mut to = recommended;
    if to < min {
        to = min;
        clamps.push(Clamp::Min);
    }
    if to > max {
        to = max;
        clamps.push(Clamp::Max);
    }
    next.recommendations.push_back((now, to));

    if to == current {
        if current <= min {
            next.stepping_down = false;
        }
        let reason = format!("{why}; already at {current} (min {min}, max {max})");
        let d = Decision {
            from: current,
            to,
            recommended,
            outcome: if clamps.is_empty() {
                Outcome::NoChange
            } else {
                Outcome::Held
            },
            clamps,
            reason,
        };
        return (d, next);
    }

    // 3. Cooldowns, the stabilization window and the step limit.
    if to > current {
        if let Some(elapsed) = in_cooldown(now, state.last_scale_up, policy.up_cooldown) {
            clamps.push(Clamp::UpCooldown);
            let reason = cooldown_reason(&why, "up", policy.up_cooldown, elapsed, "scale-up");
            return (held(current, recommended, clamps, reason), next);
        }
    } else {
        let last_scale = state.last_scale_down.max(state.last_scale_up);
        if let Some(elapsed) = in_cooldown(now, last_scale, policy.down_cooldown) {
            clamps.push(Clamp::DownCooldown);
            let reason = cooldown_reason(&why, "down", policy.down_cooldown, elapsed, "scale");
            return (held(current, recommended, clamps, reason), next);
        }
        let highest = next
            .recommendations
            .iter()
            .map(|(_, r)| *r)
            .max()
            .unwrap_or(to);
        if highest > to {
            clamps.push(Clamp::Stabilization);
            if highest >= current {
                let reason = format!(
                    "{why}; held: {highest} replicas were recommended within the {} stabilization window",
                    secs_text(window)
                );
                return (held(current, recommended, clamps, reason), next);
            }
            to = highest;
        }
        if let Some(step) = max_step_down {
            // Gradual within bounds; above max the clamp applies at once.
            to = to.max(current.saturating_sub(step)).min(max);
        }
    }

    // 4. Scale.
    if let Input::Signal {
        dedupe_key: Some(key),
        ..
    } = input
    {
        next.applied.push_back((key.to_string(), now));
    }
    if to > current {
        next.last_scale_up = Some(now);
    } else {
        next.last_scale_down = Some(now);
        if to <= min {
            next.stepping_down = false;
        }
    }
    let d = Decision {
        from: current,
        to,
        recommended,
        outcome: Outcome::Scale,
        reason: format!("{why}: {current} -> {to}"),
        clamps,
    };
    (d, next)
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
        }
    }

    fn signal(action: Action) -> Input<'static> {
        Input::Signal {
            action,
            dedupe_key: None,
        }
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
        }
    }

    /// A timeline: each step is (seconds, input, expected replicas after it).
    fn timeline(policy: &Policy, start: u64, steps: &[(i64, Input<'_>, u64)]) {
        let mut current = start;
        let mut state = State::default();
        for (t, input, want) in steps {
            let (d, next) = decide(policy, current, &state, input.clone(), at(*t));
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
        };
        let (d, s) = decide(&p, 1, &State::default(), firing.clone(), at(0));
        assert_eq!((d.outcome, d.to), (Outcome::Scale, 3));
        let (d, s) = decide(&p, 3, &s, firing.clone(), at(1));
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
        assert!(d.reason.contains("no invocation"), "{}", d.reason);
        // Right after a scale-up the down cooldown still applies.
        let (_, s2) = decide(&on, 1, &s, signal(Action::StepUp), at(10));
        let (d, _) = decide(&on, 3, &s2, idle(1000), at(11));
        assert_eq!(d.outcome, Outcome::Held);
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

    #[test]
    fn clamps_are_reported() {
        let p = gradual();
        let (d, _) = decide(&p, 9, &State::default(), signal(Action::To(50)), at(0));
        assert_eq!((d.to, d.recommended), (10, 50));
        assert_eq!(d.clamps, vec![Clamp::Max]);
        assert!(d.reason.contains("asked for 50"), "{}", d.reason);
        let (d, _) = decide(&p, 1, &State::default(), signal(Action::To(0)), at(0));
        assert_eq!(d.outcome, Outcome::Held);
        assert_eq!(d.clamps, vec![Clamp::Min]);
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
        )
            .prop_map(|(min, extra, up, down, upc, downc, win, to_min)| Policy {
                min,
                max: min + extra,
                step_up: up,
                step_down: down,
                up_cooldown: Duration::from_secs(upc),
                down_cooldown: Duration::from_secs(downc),
                stabilization_window: Duration::from_secs(win),
                resolved_to_min: to_min,
                scale_to_zero_after: None,
            })
    }

    /// (seconds after the previous input, input: None = tick, duplicate key index)
    fn inputs() -> impl Strategy<Value = Vec<(u64, Option<Action>, Option<u8>)>> {
        prop::collection::vec(
            (
                0u64..40,
                prop::option::of(action()),
                prop::option::of(0u8..3),
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
            for (gap, action, key) in seq {
                now += chrono::Duration::seconds(gap as i64);
                let key_text = key.map(|k| format!("alert-{k}"));
                let input = match action {
                    Some(a) => Input::Signal { action: a, dedupe_key: key_text.as_deref() },
                    None => Input::Tick,
                };
                let (d, next) = decide(&p, current, &state, input.clone(), now);
                // Deterministic.
                let (again, again_state) = decide(&p, current, &state, input.clone(), now);
                prop_assert_eq!(&d, &again);
                prop_assert_eq!(&next, &again_state);
                prop_assert_eq!(d.from, current);
                if d.outcome == Outcome::Scale {
                    // Within bounds.
                    prop_assert!(d.to >= p.min && d.to <= p.max.max(p.min), "{:?} {:?}", p, d);
                    prop_assert_ne!(d.to, current);
                    if d.to > current {
                        // No scale-up inside the up cooldown.
                        if let Some((t, _, _)) = applied.iter().rev().find(|(_, f, to)| to > f) {
                            prop_assert!((now - *t).to_std().unwrap() >= p.up_cooldown);
                        }
                    } else {
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
                if action.is_some() && !d.clamps.contains(&Clamp::Duplicate) {
                    recs.push((now, d.recommended.clamp(p.min, p.max.max(p.min))));
                }
                state = next;
            }
        }
    }
}
