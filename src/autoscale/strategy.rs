//! Query strategies: turn one metric value into a desired replica count. Pure functions; the
//! result then goes through the policy engine (clamps, cooldowns, window) like any signal.

use std::fmt;

use serde::Serialize;

use super::policy::Step;
use crate::platform::ReplicaCounts;

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "strategy")]
pub enum Strategy {
    /// Keep the value at `target` per replica: desired = ceil(total / target). With
    /// `per_replica`, the value is already an average per replica (total = value × current).
    /// Within `tolerance` (a fraction) of the target nothing changes.
    Target {
        target: f64,
        per_replica: bool,
        tolerance: f64,
    },
    /// Above `upper`, step up; below `lower`, step down; in between, hold.
    Threshold { upper: f64, lower: f64, step: Step },
    /// Always this many replicas.
    Fixed { replicas: u64 },
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Strategy::Target {
                target,
                per_replica,
                ..
            } => write!(
                f,
                "target {target}{}",
                if *per_replica {
                    " (per replica)"
                } else {
                    " per replica"
                }
            ),
            Strategy::Threshold { upper, lower, step } => {
                write!(f, "threshold {lower}..{upper}, step {step}")
            }
            Strategy::Fixed { replicas } => write!(f, "fixed {replicas}"),
        }
    }
}

/// What a value asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Want {
    Replicas(u64, String),
    /// No change (within tolerance, between thresholds); the reason says why.
    Hold(String),
}

/// The desired count for `value` with `replicas` (asked for, and ready); `max` sizes
/// percentage steps. Replicas still starting carry no load yet: an average per replica is
/// an average over the ready ones, and a threshold step waits until they are ready, so a
/// slow start never causes a second, larger jump.
pub fn desired(strategy: &Strategy, replicas: ReplicaCounts, value: f64, max: u64) -> Want {
    let current = replicas.desired;
    if !value.is_finite() {
        return Want::Hold(format!("value {value} is not a number: no data"));
    }
    let value = value.max(0.0);
    match *strategy {
        Strategy::Target {
            target,
            per_replica,
            tolerance,
        } => {
            let total = if per_replica {
                let carrying = if replicas.ready > 0 {
                    replicas.ready
                } else {
                    current
                };
                value * carrying as f64
            } else {
                value
            };
            if current > 0 {
                let ratio = total / (current as f64 * target);
                if (ratio - 1.0).abs() <= tolerance {
                    return Want::Hold(format!(
                        "value {value:.3} is within {:.0}% of the target ({} replicas × {target})",
                        tolerance * 100.0,
                        current
                    ));
                }
            }
            let n = (total / target).ceil();
            let n = if n >= u64::MAX as f64 {
                u64::MAX
            } else {
                n as u64
            };
            Want::Replicas(
                n,
                format!("value {value:.3} at target {target} per replica needs {n}"),
            )
        }
        Strategy::Threshold { upper, lower, step } => {
            let size = step.size(max).max(1);
            if value > upper && replicas.starting() > 0 {
                Want::Hold(format!(
                    "value {value:.3} above {upper}, but {} replica(s) are still starting: the next step waits for them",
                    replicas.starting()
                ))
            } else if value > upper {
                Want::Replicas(
                    current.saturating_add(size),
                    format!("value {value:.3} above {upper}: step up by {size}"),
                )
            } else if value < lower {
                Want::Replicas(
                    current.saturating_sub(size),
                    format!("value {value:.3} below {lower}: step down by {size}"),
                )
            } else {
                Want::Hold(format!("value {value:.3} between {lower} and {upper}"))
            }
        }
        Strategy::Fixed { replicas } => Want::Replicas(replicas, format!("fixed at {replicas}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(t: f64, per_replica: bool) -> Strategy {
        Strategy::Target {
            target: t,
            per_replica,
            tolerance: 0.1,
        }
    }

    fn settled(n: u64) -> ReplicaCounts {
        ReplicaCounts {
            desired: n,
            ready: n,
        }
    }

    fn starting(desired: u64, ready: u64) -> ReplicaCounts {
        ReplicaCounts { desired, ready }
    }

    fn count(w: Want) -> Option<u64> {
        match w {
            Want::Replicas(n, _) => Some(n),
            Want::Hold(_) => None,
        }
    }

    #[test]
    fn target_tracking_table() {
        // (strategy, current, value, desired or None = hold)
        let cases = [
            (target(5.0, false), 1, 40.0, Some(8)),
            (target(5.0, false), 1, 5.2, None), // within 10 %
            (target(5.0, false), 4, 21.0, None),
            (target(5.0, false), 4, 5.0, Some(1)),
            (target(5.0, false), 4, 0.0, Some(0)),
            (target(5.0, false), 0, 12.0, Some(3)),
            (target(10.0, true), 2, 25.0, Some(5)), // 2 × 25 = 50 → 5
            (target(10.0, true), 3, 10.5, None),
        ];
        for (s, current, value, want) in cases {
            assert_eq!(
                count(desired(&s, settled(current), value, 10)),
                want,
                "{s:?} {current} {value}"
            );
        }
        assert!(
            matches!(desired(&target(5.0, false), settled(1), f64::NAN, 10), Want::Hold(r) if r.contains("no data"))
        );
    }

    #[test]
    fn thresholds_and_fixed() {
        let t = Strategy::Threshold {
            upper: 100.0,
            lower: 20.0,
            step: Step::PercentOfMax(50),
        };
        assert_eq!(count(desired(&t, settled(2), 150.0, 10)), Some(7));
        assert_eq!(count(desired(&t, settled(7), 10.0, 10)), Some(2));
        assert_eq!(count(desired(&t, settled(7), 50.0, 10)), None);
        assert_eq!(
            count(desired(
                &Strategy::Fixed { replicas: 3 },
                settled(9),
                0.0,
                10
            )),
            Some(3)
        );
    }

    /// A slow start must not turn into a second, larger jump: 1 → 4 asked for, 1 ready and
    /// still measuring the whole load.
    #[test]
    fn starting_replicas_are_counted() {
        // Average per replica over the ready one: 80/s at 20 each → 4, which is what is
        // already asked for (not 4 × 80 / 20 = 16).
        let per_replica = target(20.0, true);
        assert_eq!(count(desired(&per_replica, starting(4, 1), 80.0, 10)), None);
        assert_eq!(count(desired(&per_replica, settled(1), 80.0, 10)), Some(4));
        // Once they are ready the average drops and nothing changes either.
        assert_eq!(count(desired(&per_replica, settled(4), 20.0, 10)), None);
        // A total is not affected by readiness.
        assert_eq!(
            count(desired(&target(20.0, false), starting(4, 1), 80.0, 10)),
            None
        );
        // A threshold step waits for the last step's replicas ...
        let t = Strategy::Threshold {
            upper: 100.0,
            lower: 20.0,
            step: Step::Count(2),
        };
        assert!(
            matches!(desired(&t, starting(4, 2), 150.0, 10), Want::Hold(r) if r.contains("2 replica(s) are still starting"))
        );
        // ... but steps down at once, and steps up again when they are ready.
        assert_eq!(count(desired(&t, starting(4, 2), 10.0, 10)), Some(2));
        assert_eq!(count(desired(&t, settled(4), 150.0, 10)), Some(6));
    }
}
