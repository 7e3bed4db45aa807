//! The `docker` platform: one container per replica on a Docker engine, with host networking
//! so every replica listens on its own loopback port (given as `port` and `faastastic_listen`,
//! which the OpenFaaS watchdogs and faastastic's own read). Containers carry the labels
//! `com.faastastic.function|namespace|datacenter|generation`; secrets are bind-mounted read-only
//! at `/var/openfaas/secrets`. A new deployment starts a new generation of containers and
//! retires the old one only once a new replica is ready, so a broken update never takes a
//! function down and a redeploy under the same name never routes to an old container.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bollard::models::{ContainerCreateBody, HostConfig, RestartPolicy, RestartPolicyNameEnum};
use bollard::query_parameters::{
    CreateContainerOptions, ListContainersOptions, LogsOptions, RemoveContainerOptions,
};
use bollard::Docker;
use futures::StreamExt;
use tokio::sync::Mutex;

use super::logs::LogBuffer;
use super::{Endpoint, LogQuery, LogSubscription, Platform, PlatformError, ReadyTable, Workload};
use crate::config::ContainerConfig;
use crate::model::{FunctionDeployment, FunctionId, FunctionResources};

pub(super) const LABEL_FUNCTION: &str = "com.faastastic.function";
pub(super) const LABEL_NAMESPACE: &str = "com.faastastic.namespace";
pub(super) const LABEL_DATACENTER: &str = "com.faastastic.datacenter";
pub(super) const LABEL_GENERATION: &str = "com.faastastic.generation";
pub(super) const SECRETS_PATH: &str = "/var/openfaas/secrets";

struct Replica {
    container: String,
    endpoint: Arc<Endpoint>,
    ready: bool,
}

struct Generation {
    number: u64,
    workload: Workload,
    replicas: Vec<Replica>,
    /// Containers started so far, for unique names.
    started: u64,
}

impl Generation {
    fn ready(&self) -> Vec<Arc<Endpoint>> {
        self.replicas
            .iter()
            .filter(|r| r.ready)
            .map(|r| r.endpoint.clone())
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
}

pub(super) fn failed(what: &str, e: impl std::fmt::Display) -> PlatformError {
    PlatformError::Failed(format!("docker: {what}: {e}"))
}

/// An engine call's error with its causes: "cannot connect" alone does not say why.
pub(super) fn engine_failed(what: &str, e: bollard::errors::Error) -> PlatformError {
    failed(what, crate::error_chain(&e))
}

/// `128Mi`, `1G`, `512k` or bytes.
pub(super) fn parse_memory(text: &str) -> Option<i64> {
    let t = text.trim();
    let units = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("k", 1000),
        ("K", 1000),
        ("M", 1_000_000),
        ("m", 1_000_000),
        ("G", 1_000_000_000),
        ("g", 1_000_000_000),
    ];
    for (suffix, factor) in units {
        if let Some(n) = t.strip_suffix(suffix) {
            return n
                .trim()
                .parse::<f64>()
                .ok()
                .map(|v| (v * factor as f64) as i64);
        }
    }
    t.parse::<i64>().ok()
}

/// `0.5` or `500m` (millicores) as nano-CPUs.
pub(super) fn parse_cpu(text: &str) -> Option<i64> {
    let t = text.trim();
    match t.strip_suffix('m') {
        Some(milli) => milli.parse::<f64>().ok().map(|m| (m * 1e6) as i64),
        None => t.parse::<f64>().ok().map(|c| (c * 1e9) as i64),
    }
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
    check_resources("limits", &dep.limits)?;
    check_resources("requests", &dep.requests)
}

