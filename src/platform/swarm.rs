//! The `swarm` platform: one Docker Swarm service per function, scaled by updating the
//! service's replica count; endpoints come from the service's running tasks.
//!
//! By default (`reach = "published"`) every task runs in its own network namespace, serves on
//! port 8080 inside (the OpenFaaS contract), and is published in host mode on a port the node
//! assigns to that task, which faastastic reads from the task's status; a task on faastastic's
//! own node is reached on 127.0.0.1, one on another node at the node's address. Any number of
//! tasks of any image share a node. With `reach = "slot"`, tasks use the host network and
//! listen on the loopback address of their slot (`127.0.1.SLOT:PORT`, through the
//! `{{.Task.Slot}}` template in `faastastic_listen`), for images that honour it.
//!
//! An update's new tasks start beside the old ones (`start-first`). Only tasks of the newest
//! generation that answer their health check are routed to (older ones until a new one does),
//! so a redeploy never reaches an old task. Swarm's ingress routing mesh is not used. A task
//! that fails is replaced by Swarm; faastastic counts it, logs it once per crash loop and
//! shows why (exit status and last log line) in the function's status.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bollard::models::{
    EndpointPortConfig, EndpointPortConfigProtocolEnum, EndpointPortConfigPublishModeEnum,
    EndpointSpec, Limit, Mount, MountType, NetworkAttachmentConfig, ServiceSpec, ServiceSpecMode,
    ServiceSpecModeReplicated, ServiceSpecUpdateConfig, ServiceSpecUpdateConfigOrderEnum, Task,
    TaskSpec, TaskSpecContainerSpec, TaskSpecResources, TaskSpecRestartPolicy,
    TaskSpecRestartPolicyConditionEnum, TaskState,
};
use bollard::query_parameters::{
    InspectServiceOptions, ListServicesOptions, ListTasksOptions, UpdateServiceOptions,
};
use bollard::Docker;

use super::docker::{
    engine, engine_failed, exit_reason, failed, free_port, health_path, last_lines, replica_env,
    replica_labels, secrets_dir, validate_image_and_resources, write_secrets, LastLines,
    FUNCTION_PORT, LABEL_DATACENTER, LABEL_GENERATION, SECRETS_PATH,
};
use super::limits::{parse_cpu, parse_memory};
use super::{Endpoint, Platform, PlatformError, ReadyTable, Workload};
use crate::config::{ContainerConfig, Reach};
use crate::model::{FunctionDeployment, FunctionId};
use crate::telemetry::Metrics;

/// How often tasks are listed and new ones health-checked.
const POLL: Duration = Duration::from_millis(300);
/// Wait before a failed task starts again.
const RESTART_DELAY: Duration = Duration::from_millis(200);
/// Slots map to 127.0.1.SLOT.
const MAX_SLOT: i64 = 254;

struct Service {
    name: String,
    /// The newest generation, and every generation still running with its port (the port
    /// is used with `reach = "slot"` only).
    generation: u64,
    ports: HashMap<u64, u16>,
    /// Each running generation's health path.
    health: HashMap<u64, String>,
    /// Tasks that answered their health check, with their endpoint (kept, so in-flight
    /// counts survive a refresh).
    healthy: HashMap<String, Arc<Endpoint>>,
    /// Failed tasks already counted (those Swarm still lists).
    failures: HashSet<String>,
    /// Why a task of the newest generation does not serve, until they all do.
    reason: Option<String>,
}

/// A task that failed: its id, container and what Swarm says of it.
struct Failure {
    task: String,
    container: Option<String>,
    exit_code: Option<i64>,
    err: Option<String>,
}

pub struct SwarmPlatform {
    docker: Docker,
    datacenter: String,
    cfg: ContainerConfig,
    run_dir: PathBuf,
    services: RwLock<HashMap<FunctionId, Service>>,
    table: ReadyTable,
    generations: AtomicU64,
    http: reqwest::Client,
    metrics: Arc<Metrics>,
    /// This engine's node when faastastic runs beside it (its tasks are reached on loopback);
    /// empty otherwise.
    node: String,
    /// Other nodes' addresses, looked up once.
    nodes: RwLock<HashMap<String, std::net::IpAddr>>,
}

