//! Builds a function's [`Policy`] from the server's defaults and the function's labels:
//! `com.openfaas.scale.min|max|factor` as in OpenFaaS, plus `com.faastastic.scale.*` keys.

use crate::config::AutoscaleConfig;
use crate::model::{parse_duration, FunctionDeployment, FunctionId, LABEL_SCALE_MIN};

use super::policy::{parse_alert_mode, parse_step, parse_step_cap, parse_target};
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
/// The same as `dry-run`: shadow mode.
pub const LABEL_SHADOW: &str = "com.faastastic.scale.shadow";
pub const LABEL_ALERT_MODE: &str = "com.faastastic.scale.alert-mode";
pub const LABEL_TARGET: &str = "com.faastastic.scale.target-per-replica";
pub const LABEL_MAX_STEP_UP: &str = "com.faastastic.scale.max-step-up";
pub const LABEL_STALENESS_GUARD: &str = "com.faastastic.scale.staleness-guard";
pub const LABEL_ZERO: &str = "com.openfaas.scale.zero";
pub const LABEL_ZERO_DURATION: &str = "com.openfaas.scale.zero-duration";

fn parse_bool(text: &str) -> Result<bool, String> {
    match text.trim() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        other => Err(format!("{other:?} is not true or false")),
    }
}

/// Every malformed scaling label of a deployment, each named (empty when all parse). Deploys
/// are refused with these, so a bad label never reaches the autoscaler.
pub fn check_labels(dep: &FunctionDeployment) -> Vec<String> {
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
    read(LABEL_SHADOW, &|v| parse_bool(v).map(|_| ()));
    read(LABEL_ZERO, &|v| parse_bool(v).map(|_| ()));
    read(LABEL_ALERT_MODE, &|v| parse_alert_mode(v).map(|_| ()));
    read(LABEL_TARGET, &|v| parse_target(v).map(|_| ()));
    read(LABEL_MAX_STEP_UP, &|v| parse_step_cap(v).map(|_| ()));
    read(LABEL_STALENESS_GUARD, &|v| parse_bool(v).map(|_| ()));
    read(LABEL_ZERO_DURATION, &|v| parse_duration(v).map(|_| ()));
    // Bounds that contradict each other (a min of 0 means the default, as in OpenFaaS).
    let bound = |key: &str| dep.label(key).and_then(|v| v.trim().parse::<u64>().ok());
    if let (Some(min), Some(max)) = (bound(LABEL_SCALE_MIN), bound(LABEL_SCALE_MAX)) {
        if min > max {
            errors.push(format!(
                "{LABEL_SCALE_MIN}: {min} is above {LABEL_SCALE_MAX} ({max})"
            ));
        }
    }
    errors
}

/// A function's min replicas, the one definition that deploy, update, wake and the engine
/// share: the labels over the matching `[[autoscale.policies]]` over `[autoscale]`. Labels
/// that do not parse are refused at deploy; should a stored one not, `com.openfaas.scale.min`
/// alone decides (else 1).
pub fn min_for(id: &FunctionId, dep: &FunctionDeployment, cfg: &AutoscaleConfig) -> u64 {
    policy_for(&id.qualified(), dep, cfg).map_or_else(|_| dep.min_replicas(), |(p, _)| p.min)
}

/// The replicas a new deployment starts with in each datacenter: the
/// `com.faastastic.scale.initial` label (0 allowed: deployed dormant), else [`min_for`], at
/// least 1 (only the label deploys a function dormant, even with `default_min = 0`).
pub fn initial_for(id: &FunctionId, dep: &FunctionDeployment, cfg: &AutoscaleConfig) -> u64 {
    dep.label(crate::model::LABEL_SCALE_INITIAL)
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or_else(|| min_for(id, dep, cfg).max(1))
}

