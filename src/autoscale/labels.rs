//! Builds a function's [`Policy`] from the server's settings and the function's labels:
//! `com.openfaas.scale.min|max|factor|zero|zero-duration` as in OpenFaaS, plus
//! `com.faastastic.scale.*` keys. Each label is declared once, beside its configuration
//! keys, in `autoscale::policy::patch`.

use crate::config::AutoscaleConfig;
use crate::model::{FunctionDeployment, FunctionId, LABEL_SCALE_MIN};

use super::policy::patch::PolicyPatch;
use super::policy::Policy;

/// The layer a deployment's labels make, or each label that does not read.
fn labels_of(dep: &FunctionDeployment) -> Result<PolicyPatch, Vec<String>> {
    PolicyPatch::from_labels(|key| dep.label(key))
}

/// Every malformed scaling label of a deployment, each named (empty when all parse). Deploys
/// are refused with these, so a bad label never reaches the autoscaler.
pub fn check_labels(dep: &FunctionDeployment) -> Vec<String> {
    labels_of(dep).err().unwrap_or_default()
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
/// mode: `[autoscale]`, then every matching `[[autoscale.policies]]` entry in order, then the
/// function's labels. Every bad label is reported at once, each named.
pub fn policy_for(
    function: &str,
    dep: &FunctionDeployment,
    cfg: &AutoscaleConfig,
) -> Result<(Policy, bool), Vec<String>> {
    let labels = labels_of(dep)?;
    let configured = cfg
        .policies
        .iter()
        .filter(|o| o.pattern.matches(function))
        .fold(cfg.defaults.clone(), |below, o| {
            o.patch.clone().over(&below)
        });
    labels.over(&configured).resolve().map_err(|c| {
        vec![format!(
            "{LABEL_SCALE_MIN} ({}) is above com.openfaas.scale.max ({}), with the labels over the configured defaults",
            c.min, c.max
        )]
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autoscale::policy::Step;
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
                ("com.faastastic.scale.step-down", "1"),
                ("com.faastastic.scale.down-cooldown", "1m"),
                ("com.faastastic.scale.dry-run", "true"),
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
                ("com.faastastic.scale.alert-mode", "step"),
                ("com.faastastic.scale.target-per-replica", "7.5"),
                ("com.faastastic.scale.max-step-up", "200%"),
                ("com.faastastic.scale.staleness-guard", "false"),
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
            ("com.faastastic.scale.alert-mode", "fast"),
            ("com.faastastic.scale.target-per-replica", "0"),
            ("com.faastastic.scale.max-step-up", "0"),
            ("com.faastastic.scale.staleness-guard", "maybe"),
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
                ("com.faastastic.scale.step-up", "150%"),
                ("com.faastastic.scale.up-cooldown", "soon"),
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
                ("com.openfaas.scale.zero-duration", "2m"),
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
