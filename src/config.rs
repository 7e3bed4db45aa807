//! TOML configuration. Every knob has a default that works on one machine; loading reports every
//! unknown key, wrong type and invalid value at once, each named by its full key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::autoscale::policy::patch::{Kind, PolicyPatch, Source, Steps};
use crate::model::{validate_dns_label, DEFAULT_NAMESPACE};

/// Which `/system/info` shape to answer with: the gateway's (clients talk to us directly) or the
/// provider's (we sit behind the stock OpenFaaS gateway).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Gateway,
    Provider,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub role: Role,
    pub default_namespace: String,
    pub auth: AuthConfig,
    pub metrics: MetricsConfig,
    /// `[tls]`: TLS on the listeners (`listen` and `[metrics] listen`).
    pub tls: Option<crate::tls::ListenerTls>,
    pub proxy: ProxyConfig,
    pub async_invoke: AsyncConfig,
    pub limits: LimitsConfig,
    pub local: LocalConfig,
    /// `[docker]`: how datacenters with `platform = "docker"` run replicas.
    pub docker: ContainerConfig,
    /// `[swarm]`: how datacenters with `platform = "swarm"` run replicas.
    pub swarm: ContainerConfig,
    pub autoscale: AutoscaleConfig,
    pub prometheus: PrometheusConfig,
    pub grafana: GrafanaConfig,
    /// `[triggers.cron]`: functions invoked on a schedule (`com.faastastic.cron`).
    pub cron: CronConfig,
    /// `[triggers.nats]`: functions invoked by messages; `None` when no NATS is configured.
    pub nats: Option<NatsConfig>,
    /// `[store]`: a shared PostgreSQL database; `None`: the embedded SQLite file in `data_dir`.
    pub store: Option<StoreConfig>,
    /// `[events]`: how long the audit trail (scale and trigger events) is kept.
    pub events: EventsConfig,
    /// Where functions run, in order; exactly one is home.
    pub datacenters: Vec<DatacenterConfig>,
    /// Where a function that names no datacenter goes.
    pub placement: Placement,
    /// How often desired and actual state are compared in every datacenter.
    pub reconcile_interval: Duration,
    /// What the file says that still works but should change (logged at start).
    pub warnings: Vec<String>,
}

/// The datacenter of a server configured with none.
pub const DEFAULT_DATACENTER: &str = "home";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Every datacenter.
    All,
    /// The home datacenter only.
    Home,
}

/// One datacenter: a name and the platform that runs its functions.
#[derive(Debug, Clone, PartialEq)]
pub struct DatacenterConfig {
    pub name: String,
    pub platform: PlatformConfig,
    pub home: bool,
    /// Longest wait for one platform call (deploy, scale, remove) in this datacenter.
    pub timeout: Duration,
    /// Platform calls per second to this datacenter.
    pub rate_per_sec: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PlatformConfig {
    /// Processes on this machine (the embedded default).
    Local,
    /// A `faastastic agent` reached over HTTP.
    Remote {
        url: String,
        token_file: Option<PathBuf>,
        /// `ca_file`, `cert_file`, `key_file`, `server_name`: TLS to an `https://` agent.
        tls: crate::tls::ClientTls,
    },
    /// A Docker engine: a container per replica. `socket`: the engine's Unix socket (else
    /// `DOCKER_HOST` or the default); `pull`: pull images the engine does not have.
    Docker { socket: Option<String>, pull: bool },
    /// A Docker Swarm manager: a service per function.
    Swarm { socket: Option<String> },
}

impl PlatformConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            PlatformConfig::Local => "local",
            PlatformConfig::Remote { .. } => "remote",
            PlatformConfig::Docker { .. } => "docker",
            PlatformConfig::Swarm { .. } => "swarm",
        }
    }
}

impl DatacenterConfig {
    pub fn local(name: &str, home: bool) -> Self {
        DatacenterConfig {
            name: name.to_string(),
            platform: PlatformConfig::Local,
            home,
            timeout: Duration::from_secs(30),
            rate_per_sec: 100,
        }
    }
}

/// Where query policies read Prometheus.
#[derive(Debug, Clone)]
pub struct PrometheusConfig {
    /// `None`: no Prometheus; only `source = "internal"` query policies can run.
    pub url: Option<String>,
    pub timeout: Duration,
    /// `Authorization: Bearer` with this file's contents.
    pub bearer_token_file: Option<PathBuf>,
    /// Basic auth: this user with the password in `basic_auth_password_file`.
    pub basic_auth_user: Option<String>,
    pub basic_auth_password_file: Option<PathBuf>,
    /// Extra CA certificates (PEM) to trust for an https URL.
    pub ca_file: Option<PathBuf>,
    /// Accept any certificate (testing only).
    pub insecure_skip_verify: bool,
}

/// Where a query policy's values come from.
#[derive(Debug, Clone, PartialEq)]
pub enum QuerySource {
    /// A PromQL instant query returning one series per function.
    Prometheus { query: String },
    /// faastastic's own invocation counters: invocations per second over `window`.
    Internal { window: Duration },
    /// Each function's NATS JetStream backlog: messages on its subjects not yet delivered, plus
    /// delivered and not yet acknowledged (`[triggers.nats]`).
    Nats,
}

/// One `[[autoscale.queries]]` entry: a metric evaluated every `interval` for the functions
/// whose `name.namespace` matches `pattern`.
#[derive(Debug, Clone)]
pub struct QueryPolicy {
    pub name: String,
    pub source: QuerySource,
    pub pattern: glob::Pattern,
    pub strategy: crate::autoscale::strategy::Strategy,
    pub interval: Duration,
    /// Replicas to set while the source is unavailable (as KEDA's fallback); `None` holds.
    pub fallback_replicas: Option<u64>,
    /// The result label that names the function (`name` or `name.namespace`).
    pub function_label: String,
    /// The result label that names the datacenter; a series without it is shared equally by
    /// the function's datacenters.
    pub datacenter_label: String,
    /// The short window over faastastic's own invocation counters that starts a burst (see
    /// `autoscale::policy::Track`); `None`: off.
    pub short_window: Option<Duration>,
}

/// The short window a target policy gets unless it sets `short_window_secs`.
pub const SHORT_WINDOW: Duration = Duration::from_secs(2);

impl QueryPolicy {
    /// Whether the policy's value is a function's whole invocation rate, what faastastic's own
    /// counters read: the internal source, or a query that is only `sum by (...)` of `rate()`
    /// or `irate()` of `gateway_function_invocation_total` with no label filter (an error
    /// rate, a latency or a share of the calls is another unit). Only a target strategy on
    /// such a value gets a short window by default.
    pub fn reads_invocation_rate(source: &QuerySource) -> bool {
        use promql_parser::parser::Expr;
        fn unwrap(e: &Expr) -> &Expr {
            match e {
                Expr::Paren(p) => unwrap(&p.expr),
                e => e,
            }
        }
        let query = match source {
            QuerySource::Internal { .. } => return true,
            QuerySource::Nats => return false,
            QuerySource::Prometheus { query } => query,
        };
        let Ok(expr) = promql_parser::parser::parse(query) else {
            return false;
        };
        let Expr::Aggregate(sum) = unwrap(&expr) else {
            return false;
        };
        if sum.op.to_string() != "sum" || sum.param.is_some() {
            return false;
        }
        let Expr::Call(call) = unwrap(&sum.expr) else {
            return false;
        };
        if !matches!(call.func.name, "rate" | "irate") || call.args.args.len() != 1 {
            return false;
        }
        let Expr::MatrixSelector(m) = unwrap(&call.args.args[0]) else {
            return false;
        };
        let only_name =
            m.vs.matchers
                .matchers
                .iter()
                .all(|matcher| matcher.name == "__name__");
        m.vs.name.as_deref() == Some("gateway_function_invocation_total")
            && only_name
            && m.vs.matchers.or_matchers.is_empty()
            && m.vs.offset.is_none()
            && m.vs.at.is_none()
    }
}

/// `[store]`: the PostgreSQL database several instances share.
#[derive(Clone, PartialEq)]
pub struct StoreConfig {
    /// `postgres://user[:password]@host[:port]/database[?options]` or `host=... dbname=...`.
    pub url: String,
    /// The password, read from this file (else from the URL, if it has one).
    pub password_file: Option<PathBuf>,
    /// TLS to the database: set when any of `ca_file`, `cert_file`, `key_file` or `tls = true`
    /// is; configured TLS is required, never given up for a plain connection.
    pub tls: Option<crate::tls::ClientTls>,
    /// Connections each instance keeps at most.
    pub pool_size: usize,
    /// Longest wait for a connection (at start, and for each use of the database).
    pub connect_timeout: Duration,
    /// How long the leader's lease lasts unrenewed: a dead leader is replaced after at most
    /// this (plus a quarter of it), a leader that cannot renew stops acting before it ends.
    pub lease: Duration,
}

/// Without the password the URL may hold.
impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("url", &self.redacted_url())
            .field("password_file", &self.password_file)
            .field("tls", &self.tls)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("lease", &self.lease)
            .finish()
    }
}

impl StoreConfig {
    pub fn new(url: &str) -> StoreConfig {
        StoreConfig {
            url: url.to_string(),
            password_file: None,
            tls: None,
            pool_size: 16,
            connect_timeout: Duration::from_secs(5),
            lease: Duration::from_secs(2),
        }
    }

    /// The URL without a password it may carry, for logs and messages.
    pub fn redacted_url(&self) -> String {
        redact_postgres_url(&self.url)
    }
}

/// A PostgreSQL connection string (URL or `key=value` form) shown without its password:
/// rebuilt from what the client library reads in it (user, hosts, ports, database), so nothing
/// else of it is shown; one that does not parse is not shown at all.
pub fn redact_postgres_url(url: &str) -> String {
    let Ok(c) = url.parse::<tokio_postgres::Config>() else {
        return "<not shown: it does not parse>".to_string();
    };
    let ports = c.get_ports();
    let hosts: Vec<String> = c
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let host = match host {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            };
            match ports.get(i).or(ports.first()) {
                Some(port) => format!("{host}:{port}"),
                None => host,
            }
        })
        .collect();
    let user = match (c.get_user(), c.get_password()) {
        (Some(user), Some(_)) => format!("{user}:<redacted>@"),
        (Some(user), None) => format!("{user}@"),
        (None, Some(_)) => ":<redacted>@".to_string(),
        (None, None) => String::new(),
    };
    format!(
        "postgres://{user}{}/{}",
        hosts.join(","),
        c.get_dbname().unwrap_or("")
    )
}

/// `[triggers.cron]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CronConfig {
    /// Whether scheduled functions are run (on the leader, with a shared store). Off, their
    /// schedules are kept and shown but nothing runs, as with the OpenFaaS cron connector
    /// scaled to zero.
    pub enabled: bool,
}

impl Default for CronConfig {
    fn default() -> Self {
        CronConfig { enabled: true }
    }
}