fn service_name(datacenter: &str, id: &FunctionId) -> String {
    format!("faastastic-{datacenter}-{}-{}", id.namespace, id.name)
}

impl SwarmPlatform {
    /// Connects to the engine (which must be a swarm manager) and removes services an earlier
    /// run left in this datacenter.
    pub async fn connect(
        socket: Option<&str>,
        datacenter: &str,
        cfg: ContainerConfig,
        run_dir: PathBuf,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<SwarmPlatform>> {
        let docker = engine(socket, &run_dir).await?;
        docker.inspect_swarm().await.map_err(|e| {
            anyhow::anyhow!("this engine is not a swarm manager (docker swarm init): {e}")
        })?;
        // Tasks on the engine's own node are reached on loopback only when faastastic runs
        // beside it (a local socket); otherwise at their node's address like any other.
        let local = match socket {
            Some(s) => !s.starts_with("tcp://"),
            None => std::env::var("DOCKER_HOST").map_or(true, |h| h.starts_with("unix://")),
        };
        let node = match local {
            true => docker
                .info()
                .await?
                .swarm
                .and_then(|s| s.node_id)
                .unwrap_or_default(),
            false => String::new(),
        };
        let platform = Arc::new(SwarmPlatform {
            docker,
            datacenter: datacenter.to_string(),
            cfg,
            run_dir,
            services: RwLock::new(HashMap::new()),
            table: ReadyTable::default(),
            generations: AtomicU64::new(0),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(1))
                .build()?,
            metrics,
            node,
            nodes: RwLock::new(HashMap::new()),
        });
        for service in platform.leftovers().await? {
            let _ = platform.docker.delete_service(&service).await;
        }
        spawn_poller(Arc::downgrade(&platform));
        Ok(platform)
    }

    async fn leftovers(&self) -> Result<Vec<String>, PlatformError> {
        let list = self
            .docker
            .list_services(Some(ListServicesOptions {
                filters: Some(HashMap::from([(
                    "label".to_string(),
                    vec![format!("{LABEL_DATACENTER}={}", self.datacenter)],
                )])),
                ..Default::default()
            }))
            .await
            .map_err(|e| engine_failed("cannot list services", e))?;
        Ok(list
            .into_iter()
            .filter_map(|s| s.spec.and_then(|s| s.name))
            .collect())
    }

