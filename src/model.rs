//! Domain types shared by every layer: function identity, the deployment a client asked for,
//! and the naming rules OpenFaaS clients rely on.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The namespace every OpenFaaS client assumes when it names none.
pub const DEFAULT_NAMESPACE: &str = "openfaas-fn";

/// Label that sets the initial (and minimum) replica count, as in OpenFaaS.
pub const LABEL_SCALE_MIN: &str = "com.openfaas.scale.min";
/// Replicas a new deployment starts with, when not min (e.g. 0: deployed dormant, woken by
/// its first invocation).
pub const LABEL_SCALE_INITIAL: &str = "com.faastastic.scale.initial";

/// Longest function or namespace name accepted (a DNS-1123 label).
pub const MAX_NAME_LEN: usize = 63;

/// A map keyed by function, with a fast seeded hasher: the function list and the invoke path
/// look functions up in these maps for every function in every datacenter, and SipHash was
/// a tenth of the list's time.
pub type FunctionMap<V> = std::collections::HashMap<FunctionId, V, foldhash::fast::RandomState>;

/// A function's identity: its name within a namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FunctionId {
    pub namespace: String,
    pub name: String,
}

impl FunctionId {
    pub fn new(name: impl Into<String>, namespace: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            namespace: namespace.into(),
        }
    }

    /// `name.namespace`: the form used in metric labels and invoke URLs.
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.name, self.namespace)
    }

    /// The function a metric label names (`name.namespace`, or `name` in `default_namespace`):
    /// the inverse of [`Self::qualified`].
    pub fn from_qualified(raw: &str, default_namespace: &str) -> Self {
        let (name, namespace) = split_qualified(raw);
        Self::new(name, namespace.unwrap_or(default_namespace))
    }
}

impl fmt::Display for FunctionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.name, self.namespace)
    }
}

/// Splits `name.namespace` on the last dot, as the OpenFaaS gateway and providers do.
/// Without a dot the namespace is `None` (the caller picks the default).
pub fn split_qualified(raw: &str) -> (&str, Option<&str>) {
    match raw.rsplit_once('.') {
        Some((name, namespace)) => (name, Some(namespace)),
        None => (raw, None),
    }
}

/// How every route reads a function reference (`/function/*`, `/async-function/*` and the
/// `/system/*` routes alike): `name` or `name.namespace`, an explicit namespace (query or
/// body), when given, winning over the suffix; name and namespace DNS-1123 labels. Returns
/// the name and the namespace, if any was named.
pub fn function_ref<'a>(
    raw: &'a str,
    namespace: Option<&'a str>,
) -> Result<(&'a str, Option<&'a str>), String> {
    let (name, suffix) = split_qualified(raw);
    validate_dns_label("name", name)?;
    let namespace = namespace.filter(|n| !n.is_empty()).or(suffix);
    if let Some(ns) = namespace {
        validate_dns_label("namespace", ns)?;
    }
    Ok((name, namespace))
}

/// Checks a function or namespace name against the DNS-1123 label rule
/// (`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`, at most 63 characters).
pub fn validate_dns_label(what: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{what}: is required"));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(format!(
            "{what}: {:?} is longer than {MAX_NAME_LEN} characters",
            truncate_for_message(value)
        ));
    }
    let bytes = value.as_bytes();
    let allowed = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-';
    let edges_ok = bytes[0] != b'-' && bytes[bytes.len() - 1] != b'-';
    if !bytes.iter().all(allowed) || !edges_ok {
        return Err(format!(
            "{what}: {:?} must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character",
            truncate_for_message(value)
        ));
    }
    Ok(())
}

/// Keeps error messages short when a client sends a huge name.
pub fn truncate_for_message(value: &str) -> String {
    const KEEP: usize = 80;
    if value.chars().count() <= KEEP {
        value.to_string()
    } else {
        let head: String = value.chars().take(KEEP).collect();
        format!("{head}...")
    }
}

