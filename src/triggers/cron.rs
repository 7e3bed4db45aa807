//! The cron trigger: invokes each function whose annotations ask for it (`topic:
//! cron-function` and `schedule`) when its schedule is due, once per due time: not once per
//! replica (the invocation goes through the gateway's routing, as an HTTP call does), not once
//! per datacenter unless the function asks for it (`com.faastastic.cron.every-datacenter`),
//! and never again after a restart (the due time is stored, with the run's record, before the
//! invocation starts). Due times that pass while faastastic is down are not run late: they are
//! recorded and logged as missed. A run still going when the next is due makes that one
//! skipped (unless `com.faastastic.cron.concurrency: allow`).
//!
//! Every due time leaves a trigger event (`GET /system/trigger-events`): `running`, then `ok`
//! or `failed` with the status and duration (`interrupted` when faastastic stopped first),
//! `skipped`, or `missed` with how many; and
//! `faastastic_trigger_runs_total{function_name,trigger,outcome}` counts them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use chrono::{DateTime, Utc};
use http::{Method, Request};
use serde_json::json;

use super::spec::{self, Concurrency, CronSpec, Schedule};
use crate::fleet::Fleet;
use crate::model::FunctionId;
use crate::proxy::Invoker;
use crate::store::{EventRecord, Store};
use crate::telemetry::Metrics;

/// The trigger's name in the store, the events and the metrics.
pub const TRIGGER: &str = "cron";

/// Due times counted one by one before the count is given as "at least".
const COUNT_CAP: u64 = 10_000;

/// The longest the scheduler sleeps before it looks at the deployed functions again.
const LOOK_AGAIN: Duration = Duration::from_secs(1);

/// Due times of a schedule that were not run.
#[derive(Debug, Clone, PartialEq)]
pub struct Missed {
    /// How many (at least this many when `COUNT_CAP` was reached).
    pub count: u64,
    pub first: DateTime<Utc>,
    pub last: DateTime<Utc>,
}

/// What is due for one function at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Due {
    /// The due time to run now, if any.
    pub run: Option<DateTime<Utc>>,
    /// Earlier due times passed without a run.
    pub missed: Option<Missed>,
    /// The first due time after those.
    pub next: Option<DateTime<Utc>>,
}

/// The due times of `schedule` from `first` (a due time) up to `until`, as (count, last):
/// counted one by one up to `COUNT_CAP` (then "at least"), the last found exactly.
fn due_until(
    schedule: &Schedule,
    first: DateTime<Utc>,
    until: DateTime<Utc>,
) -> (u64, DateTime<Utc>) {
    let (mut count, mut last) = (1, first);
    while count < COUNT_CAP {
        match schedule.next_after(last) {
            Some(t) if t <= until => {
                count += 1;
                last = t;
            }
            _ => return (count, last),
        }
    }
    // Too many to count (a per-second schedule over a long outage).
    let last = schedule.last_between(last, until).unwrap_or(last);
    (count, last)
}