    fn spec(
        &self,
        id: &FunctionId,
        workload: &Workload,
        generation: u64,
        port: u16,
        replicas: u64,
    ) -> ServiceSpec {
        let dep = &workload.deployment;
        let labels = replica_labels(id, &self.datacenter, generation, dep);
        let limits = dep.limits.as_ref();
        let slots = self.cfg.reach == Reach::Slot;
        let (port, listen) = match slots {
            true => (port, format!("127.0.1.{{{{.Task.Slot}}}}:{port}")),
            false => (FUNCTION_PORT, format!("0.0.0.0:{FUNCTION_PORT}")),
        };
        // Each task publishes 8080 on a port its node picks.
        let published = EndpointSpec {
            ports: Some(vec![EndpointPortConfig {
                protocol: Some(EndpointPortConfigProtocolEnum::TCP),
                target_port: Some(FUNCTION_PORT.into()),
                publish_mode: Some(EndpointPortConfigPublishModeEnum::HOST),
                ..Default::default()
            }]),
            ..Default::default()
        };
        ServiceSpec {
            name: Some(service_name(&self.datacenter, id)),
            labels: Some(labels.clone()),
            task_template: Some(TaskSpec {
                container_spec: Some(TaskSpecContainerSpec {
                    image: dep.image.clone(),
                    labels: Some(labels),
                    env: Some(replica_env(dep, port, &listen, self.cfg.exec_timeout)),
                    read_only: dep.read_only_root_filesystem,
                    mounts: Some(vec![Mount {
                        target: Some(SECRETS_PATH.to_string()),
                        source: Some(
                            secrets_dir(&self.run_dir, id, generation)
                                .display()
                                .to_string(),
                        ),
                        typ: Some(MountType::BIND),
                        read_only: Some(true),
                        ..Default::default()
                    }]),
                    stop_grace_period: Some(self.cfg.drain_timeout.as_nanos() as i64),
                    ..Default::default()
                }),
                resources: Some(TaskSpecResources {
                    limits: Some(Limit {
                        memory_bytes: limits.and_then(|l| parse_memory(l.memory.as_deref()?)),
                        nano_cpus: limits.and_then(|l| parse_cpu(l.cpu.as_deref()?)),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                networks: slots.then(|| {
                    vec![NetworkAttachmentConfig {
                        target: Some("host".to_string()),
                        ..Default::default()
                    }]
                }),
                // A task started in a slot whose previous task is still stopping finds its
                // address taken for a moment: retry soon rather than after Swarm's default 5 s
                // (and a failed task is replaced as soon in either mode).
                restart_policy: Some(TaskSpecRestartPolicy {
                    condition: Some(TaskSpecRestartPolicyConditionEnum::ANY),
                    delay: Some(RESTART_DELAY.as_nanos() as i64),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            mode: Some(ServiceSpecMode {
                replicated: Some(ServiceSpecModeReplicated {
                    replicas: Some(replicas as i64),
                }),
                ..Default::default()
            }),
            update_config: Some(ServiceSpecUpdateConfig {
                parallelism: Some(0),
                order: Some(ServiceSpecUpdateConfigOrderEnum::START_FIRST),
                ..Default::default()
            }),
            endpoint_spec: (!slots).then_some(published),
            ..Default::default()
        }
    }

    /// The service's current spec and version, to update it.
    async fn current(&self, name: &str) -> Result<(ServiceSpec, i32), PlatformError> {
        let service = self
            .docker
            .inspect_service(name, None::<InspectServiceOptions>)
            .await
            .map_err(|e| engine_failed(&format!("cannot inspect service {name}"), e))?;
        let version = service
            .version
            .and_then(|v| v.index)
            .ok_or_else(|| failed(name, "service without a version"))?;
        let spec = service
            .spec
            .ok_or_else(|| failed(name, "service without a spec"))?;
        Ok((spec, version as i32))
    }

    async fn update(
        &self,
        name: &str,
        spec: ServiceSpec,
        version: i32,
    ) -> Result<(), PlatformError> {
        self.docker
            .update_service(
                name,
                spec,
                UpdateServiceOptions {
                    version,
                    ..Default::default()
                },
                None,
            )
            .await
            .map(|_| ())
            .map_err(|e| engine_failed(&format!("cannot update service {name}"), e))
    }

    /// Lists every service's tasks, health-checks new running ones, routes to the newest
    /// generation that has a healthy task, and records failed ones.
    async fn refresh(&self) {
        let names: Vec<(FunctionId, String)> = self
            .services
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, s)| (id.clone(), s.name.clone()))
            .collect();
        for (id, name) in names {
            let tasks = match self
                .docker
                .list_tasks(Some(ListTasksOptions {
                    filters: Some(HashMap::from([("service".to_string(), vec![name.clone()])])),
                }))
                .await
            {
                Ok(t) => t,
                Err(e) => {
                    tracing::debug!(service = %name, error = %e, "cannot list tasks");
                    continue;
                }
            };
            let (ports, health_paths, current) = match self
                .services
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(&id)
            {
                Some(s) => (s.ports.clone(), s.health.clone(), s.generation),
                None => continue,
            };
            let listed: HashSet<String> = tasks.iter().filter_map(|t| t.id.clone()).collect();
            // (task id, generation, address) of running tasks; failed ones.
            let mut running = Vec::new();
            let mut failures = Vec::new();
            for t in tasks {
                let state = t.status.as_ref().and_then(|s| s.state);
                let generation = t
                    .spec
                    .as_ref()
                    .and_then(|s| s.container_spec.as_ref())
                    .and_then(|c| c.labels.as_ref())
                    .and_then(|l| l.get(LABEL_GENERATION)?.parse::<u64>().ok());
                match what_task(state, t.desired_state, generation, current) {
                    TaskIs::Crashed => failures.push(failure(t)),
                    TaskIs::Serving => {
                        let (Some(task), Some(generation)) = (t.id.clone(), generation) else {
                            continue;
                        };
                        if let Some(addr) = self.address(&t, ports.get(&generation)).await {
                            running.push((task, generation, addr));
                        }
                    }
                    TaskIs::Neither => {}
                }
            }
            let known: HashSet<String> = self
                .services
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(&id)
                .map(|s| s.healthy.keys().cloned().collect())
                .unwrap_or_default();
            let mut newly = Vec::new();
            for (task, generation, addr) in running.iter().filter(|(t, _, _)| !known.contains(t)) {
                let health = health_paths
                    .get(generation)
                    .map_or("/_/health", String::as_str);
                let url = format!("http://{addr}{health}");
                let ok = self
                    .http
                    .get(&url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if ok {
                    newly.push((task.clone(), Arc::new(Endpoint::new(task.clone(), *addr))));
                }
            }
            let reasons = self.new_failures(&id, failures).await;
            let desired = self.table.replicas(&id).desired;
            let mut services = self.services.write().unwrap_or_else(|p| p.into_inner());
            let Some(s) = services.get_mut(&id) else {
                continue;
            };
            let alive: HashSet<&String> = running.iter().map(|(t, _, _)| t).collect();
            s.healthy.retain(|t, _| alive.contains(t));
            s.healthy.extend(newly);
            let by_generation = |g: u64| -> Vec<Arc<Endpoint>> {
                running
                    .iter()
                    .filter(|(_, gen, _)| *gen == g)
                    .filter_map(|(t, _, _)| s.healthy.get(t).cloned())
                    .collect()
            };
            let newest = by_generation(s.generation).len() as u64;
            let mut generations: Vec<u64> = s.ports.keys().copied().collect();
            generations.sort_unstable_by(|a, b| b.cmp(a));
            let serving = generations
                .iter()
                .map(|g| (*g, by_generation(*g)))
                .find(|(_, e)| !e.is_empty());
            let endpoints = match serving {
                Some((g, e)) => {
                    // Generations older than the serving one are gone for good.
                    s.ports.retain(|gen, _| *gen >= g);
                    s.health.retain(|gen, _| *gen >= g);
                    e
                }
                None => Vec::new(),
            };
            self.record_failures(&id, s, reasons, &listed, newest >= desired);
            let row = self.table.row(&id);
            row.set_ready(endpoints);
            row.set_reason(s.reason.as_deref());
        }
    }

    /// Where a running task serves: its slot's address (`reach = "slot"`, with its
    /// generation's port), else the port its node published for it on that node.
    async fn address(&self, task: &Task, slot_port: Option<&u16>) -> Option<std::net::SocketAddr> {
        if self.cfg.reach == Reach::Slot {
            let slot = task.slot.filter(|s| (1..=MAX_SLOT).contains(s))?;
            return Some(std::net::SocketAddr::from((
                [127, 0, 1, slot as u8],
                *slot_port?,
            )));
        }
        let port = task
            .status
            .as_ref()?
            .port_status
            .as_ref()?
            .ports
            .as_ref()?
            .iter()
            .filter(|p| p.target_port == Some(FUNCTION_PORT.into()))
            .find_map(|p| u16::try_from(p.published_port?).ok())?;
        let node = task.node_id.as_deref()?;
        Some(std::net::SocketAddr::new(
            self.node_address(node).await?,
            port,
        ))
    }

    /// A node's address: loopback for this engine's own node.
    async fn node_address(&self, node: &str) -> Option<std::net::IpAddr> {
        if !self.node.is_empty() && node == self.node {
            return Some(std::net::Ipv4Addr::LOCALHOST.into());
        }
        if let Some(ip) = self
            .nodes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
        {
            return Some(*ip);
        }
        let inspected = self.docker.inspect_node(node).await;
        let ip = inspected
            .ok()?
            .status?
            .addr?
            .parse::<std::net::IpAddr>()
            .ok()
            .filter(|ip| !ip.is_unspecified())?;
        self.nodes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node.to_string(), ip);
        Some(ip)
    }

    /// The failures not counted yet, each with why (its exit status and last log line, when
    /// this engine holds its container) and its last lines, read before the services' lock
    /// is taken.
    async fn new_failures(
        &self,
        id: &FunctionId,
        failures: Vec<Failure>,
    ) -> Vec<(Failure, String, Vec<String>)> {
        let counted: HashSet<String> = self
            .services
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(|s| s.failures.clone())
            .unwrap_or_default();
        let mut out = Vec::new();
        for f in failures.into_iter().filter(|f| !counted.contains(&f.task)) {
            let lines = match &f.container {
                Some(c) => last_lines(&self.docker, c).await,
                None => LastLines {
                    lines: Vec::new(),
                    telling: None,
                },
            };
            let reason = match f.exit_code {
                Some(code) => exit_reason(&code.to_string(), lines.telling.as_deref()),
                None => format!(
                    "task failed: {}",
                    f.err.as_deref().unwrap_or("no reason given")
                ),
            };
            out.push((f, reason, lines.lines));
        }
        out
    }

    /// Counts new failures, logs the first of a crash loop, and keeps the newest generation's
    /// last reason until all its tasks serve (`recovered`).
    fn record_failures(
        &self,
        id: &FunctionId,
        s: &mut Service,
        new: Vec<(Failure, String, Vec<String>)>,
        listed: &HashSet<String>,
        recovered: bool,
    ) {
        s.failures.retain(|t| listed.contains(t));
        for (f, reason, lines) in new {
            self.metrics
                .replica_restarts
                .with_label_values(&[id.qualified().as_str(), self.datacenter.as_str()])
                .inc();
            if s.reason.is_none() {
                tracing::warn!(function = %id, task = f.task, last_lines = ?lines, "{reason}; Swarm replaces it");
            }
            s.failures.insert(f.task);
            s.reason = Some(reason);
        }
        if recovered && s.reason.take().is_some() {
            tracing::info!(function = %id, "every task serves again");
        }
    }
}

/// What a failed task says of itself.
/// What a listed task tells of its function.
#[derive(Debug, PartialEq)]
enum TaskIs {
    /// Running and meant to: a candidate for routing once it answers its health check.
    Serving,
    /// Ended on its own: counted as a restart and its reason shown.
    Crashed,
    /// Starting, shutting down, or stopped by Swarm itself.
    Neither,
}

fn what_task(
    state: Option<TaskState>,
    desired: Option<TaskState>,
    generation: Option<u64>,
    current: u64,
) -> TaskIs {
    match state {
        // A task Swarm stopped itself (a scale-down marks it for removal, an update retires
        // the older generation) may still end as failed or complete: its process can exit
        // before Swarm records the shutdown. Not a crash.
        Some(TaskState::FAILED | TaskState::REJECTED | TaskState::COMPLETE)
            if desired == Some(TaskState::REMOVE) || generation.is_some_and(|g| g < current) =>
        {
            TaskIs::Neither
        }
        // With restart condition "any", a task that completed is replaced too.
        Some(TaskState::FAILED | TaskState::REJECTED | TaskState::COMPLETE) => TaskIs::Crashed,
        Some(TaskState::RUNNING) if desired == Some(TaskState::RUNNING) => TaskIs::Serving,
        _ => TaskIs::Neither,
    }
}

fn failure(t: Task) -> Failure {
    let status = t.status.unwrap_or_default();
    let container = status.container_status.as_ref();
    Failure {
        task: t.id.unwrap_or_default(),
        container: container.and_then(|c| c.container_id.clone()),
        exit_code: container.and_then(|c| c.exit_code),
        err: status.err,
    }
}

fn spawn_poller(platform: Weak<SwarmPlatform>) {
    super::poll_while_alive(platform, POLL, |p| async move { p.refresh().await });
}

/// The platform's handle: the trait needs `&self`, the poller an `Arc`.
pub struct SwarmHandle(pub Arc<SwarmPlatform>);

#[async_trait]
impl Platform for SwarmHandle {
    fn kind(&self) -> &'static str {
        "swarm"
    }

    fn validate(&self, dep: &FunctionDeployment) -> Result<(), String> {
        validate_image_and_resources("swarm", dep)
    }

    fn validate_scale(&self, _: &FunctionDeployment, replicas: u64) -> Result<(), String> {
        if self.0.cfg.reach == Reach::Slot && replicas > MAX_SLOT as u64 {
            return Err(format!(
                "replicas: the swarm platform runs at most {MAX_SLOT} replicas of a function with reach = \"slot\""
            ));
        }
        Ok(())
    }

    async fn apply(&self, workload: Workload, replicas: u64) -> Result<(), PlatformError> {
        let p = &self.0;
        let id = workload.id.clone();
        let name = service_name(&p.datacenter, &id);
        let generation = p.generations.fetch_add(1, Ordering::Relaxed) + 1;
        let port = free_port()?;
        write_secrets(&secrets_dir(&p.run_dir, &id, generation), &workload)?;
        let spec = p.spec(&id, &workload, generation, port, replicas);
        let workload_deployment = workload.deployment;
        let exists = p
            .services
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&id);
        if exists {
            let (_, version) = p.current(&name).await?;
            p.update(&name, spec, version).await?;
        } else {
            p.docker
                .create_service(spec, None)
                .await
                .map_err(|e| engine_failed(&format!("cannot create service {name}"), e))?;
        }
        let mut services = p.services.write().unwrap_or_else(|e| e.into_inner());
        p.table.row(&id).set_desired(replicas);
        // The function's restart series at zero from its deploy, for rate() and increase().
        p.metrics
            .replica_restarts
            .with_label_values(&[id.qualified().as_str(), p.datacenter.as_str()]);
        let s = services.entry(id).or_insert_with(|| Service {
            name,
            generation: 0,
            ports: HashMap::new(),
            health: HashMap::new(),
            healthy: HashMap::new(),
            failures: HashSet::new(),
            reason: None,
        });
        s.generation = generation;
        s.ports.insert(generation, port);
        s.health
            .insert(generation, health_path(Some(&workload_deployment)));
        s.reason = None;
        Ok(())
    }

    async fn scale(&self, id: &FunctionId, replicas: u64) -> Result<(), PlatformError> {
        let p = &self.0;
        let name = service_name(&p.datacenter, id);
        let (mut spec, version) = p.current(&name).await?;
        spec.mode = Some(ServiceSpecMode {
            replicated: Some(ServiceSpecModeReplicated {
                replicas: Some(replicas as i64),
            }),
            ..Default::default()
        });
        p.update(&name, spec, version).await?;
        p.table.row(id).set_desired(replicas);
        Ok(())
    }

    async fn remove(&self, id: &FunctionId) -> Result<(), PlatformError> {
        let p = &self.0;
        p.services
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        p.table.remove(id);
        let name = service_name(&p.datacenter, id);
        match p.docker.delete_service(&name).await {
            Ok(()) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            Err(e) => Err(engine_failed(&format!("cannot remove service {name}"), e)),
        }
    }

    /// The engine answers and is a swarm manager.
    async fn healthcheck(&self) -> Result<(), PlatformError> {
        self.0
            .docker
            .list_services(None::<ListServicesOptions>)
            .await
            .map(|_| ())
            .map_err(|e| engine_failed("cannot list services", e))
    }

    fn table(&self) -> &ReadyTable {
        &self.0.table
    }

    async fn shutdown(&self) {
        let p = &self.0;
        if let Ok(names) = p.leftovers().await {
            for name in names {
                let _ = p.docker.delete_service(&name).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_task_that_ended_on_its_own_is_a_crash() {
        use TaskState::*;
        for state in [FAILED, REJECTED, COMPLETE] {
            for (desired, generation, is) in [
                // Ended while meant to run, or after Swarm replaced it: a crash.
                (RUNNING, 3, TaskIs::Crashed),
                (SHUTDOWN, 3, TaskIs::Crashed),
                // A scale-down's task, or an older generation's during an update: Swarm's doing.
                (REMOVE, 3, TaskIs::Neither),
                (SHUTDOWN, 2, TaskIs::Neither),
            ] {
                assert_eq!(
                    what_task(Some(state), Some(desired), Some(generation), 3),
                    is,
                    "{state:?} desired {desired:?} generation {generation}"
                );
            }
        }
        for (state, desired, is) in [
            (RUNNING, RUNNING, TaskIs::Serving),
            (RUNNING, SHUTDOWN, TaskIs::Neither),
            (STARTING, RUNNING, TaskIs::Neither),
        ] {
            assert_eq!(what_task(Some(state), Some(desired), Some(3), 3), is);
        }
    }
}
