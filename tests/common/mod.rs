//! Starts the real `faastastic` binary on a kernel-chosen loopback port with its own data
//! directory, and kills it (and so its replicas) when dropped.
#![allow(dead_code)]

pub mod docker;
pub mod postgres;
pub mod tls;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const BIN: &str = env!("CARGO_BIN_EXE_faastastic");

pub struct Server {
    child: Child,
    pub base: String,
    pub data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    pub user: String,
    pub password: Option<String>,
    pub http: reqwest::Client,
    /// The CA of its TLS certificate, when it serves TLS.
    pub ca_file: Option<PathBuf>,
}

#[derive(Default)]
pub struct Options<'a> {
    pub auth: bool,
    pub config: Option<&'a str>,
    pub data_dir: Option<&'a Path>,
    /// Extra environment variables for the server (they win over `RUST_LOG` from the test's
    /// own environment).
    pub env: &'a [(&'a str, &'a str)],
    /// A file to write the server's stderr to, instead of the test's stderr.
    pub stderr_log: Option<&'a Path>,
    /// The server's working directory (a relative `data_dir` is taken from it).
    pub cwd: Option<&'a Path>,
    /// The CA of a server that serves TLS (its `[tls]`): the harness's client trusts it.
    pub ca_file: Option<&'a Path>,
    /// Run the server as this user and group (the tests run as root).
    pub uid: Option<u32>,
    /// The program to run instead of the one built (a copy another user can reach).
    pub program: Option<&'a Path>,
}

impl Server {
    /// A server with auth off and a fresh data directory.
    pub fn start() -> Server {
        Server::with(Options::default())
    }

