//! Query policies: every `interval`, read one metric for all matching functions (one PromQL
//! query for all of them, or faastastic's own counters), turn each value into a desired count
//! with the policy's strategy, and feed it to the same engine and executor as alerts.
//! An unreachable source holds (no scale), is recorded once per outage, and shows in
//! `faastastic_policy_source_up`; `fallback_replicas` applies after three failed reads.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::executor::{Autoscaler, Verdict};
use super::policy::{Action, Input, Track, BURST_FACTOR};
use super::rates::RateWindow;
use super::strategy::{desired, Strategy, Want};
use crate::config::{PrometheusConfig, QueryPolicy, QuerySource};
use crate::error_chain;
use crate::fleet::Fleet;
use crate::model::FunctionId;
use crate::telemetry::Metrics;
use chrono::{DateTime, Utc};

/// A query result: per function, a value for the whole function and/or per datacenter.
pub type Values = HashMap<FunctionId, FunctionValues>;

#[derive(Debug, Default, Clone)]
pub struct FunctionValues {
    /// A series without a datacenter label.
    pub total: Option<f64>,
    pub by_datacenter: HashMap<String, f64>,
}

impl FunctionValues {
    pub fn set(&mut self, datacenter: Option<String>, value: f64) {
        match datacenter {
            Some(dc) => {
                self.by_datacenter.insert(dc, value);
            }
            None => self.total = Some(value),
        }
    }
}

/// Messages waiting for each function, from a message source (NATS JetStream): pending on its
/// subjects plus delivered and not yet acknowledged, as one value for the whole function.
#[async_trait::async_trait]
pub trait Backlog: Send + Sync {
    async fn backlog(&self) -> Result<Values, String>;
}

/// A read of the policy's source, running beside the loop.
type SourceRead = futures::future::BoxFuture<'static, Result<Values, String>>;

/// Failed reads in a row before `fallback_replicas` applies.
const FALLBACK_AFTER_FAILURES: u32 = 3;

/// How often a policy with a short window samples faastastic's counters and reads it (the
/// policy's own source is still read every `interval`).
pub const SHORT_TICK: Duration = Duration::from_millis(500);

struct Runner {
    policy: QueryPolicy,
    prometheus: Option<prometheus_http_query::Client>,
    backlog: Option<Arc<dyn Backlog>>,
    timeout: Duration,
    fleet: Arc<Fleet>,
    autoscaler: Arc<Autoscaler>,
    metrics: Arc<Metrics>,
    /// Internal source: samples of faastastic's own counters covering its window, taken at
    /// every read.
    samples: RateWindow<(String, String)>,
    /// Short window: samples of the same counters taken at every tick.
    recent: RateWindow<(String, String)>,
    /// Turns per read of the source (1 without a short window).
    per_read: u32,
    /// Turns taken so far.
    turns: u64,
    /// The short window's latest reading.
    short: Option<Values>,
    /// When the policy's window last found each function's running count enough.
    enough: Enough,
    failures: u32,
    up: bool,
}

