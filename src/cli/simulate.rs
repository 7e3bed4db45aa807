//! `faastastic policy simulate`: replays a recorded series of signals through the engine with a
//! given policy, stepping the clock between signals as the ticker would, and returns the replica
//! timeline. Nothing is executed.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::autoscale::policy::{decide, Action, Input, Outcome, Policy, State, Track};

/// One line of the input: when (`at`, RFC 3339, or `t`, seconds from the first line) and what.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    #[serde(default)]
    at: Option<DateTime<Utc>>,
    #[serde(default)]
    t: Option<f64>,
    /// `firing`/`step_up`, `resolved`, `step_down`, `to`, `track`, or `tick`.
    action: String,
    /// `to`: the count; `track`: the count the policy's window asks for.
    #[serde(default)]
    replicas: Option<u64>,
    /// `track`: the short window's load in replicas' worth (its rate over the target).
    #[serde(default)]
    short: Option<f64>,
    /// Dedupe key (an alert's fingerprint and start), to replay retries.
    #[serde(default)]
    key: Option<String>,
    /// A firing alert's observed value (its `value` annotation): proportional sizing.
    #[serde(default)]
    value: Option<f64>,
    /// The alert's own per-replica target, if it carries one.
    #[serde(default)]
    target: Option<f64>,
    /// The rate faastastic's own counters showed at that moment (the staleness guard).
    #[serde(default)]
    observed: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub time: DateTime<Utc>,
    pub input: String,
    pub from: u64,
    pub to: u64,
    pub outcome: Outcome,
    pub reason: String,
    /// The reason in one machine-readable word, as scale events carry it.
    pub reason_code: &'static str,
}

enum Parsed {
    Signal(Action, Option<String>, Option<f64>),
    Tick,
}

fn parse_line(
    n: usize,
    text: &str,
    origin: &mut Option<DateTime<Utc>>,
) -> Result<(DateTime<Utc>, Parsed), String> {
    let line: Line = serde_json::from_str(text).map_err(|e| format!("line {n}: {e}"))?;
    let time = match (line.at, line.t) {
        (Some(at), None) => {
            origin.get_or_insert(at);
            at
        }
        (None, Some(t)) if t.is_finite() && t >= 0.0 => {
            let base = *origin.get_or_insert_with(|| {
                DateTime::from_timestamp(0, 0).expect("the epoch is a valid time")
            });
            chrono::Duration::try_milliseconds((t * 1000.0) as i64)
                .and_then(|d| base.checked_add_signed(d))
                .ok_or_else(|| format!("line {n}: t {t} is too late a time"))?
        }
        (None, Some(t)) => {
            return Err(format!("line {n}: t must be zero or more seconds, got {t}"))
        }
        (Some(_), Some(_)) => return Err(format!("line {n}: give either at or t, not both")),
        (None, None) => {
            return Err(format!(
                "line {n}: at (RFC 3339) or t (seconds) is required"
            ))
        }
    };
    // As for real alerts, a resolve is not a retry of the firing alert with the same key.
    let key = line.key.map(|k| format!("{k}@{}", line.action));
    for (field, v) in [
        ("value", line.value),
        ("target", line.target),
        ("observed", line.observed),
        ("short", line.short),
    ] {
        if v.is_some_and(|v| !v.is_finite() || v < 0.0) {
            return Err(format!("line {n}: {field} must be a finite number >= 0"));
        }
    }
    if line.target == Some(0.0) {
        return Err(format!("line {n}: target must be above zero"));
    }
    let parsed = match line.action.as_str() {
        "firing" | "step_up" | "up" => {
            let action = match line.value {
                Some(value) => Action::Sized {
                    value,
                    target: line.target,
                },
                None => Action::StepUp,
            };
            Parsed::Signal(action, key, line.observed)
        }
        "resolved" => Parsed::Signal(Action::Resolved, key, None),
        "hold" => Parsed::Signal(Action::Hold, key, None),
        "release" => Parsed::Signal(Action::Release, key, None),
        "step_down" | "down" => Parsed::Signal(Action::StepDown, key, None),
        "to" => {
            let n = line
                .replicas
                .ok_or_else(|| format!("line {n}: action \"to\" needs replicas"))?;
            Parsed::Signal(Action::To(n), key, None)
        }
        "track" => {
            if line.replicas.is_none() && line.short.is_none() {
                return Err(format!(
                    "line {n}: action \"track\" needs replicas (the policy's window) or short (the short window)"
                ));
            }
            let track = Track {
                stable: line.replicas,
                short: line.short,
                recent: None,
                enough_at: None,
            };
            Parsed::Signal(Action::Track(track), key, None)
        }
        "tick" => Parsed::Tick,
        other => {
            return Err(format!(
                "line {n}: action {other:?} is not one of firing, resolved, step_down, to, track, hold, release, tick"
            ))
        }
    };
    Ok((time, parsed))
}