/// `[triggers.nats]`: a NATS JetStream server whose messages invoke the functions whose
/// `topic` annotation names their subjects.
#[derive(Debug, Clone, PartialEq)]
pub struct NatsConfig {
    /// `nats://host:port` (or `tls://`).
    pub url: String,
    pub token_file: Option<PathBuf>,
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    /// A `.creds` file (JWT and NKey seed).
    pub credentials_file: Option<PathBuf>,
    /// Extra CA certificates (PEM) to trust for `tls://` servers.
    pub ca_file: Option<PathBuf>,
    /// The stream messages are read from; created with `subjects` when missing.
    pub stream: String,
    pub subjects: Vec<String>,
    /// Deliveries of a message before it goes to `dead_letter_subject`.
    pub max_deliver: u64,
    /// How long a failed delivery waits before the next, by attempt (the last repeats).
    pub backoff: Vec<Duration>,
    /// Messages of one function and subject invoking it at once.
    pub max_in_flight: usize,
    pub dead_letter_subject: String,
    /// How long the server waits for an acknowledgement before it delivers again; longer
    /// than the longest invocation.
    pub ack_wait: Duration,
}

impl NatsConfig {
    /// The URL without the user and password it may carry, for logs and messages.
    pub fn redacted_url(&self) -> String {
        match self.url.split_once("://") {
            Some((scheme, rest)) => match rest.split_once('@') {
                Some((_, host)) => format!("{scheme}://<redacted>@{host}"),
                None => self.url.clone(),
            },
            None => self.url.clone(),
        }
    }

    pub fn new(url: &str) -> NatsConfig {
        NatsConfig {
            url: url.to_string(),
            token_file: None,
            user: None,
            password_file: None,
            credentials_file: None,
            ca_file: None,
            stream: "faastastic".to_string(),
            subjects: Vec::new(),
            max_deliver: 5,
            backoff: vec![
                Duration::from_secs(1),
                Duration::from_secs(5),
                Duration::from_secs(30),
            ],
            max_in_flight: 16,
            dead_letter_subject: "faastastic.dead-letter".to_string(),
            ack_wait: Duration::from_secs(120),
        }
    }
}

/// How much of the audit trail the store keeps (`[events]`): scale events and trigger runs
/// alike, pruned at start and every hour (by the leader on a shared store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventsConfig {
    /// Events older than this many days go; 0 keeps them whatever their age.
    pub retention_days: u64,
    /// Each function's newest this many events of each kind stay, older ones go; 0: no bound.
    pub max_per_function: u64,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            retention_days: 30,
            max_per_function: 10_000,
        }
    }
}

/// Where scale decisions are annotated (`[grafana]`).
#[derive(Debug, Clone)]
pub struct GrafanaConfig {
    /// Grafana's base URL; `None` turns annotations off.
    pub url: Option<String>,
    /// File holding a service-account token, sent as `Authorization: Bearer`.
    pub token_file: Option<PathBuf>,
    /// Only annotate this dashboard (else the annotation is organisation-wide).
    pub dashboard_uid: Option<String>,
    pub queue_capacity: usize,
    pub rate_per_sec: u32,
    /// Attempts per annotation before it is dropped (5xx, 429 and network errors are retried).
    pub max_attempts: u32,
    pub timeout: Duration,
}

impl Default for GrafanaConfig {
    fn default() -> Self {
        GrafanaConfig {
            url: None,
            token_file: None,
            dashboard_uid: None,
            queue_capacity: 1000,
            rate_per_sec: 20,
            max_attempts: 5,
            timeout: Duration::from_secs(5),
        }
    }
}

/// The scaling settings every function starts from (labels override them per function), the
/// per-function overrides, and the webhook receiver's and the engine loop's settings.
#[derive(Debug, Clone)]
pub struct AutoscaleConfig {
    /// `[autoscale]`'s scaling settings (`default_min`, `up_cooldown_secs`, ...); what it
    /// leaves out takes the built-in default (`PolicyPatch::resolve`).
    pub defaults: PolicyPatch,
    /// Per-function overrides, matched by glob on `name.namespace`; every match applies, in
    /// order, and function labels override them all.
    pub policies: Vec<PolicyOverride>,
    /// How often a gradual scale-down takes its next step.
    pub tick_interval: Duration,
    /// Also accept `Authorization: Bearer <token>` on `/system/alert` (token read from this file).
    pub alert_bearer_token_file: Option<PathBuf>,
    /// Webhook requests accepted per second (burst of twice that); more get 429.
    pub webhook_rate_per_sec: u32,
    /// Platform scale calls per second across all functions.
    pub scale_rate_per_sec: u32,
    /// Metric-driven policies evaluated by the server itself.
    pub queries: Vec<QueryPolicy>,
    /// The window faastastic's own invocation counters are read over (staleness guard).
    pub staleness_window: Duration,
}

impl AutoscaleConfig {
    /// The policy of a function that no `[[autoscale.policies]]` entry or label changes.
    pub fn base_policy(&self) -> crate::autoscale::policy::Policy {
        self.defaults.resolve().map(|(p, _)| p).unwrap_or_else(|_| {
            PolicyPatch::default()
                .resolve()
                .expect("built-in defaults agree")
                .0
        })
    }
}

impl Default for AutoscaleConfig {
    fn default() -> Self {
        AutoscaleConfig {
            defaults: PolicyPatch::default(),
            policies: Vec::new(),
            tick_interval: Duration::from_secs(1),
            alert_bearer_token_file: None,
            webhook_rate_per_sec: 50,
            scale_rate_per_sec: 100,
            queries: Vec::new(),
            staleness_window: Duration::from_secs(10),
        }
    }
}

/// One `[[autoscale.policies]]` entry: any setting left out keeps the value from before.
#[derive(Debug, Clone)]
pub struct PolicyOverride {
    pub pattern: glob::Pattern,
    pub patch: PolicyPatch,
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub enabled: bool,
    /// User name; when unset, read from `user_file`, else `admin`.
    pub user: Option<String>,
    pub user_file: Option<PathBuf>,
    /// Password file; when unset, a password is generated under the data directory.
    pub password_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct MetricsConfig {
    /// A second listener for `/metrics` and `/healthz` only (OpenFaaS serves them on 8082).
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub upstream_timeout: Duration,
    pub connect_timeout: Duration,
    /// How long an invocation waits for a starting (or scaled-from-zero) replica to be ready.
    pub ready_timeout: Duration,
    pub max_idle_per_replica: usize,
    /// Requests that may wait at once for a starting replica; more get 503 at once.
    pub max_waiting_requests: usize,
    /// Threads serving client connections, each with its own event loop and upstream
    /// connections (0: one per core).
    pub connection_threads: usize,
    /// Serve plain invocations through the invoke lane (else every request goes through the
    /// general HTTP server).
    pub lane: bool,
}

#[derive(Debug, Clone)]
pub struct AsyncConfig {
    pub queue_capacity: usize,
    /// Request bodies held in the queue at once, in bytes; beyond it submissions get 429.
    pub max_queued_bytes: usize,
    pub workers: usize,
    pub callback_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct LimitsConfig {
    /// Largest body accepted by `/system/*` routes.
    pub max_system_body_bytes: usize,
    /// Largest body accepted by `/async-function/*` (it is held in memory while queued).
    pub max_async_body_bytes: usize,
    /// Highest replica count a scale request may ask for.
    pub max_replicas: u64,
    /// Largest Alertmanager webhook body accepted by `/system/alert`.
    pub max_alert_body_bytes: usize,
    /// How long a buffered request body (`/system/*`, `/async-function/*`) may take to arrive
    /// in full, from the request head; 408 after it.
    pub body_timeout: Duration,
    /// How long a client may take to send a request's head (line and headers); the
    /// connection is closed after it, so a client that never finishes holds nothing.
    pub header_timeout: Duration,
    /// How long a keep-alive client connection may wait for its next request before it is
    /// closed (the header deadline takes over once a byte of that request arrives).
    pub idle_timeout: Duration,
    /// Open client connections at most; beyond it new ones wait to be accepted.
    pub max_connections: usize,
}

/// How a container platform (`[docker]`, `[swarm]`) runs replicas.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerConfig {
    /// How often a starting replica's health endpoint is probed.
    pub health_interval: Duration,
    /// A replica not healthy by then is left out of routing (and logged).
    pub startup_timeout: Duration,
    /// Default `exec_timeout` for the watchdog in each container.
    pub exec_timeout: Duration,
    /// How long a replica being removed may finish its in-flight requests.
    pub drain_timeout: Duration,
    /// Log lines kept per function for `/system/logs` (docker).
    pub log_lines: usize,
    /// How faastastic reaches the replicas.
    pub reach: Reach,
}

/// How faastastic reaches a container platform's replicas, which serve on port 8080 inside
/// their containers (the OpenFaaS contract).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reach {
    /// Through a port the engine assigns to each replica and publishes: on 127.0.0.1 on
    /// docker, in host mode on the task's node on swarm.
    #[default]
    Published,
    /// docker: at the container's own address on its bridge network, port 8080 (no proxy in
    /// between; faastastic must run where that network is routed).
    Address,
    /// swarm: tasks on the host network, each on its slot's loopback address
    /// (`127.0.1.SLOT`), for images that listen where `faastastic_listen` says.
    Slot,
}

impl Reach {
    /// As the configuration spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Reach::Published => "published",
            Reach::Address => "address",
            Reach::Slot => "slot",
        }
    }

    /// `reach` of `[docker]` or `[swarm]` (`kind`).
    fn parse(kind: &str, text: &str) -> Result<Reach, String> {
        match (kind, text) {
            (_, "published") => Ok(Reach::Published),
            ("docker", "address") => Ok(Reach::Address),
            ("swarm", "slot") => Ok(Reach::Slot),
            ("docker", _) => Err(format!("{text:?} is not one of published, address")),
            _ => Err(format!("{text:?} is not one of published, slot")),
        }
    }
}

impl Default for ContainerConfig {
    fn default() -> Self {
        ContainerConfig {
            health_interval: Duration::from_millis(200),
            startup_timeout: Duration::from_secs(30),
            exec_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(10),
            log_lines: 1000,
            reach: Reach::Published,
        }
    }
}

