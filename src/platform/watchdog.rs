//! The built-in function watchdog (`faastastic watchdog`): what runs inside every local replica.
//!
//! Settings come from environment variables named as in the OpenFaaS watchdogs:
//! `fprocess` (the command), `mode` (`classic`: one process per request, body on stdin and stdout
//! as the response; `http`: one long-running process reached at `upstream_url`), `exec_timeout`,
//! `content_type`. It prints `LISTENING_PREFIX<addr>` on stdout once bound and answers
//! `GET /_/health` with 200 once it can serve.

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderValue, StatusCode, Uri};
use http_body_util::BodyExt;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::DURATION_HEADER;
use crate::model::parse_duration;
use crate::proxy::{self, HttpClient};

pub const HEALTH_PATH: &str = "/_/health";
pub const LISTENING_PREFIX: &str = "faastastic-watchdog listening on ";
/// In http mode, said before `LISTENING_PREFIX`: where the function's own server listens.
pub const UPSTREAM_PREFIX: &str = "faastastic-watchdog function server at ";
/// Where the watchdog listens; read by the watchdog only, hidden from the function.
const LISTEN_ENV: &str = "faastastic_listen";
/// Where faastastic puts no control group around a replica: the memory (bytes of data) each
/// of its function's processes may use, as `RLIMIT_DATA`.
pub const RLIMIT_DATA_ENV: &str = "faastastic_rlimit_data";

#[derive(Debug, Clone)]
enum Mode {
    Classic { argv: Vec<String> },
    Http { argv: Vec<String>, upstream: Uri },
}

struct Watchdog {
    mode: Mode,
    exec_timeout: Option<Duration>,
    content_type: Option<String>,
    ready: AtomicBool,
    client: HttpClient,
}

/// Parses an upstream URL; only plain HTTP on this machine's loopback is accepted.
pub fn parse_upstream(url: &str) -> Result<Uri, String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("{url:?} must start with http://"));
    }
    match uri.host() {
        Some("127.0.0.1" | "localhost" | "[::1]" | "::1") => {}
        _ => return Err(format!("{url:?} must point at this machine (127.0.0.1)")),
    }
    if uri.port_u16().is_none() {
        return Err(format!("{url:?} must name a port"));
    }
    Ok(uri)
}

/// The socket address of an upstream URL that names its loopback address (`parse_upstream`
/// checked it): `localhost` names none (its server may listen on 127.0.0.1 or ::1 only, and
/// only the watchdog's connection, which tries both, knows), so it is reached through the
/// watchdog.
fn upstream_addr(upstream: &Uri) -> Option<std::net::SocketAddr> {
    let ip: std::net::IpAddr = upstream.host()?.trim_matches(['[', ']']).parse().ok()?;
    Some((ip, upstream.port_u16()?).into())
}

impl Watchdog {
    fn from_env() -> anyhow::Result<Watchdog> {
        let process = std::env::var("fprocess").context("fprocess is not set")?;
        let argv = shell_words::split(&process).context("fprocess cannot be split")?;
        if argv.is_empty() {
            bail!("fprocess is empty");
        }
        let mode = match std::env::var("mode").as_deref() {
            Ok("http") => {
                let url = std::env::var("upstream_url").context("upstream_url is not set")?;
                let mut upstream = parse_upstream(&url).map_err(anyhow::Error::msg)?;
                let mut argv = argv;
                if upstream.port_u16() == Some(0) {
                    // A port of its own for this replica, handed to the function as $PORT.
                    let port = std::net::TcpListener::bind("127.0.0.1:0")?
                        .local_addr()?
                        .port();
                    upstream = format!("http://127.0.0.1:{port}")
                        .parse()
                        .expect("a loopback URL with a port is valid");
                    for arg in &mut argv {
                        *arg = arg
                            .replace("${PORT}", &port.to_string())
                            .replace("$PORT", &port.to_string());
                    }
                }
                Mode::Http { argv, upstream }
            }
            Ok("classic") | Ok("") | Err(_) => Mode::Classic { argv },
            Ok(other) => bail!("mode {other:?} is not supported"),
        };
        let exec_timeout = match std::env::var("exec_timeout") {
            Ok(v) => parse_duration(&v).map_err(anyhow::Error::msg)?,
            Err(_) => Some(Duration::from_secs(10)),
        };
        Ok(Watchdog {
            mode,
            exec_timeout,
            content_type: std::env::var("content_type").ok().filter(|v| !v.is_empty()),
            ready: AtomicBool::new(false),
            client: proxy::http_client(Duration::from_secs(2), 64),
        })
    }
}

