//! OpenFaaS JSON types that only the HTTP layer sees. Lenient in (unknown fields ignored, `null`
//! accepted everywhere), exact out (Go's `omitempty` rules, integer replica counts).

use std::collections::{BTreeMap, HashMap};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize, Serializer};

use super::error::ApiError;
use crate::fleet::FunctionView;
use crate::model::FunctionResources;

/// Parses a JSON object body, answering 400 with the parser's message and the path of the
/// offending field (`labels.a: invalid type: integer ...`).
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "a JSON request body is required".to_string(),
        ));
    }
    parse_object(body, "failed to unmarshal request")
}

/// Parses a non-empty JSON object body; a failure is answered 400 as `{context}: {path}:
/// {problem}`.
pub fn parse_object<T: DeserializeOwned>(body: &[u8], context: &str) -> Result<T, ApiError> {
    let fail = |msg: String| ApiError::bad_request(format!("{context}: {msg}"));
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(fail("the body must be a JSON object".to_string()));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path.is_empty() || path == "." {
            fail(inner.to_string())
        } else {
            fail(format!("{path}: {inner}"))
        }
    })?;
    de.end().map_err(|e| fail(e.to_string()))?;
    Ok(value)
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn is_zero_f64(v: &f64) -> bool {
    *v == 0.0
}

fn is_false(v: &Option<bool>) -> bool {
    !v.unwrap_or(false)
}

fn is_empty_str(v: &Option<String>) -> bool {
    v.as_deref().unwrap_or("").is_empty()
}

fn is_empty_vec(v: &Option<Vec<String>>) -> bool {
    v.as_ref().is_none_or(Vec::is_empty)
}

fn is_empty_map(v: &Option<BTreeMap<String, String>>) -> bool {
    v.as_ref().is_none_or(BTreeMap::is_empty)
}

/// Go writes a whole float64 without a fraction (`3`, not `3.0`).
fn go_float<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        s.serialize_i64(*v as i64)
    } else {
        s.serialize_f64(*v)
    }
}

/// `FunctionStatus`, as `GET /system/function/{name}` and the list return it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FunctionStatus<'a> {
    pub name: &'a str,
    pub image: &'a str,
    pub namespace: &'a str,
    #[serde(skip_serializing_if = "is_empty_str")]
    pub env_process: &'a Option<String>,
    #[serde(skip_serializing_if = "is_empty_map")]
    pub env_vars: &'a Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "is_empty_vec")]
    pub constraints: &'a Option<Vec<String>>,
    #[serde(skip_serializing_if = "is_empty_vec")]
    pub secrets: &'a Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: &'a Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub annotations: &'a Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limits: &'a Option<FunctionResources>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests: &'a Option<FunctionResources>,
    #[serde(skip_serializing_if = "is_false")]
    pub read_only_root_filesystem: &'a Option<bool>,
    #[serde(skip_serializing_if = "is_zero_f64", serialize_with = "go_float")]
    pub invocation_count: f64,
    #[serde(skip_serializing_if = "is_zero")]
    pub replicas: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub available_replicas: u64,
    pub created_at: String,
    /// faastastic: each datacenter's share of the totals above (clients ignore it).
    pub datacenters: BTreeMap<&'a str, DatacenterReplicas>,
    /// faastastic: present while autoscaling of the function is paused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub autoscaling_paused: Option<crate::autoscale::executor::Pause>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DatacenterReplicas {
    pub replicas: u64,
    pub available_replicas: u64,
}

impl<'a> FunctionStatus<'a> {
    pub fn new(view: &'a FunctionView, invocations: &HashMap<String, u64>) -> Self {
        let f = &view.function;
        let d = &f.deployment;
        FunctionStatus {
            name: &f.id.name,
            image: d.image.as_deref().unwrap_or(""),
            namespace: &f.id.namespace,
            env_process: &d.env_process,
            env_vars: &d.env_vars,
            constraints: &d.constraints,
            secrets: &d.secrets,
            labels: &d.labels,
            annotations: &d.annotations,
            limits: &d.limits,
            requests: &d.requests,
            read_only_root_filesystem: &d.read_only_root_filesystem,
            invocation_count: invocations.get(&f.id.qualified()).copied().unwrap_or(0) as f64,
            replicas: view.replicas.desired,
            available_replicas: view.replicas.ready,
            created_at: f
                .created_at
                .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            datacenters: view
                .datacenters
                .iter()
                .map(|(dc, c)| {
                    (
                        dc.as_str(),
                        DatacenterReplicas {
                            replicas: c.desired,
                            available_replicas: c.ready,
                        },
                    )
                })
                .collect(),
            autoscaling_paused: None,
        }
    }

    pub fn with_pause(mut self, pause: Option<crate::autoscale::executor::Pause>) -> Self {
        self.autoscaling_paused = pause;
        self
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScaleServiceRequest {
    #[serde(default)]
    pub service_name: Option<String>,
    #[serde(default)]
    pub replicas: Option<u64>,
    #[serde(default)]
    pub namespace: Option<String>,
    /// faastastic: scale one datacenter; without it `replicas` is the total, spread.
    #[serde(default)]
    pub datacenter: Option<String>,
    /// faastastic: allow a count outside the function's min and max (recorded as such).
    #[serde(default, rename = "override")]
    pub override_bounds: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeleteFunctionRequest {
    #[serde(default)]
    pub function_name: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    /// faastastic: remove from one datacenter only.
    #[serde(default)]
    pub datacenter: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretRequest {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default)]
    pub raw_value: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct SecretListItem {
    pub name: String,
    pub namespace: String,
}

#[derive(Debug, Serialize)]
pub struct VersionInfo {
    pub sha: String,
    pub release: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub commit_message: String,
}

#[derive(Debug, Serialize)]
pub struct ProviderInfo {
    pub provider: String,
    pub orchestration: String,
    pub version: VersionInfo,
}

#[derive(Debug, Serialize)]
pub struct GatewayInfo {
    pub provider: ProviderInfo,
    pub version: VersionInfo,
    pub arch: String,
}