/// Durations as the OpenFaaS watchdogs write them: `10s`, `500ms`, `1m`, or plain seconds.
/// `0` means no limit.
pub fn parse_duration(text: &str) -> Result<Option<Duration>, String> {
    let t = text.trim();
    let (number, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (t, 1.0)
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 10s"))?;
    if !value.is_finite() || value < 0.0 {
        return Err(format!("{text:?} is not a duration such as 10s"));
    }
    if value == 0.0 {
        return Ok(None);
    }
    Duration::try_from_secs_f64(value * scale)
        .map(Some)
        .map_err(|_| format!("{text:?} is too long a duration"))
}

/// Resource requests or limits, as Kubernetes quantities (`128Mi`, `100m`). Extra keys such as
/// `nvidia.com/gpu` are kept and echoed back.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FunctionResources {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// The OpenFaaS `FunctionDeployment` body, kept exactly as the client sent it so that status
/// echoes it verbatim (Terraform compares what it reads back with what it wrote).
/// Every field is optional on the wire; [`FunctionDeployment::validate`] enforces the required ones.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FunctionDeployment {
    #[serde(default, alias = "Service", skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, alias = "Image", skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_process: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_vars: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraints: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<FunctionResources>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<FunctionResources>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only_root_filesystem: Option<bool>,
}

impl FunctionDeployment {
    /// Collects every problem with the body at once, in OpenFaaS' wording
    /// (`service: is required`), so a client sees all of them in one answer.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        match self.service.as_deref() {
            None | Some("") => errors.push("service: is required".to_string()),
            Some(service) => {
                if let Err(e) = validate_dns_label("service", service) {
                    errors.push(e);
                }
            }
        }
        if self.image.as_deref().unwrap_or("").is_empty() {
            errors.push("image: is required".to_string());
        }
        for label in [LABEL_SCALE_MIN, LABEL_SCALE_INITIAL] {
            if let Some(value) = self.label(label) {
                if value.trim().parse::<u64>().is_err() {
                    errors.push(format!(
                        "labels: {label} must be a non-negative integer, got {value:?}"
                    ));
                }
            }
        }
        for secret in self.secrets.iter().flatten() {
            if let Err(e) = validate_secret_name(secret) {
                errors.push(format!("secrets: {e}"));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.as_ref()?.get(key).map(String::as_str)
    }

    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.as_ref()?.get(key).map(String::as_str)
    }

    /// Replicas to start with: the `com.openfaas.scale.min` label when it is an integer > 0,
    /// else 1 (faas-netes behaviour).
    pub fn min_replicas(&self) -> u64 {
        self.label(LABEL_SCALE_MIN)
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|v| *v > 0)
            .unwrap_or(1)
    }

    /// Replicas a new deployment starts with in each datacenter: the
    /// `com.faastastic.scale.initial` label (0 allowed), else [`Self::min_replicas`].
    pub fn initial_replicas(&self) -> u64 {
        self.label(LABEL_SCALE_INITIAL)
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or_else(|| self.min_replicas())
    }
}

/// Secret names: DNS-1123 subdomain-like, never a path.
pub fn validate_secret_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("name: is required".to_string());
    }
    if name.len() > 253 {
        return Err(format!(
            "name: {:?} is longer than 253 characters",
            truncate_for_message(name)
        ));
    }
    let ok = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.'])
        && !name.contains("..");
    if !ok {
        return Err(format!(
            "name: {:?} must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
            truncate_for_message(name)
        ));
    }
    Ok(())
}

/// A deployed function as the control plane remembers it.
#[derive(Debug, Clone, PartialEq)]
pub struct Function {
    pub id: FunctionId,
    pub deployment: FunctionDeployment,
    /// The datacenters it is placed in, each with the replicas the operator or autoscaler
    /// asked for there.
    pub replicas: BTreeMap<String, u64>,
    pub created_at: DateTime<Utc>,
}