fn check_resources(field: &str, r: &Option<FunctionResources>) -> Result<(), String> {
    let Some(r) = r else { return Ok(()) };
    if let Some(m) = r.memory.as_deref().filter(|m| !m.is_empty()) {
        if parse_memory(m).is_none_or(|v| v <= 0) {
            return Err(format!("{field}.memory: {m:?} is not a size such as 128Mi"));
        }
    }
    if let Some(c) = r.cpu.as_deref().filter(|c| !c.is_empty()) {
        if parse_cpu(c).is_none_or(|v| v <= 0) {
            return Err(format!(
                "{field}.cpu: {c:?} is not a CPU count such as 0.5 or 500m"
            ));
        }
    }
    Ok(())
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
        });
        for container in platform.containers(None).await? {
            platform.remove_container(&container).await;
        }
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

    async fn remove_container(&self, container: &str) {
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
        if let Err(e) = removed {
            tracing::warn!(container, error = %e, "cannot remove container");
        }
    }

    /// Publishes the function's desired count and serving replicas into the table.
    fn publish(&self, id: &FunctionId, f: &mut Function) {
        let row = self.table.row(id);
        row.set_desired(f.desired);
        row.set_ready(f.serving());
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
        let port = free_port()?;
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
            port,
            &format!("127.0.0.1:{port}"),
            self.cfg.exec_timeout,
        );
        let labels = replica_labels(id, &self.datacenter, generation.number, dep);
        let limits = dep.limits.as_ref();
        let body = ContainerCreateBody {
            image: dep.image.clone(),
            env: Some(env),
            labels: Some(labels),
            host_config: Some(HostConfig {
                network_mode: Some("host".into()),
                memory: limits.and_then(|l| parse_memory(l.memory.as_deref()?)),
                nano_cpus: limits.and_then(|l| parse_cpu(l.cpu.as_deref()?)),
                readonly_rootfs: dep.read_only_root_filesystem,
                binds: Some(vec![format!("{}:{SECRETS_PATH}:ro", secrets_dir.display())]),
                restart_policy: Some(RestartPolicy {
                    name: Some(RestartPolicyNameEnum::ON_FAILURE),
                    maximum_retry_count: Some(5),
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
            self.remove_container(&created.id).await;
            return Err(engine_failed(&format!("cannot start {name}"), e));
        }
        let endpoint = Arc::new(Endpoint::new(
            name.clone(),
            std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        ));
        generation.replicas.push(Replica {
            container: created.id.clone(),
            endpoint,
            ready: false,
        });
        self.follow_logs(created.id.clone(), name.clone(), logs.clone());
        self.watch_ready(id.clone(), generation.number, created.id, port);
        Ok(())
    }

    fn follow_logs(&self, container: String, instance: String, logs: Arc<LogBuffer>) {
        let mut stream = self.docker.logs(
            &container,
            Some(LogsOptions {
                follow: true,
                stdout: true,
                stderr: true,
                ..Default::default()
            }),
        );
        tokio::spawn(async move {
            while let Some(Ok(line)) = stream.next().await {
                let text = line.to_string();
                for l in text.lines().filter(|l| !l.is_empty()) {
                    logs.push(&instance, l.to_string());
                }
            }
        });
    }

    /// Polls the replica's health endpoint until it answers 200 (then routes to it) or the
    /// start-up timeout passes (then it is left out, and logged).
    fn watch_ready(
        self: &Arc<Self>,
        id: FunctionId,
        generation: u64,
        container: String,
        port: u16,
    ) {
        let this = self.clone();
        tokio::spawn(async move {
            let url = format!("http://127.0.0.1:{port}{}", super::watchdog::HEALTH_PATH);
            let deadline = tokio::time::Instant::now() + this.cfg.startup_timeout;
            loop {
                let ok = this
                    .http
                    .get(&url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                let Some(entry) = this.entry(&id) else { return };
                let mut f = entry.lock().await;
                let Some(g) = f.generations.iter_mut().find(|g| g.number == generation) else {
                    return;
                };
                let Some(r) = g.replicas.iter_mut().find(|r| r.container == container) else {
                    return;
                };
                if ok {
                    r.ready = true;
                    let old = this.retire_older(&mut f);
                    this.publish(&id, &mut f);
                    drop(f);
                    for g in old {
                        this.stop_replicas(g.replicas).await;
                    }
                    return;
                }
                drop(f);
                if tokio::time::Instant::now() > deadline {
                    tracing::error!(function = %id, container, "replica not healthy within {:?}", this.cfg.startup_timeout);
                    return;
                }
                tokio::time::sleep(this.cfg.health_interval).await;
            }
        });
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
        futures::future::join_all(replicas.into_iter().map(|r| async move {
            let deadline = tokio::time::Instant::now() + self.cfg.drain_timeout;
            while r.endpoint.in_flight.load(Ordering::Acquire) > 0
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            self.remove_container(&r.container).await;
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
        p.table.remove(id);
        p.logs.write().unwrap_or_else(|e| e.into_inner()).remove(id);
        if let Some(entry) = entry {
            let mut f = entry.lock().await;
            let generations: Vec<Generation> = f.generations.drain(..).collect();
            drop(f);
            for g in generations {
                p.stop_replicas(g.replicas).await;
            }
        }
        // Anything left behind (a container started by an earlier run, say).
        for container in p.containers(Some(id)).await? {
            p.remove_container(&container).await;
        }
        Ok(())
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
    fn resource_units() {
        assert_eq!(parse_memory("128Mi"), Some(128 << 20));
        assert_eq!(parse_memory("1G"), Some(1_000_000_000));
        assert_eq!(parse_memory("2048"), Some(2048));
        assert_eq!(parse_memory("lots"), None);
        assert_eq!(parse_cpu("0.5"), Some(500_000_000));
        assert_eq!(parse_cpu("250m"), Some(250_000_000));
        assert!(check_resources(
            "limits",
            &Some(FunctionResources {
                memory: Some("12 parsecs".into()),
                ..Default::default()
            })
        )
        .unwrap_err()
        .contains("limits.memory"));
    }
}
