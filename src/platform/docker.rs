//! The `docker` platform: one container per replica on a Docker engine. Each replica runs in
//! its own network namespace on the default bridge network and serves on port 8080 inside (the
//! OpenFaaS contract: `port=8080`, and `faastastic_listen` for faastastic's own watchdog), so
//! any number of replicas of any images run side by side whatever ports they bind inside.
//! faastastic reaches a replica through the port the engine publishes for it on 127.0.0.1
//! (`reach = "published"`) or at its bridge address (`reach = "address"`), read back from the
//! engine every time the container starts: a restarted container gets a new port.
//!
//! Containers carry the labels `com.faastastic.function|namespace|datacenter|generation`;
//! secrets are bind-mounted read-only at `/var/openfaas/secrets`. The engine restarts a replica
//! that exits (with its own backoff); the engine's events tell faastastic, which takes it out
//! of routing, records why (exit status and last log line) for the function's status, counts it
//! in `faastastic_replica_restarts_total`, logs it once per crash loop, and routes to it again
//! once it answers its health check. A new deployment starts a new generation of containers and
//! retires the old one only once a new replica is ready, so a broken update never takes a
//! function down and a redeploy under the same name never routes to an old container.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, EventMessage, HostConfig, PortBinding,
    RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptions, EventsOptions, InspectContainerOptions, ListContainersOptions,
    LogsOptions, RemoveContainerOptions,
};
use bollard::Docker;
use futures::StreamExt;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::limits::{check_resources, parse_cpu, parse_memory};
use super::logs::LogBuffer;
use super::{
    Endpoint, LogQuery, LogSubscription, Platform, PlatformError, ReadyTable, Rollout, Workload,
};
use crate::config::{ContainerConfig, Reach};
use crate::model::{FunctionDeployment, FunctionId};
use crate::telemetry::Metrics;

pub(super) const LABEL_FUNCTION: &str = "com.faastastic.function";
pub(super) const LABEL_NAMESPACE: &str = "com.faastastic.namespace";
pub(super) const LABEL_DATACENTER: &str = "com.faastastic.datacenter";
pub(super) const LABEL_GENERATION: &str = "com.faastastic.generation";
pub(super) const SECRETS_PATH: &str = "/var/openfaas/secrets";
/// Where a replica serves inside its container: the OpenFaaS contract.
pub(super) const FUNCTION_PORT: u16 = 8080;
pub(super) const FUNCTION_PORT_KEY: &str = "8080/tcp";
/// The annotation OpenFaaS reads a function's health path from.
const HEALTH_PATH_ANNOTATION: &str = "com.openfaas.health.http.path";
/// Log lines of an exited replica shown with its first exit.
const EXIT_LINES: usize = 10;
/// A container no replica holds is removed once it is this old (younger ones may belong to a
/// change under way).
const ORPHAN_AGE: Duration = Duration::from_secs(120);
/// How long after an exit a container the engine left stopped is started again.
const RESTART_CHECK: Duration = Duration::from_secs(2);
/// How long a log follower waits for a stopped container's restart before it checks that the
/// container still exists.
const LOGS_RECHECK: Duration = Duration::from_secs(5);
/// Wait before listening to the engine's events again after the stream broke.
const EVENTS_RETRY: Duration = Duration::from_millis(500);

struct Replica {
    container: String,
    name: String,
    /// Where it serves, read from the engine at each start; `None` when the engine gave no
    /// address (the container exited before it could be read).
    endpoint: Option<Arc<Endpoint>>,
    ready: bool,
    /// Counts the replica's readiness watches: a watch that is no longer the latest stops.
    watch: u64,
    /// Why it does not serve, until it does: its last exit, or a health check that failed.
    failure: Option<String>,
    /// Exits since it last served (a crash loop is logged once).
    exits: u64,
    /// Starts the engine reported (the first is the one faastastic asked for).
    starts: u64,
    /// Told when the engine starts the container again (its log follower goes on).
    restarted: Arc<tokio::sync::Notify>,
}

struct Generation {
    number: u64,
    workload: Workload,
    replicas: Vec<Replica>,
    /// Containers started so far, for unique names.
    started: u64,
}

impl Replica {
    /// Out of routing until a new readiness watch (whose count it returns) finds it serving;
    /// earlier watches stop.
    fn leave_routing(&mut self) -> u64 {
        self.ready = false;
        self.watch += 1;
        self.watch
    }

    /// [`Replica::leave_routing`], to be watched at `endpoint` (where it serves now).
    fn rewatch(&mut self, endpoint: Option<Arc<Endpoint>>) -> u64 {
        self.endpoint = endpoint;
        self.leave_routing()
    }
}

impl Generation {
    fn ready(&self) -> Vec<Arc<Endpoint>> {
        self.replicas
            .iter()
            .filter(|r| r.ready)
            .filter_map(|r| r.endpoint.clone())
            .collect()
    }
}

struct Function {
    /// Oldest first; the last is the newest. An older one is kept until a newer one serves.
    generations: Vec<Generation>,
    desired: u64,
    logs: Arc<LogBuffer>,
}

impl Function {
    /// The newest generation's ready replicas that has any: where requests go.
    fn serving(&self) -> Vec<Arc<Endpoint>> {
        self.generations
            .iter()
            .rev()
            .map(Generation::ready)
            .find(|r| !r.is_empty())
            .unwrap_or_default()
    }

    /// Why a replica of the newest generation does not serve, if one does not.
    fn reason(&self) -> Option<&str> {
        let newest = self.generations.last()?;
        newest.replicas.iter().find_map(|r| r.failure.as_deref())
    }