/// The HTTP client for Prometheus: timeout, credentials and TLS trust from `[prometheus]`.
fn http_client(p: &PrometheusConfig) -> anyhow::Result<reqwest::Client> {
    use anyhow::Context;
    let read = |key: &str, path: &std::path::Path| -> anyhow::Result<String> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("prometheus.{key}: cannot read {}", path.display()))?;
        anyhow::ensure!(
            !text.trim().is_empty(),
            "prometheus.{key}: {} is empty",
            path.display()
        );
        Ok(text.trim().to_string())
    };
    let mut headers = reqwest::header::HeaderMap::new();
    let authorization = if let Some(path) = &p.bearer_token_file {
        Some(format!("Bearer {}", read("bearer_token_file", path)?))
    } else if let (Some(user), Some(path)) = (&p.basic_auth_user, &p.basic_auth_password_file) {
        use base64::Engine;
        let password = read("basic_auth_password_file", path)?;
        Some(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        ))
    } else {
        None
    };
    if let Some(value) = authorization {
        let mut value = reqwest::header::HeaderValue::from_str(&value)
            .context("prometheus: the credentials are not a valid header value")?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    let mut builder = reqwest::Client::builder()
        .timeout(p.timeout)
        .default_headers(headers)
        .danger_accept_invalid_certs(p.insecure_skip_verify);
    if let Some(path) = &p.ca_file {
        let pem = std::fs::read(path)
            .with_context(|| format!("prometheus.ca_file: cannot read {}", path.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("prometheus.ca_file: {} is not PEM", path.display()))?;
        anyhow::ensure!(
            !certs.is_empty(),
            "prometheus.ca_file: {} holds no certificate",
            path.display()
        );
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    Ok(builder.build()?)
}

/// Starts one evaluation loop per query policy.
pub fn spawn_all(
    policies: &[QueryPolicy],
    prometheus: &PrometheusConfig,
    backlog: Option<Arc<dyn Backlog>>,
    fleet: Arc<Fleet>,
    autoscaler: Arc<Autoscaler>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    for policy in policies {
        let client = match (&policy.source, &prometheus.url) {
            (QuerySource::Prometheus { .. }, Some(url)) => Some(
                prometheus_http_query::Client::from(http_client(prometheus)?, url)?,
            ),
            _ => None,
        };
        let source = match &policy.source {
            QuerySource::Prometheus { query } => format!("Prometheus query {query:?}"),
            QuerySource::Internal { window } => {
                format!("internal invocation rate over {}s", window.as_secs_f64())
            }
            QuerySource::Nats => "NATS JetStream backlog of each function's subjects".to_string(),
        };
        tracing::info!(policy = %policy.name, "query policy: {source}, {}, every {:?}", policy.strategy, policy.interval);
        // At zero from the start, so rate() and absent() work before the first failure.
        metrics
            .source_errors
            .with_label_values(&[policy.name.as_str()]);
        let own = match policy.source {
            QuerySource::Internal { window } => window,
            QuerySource::Prometheus { .. } | QuerySource::Nats => Duration::ZERO,
        };
        // The short window is read at least every SHORT_TICK, in ticks that divide the
        // interval, so that the source is read exactly every `interval`.
        let per_read = match policy.short_window {
            Some(_) => policy
                .interval
                .as_nanos()
                .div_ceil(SHORT_TICK.as_nanos())
                .clamp(1, u32::MAX as u128) as u32,
            None => 1,
        };
        let tick = policy.interval / per_read;
        match policy.short_window {
            Some(short) => {
                tracing::info!(policy = %policy.name, "query policy: a burst starts when faastastic's own counters over the last {}s ask for at least {BURST_FACTOR}x the running replicas (read every {tick:?})", short.as_secs_f64())
            }
            None if matches!(
                policy.strategy,
                Strategy::Target {
                    per_replica: false,
                    ..
                }
            ) =>
            {
                tracing::info!(policy = %policy.name, "query policy: no short window (the query is not sum by (...) (rate(gateway_function_invocation_total[...])); set short_window_secs if its value is invocations per second)")
            }
            None => {}
        }
        let mut runner = Runner {
            policy: policy.clone(),
            prometheus: client,
            backlog: backlog.clone(),
            timeout: prometheus.timeout,
            fleet: fleet.clone(),
            autoscaler: autoscaler.clone(),
            metrics: metrics.clone(),
            samples: RateWindow::new(own),
            recent: RateWindow::new(policy.short_window.unwrap_or_default()),
            per_read,
            turns: 0,
            short: None,
            enough: Enough::default(),
            failures: 0,
            up: true,
        };
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(tick);
            // A slow turn skips ticks rather than piling turns up.
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            // A Prometheus read in flight: the short window goes on being read meanwhile, and
            // a read is not started while one is in flight.
            let mut pending: Option<tokio::task::JoinHandle<Result<Values, String>>> = None;
            loop {
                tokio::select! {
                    _ = interval.tick() => {
                        if let Some(read) = runner.turn(pending.is_none()).await {
                            pending = Some(tokio::spawn(read));
                        }
                    }
                    done = async { pending.as_mut().expect("checked").await }, if pending.is_some() => {
                        pending = None;
                        let values = done.unwrap_or_else(|e| Err(format!("the read failed: {e}")));
                        runner.apply_read(values).await;
                    }
                }
            }
        });
    }
    Ok(())
}

/// A Prometheus read, owning what it needs so that it runs beside the loop.
struct PrometheusRead {
    client: prometheus_http_query::Client,
    query: String,
    timeout: Duration,
    function_label: String,
    datacenter_label: String,
    namespace: String,
}