/// Where a schedule stands when the scheduler first sees it at `now`: the due times after the
/// last one handled (stored before a restart) up to now were missed; the next is after now.
/// A schedule never handled starts now (an `@every` interval counts from now).
pub fn resume(schedule: &Schedule, last_handled: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Due {
    let missed = last_handled
        .and_then(|last| schedule.next_after(last))
        .filter(|first| *first <= now)
        .map(|first| {
            let (count, last) = due_until(schedule, first, now);
            Missed { count, first, last }
        });
    let next = match (schedule, &missed, last_handled) {
        // An interval keeps its phase across a restart.
        (Schedule::Every(_), Some(m), _) => schedule.next_after(m.last),
        (Schedule::Every(_), None, Some(last)) => schedule.next_after(last),
        _ => schedule.next_after(now),
    };
    Due {
        run: None,
        missed,
        next,
    }
}

/// At `now`, with `next` the first due time not handled yet: when it has come, the latest due
/// time up to now runs and any before it were missed (the scheduler woke late).
pub fn at(schedule: &Schedule, next: DateTime<Utc>, now: DateTime<Utc>) -> Due {
    if next > now {
        return Due {
            run: None,
            missed: None,
            next: Some(next),
        };
    }
    let (count, last) = due_until(schedule, next, now);
    let missed = (count > 1).then(|| {
        // The due time just before the one that runs.
        let mut before = next;
        while let Some(n) = schedule.next_after(before) {
            if n >= last {
                break;
            }
            before = n;
        }
        Missed {
            count: count - 1,
            first: next,
            last: before,
        }
    });
    Due {
        run: Some(last),
        missed,
        next: schedule.next_after(last),
    }
}

/// One function's schedule as the scheduler holds it.
struct Entry {
    spec: CronSpec,
    /// The annotations it was read from, to notice an update.
    source: (Option<String>, Option<String>, Option<String>),
    datacenters: Vec<String>,
    next: Option<DateTime<Utc>>,
    /// Runs in flight.
    running: Arc<AtomicUsize>,
}

/// A deployed function with a cron trigger, as one scan of the fleet sees it.
struct Found {
    id: FunctionId,
    deployed_at: DateTime<Utc>,
    source: (Option<String>, Option<String>, Option<String>),
    annotations: std::collections::BTreeMap<String, String>,
    datacenters: Vec<String>,
}

pub struct CronScheduler {
    fleet: Arc<Fleet>,
    invoker: Arc<Invoker>,
    store: Store,
    metrics: Arc<Metrics>,
    /// `[triggers.cron] enabled`: off, a leader only records the runs a previous process left
    /// unfinished as interrupted, and runs no schedule.
    enabled: bool,
}

impl CronScheduler {
    pub fn new(
        fleet: Arc<Fleet>,
        invoker: Arc<Invoker>,
        store: Store,
        metrics: Arc<Metrics>,
        enabled: bool,
    ) -> Arc<CronScheduler> {
        Arc::new(CronScheduler {
            fleet,
            invoker,
            store,
            metrics,
            enabled,
        })
    }

    /// Runs the scheduler until the process ends.
    pub fn spawn(self: Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move { self.run().await })
    }

    /// Schedules run on the leader only (one instance of several on a shared store): each
    /// term starts from what the store says ran last.
    async fn run(self: Arc<Self>) {
        let leader = self.fleet.leader().clone();
        let mut changes = leader.watch();
        let mut first = true;
        loop {
            if leader.is_leader() {
                self.lead(&leader, first).await;
                first = false;
            }
            if changes.changed().await.is_err() {
                return;
            }
        }
    }

    /// One term of leadership. The first of this process marks the runs still recorded as
    /// running as interrupted (on a shared store, a run of a leader that was replaced while
    /// still alive is marked too, and amended with its outcome when it ends).
    async fn lead(self: &Arc<Self>, leader: &crate::store::Leader, first: bool) {
        if first {
            match self.store.interrupt_trigger_runs().await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(
                    runs = n,
                    "cron: runs the previous process did not finish are recorded as interrupted"
                ),
                Err(e) => tracing::error!(error = %e, "cron: cannot mark unfinished runs"),
            }
        }
        if !self.enabled {
            return;
        }
        let mut handled: HashMap<FunctionId, DateTime<Utc>> = match self
            .store
            .trigger_due_times(TRIGGER)
            .await
        {
            Ok(rows) => rows.into_iter().collect(),
            Err(e) => {
                tracing::error!(error = %e, "cron: cannot read when schedules last ran; due times missed while faastastic was down are not reported");
                HashMap::new()
            }
        };
        let mut entries: HashMap<FunctionId, Entry> = HashMap::new();
        let mut invalid: HashMap<FunctionId, String> = HashMap::new();
        loop {
            if !leader.is_leader() {
                tracing::info!("cron: schedules stop here: this instance no longer leads");
                return;
            }
            let now = Utc::now();
            self.sync(&mut entries, &mut handled, &mut invalid, now)
                .await;
            for (id, entry) in entries.iter_mut() {
                let Some(next) = entry.next else { continue };
                let due = at(&entry.spec.schedule, next, now);
                entry.next = due.next;
                if let Some(run) = due.run {
                    // A term can end between two runs: none starts after it.
                    if !leader.is_leader() {
                        break;
                    }
                    self.fire(id, entry, run, due.missed).await;
                }
            }
            let wake = entries.values().filter_map(|e| e.next).min();
            let sleep = wake
                .map(|w| (w - Utc::now()).to_std().unwrap_or(Duration::ZERO))
                .unwrap_or(LOOK_AGAIN)
                .min(LOOK_AGAIN);
            tokio::time::sleep(sleep).await;
        }
    }

    /// Brings the schedules in line with the deployed functions: new ones resume (reporting
    /// what they missed while nothing ran them), updated ones start afresh, removed ones go.
    async fn sync(
        &self,
        entries: &mut HashMap<FunctionId, Entry>,
        handled: &mut HashMap<FunctionId, DateTime<Utc>>,
        invalid: &mut HashMap<FunctionId, String>,
        now: DateTime<Utc>,
    ) {
        let found = self.fleet.scan(|f, _| {
            let annotations = f.deployment.annotations.as_ref()?;
            if !spec::topics(annotations).any(|t| t == spec::CRON_TOPIC) {
                return None;
            }
            let get = |k: &str| annotations.get(k).cloned();
            Some(Found {
                id: f.id.clone(),
                deployed_at: f.created_at,
                source: (
                    get(spec::SCHEDULE),
                    get(spec::CRON_CONCURRENCY),
                    get(spec::CRON_EVERY_DATACENTER),
                ),
                annotations: annotations.clone(),
                datacenters: f.replicas.keys().cloned().collect(),
            })
        });
        let present: std::collections::HashSet<&FunctionId> = found.iter().map(|f| &f.id).collect();
        // A schedule removed (or its function deleted) is forgotten: added again later, it
        // starts afresh rather than reporting the time in between as missed.
        let dropped: Vec<FunctionId> = entries
            .keys()
            .filter(|id| !present.contains(id))
            .cloned()
            .collect();
        for id in dropped {
            entries.remove(&id);
            if let Err(e) = self.store.clear_trigger(&id, TRIGGER).await {
                tracing::warn!(function = %id, error = %e, "cron: cannot forget a removed schedule");
            }
        }
        invalid.retain(|id, _| present.contains(id));
        for f in &found {
            if let Some(entry) = entries.get_mut(&f.id) {
                entry.datacenters.clone_from(&f.datacenters);
                if entry.source == f.source {
                    continue;
                }
            }
            let spec = match spec::cron_spec(&f.annotations) {
                Some(Ok(spec)) => spec,
                Some(Err(errors)) => {
                    // Deploys check this; a function stored by an older version may not.
                    let text = errors.join("; ");
                    if invalid.get(&f.id) != Some(&text) {
                        tracing::warn!(function = %f.id, error = %text, "cron: the function's schedule cannot be read; it does not run until it is fixed");
                        invalid.insert(f.id.clone(), text);
                    }
                    entries.remove(&f.id);
                    continue;
                }
                None => continue,
            };
            invalid.remove(&f.id);
            let next = match entries.remove(&f.id) {
                // An update: the new schedule counts from now.
                Some(old) => {
                    let next = spec.schedule.next_after(now);
                    entries.insert(
                        f.id.clone(),
                        Entry {
                            spec,
                            source: f.source.clone(),
                            datacenters: f.datacenters.clone(),
                            next,
                            running: old.running,
                        },
                    );
                    continue;
                }
                None => {
                    // A due time stored before this deployment belongs to an earlier one.
                    let last = handled.remove(&f.id).filter(|t| *t >= f.deployed_at);
                    let due = resume(&spec.schedule, last, now);
                    if let Some(missed) = &due.missed {
                        self.missed(
                            &f.id,
                            &spec,
                            missed,
                            "no scheduler ran them (faastastic was not running, or cron was off)",
                        )
                        .await;
                    }
                    due.next
                }
            };
            tracing::info!(function = %f.id, schedule = %spec.text, next = ?next, "cron: scheduled");
            entries.insert(
                f.id.clone(),
                Entry {
                    spec,
                    source: f.source.clone(),
                    datacenters: f.datacenters.clone(),
                    next,
                    running: Arc::new(AtomicUsize::new(0)),
                },
            );
        }
    }

    fn event(
        id: &FunctionId,
        spec: &CronSpec,
        due: DateTime<Utc>,
        datacenter: &str,
    ) -> serde_json::Value {
        json!({
            "time": Utc::now(),
            "function": id.name,
            "namespace": id.namespace,
            "trigger": TRIGGER,
            "schedule": spec.text,
            "due": due,
            "datacenter": datacenter,
        })
    }

    async fn store_event(
        &self,
        id: &FunctionId,
        due: DateTime<Utc>,
        datacenter: &str,
        event: &serde_json::Value,
    ) -> Option<i64> {
        let record = EventRecord {
            at: Utc::now(),
            datacenter: datacenter.to_string(),
            json: event.to_string(),
        };
        match self.store.record_trigger(id, TRIGGER, due, record).await {
            Ok(row) => Some(row),
            Err(e) => {
                tracing::error!(function = %id, error = %e, "cron: cannot record a due time");
                None
            }
        }
    }

    fn count(&self, id: &FunctionId, outcome: &str, n: u64) {
        super::count(&self.metrics, id, TRIGGER, outcome, n);
    }

    async fn missed(&self, id: &FunctionId, spec: &CronSpec, missed: &Missed, why: &str) {
        let at_least = if missed.count >= COUNT_CAP {
            "at least "
        } else {
            ""
        };
        tracing::warn!(function = %id, count = missed.count, first = %missed.first, last = %missed.last, "cron: {at_least}{} due time(s) passed without a run: {why}", missed.count);
        let mut event = Self::event(id, spec, missed.last, "");
        event["outcome"] = json!("missed");
        event["missed"] = json!(missed.count);
        event["firstMissed"] = json!(missed.first);
        event["reason"] = json!(format!(
            "{at_least}{} due time(s) passed without a run: {why}",
            missed.count
        ));
        self.store_event(id, missed.last, "", &event).await;
        self.count(id, "missed", missed.count);
    }

    /// Handles the due time `due` of one function: skipped when a run is still going (and the
    /// function does not allow overlaps), else recorded and started.
    async fn fire(
        self: &Arc<Self>,
        id: &FunctionId,
        entry: &Entry,
        due: DateTime<Utc>,
        missed: Option<Missed>,
    ) {
        if let Some(m) = &missed {
            self.missed(id, &entry.spec, m, "the scheduler woke late")
                .await;
        }
        let still = entry.running.load(Ordering::Acquire);
        if entry.spec.concurrency == Concurrency::Skip && still > 0 {
            let mut event = Self::event(id, &entry.spec, due, "");
            event["outcome"] = json!("skipped");
            event["reason"] =
                json!("the previous run is still going (com.faastastic.cron.concurrency: skip)");
            self.store_event(id, due, "", &event).await;
            self.count(id, "skipped", 1);
            tracing::info!(function = %id, due = %due, "cron: skipped, the previous run is still going");
            return;
        }
        let targets: Vec<Option<String>> = if entry.spec.every_datacenter {
            entry.datacenters.iter().cloned().map(Some).collect()
        } else {
            vec![None]
        };
        for datacenter in targets {
            let dc = datacenter.as_deref().unwrap_or("");
            let mut event = Self::event(id, &entry.spec, due, dc);
            event["outcome"] = json!("running");
            let row = self.store_event(id, due, dc, &event).await;
            self.metrics
                .trigger_last_run
                .with_label_values(&[id.qualified().as_str(), TRIGGER])
                .set(due.timestamp() as f64);
            let (this, id, running) = (self.clone(), id.clone(), entry.running.clone());
            running.fetch_add(1, Ordering::AcqRel);
            tokio::spawn(async move {
                let _done = Running(running);
                this.invoke(&id, datacenter, due, row, event).await;
            });
        }
    }

    /// One run: an invocation as the OpenFaaS cron connector makes it (POST, empty body,
    /// `X-Topic: cron-function`), through the gateway's routing (it wakes a function at zero).
    async fn invoke(
        &self,
        id: &FunctionId,
        datacenter: Option<String>,
        due: DateTime<Utc>,
        row: Option<i64>,
        mut event: serde_json::Value,
    ) {
        let started = Instant::now();
        let mut request = Request::builder()
            .method(Method::POST)
            .uri("/")
            .header("x-topic", spec::CRON_TOPIC)
            .header("x-connector", "faastastic-cron")
            .header("x-cron-due", due.to_rfc3339());
        if let Some(dc) = &datacenter {
            request = request.header(crate::proxy::DATACENTER, dc.as_str());
        }
        let request = request.body(Body::empty()).expect("a valid request");
        // The answer's start is kept for the record of a failed run.
        let answer = super::invoke(&self.invoker, id, request, 64 * 1024).await;
        let status = answer.status;
        let outcome = if status.is_success() { "ok" } else { "failed" };
        event["outcome"] = json!(outcome);
        event["status"] = json!(status.as_u16());
        event["durationSeconds"] = json!(started.elapsed().as_secs_f64());
        if !status.is_success() {
            event["reason"] = json!(answer.start());
            tracing::warn!(function = %id, due = %due, status = status.as_u16(), "cron: the run failed");
        }
        self.count(id, outcome, 1);
        if let Some(row) = row {
            if let Err(e) = self.store.amend_trigger_event(row, event.to_string()).await {
                tracing::error!(function = %id, error = %e, "cron: cannot record a run's outcome");
            }
        }
    }
}