    /// An update whose newest generation has no ready replica while an older one serves.
    fn rollout(&self) -> Option<Rollout> {
        let newest = self.generations.last()?;
        let stalled = self.generations.len() > 1 && newest.ready().is_empty();
        stalled.then(|| Rollout {
            ready: false,
            ready_replicas: 0,
            replicas: newest.replicas.len() as u64,
            reason: self.reason().map(str::to_string),
        })
    }

    fn replica(&mut self, container: &str) -> Option<(u64, &mut Replica)> {
        self.generations.iter_mut().find_map(|g| {
            let number = g.number;
            g.replicas
                .iter_mut()
                .find(|r| r.container == container)
                .map(|r| (number, r))
        })
    }
}

pub struct DockerPlatform {
    docker: Docker,
    datacenter: String,
    cfg: ContainerConfig,
    run_dir: PathBuf,
    functions: RwLock<HashMap<FunctionId, Arc<Mutex<Function>>>>,
    /// Read without the function's lock (the invoke path).
    table: ReadyTable,
    logs: RwLock<HashMap<FunctionId, Arc<LogBuffer>>>,
    generations: AtomicU64,
    http: reqwest::Client,
    /// Pull images the engine does not have.
    pull: bool,
    metrics: Arc<Metrics>,
    /// Stops listening to the engine's events (shutdown).
    cancel: CancellationToken,
    /// Containers of replicas being drained and removed: no replica holds them any more, but
    /// the orphan sweep leaves them to their drain.
    draining: std::sync::Mutex<HashSet<String>>,
}

pub(super) fn failed(what: &str, e: impl std::fmt::Display) -> PlatformError {
    PlatformError::Failed(format!("docker: {what}: {e}"))
}

/// An engine call's error with its causes: "cannot connect" alone does not say why.
pub(super) fn engine_failed(what: &str, e: bollard::errors::Error) -> PlatformError {
    failed(what, crate::error_chain(&e))
}

/// Connects to a Docker engine (`socket`, else `DOCKER_HOST` or the default), agrees an API
/// version with it, and empties the platform's run directory.
pub(super) async fn engine(
    socket: Option<&str>,
    run_dir: &std::path::Path,
) -> anyhow::Result<Docker> {
    let docker = match socket {
        Some(path) => Docker::connect_with_unix(
            path.trim_start_matches("unix://"),
            120,
            bollard::API_DEFAULT_VERSION,
        )?,
        None => Docker::connect_with_local_defaults()?,
    };
    let docker = docker.negotiate_version().await?;
    if run_dir.exists() {
        std::fs::remove_dir_all(run_dir)?;
    }
    std::fs::create_dir_all(run_dir)?;
    Ok(docker)
}

/// What the container platforms need of a deployment: an image and readable resources.
pub(super) fn validate_image_and_resources(
    platform: &str,
    dep: &FunctionDeployment,
) -> Result<(), String> {
    if dep.image.as_deref().is_none_or(|i| i.trim().is_empty()) {
        return Err(format!("image: is required by the {platform} platform"));
    }
    let health = dep
        .annotations
        .as_ref()
        .and_then(|a| a.get(HEALTH_PATH_ANNOTATION));
    if let Some(path) = health.filter(|p| !p.starts_with('/') || p.contains(char::is_whitespace)) {
        return Err(format!(
            "annotations.{HEALTH_PATH_ANNOTATION}: {path:?} is not a path such as /_/health"
        ));
    }
    check_resources("limits", &dep.limits)?;
    check_resources("requests", &dep.requests)
}

/// Environment of one replica: the function's, `fprocess`, the port it listens on (`port`, as
/// the OpenFaaS watchdogs read it) and `faastastic_listen` (faastastic's watchdog).
pub(super) fn replica_env(
    dep: &FunctionDeployment,
    port: u16,
    listen: &str,
    exec_timeout: Duration,
) -> Vec<String> {
    let mut env: Vec<String> = dep
        .env_vars
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if let Some(p) = dep.env_process.as_deref().filter(|p| !p.trim().is_empty()) {
        env.push(format!("fprocess={p}"));
    }
    env.push(format!("port={port}"));
    env.push(format!("faastastic_listen={listen}"));
    env.push(format!("exec_timeout={}s", exec_timeout.as_secs_f64()));
    env
}

/// The function's labels plus faastastic's, which find its containers again.
pub(super) fn replica_labels(
    id: &FunctionId,
    datacenter: &str,
    generation: u64,
    dep: &FunctionDeployment,
) -> HashMap<String, String> {
    let mut labels: HashMap<String, String> =
        dep.labels.clone().unwrap_or_default().into_iter().collect();
    labels.insert(LABEL_FUNCTION.into(), id.name.clone());
    labels.insert(LABEL_NAMESPACE.into(), id.namespace.clone());
    labels.insert(LABEL_DATACENTER.into(), datacenter.to_string());
    labels.insert(LABEL_GENERATION.into(), generation.to_string());
    labels
}

pub(super) fn secrets_dir(run_dir: &std::path::Path, id: &FunctionId, generation: u64) -> PathBuf {
    run_dir
        .join(&id.namespace)
        .join(&id.name)
        .join(generation.to_string())
}

/// Secrets as 0600 files, mounted read-only at `/var/openfaas/secrets`.
pub(super) fn write_secrets(dir: &std::path::Path, w: &Workload) -> Result<(), PlatformError> {
    let write = || -> std::io::Result<()> {
        super::local::create_private_dir(dir)?;
        for (name, value) in &w.secrets {
            super::local::write_private_file(&dir.join(name), value)?;
        }
        Ok(())
    };
    write().map_err(|e| failed("cannot write secrets", e))
}

pub(super) fn free_port() -> Result<u16, PlatformError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| failed("no free port", e))
}