impl PrometheusRead {
    /// Values per function and datacenter (`None`: a series for the whole function), or why
    /// there are none.
    async fn run(self) -> Result<Values, String> {
        let ask = self
            .client
            .query(&self.query)
            .timeout(self.timeout.as_millis() as i64)
            .get();
        let result = tokio::time::timeout(self.timeout, ask)
            .await
            .map_err(|_| format!("Prometheus did not answer within {:?}", self.timeout))?
            .map_err(|e| format!("Prometheus query failed: {}", error_chain(&e)))?;
        let vector = result
            .data()
            .as_vector()
            .ok_or("the query must return an instant vector (one series per function)")?;
        let mut out = Values::new();
        for series in vector {
            let labels = series.metric();
            let Some(function) = labels.get(&self.function_label) else {
                continue;
            };
            let dc = labels.get(&self.datacenter_label).cloned();
            let id = FunctionId::from_qualified(function, &self.namespace);
            out.entry(id).or_default().set(dc, series.sample().value());
        }
        Ok(out)
    }
}

/// Invocations per second in each datacenter with invocations in the window of `samples`:
/// what the short window reads (it only ever asks for more, so the others need no value).
fn loaded_rates(fleet: &Fleet, samples: &RateWindow<(String, String)>) -> Values {
    let mut out = Values::new();
    for key in samples.changed() {
        if let Some(rate) = samples.rate(key).filter(|r| *r > 0.0) {
            let id = FunctionId::from_qualified(&key.0, fleet.default_namespace());
            out.entry(id).or_default().set(Some(key.1.clone()), rate);
        }
    }
    out
}

/// Invocations per second in each datacenter over the window of `samples`, from faastastic's
/// own counters; a function never invoked reads as 0, and every function reads NaN (no data)
/// until two samples exist.
fn own_rates(fleet: &Fleet, samples: &RateWindow<(String, String)>) -> Values {
    let invoked: std::collections::HashSet<&str> = samples
        .latest_keys()
        .map(|(name, _)| name.as_str())
        .collect();
    fleet
        .scan(|f, _| {
            let name = f.id.qualified();
            // Never invoked and at zero everywhere: it reads 0 at 0 replicas, which
            // changes nothing (not worth a value per datacenter at 10,000 functions).
            if f.replicas.values().all(|n| *n == 0) && !invoked.contains(name.as_str()) {
                return None;
            }
            let mut v = FunctionValues::default();
            for dc in f.replicas.keys() {
                let rate = samples
                    .rate(&(name.clone(), dc.clone()))
                    .unwrap_or(f64::NAN);
                v.set(Some(dc.clone()), rate);
            }
            Some((f.id.clone(), v))
        })
        .into_iter()
        .collect()
}

impl Runner {
    /// One turn of the loop: samples the counters and applies the short window; every
    /// `per_read` turns, reads the source: the internal one at once, Prometheus through the
    /// read this returns, to run beside the loop (not while `may_read` is false: one is in
    /// flight).
    async fn turn(&mut self, may_read: bool) -> Option<SourceRead> {
        // Query policies are the leader's to run (one instance of several on a shared store).
        if !self.fleet.leader().is_leader() {
            return None;
        }
        let now = Instant::now();
        let due = self.turns.is_multiple_of(u64::from(self.per_read)) && may_read;
        self.turns += 1;
        // The counters, sampled once, for the internal source's window when it is read and
        // for the short window.
        let own = matches!(self.policy.source, QuerySource::Internal { .. }) && due;
        let short = self.policy.short_window.is_some();
        if own || short {
            let counts = self.metrics.invocation_counts_by_datacenter();
            match (own, short) {
                (true, true) => {
                    self.samples.push(now, counts.clone());
                    self.recent.push(now, counts);
                }
                (true, false) => self.samples.push(now, counts),
                _ => self.recent.push(now, counts),
            }
        }
        if short {
            self.short = Some(loaded_rates(&self.fleet, &self.recent));
        }
        if !due {
            self.apply_short().await;
            return None;
        }
        let missing = match (&self.policy.source, &self.prometheus, &self.backlog) {
            (QuerySource::Internal { .. }, _, _) => {
                let values = own_rates(&self.fleet, &self.samples);
                self.apply_read(Ok(values)).await;
                return None;
            }
            (QuerySource::Prometheus { query }, Some(client), _) => {
                let read = PrometheusRead {
                    client: client.clone(),
                    query: query.clone(),
                    timeout: self.timeout,
                    function_label: self.policy.function_label.clone(),
                    datacenter_label: self.policy.datacenter_label.clone(),
                    namespace: self.fleet.default_namespace().to_string(),
                };
                self.apply_short().await;
                return Some(Box::pin(read.run()));
            }
            (QuerySource::Nats, _, Some(backlog)) => {
                let backlog = backlog.clone();
                self.apply_short().await;
                return Some(Box::pin(async move { backlog.backlog().await }));
            }
            (QuerySource::Prometheus { .. }, None, _) => "no Prometheus configured",
            (QuerySource::Nats, _, None) => "no [triggers.nats] configured",
        };
        self.apply_read(Err(missing.into())).await;
        None
    }