/// Runs the watchdog until its parent dies (or, in http mode, until the function's process exits).
pub async fn run() -> anyhow::Result<()> {
    let watchdog = Arc::new(Watchdog::from_env()?);
    let listen = std::env::var(LISTEN_ENV).unwrap_or_else(|_| "127.0.0.1:8080".into());
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    if let Mode::Http { upstream, .. } = &watchdog.mode {
        if let Some(addr) = upstream_addr(upstream) {
            println!("{UPSTREAM_PREFIX}{addr}");
        }
    }
    println!("{LISTENING_PREFIX}{}", listener.local_addr()?);
    exit_when_orphaned();
    exit_when_unheard();
    exit_on_sigterm();

    match &watchdog.mode {
        Mode::Classic { .. } => watchdog.ready.store(true, Ordering::Release),
        Mode::Http { argv, upstream } => {
            let mut cmd = Command::new(&argv[0]);
            if let Some(port) = upstream.port_u16() {
                cmd.env("PORT", port.to_string());
            }
            cmd.args(&argv[1..])
                .env_remove(LISTEN_ENV)
                .stdin(Stdio::null())
                .process_group(0)
                .kill_on_drop(true);
            die_with_parent(&mut cmd, libc::SIGTERM);
            limit_data(&mut cmd);
            let mut child = cmd
                .spawn()
                .with_context(|| format!("cannot start {:?}", argv[0]))?;
            if let Some(pid) = child.id() {
                FUNCTION_GROUP.store(pid as i32, Ordering::Release);
            }
            tokio::spawn(async move {
                let status = child.wait().await;
                eprintln!("function process exited ({status:?}); stopping the replica");
                signal_function_group(libc::SIGKILL);
                std::process::exit(1);
            });
            let (watchdog, upstream) = (watchdog.clone(), upstream.clone());
            tokio::spawn(async move {
                let host = upstream
                    .host()
                    .unwrap_or("127.0.0.1")
                    .trim_matches(['[', ']']);
                let target = (host.to_string(), upstream.port_u16().unwrap_or(80));
                while tokio::net::TcpStream::connect(target.clone())
                    .await
                    .is_err()
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                watchdog.ready.store(true, Ordering::Release);
            });
        }
    }

    let app = Router::new()
        .route(HEALTH_PATH, get(health))
        .fallback(handle)
        .with_state(watchdog);
    axum::serve(listener, app).await?;
    Ok(())
}

/// Process group of the long-running function process (http mode); 0 when there is none.
static FUNCTION_GROUP: AtomicI32 = AtomicI32::new(0);

fn signal_function_group(signal: libc::c_int) -> bool {
    let group = FUNCTION_GROUP.load(Ordering::Acquire);
    // SAFETY: signals the process group this watchdog created; kill(2) has no memory effects.
    group > 0 && unsafe { libc::kill(-group, signal) } == 0
}

/// Stops the function's whole process group (its workers too): SIGTERM, then SIGKILL after
/// two seconds, then exits, killing the classic requests still running.
async fn stop_and_exit() -> ! {
    if signal_function_group(libc::SIGTERM) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while signal_function_group(0) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        signal_function_group(libc::SIGKILL);
    }
    GroupKiller::kill_all();
    std::process::exit(0)
}

fn exit_on_sigterm() {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        return;
    };
    tokio::spawn(async move {
        term.recv().await;
        stop_and_exit().await;
    });
}

/// The local platform signals replicas with PR_SET_PDEATHSIG; this is a second line of defence
/// for a watchdog started by hand.
fn exit_when_orphaned() {
    let parent = std::os::unix::process::parent_id();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if std::os::unix::process::parent_id() != parent {
                stop_and_exit().await;
            }
        }
    });
}

