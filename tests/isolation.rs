//! Functions on the local platform and on agents are isolated from faastastic and from each
//! other: run as root (as the test command does), every function gets a user of its own; a
//! hostile function tries to read the credentials, the store, another function's secret, the
//! agent's token and the server's environment, to write into the data directory and to kill
//! the server and another function's replica, and every attempt fails while its own secret
//! stays readable. Run as another user, the server says at start-up that functions share its
//! user.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::{echo_function, free_port, is_root, Agent, Options, Server};
use serde_json::{json, Value};

/// A temporary directory others may enter: what protects the server's files is its own
/// permissions, not the test's directory.
fn open_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Every attempt the hostile function makes, as `name: done` or `name: denied` lines.
const ATTEMPTS: &str = r#"
try() { if sh -c "$2" >/dev/null 2>&1; then echo "$1: done"; else echo "$1: denied"; fi; }
cat >/dev/null
try own_secret 'cat "$secret_mount_path/mine"'
try password 'cat "$DATA/basic-auth-password"'
try state 'cat "$DATA/state.db"'
try list_data 'ls "$DATA"'
try write_data 'touch "$DATA/planted"'
try other_secret 'cat "$HOME/../../other/1/secrets/theirs"'
try list_functions 'ls "$HOME/../.." | grep -qx other'
try token 'cat "$TOKEN_FILE"'
try server_environ 'cat /proc/$SERVER/environ'
try other_environ 'cat /proc/$OTHER/environ'
try kill_other 'kill -9 $OTHER'
try kill_server 'kill -9 $SERVER'
try host_tmp 'cat "$HOST_TMP"'
try see_server 'test -d /proc/$SERVER'
echo "uid: $(id -u) groups: $(id -G)"
echo "secrets: $secret_mount_path"
"#;

/// Deploys `other` (with secret `theirs`) and `hostile` (with secret `mine`) into `dc`, and
/// runs the hostile function's attempts against `data` (the data directory), `server` (the
/// process its replicas run under) and `token_file`: its answer.
async fn attempts(s: &Server, dc: &str, data: &Path, server: u32, token_file: &Path) -> String {
    // A file anyone may read in the machine's /tmp: a sandbox's /tmp is its own.
    let host_tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(host_tmp.path(), "on the host").unwrap();
    std::fs::set_permissions(host_tmp.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    for (name, value) in [("mine", "my-secret"), ("theirs", "their-secret")] {
        let r = s
            .system(reqwest::Method::POST, "/system/secrets")
            .json(&json!({"name": name, "value": value}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    }
    let mut other = echo_function("other");
    other["secrets"] = json!(["theirs"]);
    other["constraints"] = json!([format!("datacenter=={dc}")]);
    assert_eq!(s.deploy(other).await.status(), 202);
    s.wait_available("other", 1).await;
    let others = common::replica_pids(server);
    assert_eq!(others.len(), 1, "one replica of other: {others:?}");
    let hostile: Value = json!({
        "service": "hostile", "image": "local/sh", "secrets": ["mine"],
        "constraints": [format!("datacenter=={dc}")],
        "envProcess": "sh -c 'eval \"$ATTEMPTS\"'",
        "envVars": {
            "ATTEMPTS": ATTEMPTS,
            "DATA": data.display().to_string(),
            "SERVER": server.to_string(),
            "OTHER": others[0].to_string(),
            "TOKEN_FILE": token_file.display().to_string(),
            "HOST_TMP": host_tmp.path().display().to_string(),
        }
    });
    let r = s.deploy(hostile).await;
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    s.wait_available("hostile", 1).await;
    let (code, answer) = s.invoke("hostile", "").await;
    assert_eq!(code, 200, "{answer}");
    answer
}

/// Checks the hostile function's answer; `sandboxed`: it ran in a bubblewrap sandbox.
fn check_denied(answer: &str, sandboxed: bool) {
    let line = |name: &str| {
        answer
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name} in {answer}"))
            .to_string()
    };
    assert_eq!(line("own_secret"), "done", "{answer}");
    for attempt in [
        "password",
        "state",
        "list_data",
        "write_data",
        "other_secret",
        "list_functions",
        "token",
        "server_environ",
        "other_environ",
        "kill_other",
        "kill_server",
    ] {
        assert_eq!(line(attempt), "denied", "{attempt}: {answer}");
    }
    // What only a sandbox hides: the machine's /tmp and other processes; and where the
    // secrets are.
    let hidden = if sandboxed { "denied" } else { "done" };
    assert_eq!(line("host_tmp"), hidden, "{answer}");
    assert_eq!(line("see_server"), hidden, "{answer}");
    let secrets = line("secrets");
    assert_eq!(
        secrets == "/var/openfaas/secrets",
        sandboxed,
        "secrets at {secrets}"
    );
    let ids = line("uid");
    assert!(!ids.starts_with("0 "), "runs as root: {ids}");
    assert!(
        !ids.split_whitespace().any(|g| g == "0"),
        "keeps group root: {ids}"
    );
}

/// The owner and mode of every path under a function's files: directories above its
/// generation are root's and only traversable; its generation, secrets directory and secrets
/// are its user's alone.
fn check_files(root: &Path) {
    let mut seen = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let mode = meta.permissions().mode() & 0o7777;
            let depth = path.strip_prefix(root).unwrap().components().count();
            // root/<namespace>/<name>/<generation>/secrets/<secret>
            match depth {
                1 | 2 if meta.is_dir() => {
                    assert_eq!((meta.uid(), mode), (0, 0o711), "{}", path.display())
                }
                3 => assert!(
                    meta.uid() != 0 && meta.uid() == meta.gid() && mode == 0o700,
                    "{}: {} {mode:o}",
                    path.display(),
                    meta.uid()
                ),
                4 if meta.is_dir() => assert!(
                    meta.uid() != 0 && mode == 0o500,
                    "{}: {mode:o}",
                    path.display()
                ),
                5 => {
                    assert!(
                        meta.uid() != 0 && mode == 0o400,
                        "{}: {mode:o}",
                        path.display()
                    );
                    seen += 1;
                }
                _ => {}
            }
            if meta.is_dir() {
                stack.push(path);
            }
        }
    }
    assert!(seen >= 2, "no secrets seen under {}", root.display());
}