    /// The short window alone, between reads of the source.
    async fn apply_short(&mut self) {
        if let Some(short) = &self.short {
            apply_values(
                &self.policy,
                None,
                Some(short),
                &mut self.enough,
                &self.fleet,
                &self.autoscaler,
            )
            .await;
        }
    }

    /// What a read of the source gave, with the short window's latest reading.
    async fn apply_read(&mut self, values: Result<Values, String>) {
        let started = Instant::now();
        self.read_and_apply(values).await;
        self.metrics.evaluated(&source_name(&self.policy), started);
    }

    async fn read_and_apply(&mut self, values: Result<Values, String>) {
        let source = source_name(&self.policy);
        let values = match values {
            Ok(v) => {
                self.metrics
                    .source_up
                    .with_label_values(&[self.policy.name.as_str()])
                    .set(1);
                self.failures = 0;
                if !self.up {
                    self.up = true;
                    self.autoscaler
                        .record_source_event(
                            &source,
                            Verdict::SourceRecovered,
                            format!("{source}: the metric source answers again; scaling resumes"),
                            json!({}),
                        )
                        .await;
                }
                v
            }
            Err(e) => {
                self.metrics
                    .source_up
                    .with_label_values(&[self.policy.name.as_str()])
                    .set(0);
                self.metrics
                    .source_errors
                    .with_label_values(&[self.policy.name.as_str()])
                    .inc();
                self.failures += 1;
                if self.up {
                    self.up = false;
                    let reason = format!(
                        "{source}: source unavailable, holding the functions it drives: {e}"
                    );
                    self.autoscaler
                        .record_source_event(
                            &source,
                            Verdict::SourceUnavailable,
                            reason,
                            json!({"error": e}),
                        )
                        .await;
                }
                if let Some(fallback) = self.policy.fallback_replicas {
                    if self.failures >= FALLBACK_AFTER_FAILURES {
                        let work = collect(
                            &self.policy,
                            &self.fleet,
                            |_, _, _, _, _| {
                                Some(Proposal {
                                    action: Action::To(fallback),
                                    why: format!(
                                        "source unavailable: fallback_replicas {fallback}"
                                    ),
                                    evidence: json!({"value": f64::NAN}),
                                    enough: false,
                                })
                            },
                            None,
                        );
                        execute(&self.policy, &self.autoscaler, work).await;
                    }
                }
                return;
            }
        };
        apply_values(
            &self.policy,
            Some(&values),
            self.short.as_ref(),
            &mut self.enough,
            &self.fleet,
            &self.autoscaler,
        )
        .await;
    }
}

/// The source a policy's decisions and events name: `query:NAME`.
fn source_name(policy: &QueryPolicy) -> String {
    format!("query:{}", policy.name)
}

/// What a policy read for one function in one datacenter: its source's value (when read this
/// time) and the short window's.
#[derive(Debug, Clone, Copy)]
pub struct Reading {
    pub value: Option<f64>,
    pub short_value: Option<f64>,
    pub short_window: Option<Duration>,
    /// When the policy's window last found the running count enough, and that count (see
    /// `Track::enough_at`).
    pub enough_at: Option<(DateTime<Utc>, u64)>,
    /// Now, on the autoscaler's clock.
    pub now: DateTime<Utc>,
}