/// Exits once nothing reads the watchdog's standard output: the local platform reads it
/// through a pipe, and the pipe's reading end closes when the server dies, however it dies.
/// Unlike the parent-death signal this crosses a sandbox, whose own processes stand between
/// the server and the watchdog (and can outlive it: their parent-death signal is set after
/// they start, so a server killed at that moment leaves them running).
fn exit_when_unheard() {
    // SAFETY: fstat writes into the zeroed struct it is given.
    let is_pipe = unsafe {
        let mut stat: libc::stat = std::mem::zeroed();
        libc::fstat(libc::STDOUT_FILENO, &mut stat) == 0
            && stat.st_mode & libc::S_IFMT == libc::S_IFIFO
    };
    if !is_pipe {
        return;
    }
    let runtime = tokio::runtime::Handle::current();
    std::thread::spawn(move || loop {
        // No events asked for: poll returns only on POLLERR (no reader left) or POLLHUP.
        let mut out = libc::pollfd {
            fd: libc::STDOUT_FILENO,
            events: 0,
            revents: 0,
        };
        // SAFETY: polls one descriptor, described by the struct it is given.
        let ready = unsafe { libc::poll(&mut out, 1, -1) };
        if ready > 0 {
            runtime.block_on(stop_and_exit());
        }
    });
}

async fn health(State(w): State<Arc<Watchdog>>) -> StatusCode {
    if w.ready.load(Ordering::Acquire) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn handle(State(w): State<Arc<Watchdog>>, req: Request) -> Response {
    let started = Instant::now();
    let mut response = match &w.mode {
        Mode::Classic { argv } => run_classic(&w, argv, req).await,
        Mode::Http { upstream, .. } => forward_http(&w, upstream, req).await,
    };
    if !response.headers().contains_key(DURATION_HEADER) {
        let secs = super::seconds_since(started);
        if let Ok(v) = HeaderValue::from_str(&secs) {
            response.headers_mut().insert(DURATION_HEADER, v);
        }
    }
    response
}

/// `Content-Type` → `Http_Content_Type`, as the classic OpenFaaS watchdog names header variables.
fn header_env_name(name: &str) -> String {
    let mut out = String::from("Http_");
    for (i, part) in name.split('-').enumerate() {
        if i > 0 {
            out.push('_');
        }
        let mut chars = part.chars();
        if let Some(first) = chars.next() {
            out.extend(first.to_uppercase());
            out.extend(chars.flat_map(char::to_lowercase));
        }
    }
    out
}

/// The request as a classic process's environment, but for `Http_ContentLength`.
fn request_env(headers: &HeaderMap, method: &str, uri: &Uri) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = headers
        .iter()
        .filter_map(|(k, v)| Some((header_env_name(k.as_str()), v.to_str().ok()?.to_string())))
        .collect();
    env.push(("Http_Method".into(), method.to_string()));
    env.push(("Http_Path".into(), uri.path().to_string()));
    if let Some(q) = uri.query() {
        env.push(("Http_Query".into(), q.to_string()));
    }
    env
}

/// The longest `NAME=value` one environment variable may be (Linux's `MAX_ARG_STRLEN`, 32
/// pages of 4 KiB, less its terminating NUL).
const MAX_ENV_ENTRY: usize = 32 * 4096 - 1;
/// The request variables a classic process gets, in all (the kernel's limit for arguments and
/// environment together is larger on any usual stack size, and the server's own environment
/// comes on top).
const MAX_REQUEST_ENV: usize = 1024 * 1024;

/// Why a request's headers cannot become a classic process's environment, if they cannot.
fn env_too_large(env: &[(String, String)]) -> Option<String> {
    if let Some((name, value)) = env
        .iter()
        .find(|(name, value)| name.len() + 1 + value.len() > MAX_ENV_ENTRY)
    {
        return Some(format!(
            "{name} is {} bytes; a classic function gets the request's headers, path and query as \
             environment variables of at most {MAX_ENV_ENTRY} bytes each",
            value.len()
        ));
    }
    let total: usize = env.iter().map(|(n, v)| n.len() + v.len() + 2).sum();
    (total > MAX_REQUEST_ENV).then(|| {
        format!(
            "the request's headers make {total} bytes of environment; a classic function takes \
             at most {MAX_REQUEST_ENV}"
        )
    })
}

