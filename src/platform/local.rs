//! The embedded `local` platform: every replica is its own OS process (this binary's `watchdog`
//! subcommand) listening on a loopback port chosen by the kernel.
//!
//! A function is a chain of generations: a deploy creates generation 1, every update a new one.
//! The old generation keeps serving until the new one has a ready replica (or the startup timeout
//! passes), then it is drained and stopped. Removing a function drops it from the routing table
//! before anything else, so a redeploy under the same name can never reach an old replica.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::isolation::{Isolation, User};
use super::limits::{Groups, Limits};
use super::logs::LogBuffer;
use super::table::Row;
use super::watchdog::{die_with_parent, HEALTH_PATH, LISTENING_PREFIX, UPSTREAM_PREFIX};
use super::{
    Endpoint, EndpointSet, LogQuery, LogSubscription, Platform, PlatformError, ReadyTable, Rollout,
    Workload,
};
use crate::config::LocalConfig;
use crate::model::{FunctionDeployment, FunctionId, FunctionMap};
use crate::telemetry::Metrics;

/// How often a running replica's memory kills are looked at.
const OOM_CHECK: Duration = Duration::from_secs(1);

/// Environment variables passed from the server to replicas; everything else is cleared so a
/// function never sees the server's own settings.
const PASSTHROUGH_ENV: &[&str] = &["PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "USER"];

pub struct LocalPlatform {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: LocalConfig,
    exe: PathBuf,
    /// Every replica's environment before its function's own variables: the passed-through
    /// variables and `exec_timeout`. Kept once here rather than in every generation (at
    /// 10,000 functions in 3 datacenters the copies took about 30 MB).
    base_env: Vec<(String, String)>,
    /// Where each generation's directory (working directory, secrets) is made.
    files: PathBuf,
    isolation: Isolation,
    /// Where replicas with `limits` get their control groups.
    groups: Groups,
    datacenter: String,
    metrics: Arc<Metrics>,
    functions: RwLock<FunctionMap<Entry>>,
    table: ReadyTable,
    generations: AtomicU64,
}

struct Entry {
    current: Arc<Generation>,
    /// The generation being replaced during a rolling update.
    previous: Option<Arc<Generation>>,
    logs: Arc<LogBuffer>,
    /// Publishes the serving generation into the table; shared by every generation.
    published: Arc<Published>,
}

/// Publishes a function's serving generation into its table row: recomputed by its
/// generations whenever theirs changes and by the platform whenever it swaps generations.
struct Published {
    row: Arc<Row>,
    /// The entry's current and previous generations (weak: generations hold this).
    generations: Mutex<(Weak<Generation>, Option<Weak<Generation>>)>,
}

impl Published {
    fn new(row: Arc<Row>) -> Arc<Self> {
        Arc::new(Published {
            row,
            generations: Mutex::new((Weak::new(), None)),
        })
    }

    /// Records the entry's generations (called under the map's write lock) and republishes.
    fn track(&self, entry: &Entry) {
        let mut generations = self.generations.lock().unwrap_or_else(|p| p.into_inner());
        *generations = (
            Arc::downgrade(&entry.current),
            entry.previous.as_ref().map(Arc::downgrade),
        );
        self.publish(&generations);
    }

    /// Republishes after a generation's ready count, desired count or problem changed.
    fn refresh(&self) {
        let generations = self.generations.lock().unwrap_or_else(|p| p.into_inner());
        self.publish(&generations);
    }

    /// Requests go to the current generation once it has a ready replica, else to the one it
    /// replaces. Runs under the lock, so the last writer read the latest counts.
    fn publish(&self, (current, previous): &(Weak<Generation>, Option<Weak<Generation>>)) {
        let Some(current) = current.upgrade() else {
            return;
        };
        let previous = previous.as_ref().and_then(Weak::upgrade);
        let serving = match &previous {
            Some(previous) if current.ready_count() == 0 => previous,
            _ => &current,
        };
        self.row.set_desired(current.desired_count());
        self.row
            .set_endpoints(serving.endpoints(), serving.ready_count());
        // An update whose new version has no ready replica yet, with its last failure.
        let problem = current
            .problem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        self.row.set_reason(problem.as_deref());
        let stalled = previous.is_some() && current.ready_count() == 0;
        self.row.set_rollout(stalled.then(|| Rollout {
            ready: false,
            ready_replicas: 0,
            replicas: current.desired_count(),
            reason: problem,
        }));
    }
}

impl LocalPlatform {
    /// `exe` is the binary that provides the `watchdog` subcommand; `run_dir` holds per-replica
    /// files (secrets) and is wiped at start, since no replica survives a restart of the server.
    pub fn new(
        cfg: LocalConfig,
        exe: PathBuf,
        run_dir: PathBuf,
        datacenter: &str,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<LocalPlatform> {
        // Absolute: replicas run in their own directories, and the paths they are given
        // (`secret_mount_path`) must lead to the same place from there.
        let run_dir = std::path::absolute(&run_dir)?;
        if run_dir.exists() {
            std::fs::remove_dir_all(&run_dir)?;
        }
        create_private_dir(&run_dir)?;
        // This platform's name among others on the machine: its functions' files and its
        // control groups are kept under it.
        let tag = format!(
            "{:016x}",
            super::isolation::fnv1a(run_dir.as_os_str().as_encoded_bytes())
        );
        let isolation = Isolation::choose(
            cfg.function_users,
            cfg.uid_range,
            cfg.sandbox,
            &std::path::absolute(&cfg.function_dir)?,
            &tag,
            datacenter,
        )?;
        let (files, exe) = match &isolation {
            Isolation::ServerUser => (run_dir, exe),
            Isolation::FunctionUsers { files, .. } => {
                // The watchdog runs as the function's user: it needs a copy of this program
                // when the program sits where others cannot reach it (under /root).
                let exe = if super::isolation::executable_by_others(&exe) {
                    exe
                } else {
                    let copy = super::isolation::reachable_copy(
                        &exe,
                        &std::path::absolute(&cfg.function_dir)?,
                    )?;
                    tracing::info!(copy = %copy.display(), "this program is not reachable by function users; they run a copy");
                    copy
                };
                (files.clone(), exe)
            }
        };
        let isolated = matches!(isolation, Isolation::FunctionUsers { .. });
        let groups = Groups::prepare(&format!("faastastic-{tag}"), datacenter, cfg.cgroups);
        let mut base_env: Vec<(String, String)> = PASSTHROUGH_ENV
            .iter()
            // A function's own user has no account: its home is its working directory.
            .filter(|k| !(isolated && matches!(**k, "HOME" | "USER")))
            .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
            .collect();
        base_env.push((
            "exec_timeout".into(),
            format!("{}s", cfg.exec_timeout.as_secs_f64()),
        ));
        Ok(LocalPlatform {
            inner: Arc::new(Inner {
                cfg,
                exe,
                base_env,
                files,
                isolation,
                groups,
                datacenter: datacenter.to_string(),
                metrics,
                functions: RwLock::new(FunctionMap::default()),
                table: ReadyTable::default(),
                generations: AtomicU64::new(0),
            }),
        })
    }
}

impl Inner {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, FunctionMap<Entry>> {
        self.functions.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, FunctionMap<Entry>> {
        self.functions.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// What one generation's replicas add to the platform's base environment: the function's
/// `envVars`, then `fprocess`.
struct Launch {
    env: Box<[(String, String)]>,
    /// For an http-mode function reached without its watchdog (`local.http_direct`).
    direct: Option<super::Direct>,
}

/// One deployed version of a function and its replicas.
struct Generation {
    id: FunctionId,
    number: u64,
    dir: PathBuf,
    launch: Launch,
    /// Its deployment's `limits`, if any (boxed: most functions have none, and a server
    /// holds tens of thousands of generations).
    limits: Option<Box<Limits>>,
    logs: Arc<LogBuffer>,
    published: Arc<Published>,
    /// The user its replicas run as (with a user per function), taken at its first
    /// replica's start, which hands `dir` over to it; the function's generations share it
    /// (`Users` hands the same one out while any holds it).
    user: Mutex<Option<Arc<User>>>,
    platform: Arc<Inner>,
    slots: Mutex<Vec<Slot>>,
    /// How many slots there are, readable without their lock.
    desired: AtomicU64,
    next_slot: AtomicU64,
    ready: Mutex<Vec<Arc<Endpoint>>>,
    endpoints: RwLock<Arc<EndpointSet>>,
    /// Woken whenever `ready_count` changes (an update waits on it for its first replica).
    /// A `Notify`, not a watch channel: a server holds 30,000 generations at 10,000
    /// functions in three datacenters, and a channel each took about 9 MB.
    ready_changed: Notify,
    ready_count: AtomicU64,
    /// The last replica failure, until a replica is ready again: why an update stalls.
    problem: Mutex<Option<String>>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

struct Slot {
    instance: String,
    cancel: CancellationToken,
}

enum ReplicaExit {
    Cancelled,
    Failed(String),
}

impl Generation {
    fn ready_count(&self) -> u64 {
        self.ready_count.load(Ordering::Acquire)
    }

    fn desired_count(&self) -> u64 {
        self.desired.load(Ordering::Acquire)
    }

    fn endpoints(&self) -> Arc<EndpointSet> {
        self.endpoints
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Adds or removes one replica from the routing table and publishes a fresh snapshot.
    fn set_ready(&self, instance: &str, endpoint: Option<Arc<Endpoint>>) {
        let mut ready = self.ready.lock().unwrap_or_else(|p| p.into_inner());
        ready.retain(|e| e.instance != instance);
        if let Some(e) = endpoint {
            ready.push(e);
            *self.problem.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        *self.endpoints.write().unwrap_or_else(|p| p.into_inner()) =
            Arc::new(EndpointSet::new(ready.clone()));
        self.ready_count
            .store(ready.len() as u64, Ordering::Release);
        self.published.refresh();
        self.ready_changed.notify_waiters();
    }

    fn scale(self: &Arc<Self>, replicas: u64) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        while (slots.len() as u64) < replicas {
            let n = self.next_slot.fetch_add(1, Ordering::Relaxed) + 1;
            let slot = Slot {
                instance: format!("{}-{}-{n}", self.id.name, self.number),
                cancel: self.cancel.child_token(),
            };
            let generation = self.clone();
            let (instance, cancel) = (slot.instance.clone(), slot.cancel.clone());
            self.tasks
                .spawn(async move { generation.supervise(instance, cancel).await });
            slots.push(slot);
        }
        while (slots.len() as u64) > replicas {
            let slot = slots
                .pop()
                .expect("loop runs only while slots is non-empty");
            // Out of the routing table first, then drained and stopped by its task.
            self.set_ready(&slot.instance, None);
            slot.cancel.cancel();
        }
        self.desired.store(slots.len() as u64, Ordering::Release);
        if slots.is_empty() {
            // No replica left to fail.
            *self.problem.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        drop(slots);
        self.published.refresh();
    }

    /// Stops every replica and, once they are gone, removes the generation's files.
    fn stop(self: &Arc<Self>) {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.desired.store(0, Ordering::Release);
        {
            let mut ready = self.ready.lock().unwrap_or_else(|p| p.into_inner());
            ready.clear();
            *self.endpoints.write().unwrap_or_else(|p| p.into_inner()) =
                Arc::new(EndpointSet::default());
            self.ready_count.store(0, Ordering::Release);
            self.published.refresh();
            self.ready_changed.notify_waiters();
        }
        self.cancel.cancel();
        self.tasks.close();
        let generation = self.clone();
        tokio::spawn(async move {
            generation.tasks.wait().await;
            let _ = tokio::fs::remove_dir_all(&generation.dir).await;
        });
    }

    /// Keeps one replica slot running until cancelled, restarting it with backoff when it dies.
    async fn supervise(self: Arc<Self>, instance: String, cancel: CancellationToken) {
        let cfg = &self.platform.cfg;
        let mut backoff = Duration::from_millis(100);
        loop {
            let started = Instant::now();
            match self.run_replica(&instance, &cancel).await {
                ReplicaExit::Cancelled => return,
                ReplicaExit::Failed(reason) => {
                    self.set_ready(&instance, None);
                    if cancel.is_cancelled() {
                        return;
                    }
                    self.platform
                        .metrics
                        .replica_restarts
                        .with_label_values(&[
                            self.id.qualified().as_str(),
                            self.platform.datacenter.as_str(),
                        ])
                        .inc();
                    if started.elapsed() > Duration::from_secs(30) {
                        backoff = Duration::from_millis(100);
                    }
                    let msg = format!(
                        "replica {instance} {reason}; restarting in {} ms",
                        backoff.as_millis()
                    );
                    tracing::warn!(function = %self.id, "{msg}");
                    *self.problem.lock().unwrap_or_else(|p| p.into_inner()) = Some(msg.clone());
                    self.published.refresh();
                    self.logs.push(&instance, msg);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = cancel.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(cfg.restart_backoff_max);
                }
            }
        }
    }

    async fn run_replica(&self, instance: &str, cancel: &CancellationToken) -> ReplicaExit {
        let cfg = &self.platform.cfg;
        let limits = self.limits.as_deref().copied().unwrap_or_default();
        let group = match self.platform.groups.replica(instance, limits) {
            Ok(group) => group,
            Err(e) => return ReplicaExit::Failed(format!("could not set its limits: {e}")),
        };
        let mut child = match self.spawn(group.as_ref()) {
            Ok(child) => child,
            Err(e) => return ReplicaExit::Failed(format!("could not start: {e}")),
        };
        // Whatever the replica leaves behind in its session goes when it ends, however it ends.
        let _sweep = child.id().map(|pid| SessionSweep(pid as libc::pid_t));
        let sandboxed = self.platform.isolation.sandbox().is_some();
        // Why it exited: the memory limit when the kernel killed a process of it for that.
        let exited = |status: std::io::Result<std::process::ExitStatus>| {
            let status = describe_exit(status);
            match &group {
                Some(g) if g.oom_kills() > 0 => format!("{status}: {}", g.oom_reason()),
                _ => status,
            }
        };
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            return ReplicaExit::Failed("started without output pipes".to_string());
        };
        forward_lines(stderr, self.logs.clone(), instance.to_string());
        let mut stdout = BufReader::new(stdout).lines();
        // The watchdog's address, after (in http mode) its function server's.
        let mut upstream = None;
        let announced = tokio::time::timeout(cfg.startup_timeout, async {
            while let Ok(Some(line)) = stdout.next_line().await {
                if let Some(addr) = line.strip_prefix(LISTENING_PREFIX) {
                    return addr.trim().parse::<SocketAddr>().ok();
                }
                if let Some(addr) = line.strip_prefix(UPSTREAM_PREFIX) {
                    upstream = addr.trim().parse::<SocketAddr>().ok();
                    continue;
                }
                self.logs.push(instance, line);
            }
            None
        });
        let addr = tokio::select! {
            addr = announced => addr.ok().flatten(),
            _ = cancel.cancelled() => return stop_child(child, sandboxed).await,
        };
        let Some(addr) = addr else {
            terminate(&mut child, sandboxed).await;
            let status = child.wait().await;
            return ReplicaExit::Failed(format!(
                "did not announce its port within {:?} ({})",
                cfg.startup_timeout,
                describe_exit(status)
            ));
        };
        forward_lines(stdout.into_inner(), self.logs.clone(), instance.to_string());

        let healthy = wait_healthy(addr, cfg.health_interval, cfg.startup_timeout);
        tokio::select! {
            ok = healthy => if !ok {
                terminate(&mut child, sandboxed).await;
                return ReplicaExit::Failed(format!(
                    "was not healthy within {:?}", cfg.startup_timeout
                ));
            },
            status = child.wait() => {
                return ReplicaExit::Failed(exited(status));
            }
            _ = cancel.cancelled() => return stop_child(child, sandboxed).await,
        }

        // Invocations go to the function's server itself when it may be reached directly; the
        // watchdog, found healthy above, goes on supervising it.
        let endpoint = match (self.launch.direct, upstream) {
            (Some(direct), Some(server)) if server.ip().is_loopback() => {
                let mut endpoint = Endpoint::new(instance.to_string(), server);
                endpoint.direct = Some(direct);
                endpoint
            }
            _ => Endpoint::new(instance.to_string(), addr),
        };
        let endpoint = Arc::new(endpoint);
        self.set_ready(instance, Some(endpoint.clone()));
        // A process killed for memory while the replica keeps running (a classic request's)
        // is told in the function's log.
        let mut kills = group.as_ref().map_or(0, |g| g.oom_kills());
        let mut look = tokio::time::interval(OOM_CHECK);
        loop {
            tokio::select! {
                status = child.wait() => return ReplicaExit::Failed(exited(status)),
                _ = cancel.cancelled() => {
                    self.set_ready(instance, None);
                    endpoint.retire(cfg.drain_timeout).await;
                    return stop_child(child, sandboxed).await;
                }
                _ = look.tick(), if group.is_some() => {
                    let Some(g) = &group else { continue };
                    let now = g.oom_kills();
                    if now > kills {
                        let msg = format!("replica {instance}: a process was {}", g.oom_reason());
                        tracing::warn!(function = %self.id, "{msg}");
                        self.logs.push(instance, msg);
                        kills = now;
                    }
                }
            }
        }
    }

    /// The user this generation's replicas run as, its directory handed to it (with a user
    /// per function).
    fn run_as(&self) -> std::io::Result<Option<u32>> {
        let Isolation::FunctionUsers { users, .. } = &self.platform.isolation else {
            return Ok(None);
        };
        // One lock over the claim and the hand-over: the directory is handed over once, by
        // the first replica to start, and no replica runs before that is done.
        let mut held = self.user.lock().unwrap_or_else(|p| p.into_inner());
        let uid = match &*held {
            Some(user) => user.uid,
            None => {
                let user = users.claim(&self.id.qualified())?;
                super::isolation::hand_over(&self.dir, user.uid)?;
                let uid = user.uid;
                *held = Some(user);
                uid
            }
        };
        Ok(Some(uid))
    }

    fn spawn(&self, group: Option<&super::limits::ReplicaGroup>) -> std::io::Result<Child> {
        let platform = &self.platform;
        let run_as = self.run_as()?;
        let sandbox = (platform.isolation.sandbox())
            .map(|sandbox| sandbox.command(&self.dir, &platform.exe, &["watchdog"]));
        let secrets = match &sandbox {
            Some(_) => PathBuf::from(super::isolation::SECRETS_PATH),
            None => self.dir.join("secrets"),
        };
        let mut cmd = match &sandbox {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args);
                cmd
            }
            None => {
                let mut cmd = Command::new(&platform.exe);
                cmd.arg("watchdog");
                cmd
            }
        };
        cmd.env_clear()
            .envs(
                platform
                    .base_env
                    .iter()
                    .chain(self.launch.env.iter())
                    .map(|(k, v)| (k, v)),
            )
            .env("secret_mount_path", secrets)
            .env("faastastic_listen", "127.0.0.1:0")
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if run_as.is_some() {
            cmd.env("HOME", &self.dir);
        }
        let rlimit = self
            .limits
            .as_ref()
            .and_then(|l| l.rlimit_data(&platform.groups));
        if let Some(bytes) = rlimit {
            cmd.env(super::watchdog::RLIMIT_DATA_ENV, bytes.to_string());
        }
        let procs = group.map(|g| g.procs_files()).unwrap_or_default();
        if run_as.is_some() || !procs.is_empty() {
            super::isolation::enter(&mut cmd, run_as, &procs)?;
        }
        // A session of its own: what it starts can be found, and swept, once it is gone (see
        // `SessionSweep`); and a terminal's signals reach the server, not its replicas.
        // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        // After the change of user, which clears the parent-death signal. Not for a sandbox:
        // killed while its init is still being set up, bubblewrap leaves that init waiting for
        // it forever; left alive, it ends once its watchdog does, which exits when the server
        // dies (nothing reads its output any more).
        if sandbox.is_none() {
            die_with_parent(&mut cmd, libc::SIGTERM);
        }
        cmd.spawn()
    }
}

async fn stop_child(mut child: Child, sandboxed: bool) -> ReplicaExit {
    terminate(&mut child, sandboxed).await;
    ReplicaExit::Cancelled
}

/// SIGTERM to the watchdog (which then stops its function's processes), SIGKILL after a
/// grace period. In a sandbox (`sandboxed`) the watchdog runs in the session of the sandbox's
/// init: bubblewrap passes no signal on, and its init ignores SIGTERM from outside its PID
/// namespace, so the session is signalled (again until it ends, in case the watchdog was not
/// started yet); the sandbox's own process is killed only after the grace period (killed
/// while its init is being set up, it would leave that init waiting forever).
async fn terminate(child: &mut Child, sandboxed: bool) {
    if let Some(pid) = child.id() {
        let pid = pid as libc::pid_t;
        let stopped = async {
            if !sandboxed {
                // SAFETY: signals our own child; kill(2) has no memory effects.
                unsafe { libc::kill(pid, libc::SIGTERM) };
                return child.wait().await;
            }
            let mut ask = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    status = child.wait() => return status,
                    _ = ask.tick() => {
                        if let Some(init) = sandbox_init(pid) {
                            // SAFETY: signals the session a sandbox made inside our child.
                            unsafe { libc::kill(-init, libc::SIGTERM) };
                        }
                    }
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(5), stopped)
            .await
            .is_ok()
        {
            return;
        }
    }
    let _ = child.start_kill();
    let _ = child.wait().await;
}

/// Kills, when dropped, every process left in the session that the replica's process (the
/// watchdog, or the sandbox) leads: a classic request's processes when its watchdog was
/// killed before it could stop them. In the sandbox the PID namespace already took them; a
/// function that makes a session of its own escapes this.
struct SessionSweep(libc::pid_t);

impl Drop for SessionSweep {
    fn drop(&mut self) {
        let leader = self.0;
        // A scan of /proc: off the runtime's workers. It follows the leader's exit closely, so
        // its pid cannot have been handed to a new session in between but for a wrap-around
        // of the pid space within that moment.
        let sweep = move || {
            let Ok(entries) = std::fs::read_dir("/proc") else {
                return;
            };
            for entry in entries.flatten() {
                let Ok(pid) = entry.file_name().to_string_lossy().parse::<libc::pid_t>() else {
                    continue;
                };
                if pid != leader && session_of(pid) == Some(leader) {
                    // SAFETY: kill(2) has no memory effects; the process is in our replica's
                    // session.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(sweep)),
            Err(_) => sweep(),
        }
    }
}

/// The session of process `pid`: field 6 of `/proc/PID/stat`, after the parenthesised name.
fn session_of(pid: libc::pid_t) -> Option<libc::pid_t> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(3)?.parse().ok()
}

/// How an http-mode function's server is reached directly (`local.http_direct`), with its
/// exec timeout (its `exec_timeout` env var, else `local.exec_timeout_secs`); `None` for a
/// classic function or with `local.http_direct = false`.
fn direct(dep: &FunctionDeployment, cfg: &LocalConfig) -> Option<super::Direct> {
    if !cfg.http_direct || env_var(dep, "mode") != Some("http") {
        return None;
    }
    let exec_timeout = match env_var(dep, "exec_timeout") {
        Some(text) => crate::model::parse_duration(text).ok()?,
        None => Some(cfg.exec_timeout),
    };
    Some(super::Direct { exec_timeout })
}

/// The init process of the sandbox that is process `pid` (its first child), once it leads
/// a session of its own, where the sandbox's watchdog runs.
fn sandbox_init(pid: libc::pid_t) -> Option<libc::pid_t> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    let init = children
        .split_whitespace()
        .next()?
        .parse::<libc::pid_t>()
        .ok()?;
    (session_of(init) == Some(init)).then_some(init)
}

fn describe_exit(status: std::io::Result<std::process::ExitStatus>) -> String {
    match status {
        Ok(s) => format!("exited ({s})"),
        Err(e) => format!("could not be waited for: {e}"),
    }
}

fn forward_lines(
    stream: impl AsyncRead + Unpin + Send + 'static,
    logs: Arc<LogBuffer>,
    instance: String,
) {
    // Read to the end whatever comes (bytes that are not UTF-8 included): a reader that
    // stopped early would close the pipe, and the watchdog exits once nothing reads it.
    tokio::spawn(async move {
        let mut stream = BufReader::new(stream);
        let mut line = Vec::new();
        while let Ok(n) = stream.read_until(b'\n', &mut line).await {
            if n == 0 {
                break;
            }
            let text = String::from_utf8_lossy(&line);
            logs.push(&instance, text.trim_end_matches(['\n', '\r']).to_string());
            line.clear();
        }
    });
}

/// Polls the watchdog's health endpoint until it answers 200.
async fn wait_healthy(addr: SocketAddr, interval: Duration, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if probe(addr).await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(interval.min(Duration::from_millis(50))).await;
    }
}

/// One HTTP/1.0 health probe; true on a 200 status line.
pub(crate) async fn probe(addr: SocketAddr) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {HEALTH_PATH} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.ok()?;
        Some(head.starts_with(b"HTTP/1.") && &head[9..12] == b"200")
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

pub(crate) fn create_private_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

pub(crate) fn write_private_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents)
}

/// The command a function runs: `envProcess`, else its `fprocess` environment variable.
fn fprocess(dep: &FunctionDeployment) -> Option<&str> {
    dep.env_process
        .as_deref()
        .filter(|p| !p.trim().is_empty())
        .or_else(|| {
            dep.env_vars
                .as_ref()?
                .get("fprocess")
                .map(String::as_str)
                .filter(|p| !p.trim().is_empty())
        })
}

fn fixed_port_message(url: &str) -> String {
    format!(
        "envVars.upstream_url: {url:?} names a fixed port, so only one replica can run on this machine; \
         use http://127.0.0.1:0 and have the function listen on $PORT to run more"
    )
}

fn env_var<'a>(dep: &'a FunctionDeployment, key: &str) -> Option<&'a str> {
    dep.env_vars.as_ref()?.get(key).map(String::as_str)
}

