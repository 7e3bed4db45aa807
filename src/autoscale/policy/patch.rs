//! One function's scaling settings come in layers: `[autoscale]`, each matching
//! `[[autoscale.policies]]` entry, then the function's labels. Every layer is a
//! [`PolicyPatch`] (each setting optional), read by the same code, merged by
//! [`PolicyPatch::over`] and made into a [`Policy`] by [`PolicyPatch::resolve`], which holds
//! the built-in defaults.
//!
//! A setting is declared once, in the `settings!` table below: its field, its kind (how
//! its text and TOML forms are read and checked), its key in `[autoscale]`, its key in a
//! `[[autoscale.policies]]` entry and its label. Adding one touches that table, the
//! [`Policy`] field the engine reads and the line of `resolve` that fills it.

use std::time::Duration;

use serde::de::DeserializeOwned;

use super::{
    parse_alert_mode, parse_step, parse_step_cap, parse_target, AlertMode, Policy, Step, StepCap,
};
use crate::model::{parse_duration, LABEL_SCALE_MIN};

/// Where a layer's settings are read from in the configuration file: a table that yields each
/// key's value once and records an error against the key when `read` refuses it.
pub trait Source {
    fn take<T>(&mut self, key: &str, read: fn(toml::Value) -> Result<T, String>) -> Option<T>;
}

/// How one kind of setting reads its label text and its TOML value.
pub trait Kind {
    type Value: Clone + PartialEq + std::fmt::Debug;
    fn from_text(text: &str) -> Result<Self::Value, String>;
    fn from_toml(value: toml::Value) -> Result<Self::Value, String>;
}

/// A TOML value of type `R`, or an error naming the type found.
fn typed<R: DeserializeOwned>(value: toml::Value) -> Result<R, String> {
    let found = value.type_str();
    value
        .try_into::<R>()
        .map_err(|e| format!("wrong type ({found}): {}", e.to_string().trim()))
}

/// A count (`2`) or a percentage (`"25%"`) as TOML writes it, as text for the label parsers.
fn count_or_percent(v: toml::Value) -> Result<String, String> {
    match v {
        toml::Value::Integer(n) => Ok(n.to_string()),
        toml::Value::String(t) => Ok(t),
        other => Err(format!(
            "must be a count or a percentage, got {}",
            other.type_str()
        )),
    }
}

/// Replicas: zero or more.
pub struct Count;
impl Kind for Count {
    type Value = u64;
    fn from_text(text: &str) -> Result<u64, String> {
        text.trim()
            .parse::<u64>()
            .map_err(|_| format!("{text:?} is not a whole number"))
    }
    fn from_toml(value: toml::Value) -> Result<u64, String> {
        let v: i64 = typed(value)?;
        u64::try_from(v).map_err(|_| format!("must be zero or more, got {v}"))
    }
}

/// OpenFaaS's scaling factor: a percentage of max from 1 to 100.
pub struct Percent;
impl Percent {
    fn check(v: i64) -> Result<u64, String> {
        u64::try_from(v)
            .ok()
            .filter(|v| (1..=100).contains(v))
            .ok_or_else(|| format!("must be a percentage from 1 to 100, got {v}"))
    }
}
impl Kind for Percent {
    type Value = u64;
    fn from_text(text: &str) -> Result<u64, String> {
        let v = text.trim().parse::<i64>();
        v.ok()
            .and_then(|v| Percent::check(v).ok())
            .ok_or_else(|| format!("{text:?} must be a percentage from 1 to 100"))
    }
    fn from_toml(value: toml::Value) -> Result<u64, String> {
        Percent::check(typed(value)?)
    }
}

/// A step: a count or a percentage of max.
pub struct Steps;
impl Kind for Steps {
    type Value = Step;
    fn from_text(text: &str) -> Result<Step, String> {
        parse_step(text)
    }
    fn from_toml(value: toml::Value) -> Result<Step, String> {
        parse_step(&count_or_percent(value)?)
    }
}

/// A cap on one scale-up: a count or a percentage of the current replicas.
pub struct Cap;
impl Kind for Cap {
    type Value = StepCap;
    fn from_text(text: &str) -> Result<StepCap, String> {
        parse_step_cap(text)
    }
    fn from_toml(value: toml::Value) -> Result<StepCap, String> {
        parse_step_cap(&count_or_percent(value)?)
    }
}

/// A duration, zero or more: `30s`, `2m`, `500ms` in a label, seconds in the file.
pub struct Secs;
impl Kind for Secs {
    type Value = Duration;
    fn from_text(text: &str) -> Result<Duration, String> {
        parse_duration(text).map(Option::unwrap_or_default)
    }
    fn from_toml(value: toml::Value) -> Result<Duration, String> {
        let v: f64 = typed(value)?;
        if v.is_finite() && (0.0..1e9).contains(&v) {
            Ok(Duration::from_secs_f64(v))
        } else {
            Err(format!("must be zero or more seconds, got {v}"))
        }
    }
}