/// What a reading gives the engine.
#[derive(Debug, Clone)]
pub enum Read {
    /// Nothing to decide: no value, or a threshold between its bounds.
    Nothing,
    /// The policy's window finds the running count enough (within the target's tolerance)
    /// and the short window asks for no more: remembered by the caller, not sent.
    Enough,
    /// An input for the engine.
    Propose(Proposal),
}

#[derive(Debug, Clone)]
pub struct Proposal {
    pub action: Action,
    /// The values against the strategy, in words.
    pub why: String,
    pub evidence: serde_json::Value,
    /// The policy's window found the running count enough (the short window asks for more).
    pub enough: bool,
}

impl Reading {
    /// The engine's input for this reading: a target strategy tracks (`Track`), the others
    /// ask for a count. `recent` reads faastastic's own invocation rate over its longer window,
    /// the floor of a scale-down (asked only for one, by a policy with a short window).
    pub fn action(
        &self,
        strategy: &Strategy,
        replicas: crate::platform::ReplicaCounts,
        max: u64,
        recent: impl FnOnce() -> Option<f64>,
    ) -> Read {
        let current = replicas.desired;
        let tracking = matches!(strategy, Strategy::Target { .. });
        let (stable, enough, mut why) =
            match self.value.map(|v| desired(strategy, replicas, v, max)) {
                // Zero stays zero (the engine would say so): not worth a decision per function.
                Some(Want::Replicas(0, why)) if current == 0 => (None, false, why),
                Some(Want::Replicas(n, why)) => (Some(n), false, why),
                // Within the tolerance: enough. No data (NaN) says nothing.
                Some(Want::Hold(why)) => {
                    let finite = self.value.is_some_and(f64::is_finite);
                    (None, tracking && current > 0 && finite, why)
                }
                None => (None, false, String::new()),
            };
        let window = self.short_window.unwrap_or_default().as_secs_f64();
        // The short window's load, when it asks for more than runs.
        let short = match (strategy, self.short_value) {
            (Strategy::Target { target, .. }, Some(v)) if v.is_finite() => {
                let load = v.max(0.0) / target;
                match desired(strategy, replicas, v, max) {
                    Want::Replicas(n, short_why) if n > current => {
                        if !why.is_empty() {
                            why.push_str("; ");
                        }
                        why.push_str(&format!("over the last {window}s: {short_why}"));
                        Some(load)
                    }
                    _ => None,
                }
            }
            _ => None,
        };
        let enough_at = match enough {
            true => Some((self.now, current)),
            false => self.enough_at,
        };
        let action = match (tracking, stable, short) {
            (_, None, None) if enough => return Read::Enough,
            (_, None, None) => return Read::Nothing,
            (true, stable, short) => Action::Track(Track {
                stable,
                short,
                // Only where the value is invocations per second: the policies with a short
                // window (an average per replica, a CPU, is another unit).
                recent: match (strategy, stable, self.short_window) {
                    (Strategy::Target { target, .. }, Some(n), Some(_)) if n < current => recent()
                        .filter(|r| r.is_finite())
                        .map(|r| r.max(0.0) / target),
                    _ => None,
                },
                enough_at,
            }),
            (false, Some(n), _) => Action::To(n),
            (false, None, Some(_)) => return Read::Nothing,
        };
        let mut evidence = json!({"value": self.value.unwrap_or(f64::NAN)});
        if let Some(v) = self.short_value.filter(|_| short.is_some()) {
            evidence["short_value"] = json!(v);
            evidence["short_window_secs"] = json!(window);
        }
        Read::Propose(Proposal {
            action,
            why,
            evidence,
            enough,
        })
    }
}

/// Per function and datacenter, when a target policy's window last found the running count
/// enough, and that count (`Track::enough_at`), with the evaluation that last saw the pair.
#[derive(Debug, Default)]
pub struct Enough {
    at: HashMap<FunctionId, HashMap<String, EnoughAt, FastHash>, FastHash>,
    evaluation: u64,
}

type FastHash = foldhash::fast::RandomState;

/// (when, the count, the evaluation that last saw the pair)
type EnoughAt = (DateTime<Utc>, u64, u64);