/// Replays `series` (JSON lines) from `start` replicas. Between inputs the clock advances in
/// `tick` steps, each a tick of the engine, as the server's ticker would run.
pub fn simulate(
    policy: &Policy,
    start: u64,
    series: &str,
    tick: Duration,
) -> Result<Vec<Row>, Vec<String>> {
    let mut origin = None;
    let mut inputs = Vec::new();
    let mut errors = Vec::new();
    for (i, text) in series.lines().enumerate() {
        if text.trim().is_empty() || text.trim_start().starts_with('#') {
            continue;
        }
        match parse_line(i + 1, text, &mut origin) {
            Ok(input) => inputs.push(input),
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    inputs.sort_by_key(|(t, _)| *t);
    let tick = chrono::Duration::from_std(tick.max(Duration::from_millis(1)))
        .unwrap_or(chrono::Duration::seconds(1));
    let mut replay = Replay {
        policy,
        state: State::default(),
        current: start,
        rows: Vec::new(),
    };
    let mut clock: Option<DateTime<Utc>> = None;
    for (time, parsed) in &inputs {
        // The ticker's steps since the previous input.
        if let Some(mut t) = clock {
            while let Some(next) = t.checked_add_signed(tick).filter(|next| next < time) {
                if !replay.state.stepping_down {
                    break;
                }
                t = next;
                replay.step(t, Input::Tick, "tick".into());
            }
        }
        clock = Some(*time);
        match parsed {
            Parsed::Tick => replay.step(*time, Input::Tick, "tick".into()),
            Parsed::Signal(action, key, observed) => {
                let label = match action {
                    Action::StepUp => "firing".to_string(),
                    Action::Sized { value, .. } => format!("firing at {value}"),
                    Action::StepDown => "step_down".to_string(),
                    Action::To(n) => format!("to {n}"),
                    Action::Track(t) => format!(
                        "track {}{}",
                        t.stable.map_or("-".to_string(), |n| n.to_string()),
                        t.short.map_or(String::new(), |l| format!(" (short {l})"))
                    ),
                    Action::Resolved => "resolved".to_string(),
                    Action::Hold => "hold".to_string(),
                    Action::Release => "release".to_string(),
                };
                let input = Input::Signal {
                    action: *action,
                    dedupe_key: key.as_deref(),
                    observed_rate: *observed,
                };
                replay.step(*time, input, label);
            }
        }
    }
    // Let a gradual scale-down finish (bounded).
    if let Some(mut t) = clock {
        for _ in 0..10_000 {
            let Some(next) = t.checked_add_signed(tick) else {
                break;
            };
            if !replay.state.stepping_down {
                break;
            }
            t = next;
            replay.step(t, Input::Tick, "tick".into());
        }
    }
    Ok(replay.rows)
}

/// The engine's state and the timeline so far.
struct Replay<'a> {
    policy: &'a Policy,
    state: State,
    current: u64,
    rows: Vec<Row>,
}

impl Replay<'_> {
    fn step(&mut self, time: DateTime<Utc>, input: Input<'_>, label: String) {
        let (d, next) = decide(self.policy, self.current, &self.state, input, time);
        self.state = next;
        // As in the server, only ticks that scale are worth a line.
        if label != "tick" || d.outcome == Outcome::Scale {
            self.rows.push(Row {
                time,
                input: label,
                from: d.from,
                to: if d.outcome == Outcome::Scale {
                    d.to
                } else {
                    d.from
                },
                outcome: d.outcome,
                reason: d.reason.to_string(),
                reason_code: d.reason.code(),
            });
        }
        if d.outcome == Outcome::Scale {
            self.current = d.to;
        }
    }
}

