//! Prometheus metrics (OpenFaaS gateway names and labels, plus faastastic's own) and tracing setup.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::fleet::FunctionView;

pub struct Metrics {
    registry: Registry,
    /// `gateway_function_invocation_total{function_name,code,datacenter}` (OpenFaaS's labels
    /// plus the datacenter that served it)
    pub invocation_total: IntCounterVec,
    /// `gateway_functions_seconds{function_name,code,datacenter}`
    pub functions_seconds: HistogramVec,
    /// `gateway_function_invocation_started{function_name}`
    pub invocation_started: IntCounterVec,
    /// `gateway_service_count{function_name}`: desired replicas, refreshed at every scrape.
    service_count: IntGaugeVec,
    /// `faastastic_function_replicas{function_name,datacenter,state}`
    replicas: IntGaugeVec,
    /// `faastastic_replica_restarts_total{function_name,datacenter}`
    pub replica_restarts: IntCounterVec,
    /// `faastastic_async_queue_depth`
    pub async_queue_depth: prometheus::IntGauge,
    /// `faastastic_scale_decisions_total{function_name,datacenter,direction,outcome}`
    pub scale_decisions: IntCounterVec,
    /// `faastastic_proxy_waiting_requests`: invocations held until a replica is ready.
    pub waiting_requests: prometheus::IntGauge,
    /// `faastastic_policy_source_up{policy}`: 1 when a query policy's last read worked.
    pub source_up: IntGaugeVec,
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
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let invocation_total = IntCounterVec::new(
            Opts::new(
                "gateway_function_invocation_total",
                "Function invocations, by function, HTTP status code and datacenter",
            ),
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
        let service_count = IntGaugeVec::new(
            Opts::new("gateway_service_count", "Desired replicas per function"),
            &["function_name"],
        )
        .expect("static metric definition is valid");
        let replicas = IntGaugeVec::new(
            Opts::new(
                "faastastic_function_replicas",
                "Replicas per function and datacenter, by state (desired, ready, starting)",
            ),
            &["function_name", "datacenter", "state"],
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
        for collector in [
            Box::new(scale_decisions.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(annotations.clone()),
            Box::new(annotations_queued.clone()),
            Box::new(source_up.clone()),
            Box::new(source_errors.clone()),
            Box::new(last_evaluation.clone()),
            Box::new(evaluation_duration.clone()),
            Box::new(waiting_requests.clone()),
            Box::new(invocation_total.clone()),
            Box::new(functions_seconds.clone()),
            Box::new(invocation_started.clone()),
            Box::new(service_count.clone()),
            Box::new(replicas.clone()),
            Box::new(replica_restarts.clone()),
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
            service_count,
            replicas,
            replica_restarts,
            async_queue_depth,
            scale_decisions,
            waiting_requests,
            source_up,
            source_errors,
            last_evaluation,
            evaluation_duration,
            annotations,
            annotations_queued,
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
    pub fn invocation_counts(&self) -> std::collections::HashMap<String, u64> {
        let mut out = std::collections::HashMap::new();
        for ((name, _), n) in self.invocation_counts_by_datacenter() {
            *out.entry(name).or_insert(0) += n;
        }
        out
    }

    /// Invocations per (`function_name`, datacenter), summed over status codes (one pass over
    /// the counters).
    pub fn invocation_counts_by_datacenter(
        &self,
    ) -> std::collections::HashMap<(String, String), u64> {
        use prometheus::core::Collector;
        let mut out = std::collections::HashMap::new();
        for family in self.invocation_total.collect() {
            for metric in family.get_metric() {
                let label = |key: &str| {
                    metric
                        .get_label()
                        .iter()
                        .find(|l| l.name() == key)
                        .map(|l| l.value().to_string())
                };
                if let (Some(name), Some(dc)) = (label("function_name"), label("datacenter")) {
                    *out.entry((name, dc)).or_insert(0) += metric.get_counter().value() as u64;
                }
            }
        }
        out
    }

    /// Renders the text exposition, first refreshing the per-function gauges so that removed
    /// functions disappear.
    pub fn render(&self, functions: &[FunctionView]) -> String {
        self.service_count.reset();
        self.replicas.reset();
        for view in functions {
            let name = view.function.id.qualified();
            self.service_count
                .with_label_values(&[name.as_str()])
                .set(view.replicas.desired as i64);
            for (datacenter, counts) in &view.datacenters {
                // Present at 0 from deploy on, so the first scrape under load already gives
                // rate() an increase (a series born under load needs two scrapes).
                self.invocation_total
                    .with_label_values(&[name.as_str(), "200", datacenter]);
                for (state, value) in [
                    ("desired", counts.desired),
                    ("ready", counts.ready),
                    ("starting", counts.starting()),
                ] {
                    self.replicas
                        .with_label_values(&[name.as_str(), datacenter, state])
                        .set(value as i64);
                }
            }
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(out).expect("Prometheus text format is UTF-8")
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

/// Logs go to stderr; `RUST_LOG` overrides `default_level`.
pub fn init_tracing_at(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