impl DockerPlatform {
    /// Connects to the engine (`socket`, else `DOCKER_HOST` or the default socket), agrees an
    /// API version with it, and removes containers an earlier run left in this datacenter.
    pub async fn connect(
        socket: Option<&str>,
        pull: bool,
        datacenter: &str,
        cfg: ContainerConfig,
        run_dir: PathBuf,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<DockerPlatform>> {
        let docker = engine(socket, &run_dir).await?;
        let platform = Arc::new(DockerPlatform {
            docker,
            datacenter: datacenter.to_string(),
            cfg,
            run_dir,
            functions: RwLock::new(HashMap::new()),
            table: ReadyTable::default(),
            logs: RwLock::new(HashMap::new()),
            generations: AtomicU64::new(0),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()?,
            pull,
            metrics,
            cancel: CancellationToken::new(),
            draining: Default::default(),
        });
        for container in platform.containers(None).await? {
            platform.remove_container(&container).await?;
        }
        spawn_events(Arc::downgrade(&platform));
        Ok(platform)
    }

    /// Ids of this datacenter's containers (of one function, when given).
    async fn containers(&self, id: Option<&FunctionId>) -> Result<Vec<String>, PlatformError> {
        let mut labels = vec![format!("{LABEL_DATACENTER}={}", self.datacenter)];
        if let Some(id) = id {
            labels.push(format!("{LABEL_FUNCTION}={}", id.name));
            labels.push(format!("{LABEL_NAMESPACE}={}", id.namespace));
        }
        let list = self
            .docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(HashMap::from([("label".to_string(), labels)])),
                ..Default::default()
            }))
            .await
            .map_err(|e| engine_failed("cannot list containers", e))?;
        Ok(list.into_iter().filter_map(|c| c.id).collect())
    }

    /// Removes this datacenter's containers that no replica holds once they are older than
    /// [`ORPHAN_AGE`]: one an apply cut short by its timeout started, or one whose removal
    /// failed. A function busy with a change is looked at next time.
    async fn remove_orphans(&self) -> Result<(), PlatformError> {
        let list = self
            .docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(HashMap::from([(
                    "label".to_string(),
                    vec![format!("{LABEL_DATACENTER}={}", self.datacenter)],
                )])),
                ..Default::default()
            }))
            .await
            .map_err(|e| engine_failed("cannot list containers", e))?;
        let now = chrono::Utc::now().timestamp();
        for c in list {
            let (Some(container), Some(created)) = (c.id, c.created) else {
                continue;
            };
            let labels = c.labels.unwrap_or_default();
            let (Some(name), Some(namespace)) =
                (labels.get(LABEL_FUNCTION), labels.get(LABEL_NAMESPACE))
            else {
                continue;
            };
            if now.saturating_sub(created) < ORPHAN_AGE.as_secs() as i64 {
                continue;
            }
            let draining = self
                .draining
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&container);
            if draining {
                continue;
            }
            let id = FunctionId::new(name, namespace);
            let held = match self.entry(&id) {
                None => false,
                Some(entry) => match entry.try_lock() {
                    Ok(mut f) => f.replica(&container).is_some(),
                    Err(_) => true,
                },
            };
            if !held {
                tracing::warn!(function = %id, container, "removing a container no replica holds");
                let _ = self.remove_container(&container).await;
            }
        }
        Ok(())
    }

    /// Removes a container (stopping it); one already gone is not an error.
    async fn remove_container(&self, container: &str) -> Result<(), PlatformError> {
        let removed = self
            .docker
            .remove_container(
                container,
                Some(RemoveContainerOptions {
                    force: true,
                    ..Default::default()
                }),
            )
            .await;
        match removed {
            Ok(())
            | Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            Err(e) => {
                tracing::warn!(container, error = %e, "cannot remove container");
                Err(engine_failed(
                    &format!("cannot remove container {container}"),
                    e,
                ))
            }
        }
    }

    /// Publishes the function's desired count, serving replicas, stalled update and why a
    /// replica does not serve into the table.
    fn publish(&self, id: &FunctionId, f: &mut Function) {
        // A function removed meanwhile (its lock was waited for) has no row to come back to.
        if self.entry(id).is_none() {
            return;
        }
        let row = self.table.row(id);
        row.set_desired(f.desired);
        row.set_ready(f.serving());
        row.set_rollout(f.rollout());
        row.set_reason(f.reason());
    }

    fn entry(&self, id: &FunctionId) -> Option<Arc<Mutex<Function>>> {
        self.functions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// Creates and starts one replica of `generation`, and watches it become ready.
    async fn start_replica(
        self: &Arc<Self>,
        id: &FunctionId,
        generation: &mut Generation,
        logs: &Arc<LogBuffer>,
    ) -> Result<(), PlatformError> {
        let index = generation.started;
        generation.started += 1;
        let name = format!(
            "faastastic-{}-{}-{}-{}-{index}",
            self.datacenter, id.namespace, id.name, generation.number
        );
        let dep = &generation.workload.deployment;
        let secrets_dir = secrets_dir(&self.run_dir, id, generation.number);
        let env = replica_env(
            dep,
            FUNCTION_PORT,
            &format!("0.0.0.0:{FUNCTION_PORT}"),
            self.cfg.exec_timeout,
        );
        let labels = replica_labels(id, &self.datacenter, generation.number, dep);
        let limits = dep.limits.as_ref();
        // The engine picks a free port on loopback for each container (and at each restart).
        let published = (self.cfg.reach == Reach::Published).then(|| {
            HashMap::from([(
                FUNCTION_PORT_KEY.to_string(),
                Some(vec![PortBinding {
                    host_ip: Some("127.0.0.1".into()),
                    host_port: None,
                }]),
            )])
        });
        let body = ContainerCreateBody {
            image: dep.image.clone(),
            env: Some(env),
            labels: Some(labels),
            exposed_ports: Some(vec![FUNCTION_PORT_KEY.to_string()]),
            host_config: Some(HostConfig {
                network_mode: Some("bridge".into()),
                port_bindings: published,
                memory: limits.and_then(|l| parse_memory(l.memory.as_deref()?)),
                nano_cpus: limits.and_then(|l| parse_cpu(l.cpu.as_deref()?)),
                readonly_rootfs: dep.read_only_root_filesystem,
                binds: Some(vec![format!("{}:{SECRETS_PATH}:ro", secrets_dir.display())]),
                // The engine restarts an exited replica with its own backoff (doubling from
                // 100 ms, reset once it ran for 10 s).
                restart_policy: Some(RestartPolicy {
                    name: Some(RestartPolicyNameEnum::ALWAYS),
                    maximum_retry_count: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let created = self
            .docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name.clone()),
                    ..Default::default()
                }),
                body,
            )
            .await
            .map_err(|e| engine_failed(&format!("cannot create {name}"), e))?;
        if let Err(e) = self.docker.start_container(&created.id, None).await {
            let _ = self.remove_container(&created.id).await;
            return Err(engine_failed(&format!("cannot start {name}"), e));
        }
        let endpoint = self.endpoint(&created.id, &name).await;
        let restarted = Arc::new(tokio::sync::Notify::new());
        generation.replicas.push(Replica {
            container: created.id.clone(),
            name: name.clone(),
            endpoint,
            ready: false,
            watch: 0,
            failure: None,
            exits: 0,
            starts: 0,
            restarted: restarted.clone(),
        });
        self.follow_logs(created.id.clone(), name, logs.clone(), restarted);
        self.watch_ready(id.clone(), generation.number, created.id, 0);
        Ok(())
    }

    /// Where a started container serves, as the engine says now.
    async fn endpoint(&self, container: &str, name: &str) -> Option<Arc<Endpoint>> {
        let inspected = self
            .docker
            .inspect_container(container, None::<InspectContainerOptions>)
            .await;
        let addr = match inspected {
            Ok(c) => serving_address(&c, self.cfg.reach),
            Err(e) => {
                tracing::warn!(container = name, error = %e, "cannot inspect container");
                None
            }
        };
        addr.map(|a| Arc::new(Endpoint::new(name.to_string(), a)))
    }

    /// Forwards the container's output to the function's logs, each line once, across its
    /// restarts: when the engine's stream ends (the container stopped), it waits for the next
    /// start (`restarted`, or a few seconds) and goes on after the last line it forwarded; it
    /// ends once the engine says the container is gone, or the platform shuts down.
    fn follow_logs(
        &self,
        container: String,
        instance: String,
        logs: Arc<LogBuffer>,
        restarted: Arc<tokio::sync::Notify>,
    ) {
        let (docker, cancel) = (self.docker.clone(), self.cancel.clone());
        tokio::spawn(async move {
            // The newest line forwarded by the streams before this one.
            let mut resume: Option<i64> = None;
            loop {
                let mut stream = docker.logs(
                    &container,
                    Some(LogsOptions {
                        follow: true,
                        stdout: true,
                        stderr: true,
                        timestamps: true,
                        since: resume.map_or(0, |t| (t / 1_000_000_000) as i32),
                        tail: "all".into(),
                        ..Default::default()
                    }),
                );
                let mut newest = resume;
                while let Some(Ok(output)) = stream.next().await {
                    let text = output.to_string();
                    for (at, line) in text.lines().filter_map(stamped) {
                        // Only an earlier stream's lines are left out: within one, stdout and
                        // stderr lines may arrive out of their time order.
                        if resume.is_some_and(|resume| at <= resume) {
                            continue;
                        }
                        newest = newest.max(Some(at));
                        if !line.is_empty() {
                            logs.push(&instance, line.to_string());
                        }
                    }
                }
                resume = newest;
                tokio::select! {
                    _ = tokio::time::timeout(LOGS_RECHECK, restarted.notified()) => {}
                    _ = cancel.cancelled() => return,
                }
                let inspected = docker
                    .inspect_container(&container, None::<InspectContainerOptions>)
                    .await;
                if let Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404,
                    ..
                }) = inspected
                {
                    return;
                }
            }
        });
    }

    /// Polls the replica's health endpoint until it answers 200 (then routes to it) or the
    /// start-up timeout passes (then it is left out, and says why). `watch` is the replica's
    /// watch count when this one began: a later start of the container begins another.
    fn watch_ready(
        self: &Arc<Self>,
        id: FunctionId,
        generation: u64,
        container: String,
        watch: u64,
    ) {
        let this = self.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + this.cfg.startup_timeout;
            loop {
                let Some(entry) = this.entry(&id) else { return };
                let target = {
                    let mut f = entry.lock().await;
                    let path = health_path(
                        f.generations
                            .iter()
                            .find(|g| g.number == generation)
                            .map(|g| &g.workload.deployment),
                    );
                    match f.replica(&container) {
                        Some((_, r)) if r.watch == watch => {
                            r.endpoint.as_ref().map(|e| (e.addr, path))
                        }
                        _ => return,
                    }
                };
                let ok = match &target {
                    Some((addr, path)) => this
                        .http
                        .get(format!("http://{addr}{path}"))
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success()),
                    None => false,
                };
                let mut f = entry.lock().await;
                let Some((_, r)) = f.replica(&container).filter(|(_, r)| r.watch == watch) else {
                    return;
                };
                if ok {
                    r.ready = true;
                    r.failure = None;
                    if r.exits > 0 {
                        tracing::info!(function = %id, replica = r.name, "replica serves again after {} exits", r.exits);
                        r.exits = 0;
                    }
                    let old = this.retire_older(&mut f);
                    this.publish(&id, &mut f);
                    drop(f);
                    for g in old {
                        this.stop_replicas(g.replicas).await;
                    }
                    return;
                }
                if tokio::time::Instant::now() > deadline {
                    let why = match &target {
                        Some((addr, path)) => format!(
                            "replica not healthy within {:?}: GET http://{addr}{path} never answered 200 (the image must serve HTTP on port {FUNCTION_PORT} and answer {path}, which the annotation {HEALTH_PATH_ANNOTATION} can change; [docker] startup_timeout_secs sets the wait)",
                            this.cfg.startup_timeout
                        ),
                        None => format!(
                            "the engine gave no address for the replica within {:?} ([docker] reach = {:?})",
                            this.cfg.startup_timeout,
                            this.cfg.reach.as_str()
                        ),
                    };
                    tracing::error!(function = %id, replica = r.name, "{why}");
                    r.failure = Some(why);
                    this.publish(&id, &mut f);
                    return;
                }
                drop(f);
                tokio::time::sleep(this.cfg.health_interval).await;
            }
        });
    }

    /// One of the engine's events about this datacenter's containers.
    async fn on_event(self: &Arc<Self>, event: EventMessage) {
        let Some(id) = function_of(&event) else {
            return;
        };
        let Some(actor) = event.actor else { return };
        let (Some(container), Some(attributes)) = (actor.id, actor.attributes) else {
            return;
        };
        match event.action.as_deref() {
            Some("die") => {
                let status = attributes.get("exitCode").map(String::as_str);
                self.replica_exited(&id, &container, status.unwrap_or("unknown"))
                    .await
            }
            Some("start") => self.replica_restarted(&id, &container).await,
            _ => {}
        }
    }

    /// A replica faastastic still runs exited: out of routing, counted, and said why; the
    /// engine starts it again.
    async fn replica_exited(self: &Arc<Self>, id: &FunctionId, container: &str, status: &str) {
        let Some(entry) = self.entry(id) else { return };
        if entry.lock().await.replica(container).is_none() {
            return; // stopped by faastastic: no need to read why
        }
        let lines = last_lines(&self.docker, container).await;
        let mut f = entry.lock().await;
        let Some((_, r)) = f.replica(container) else {
            return; // stopped by faastastic
        };
        let reason = exit_reason(status, lines.telling.as_deref());
        if r.exits == 0 {
            tracing::warn!(
                function = %id,
                replica = r.name,
                last_lines = ?lines.lines,
                "{reason}; the engine restarts it"
            );
        } else {
            tracing::debug!(function = %id, replica = r.name, exits = r.exits + 1, "{reason}");
        }
        r.exits += 1;
        r.leave_routing();
        r.failure = Some(reason);
        self.metrics
            .replica_restarts
            .with_label_values(&[id.qualified().as_str(), self.datacenter.as_str()])
            .inc();
        self.publish(id, &mut f);
        drop(f);
        self.start_if_left_stopped(id.clone(), container.to_string());
    }

    /// The engine does not restart a container stopped from outside (`docker stop`, `docker
    /// kill`): a replica faastastic still runs is started again once the engine has had time
    /// to restart it itself.
    fn start_if_left_stopped(self: &Arc<Self>, id: FunctionId, container: String) {
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(RESTART_CHECK).await;
            let Some(entry) = this.entry(&id) else { return };
            if entry.lock().await.replica(&container).is_none() {
                return;
            }
            let Ok(c) = this
                .docker
                .inspect_container(&container, None::<InspectContainerOptions>)
                .await
            else {
                return;
            };
            let state = c.state.unwrap_or_default();
            let stopped = state.running != Some(true) && state.restarting != Some(true);
            if stopped {
                tracing::warn!(function = %id, container, "the engine left a replica stopped; starting it again");
                if let Err(e) = this.docker.start_container(&container, None).await {
                    tracing::warn!(function = %id, container, error = %e, "cannot start a stopped replica");
                }
            }
        });
    }

    /// The engine started a replica: the first start is the one `start_replica` asked for;
    /// any later one is a restart (its exit may have gone unreported): out of routing until it
    /// answers again, at the address the engine gives now (a new port), its log follower told.
    async fn replica_restarted(self: &Arc<Self>, id: &FunctionId, container: &str) {
        let Some(entry) = self.entry(id) else { return };
        let name = {
            let mut f = entry.lock().await;
            let Some((_, r)) = f.replica(container) else {
                return;
            };
            r.starts += 1;
            if r.starts == 1 {
                return;
            }
            r.name.clone()
        };
        let endpoint = self.endpoint(container, &name).await;
        let mut f = entry.lock().await;
        let Some((generation, r)) = f.replica(container) else {
            return;
        };
        let watch = r.rewatch(endpoint);
        r.restarted.notify_one();
        self.publish(id, &mut f);
        drop(f);
        self.watch_ready(id.clone(), generation, container.to_string(), watch);
    }

    /// After the engine's events broke off (some may be lost for good, e.g. when the engine
    /// restarted): every replica whose container is not running, or serves at another address
    /// now, leaves routing and is watched again.
    async fn resync(self: &Arc<Self>) {
        let entries: Vec<(FunctionId, Arc<Mutex<Function>>)> = self
            .functions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, f)| (id.clone(), f.clone()))
            .collect();
        for (id, entry) in entries {
            let mut f = entry.lock().await;
            let mut watches = Vec::new();
            for g in &mut f.generations {
                for r in &mut g.replicas {
                    let inspected = self
                        .docker
                        .inspect_container(&r.container, None::<InspectContainerOptions>)
                        .await;
                    let Ok(c) = inspected else { continue };
                    let running = c.state.as_ref().and_then(|s| s.running) == Some(true);
                    let addr = serving_address(&c, self.cfg.reach);
                    if running && addr == r.endpoint.as_ref().map(|e| e.addr) {
                        continue;
                    }
                    let endpoint = addr.map(|a| Arc::new(Endpoint::new(r.name.clone(), a)));
                    watches.push((g.number, r.container.clone(), r.rewatch(endpoint)));
                }
            }
            if watches.is_empty() {
                continue;
            }
            self.publish(&id, &mut f);
            drop(f);
            tracing::info!(function = %id, replicas = watches.len(), "replicas changed while the engine's events were away: watched again");
            for (generation, container, watch) in watches {
                self.watch_ready(id.clone(), generation, container, watch);
            }
        }
    }

    /// Once the newest generation has a ready replica, older generations leave service; the
    /// caller stops them after publishing.
    fn retire_older(&self, f: &mut Function) -> Vec<Generation> {
        match f.generations.last() {
            Some(newest) if !newest.ready().is_empty() && f.generations.len() > 1 => {
                f.generations.drain(..f.generations.len() - 1).collect()
            }
            _ => Vec::new(),
        }
    }

    /// Takes replicas out of service: off the endpoints first (by the caller), then drained of
    /// in-flight requests (bounded), then removed.
    async fn stop_replicas(&self, replicas: Vec<Replica>) {
        let draining = |container: &str, now: bool| {
            let mut set = self.draining.lock().unwrap_or_else(|p| p.into_inner());
            match now {
                true => set.insert(container.to_string()),
                false => set.remove(container),
            };
        };
        futures::future::join_all(replicas.into_iter().map(|r| async move {
            draining(&r.container, true);
            if let Some(endpoint) = &r.endpoint {
                endpoint.retire(self.cfg.drain_timeout).await;
            }
            // One that cannot be removed now is an orphan that `list` removes later.
            let _ = self.remove_container(&r.container).await;
            draining(&r.container, false);
        }))
        .await;
    }

    async fn ensure_image(&self, image: &str) -> Result<(), PlatformError> {
        match self.docker.inspect_image(image).await {
            Ok(_) => return Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => {}
            Err(e) => return Err(engine_failed(&format!("cannot look up image {image:?}"), e)),
        }
        if !self.pull {
            return Err(PlatformError::Failed(format!(
                "docker: image {image:?} is not on this engine (pull = false: load or build it there first)"
            )));
        }
        let pull = self
            .docker
            .create_image(
                Some(bollard::query_parameters::CreateImageOptions {
                    from_image: Some(image.to_string()),
                    ..Default::default()
                }),
                None,
                None,
            )
            .collect::<Vec<_>>()
            .await;
        match pull.into_iter().find_map(Result::err) {
            None => Ok(()),
            Some(e) => Err(engine_failed(
                &format!("image {image:?} is not on this engine and cannot be pulled"),
                e,
            )),
        }
    }
}