/// A duration above zero.
pub struct PositiveSecs;
impl Kind for PositiveSecs {
    type Value = Duration;
    fn from_text(text: &str) -> Result<Duration, String> {
        parse_duration(text)?.ok_or_else(|| format!("{text:?} must be longer than zero"))
    }
    fn from_toml(value: toml::Value) -> Result<Duration, String> {
        match Secs::from_toml(value)? {
            d if d.is_zero() => Err("must be a positive number of seconds, got 0".to_string()),
            d => Ok(d),
        }
    }
}

/// `true` or `false` (a label may also say `1`/`0`, `yes`/`no`).
pub struct Flag;
impl Kind for Flag {
    type Value = bool;
    fn from_text(text: &str) -> Result<bool, String> {
        match text.trim() {
            "true" | "1" | "yes" => Ok(true),
            "false" | "0" | "no" => Ok(false),
            other => Err(format!("{other:?} is not true or false")),
        }
    }
    fn from_toml(value: toml::Value) -> Result<bool, String> {
        typed(value)
    }
}

/// `proportional` or `step`.
pub struct Mode;
impl Kind for Mode {
    type Value = AlertMode;
    fn from_text(text: &str) -> Result<AlertMode, String> {
        parse_alert_mode(text)
    }
    fn from_toml(value: toml::Value) -> Result<AlertMode, String> {
        parse_alert_mode(&typed::<String>(value)?)
    }
}

/// A load per replica: a number above zero.
pub struct Target;
impl Kind for Target {
    type Value = f64;
    fn from_text(text: &str) -> Result<f64, String> {
        parse_target(text)
    }
    fn from_toml(value: toml::Value) -> Result<f64, String> {
        parse_target(&typed::<f64>(value)?.to_string())
    }
}

macro_rules! settings {
    ($( $(#[$doc:meta])* $field:ident: $kind:ident, $top:literal, $entry:literal, $label:expr; )*) => {
        /// One layer of a function's scaling settings; `None`: this layer leaves it to the
        /// layer below.
        #[derive(Debug, Clone, Default, PartialEq)]
        pub struct PolicyPatch {
            $( $(#[$doc])* pub $field: Option<<$kind as Kind>::Value>, )*
        }

        impl PolicyPatch {
            /// Every setting's label, `[autoscale]` key and `[[autoscale.policies]]` key.
            pub const NAMES: &'static [(&'static str, &'static str, &'static str)] =
                &[$( ($label, $top, $entry), )*];

            /// `self` over `below`: every setting `self` has wins.
            pub fn over(mut self, below: &PolicyPatch) -> PolicyPatch {
                $( if self.$field.is_none() {
                    self.$field = below.$field.clone();
                } )*
                self
            }

            /// A layer from the configuration file: `[autoscale]` (`top`) or a
            /// `[[autoscale.policies]]` entry, whose keys for min, max and factor differ.
            pub fn read(source: &mut impl Source, top: bool) -> PolicyPatch {
                let mut p = PolicyPatch::default();
                $( p.$field = source.take(if top { $top } else { $entry }, $kind::from_toml); )*
                p.normalize();
                p
            }

            /// The layer a function's labels make, and an error naming each label that
            /// does not read.
            fn read_labels<'a>(
                label: impl Fn(&str) -> Option<&'a str>,
                errors: &mut Vec<String>,
            ) -> PolicyPatch {
                let mut p = PolicyPatch::default();
                $( if let Some(text) = label($label) {
                    match $kind::from_text(text) {
                        Ok(v) => p.$field = Some(v),
                        Err(e) => errors.push(format!("{}: {e}", $label)),
                    }
                } )*
                p
            }
        }
    };
}

settings! {
    /// `com.openfaas.scale.min`; 0 in a label means the default, as in OpenFaaS.
    min: Count, "default_min", "min", LABEL_SCALE_MIN;
    max: Count, "default_max", "max", "com.openfaas.scale.max";
    /// OpenFaaS's step, a percentage of max; a layer that sets it and no `step_up` steps by it.
    factor: Percent, "default_factor", "factor", "com.openfaas.scale.factor";
    step_up: Steps, "step_up", "step_up", "com.faastastic.scale.step-up";
    /// The step of a gradual scale-down; the step up when no layer sets it.
    step_down: Steps, "step_down", "step_down", "com.faastastic.scale.step-down";
    up_cooldown: Secs, "up_cooldown_secs", "up_cooldown_secs", "com.faastastic.scale.up-cooldown";
    down_cooldown: Secs, "down_cooldown_secs", "down_cooldown_secs", "com.faastastic.scale.down-cooldown";
    stabilization_window: Secs, "stabilization_window_secs", "stabilization_window_secs",
        "com.faastastic.scale.stabilization-window";
    resolved_to_min: Flag, "resolved_to_min", "resolved_to_min", "com.faastastic.scale.resolved-to-min";
    /// Shadow mode (`com.faastastic.scale.shadow` is the same label, and wins).
    dry_run: Flag, "dry_run", "dry_run", "com.faastastic.scale.dry-run";
    scale_to_zero: Flag, "scale_to_zero", "scale_to_zero", "com.openfaas.scale.zero";
    zero_idle: Secs, "zero_idle_secs", "zero_idle_secs", "com.openfaas.scale.zero-duration";
    alert_mode: Mode, "alert_mode", "alert_mode", "com.faastastic.scale.alert-mode";
    target_per_replica: Target, "target_per_replica", "target_per_replica",
        "com.faastastic.scale.target-per-replica";
    max_step_up: Cap, "max_step_up", "max_step_up", "com.faastastic.scale.max-step-up";
    staleness_guard: Flag, "staleness_guard", "staleness_guard", "com.faastastic.scale.staleness-guard";
    hold_ttl: PositiveSecs, "hold_ttl_secs", "hold_ttl_secs", "com.faastastic.scale.hold-ttl";
}

/// Settings whose min lands above their max.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crossed {
    pub min: u64,
    pub max: u64,
}