    pub fn with(opts: Options) -> Server {
        let (tmp, data_dir) = match opts.data_dir {
            Some(dir) => (None, dir.to_path_buf()),
            None => {
                let tmp = tempfile::tempdir().expect("temp dir");
                let dir = tmp.path().join("data");
                (Some(tmp), dir)
            }
        };
        // Where the harness finds the data directory (the server may take it relative to `cwd`).
        let local_dir = match opts.cwd {
            Some(cwd) if data_dir.is_relative() => cwd.join(&data_dir),
            _ => data_dir.clone(),
        };
        let mut cmd = Command::new(opts.program.unwrap_or(Path::new(BIN)));
        cmd.arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(&data_dir)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if !opts.auth {
            cmd.arg("--no-auth");
        }
        if let Some(dir) = opts.cwd {
            cmd.current_dir(dir);
        }
        if let Some(uid) = opts.uid {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(uid);
        }
        for (key, value) in opts.env {
            cmd.env(key, value);
        }
        if let Some(path) = opts.stderr_log {
            cmd.stderr(std::fs::File::create(path).expect("create the stderr log"));
        }
        if let Some(config) = opts.config {
            let path = std::path::absolute(local_dir.with_extension("toml")).unwrap();
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, config).unwrap();
            cmd.arg("--config").arg(&path);
        }
        let mut child = cmd.spawn().expect("start faastastic");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let base = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(url) = line.strip_prefix("faastastic listening on ") {
                        break url.trim().to_string();
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!("faastastic did not report its address within 30 s");
                }
            }
        };
        let (user, password) = if opts.auth {
            let read = |f: &str| {
                std::fs::read_to_string(local_dir.join(f))
                    .ok()
                    .map(|s| s.trim().to_string())
            };
            (
                read("basic-auth-user").unwrap_or_else(|| "admin".into()),
                read("basic-auth-password"),
            )
        } else {
            ("admin".into(), None)
        };
        Server {
            child,
            base,
            data_dir: local_dir,
            _tmp: tmp,
            user,
            password,
            http: client_trusting(opts.ca_file),
            ca_file: opts.ca_file.map(Path::to_path_buf),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the server process has not exited (a panic that took it down shows here).
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// `host:port` of the listener, for raw TCP clients.
    pub fn addr(&self) -> String {
        let base = self.base.trim_start_matches("https://");
        base.trim_start_matches("http://").to_string()
    }

    /// The `Authorization` header value `system` sends, when auth is on.
    pub fn basic_auth_header(&self) -> Option<String> {
        use base64::Engine;
        self.password.as_ref().map(|p| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{}:{p}", self.user))
            )
        })
    }

    /// SIGKILL, as a crash would; the data directory stays for a restart.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// A request to a `/system` route, with credentials when auth is on.
    pub fn system(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, self.url(path));
        match &self.password {
            Some(p) => req.basic_auth(&self.user, Some(p)),
            None => req,
        }
    }

    /// GET a `/system` route that must succeed, decoded from JSON.
    pub async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
        let r = self
            .system(reqwest::Method::GET, path)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "GET {path}: {}", r.status());
        r.json().await.unwrap()
    }

    pub async fn deploy(&self, body: Value) -> reqwest::Response {
        self.system(reqwest::Method::POST, "/system/functions")
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub async fn status(&self, name: &str) -> (u16, Value) {
        let r = self
            .system(reqwest::Method::GET, &format!("/system/function/{name}"))
            .send()
            .await
            .unwrap();
        let code = r.status().as_u16();
        (code, r.json().await.unwrap_or(Value::Null))
    }

    /// Polls a function's status until `availableReplicas` equals `want`.
    pub async fn wait_available(&self, name: &str, want: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (code, body) = self.status(name).await;
            if code == 200 && body["availableReplicas"].as_u64().unwrap_or(0) == want {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "{name}: availableReplicas never reached {want}; last status {code} {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `availableReplicas` of a function, 0 when it is not there.
    pub async fn available(&self, name: &str) -> u64 {
        self.status(name).await.1["availableReplicas"]
            .as_u64()
            .unwrap_or(0)
    }

    /// A `GET` of a `/system/*` path (with the server's credentials); the body as text.
    pub async fn system_text(&self, path: &str) -> String {
        text_of(self.system(reqwest::Method::GET, path)).await
    }

    /// An invocation with a chunked body (the invoke lane hands those to the general path),
    /// on a connection of its own; the status and the whole answer.
    pub async fn invoke_chunked(&self, name: &str, body: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.addr();
        let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "POST /function/{name} HTTP/1.1\r\nHost: {addr}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), conn.read_to_end(&mut answer))
            .await
            .expect("an answer within 20 s")
            .unwrap();
        let text = String::from_utf8_lossy(&answer).into_owned();
        let code = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (code, text)
    }

    /// `POST /system/scale-function/NAME`; the status code.
    pub async fn scale(&self, name: &str, replicas: u64) -> u16 {
        self.system(
            reqwest::Method::POST,
            &format!("/system/scale-function/{name}"),
        )
        .json(&json!({"serviceName": name, "replicas": replicas}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
    }

    /// `PUT /system/functions`; the status code.
    pub async fn update(&self, body: &Value) -> u16 {
        self.system(reqwest::Method::PUT, "/system/functions")
            .json(body)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// `DELETE /system/functions`; the status code.
    pub async fn remove(&self, name: &str) -> u16 {
        self.system(reqwest::Method::DELETE, "/system/functions")
            .json(&json!({"functionName": name}))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    pub async fn invoke(&self, name: &str, body: &str) -> (u16, String) {
        let r = self
            .http
            .post(self.url(&format!("/function/{name}")))
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// POSTs an Alertmanager webhook body to `/system/alert`.
    pub async fn post_alert(&self, body: &Value) -> reqwest::Response {
        self.system(reqwest::Method::POST, "/system/alert")
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn metrics(&self) -> String {
        text_of(self.http.get(self.url("/metrics"))).await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Calls `check` until it returns true or `timeout` passes; never sleeps longer than 50 ms.
/// A request's answer body as text (the request must be answered).
async fn text_of(request: reqwest::RequestBuilder) -> String {
    request.send().await.unwrap().text().await.unwrap()
}

/// The harness's HTTP client, trusting `ca_file` (a TLS server's private CA) if given.
pub fn client_trusting(ca_file: Option<&Path>) -> reqwest::Client {
    let builder = reqwest::Client::builder().pool_max_idle_per_host(0);
    let builder = match ca_file {
        Some(ca) => {
            let pem = std::fs::read(ca).unwrap();
            builder
                .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
                .tls_built_in_root_certs(false)
        }
        None => builder,
    };
    builder.build().unwrap()
}

pub async fn poll<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A classic-mode function that echoes its input.
pub fn echo_function(name: &str) -> Value {
    json!({"service": name, "image": "local/echo", "envProcess": "cat", "labels": {}, "annotations": {}})
}

/// Parsed headers as (lower-cased name, value as text) pairs.
pub fn lower_headers(headers: &[httparse::Header<'_>]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect()
}

/// Reads a metric sample value from Prometheus text, by exact series text.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// Whether the tests run as root: functions then get users of their own.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Panics, naming the package, when a program a test needs is not installed: tests never skip
/// silently (`scripts/test.sh` installs these).
pub fn require_program(program: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{program} is required by this test and is not installed: apt-get install -y {package} (or run ./scripts/test.sh)"
    );
}

/// A helper process (Prometheus, Alertmanager) killed and reaped when dropped, even when the
/// test fails first.
pub struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `program` with its output discarded.
pub fn spawn_quiet(program: &str, args: &[String]) -> Proc {
    Proc(
        Command::new(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}")),
    )
}

/// PIDs and command lines of the processes whose parent is `parent`.
pub fn child_pids(parent: u32) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command name (which is in parentheses): state, ppid, ...
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let ppid: u32 = rest
            .split_whitespace()
            .nth(1)
            .unwrap_or("0")
            .parse()
            .unwrap_or(0);
        if ppid == parent {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            out.push((pid, String::from_utf8_lossy(&cmdline).into_owned()));
        }
    }
    out
}

/// PIDs of the watchdog processes whose parent is `parent`.
pub fn replica_pids(parent: u32) -> Vec<i32> {
    child_pids(parent)
        .into_iter()
        .filter(|(_, cmdline)| cmdline.contains("watchdog"))
        .map(|(pid, _)| pid)
        .collect()
}

/// PIDs of the watchdogs themselves under `parent`: its replica processes, or the watchdogs
/// inside them when they are sandboxes (whose own processes stand between).
pub fn watchdog_pids(parent: u32) -> Vec<i32> {
    let mut found = Vec::new();
    let mut todo = vec![parent];
    while let Some(pid) = todo.pop() {
        for (child, cmdline) in child_pids(pid) {
            let args: Vec<&str> = cmdline.trim_end_matches('\0').split('\0').collect();
            if args.len() == 2 && args[1] == "watchdog" {
                found.push(child);
            } else {
                todo.push(child as u32);
            }
        }
    }
    found
}

/// Whether `GET path` answers 200 within 2 s while the server's watchdog is stopped
/// (SIGSTOP, continued after): an invocation that reaches the function without it.
pub async fn answers_with_watchdog_stopped(s: &Server, path: &str) -> bool {
    let watchdog = watchdog_pids(s.pid())[0];
    // SAFETY: kill(2) on the watchdog this test's server started; continued below.
    unsafe { libc::kill(watchdog, libc::SIGSTOP) };
    let r = s
        .http
        .get(s.url(path))
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    unsafe { libc::kill(watchdog, libc::SIGCONT) };
    r.is_ok_and(|r| r.status() == 200)
}

/// An Alertmanager (version 4) webhook body with one alert: `status` (`firing` or `resolved`),
/// its fingerprint, a fixed start, and `labels` (which name the function).
pub fn alert_payload(status: &str, fingerprint: &str, labels: Value) -> Value {
    json!({"version": "4", "status": status, "receiver": "faastastic", "alerts": [{
        "status": status, "fingerprint": fingerprint, "startsAt": "2026-01-01T00:00:00Z",
        "labels": labels}]})
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Invocations of `/function/NAME` at a steady rate, each request on its own task so a slow
/// reply does not lower the rate (at most 64 in flight); ends at `stop` or after `limit`.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: tokio::task::JoinHandle<u32>,
    /// Requests answered with anything but 2xx, or not answered.
    failed: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

impl Load {
    pub fn start(s: &Server, name: &str, per_sec: u64, limit: Duration) -> Load {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let (flag, url, http, failures) = (
            stop.clone(),
            s.url(&format!("/function/{name}")),
            s.http.clone(),
            failed.clone(),
        );
        let handle = tokio::spawn(async move {
            let deadline = Instant::now() + limit;
            let in_flight = Arc::new(tokio::sync::Semaphore::new(64));
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_sec as f64));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut sent = 0;
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                tick.tick().await;
                let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                    continue;
                };
                let (http, url, failures) = (http.clone(), url.clone(), failures.clone());
                tokio::spawn(async move {
                    let ok = match http.post(&url).body("x").send().await {
                        Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                        Err(_) => false,
                    };
                    if !ok {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                    drop(permit);
                });
                sent += 1;
            }
            sent
        });
        Load {
            stop,
            handle,
            failed,
        }
    }

    /// Requests that failed so far (non-2xx or no answer).
    pub fn failed(&self) -> u32 {
        self.failed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops the load and returns how many requests it sent.
    pub async fn stop(self) -> u32 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.await.unwrap()
    }
}

async fn http_ok(url: &str) -> bool {
    reqwest::get(url)
        .await
        .map(|r| r.status().is_success())
        .unwrap_or(false)
}

/// Real Prometheus (and, when given a config, real Alertmanager) on free loopback ports,
/// scraping `server` every second; both are killed when this is dropped.
pub struct Monitoring {
    pub prometheus_port: u16,
    pub alertmanager_port: u16,
    _procs: Vec<Proc>,
    alertmanager: Option<Proc>,
    alertmanager_args: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Monitoring {
    /// `rules`: rule files to load; `alertmanager`: its YAML, if alerts should be delivered;
    /// `prometheus_args`: extra flags.
    pub async fn start(
        server: &Server,
        rules: &[PathBuf],
        alertmanager: Option<String>,
        prometheus_args: &[&str],
    ) -> Monitoring {
        require_program("prometheus", "prometheus");
        let dir = tempfile::tempdir().unwrap();
        let (prometheus_port, alertmanager_port) = (free_port(), free_port());
        let mut procs = Vec::new();
        let mut alerting = String::new();
        let mut alertmanager_args = Vec::new();
        let mut alertmanager_proc = None;
        if let Some(config) = alertmanager {
            require_program("prometheus-alertmanager", "prometheus-alertmanager");
            let path = dir.path().join("alertmanager.yml");
            std::fs::write(&path, config).unwrap();
            alertmanager_args = vec![
                format!("--config.file={}", path.display()),
                format!("--storage.path={}", dir.path().join("am").display()),
                format!("--web.listen-address=127.0.0.1:{alertmanager_port}"),
                "--cluster.listen-address=".to_string(),
            ];
            alertmanager_proc = Some(spawn_quiet("prometheus-alertmanager", &alertmanager_args));
            alerting = format!(
                "alerting:\n  alertmanagers:\n  - static_configs:\n    - targets: [\"127.0.0.1:{alertmanager_port}\"]\n"
            );
        }
        let rule_files: Vec<String> = rules
            .iter()
            .map(|r| format!("{:?}", r.display().to_string()))
            .collect();
        // A TLS server is scraped over TLS, trusting its CA.
        let (target, scheme) = match (server.base.strip_prefix("https://"), &server.ca_file) {
            (Some(target), Some(ca)) => (
                target,
                format!(
                    "  scheme: https\n  tls_config:\n    ca_file: {:?}\n",
                    ca.display().to_string()
                ),
            ),
            _ => (server.base.trim_start_matches("http://"), String::new()),
        };
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [{}]\n{alerting}scrape_configs:\n- job_name: faastastic\n{scheme}  static_configs:\n  - targets: [\"{target}\"]\n",
            rule_files.join(", "),
        );
        let path = dir.path().join("prometheus.yml");
        std::fs::write(&path, config).unwrap();
        let mut args = vec![
            format!("--config.file={}", path.display()),
            format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()),
            format!("--web.listen-address=127.0.0.1:{prometheus_port}"),
        ];
        args.extend(prometheus_args.iter().map(|a| a.to_string()));
        procs.push(spawn_quiet("prometheus", &args));
        let m = Monitoring {
            prometheus_port,
            alertmanager_port,
            _procs: procs,
            alertmanager: alertmanager_proc,
            alertmanager_args,
            _dir: dir,
        };
        let with_am = !alerting.is_empty();
        let up = poll(Duration::from_secs(30), || async {
            http_ok(&format!("http://127.0.0.1:{prometheus_port}/-/ready")).await
                && (!with_am
                    || http_ok(&format!("http://127.0.0.1:{alertmanager_port}/-/ready")).await)
        })
        .await;
        assert!(up, "Prometheus/Alertmanager did not become ready");
        m
    }

    /// Kills Alertmanager (SIGKILL); its notification log stays for a restart.
    pub fn kill_alertmanager(&mut self) {
        self.alertmanager = None;
    }

    /// Starts Alertmanager again with the same configuration and storage, and waits for it.
    pub async fn restart_alertmanager(&mut self) {
        self.alertmanager = Some(spawn_quiet(
            "prometheus-alertmanager",
            &self.alertmanager_args,
        ));
        let url = format!("http://127.0.0.1:{}/-/ready", self.alertmanager_port);
        let up = poll(Duration::from_secs(30), || http_ok(&url)).await;
        assert!(up, "Alertmanager did not come back");
    }
}

/// The OpenFaaS rule (step mode: it carries no value), with windows short enough for a test.
pub fn step_rule(dir: &std::path::Path) -> std::path::PathBuf {
    let rules = dir.join("rules.yml");
    std::fs::write(
        &rules,
        r#"groups:
- name: openfaas
  rules:
  - alert: APIHighInvocationRate
    expr: sum(rate(gateway_function_invocation_total{code="200"}[5s])) by (function_name) > 5
    for: 1s
    labels:
      service: gateway
      severity: major
    annotations:
      summary: "High invocation total on {{ $labels.function_name }}"
"#,
    )
    .unwrap();
    rules
}

/// An Alertmanager configuration whose one receiver posts to `s`'s `/system/alert` with its
/// basic auth (trusting its CA when it serves TLS), with second-long group and repeat
/// intervals.
pub fn fast_alertmanager(s: &Server) -> String {
    let tls = match &s.ca_file {
        Some(ca) => format!("      tls_config:\n        ca_file: {}\n", ca.display()),
        None => String::new(),
    };
    format!(
        r#"route:
  group_by: [alertname, service]
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 2s
  receiver: scale-up
receivers:
- name: scale-up
  webhook_configs:
  - url: {url}
    send_resolved: true
    http_config:
      basic_auth:
        username: admin
        password_file: {pw}
{tls}"#,
        url = s.url("/system/alert"),
        pw = s.data_dir.join("basic-auth-password").display()
    )
}

/// A file of the repository (e.g. `rules/faastastic.rules.yml`).
pub fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// A route pattern from `faastastic::api::route_table()` with `{name}` replaced by `name` and
/// `{*path}` by `x/y`.
pub fn concrete_path(pattern: &str, name: &str) -> String {
    pattern.replace("{name}", name).replace("{*path}", "x/y")
}

/// The bearer token the test agents are started with.
pub const TOKEN: &str = "agent-token-for-tests";

/// A running agent; killed (with its replicas) when dropped.
pub struct Agent(pub Child);

impl Agent {
    pub fn start(datacenter: &str, port: u16, dir: &std::path::Path) -> Agent {
        Agent::start_with(datacenter, port, dir, &[], None)
    }

    /// An agent with more arguments (`--tls-cert ...`), its log (at warn) in `log` if given.
    pub fn start_with(
        datacenter: &str,
        port: u16,
        dir: &std::path::Path,
        args: &[&std::ffi::OsStr],
        log: Option<&std::path::Path>,
    ) -> Agent {
        let token_file = dir.join("token");
        std::fs::write(&token_file, TOKEN).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args(["agent", "--datacenter", datacenter, "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--token-file")
            .arg(&token_file)
            .arg("--data-dir")
            .arg(dir.join(datacenter))
            .args(args)
            .env("RUST_LOG", if log.is_some() { "warn" } else { "error" })
            .stdout(Stdio::piped());
        if let Some(log) = log {
            cmd.stderr(std::fs::File::create(log).unwrap());
        }
        let mut child = cmd.spawn().expect("start the agent");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.contains("listening on"), "agent said {line:?}");
        Agent(child)
    }

    /// SIGKILL, as a crashed machine; its replicas die with it.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}
