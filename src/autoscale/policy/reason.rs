//! Why the engine decided what it did, as data. A decision's reason names what the input asked
//! for ([`Ask`]) and the rule that settled it ([`Rule`]); its text (`Display`) is what
//! `/system/scale-events`, the log and the Grafana annotation show, and [`Reason::code`] is
//! the machine-readable form beside it.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{Clamp, Step, StepCap};

/// What an input asked for, before any rule applied.
#[derive(Debug, Clone, PartialEq)]
pub enum Ask {
    /// A hold alert fired: no scale-down until it resolves or `ttl` passes without a delivery.
    HoldSet {
        ttl: Duration,
    },
    /// The hold alert resolved.
    HoldReleased,
    /// An idle check of a function that did not opt in to scale to zero.
    ScaleToZeroOff,
    /// An idle check of a function idle for less than its scale-to-zero time.
    Idle {
        idle_for: Duration,
    },
    /// Idle long enough to go to zero.
    ScaleToZero {
        idle_for: Duration,
        after: Duration,
    },
    /// A wake of a function that already runs replicas.
    AlreadyRunning {
        current: u64,
    },
    /// An invocation found the function at zero; `waiting` requests are held.
    Wake {
        waiting: u64,
    },
    /// An operator's count; `outside` is min..max when the count leaves them (override).
    Manual {
        outside: Option<(u64, u64)>,
    },
    /// A retry of an alert already applied at `at`.
    Duplicate {
        at: DateTime<Utc>,
    },
    /// A firing alert in OpenFaaS step mode.
    StepUp {
        step: u64,
        of: Step,
        why: StepMode,
    },
    /// A firing alert whose step works out at 0: OpenFaaS sets min.
    StepZero {
        why: StepMode,
    },
    /// A firing alert sized by its value against the per-replica target.
    Proportional {
        value: f64,
        target: f64,
        to: u64,
    },
    StepDown {
        step: u64,
    },
    AskedFor {
        replicas: u64,
    },
    /// A target-tracking reading asks for `replicas`, by the reading of `window`.
    Track {
        replicas: u64,
        window: Window,
    },
    /// Resolved, with `resolved_to_min`.
    ResolvedToMin,
    /// Resolved: stepping down gradually.
    Resolved {
        step: u64,
        min: u64,
    },
    /// A tick with nothing to continue.
    NothingToDo,
    /// A tick continuing a gradual scale-down.
    NoLongerFiring {
        step: u64,
        min: u64,
    },
}

/// Why a firing alert was sized in step mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepMode {
    /// It carried no value.
    Plain,
    /// The policy says `alert_mode = step`.
    AlertModeStep,
    /// It carried a value but no target is known to size it against.
    NoTarget,
}

/// Which window a target-tracking decision followed (see `policy::Track`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// The policy's own window: its query, or the internal rate over `window_secs`.
    Policy,
    /// The short window started a burst: it asked for at least twice the running count.
    BurstStart,
    /// A burst under way: the short window still asks for more than runs.
    Burst,
    /// The short window asked for more, but less than twice the running count: no burst,
    /// and the policy's window had nothing to say this time.
    BelowBurst,
    /// The policy's window asked for `asked`, fewer than faastastic's own counters still
    /// show are needed.
    Floor { asked: u64 },
}

/// The rule that settled the decision.
#[derive(Debug, Clone, PartialEq)]
pub enum Rule {
    /// The ask says it all.
    Ask,
    /// The count goes (or stays, for an operator's count) from `from` to `to`.
    Change { from: u64, to: u64 },
    /// Already at the bounded recommendation; `held_by` is the bound that made it so when
    /// the input asked for another count (a held decision).
    Already {
        current: u64,
        min: u64,
        max: u64,
        held_by: Option<Clamp>,
    },
    /// At zero, which only an invocation or a demand for replicas changes.
    AtZero,
    /// The staleness guard: faastastic's own counters show the load gone.
    LoadGone {
        rate: f64,
        current: u64,
        target: f64,
    },
    UpCooldown {
        cooldown: Duration,
        elapsed: Duration,
    },
    DownCooldown {
        cooldown: Duration,
        elapsed: Duration,
    },
    /// A hold alert forbids scale-down until `until` at the latest.
    Hold { until: DateTime<Utc> },
    /// A higher count was recommended within the stabilization window.
    Stabilization { highest: u64, window: Duration },
}