#[async_trait]
impl Platform for LocalPlatform {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn validate(&self, dep: &FunctionDeployment) -> Result<(), String> {
        let Some(process) = fprocess(dep) else {
            return Err(
                "envProcess: is required by the local platform (the command each replica runs; \
                 with envVars mode=http it is a long-running server reached at envVars upstream_url)"
                    .to_string(),
            );
        };
        if let Err(e) = shell_words::split(process) {
            return Err(format!("envProcess: cannot be split into arguments: {e}"));
        }
        super::limits::check_resources("limits", &dep.limits)?;
        super::limits::check_resources("requests", &dep.requests)?;
        match env_var(dep, "mode").unwrap_or("classic") {
            "classic" | "" => Ok(()),
            "http" => match env_var(dep, "upstream_url") {
                None | Some("") => Err(
                    "envVars.upstream_url: is required with mode=http (e.g. http://127.0.0.1:5000)"
                        .to_string(),
                ),
                Some(url) => {
                    let uri = super::watchdog::parse_upstream(url)
                        .map_err(|e| format!("envVars.upstream_url: {e}"))?;
                    if uri.port_u16() != Some(0) && dep.min_replicas() > 1 {
                        return Err(fixed_port_message(url));
                    }
                    Ok(())
                }
            },
            other => Err(format!(
                "envVars.mode: {other:?} is not supported by the local platform (use \"classic\" or \"http\")"
            )),
        }
    }