impl Enough {
    /// Runs `read` with the pair's last reading, marks the pair as seen by this evaluation
    /// and keeps the new reading `read` returns, if any.
    fn with<T>(
        &mut self,
        id: &FunctionId,
        dc: &str,
        read: impl FnOnce(Option<(DateTime<Utc>, u64)>) -> (T, Option<(DateTime<Utc>, u64)>),
    ) -> T {
        let seen = self.evaluation;
        if let Some(slot) = self.at.get_mut(id).and_then(|dcs| dcs.get_mut(dc)) {
            let (out, found) = read(Some((slot.0, slot.1)));
            slot.2 = seen;
            if let Some((at, n)) = found {
                (slot.0, slot.1) = (at, n);
            }
            return out;
        }
        let (out, found) = read(None);
        if let Some((at, n)) = found {
            self.at
                .entry(id.clone())
                .or_default()
                .insert(dc.to_string(), (at, n, seen));
        }
        out
    }

    /// Forgets the pairs the last evaluation did not see (deleted, moved, or no longer matched).
    fn sweep(&mut self) {
        let seen = self.evaluation;
        self.at.retain(|_, dcs| {
            dcs.retain(|_, slot| slot.2 == seen);
            !dcs.is_empty()
        });
        self.evaluation += 1;
    }
}

/// One evaluation of a policy from values already read (`stable`: its source, when read this
/// time; `short`: its short window): each matching function's value in each of its
/// datacenters goes through the strategy, and changes go to the executor. `enough` is kept
/// from one evaluation to the next.
pub async fn apply_values(
    policy: &QueryPolicy,
    stable: Option<&Values>,
    short: Option<&Values>,
    enough: &mut Enough,
    fleet: &Fleet,
    autoscaler: &Autoscaler,
) {
    let strategy = &policy.strategy;
    let base_max = autoscaler.config().base_policy().max;
    // A value for the whole function is shared equally by its datacenters, unless it is
    // already an average per replica (or compared with thresholds as it is).
    let shared = matches!(
        strategy,
        Strategy::Target {
            per_replica: false,
            ..
        }
    );
    let now = autoscaler.now();
    let memory = std::cell::RefCell::new(enough);
    let value_in = |values: Option<&Values>, id: &FunctionId, dc: &str, share_of: usize| {
        let v = values?.get(id)?;
        match v.by_datacenter.get(dc) {
            Some(v) => Some(*v),
            None if shared => Some(v.total? / share_of as f64),
            None => v.total,
        }
    };
    let want = |id: &FunctionId,
                dc: &str,
                share_of: usize,
                current: u64,
                function_policy: &crate::fleet::PolicyOf| {
        // Only threshold steps in percent need the function's max: its stored policy's.
        let max = match (strategy, function_policy) {
            (Strategy::Threshold { .. }, Ok((p, _))) => p.max,
            _ => base_max,
        };
        let replicas = crate::platform::ReplicaCounts {
            desired: current,
            ready: fleet.ready_in(id, dc),
        };
        memory.borrow_mut().with(id, dc, |enough_at| {
            let read = Reading {
                value: value_in(stable, id, dc, share_of),
                short_value: value_in(short, id, dc, share_of),
                short_window: policy.short_window,
                enough_at,
                now,
            };
            let recent = || autoscaler.own_rate(id, dc);
            match read.action(strategy, replicas, max, recent) {
                Read::Propose(p) => {
                    let found = p.enough.then_some((now, current));
                    (Some(p), found)
                }
                Read::Enough => (None, Some((now, current))),
                Read::Nothing => (None, None),
            }
        })
    };
    // Between reads only the functions the short window saw are visited; a read visits
    // every function, and forgets the steady readings of those it no longer sees.
    let only = stable.is_none().then_some(short).flatten();
    let work = collect(policy, fleet, want, only);
    if stable.is_some() {
        memory.into_inner().sweep();
    }
    execute(policy, autoscaler, work).await;
}

/// The engine inputs of one evaluation: (function, datacenter, action, evidence).
type Work = Vec<(FunctionId, String, Action, serde_json::Value)>;

