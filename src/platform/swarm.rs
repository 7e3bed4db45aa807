//! The `swarm` platform: one Docker Swarm service per function, scaled by updating the
//! service's replica count; endpoints come from the service's running tasks.
//!
//! Tasks use the host network. Every generation of a service gets its own port, and every task
//! listens on the loopback address of its slot (`127.0.1.SLOT:PORT`, through the
//! `{{.Task.Slot}}` template in `faastastic_listen`), so replicas never collide on one node and
//! an update's new tasks start beside the old ones (`start-first`). Only tasks of the newest
//! generation that answer their health check are routed to (older ones until a new one does),
//! so a redeploy never reaches an old task. Swarm's ingress routing mesh is not used.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bollard::models::{
    Limit, Mount, MountType, NetworkAttachmentConfig, ServiceSpec, ServiceSpecMode,
    ServiceSpecModeReplicated, ServiceSpecUpdateConfig, ServiceSpecUpdateConfigOrderEnum, TaskSpec,
    TaskSpecContainerSpec, TaskSpecResources, TaskSpecRestartPolicy,
    TaskSpecRestartPolicyConditionEnum, TaskState,
};
use bollard::query_parameters::{
    InspectServiceOptions, ListServicesOptions, ListTasksOptions, UpdateServiceOptions,
};
use bollard::Docker;

use super::docker::{
    engine, engine_failed, failed, free_port, parse_cpu, parse_memory, replica_env, replica_labels,
    secrets_dir, validate_image_and_resources, write_secrets, LABEL_DATACENTER, LABEL_GENERATION,
    SECRETS_PATH,
};
use super::{Endpoint, Platform, PlatformError, ReadyTable, Workload};
use crate::config::ContainerConfig;
use crate::model::{FunctionDeployment, FunctionId};

/// How often tasks are listed and new ones health-checked.
const POLL: Duration = Duration::from_millis(300);
/// Wait before a failed task starts again.
const RESTART_DELAY: Duration = Duration::from_millis(200);
/// Slots map to 127.0.1.SLOT.
const MAX_SLOT: i64 = 254;

struct Service {
    name: String,
    /// The newest generation and the port of every generation still running.
    generation: u64,
    ports: HashMap<u64, u16>,
    /// Tasks that answered their health check, with their endpoint (kept, so in-flight
    /// counts survive a refresh).
    healthy: HashMap<String, Arc<Endpoint>>,
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
    ) -> anyhow::Result<Arc<SwarmPlatform>> {
        let docker = engine(socket, &run_dir).await?;
        docker.inspect_swarm().await.map_err(|e| {
            anyhow::anyhow!("this engine is not a swarm manager (docker swarm init): {e}")
        })?;
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
        ServiceSpec {
            name: Some(service_name(&self.datacenter, id)),
            labels: Some(labels.clone()),
            task_template: Some(TaskSpec {
                container_spec: Some(TaskSpecContainerSpec {
                    image: dep.image.clone(),
                    labels: Some(labels),
                    env: Some(replica_env(
                        dep,
                        port,
                        &format!("127.0.1.{{{{.Task.Slot}}}}:{port}"),
                        self.cfg.exec_timeout,
                    )),
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
                networks: Some(vec![NetworkAttachmentConfig {
                    target: Some("host".to_string()),
                    ..Default::default()
                }]),
                // A task started in a slot whose previous task is still stopping finds its
                // address taken for a moment: retry soon rather than after Swarm's default 5 s.
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

    /// Lists every service's running tasks, health-checks new ones, and routes to the newest
    /// generation that has a healthy task.
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
                    filters: Some(HashMap::from([
                        ("service".to_string(), vec![name.clone()]),
                        ("desired-state".to_string(), vec!["running".to_string()]),
                    ])),
                }))
                .await
            {
                Ok(t) => t,
                Err(e) => {
                    tracing::debug!(service = %name, error = %e, "cannot list tasks");
                    continue;
                }
            };
            // (task id, generation, address) of running tasks.
            let ports = match self
                .services
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(&id)
            {
                Some(s) => s.ports.clone(),
                None => continue,
            };
            let mut running = Vec::new();
            for t in tasks {
                let state = t.status.as_ref().and_then(|s| s.state);
                let (Some(task), Some(slot)) = (t.id.clone(), t.slot) else {
                    continue;
                };
                if state != Some(TaskState::RUNNING) || !(1..=MAX_SLOT).contains(&slot) {
                    continue;
                }
                let generation = t
                    .spec
                    .and_then(|s| s.container_spec)
                    .and_then(|c| c.labels)
                    .and_then(|l| l.get(LABEL_GENERATION)?.parse::<u64>().ok());
                let Some((generation, port)) = generation.and_then(|g| Some((g, *ports.get(&g)?)))
                else {
                    continue;
                };
                let addr = std::net::SocketAddr::from(([127, 0, 1, slot as u8], port));
                running.push((task, generation, addr));
            }
            let known: HashSet<String> = self
                .services
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(&id)
                .map(|s| s.healthy.keys().cloned().collect())
                .unwrap_or_default();
            let mut newly = Vec::new();
            for (task, _, addr) in running.iter().filter(|(t, _, _)| !known.contains(t)) {
                let url = format!("http://{addr}{}", super::watchdog::HEALTH_PATH);
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
                    e
                }
                None => Vec::new(),
            };
            self.table.row(&id).set_ready(endpoints);
        }
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
        if replicas > MAX_SLOT as u64 {
            return Err(format!(
                "replicas: the swarm platform runs at most {MAX_SLOT} replicas of a function"
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
        let s = services.entry(id).or_insert_with(|| Service {
            name,
            generation: 0,
            ports: HashMap::new(),
            healthy: HashMap::new(),
        });
        s.generation = generation;
        s.ports.insert(generation, port);
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
