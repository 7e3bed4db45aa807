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