/// Where a server's functions keep their files: the directory its start-up log names.
fn files_of(log: &Path) -> PathBuf {
    let text = std::fs::read_to_string(log).unwrap();
    let files = text
        .lines()
        .find_map(|l| l.split("files=").nth(1))
        .unwrap_or_else(|| panic!("no files= in the log: {text}"));
    PathBuf::from(files.split_whitespace().next().unwrap())
}

#[tokio::test]
async fn a_hostile_function_on_the_local_platform_reaches_nothing_of_the_server() {
    hostile_on_the_local_platform("none").await;
}

#[tokio::test]
async fn a_hostile_function_in_a_sandbox_reaches_nothing_of_the_server() {
    common::require_program("bwrap", "bubblewrap");
    hostile_on_the_local_platform("bubblewrap").await;
}

async fn hostile_on_the_local_platform(sandbox: &str) {
    let dir = open_tempdir();
    let log = dir.path().join("serve.log");
    let data = dir.path().join("data");
    let cfg = format!("[local]\nsandbox = \"{sandbox}\"\n");
    let s = Server::with(Options {
        auth: true,
        config: Some(&cfg),
        data_dir: Some(&data),
        stderr_log: Some(&log),
        env: &[("RUST_LOG", "info")],
        ..Default::default()
    });
    if !is_root() {
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            text.contains("not running as root: functions run as this server's own user"),
            "{text}"
        );
        return;
    }
    let token = dir.path().join("token");
    std::fs::write(&token, "t").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let answer = attempts(&s, "home", &data, s.pid(), &token).await;
    check_denied(&answer, sandbox == "bubblewrap");
    check_files(&files_of(&log));
    // The server and the other function still serve.
    let (code, body) = s.invoke("other", "still here").await;
    assert_eq!((code, body.as_str()), (200, "still here"));
    // The data directory is the server's alone, and so is everything in it.
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{} is {mode:o}", path.display());
    }
}

/// Run as another user than root, the server says at start-up that functions share its
/// user, and they do.
#[tokio::test]
async fn run_as_another_user_functions_share_its_user_and_it_says_so() {
    if !is_root() {
        return; // the local platform's tests above check the warning then
    }
    let uid = 3_999_960;
    let dir = open_tempdir();
    std::os::unix::fs::chown(dir.path(), Some(uid), Some(uid)).unwrap();
    // The built program may sit where that user cannot reach it (a checkout in a private
    // directory): it runs a copy in the open directory.
    let program = dir.path().join("faastastic");
    std::fs::copy(common::BIN, &program).unwrap();
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
    let log = dir.path().join("serve.log");
    let s = Server::with(Options {
        data_dir: Some(&dir.path().join("data")),
        stderr_log: Some(&log),
        env: &[("RUST_LOG", "info")],
        uid: Some(uid),
        program: Some(&program),
        ..Default::default()
    });
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("not running as root: functions run as this server's own user"),
        "{text}"
    );
    let f = json!({"service": "who", "image": "local/sh", "envProcess": "id -u"});
    assert_eq!(s.deploy(f).await.status(), 202);
    s.wait_available("who", 1).await;
    assert_eq!(s.invoke("who", "").await, (200, format!("{uid}\n")));
}

