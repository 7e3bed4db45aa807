//! The policy engine (`autoscale::policy::decide`) driven as the executor drives it: a policy
//! built from anything config and labels can express, then a sequence of signals, ticks and idle
//! checks with the clock moving forward between them, manual scales changing the replicas
//! under the engine, redeploys with other labels changing the policy, decisions that are not
//! carried out (paused, dry run, failed: neither replicas nor memory change) and restarts (the
//! state stored as JSON and read back).
//!
//! Besides "no panic", every decision is checked against the engine's rules, tracked here from
//! the decisions themselves rather than from the engine's memory:
//! * only a scale changes the count, and a scale changes it;
//! * a scale lands within [min, max] (max raised to min), except scale to zero after idling;
//! * no scale-up within the up cooldown of the last scale-up, none larger than the step cap
//!   (reaching min is never capped), none that the function's own measured rate already
//!   disowns (the staleness guard);
//! * no scale-down while a hold is active, within the down cooldown of the last scale, below
//!   the highest recommendation of the stabilization window, or by more than one step when
//!   stepping down after a resolve;
//! * a retried alert (same dedupe key) never scales twice within the dedupe window;
//! * the engine is deterministic, its state survives a JSON round trip, and the clock of the
//!   input never goes backwards.

#![no_main]

use std::time::Duration;

use arbitrary::Arbitrary;
use chrono::{DateTime, TimeZone, Utc};
use faastastic::autoscale::policy::{
    decide, proportional, target_of, Action, AlertMode, Ask, Clamp, Input, Outcome, Policy, State,
    Step, StepCap, Track, Window,
};
use libfuzzer_sys::fuzz_target;

/// A replica count: mostly small, sometimes anything a label can say.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Count {
    Small(u8),
    Any(u64),
}

impl Count {
    fn get(self) -> u64 {
        match self {
            Count::Small(n) => u64::from(n % 32),
            Count::Any(n) => n,
        }
    }
}

/// A duration as a label (`parse_duration`, up to ~1.8e19 s) or the config can write it.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Span {
    Zero,
    Secs(u8),
    Millis(u32),
    Hours(u16),
    Any(u64),
}

impl Span {
    fn get(self) -> Duration {
        match self {
            Span::Zero => Duration::ZERO,
            Span::Secs(s) => Duration::from_secs(u64::from(s)),
            Span::Millis(ms) => Duration::from_millis(u64::from(ms)),
            Span::Hours(h) => Duration::from_secs(u64::from(h) * 3600),
            Span::Any(s) => Duration::from_secs(s),
        }
    }
}

/// A finite number above zero (a per-replica target).
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Positive {
    Quarter(u16),
    Raw(f64),
}

impl Positive {
    fn get(self) -> f64 {
        match self {
            Positive::Quarter(n) => (f64::from(n) + 1.0) / 4.0,
            Positive::Raw(v) if v.is_finite() && v > 0.0 => v,
            Positive::Raw(_) => 1.0,
        }
    }
}

/// A finite number zero or above (an alert's value).
#[derive(Arbitrary, Debug, Clone, Copy)]
enum NonNegative {
    Quarter(u16),
    Raw(f64),
}

impl NonNegative {
    fn get(self) -> f64 {
        match self {
            NonNegative::Quarter(n) => f64::from(n) / 4.0,
            NonNegative::Raw(v) if v.is_finite() && v >= 0.0 => v,
            NonNegative::Raw(_) => 0.0,
        }
    }
}

/// A measured rate: usually a plain number, sometimes whatever a float can be.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Rate {
    Quarter(u16),
    Raw(f64),
}