/// Listens to the engine's container events of the platform's datacenter while the platform
/// lives. Each function's events are handled in order by a task of its own, so a function
/// busy starting replicas holds up no other's. After the stream breaks it listens again from
/// the last event it saw, and resyncs the replicas with the engine (events an engine restart
/// lost are not replayed).
fn spawn_events(platform: std::sync::Weak<DockerPlatform>) {
    tokio::spawn(async move {
        let mut last = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default();
        let mut broken = false;
        let mut workers: HashMap<FunctionId, tokio::sync::mpsc::UnboundedSender<EventMessage>> =
            HashMap::new();
        loop {
            let Some(p) = platform.upgrade() else { return };
            let (docker, cancel) = (p.docker.clone(), p.cancel.clone());
            let filters = HashMap::from([
                ("type".to_string(), vec!["container".to_string()]),
                (
                    "event".to_string(),
                    vec!["die".to_string(), "start".to_string()],
                ),
                (
                    "label".to_string(),
                    vec![format!("{LABEL_DATACENTER}={}", p.datacenter)],
                ),
            ]);
            if broken {
                p.resync().await;
            }
            drop(p);
            let mut events = docker.events(Some(EventsOptions {
                since: Some(format!(
                    "{}.{:09}",
                    last / 1_000_000_000,
                    last % 1_000_000_000
                )),
                filters: Some(filters),
                ..Default::default()
            }));
            loop {
                let next = tokio::select! {
                    next = events.next() => next,
                    _ = cancel.cancelled() => return,
                };
                let event = match next {
                    Some(Ok(event)) => event,
                    Some(Err(e)) => {
                        if !broken {
                            tracing::warn!(error = %e, "the engine's events stopped; listening again");
                        }
                        broken = true;
                        break;
                    }
                    None => {
                        broken = true;
                        break;
                    }
                };
                if let Some(at) = event.time_nano {
                    if at <= last {
                        continue; // seen before the stream broke
                    }
                    last = at;
                }
                let Some(id) = function_of(&event) else {
                    continue;
                };
                let Some(p) = platform.upgrade() else { return };
                workers.retain(|id, tx| !tx.is_closed() && p.entry(id).is_some());
                drop(p);
                let worker = workers
                    .entry(id)
                    .or_insert_with(|| spawn_event_worker(platform.clone()));
                let _ = worker.send(event);
            }
            tokio::select! {
                _ = tokio::time::sleep(EVENTS_RETRY) => {}
                _ = cancel.cancelled() => return,
            }
        }
    });
}

