//! Builds a function's [`Policy`] from the server's defaults and the function's labels:
//! `com.openfaas.scale.min|max|factor` as in OpenFaaS, plus `com.faastastic.scale.*` keys.

use crate::config::AutoscaleConfig;
use crate::model::{parse_duration, FunctionDeployment, LABEL_SCALE_MIN};

use super::policy::{Policy, Step};

pub const LABEL_SCALE_MAX: &str = "com.openfaas.scale.max";
pub const LABEL_SCALE_FACTOR: &str = "com.openfaas.scale.factor";
pub const LABEL_STEP_UP: &str = "com.faastastic.scale.step-up";
pub const LABEL_STEP_DOWN: &str = "com.faastastic.scale.step-down";
pub const LABEL_UP_COOLDOWN: &str = "com.faastastic.scale.up-cooldown";
pub const LABEL_DOWN_COOLDOWN: &str = "com.faastastic.scale.down-cooldown";
pub const LABEL_WINDOW: &str = "com.faastastic.scale.stabilization-window";
pub const LABEL_RESOLVED_TO_MIN: &str = "com.faastastic.scale.resolved-to-min";
pub const LABEL_DRY_RUN: &str = "com.faastastic.scale.dry-run";

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

fn parse_bool(text: &str) -> Result<bool, String> {
    match text.trim() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        other => Err(format!("{other:?} is not true or false")),
    }
}

/// The policy for one function, and whether it is in dry-run mode. Every bad label is reported
/// at once, each named.
pub fn policy_for(
    dep: &FunctionDeployment,
    cfg: &AutoscaleConfig,
) -> Result<(Policy, bool), Vec<String>> {
    let mut errors = Vec::new();
    let mut read = |key: &str, parse: &dyn Fn(&str) -> Result<(), String>| {
        if let Some(v) = dep.label(key) {
            if let Err(e) = parse(v) {
                errors.push(format!("{key}: {e}"));
            }
        }
    };
    let int = |v: &str| {
        v.trim()
            .parse::<u64>()
            .map(|_| ())
            .map_err(|_| format!("{v:?} is not a whole number"))
    };
    read(LABEL_SCALE_MIN, &int);
    read(LABEL_SCALE_MAX, &int);
    read(LABEL_SCALE_FACTOR, &|v| match v.trim().parse::<u64>() {
        Ok(f) if (1..=100).contains(&f) => Ok(()),
        _ => Err(format!("{v:?} must be a percentage from 1 to 100")),
    });
    read(LABEL_STEP_UP, &|v| parse_step(v).map(|_| ()));
    read(LABEL_STEP_DOWN, &|v| parse_step(v).map(|_| ()));
    for key in [LABEL_UP_COOLDOWN, LABEL_DOWN_COOLDOWN, LABEL_WINDOW] {
        read(key, &|v| parse_duration(v).map(|_| ()));
    }
    read(LABEL_RESOLVED_TO_MIN, &|v| parse_bool(v).map(|_| ()));
    read(LABEL_DRY_RUN, &|v| parse_bool(v).map(|_| ()));
    if !errors.is_empty() {
        return Err(errors);
    }

    // All labels parse: read them for real.
    let label = |key: &str| dep.label(key);
    let int_or = |key: &str, default: u64| {
        label(key)
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(default)
    };
    let min = int_or(LABEL_SCALE_MIN, cfg.default_min);
    let max = int_or(LABEL_SCALE_MAX, cfg.default_max);
    if min > max {
        return Err(vec![format!(
            "{LABEL_SCALE_MIN} ({min}) is above {LABEL_SCALE_MAX} ({max})"
        )]);
    }
    let factor = int_or(LABEL_SCALE_FACTOR, cfg.default_factor);
    let step = |key: &str| label(key).and_then(|v| parse_step(v).ok());
    let duration = |key: &str, default| {
        label(key)
            .and_then(|v| parse_duration(v).ok())
            .map(|d| d.unwrap_or_default())
            .unwrap_or(default)
    };
    let flag = |key: &str, default| {
        label(key)
            .and_then(|v| parse_bool(v).ok())
            .unwrap_or(default)
    };
    let step_up = step(LABEL_STEP_UP).unwrap_or(Step::PercentOfMax(factor));
    let policy = Policy {
        min,
        max,
        step_up,
        step_down: step(LABEL_STEP_DOWN).unwrap_or(step_up),
        up_cooldown: duration(LABEL_UP_COOLDOWN, cfg.up_cooldown),
        down_cooldown: duration(LABEL_DOWN_COOLDOWN, cfg.down_cooldown),
        stabilization_window: duration(LABEL_WINDOW, cfg.stabilization_window),
        resolved_to_min: flag(LABEL_RESOLVED_TO_MIN, cfg.resolved_to_min),
    };
    Ok((policy, flag(LABEL_DRY_RUN, cfg.dry_run)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::time::Duration;

    fn dep(labels: &[(&str, &str)]) -> FunctionDeployment {
        FunctionDeployment {
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn openfaas_defaults_and_labels() {
        let cfg = Config::default().autoscale;
        let (p, dry) = policy_for(&dep(&[]), &cfg).unwrap();
        assert_eq!((p.min, p.max, p.step_up), (1, 5, Step::PercentOfMax(10)));
        assert!(!dry);
        let (p, dry) = policy_for(
            &dep(&[
                ("com.openfaas.scale.min", "2"),
                ("com.openfaas.scale.max", "10"),
                ("com.openfaas.scale.factor", "20"),
                (LABEL_STEP_DOWN, "1"),
                (LABEL_DOWN_COOLDOWN, "1m"),
                (LABEL_DRY_RUN, "true"),
            ]),
            &cfg,
        )
        .unwrap();
        assert_eq!((p.min, p.max), (2, 10));
        assert_eq!(
            (p.step_up, p.step_down),
            (Step::PercentOfMax(20), Step::Count(1))
        );
        assert_eq!(p.down_cooldown, Duration::from_secs(60));
        assert!(dry);
    }

    #[test]
    fn bad_labels_are_all_named() {
        let cfg = Config::default().autoscale;
        let errors = policy_for(
            &dep(&[
                ("com.openfaas.scale.factor", "0"),
                ("com.openfaas.scale.max", "lots"),
                (LABEL_STEP_UP, "150%"),
                (LABEL_UP_COOLDOWN, "soon"),
            ]),
            &cfg,
        )
        .unwrap_err();
        assert_eq!(errors.len(), 4, "{errors:?}");
        let errors = policy_for(&dep(&[("com.openfaas.scale.min", "6")]), &cfg).unwrap_err();
        assert!(errors[0].contains("above"), "{errors:?}");
    }
}
