//! The command-line tools beside the server: each is a client of the server's modules (or of
//! its API), and none of the server's modules depends on them.
//!
//! * `demo`: the main job on the embedded default, scaled up under load;
//! * `conformance`: the OpenFaaS conformance kit, run against any gateway;
//! * `rules`: checks Prometheus rule files for the alerts faastastic acts on;
//! * `simulate`: replays a signal series through the engine (`policy simulate`).

pub mod conformance;
pub mod demo;
pub mod rules;
pub mod simulate;
