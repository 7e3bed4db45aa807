//! faastastic: runs OpenFaaS-compatible functions on existing platforms across datacenters and
//! scales them from metrics. See README.md for the architecture.

pub mod agent;
pub mod api;
pub mod autoscale;
pub mod config;
pub mod demo;
pub mod fleet;
pub mod grafana;
pub mod model;
pub mod platform;
pub mod proxy;
pub mod queue;
pub mod rules;
pub mod server;
pub mod store;
pub mod telemetry;
