//! OpenFaaS JSON types that only the HTTP layer sees. Lenient in (unknown fields ignored, `null`
//! accepted everywhere), exact out (Go's `omitempty` rules, integer replica counts).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize, Serializer};

use super::error::ApiError;
use crate::fleet::FunctionView;
use crate::model::{Function, FunctionId, FunctionResources};
use crate::platform::{Condition, ReplicaCounts, Rollout};

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

/// The part of a `FunctionStatus` (as `GET /system/function/{name}` and the list return it)
/// that changes only with a redeploy: serialized once per deployed version
/// ([`StatusCache`]), since a list of thousands of functions is mostly this.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusSpec<'a> {
    name: &'a str,
    image: &'a str,
    namespace: &'a str,
    #[serde(skip_serializing_if = "is_empty_str")]
    env_process: &'a Option<String>,
    #[serde(skip_serializing_if = "is_empty_map")]
    env_vars: &'a Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "is_empty_vec")]
    constraints: &'a Option<Vec<String>>,
    #[serde(skip_serializing_if = "is_empty_vec")]
    secrets: &'a Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    labels: &'a Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    annotations: &'a Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    limits: &'a Option<FunctionResources>,
    #[serde(skip_serializing_if = "Option::is_none")]
    requests: &'a Option<FunctionResources>,
    #[serde(skip_serializing_if = "is_false")]
    read_only_root_filesystem: &'a Option<bool>,
    created_at: String,
}

/// The part of a `FunctionStatus` that changes while it runs.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusLive<'a> {
    #[serde(skip_serializing_if = "is_zero_f64", serialize_with = "go_float")]
    invocation_count: f64,
    #[serde(skip_serializing_if = "is_zero")]
    replicas: u64,
    #[serde(skip_serializing_if = "is_zero")]
    available_replicas: u64,
    /// faastastic: each datacenter's share of the totals above (clients ignore it).
    datacenters: Datacenters<'a>,
    /// faastastic: present while autoscaling of the function is paused.
    #[serde(skip_serializing_if = "Option::is_none")]
    autoscaling_paused: Option<&'a crate::autoscale::executor::Pause>,
}

/// A view's per-datacenter counts as a JSON object (the view keeps them in name order), with
/// what each datacenter says beyond them (a stalled update, a failing replica), if anything.
#[derive(Debug)]
struct Datacenters<'a>(&'a [(Arc<str>, ReplicaCounts)], &'a [(Arc<str>, Condition)]);

impl Serialize for Datacenters<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(dc, c)| {
            let condition = self.1.iter().find(|(d, _)| d == dc).map(|(_, c)| c);
            (
                &**dc,
                DatacenterReplicas {
                    replicas: c.desired,
                    available_replicas: c.ready,
                    update: condition.and_then(|c| c.update.as_ref()),
                    reason: condition.and_then(|c| c.reason.as_deref()),
                },
            )
        }))
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct DatacenterReplicas<'a> {
    replicas: u64,
    available_replicas: u64,
    /// An update whose new version is not ready yet (the counts above are the old one's).
    #[serde(skip_serializing_if = "Option::is_none")]
    update: Option<&'a Rollout>,
    /// Why a replica does not serve, e.g. "replica exited with status 2: ...".
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

/// A function's spec fields as JSON: an object without its closing brace.
fn spec_json(f: &Function) -> Box<str> {
    let d = &f.deployment;
    let spec = StatusSpec {
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
        created_at: f
            .created_at
            .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
    };
    let mut text = serde_json::to_string(&spec).expect("a status serialises");
    text.pop();
    text.into_boxed_str()
}

/// Appends one `FunctionStatus` object: the cached spec, then the live counts.
fn write_status(
    out: &mut Vec<u8>,
    spec: &str,
    view: &FunctionView,
    invocations: &HashMap<String, u64>,
    pause: Option<&crate::autoscale::executor::Pause>,
    conditions: &[(Arc<str>, Condition)],
) {
    let f = &view.function;
    let live = StatusLive {
        invocation_count: if invocations.is_empty() {
            0.0
        } else {
            invocations.get(&f.id.qualified()).copied().unwrap_or(0) as f64
        },
        replicas: view.replicas.desired,
        available_replicas: view.replicas.ready,
        datacenters: Datacenters(&view.datacenters, conditions),
        autoscaling_paused: pause,
    };
    out.extend_from_slice(spec.as_bytes());
    let at = out.len();
    serde_json::to_writer(&mut *out, &live).expect("a status serialises");
    // `{"invocationCount":…}` continues the spec's object: its brace becomes a comma.
    out[at] = b',';
}

/// One function's `FunctionStatus` as JSON, without a cache, with the datacenters' stalled
/// updates.
pub fn status_json(
    view: &FunctionView,
    invocations: &HashMap<String, u64>,
    pause: Option<&crate::autoscale::executor::Pause>,
    conditions: &[(Arc<str>, Condition)],
) -> Vec<u8> {
    let mut out = Vec::new();
    write_status(
        &mut out,
        &spec_json(&view.function),
        view,
        invocations,
        pause,
        conditions,
    );
    out
}

