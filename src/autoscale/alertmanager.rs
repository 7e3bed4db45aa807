//! Alertmanager's webhook payload (version 4, read leniently: version 3's numeric `groupKey` and
//! unknown fields are accepted) and its translation into one signal per alert.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::policy::Action;
use crate::model::split_qualified;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Webhook {
    #[serde(default)]
    pub version: Option<String>,
    /// A string in version 4, a number in version 3: kept untyped.
    #[serde(default)]
    pub group_key: Option<serde_json::Value>,
    #[serde(default)]
    pub truncated_alerts: Option<u64>,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub receiver: Option<String>,
    #[serde(default)]
    pub group_labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub common_labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub common_annotations: Option<BTreeMap<String, String>>,
    #[serde(default, rename = "externalURL")]
    pub external_url: Option<String>,
    #[serde(default)]
    pub alerts: Option<Vec<Alert>>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Alert {
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub starts_at: Option<String>,
    #[serde(default)]
    pub ends_at: Option<String>,
    #[serde(default, rename = "generatorURL")]
    pub generator_url: Option<String>,
    #[serde(default)]
    pub fingerprint: Option<String>,
}

/// What one alert asks of which function.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertSignal {
    pub name: String,
    /// `None`: the server's default namespace.
    pub namespace: Option<String>,
    pub datacenter: Option<String>,
    pub action: Action,
    pub dedupe_key: Option<String>,
    pub alertname: String,
}