    async fn apply(&self, workload: Workload, replicas: u64) -> Result<(), PlatformError> {
        let inner = &self.inner;
        let number = inner.generations.fetch_add(1, Ordering::Relaxed) + 1;
        let id = workload.id.clone();
        // The function's restart series at zero from its deploy, for rate() and increase().
        inner
            .metrics
            .replica_restarts
            .with_label_values(&[id.qualified().as_str(), inner.datacenter.as_str()]);
        let dir = inner
            .files
            .join(&id.namespace)
            .join(&id.name)
            .join(number.to_string());
        let secrets_dir = dir.join("secrets");
        let prepare = || -> std::io::Result<()> {
            if let (Isolation::FunctionUsers { .. }, Some(function)) =
                (&inner.isolation, dir.parent())
            {
                // Its user must get through to its generation's directory.
                super::isolation::traversable_dir(function)?;
            }
            create_private_dir(&secrets_dir)?;
            for (name, value) in &workload.secrets {
                write_private_file(&secrets_dir.join(name), value)?;
            }
            Ok(())
        };
        prepare()
            .map_err(|e| PlatformError::Failed(format!("cannot prepare {}: {e}", dir.display())))?;

        let dep = &workload.deployment;
        let mut env: Vec<(String, String)> = dep
            .env_vars
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let Some(p) = fprocess(dep) {
            env.push(("fprocess".into(), p.to_string()));
        }

        let (logs, published) = inner
            .read()
            .get(&id)
            .map(|e| (e.logs.clone(), e.published.clone()))
            .unwrap_or_else(|| {
                let logs = LogBuffer::new(&id.name, &id.namespace, inner.cfg.log_lines);
                (Arc::new(logs), Published::new(inner.table.row(&id)))
            });
        let generation = Arc::new(Generation {
            id: id.clone(),
            number,
            dir,
            launch: Launch {
                direct: direct(dep, &inner.cfg),
                env: env.into_boxed_slice(),
            },
            limits: Some(Limits::of(dep)).filter(Limits::any).map(Box::new),
            logs: logs.clone(),
            published: published.clone(),
            user: Mutex::new(None),
            platform: inner.clone(),
            slots: Mutex::new(Vec::new()),
            desired: AtomicU64::new(0),
            next_slot: AtomicU64::new(0),
            ready: Mutex::new(Vec::new()),
            endpoints: RwLock::new(Arc::new(EndpointSet::default())),
            ready_changed: Notify::new(),
            ready_count: AtomicU64::new(0),
            problem: Mutex::new(None),
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        generation.scale(replicas);

        let replaced = {
            let mut map = inner.write();
            match map.get_mut(&id) {
                None => {
                    let entry = Entry {
                        current: generation.clone(),
                        previous: None,
                        logs,
                        published,
                    };
                    entry.published.track(&entry);
                    map.insert(id.clone(), entry);
                    None
                }
                Some(entry) => {
                    let old = std::mem::replace(&mut entry.current, generation.clone());
                    let replaced = match entry.previous.take() {
                        // A second update before the first became ready: the one serving
                        // stays, the never-ready one goes.
                        Some(serving) if old.ready_count() == 0 => {
                            old.stop();
                            entry.previous = Some(serving.clone());
                            Some(serving)
                        }
                        Some(stale) => {
                            stale.stop();
                            entry.previous = Some(old.clone());
                            Some(old)
                        }
                        None => {
                            entry.previous = Some(old.clone());
                            Some(old)
                        }
                    };
                    entry.published.track(entry);
                    replaced
                }
            }
        };
        if let Some(old) = replaced {
            retire_when_ready(inner.clone(), id, old, generation, replicas);
        }
        Ok(())
    }

    fn validate_scale(&self, dep: &FunctionDeployment, replicas: u64) -> Result<(), String> {
        if replicas > 1 && env_var(dep, "mode") == Some("http") {
            if let Some(url) = env_var(dep, "upstream_url") {
                let fixed = super::watchdog::parse_upstream(url)
                    .map(|u| u.port_u16() != Some(0))
                    .unwrap_or(false);
                if fixed {
                    return Err(fixed_port_message(url));
                }
            }
        }
        Ok(())
    }

    async fn scale(&self, id: &FunctionId, replicas: u64) -> Result<(), PlatformError> {
        let current = self.inner.read().get(id).map(|e| e.current.clone());
        match current {
            Some(generation) => {
                generation.scale(replicas);
                Ok(())
            }
            None => Err(PlatformError::Failed(format!(
                "function {id} is not running"
            ))),
        }
    }

    async fn remove(&self, id: &FunctionId) -> Result<(), PlatformError> {
        let entry = self.inner.write().remove(id);
        self.inner.table.remove(id);
        if let Some(entry) = entry {
            entry.current.stop();
            if let Some(prev) = entry.previous {
                prev.stop();
            }
        }
        Ok(())
    }

    async fn healthcheck(&self) -> Result<(), PlatformError> {
        Ok(())
    }

    fn table(&self) -> &ReadyTable {
        &self.inner.table
    }

    fn logs(&self, id: &FunctionId, query: &LogQuery) -> Option<LogSubscription> {
        self.inner.read().get(id).map(|e| e.logs.subscribe(query))
    }

    async fn shutdown(&self) {
        let entries: Vec<Entry> = self.inner.write().drain().map(|(_, e)| e).collect();
        self.inner.table.clear();
        let mut generations = Vec::new();
        for entry in entries {
            generations.push(entry.current);
            generations.extend(entry.previous);
        }
        for g in &generations {
            g.stop();
        }
        for g in &generations {
            g.tasks.wait().await;
        }
        if let Isolation::FunctionUsers { files, .. } = &self.inner.isolation {
            let _ = tokio::fs::remove_dir_all(files).await;
        }
        self.inner.groups.remove();
    }
}

/// Stops `old` once `new` has a ready replica, unless another update or a removal took care of
/// it first. A new generation that never becomes ready leaves the old one serving.
fn retire_when_ready(
    inner: Arc<Inner>,
    id: FunctionId,
    old: Arc<Generation>,
    new: Arc<Generation>,
    replicas: u64,
) {
    tokio::spawn(async move {
        // At zero replicas there is nothing to wait for.
        while replicas > 0 && new.ready_count() == 0 {
            // Registered before the count is read again, so a change in between is not missed.
            let changed = new.ready_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if new.ready_count() > 0 {
                break;
            }
            tokio::select! {
                _ = changed => {}
                // Replaced or removed before it was ever ready: nothing to retire here.
                _ = new.cancel.cancelled() => return,
            }
        }
        let still_previous = {
            let mut map = inner.write();
            match map.get_mut(&id) {
                Some(entry)
                    if entry
                        .previous
                        .as_ref()
                        .is_some_and(|p| Arc::ptr_eq(p, &old)) =>
                {
                    entry.previous = None;
                    entry.published.track(entry);
                    true
                }
                _ => false,
            }
        };
        if still_previous {
            old.stop();
        }
    });
}
