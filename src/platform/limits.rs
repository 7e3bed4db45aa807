//! `limits.memory` and `limits.cpu` on the local platform: each replica (its watchdog and
//! everything it starts) in a control group of its own with those limits, under the control
//! group faastastic itself runs in. cgroup v1 (the `memory` and `cpu` hierarchies) and cgroup
//! v2 (where faastastic's group can have children with the controllers enabled, as under a
//! delegated systemd unit) are both used; where neither is writable the limits are not
//! applied, and the start-up log says so.
//!
//! A process past its memory limit is killed by the kernel; the replica's exit then names
//! the limit, and a kill that leaves the replica running (a classic request's process) is
//! logged for its function.

use std::io;
use std::path::{Path, PathBuf};

use crate::model::{FunctionDeployment, FunctionResources};

/// What a replica may use; `None` where the deployment sets no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: Option<i64>,
    /// Nano-CPUs (1e9 is one CPU).
    pub nano_cpus: Option<i64>,
}

impl Limits {
    pub fn of(dep: &FunctionDeployment) -> Limits {
        let limits = dep.limits.as_ref();
        Limits {
            memory_bytes: limits.and_then(|l| parse_memory(l.memory.as_deref()?)),
            nano_cpus: limits.and_then(|l| parse_cpu(l.cpu.as_deref()?)),
        }
    }

    /// The data limit the watchdog gives each function process where there is no control
    /// group (`Groups::None`).
    pub fn rlimit_data(&self, groups: &Groups) -> Option<i64> {
        let grouped = matches!(
            groups,
            Groups::V1 {
                memory: Some(_),
                ..
            } | Groups::V2(_)
        );
        (!grouped).then_some(self.memory_bytes).flatten()
    }

    pub fn any(&self) -> bool {
        self.memory_bytes.is_some() || self.nano_cpus.is_some()
    }
}

