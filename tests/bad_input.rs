//! Every route of `faastastic::api::route_table()` against hostile requests: wrong methods,
//! malformed and mistyped JSON, any Content-Type, bodies over the limits, stalled and dribbled
//! bodies, path tricks in names, oversized and malformed request heads. After every request the
//! server must still run, must not have panicked, and its state (functions, secrets,
//! namespaces, pauses, scale events) must equal the snapshot taken before.
//!
//! Requests go over raw TCP: reqwest normalises paths and refuses to send much of this.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{echo_function, Options, Server};
use faastastic::api::{route_table, Access, BodyKind, RouteInfo};
use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SYSTEM_LIMIT: usize = 4096;
const ALERT_LIMIT: usize = 8192;
const ASYNC_LIMIT: usize = 16384;
/// `limits.body_timeout_ms` for these servers.
const BODY_TIMEOUT: Duration = Duration::from_millis(1000);
/// `limits.header_timeout_ms` for these servers.
const HEADER_TIMEOUT: Duration = Duration::from_millis(1500);
/// `proxy.upstream_timeout_secs` for these servers.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// The deployed function every `{name}` that must exist refers to.
const FUNCTION: &str = "keep";

fn config() -> String {
    format!(
        "[limits]\nmax_system_body_bytes = {SYSTEM_LIMIT}\nmax_alert_body_bytes = {ALERT_LIMIT}\n\
         max_async_body_bytes = {ASYNC_LIMIT}\nbody_timeout_ms = {}\nheader_timeout_ms = {}\n\
         [proxy]\nupstream_timeout_secs = {}\n",
        BODY_TIMEOUT.as_millis(),
        HEADER_TIMEOUT.as_millis(),
        UPSTREAM_TIMEOUT.as_secs()
    )
}

/// The configured value of a `limits.*` key a route names.
fn limit_of(key: &str) -> usize {
    match key {
        "limits.max_system_body_bytes" => SYSTEM_LIMIT,
        "limits.max_alert_body_bytes" => ALERT_LIMIT,
        "limits.max_async_body_bytes" => ASYNC_LIMIT,
        other => panic!("route table names {other}, which this test does not configure"),
    }
}

/// A route's path with `{name}` and `{*path}` filled in.
fn concrete(route: &RouteInfo, name: &str) -> String {
    common::concrete_path(route.path, name)
}

/// One answer read off the socket (the server closes after it: every request asks it to).
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
    elapsed: Duration,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn parse(raw: &[u8], elapsed: Duration) -> Reply {
        let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
            return Reply {
                status: 0,
                headers: Vec::new(),
                body: String::from_utf8_lossy(raw).into_owned(),
                elapsed,
            };
        };
        let head = String::from_utf8_lossy(&raw[..end]);
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        Reply {
            status,
            headers,
            body: String::from_utf8_lossy(&raw[end + 4..]).into_owned(),
            elapsed,
        }
    }
}

/// How the body after the head is sent.
enum Send {
    /// All of it, as fast as the socket takes it (write errors after an early answer are
    /// ignored: the answer is still read).
    All(Vec<u8>),
    /// These bytes, then nothing while the connection stays open.
    ThenStall(Vec<u8>),
    /// One byte every 200 ms until the answer arrives.
    Dribble,
}

/// Sends `head` (which must ask for `Connection: close`) and a body, and reads the answer for
/// at most 20 s.
async fn exchange(addr: &str, head: Vec<u8>, body: Send) -> Reply {
    let start = Instant::now();
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        if wr.write_all(&head).await.is_err() {
            return;
        }
        match body {
            Send::All(bytes) => {
                for chunk in bytes.chunks(16 * 1024) {
                    if wr.write_all(chunk).await.is_err() {
                        return;
                    }
                }
            }
            Send::ThenStall(bytes) => {
                let _ = wr.write_all(&bytes).await;
            }
            Send::Dribble => loop {
                if wr.write_all(b"a").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            },
        }
        // Keeps the write half (and so the connection) open until the answer is read.
        std::future::pending::<()>().await;
    });
    let mut raw = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), rd.read_to_end(&mut raw)).await;
    writer.abort();
    assert!(
        read.is_ok(),
        "no answer within 20 s; got so far: {:?}",
        String::from_utf8_lossy(&raw)
    );
    Reply::parse(&raw, start.elapsed())
}

