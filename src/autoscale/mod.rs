//! Autoscaling: signals (Alertmanager alerts, ticks) become decisions of the pure policy engine,
//! which the executor applies through the fleet and records as scale events.

pub mod alertmanager;
pub mod clock;
pub mod executor;
pub mod follow;
pub mod labels;
pub mod policy;
pub mod query;
pub mod rates;
pub mod strategy;
#[cfg(test)]
mod timeline_tests;