/// The timeline as an aligned text table.
pub fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<24} {:<10} {:>4} -> {:<4} {:<9} reason\n",
        "time", "input", "from", "to", "outcome"
    );
    for r in rows {
        let outcome = match r.outcome {
            Outcome::Scale => "scale",
            Outcome::Held => "held",
            Outcome::NoChange => "no change",
        };
        out.push_str(&format!(
            "{:<24} {:<10} {:>4} -> {:<4} {:<9} {}\n",
            r.time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            r.input,
            r.from,
            r.to,
            outcome,
            r.reason
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autoscale::policy::Step;

    fn policy() -> Policy {
        Policy {
            min: 1,
            max: 4,
            step_up: Step::Count(1),
            step_down: Step::Count(1),
            up_cooldown: Duration::from_secs(5),
            down_cooldown: Duration::from_secs(10),
            stabilization_window: Duration::ZERO,
            resolved_to_min: false,
            scale_to_zero_after: None,
            ..Policy::default()
        }
    }

    /// Times past the end of chrono's range are an error for their line, and a tick that long
    /// ends the replay, instead of overflowing the clock.
    #[test]
    fn times_out_of_range_are_errors_not_panics() {
        let errors = simulate(
            &policy(),
            1,
            "{\"t\": 0, \"action\": \"firing\"}\n{\"t\": 1e300, \"action\": \"tick\"}\n",
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(errors[0].starts_with("line 2: t"), "{errors:?}");
        let series = "{\"t\": 0, \"action\": \"firing\"}\n{\"t\": 20, \"action\": \"resolved\"}\n{\"t\": 40, \"action\": \"tick\"}\n";
        let rows = simulate(&policy(), 3, series, Duration::from_millis(u64::MAX / 4)).unwrap();
        assert_eq!(rows.len(), 3, "{rows:?}");
        let rows = simulate(
            &policy(),
            3,
            "{\"at\": \"+262142-12-31T23:59:59Z\", \"action\": \"hold\"}\n",
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(rows.len(), 1);
    }

    #[test]
    fn replays_a_series_with_ticks_in_between() {
        let series = r#"
# an alert firing every 5 s, a retry, then resolved
{"t": 0, "action": "firing", "key": "a"}
{"t": 1, "action": "firing", "key": "a"}
{"t": 5, "action": "firing", "key": "b"}
{"t": 10, "action": "firing", "key": "c"}
{"t": 12, "action": "resolved", "key": "c"}
"#;
        let rows = simulate(&policy(), 1, series, Duration::from_secs(1)).unwrap();
        let path: Vec<(String, u64)> = rows
            .iter()
            .filter(|r| r.outcome == Outcome::Scale)
            .map(|r| (r.input.clone(), r.to))
            .collect();
        assert_eq!(
            path,
            vec![
                ("firing".to_string(), 2),
                ("firing".to_string(), 3),
                ("firing".to_string(), 4),
                ("tick".to_string(), 3),
                ("tick".to_string(), 2),
                ("tick".to_string(), 1),
            ]
        );
        assert!(rows[1].reason.contains("duplicate"), "{:?}", rows[1]);
        assert!(table(&rows).contains("resolved"));
    }

    #[test]
    fn every_bad_line_is_reported() {
        let errors = simulate(
            &policy(),
            1,
            "{\"t\": 0, \"action\": \"sideways\"}\nnot json\n{\"action\": \"firing\"}\n{\"t\": 1, \"action\": \"to\"}",
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert!(errors[0].starts_with("line 1"));
    }

    #[test]
    fn replays_alert_sizing_and_the_staleness_guard() {
        let series = r#"
{"t": 0, "action": "firing", "value": 12, "target": 5, "observed": 11}
{"t": 60, "action": "firing", "value": 40, "target": 5, "observed": 2}
{"t": 61, "action": "firing", "value": -1}
"#;
        let errors = simulate(&policy(), 1, series, Duration::from_secs(1)).unwrap_err();
        assert!(errors[0].contains("line 4: value"), "{errors:?}");
        let rows = simulate(
            &policy(),
            1,
            &series.replace("{\"t\": 61, \"action\": \"firing\", \"value\": -1}", ""),
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!((rows[0].input.as_str(), rows[0].to), ("firing at 12", 3));
        assert_eq!(rows[1].outcome, Outcome::Held, "{rows:?}");
        assert!(rows[1].reason.contains("load already gone"), "{rows:?}");
    }

    /// A target policy's readings replay with their burst: twice the running load starts one,
    /// and a reading needs a window's count or a short load.
    #[test]
    fn replays_target_readings_and_their_burst() {
        let series = r#"
{"t": 0, "action": "track", "short": 1.5}
{"t": 1, "action": "track", "replicas": 1, "short": 2.5}
{"t": 1.5, "action": "track", "short": 3.6}
{"t": 2, "action": "track"}
"#;
        let errors = simulate(&policy(), 1, series, Duration::from_secs(1)).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].starts_with("line 5: action \"track\" needs"),
            "{errors:?}"
        );
        let series = series.replace("{\"t\": 2, \"action\": \"track\"}", "");
        let rows = simulate(&policy(), 1, &series, Duration::from_secs(1)).unwrap();
        let path: Vec<(&str, u64)> = rows.iter().map(|r| (r.input.as_str(), r.to)).collect();
        assert_eq!(
            path,
            [
                ("track - (short 1.5)", 1),
                ("track 1 (short 2.5)", 3),
                ("track - (short 3.6)", 4)
            ]
        );
        assert!(rows[1].reason.starts_with("burst: "), "{rows:?}");
    }
}