impl std::fmt::Display for Crossed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "min ({}) is above max ({})", self.min, self.max)
    }
}

/// The same as `com.faastastic.scale.dry-run`.
pub const LABEL_SHADOW: &str = "com.faastastic.scale.shadow";

impl PolicyPatch {
    /// A layer that names a factor and no step steps by the factor: it overrides a step
    /// from a layer below, as OpenFaaS's factor label always has.
    fn normalize(&mut self) {
        if let (Some(f), None) = (self.factor, self.step_up) {
            self.step_up = Some(Step::PercentOfMax(f));
        }
    }

    /// The layer a function's labels make (`label` looks one up), or every label that does
    /// not read, each named, and min above max when both are given.
    pub fn from_labels<'a>(label: impl Fn(&str) -> Option<&'a str>) -> Result<Self, Vec<String>> {
        let mut errors = Vec::new();
        let mut p = PolicyPatch::read_labels(&label, &mut errors);
        if let Some(text) = label(LABEL_SHADOW) {
            match Flag::from_text(text) {
                Ok(v) => p.dry_run = Some(v),
                Err(e) => errors.push(format!("{LABEL_SHADOW}: {e}")),
            }
        }
        if let (Some(min), Some(max)) = (p.min, p.max) {
            if min > max {
                errors.push(format!(
                    "{LABEL_SCALE_MIN}: {min} is above com.openfaas.scale.max ({max})"
                ));
            }
        }
        // As at deploy (and in OpenFaaS), a min of 0 means the default: only the
        // scale-to-zero opt-in takes a function to zero.
        if p.min == Some(0) {
            p.min = None;
        }
        p.normalize();
        if errors.is_empty() {
            Ok(p)
        } else {
            Err(errors)
        }
    }

    /// The policy these settings make and whether it runs in shadow mode; a setting no layer
    /// gave takes its built-in default (OpenFaaS's where it has one). Refuses a min above
    /// max.
    pub fn resolve(&self) -> Result<(Policy, bool), Crossed> {
        let (min, max) = (self.min.unwrap_or(1), self.max.unwrap_or(5));
        if min > max {
            return Err(Crossed { min, max });
        }
        let step_up = self
            .step_up
            .unwrap_or(Step::PercentOfMax(self.factor.unwrap_or(10)));
        let zero_idle = self.zero_idle.unwrap_or(Duration::from_secs(15 * 60));
        let policy = Policy {
            min,
            max,
            step_up,
            step_down: self.step_down.unwrap_or(step_up),
            up_cooldown: self.up_cooldown.unwrap_or(Duration::from_secs(5)),
            down_cooldown: self.down_cooldown.unwrap_or(Duration::from_secs(30)),
            stabilization_window: self.stabilization_window.unwrap_or(Duration::from_secs(60)),
            resolved_to_min: self.resolved_to_min.unwrap_or(false),
            scale_to_zero_after: self.scale_to_zero.unwrap_or(false).then_some(zero_idle),
            alert_mode: self.alert_mode.unwrap_or_default(),
            target_per_replica: self.target_per_replica,
            max_step_up: self.max_step_up,
            staleness_guard: self.staleness_guard.unwrap_or(true),
            hold_ttl: self.hold_ttl.unwrap_or(Duration::from_secs(300)),
        };
        Ok((policy, self.dry_run.unwrap_or(false)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TOML table as a source, errors collected.
    struct Table(toml::Table, Vec<String>);

    impl Source for Table {
        fn take<T>(&mut self, key: &str, read: fn(toml::Value) -> Result<T, String>) -> Option<T> {
            let v = self.0.remove(key)?;
            read(v).map_err(|e| self.1.push(format!("{key}: {e}"))).ok()
        }
    }

    fn labels(pairs: &[(&'static str, &'static str)]) -> Result<PolicyPatch, Vec<String>> {
        PolicyPatch::from_labels(|k| pairs.iter().find(|(key, _)| *key == k).map(|(_, v)| *v))
    }

    #[test]
    fn each_layer_reads_the_same_settings_and_the_upper_one_wins() {
        let mut top = Table(
            toml::from_str(
                "default_min = 2\ndefault_factor = 20\nup_cooldown_secs = 1.5\nhold_ttl_secs = 60\nscale_to_zero = true",
            )
            .unwrap(),
            vec![],
        );
        let base = PolicyPatch::read(&mut top, true);
        assert!(top.0.is_empty() && top.1.is_empty(), "{:?}", top.1);
        let mut entry = Table(
            toml::from_str("min = 3\nstep_down = \"50%\"\nzero_idle_secs = 0").unwrap(),
            vec![],
        );
        let entry = PolicyPatch::read(&mut entry, false);
        let label = labels(&[
            ("com.openfaas.scale.max", "8"),
            ("com.faastastic.scale.hold-ttl", "2m"),
        ])
        .unwrap();
        let (p, shadow) = label.over(&entry.over(&base)).resolve().unwrap();
        assert_eq!((p.min, p.max, shadow), (3, 8, false));
        assert_eq!(p.step_up, Step::PercentOfMax(20));
        assert_eq!(p.step_down, Step::PercentOfMax(50));
        assert_eq!(p.up_cooldown, Duration::from_millis(1500));
        assert_eq!(p.hold_ttl, Duration::from_secs(120), "the label wins");
        assert_eq!(p.scale_to_zero_after, Some(Duration::ZERO));
    }

    #[test]
    fn a_factor_overrides_a_step_from_below_and_min_zero_means_the_default() {
        let below = PolicyPatch {
            step_up: Some(Step::Count(3)),
            min: Some(2),
            ..Default::default()
        };
        let label = labels(&[
            ("com.openfaas.scale.factor", "50"),
            ("com.openfaas.scale.min", "0"),
        ])
        .unwrap();
        let (p, _) = label.over(&below).resolve().unwrap();
        assert_eq!((p.step_up, p.min), (Step::PercentOfMax(50), 2));
    }

    /// The README documents every label, and every key of both layers in its sample
    /// configuration.
    #[test]
    fn every_setting_is_documented() {
        let readme = include_str!("../../../README.md");
        let words = |text: &str| -> Vec<String> {
            text.split(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .map(str::to_string)
                .collect()
        };
        let top = &readme[readme.find("\n[autoscale]\n").expect("[autoscale] sample")..];
        let entry = &top[top
            .find("[[autoscale.policies]]")
            .expect("a policies entry")..];
        let top = &top[..top.find("[[autoscale.policies]]").unwrap()];
        let entry = &entry[..entry.find("```").expect("the sample's end")];
        let (top, entry) = (words(top), words(entry));
        for (label, top_key, entry_key) in PolicyPatch::NAMES {
            assert!(
                readme.contains(&format!("`{label}`")),
                "{label} is not in the README"
            );
            assert!(
                top.iter().any(|w| w == top_key),
                "[autoscale] {top_key} is not in the README"
            );
            assert!(
                entry.iter().any(|w| w == entry_key),
                "policies' {entry_key} is not in the README"
            );
        }
    }

    #[test]
    fn every_bad_setting_is_named() {
        let errors = labels(&[
            ("com.openfaas.scale.min", "6"),
            ("com.openfaas.scale.max", "4"),
            ("com.faastastic.scale.hold-ttl", "0"),
            ("com.faastastic.scale.shadow", "perhaps"),
        ])
        .unwrap_err();
        assert_eq!(errors.len(), 3, "{errors:?}");
        let mut t = Table(
            toml::from_str("default_factor = 0\nmax_step_up = true\nhold_ttl_secs = 0").unwrap(),
            vec![],
        );
        PolicyPatch::read(&mut t, true);
        assert_eq!(t.1.len(), 3, "{:?}", t.1);
        assert!(
            t.1[0].starts_with("default_factor: must be a percentage"),
            "{:?}",
            t.1
        );
    }
}