/// Serialized specs per deployed version of each function, keyed by the version's address
/// (a scale or redeploy makes a new `Arc<Function>`, which misses and is serialized again). The
/// entry holds the version, so its address cannot be reused while cached; a key is a number,
/// so a lookup reads no name.
#[derive(Default)]
pub struct StatusCache(Mutex<HashMap<usize, CachedSpec, foldhash::fast::RandomState>>);

/// The version of a function a spec was serialized from, and the spec.
type CachedSpec = (Arc<Function>, Arc<str>);

impl StatusCache {
    fn spec(
        cache: &mut HashMap<usize, CachedSpec, foldhash::fast::RandomState>,
        f: &Arc<Function>,
    ) -> Arc<str> {
        let key = Arc::as_ptr(f) as usize;
        if let Some((_, spec)) = cache.get(&key) {
            return spec.clone();
        }
        let spec: Arc<str> = spec_json(f).into();
        cache.insert(key, (f.clone(), spec.clone()));
        spec
    }

    /// Serializes a new version's spec ahead of the first list (a deploy pays a few
    /// microseconds for it; after 10,000 deploys the first list would pay for all of them).
    pub fn prime(&self, f: &Arc<Function>) {
        Self::spec(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()), f);
    }

    /// A JSON array of `FunctionStatus` objects, in the order given.
    pub fn list_json(
        &self,
        views: &[FunctionView],
        invocations: &HashMap<String, u64>,
        pause_of: impl Fn(&FunctionId) -> Option<crate::autoscale::executor::Pause>,
    ) -> Vec<u8> {
        let mut cache = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::with_capacity(views.len() * 512 + 2);
        out.push(b'[');
        for (i, view) in views.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            let spec = Self::spec(&mut cache, &view.function);
            let pause = pause_of(&view.function.id);
            write_status(&mut out, &spec, view, invocations, pause.as_ref(), &[]);
        }
        out.push(b']');
        out
    }

    /// Drops the entries of versions that are no longer current.
    pub fn retain(&self, current: impl Fn(&Arc<Function>) -> bool) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, (function, _)| current(function));
    }

    pub fn entries(&self) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).len()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::FunctionDeployment;

    fn view(labels: &[(&str, &str)], ready: u64) -> FunctionView {
        let function = Arc::new(Function {
            id: FunctionId::new("f", "openfaas-fn"),
            deployment: FunctionDeployment {
                service: Some("f".into()),
                image: Some("img".into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            replicas: [("lon".to_string(), 2)].into(),
            created_at: chrono::DateTime::UNIX_EPOCH,
        });
        let counts = ReplicaCounts { desired: 2, ready };
        FunctionView {
            function,
            replicas: counts,
            datacenters: vec![("lon".into(), counts)],
        }
    }

    #[test]
    fn the_cached_list_matches_single_statuses_and_follows_a_redeploy() {
        let cache = StatusCache::default();
        let counts: HashMap<String, u64> = [("f.openfaas-fn".to_string(), 7)].into();
        let first = view(&[("team", "a")], 1);
        let list: serde_json::Value =
            serde_json::from_slice(
                &cache.list_json(std::slice::from_ref(&first), &counts, |_| None),
            )
            .unwrap();
        let single: serde_json::Value =
            serde_json::from_slice(&status_json(&first, &counts, None, &[])).unwrap();
        assert_eq!(list, serde_json::json!([single.clone()]));
        assert_eq!(
            single,
            serde_json::json!({"name": "f", "image": "img", "namespace": "openfaas-fn",
                "labels": {"team": "a"}, "createdAt": "1970-01-01T00:00:00Z",
                "invocationCount": 7, "replicas": 2, "availableReplicas": 1,
                "datacenters": {"lon": {"replicas": 2, "availableReplicas": 1}}})
        );
        // A redeploy is a new record: its spec is serialized again; live counts are never cached.
        let second = view(&[("team", "b")], 2);
        let list: serde_json::Value = serde_json::from_slice(&cache.list_json(
            std::slice::from_ref(&second),
            &HashMap::new(),
            |_| None,
        ))
        .unwrap();
        assert_eq!(list[0]["labels"]["team"], "b");
        assert_eq!(list[0]["availableReplicas"], 2);
        assert!(list[0].get("invocationCount").is_none());
        // The replaced version's entry stays until a sweep keeps only current versions.
        assert_eq!(cache.entries(), 2);
        cache.retain(|f| Arc::ptr_eq(f, &second.function));
        assert_eq!(cache.entries(), 1);
        let again: serde_json::Value =
            serde_json::from_slice(&cache.list_json(&[second], &HashMap::new(), |_| None)).unwrap();
        assert_eq!(again, list);
    }
}