/// What `want(function, datacenter, datacenters it runs in, current replicas there, its
/// policy)` proposes for every function the policy matches (of those in `only`, when given),
/// in each of its datacenters. The functions are read in place; only the proposals
/// are collected.
fn collect<F>(policy: &QueryPolicy, fleet: &Fleet, want: F, only: Option<&Values>) -> Work
where
    F: Fn(&FunctionId, &str, usize, u64, &crate::fleet::PolicyOf) -> Option<Proposal>,
{
    let query = match &policy.source {
        QuerySource::Prometheus { query } => query.as_str(),
        QuerySource::Internal { .. } => "internal invocation rate",
        QuerySource::Nats => "NATS backlog",
    };
    let mut work = Vec::new();
    let visit = |f: &crate::model::Function, function_policy: &crate::fleet::PolicyOf| {
        if !policy.pattern.matches(&f.id.qualified()) {
            return None::<()>;
        }
        for (dc, current) in &f.replicas {
            if let Some(p) = want(&f.id, dc, f.replicas.len(), *current, function_policy) {
                let mut evidence = p.evidence;
                evidence["policy"] = json!(policy.name);
                evidence["query"] = json!(query);
                evidence["why"] = json!(p.why);
                work.push((f.id.clone(), dc.clone(), p.action, evidence));
            }
        }
        None::<()>
    };
    match only {
        Some(values) => fleet.scan_ids(values.keys(), visit),
        None => fleet.scan(visit),
    };
    work
}

/// Runs an evaluation's inputs through the executor, as periodic (quiet) decisions.
async fn execute(policy: &QueryPolicy, autoscaler: &Autoscaler, work: Work) {
    let source = source_name(policy);
    futures::future::join_all(work.into_iter().map(|(id, dc, action, evidence)| {
        let source = source.clone();
        async move {
            let input = Input::Signal {
                action,
                dedupe_key: None,
                observed_rate: None,
            };
            autoscaler
                .apply(&id, &dc, input, &source, evidence, true)
                .await
        }
    }))
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::ReplicaCounts;

    fn target(per_replica: bool) -> Strategy {
        Strategy::Target {
            target: 10.0,
            per_replica,
            tolerance: 0.1,
        }
    }

    fn reading(value: Option<f64>, short: Option<f64>, window: bool) -> Reading {
        Reading {
            value,
            short_value: short,
            short_window: window.then_some(crate::config::SHORT_WINDOW),
            enough_at: None,
            now: chrono::Utc::now(),
        }
    }

    fn track(read: Read) -> Track {
        match read {
            Read::Propose(Proposal {
                action: Action::Track(t),
                ..
            }) => t,
            other => panic!("not a tracking proposal: {other:?}"),
        }
    }

    /// What a reading hands the engine: a steady reading is kept, not sent; no data is not
    /// steady; the short window comes along only when it asks for more; the counters' floor
    /// only with a scale-down, and only where the value is an invocation rate.
    #[test]
    fn a_reading_sends_only_what_the_engine_needs() {
        let at = |n| ReplicaCounts {
            desired: n,
            ready: n,
        };
        let never = || -> Option<f64> { panic!("the floor was not needed") };
        let strategy = target(false);
        let steady = reading(Some(39.0), Some(41.0), true).action(&strategy, at(4), 10, never);
        assert!(matches!(steady, Read::Enough), "{steady:?}");
        let no_data = reading(Some(f64::NAN), None, true).action(&strategy, at(4), 10, never);
        assert!(matches!(no_data, Read::Nothing), "{no_data:?}");
        let burst = track(reading(None, Some(80.0), true).action(&strategy, at(2), 10, never));
        assert_eq!((burst.stable, burst.short), (None, Some(8.0)));
        // A scale-down carries the floor of faastastic's own counters...
        let down =
            reading(Some(12.0), Some(35.0), true).action(&strategy, at(4), 10, || Some(33.0));
        let down = track(down);
        assert_eq!(
            (down.stable, down.short, down.recent),
            (Some(2), None, Some(3.3))
        );
        // ... but not for a value in another unit (no short window: an average per replica).
        let other = reading(Some(1.2), None, false).action(&target(true), at(4), 10, never);
        assert_eq!(track(other).recent, None);
        // A steady reading rides on the next one.
        let mut later = reading(Some(12.0), None, true);
        let then = chrono::Utc::now();
        later.enough_at = Some((then, 4));
        let carried = track(later.action(&strategy, at(4), 10, || None));
        assert_eq!(carried.enough_at, Some((then, 4)));
    }
}