#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// How often a replica's health endpoint is probed.
    pub health_interval: Duration,
    /// A replica that is not healthy by then is killed and restarted.
    pub startup_timeout: Duration,
    /// Longest wait between restarts of a crashing replica.
    pub restart_backoff_max: Duration,
    /// Default `exec_timeout` for the watchdog (a function's `exec_timeout` env var overrides it).
    pub exec_timeout: Duration,
    /// How long a replica being removed may finish its in-flight requests.
    pub drain_timeout: Duration,
    /// Log lines kept per function for `/system/logs`.
    pub log_lines: usize,
    /// When running as root: a user of its own for each function (else they run as root).
    pub function_users: bool,
    /// The users handed to functions, first and last (inclusive).
    pub uid_range: (u32, u32),
    /// With a user per function: whether replicas also run in a bubblewrap sandbox.
    pub sandbox: crate::platform::isolation::SandboxMode,
    /// Whether `limits` use control groups where they are writable (else rlimits).
    pub cgroups: bool,
    /// Whether invocations of an http-mode function go straight to its server (the watchdog
    /// then only supervises it), rather than through its watchdog.
    pub http_direct: bool,
    /// When functions have users of their own: where their files (working directory,
    /// secrets) live, outside the data directory.
    pub function_dir: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: default_data_dir(),
            role: Role::Gateway,
            default_namespace: DEFAULT_NAMESPACE.to_string(),
            auth: AuthConfig {
                enabled: true,
                user: None,
                user_file: None,
                password_file: None,
            },
            metrics: MetricsConfig { listen: None },
            tls: None,
            proxy: ProxyConfig {
                upstream_timeout: Duration::from_secs(60),
                connect_timeout: Duration::from_secs(2),
                ready_timeout: Duration::from_secs(10),
                max_idle_per_replica: 128,
                max_waiting_requests: 1024,
                connection_threads: 0,
                lane: true,
            },
            async_invoke: AsyncConfig {
                queue_capacity: 1024,
                max_queued_bytes: 64 * 1024 * 1024,
                workers: 4,
                callback_timeout: Duration::from_secs(10),
            },
            limits: LimitsConfig {
                max_system_body_bytes: 1024 * 1024,
                max_async_body_bytes: 16 * 1024 * 1024,
                max_replicas: 64,
                max_alert_body_bytes: 8 * 1024 * 1024,
                body_timeout: Duration::from_secs(30),
                header_timeout: Duration::from_secs(30),
                idle_timeout: Duration::from_secs(60),
                max_connections: 10_000,
            },
            local: LocalConfig {
                health_interval: Duration::from_millis(200),
                startup_timeout: Duration::from_secs(30),
                restart_backoff_max: Duration::from_secs(10),
                exec_timeout: Duration::from_secs(10),
                drain_timeout: Duration::from_secs(10),
                log_lines: 1000,
                function_users: true,
                uid_range: crate::platform::isolation::DEFAULT_UID_RANGE,
                sandbox: crate::platform::isolation::SandboxMode::Auto,
                cgroups: true,
                http_direct: true,
                function_dir: PathBuf::from("/run/faastastic"),
            },
            autoscale: AutoscaleConfig::default(),
            prometheus: PrometheusConfig {
                url: None,
                timeout: Duration::from_secs(2),
                bearer_token_file: None,
                basic_auth_user: None,
                basic_auth_password_file: None,
                ca_file: None,
                insecure_skip_verify: false,
            },
            grafana: GrafanaConfig::default(),
            cron: CronConfig::default(),
            nats: None,
            store: None,
            events: EventsConfig::default(),
            datacenters: vec![DatacenterConfig::local(DEFAULT_DATACENTER, true)],
            placement: Placement::All,
            reconcile_interval: Duration::from_secs(5),
            docker: ContainerConfig::default(),
            swarm: ContainerConfig::default(),
            warnings: Vec::new(),
        }
    }
}

impl Config {
    /// The home datacenter's name.
    pub fn home(&self) -> &str {
        self.datacenters
            .iter()
            .find(|d| d.home)
            .or(self.datacenters.first())
            .map(|d| d.name.as_str())
            .unwrap_or(DEFAULT_DATACENTER)
    }
}

/// `$XDG_DATA_HOME/faastastic` when set, else `./faastastic-data`.
pub fn default_data_dir() -> PathBuf {
    match std::env::var_os("XDG_DATA_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("faastastic"),
        _ => PathBuf::from("faastastic-data"),
    }
}