#[tokio::test]
async fn a_hostile_function_on_an_agent_reaches_nothing_of_the_agent() {
    if !is_root() {
        // The local platform's test above checks the warning; the agent shares its code.
        return;
    }
    let dir = open_tempdir();
    let port = free_port();
    let agent_log = dir.path().join("agent.log");
    let agent = Agent::start_with("far", port, dir.path(), &[], Some(&agent_log));
    // Written readable by all: the agent says so.
    let token = dir.path().join("token");
    let warned = std::fs::read_to_string(&agent_log).unwrap();
    assert!(
        warned.contains("readable by other users") && warned.contains("chmod 600"),
        "{warned}"
    );
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cfg = format!(
        "[[datacenters]]\nname = \"home\"\n[[datacenters]]\nname = \"far\"\nplatform = \"remote\"\nurl = \"http://127.0.0.1:{port}\"\ntoken_file = \"{}\"\n",
        dir.path().join("token").display()
    );
    let s = Server::with(Options {
        auth: true,
        config: Some(&cfg),
        ..Default::default()
    });
    let answer = attempts(
        &s,
        "far",
        &dir.path().join("far"),
        agent.0.id(),
        &dir.path().join("token"),
    )
    .await;
    // The agent's default: a sandbox where bubblewrap works, as it does where the tests run.
    common::require_program("bwrap", "bubblewrap");
    check_denied(&answer, true);
}

/// `limits.memory` on the local platform: a request whose process allocates past it is
/// killed by the kernel, the function's log says why, the replica keeps serving smaller
/// requests, and other functions are not touched.
#[tokio::test]
async fn a_function_past_its_memory_limit_is_stopped_and_says_why() {
    memory_hog(true).await;
}

/// Without control groups (`local.cgroups = false`, as where none is writable), the memory
/// limit holds for each function process on its own: the allocation fails, the replica
/// serves on.
#[tokio::test]
async fn without_control_groups_a_memory_limit_holds_per_process() {
    memory_hog(false).await;
}

async fn memory_hog(cgroups: bool) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serve.log");
    let cfg = format!("[local]\ncgroups = {cgroups}\n");
    let s = Server::with(Options {
        config: Some(&cfg),
        stderr_log: Some(&log),
        env: &[("RUST_LOG", "info")],
        ..Default::default()
    });
    let started = std::fs::read_to_string(&log).unwrap();
    let grouped = started.contains("limits.memory and limits.cpu are applied per replica");
    if cgroups && !grouped {
        // Only where no control group is writable, which the start-up log says.
        assert!(
            !is_root()
                || !std::path::Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists(),
            "{started}"
        );
    }
    if !cgroups {
        assert!(
            !grouped && started.contains("no control groups (local.cgroups = false)"),
            "{started}"
        );
    }
    assert_eq!(s.deploy(echo_function("bystander")).await.status(), 202);
    let hog = json!({"service": "hog", "image": "local/sh",
        "limits": {"memory": "32Mi", "cpu": "500m"},
        "envProcess": r#"sh -c 'x=$(head -c ${Http_Query#n=} /dev/zero | tr "\0" a); echo kept ${#x}'"#});
    assert_eq!(s.deploy(hog).await.status(), 202);
    s.wait_available("hog", 1).await;
    s.wait_available("bystander", 1).await;
    let call = |n: u64| {
        let url = s.url(&format!("/function/hog?n={n}"));
        let http = s.http.clone();
        async move {
            let r = http.post(url).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    assert_eq!(call(1000).await, (200, "kept 1000\n".to_string()));
    let (code, body) = call(200_000_000).await;
    assert!(
        code != 200 && !body.contains("kept"),
        "ran past its limit: {code} {body}"
    );
    if grouped {
        // Said in the function's log.
        let said = common::poll(std::time::Duration::from_secs(10), || async {
            s.system_text("/system/logs?name=hog&tail=50")
                .await
                .contains("more memory than limits.memory (32 MiB)")
        })
        .await;
        assert!(
            said,
            "{}",
            s.system_text("/system/logs?name=hog&tail=50").await
        );
    }
    // The replica serves on, and so does the other function.
    assert_eq!(call(2000).await, (200, "kept 2000\n".to_string()));
    assert_eq!(
        s.invoke("bystander", "fine").await,
        (200, "fine".to_string())
    );
    let status: Value = s.get_json("/system/function/hog").await;
    assert_eq!(status["availableReplicas"], 1, "{status}");
}

/// The live processes running as a user of `users`: pid and command line.
fn processes_of(users: std::ops::RangeInclusive<u32>) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
        };
        let zombie = field("State:").as_deref() == Some("Z");
        let uid = field("Uid:").and_then(|u| u.parse::<u32>().ok());
        if !zombie && uid.is_some_and(|u| users.contains(&u)) {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            found.push((pid, cmdline.chars().take(120).collect()));
        }
    }
    found
}