/// The policy for one function (`function` is `name.namespace`) and whether it is in dry-run
/// mode: the config's defaults, then every matching `[[autoscale.policies]]` entry in order,
/// then the function's labels. Every bad label is reported at once, each named.
pub fn policy_for(
    function: &str,
    dep: &FunctionDeployment,
    cfg: &AutoscaleConfig,
) -> Result<(Policy, bool), Vec<String>> {
    let errors = check_labels(dep);
    if !errors.is_empty() {
        return Err(errors);
    }

    // The config's defaults, then every matching policy entry, in order.
    let mut min = cfg.default_min;
    let mut max = cfg.default_max;
    let mut factor = cfg.default_factor;
    let (mut step_up, mut step_down) = (None, None);
    let mut up_cooldown = cfg.up_cooldown;
    let mut down_cooldown = cfg.down_cooldown;
    let mut window = cfg.stabilization_window;
    let mut resolved_to_min = cfg.resolved_to_min;
    let mut dry_run = cfg.dry_run;
    let mut zero = false;
    let mut zero_idle = cfg.zero_idle;
    let mut alert_mode = cfg.alert_mode;
    let mut target = cfg.target_per_replica;
    let mut max_step_up = cfg.max_step_up;
    let mut staleness_guard = cfg.staleness_guard;
    for o in cfg.policies.iter().filter(|o| o.pattern.matches(function)) {
        min = o.min.unwrap_or(min);
        max = o.max.unwrap_or(max);
        factor = o.factor.unwrap_or(factor);
        step_up = o.step_up.or(step_up);
        step_down = o.step_down.or(step_down);
        up_cooldown = o.up_cooldown.unwrap_or(up_cooldown);
        down_cooldown = o.down_cooldown.unwrap_or(down_cooldown);
        window = o.stabilization_window.unwrap_or(window);
        resolved_to_min = o.resolved_to_min.unwrap_or(resolved_to_min);
        dry_run = o.dry_run.unwrap_or(dry_run);
        zero = o.scale_to_zero.unwrap_or(zero);
        zero_idle = o.zero_idle.unwrap_or(zero_idle);
        alert_mode = o.alert_mode.unwrap_or(alert_mode);
        target = o.target_per_replica.or(target);
        max_step_up = o.max_step_up.or(max_step_up);
        staleness_guard = o.staleness_guard.unwrap_or(staleness_guard);
    }

    // Then the labels (all of them parse: checked above).
    let label = |key: &str| dep.label(key);
    let int = |key: &str| label(key).and_then(|v| v.trim().parse::<u64>().ok());
    let duration = |key: &str| {
        label(key)
            .and_then(|v| parse_duration(v).ok())
            .map(|d| d.unwrap_or_default())
    };
    let flag = |key: &str| label(key).and_then(|v| parse_bool(v).ok());
    // As at deploy (and in OpenFaaS), a min of 0 means the default: only the scale-to-zero
    // opt-in takes a function to zero.
    min = int(LABEL_SCALE_MIN).filter(|m| *m > 0).unwrap_or(min);
    max = int(LABEL_SCALE_MAX).unwrap_or(max);
    if min > max {
        return Err(vec![format!(
            "{LABEL_SCALE_MIN} ({min}) is above {LABEL_SCALE_MAX} ({max})"
        )]);
    }
    let step_up = label(LABEL_STEP_UP)
        .and_then(|v| parse_step(v).ok())
        .or(int(LABEL_SCALE_FACTOR).map(Step::PercentOfMax))
        .or(step_up)
        .unwrap_or(Step::PercentOfMax(factor));
    let step_down = label(LABEL_STEP_DOWN)
        .and_then(|v| parse_step(v).ok())
        .or(step_down)
        .unwrap_or(step_up);
    let zero = flag(LABEL_ZERO).unwrap_or(zero);
    let policy = Policy {
        min,
        max,
        step_up,
        step_down,
        up_cooldown: duration(LABEL_UP_COOLDOWN).unwrap_or(up_cooldown),
        down_cooldown: duration(LABEL_DOWN_COOLDOWN).unwrap_or(down_cooldown),
        stabilization_window: duration(LABEL_WINDOW).unwrap_or(window),
        resolved_to_min: flag(LABEL_RESOLVED_TO_MIN).unwrap_or(resolved_to_min),
        scale_to_zero_after: zero.then(|| duration(LABEL_ZERO_DURATION).unwrap_or(zero_idle)),
        alert_mode: label(LABEL_ALERT_MODE)
            .and_then(|v| parse_alert_mode(v).ok())
            .unwrap_or(alert_mode),
        target_per_replica: label(LABEL_TARGET)
            .and_then(|v| parse_target(v).ok())
            .or(target),
        max_step_up: label(LABEL_MAX_STEP_UP)
            .and_then(|v| parse_step_cap(v).ok())
            .or(max_step_up),
        staleness_guard: flag(LABEL_STALENESS_GUARD).unwrap_or(staleness_guard),
        hold_ttl: cfg.hold_ttl,
    };
    let shadow = flag(LABEL_SHADOW)
        .or(flag(LABEL_DRY_RUN))
        .unwrap_or(dry_run);
    Ok((policy, shadow))
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
        let (p, dry) = policy_for("f.openfaas-fn", &dep(&[]), &cfg).unwrap();
        assert_eq!((p.min, p.max, p.step_up), (1, 5, Step::PercentOfMax(10)));
        assert!(!dry);
        let (p, dry) = policy_for(
            "f.openfaas-fn",
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
    fn alert_sizing_labels() {
        use crate::autoscale::policy::{AlertMode, StepCap};
        let cfg = Config::default().autoscale;
        let (p, _) = policy_for("f.openfaas-fn", &dep(&[]), &cfg).unwrap();
        assert_eq!(
            (
                p.alert_mode,
                p.target_per_replica,
                p.max_step_up,
                p.staleness_guard
            ),
            (AlertMode::Proportional, None, None, true)
        );
        let (p, _) = policy_for(
            "f.openfaas-fn",
            &dep(&[
                (LABEL_ALERT_MODE, "step"),
                (LABEL_TARGET, "7.5"),
                (LABEL_MAX_STEP_UP, "200%"),
                (LABEL_STALENESS_GUARD, "false"),
            ]),
            &cfg,
        )
        .unwrap();
        assert_eq!(
            (
                p.alert_mode,
                p.target_per_replica,
                p.max_step_up,
                p.staleness_guard
            ),
            (
                AlertMode::Step,
                Some(7.5),
                Some(StepCap::Percent(200)),
                false
            )
        );
        let errors = check_labels(&dep(&[
            (LABEL_ALERT_MODE, "fast"),
            (LABEL_TARGET, "0"),
            (LABEL_MAX_STEP_UP, "0"),
            (LABEL_STALENESS_GUARD, "maybe"),
        ]));
        assert_eq!(errors.len(), 4, "{errors:?}");
    }

    #[test]
    fn bad_labels_are_all_named() {
        let cfg = Config::default().autoscale;
        let errors = policy_for(
            "f.openfaas-fn",
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
        let errors = policy_for(
            "f.openfaas-fn",
            &dep(&[("com.openfaas.scale.min", "6")]),
            &cfg,
        )
        .unwrap_err();
        assert!(errors[0].contains("above"), "{errors:?}");
    }

    #[test]
    fn config_policies_then_labels() {
        let cfg = Config::parse(
            r#"
[autoscale]
zero_idle_secs = 60
[[autoscale.policies]]
match = "*.dev"
max = 10
step_up = 3
scale_to_zero = true
[[autoscale.policies]]
match = "api-*.dev"
max = 8
"#,
        )
        .unwrap()
        .autoscale;
        let (p, _) = policy_for("api-users.dev", &dep(&[]), &cfg).unwrap();
        assert_eq!((p.max, p.step_up), (8, Step::Count(3)), "later matches win");
        assert_eq!(p.scale_to_zero_after, Some(Duration::from_secs(60)));
        let (p, _) = policy_for("web.openfaas-fn", &dep(&[]), &cfg).unwrap();
        assert_eq!(
            (p.max, p.scale_to_zero_after),
            (5, None),
            "no match: defaults"
        );
        let (p, _) = policy_for(
            "api-users.dev",
            &dep(&[
                ("com.openfaas.scale.max", "4"),
                ("com.openfaas.scale.factor", "50"),
                (LABEL_ZERO_DURATION, "2m"),
            ]),
            &cfg,
        )
        .unwrap();
        assert_eq!(
            (p.max, p.step_up),
            (4, Step::PercentOfMax(50)),
            "labels win"
        );
        assert_eq!(p.scale_to_zero_after, Some(Duration::from_secs(120)));
    }
}