/// Every problem found in a config file, one per line.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration in {path}:\n  {}", errors.join("\n  "))]
pub struct ConfigError {
    pub path: String,
    pub errors: Vec<String>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: path.display().to_string(),
            errors: vec![format!("cannot read file: {e}")],
        })?;
        Config::parse(&text).map_err(|errors| ConfigError {
            path: path.display().to_string(),
            errors,
        })
    }

    /// Parses TOML text; returns all errors, each naming its key.
    pub fn parse(text: &str) -> Result<Config, Vec<String>> {
        let table: toml::Table = toml::from_str(text).map_err(|e| vec![e.to_string()])?;
        let mut defaults = Config::default();
        // Which of `[local]`'s keys the file sets: the container platforms read them until
        // their own sections existed.
        let local_keys: Vec<String> = table
            .get("local")
            .and_then(|v| v.as_table())
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default();
        let mut root = Section::new("", table);
        let mut errors = Vec::new();

        let cron;
        let mut cfg = Config {
            listen: root.socket_addr("listen", defaults.listen),
            data_dir: root.get("data_dir", defaults.data_dir.clone()),
            role: root.parsed("role", defaults.role, |v: String| match v.as_str() {
                "gateway" => Ok(Role::Gateway),
                "provider" => Ok(Role::Provider),
                other => Err(format!(
                    "must be \"gateway\" or \"provider\", got {other:?}"
                )),
            }),
            default_namespace: root.parsed(
                "default_namespace",
                defaults.default_namespace.clone(),
                |v: String| validate_dns_label("namespace", &v).map(|_| v),
            ),
            auth: {
                let mut s = root.section("auth");
                let d = &defaults.auth;
                let auth = AuthConfig {
                    enabled: s.get("enabled", d.enabled),
                    user: s.get("user", d.user.clone()),
                    user_file: s.get("user_file", d.user_file.clone()),
                    password_file: s.get("password_file", d.password_file.clone()),
                };
                if auth.user.is_some() && auth.user_file.is_some() {
                    s.errors.push(
                        "auth.user_file: set either auth.user or auth.user_file, not both".into(),
                    );
                }
                s.finish(&mut errors);
                auth
            },
            metrics: {
                let mut s = root.section("metrics");
                let listen = match s.raw("listen") {
                    None => None,
                    Some(_) => Some(s.socket_addr("listen", defaults.listen)),
                };
                s.finish(&mut errors);
                MetricsConfig { listen }
            },
            tls: {
                let present = root.raw("tls").is_some();
                let mut s = root.section("tls");
                let cert_file: Option<PathBuf> = s.get("cert_file", None);
                let key_file: Option<PathBuf> = s.get("key_file", None);
                let client_ca: Option<PathBuf> = s.get("client_ca", None);
                s.finish(&mut errors);
                match (cert_file, key_file) {
                    (Some(cert_file), Some(key_file)) => Some(crate::tls::ListenerTls {
                        cert_file,
                        key_file,
                        client_ca,
                    }),
                    (None, None) if !present => None,
                    _ => {
                        errors.push(
                            "tls.cert_file, tls.key_file: TLS on the listeners needs both".into(),
                        );
                        None
                    }
                }
            },
            proxy: {
                let mut s = root.section("proxy");
                let d = &defaults.proxy;
                let p = ProxyConfig {
                    upstream_timeout: s.secs("upstream_timeout_secs", d.upstream_timeout),
                    connect_timeout: s.millis("connect_timeout_ms", d.connect_timeout),
                    ready_timeout: s.millis("ready_timeout_ms", d.ready_timeout),
                    max_idle_per_replica: s
                        .positive("max_idle_per_replica", d.max_idle_per_replica),
                    max_waiting_requests: s
                        .positive("max_waiting_requests", d.max_waiting_requests),
                    connection_threads: s.parsed(
                        "connection_threads",
                        d.connection_threads,
                        |v: i64| {
                            usize::try_from(v)
                                .ok()
                                .filter(|v| *v <= 1024)
                                .ok_or_else(|| {
                                    format!("must be 0 (one per core) to 1024 threads, got {v}")
                                })
                        },
                    ),
                    lane: s.get("lane", d.lane),
                };
                s.finish(&mut errors);
                p
            },
            async_invoke: {
                let mut s = root.section("async");
                let d = &defaults.async_invoke;
                let a = AsyncConfig {
                    queue_capacity: s.positive("queue_capacity", d.queue_capacity),
                    max_queued_bytes: s.positive("max_queued_bytes", d.max_queued_bytes),
                    workers: s.positive("workers", d.workers),
                    callback_timeout: s.secs("callback_timeout_secs", d.callback_timeout),
                };
                s.finish(&mut errors);
                a
            },
            limits: {
                let mut s = root.section("limits");
                let d = &defaults.limits;
                let l = LimitsConfig {
                    max_system_body_bytes: s
                        .positive("max_system_body_bytes", d.max_system_body_bytes),
                    max_async_body_bytes: s
                        .positive("max_async_body_bytes", d.max_async_body_bytes),
                    max_replicas: s.positive("max_replicas", d.max_replicas as usize) as u64,
                    max_alert_body_bytes: s
                        .positive("max_alert_body_bytes", d.max_alert_body_bytes),
                    body_timeout: s.millis("body_timeout_ms", d.body_timeout),
                    header_timeout: s.millis("header_timeout_ms", d.header_timeout),
                    idle_timeout: s.millis("idle_timeout_ms", d.idle_timeout),
                    max_connections: s.positive("max_connections", d.max_connections),
                };
                s.finish(&mut errors);
                l
            },
            local: {
                let mut s = root.section("local");
                let d = &mut defaults.local;
                let l = LocalConfig {
                    health_interval: s.millis("health_interval_ms", d.health_interval),
                    startup_timeout: s.secs("startup_timeout_secs", d.startup_timeout),
                    restart_backoff_max: s.secs("restart_backoff_max_secs", d.restart_backoff_max),
                    exec_timeout: s.secs("exec_timeout_secs", d.exec_timeout),
                    drain_timeout: s.secs("drain_timeout_secs", d.drain_timeout),
                    log_lines: s.positive("log_lines", d.log_lines),
                    function_users: s.get("function_users", d.function_users),
                    uid_range: s.parsed("uid_range", d.uid_range, |v: Vec<i64>| match v[..] {
                        [first, last]
                            if 0 < first && first <= last && last < i64::from(u32::MAX) =>
                        {
                            Ok((first as u32, last as u32))
                        }
                        _ => Err(format!(
                            "must be [first, last] with 0 < first <= last < {}, got {v:?}",
                            u32::MAX
                        )),
                    }),
                    function_dir: s.get("function_dir", d.function_dir.clone()),
                    sandbox: s.parsed("sandbox", d.sandbox, |v: String| v.parse()),
                    cgroups: s.get("cgroups", d.cgroups),
                    http_direct: s.get("http_direct", d.http_direct),
                };
                s.finish(&mut errors);
                l
            },
            autoscale: {
                let mut s = root.section("autoscale");
                let d = &defaults.autoscale;
                let a = AutoscaleConfig {
                    defaults: PolicyPatch::read(&mut s, true),
                    tick_interval: s.millis("tick_interval_ms", d.tick_interval),
                    alert_bearer_token_file: s
                        .get("alert_bearer_token_file", d.alert_bearer_token_file.clone()),
                    webhook_rate_per_sec: s
                        .positive("webhook_rate_per_sec", d.webhook_rate_per_sec as usize)
                        .min(u32::MAX as usize) as u32,
                    scale_rate_per_sec: s
                        .positive("scale_rate_per_sec", d.scale_rate_per_sec as usize)
                        .min(u32::MAX as usize) as u32,
                    policies: s.policies("policies"),
                    queries: s.queries("queries"),
                    staleness_window: s.secs("staleness_window_secs", d.staleness_window),
                };
                if a.defaults.max == Some(0) {
                    s.errors.push(
                        "autoscale.default_max: must be a positive integer, got 0".to_string(),
                    );
                } else if let Err(e) = a.defaults.resolve() {
                    s.errors.push(format!("autoscale.default_min: {e}"));
                }
                for (i, o) in a.policies.iter().enumerate() {
                    if let Err(e) = o.patch.clone().over(&a.defaults).resolve() {
                        s.errors.push(format!(
                            "autoscale.policies[{i}].min: {e}, with this entry over [autoscale]"
                        ));
                    }
                }
                s.finish(&mut errors);
                a
            },
            prometheus: {
                let mut s = root.section("prometheus");
                let d = &defaults.prometheus;
                let p =
                    PrometheusConfig {
                        url: s.parsed("url", d.url.clone(), |v: String| match reqwest::Url::parse(
                            &v,
                        ) {
                            Ok(u) if matches!(u.scheme(), "http" | "https") => Ok(Some(v)),
                            _ => Err(format!(
                                "{v:?} is not an http(s) URL such as http://127.0.0.1:9090"
                            )),
                        }),
                        timeout: s.millis("timeout_ms", d.timeout),
                        bearer_token_file: s.get("bearer_token_file", None),
                        basic_auth_user: s.get("basic_auth_user", None),
                        basic_auth_password_file: s.get("basic_auth_password_file", None),
                        ca_file: s.get("ca_file", None),
                        insecure_skip_verify: s.get("insecure_skip_verify", false),
                    };
                if p.bearer_token_file.is_some()
                    && (p.basic_auth_user.is_some() || p.basic_auth_password_file.is_some())
                {
                    s.errors.push(
                        "prometheus: use bearer_token_file or basic auth, not both".to_string(),
                    );
                }
                if p.basic_auth_user.is_some() != p.basic_auth_password_file.is_some() {
                    s.errors.push(
                        "prometheus.basic_auth_user and prometheus.basic_auth_password_file go together"
                            .to_string(),
                    );
                }
                s.finish(&mut errors);
                p
            },
            grafana: {
                let mut s = root.section("grafana");
                let d = &defaults.grafana;
                let g =
                    GrafanaConfig {
                        url: s.parsed("url", d.url.clone(), |v: String| match reqwest::Url::parse(
                            &v,
                        ) {
                            Ok(u) if matches!(u.scheme(), "http" | "https") => Ok(Some(v)),
                            _ => Err(format!(
                                "{v:?} is not an http(s) URL such as http://127.0.0.1:3000"
                            )),
                        }),
                        token_file: s.get("token_file", d.token_file.clone()),
                        dashboard_uid: s.get("dashboard_uid", d.dashboard_uid.clone()),
                        queue_capacity: s.positive("queue_capacity", d.queue_capacity),
                        rate_per_sec: s
                            .positive("rate_per_sec", d.rate_per_sec as usize)
                            .min(u32::MAX as usize) as u32,
                        max_attempts: s
                            .positive("max_attempts", d.max_attempts as usize)
                            .min(u32::MAX as usize) as u32,
                        timeout: s.millis("timeout_ms", d.timeout),
                    };
                s.finish(&mut errors);
                g
            },
            nats: {
                let mut triggers = root.section("triggers");
                let mut s = triggers.section("cron");
                cron = CronConfig {
                    enabled: s.get("enabled", true),
                };
                s.finish(&mut errors);
                let mut s = triggers.section("nats");
                let nats = match s.get::<Option<String>>("url", None) {
                    None => None,
                    Some(url) => {
                        let d = NatsConfig::new(&url);
                        let ok_url = ["nats://", "tls://", "ws://", "wss://"]
                            .iter()
                            .any(|p| url.starts_with(p));
                        if !ok_url {
                            s.errors.push(format!(
                                "triggers.nats.url: {url:?} is not a NATS URL such as nats://127.0.0.1:4222"
                            ));
                        }
                        let subjects: Vec<String> = s.get("subjects", Vec::new());
                        for subject in &subjects {
                            if let Err(e) = crate::triggers::spec::check_subject(subject) {
                                s.errors.push(format!("triggers.nats.subjects: {e}"));
                            }
                        }
                        let backoff: Vec<u64> = s.get("backoff_ms", Vec::new());
                        let c = NatsConfig {
                            token_file: s.get("token_file", None),
                            user: s.get("user", None),
                            password_file: s.get("password_file", None),
                            credentials_file: s.get("credentials_file", None),
                            ca_file: s.get("ca_file", None),
                            stream: s.get("stream", d.stream.clone()),
                            subjects,
                            max_deliver: s.positive("max_deliver", d.max_deliver as usize) as u64,
                            backoff: if backoff.is_empty() {
                                d.backoff.clone()
                            } else {
                                backoff.into_iter().map(Duration::from_millis).collect()
                            },
                            max_in_flight: s.positive("max_in_flight", d.max_in_flight),
                            dead_letter_subject: s
                                .get("dead_letter_subject", d.dead_letter_subject.clone()),
                            ack_wait: s.secs("ack_wait_secs", d.ack_wait),
                            url,
                        };
                        if c.user.is_some() != c.password_file.is_some() {
                            s.errors.push(
                                "triggers.nats.user and triggers.nats.password_file go together"
                                    .to_string(),
                            );
                        }
                        if let Err(e) = crate::triggers::spec::check_subject(&c.dead_letter_subject)
                        {
                            s.errors
                                .push(format!("triggers.nats.dead_letter_subject: {e}"));
                        } else if c.dead_letter_subject.starts_with('$')
                            || c.dead_letter_subject.contains(['*', '>'])
                        {
                            s.errors.push(format!(
                                "triggers.nats.dead_letter_subject: {:?} must be a literal subject outside the server's own ($...)",
                                c.dead_letter_subject
                            ));
                        }
                        let bad_name = c.stream.is_empty()
                            || c.stream.chars().any(|ch| {
                                matches!(ch, '.' | '*' | '>' | '/' | '\\') || ch.is_whitespace()
                            });
                        if bad_name {
                            s.errors.push(format!(
                                "triggers.nats.stream: {:?} is not a stream name (no spaces, dots, *, >, / or \\)",
                                c.stream
                            ));
                        }
                        let ways = [
                            c.token_file.is_some(),
                            c.user.is_some(),
                            c.credentials_file.is_some(),
                        ];
                        if ways.iter().filter(|w| **w).count() > 1 {
                            s.errors.push("triggers.nats: use one of token_file, user + password_file or credentials_file".to_string());
                        }
                        Some(c)
                    }
                };
                s.finish(&mut errors);
                triggers.finish(&mut errors);
                nats
            },
            cron,
            store: {
                let mut s = root.section("store");
                let store = match s.get::<Option<String>>("url", None) {
                    None => None,
                    Some(url) => {
                        let d = StoreConfig::new(&url);
                        if let Err(e) = url.parse::<tokio_postgres::Config>() {
                            s.errors.push(format!(
                                "store.url: {e} (the value is not shown: it may hold a password); give a URL such as postgres://faastastic@127.0.0.1:5432/faastastic or host=... dbname=..."
                            ));
                        }
                        let tls = crate::tls::ClientTls {
                            ca_file: s.get("ca_file", None),
                            cert_file: s.get("cert_file", None),
                            key_file: s.get("key_file", None),
                            server_name: None,
                        };
                        if tls.cert_file.is_some() != tls.key_file.is_some() {
                            s.errors.push(
                                "store.cert_file, store.key_file: a client certificate needs both"
                                    .to_string(),
                            );
                        }
                        let wants_tls: bool = s.get("tls", false);
                        let c = StoreConfig {
                            password_file: s.get("password_file", None),
                            tls: (wants_tls || tls != crate::tls::ClientTls::default())
                                .then_some(tls),
                            pool_size: s.positive("pool_size", d.pool_size),
                            connect_timeout: s.millis("connect_timeout_ms", d.connect_timeout),
                            lease: s.millis("lease_ms", d.lease),
                            url,
                        };
                        if c.pool_size < 2 {
                            s.errors.push(format!(
                                "store.pool_size: {} is too small: a decision holds one connection for its lock and needs another; use 2 or more (default 16)",
                                c.pool_size
                            ));
                        }
                        if c.lease < Duration::from_millis(400) {
                            s.errors.push(format!(
                                "store.lease_ms: {} is too short to renew over a network; use 400 or more (default 2000)",
                                c.lease.as_millis()
                            ));
                        }
                        Some(c)
                    }
                };
                s.finish(&mut errors);
                store
            },
            events: {
                let mut s = root.section("events");
                let d = &defaults.events;
                // Beyond this the cutoff would overflow a date: "keep for ever" is 0.
                const MAX_DAYS: u64 = 100_000;
                let events = EventsConfig {
                    retention_days: s.parsed("retention_days", d.retention_days, |v: i64| {
                        u64::try_from(v)
                            .ok()
                            .filter(|v| *v <= MAX_DAYS)
                            .ok_or_else(|| {
                                format!("must be a number of days from 0 (keep them all) to {MAX_DAYS}, got {v}")
                            })
                    }),
                    max_per_function: s.count("max_per_function", d.max_per_function),
                };
                s.finish(&mut errors);
                events
            },
            datacenters: root.datacenters("datacenters"),
            placement: root.parsed("placement", defaults.placement, |v: String| {
                match v.as_str() {
                    "all" => Ok(Placement::All),
                    "home" => Ok(Placement::Home),
                    other => Err(format!("must be \"all\" or \"home\", got {other:?}")),
                }
            }),
            reconcile_interval: root.millis("reconcile_interval_ms", defaults.reconcile_interval),
            // Read below, once the datacenters are known.
            docker: ContainerConfig::default(),
            swarm: ContainerConfig::default(),
            warnings: Vec::new(),
        };
        for (i, q) in cfg.autoscale.queries.iter().enumerate() {
            if matches!(q.source, QuerySource::Prometheus { .. }) && cfg.prometheus.url.is_none() {
                errors.push(format!(
                    "autoscale.queries[{i}] ({}): a PromQL query needs [prometheus] url (or use source = \"internal\")",
                    q.name
                ));
            }
        }
        let mut names: Vec<&str> = cfg
            .autoscale
            .queries
            .iter()
            .map(|q| q.name.as_str())
            .collect();
        names.sort_unstable();
        for pair in names.windows(2) {
            if pair[0] == pair[1] && !pair[0].is_empty() {
                errors.push(format!(
                    "autoscale.queries: the name {:?} is used twice",
                    pair[0]
                ));
            }
        }
        // Swarm runs its own health checks and keeps no logs: only the watchdog's timeout
        // and the drain apply to it.
        let all = &[
            "health_interval_ms",
            "startup_timeout_secs",
            "exec_timeout_secs",
            "drain_timeout_secs",
            "log_lines",
        ][..];
        for (kind, keys) in [("docker", all), ("swarm", &all[2..4])] {
            let used = cfg.datacenters.iter().any(|d| d.platform.kind() == kind);
            let mut s = root.section(kind);
            let (mut c, warnings) = s.containers(kind, keys, &cfg.local, &local_keys, used);
            c.reach = s.parsed("reach", c.reach, |v: String| Reach::parse(kind, &v));
            s.finish(&mut errors);
            cfg.warnings.extend(warnings);
            match kind {
                "docker" => cfg.docker = c,
                _ => cfg.swarm = c,
            }
        }
        if cfg.nats.is_none() {
            for (i, q) in cfg.autoscale.queries.iter().enumerate() {
                if q.source == QuerySource::Nats {
                    errors.push(format!(
                        "autoscale.queries[{i}].source: \"nats\" reads the backlog of [triggers.nats], which is not configured"
                    ));
                }
            }
        }
        root.finish(&mut errors);
        if errors.is_empty() {
            Ok(cfg)
        } else {
            Err(errors)
        }
    }
}

