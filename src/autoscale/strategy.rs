//! Query strategies: turn one metric value into a desired replica count. Pure functions; the
//! result then goes through the policy engine (clamps, cooldowns, window) like any signal.

use std::fmt;

use serde::Serialize;

use super::policy::Step;

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

/// The desired count for `value` with `current` replicas; `max` sizes percentage steps.
pub fn desired(strategy: &Strategy, current: u64, value: f64, max: u64) -> Want {
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
                value * current as f64
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
            if value > upper {
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
                count(desired(&s, current, value, 10)),
                want,
                "{s:?} {current} {value}"
            );
        }
        assert!(
            matches!(desired(&target(5.0, false), 1, f64::NAN, 10), Want::Hold(r) if r.contains("no data"))
        );
    }

    #[test]
    fn thresholds_and_fixed() {
        let t = Strategy::Threshold {
            upper: 100.0,
            lower: 20.0,
            step: Step::PercentOfMax(50),
        };
        assert_eq!(count(desired(&t, 2, 150.0, 10)), Some(7));
        assert_eq!(count(desired(&t, 7, 10.0, 10)), Some(2));
        assert_eq!(count(desired(&t, 7, 50.0, 10)), None);
        assert_eq!(
            count(desired(&Strategy::Fixed { replicas: 3 }, 9, 0.0, 10)),
            Some(3)
        );
    }
}