/// A pause that held a change the engine decided (see the executor).
#[derive(Debug, Clone, PartialEq)]
pub struct Paused {
    /// Every function's autoscaling is paused, not only this one's.
    pub all: bool,
    pub since: DateTime<Utc>,
    pub why: String,
}

/// A decision's reason: what was asked, the scale-up cap that cut it (count, cap) if any, and
/// the rule that settled it.
#[derive(Debug, Clone, PartialEq)]
pub struct Reason {
    pub ask: Ask,
    pub capped: Option<(u64, StepCap)>,
    pub rule: Rule,
    /// Set when a pause held the change this reason explains.
    pub paused: Option<Paused>,
    /// A measured count scaled up inside the up cooldown (which holds only steps): (the
    /// cooldown, time since the last scale-up).
    pub inside_up_cooldown: Option<(Duration, Duration)>,
}

impl Reason {
    pub fn new(ask: Ask, rule: Rule) -> Reason {
        Reason {
            ask,
            capped: None,
            rule,
            paused: None,
            inside_up_cooldown: None,
        }
    }

    /// The machine-readable reason: the rule that held a change back, or else what asked for
    /// the change. Stable names, listed in the README.
    pub fn code(&self) -> &'static str {
        if self.paused.is_some() {
            return "paused";
        }
        match &self.rule {
            Rule::Already {
                held_by: Some(Clamp::Max),
                ..
            } => "max",
            Rule::Already {
                held_by: Some(Clamp::Min),
                ..
            } => "min",
            Rule::AtZero => "at_zero",
            Rule::LoadGone { .. } => "load_gone",
            Rule::UpCooldown { .. } => "up_cooldown",
            Rule::DownCooldown { .. } => "down_cooldown",
            Rule::Hold { .. } => "hold",
            Rule::Stabilization { .. } => "stabilization",
            Rule::Ask | Rule::Change { .. } | Rule::Already { .. } => match self.ask {
                Ask::HoldSet { .. } => "hold_set",
                Ask::HoldReleased => "hold_released",
                Ask::ScaleToZeroOff => "scale_to_zero_off",
                Ask::Idle { .. } => "idle",
                Ask::ScaleToZero { .. } => "scale_to_zero",
                Ask::AlreadyRunning { .. } => "already_running",
                Ask::Wake { .. } => "wake",
                Ask::Manual { .. } => "manual",
                Ask::Duplicate { .. } => "duplicate",
                Ask::StepUp { .. } | Ask::StepZero { .. } => "step_up",
                Ask::Proportional { .. } => "proportional",
                Ask::StepDown { .. } => "step_down",
                Ask::AskedFor { .. } => "asked_for",
                Ask::Track {
                    window: Window::Policy | Window::Floor { .. },
                    ..
                } => "target",
                Ask::Track {
                    window: Window::BurstStart | Window::Burst,
                    ..
                } => "burst",
                Ask::Track {
                    window: Window::BelowBurst,
                    ..
                } => "below_burst",
                Ask::ResolvedToMin => "resolved_to_min",
                Ask::Resolved { .. } => "resolved",
                Ask::NothingToDo => "nothing_to_do",
                Ask::NoLongerFiring { .. } => "stepping_down",
            },
        }
    }
}

/// Whole seconds bare, others to a tenth (rounded half up); from integers, as formatting a
/// float to a precision costs more than the rest of a decision.
pub struct Secs(pub Duration);

impl fmt::Display for Secs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.subsec_nanos() == 0 {
            return write!(f, "{}s", d.as_secs());
        }
        let tenths = d.as_nanos().saturating_add(50_000_000) / 100_000_000;
        write!(f, "{}.{}s", tenths / 10, tenths % 10)
    }
}

/// A measured value as a reason shows it: whole numbers bare, others to two decimals.
struct Number(f64);

impl fmt::Display for Number {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0;
        if v.fract() == 0.0 && v.abs() < 1e15 {
            write!(f, "{v:.0}")
        } else {
            write!(f, "{v:.2}")
        }
    }
}