/// A server with small limits, a deployed function, a secret, a namespace, a captured stderr
/// and a snapshot of its state.
struct Fixture {
    s: Server,
    log: PathBuf,
    snapshot: Value,
    _dir: tempfile::TempDir,
}

impl Fixture {
    async fn start() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stderr.log");
        let cfg = config();
        let s = Server::with(Options {
            auth: true,
            config: Some(&cfg),
            stderr_log: Some(&log),
            ..Default::default()
        });
        assert_eq!(s.deploy(echo_function(FUNCTION)).await.status(), 202);
        s.wait_available(FUNCTION, 1).await;
        let r = s
            .system(Method::POST, "/system/secrets")
            .json(&json!({"name": "token", "value": "v"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let r = s
            .system(Method::POST, "/system/namespace")
            .json(&json!({"name": "team", "labels": {"openfaas": "1"}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let snapshot = state(&s).await;
        Fixture {
            s,
            log,
            snapshot,
            _dir: dir,
        }
    }

    fn addr(&self) -> String {
        self.s.addr()
    }

    /// A request head with credentials, `Connection: close` and the given extra headers.
    fn head(&self, method: &str, target: &str, headers: &[(&str, String)]) -> Vec<u8> {
        self.head_as(method, target, headers, true)
    }

    fn head_as(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, String)],
        credentials: bool,
    ) -> Vec<u8> {
        let mut h = format!("{method} {target} HTTP/1.1\r\nHost: {}\r\n", self.addr());
        if credentials {
            if let Some(auth) = self.s.basic_auth_header() {
                h.push_str(&format!("Authorization: {auth}\r\n"));
            }
        }
        for (k, v) in headers {
            h.push_str(&format!("{k}: {v}\r\n"));
        }
        h.push_str("Connection: close\r\n\r\n");
        h.into_bytes()
    }

    /// `method target` with a complete body (`Content-Length` set) and credentials.
    async fn send(
        &self,
        method: &str,
        target: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Reply {
        let mut headers = vec![("Content-Length", body.len().to_string())];
        if let Some(ct) = content_type {
            headers.push(("Content-Type", ct.to_string()));
        }
        exchange(
            &self.addr(),
            self.head(method, target, &headers),
            Send::All(body.to_vec()),
        )
        .await
    }

    /// Asserts the server survived `what` unchanged: still running, no panic in its stderr,
    /// state equal to the snapshot.
    async fn check(&mut self, what: &str) {
        assert!(self.s.is_alive(), "the server exited after {what}");
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        assert!(
            !log.contains("panicked"),
            "the server panicked after {what}:\n{log}"
        );
        let now = state(&self.s).await;
        assert_eq!(now, self.snapshot, "state changed after {what}");
    }
}

/// Everything a bad request must not change. Invocation counts are left out: a stalled body
/// sent to `/function/NAME` is still an invocation.
async fn state(s: &Server) -> Value {
    let mut functions: Value = s.get_json("/system/functions").await;
    for f in functions.as_array_mut().unwrap() {
        f.as_object_mut().unwrap().remove("invocationCount");
    }
    json!({
        "functions": functions,
        "secrets": s.get_json::<Value>("/system/secrets").await,
        "namespaces": s.get_json::<Value>("/system/namespaces").await,
        "team": s.get_json::<Value>("/system/namespace/team").await,
        "autoscaling": s.get_json::<Value>("/system/autoscaling").await,
        "events": s.get_json::<Value>("/system/scale-events").await,
    })
}

/// Every method worth trying, standard or not.
const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT", "PURGE",
];

fn method_set(r: &RouteInfo) -> BTreeSet<String> {
    r.methods.iter().map(|m| m.method.to_string()).collect()
}

#[tokio::test]
async fn every_method_a_route_lacks_gets_405_with_an_allow_header_matching_the_table() {
    let mut f = Fixture::start().await;
    let table = route_table();
    assert!(
        table.len() >= 20,
        "the route table lists {} routes",
        table.len()
    );
    let mut tried = 0;
    for route in &table {
        let path = concrete(route, FUNCTION);
        let allowed = method_set(route);
        for method in METHODS.iter().filter(|m| !allowed.contains(**m)) {
            for credentials in [true, false] {
                let r = exchange(
                    &f.addr(),
                    f.head_as(
                        method,
                        &path,
                        &[("Content-Length", "0".into())],
                        credentials,
                    ),
                    Send::All(Vec::new()),
                )
                .await;
                // Credentials are checked first: an anonymous client learns nothing about a
                // system route's methods.
                let code = if credentials || route.access == Access::Open {
                    405
                } else {
                    401
                };
                assert_eq!(
                    r.status, code,
                    "{method} {path} (credentials: {credentials}): {r:?}"
                );
                let allow: BTreeSet<String> = r
                    .header("allow")
                    .unwrap_or_else(|| panic!("{method} {path}: no Allow header"))
                    .split(',')
                    .map(|m| m.trim().to_string())
                    .collect();
                assert_eq!(
                    allow, allowed,
                    "{method} {path}: Allow differs from the route table"
                );
                f.check(&format!("{method} {path}")).await;
                tried += 1;
            }
        }
    }
    assert!(tried > 100, "only {tried} wrong methods tried");
}

/// For each JSON body a route takes: bodies whose field has the wrong type, and the field
/// the 400 must name. Every JSON route of the table must be covered here.
fn mistyped(method: &Method, path: &str) -> Option<Vec<(&'static str, &'static str)>> {
    let cases = match (method.as_str(), path) {
        ("POST", "/system/functions") => vec![
            (r#"{"service":5}"#, "service"),
            (
                r#"{"service":"x","image":"i","envVars":{"a":1}}"#,
                "envVars.a",
            ),
        ],
        ("PUT", "/system/functions") => vec![(r#"{"service":"keep","labels":["x"]}"#, "labels")],
        ("DELETE", "/system/functions") => vec![(r#"{"functionName":5}"#, "functionName")],
        ("POST", "/system/scale-function/{name}") => vec![
            (r#"{"replicas":"two"}"#, "replicas"),
            (r#"{"replicas":-1}"#, "replicas"),
        ],
        ("POST", "/system/namespace") | ("POST", "/system/namespace/") => {
            vec![(r#"{"name":5}"#, "name")]
        }
        ("PUT", "/system/namespace/{name}") => {
            vec![(r#"{"name":"keep","labels":{"a":1}}"#, "labels.a")]
        }
        ("POST", "/system/secrets") | ("PUT", "/system/secrets") => {
            vec![(r#"{"name":"token","value":7}"#, "value")]
        }
        ("DELETE", "/system/secrets") => vec![(r#"{"name":["token"]}"#, "name")],
        ("POST", "/system/alert") => vec![
            (r#"{"alerts":"many"}"#, "alerts"),
            (
                r#"{"alerts":[{"labels":{"function_name":5}}]}"#,
                "alerts[0].labels.function_name",
            ),
        ],
        ("POST", "/system/autoscaling/pause") => vec![(r#"{"function":5}"#, "function")],
        ("POST", "/system/autoscaling/resume") => vec![(r#"{"reason":{}}"#, "reason")],
        _ => return None,
    };
    Some(cases)
}

/// Bodies no JSON route accepts, and what the 400 says about each.
fn malformed() -> Vec<(Vec<u8>, &'static str)> {
    let deep = format!("{{\"x\":{}", "[".repeat(3_000));
    vec![
        (br#"{"a":"#.to_vec(), "EOF while parsing"),
        (b"[1]".to_vec(), "must be a JSON object"),
        (b"null".to_vec(), "must be a JSON object"),
        (b"a=1&b=2".to_vec(), "must be a JSON object"),
        (b"\xef\xbb\xbf{}".to_vec(), "must be a JSON object"),
        (b"{\"\xff\xfe\":1}".to_vec(), "unicode"),
        (b"{\"a\0\":1}".to_vec(), "control character"),
        (deep.into_bytes(), "EOF while parsing"),
    ]
}

#[tokio::test]
async fn malformed_and_mistyped_json_gets_400_naming_the_field_whatever_the_content_type() {
    let mut f = Fixture::start().await;
    let mut json_routes = 0;
    for route in route_table() {
        for m in route.methods.iter().filter(|m| m.body == BodyKind::Json) {
            json_routes += 1;
            let method = m.method.as_str();
            let path = concrete(&route, FUNCTION);
            let cases = mistyped(&m.method, route.path).unwrap_or_else(|| {
                panic!(
                    "{method} {} takes JSON: add its mistyped bodies",
                    route.path
                )
            });
            for (body, field) in cases {
                let r = f
                    .send(method, &path, Some("application/json"), body.as_bytes())
                    .await;
                assert_eq!(r.status, 400, "{method} {path} {body}: {r:?}");
                assert!(
                    r.body.contains(&format!("{field}: invalid")),
                    "{method} {path} {body}: the answer should name {field}: {}",
                    r.body
                );
                f.check(&format!("{method} {path} {body}")).await;
            }
            for (body, needle) in malformed() {
                let shown = String::from_utf8_lossy(&body[..body.len().min(40)]).into_owned();
                let mut answers = Vec::new();
                for ct in [
                    Some("application/json"),
                    Some("text/plain"),
                    Some("application/x-www-form-urlencoded"),
                    Some("application/json; charset=utf-16"),
                    None,
                ] {
                    let r = f.send(method, &path, ct, &body).await;
                    assert_eq!(r.status, 400, "{method} {path} {shown} ({ct:?}): {r:?}");
                    answers.push(r.body);
                }
                // Namespace bodies need a name first; serde reports that before the rest.
                let named =
                    answers[0].contains(needle) || answers[0].contains("missing field `name`");
                assert!(
                    named,
                    "{method} {path} {shown}: {:?} should mention {needle:?}",
                    answers[0]
                );
                assert!(
                    answers.iter().all(|a| a == &answers[0]),
                    "{method} {path} {shown}: the Content-Type changed the answer: {answers:?}"
                );
                f.check(&format!("{method} {path} {shown}")).await;
            }
        }
    }
    assert!(
        json_routes >= 13,
        "only {json_routes} JSON methods in the table"
    );

    // The Content-Type is not checked (as in OpenFaaS): a valid body sent as text/plain is
    // accepted. Resuming when nothing is paused changes nothing.
    let r = f
        .send(
            "POST",
            "/system/autoscaling/resume",
            Some("text/plain"),
            b"{}",
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains("\"changed\":false"), "{}", r.body);
    f.check("a text/plain resume").await;
}

/// Every (route, method) that buffers a body, with a concrete path.
fn buffered_methods() -> Vec<(String, String, usize, &'static str)> {
    let mut out = Vec::new();
    for route in route_table() {
        let Some(key) = route.body_limit else {
            continue;
        };
        for m in route.methods.iter().filter(|m| m.body != BodyKind::Ignored) {
            out.push((
                m.method.to_string(),
                concrete(&route, FUNCTION),
                limit_of(key),
                key,
            ));
        }
    }
    out
}

#[tokio::test]
async fn bodies_over_the_configured_limits_get_413_naming_the_limit() {
    let mut f = Fixture::start().await;
    let cases = buffered_methods();
    assert!(cases.len() >= 16, "{} buffered methods", cases.len());
    for (method, path, limit, key) in &cases {
        for size in [limit + 1, 3 * 1024 * 1024] {
            let body = format!("{{\"x\":\"{}\"}}", "a".repeat(size));
            // Announced with Content-Length.
            let r = f
                .send(method, path, Some("application/json"), body.as_bytes())
                .await;
            assert_eq!(r.status, 413, "{method} {path} {size} bytes: {r:?}");
            assert!(
                r.body.contains(key) && r.body.contains(&limit.to_string()),
                "{method} {path}: {}",
                r.body
            );
            assert_eq!(r.header("connection"), Some("close"));
            f.check(&format!("{method} {path} with {size} bytes")).await;
            // Chunked, with no length announced.
            let mut chunked = Vec::new();
            for piece in body.as_bytes().chunks(1000) {
                chunked.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                chunked.extend_from_slice(piece);
                chunked.extend_from_slice(b"\r\n");
            }
            chunked.extend_from_slice(b"0\r\n\r\n");
            let head = f.head(method, path, &[("Transfer-Encoding", "chunked".into())]);
            let r = exchange(&f.addr(), head, Send::All(chunked)).await;
            assert_eq!(r.status, 413, "{method} {path} {size} bytes chunked: {r:?}");
            f.check(&format!("{method} {path} with {size} chunked bytes"))
                .await;
        }
    }
    // A body at the limit is read in full (and refused for what it says, not its size).
    let body = format!("{{\"x\":\"{}\"}}", "a".repeat(SYSTEM_LIMIT - 8));
    assert_eq!(body.len(), SYSTEM_LIMIT);
    let r = f
        .send(
            "POST",
            "/system/functions",
            Some("application/json"),
            body.as_bytes(),
        )
        .await;
    assert_eq!(r.status, 400, "{r:?}");
    f.check("a deploy body at the limit").await;
}

#[tokio::test]
async fn stalled_and_dribbled_bodies_get_408_within_the_body_timeout() {
    let mut f = Fixture::start().await;
    let addr = f.addr();
    let mut runs = Vec::new();
    for (method, path, _, _) in buffered_methods() {
        for dribble in [false, true] {
            let head = f.head(&method, &path, &[("Content-Length", "100".into())]);
            let body = if dribble {
                Send::Dribble
            } else {
                Send::ThenStall(b"{\"x".to_vec())
            };
            let addr = addr.clone();
            let label = format!("{method} {path} (dribble: {dribble})");
            runs.push(tokio::spawn(async move {
                (label, exchange(&addr, head, body).await)
            }));
        }
    }
    assert!(runs.len() >= 32);
    for run in runs {
        let (label, r) = run.await.unwrap();
        assert_eq!(r.status, 408, "{label}: {r:?}");
        assert!(
            r.body.contains("limits.body_timeout_ms"),
            "{label}: {}",
            r.body
        );
        assert_eq!(r.header("connection"), Some("close"), "{label}");
        assert!(
            r.elapsed >= BODY_TIMEOUT && r.elapsed < BODY_TIMEOUT + Duration::from_secs(10),
            "{label}: answered after {:?}",
            r.elapsed
        );
        f.check(&label).await;
    }

    // Synchronous invocation streams the body to the function: a stalled one is bounded by
    // proxy.upstream_timeout_secs (504).
    for dribble in [false, true] {
        let head = f.head(
            "POST",
            "/function/keep",
            &[("Content-Length", "100".into())],
        );
        let body = if dribble {
            Send::Dribble
        } else {
            Send::ThenStall(b"abc".to_vec())
        };
        let r = exchange(&addr, head, body).await;
        assert_eq!(r.status, 504, "{r:?}");
        assert!(r.body.contains("proxy.upstream_timeout_secs"), "{}", r.body);
        assert!(
            r.elapsed >= UPSTREAM_TIMEOUT && r.elapsed < UPSTREAM_TIMEOUT + Duration::from_secs(10),
            "{:?}",
            r.elapsed
        );
        f.check("a stalled invocation body").await;
    }
    assert_eq!(
        f.s.invoke(FUNCTION, "still serving").await.1,
        "still serving"
    );

    // A head that never ends holds only its own connection (others are served meanwhile),
    // and only until limits.header_timeout_ms: then the server closes it.
    let started = Instant::now();
    let mut stalled = TcpStream::connect(&addr).await.unwrap();
    stalled
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let r = f.s.http.get(f.s.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut answer = Vec::new();
    let closed = tokio::time::timeout(
        HEADER_TIMEOUT + Duration::from_secs(10),
        stalled.read_to_end(&mut answer),
    )
    .await;
    assert!(
        closed.is_ok(),
        "a connection that never finished its head was still open after {:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() >= HEADER_TIMEOUT - Duration::from_millis(100),
        "closed before the header timeout: {:?}",
        started.elapsed()
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    f.check("a stalled request head").await;
}

/// Names no route may accept: traversal, encoded slashes, NUL, invalid UTF-8, overlong.
fn hostile_names() -> Vec<String> {
    let mut names: Vec<String> = [
        "..",
        ".",
        "%2e%2e",
        "%2E%2E",
        "a%2Fb",
        "%2F",
        "..%2F..%2Fsystem%2Fsecrets",
        "a%00b",
        "%00",
        "%FF",
        "%C0%AE%C0%AE",
        "a%20b",
        "a.b.c",
        ".keep",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    names.push("a".repeat(10 * 1024));
    names
}

#[tokio::test]
async fn hostile_names_and_queries_get_400_and_overlong_uris_414() {
    let mut f = Fixture::start().await;
    let mut tried = 0;
    for route in route_table().iter().filter(|r| r.path.contains("{name}")) {
        for name in hostile_names() {
            let path = concrete(route, &name);
            let shown = &path[..path.len().min(60)];
            for m in route.methods.iter().filter(|m| m.method != Method::HEAD) {
                let body: &[u8] = match m.body {
                    BodyKind::Json => br#"{"replicas":1,"name":""}"#,
                    _ => b"",
                };
                let r = f.send(m.method.as_str(), &path, None, body).await;
                assert_eq!(r.status, 400, "{} {shown}: {r:?}", m.method);
                assert!(
                    r.body.to_lowercase().contains("name"),
                    "{} {shown}: {}",
                    m.method,
                    r.body
                );
                assert!(
                    r.body.len() < 1024,
                    "{} {shown}: the answer echoes the name in full ({} bytes)",
                    m.method,
                    r.body.len()
                );
                f.check(&format!("{} {shown}", m.method)).await;
                tried += 1;
            }
        }
    }
    assert!(tried > 300, "only {tried} hostile names tried");

    // Query parameters (faas-provider answers 422 for an unparseable log tail or since).
    for (target, code) in [
        ("/system/logs?name=..", 400),
        ("/system/logs?name=%FF", 400),
        ("/system/logs?name=a%00b", 400),
        ("/system/logs?name=keep&tail=%FF", 422),
        ("/system/logs?name=keep&since=..", 422),
        ("/system/functions?namespace=..", 400),
        ("/system/functions?namespace=%FF", 400),
        ("/system/functions?datacenter=%00", 400),
        ("/system/function/keep?namespace=%2e%2e", 400),
        ("/system/secrets?namespace=%FF", 400),
        ("/system/scale-events?limit=%FF", 400),
        ("/system/scale-events?since=..", 400),
        ("/system/functions?namespace=%", 400),
    ] {
        let r = f.send("GET", target, None, b"").await;
        assert_eq!(r.status, code, "{target}: {r:?}");
        f.check(target).await;
    }

    // Traversal never reaches a system route past authentication.
    for target in [
        "/function/../system/secrets",
        "/function/%2e%2e/system/secrets",
        "/system/../system/secrets",
        "/healthz/../system/secrets",
        "/async-function/../system/secrets",
    ] {
        let head = f.head_as("GET", target, &[], false);
        let r = exchange(&f.addr(), head, Send::All(Vec::new())).await;
        assert!([400, 404, 405].contains(&r.status), "{target}: {r:?}");
        assert!(!r.body.contains("token"), "{target}: {}", r.body);
        f.check(target).await;
    }
    // Below a function's name, the rest of the path is the function's own.
    let r = f
        .send("GET", "/function/keep/../../system/secrets", None, b"")
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.header("x-duration-seconds").is_some(),
        "answered by the function: {r:?}"
    );

    // URIs: 65 000 bytes reach the router (a 400 for the name), beyond 65 534 hyper answers 414.
    for (len, code) in [(65_000, 400), (70_000, 414)] {
        for prefix in ["/function/", "/system/function/"] {
            let target = format!("{prefix}{}", "a".repeat(len));
            let r = f.send("GET", &target, None, b"").await;
            assert_eq!(r.status, code, "{prefix} + {len} bytes: {r:?}");
            f.check(&format!("a {len}-byte URI")).await;
        }
    }
}

#[tokio::test]
async fn oversized_and_malformed_request_heads_are_refused() {
    let mut f = Fixture::start().await;
    let host = format!("Host: {}", f.addr()).into_bytes();
    // A request line, headers (each without its CRLF) and a body, asking to close after.
    let req = |line: &[u8], headers: &[&[u8]], body: &[u8]| -> Vec<u8> {
        let mut out = line.to_vec();
        for h in std::iter::once(&host.as_slice()).chain(headers) {
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(h);
        }
        out.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
        out.extend_from_slice(body);
        out
    };
    let auth = format!("Authorization: {}", f.s.basic_auth_header().unwrap()).into_bytes();
    let many: Vec<Vec<u8>> = (0..101)
        .map(|i| format!("X-H{i}: v").into_bytes())
        .collect();
    let many: Vec<&[u8]> = many.iter().map(Vec::as_slice).collect();
    let huge = format!("X-Big: {}", "a".repeat(500_000)).into_bytes();
    let large = format!("X-Big: {}", "a".repeat(60_000)).into_bytes();
    let health = b"GET /healthz HTTP/1.1".as_slice();
    let deploy = b"POST /system/functions HTTP/1.1".as_slice();
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("101 headers", req(health, &many, b""), 431),
        ("a 500 KB header", req(health, &[&huge], b""), 431),
        ("a 60 KB header", req(health, &[&large], b""), 200),
        ("a NUL in a header", req(health, &[b"X-A: a\0b"], b""), 400),
        (
            "a raw NUL in the path",
            req(b"GET /function/a\0b HTTP/1.1", &[], b""),
            400,
        ),
        (
            "a raw 0xFF in the path",
            req(b"GET /system/function/\xff HTTP/1.1", &[], b""),
            400,
        ),
        (
            "an unknown HTTP version",
            req(b"GET /healthz HTTP/9.9", &[], b""),
            400,
        ),
        ("a garbage request line", b"GARBAGE\r\n\r\n".to_vec(), 400),
        (
            "two Content-Lengths",
            req(
                deploy,
                &[&auth, b"Content-Length: 2", b"Content-Length: 3"],
                b"{}",
            ),
            400,
        ),
        (
            "a non-numeric Content-Length",
            req(deploy, &[&auth, b"Content-Length: two"], b"{}"),
            400,
        ),
        (
            "a broken chunk",
            req(deploy, &[&auth, b"Transfer-Encoding: chunked"], b"zz\r\n"),
            400,
        ),
        (
            "non-UTF-8 credentials",
            req(
                b"GET /system/functions HTTP/1.1",
                &[b"Authorization: Basic \xff\xfe"],
                b"",
            ),
            401,
        ),
        (
            "a non-UTF-8 datacenter pin",
            req(
                b"GET /function/keep HTTP/1.1",
                &[b"X-Faastastic-Datacenter: \xff"],
                b"",
            ),
            400,
        ),
        (
            "a non-UTF-8 callback URL",
            req(
                b"POST /async-function/keep HTTP/1.1",
                &[b"X-Callback-Url: \xff", b"Content-Length: 0"],
                b"",
            ),
            400,
        ),
        (
            "an authority-form CONNECT",
            req(b"CONNECT 127.0.0.1:1 HTTP/1.1", &[], b""),
            404,
        ),
    ];
    for (what, raw, code) in cases {
        let r = exchange(&f.addr(), raw, Send::All(Vec::new())).await;
        assert_eq!(r.status, code, "{what}: {r:?}");
        f.check(what).await;
    }
}

/// At `limits.max_connections` the server stops accepting: a new client waits (it is not
/// refused) until an open connection closes.
#[tokio::test]
async fn connections_beyond_the_limit_wait_for_a_free_one() {
    let s = Server::with(Options {
        config: Some("[limits]\nmax_connections = 3\n"),
        ..Default::default()
    });
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(s.addr()).await.unwrap());
    }
    let healthz = || {
        s.http
            .get(s.url("/healthz"))
            .timeout(Duration::from_millis(800))
            .send()
    };
    let waiting = healthz().await;
    assert!(
        waiting.as_ref().is_err_and(|e| e.is_timeout()),
        "a fourth connection was served: {waiting:?}"
    );
    held.pop();
    let served = common::poll(Duration::from_secs(10), || async {
        healthz().await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(served, "a freed connection slot was not reused");
}

/// A classic function gets request headers as environment variables: a header too large for
/// one is a 431 naming it, before any process starts, not the kernel's "argument list too
/// long" as a 500.
#[tokio::test]
async fn a_header_too_large_for_a_classic_function_is_431() {
    let s = Server::start();
    assert_eq!(s.deploy(echo_function("classic")).await.status(), 202);
    s.wait_available("classic", 1).await;
    let big = "x".repeat(200 * 1024);
    let r = s
        .http
        .post(s.url("/function/classic"))
        .header("x-big", &big)
        .body("hi")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 431);
    let text = r.text().await.unwrap();
    assert!(text.contains("Http_X_Big"), "{text}");
    // Headers that fit still reach the function.
    let r = s
        .http
        .post(s.url("/function/classic"))
        .header("x-fits", "x".repeat(64 * 1024))
        .body("hi")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "hi");
}
