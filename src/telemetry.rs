//! Prometheus metrics (OpenFaaS gateway names and labels, plus faastastic's own) and tracing setup.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::fleet::FunctionView;

const INVOCATION_TOTAL: &str = "gateway_function_invocation_total";
const INVOCATION_TOTAL_HELP: &str =
    "Function invocations, by function, HTTP status code and datacenter";

/// Invocations per function, then datacenter (read on every invocation: a fast hasher).
type Totals = HashMap<String, HashMap<String, Arc<AtomicU64>, FastHash>, FastHash>;
type FastHash = foldhash::fast::RandomState;

/// The series of one function, status code and datacenter (see [`Metrics::invocation`]).
#[derive(Clone)]
pub struct Invocation {
    total: prometheus::IntCounter,
    seconds: prometheus::Histogram,
    count: Arc<AtomicU64>,
}

impl Invocation {
    /// Counts one invocation that took `seconds`.
    pub fn record(&self, seconds: f64) {
        self.total.inc();
        self.seconds.observe(seconds);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

pub struct Metrics {
    registry: Registry,
    /// `gateway_function_invocation_total{function_name,code,datacenter}` (OpenFaaS's labels
    /// plus the datacenter that served it)
    pub invocation_total: IntCounterVec,
    /// `gateway_functions_seconds{function_name,code,datacenter}`
    pub functions_seconds: HistogramVec,
    /// `gateway_function_invocation_started{function_name}`
    pub invocation_started: IntCounterVec,
    /// `faastastic_replica_restarts_total{function_name,datacenter}`
    pub replica_restarts: IntCounterVec,
    /// `faastastic_upstream_protocol_errors_total{function_name,datacenter,cause}`: replica
    /// answers refused because they broke HTTP/1.1's framing or grammar.
    pub upstream_protocol_errors: IntCounterVec,
    /// `faastastic_async_queue_depth`
    pub async_queue_depth: prometheus::IntGauge,
    /// `faastastic_scale_decisions_total{function_name,datacenter,direction,outcome}`
    pub scale_decisions: IntCounterVec,
    /// `faastastic_proxy_waiting_requests`: invocations held until a replica is ready.
    pub waiting_requests: prometheus::IntGauge,
    /// `faastastic_policy_source_up{policy}`: 1 when a query policy's last read worked.
    pub source_up: IntGaugeVec,
    /// `faastastic_datacenter_up{datacenter}`: 1 when the datacenter's platform answered the
    /// reconciler's last healthcheck; set from the fleet at each scrape.
    pub datacenter_up: IntGaugeVec,
    /// `faastastic_policy_source_errors_total{policy}`: failed reads.
    pub source_errors: IntCounterVec,
    /// `faastastic_autoscaler_last_evaluation_timestamp_seconds{loop}`: when each autoscaler
    /// loop (`ticker`, `query:NAME`) last finished a pass, so an alert can catch a stall.
    pub last_evaluation: prometheus::GaugeVec,
    /// `faastastic_autoscaler_evaluation_duration_seconds{loop}`
    pub evaluation_duration: HistogramVec,
    /// `faastastic_grafana_annotations_total{result}`: sent, failed (after retries), dropped (queue full).
    pub annotations: IntCounterVec,
    /// `faastastic_grafana_annotations_queued`
    pub annotations_queued: prometheus::IntGauge,
    /// `faastastic_trigger_runs_total{function_name,trigger,outcome}`: due times of triggers
    /// by what became of them (`ok`, `failed`, `skipped`, `missed`).
    pub trigger_runs: IntCounterVec,
    /// `faastastic_trigger_last_run_timestamp_seconds{function_name,trigger}`: the due time
    /// of each function's last run.
    pub trigger_last_run: prometheus::GaugeVec,
    /// `faastastic_trigger_up{trigger}`: 1 while a trigger's source (NATS) is reachable.
    pub trigger_up: IntGaugeVec,
    /// `faastastic_leader`: 1 while this instance runs the loops that run once.
    pub leader: prometheus::IntGauge,
    /// `faastastic_store_up`: 1 while the store answered its last use, 0 when it failed.
    pub store_up: prometheus::IntGauge,
    /// Invocations per function (`name.namespace`) and datacenter, all status codes: what the
    /// autoscaler and the function list read, without walking the Prometheus vectors (which
    /// allocates every series' labels: tens of milliseconds at 10,000 functions).
    totals: std::sync::RwLock<Totals>,
    /// The other instances' invocations on a shared store, per (`name.namespace`, datacenter):
    /// added to this instance's own wherever the autoscaler reads counters.
    others: std::sync::RwLock<HashMap<(String, String), u64>>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let invocation_total = IntCounterVec::new(
            Opts::new(INVOCATION_TOTAL, INVOCATION_TOTAL_HELP),
            &["function_name", "code", "datacenter"],
        )
        .expect("static metric definition is valid");
        let functions_seconds = HistogramVec::new(
            HistogramOpts::new(
                "gateway_functions_seconds",
                "Duration of proxied function invocations in seconds",
            ),
            &["function_name", "code", "datacenter"],
        )
        .expect("static metric definition is valid");
        let invocation_started = IntCounterVec::new(
            Opts::new(
                "gateway_function_invocation_started",
                "Function invocations started",
            ),
            &["function_name"],
        )
        .expect("static metric definition is valid");
        let replica_restarts = IntCounterVec::new(
            Opts::new(
                "faastastic_replica_restarts_total",
                "Replicas restarted after they exited unexpectedly",
            ),
            &["function_name", "datacenter"],
        )
        .expect("static metric definition is valid");
        let upstream_protocol_errors = IntCounterVec::new(
            Opts::new(
                "faastastic_upstream_protocol_errors_total",
                "Replica answers refused as malformed HTTP (answered 502, connection closed), by cause",
            ),
            &["function_name", "datacenter", "cause"],
        )
        .expect("static metric definition is valid");
        let async_queue_depth = prometheus::IntGauge::new(
            "faastastic_async_queue_depth",
            "Asynchronous invocations waiting in the queue",
        )
        .expect("static metric definition is valid");
        let scale_decisions = IntCounterVec::new(
            Opts::new(
                "faastastic_scale_decisions_total",
                "Autoscaler decisions, by direction (up, down, none) and outcome (scaled, held, dry_run, failed)",
            ),
            &["function_name", "datacenter", "direction", "outcome"],
        )
        .expect("static metric definition is valid");
        let waiting_requests = prometheus::IntGauge::new(
            "faastastic_proxy_waiting_requests",
            "Invocations waiting for a starting replica (scale from zero)",
        )
        .expect("static metric definition is valid");
        let source_up = IntGaugeVec::new(
            Opts::new(
                "faastastic_policy_source_up",
                "1 when the query policy's metric source answered at its last evaluation",
            ),
            &["policy"],
        )
        .expect("static metric definition is valid");
        let datacenter_up = IntGaugeVec::new(
            Opts::new(
                "faastastic_datacenter_up",
                "1 when the datacenter's platform answered the reconciler's last healthcheck (0 when not, -1 before the first)",
            ),
            &["datacenter"],
        )
        .expect("static metric definition is valid");
        let source_errors = IntCounterVec::new(
            Opts::new(
                "faastastic_policy_source_errors_total",
                "Failed reads of a query policy's metric source",
            ),
            &["policy"],
        )
        .expect("static metric definition is valid");
        let last_evaluation = prometheus::GaugeVec::new(
            Opts::new(
                "faastastic_autoscaler_last_evaluation_timestamp_seconds",
                "When each autoscaler loop (ticker, query:NAME) last finished a pass (Unix time)",
            ),
            &["loop"],
        )
        .expect("static metric definition is valid");
        let evaluation_duration = HistogramVec::new(
            HistogramOpts::new(
                "faastastic_autoscaler_evaluation_duration_seconds",
                "Duration of one pass of an autoscaler loop",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["loop"],
        )
        .expect("static metric definition is valid");
        let annotations = IntCounterVec::new(
            Opts::new(
                "faastastic_grafana_annotations_total",
                "Grafana annotations by result: sent, failed (after retries), dropped (queue full)",
            ),
            &["result"],
        )
        .expect("static metric definition is valid");
        let annotations_queued = prometheus::IntGauge::new(
            "faastastic_grafana_annotations_queued",
            "Grafana annotations waiting to be sent",
        )
        .expect("static metric definition is valid");
        let trigger_runs = IntCounterVec::new(
            Opts::new(
                "faastastic_trigger_runs_total",
                "Due times of function triggers, by outcome (ok, failed, skipped, missed)",
            ),
            &["function_name", "trigger", "outcome"],
        )
        .expect("static metric definition is valid");
        let trigger_last_run = prometheus::GaugeVec::new(
            Opts::new(
                "faastastic_trigger_last_run_timestamp_seconds",
                "Due time of each function's last triggered run",
            ),
            &["function_name", "trigger"],
        )
        .expect("static metric definition is valid");
        let trigger_up = IntGaugeVec::new(
            Opts::new(
                "faastastic_trigger_up",
                "1 while a trigger's message source is reachable",
            ),
            &["trigger"],
        )
        .expect("static metric definition is valid");
        let leader = prometheus::IntGauge::new(
            "faastastic_leader",
            "1 while this instance leads: runs query policies, ticks, the reconciler and cron",
        )
        .expect("static metric definition is valid");
        let store_up = prometheus::IntGauge::new(
            "faastastic_store_up",
            "1 while the store (SQLite file or shared PostgreSQL database) answers",
        )
        .expect("static metric definition is valid");
        store_up.set(1);
        for collector in [
            Box::new(scale_decisions.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(leader.clone()),
            Box::new(store_up.clone()),
            Box::new(trigger_up.clone()),
            Box::new(trigger_runs.clone()),
            Box::new(trigger_last_run.clone()),
            Box::new(annotations.clone()),
            Box::new(annotations_queued.clone()),
            Box::new(source_up.clone()),
            Box::new(datacenter_up.clone()),
            Box::new(source_errors.clone()),
            Box::new(last_evaluation.clone()),
            Box::new(evaluation_duration.clone()),
            Box::new(waiting_requests.clone()),
            Box::new(invocation_total.clone()),
            Box::new(functions_seconds.clone()),
            Box::new(invocation_started.clone()),
            Box::new(replica_restarts.clone()),
            Box::new(upstream_protocol_errors.clone()),
            Box::new(async_queue_depth.clone()),
        ] {
            registry
                .register(collector)
                .expect("each metric is registered once");
        }
        Metrics {
            registry,
            invocation_total,
            functions_seconds,
            invocation_started,
            replica_restarts,
            upstream_protocol_errors,
            async_queue_depth,
            scale_decisions,
            waiting_requests,
            source_up,
            datacenter_up,
            source_errors,
            last_evaluation,
            evaluation_duration,
            annotations,
            annotations_queued,
            trigger_runs,
            trigger_last_run,
            trigger_up,
            leader,
            store_up,
            totals: Default::default(),
            others: Default::default(),
        }
    }

    /// Counts one finished invocation of `function` (`name.namespace`) served by `datacenter`
    /// (or that it would have been) with status `code`.
    pub fn invoked(&self, function: &str, code: &str, datacenter: &str, seconds: f64) {
        self.invocation(function, code, datacenter).record(seconds);
    }

    /// The series one kind of finished invocation is counted in, to keep and count in
    /// without looking them up again.
    pub fn invocation(&self, function: &str, code: &str, datacenter: &str) -> Invocation {
        let labels = [function, code, datacenter];
        let known = self
            .totals
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(function)
            .and_then(|dcs| dcs.get(datacenter))
            .cloned();
        let count = known.unwrap_or_else(|| {
            self.totals
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .entry(function.to_string())
                .or_default()
                .entry(datacenter.to_string())
                .or_default()
                .clone()
        });
        Invocation {
            total: self.invocation_total.with_label_values(&labels),
            seconds: self.functions_seconds.with_label_values(&labels),
            count,
        }
    }

    /// Records one pass of an autoscaler loop that started at `started`.
    pub fn evaluated(&self, loop_name: &str, started: std::time::Instant) {
        self.evaluation_duration
            .with_label_values(&[loop_name])
            .observe(started.elapsed().as_secs_f64());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.last_evaluation
            .with_label_values(&[loop_name])
            .set(now);
    }

    /// Invocations per `function_name`, summed over status codes and datacenters.
    pub fn invocation_counts(&self) -> HashMap<String, u64> {
        self.totals
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(name, dcs)| {
                let n = dcs.values().map(|n| n.load(Ordering::Relaxed)).sum();
                (name.clone(), n)
            })
            .collect()
    }

    /// Invocations per (`function_name`, datacenter), summed over status codes. Functions
    /// never invoked through faastastic are absent (read them as 0).
    pub fn invocation_counts_by_datacenter(&self) -> HashMap<(String, String), u64> {
        let mut out = self.own_invocation_counts();
        let others = self.others.read().unwrap_or_else(|p| p.into_inner());
        for (key, n) in others.iter() {
            *out.entry(key.clone()).or_default() += n;
        }
        out
    }

    /// This instance's invocations only, per (`name.namespace`, datacenter).
    pub fn own_invocation_counts(&self) -> HashMap<(String, String), u64> {
        let totals = self.totals.read().unwrap_or_else(|p| p.into_inner());
        let mut out = HashMap::new();
        for (name, dcs) in totals.iter() {
            for (dc, n) in dcs {
                out.insert((name.clone(), dc.clone()), n.load(Ordering::Relaxed));
            }
        }
        out
    }

    /// Sets what the other instances have counted (only ever growing, per key).
    pub fn set_others(&self, others: HashMap<(String, String), u64>) {
        *self.others.write().unwrap_or_else(|p| p.into_inner()) = others;
    }

    /// Renders the text exposition, first refreshing the per-function gauges so that removed
    /// functions disappear.
    /// The exposition text: the registry's metrics, a zero `code="200"` invocation series for
    /// every function and datacenter that has none yet (so `rate()` counts a function's first
    /// invocations, as a counter that starts at 0), and the replica gauges read from the fleet.
    /// The zero series are written here rather than registered: at 10,000 functions in 3
    /// datacenters, registering them kept about 20 MB and doubled the scrape's peak.
    pub fn render(&self, functions: &[FunctionView]) -> String {
        let (invocations, others): (Vec<_>, Vec<_>) = self
            .registry
            .gather()
            .into_iter()
            .partition(|family| family.name() == INVOCATION_TOTAL);
        let per_function: usize = functions
            .iter()
            .map(|v| 110 + 240 * v.datacenters.len())
            .sum();
        let mut out = String::with_capacity(per_function + 64 * 1024);
        let encoder = TextEncoder::new();
        encoder
            .encode_utf8(&others, &mut out)
            .expect("text encoding into a String cannot fail");
        render_invocations(&mut out, &encoder, &invocations, functions);
        render_replicas(&mut out, functions);
        out
    }
}

/// The invocation counter's family: its registered series, then a zero series for each
/// function and datacenter without a `code="200"` one.
fn render_invocations(
    out: &mut String,
    encoder: &TextEncoder,
    registered: &[prometheus::proto::MetricFamily],
    functions: &[FunctionView],
) {
    use std::fmt::Write as _;
    let mut counted: std::collections::HashSet<(&str, &str)> = Default::default();
    for metric in registered.iter().flat_map(|family| family.get_metric()) {
        let label = |name: &str| {
            metric
                .get_label()
                .iter()
                .find(|pair| pair.name() == name)
                .map_or("", |pair| pair.value())
        };
        if label("code") == "200" {
            counted.insert((label("function_name"), label("datacenter")));
        }
    }
    if registered.is_empty() {
        let _ = write!(
            out,
            "# HELP {INVOCATION_TOTAL} {INVOCATION_TOTAL_HELP}\n# TYPE {INVOCATION_TOTAL} counter\n"
        );
    } else {
        encoder
            .encode_utf8(registered, out)
            .expect("text encoding into a String cannot fail");
    }
    for view in functions {
        let name = view.function.id.qualified();
        for (datacenter, _) in &view.datacenters {
            if !counted.contains(&(name.as_str(), &**datacenter)) {
                let _ = writeln!(
                    out,
                    "{INVOCATION_TOTAL}{{code=\"200\",datacenter=\"{}\",function_name=\"{}\"}} 0",
                    LabelValue(datacenter),
                    LabelValue(&name),
                );
            }
        }
    }
}

/// The per-function gauges, written straight from the fleet at each scrape: held in a
/// registry they would cost a few hundred bytes per series for ever (90,000 series at 10,000
/// functions in 3 datacenters) and be rebuilt at every scrape anyway.
fn render_replicas(out: &mut String, functions: &[FunctionView]) {
    use std::fmt::Write as _;
    out.push_str(
        "# HELP gateway_service_count Desired replicas per function\n# TYPE gateway_service_count gauge\n",
    );
    for view in functions {
        let _ = writeln!(
            out,
            "gateway_service_count{{function_name=\"{}\"}} {}",
            LabelValue(&view.function.id.qualified()),
            view.replicas.desired
        );
    }
    out.push_str(
        "# HELP faastastic_function_replicas Replicas per function and datacenter, by state (desired, ready, starting)\n# TYPE faastastic_function_replicas gauge\n",
    );
    for view in functions {
        let name = view.function.id.qualified();
        for (datacenter, counts) in &view.datacenters {
            for (state, value) in [
                ("desired", counts.desired),
                ("ready", counts.ready),
                ("starting", counts.starting()),
            ] {
                let _ = writeln!(
                    out,
                    "faastastic_function_replicas{{datacenter=\"{}\",function_name=\"{}\",state=\"{state}\"}} {value}",
                    LabelValue(datacenter),
                    LabelValue(&name),
                );
            }
        }
    }
}

/// A label value escaped for the text exposition format.
struct LabelValue<'a>(&'a str);

impl std::fmt::Display for LabelValue<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write as _;
        for c in self.0.chars() {
            match c {
                '\\' => f.write_str("\\\\")?,
                '"' => f.write_str("\\\"")?,
                '\n' => f.write_str("\\n")?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Logs go to stderr; `RUST_LOG` overrides the default `info` level.
pub fn init_tracing() {
    init_tracing_at("info");
}

/// Logs go to stderr; `RUST_LOG` overrides `default_level`. The NATS client logs every failed
/// reconnection attempt; the trigger says once per outage what happened instead, so the
/// client's own lines are off unless `RUST_LOG` names `async_nats`.
pub fn init_tracing_at(default_level: &str) {
    let directives = std::env::var("RUST_LOG").unwrap_or_else(|_| default_level.to_string());
    let directives = if directives.contains("async_nats") {
        directives
    } else {
        format!("{directives},async_nats=off")
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: files and journald get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{LabelValue, Metrics};
    use crate::fleet::FunctionView;
    use crate::model::{Function, FunctionId};
    use crate::platform::ReplicaCounts;

    fn view(name: &str, datacenters: &[&str]) -> FunctionView {
        let function = Function {
            id: FunctionId::new(name, "fn"),
            deployment: Default::default(),
            replicas: datacenters.iter().map(|dc| (dc.to_string(), 1)).collect(),
            created_at: chrono::Utc::now(),
        };
        FunctionView {
            function: Arc::new(function),
            replicas: ReplicaCounts::default(),
            datacenters: datacenters
                .iter()
                .map(|dc| (Arc::from(*dc), ReplicaCounts::default()))
                .collect(),
        }
    }

    fn lines<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
        text.lines().filter(|l| l.starts_with(prefix)).collect()
    }

    #[test]
    fn every_function_and_datacenter_has_an_invocation_series_from_zero() {
        let metrics = Metrics::new();
        let views = [view("a", &["lon", "syd"]), view("b", &["lon"])];
        let text = metrics.render(&views);
        let mut series = lines(&text, "gateway_function_invocation_total{");
        series.sort();
        assert_eq!(
            series,
            [
                r#"gateway_function_invocation_total{code="200",datacenter="lon",function_name="a.fn"} 0"#,
                r#"gateway_function_invocation_total{code="200",datacenter="lon",function_name="b.fn"} 0"#,
                r#"gateway_function_invocation_total{code="200",datacenter="syd",function_name="a.fn"} 0"#,
            ]
        );
        assert_eq!(
            lines(&text, "# TYPE gateway_function_invocation_total counter").len(),
            1
        );

        // Once invoked, the counted series replaces the zero one, in the same family.
        metrics.invoked("a.fn", "200", "lon", 0.01);
        metrics.invoked("a.fn", "502", "syd", 0.01);
        let text = metrics.render(&views);
        let family: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.starts_with("# HELP gateway_function_invocation_total "))
            .take_while(|l| !l.starts_with("# HELP gateway_service_count"))
            .collect();
        assert_eq!(family.len(), 2 + 4, "{family:#?}");
        for expected in [
            r#"gateway_function_invocation_total{code="200",datacenter="lon",function_name="a.fn"} 1"#,
            r#"gateway_function_invocation_total{code="502",datacenter="syd",function_name="a.fn"} 1"#,
            r#"gateway_function_invocation_total{code="200",datacenter="syd",function_name="a.fn"} 0"#,
            r#"gateway_function_invocation_total{code="200",datacenter="lon",function_name="b.fn"} 0"#,
        ] {
            assert!(family.contains(&expected), "{expected} not in {family:#?}");
        }
        assert_eq!(
            lines(&text, "# TYPE gateway_function_invocation_total").len(),
            1
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(
            LabelValue("a\\b\"c\nd.fn").to_string(),
            "a\\\\b\\\"c\\nd.fn"
        );
        assert_eq!(
            LabelValue("figlet.openfaas-fn").to_string(),
            "figlet.openfaas-fn"
        );
    }
}