/// One TOML table being read key by key. Each accessor removes its key, records an error naming
/// the full key when the value is wrong and falls back to the default, so parsing continues and
/// every error is reported; whatever is left at the end is an unknown key.
struct Section {
    prefix: String,
    table: toml::Table,
    errors: Vec<String>,
}

impl Section {
    fn new(prefix: &str, table: toml::Table) -> Self {
        Self {
            prefix: prefix.to_string(),
            table,
            errors: Vec::new(),
        }
    }

    fn key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.prefix)
        }
    }

    fn raw(&self, key: &str) -> Option<&toml::Value> {
        self.table.get(key)
    }

    fn get<T: DeserializeOwned>(&mut self, key: &str, default: T) -> T {
        self.parsed(key, default, Ok)
    }

    fn parsed<R: DeserializeOwned, T>(
        &mut self,
        key: &str,
        default: T,
        check: impl FnOnce(R) -> Result<T, String>,
    ) -> T {
        let Some(value) = self.table.remove(key) else {
            return default;
        };
        let type_name = value.type_str();
        match value.try_into::<R>() {
            Ok(raw) => match check(raw) {
                Ok(v) => v,
                Err(msg) => {
                    self.errors.push(format!("{}: {msg}", self.key(key)));
                    default
                }
            },
            Err(e) => {
                self.errors.push(format!(
                    "{}: wrong type ({type_name}): {}",
                    self.key(key),
                    e.to_string().trim()
                ));
                default
            }
        }
    }

    fn socket_addr(&mut self, key: &str, default: SocketAddr) -> SocketAddr {
        self.parsed(key, default, |v: String| {
            v.parse::<SocketAddr>()
                .map_err(|_| format!("{v:?} is not an address such as 127.0.0.1:8080"))
        })
    }

    /// A positive count or size, at most 2^40 (larger values would overflow queues and
    /// semaphores sized from them).
    fn positive(&mut self, key: &str, default: usize) -> usize {
        const LIMIT: i64 = 1 << 40;
        self.parsed(key, default, |v: i64| {
            usize::try_from(v)
                .ok()
                .filter(|v| *v > 0 && (*v as i64) <= LIMIT)
                .ok_or_else(|| format!("must be a positive integer up to {LIMIT}, got {v}"))
        })
    }

    fn secs(&mut self, key: &str, default: Duration) -> Duration {
        self.parsed(key, default, |v: f64| {
            if v.is_finite() && v > 0.0 && v < 1e9 {
                Ok(Duration::from_secs_f64(v))
            } else {
                Err(format!("must be a positive number of seconds, got {v}"))
            }
        })
    }

    fn count(&mut self, key: &str, default: u64) -> u64 {
        self.parsed(key, default, |v: i64| {
            u64::try_from(v).map_err(|_| format!("must be zero or more, got {v}"))
        })
    }

    fn millis(&mut self, key: &str, default: Duration) -> Duration {
        self.parsed(key, default, |v: i64| {
            u64::try_from(v)
                .ok()
                .filter(|v| *v > 0)
                .map(Duration::from_millis)
                .ok_or_else(|| format!("must be a positive number of milliseconds, got {v}"))
        })
    }

    /// `[[key]]`: an array of tables, each returned as a section named `key[i]`.
    fn tables(&mut self, key: &str) -> Vec<Section> {
        let full = self.key(key);
        let entries = match self.table.remove(key) {
            None => return Vec::new(),
            Some(toml::Value::Array(entries)) => entries,
            Some(other) => {
                self.errors.push(format!(
                    "{full}: must be an array of tables ([[{full}]]), got {}",
                    other.type_str()
                ));
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for (i, entry) in entries.into_iter().enumerate() {
            let at = format!("{full}[{i}]");
            match entry {
                toml::Value::Table(table) => out.push(Section::new(&at, table)),
                _ => self.errors.push(format!("{at}: must be a table")),
            }
        }
        out
    }

    /// `datacenters = ["stage", "lon"]` (all local, the first is home) or `[[datacenters]]`
    /// tables with `name`, `platform`, `home` and the platform's settings.
    fn datacenters(&mut self, key: &str) -> Vec<DatacenterConfig> {
        let full = self.key(key);
        let entries = match self.table.get(key) {
            None => return vec![DatacenterConfig::local(DEFAULT_DATACENTER, true)],
            Some(toml::Value::Array(entries)) => entries.clone(),
            Some(other) => {
                self.errors.push(format!(
                    "{full}: must be a list of names or [[{full}]] tables, got {}",
                    other.type_str()
                ));
                self.table.remove(key);
                return vec![DatacenterConfig::local(DEFAULT_DATACENTER, true)];
            }
        };
        let mut out = Vec::new();
        if entries.iter().all(|e| e.is_str()) {
            self.table.remove(key);
            for (i, e) in entries.iter().enumerate() {
                let name = e.as_str().unwrap_or_default().to_string();
                out.push(DatacenterConfig::local(&name, i == 0));
            }
        } else {
            for mut s in self.tables(key) {
                let at = s.prefix.clone();
                let name: String = s.get("name", String::new());
                let kind: String = s.get("platform", "local".to_string());
                let platform = match kind.as_str() {
                    "local" => PlatformConfig::Local,
                    "remote" => {
                        let url: Option<String> = s.get("url", None);
                        if url.is_none() {
                            s.errors.push(format!(
                                "{at}.url: is required for platform \"remote\" (the agent's address, e.g. http://127.0.0.1:8081)"
                            ));
                        }
                        let url = url.unwrap_or_default();
                        let tls = crate::tls::ClientTls {
                            ca_file: s.get("ca_file", None),
                            cert_file: s.get("cert_file", None),
                            key_file: s.get("key_file", None),
                            server_name: s.get("server_name", None),
                        };
                        if tls.cert_file.is_some() != tls.key_file.is_some() {
                            s.errors.push(format!(
                                "{at}.cert_file, {at}.key_file: a client certificate needs both"
                            ));
                        }
                        let scheme = reqwest::Url::parse(url.trim())
                            .map(|u| u.scheme().to_string())
                            .unwrap_or_default();
                        if tls != crate::tls::ClientTls::default() && scheme != "https" {
                            s.errors.push(format!(
                                "{at}.url: {url:?} is not an https:// URL; ca_file, cert_file, key_file and server_name need one"
                            ));
                        }
                        PlatformConfig::Remote {
                            url,
                            token_file: s.get("token_file", None),
                            tls,
                        }
                    }
                    "docker" => PlatformConfig::Docker {
                        socket: s.get("socket", None),
                        pull: s.get("pull", true),
                    },
                    "swarm" => PlatformConfig::Swarm {
                        socket: s.get("socket", None),
                    },
                    other => {
                        s.errors.push(format!(
                            "{at}.platform: {other:?} is not one of local, remote, docker, swarm"
                        ));
                        PlatformConfig::Local
                    }
                };
                let d = DatacenterConfig::local(&name, false);
                out.push(DatacenterConfig {
                    home: s.get("home", false),
                    timeout: s.millis("timeout_ms", d.timeout),
                    rate_per_sec: s
                        .positive("rate_per_sec", d.rate_per_sec as usize)
                        .min(u32::MAX as usize) as u32,
                    platform,
                    name,
                });
                s.finish(&mut self.errors);
            }
            if !out.is_empty() && !out.iter().any(|d| d.home) {
                out[0].home = true;
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, d) in out.iter().enumerate() {
            if let Err(e) = validate_dns_label("name", &d.name) {
                self.errors.push(format!("{full}[{i}]: {e}"));
            } else if !seen.insert(d.name.clone()) {
                self.errors
                    .push(format!("{full}[{i}]: the name {:?} is used twice", d.name));
            }
            if let PlatformConfig::Remote { url, .. } = &d.platform {
                if !url.is_empty()
                    && !reqwest::Url::parse(url)
                        .is_ok_and(|u| matches!(u.scheme(), "http" | "https"))
                {
                    self.errors.push(format!(
                        "{full}[{i}].url: {url:?} is not an http(s) URL such as http://127.0.0.1:8081"
                    ));
                }
            }
        }
        let homes: Vec<&str> = out
            .iter()
            .filter(|d| d.home)
            .map(|d| d.name.as_str())
            .collect();
        if homes.len() > 1 {
            self.errors.push(format!(
                "{full}: only one datacenter can be home, got {}",
                homes.join(", ")
            ));
        }
        if out.is_empty() {
            self.errors
                .push(format!("{full}: name at least one datacenter"));
            out.push(DatacenterConfig::local(DEFAULT_DATACENTER, true));
        }
        out
    }

    /// `[[autoscale.policies]]`: per-function overrides.
    fn policies(&mut self, key: &str) -> Vec<PolicyOverride> {
        let mut out = Vec::new();
        for mut s in self.tables(key) {
            let name = s.prefix.clone();
            let pattern = match s.table.contains_key("match") {
                false => {
                    s.errors.push(format!("{name}.match: is required (a glob on name.namespace, e.g. \"api-*.openfaas-fn\")"));
                    None
                }
                true => s.parsed("match", None, |v: String| {
                    glob::Pattern::new(&v)
                        .map(Some)
                        .map_err(|e| format!("{v:?} is not a glob: {e}"))
                }),
            };
            let o = PolicyOverride {
                pattern: pattern
                    .unwrap_or_else(|| glob::Pattern::new("").expect("empty glob is valid")),
                patch: PolicyPatch::read(&mut s, false),
            };
            s.finish(&mut self.errors);
            out.push(o);
        }
        out
    }

    /// `[[autoscale.queries]]`: query policies, each checked whole (PromQL parsed).
    fn queries(&mut self, key: &str) -> Vec<QueryPolicy> {
        use crate::autoscale::strategy::Strategy;
        let mut out = Vec::new();
        for mut s in self.tables(key) {
            let at = s.prefix.clone();
            let name: String = s.get("name", String::new());
            if name.is_empty() {
                s.errors.push(format!("{at}.name: is required"));
            }
            let query: Option<String> = s.get("query", None);
            let source_kind: String = s.get(
                "source",
                if query.is_some() {
                    "prometheus".into()
                } else {
                    "internal".into()
                },
            );
            let window = s.secs("window_secs", Duration::from_secs(10));
            let source = match (source_kind.as_str(), query) {
                ("prometheus", Some(q)) => {
                    if let Err(e) = promql_parser::parser::parse(&q) {
                        s.errors
                            .push(format!("{at}.query: invalid PromQL: {}", e.trim()));
                    }
                    QuerySource::Prometheus { query: q }
                }
                ("prometheus", None) => {
                    s.errors.push(format!(
                        "{at}.query: is required with source = \"prometheus\""
                    ));
                    QuerySource::Internal { window }
                }
                ("internal", None) => QuerySource::Internal { window },
                ("internal", Some(_)) => {
                    s.errors.push(format!("{at}.query: not used with source = \"internal\" (it measures invocations per second over window_secs)"));
                    QuerySource::Internal { window }
                }
                ("nats", None) => QuerySource::Nats,
                ("nats", Some(_)) => {
                    s.errors.push(format!("{at}.query: not used with source = \"nats\" (it reads each function's backlog on its subjects)"));
                    QuerySource::Nats
                }
                (other, _) => {
                    s.errors.push(format!(
                        "{at}.source: must be \"prometheus\", \"internal\" or \"nats\", got {other:?}"
                    ));
                    QuerySource::Internal { window }
                }
            };
            let pattern = s.parsed(
                "match",
                glob::Pattern::new("*").expect("* is a valid glob"),
                |v: String| glob::Pattern::new(&v).map_err(|e| format!("{v:?} is not a glob: {e}")),
            );
            let kind: String = s.get("strategy", "target".to_string());
            let strategy = match kind.as_str() {
                "target" => {
                    let target: f64 = s.get("target", 0.0);
                    if !(target.is_finite() && target > 0.0) {
                        s.errors.push(format!(
                            "{at}.target: a positive number is required with strategy = \"target\""
                        ));
                    }
                    let tolerance: f64 = s.get("tolerance", 0.1);
                    if !(0.0..1.0).contains(&tolerance) {
                        s.errors.push(format!(
                            "{at}.tolerance: must be from 0 to 1 (a fraction), got {tolerance}"
                        ));
                    }
                    Strategy::Target {
                        target,
                        per_replica: s.get("per_replica", false),
                        tolerance,
                    }
                }
                "threshold" => {
                    let upper: f64 = s.get("upper", f64::NAN);
                    let lower: f64 = s.get("lower", f64::NAN);
                    if !(upper.is_finite() && lower.is_finite() && lower < upper) {
                        s.errors.push(format!("{at}.upper/lower: both are required with strategy = \"threshold\", lower below upper"));
                    }
                    let step = s.parsed(
                        "step",
                        crate::autoscale::policy::Step::Count(1),
                        Steps::from_toml,
                    );
                    Strategy::Threshold { upper, lower, step }
                }
                "fixed" => {
                    if !s.table.contains_key("replicas") {
                        s.errors.push(format!(
                            "{at}.replicas: is required with strategy = \"fixed\""
                        ));
                    }
                    Strategy::Fixed {
                        replicas: s.count("replicas", 0),
                    }
                }
                other => {
                    s.errors.push(format!("{at}.strategy: must be \"target\", \"threshold\" or \"fixed\", got {other:?}"));
                    Strategy::Fixed { replicas: 0 }
                }
            };
            let q = QueryPolicy {
                name,
                source,
                pattern,
                strategy,
                interval: s.millis("interval_ms", Duration::from_secs(2)),
                fallback_replicas: s
                    .table
                    .contains_key("fallback_replicas")
                    .then(|| s.count("fallback_replicas", 0)),
                function_label: s.get("function_label", "function_name".to_string()),
                datacenter_label: s.get("datacenter_label", "datacenter".to_string()),
                short_window: None,
            };
            let tracks_totals = matches!(
                q.strategy,
                Strategy::Target {
                    per_replica: false,
                    ..
                }
            );
            let by_default = (tracks_totals && QueryPolicy::reads_invocation_rate(&q.source))
                .then_some(SHORT_WINDOW);
            let short_window = s.parsed("short_window_secs", by_default, |v: f64| {
                if v == 0.0 {
                    Ok(None)
                } else if !tracks_totals {
                    Err("only a target strategy on a total (not per_replica) takes a short window: it reads invocations per second from faastastic's own counters".to_string())
                } else if v.is_finite() && (1.0..=3600.0).contains(&v) {
                    Ok(Some(Duration::from_secs_f64(v)))
                } else {
                    Err(format!(
                        "must be 0 (off) or from 1 to 3600 seconds, got {v}"
                    ))
                }
            });
            let q = QueryPolicy { short_window, ..q };
            s.finish(&mut self.errors);
            out.push(q);
        }
        out
    }

    /// `[docker]` or `[swarm]` (`kind`), which take `keys` (others are unknown keys). A key
    /// it leaves out that `[local]` sets (`local_keys`) is read from `[local]`, as before these
    /// sections existed, with a warning naming the new key when a datacenter of this kind
    /// exists.
    fn containers(
        &mut self,
        kind: &str,
        keys: &[&str],
        local: &LocalConfig,
        local_keys: &[String],
        used: bool,
    ) -> (ContainerConfig, Vec<String>) {
        let d = ContainerConfig::default();
        let mut warnings = Vec::new();
        let mut inherit = |key: &str, own: bool| {
            let from_local = !own && local_keys.iter().any(|k| k == key) && keys.contains(&key);
            if from_local && used {
                warnings.push(format!(
                    "local.{key} also applies to the {kind} datacenters, as it did before [{kind}] existed; set {kind}.{key} instead"
                ));
            }
            from_local
        };
        let mut pick =
            |s: &mut Self, key: &str, from_local: Duration, default: Duration, millis: bool| {
                let own = s.table.contains_key(key);
                if inherit(key, own) {
                    return from_local;
                }
                if !keys.contains(&key) {
                    return default;
                }
                if millis {
                    s.millis(key, default)
                } else {
                    s.secs(key, default)
                }
            };
        let health_interval = pick(
            self,
            "health_interval_ms",
            local.health_interval,
            d.health_interval,
            true,
        );
        let startup_timeout = pick(
            self,
            "startup_timeout_secs",
            local.startup_timeout,
            d.startup_timeout,
            false,
        );
        let exec_timeout = pick(
            self,
            "exec_timeout_secs",
            local.exec_timeout,
            d.exec_timeout,
            false,
        );
        let drain_timeout = pick(
            self,
            "drain_timeout_secs",
            local.drain_timeout,
            d.drain_timeout,
            false,
        );
        let own = self.table.contains_key("log_lines");
        let log_lines = match inherit("log_lines", own) {
            true => local.log_lines,
            false if keys.contains(&"log_lines") => self.positive("log_lines", d.log_lines),
            false => d.log_lines,
        };
        let c = ContainerConfig {
            health_interval,
            startup_timeout,
            exec_timeout,
            drain_timeout,
            log_lines,
            reach: Reach::default(),
        };
        (c, warnings)
    }

    /// A nested table; a missing one reads as empty (all defaults).
    fn section(&mut self, key: &str) -> Section {
        let full = self.key(key);
        match self.table.remove(key) {
            None => Section::new(&full, toml::Table::new()),
            Some(toml::Value::Table(t)) => Section::new(&full, t),
            Some(other) => {
                self.errors
                    .push(format!("{full}: must be a table, got {}", other.type_str()));
                Section::new(&full, toml::Table::new())
            }
        }
    }

    fn finish(self, errors: &mut Vec<String>) {
        errors.extend(self.errors);
        for key in self.table.keys() {
            let full = if self.prefix.is_empty() {
                key.clone()
            } else {
                format!("{}.{key}", self.prefix)
            };
            errors.push(format!("{full}: unknown key"));
        }
    }
}

impl Source for Section {
    fn take<T>(&mut self, key: &str, read: fn(toml::Value) -> Result<T, String>) -> Option<T> {
        if !self.table.contains_key(key) {
            return None;
        }
        self.parsed(key, None, |v: toml::Value| read(v).map(Some))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cron_can_be_turned_off_beside_nats() {
        assert!(Config::parse("").unwrap().cron.enabled);
        let cfg = Config::parse(
            "[triggers.cron]\nenabled = false\n[triggers.nats]\nurl = \"nats://127.0.0.1:4222\"\nsubjects = [\"a\"]\n",
        )
        .unwrap();
        assert!(!cfg.cron.enabled);
        assert_eq!(cfg.nats.unwrap().subjects, ["a"]);
        let errors = Config::parse("[triggers.cron]\nenabled = \"no\"\nevery = 1\n").unwrap_err();
        let text = errors.join("\n");
        for needle in ["triggers.cron.enabled", "triggers.cron.every: unknown key"] {
            assert!(text.contains(needle), "{needle} in {text}");
        }
    }

    #[test]
    fn nats_triggers_are_read_and_checked() {
        let cfg = Config::parse(
            "[triggers.nats]\nurl = \"nats://u:p@127.0.0.1:4222\"\nsubjects = [\"orders.>\"]\nbackoff_ms = [100, 2000]\n[[autoscale.queries]]\nname = \"backlog\"\nsource = \"nats\"\ntarget = 10\n",
        )
        .unwrap();
        let nats = cfg.nats.as_ref().unwrap();
        assert_eq!(nats.subjects, ["orders.>"]);
        assert_eq!(
            nats.backoff,
            [Duration::from_millis(100), Duration::from_secs(2)]
        );
        assert_eq!(nats.redacted_url(), "nats://<redacted>@127.0.0.1:4222");
        assert_eq!(cfg.autoscale.queries[0].source, QuerySource::Nats);
        let errors = Config::parse(
            "[triggers.nats]\nurl = \"http://x\"\nstream = \"a.b\"\nsubjects = [\"a..b\"]\ndead_letter_subject = \"$JS.API.X\"\ntoken_file = \"/t\"\ncredentials_file = \"/c\"\nuser = \"u\"\n",
        )
        .unwrap_err()
        .join("\n");
        for says in [
            "triggers.nats.url: \"http://x\" is not a NATS URL",
            "triggers.nats.stream: \"a.b\" is not a stream name",
            "triggers.nats.subjects: \"a..b\" is not a NATS subject",
            "triggers.nats.dead_letter_subject: \"$JS.API.X\" must be a literal subject",
            "triggers.nats: use one of token_file",
            "triggers.nats.user and triggers.nats.password_file go together",
        ] {
            assert!(errors.contains(says), "{says}\nin\n{errors}");
        }
        let errors =
            Config::parse("[[autoscale.queries]]\nname = \"b\"\nsource = \"nats\"\ntarget = 5\n")
                .unwrap_err()
                .join("\n");
        assert!(
            errors.contains(
                "autoscale.queries[0].source: \"nats\" reads the backlog of [triggers.nats]"
            ),
            "{errors}"
        );
    }

    #[test]
    fn a_shared_store_is_read_and_checked_and_its_passwords_never_shown() {
        let cfg = Config::parse(
            "[store]\nurl = \"postgres://faastastic:pw@db:5432/faastastic?sslmode=disable&password=pw2\"\npassword_file = \"/run/pg\"\nlease_ms = 3000\nca_file = \"/ca.pem\"\n",
        )
        .unwrap();
        let store = cfg.store.as_ref().unwrap();
        assert_eq!(store.lease, Duration::from_secs(3));
        assert_eq!(store.pool_size, 16);
        assert_eq!(
            store.tls.as_ref().and_then(|t| t.ca_file.as_deref()),
            Some(Path::new("/ca.pem"))
        );
        assert_eq!(
            store.redacted_url(),
            "postgres://faastastic:<redacted>@db:5432/faastastic"
        );
        for (given, shown) in [
            (
                "host=db user=f password=secret dbname=x",
                "postgres://f:<redacted>@db/x",
            ),
            ("postgresql://f@db/x", "postgres://f@db:5432/x"),
            // Characters a URL would escape, left raw in the password.
            (
                "postgres://u:pa/ss@db/x",
                "postgres://u:<redacted>@db:5432/x",
            ),
            (
                "host=db password = 'a b\\' c' user=f port=6432",
                "postgres://f:<redacted>@db:6432/",
            ),
            (
                "postgres://u@db/x?password=secret&application_name=svc@host",
                "postgres://u:<redacted>@db:5432/x",
            ),
            (
                "host=db application_name=http://svc password=secret",
                "postgres://:<redacted>@db/",
            ),
            ("host=a,b port=1,2 user=u", "postgres://u@a:1,b:2/"),
            ("not a url: secret", "<not shown: it does not parse>"),
        ] {
            assert_eq!(redact_postgres_url(given), shown, "{given}");
        }
        let debug = format!("{store:?}");
        assert!(!debug.contains("pw"), "{debug}");
        assert!(
            Config::parse("").unwrap().store.is_none(),
            "SQLite by default"
        );
        let errors = Config::parse(
            "[store]\nurl = \"mysql://u:secretpw@db/x\"\nlease_ms = 100\ncert_file = \"/c.pem\"\npool_size = 1\n",
        )
        .unwrap_err()
        .join("\n");
        for says in [
            "store.url: ",
            "the value is not shown",
            "store.lease_ms: 100 is too short",
            "store.cert_file, store.key_file: a client certificate needs both",
            "store.pool_size: 1 is too small",
        ] {
            assert!(errors.contains(says), "{says}\nin\n{errors}");
        }
        assert!(!errors.contains("secretpw"), "{errors}");
        let errors = Config::parse("[store]\nurl = \"postgres://u:secretpw@db:notaport/x\"\n")
            .unwrap_err()
            .join("\n");
        assert!(errors.contains("store.url"), "{errors}");
        assert!(!errors.contains("secretpw"), "{errors}");
    }

    #[test]
    fn events_bounds_are_read_and_checked() {
        assert_eq!(Config::parse("").unwrap().events, EventsConfig::default());
        let cfg = Config::parse("[events]\nretention_days = 0\nmax_per_function = 50\n").unwrap();
        assert_eq!(
            cfg.events,
            EventsConfig {
                retention_days: 0,
                max_per_function: 50
            }
        );
        let errors =
            Config::parse("[events]\nretention_days = -1\nmax_per_function = \"many\"\nkeep = 3\n")
                .unwrap_err()
                .join("\n");
        for says in [
            "events.retention_days: must be a number of days from 0 (keep them all) to 100000, got -1",
            "events.max_per_function: wrong type (string)",
            "events.keep",
        ] {
            assert!(errors.contains(says), "{says}\nin\n{errors}");
        }
        let errors = Config::parse("[events]\nretention_days = 1000000\n")
            .unwrap_err()
            .join("\n");
        assert!(errors.contains("events.retention_days"), "{errors}");
    }

    #[test]
    fn empty_config_is_the_default() {
        let cfg = Config::parse("").unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(cfg.role, Role::Gateway);
        assert!(cfg.auth.enabled);
        assert_eq!(cfg.default_namespace, "openfaas-fn");
    }

    #[test]
    fn reads_every_section() {
        let cfg = Config::parse(
            r#"
listen = "127.0.0.1:9999"
role = "provider"
[auth]
enabled = false
[metrics]
listen = "127.0.0.1:8082"
[proxy]
upstream_timeout_secs = 2.5
[async]
workers = 2
[local]
log_lines = 10
"#,
        )
        .unwrap();
        assert_eq!(cfg.listen.port(), 9999);
        assert_eq!(cfg.role, Role::Provider);
        assert!(!cfg.auth.enabled);
        assert_eq!(cfg.metrics.listen.unwrap().port(), 8082);
        assert_eq!(cfg.proxy.upstream_timeout, Duration::from_millis(2500));
        assert_eq!(cfg.async_invoke.workers, 2);
        assert_eq!(cfg.local.log_lines, 10);
    }

    #[test]
    fn reports_every_bad_key_at_once() {
        let errors = Config::parse(
            r#"
listen = "nowhere"
role = "boss"
colour = "blue"
[auth]
enabled = "yes"
[proxy]
upstream_timeout_secs = -1
[async]
workers = 0
typo = 1
[local]
log_lines = "many"
"#,
        )
        .unwrap_err();
        let joined = errors.join("\n");
        for key in [
            "listen:",
            "role:",
            "colour: unknown key",
            "auth.enabled:",
            "proxy.upstream_timeout_secs:",
            "async.workers:",
            "async.typo: unknown key",
            "local.log_lines:",
        ] {
            assert!(joined.contains(key), "missing {key} in:\n{joined}");
        }
        assert_eq!(errors.len(), 8, "{joined}");
    }

    #[test]
    fn tls_settings_come_in_pairs_and_need_https() {
        let cfg = Config::parse("[tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n").unwrap();
        let tls = cfg.tls.unwrap();
        assert_eq!(
            (tls.cert_file.to_str(), tls.client_ca),
            (Some("c.pem"), None)
        );
        let errors = Config::parse("[tls]\ncert_file = \"c.pem\"\n")
            .unwrap_err()
            .join("\n");
        assert!(errors.contains("tls.cert_file, tls.key_file"), "{errors}");
        let errors = Config::parse(
            "[[datacenters]]\nname = \"home\"\n[[datacenters]]\nname = \"far\"\nplatform = \"remote\"\nurl = \"http://127.0.0.1:1\"\nca_file = \"ca.pem\"\ncert_file = \"c.pem\"\n",
        )
        .unwrap_err()
        .join("\n");
        assert!(errors.contains("is not an https:// URL"), "{errors}");
        assert!(
            errors.contains("a client certificate needs both"),
            "{errors}"
        );
        let errors = Config::parse(
            "[[datacenters]]\nname = \"home\"\n[[datacenters]]\nname = \"far\"\nplatform = \"remote\"\nurl = \"HTTP://127.0.0.1:1\"\nserver_name = \"far.test\"\n",
        )
        .unwrap_err()
        .join("\n");
        assert!(errors.contains("is not an https:// URL"), "{errors}");
    }

    #[test]
    fn each_container_platform_names_the_ways_it_reaches_replicas() {
        let cfg =
            Config::parse("[docker]\nreach = \"address\"\n[swarm]\nreach = \"slot\"\n").unwrap();
        assert_eq!(cfg.docker.reach, Reach::Address);
        assert_eq!(cfg.swarm.reach, Reach::Slot);
        let cfg = Config::parse("").unwrap();
        assert_eq!(
            (cfg.docker.reach, cfg.swarm.reach),
            (Reach::Published, Reach::Published)
        );
        let errors = Config::parse("[docker]\nreach = \"slot\"\n[swarm]\nreach = \"address\"\n")
            .unwrap_err()
            .join("\n");
        assert!(
            errors.contains("docker.reach: \"slot\" is not one of published, address"),
            "{errors}"
        );
        assert!(
            errors.contains("swarm.reach: \"address\" is not one of published, slot"),
            "{errors}"
        );
    }

    #[test]
    fn container_platforms_have_their_own_sections_and_read_old_keys_with_a_warning() {
        let cfg = Config::parse(
            "[local]\nstartup_timeout_secs = 90\nexec_timeout_secs = 20\n[docker]\nexec_timeout_secs = 5\n[swarm]\ndrain_timeout_secs = 3\n[[datacenters]]\nname = \"d\"\nplatform = \"docker\"\n",
        )
        .unwrap();
        assert_eq!(
            cfg.docker.exec_timeout,
            Duration::from_secs(5),
            "its own key wins"
        );
        assert_eq!(
            cfg.docker.startup_timeout,
            Duration::from_secs(90),
            "an old key is still read"
        );
        assert_eq!(cfg.swarm.drain_timeout, Duration::from_secs(3));
        assert_eq!(cfg.local.exec_timeout, Duration::from_secs(20));
        assert_eq!(cfg.warnings.len(), 1, "{:?}", cfg.warnings);
        assert!(
            cfg.warnings[0].contains("set docker.startup_timeout_secs instead"),
            "{:?}",
            cfg.warnings
        );
        // No swarm datacenter: nothing to warn about for it.
        assert!(!cfg.warnings.iter().any(|w| w.contains("swarm")));
        let errors = Config::parse("[docker]\nlog_lines = 0\nwhat = 1\n").unwrap_err();
        let joined = errors.join("\n");
        assert!(joined.contains("docker.log_lines"), "{joined}");
        assert!(joined.contains("docker.what: unknown key"), "{joined}");
        // Swarm takes only the keys it uses, and inherits only those.
        let errors = Config::parse("[swarm]\nstartup_timeout_secs = 5\n").unwrap_err();
        assert!(
            errors
                .join("\n")
                .contains("swarm.startup_timeout_secs: unknown key"),
            "{errors:?}"
        );
        let cfg = Config::parse(
            "[local]\nstartup_timeout_secs = 90\ndrain_timeout_secs = 4\n[[datacenters]]\nname = \"s\"\nplatform = \"swarm\"\n",
        )
        .unwrap();
        assert_eq!(cfg.swarm.drain_timeout, Duration::from_secs(4));
        assert_eq!(cfg.warnings.len(), 1, "{:?}", cfg.warnings);
        assert!(
            cfg.warnings[0].contains("swarm.drain_timeout_secs"),
            "{:?}",
            cfg.warnings
        );
        let errors = Config::parse("[autoscale]\ndefault_max = 0\n").unwrap_err();
        assert!(
            errors
                .join("\n")
                .contains("autoscale.default_max: must be a positive integer"),
            "{errors:?}"
        );
    }

    #[test]
    fn policy_overrides() {
        let cfg = Config::parse(
            r#"
[autoscale]
[[autoscale.policies]]
match = "api-*.openfaas-fn"
max = 10
step_up = "50%"
down_cooldown_secs = 0
"#,
        )
        .unwrap();
        let p = &cfg.autoscale.policies[0];
        assert!(p.pattern.matches("api-users.openfaas-fn"));
        assert_eq!(p.patch.max, Some(10));
        assert_eq!(
            p.patch.step_up,
            Some(crate::autoscale::policy::Step::PercentOfMax(50))
        );
        assert_eq!(p.patch.down_cooldown, Some(Duration::ZERO));
        assert_eq!(p.patch.min, None);
        let errors = Config::parse(
            "[[autoscale.policies]]\nmax = 3\nmin = 5\nfactor = 0\nstep_up = \"x\"\nwhat = 1\n",
        )
        .unwrap_err();
        let joined = errors.join("\n");
        for needle in [
            "autoscale.policies[0].match: is required",
            "autoscale.policies[0].factor",
            "autoscale.policies[0].min",
            "autoscale.policies[0].step_up",
            "autoscale.policies[0].what: unknown key",
        ] {
            assert!(joined.contains(needle), "{needle} missing in {joined}");
        }
    }

    #[test]
    fn datacenters_shorthand_tables_and_errors() {
        let cfg = Config::parse("").unwrap();
        assert_eq!(cfg.datacenters, vec![DatacenterConfig::local("home", true)]);
        assert_eq!(cfg.home(), "home");
        let cfg =
            Config::parse("datacenters = [\"stage\", \"lon\", \"syd\"]\nplacement = \"home\"\n")
                .unwrap();
        let names: Vec<&str> = cfg.datacenters.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["stage", "lon", "syd"]);
        assert_eq!(cfg.home(), "stage", "the first is home");
        assert_eq!(cfg.placement, Placement::Home);
        let cfg = Config::parse(
            r#"
[[datacenters]]
name = "stage"
[[datacenters]]
name = "lon"
platform = "remote"
url = "http://127.0.0.1:9001"
token_file = "/run/secrets/lon"
home = true
timeout_ms = 500
"#,
        )
        .unwrap();
        assert_eq!(cfg.home(), "lon");
        assert_eq!(
            cfg.datacenters[1].platform,
            PlatformConfig::Remote {
                url: "http://127.0.0.1:9001".into(),
                token_file: Some("/run/secrets/lon".into()),
                tls: Default::default(),
            }
        );
        assert_eq!(cfg.datacenters[1].timeout, Duration::from_millis(500));
        let errors = Config::parse(
            r#"placement = "some"
[[datacenters]]
name = "Bad Name"
[[datacenters]]
name = "lon"
platform = "remote"
home = true
[[datacenters]]
name = "lon"
platform = "cloud"
home = true
colour = "blue"
"#,
        )
        .unwrap_err();
        let joined = errors.join("\n");
        for needle in [
            "placement: must be \"all\" or \"home\"",
            "datacenters[0]: name:",
            "datacenters[1].url: is required",
            "datacenters[2].platform: \"cloud\"",
            "datacenters[2].colour: unknown key",
            "datacenters[2]: the name \"lon\" is used twice",
            "only one datacenter can be home",
        ] {
            assert!(joined.contains(needle), "{needle} missing in {joined}");
        }
        assert!(Config::parse("datacenters = []").unwrap_err()[0].contains("at least one"));
    }

    #[test]
    fn prometheus_credentials_and_tls() {
        let cfg = Config::parse(
            "[prometheus]\nurl = \"https://p:9090\"\nbasic_auth_user = \"u\"\nbasic_auth_password_file = \"/pw\"\nca_file = \"/ca.pem\"\n",
        )
        .unwrap();
        assert_eq!(cfg.prometheus.basic_auth_user.as_deref(), Some("u"));
        assert_eq!(cfg.prometheus.ca_file, Some(PathBuf::from("/ca.pem")));
        let errors = Config::parse(
            "[prometheus]\nurl = \"https://p:9090\"\nbearer_token_file = \"/t\"\nbasic_auth_user = \"u\"\n",
        )
        .unwrap_err()
        .join("\n");
        assert!(errors.contains("not both"), "{errors}");
        assert!(errors.contains("go together"), "{errors}");
    }

    #[test]
    fn alert_sizing_keys() {
        use crate::autoscale::policy::{AlertMode, StepCap};
        let cfg = Config::parse(
            r#"
[autoscale]
alert_mode = "step"
target_per_replica = 5
max_step_up = "100%"
staleness_guard = false
staleness_window_secs = 20
[[autoscale.policies]]
match = "*"
alert_mode = "proportional"
target_per_replica = 2.5
max_step_up = 4
staleness_guard = true
"#,
        )
        .unwrap();
        let a = &cfg.autoscale;
        assert_eq!(a.defaults.alert_mode, Some(AlertMode::Step));
        assert_eq!(a.defaults.target_per_replica, Some(5.0));
        assert_eq!(a.defaults.max_step_up, Some(StepCap::Percent(100)));
        assert_eq!(a.defaults.staleness_guard, Some(false));
        assert_eq!(a.staleness_window, Duration::from_secs(20));
        let o = &a.policies[0];
        assert_eq!(o.patch.alert_mode, Some(AlertMode::Proportional));
        assert_eq!(o.patch.target_per_replica, Some(2.5));
        assert_eq!(o.patch.max_step_up, Some(StepCap::Count(4)));
        assert_eq!(o.patch.staleness_guard, Some(true));
        let errors = Config::parse(
            "[autoscale]\nalert_mode = \"fast\"\ntarget_per_replica = 0\nmax_step_up = \"0%\"\n[[autoscale.policies]]\nmatch = \"*\"\nmax_step_up = 0\ntarget_per_replica = -1\n",
        )
        .unwrap_err();
        let joined = errors.join("\n");
        for needle in [
            "autoscale.alert_mode",
            "autoscale.target_per_replica",
            "autoscale.max_step_up",
            "autoscale.policies[0].max_step_up",
            "autoscale.policies[0].target_per_replica",
        ] {
            assert!(joined.contains(needle), "{needle} missing in {joined}");
        }
    }

    #[test]
    fn query_policies() {
        let cfg = Config::parse(
            r#"
[prometheus]
url = "http://127.0.0.1:9090"
[[autoscale.queries]]
name = "rps"
query = 'sum by (function_name) (rate(gateway_function_invocation_total[10s]))'
target = 5
[[autoscale.queries]]
name = "own"
source = "internal"
match = "demo-*"
strategy = "threshold"
upper = 10
lower = 1
"#,
        )
        .unwrap();
        let q = &cfg.autoscale.queries;
        assert_eq!(q.len(), 2);
        assert!(matches!(q[0].source, QuerySource::Prometheus { .. }));
        assert_eq!(
            q[1].source,
            QuerySource::Internal {
                window: Duration::from_secs(10)
            }
        );
        let errors = Config::parse(
            r#"
[[autoscale.queries]]
name = "bad"
query = "sum(rate(x[5m]) by"
[[autoscale.queries]]
name = "bad"
source = "internal"
strategy = "threshold"
"#,
        )
        .unwrap_err();
        let joined = errors.join("\n");
        for needle in [
            "autoscale.queries[0].query: invalid PromQL",
            "autoscale.queries[0].target",
            "autoscale.queries[1].upper/lower",
            "needs [prometheus] url",
            "used twice",
        ] {
            assert!(joined.contains(needle), "{needle} missing in {joined}");
        }
    }

    /// A target on an invocation rate gets the short window by default; other queries and
    /// strategies do not, and asking for one where it cannot apply names the key.
    #[test]
    fn the_short_window_is_on_for_invocation_rates() {
        let cfg = Config::parse(
            r#"
[prometheus]
url = "http://127.0.0.1:9090"
[[autoscale.queries]]
name = "rps"
query = 'sum by (function_name) (rate (gateway_function_invocation_total[1m]))'
target = 5
[[autoscale.queries]]
name = "cpu"
match = "cpu-*"
query = 'avg by (function_name) (container_cpu)'
target = 0.5
[[autoscale.queries]]
name = "cpu-fast"
match = "fast-*"
query = 'sum by (function_name) (irate(gateway_function_invocation_total[5s]))'
target = 0.5
short_window_secs = 0
[[autoscale.queries]]
name = "own"
match = "own-*"
source = "internal"
target = 10
short_window_secs = 3.5
[[autoscale.queries]]
name = "steps"
match = "steps-*"
source = "internal"
strategy = "threshold"
upper = 10
lower = 1
[[autoscale.queries]]
name = "errors"
match = "errors-*"
query = 'sum by (function_name) (rate(gateway_function_invocation_total{code=~"5.."}[1m]))'
target = 1
[[autoscale.queries]]
name = "latency"
match = "latency-*"
query = 'sum by (function_name) (rate(gateway_functions_seconds_sum[1m])) / sum by (function_name) (rate(gateway_function_invocation_total[1m]))'
target = 0.5
[[autoscale.queries]]
name = "bracketed"
match = "bracketed-*"
query = '(sum by (function_name, datacenter) (irate(gateway_function_invocation_total[5s])))'
target = 5
"#,
        )
        .unwrap();
        let windows: Vec<Option<Duration>> = cfg
            .autoscale
            .queries
            .iter()
            .map(|q| q.short_window)
            .collect();
        assert_eq!(
            windows,
            [
                Some(SHORT_WINDOW),
                None,
                None,
                Some(Duration::from_millis(3500)),
                None,
                None,
                None,
                Some(SHORT_WINDOW),
            ]
        );
        let errors = Config::parse(
            r#"
[[autoscale.queries]]
name = "steps"
source = "internal"
strategy = "threshold"
upper = 10
lower = 1
short_window_secs = 2
[[autoscale.queries]]
name = "avg"
match = "avg-*"
source = "internal"
target = 10
per_replica = true
short_window_secs = 2
[[autoscale.queries]]
name = "tiny"
match = "tiny-*"
source = "internal"
target = 10
short_window_secs = 0.2
"#,
        )
        .unwrap_err()
        .join("\n");
        for needle in [
            "autoscale.queries[0].short_window_secs: only a target strategy",
            "autoscale.queries[1].short_window_secs: only a target strategy",
            "autoscale.queries[2].short_window_secs: must be 0 (off) or from 1 to 3600 seconds, got 0.2",
        ] {
            assert!(errors.contains(needle), "{needle} missing in {errors}");
        }
    }

    #[test]
    fn a_user_and_a_user_file_together_are_refused() {
        let errors = Config::parse("[auth]\nuser = \"admin\"\nuser_file = \"/run/u\"\n")
            .unwrap_err()
            .join("\n");
        assert!(errors.contains("auth.user_file: set either"), "{errors}");
        assert!(Config::parse("[auth]\nuser_file = \"/run/u\"\n").is_ok());
    }

    #[test]
    fn syntax_error_is_reported() {
        let errors = Config::parse("listen = ").unwrap_err();
        assert_eq!(errors.len(), 1);
    }
}