impl Alert {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .as_ref()?
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations
            .as_ref()?
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.trim().is_empty())
    }

    /// A number the alert carries as an annotation (or, for the target, a label too).
    fn number(&self, key: &str, label_too: bool) -> Result<Option<f64>, String> {
        let text = match self.annotation(key) {
            Some(t) => t,
            None => match self.label(key).filter(|_| label_too) {
                Some(t) => t,
                None => return Ok(None),
            },
        };
        match text.trim().parse::<f64>() {
            Ok(v) if v.is_finite() && v >= 0.0 => Ok(Some(v)),
            // Only `value` is templated from the rule's result; the target is a fixed number.
            _ if key == "value" => Err(format!(
                "{key} {text:?} is not a finite number >= 0 (write {key}: \"{{{{ $value }}}}\" for the observed value)"
            )),
            _ => Err(format!(
                "{key} {text:?} is not a finite number >= 0 (the load one replica carries, in the value's unit, e.g. {key}: \"5\")"
            )),
        }
    }

    /// A firing step-up alert with a `value` annotation is sized from it.
    fn firing_action(&self) -> Result<Action, String> {
        let Some(value) = self.number("value", false)? else {
            return Ok(Action::StepUp);
        };
        let target = self.number("target_per_replica", true)?;
        if target == Some(0.0) {
            return Err("target_per_replica must be above zero".to_string());
        }
        Ok(Action::Sized { value, target })
    }

    /// What a scale event records of the alert behind it.
    pub fn evidence(
        &self,
        signal: &AlertSignal,
        receiver: &str,
        group_key: Option<&serde_json::Value>,
    ) -> serde_json::Value {
        serde_json::json!({
            "alertname": signal.alertname,
            "status": self.status,
            "fingerprint": self.fingerprint,
            "startsAt": self.starts_at,
            "receiver": receiver,
            "groupKey": group_key,
            "labels": self.labels,
            "annotations": self.annotations,
            "datacenter": signal.datacenter,
        })
    }

    /// `Ok(None)`: the alert is not for the autoscaler (no `function_name`);
    /// `Err`: it is, but its action labels are wrong.
    pub fn signal(&self) -> Result<Option<AlertSignal>, String> {
        let Some(function) = self.label("function_name") else {
            return Ok(None);
        };
        let (name, suffix) = split_qualified(function);
        let namespace = suffix.or(self.label("namespace")).map(str::to_string);
        let firing = self.status.as_deref() == Some("firing");
        let action =
            match (self.label("scale_action"), firing) {
                (None | Some("up"), true) => self.firing_action()?,
                (None | Some("up"), false) => Action::Resolved,
                (Some("down"), true) => Action::StepDown,
                (Some("hold"), true) => Action::Hold,
                (Some("hold"), false) => Action::Release,
                (Some("to"), true) => {
                    let replicas = self
                        .label("replicas")
                        .ok_or("scale_action=to needs a replicas label")?;
                    Action::To(replicas.trim().parse().map_err(|_| {
                        format!("replicas label {replicas:?} is not a whole number")
                    })?)
                }
                (Some("down" | "to"), false) => return Ok(None),
                (Some(other), _) => {
                    return Err(format!(
                        "scale_action label {other:?} is not one of up, down, to, hold"
                    ))
                }
            };
        let dedupe_key = self.fingerprint.as_deref().map(|fp| {
            format!(
                "{fp}@{}@{}",
                self.starts_at.as_deref().unwrap_or(""),
                self.status.as_deref().unwrap_or("")
            )
        });
        Ok(Some(AlertSignal {
            name: name.to_string(),
            namespace,
            datacenter: self.label("datacenter").map(str::to_string),
            action,
            dedupe_key,
            alertname: self.label("alertname").unwrap_or("").to_string(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPENFAAS_SAMPLE: &str = r#"{"version":"4","groupKey":"{}:{alertname=\"APIHighInvocationRate\"}","truncatedAlerts":0,"status":"firing","receiver":"scale-up","groupLabels":{"alertname":"APIHighInvocationRate","service":"gateway"},"commonLabels":{"alertname":"APIHighInvocationRate","service":"gateway","severity":"major"},"commonAnnotations":{},"externalURL":"http://alertmanager:9093","alerts":[{"status":"firing","labels":{"alertname":"APIHighInvocationRate","function_name":"figlet.openfaas-fn","monitor":"faas-monitor","service":"gateway","severity":"major"},"annotations":{"summary":"High invocation total on figlet.openfaas-fn"},"startsAt":"2024-01-01T00:00:00Z","endsAt":"0001-01-01T00:00:00Z","generatorURL":"http://prometheus:9090/graph","fingerprint":"0123456789abcdef"},{"status":"resolved","labels":{"alertname":"APIHighInvocationRate","function_name":"nodeinfo.openfaas-fn","service":"gateway","severity":"major"},"annotations":{},"startsAt":"2024-01-01T00:00:00Z","endsAt":"2024-01-01T00:01:00Z","generatorURL":"http://prometheus:9090/graph","fingerprint":"fedcba9876543210"}]}"#;

    fn alert(annotations: &[(&str, &str)], labels: &[(&str, &str)]) -> Alert {
        let map = |kv: &[(&str, &str)]| {
            Some(
                kv.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        let mut all_labels = vec![("function_name", "api")];
        all_labels.extend_from_slice(labels);
        Alert {
            status: Some("firing".into()),
            labels: map(&all_labels),
            annotations: map(annotations),
            ..Default::default()
        }
    }

    #[test]
    fn a_value_annotation_sizes_the_alert() {
        let action = |a: Alert| a.signal().map(|s| s.unwrap().action);
        assert_eq!(action(alert(&[], &[])), Ok(Action::StepUp));
        assert_eq!(
            action(alert(&[("value", "40.5")], &[])),
            Ok(Action::Sized {
                value: 40.5,
                target: None
            })
        );
        assert_eq!(
            action(alert(
                &[("value", "1e+02"), ("target_per_replica", "5")],
                &[]
            )),
            Ok(Action::Sized {
                value: 100.0,
                target: Some(5.0)
            })
        );
        assert_eq!(
            action(alert(&[("value", "12")], &[("target_per_replica", "3")])),
            Ok(Action::Sized {
                value: 12.0,
                target: Some(3.0)
            }),
            "the target may be a label"
        );
        for (value, target) in [
            ("NaN", "5"),
            ("+Inf", "5"),
            ("-1", "5"),
            ("lots", "5"),
            ("3", "0"),
            ("3", "x"),
        ] {
            let e = action(alert(
                &[("value", value), ("target_per_replica", target)],
                &[],
            ))
            .unwrap_err();
            assert!(
                e.contains("value") || e.contains("target_per_replica"),
                "{e}"
            );
        }
        // The advice fits the key: a template for the value, a number for the target.
        let e = action(alert(&[("value", "3"), ("target_per_replica", "x")], &[])).unwrap_err();
        assert!(e.starts_with("target_per_replica \"x\""), "{e}");
        assert!(!e.contains("$value"), "{e}");
        let e = action(alert(&[("value", "lots")], &[])).unwrap_err();
        assert!(e.contains("{{ $value }}"), "{e}");
        // A resolved alert's value does not matter.
        let mut resolved = alert(&[("value", "NaN")], &[]);
        resolved.status = Some("resolved".into());
        assert_eq!(action(resolved), Ok(Action::Resolved));
    }

    #[test]
    fn reads_the_openfaas_sample() {
        let w: Webhook = serde_json::from_str(OPENFAAS_SAMPLE).unwrap();
        let alerts = w.alerts.unwrap();
        let first = alerts[0].signal().unwrap().unwrap();
        assert_eq!(first.name, "figlet");
        assert_eq!(first.namespace.as_deref(), Some("openfaas-fn"));
        assert_eq!(first.action, Action::StepUp);
        assert_eq!(
            first.dedupe_key.as_deref(),
            Some("0123456789abcdef@2024-01-01T00:00:00Z@firing")
        );
        let second = alerts[1].signal().unwrap().unwrap();
        assert_eq!(second.action, Action::Resolved);
    }

    #[test]
    fn version_3_numeric_group_key_and_extras() {
        let w: Webhook = serde_json::from_str(
            r#"{"version":"3","groupKey":12345,"status":"firing","alerts":[{"status":"firing","labels":{"alertname":"service_down"},"extra":true}],"newField":[1]}"#,
        )
        .unwrap();
        assert_eq!(w.alerts.unwrap()[0].signal().unwrap(), None);
    }

    #[test]
    fn action_labels() {
        let alert = |labels: &[(&str, &str)], status: &str| Alert {
            status: Some(status.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        };
        let a = alert(
            &[
                ("function_name", "f"),
                ("namespace", "dev"),
                ("scale_action", "to"),
                ("replicas", "3"),
            ],
            "firing",
        );
        let s = a.signal().unwrap().unwrap();
        assert_eq!(
            (s.action, s.namespace.as_deref()),
            (Action::To(3), Some("dev"))
        );
        assert!(
            alert(&[("function_name", "f"), ("scale_action", "to")], "firing")
                .signal()
                .is_err()
        );
        assert!(alert(
            &[("function_name", "f"), ("scale_action", "sideways")],
            "firing"
        )
        .signal()
        .is_err());
        assert_eq!(
            alert(
                &[("function_name", "f"), ("scale_action", "down")],
                "resolved"
            )
            .signal()
            .unwrap(),
            None
        );
        let down = alert(
            &[("function_name", "f"), ("scale_action", "down")],
            "firing",
        );
        assert_eq!(down.signal().unwrap().unwrap().action, Action::StepDown);
    }
}