/// A server killed with SIGKILL at any moment, replicas starting in their sandboxes or
/// running, leaves no process of its functions behind: not the function, not the watchdog,
/// not the sandbox's own processes (which bubblewrap tells to die with their parent only once
/// they run, so a server killed just then left them running).
#[tokio::test]
async fn a_killed_server_leaves_no_process_of_its_functions_behind() {
    common::require_program("bwrap", "bubblewrap");
    if !is_root() {
        return; // no users of their own (the test command runs as root)
    }
    // Users this test alone hands out, so that what runs as them is this test's.
    let first = 1_800_000_000 + (std::process::id() % 10_000) * 100;
    let users = first..=first + 99;
    let cfg = format!(
        "[local]\nsandbox = \"bubblewrap\"\nuid_range = [{first}, {}]\n",
        first + 99
    );
    for (round, delay_ms) in [0u64, 30, 60, 100, 150, 200, 300, 500, 1500]
        .into_iter()
        .enumerate()
    {
        let mut s = Server::with(Options {
            config: Some(&cfg),
            ..Default::default()
        });
        for name in ["a", "b", "c"] {
            let mut f = echo_function(name);
            f["labels"] = json!({"com.openfaas.scale.min": "3"});
            assert_eq!(s.deploy(f).await.status(), 202);
        }
        tokio::time::sleep(std::time::Duration::from_millis(delay_ms)).await;
        let running = processes_of(users.clone()).len();
        s.kill();
        let gone = common::poll(std::time::Duration::from_secs(10), || async {
            processes_of(users.clone()).is_empty()
        })
        .await;
        assert!(
            gone,
            "round {round}, killed {delay_ms} ms after the deploys with {running} processes \
             of its functions running: left behind {:#?}",
            processes_of(users.clone())
        );
    }
    // Replicas stopped while they start leave nothing either (a sandbox killed while its
    // init was being set up left that init waiting forever).
    let s = Server::with(Options {
        config: Some(&cfg),
        ..Default::default()
    });
    assert_eq!(s.deploy(echo_function("flicker")).await.status(), 202);
    s.wait_available("flicker", 1).await;
    for round in 0..12u64 {
        assert_eq!(s.scale("flicker", 4).await, 202);
        tokio::time::sleep(std::time::Duration::from_millis(round * 3)).await;
        assert_eq!(s.scale("flicker", 0).await, 202);
    }
    let gone = common::poll(std::time::Duration::from_secs(15), || async {
        processes_of(users.clone()).is_empty()
    })
    .await;
    assert!(
        gone,
        "replicas stopped while starting left behind {:#?}",
        processes_of(users.clone())
    );
}

/// A replica stopped in its sandbox gets SIGTERM in its watchdog, which stops the function
/// gracefully: its TERM handler runs (bubblewrap passes no signal on; signalling the sandbox
/// killed everything in it outright).
#[tokio::test]
async fn a_sandboxed_replica_is_stopped_gracefully() {
    common::require_program("bwrap", "bubblewrap");
    common::require_program("python3", "python3");
    if !is_root() {
        return; // the sandbox comes with users of their own (the test command runs as root)
    }
    let s = Server::with(Options {
        config: Some("[local]\nsandbox = \"bubblewrap\"\n"),
        ..Default::default()
    });
    let port = free_port();
    let f = json!({"service": "graceful", "image": "local/sh",
        "envProcess": format!(
            "sh -c 'trap \"echo stopped gracefully >&2; exit 0\" TERM; \
             python3 -m http.server {port} --bind 127.0.0.1 & wait'"),
        "envVars": {"mode": "http", "upstream_url": format!("http://127.0.0.1:{port}")}});
    assert_eq!(s.deploy(f).await.status(), 202);
    s.wait_available("graceful", 1).await;
    let scale = s
        .system(reqwest::Method::POST, "/system/scale-function/graceful")
        .json(&json!({"replicas": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(scale.status(), 202);
    let said = common::poll(std::time::Duration::from_secs(10), || async {
        s.system_text("/system/logs?name=graceful&tail=50")
            .await
            .contains("stopped gracefully")
    })
    .await;
    assert!(
        said,
        "the function's TERM handler did not run: {}",
        s.system_text("/system/logs?name=graceful&tail=50").await
    );
}