fn at(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

impl fmt::Display for StepMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StepMode::Plain => "",
            StepMode::AlertModeStep => " (alert_mode step)",
            StepMode::NoTarget => " (no target_per_replica to size the alert's value against)",
        })
    }
}

impl fmt::Display for Ask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ask::HoldSet { ttl } => write!(
                f,
                "hold: no scale-down until the alert resolves (or {} without a delivery)",
                Secs(*ttl)
            ),
            Ask::HoldReleased => f.write_str("hold released"),
            Ask::ScaleToZeroOff => f.write_str("scale to zero is off"),
            Ask::Idle { idle_for } => write!(f, "idle for {}", Secs(*idle_for)),
            Ask::ScaleToZero { idle_for, after } => write!(
                f,
                "no invocation for {} (scale to zero after {})",
                Secs(*idle_for),
                Secs(*after)
            ),
            Ask::AlreadyRunning { current } => write!(f, "already running {current} replicas"),
            Ask::Wake { waiting: 1 } => {
                f.write_str("woken from zero by an invocation (1 request waiting)")
            }
            Ask::Wake { waiting } => write!(
                f,
                "woken from zero by an invocation ({waiting} requests waiting)"
            ),
            Ask::Manual { .. } => f.write_str("manual scale"),
            Ask::Duplicate { at: when } => write!(
                f,
                "duplicate of an alert already applied at {} (same fingerprint and start); ignored",
                at(when)
            ),
            Ask::StepUp { step, of, why } => write!(f, "firing: step up by {step} ({of}){why}"),
            Ask::StepZero { why } => write!(f, "firing, but the step is 0: OpenFaaS sets min{why}"),
            Ask::Proportional { value, target, to } => {
                let (v, t) = (Number(*value), Number(*target));
                write!(
                    f,
                    "firing at {v} against {t} per replica: ceil({v} / {t}) = {to}"
                )
            }
            Ask::StepDown { step } => write!(f, "step down by {step}"),
            Ask::AskedFor { replicas } => write!(f, "asked for {replicas} replicas"),
            Ask::Track { replicas, window } => match window {
                Window::Policy => write!(f, "the policy's window asks for {replicas} replicas"),
                Window::BurstStart => write!(
                    f,
                    "burst: the short window asks for {replicas} replicas, at least twice as many as run"
                ),
                Window::Burst => write!(
                    f,
                    "burst: the short window still asks for more, {replicas} replicas"
                ),
                Window::BelowBurst => write!(
                    f,
                    "the short window asks for {replicas} replicas, under twice as many as run: no burst"
                ),
                Window::Floor { asked } => write!(
                    f,
                    "the policy's window asks for {asked} replicas, but faastastic's own counters still show {replicas} needed"
                ),
            },
            Ask::ResolvedToMin => f.write_str("resolved: back to min (resolved_to_min)"),
            Ask::Resolved { step, min } => {
                write!(f, "resolved: stepping down by {step} towards min {min}")
            }
            Ask::NothingToDo => f.write_str("nothing to do"),
            Ask::NoLongerFiring { step, min } => write!(
                f,
                "no longer firing: stepping down by {step} towards min {min}"
            ),
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.ask)?;
        if let Some((limit, cap)) = self.capped {
            write!(
                f,
                "; capped at {limit} by the step limit (max-step-up {cap})"
            )?;
        }
        match &self.rule {
            Rule::Ask => {}
            Rule::Change { from, to } => write!(f, ": {from} -> {to}")?,
            Rule::Already {
                current, min, max, ..
            } => write!(f, "; already at {current} (min {min}, max {max})")?,
            Rule::AtZero => f.write_str(
                "; at zero replicas, which only an invocation or a demand for replicas changes",
            )?,
            Rule::LoadGone {
                rate,
                current,
                target,
            } => write!(
                f,
                "; held: load already gone: faastastic measures {}/s now, which {current} replica(s) at {} each carry",
                Number(*rate),
                Number(*target)
            )?,
            Rule::UpCooldown { cooldown, elapsed } => write!(
                f,
                "; held: up cooldown {} not over ({} since the last scale-up)",
                Secs(*cooldown),
                Secs(*elapsed)
            )?,
            Rule::DownCooldown { cooldown, elapsed } => write!(
                f,
                "; held: down cooldown {} not over ({} since the last scale)",
                Secs(*cooldown),
                Secs(*elapsed)
            )?,
            Rule::Hold { until } => write!(
                f,
                "; held: a hold alert forbids scale-down until it resolves (at the latest {})",
                at(until)
            )?,
            Rule::Stabilization { highest, window } => write!(
                f,
                "; held: {highest} replicas were recommended within the {} stabilization window",
                Secs(*window)
            )?,
        }
        if let Some((cooldown, elapsed)) = self.inside_up_cooldown {
            write!(
                f,
                " ({} into the {} up cooldown, which holds steps, not a count measured from the load)",
                Secs(elapsed),
                Secs(cooldown)
            )?;
        }
        if let Ask::Manual {
            outside: Some((min, max)),
        } = self.ask
        {
            write!(f, " (override: outside min..max {min}..{max})")?;
        }
        if let Some(Paused { all, since, why }) = &self.paused {
            let scope = if *all {
                "all functions"
            } else {
                "this function"
            };
            write!(
                f,
                "; held: autoscaling paused ({scope}) since {} ({why})",
                at(since)
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_in_whole_seconds_or_tenths() {
        let text = |ms: u64| Secs(Duration::from_millis(ms)).to_string();
        assert_eq!(text(0), "0s");
        assert_eq!(text(30_000), "30s");
        assert_eq!(text(1_500), "1.5s");
        assert_eq!(text(1_949), "1.9s");
        assert_eq!(text(1_950), "2.0s");
        assert_eq!(text(40), "0.0s");
        assert_eq!(text(86_400_100), "86400.1s");
    }

    #[test]
    fn the_code_names_the_rule_that_held_else_the_ask() {
        let ask = Ask::StepUp {
            step: 1,
            of: Step::Count(1),
            why: StepMode::Plain,
        };
        let scaled = Reason::new(ask.clone(), Rule::Change { from: 1, to: 2 });
        assert_eq!(scaled.code(), "step_up");
        assert_eq!(scaled.to_string(), "firing: step up by 1 (1): 1 -> 2");
        let held = Reason::new(
            ask,
            Rule::UpCooldown {
                cooldown: Duration::from_secs(5),
                elapsed: Duration::from_millis(1500),
            },
        );
        assert_eq!(held.code(), "up_cooldown");
        assert_eq!(
            held.to_string(),
            "firing: step up by 1 (1); held: up cooldown 5s not over (1.5s since the last scale-up)"
        );
        let manual = Reason::new(
            Ask::Manual {
                outside: Some((1, 4)),
            },
            Rule::Change { from: 1, to: 9 },
        );
        assert_eq!(
            manual.to_string(),
            "manual scale: 1 -> 9 (override: outside min..max 1..4)"
        );
        assert_eq!(manual.code(), "manual");
    }

    #[test]
    fn a_pause_follows_the_whole_reason_and_a_bound_names_itself() {
        use chrono::TimeZone;
        let mut paused = Reason::new(
            Ask::StepUp {
                step: 1,
                of: Step::PercentOfMax(10),
                why: StepMode::Plain,
            },
            Rule::Change { from: 1, to: 2 },
        );
        paused.paused = Some(Paused {
            all: false,
            since: Utc.timestamp_opt(1_700_000_000, 0).unwrap(),
            why: "batch window".into(),
        });
        assert_eq!(
            paused.to_string(),
            "firing: step up by 1 (10% of max): 1 -> 2; held: autoscaling paused (this function) since 2023-11-14T22:13:20Z (batch window)"
        );
        assert_eq!(paused.code(), "paused");
        let at_max = Reason::new(
            Ask::AskedFor { replicas: 9 },
            Rule::Already {
                current: 5,
                min: 1,
                max: 5,
                held_by: Some(Clamp::Max),
            },
        );
        assert_eq!(at_max.code(), "max");
        assert_eq!(
            at_max.to_string(),
            "asked for 9 replicas; already at 5 (min 1, max 5)"
        );
    }
}