impl Function {
    /// Desired replicas across every datacenter.
    pub fn desired_total(&self) -> u64 {
        self.replicas
            .values()
            .fold(0, |sum, n| sum.saturating_add(*n))
    }

    /// Desired replicas in one datacenter, `None` when it is not placed there.
    pub fn desired_in(&self, datacenter: &str) -> Option<u64> {
        self.replicas.get(datacenter).copied()
    }
}

/// The label that names the datacenters a function runs in (`lon,syd`), besides
/// `datacenter==NAME` / `datacenter!=NAME` constraints.
pub const LABEL_DATACENTERS: &str = "com.faastastic.datacenters";

/// One namespace, with the labels and annotations clients attach (`openfaas: "1"`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Namespace {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("10s").unwrap(),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse_duration("500ms").unwrap(),
            Some(Duration::from_millis(500))
        );
        assert_eq!(parse_duration("2").unwrap(), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m").unwrap(), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("0").unwrap(), None);
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(
            parse_duration("1e20").is_err(),
            "too long: an error, not a panic"
        );
    }

    #[test]
    fn splits_on_last_dot() {
        assert_eq!(split_qualified("figlet"), ("figlet", None));
        assert_eq!(
            split_qualified("figlet.openfaas-fn"),
            ("figlet", Some("openfaas-fn"))
        );
        assert_eq!(split_qualified("a.b.c"), ("a.b", Some("c")));
    }

    #[test]
    fn dns_labels() {
        assert!(validate_dns_label("service", "figlet-2").is_ok());
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"x".repeat(64)] {
            let err = validate_dns_label("service", bad).unwrap_err();
            assert!(err.starts_with("service:"), "{err}");
        }
    }

    #[test]
    fn validation_reports_every_error() {
        let dep = FunctionDeployment {
            service: None,
            image: Some(String::new()),
            labels: Some([(LABEL_SCALE_MIN.to_string(), "two".to_string())].into()),
            secrets: Some(vec!["../etc".to_string()]),
            ..Default::default()
        };
        let errors = dep.validate().unwrap_err();
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert!(errors[0].contains("service: is required"));
        assert!(errors[1].contains("image: is required"));
        assert!(errors[2].contains(LABEL_SCALE_MIN));
        assert!(errors[3].starts_with("secrets: name:"));
    }

    #[test]
    fn min_replicas_from_label() {
        let mut dep = FunctionDeployment::default();
        assert_eq!(dep.min_replicas(), 1);
        dep.labels = Some([(LABEL_SCALE_MIN.to_string(), "3".to_string())].into());
        assert_eq!(dep.min_replicas(), 3);
        dep.labels = Some([(LABEL_SCALE_MIN.to_string(), "0".to_string())].into());
        assert_eq!(dep.min_replicas(), 1);
        assert_eq!(dep.initial_replicas(), 1);
        dep.labels = Some(
            [
                (LABEL_SCALE_MIN.to_string(), "2".to_string()),
                (LABEL_SCALE_INITIAL.to_string(), "0".to_string()),
            ]
            .into(),
        );
        assert_eq!((dep.min_replicas(), dep.initial_replicas()), (2, 0));
        dep.labels = Some([(LABEL_SCALE_INITIAL.to_string(), "none".to_string())].into());
        let errors = dep.validate().unwrap_err();
        assert!(
            errors.iter().any(|e| e.contains(LABEL_SCALE_INITIAL)),
            "{errors:?}"
        );
    }

    #[test]
    fn lenient_deployment_json() {
        let terraform = r#"{"service":"f","image":"i","network":"","envProcess":"","envVars":null,"constraints":null,"secrets":null,"labels":null,"annotations":null,"limits":null,"requests":null,"readOnlyRootFilesystem":false,"registryAuth":"x"}"#;
        let dep: FunctionDeployment = serde_json::from_str(terraform).unwrap();
        assert_eq!(dep.service.as_deref(), Some("f"));
        assert!(dep.labels.is_none());
        assert!(dep.validate().is_ok());
    }
}
