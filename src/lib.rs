//! faastastic: runs OpenFaaS-compatible functions on existing platforms across datacenters and
//! scales them from metrics. See README.md for the architecture.

pub mod agent;
pub mod api;
pub mod autoscale;
pub mod cli;
pub mod config;
pub mod events;
pub mod fleet;
pub mod grafana;
pub mod lane;
pub mod listener;
pub mod model;
pub mod platform;
pub mod proxy;
pub mod queue;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod triggers;

/// An error with its causes (`a: b: c`), so a TLS or connection problem is named.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        source = s.source();
    }
    text
}