/// Counts a run in flight until it ends, however it ends.
struct Running(Arc<AtomicUsize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn every_5_minutes() -> Schedule {
        Schedule::parse("*/5 * * * *").unwrap()
    }

    #[test]
    fn a_first_schedule_waits_for_its_next_due_time() {
        let d = resume(&every_5_minutes(), None, t("2026-12-05T10:02:00Z"));
        assert_eq!(
            d,
            Due {
                run: None,
                missed: None,
                next: Some(t("2026-12-05T10:05:00Z"))
            }
        );
    }

    #[test]
    fn a_restart_in_the_same_due_time_does_not_run_it_again() {
        // 10:05 ran (and was stored); faastastic restarts at 10:05:30.
        let d = resume(
            &every_5_minutes(),
            Some(t("2026-12-05T10:05:00Z")),
            t("2026-12-05T10:05:30Z"),
        );
        assert_eq!(d.missed, None);
        assert_eq!(d.next, Some(t("2026-12-05T10:10:00Z")));
    }

    #[test]
    fn due_times_passed_while_down_are_missed_not_run() {
        // Last handled 10:05; down until 11:02: 10:10 ... 11:00 (11 of them) were missed.
        let d = resume(
            &every_5_minutes(),
            Some(t("2026-12-05T10:05:00Z")),
            t("2026-12-05T11:02:00Z"),
        );
        assert_eq!(d.run, None);
        assert_eq!(
            d.missed,
            Some(Missed {
                count: 11,
                first: t("2026-12-05T10:10:00Z"),
                last: t("2026-12-05T11:00:00Z")
            })
        );
        assert_eq!(d.next, Some(t("2026-12-05T11:05:00Z")));
        // A due time exactly at the restart counts as missed too: it is in the past by the
        // time anything could run it.
        let d = resume(
            &every_5_minutes(),
            Some(t("2026-12-05T10:05:00Z")),
            t("2026-12-05T10:10:00Z"),
        );
        assert_eq!(d.missed.map(|m| m.count), Some(1));
        assert_eq!(d.next, Some(t("2026-12-05T10:15:00Z")));
    }

    #[test]
    fn a_long_outage_of_a_per_second_schedule_is_counted_up_to_a_cap() {
        let s = Schedule::parse("* * * * * *").unwrap();
        let d = resume(
            &s,
            Some(t("2026-12-01T00:00:00Z")),
            t("2026-12-05T00:00:00Z"),
        );
        let m = d.missed.unwrap();
        assert_eq!(m.count, COUNT_CAP);
        assert_eq!(m.last, t("2026-12-05T00:00:00Z"));
        assert_eq!(d.next, Some(t("2026-12-05T00:00:01Z")));
    }

    #[test]
    fn a_long_outage_of_an_interval_ends_at_its_last_due_time() {
        // 30 hours of @every 10s: 10,800 due times, more than the cap counts.
        let s = Schedule::parse("@every 10s").unwrap();
        let d = resume(
            &s,
            Some(t("2026-12-04T10:00:00Z")),
            t("2026-12-05T16:00:05Z"),
        );
        let m = d.missed.unwrap();
        assert_eq!(m.count, COUNT_CAP);
        assert_eq!(m.last, t("2026-12-05T16:00:00Z"));
        assert_eq!(
            d.next,
            Some(t("2026-12-05T16:00:10Z")),
            "nothing from the outage runs"
        );
    }

    #[test]
    fn an_interval_keeps_its_phase_across_a_restart() {
        let s = Schedule::parse("@every 10s").unwrap();
        // Never run: the first is 10 s from now.
        assert_eq!(
            resume(&s, None, t("2026-12-05T10:00:03Z")).next,
            Some(t("2026-12-05T10:00:13Z"))
        );
        // Last handled 10:00:00, back at 10:00:25: 10 and 20 were missed, 30 is next.
        let d = resume(
            &s,
            Some(t("2026-12-05T10:00:00Z")),
            t("2026-12-05T10:00:25Z"),
        );
        assert_eq!(d.missed.map(|m| m.count), Some(2));
        assert_eq!(d.next, Some(t("2026-12-05T10:00:30Z")));
        // Back at 10:00:05: nothing missed, 10 is next.
        let d = resume(
            &s,
            Some(t("2026-12-05T10:00:00Z")),
            t("2026-12-05T10:00:05Z"),
        );
        assert_eq!((d.missed, d.next), (None, Some(t("2026-12-05T10:00:10Z"))));
    }

    #[test]
    fn on_time_the_due_time_runs_once_and_a_late_wake_runs_only_the_latest() {
        let s = every_5_minutes();
        let early = at(&s, t("2026-12-05T10:05:00Z"), t("2026-12-05T10:04:59Z"));
        assert_eq!(
            early,
            Due {
                run: None,
                missed: None,
                next: Some(t("2026-12-05T10:05:00Z"))
            }
        );
        let on_time = at(&s, t("2026-12-05T10:05:00Z"), t("2026-12-05T10:05:00.2Z"));
        assert_eq!(
            on_time,
            Due {
                run: Some(t("2026-12-05T10:05:00Z")),
                missed: None,
                next: Some(t("2026-12-05T10:10:00Z"))
            }
        );
        // Woken at 10:21: 10:05 and 10:10 and 10:15 passed, 10:20 runs.
        let late = at(&s, t("2026-12-05T10:05:00Z"), t("2026-12-05T10:21:00Z"));
        assert_eq!(late.run, Some(t("2026-12-05T10:20:00Z")));
        assert_eq!(
            late.missed,
            Some(Missed {
                count: 3,
                first: t("2026-12-05T10:05:00Z"),
                last: t("2026-12-05T10:15:00Z")
            })
        );
        assert_eq!(late.next, Some(t("2026-12-05T10:25:00Z")));
        let one_late = at(&s, t("2026-12-05T10:05:00Z"), t("2026-12-05T10:11:00Z"));
        assert_eq!(
            one_late.missed,
            Some(Missed {
                count: 1,
                first: t("2026-12-05T10:05:00Z"),
                last: t("2026-12-05T10:05:00Z")
            })
        );
    }
}