/// `128Mi`, `1G`, `512k` or bytes.
pub fn parse_memory(text: &str) -> Option<i64> {
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
pub fn parse_cpu(text: &str) -> Option<i64> {
    let t = text.trim();
    match t.strip_suffix('m') {
        Some(milli) => milli.parse::<f64>().ok().map(|m| (m * 1e6) as i64),
        None => t.parse::<f64>().ok().map(|c| (c * 1e9) as i64),
    }
}

/// A deployment's `limits` or `requests` (`field`), each value readable.
pub fn check_resources(field: &str, r: &Option<FunctionResources>) -> Result<(), String> {
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

/// Where a platform makes its replicas' control groups.
#[derive(Debug, Clone)]
pub enum Groups {
    /// cgroup v1: a directory in the memory and in the cpu hierarchy (either may be missing).
    V1 {
        memory: Option<PathBuf>,
        cpu: Option<PathBuf>,
    },
    /// cgroup v2: one directory whose children have the memory and cpu controllers.
    V2(PathBuf),
    /// No writable control group (or `local.cgroups = false`): a memory limit is applied to
    /// each function process as `RLIMIT_DATA` by the watchdog, a CPU limit not at all.
    None(String),
}

/// The CFS period a CPU limit is expressed in.
const CPU_PERIOD_US: i64 = 100_000;

impl Groups {
    /// Finds where `name` goes under this process's own control groups (made when a replica
    /// first needs it), and says in the log which is in force.
    pub fn prepare(name: &str, datacenter: &str, enabled: bool) -> Groups {
        // Not even looked for when switched off: finding them may move this process.
        let groups = match enabled.then(|| Self::find(name)) {
            None => Groups::None("local.cgroups = false".to_string()),
            Some(Ok(g)) => g,
            Some(Err(e)) => Groups::None(e.to_string()),
        };
        match &groups {
            Groups::V1 { memory, cpu } => tracing::info!(
                datacenter,
                memory = ?memory,
                cpu = ?cpu,
                "limits.memory and limits.cpu are applied per replica (cgroup v1)"
            ),
            Groups::V2(dir) => tracing::info!(
                datacenter,
                dir = %dir.display(),
                "limits.memory and limits.cpu are applied per replica (cgroup v2)"
            ),
            Groups::None(why) => tracing::warn!(
                datacenter,
                "no control groups ({why}): limits.memory holds for each function process on its own (RLIMIT_DATA), limits.cpu is not applied"
            ),
        }
        groups
    }

    fn find(name: &str) -> io::Result<Groups> {
        let own = std::fs::read_to_string("/proc/self/cgroup")?;
        let mut v1_memory = None;
        let mut v1_cpu = None;
        let mut v2 = None;
        for line in own.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(_), Some(controllers), Some(path)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let path = path.trim_start_matches('/');
            if controllers.is_empty() {
                v2 = Some(path.to_string());
            }
            for c in controllers.split(',') {
                match c {
                    "memory" => v1_memory = Some(Path::new("/sys/fs/cgroup/memory").join(path)),
                    "cpu" => {
                        let mount = ["/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"]
                            .into_iter()
                            .map(Path::new)
                            .find(|m| m.join("cpu.cfs_quota_us").exists());
                        v1_cpu = mount.map(|m| m.join(path));
                    }
                    _ => {}
                }
            }
        }
        if v1_memory.is_some() || v1_cpu.is_some() {
            // Made when a replica first needs it: tried here, and removed again.
            let make = |base: Option<PathBuf>| -> Option<PathBuf> {
                let dir = base?.join(name);
                fresh_dir(&dir).ok()?;
                let _ = std::fs::remove_dir(&dir);
                Some(dir)
            };
            let (memory, cpu) = (make(v1_memory), make(v1_cpu));
            if memory.is_none() && cpu.is_none() {
                return Err(io::Error::other(
                    "the cgroup v1 hierarchies are not writable",
                ));
            }
            return Ok(Groups::V1 { memory, cpu });
        }
        let Some(path) = v2 else {
            return Err(io::Error::other("this process is in no control group"));
        };
        // Once per process: the first call may move this process into a leaf of its group.
        static BASE: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
        let base = BASE
            .get_or_init(|| {
                let base = Path::new("/sys/fs/cgroup").join(path);
                enable_v2_children(&base, std::process::id())
                    .map(|()| base)
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(io::Error::other)?;
        let dir = base.join(name);
        fresh_dir(&dir)?;
        std::fs::write(dir.join("cgroup.subtree_control"), "+memory +cpu")
            .or_else(|_| std::fs::write(dir.join("cgroup.subtree_control"), "+memory"))?;
        Ok(Groups::V2(dir))
    }

    /// A control group for one replica with `limits`; `None` when limits are not applied.
    pub fn replica(&self, instance: &str, limits: Limits) -> io::Result<Option<ReplicaGroup>> {
        if !limits.any() {
            return Ok(None);
        }
        let mut dirs = Vec::new();
        let mut oom = None;
        match self {
            Groups::None(_) => return Ok(None),
            Groups::V1 { memory, cpu } => {
                if let (Some(base), Some(bytes)) = (memory, limits.memory_bytes) {
                    fresh_dir(base)?;
                    let dir = base.join(instance);
                    fresh_dir(&dir)?;
                    std::fs::write(dir.join("memory.limit_in_bytes"), bytes.to_string())?;
                    // Swap would let a replica run past its limit, slowly.
                    let _ =
                        std::fs::write(dir.join("memory.memsw.limit_in_bytes"), bytes.to_string());
                    oom = Some(OomCounter::V1(dir.join("memory.oom_control")));
                    dirs.push(dir);
                }
                if let (Some(base), Some(nano)) = (cpu, limits.nano_cpus) {
                    fresh_dir(base)?;
                    let dir = base.join(instance);
                    fresh_dir(&dir)?;
                    std::fs::write(dir.join("cpu.cfs_period_us"), CPU_PERIOD_US.to_string())?;
                    std::fs::write(dir.join("cpu.cfs_quota_us"), quota_us(nano).to_string())?;
                    dirs.push(dir);
                }
            }
            Groups::V2(base) => {
                let dir = base.join(instance);
                fresh_dir(&dir)?;
                if let Some(bytes) = limits.memory_bytes {
                    std::fs::write(dir.join("memory.max"), bytes.to_string())?;
                    let _ = std::fs::write(dir.join("memory.swap.max"), "0");
                    oom = Some(OomCounter::V2(dir.join("memory.events")));
                }
                // Where the cpu controller could not be enabled, a CPU limit is not applied.
                if let (Some(nano), true) = (limits.nano_cpus, dir.join("cpu.max").exists()) {
                    std::fs::write(
                        dir.join("cpu.max"),
                        format!("{} {CPU_PERIOD_US}", quota_us(nano)),
                    )?;
                }
                dirs.push(dir);
            }
        }
        // A group left by this replica's previous run (its removal still pending) keeps its
        // count: only kills from now on are this run's.
        let since = oom.as_ref().map_or(0, OomCounter::read);
        Ok(Some(ReplicaGroup {
            dirs,
            oom,
            since,
            limits,
        }))
    }

    /// Removes the platform's control groups (each replica's is removed when it stops).
    pub fn remove(&self) {
        let dirs: Vec<&PathBuf> = match self {
            Groups::V1 { memory, cpu } => memory.iter().chain(cpu.iter()).collect(),
            Groups::V2(dir) => vec![dir],
            Groups::None(_) => Vec::new(),
        };
        for dir in dirs {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// A CPU limit as a CFS quota per period, at least 1 ms (the kernel's minimum).
fn quota_us(nano_cpus: i64) -> i64 {
    (nano_cpus.saturating_mul(CPU_PERIOD_US) / 1_000_000_000).max(1000)
}

/// Creates `dir` unless it is there.
/// Where this process's own control group goes when it gives its children controllers.
const V2_SERVER_LEAF: &str = "faastastic-server";

/// Makes cgroup v2 group `base` (this process's, `pid`) able to give its children the memory
/// and cpu controllers. The kernel lets a group enable controllers for its children only when
/// it holds no process itself, so when `pid` is alone in `base` it moves into a leaf
/// (`V2_SERVER_LEAF`) first, as a service delegated its group by systemd (`Delegate=yes`)
/// must; a group shared with other processes is left alone, with the fix in the error.
fn enable_v2_children(base: &Path, pid: u32) -> io::Result<()> {
    let enabled = |file: &str| -> io::Result<bool> {
        let text = std::fs::read_to_string(base.join(file))?;
        Ok(text.split_whitespace().any(|c| c == "memory"))
    };
    if enabled("cgroup.subtree_control")? {
        return Ok(());
    }
    if !enabled("cgroup.controllers")? {
        return Err(io::Error::other(format!(
            "the memory controller is not available in {} (delegate it, e.g. Delegate=yes in a systemd unit)",
            base.display()
        )));
    }
    let procs = std::fs::read_to_string(base.join("cgroup.procs"))?;
    let others = procs
        .split_whitespace()
        .filter(|p| *p != pid.to_string())
        .count();
    if others > 0 {
        return Err(io::Error::other(format!(
            "{} holds {others} other processes, and a group with processes cannot give its children controllers: run faastastic in a group of its own (a systemd unit with Delegate=yes)",
            base.display()
        )));
    }
    let leaf = base.join(V2_SERVER_LEAF);
    fresh_dir(&leaf)?;
    std::fs::write(leaf.join("cgroup.procs"), pid.to_string())
        .map_err(|e| io::Error::other(format!("moving into {}: {e}", leaf.display())))?;
    std::fs::write(base.join("cgroup.subtree_control"), "+memory +cpu")
        .or_else(|_| std::fs::write(base.join("cgroup.subtree_control"), "+memory"))
        .map_err(|e| {
            // Back where it was, so that nothing is left half done.
            let _ = std::fs::write(base.join("cgroup.procs"), pid.to_string());
            let _ = std::fs::remove_dir(&leaf);
            io::Error::other(format!(
                "enabling the memory controller for {}'s children: {e}",
                base.display()
            ))
        })
}

fn fresh_dir(dir: &Path) -> io::Result<()> {
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

/// How many times the kernel killed a process of a group for its memory.
#[derive(Debug)]
enum OomCounter {
    /// `memory.oom_control`'s `oom_kill` line.
    V1(PathBuf),
    /// `memory.events`' `oom_kill` line.
    V2(PathBuf),
}

impl OomCounter {
    fn read(&self) -> u64 {
        let (OomCounter::V1(path) | OomCounter::V2(path)) = self;
        std::fs::read_to_string(path)
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
            })
            .unwrap_or(0)
    }
}

/// One replica's control groups; removed when dropped (once its processes are gone).
#[derive(Debug)]
pub struct ReplicaGroup {
    dirs: Vec<PathBuf>,
    oom: Option<OomCounter>,
    /// The memory kill count when this run began.
    since: u64,
    limits: Limits,
}

impl ReplicaGroup {
    /// The `cgroup.procs` files a replica's first process writes itself into.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Processes of this replica the kernel killed for memory so far.
    pub fn oom_kills(&self) -> u64 {
        self.oom
            .as_ref()
            .map_or(0, |c| c.read().saturating_sub(self.since))
    }

    /// What a memory kill says, naming the limit.
    pub fn oom_reason(&self) -> String {
        match self.limits.memory_bytes {
            Some(bytes) => format!(
                "killed for using more memory than limits.memory ({} MiB)",
                bytes / (1 << 20)
            ),
            None => "killed for using too much memory".to_string(),
        }
    }
}

impl Drop for ReplicaGroup {
    fn drop(&mut self) {
        let left: Vec<PathBuf> = self
            .dirs
            .drain(..)
            .filter(|dir| std::fs::remove_dir(dir).is_err() && dir.exists())
            .collect();
        // The kernel refuses while a process is still inside (one being reaped): tried again
        // for a few seconds.
        if let (false, Ok(runtime)) = (left.is_empty(), tokio::runtime::Handle::try_current()) {
            runtime.spawn(async move {
                for _ in 0..50 {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    if left
                        .iter()
                        .all(|d| std::fs::remove_dir(d).is_ok() || !d.exists())
                    {
                        return;
                    }
                }
            });
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

    #[test]
    fn cpu_limits_become_quotas() {
        assert_eq!(quota_us(500_000_000), 50_000);
        assert_eq!(quota_us(2_000_000_000), 200_000);
        assert_eq!(quota_us(1_000), 1000, "the kernel's minimum");
    }

    /// A cgroup v2 group as the kernel shows it, in a temporary directory (this machine's
    /// control groups are v1): its controllers, enabled ones and processes.
    fn v2_group(controllers: &str, enabled: &str, procs: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (file, text) in [
            ("cgroup.controllers", controllers),
            ("cgroup.subtree_control", enabled),
            ("cgroup.procs", procs),
        ] {
            std::fs::write(dir.path().join(file), text).unwrap();
        }
        dir
    }

    #[test]
    fn on_cgroup_v2_the_server_moves_into_a_leaf_to_give_replicas_controllers() {
        // Alone in a delegated group: moved into the leaf, controllers enabled.
        let g = v2_group("cpuset cpu io memory pids\n", "\n", "4242\n");
        enable_v2_children(g.path(), 4242).unwrap();
        let read = |f: &str| std::fs::read_to_string(g.path().join(f)).unwrap();
        assert_eq!(read(&format!("{V2_SERVER_LEAF}/cgroup.procs")), "4242");
        assert_eq!(read("cgroup.subtree_control"), "+memory +cpu");
        // Already enabled: nothing moves.
        let g = v2_group("cpu memory\n", "cpu memory\n", "4242\n");
        enable_v2_children(g.path(), 4242).unwrap();
        assert!(!g.path().join(V2_SERVER_LEAF).exists());
        // Shared with another process: left alone, and the error says what to do.
        let g = v2_group("cpu memory\n", "\n", "4242\n77\n");
        let err = enable_v2_children(g.path(), 4242).unwrap_err().to_string();
        assert!(
            err.contains("1 other processes") && err.contains("Delegate=yes"),
            "{err}"
        );
        assert!(!g.path().join(V2_SERVER_LEAF).exists());
        assert_eq!(
            std::fs::read_to_string(g.path().join("cgroup.subtree_control")).unwrap(),
            "\n"
        );
        // No memory controller handed down: named.
        let g = v2_group("cpu pids\n", "\n", "4242\n");
        let err = enable_v2_children(g.path(), 4242).unwrap_err().to_string();
        assert!(err.contains("not available"), "{err}");
    }

    #[test]
    fn the_oom_kill_count_is_read_from_either_version() {
        let dir = tempfile::tempdir().unwrap();
        let v1 = dir.path().join("memory.oom_control");
        std::fs::write(&v1, "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n").unwrap();
        assert_eq!(OomCounter::V1(v1).read(), 2);
        let v2 = dir.path().join("memory.events");
        std::fs::write(&v2, "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n").unwrap();
        assert_eq!(OomCounter::V2(v2).read(), 1);
        assert_eq!(OomCounter::V2(dir.path().join("none")).read(), 0);
    }
}