impl Rate {
    fn get(self) -> f64 {
        match self {
            Rate::Quarter(n) => f64::from(n) / 4.0,
            Rate::Raw(v) => v,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum StepSpec {
    Count(Count),
    /// OpenFaaS's factor: 0 to 100 % of max.
    Percent(u8),
}

impl StepSpec {
    fn get(self) -> Step {
        match self {
            StepSpec::Count(c) => Step::Count(c.get()),
            StepSpec::Percent(p) => Step::PercentOfMax(u64::from(p % 101)),
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum CapSpec {
    Count(Count),
    Percent(u16),
}

impl CapSpec {
    /// As `policy::parse_step_cap` accepts them: a positive count, or 1 % to 10000 %.
    fn get(self) -> StepCap {
        match self {
            CapSpec::Count(c) => StepCap::Count(c.get().max(1)),
            CapSpec::Percent(p) => StepCap::Percent(u64::from(p % 10_000) + 1),
        }
    }
}

#[derive(Arbitrary, Debug, Clone)]
struct PolicySpec {
    min: Count,
    max: Count,
    step_up: StepSpec,
    step_down: StepSpec,
    up_cooldown: Span,
    down_cooldown: Span,
    window: Span,
    resolved_to_min: bool,
    zero_after: Option<Span>,
    step_mode: bool,
    target: Option<Positive>,
    max_step_up: Option<CapSpec>,
    staleness_guard: bool,
    /// Seconds; the config accepts (0, 1e9).
    hold_ttl: u32,
}

impl PolicySpec {
    fn get(&self) -> Policy {
        Policy {
            min: self.min.get(),
            max: self.max.get(),
            step_up: self.step_up.get(),
            step_down: self.step_down.get(),
            up_cooldown: self.up_cooldown.get(),
            down_cooldown: self.down_cooldown.get(),
            stabilization_window: self.window.get(),
            resolved_to_min: self.resolved_to_min,
            scale_to_zero_after: self.zero_after.map(Span::get),
            alert_mode: if self.step_mode {
                AlertMode::Step
            } else {
                AlertMode::Proportional
            },
            target_per_replica: self.target.map(Positive::get),
            max_step_up: self.max_step_up.map(CapSpec::get),
            staleness_guard: self.staleness_guard,
            hold_ttl: Duration::from_secs(u64::from(self.hold_ttl % 999_999_999) + 1),
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum ActionSpec {
    StepUp,
    Sized {
        value: NonNegative,
        target: Option<Positive>,
    },
    StepDown,
    To(Count),
    Resolved,
    Hold,
    Release,
    /// A target policy's reading; `enough` is (seconds before the input, count).
    Track {
        stable: Option<Count>,
        short: Option<Rate>,
        recent: Option<Rate>,
        enough: Option<(u8, Count)>,
    },
}

impl ActionSpec {
    fn get(self) -> Action {
        match self {
            ActionSpec::StepUp => Action::StepUp,
            ActionSpec::Sized { value, target } => Action::Sized {
                value: value.get(),
                target: target.map(Positive::get),
            },
            ActionSpec::StepDown => Action::StepDown,
            ActionSpec::To(n) => Action::To(n.get()),
            ActionSpec::Resolved => Action::Resolved,
            ActionSpec::Hold => Action::Hold,
            ActionSpec::Release => Action::Release,
            ActionSpec::Track {
                stable,
                short,
                recent,
                enough,
            } => Action::Track(Track {
                stable: stable.map(Count::get),
                short: short.map(Rate::get),
                recent: recent.map(Rate::get),
                enough_at: enough.map(|(back, n)| {
                    let back = chrono::Duration::seconds(i64::from(back));
                    (DateTime::<Utc>::UNIX_EPOCH + back, n.get())
                }),
            }),
        }
    }

    /// The action at `now`: a reading's steady time is relative to the input.
    fn at(self, now: DateTime<Utc>) -> Action {
        match self.get() {
            Action::Track(mut t) => {
                t.enough_at = t
                    .enough_at
                    .map(|(back, n)| (now - (back - DateTime::<Utc>::UNIX_EPOCH), n));
                Action::Track(t)
            }
            other => other,
        }
    }
}

/// What became of a decision: carried out, or not (autoscaling paused, dry run, the platform
/// call failed or was superseded), in which case the executor keeps neither the new count nor
/// the engine's new memory.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq)]
enum Apply {
    Carried,
    NotCarried,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Wait {
    Millis(u16),
    Secs(u8),
    Minutes(u8),
    Days(u16),
}

impl Wait {
    fn get(self) -> chrono::Duration {
        match self {
            Wait::Millis(ms) => chrono::Duration::milliseconds(i64::from(ms)),
            Wait::Secs(s) => chrono::Duration::seconds(i64::from(s)),
            Wait::Minutes(m) => chrono::Duration::minutes(i64::from(m)),
            Wait::Days(d) => chrono::Duration::days(i64::from(d)),
        }
    }
}

#[derive(Arbitrary, Debug, Clone)]
enum Event {
    Signal {
        action: ActionSpec,
        /// One of a few dedupe keys, so retries happen.
        key: Option<u8>,
        rate: Option<Rate>,
        apply: Apply,
    },
    Tick(Apply),
    Idle(Span, Apply),
    /// The clock moves forward.
    Wait(Wait),
    /// A manual scale (possibly outside min and max) or the reconciler changed the replicas.
    Manual(Count),
    /// A redeploy with other scaling labels: the other policy applies from now on.
    Relabel,
    /// The server restarts: the state is stored as JSON and read back.
    Restart,
}

#[derive(Arbitrary, Debug)]
struct Scenario {
    policy: PolicySpec,
    relabelled: PolicySpec,
    start: Count,
    /// Seconds after 2023-11-14T22:13:20Z.
    clock: u32,
    events: Vec<Event>,
}

/// The engine's rules, tracked from the decisions that were carried out.
#[derive(Default)]
struct Model {
    last_up: Option<DateTime<Utc>>,
    last_down: Option<DateTime<Utc>>,
    hold_until: Option<DateTime<Utc>>,
    /// (when, recommendation clamped into the policy's bounds of the time)
    recommendations: Vec<(DateTime<Utc>, u64)>,
    keys: Vec<(String, DateTime<Utc>)>,
}

fn age(now: DateTime<Utc>, then: DateTime<Utc>) -> Duration {
    (now - then).to_std().unwrap_or(Duration::ZERO)
}

const MAX_EVENTS: usize = 256;

fuzz_target!(|scenario: Scenario| {
    let policies = [scenario.policy.get(), scenario.relabelled.get()];
    let mut which = 0;
    let mut now = Utc
        .timestamp_opt(1_700_000_000 + i64::from(scenario.clock), 0)
        .unwrap();
    let mut current = scenario.start.get();
    let mut state = State::default();
    let mut model = Model::default();

    for event in scenario.events.iter().take(MAX_EVENTS) {
        let policy = &policies[which];
        let (min, max) = (policy.min, policy.max.max(policy.min));
        let (input, apply, key_text, action) = match event {
            Event::Wait(w) => {
                let Some(later) = now.checked_add_signed(w.get()) else {
                    return;
                };
                assert!(later >= now, "the clock went backwards");
                now = later;
                continue;
            }
            Event::Manual(n) => {
                current = n.get();
                continue;
            }
            Event::Relabel => {
                which = 1 - which;
                continue;
            }
            Event::Restart => {
                let text = serde_json::to_string(&state).expect("state serialises");
                let back: State = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("stored state does not load: {e}: {text}"));
                assert_eq!(back, state, "state changed across a restart: {text}");
                state = back;
                continue;
            }
            Event::Signal {
                action,
                key,
                rate,
                apply,
            } => {
                let key_text = key.map(|k| format!("alert-{}", k % 4));
                (
                    Some((action.at(now), rate.map(Rate::get))),
                    *apply,
                    key_text,
                    Some(action.at(now)),
                )
            }
            Event::Tick(apply) => (None, *apply, None, None),
            Event::Idle(span, apply) => {
                let idle_for = span.get();
                let input = Input::Idle { idle_for };
                let (d, next) = decide(policy, current, &state, input, now);
                assert_eq!(
                    decide(policy, current, &state, input, now),
                    (d.clone(), next.clone())
                );
                assert_eq!(d.from, current);
                assert!(
                    !d.reason.to_string().is_empty() && !d.reason.code().is_empty(),
                    "{d:?}"
                );
                if d.outcome == Outcome::Scale {
                    assert_eq!(d.to, 0, "idle scales only to zero: {d:?}");
                    let after = policy.scale_to_zero_after.expect("scale to zero is off");
                    assert!(current > 0 && idle_for >= after, "{d:?}");
                    assert!(
                        model.hold_until.is_none_or(|u| u <= now),
                        "to zero during a hold"
                    );
                    if let Some(last) = model.last_down.max(model.last_up) {
                        assert!(
                            age(now, last) >= policy.down_cooldown,
                            "to zero in cooldown"
                        );
                    }
                } else {
                    assert_eq!(d.to, current, "{d:?}");
                }
                if d.outcome == Outcome::Scale && *apply == Apply::NotCarried {
                    continue;
                }
                if d.outcome == Outcome::Scale {
                    model.last_down = Some(now);
                    current = 0;
                }
                keep(&mut model, policy, now);
                state = next;
                check_state(&state, &model, now);
                continue;
            }
        };

        let input = match input {
            Some((action, observed_rate)) => Input::Signal {
                action,
                dedupe_key: key_text.as_deref(),
                observed_rate,
            },
            None => Input::Tick,
        };
        let (d, next) = decide(policy, current, &state, input, now);
        // Deterministic.
        assert_eq!(
            decide(policy, current, &state, input, now),
            (d.clone(), next.clone())
        );
        assert!(
            !d.reason.to_string().is_empty() && !d.reason.code().is_empty(),
            "{d:?}"
        );
        assert_eq!(d.from, current);

        // The engine prunes its memory by the current policy before deciding.
        let mut pruned = Model {
            recommendations: model.recommendations.clone(),
            keys: model.keys.clone(),
            ..Model::default()
        };
        keep(&mut pruned, policy, now);

        // What the input asks for (a retry of an applied alert asks for nothing).
        let duplicate = d.clamps.contains(&Clamp::Duplicate);
        match action {
            Some(Action::Hold) | Some(Action::Release) => {
                assert_eq!(d.outcome, Outcome::NoChange);
            }
            _ if duplicate => assert_eq!(d.outcome, Outcome::Held),
            Some(Action::Resolved) if policy.resolved_to_min => assert_eq!(d.recommended, min),
            Some(Action::To(n)) => assert_eq!(d.recommended, n),
            Some(a @ Action::Sized { value, .. })
                if policy.alert_mode == AlertMode::Proportional =>
            {
                if let Some(t) = target_of(policy, a) {
                    assert_eq!(d.recommended, proportional(value, t), "{d:?}");
                }
            }
            _ => {}
        }

        if d.outcome != Outcome::Scale {
            assert_eq!(d.to, current, "only a scale changes the count: {d:?}");
        } else {
            assert_ne!(d.to, current, "a scale that changes nothing: {d:?}");
            assert!(
                d.to >= min && d.to <= max,
                "scaled outside [{min}, {max}]: {d:?}\npolicy {policy:?}"
            );
            if d.to > current {
                match action {
                    // A measured count is not held by the up cooldown, and goes no higher
                    // than one of its windows asked (the short one only in a burst).
                    Some(Action::Track(t)) => {
                        let short = t
                            .short
                            .filter(|l| l.is_finite() && *l >= 0.0)
                            .map(|l| proportional(l, 1.0));
                        let asked = t.stable.max(short).unwrap_or(0);
                        assert!(d.to <= asked.max(min), "above what was asked: {d:?}");
                    }
                    _ => {
                        if let Some(t) = model.last_up {
                            assert!(age(now, t) >= policy.up_cooldown, "up in cooldown: {d:?}");
                        }
                    }
                }
                if let Some(cap) = policy.max_step_up {
                    let limit = current.saturating_add(cap.size(current)).max(min);
                    assert!(d.to <= limit, "above the step cap {limit}: {d:?}");
                }
                if let Some(a @ (Action::StepUp | Action::Sized { .. })) = action {
                    let Input::Signal { observed_rate, .. } = input else {
                        unreachable!()
                    };
                    let target = target_of(policy, a);
                    if let (Some(rate), Some(t), true) =
                        (observed_rate, target, policy.staleness_guard)
                    {
                        if rate.is_finite() {
                            assert!(
                                proportional(rate, t) > current,
                                "up although {rate}/s at {t} needs no more: {d:?}"
                            );
                        }
                    }
                }
            } else {
                assert!(
                    model.hold_until.is_none_or(|u| u <= now),
                    "down during a hold: {d:?}"
                );
                if let Some(last) = model.last_down.max(model.last_up) {
                    assert!(
                        age(now, last) >= policy.down_cooldown,
                        "down in cooldown: {d:?}"
                    );
                }
                // Never below what the function's own counters show it needs.
                if let Some(Action::Track(Track {
                    recent: Some(load), ..
                })) = action
                {
                    if load.is_finite() && load >= 0.0 {
                        let needs = proportional(load, 1.0).min(current).min(max);
                        assert!(d.to >= needs, "below the counters' {needs}: {d:?}");
                    }
                }
                // A steady reading it carries counts as a recommendation.
                let mut recommendations = pruned.recommendations.clone();
                if let Some(Action::Track(Track {
                    enough_at: Some((at, n)),
                    ..
                })) = action
                {
                    if age(now, at) <= policy.stabilization_window && !duplicate {
                        recommendations.push((at, n.clamp(min, max)));
                    }
                }
                if let Some(highest) = recommendations.iter().map(|(_, r)| *r).max() {
                    assert!(
                        d.to >= highest.min(current).min(max),
                        "below the window's highest {highest}: {d:?}"
                    );
                }
                let stepping = action.is_none()
                    || (action == Some(Action::Resolved) && !policy.resolved_to_min);
                if stepping {
                    let step = policy.step_down.size(max).max(1);
                    assert!(
                        d.to >= current.saturating_sub(step).min(max),
                        "more than one step of {step} down: {d:?}"
                    );
                }
            }
            if let Some(k) = &key_text {
                assert!(
                    !pruned.keys.iter().any(|(kk, _)| kk == k),
                    "retry {k} scaled again: {d:?}"
                );
            }
        }

        if d.outcome == Outcome::Scale && apply == Apply::NotCarried {
            continue;
        }
        // Kept: the engine's new memory, and the model's.
        model.recommendations = pruned.recommendations;
        model.keys = pruned.keys;
        match action {
            Some(Action::Hold) => {
                model.hold_until =
                    Some(now + chrono::Duration::from_std(policy.hold_ttl).expect("ttl"));
            }
            Some(Action::Release) => model.hold_until = None,
            Some(_) => {
                // Remembered by the window unless held before the clamp (a retry, load
                // gone) or left alone at zero; leaving one out only weakens the check.
                let held_early = d
                    .clamps
                    .iter()
                    .any(|c| matches!(c, Clamp::Duplicate | Clamp::LoadGone));
                let left_at_zero = current == 0 && d.outcome == Outcome::NoChange;
                let mut remembered = !held_early && !left_at_zero;
                let mut recommended = d.recommended;
                if let Some(Action::Track(t)) = action {
                    if let (Some((at, n)), false) = (t.enough_at, held_early) {
                        if age(now, at) <= policy.stabilization_window {
                            model.recommendations.push((at, n.clamp(min, max)));
                        }
                    }
                    // Only what a window decided is remembered, a floor as what was asked.
                    match d.reason.ask {
                        Ask::Track {
                            window: Window::Floor { asked },
                            ..
                        } => recommended = asked,
                        Ask::Track {
                            window: Window::Policy | Window::Burst | Window::BurstStart,
                            ..
                        } if t.stable.is_some() || d.reason.code() == "burst" => {}
                        _ => remembered = false,
                    }
                }
                if remembered {
                    model
                        .recommendations
                        .push((now, recommended.clamp(min, max)));
                }
            }
            None => {}
        }
        if d.outcome == Outcome::Scale {
            if d.to > current {
                model.last_up = Some(now);
            } else {
                model.last_down = Some(now);
            }
            if let Some(k) = key_text {
                model.keys.push((k, now));
            }
            current = d.to;
        }
        state = next;
        check_state(&state, &model, now);
    }
});

/// What the engine forgets at every decision it keeps: recommendations older than the window
/// and alert keys older than the dedupe window.
fn keep(model: &mut Model, policy: &Policy, now: DateTime<Utc>) {
    let window = policy.stabilization_window;
    model
        .recommendations
        .retain(|(at, _)| age(now, *at) <= window);
    let dedupe = policy.up_cooldown.max(policy.down_cooldown);
    model.keys.retain(|(_, at)| age(now, *at) <= dedupe);
}

/// The engine's memory agrees with what was carried out and never lies in the future.
fn check_state(state: &State, model: &Model, now: DateTime<Utc>) {
    assert_eq!(state.last_scale_up, model.last_up);
    assert_eq!(state.last_scale_down, model.last_down);
    let active = |u: Option<DateTime<Utc>>| u.filter(|u| *u > now);
    assert_eq!(active(state.hold_until), active(model.hold_until));
    assert!(state.recommendations.iter().all(|(t, _)| *t <= now));
    assert!(state.applied.iter().all(|(_, t)| *t <= now));
    let keys: Vec<&str> = state.applied.iter().map(|(k, _)| k.as_str()).collect();
    let expected: Vec<&str> = model.keys.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, expected, "remembered alert keys");
}
