//! Events other than HTTP requests that invoke functions: schedules (`cron`), read from the
//! functions' annotations in OpenFaaS's convention (`spec`).

pub mod cron;
pub mod spec;