async fn run_classic(w: &Watchdog, argv: &[String], req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let mut env = request_env(&parts.headers, parts.method.as_str(), &parts.uri);
    if let Some(why) = env_too_large(&env) {
        return plain(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, why);
    }
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return plain(
                StatusCode::BAD_REQUEST,
                format!("cannot read request body: {e}"),
            )
        }
    };
    env.push(("Http_ContentLength".into(), body.len().to_string()));
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_remove(LISTEN_ENV)
        .envs(env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // Its own process group, so a timeout or a dropped request stops whatever it started.
    cmd.process_group(0);
    // No parent-death signal: it is a step run in the child before the command, and with
    // such a step the standard library forks the whole watchdog instead of spawning
    // (vfork-like), about 270 µs more per request. Should the watchdog die, what the request
    // runs dies anyway: as it exits, by `GroupKiller::kill_all`; killed outright, with the
    // sandbox's PID namespace, or swept from the replica's session by the local platform (or
    // with a container's PID namespace, where the watchdog is its first process).
    limit_data(&mut cmd);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) if e.raw_os_error() == Some(libc::E2BIG) => {
            return plain(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                format!("the request's headers are too large to pass to the function process: {e}"),
            );
        }
        Err(e) => {
            eprintln!("cannot start {:?}: {e}", argv[0]);
            return plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot start function process: {e}"),
            );
        }
    };
    let _group = child.id().map(GroupKiller::new);
    if let Some(mut stdin) = child.stdin.take() {
        // Most bodies fit in the pipe: written at once and the pipe closed, with no task (and
        // no other thread woken) for it. The rest of a larger body goes as the process reads.
        // Written straight to the descriptor: through tokio, a pipe just created is not yet
        // known to be writable, and the write would wait for the runtime to say so.
        let written = match write_nonblocking(&stdin, &body) {
            Ok(n) => Some(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Some(0),
            // A process that does not read its input (its pipe closed) gets no more of it.
            Err(_) => None,
        };
        if let Some(from) = written.filter(|n| *n < body.len()) {
            tokio::spawn(async move {
                let _ = stdin.write_all(&body[from..]).await;
            });
        }
    }
    let output = match w.exec_timeout {
        Some(limit) => match tokio::time::timeout(limit, child.wait_with_output()).await {
            Ok(out) => out,
            Err(_) => {
                eprintln!("function process killed after exec_timeout {limit:?}");
                return plain(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!("function timed out after {limit:?}"),
                );
            }
        },
        None => child.wait_with_output().await,
    };
    let output = match output {
        Ok(o) => o,
        Err(e) => {
            return plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("function failed: {e}"),
            )
        }
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    for line in stderr.lines() {
        eprintln!("{line}");
    }
    if !output.status.success() {
        return plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{}{}", stderr, output.status),
        );
    }
    let content_type = w
        .content_type
        .clone()
        .or_else(|| {
            parts
                .headers
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "text/plain; charset=utf-8".to_string());
    let mut response = Response::new(Body::from(output.stdout));
    if let Ok(v) = HeaderValue::from_str(&content_type) {
        response.headers_mut().insert(CONTENT_TYPE, v);
    }
    response
}

async fn forward_http(w: &Watchdog, upstream: &Uri, mut req: Request) -> Response {
    proxy::strip_hop_by_hop(req.headers_mut());
    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let authority = upstream
        .authority()
        .map(|a| a.as_str().to_string())
        .unwrap_or_default();
    let uri = match Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(path_and_query)
        .build()
    {
        Ok(u) => u,
        Err(e) => return plain(StatusCode::BAD_REQUEST, format!("bad request path: {e}")),
    };
    match proxy::send(&w.client, uri, req, w.exec_timeout).await {
        Ok(resp) => resp.map(Body::new),
        Err(proxy::UpstreamError::Timeout) => plain(
            StatusCode::GATEWAY_TIMEOUT,
            "function timed out".to_string(),
        ),
        Err(proxy::UpstreamError::Connect(e) | proxy::UpstreamError::Malformed(_, e)) => plain(
            StatusCode::BAD_GATEWAY,
            format!("cannot reach function: {e}"),
        ),
    }
}

