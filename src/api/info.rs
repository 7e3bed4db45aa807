//! `/system/info`, `/healthz`, `/metrics`.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::header;

use super::wire::{GatewayInfo, ProviderInfo, VersionInfo};
use super::AppState;
use crate::config::Role;

pub const RELEASE: &str = env!("CARGO_PKG_VERSION");

fn version() -> VersionInfo {
    VersionInfo {
        sha: option_env!("FAASTASTIC_GIT_SHA")
            .unwrap_or("unknown")
            .to_string(),
        release: RELEASE.to_string(),
        commit_message: String::new(),
    }
}

/// The gateway shape (`provider` is an object) or the provider shape (`provider` is a string),
/// chosen by `role`; every object is always present, since faas-cli dereferences them unchecked.
pub async fn info(State(s): State<Arc<AppState>>) -> Response {
    let provider = ProviderInfo {
        provider: "faastastic".to_string(),
        orchestration: orchestration(&s),
        version: version(),
    };
    match s.role {
        Role::Provider => Json(provider).into_response(),
        Role::Gateway => Json(GatewayInfo {
            provider,
            version: version(),
            arch: std::env::consts::ARCH.to_string(),
        })
        .into_response(),
    }
}

/// The platform kind, or the kinds joined with `+` when datacenters differ.
fn orchestration(s: &AppState) -> String {
    let mut kinds: Vec<&str> = s
        .fleet
        .datacenters()
        .iter()
        .map(|d| d.platform.kind())
        .collect();
    kinds.dedup();
    kinds.join("+")
}

pub async fn healthz() -> &'static str {
    ""
}

pub async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    for d in s.fleet.datacenters() {
        s.metrics
            .datacenter_up
            .with_label_values(&[d.name.as_str()])
            .set(d.up());
    }
    let text = s.metrics.render(&s.fleet.all());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Labels and value of every series of one gauge vector.
fn series(collector: &dyn prometheus::core::Collector) -> Vec<(Vec<(String, String)>, f64)> {
    collector
        .collect()
        .iter()
        .flat_map(|family| family.get_metric().iter())
        .map(|m| {
            let labels = m
                .get_label()
                .iter()
                .map(|l| (l.name().to_string(), l.value().to_string()))
                .collect();
            (labels, m.get_gauge().value())
        })
        .collect()
}

fn label<'a>(labels: &'a [(String, String)], name: &str) -> &'a str {
    labels
        .iter()
        .find(|(k, _)| k == name)
        .map_or("", |(_, v)| v.as_str())
}

/// `GET /system/overview`: what the web UI's overview shows in one answer: each datacenter
/// and its platform's last healthcheck, when each autoscaler loop last finished a pass, each
/// query policy's source, the pauses, how many functions are deployed, and the defaults a
/// deployment gets (placement, namespace).
pub async fn overview(State(s): State<Arc<AppState>>) -> Response {
    let leader = s.fleet.leader();
    let datacenters: Vec<serde_json::Value> = s
        .fleet
        .datacenters()
        .iter()
        .map(|d| {
            serde_json::json!({
                "name": d.name,
                "platform": d.platform.kind(),
                "home": d.name == s.fleet.home(),
                // null until the reconciler's first healthcheck.
                "up": match d.up() { 1 => Some(true), 0 => Some(false), _ => None },
            })
        })
        .collect();
    let now = chrono::Utc::now();
    let mut loops: Vec<serde_json::Value> = series(&s.metrics.last_evaluation)
        .into_iter()
        .map(|(labels, at)| {
            let at =
                chrono::DateTime::from_timestamp_millis((at * 1000.0) as i64).unwrap_or_default();
            serde_json::json!({
                "name": label(&labels, "loop"),
                "lastEvaluation": at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                "secondsAgo": (now - at).num_milliseconds().max(0) as f64 / 1000.0,
            })
        })
        .collect();
    loops.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    let mut sources: Vec<serde_json::Value> = series(&s.metrics.source_up)
        .into_iter()
        .map(
            |(labels, up)| serde_json::json!({"policy": label(&labels, "policy"), "up": up >= 1.0}),
        )
        .collect();
    sources.sort_by(|a, b| a["policy"].as_str().cmp(&b["policy"].as_str()));
    let triggers: Vec<serde_json::Value> = series(&s.metrics.trigger_up)
        .into_iter()
        .map(|(labels, up)| serde_json::json!({"name": label(&labels, "trigger"), "up": up >= 1.0}))
        .collect();
    Json(serde_json::json!({
        "datacenters": datacenters,
        "loops": loops,
        "sources": sources,
        "triggers": triggers,
        "paused": s.autoscaler.pauses(),
        "functions": s.fleet.count(),
        // Where a deployment naming no datacenter goes, and its namespace.
        "placement": match s.fleet.default_placement() {
            crate::config::Placement::All => "all",
            crate::config::Placement::Home => "home",
        },
        "defaultNamespace": s.fleet.default_namespace(),
        "version": RELEASE,
        "instance": {
            "id": leader.id,
            "leader": leader.is_leader(),
            // Asked of the store: which instance runs the loops now (null: none yet).
            "leaderInstance": leader.current().await,
            "store": if leader.elected() { "postgres" } else { "sqlite" },
            "storeUp": s.metrics.store_up.get() == 1,
        },
    }))
    .into_response()
}