/// Handles one function's events in their order.
fn spawn_event_worker(
    platform: std::sync::Weak<DockerPlatform>,
) -> tokio::sync::mpsc::UnboundedSender<EventMessage> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(event) = rx.recv().await {
            let Some(p) = platform.upgrade() else { return };
            p.on_event(event).await;
        }
    });
    tx
}

/// The function an event's container belongs to, from its labels.
fn function_of(event: &EventMessage) -> Option<FunctionId> {
    let attributes = event.actor.as_ref()?.attributes.as_ref()?;
    Some(FunctionId::new(
        attributes.get(LABEL_FUNCTION)?,
        attributes.get(LABEL_NAMESPACE)?,
    ))
}

/// Where a container serves: the port the engine published for 8080 on loopback, or its
/// address on its network.
fn serving_address(c: &ContainerInspectResponse, reach: Reach) -> Option<std::net::SocketAddr> {
    let settings = c.network_settings.as_ref()?;
    match reach {
        Reach::Address => settings
            .networks
            .as_ref()?
            .values()
            .filter_map(|n| n.ip_address.as_deref()?.parse::<std::net::IpAddr>().ok())
            .next()
            .map(|ip| std::net::SocketAddr::new(ip, FUNCTION_PORT)),
        _ => settings
            .ports
            .as_ref()?
            .get(FUNCTION_PORT_KEY)?
            .as_ref()?
            .iter()
            .filter(|b| b.host_ip.as_deref().is_none_or(|ip| ip == "127.0.0.1"))
            .find_map(|b| b.host_port.as_deref()?.parse::<u16>().ok())
            .map(|port| std::net::SocketAddr::from(([127, 0, 0, 1], port))),
    }
}