/// One `write(2)` to a descriptor tokio keeps non-blocking: what the pipe takes now.
fn write_nonblocking(pipe: &impl std::os::fd::AsRawFd, bytes: &[u8]) -> std::io::Result<usize> {
    if bytes.is_empty() {
        return Ok(0);
    }
    // SAFETY: writes at most `bytes.len()` bytes from a live slice to a descriptor `pipe` owns.
    let n = unsafe { libc::write(pipe.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Kills a classic request's whole process group when the request ends, however it ends
/// (the watchdog exiting included: see `kill_all`).
struct GroupKiller(u32);

/// The process groups of the classic requests running now.
static RUNNING_GROUPS: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

impl GroupKiller {
    fn new(group: u32) -> GroupKiller {
        RUNNING_GROUPS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(group);
        GroupKiller(group)
    }

    /// Kills every running request's group, as the watchdog exits (no destructor runs then).
    fn kill_all() {
        let groups = RUNNING_GROUPS.lock().unwrap_or_else(|p| p.into_inner());
        for group in groups.iter() {
            // SAFETY: signals a process group a running request created; no memory effects.
            unsafe { libc::kill(-(*group as libc::pid_t), libc::SIGKILL) };
        }
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        // SAFETY: signals the process group this request created; kill(2) has no memory effects.
        unsafe { libc::kill(-(self.0 as libc::pid_t), libc::SIGKILL) };
        let mut groups = RUNNING_GROUPS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(at) = groups.iter().position(|g| *g == self.0) {
            groups.swap_remove(at);
        }
    }
}

fn plain(status: StatusCode, text: String) -> Response {
    (status, format!("{}\n", text.trim_end())).into_response()
}

/// Applies the replica's `RLIMIT_DATA` (if faastastic gave one) to a function process, and
/// keeps the setting out of its environment.
fn limit_data(cmd: &mut Command) {
    static LIMIT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    let limit = *LIMIT.get_or_init(|| std::env::var(RLIMIT_DATA_ENV).ok()?.parse().ok());
    cmd.env_remove(RLIMIT_DATA_ENV);
    let Some(bytes) = limit else { return };
    // SAFETY: setrlimit is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: bytes as libc::rlim_t,
                rlim_max: bytes as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_DATA, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Asks the kernel to send `signal` to the child when its parent dies, so a crashed server
/// leaves no orphaned replicas holding ports (a replica's watchdog gets SIGTERM, on which it
/// stops its function's whole process group) and a dead watchdog no orphaned function. A
/// parent that died before the request was made is caught too: the child then does not run.
pub(crate) fn die_with_parent(cmd: &mut Command, signal: libc::c_int) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: prctl and getppid are async-signal-safe and touch no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                // The parent died while this child started (no allocation here, after fork).
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_names_follow_the_classic_watchdog() {
        assert_eq!(header_env_name("content-type"), "Http_Content_Type");
        assert_eq!(header_env_name("x-call-id"), "Http_X_Call_Id");
    }

    #[test]
    fn upstreams_stay_on_loopback() {
        assert!(parse_upstream("http://127.0.0.1:5000").is_ok());
        assert!(parse_upstream("http://localhost:5000/").is_ok());
        assert!(parse_upstream("http://10.0.0.1:5000").is_err());
        assert!(parse_upstream("https://127.0.0.1:5000").is_err());
        assert!(parse_upstream("http://127.0.0.1").is_err());
        let addr = |url: &str| upstream_addr(&parse_upstream(url).unwrap()).map(|a| a.to_string());
        assert_eq!(addr("http://localhost:5000/"), None);
        assert_eq!(
            addr("http://127.0.0.1:5000/"),
            Some("127.0.0.1:5000".into())
        );
        assert_eq!(addr("http://[::1]:5001"), Some("[::1]:5001".into()));
    }
}
