//! Events other than HTTP requests that invoke functions: schedules (`cron`) and NATS
//! JetStream messages (`nats`), asked for by the functions' annotations in OpenFaaS's
//! convention (`spec`).

pub mod cron;
pub mod nats;
pub mod spec;