/// The health path of a deployment's replicas: OpenFaaS's annotation, else the watchdogs'.
pub(super) fn health_path(deployment: Option<&FunctionDeployment>) -> String {
    deployment
        .and_then(|d| d.annotations.as_ref())
        .and_then(|a| a.get(HEALTH_PATH_ANNOTATION))
        .cloned()
        .unwrap_or_else(|| super::watchdog::HEALTH_PATH.to_string())
}

/// The last lines a container wrote (an exited one's, to say why).
pub(super) struct LastLines {
    /// Both streams, as the engine gives them.
    pub lines: Vec<String>,
    /// The last line on standard error (where a failing program says why), else the last one.
    pub telling: Option<String>,
}

pub(super) async fn last_lines(docker: &Docker, container: &str) -> LastLines {
    let mut stream = docker.logs(
        container,
        Some(LogsOptions {
            stdout: true,
            stderr: true,
            tail: EXIT_LINES.to_string(),
            ..Default::default()
        }),
    );
    let (mut lines, mut error) = (Vec::new(), None);
    while let Some(Ok(output)) = stream.next().await {
        let stderr = matches!(output, bollard::container::LogOutput::StdErr { .. });
        for line in output.to_string().lines().map(str::trim_end) {
            if line.is_empty() {
                continue;
            }
            if stderr {
                error = Some(line.to_string());
            }
            lines.push(line.to_string());
        }
    }
    let skip = lines.len().saturating_sub(EXIT_LINES);
    let lines = lines.split_off(skip);
    LastLines {
        telling: error.or_else(|| lines.last().cloned()),
        lines,
    }
}

/// "replica exited with status 2: bind: address already in use", the status as the engine
/// gave it, with the signal for a status above 128.
pub(super) fn exit_reason(status: &str, last_line: Option<&str>) -> String {
    let mut reason = format!("replica exited with status {status}");
    if let Some(signal) = status
        .parse::<i64>()
        .ok()
        .filter(|s| (129..=192).contains(s))
    {
        let signal = signal - 128;
        reason.push_str(&format!(" (signal {signal}"));
        if signal == 9 {
            reason.push_str(", killed: out of memory?");
        }
        reason.push(')');
    }
    if let Some(line) = last_line {
        const MAX: usize = 200;
        let line = match line.char_indices().nth(MAX) {
            Some((at, _)) => format!("{}...", &line[..at]),
            None => line.to_string(),
        };
        reason.push_str(": ");
        reason.push_str(&line);
    }
    reason
}

/// A log line with the engine's timestamp (`timestamps: true`): the time in nanoseconds and the
/// text.
fn stamped(line: &str) -> Option<(i64, &str)> {
    let (at, text) = line.split_once(' ').unwrap_or((line, ""));
    let at = chrono::DateTime::parse_from_rfc3339(at).ok()?;
    Some((at.timestamp_nanos_opt()?, text))
}

/// The platform's handle: the trait needs `&self`, the background tasks an `Arc`.
pub struct DockerHandle(pub Arc<DockerPlatform>);

#[async_trait]
impl Platform for DockerHandle {
    fn kind(&self) -> &'static str {
        "docker"
    }

    fn validate(&self, dep: &FunctionDeployment) -> Result<(), String> {
        validate_image_and_resources("docker", dep)
    }

    async fn apply(&self, workload: Workload, replicas: u64) -> Result<(), PlatformError> {
        let p = &self.0;
        let id = workload.id.clone();
        p.ensure_image(workload.deployment.image.as_deref().unwrap_or_default())
            .await?;
        // The function's restart series at zero from its deploy, for rate() and increase().
        p.metrics
            .replica_restarts
            .with_label_values(&[id.qualified().as_str(), p.datacenter.as_str()]);
        let number = p.generations.fetch_add(1, Ordering::Relaxed) + 1;
        write_secrets(&secrets_dir(&p.run_dir, &id, number), &workload)?;
        let entry = {
            let mut functions = p.functions.write().unwrap_or_else(|e| e.into_inner());
            functions
                .entry(id.clone())
                .or_insert_with(|| {
                    let logs = Arc::new(LogBuffer::new(&id.name, &id.namespace, p.cfg.log_lines));
                    p.logs
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(id.clone(), logs.clone());
                    Arc::new(Mutex::new(Function {
                        generations: Vec::new(),
                        desired: 0,
                        logs,
                    }))
                })
                .clone()
        };
        let mut f = entry.lock().await;
        let mut generation = Generation {
            number,
            workload,
            replicas: Vec::new(),
            started: 0,
        };
        let logs = f.logs.clone();
        for _ in 0..replicas {
            if let Err(e) = p.start_replica(&id, &mut generation, &logs).await {
                p.stop_replicas(generation.replicas).await;
                return Err(e);
            }
        }
        f.desired = replicas;
        f.generations.push(generation);
        // At zero replicas there is nothing to wait for: the new spec replaces the old at once.
        let old: Vec<Generation> = if replicas == 0 {
            let keep = f.generations.len() - 1;
            f.generations.drain(..keep).collect()
        } else {
            Vec::new()
        };
        p.publish(&id, &mut f);
        drop(f);
        for g in old {
            p.stop_replicas(g.replicas).await;
        }
        Ok(())
    }

    async fn scale(&self, id: &FunctionId, replicas: u64) -> Result<(), PlatformError> {
        let p = &self.0;
        let entry = p
            .entry(id)
            .ok_or_else(|| PlatformError::Failed(format!("function {id} is not deployed")))?;
        let mut f = entry.lock().await;
        f.desired = replicas;
        let logs = f.logs.clone();
        let Some(newest) = f.generations.last_mut() else {
            return Ok(());
        };
        let current = newest.replicas.len() as u64;
        if replicas > current {
            for _ in current..replicas {
                p.start_replica(id, newest, &logs).await?;
            }
            p.publish(id, &mut f);
        } else if replicas < current {
            // Not-ready replicas go first, then the newest ones.
            newest.replicas.sort_by_key(|r| r.ready);
            let extra: Vec<Replica> = newest
                .replicas
                .drain(..(current - replicas) as usize)
                .collect();
            p.publish(id, &mut f);
            drop(f);
            p.stop_replicas(extra).await;
        } else {
            p.publish(id, &mut f);
        }
        Ok(())
    }

    async fn remove(&self, id: &FunctionId) -> Result<(), PlatformError> {
        let p = &self.0;
        let entry = p
            .functions
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        let generations: Vec<Generation> = match entry {
            // Whoever held the function's lock has published; later holders find it gone.
            Some(entry) => entry.lock().await.generations.drain(..).collect(),
            None => Vec::new(),
        };
        p.table.remove(id);
        p.logs.write().unwrap_or_else(|e| e.into_inner()).remove(id);
        for g in generations {
            p.stop_replicas(g.replicas).await;
        }
        // Anything left behind (a container started by an earlier run, say): the call fails,
        // naming it, when one cannot be removed, and the reconciler removes it later.
        let mut failed = None;
        for container in p.containers(Some(id)).await? {
            if let Err(e) = p.remove_container(&container).await {
                failed.get_or_insert(e);
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// What the table holds; containers no replica holds are removed on the way (the
    /// reconciler lists every pass).
    async fn list(&self) -> Result<Vec<(FunctionId, u64)>, PlatformError> {
        if let Err(e) = self.0.remove_orphans().await {
            tracing::debug!(error = %e, "cannot look for containers no replica holds");
        }
        Ok(self.0.table.desired())
    }

    async fn healthcheck(&self) -> Result<(), PlatformError> {
        self.0
            .docker
            .ping()
            .await
            .map(|_| ())
            .map_err(|e| engine_failed("the engine does not answer", e))
    }

    fn table(&self) -> &ReadyTable {
        &self.0.table
    }

    fn logs(&self, id: &FunctionId, query: &LogQuery) -> Option<LogSubscription> {
        let logs = self.0.logs.read().unwrap_or_else(|e| e.into_inner());
        logs.get(id).map(|l| l.subscribe(query))
    }

    async fn shutdown(&self) {
        let p = &self.0;
        p.cancel.cancel();
        match p.containers(None).await {
            Ok(list) => {
                futures::future::join_all(list.iter().map(|c| p.remove_container(c))).await;
            }
            Err(e) => tracing::warn!(error = %e, "cannot list containers to stop"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exit_reads_as_its_status_signal_and_last_line() {
        assert_eq!(
            exit_reason("2", Some("listen tcp :8081: bind: address already in use")),
            "replica exited with status 2: listen tcp :8081: bind: address already in use"
        );
        assert_eq!(
            exit_reason("137", None),
            "replica exited with status 137 (signal 9, killed: out of memory?)"
        );
        assert_eq!(
            exit_reason("143", Some("bye")),
            "replica exited with status 143 (signal 15): bye"
        );
        let long = "é".repeat(300);
        let reason = exit_reason("1", Some(&long));
        assert!(reason.ends_with("..."), "{reason}");
        assert_eq!(reason.chars().filter(|c| *c == 'é').count(), 200);
    }

    #[test]
    fn a_stamped_log_line_splits_into_time_and_text() {
        let (at, text) = stamped("2026-12-05T08:30:00.000000123Z hello world").unwrap();
        assert_eq!(text, "hello world");
        assert_eq!(at % 1_000_000_000, 123);
        assert_eq!(stamped("2026-12-05T08:30:00Z").unwrap().1, "");
        assert_eq!(stamped("no time here"), None);
    }

    #[test]
    fn a_replica_is_reached_where_the_engine_says() {
        let c: ContainerInspectResponse = serde_json::from_value(serde_json::json!({
            "NetworkSettings": {
                "Ports": {"8080/tcp": [
                    {"HostIp": "::1", "HostPort": "40001"},
                    {"HostIp": "127.0.0.1", "HostPort": "40000"}
                ]},
                "Networks": {"bridge": {"IPAddress": "172.17.0.5"}}
            }
        }))
        .unwrap();
        assert_eq!(
            serving_address(&c, Reach::Published),
            Some("127.0.0.1:40000".parse().unwrap())
        );
        assert_eq!(
            serving_address(&c, Reach::Address),
            Some("172.17.0.5:8080".parse().unwrap())
        );
        let exited: ContainerInspectResponse = serde_json::from_value(serde_json::json!({
            "NetworkSettings": {"Ports": {}, "Networks": {"bridge": {"IPAddress": ""}}}
        }))
        .unwrap();
        assert_eq!(serving_address(&exited, Reach::Published), None);
        assert_eq!(serving_address(&exited, Reach::Address), None);
    }
}
